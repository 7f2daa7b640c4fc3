//! The agent's AWS calls, behind two small traits so that the runner and the
//! job code do not depend on the SDK: [`Queue`] (SQS) and [`Fleet`] (Auto
//! Scaling). The SDK implementations are at the bottom.
//!
//! Every call is bounded by [`CALL_TIMEOUT`] (a receive by its long-poll wait
//! plus that), so a drain cannot hang on a stuck connection. The SDK's
//! standard retry mode (3 attempts, exponential backoff, for throttling,
//! 5xx and transport errors) retries inside that bound.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use aws_sdk_autoscaling::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::MessageSystemAttributeName;

/// Upper bound of one AWS call with its SDK retries. A hand-back must finish
/// well inside the default 25 s deadline margin minus the 10 s grace.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed AWS call, as one readable log line: `ReceiveMessage on
/// https://sqs.../jobs in us-east-1: QueueDoesNotExist: The specified queue
/// does not exist.`
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op}{}{}: {}{message}",
    resource.as_deref().map(|r| format!(" on {r}")).unwrap_or_default(),
    region.as_deref().map(|r| format!(" in {r}")).unwrap_or_default(),
    code.as_deref().map(|c| format!("{c}: ")).unwrap_or_default())]
pub struct AwsError {
    pub op: &'static str,
    /// The service's error code (`ValidationError`, `ThrottlingException`, ...), if any.
    pub code: Option<String>,
    pub message: String,
    /// The queue URL, group or topic the call was about.
    pub resource: Option<String>,
    pub region: Option<String>,
}

/// Where a call goes: for the error line.
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    resource: &'a str,
    region: Option<&'a str>,
}

impl Target<'_> {
    fn error(&self, op: &'static str, code: Option<String>, message: String) -> AwsError {
        AwsError {
            op,
            code,
            message,
            resource: Some(self.resource.to_string()),
            region: self.region.map(str::to_string),
        }
    }

    fn sdk<E, R>(&self, op: &'static str, e: aws_sdk_sqs::error::SdkError<E, R>) -> AwsError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let code = e.code().map(str::to_string);
        let message = match (code.is_some(), e.message()) {
            // A service error: its own message, not the SDK's debug dump.
            (true, Some(m)) => m.to_string(),
            (true, None) => "(no message)".to_string(),
            // Transport, timeout, unreadable answer: the error chain on one line.
            _ => crate::error_chain(&e).replace('\n', " "),
        };
        self.error(op, code, message)
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        limit: Duration,
        f: impl Future<Output = Result<T, AwsError>>,
    ) -> Result<T, AwsError> {
        tokio::time::timeout(limit, f)
            .await
            .unwrap_or_else(|_| Err(self.error(op, None, format!("no answer within {limit:?}"))))
    }
}

/// A received SQS message, with what the worker is told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: String,
    pub receipt: String,
    pub body: String,
    pub receive_count: u32,
    /// `ApproximateFirstReceiveTimestamp`, ms since the epoch.
    pub first_received_ms: Option<i64>,
    /// String and Number message attributes (Binary ones are not passed on).
    pub attributes: BTreeMap<String, Attr>,
    /// `MessageGroupId` of a FIFO queue's message.
    pub group_id: Option<String>,
    /// `SenderId`: who sent it (an IAM user or role id), for sqsd's
    /// `X-Aws-Sqsd-Sender-Id`.
    pub sender_id: Option<String>,
    /// `SentTimestamp`, ms since the epoch.
    pub sent_ms: Option<i64>,
}

/// A message attribute: its SQS data type (`String`, `Number`, `Binary`,
/// `String.x`) and value. Binary ones are carried over on a re-send
/// (`binary`) but not passed to the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub data_type: String,
    pub value: String,
    pub binary: Option<Vec<u8>>,
}

impl Attr {
    pub fn string(value: impl Into<String>) -> Attr {
        Attr {
            data_type: "String".into(),
            value: value.into(),
            binary: None,
        }
    }

