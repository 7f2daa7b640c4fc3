//! In-memory fakes of the agent's edges (SQS, Auto Scaling, the worker),
//! in the manner of NTH's `pkg/test/aws-mocks.go`: plain structs with the
//! behaviour AWS documents (REFERENCE.md), a call log, and scripted faults.
//! They keep time with tokio's clock, so tests run them under
//! `tokio::time::pause()` and a 12-hour job takes milliseconds.
//!
//! Built for this crate's tests and, with the `test-util` feature, for the
//! other crates' tests and the simulation.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::aws::{AwsError, Fleet, Message, Outgoing, Queue, ScaleIn};
use crate::worker::{Ended, JobFiles, JobNotice, Outcome, StopReason, Worker};

/// SQS caps a message's invisibility at 12 hours from its receipt
/// (REFERENCE.md, SQS); a longer `ChangeMessageVisibility` is rejected.
pub const MAX_INVISIBLE: Duration = Duration::from_secs(12 * 3600);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread poisons the lock; the state is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An error as the SDK implementation reports it.
pub fn aws_error(op: &'static str, code: &str) -> AwsError {
    AwsError {
        op,
        code: Some(code.to_string()),
        message: format!("{code} (injected)"),
        resource: None,
        region: None,
    }
}

/// What a fake edge was asked, and the errors it is scripted to answer.
#[derive(Debug, Default)]
pub struct CallLog {
    /// Every call: (when, operation, detail).
    pub calls: Vec<(Instant, &'static str, String)>,
    /// Errors to answer, per operation, before answering normally.
    pub faults: BTreeMap<&'static str, VecDeque<AwsError>>,
}

impl CallLog {
    /// Records a call; the scripted error for it, if one is due.
    fn record(&mut self, op: &'static str, detail: String) -> Result<(), AwsError> {
        self.calls.push((Instant::now(), op, detail));
        match self.faults.get_mut(op).and_then(VecDeque::pop_front) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn fail_next(&mut self, op: &'static str, code: &str, n: usize) {
        let q = self.faults.entry(op).or_default();
        for _ in 0..n {
            q.push_back(aws_error(op, code));
        }
    }

    fn of(&self, op: &str) -> Vec<(Instant, String)> {
        self.calls
            .iter()
            .filter(|c| c.1 == op)
            .map(|c| (c.0, c.2.clone()))
            .collect()
    }
}

/// One message of the in-memory queue.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: String,
    pub body: String,
    pub attributes: BTreeMap<String, crate::aws::Attr>,
    pub group_id: Option<String>,
    pub receive_count: u32,
    pub visible_at: Instant,
    /// The receipt handle of the current receive, if in flight.
    pub receipt: Option<String>,
    pub received_at: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct QueueState {
    pub messages: Vec<Stored>,
    /// The dead-letter queue.
    pub dead: Vec<Stored>,
    /// Ids of deleted messages, in order.
    pub deleted: Vec<String>,
    pub log: CallLog,
    /// Calls SQS itself rejected (stale handle, past the 12-hour cap...):
    /// (operation, error code).
    pub rejected: Vec<(&'static str, String)>,
    /// How long a `SendMessage` takes to answer (an SQS that is slow).
    pub send_latency: Option<Duration>,
    next: u64,
}

/// SQS in memory: visibility, receive counts, long polls, receipt handles
/// that go stale on the next receive, and the 12-hour cap.
#[derive(Default)]
pub struct MemQueue {
    pub state: Mutex<QueueState>,
    arrived: Notify,
    /// FIFO: a group with a message in flight delivers nothing; one receive
    /// returns a group's messages in order, several at once.
    fifo: bool,
    /// The redrive policy's maxReceiveCount: a message received this many
    /// times moves to the dead-letter queue instead of a new delivery.
    max_receives: Option<u32>,
}

impl MemQueue {
    pub fn new() -> Arc<MemQueue> {
        Arc::new(MemQueue::default())
    }

    /// A standard queue with a dead-letter queue after `max` receives.
    pub fn with_redrive(max: u32) -> Arc<MemQueue> {
        Arc::new(MemQueue {
            max_receives: Some(max),
            ..MemQueue::default()
        })
    }

    pub fn new_fifo() -> Arc<MemQueue> {
        Arc::new(MemQueue {
            fifo: true,
            ..MemQueue::default()
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, QueueState> {
        lock(&self.state)
    }

    /// Puts a message on the queue, visible now; returns its id.
    pub fn push(&self, body: &str) -> String {
        self.push_group(body, None)
    }

    pub fn push_group(&self, body: &str, group: Option<&str>) -> String {
        let mut st = self.lock();
        st.next += 1;
        let id = format!("m{}", st.next);
        st.messages.push(Stored {
            id: id.clone(),
            body: body.to_string(),
            attributes: BTreeMap::new(),
            group_id: group.map(str::to_string),
            receive_count: 0,
            visible_at: Instant::now(),
            receipt: None,
            received_at: None,
        });
        drop(st);
        self.arrived.notify_waiters();
        id
    }

    /// The next `n` calls of `op` fail with `code`.
    pub fn fail_next(&self, op: &'static str, code: &str, n: usize) {
        self.lock().log.fail_next(op, code, n);
    }

    /// Calls of `op`, with their times.
    pub fn calls(&self, op: &str) -> Vec<(Instant, String)> {
        self.lock().log.of(op)
    }

    /// (visible, in flight) now.
    pub fn depth(&self) -> (usize, usize) {
        let now = Instant::now();
        let st = self.lock();
        let visible = st.messages.iter().filter(|m| m.visible_at <= now).count();
        (visible, st.messages.len() - visible)
    }

    pub fn deleted(&self) -> Vec<String> {
        self.lock().deleted.clone()
    }

    fn begin(&self, op: &'static str, detail: String) -> Result<(), AwsError> {
        self.lock().log.record(op, detail)
    }

    fn take_visible(&self, max: usize, visibility: Duration) -> Vec<Message> {
        let now = Instant::now();
        let mut st = self.lock();
        if let Some(limit) = self.max_receives {
            // Redrive: visible messages already received `limit` times.
            let (dead, keep): (Vec<Stored>, Vec<Stored>) = std::mem::take(&mut st.messages)
                .into_iter()
                .partition(|m| m.visible_at <= now && m.receive_count >= limit);
            st.messages = keep;
            st.dead.extend(dead);
        }
        let mut out = Vec::new();
        let mut next = st.next;
        // FIFO: groups with a message in flight are locked.
        let mut locked: std::collections::BTreeSet<String> = if self.fifo {
            st.messages
                .iter()
                .filter(|m| m.visible_at > now)
                .filter_map(|m| m.group_id.clone())
                .collect()
        } else {
            Default::default()
        };
        for m in st.messages.iter_mut() {
            if out.len() >= max {
                break;
            }
            if self.fifo {
                if let Some(g) = &m.group_id {
                    if locked.contains(g) {
                        continue;
                    }
                }
            }
            if m.visible_at > now {
                if let (true, Some(g)) = (self.fifo, &m.group_id) {
                    locked.insert(g.clone());
                }
                continue;
            }
            next += 1;
            let receipt = format!("{}#{next}", m.id);
            m.receive_count += 1;
            m.visible_at = now + visibility;
            m.receipt = Some(receipt.clone());
            m.received_at = Some(now);
            out.push(Message {
                id: m.id.clone(),
                receipt,
                body: m.body.clone(),
                receive_count: m.receive_count,
                first_received_ms: None,
                attributes: m.attributes.clone(),
                group_id: m.group_id.clone(),
                sender_id: None,
                sent_ms: None,
            });
        }
        st.next = next;
        out
    }

    fn find<'a>(st: &'a mut QueueState, receipt: &str) -> Option<&'a mut Stored> {
        st.messages
            .iter_mut()
            .find(|m| m.receipt.as_deref() == Some(receipt))
    }
}

impl Queue for MemQueue {
    async fn receive(
        &self,
        max: i32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Message>, AwsError> {
        {
            self.begin("ReceiveMessage", format!("max={max}"))?;
            let end = Instant::now() + wait;
            loop {
                let notified = self.arrived.notified();
                let got = self.take_visible(max.clamp(1, 10) as usize, visibility);
                if !got.is_empty() || Instant::now() >= end {
                    return Ok(got);
                }
                // Wake on a new message, when an in-flight one turns visible, or at the end.
                let next_visible = self
                    .lock()
                    .messages
                    .iter()
                    .map(|m| m.visible_at)
                    .filter(|t| *t > Instant::now())
                    .min()
                    .unwrap_or(end)
                    .min(end);
                tokio::select! {
                    biased;
                    _ = notified => {}
                    _ = tokio::time::sleep_until(next_visible) => {}
                }
            }
        }
    }

    fn delete(&self, receipt: &str) -> impl Future<Output = Result<(), AwsError>> + Send {
        let receipt = receipt.to_string();
        async move {
            const OP: &str = "DeleteMessage";
            self.begin(OP, receipt.clone())?;
            let mut st = self.lock();
            let Some(pos) = st
                .messages
                .iter()
                .position(|m| m.receipt.as_deref() == Some(receipt.as_str()))
            else {
                // AWS: with a receipt handle that is not the latest, the
                // request succeeds but the message is not deleted.
                st.rejected
                    .push((OP, "stale receipt handle (answered OK)".into()));
                return Ok(());
            };
            let m = st.messages.remove(pos);
            st.deleted.push(m.id);
            drop(st);
            // A FIFO group may be free again: long polls look again.
            self.arrived.notify_waiters();
            Ok(())
        }
    }

    fn set_visibility(
        &self,
        receipt: &str,
        secs: i32,
    ) -> impl Future<Output = Result<(), AwsError>> + Send {
        let receipt = receipt.to_string();
        async move {
            const OP: &str = "ChangeMessageVisibility";
            self.begin(OP, format!("{receipt} {secs}"))?;
            let now = Instant::now();
            let mut st = self.lock();
            let reject = |st: &mut QueueState, code: &str| {
                st.rejected.push((OP, code.to_string()));
                Err(aws_error(OP, code))
            };
            // As SQS answers (REFERENCE.md), not as moto does: a handle of
            // a message someone else received since, or deleted, is
            // InvalidParameterValue; an expired handle of a message nobody
            // received since is OK, and changes nothing.
            let Some((id, _)) = receipt.split_once('#') else {
                return reject(&mut st, "ReceiptHandleIsInvalid");
            };
            let id = id.to_string();
            let current = st
                .messages
                .iter()
                .find(|m| m.id == id)
                .map(|m| (m.receipt.clone(), m.visible_at));
            match current {
                Some((Some(r), visible_at)) if r == receipt && visible_at <= now => return Ok(()),
                Some((Some(r), _)) if r == receipt => {}
                _ => {
                    st.rejected.push((OP, "InvalidParameterValue".into()));
                    return Err(AwsError {
                        message: format!("Value {receipt} for parameter ReceiptHandle is invalid. Reason: Message does not exist or is not available for visibility timeout change."),
                        ..aws_error(OP, "InvalidParameterValue")
                    });
                }
            }
            let Some(m) = MemQueue::find(&mut st, &receipt) else {
                return reject(&mut st, "ReceiptHandleIsInvalid");
            };
            let until = now + Duration::from_secs(secs.max(0) as u64);
            if m.received_at.is_some_and(|r| until > r + MAX_INVISIBLE) {
                return reject(&mut st, "InvalidParameterValue");
            }
            m.visible_at = until;
            if secs == 0 {
                m.receipt = None;
                drop(st);
                self.arrived.notify_waiters();
            }
            Ok(())
        }
    }

    fn send(&self, msg: &Outgoing) -> impl Future<Output = Result<String, AwsError>> + Send {
        let msg = msg.clone();
        let latency = self.lock().send_latency;
        async move {
            if let Some(d) = latency {
                tokio::time::sleep(d).await;
            }
            self.begin("SendMessage", msg.body.clone())?;
            let id = self.push_group(&msg.body, msg.group_id.as_deref());
            if let Some(m) = self.lock().messages.iter_mut().find(|m| m.id == id) {
                m.attributes = msg.attributes;
            }
            Ok(id)
        }
    }
}

#[derive(Debug)]
pub struct FleetState {
    /// The instance's group; `None`: in no group.
    pub group: Option<String>,
    pub min: i32,
    pub desired: i32,
    pub protected: bool,
    pub terminated: bool,
    pub lifecycle_completed: bool,
    /// `SetInstanceHealth Unhealthy` was called.
    pub unhealthy: bool,
    /// What `DescribeAutoScalingInstances` says of the instance's state,
    /// if not the default (InService, or Terminating:Wait once terminated).
    pub state_override: Option<String>,
    /// `CompleteLifecycleAction` fails with ValidationError (no action waits).
    pub no_lifecycle_action: bool,
    /// The group's `spotguard:intake` tag reads `closed`.
    pub intake_closed: bool,
    /// InService instances of the group beside this one (for the surplus
    /// over desired that `intake` reports).
    pub others_in_service: i32,
    pub log: CallLog,
}

impl FleetState {
    /// The instance's lifecycle state as `DescribeAutoScalingInstances`
    /// reports it: the override, else Terminating:Wait once terminated,
    /// else InService.
    fn lifecycle_state(&self) -> String {
        match (&self.state_override, self.terminated) {
            (Some(s), _) => s.clone(),
            (None, true) => "Terminating:Wait".to_string(),
            (None, false) => "InService".to_string(),
        }
    }
}

/// One instance's view of its Auto Scaling group.
pub struct MemFleet {
    pub state: Mutex<FleetState>,
}

impl MemFleet {
    /// The instance in group `g` of `desired` instances with MinSize `min`.
    pub fn new(group: Option<&str>, min: i32, desired: i32) -> Arc<MemFleet> {
        Arc::new(MemFleet {
            state: Mutex::new(FleetState {
                group: group.map(str::to_string),
                min,
                desired,
                protected: false,
                terminated: false,
                lifecycle_completed: false,
                unhealthy: false,
                state_override: None,
                no_lifecycle_action: false,
                intake_closed: false,
                others_in_service: 0,
                log: CallLog::default(),
            }),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, FleetState> {
        lock(&self.state)
    }

    pub fn fail_next(&self, op: &'static str, code: &str, n: usize) {
        self.lock().log.fail_next(op, code, n);
    }

    pub fn calls(&self, op: &str) -> Vec<(Instant, String)> {
        self.lock().log.of(op)
    }

    fn begin(
        &self,
        op: &'static str,
        detail: String,
    ) -> Result<MutexGuard<'_, FleetState>, AwsError> {
        let mut st = self.lock();
        st.log.record(op, detail)?;
        Ok(st)
    }
}

/// AWS's answer when desired capacity already equals MinSize (REFERENCE.md).
pub const MIN_SIZE_REFUSAL: &str = "Currently, desiredSize equals minSize (1). Terminating instance without replacement will violate group's min size constraint. Either set shouldDecrementDesiredCapacity flag to false or lower group's min size.";

impl Fleet for MemFleet {
    fn mark_alive(
        &self,
        instance: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send {
        let r = self
            .begin("CreateTags", format!("{instance} {value}"))
            .map(|_| ());
        async move { r }
    }

    fn intake(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<crate::aws::Intake, AwsError>> + Send {
        let r = self
            .begin("DescribeAutoScalingGroups", group.to_string())
            .map(|st| crate::aws::Intake {
                closed: st.intake_closed,
                surplus: st.others_in_service + i32::from(!st.terminated) > st.desired,
            });
        async move { r }
    }

    fn group_of(
        &self,
        instance: &str,
    ) -> impl Future<Output = Result<Option<String>, AwsError>> + Send {
        let r = self
            .begin("DescribeAutoScalingInstances", instance.to_string())
            .map(|st| st.group.clone());
        async move { r }
    }

    /// As AWS: with the decrement, refused at MinSize; without it, the
    /// desired capacity is kept (the detail logged says which).
    fn terminate_self(
        &self,
        instance: &str,
        decrement: bool,
    ) -> impl Future<Output = Result<ScaleIn, AwsError>> + Send {
        let r = self
            .begin(
                "TerminateInstanceInAutoScalingGroup",
                format!("{instance} decrement={decrement}"),
            )
            .and_then(|mut st| {
                if st.group.is_none() {
                    // As AWS answers for an instance in no group (text as
                    // reported in public threads): not the MinSize refusal.
                    return Err(AwsError {
                        message: format!("Instance Id not found - No managed instance found for instance ID: {instance}"),
                        ..aws_error("TerminateInstanceInAutoScalingGroup", "ValidationError")
                    });
                }
                Ok(if !decrement {
                    st.terminated = true;
                    ScaleIn::Accepted
                } else if st.desired <= st.min {
                    ScaleIn::Refused(MIN_SIZE_REFUSAL.to_string())
                } else {
                    st.desired -= 1;
                    st.terminated = true;
                    ScaleIn::Accepted
                })
            });
        async move { r }
    }

    fn lifecycle_state(
        &self,
        instance: &str,
    ) -> impl Future<Output = Result<Option<String>, AwsError>> + Send {
        let r = self
            .begin("DescribeAutoScalingInstances", instance.to_string())
            .map(|st| st.group.as_ref().map(|_| st.lifecycle_state()));
        async move { r }
    }

    fn set_protection(
        &self,
        _group: &str,
        instance: &str,
        protect: bool,
    ) -> impl Future<Output = Result<(), AwsError>> + Send {
        let r = self
            .begin("SetInstanceProtection", format!("{instance} {protect}"))
            .and_then(|mut st| {
                // As AWS: only an instance in service (or standby) takes it.
                if !matches!(
                    st.lifecycle_state().as_str(),
                    "InService" | "EnteringStandby" | "Standby"
                ) {
                    return Err(AwsError {
                        message: format!("The instance {instance} is not in InService or EnteringStandby or Standby."),
                        ..aws_error("SetInstanceProtection", "ValidationError")
                    });
                }
                st.protected = protect;
                Ok(())
            });
        async move { r }
    }

    fn mark_unhealthy(&self, instance: &str) -> impl Future<Output = Result<(), AwsError>> + Send {
        let r = self
            .begin("SetInstanceHealth", instance.to_string())
            .map(|mut st| st.unhealthy = true);
        async move { r }
    }

    fn lifecycle_heartbeat(
        &self,
        _group: &str,
        hook: &str,
        instance: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send {
        let r = self
            .begin(
                "RecordLifecycleActionHeartbeat",
                format!("{hook} {instance}"),
            )
            .map(|_| ());
        async move { r }
    }

    fn complete_lifecycle(
        &self,
        _group: &str,
        hook: &str,
        instance: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send {
        let r = self
            .begin("CompleteLifecycleAction", format!("{hook} {instance}"))
            .and_then(|mut st| {
                if st.no_lifecycle_action {
                    return Err(aws_error("CompleteLifecycleAction", "ValidationError"));
                }
                st.lifecycle_completed = true;
                Ok(())
            });
        async move { r }
    }
}

/// What a scripted job does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    /// How long it runs before it ends by itself.
    pub runs_for: Duration,
    /// How it ends by itself.
    pub outcome: Outcome,
}

/// A worker whose jobs are scripted by their body: `"<seconds>"` runs that
/// long and succeeds, `"<seconds> fail"` runs that long and fails,
/// `"<seconds> nostart"` cannot start (a missing program), `"<seconds>
/// ckpt"` leaves a checkpoint reference when stopped. Anything else
/// succeeds at once. Every start and end is logged with its time.
#[derive(Default)]
pub struct ScriptedWorker {
    /// (when, message id, "start" | "end", detail)
    pub log: Mutex<Vec<(Instant, String, &'static str, String)>>,
    /// Notices seen by running jobs.
    pub notices: Mutex<Vec<(String, JobNotice)>>,
    /// Why no job can run (a missing program), when set.
    pub unready: Mutex<Option<String>>,
    /// A job process that SIGKILL did not end, when set.
    pub stuck: Mutex<Option<String>>,
}

impl ScriptedWorker {
    pub fn new() -> Arc<ScriptedWorker> {
        Arc::new(ScriptedWorker::default())
    }

    pub fn script(body: &str) -> Script {
        let mut words = body.split_whitespace();
        let secs = words
            .next()
            .and_then(|w| w.parse::<u64>().ok())
            .unwrap_or(0);
        let outcome = match words.next() {
            Some("fail") => Outcome::Failed("exit status 1".into()),
            Some("nostart") => Outcome::NotStarted("No such file or directory (os error 2)".into()),
            _ => Outcome::Succeeded,
        };
        Script {
            runs_for: Duration::from_secs(secs),
            outcome,
        }
    }

    /// Ids of started jobs, in order.
    pub fn started(&self) -> Vec<String> {
        lock(&self.log)
            .iter()
            .filter(|e| e.2 == "start")
            .map(|e| e.1.clone())
            .collect()
    }

    pub fn events(&self) -> Vec<(Instant, String, &'static str, String)> {
        lock(&self.log).clone()
    }
}

impl Worker for ScriptedWorker {
    fn state_dir(&self) -> Option<&Path> {
        None
    }

    fn stuck(&self) -> Option<String> {
        lock(&self.stuck).clone()
    }

    fn ready(&self) -> Result<(), String> {
        match lock(&self.unready).clone() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    fn run(
        &self,
        msg: &Message,
        _files: Option<&JobFiles>,
        mut notices: watch::Receiver<Option<JobNotice>>,
        stop: impl Future<Output = StopReason> + Send,
    ) -> impl Future<Output = Ended> + Send {
        let script = Self::script(&msg.body);
        let ckpt = msg.body.split_whitespace().any(|w| w == "ckpt");
        let id = msg.id.clone();
        async move {
            if let Outcome::NotStarted(_) = script.outcome {
                lock(&self.log).push((Instant::now(), id, "nostart", String::new()));
                return Ended {
                    outcome: script.outcome,
                    checkpoint: None,
                };
            }
            lock(&self.log).push((Instant::now(), id.clone(), "start", String::new()));
            let work = tokio::time::sleep(script.runs_for);
            tokio::pin!(work, stop);
            let outcome = loop {
                tokio::select! {
                    biased;
                    _ = &mut work => break script.outcome.clone(),
                    r = &mut stop => break Outcome::Stopped(r),
                    c = notices.changed() => {
                        if c.is_ok() {
                            if let Some(n) = notices.borrow_and_update().clone() {
                                lock(&self.notices).push((id.clone(), n));
                            }
                        } else {
                            // The loop has gone: only the job's own end remains.
                            (&mut work).await;
                            break script.outcome.clone();
                        }
                    }
                }
            };
            lock(&self.log).push((Instant::now(), id.clone(), "end", format!("{outcome:?}")));
            let checkpoint =
                (matches!(outcome, Outcome::Stopped(_)) && ckpt).then(|| format!("ckpt-of-{id}"));
            Ended {
                outcome,
                checkpoint,
            }
        }
    }
}
