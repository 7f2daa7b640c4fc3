//! An in-memory [`Cloud`]: groups, queue depth, activities, policies, tags,
//! metrics and SNS messages per region, with a call log and scripted faults,
//! so the handler runs in tests (and the simulation) without AWS or moto.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Mutex, MutexGuard};

use crate::aws::{Cloud, CloudError, GroupInfo, GroupUpdate, TargetTracking};
use crate::events::Activity;
use crate::metrics::MetricValue;

#[derive(Debug, Default)]
pub struct CloudState {
    /// (region, group) -> group.
    pub groups: BTreeMap<(String, String), GroupInfo>,
    /// (region, queue URL) -> (visible, in flight).
    pub queues: BTreeMap<(String, String), (i64, i64)>,
    pub activities: BTreeMap<(String, String), Vec<Activity>>,
    pub policies: BTreeMap<(String, String, String), (Option<bool>, TargetTracking)>,
    pub metrics: Vec<MetricValue>,
    /// (region, queue URL, body, attributes, FIFO group and deduplication id)
    /// of every message sent.
    #[allow(clippy::type_complexity)]
    pub sent: Vec<(
        String,
        String,
        String,
        BTreeMap<String, String>,
        Option<(String, String)>,
    )>,
    /// (topic, subject, message)
    pub published: Vec<(String, String, String)>,
    /// (operation, region) of every call.
    pub calls: Vec<(&'static str, String)>,
    /// Errors to answer for (operation, region), in turn, before answering
    /// normally (an empty one: answer normally that time).
    pub faults: BTreeMap<(&'static str, String), VecDeque<String>>,
    /// A concurrent writer: after the n-th read of a group (counted per
    /// group), its `spotguard:version` tag becomes this value.
    pub race: Option<(usize, (String, String), String)>,
    /// With `race`: from the n-th read on, every read moves the version on
    /// (a writer that never stops).
    pub race_always: bool,
    reads: BTreeMap<(String, String), usize>,
    /// (region, URL) -> the FIFO queues that hold messages (the lease's):
    /// messages in send order, as SQS keeps a FIFO queue.
    pub fifo: BTreeMap<(String, String), FifoQueue>,
    /// How long every call in a region takes to answer: a slow or hanging
    /// region (with a fault queued, it answers that error after the wait,
    /// as the SDK's bound does).
    pub latency: BTreeMap<String, std::time::Duration>,
    /// The wall-clock time at a tokio instant (a test's `TokioClock`), for
    /// the FIFO messages' `SentTimestamp`; the system clock without it.
    pub wall: Option<(chrono::DateTime<chrono::Utc>, tokio::time::Instant)>,
    /// (region, instance id) -> its `spotguard:alive` tag (the agents'
    /// liveness marks).
    pub marks: BTreeMap<(String, String), String>,
}

/// A FIFO queue as SQS answers it: a message group with a message in
/// flight returns nothing more until that one is deleted or visible again;
/// a deduplication id seen in the last 5 minutes is accepted and dropped.
#[derive(Debug, Default)]
pub struct FifoQueue {
    pub messages: Vec<FifoMessage>,
    /// (deduplication id, when sent).
    pub dedup: Vec<(String, tokio::time::Instant)>,
    /// (attempt id, receipt answered): a retried receive answers the same.
    pub attempts: Vec<(String, String)>,
    pub next: usize,
}

#[derive(Debug, Clone)]
pub struct FifoMessage {
    /// Stable: the message's id.
    pub id: String,
    pub group: String,
    /// The handle of its last receive (empty before the first).
    pub receipt: String,
    pub sent: chrono::DateTime<chrono::Utc>,
    /// In flight until then.
    pub hidden_until: Option<tokio::time::Instant>,
}

impl FifoQueue {
    fn in_flight(m: &FifoMessage, now: tokio::time::Instant) -> bool {
        m.hidden_until.is_some_and(|t| t > now)
    }

    /// (visible, in flight), as `GetQueueAttributes` counts them.
    pub fn depth(&self) -> (i64, i64) {
        let now = tokio::time::Instant::now();
        let flying = self
            .messages
            .iter()
            .filter(|m| FifoQueue::in_flight(m, now))
            .count() as i64;
        (self.messages.len() as i64 - flying, flying)
    }
}

/// One call of an operation held back until the test lets it go: the
/// moment of a race (another controller runs its whole tick in between).
#[derive(Debug, Default)]
pub struct Gate {
    armed: Mutex<Option<&'static str>>,
    parked: tokio::sync::Notify,
    open: tokio::sync::Notify,
}

impl Gate {
    /// The next call of `op` waits for [`Gate::open`].
    pub fn arm(&self, op: &'static str) {
        *self.armed.lock().unwrap_or_else(|p| p.into_inner()) = Some(op);
    }

    /// Returns once the armed call is waiting.
    pub async fn parked(&self) {
        self.parked.notified().await;
    }

    pub fn open(&self) {
        self.open.notify_one();
    }

    async fn pass(&self, op: &'static str) {
        let hit = {
            let mut a = self.armed.lock().unwrap_or_else(|p| p.into_inner());
            if *a == Some(op) {
                *a = None;
                true
            } else {
                false
            }
        };
        if hit {
            self.parked.notify_one();
            self.open.notified().await;
        }
    }
}

impl CloudState {
    /// The FIFO queue at (region, URL), or SQS's answer for none.
    fn fifo_queue<'a>(
        &'a mut self,
        op: &'static str,
        region: &str,
        url: &str,
    ) -> Result<&'a mut FifoQueue, CloudError> {
        self.fifo
            .get_mut(&(region.to_string(), url.to_string()))
            .ok_or_else(|| FakeCloud::missing(op, region, "such queue (QueueDoesNotExist)"))
    }
}

