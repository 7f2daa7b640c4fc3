//! `spotguard-controller setup`: creates or updates, idempotently, the
//! target-tracking policies of every group: the primary and each fallback
//! of the cascade, each in its own region.
//!
//! The primary uses the published backlog-per-instance metric
//! (`custom-metric`) or metric math over AWS/SQS and AWS/AutoScaling
//! (`metric-math`, which needs no publisher). The fallback always uses the
//! published metric: its policy lives in another region than the queue, and
//! a target-tracking policy can only read metrics of its own region.

use serde::Serialize;

use crate::aws::{Cloud, CloudError, MetricSpec, TargetTracking};
use crate::config::{Config, PolicyForm};

#[derive(Debug, Clone, Serialize)]
pub struct PolicyChange {
    pub region: String,
    pub group: String,
    pub policy: String,
    /// `create`, `update` or `unchanged`.
    pub change: &'static str,
    pub target: f64,
    pub metric: String,
}

fn describe(spec: &MetricSpec) -> String {
    match spec {
        MetricSpec::Custom {
            namespace,
            name,
            dimensions,
        } => format!(
            "{namespace}/{name} {}",
            dimensions
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        ),
        MetricSpec::BacklogMath { queue_name, group } => {
            format!("AWS/SQS ApproximateNumberOfMessagesVisible[{queue_name}] / AWS/AutoScaling GroupInServiceInstances[{group}]")
        }
    }
}

/// The policies the configuration asks for: (region, group, policy).
pub fn desired(cfg: &Config) -> Vec<(String, String, TargetTracking)> {
    let p = &cfg.primary;
    let queue_name = p
        .queue_url
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string();
    let primary_spec = match cfg.policy.form {
        PolicyForm::CustomMetric => MetricSpec::Custom {
            namespace: cfg.metric.namespace.clone(),
            name: cfg.metric.primary_name.clone(),
            dimensions: vec![("AutoScalingGroupName".into(), p.asg.clone())],
        },
        PolicyForm::MetricMath => MetricSpec::BacklogMath {
            queue_name,
            group: p.asg.clone(),
        },
    };
    let mut out = vec![(
        p.region.clone(),
        p.asg.clone(),
        TargetTracking::new(
            cfg.policy.primary_policy_name.clone(),
            cfg.policy.primary_target,
            primary_spec,
        ),
    )];
    for f in &cfg.fallbacks {
        out.push((
            f.region.clone(),
            f.asg.clone(),
            TargetTracking::new(
                f.policy_name.clone(),
                f.target_or(&cfg.policy),
                MetricSpec::Custom {
                    namespace: cfg.metric.namespace.clone(),
                    name: cfg.metric.fallback_name.clone(),
                    dimensions: vec![("AutoScalingGroupName".into(), f.asg.clone())],
                },
            ),
        ));
    }
    out
}

pub async fn setup<C: Cloud>(
    cloud: &C,
    cfg: &Config,
    dry_run: bool,
) -> Result<Vec<PolicyChange>, CloudError> {
    let mut out = Vec::new();
    for (region, group, policy) in desired(cfg) {
        let existing = cloud.policy(&region, &group, &policy.name).await?;
        let change = match &existing {
            None => "create",
            Some((enabled, p)) if p.same_as(&policy) && *enabled != Some(false) => "unchanged",
            Some(_) => "update",
        };
        if change != "unchanged" && !dry_run {
            // An existing policy keeps its name (a template's) and the
            // fields setup does not manage (DisableScaleIn, warm-up, ...).
            let mut policy = policy.clone();
            if let Some((_, old)) = &existing {
                policy.name = old.name.clone();
                policy.disable_scale_in = old.disable_scale_in;
                policy.estimated_warmup = old.estimated_warmup;
                policy.unit = old.unit.clone();
            }
            cloud.put_policy(&region, &group, &policy, true).await?;
        }
        out.push(PolicyChange {
            region,
            group,
            policy: policy.name.clone(),
            change,
            target: policy.target,
            metric: describe(&policy.spec),
        });
    }
    Ok(out)
}
