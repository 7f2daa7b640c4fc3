//! The simulated AWS's APIs: the agent's [`Fleet`] and the controller's
//! [`Cloud`] over the one [`World`], so the real agent and controller code
//! runs against it. Each call answers as AWS does, with the scenario's
//! faults: the controller's calls are throttled (decided before the call
//! applies) and their answer delayed (`faults.api_latency`); the agents'
//! protection and liveness mark land late (`faults.agent_api_latency`, the
//! change itself delayed) and their Auto Scaling calls are throttled
//! (`faults.agent_error_rate`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use spotguard_agent::aws::{AwsError, Fleet, ScaleIn};
use spotguard_agent::fakes::{aws_error, MemQueue, MIN_SIZE_REFUSAL};
use spotguard_controller::aws::{
    Cloud, CloudError, GroupInfo, GroupUpdate, Received, TargetTracking,
};
use spotguard_controller::events::Activity;
use spotguard_controller::metrics::MetricValue;

use crate::world::{lock, Instance, Kill, Rng, Shared, State, Tracking};

/// One instance's view of Auto Scaling, for its agent.
pub struct SimFleet {
    pub world: Shared,
    pub id: String,
}

impl Fleet for SimFleet {
    fn mark_alive(
        &self,
        _instance: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send {
        let (world, id, value) = (self.world.clone(), self.id.clone(), value.to_string());
        let latency = lock(&world).faults.agent_api_latency.0;
        async move {
            landing(latency).await;
            let mut w = lock(&world);
            if w.agent_call_fails() {
                return Err(aws_error("CreateTags", "RequestLimitExceeded"));
            }
            if let Some(i) = w.instances.get_mut(&id) {
                i.alive_mark = Some(value);
            }
            Ok(())
        }
    }

    fn intake(
        &self,
        _group: &str,
    ) -> impl Future<Output = Result<spotguard_agent::aws::Intake, AwsError>> + Send {
        let w = lock(&self.world);
        let r = w
            .instances
            .get(&self.id)
            .map(|i| {
                let g = &w.groups[i.group];
                spotguard_agent::aws::Intake {
                    closed: g
                        .tags
                        .get(spotguard_agent::aws::INTAKE_TAG)
                        .is_some_and(|v| v == "closed"),
                    surplus: w.in_service(i.group) > g.desired,
                }
            })
            .unwrap_or_default();
        std::future::ready(Ok(r))
    }

    fn group_of(
        &self,
        _instance: &str,
    ) -> impl Future<Output = Result<Option<String>, AwsError>> + Send {
        let w = lock(&self.world);
        let r = w
            .instances
            .get(&self.id)
            .map(|i| w.groups[i.group].name.clone());
        std::future::ready(Ok(r))
    }

    fn lifecycle_state(
        &self,
        _instance: &str,
    ) -> impl Future<Output = Result<Option<String>, AwsError>> + Send {
        let w = lock(&self.world);
        let r = w.instances.get(&self.id).map(|i| {
            match (i.state, i.hook) {
                (State::InService, _) => "InService",
                (State::Pending { .. }, _) => "Pending",
                (State::Terminating { .. }, Some(_)) => "Terminating:Wait",
                _ => "Terminating",
            }
            .to_string()
        });
        std::future::ready(Ok(r))
    }

    fn terminate_self(
        &self,
        _instance: &str,
        decrement: bool,
    ) -> impl Future<Output = Result<ScaleIn, AwsError>> + Send {
        let mut w = lock(&self.world);
        if w.agent_call_fails() {
            return std::future::ready(Err(aws_error(
                "TerminateInstanceInAutoScalingGroup",
                "Throttling",
            )));
        }
        let now = Instant::now();
        let r = match w.instances.get(&self.id).map(|i| (i.group, i.noticed)) {
            None => Err(aws_error(
                "TerminateInstanceInAutoScalingGroup",
                "ValidationError",
            )),
            Some((g, noticed)) => {
                if noticed && decrement {
                    w.violations.push(format!(
                        "{}: desired capacity decremented after a spot notice",
                        self.id
                    ));
                }
                if decrement && w.groups[g].desired <= w.groups[g].min {
                    Ok(ScaleIn::Refused(MIN_SIZE_REFUSAL.to_string()))
                } else {
                    if decrement {
                        w.groups[g].desired -= 1;
                    }
                    let busy = w
                        .instances
                        .get(&self.id)
                        .and_then(|i| i.status.as_ref())
                        .is_some_and(|s| s.json()["jobs_in_flight"].as_u64().unwrap_or(0) > 0);
                    if busy {
                        w.violations.push(format!(
                            "{}: the agent's own scale-in with a job running",
                            self.id
                        ));
                    }
                    // Through the group's termination hook if it has one
                    // (AWS runs it for TerminateInstanceInAutoScalingGroup
                    // too: the agent sees `Terminated` and completes the
                    // action); else the instance shuts down a little later
                    // (the agent has nothing left to do).
                    if w.groups[g].hook {
                        w.scale_in(&self.id, now, Kill::AgentScaleIn);
                    } else {
                        w.terminate(&self.id, now + Duration::from_secs(30), Kill::AgentScaleIn);
                    }
                    Ok(ScaleIn::Accepted)
                }
            }
        };
        std::future::ready(r)
    }

    fn set_protection(
        &self,
        _group: &str,
        _instance: &str,
        protect: bool,
    ) -> impl Future<Output = Result<(), AwsError>> + Send {
        let (world, id) = (self.world.clone(), self.id.clone());
        let latency = lock(&world).faults.agent_api_latency.0;
        async move {
            // The call lands after `faults.agent_api_latency`: a scale-in
            // meanwhile may still pick the instance (its job already runs).
            landing(latency).await;
            let mut w = lock(&world);
            if w.agent_call_fails() {
                return Err(aws_error("SetInstanceProtection", "Throttling"));
            }
            match w.instances.get_mut(&id) {
                Some(i) if i.state == State::InService => {
                    i.protected = protect;
                    Ok(())
                }
                // AWS refuses it for an instance the group is taking out
                // (REFERENCE.md), which a late call can meet.
                _ => Err(AwsError {
                    message: format!(
                        "The instance {id} is not in InService or EnteringStandby or Standby."
                    ),
                    ..aws_error("SetInstanceProtection", "ValidationError")
                }),
            }
        }
    }

    fn mark_unhealthy(&self, _instance: &str) -> impl Future<Output = Result<(), AwsError>> + Send {
        let mut w = lock(&self.world);
        let now = Instant::now();
        // Replaced through the termination hook, as any termination by
        // the group.
        w.scale_in(&self.id, now, Kill::Replaced);
        std::future::ready(Ok(()))
    }

    fn lifecycle_heartbeat(
        &self,
        _g: &str,
        _h: &str,
        _i: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send {
        let mut w = lock(&self.world);
        let ok = w.hook_heartbeat(&self.id, Instant::now());
        std::future::ready(no_action(ok, "RecordLifecycleActionHeartbeat", &self.id))
    }

    fn complete_lifecycle(
        &self,
        _g: &str,
        _h: &str,
        _i: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send {
        let mut w = lock(&self.world);
        let ok = w.hook_complete(&self.id, Instant::now());
        std::future::ready(no_action(ok, "CompleteLifecycleAction", &self.id))
    }
}

/// Waits out an agent call's latency, if any.
async fn landing(latency: Duration) {
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
}

/// Auto Scaling's answer to a lifecycle call for an instance the hook does
/// not hold.
fn no_action(ok: bool, op: &'static str, id: &str) -> Result<(), AwsError> {
    if ok {
        return Ok(());
    }
    Err(AwsError {
        message: format!("No active Lifecycle Action found with instance ID {id}"),
        ..aws_error(op, "ValidationError")
    })
}

/// The controller's view of AWS.
pub struct SimCloud {
    pub world: Shared,
    pub queue: Arc<MemQueue>,
}

impl SimCloud {
    /// The scenario's API faults: AWS's throttling answer at
    /// `faults.api_error_rate` (the call is then not applied). Called
    /// before the world is locked for the call itself.
    fn fails(&self, op: &'static str, region: &str) -> Option<CloudError> {
        let mut w = lock(&self.world);
        let rate = w.faults.api_error_rate;
        if rate <= 0.0 {
            return None;
        }
        let roll = w.fault_rng.as_mut().map_or(1.0, Rng::unit);
        (roll < rate).then(|| CloudError {
            op,
            region: region.to_string(),
            message: "Throttling: Rate exceeded".into(),
        })
    }

    /// The answer after `faults.api_latency` of virtual time.
    fn answer<T: Send + 'static>(
        &self,
        r: Result<T, CloudError>,
    ) -> impl Future<Output = Result<T, CloudError>> + Send + 'static {
        let latency = lock(&self.world).faults.api_latency.0;
        async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            r
        }
    }
}