#[derive(Debug, Default)]
pub struct FakeCloud {
    pub state: Mutex<CloudState>,
    pub gate: Gate,
}

/// Auto Scaling's tag limits (User Guide, "Tag Auto Scaling groups and
/// instances"; API Reference, `Tag`): 50 tags a group, keys of 1-128
/// characters, values of at most 256.
pub const MAX_TAGS: usize = 50;
pub const MAX_TAG_KEY: usize = 128;
pub const MAX_TAG_VALUE: usize = 256;

impl FakeCloud {
    pub fn lock(&self) -> MutexGuard<'_, CloudState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A FIFO queue (the lease's), empty.
    pub fn add_fifo(&self, region: &str, url: &str) {
        self.lock()
            .fifo
            .insert((region.into(), url.into()), FifoQueue::default());
    }

    pub fn add_group(&self, region: &str, name: &str, g: GroupInfo) {
        self.lock().groups.insert((region.into(), name.into()), g);
    }

    pub fn set_depth(&self, region: &str, url: &str, visible: i64, in_flight: i64) {
        self.lock()
            .queues
            .insert((region.into(), url.into()), (visible, in_flight));
    }

    pub fn fail_next(&self, op: &'static str, region: &str, message: &str, n: usize) {
        let mut st = self.lock();
        let q = st.faults.entry((op, region.to_string())).or_default();
        for _ in 0..n {
            q.push_back(message.to_string());
        }
    }

    pub fn group_of(&self, region: &str, name: &str) -> GroupInfo {
        self.lock()
            .groups
            .get(&(region.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    pub fn calls(&self, op: &str) -> Vec<String> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.0 == op)
            .map(|c| c.1.clone())
            .collect()
    }

    fn begin(
        &self,
        op: &'static str,
        region: &str,
    ) -> Result<MutexGuard<'_, CloudState>, CloudError> {
        let mut st = self.lock();
        st.calls.push((op, region.to_string()));
        // An empty entry answers normally: a fault behind a success.
        if let Some(m) = st
            .faults
            .get_mut(&(op, region.to_string()))
            .and_then(VecDeque::pop_front)
            .filter(|m| !m.is_empty())
        {
            return Err(CloudError {
                op,
                region: region.to_string(),
                message: m,
            });
        }
        Ok(st)
    }

    fn read_group(
        &self,
        op: &'static str,
        region: &str,
        name: &str,
    ) -> Result<GroupInfo, CloudError> {
        let mut st = self.begin(op, region)?;
        let key = (region.to_string(), name.to_string());
        let g = st
            .groups
            .get_mut(&key)
            .ok_or_else(|| FakeCloud::missing(op, region, &format!("group {name:?}")))?;
        protected_ids(g);
        let g = g.clone();
        let n = {
            let r = st.reads.entry(key.clone()).or_default();
            *r += 1;
            *r
        };
        if let Some((at, group, version)) = st.race.clone() {
            let hit = if st.race_always { n >= at } else { n == at };
            if hit && group == key {
                let version = if st.race_always {
                    (1000 + n).to_string()
                } else {
                    version
                };
                if let Some(g) = st.groups.get_mut(&key) {
                    g.tags.insert("spotguard:version".into(), version);
                }
            }
        }
        Ok(g)
    }

    fn missing(op: &'static str, region: &str, what: &str) -> CloudError {
        CloudError {
            op,
            region: region.to_string(),
            message: format!("no {what} in this region"),
        }
    }
}

