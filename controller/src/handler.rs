//! One invocation of the controller, over a [`Cloud`]: handle an event,
//! publish the metrics, observe, decide ([`crate::reconcile`]) and act.
//! The same code serves Lambda, the `run` loop and `once`.

use serde::Serialize;
use serde_json::{json, Value};

use crate::aws::{Cloud, CloudError, GroupInfo};
use crate::config::Config;
use crate::events::{self, Event};
use crate::metrics::{self, MetricValue};
use crate::reconcile::{self, Action, FallbackGroup, Launch, Memory, Plan, Settings};

pub struct Controller<C> {
    pub cfg: Config,
    pub cloud: C,
}

/// What one reconcile saw, decided and did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode_before: &'static str,
    pub mode: &'static str,
    pub fallback: FallbackGroup,
    pub launches_seen: usize,
    pub plan: Plan,
    /// False for `status` (planned only).
    pub executed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TickReport {
    pub metrics: Vec<MetricValue>,
    pub metrics_error: Option<String>,
    pub reconcile: Report,
}

impl<C: Cloud> Controller<C> {
    pub fn settings(&self) -> Settings {
        let f = &self.cfg.failover;
        Settings {
            failures: f.failures,
            window: f.failure_window.0,
            capacity_ttl: f.capacity_ttl.0,
            cooldown: f.cooldown.0,
            min_dwell: f.min_dwell.0,
            step: f.failback_step,
            cap: self.cfg.fallback.max_size,
        }
    }

    /// Handles one EventBridge event. Unknown or malformed events are logged
    /// and acknowledged (`Ok(None)`): a retry would not make them valid.
    pub async fn handle_event(&self, v: &Value) -> Result<Option<TickReport>, CloudError> {
        match events::parse(v, &self.cfg.failover.capacity_codes) {
            Err(e) => {
                tracing::warn!(error = %e, "event ignored");
                Ok(None)
            }
            Ok(Event::Tick) => self.tick(Vec::new()).await.map(Some),
            Ok(Event::Launch { group, launch }) if group == self.cfg.primary.asg => {
                tracing::info!(?launch, "launch outcome in the primary group");
                let reconcile = self.reconcile(vec![launch], true).await?;
                Ok(Some(TickReport {
                    metrics: Vec::new(),
                    metrics_error: None,
                    reconcile,
                }))
            }
            Ok(Event::Launch { group, .. }) => {
                tracing::info!(%group, "launch event of another group ignored");
                Ok(None)
            }
            Ok(Event::SpotInterruption {
                instance_id,
                action,
            }) => {
                // Informational: an interruption does not mean launches fail.
                tracing::info!(%instance_id, %action, "spot interruption warning");
                Ok(None)
            }
        }
    }