fn missing(op: &'static str, region: &str) -> CloudError {
    CloudError {
        op,
        region: region.to_string(),
        message: "no such group in the simulation".into(),
    }
}

impl Cloud for SimCloud {
    fn group(
        &self,
        region: &str,
        name: &str,
    ) -> impl Future<Output = Result<GroupInfo, CloudError>> + Send {
        if let Some(e) = self.fails("DescribeAutoScalingGroups", region) {
            return self.answer(Err(e));
        }
        let w = lock(&self.world);
        let r = w.group_index(region, name).map(|g| {
            let gr = &w.groups[g];
            let ins: Vec<&Instance> = w.alive(g).collect();
            GroupInfo {
                desired: gr.desired,
                min: gr.min,
                max: gr.max,
                in_service: ins.iter().filter(|i| i.state == State::InService).count() as i32,
                busy: ins
                    .iter()
                    .filter(|i| i.state == State::InService && i.protected)
                    .count() as i32,
                protected: ins
                    .iter()
                    .filter(|i| i.state == State::InService && i.protected)
                    .map(|i| i.id.clone())
                    .collect(),
                pending: ins
                    .iter()
                    .filter(|i| matches!(i.state, State::Pending { .. }))
                    .count() as i32,
                tags: gr.tags.clone(),
            }
        });
        let r = r.ok_or_else(|| missing("DescribeAutoScalingGroups", region));
        drop(w);
        self.answer(r)
    }

