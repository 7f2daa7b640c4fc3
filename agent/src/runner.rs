//! The agent's event loop: intake from SQS, jobs, notices, drains and scale-in.
//!
//! Decisions are made by the pure functions of [`crate::state`]; this module
//! only carries them out. Every AWS call runs in its own task and reports back
//! on one channel, so the loop never blocks: a notice is acted on while a long
//! poll, a job or a slow AWS call is in progress.
//!
//! Intake: at most one `ReceiveMessage` is outstanding, asking for no more
//! messages than there are free job slots. When intake closes, that receive
//! is abandoned (not waited for); whatever it still returns is handed back
//! unstarted with visibility 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::aws::{AwsError, Fleet, Message, Queue, ScaleIn};
use crate::config::Config;
use crate::job::{hand_back_unstarted, run_job, JobCtx, JobReport, Settled};
use crate::notify::Notifier;
use crate::state::{self, DrainReason, Mode, Notice, Policy};
use crate::status::{inc, Status};
use crate::watch::{Detected, WatchEvent};
use crate::worker::{JobNotice, WorkerSpec};

/// Wait after a failed housekeeping call (group lookup, protection, lifecycle
/// completion) before it is tried again: long enough not to hammer a
/// throttled API, short against a 30 s idle timeout or a lifecycle timeout.
const CALL_RETRY: Duration = Duration::from_secs(5);

/// Receive failures back off 1, 2, 4 ... s up to this (a long poll's length).
const MAX_RECEIVE_BACKOFF: Duration = Duration::from_secs(20);

enum Effect {
    Received(Result<Vec<Message>, AwsError>),
    HandedBack { asked: usize, done: usize },
    ScaleIn(Result<ScaleIn, AwsError>),
    Protection(bool, Result<(), AwsError>),
    Group(Result<Option<String>, AwsError>),
    LifecycleCompleted(Result<(), AwsError>),
}

pub struct Runner<Q, F> {
    pub cfg: Arc<Config>,
    pub queue: Arc<Q>,
    pub fleet: Arc<F>,
    pub notifier: Notifier,
    pub status: Arc<Status>,
    pub instance_id: String,
    pub spec: WorkerSpec,
}

/// What the loop tells running jobs: the drain deadline and the notice.
struct Chans {
    deadline_tx: watch::Sender<Option<Instant>>,
    deadline_rx: watch::Receiver<Option<Instant>>,
    notice_tx: watch::Sender<Option<JobNotice>>,
    notice_rx: watch::Receiver<Option<JobNotice>>,
}

/// Loop state that is not the mode.
struct Loop {
    mode: Mode,
    jobs: JoinSet<JobReport>,
    receiving: bool,
    receive_failures: u32,
    receive_not_before: Instant,
    last_activity: Instant,
    scale_in_not_before: Instant,
    refusals: u32,
    protected: bool,
    protection_in_flight: bool,
    protection_not_before: Instant,
    group: Option<String>,
    not_in_group: bool,
    group_in_flight: bool,
    group_not_before: Instant,
    lifecycle_completed: bool,
    lifecycle_in_flight: bool,
    lifecycle_not_before: Instant,
    next_hook_heartbeat: Instant,
    handbacks_in_flight: usize,
    drain_complete_logged: bool,
    deadline: Option<Instant>,
    /// The last spot notice (action, time), for what running jobs are told.
    spot: Option<(Option<String>, DateTime<Utc>)>,
}

fn instant_of(t: DateTime<Utc>) -> Instant {
    let now = Instant::now();
    match (t - Utc::now()).to_std() {
        Ok(d) => now + d,
        Err(_) => now, // in the past
    }
}

impl<Q: Queue, F: Fleet> Runner<Q, F> {
    fn policy(&self) -> Policy {
        Policy {
            deadline_margin: self.cfg.interruption.deadline_margin.0,
            rebalance: self.cfg.interruption.rebalance,
            shutdown_deadline: self.cfg.interruption.shutdown_deadline.0,
        }
    }

    fn needs_group(&self) -> bool {
        self.cfg.scale_in.protect_busy || self.cfg.interruption.lifecycle_hook.is_some()
    }

