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
    /// Errors to answer for (operation, region), before answering normally.
    pub faults: BTreeMap<(&'static str, String), VecDeque<String>>,
    /// A concurrent writer: after the n-th read of a group (counted per
    /// group), its `spotguard:version` tag becomes this value.
    pub race: Option<(usize, (String, String), String)>,
    /// With `race`: from the n-th read on, every read moves the version on
    /// (a writer that never stops).
    pub race_always: bool,
    reads: BTreeMap<(String, String), usize>,
}

#[derive(Debug, Default)]
pub struct FakeCloud {
    pub state: Mutex<CloudState>,
}

impl FakeCloud {
    pub fn lock(&self) -> MutexGuard<'_, CloudState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
        if let Some(m) = st
            .faults
            .get_mut(&(op, region.to_string()))
            .and_then(VecDeque::pop_front)
        {
            return Err(CloudError {
                op,
                region: region.to_string(),
                message: m,
            });
        }
        Ok(st)
    }

    fn missing(op: &'static str, region: &str, what: &str) -> CloudError {
        CloudError {
            op,
            region: region.to_string(),
            message: format!("no {what} in this region"),
        }
    }
}

fn ready<T: Send>(r: T) -> impl Future<Output = T> + Send {
    std::future::ready(r)
}

impl Cloud for FakeCloud {
    fn group(
        &self,
        region: &str,
        name: &str,
    ) -> impl Future<Output = Result<GroupInfo, CloudError>> + Send {
        const OP: &str = "DescribeAutoScalingGroups";
        ready(self.begin(OP, region).and_then(|mut st| {
            let key = (region.to_string(), name.to_string());
            let g = st
                .groups
                .get(&key)
                .cloned()
                .ok_or_else(|| FakeCloud::missing(OP, region, &format!("group {name:?}")))?;
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
        }))
    }

    fn queue_depth(
        &self,
        region: &str,
        url: &str,
    ) -> impl Future<Output = Result<(i64, i64), CloudError>> + Send {
        const OP: &str = "GetQueueAttributes";
        ready(self.begin(OP, region).and_then(|st| {
            st.queues
                .get(&(region.to_string(), url.to_string()))
                .copied()
                .ok_or_else(|| FakeCloud::missing(OP, region, "such queue (QueueDoesNotExist)"))
        }))
    }

    fn activities(
        &self,
        region: &str,
        group: &str,
    ) -> impl Future<Output = Result<Vec<Activity>, CloudError>> + Send {
        ready(self.begin("DescribeScalingActivities", region).map(|st| {
            st.activities
                .get(&(region.to_string(), group.to_string()))
                .cloned()
                .unwrap_or_default()
        }))
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
        ready(self.begin(OP, region).map(|mut st| {
            st.sent.push((
                region.to_string(),
                url.to_string(),
                body.to_string(),
                attributes.clone(),
                fifo.map(|(g, d)| (g.to_string(), d.to_string())),
            ));
        }))
    }

    fn update_group(
        &self,
        region: &str,
        group: &str,
        update: GroupUpdate,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        const OP: &str = "UpdateAutoScalingGroup";
        ready(self.begin(OP, region).and_then(|mut st| {
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
        }))
    }

    fn release_protection(
        &self,
        region: &str,
        group: &str,
    ) -> impl Future<Output = Result<Vec<String>, CloudError>> + Send {
        const OP: &str = "SetInstanceProtection";
        ready(self.begin(OP, region).and_then(|mut st| {
            let g = st
                .groups
                .get_mut(&(region.to_string(), group.to_string()))
                .ok_or_else(|| FakeCloud::missing(OP, region, "such group"))?;
            let ids = (0..g.busy).map(|i| format!("i-busy{i}")).collect();
            g.busy = 0;
            Ok(ids)
        }))
    }

    fn put_tags(
        &self,
        region: &str,
        group: &str,
        tags: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        const OP: &str = "CreateOrUpdateTags";
        ready(self.begin(OP, region).and_then(|mut st| {
            let g = st
                .groups
                .get_mut(&(region.to_string(), group.to_string()))
                .ok_or_else(|| FakeCloud::missing(OP, region, "such group"))?;
            g.tags.extend(tags.clone());
            Ok(())
        }))
    }

    fn delete_tags(
        &self,
        region: &str,
        group: &str,
        keys: &[String],
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        const OP: &str = "DeleteTags";
        ready(self.begin(OP, region).and_then(|mut st| {
            let g = st
                .groups
                .get_mut(&(region.to_string(), group.to_string()))
                .ok_or_else(|| FakeCloud::missing(OP, region, "such group"))?;
            g.tags.retain(|k, _| !keys.contains(k));
            Ok(())
        }))
    }

    fn policy(
        &self,
        region: &str,
        group: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<(Option<bool>, TargetTracking)>, CloudError>> + Send
    {
        ready(self.begin("DescribePolicies", region).map(|st| {
            st.policies
                .get(&(region.to_string(), group.to_string(), name.to_string()))
                .cloned()
        }))
    }

    fn put_policy(
        &self,
        region: &str,
        group: &str,
        policy: &TargetTracking,
        enabled: bool,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        ready(self.begin("PutScalingPolicy", region).map(|mut st| {
            st.policies.insert(
                (region.to_string(), group.to_string(), policy.name.clone()),
                (Some(enabled), policy.clone()),
            );
        }))
    }

    fn put_metric(&self, m: &MetricValue) -> impl Future<Output = Result<(), CloudError>> + Send {
        ready(
            self.begin("PutMetricData", &m.region)
                .map(|mut st| st.metrics.push(m.clone())),
        )
    }

    fn publish(
        &self,
        topic: &str,
        subject: &str,
        message: &str,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        let region = spotguard_common::region::arn_region(topic).unwrap_or_default();
        ready(self.begin("Publish", &region).map(|mut st| {
            st.published
                .push((topic.to_string(), subject.to_string(), message.to_string()))
        }))
    }
}