    pub fn binary(data_type: impl Into<String>, bytes: Vec<u8>) -> Attr {
        Attr {
            data_type: data_type.into(),
            value: String::new(),
            binary: Some(bytes),
        }
    }

    /// Bytes it takes of SQS's 256 KiB message limit (name not included).
    pub fn size(&self) -> usize {
        self.data_type.len() + self.value.len() + self.binary.as_ref().map_or(0, Vec::len)
    }
}

/// A message to send: used to carry a job's checkpoint to the next worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub body: String,
    pub attributes: BTreeMap<String, Attr>,
    /// FIFO queues: the original message group.
    pub group_id: Option<String>,
    /// FIFO queues: derived from the original message and the checkpoint, so
    /// a retried send cannot make two copies.
    pub dedup_id: Option<String>,
}

pub trait Queue: Send + Sync + 'static {
    fn receive(
        &self,
        max: i32,
        wait: Duration,
        visibility: Duration,
    ) -> impl Future<Output = Result<Vec<Message>, AwsError>> + Send;
    fn delete(&self, receipt: &str) -> impl Future<Output = Result<(), AwsError>> + Send;
    /// `ChangeMessageVisibility`: extend (heartbeat) or, with 0, hand back now.
    fn set_visibility(
        &self,
        receipt: &str,
        secs: i32,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
    /// `SendMessage`; returns the new message id.
    fn send(&self, msg: &Outgoing) -> impl Future<Output = Result<String, AwsError>> + Send;
}

/// The answer to our own termination request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScaleIn {
    Accepted,
    /// The group said no (desired already equals MinSize): not an error.
    Refused(String),
}