    /// Runs until a shutdown drain completes. `shutdown` is SIGTERM/SIGINT.
    pub async fn run(
        self,
        mut notices: mpsc::Receiver<Detected>,
        shutdown: impl Future<Output = ()>,
    ) {
        let now = Instant::now();
        let mut st = Loop {
            mode: Mode::Running,
            jobs: JoinSet::new(),
            receiving: false,
            receive_failures: 0,
            receive_not_before: now,
            last_activity: now,
            scale_in_not_before: now,
            refusals: 0,
            protected: false,
            protection_in_flight: false,
            protection_not_before: now,
            group: None,
            not_in_group: false,
            group_in_flight: false,
            group_not_before: now,
            lifecycle_completed: false,
            lifecycle_in_flight: false,
            lifecycle_not_before: now,
            next_hook_heartbeat: now,
            handbacks_in_flight: 0,
            drain_complete_logged: false,
            deadline: None,
            spot: None,
        };
        let (effects_tx, mut effects) = mpsc::unbounded_channel();
        let (deadline_tx, deadline_rx) = watch::channel(None::<Instant>);
        let (notice_tx, notice_rx) = watch::channel(None::<JobNotice>);
        let ctx = Arc::new(JobCtx {
            queue: self.queue.clone(),
            spec: self.spec.clone(),
            visibility: self.cfg.queue.visibility_timeout.0,
            heartbeat: self.cfg.heartbeat_interval(),
            error_visibility: self.cfg.queue.error_visibility_timeout.0,
            timeout: self.cfg.worker.timeout.map(|d| d.0),
            checkpoint_max: self.cfg.worker.checkpoint_max_bytes,
            fifo: self.cfg.queue.url.trim_end_matches('/').ends_with(".fifo"),
        });
        let chans = Chans {
            deadline_tx,
            deadline_rx,
            notice_tx,
            notice_rx,
        };
        tokio::pin!(shutdown);
        let mut shutdown_seen = false;
        let mut notices_open = true;
        tracing::info!(instance_id = %self.instance_id, queue = %self.cfg.queue.url, "agent running");
        loop {
            if self.housekeeping(&mut st, &effects_tx) {
                tracing::info!("drain complete; exiting");
                return;
            }
            self.status.set(&st.mode, st.jobs.len());
            let wake = self.next_wake(&st);
            tokio::select! {
                biased;
                _ = &mut shutdown, if !shutdown_seen => {
                    shutdown_seen = true;
                    self.apply(&mut st, Notice::Shutdown, &chans);
                }
                d = notices.recv(), if notices_open => match d {
                    Some(d) => self.on_detected(&mut st, d, &chans),
                    None => {
                        notices_open = false;
                        tracing::error!("the IMDS watcher stopped; no more notices will be seen");
                    }
                },
                Some(e) = effects.recv() => self.on_effect(&mut st, e, &effects_tx, &ctx, &chans),
                Some(r) = st.jobs.join_next(), if !st.jobs.is_empty() => {
                    st.last_activity = Instant::now();
                    match r {
                        Ok(report) => self.on_report(&report),
                        Err(e) => {
                            // A job task panicked: its message returns when its
                            // visibility lapses (the heartbeat died with it).
                            inc(&self.status.counters.settle_errors);
                            tracing::error!(error = %e, "job task failed");
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn next_wake(&self, st: &Loop) -> Instant {
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(1);
        let mut consider = |t: Instant| {
            if t > now && t < wake {
                wake = t;
            }
        };
        consider(st.last_activity + self.cfg.scale_in.idle_timeout.0);
        consider(st.scale_in_not_before);
        consider(st.receive_not_before);
        consider(st.next_hook_heartbeat);
        if let Some(d) = st.deadline {
            consider(d);
        }
        wake
    }

    fn on_detected(&self, st: &mut Loop, d: Detected, chans: &Chans) {
        let c = &self.status.counters;
        let notice = match &d.event {
            WatchEvent::SpotInterruption { time, action, .. } => {
                inc(&c.notices_spot);
                st.spot = Some((action.as_ref().map(|a| a.to_string()), *time));
                Some(Notice::Spot { time: *time })
            }
            WatchEvent::RebalanceRecommendation { .. } => {
                inc(&c.notices_rebalance);
                Some(Notice::Rebalance)
            }
            WatchEvent::LifecycleState {
                terminating: true, ..
            } => {
                inc(&c.notices_lifecycle);
                Some(Notice::LifecycleTerminated)
            }
            WatchEvent::LifecycleState { .. } => None,
            WatchEvent::ScheduledEvent { .. } => {
                inc(&c.notices_scheduled);
                None
            }
        };
        let subject = match &d.event {
            WatchEvent::SpotInterruption { .. } => "spotguard: spot interruption",
            WatchEvent::RebalanceRecommendation { .. } => "spotguard: rebalance recommendation",
            WatchEvent::LifecycleState { .. } => "spotguard: lifecycle state",
            WatchEvent::ScheduledEvent { .. } => "spotguard: scheduled event",
        };
        let relevant = notice.is_some() || matches!(d.event, WatchEvent::ScheduledEvent { .. });
        if let Some(n) = notice {
            self.apply(st, n, chans);
        }
        if relevant {
            let mut event = serde_json::to_value(&d).unwrap_or_else(|_| json!({}));
            if let Some(obj) = event.as_object_mut() {
                obj.insert("instance_id".into(), json!(self.instance_id));
                obj.insert("agent_mode".into(), json!(st.mode.name()));
                obj.insert("jobs_in_flight".into(), json!(st.jobs.len()));
            }
            self.notifier.notify(subject, event);
        }
    }

    fn apply(&self, st: &mut Loop, notice: Notice, chans: &Chans) {
        let before = st.mode.clone();
        st.mode = state::on_notice(&st.mode, &notice, &self.policy(), Utc::now());
        if st.mode == before {
            return;
        }
        tracing::info!(
            ?notice,
            from = before.name(),
            to = st.mode.name(),
            "state change"
        );
        if before.drain().is_none() && st.mode.drain().is_some() {
            inc(&self.status.counters.drains);
            tracing::info!(jobs = st.jobs.len(), deadline = ?st.mode.drain().and_then(|d| d.deadline), "drain started: intake stopped");
        }
        let deadline = st.mode.drain().and_then(|d| d.deadline).map(instant_of);
        if deadline != st.deadline {
            st.deadline = deadline;
            chans.deadline_tx.send_replace(deadline);
        }
        // Every drain (spot, lifecycle, SIGTERM, rebalance in drain mode) is
        // told to the running jobs, again whenever its deadline changes.
        if let Some(drain) = st.mode.drain() {
            let kind = match notice {
                Notice::Spot { .. } => "spot_interruption",
                Notice::Rebalance => "rebalance_recommendation",
                Notice::LifecycleTerminated => "lifecycle_terminated",
                Notice::Shutdown => "shutdown",
            };
            let spot = drain
                .has(DrainReason::SpotInterruption)
                .then(|| st.spot.clone())
                .flatten();
            chans.notice_tx.send_replace(Some(JobNotice {
                kind,
                action: spot.as_ref().and_then(|s| s.0.clone()),
                notice_time: spot.map(|s| s.1),
                deadline: drain.deadline,
            }));
        }
    }

    fn on_report(&self, r: &JobReport) {
        let c = &self.status.counters;
        inc(match r.settled {
            Settled::Deleted => &c.jobs_succeeded,
            Settled::Failed => &c.jobs_failed,
            Settled::TimedOut => &c.jobs_timed_out,
            Settled::HandedBack => &c.jobs_handed_back,
            Settled::HandedOver => &c.jobs_handed_over,
            Settled::SettleFailed => &c.settle_errors,
        });
    }

    fn on_effect(
        &self,
        st: &mut Loop,
        e: Effect,
        tx: &mpsc::UnboundedSender<Effect>,
        ctx: &Arc<JobCtx<Q>>,
        chans: &Chans,
    ) {
        let now = Instant::now();
        let c = &self.status.counters;
        match e {
            Effect::Received(Ok(msgs)) => {
                st.receiving = false;
                st.receive_failures = 0;
                if msgs.is_empty() {
                    return;
                }
                st.last_activity = now;
                for _ in &msgs {
                    inc(&c.messages_received);
                }
                let (mode, run) = state::on_late_messages(&st.mode);
                if mode != st.mode {
                    tracing::info!(
                        from = st.mode.name(),
                        to = mode.name(),
                        "messages arrived; back to work"
                    );
                    st.mode = mode;
                }
                if run {
                    for m in msgs {
                        tracing::info!(message_id = %m.id, receive_count = m.receive_count, "job started");
                        st.jobs.spawn(run_job(
                            ctx.clone(),
                            m,
                            chans.deadline_rx.clone(),
                            chans.notice_rx.clone(),
                        ));
                    }
                } else {
                    tracing::info!(
                        count = msgs.len(),
                        "intake closed: handing back messages unstarted"
                    );
                    st.handbacks_in_flight += 1;
                    let queue = self.queue.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let done = hand_back_unstarted(queue.as_ref(), &msgs).await;
                        let _ = tx.send(Effect::HandedBack {
                            asked: msgs.len(),
                            done,
                        });
                    });
                }
            }
            Effect::Received(Err(e)) => {
                st.receiving = false;
                st.receive_failures += 1;
                inc(&c.receive_errors);
                let backoff = (Duration::from_secs(1) * 2u32.pow(st.receive_failures.min(5) - 1))
                    .min(MAX_RECEIVE_BACKOFF);
                st.receive_not_before = now + backoff;
                tracing::warn!(error = %e, ?backoff, "receive failed");
            }
            Effect::HandedBack { asked, done } => {
                st.handbacks_in_flight -= 1;
                for _ in 0..done {
                    inc(&c.messages_returned_unstarted);
                }
                for _ in done..asked {
                    inc(&c.settle_errors);
                }
            }
            Effect::ScaleIn(r) => {
                let accepted = match r {
                    Ok(ScaleIn::Accepted) => {
                        tracing::info!(
                            "the group accepted our termination (desired capacity decremented)"
                        );
                        true
                    }
                    Ok(ScaleIn::Refused(why)) => {
                        inc(&c.scale_in_refusals);
                        tracing::info!(reason = %why, "the group refused to scale in; resuming work");
                        false
                    }
                    Err(e) => {
                        inc(&c.aws_errors);
                        tracing::warn!(error = %e, "scale-in request failed; resuming work");
                        false
                    }
                };
                if !accepted {
                    st.refusals += 1;
                    let wait =
                        state::scale_in_backoff(self.cfg.scale_in.retry_interval.0, st.refusals);
                    st.scale_in_not_before = now + wait;
                    tracing::info!(?wait, "next scale-in attempt not before");
                } else {
                    st.refusals = 0;
                }
                st.mode = state::on_scale_in_result(&st.mode, accepted);
            }
            Effect::Protection(want, r) => {
                st.protection_in_flight = false;
                match r {
                    Ok(()) => {
                        st.protected = want;
                        tracing::info!(protected = want, "scale-in protection set");
                    }
                    Err(e) => {
                        inc(&c.aws_errors);
                        st.protection_not_before = now + CALL_RETRY;
                        tracing::warn!(error = %e, "cannot set scale-in protection");
                    }
                }
            }
            Effect::Group(r) => {
                st.group_in_flight = false;
                match r {
                    Ok(Some(g)) => {
                        tracing::info!(group = %g, "Auto Scaling group found");
                        st.group = Some(g);
                    }
                    Ok(None) => {
                        st.not_in_group = true;
                        tracing::warn!("this instance is in no Auto Scaling group: no protection, no lifecycle hook");
                    }
                    Err(e) => {
                        inc(&c.aws_errors);
                        st.group_not_before = now + CALL_RETRY;
                        tracing::warn!(error = %e, "cannot find this instance's Auto Scaling group");
                    }
                }
            }
            Effect::LifecycleCompleted(r) => {
                st.lifecycle_in_flight = false;
                match r {
                    Ok(()) => {
                        st.lifecycle_completed = true;
                        tracing::info!("lifecycle action completed (CONTINUE)");
                    }
                    Err(e) => {
                        inc(&c.aws_errors);
                        st.lifecycle_not_before = now + CALL_RETRY;
                        tracing::warn!(error = %e, "cannot complete the lifecycle action");
                    }
                }
            }
        }
    }

    /// Starts whatever is due. Returns true when the agent should exit.
    fn housekeeping(&self, st: &mut Loop, tx: &mpsc::UnboundedSender<Effect>) -> bool {
        let now = Instant::now();
        let c = &self.status.counters;
        let concurrency = self.cfg.worker.concurrency as usize;

        // Intake.
        if st.mode.intake_open()
            && !st.receiving
            && st.jobs.len() < concurrency
            && now >= st.receive_not_before
        {
            st.receiving = true;
            let max = (concurrency - st.jobs.len()).min(10) as i32;
            let (queue, tx) = (self.queue.clone(), tx.clone());
            let (wait, vis) = (
                self.cfg.queue.wait_time.0,
                self.cfg.queue.visibility_timeout.0,
            );
            tokio::spawn(async move {
                let _ = tx.send(Effect::Received(queue.receive(max, wait, vis).await));
            });
        }

        // The group, for protection and the lifecycle hook.
        if self.needs_group()
            && st.group.is_none()
            && !st.not_in_group
            && !st.group_in_flight
            && now >= st.group_not_before
        {
            st.group_in_flight = true;
            let (fleet, tx, id) = (self.fleet.clone(), tx.clone(), self.instance_id.clone());
            tokio::spawn(async move {
                let _ = tx.send(Effect::Group(fleet.group_of(&id).await));
            });
        }

        // Scale-in protection, one call per busy/idle transition.
        if self.cfg.scale_in.protect_busy
            && !st.protection_in_flight
            && now >= st.protection_not_before
        {
            let busy = !st.jobs.is_empty();
            if let (true, Some(group)) = (busy != st.protected, st.group.clone()) {
                st.protection_in_flight = true;
                let (fleet, tx, id) = (self.fleet.clone(), tx.clone(), self.instance_id.clone());
                tokio::spawn(async move {
                    let r = fleet.set_protection(&group, &id, busy).await;
                    let _ = tx.send(Effect::Protection(busy, r));
                });
            }
        }

        // Idle scale-in.
        if self.cfg.scale_in.enabled
            && st.jobs.is_empty()
            && now >= st.scale_in_not_before
            && now.duration_since(st.last_activity) >= self.cfg.scale_in.idle_timeout.0
        {
            if let Some(m) = state::on_idle(&st.mode) {
                tracing::info!(idle_for = ?now.duration_since(st.last_activity), "idle: intake stopped, scaling in");
                st.mode = m;
            }
        }
        if !st.receiving && st.jobs.is_empty() {
            if let Some(m) = state::ready_to_request(&st.mode) {
                st.mode = m;
                inc(&c.scale_in_requests);
                let (fleet, tx, id) = (self.fleet.clone(), tx.clone(), self.instance_id.clone());
                tokio::spawn(async move {
                    let _ = tx.send(Effect::ScaleIn(fleet.terminate_self(&id).await));
                });
            }
        }

        // Drain.
        let Some(drain) = st.mode.drain().cloned() else {
            return false;
        };
        let hook = self.cfg.interruption.lifecycle_hook.clone();
        if let (Some(hook), Some(group), true) = (
            &hook,
            &st.group,
            drain.has(DrainReason::LifecycleTerminated),
        ) {
            if !st.jobs.is_empty() && now >= st.next_hook_heartbeat {
                st.next_hook_heartbeat = now + self.cfg.interruption.lifecycle_heartbeat_interval.0;
                let (fleet, id, hook, group) = (
                    self.fleet.clone(),
                    self.instance_id.clone(),
                    hook.clone(),
                    group.clone(),
                );
                let status = self.status.clone();
                tokio::spawn(async move {
                    match fleet.lifecycle_heartbeat(&group, &hook, &id).await {
                        Ok(()) => tracing::info!("lifecycle heartbeat sent"),
                        Err(e) => {
                            inc(&status.counters.aws_errors);
                            tracing::warn!(error = %e, "lifecycle heartbeat failed");
                        }
                    }
                });
            }
        }
        if !st.jobs.is_empty() {
            return false;
        }
        if !st.drain_complete_logged {
            st.drain_complete_logged = true;
            tracing::info!(reasons = ?drain.reasons, "no job left");
        }
        let after = state::after_drain(&drain, hook.is_some() && !st.not_in_group);
        if after.complete_lifecycle && !st.lifecycle_completed {
            if let (Some(hook), Some(group)) = (&hook, &st.group) {
                if !st.lifecycle_in_flight && now >= st.lifecycle_not_before {
                    st.lifecycle_in_flight = true;
                    let (fleet, tx, id, hook, group) = (
                        self.fleet.clone(),
                        tx.clone(),
                        self.instance_id.clone(),
                        hook.clone(),
                        group.clone(),
                    );
                    tokio::spawn(async move {
                        let _ = tx.send(Effect::LifecycleCompleted(
                            fleet.complete_lifecycle(&group, &hook, &id).await,
                        ));
                    });
                }
            }
        }
        if !after.exit {
            return false;
        }
        // Exit once nothing is left to settle, or at the deadline whatever
        // is still outstanding (a long poll's messages then return after
        // their visibility timeout).
        let past_deadline = st.deadline.is_some_and(|d| now >= d);
        let settled = !st.receiving
            && st.handbacks_in_flight == 0
            && (!after.complete_lifecycle || st.lifecycle_completed || st.not_in_group);
        settled || past_deadline
    }
}