/// A group set up by its count of busy instances gets their ids
/// (`i-busy0`, ...) the first time they are needed; ids already there stay.
fn protected_ids(g: &mut GroupInfo) {
    if g.protected.len() != g.busy.max(0) as usize {
        g.protected = (0..g.busy).map(|i| format!("i-busy{i}")).collect();
    }
}

/// Answers `$body` after the region's latency, if any.
macro_rules! later {
    ($self:ident, $region:expr, $body:expr) => {{
        let delay = $self.lock().latency.get($region).copied();
        async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            $body
        }
    }};
}

impl Cloud for FakeCloud {
    fn group(
        &self,
        region: &str,
        name: &str,
    ) -> impl Future<Output = Result<GroupInfo, CloudError>> + Send {
        const OP: &str = "DescribeAutoScalingGroups";
        later!(self, region, self.read_group(OP, region, name))
    }

    fn queue_depth(
        &self,
        region: &str,
        url: &str,
    ) -> impl Future<Output = Result<(i64, i64), CloudError>> + Send {
        const OP: &str = "GetQueueAttributes";
        later!(
            self,
            region,
            self.begin(OP, region).and_then(|st| {
                let key = (region.to_string(), url.to_string());
                if let Some(q) = st.fifo.get(&key) {
                    return Ok(q.depth());
                }
                st.queues
                    .get(&key)
                    .copied()
                    .ok_or_else(|| FakeCloud::missing(OP, region, "such queue (QueueDoesNotExist)"))
            })
        )
    }

    fn activities(
        &self,
        region: &str,
        group: &str,
    ) -> impl Future<Output = Result<Vec<Activity>, CloudError>> + Send {
        later!(
            self,
            region,
            self.begin("DescribeScalingActivities", region).map(|st| {
                st.activities
                    .get(&(region.to_string(), group.to_string()))
                    .cloned()
                    .unwrap_or_default()
            })
        )
    }

    fn send_message(
        &self,
        region: &str,
        url: &str,
        body: &str,
        attributes: &BTreeMap<String, String>,
        fifo: Option<(&str, &str)>,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        const OP: &str = "SendMessage";
        later!(
            self,
            region,
            self.begin(OP, region).map(|mut st| {
                let key = (region.to_string(), url.to_string());
                let st_wall = st.wall;
                if let (Some(q), Some((group, dedup))) = (st.fifo.get_mut(&key), fifo) {
                    let now = tokio::time::Instant::now();
                    // SQS: the deduplication interval is 5 minutes.
                    q.dedup.retain(|(_, at)| {
                        now.duration_since(*at) < std::time::Duration::from_secs(300)
                    });
                    if !q.dedup.iter().any(|(d, _)| d == dedup) {
                        q.dedup.push((dedup.to_string(), now));
                        let sent = match st_wall {
                            Some((at, base)) => {
                                at + chrono::Duration::from_std(now.duration_since(base))
                                    .unwrap_or_default()
                            }
                            None => chrono::Utc::now(),
                        };
                        q.next += 1;
                        let id = format!("m-{}", q.next);
                        q.messages.push(FifoMessage {
                            id,
                            group: group.to_string(),
                            receipt: String::new(),
                            sent,
                            hidden_until: None,
                        });
                    }
                }
                st.sent.push((
                    region.to_string(),
                    url.to_string(),
                    body.to_string(),
                    attributes.clone(),
                    fifo.map(|(g, d)| (g.to_string(), d.to_string())),
                ));
            })
        )
    }