pub trait Fleet: Send + Sync + 'static {
    /// The Auto Scaling group this instance belongs to, if any.
    fn group_of(
        &self,
        instance: &str,
    ) -> impl Future<Output = Result<Option<String>, AwsError>> + Send;
    /// `TerminateInstanceInAutoScalingGroup`, with the desired capacity
    /// decremented unless `decrement` is false (the group already runs more
    /// instances than its desired capacity, so none replaces this one).
    fn terminate_self(
        &self,
        instance: &str,
        decrement: bool,
    ) -> impl Future<Output = Result<ScaleIn, AwsError>> + Send;
    /// The instance's lifecycle state in its group (`InService`,
    /// `Terminating:Wait`, ...); `None` when it is in no group any more.
    fn lifecycle_state(
        &self,
        instance: &str,
    ) -> impl Future<Output = Result<Option<String>, AwsError>> + Send;
    fn set_protection(
        &self,
        group: &str,
        instance: &str,
        protect: bool,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
    /// Writes this instance's liveness mark: the tag `spotguard:alive` =
    /// `value` (the Unix time) on the instance, EC2 `CreateTags`. A busy
    /// agent writes it before it protects itself and at every re-assertion,
    /// so the controller releases only a dead agent's protection.
    fn mark_alive(
        &self,
        instance: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
    /// Whether the controller has closed the group's intake (its
    /// `spotguard:intake` tag reads `closed`: failing back), and whether
    /// the group runs more InService instances than its desired capacity.
    fn intake(&self, group: &str) -> impl Future<Output = Result<Intake, AwsError>> + Send;
    /// `SetInstanceHealth Unhealthy`: the group replaces the instance.
    fn mark_unhealthy(&self, instance: &str) -> impl Future<Output = Result<(), AwsError>> + Send;
    fn lifecycle_heartbeat(
        &self,
        group: &str,
        hook: &str,
        instance: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
    fn complete_lifecycle(
        &self,
        group: &str,
        hook: &str,
        instance: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
}

/// SQS through the SDK, with a client in the queue's own region.
pub struct SqsQueue {
    pub client: aws_sdk_sqs::Client,
    pub url: String,
    pub region: String,
}

impl SqsQueue {
    fn target(&self) -> Target<'_> {
        Target {
            resource: &self.url,
            region: Some(&self.region),
        }
    }
}

fn secs_i32(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

impl Queue for SqsQueue {
    async fn send(&self, msg: &Outgoing) -> Result<String, AwsError> {
        const OP: &str = "SendMessage";
        self.target()
            .bounded(OP, CALL_TIMEOUT, async {
                let mut req = self
                    .client
                    .send_message()
                    .queue_url(&self.url)
                    .message_body(&msg.body)
                    .set_message_group_id(msg.group_id.clone())
                    .set_message_deduplication_id(msg.dedup_id.clone());
                for (k, a) in &msg.attributes {
                    let b = aws_sdk_sqs::types::MessageAttributeValue::builder()
                        .data_type(&a.data_type);
                    let b = match &a.binary {
                        Some(bytes) => {
                            b.binary_value(aws_sdk_sqs::primitives::Blob::new(bytes.clone()))
                        }
                        None => b.string_value(&a.value),
                    };
                    let v = b.build().map_err(|e| {
                        self.target().error(OP, None, format!("attribute {k}: {e}"))
                    })?;
                    req = req.message_attributes(k, v);
                }
                let out = req.send().await.map_err(|e| self.target().sdk(OP, e))?;
                Ok(out.message_id().unwrap_or_default().to_string())
            })
            .await
    }

    async fn receive(
        &self,
        max: i32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Message>, AwsError> {
        const OP: &str = "ReceiveMessage";
        self.target()
            .bounded(OP, wait + CALL_TIMEOUT, async {
                let out = self
                    .client
                    .receive_message()
                    .queue_url(&self.url)
                    .max_number_of_messages(max.clamp(1, 10))
                    .wait_time_seconds(secs_i32(wait))
                    .visibility_timeout(secs_i32(visibility))
                    .message_system_attribute_names(MessageSystemAttributeName::All)
                    .message_attribute_names("All")
                    .send()
                    .await
                    .map_err(|e| self.target().sdk(OP, e))?;
                Ok(out.messages().iter().filter_map(convert_message).collect())
            })
            .await
    }

    async fn delete(&self, receipt: &str) -> Result<(), AwsError> {
        const OP: &str = "DeleteMessage";
        self.target()
            .bounded(OP, CALL_TIMEOUT, async {
                self.client
                    .delete_message()
                    .queue_url(&self.url)
                    .receipt_handle(receipt)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.target().sdk(OP, e))
            })
            .await
    }

    async fn set_visibility(&self, receipt: &str, secs: i32) -> Result<(), AwsError> {
        const OP: &str = "ChangeMessageVisibility";
        self.target()
            .bounded(OP, CALL_TIMEOUT, async {
                self.client
                    .change_message_visibility()
                    .queue_url(&self.url)
                    .receipt_handle(receipt)
                    .visibility_timeout(secs)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.target().sdk(OP, e))
            })
            .await
    }
}

/// A message without id, receipt handle or body cannot be worked on or
/// handed back; SQS always sends them, so such a message is skipped with a log.
fn convert_message(m: &aws_sdk_sqs::types::Message) -> Option<Message> {
    let (Some(id), Some(receipt)) = (m.message_id(), m.receipt_handle()) else {
        tracing::warn!(?m, "SQS message without id or receipt handle; skipped");
        return None;
    };
    let sys = m.attributes();
    let sys_attr = |k: MessageSystemAttributeName| sys.and_then(|a| a.get(&k));
    let attributes = m
        .message_attributes()
        .map(|attrs| {
            attrs
                .iter()
                .filter_map(|(k, v)| {
                    let attr = match (v.string_value(), v.binary_value()) {
                        (Some(s), _) => Attr {
                            data_type: v.data_type().to_string(),
                            value: s.to_string(),
                            binary: None,
                        },
                        (None, Some(b)) => Attr::binary(v.data_type(), b.as_ref().to_vec()),
                        (None, None) => return None,
                    };
                    Some((k.clone(), attr))
                })
                .collect()
        })
        .unwrap_or_default();
    Some(Message {
        id: id.to_string(),
        receipt: receipt.to_string(),
        body: m.body().unwrap_or_default().to_string(),
        receive_count: sys_attr(MessageSystemAttributeName::ApproximateReceiveCount)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
        first_received_ms: sys_attr(MessageSystemAttributeName::ApproximateFirstReceiveTimestamp)
            .and_then(|v| v.parse().ok()),
        attributes,
        group_id: sys_attr(MessageSystemAttributeName::MessageGroupId).cloned(),
        sender_id: sys_attr(MessageSystemAttributeName::SenderId).cloned(),
        sent_ms: sys_attr(MessageSystemAttributeName::SentTimestamp).and_then(|v| v.parse().ok()),
    })
}

/// Auto Scaling through the SDK, with a client in the instance's own region.
pub struct AsgFleet {
    pub client: aws_sdk_autoscaling::Client,
    pub region: String,
    /// For the liveness mark; the reason when it could not be made.
    pub ec2: Result<spotguard_common::ec2::Ec2, String>,
}

impl AsgFleet {
    fn target<'a>(&'a self, resource: &'a str) -> Target<'a> {
        Target {
            resource,
            region: Some(&self.region),
        }
    }
}

/// AWS's MinSize refusal: "Currently, desiredSize equals minSize (1).
/// Terminating instance without replacement will violate group's min size
/// constraint." (REFERENCE.md). Only this ValidationError is a refusal;
/// any other ("not in InService", after a lost answer and a retry) is not.
pub fn is_min_size_refusal(code: Option<&str>, message: Option<&str>) -> bool {
    code == Some("ValidationError")
        && message.is_some_and(|m| m.contains("desiredSize equals minSize"))
}

/// What an agent following the controller's intake reads of its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Intake {
    pub closed: bool,
    /// InService instances above the desired capacity: target tracking (or
    /// a lowered gate) has already taken them off, so an instance leaving
    /// needs no decrement and gets no replacement. With desired at MinSize
    /// (0 for a fallback) the decrement would be refused ("desiredSize
    /// equals minSize"), and AWS may take long to terminate the surplus
    /// itself.
    pub surplus: bool,
}

/// The liveness mark's value at `now`: the Unix time in seconds (the
/// controller's `liveness::judge` reads it).
pub fn alive_mark(now: chrono::DateTime<chrono::Utc>) -> String {
    now.timestamp().to_string()
}

/// The liveness mark of an agent that is not busy (and not protected):
/// not a time, so the controller never judges it.
pub const IDLE_MARK: &str = "idle";

/// The group tag by which the controller closes a fallback group's
/// intake while failing back (`closed` / `open`).
pub const INTAKE_TAG: &str = "spotguard:intake";

impl Fleet for AsgFleet {
    async fn mark_alive(&self, instance: &str, value: &str) -> Result<(), AwsError> {
        const OP: &str = "CreateTags";
        let t = self.target(instance);
        let ec2 = self
            .ec2
            .as_ref()
            .map_err(|m| t.error(OP, None, m.clone()))?;
        t.bounded(OP, CALL_TIMEOUT, async {
            ec2.create_tag(instance, spotguard_common::ec2::ALIVE_TAG, value)
                .await
                .map_err(|e| t.error(OP, e.code, e.message))
        })
        .await
    }

    async fn group_of(&self, instance: &str) -> Result<Option<String>, AwsError> {
        Ok(self.describe(instance).await?.map(|(group, _)| group))
    }

    /// One `DescribeAutoScalingGroups` of the agent's own group.
    async fn intake(&self, group: &str) -> Result<Intake, AwsError> {
        const OP: &str = "DescribeAutoScalingGroups";
        let t = self.target(group);
        t.bounded(OP, CALL_TIMEOUT, async {
            let out = self
                .client
                .describe_auto_scaling_groups()
                .auto_scaling_group_names(group)
                .send()
                .await
                .map_err(|e| t.sdk(OP, e))?;
            let Some(g) = out
                .auto_scaling_groups()
                .iter()
                .find(|g| g.auto_scaling_group_name() == Some(group))
            else {
                return Ok(Intake::default());
            };
            let in_service = g
                .instances()
                .iter()
                .filter(|i| {
                    i.lifecycle_state()
                        == Some(&aws_sdk_autoscaling::types::LifecycleState::InService)
                })
                .count() as i32;
            Ok(Intake {
                closed: g
                    .tags()
                    .iter()
                    .any(|tag| tag.key() == Some(INTAKE_TAG) && tag.value() == Some("closed")),
                surplus: g.desired_capacity().is_some_and(|d| in_service > d),
            })
        })
        .await
    }

    async fn lifecycle_state(&self, instance: &str) -> Result<Option<String>, AwsError> {
        Ok(self.describe(instance).await?.map(|(_, state)| state))
    }

    async fn terminate_self(&self, instance: &str, decrement: bool) -> Result<ScaleIn, AwsError> {
        const OP: &str = "TerminateInstanceInAutoScalingGroup";
        let t = self.target(instance);
        t.bounded(OP, CALL_TIMEOUT, async {
            match self
                .client
                .terminate_instance_in_auto_scaling_group()
                .instance_id(instance)
                .should_decrement_desired_capacity(decrement)
                .send()
                .await
            {
                Ok(_) => Ok(ScaleIn::Accepted),
                Err(e) if is_min_size_refusal(e.code(), e.message()) => Ok(ScaleIn::Refused(
                    e.message().unwrap_or("ValidationError").to_string(),
                )),
                Err(e) => Err(t.sdk(OP, e)),
            }
        })
        .await
    }

    async fn set_protection(
        &self,
        group: &str,
        instance: &str,
        protect: bool,
    ) -> Result<(), AwsError> {
        const OP: &str = "SetInstanceProtection";
        let t = self.target(group);
        t.bounded(OP, CALL_TIMEOUT, async {
            self.client
                .set_instance_protection()
                .auto_scaling_group_name(group)
                .instance_ids(instance)
                .protected_from_scale_in(protect)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| t.sdk(OP, e))
        })
        .await
    }

    async fn mark_unhealthy(&self, instance: &str) -> Result<(), AwsError> {
        const OP: &str = "SetInstanceHealth";
        let t = self.target(instance);
        t.bounded(OP, CALL_TIMEOUT, async {
            health_request(&self.client, instance)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| t.sdk(OP, e))
        })
        .await
    }

    async fn lifecycle_heartbeat(
        &self,
        group: &str,
        hook: &str,
        instance: &str,
    ) -> Result<(), AwsError> {
        const OP: &str = "RecordLifecycleActionHeartbeat";
        let t = self.target(group);
        t.bounded(OP, CALL_TIMEOUT, async {
            self.client
                .record_lifecycle_action_heartbeat()
                .auto_scaling_group_name(group)
                .lifecycle_hook_name(hook)
                .instance_id(instance)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| t.sdk(OP, e))
        })
        .await
    }

    async fn complete_lifecycle(
        &self,
        group: &str,
        hook: &str,
        instance: &str,
    ) -> Result<(), AwsError> {
        const OP: &str = "CompleteLifecycleAction";
        let t = self.target(group);
        t.bounded(OP, CALL_TIMEOUT, async {
            self.client
                .complete_lifecycle_action()
                .auto_scaling_group_name(group)
                .lifecycle_hook_name(hook)
                .instance_id(instance)
                .lifecycle_action_result("CONTINUE")
                .send()
                .await
                .map(|_| ())
                .map_err(|e| t.sdk(OP, e))
        })
        .await
    }
}