    fn queue_depth(
        &self,
        _region: &str,
        _url: &str,
    ) -> impl Future<Output = Result<(i64, i64), CloudError>> + Send {
        if let Some(e) = self.fails("GetQueueAttributes", _region) {
            return self.answer(Err(e));
        }
        let (v, f) = self.queue.depth();
        self.answer(Ok((v as i64, f as i64)))
    }

    /// Periodic tasks are not simulated: a message sent lands in the queue
    /// with its body only.
    fn send_message(
        &self,
        _region: &str,
        _url: &str,
        body: &str,
        _attributes: &BTreeMap<String, String>,
        _fifo: Option<(&str, &str)>,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        self.queue.push(body);
        std::future::ready(Ok(()))
    }

    fn activities(
        &self,
        region: &str,
        group: &str,
    ) -> impl Future<Output = Result<Vec<Activity>, CloudError>> + Send {
        if let Some(e) = self.fails("DescribeScalingActivities", region) {
            return self.answer(Err(e));
        }
        let w = lock(&self.world);
        let r = w
            .group_index(region, group)
            .map(|g| w.groups[g].activities.iter().rev().cloned().collect())
            .unwrap_or_default();
        drop(w);
        self.answer(Ok(r))
    }

    fn update_group(
        &self,
        region: &str,
        group: &str,
        update: GroupUpdate,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        const OP: &str = "UpdateAutoScalingGroup";
        if let Some(e) = self.fails(OP, region) {
            return self.answer(Err(e));
        }
        let mut w = lock(&self.world);
        let r = match w.group_index(region, group) {
            Some(g) => {
                let gr = &mut w.groups[g];
                update
                    .apply(gr.min, gr.max, gr.desired)
                    .map(|(max, desired)| {
                        gr.max = max;
                        gr.desired = desired;
                    })
                    .map_err(|message| CloudError {
                        op: OP,
                        region: region.to_string(),
                        message,
                    })
            }
            None => Err(missing(OP, region)),
        };
        drop(w);
        self.answer(r)
    }

    fn release_protection(
        &self,
        region: &str,
        group: &str,
        ids: &[String],
    ) -> impl Future<Output = Result<Vec<String>, CloudError>> + Send {
        let mut w = lock(&self.world);
        let g = w.group_index(region, group);
        let mut released = Vec::new();
        let mut live_busy = Vec::new();
        for i in w.instances.values_mut() {
            if Some(i.group) == g && i.protected && ids.contains(&i.id) {
                i.protected = false;
                released.push(i.id.clone());
                // The controller's promise: a live agent's protection is
                // never released, only a dead one's.
                if i.agent_dead_at.is_none() && !i.running.is_empty() {
                    live_busy.push(i.id.clone());
                }
            }
        }
        for id in live_busy {
            w.violations.push(format!(
                "{id}: the protection of a live, busy agent was released"
            ));
        }
        std::future::ready(Ok(released))
    }

