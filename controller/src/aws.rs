//! The controller's AWS calls behind the [`Cloud`] trait, so that the
//! handler is a plain async function over it; [`SdkCloud`] implements it
//! with one set of SDK clients per region. The SDK's standard retry mode
//! retries throttling, 5xx and transport errors (3 attempts, backoff).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;

use aws_sdk_autoscaling::error::ProvideErrorMetadata;
use aws_sdk_autoscaling::types::{LifecycleState, Tag};
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit};
use chrono::{DateTime, Utc};

use crate::events::Activity;
use crate::metrics::MetricValue;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{op} in {region}: {message}")]
pub struct CloudError {
    pub op: &'static str,
    pub region: String,
    pub message: String,
}

/// What the controller reads of a group.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupInfo {
    pub desired: i32,
    pub min: i32,
    pub max: i32,
    pub in_service: i32,
    /// InService instances protected from scale-in (busy agents).
    pub busy: i32,
    /// Their ids (for the dead-agent check, [`crate::liveness`]).
    pub protected: Vec<String>,
    /// Instances on their way in (`Pending`, `Pending:Wait`, `Pending:Proceed`).
    pub pending: i32,
    pub tags: BTreeMap<String, String>,
}

/// A message received: its receipt handle and when it was first sent
/// (SQS's `SentTimestamp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub receipt: String,
    pub sent: Option<DateTime<Utc>>,
}

/// What one `UpdateAutoScalingGroup` call changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupUpdate {
    pub max: Option<i32>,
    pub desired: Option<i32>,
}

impl GroupUpdate {
    pub fn max(max: i32) -> GroupUpdate {
        GroupUpdate {
            max: Some(max),
            desired: None,
        }
    }

    pub fn desired(desired: i32) -> GroupUpdate {
        GroupUpdate {
            max: None,
            desired: Some(desired),
        }
    }

    /// The group's (MaxSize, desired) after the update, as AWS applies it
    /// (for the in-memory fakes): a desired capacity outside [MinSize,
    /// MaxSize], or a MaxSize below MinSize, is refused (`ValidationError`),
    /// and a MaxSize below the desired capacity lowers it.
    pub fn apply(&self, min: i32, max: i32, desired: i32) -> Result<(i32, i32), String> {
        let max = self.max.unwrap_or(max);
        // AWS: "Max bound, 0, must be greater than or equal to min bound, 1"
        // (the AWS CLI's ValidationError text for UpdateAutoScalingGroup).
        if max < min {
            return Err(format!(
                "ValidationError: Max bound, {max}, must be greater than or equal to min bound, {min}"
            ));
        }
        match self.desired {
            Some(d) if d > max || d < min => Err(format!(
                "ValidationError: Desired capacity:{d} must be between the specified min size and max size"
            )),
            Some(d) => Ok((max, d)),
            None => Ok((max, desired.min(max))),
        }
    }
}

/// A target-tracking policy as the controller writes it, with the fields
/// it keeps as they were when it re-enables an existing one.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetTracking {
    pub name: String,
    pub target: f64,
    pub spec: MetricSpec,
    pub disable_scale_in: Option<bool>,
    /// The customized metric's statistic (`Average` when unset).
    pub statistic: Option<String>,
    pub unit: Option<String>,
    pub estimated_warmup: Option<i32>,
}

impl TargetTracking {
    pub fn new(name: impl Into<String>, target: f64, spec: MetricSpec) -> TargetTracking {
        TargetTracking {
            name: name.into(),
            target,
            spec,
            disable_scale_in: None,
            statistic: None,
            unit: None,
            estimated_warmup: None,
        }
    }