impl AsgFleet {
    /// (group, lifecycle state) of the instance, if it is in a group.
    async fn describe(&self, instance: &str) -> Result<Option<(String, String)>, AwsError> {
        const OP: &str = "DescribeAutoScalingInstances";
        let t = self.target(instance);
        t.bounded(OP, CALL_TIMEOUT, async {
            let out = self
                .client
                .describe_auto_scaling_instances()
                .instance_ids(instance)
                .send()
                .await
                .map_err(|e| t.sdk(OP, e))?;
            Ok(out
                .auto_scaling_instances()
                .iter()
                .find(|i| i.instance_id() == Some(instance))
                .and_then(|i| {
                    Some((
                        i.auto_scaling_group_name()?.to_string(),
                        i.lifecycle_state().unwrap_or_default().to_string(),
                    ))
                }))
        })
        .await
    }
}

/// Publishes a notice to SNS, with a client in the topic's region.
pub async fn sns_publish(
    client: &aws_sdk_sns::Client,
    topic: &str,
    subject: &str,
    message: &str,
) -> Result<(), AwsError> {
    const OP: &str = "Publish";
    let region = client.config().region().map(|r| r.to_string());
    let t = Target {
        resource: topic,
        region: region.as_deref(),
    };
    t.bounded(OP, CALL_TIMEOUT, async {
        spotguard_common::sns::publish(client, topic, subject, message)
            .await
            .map_err(|e| t.sdk(OP, e))
    })
    .await
}