    fn alive_marks(
        &self,
        _region: &str,
        ids: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, String>, CloudError>> + Send {
        let w = lock(&self.world);
        let marks = ids
            .iter()
            .filter_map(|id| {
                let m = w.instances.get(id)?.alive_mark.clone()?;
                Some((id.clone(), m))
            })
            .collect();
        std::future::ready(Ok(marks))
    }

    fn delete_tags(
        &self,
        region: &str,
        group: &str,
        keys: &[String],
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        let mut w = lock(&self.world);
        let r = match w.group_index(region, group) {
            Some(g) => {
                w.groups[g].tags.retain(|k, _| !keys.contains(k));
                Ok(())
            }
            None => Err(missing("DeleteTags", region)),
        };
        std::future::ready(r)
    }

    fn put_tags(
        &self,
        region: &str,
        group: &str,
        tags: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        if let Some(e) = self.fails("CreateOrUpdateTags", region) {
            return self.answer(Err(e));
        }
        let mut w = lock(&self.world);
        let r = match w.group_index(region, group) {
            Some(g) => {
                w.groups[g].tags.extend(tags.clone());
                Ok(())
            }
            None => Err(missing("CreateOrUpdateTags", region)),
        };
        drop(w);
        self.answer(r)
    }

    fn policy(
        &self,
        region: &str,
        group: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<(Option<bool>, TargetTracking)>, CloudError>> + Send
    {
        let w = lock(&self.world);
        let r = w.group_index(region, group).and_then(|g| {
            w.groups[g]
                .tracking
                .as_ref()
                .filter(|t| t.policy.name == name)
                .map(|t| (Some(t.enabled), t.policy.clone()))
        });
        std::future::ready(Ok(r))
    }

    fn put_policy(
        &self,
        region: &str,
        group: &str,
        policy: &TargetTracking,
        enabled: bool,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        let mut w = lock(&self.world);
        if let Some(g) = w.group_index(region, group) {
            let keep = w.groups[g].tracking.take();
            w.groups[g].tracking = Some(Tracking {
                policy: policy.clone(),
                enabled,
                history: keep.as_ref().map(|t| t.history.clone()).unwrap_or_default(),
                last_scale_out: keep.and_then(|t| t.last_scale_out),
            });
        }
        std::future::ready(Ok(()))
    }

    fn put_metric(&self, m: &MetricValue) -> impl Future<Output = Result<(), CloudError>> + Send {
        if let Some(e) = self.fails("PutMetricData", &m.region) {
            return self.answer(Err(e));
        }
        let group = m
            .dimensions
            .iter()
            .find(|d| d.0 == "AutoScalingGroupName")
            .map(|d| d.1.clone())
            .unwrap_or_default();
        lock(&self.world)
            .metrics
            .insert((m.region.clone(), group, m.name.clone()), m.value);
        self.answer(Ok(()))
    }

    fn publish(
        &self,
        _topic: &str,
        subject: &str,
        message: &str,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        lock(&self.world)
            .published
            .push((subject.to_string(), message.to_string()));
        std::future::ready(Ok(()))
    }

    // The simulation runs one controller and configures no lease: these
    // are never called, and answer as a region without the queue would.
    fn receive_one(
        &self,
        region: &str,
        _url: &str,
        _visibility: i32,
        _attempt: &str,
    ) -> impl Future<Output = Result<Option<Received>, CloudError>> + Send {
        std::future::ready(Err(no_lease_queue("ReceiveMessage", region)))
    }

    fn change_visibility(
        &self,
        region: &str,
        _url: &str,
        _receipt: &str,
        _visibility: i32,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        std::future::ready(Err(no_lease_queue("ChangeMessageVisibility", region)))
    }

    fn delete_message(
        &self,
        region: &str,
        _url: &str,
        _receipt: &str,
    ) -> impl Future<Output = Result<(), CloudError>> + Send {
        std::future::ready(Err(no_lease_queue("DeleteMessage", region)))
    }
}

fn no_lease_queue(op: &'static str, region: &str) -> CloudError {
    CloudError {
        op,
        region: region.to_string(),
        message: "AWS.SimpleQueueService.NonExistentQueue: The specified queue does not exist (the simulation has no lease queue)".into(),
    }
}