    /// The same policy as far as `setup` is concerned: target and metric
    /// (a user's DisableScaleIn or warm-up is theirs to keep).
    pub fn same_as(&self, other: &TargetTracking) -> bool {
        self.target == other.target && self.spec == other.spec
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricSpec {
    /// A published metric: namespace, name, dimensions.
    Custom {
        namespace: String,
        name: String,
        dimensions: Vec<(String, String)>,
    },
    /// `m1 / m2` over AWS/SQS ApproximateNumberOfMessagesVisible (queue) and
    /// AWS/AutoScaling GroupInServiceInstances (group).
    BacklogMath { queue_name: String, group: String },
}

pub trait Cloud: Send + Sync {
    fn group(
        &self,
        region: &str,
        name: &str,
    ) -> impl Future<Output = Result<GroupInfo, CloudError>> + Send;
    fn queue_depth(
        &self,
        region: &str,
        url: &str,
    ) -> impl Future<Output = Result<(i64, i64), CloudError>> + Send;
    fn activities(
        &self,
        region: &str,
        group: &str,
    ) -> impl Future<Output = Result<Vec<Activity>, CloudError>> + Send;
    /// `SendMessage` with String attributes; on a FIFO queue with
    /// `fifo = (group id, deduplication id)`.
    fn send_message(
        &self,
        region: &str,
        url: &str,
        body: &str,
        attributes: &BTreeMap<String, String>,
        fifo: Option<(&str, &str)>,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// `UpdateAutoScalingGroup`: MaxSize (the fallback's gate) and/or the
    /// desired capacity ([`GroupUpdate::apply`] says what AWS accepts).
    fn update_group(
        &self,
        region: &str,
        group: &str,
        update: GroupUpdate,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Releases the scale-in protection of these instances of the group
    /// (50 to a call, AWS's limit); returns those released.
    fn release_protection(
        &self,
        region: &str,
        group: &str,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<String>, CloudError>> + Send;
    /// The agents' liveness marks (the instance tag `spotguard:alive`) of
    /// these instances: instance id -> the tag's value (EC2 `DescribeTags`).
    fn alive_marks(
        &self,
        region: &str,
        ids: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, String>, CloudError>> + Send;
    fn put_tags(
        &self,
        region: &str,
        group: &str,
        tags: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// `DeleteTags` of the given keys (those of periodic tasks no longer
    /// configured: a group holds at most 50 tags).
    fn delete_tags(
        &self,
        region: &str,
        group: &str,
        keys: &[String],
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// The policy's `Enabled` flag, if AWS reports it (moto does not).
    fn policy(
        &self,
        region: &str,
        group: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<(Option<bool>, TargetTracking)>, CloudError>> + Send;
    fn put_policy(
        &self,
        region: &str,
        group: &str,
        policy: &TargetTracking,
        enabled: bool,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn put_metric(&self, m: &MetricValue) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Several data points (one `PutMetricData` per region and namespace
    /// where the SDK is used; one by one here).
    fn put_metrics(
        &self,
        points: &[MetricValue],
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        async move {
            for p in points {
                self.put_metric(p).await?;
            }
            Ok(())
        }
    }
    /// `ReceiveMessage` of at most one message, in flight for `visibility`
    /// seconds: the lease's token ([`crate::lease`]). `attempt` is the
    /// FIFO receive-request attempt id, so that a retried call answers the
    /// same message instead of finding the group blocked by it.
    fn receive_one(
        &self,
        region: &str,
        url: &str,
        visibility: i32,
        attempt: &str,
    ) -> impl Future<Output = Result<Option<Received>, CloudError>> + Send;
    fn change_visibility(
        &self,
        region: &str,
        url: &str,
        receipt: &str,
        visibility: i32,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn delete_message(
        &self,
        region: &str,
        url: &str,
        receipt: &str,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn publish(
        &self,
        topic: &str,
        subject: &str,
        message: &str,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
}

struct Clients {
    asg: aws_sdk_autoscaling::Client,
    sqs: aws_sdk_sqs::Client,
    cw: aws_sdk_cloudwatch::Client,
    sns: aws_sdk_sns::Client,
    /// `None` when it cannot be made (no credentials provider, no TLS
    /// roots): the dead-agent check then fails with that reason.
    ec2: Result<spotguard_common::ec2::Ec2, String>,
}

/// SDK clients for each region the controller works in.
pub struct SdkCloud {
    regions: HashMap<String, Clients>,
}

impl SdkCloud {
    /// `base` comes from the standard chain (credentials, `AWS_ENDPOINT_URL`);
    /// each region gets its own clients.
    pub fn new(base: &aws_config::SdkConfig, regions: &[&str]) -> SdkCloud {
        let mut map = HashMap::new();
        for r in regions {
            let conf = base
                .to_builder()
                .region(aws_config::Region::new(r.to_string()))
                .build();
            map.insert(
                r.to_string(),
                Clients {
                    asg: aws_sdk_autoscaling::Client::new(&conf),
                    sqs: aws_sdk_sqs::Client::new(&conf),
                    cw: aws_sdk_cloudwatch::Client::new(&conf),
                    sns: aws_sdk_sns::Client::new(&conf),
                    ec2: match base.credentials_provider() {
                        Some(p) => spotguard_common::ec2::Ec2::new(
                            p,
                            r,
                            spotguard_common::ec2::endpoint_override(base.endpoint_url())
                                .as_deref(),
                        ),
                        None => Err("no AWS credentials provider".to_string()),
                    },
                },
            );
        }
        SdkCloud { regions: map }
    }

    fn clients(&self, op: &'static str, region: &str) -> Result<&Clients, CloudError> {
        self.regions.get(region).ok_or_else(|| CloudError {
            op,
            region: region.to_string(),
            message: "no clients for this region (not in the configuration)".into(),
        })
    }
}

/// One readable line: the error code and AWS's message (the SDK's own
/// chain for transport errors), not a debug dump of the SDK's struct.
fn err<E>(op: &'static str, region: &str, e: E) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let message = match (e.code(), e.message()) {
        (Some(code), Some(m)) => format!("{code}: {m}"),
        (Some(code), None) => code.to_string(),
        _ => spotguard_common::config::error_chain(&e).replace('\n', " "),
    };
    CloudError {
        op,
        region: region.to_string(),
        message,
    }
}

/// Upper bound of one AWS call with the SDK's retries, as in the agent: a
/// stuck connection must not hold a Lambda invocation (or the `run` loop)
/// until its own timeout.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn bounded<T>(
    op: &'static str,
    region: &str,
    f: impl Future<Output = Result<T, CloudError>>,
) -> Result<T, CloudError> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| {
            Err(CloudError {
                op,
                region: region.to_string(),
                message: format!("no answer within {CALL_TIMEOUT:?}"),
            })
        })
}

/// One data point as CloudWatch takes it.
fn datum(m: &MetricValue) -> MetricDatum {
    let mut d = MetricDatum::builder()
        .metric_name(&m.name)
        .value(m.value)
        .unit(StandardUnit::from(m.unit));
    for (k, v) in &m.dimensions {
        d = d.dimensions(Dimension::builder().name(k).value(v).build());
    }
    d.build()
}

/// `SetInstanceProtection` takes at most 50 instance ids a call
/// (Amazon EC2 Auto Scaling API Reference, `InstanceIds`): the batches of
/// one release.
pub fn protection_batches(ids: &[String]) -> std::slice::Chunks<'_, String> {
    ids.chunks(50)
}

fn chrono_of(t: &aws_sdk_autoscaling::primitives::DateTime) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos())
}

impl SdkCloud {
    /// `DescribeAutoScalingGroups` of one group; its absence is an error
    /// naming it.
    async fn describe(
        &self,
        region: &str,
        name: &str,
    ) -> Result<aws_sdk_autoscaling::types::AutoScalingGroup, CloudError> {
        const OP: &str = "DescribeAutoScalingGroups";
        let c = self.clients(OP, region)?;
        bounded(OP, region, async {
            let out = c
                .asg
                .describe_auto_scaling_groups()
                .auto_scaling_group_names(name)
                .send()
                .await
                .map_err(|e| err(OP, region, e))?;
            out.auto_scaling_groups()
                .first()
                .cloned()
                .ok_or_else(|| CloudError {
                    op: OP,
                    region: region.to_string(),
                    message: format!("no Auto Scaling group named {name:?}"),
                })
        })
        .await
    }
}

impl Cloud for SdkCloud {
    async fn group(&self, region: &str, name: &str) -> Result<GroupInfo, CloudError> {
        let g = self.describe(region, name).await?;
        let in_service: Vec<_> = g
            .instances()
            .iter()
            .filter(|i| i.lifecycle_state() == Some(&LifecycleState::InService))
            .collect();
        Ok(GroupInfo {
            desired: g.desired_capacity().unwrap_or(0),
            min: g.min_size().unwrap_or(0),
            max: g.max_size().unwrap_or(0),
            in_service: in_service.len() as i32,
            busy: in_service
                .iter()
                .filter(|i| i.protected_from_scale_in() == Some(true))
                .count() as i32,
            protected: in_service
                .iter()
                .filter(|i| i.protected_from_scale_in() == Some(true))
                .filter_map(|i| i.instance_id().map(str::to_string))
                .collect(),
            pending: g
                .instances()
                .iter()
                .filter(|i| {
                    i.lifecycle_state()
                        .is_some_and(|s| s.as_str().starts_with("Pending"))
                })
                .count() as i32,
            tags: g
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
                .collect(),
        })
    }

    async fn queue_depth(&self, region: &str, url: &str) -> Result<(i64, i64), CloudError> {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        const OP: &str = "GetQueueAttributes";
        let c = self.clients(OP, region)?;
        bounded(OP, region, async {
            let out = c
                .sqs
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(A::ApproximateNumberOfMessages)
                .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
                .send()
                .await
                .map_err(|e| err(OP, region, e))?;
            let get = |k: A| {
                out.attributes()
                    .and_then(|a| a.get(&k))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            Ok((
                get(A::ApproximateNumberOfMessages),
                get(A::ApproximateNumberOfMessagesNotVisible),
            ))
        })
        .await
    }

    async fn send_message(
        &self,
        region: &str,
        url: &str,
        body: &str,
        attributes: &BTreeMap<String, String>,
        fifo: Option<(&str, &str)>,
    ) -> Result<(), CloudError> {
        use aws_sdk_sqs::types::MessageAttributeValue;
        const OP: &str = "SendMessage";
        let c = self.clients(OP, region)?;
        bounded(OP, region, async {
            let mut req = c.sqs.send_message().queue_url(url).message_body(body);
            for (k, v) in attributes {
                let value = MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value(v)
                    .build()
                    .map_err(|e| CloudError {
                        op: OP,
                        region: region.to_string(),
                        message: format!("message attribute {k}: {e}"),
                    })?;
                req = req.message_attributes(k, value);
            }
            if let Some((group, dedup)) = fifo {
                req = req.message_group_id(group).message_deduplication_id(dedup);
            }
            req.send().await.map(|_| ()).map_err(|e| err(OP, region, e))
        })
        .await
    }

    async fn activities(&self, region: &str, group: &str) -> Result<Vec<Activity>, CloudError> {
        const OP: &str = "DescribeScalingActivities";
        let c = self.clients(OP, region)?;
        bounded(OP, region, async {
            let out = c
                .asg
                .describe_scaling_activities()
                .auto_scaling_group_name(group)
                .max_records(50)
                .send()
                .await
                .map_err(|e| err(OP, region, e))?;
            Ok(out
                .activities()
                .iter()
                .map(|a| Activity {
                    id: a.activity_id().unwrap_or_default().to_string(),
                    description: a.description().unwrap_or_default().to_string(),
                    status_code: a
                        .status_code()
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_default(),
                    status_message: a.status_message().unwrap_or_default().to_string(),
                    start: a.start_time().and_then(chrono_of),
                    end: a.end_time().and_then(chrono_of),
                    details: a.details().unwrap_or_default().to_string(),
                })
                .collect())
        })
        .await
    }

    async fn update_group(
        &self,
        region: &str,
        group: &str,
        update: GroupUpdate,
    ) -> Result<(), CloudError> {
        const OP: &str = "UpdateAutoScalingGroup";
        let c = self.clients(OP, region)?;
        bounded(OP, region, async {
            c.asg
                .update_auto_scaling_group()
                .auto_scaling_group_name(group)
                .set_max_size(update.max)
                .set_desired_capacity(update.desired)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| err(OP, region, e))
        })
        .await
    }

    async fn release_protection(
        &self,
        region: &str,
        group: &str,
        ids: &[String],
    ) -> Result<Vec<String>, CloudError> {
        const OP: &str = "SetInstanceProtection";
        let c = self.clients(OP, region)?;
        bounded(OP, region, async {
            for batch in protection_batches(ids) {
                c.asg
                    .set_instance_protection()
                    .auto_scaling_group_name(group)
                    .set_instance_ids(Some(batch.to_vec()))
                    .protected_from_scale_in(false)
                    .send()
                    .await
                    .map_err(|e| err(OP, region, e))?;
            }
            Ok(ids.to_vec())
        })
        .await
    }

    async fn alive_marks(
        &self,
        region: &str,
        ids: &[String],
    ) -> Result<BTreeMap<String, String>, CloudError> {
        const OP: &str = "DescribeTags";
        let c = self.clients(OP, region)?;
        let ec2 = c.ec2.as_ref().map_err(|m| CloudError {
            op: OP,
            region: region.to_string(),
            message: m.clone(),
        })?;
        // One bound per call (200 ids), not one for them all: a fleet of
        // thousands of busy instances is read in several calls.
        let mut marks = BTreeMap::new();
        for batch in ids.chunks(spotguard_common::ec2::IDS_PER_FILTER) {
            let found = bounded(OP, region, async {
                ec2.tag_values(spotguard_common::ec2::ALIVE_TAG, batch)
                    .await
                    .map_err(|e| CloudError {
                        op: OP,
                        region: region.to_string(),
                        message: e.to_string(),
                    })
            })
            .await?;
            marks.extend(found);
        }
        Ok(marks)
    }

    async fn put_tags(
        &self,
        region: &str,
        group: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), CloudError> {
        const OP: &str = "CreateOrUpdateTags";
        let c = self.clients(OP, region)?;
        bounded(OP, region, async {
            let mut req = c.asg.create_or_update_tags();
            for (k, v) in tags {
                req = req.tags(
                    Tag::builder()
                        .resource_id(group)
                        .resource_type("auto-scaling-group")
                        .key(k)
                        .value(v)
                        .propagate_at_launch(false)
                        .build(),
                );
            }
            req.send().await.map(|_| ()).map_err(|e| err(OP, region, e))
        })
        .await
    }

    async fn delete_tags(
        &self,
        region: &str,
        group: &str,
        keys: &[String],
    ) -> Result<(), CloudError> {
        const OP: &str = "DeleteTags";
        let c = self.clients(OP, region)?;
        bounded(OP, region, async {
            let mut req = c.asg.delete_tags();
            for k in keys {
                req = req.tags(
                    Tag::builder()
                        .resource_id(group)
                        .resource_type("auto-scaling-group")
                        .key(k)
                        .build(),
                );
            }
            req.send().await.map(|_| ()).map_err(|e| err(OP, region, e))
        })
        .await
    }

    async fn policy(
        &self,
        region: &str,
        group: &str,
        name: &str,
    ) -> Result<Option<(Option<bool>, TargetTracking)>, CloudError> {
        const OP: &str = "DescribePolicies";
        let c = self.clients(OP, region)?;
        bounded(OP, region, async {
            // All of the group's policies: the one named, else the one
            // target-tracking policy a template created (CloudFormation
            // names it `<stack>-<resource>-<suffix>`).
            let out = c
                .asg
                .describe_policies()
                .auto_scaling_group_name(group)
                .policy_types("TargetTrackingScaling")
                .send()
                .await
                .map_err(|e| err(OP, region, e))?;
            let all = out.scaling_policies();
            let tracking: Vec<_> = all
                .iter()
                .filter(|p| p.target_tracking_configuration().is_some())
                .collect();
            let p = match all.iter().find(|p| p.policy_name() == Some(name)) {
                Some(p) => p,
                None if tracking.len() == 1 => tracking[0],
                None => return Ok(None),
            };
            let name = p.policy_name().unwrap_or(name);
            let Some(tt) = p.target_tracking_configuration() else {
                return Ok(None);
            };
            let spec = match tt.customized_metric_specification() {
                Some(c) if !c.metrics().is_empty() => {
                    let dim = |m: &aws_sdk_autoscaling::types::TargetTrackingMetricDataQuery,
                               dim: &str| {
                        m.metric_stat()
                            .and_then(|s| s.metric())
                            .map(|m| m.dimensions())
                            .and_then(|d| d.iter().find(|x| x.name() == Some(dim)))
                            .and_then(|x| x.value())
                            .map(str::to_string)
                            .unwrap_or_default()
                    };
                    let q = c
                        .metrics()
                        .iter()
                        .map(|m| dim(m, "QueueName"))
                        .find(|v| !v.is_empty());
                    let g = c
                        .metrics()
                        .iter()
                        .map(|m| dim(m, "AutoScalingGroupName"))
                        .find(|v| !v.is_empty());
                    MetricSpec::BacklogMath {
                        queue_name: q.unwrap_or_default(),
                        group: g.unwrap_or_default(),
                    }
                }
                Some(c) => MetricSpec::Custom {
                    namespace: c.namespace().unwrap_or_default().to_string(),
                    name: c.metric_name().unwrap_or_default().to_string(),
                    dimensions: c
                        .dimensions()
                        .iter()
                        .map(|d| {
                            (
                                d.name().unwrap_or_default().to_string(),
                                d.value().unwrap_or_default().to_string(),
                            )
                        })
                        .collect(),
                },
                None => return Ok(None),
            };
            let custom = tt.customized_metric_specification();
            Ok(Some((
                p.enabled(),
                TargetTracking {
                    name: name.to_string(),
                    target: tt.target_value().unwrap_or_default(),
                    spec,
                    disable_scale_in: tt.disable_scale_in(),
                    statistic: custom
                        .and_then(|c| c.statistic())
                        .map(|s| s.as_str().to_string()),
                    unit: custom.and_then(|c| c.unit()).map(str::to_string),
                    estimated_warmup: p.estimated_instance_warmup(),
                },
            )))
        })
        .await
    }

    async fn put_policy(
        &self,
        region: &str,
        group: &str,
        policy: &TargetTracking,
        enabled: bool,
    ) -> Result<(), CloudError> {
        use aws_sdk_autoscaling::types as t;
        const OP: &str = "PutScalingPolicy";
        let c = self.clients(OP, region)?;
        bounded(OP, region, async {
            let spec = match &policy.spec {
                MetricSpec::Custom {
                    namespace,
                    name,
                    dimensions,
                } => {
                    let stat = policy
                        .statistic
                        .as_deref()
                        .map(t::MetricStatistic::from)
                        .unwrap_or(t::MetricStatistic::Average);
                    let mut b = t::CustomizedMetricSpecification::builder()
                        .namespace(namespace)
                        .metric_name(name)
                        .statistic(stat)
                        .set_unit(policy.unit.clone());
                    for (k, v) in dimensions {
                        b = b.dimensions(t::MetricDimension::builder().name(k).value(v).build());
                    }
                    b.build()
                }
                MetricSpec::BacklogMath { queue_name, group } => {
                    let stat =
                        |id: &str, ns: &str, metric: &str, dim: &str, val: &str, stat: &str| {
                            t::TargetTrackingMetricDataQuery::builder()
                                .id(id)
                                .return_data(false)
                                .metric_stat(
                                    t::TargetTrackingMetricStat::builder()
                                        .stat(stat)
                                        .metric(
                                            t::Metric::builder()
                                                .namespace(ns)
                                                .metric_name(metric)
                                                .dimensions(
                                                    t::MetricDimension::builder()
                                                        .name(dim)
                                                        .value(val)
                                                        .build(),
                                                )
                                                .build(),
                                        )
                                        .build(),
                                )
                                .build()
                        };
                    t::CustomizedMetricSpecification::builder()
                        .metrics(stat(
                            "m1",
                            "AWS/SQS",
                            "ApproximateNumberOfMessagesVisible",
                            "QueueName",
                            queue_name,
                            "Sum",
                        ))
                        .metrics(stat(
                            "m2",
                            "AWS/AutoScaling",
                            "GroupInServiceInstances",
                            "AutoScalingGroupName",
                            group,
                            "Average",
                        ))
                        .metrics(
                            t::TargetTrackingMetricDataQuery::builder()
                                .id("e1")
                                .expression("m1 / m2")
                                .label("Backlog per instance")
                                .return_data(true)
                                .build(),
                        )
                        .build()
                }
            };
            let conf = t::TargetTrackingConfiguration::builder()
                .customized_metric_specification(spec)
                .target_value(policy.target)
                .set_disable_scale_in(policy.disable_scale_in)
                .build();
            c.asg
                .put_scaling_policy()
                .auto_scaling_group_name(group)
                .policy_name(&policy.name)
                .policy_type("TargetTrackingScaling")
                .target_tracking_configuration(conf)
                .set_estimated_instance_warmup(policy.estimated_warmup)
                .enabled(enabled)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| err(OP, region, e))
        })
        .await
    }

    async fn put_metric(&self, m: &MetricValue) -> Result<(), CloudError> {
        const OP: &str = "PutMetricData";
        let c = self.clients(OP, &m.region)?;
        bounded(OP, &m.region, async {
            c.cw.put_metric_data()
                .namespace(&m.namespace)
                .metric_data(datum(m))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| err(OP, &m.region, e))
        })
        .await
    }

    async fn put_metrics(&self, points: &[MetricValue]) -> Result<(), CloudError> {
        const OP: &str = "PutMetricData";
        // PutMetricData takes up to 1000 data points a call (CloudWatch API
        // Reference, `MetricData`), of one namespace, in one region.
        let mut by: BTreeMap<(&str, &str), Vec<&MetricValue>> = BTreeMap::new();
        for p in points {
            by.entry((p.region.as_str(), p.namespace.as_str()))
                .or_default()
                .push(p);
        }
        for ((region, namespace), points) in by {
            let c = self.clients(OP, region)?;
            for chunk in points.chunks(1000) {
                let data: Vec<MetricDatum> = chunk.iter().map(|m| datum(m)).collect();
                bounded(OP, region, async {
                    c.cw.put_metric_data()
                        .namespace(namespace)
                        .set_metric_data(Some(data))
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|e| err(OP, region, e))
                })
                .await?;
            }
        }
        Ok(())
    }

    async fn receive_one(
        &self,
        region: &str,
        url: &str,
        visibility: i32,
        attempt: &str,
    ) -> Result<Option<Received>, CloudError> {
        use aws_sdk_sqs::types::MessageSystemAttributeName as A;
        const OP: &str = "ReceiveMessage";
        let c = self.clients(OP, region)?;
        bounded(OP, region, async {
            let out = c
                .sqs
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(1)
                .visibility_timeout(visibility)
                // A long poll asks every server: a short poll samples some
                // and may answer nothing while the token is there (SQS
                // Developer Guide, "short and long polling").
                .wait_time_seconds(1)
                .receive_request_attempt_id(attempt)
                .message_system_attribute_names(A::SentTimestamp)
                .send()
                .await
                .map_err(|e| err(OP, region, e))?;
            Ok(out.messages().first().and_then(|m| {
                let sent = m
                    .attributes()
                    .and_then(|a| a.get(&A::SentTimestamp))
                    .and_then(|v| v.parse::<i64>().ok())
                    .and_then(DateTime::<Utc>::from_timestamp_millis);
                Some(Received {
                    receipt: m.receipt_handle()?.to_string(),
                    sent,
                })
            }))
        })
        .await
    }

    async fn change_visibility(
        &self,
        region: &str,
        url: &str,
        receipt: &str,
        visibility: i32,
    ) -> Result<(), CloudError> {
        const OP: &str = "ChangeMessageVisibility";
        let c = self.clients(OP, region)?;
        bounded(OP, region, async {
            c.sqs
                .change_message_visibility()
                .queue_url(url)
                .receipt_handle(receipt)
                .visibility_timeout(visibility)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| err(OP, region, e))
        })
        .await
    }

    async fn delete_message(
        &self,
        region: &str,
        url: &str,
        receipt: &str,
    ) -> Result<(), CloudError> {
        const OP: &str = "DeleteMessage";
        let c = self.clients(OP, region)?;
        bounded(OP, region, async {
            c.sqs
                .delete_message()
                .queue_url(url)
                .receipt_handle(receipt)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| err(OP, region, e))
        })
        .await
    }

    async fn publish(&self, topic: &str, subject: &str, message: &str) -> Result<(), CloudError> {
        const OP: &str = "Publish";
        let region = spotguard_common::region::arn_region(topic).unwrap_or_default();
        let c = self.clients(OP, &region)?;
        bounded(OP, &region, async {
            spotguard_common::sns::publish(&c.sns, topic, subject, message)
                .await
                .map_err(|e| err(OP, &region, e))
        })
        .await
    }
}

/// The queue EventBridge rules feed with launch events, read by `run`.
pub struct SqsEvents {
    pub client: aws_sdk_sqs::Client,
    pub url: String,
    pub region: String,
}

impl crate::handler::EventSource for SqsEvents {
    async fn receive(&self) -> Result<Vec<(String, String)>, CloudError> {
        const OP: &str = "ReceiveMessage";
        bounded(OP, &self.region, async {
            let out = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(10)
                .send()
                .await
                .map_err(|e| err(OP, &self.region, e))?;
            Ok(out
                .messages()
                .iter()
                .filter_map(|m| {
                    Some((
                        m.receipt_handle()?.to_string(),
                        m.body().unwrap_or_default().to_string(),
                    ))
                })
                .collect())
        })
        .await
    }

    async fn delete(&self, receipt: &str) -> Result<(), CloudError> {
        const OP: &str = "DeleteMessage";
        bounded(OP, &self.region, async {
            self.client
                .delete_message()
                .queue_url(&self.url)
                .receipt_handle(receipt)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| err(OP, &self.region, e))
        })
        .await
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn protection_is_released_in_batches_of_at_most_50() {
        let ids: Vec<String> = (0..120).map(|i| format!("i-{i:017}")).collect();
        let sizes: Vec<usize> = protection_batches(&ids).map(<[String]>::len).collect();
        assert_eq!(sizes, [50, 50, 20]);
        let again: Vec<String> = protection_batches(&ids).flatten().cloned().collect();
        assert_eq!(again, ids, "every id once, in order");
        assert_eq!(protection_batches(&[]).count(), 0);
    }

    use super::{protection_batches, GroupUpdate};

    #[test]
    fn group_updates_apply_as_aws_does() {
        // MaxSize below the desired capacity lowers it.
        assert_eq!(GroupUpdate::max(2).apply(0, 10, 5), Ok((2, 2)));
        assert_eq!(GroupUpdate::max(10).apply(0, 0, 0), Ok((10, 0)));
        assert_eq!(GroupUpdate::desired(3).apply(0, 10, 0), Ok((10, 3)));
        // Outside [MinSize, MaxSize]: refused, nothing changes.
        assert!(GroupUpdate::desired(11).apply(0, 10, 0).is_err());
        assert!(GroupUpdate::desired(0).apply(1, 10, 1).is_err());
        // A MaxSize below MinSize is refused, the group unchanged.
        assert_eq!(
            GroupUpdate::max(0).apply(1, 10, 1),
            Err(
                "ValidationError: Max bound, 0, must be greater than or equal to min bound, 1"
                    .into()
            )
        );
        assert_eq!(GroupUpdate::max(1).apply(1, 10, 4), Ok((1, 1)));
        let both = GroupUpdate {
            max: Some(0),
            desired: Some(0),
        };
        assert_eq!(both.apply(0, 5, 3), Ok((0, 0)));
    }
}