/// `SetInstanceHealth Unhealthy` that does not respect the group's
/// health-check grace period: by default the call honours it (Auto Scaling
/// API reference, SetInstanceHealth, `ShouldRespectGracePeriod`), and a
/// broken GPU is found right after boot, inside it.
pub fn health_request(
    client: &aws_sdk_autoscaling::Client,
    instance: &str,
) -> aws_sdk_autoscaling::operation::set_instance_health::builders::SetInstanceHealthFluentBuilder {
    client
        .set_instance_health()
        .instance_id(instance)
        .health_status("Unhealthy")
        .should_respect_grace_period(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unhealthy_mark_does_not_wait_for_the_grace_period() {
        let conf = aws_sdk_autoscaling::Config::builder()
            .behavior_version(aws_sdk_autoscaling::config::BehaviorVersion::latest())
            .region(aws_sdk_autoscaling::config::Region::new("us-east-1"))
            .build();
        let client = aws_sdk_autoscaling::Client::from_conf(conf);
        let req = health_request(&client, "i-1");
        let input = req.as_input();
        assert_eq!(input.get_should_respect_grace_period(), &Some(false));
        assert_eq!(input.get_health_status().as_deref(), Some("Unhealthy"));
        assert_eq!(input.get_instance_id().as_deref(), Some("i-1"));
    }

    #[test]
    fn an_aws_error_is_one_readable_line() {
        let e = AwsError {
            op: "ReceiveMessage",
            code: Some("AWS.SimpleQueueService.NonExistentQueue".into()),
            message: "The specified queue does not exist.".into(),
            resource: Some("https://sqs.us-east-1.amazonaws.com/1/jobs".into()),
            region: Some("us-east-2".into()),
        };
        assert_eq!(
            e.to_string(),
            "ReceiveMessage on https://sqs.us-east-1.amazonaws.com/1/jobs in us-east-2: \
             AWS.SimpleQueueService.NonExistentQueue: The specified queue does not exist."
        );
    }

    #[test]
    fn only_the_min_size_validation_error_is_a_refusal() {
        let min = "Currently, desiredSize equals minSize (1). Terminating instance without replacement will violate group's min size constraint.";
        assert!(is_min_size_refusal(Some("ValidationError"), Some(min)));
        assert!(!is_min_size_refusal(
            Some("ValidationError"),
            Some("The instance i-0abc is not in InService.")
        ));
        assert!(!is_min_size_refusal(Some("ValidationError"), None));
        assert!(!is_min_size_refusal(Some("Throttling"), Some(min)));
    }
}