    fn update_group(
        &self,
        region: &str,
        group: &str,
        update: GroupUpdate,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        const OP: &str = "UpdateAutoScalingGroup";
        later!(
            self,
            region,
            self.begin(OP, region).and_then(|mut st| {
                let g = st
                    .groups
                    .get_mut(&(region.to_string(), group.to_string()))
                    .ok_or_else(|| FakeCloud::missing(OP, region, "such group"))?;
                (g.max, g.desired) =
                    update
                        .apply(g.min, g.max, g.desired)
                        .map_err(|message| CloudError {
                            op: OP,
                            region: region.to_string(),
                            message,
                        })?;
                Ok(())
            })
        )
    }

    fn release_protection(
        &self,
        region: &str,
        group: &str,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<String>, CloudError>> + Send {
        const OP: &str = "SetInstanceProtection";
        let ids = ids.to_vec();
        later!(
            self,
            region,
            self.begin(OP, region).and_then(|mut st| {
                let g = st
                    .groups
                    .get_mut(&(region.to_string(), group.to_string()))
                    .ok_or_else(|| FakeCloud::missing(OP, region, "such group"))?;
                // AWS: at most 50 instance ids a call.
                if ids.len() > 50 {
                    return Err(CloudError {
                        op: OP,
                        region: region.to_string(),
                        message: "ValidationError: 1 validation error detected: Value at 'instanceIds' failed to satisfy constraint: Member must have length less than or equal to 50".into(),
                    });
                }
                protected_ids(g);
                g.protected.retain(|i| !ids.contains(i));
                g.busy = g.protected.len() as i32;
                Ok(ids)
            })
        )
    }

    fn alive_marks(
        &self,
        region: &str,
        ids: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, String>, CloudError>> + Send {
        const OP: &str = "DescribeTags";
        let ids = ids.to_vec();
        later!(
            self,
            region,
            self.begin(OP, region).map(|st| {
                ids.iter()
                    .filter_map(|id| {
                        st.marks
                            .get(&(region.to_string(), id.clone()))
                            .map(|v| (id.clone(), v.clone()))
                    })
                    .collect()
            })
        )
    }

    fn put_tags(
        &self,
        region: &str,
        group: &str,
        tags: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        const OP: &str = "CreateOrUpdateTags";
        async move {
            self.gate.pass(OP).await;
            let mut st = self.begin(OP, region)?;
            let g = st
                .groups
                .get_mut(&(region.to_string(), group.to_string()))
                .ok_or_else(|| FakeCloud::missing(OP, region, "such group"))?;
            let fail = |message: String| CloudError {
                op: OP,
                region: region.to_string(),
                message,
            };
            for (i, (k, v)) in tags.iter().enumerate() {
                if k.is_empty() || k.chars().count() > MAX_TAG_KEY {
                    return Err(fail(format!("ValidationError: 1 validation error detected: Value at 'tags.{}.member.key' failed to satisfy constraint: Member must have length between 1 and {MAX_TAG_KEY}", i + 1)));
                }
                if v.chars().count() > MAX_TAG_VALUE {
                    return Err(fail(format!("ValidationError: 1 validation error detected: Value at 'tags.{}.member.value' failed to satisfy constraint: Member must have length less than or equal to {MAX_TAG_VALUE}", i + 1)));
                }
            }
            let after = g.tags.len() + tags.keys().filter(|k| !g.tags.contains_key(*k)).count();
            if after > MAX_TAGS {
                return Err(fail(format!(
                    "LimitExceeded: The number of tags for the Auto Scaling group would exceed the limit of {MAX_TAGS}"
                )));
            }
            g.tags.extend(tags.clone());
            Ok(())
        }
    }

    fn delete_tags(
        &self,
        region: &str,
        group: &str,
        keys: &[String],
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        const OP: &str = "DeleteTags";
        later!(
            self,
            region,
            self.begin(OP, region).and_then(|mut st| {
                let g = st
                    .groups
                    .get_mut(&(region.to_string(), group.to_string()))
                    .ok_or_else(|| FakeCloud::missing(OP, region, "such group"))?;
                g.tags.retain(|k, _| !keys.contains(k));
                Ok(())
            })
        )
    }

    fn policy(
        &self,
        region: &str,
        group: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<(Option<bool>, TargetTracking)>, CloudError>> + Send
    {
        later!(
            self,
            region,
            self.begin("DescribePolicies", region).map(|st| {
                st.policies
                    .get(&(region.to_string(), group.to_string(), name.to_string()))
                    .cloned()
            })
        )
    }

    fn put_policy(
        &self,
        region: &str,
        group: &str,
        policy: &TargetTracking,
        enabled: bool,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        later!(
            self,
            region,
            self.begin("PutScalingPolicy", region).map(|mut st| {
                st.policies.insert(
                    (region.to_string(), group.to_string(), policy.name.clone()),
                    (Some(enabled), policy.clone()),
                );
            })
        )
    }

    fn put_metric(&self, m: &MetricValue) -> impl Future<Output = Result<(), CloudError>> + Send {
        later!(
            self,
            &m.region,
            self.begin("PutMetricData", &m.region)
                .map(|mut st| st.metrics.push(m.clone()))
        )
    }

    fn receive_one(
        &self,
        region: &str,
        url: &str,
        visibility: i32,
        attempt: &str,
    ) -> impl Future<Output = Result<Option<crate::aws::Received>, CloudError>> + Send {
        const OP: &str = "ReceiveMessage";
        later!(
            self,
            region,
            self.begin(OP, region).and_then(|mut st| {
                let q = CloudState::fifo_queue(&mut st, OP, region, url)?;
                let now = tokio::time::Instant::now();
                let hide =
                    now + std::time::Duration::from_secs(u64::try_from(visibility).unwrap_or(0));
                if let Some((_, receipt)) = q.attempts.iter().find(|(a, _)| a == attempt) {
                    let receipt = receipt.clone();
                    return Ok(q.messages.iter().find(|m| m.receipt == receipt).map(|m| {
                        crate::aws::Received {
                            receipt: m.receipt.clone(),
                            sent: Some(m.sent),
                        }
                    }));
                }
                // The first message whose group has nothing in flight.
                let blocked: Vec<String> = q
                    .messages
                    .iter()
                    .filter(|m| FifoQueue::in_flight(m, now))
                    .map(|m| m.group.clone())
                    .collect();
                let Some(i) = q.messages.iter().position(|m| !blocked.contains(&m.group)) else {
                    return Ok(None);
                };
                // SQS gives a new receipt handle on every receive; an old one
                // no longer changes or deletes the message.
                q.next += 1;
                let receipt = format!("{}#{}", q.messages[i].id, q.next);
                let m = &mut q.messages[i];
                m.hidden_until = Some(hide);
                m.receipt = receipt.clone();
                let got = crate::aws::Received {
                    receipt: receipt.clone(),
                    sent: Some(m.sent),
                };
                q.attempts.push((attempt.to_string(), receipt));
                Ok(Some(got))
            })
        )
    }

    fn change_visibility(
        &self,
        region: &str,
        url: &str,
        receipt: &str,
        visibility: i32,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        const OP: &str = "ChangeMessageVisibility";
        later!(self, region, self.begin(OP, region).and_then(|mut st| {
            let q = CloudState::fifo_queue(&mut st, OP, region, url)?;
            let now = tokio::time::Instant::now();
            match q.messages.iter_mut().find(|m| m.receipt == receipt) {
                // SQS: "Message does not exist or is not available for
                // visibility timeout change" once it is no longer in flight.
                Some(m) if FifoQueue::in_flight(m, now) => {
                    m.hidden_until = Some(
                        now + std::time::Duration::from_secs(u64::try_from(visibility).unwrap_or(0)),
                    );
                    Ok(())
                }
                _ => Err(CloudError {
                    op: OP,
                    region: region.to_string(),
                    message: format!("InvalidParameterValue: Value {receipt} for parameter ReceiptHandle is invalid. Reason: Message does not exist or is not available for visibility timeout change."),
                }),
            }
        }))
    }

    fn delete_message(
        &self,
        region: &str,
        url: &str,
        receipt: &str,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        const OP: &str = "DeleteMessage";
        later!(
            self,
            region,
            self.begin(OP, region).and_then(|mut st| {
                let q = CloudState::fifo_queue(&mut st, OP, region, url)?;
                q.messages
                    .retain(|m| m.receipt.is_empty() || m.receipt != receipt);
                Ok(())
            })
        )
    }

    fn publish(
        &self,
        topic: &str,
        subject: &str,
        message: &str,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        let region = spotguard_common::region::arn_region(topic).unwrap_or_default();
        later!(
            self,
            &region,
            self.begin("Publish", &region).map(|mut st| {
                st.published
                    .push((topic.to_string(), subject.to_string(), message.to_string()))
            })
        )
    }
}