    /// The scheduled work: publish the metrics, then reconcile. A metrics
    /// failure does not stop the reconcile.
    pub async fn tick(&self, launches: Vec<Launch>) -> Result<TickReport, CloudError> {
        let (metrics, metrics_error) = match self.publish_metrics().await {
            Ok(m) => (m, None),
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish the backlog metrics");
                (Vec::new(), Some(e.to_string()))
            }
        };
        let reconcile = self.reconcile(launches, true).await?;
        Ok(TickReport {
            metrics,
            metrics_error,
            reconcile,
        })
    }

    pub async fn publish_metrics(&self) -> Result<Vec<MetricValue>, CloudError> {
        let p = &self.cfg.primary;
        let (visible, in_flight) = self.cloud.queue_depth(&p.region, &p.queue_url).await?;
        let primary = self.cloud.group(&p.region, &p.asg).await?;
        let values = metrics::backlog(&self.cfg, visible, in_flight, primary.in_service);
        for m in &values {
            self.cloud.put_metric(m).await?;
        }
        tracing::info!(
            visible,
            in_flight,
            primary_in_service = primary.in_service,
            "metrics published"
        );
        Ok(values)
    }

    /// Observes, decides and (with `execute`) acts. `launches` are outcomes
    /// learnt from events; the primary's recent scaling activities are added.
    pub async fn reconcile(
        &self,
        mut launches: Vec<Launch>,
        execute: bool,
    ) -> Result<Report, CloudError> {
        let (p, f) = (&self.cfg.primary, &self.cfg.fallback);
        match self.cloud.activities(&p.region, &p.asg).await {
            Ok(acts) => launches.extend(events::launches_of(
                &acts,
                &self.cfg.failover.capacity_codes,
            )),
            // Events still count; the next tick polls again.
            Err(e) => tracing::warn!(error = %e, "cannot read the primary's scaling activities"),
        }
        let g: GroupInfo = self.cloud.group(&f.region, &f.asg).await?;
        let (memory, warnings) = Memory::from_tags(&g.tags);
        for w in warnings {
            tracing::warn!("{w}");
        }
        let policy_enabled = match self.cloud.policy(&f.region, &f.asg, &f.policy_name).await {
            Ok(p) => p.and_then(|(enabled, _)| enabled),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the fallback policy");
                None
            }
        };
        let fallback = FallbackGroup {
            desired: g.desired,
            max: g.max,
            in_service: g.in_service,
            busy: g.busy,
            policy_enabled,
        };
        let plan = reconcile::reconcile(
            &memory,
            &fallback,
            &launches,
            chrono::Utc::now(),
            &self.settings(),
        );
        let report = Report {
            mode_before: memory.mode.as_str(),
            mode: plan.memory.mode.as_str(),
            fallback,
            launches_seen: launches.len(),
            plan: plan.clone(),
            executed: execute,
        };
        if execute {
            self.execute(&plan).await?;
        }
        Ok(report)
    }

    /// Gate first, then the memory, then the notification: a failed gate
    /// call leaves the memory unchanged, so the next invocation redoes the
    /// whole decision; a mode change is announced only once it is recorded.
    async fn execute(&self, plan: &Plan) -> Result<(), CloudError> {
        let f = &self.cfg.fallback;
        for a in &plan.actions {
            match a {
                Action::SetFallbackMaxSize { from, to } => {
                    tracing::info!(group = %f.asg, from, to, "setting the fallback MaxSize");
                    self.cloud.set_max_size(&f.region, &f.asg, *to).await?;
                }
                Action::EnableFallbackPolicy => {
                    match self.cloud.policy(&f.region, &f.asg, &f.policy_name).await? {
                        Some((_, policy)) => {
                            tracing::info!(policy = %f.policy_name, "enabling the fallback scaling policy");
                            self.cloud
                                .put_policy(&f.region, &f.asg, &policy, true)
                                .await?;
                        }
                        None => tracing::warn!(
                            policy = %f.policy_name,
                            "the fallback group has no such target-tracking policy; run `spotguard-controller setup`"
                        ),
                    }
                }
                _ => {}
            }
        }
        for a in &plan.actions {
            if let Action::SaveMemory { tags } = a {
                self.cloud.put_tags(&f.region, &f.asg, tags).await?;
            }
        }
        for a in &plan.actions {
            if let Action::Notify { from, to, reason } = a {
                tracing::info!(from = from.as_str(), to = to.as_str(), %reason, "mode change");
                if let Some(topic) = &self.cfg.notify.sns_topic_arn {
                    let msg = json!({
                        "event": "mode_change",
                        "from": from.as_str(),
                        "to": to.as_str(),
                        "reason": reason,
                        "primary": {"region": self.cfg.primary.region, "asg": self.cfg.primary.asg},
                        "fallback": {"region": f.region, "asg": f.asg},
                        "at": plan.memory.since.to_rfc3339(),
                    });
                    if let Err(e) = self
                        .cloud
                        .publish(
                            topic,
                            &format!("spotguard: {} -> {}", from.as_str(), to.as_str()),
                            &msg.to_string(),
                        )
                        .await
                    {
                        tracing::warn!(error = %e, "cannot publish the mode change");
                    }
                }
            }
        }
        Ok(())
    }
}
