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
use spotguard_common::clock::Clock;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::aws::{AwsError, Fleet, Message, Queue, ScaleIn};
use crate::config::{Config, OnUnhealthy};
use crate::health::HealthCheck;
use crate::imds::TargetLifecycleState;
use crate::job::{hand_back_unstarted, run_job, JobCtx, JobReport, Settled};
use crate::notify::Notifier;
use crate::state::{self, DrainReason, Mode, Notice, Policy};
use crate::status::{inc, Status};
use crate::watch::{Detected, WatchEvent};
use crate::worker::{JobNotice, Worker};

/// Wait after a failed housekeeping call (group lookup, protection, lifecycle
/// completion or heartbeat, scale-in confirmation) before it is tried
/// again: long enough not to hammer a throttled API, short against a 30 s
/// idle timeout or the hook's 30 s minimum HeartbeatTimeout (REFERENCE.md).
pub const CALL_RETRY: Duration = Duration::from_secs(5);

/// Receive failures back off 1, 2, 4 ... s up to this (a long poll's length).
pub const MAX_RECEIVE_BACKOFF: Duration = Duration::from_secs(20);

/// A job that could not start pauses intake 5 s, doubling per failure in a
/// row up to 5 minutes: an app that is still starting gets its messages
/// soon, a broken instance does not burn the fleet's receive counts.
pub const START_FAILURE_PAUSE: Duration = Duration::from_secs(5);
pub const MAX_START_FAILURE_PAUSE: Duration = Duration::from_secs(300);

/// A busy instance re-asserts its scale-in protection this often: if the
/// controller released it (a gate held too long by protected instances),
/// a live agent takes it back.
///
/// It also paces the liveness mark, written with each assertion: the
/// controller's `failover.dead_after` (25 minutes) covers two refreshes.
pub const PROTECTION_REFRESH: Duration = Duration::from_secs(600);

/// A liveness mark that could not be written (throttled, EC2 impaired) is
/// written again this soon, with the protection, rather than in 10
/// minutes, then after twice as long each time (15, 30, 60 ... s, at most
/// 10 minutes): the controller's 25 minutes leave room for several tries.
/// 15 s: three retried attempts of one call take about 2 s, and EC2's
/// throttling refills within seconds.
pub const MARK_RETRY: Duration = Duration::from_secs(15);

/// When a liveness mark that failed `failures` times in a row is written
/// again: [`MARK_RETRY`], doubling, at most [`PROTECTION_REFRESH`].
pub fn mark_retry_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (MARK_RETRY * 2u32.pow(doublings)).min(PROTECTION_REFRESH)
}

/// EC2's and IAM's refusals: the liveness mark is not allowed.
fn is_denied(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException")
    )
}

/// The circuit breaker, once tripped, lets one job through after this long
/// (half-open): a downstream outage that made jobs fail may be over. One
/// more failure trips it again at once.
pub const BREAKER_COOLDOWN: Duration = Duration::from_secs(600);

/// An instance that `DescribeAutoScalingInstances` places in no group is
/// looked up again this often: a just-launched instance may not be listed
/// yet (Auto Scaling's Describe calls are eventually consistent), and one
/// empty answer must not turn off protection and the lifecycle hook for
/// the life of the process. A minute costs a standalone instance one
/// Describe call a minute.
pub const GROUP_LOOK_AGAIN: Duration = Duration::from_secs(60);

/// How often the worker's program is checked (a stat or a few): a program
/// removed mid-deploy costs at most one start failure in this time.
pub const WORKER_CHECK_EVERY: Duration = Duration::from_secs(10);

/// After an unclear scale-in answer, the instance's state is read this long
/// later, and again as long after a reading that says it stays: Describe
/// calls are eventually consistent, and a terminate that did apply can
/// show InService for seconds.
pub const CONFIRM_DELAY: Duration = Duration::from_secs(10);

enum Effect {
    Received(Result<Vec<Message>, AwsError>),
    HandedBack {
        asked: usize,
        done: usize,
    },
    ScaleIn(Result<ScaleIn, AwsError>),
    Confirmed(Result<Option<String>, AwsError>),
    /// Protection set (or not), and the liveness mark written with it.
    Protection(bool, Result<(), AwsError>, Option<Result<(), AwsError>>),
    Group(Result<Option<String>, AwsError>),
    Intake(Result<crate::aws::Intake, AwsError>),
    LifecycleCompleted(Result<(), AwsError>),
    HookHeartbeat(Result<(), AwsError>),
    Health(crate::health::Outcome),
    MarkedUnhealthy(Result<(), AwsError>),
}

pub struct Runner<Q, F, W> {
    pub cfg: Arc<Config>,
    pub queue: Arc<Q>,
    pub fleet: Arc<F>,
    pub worker: Arc<W>,
    pub clock: Arc<dyn Clock>,
    /// `health.command` and the GPU checks, if any.
    pub health: Option<Arc<dyn HealthCheck>>,
    pub notifier: Notifier,
    pub status: Arc<Status>,
    pub instance_id: String,
}

/// What the loop tells running jobs: the drain deadline and the notice.
struct Chans {
    deadline_tx: watch::Sender<Option<Instant>>,
    deadline_rx: watch::Receiver<Option<Instant>>,
    notice_tx: watch::Sender<Option<JobNotice>>,
    notice_rx: watch::Receiver<Option<JobNotice>>,
}

/// One kind of housekeeping call: at most one in flight, and after a
/// failure not again before `not_before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub in_flight: bool,
    pub not_before: Instant,
    /// Failures (or refusals) in a row.
    pub failures: u32,
}

impl Pending {
    pub fn new(now: Instant) -> Pending {
        Pending {
            in_flight: false,
            not_before: now,
            failures: 0,
        }
    }

    pub fn ready(&self, now: Instant) -> bool {
        !self.in_flight && now >= self.not_before
    }

    fn start(&mut self) {
        self.in_flight = true;
    }

    fn succeeded(&mut self) {
        self.in_flight = false;
        self.failures = 0;
    }

    /// Failed: the next try waits `backoff(failures)`.
    fn failed(&mut self, now: Instant, backoff: impl Fn(u32) -> Duration) {
        self.in_flight = false;
        self.failures += 1;
        self.not_before = now + backoff(self.failures);
    }
}

/// Receive failures: 1, 2, 4 ... s, capped.
pub fn receive_backoff(failures: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.pow(failures.clamp(1, 6) - 1)).min(MAX_RECEIVE_BACKOFF)
}

/// Start failures in a row: 5, 10, 20 ... s, capped.
pub fn start_failure_pause(failures: u32) -> Duration {
    (START_FAILURE_PAUSE * 2u32.pow(failures.clamp(1, 8) - 1)).min(MAX_START_FAILURE_PAUSE)
}

/// Everything the loop keeps besides its jobs and channels: plain data, so
/// that [`due`] is a pure function of it.
#[derive(Debug, Clone)]
pub struct Books {
    pub mode: Mode,
    pub receive: Pending,
    pub group_lookup: Pending,
    /// Reading the group's `spotguard:intake` tag; `not_before` is the
    /// next read.
    pub intake: Pending,
    /// The controller closed the group's intake (failing back): take no new
    /// work, scale in once the running jobs end.
    pub intake_closed: bool,
    /// The intake tag has been read once (or its read failed: an agent that
    /// cannot read it works rather than idles).
    pub intake_known: bool,
    /// The group runs more InService instances than its desired capacity
    /// (as last read with the intake tag): leave without the decrement.
    pub group_surplus: bool,
    pub protection: Pending,
    pub lifecycle: Pending,
    /// `not_before` after a refused scale-in; `failures` counts refusals.
    pub scale_in: Pending,
    /// Confirming the instance's state after an ambiguous scale-in answer.
    pub confirm: Pending,
    pub confirm_needed: bool,
    /// Readings in a row that list the instance as staying, after an
    /// unclear scale-in answer (two are needed).
    pub confirm_in_service: u32,
    /// `not_before` is the next heartbeat's time.
    pub hook_heartbeat: Pending,
    pub hook_heartbeats_sent: u32,
    /// Jobs that could not start in a row; `not_before` pauses intake.
    pub start_failures: Pending,
    pub group: Option<String>,
    pub not_in_group: bool,
    pub protected: bool,
    pub lifecycle_completed: bool,
    pub handbacks_in_flight: usize,
    pub last_activity: Instant,
    pub deadline: Option<Instant>,
    /// The last spot notice (action, time), for what running jobs are told.
    pub spot: Option<(Option<String>, DateTime<Utc>)>,
    pub drain_complete_logged: bool,
    /// Jobs that ended badly in a row (failed, timed out, not started).
    pub failures_in_a_row: u32,
    /// The messages that failed since the last success (at most the
    /// breaker's count, as the breaker trips there).
    pub failed_messages: Vec<String>,
    /// The circuit breaker tripped: why.
    pub broken: Option<String>,
    /// `health.command` fails: why. `None` also before its first answer.
    pub check_failing: Option<String>,
    /// The worker cannot run any job (exec mode: its program is missing or
    /// not executable): why. Checked before each receive, so no message's
    /// receive is spent finding out.
    pub worker_unready: Option<String>,
    /// When the worker was last checked.
    pub worker_checked: Option<Instant>,
    /// `health.command` has answered at least once (or there is none).
    pub check_known: bool,
    pub health_check: Pending,
    /// The first IMDS poll has answered.
    pub imds_ready: bool,
    /// The breaker lets one job through again at this time.
    pub broken_until: Option<Instant>,
    /// `health.on_unhealthy = "replace"`: mark the instance unhealthy once
    /// no job runs (not under a running job).
    pub replace_pending: bool,
    /// `SetInstanceHealth`: in flight, and its retries after a failure.
    pub mark: Pending,
    /// When protection was last set on (re-asserted while busy).
    pub protected_at: Option<Instant>,
    /// The liveness mark was refused (IAM): said once.
    pub mark_denied: bool,
    /// Liveness marks failed in a row (for the retry's backoff).
    pub mark_failures: u32,
    /// A resume after a pause is waiting for the jobs that ran across it.
    pub resume_pending: bool,
}

impl Books {
    pub fn new(now: Instant) -> Books {
        Books {
            mode: Mode::Running,
            receive: Pending::new(now),
            group_lookup: Pending::new(now),
            intake: Pending::new(now),
            intake_closed: false,
            intake_known: false,
            group_surplus: false,
            protection: Pending::new(now),
            lifecycle: Pending::new(now),
            scale_in: Pending::new(now),
            confirm: Pending::new(now),
            confirm_needed: false,
            confirm_in_service: 0,
            hook_heartbeat: Pending::new(now),
            hook_heartbeats_sent: 0,
            start_failures: Pending::new(now),
            group: None,
            not_in_group: false,
            protected: false,
            lifecycle_completed: false,
            handbacks_in_flight: 0,
            last_activity: now,
            deadline: None,
            spot: None,
            drain_complete_logged: false,
            failures_in_a_row: 0,
            failed_messages: Vec::new(),
            broken: None,
            check_failing: None,
            worker_unready: None,
            worker_checked: None,
            check_known: true,
            health_check: Pending::new(now),
            imds_ready: false,
            broken_until: None,
            replace_pending: false,
            mark: Pending::new(now),
            protected_at: None,
            mark_denied: false,
            mark_failures: 0,
            resume_pending: false,
        }
    }

    /// Why the instance is unhealthy, if it is.
    pub fn unhealthy(&self) -> Option<&str> {
        self.broken
            .as_deref()
            .or(self.check_failing.as_deref())
            .or(self.worker_unready.as_deref())
    }

    /// As [`Books::unhealthy`], but a tripped breaker past its cool-down
    /// lets a job through (half-open).
    pub fn unhealthy_now(&self, now: Instant) -> Option<&str> {
        let broken = self
            .broken
            .as_deref()
            .filter(|_| self.broken_until.is_none_or(|t| now < t));
        broken
            .or(self.check_failing.as_deref())
            .or(self.worker_unready.as_deref())
    }
}

/// The configuration [`due`] reads.
#[derive(Debug, Clone)]
pub struct Settings {
    pub concurrency: usize,
    pub idle_timeout: Duration,
    pub scale_in: bool,
    pub protect_busy: bool,
    /// A lifecycle hook is configured.
    pub hook: bool,
    /// `health.command` is configured.
    pub health_check: bool,
    /// A FIFO queue (its URL ends in `.fifo`).
    pub fifo: bool,
    /// Read the group's `spotguard:intake` tag this often (a fallback
    /// group's agents; `None`: never).
    pub follow_intake: Option<Duration>,
}

impl Settings {
    pub fn of(cfg: &Config) -> Settings {
        Settings {
            concurrency: cfg.worker.concurrency as usize,
            idle_timeout: cfg.scale_in.idle_timeout.0,
            scale_in: cfg.scale_in.enabled,
            protect_busy: cfg.scale_in.protect_busy,
            hook: cfg.interruption.lifecycle_hook.is_some(),
            health_check: cfg.health.command.is_some(),
            fifo: cfg.queue.url.trim_end_matches('/').ends_with(".fifo"),
            follow_intake: cfg
                .scale_in
                .follow_intake
                .unwrap_or(false)
                .then_some(cfg.scale_in.intake_check.0),
        }
    }
}

/// What is due now: the calls to start, the new mode, whether to exit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Due {
    /// The new mode, if it changes.
    pub mode: Option<Mode>,
    /// `ReceiveMessage` for at most this many messages.
    pub receive: Option<i32>,
    pub lookup_group: bool,
    /// Read the group's intake tag.
    pub read_intake: bool,
    /// `SetInstanceProtection` to this value.
    pub protect: Option<bool>,
    pub request_scale_in: bool,
    /// `DescribeAutoScalingInstances` after an ambiguous scale-in answer.
    pub confirm_state: bool,
    pub hook_heartbeat: bool,
    pub complete_lifecycle: bool,
    /// Run `health.command`.
    pub health_check: bool,
    /// `SetInstanceHealth Unhealthy` (no job runs).
    pub mark_unhealthy: bool,
    pub exit: bool,
}

/// The loop's housekeeping as a pure function of its books, the number of
/// running jobs, the settings and the time.
pub fn due(b: &Books, jobs: usize, s: &Settings, now: Instant) -> Due {
    let mut d = Due::default();
    let mut mode = b.mode.clone();
    // With intake closed by the controller (failing back), an instance with
    // no job is idle at once: nothing will come to it.
    let idle = jobs == 0
        && (now.saturating_duration_since(b.last_activity) >= s.idle_timeout || b.intake_closed);

    // In no group, nothing can take the instance away on advice: a
    // rebalance's stop (from before the group was found missing) ends.
    if b.not_in_group
        && (matches!(mode, Mode::IntakeStopped)
            || mode
                .drain()
                .is_some_and(|d| d.reasons == [DrainReason::Rebalance]))
    {
        mode = Mode::Running;
    }

    // Idle: stop intake and scale in (also after a rebalance drain).
    if s.scale_in && idle && !b.not_in_group && b.scale_in.ready(now) {
        if let Some(m) = state::on_idle(&mode) {
            mode = m;
        }
    }

    // Intake: one receive at a time, for the free slots, unless paused.
    let mut receiving = b.receive.in_flight;
    if mode.intake_open()
        && !b.intake_closed
        && (s.follow_intake.is_none()
            || b.intake_known
            || b.not_in_group
            || b.group_lookup.failures > 0)
        && !receiving
        && jobs < s.concurrency
        && b.receive.ready(now)
        && now >= b.start_failures.not_before
        && b.check_known
        && b.imds_ready
        && b.unhealthy_now(now).is_none()
        // Half-open (the breaker past its cool-down): one job, alone.
        && (b.broken.is_none() || jobs == 0)
    {
        // FIFO: one message per receive. A receive returns several messages
        // of a group; running them in parallel breaks the order, and handing
        // the later ones back would add a receive to each (towards the
        // dead-letter queue) without running it. With one at a time SQS
        // holds the group until its message is settled, and the next
        // receive serves another group.
        d.receive = Some(if s.fifo || b.broken.is_some() {
            1
        } else {
            (s.concurrency - jobs).min(10) as i32
        });
        receiving = true;
    }

    // The group, for protection, the lifecycle hook and the intake tag.
    if (s.protect_busy || s.hook || s.follow_intake.is_some() || b.not_in_group)
        && b.group.is_none()
        && b.group_lookup.ready(now)
    {
        d.lookup_group = true;
    }

    // The controller's intake tag, while the instance may take work.
    if let (Some(_), Some(_)) = (s.follow_intake, &b.group) {
        if b.intake.ready(now)
            && matches!(
                mode,
                Mode::Running
                    | Mode::ScalingIn {
                        requested: false,
                        ..
                    }
            )
        {
            d.read_intake = true;
        }
    }

    // Protection: on when a job runs; off only once the instance is idle
    // (idle timeout, or scaling in), not between back-to-back jobs. Not
    // while the group is taking the instance out (Terminating:Wait, or
    // into the warm pool): AWS refuses protection then ("not in InService
    // or EnteringStandby or Standby"), and a retry every 5 s for the whole
    // drain would compete with the hook's heartbeats for the account's
    // Auto Scaling rate; it protects nothing there anyway.
    let leaving = matches!(mode, Mode::Terminating)
        || mode.drain().is_some_and(|d| {
            d.has(DrainReason::LifecycleTerminated) || d.has(DrainReason::WarmPool)
        });
    if s.protect_busy && b.group.is_some() && !leaving && b.protection.ready(now) {
        let want = if jobs > 0 {
            true
        } else if idle || matches!(mode, Mode::ScalingIn { .. }) {
            false
        } else {
            b.protected
        };
        let stale = want
            && b.protected
            && b.protected_at
                .is_some_and(|t| now.duration_since(t) >= PROTECTION_REFRESH);
        if want != b.protected || stale {
            d.protect = Some(want);
        }
    }

    // Scale-in request, once nothing is outstanding.
    if !receiving && jobs == 0 {
        if let Some(m) = state::ready_to_request(&mode) {
            mode = m;
            d.request_scale_in = true;
        }
    }
    if b.confirm_needed && b.confirm.ready(now) {
        d.confirm_state = true;
    }
    if s.health_check && b.health_check.ready(now) && mode.drain().is_none() {
        d.health_check = true;
    }
    if b.replace_pending && jobs == 0 && b.mark.ready(now) {
        d.mark_unhealthy = true;
    }

    if let Some(drain) = mode.drain() {
        // The terminating hook holds a warm-pool transition too (AWS
        // applies it at Warmed:Pending:Wait): heartbeats for both, or a job
        // longer than the HeartbeatTimeout is stopped or hibernated mid-run.
        let hooked = s.hook
            && b.group.is_some()
            && (drain.has(DrainReason::LifecycleTerminated) || drain.has(DrainReason::WarmPool));
        if hooked && jobs > 0 && b.hook_heartbeat.ready(now) {
            d.hook_heartbeat = true;
        }
        if jobs == 0 {
            let after = state::after_drain(drain, s.hook && !b.not_in_group);
            // As the exit path: not while a long poll is out or messages
            // are being handed back, or the instance may go (CONTINUE
            // terminates it) before they are back on the queue.
            if after.complete_lifecycle
                && !b.lifecycle_completed
                && b.group.is_some()
                && !receiving
                && b.handbacks_in_flight == 0
                && b.lifecycle.ready(now)
            {
                d.complete_lifecycle = true;
            }
            if after.exit {
                // Exit once nothing is left to settle, or at the deadline
                // whatever is still outstanding (a long poll's messages then
                // return after their visibility timeout).
                let past_deadline = b.deadline.is_some_and(|t| now >= t);
                let settled = !receiving
                    && b.handbacks_in_flight == 0
                    && (!after.complete_lifecycle || b.lifecycle_completed || b.not_in_group);
                d.exit = settled || past_deadline;
            }
        }
    }
    if mode != b.mode {
        d.mode = Some(mode);
    }
    d
}

/// Loop state: the books, the running jobs, and the last look at both
/// clocks (to see a resume after a pause).
struct Loop {
    books: Books,
    jobs: JoinSet<JobReport>,
    /// When each running job started, by message id.
    job_starts: std::collections::HashMap<String, Instant>,
    clocks: (Instant, DateTime<Utc>),
}

/// The wall clock moving this much further than the monotonic one between
/// two looks means the machine was paused (a spot `hibernate`; Linux's
/// monotonic clock does not count suspended time). The loop looks at least
/// every second, so NTP slews (at most 0.5 ms/s) never come near it.
pub const RESUME_JUMP: Duration = Duration::from_secs(60);

/// Whether the machine was paused between two looks at the clocks.
pub fn paused_between(before: (Instant, DateTime<Utc>), after: (Instant, DateTime<Utc>)) -> bool {
    let mono = after.0.saturating_duration_since(before.0);
    let wall = (after.1 - before.1).to_std().unwrap_or(Duration::ZERO);
    wall.saturating_sub(mono) >= RESUME_JUMP
}

impl<Q: Queue, F: Fleet, W: Worker> Runner<Q, F, W> {
    fn policy(&self) -> Policy {
        Policy {
            deadline_margin: self.cfg.interruption.deadline_margin.0,
            lifecycle_global: state::lifecycle_global_timeout(
                self.cfg.interruption.lifecycle_heartbeat_timeout.0,
            ),
            scale_in: self.cfg.scale_in.enabled,
            rebalance: self.cfg.interruption.rebalance,
            shutdown_deadline: self.cfg.interruption.shutdown_deadline.0,
        }
    }

    /// An instant (tokio's clock) for a wall-clock time from the clock.
    fn instant_of(&self, t: DateTime<Utc>) -> Instant {
        let now = Instant::now();
        match (t - self.clock.now()).to_std() {
            Ok(d) => now + d,
            Err(_) => now, // in the past
        }
    }

    /// Runs until a shutdown drain completes. `shutdown` is SIGTERM/SIGINT.
    /// `ready` completes once the first IMDS poll has answered: no message
    /// is taken before the agent knows whether a notice is already up.
    pub async fn run(
        self,
        mut notices: mpsc::Receiver<Detected>,
        ready: impl Future<Output = ()>,
        shutdown: impl Future<Output = ()>,
    ) {
        let now = Instant::now();
        let mut books = Books::new(now);
        // Intake waits for the first answer of `health.command`.
        books.check_known = self.health.is_none();
        let mut st = Loop {
            books,
            jobs: JoinSet::new(),
            job_starts: Default::default(),
            clocks: (now, self.clock.now()),
        };
        let mut settings = Settings::of(&self.cfg);
        settings.health_check = self.health.is_some();
        let (effects_tx, mut effects) = mpsc::unbounded_channel();
        let (deadline_tx, deadline_rx) = watch::channel(None::<Instant>);
        let (notice_tx, notice_rx) = watch::channel(None::<JobNotice>);
        let ctx = Arc::new(JobCtx {
            queue: self.queue.clone(),
            worker: self.worker.clone(),
            visibility: self.cfg.queue.visibility_timeout.0,
            heartbeat: self.cfg.heartbeat_interval(),
            error_visibility: self.cfg.queue.error_visibility_timeout.0,
            timeout: self.cfg.worker.timeout.map(|d| d.0),
            checkpoint_max: self.cfg.worker.checkpoint_max_bytes,
            fifo: self.cfg.queue.url.trim_end_matches('/').ends_with(".fifo"),
            fifo_resend: self.cfg.worker.fifo_resend_checkpoint,
            // The SIGTERM grace, the settle, and 30 s for the receive's
            // round trip and clock slack.
            lease_margin: self.cfg.worker.term_grace.0
                + crate::job::SETTLE_BUDGET
                + Duration::from_secs(30),
            // The stop takes at most the grace; the settle gets what is left
            // of the margin (SETTLE_BUDGET at most): the whole deadline
            // path ends by the notice time.
            max_interruptions: self.cfg.queue.max_interruptions,
            deadline_settle_budget: crate::job::SETTLE_BUDGET.min(
                self.cfg
                    .interruption
                    .deadline_margin
                    .0
                    .saturating_sub(self.cfg.worker.term_grace.0),
            ),
        });
        let chans = Chans {
            deadline_tx,
            deadline_rx,
            notice_tx,
            notice_rx,
        };
        tokio::pin!(shutdown);
        tokio::pin!(ready);
        let mut is_ready = false;
        let mut shutdown_seen = false;
        let mut notices_open = true;
        tracing::info!(instance_id = %self.instance_id, queue = %self.cfg.queue.url, "agent running");
        loop {
            self.check_resume(&mut st, &chans);
            self.check_worker(&mut st.books);
            // A drain that ended (a refused scale-in, a warm-pool return, a
            // resume) takes its notice back: jobs started from now on are
            // told of nothing, and running ones skip the empty value.
            if st.books.mode.drain().is_none() && chans.notice_tx.borrow().is_some() {
                chans.notice_tx.send_replace(None);
            }
            st.books.imds_ready = is_ready;
            if self.housekeeping(&mut st, &settings, &effects_tx) {
                tracing::info!("drain complete; exiting");
                return;
            }
            let oldest = st
                .job_starts
                .values()
                .min()
                .map_or(0, |t| Instant::now().duration_since(*t).as_secs());
            self.status.set(&st.books.mode, st.jobs.len(), oldest);
            let wake = self.next_wake(&st.books, &settings);
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
                _ = &mut ready, if !is_ready => {
                    is_ready = true;
                    tracing::info!("first IMDS poll answered; intake may open");
                }
                Some(e) = effects.recv() => self.on_effect(&mut st, e, &effects_tx, &ctx, &chans),
                Some(r) = st.jobs.join_next(), if !st.jobs.is_empty() => {
                    st.books.last_activity = Instant::now();
                    match r {
                        Ok(report) => {
                            st.job_starts.remove(&report.message_id);
                            self.on_report(&mut st.books, &report);
                        }
                        Err(e) => {
                            // A job task panicked: its message returns when its
                            // visibility lapses (the heartbeat died with it).
                            inc(&self.status.counters.settle_errors);
                            tracing::error!(error = %e, "job task failed");
                        }
                    }
                    if st.jobs.is_empty() {
                        // No job runs: whatever the job user still runs (a
                        // `setsid` escapee of a process group) would reach
                        // the next message's files and processes.
                        self.worker.all_done();
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn next_wake(&self, b: &Books, s: &Settings) -> Instant {
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(1);
        let mut consider = |t: Instant| {
            if t > now && t < wake {
                wake = t;
            }
        };
        consider(b.last_activity + s.idle_timeout);
        for p in [
            &b.scale_in,
            &b.receive,
            &b.hook_heartbeat,
            &b.start_failures,
            &b.group_lookup,
            &b.intake,
            &b.protection,
            &b.lifecycle,
            &b.confirm,
            &b.health_check,
            &b.mark,
        ] {
            consider(p.not_before);
        }
        for t in [
            b.deadline,
            b.broken_until,
            b.protected_at.map(|t| t + PROTECTION_REFRESH),
        ]
        .into_iter()
        .flatten()
        {
            consider(t);
        }
        wake
    }

    /// Whether the worker can run a job at all (a stat of its program):
    /// every turn of the loop, so before each receive. A change is logged
    /// once and shown on `/healthz`.
    fn check_worker(&self, b: &mut Books) {
        // A stat of the program (and of PATH's directories): every 10 s at
        // most, not on every turn of the loop, which also serves heartbeats
        // and IMDS polls.
        let at = Instant::now();
        if b.worker_checked
            .is_some_and(|t| at.duration_since(t) < WORKER_CHECK_EVERY)
        {
            return;
        }
        b.worker_checked = Some(at);
        if let (Some(why), None) = (self.worker.stuck(), &b.broken) {
            // For good: no cool-down ends it (no half-open try on a process
            // table that cannot be cleared); replaced if so configured.
            inc(&self.status.counters.unhealthy_trips);
            tracing::error!(reason = %why, action = ?self.cfg.health.on_unhealthy, "this instance is unhealthy: intake closed");
            b.broken = Some(why);
            b.broken_until = None;
            if self.cfg.health.on_unhealthy == OnUnhealthy::Replace {
                b.replace_pending = true;
            }
            self.status.set_unhealthy(b.unhealthy().map(str::to_string));
        }
        let now = self.worker.ready().err();
        if now == b.worker_unready {
            return;
        }
        match &now {
            Some(why) => {
                inc(&self.status.counters.unhealthy_trips);
                tracing::error!(reason = %why, "the worker cannot run jobs: intake closed");
            }
            None => tracing::info!("the worker can run jobs again: intake reopens"),
        }
        b.worker_unready = now;
        self.status.set_unhealthy(b.unhealthy().map(str::to_string));
    }

    /// After a spot `stop`/`hibernate` notice the process may come back
    /// (hibernation keeps it): once the wall clock has jumped past the
    /// interruption time, the drain for it ends and intake reopens.
    fn check_resume(&self, st: &mut Loop, chans: &Chans) {
        let now = (Instant::now(), self.clock.now());
        let before = std::mem::replace(&mut st.clocks, now);
        if paused_between(before, now) {
            let pausing = st.books.spot.as_ref().is_some_and(|(action, time)| {
                matches!(action.as_deref(), Some("stop" | "hibernate")) && now.1 > *time
            });
            tracing::warn!(jumped = %(now.1 - before.1), pausing, "the wall clock jumped: the machine was paused");
            if pausing {
                st.books.spot = None;
                st.books.resume_pending = true;
                if !st.jobs.is_empty() {
                    // A job that ran across the pause lost its lease (SQS's
                    // clock ran on): stop it now and hand it back.
                    tracing::warn!(
                        jobs = st.jobs.len(),
                        "jobs ran across the pause: stopping and handing them back"
                    );
                    st.books.deadline = Some(now.0);
                    chans.deadline_tx.send_replace(Some(now.0));
                }
            }
        }
        if st.books.resume_pending && st.jobs.is_empty() {
            st.books.resume_pending = false;
            self.apply(st, Notice::Resumed, chans);
            if st.books.mode == Mode::Running {
                tracing::info!("resumed after a spot stop/hibernate: intake reopens");
            }
        }
    }

    fn on_detected(&self, st: &mut Loop, d: Detected, chans: &Chans) {
        let c = &self.status.counters;
        let notice = match &d.event {
            WatchEvent::SpotInterruption { time, action, .. } => {
                inc(&c.notices_spot);
                st.books.spot = Some((action.as_ref().map(|a| a.to_string()), *time));
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
            WatchEvent::LifecycleState {
                state: TargetLifecycleState::Warmed(_),
                ..
            } => {
                inc(&c.notices_lifecycle);
                Some(Notice::WarmPool)
            }
            WatchEvent::LifecycleState {
                state: TargetLifecycleState::InService,
                ..
            } => Some(Notice::InService),
            // Detached from its group: a standalone instance from now on
            // (no protection, no hook, no scale-in; the lookups go on).
            WatchEvent::LifecycleState {
                state: TargetLifecycleState::Detached,
                ..
            } => {
                if st.books.group.take().is_some() {
                    tracing::warn!(
                        "detached from its Auto Scaling group: working on as a standalone instance"
                    );
                }
                st.books.not_in_group = true;
                None
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
                obj.insert("agent_mode".into(), json!(st.books.mode.name()));
                obj.insert("jobs_in_flight".into(), json!(st.jobs.len()));
            }
            self.notifier.notify(subject, event);
        }
    }

    fn apply(&self, st: &mut Loop, notice: Notice, chans: &Chans) {
        let b = &mut st.books;
        let before = b.mode.clone();
        let policy = Policy {
            // An instance in no group cannot leave by itself either.
            scale_in: self.cfg.scale_in.enabled && !b.not_in_group,
            ..self.policy()
        };
        b.mode = state::on_notice(&b.mode, &notice, &policy, self.clock.now());
        if b.mode == before {
            return;
        }
        tracing::info!(
            ?notice,
            from = before.name(),
            to = b.mode.name(),
            "state change"
        );
        if before.drain().is_some() && b.mode == Mode::Running {
            // A drain that ended (warm pool back in service, a resume): the
            // next one starts afresh.
            b.lifecycle_completed = false;
            b.lifecycle = Pending::new(Instant::now());
            b.hook_heartbeat = Pending::new(Instant::now());
            b.drain_complete_logged = false;
        }
        if before.drain().is_none() && b.mode.drain().is_some() {
            inc(&self.status.counters.drains);
            tracing::info!(jobs = st.jobs.len(), deadline = ?b.mode.drain().and_then(|d| d.deadline), "drain started: intake stopped");
        }
        let deadline = b
            .mode
            .drain()
            .and_then(|d| d.deadline)
            .map(|t| self.instant_of(t));
        if deadline != b.deadline {
            b.deadline = deadline;
            chans.deadline_tx.send_replace(deadline);
        }
        // Every drain (spot, lifecycle, SIGTERM, rebalance in drain mode) is
        // told to the running jobs, again whenever its deadline changes. An
        // ended reason (a resume, a return from the warm pool) with others
        // holding tells them nothing new.
        let kind = match notice {
            Notice::Spot { .. } => Some("spot_interruption"),
            Notice::Rebalance => Some("rebalance_recommendation"),
            Notice::LifecycleTerminated => Some("lifecycle_terminated"),
            Notice::WarmPool => Some("warm_pool"),
            Notice::InService | Notice::Resumed => None,
            Notice::Shutdown => Some("shutdown"),
        };
        if let (Some(drain), Some(kind)) = (b.mode.drain(), kind) {
            let spot = drain
                .has(DrainReason::SpotInterruption)
                .then(|| b.spot.clone())
                .flatten();
            chans.notice_tx.send_replace(Some(JobNotice {
                kind,
                action: spot.as_ref().and_then(|s| s.0.clone()),
                notice_time: spot.map(|s| s.1),
                deadline: drain.deadline,
            }));
        }
    }

    fn on_report(&self, b: &mut Books, r: &JobReport) {
        let c = &self.status.counters;
        if r.lost_ownership {
            inc(&c.lost_ownership);
        }
        if r.settled == Settled::NotStarted {
            b.start_failures.failed(Instant::now(), start_failure_pause);
            let pause = start_failure_pause(b.start_failures.failures);
            tracing::error!(message_id = %r.message_id, ?pause, outcome = ?r.outcome, "the job could not start; message handed back, intake paused");
        } else if matches!(
            r.settled,
            Settled::Deleted | Settled::Failed | Settled::TimedOut
        ) {
            b.start_failures.succeeded();
        }
        inc(match r.settled {
            Settled::Deleted => &c.jobs_succeeded,
            Settled::Failed => &c.jobs_failed,
            Settled::TimedOut => &c.jobs_timed_out,
            Settled::HandedBack => &c.jobs_handed_back,
            Settled::HandedOver => &c.jobs_handed_over,
            Settled::SettleFailed => &c.settle_errors,
            Settled::NotStarted => &c.jobs_not_started,
        });
        // The circuit breaker: jobs ending badly in a row on this instance.
        match r.settled {
            Settled::Deleted => {
                b.failures_in_a_row = 0;
                b.failed_messages.clear();
                // Only the breaker's trip heals (it alone has a cool-down):
                // not a job's process that could not be killed, nor a GPU
                // check's lasting failure; a job started before the GPU
                // failed may well finish.
                if self.worker.stuck().is_none()
                    && b.broken_until.is_some()
                    && b.broken.take().is_some()
                {
                    b.broken_until = None;
                    // Healthy again: a mark still waiting (its calls
                    // failing) must not replace a working instance.
                    b.replace_pending = false;
                    b.mark = Pending::new(Instant::now());
                    tracing::info!("a job succeeded after the breaker's cool-down: healthy again");
                    self.status.set_unhealthy(b.unhealthy().map(str::to_string));
                }
            }
            // A message that fails again is one failure, however often it
            // comes back: a poison message received maxReceiveCount times
            // on a quiet instance is the message's fault, not the
            // instance's. Not starting is the instance's each time.
            // The job, not the copy: a re-sent message (an interruption, a
            // hand-over) has a new id but its first one in an attribute.
            Settled::Failed | Settled::TimedOut
                if !b
                    .failed_messages
                    .contains(r.original_id.as_ref().unwrap_or(&r.message_id)) =>
            {
                // At most the breaker's count (it trips there; 0: off).
                let keep = self.cfg.health.max_consecutive_failures as usize;
                if keep > 0 {
                    if b.failed_messages.len() >= keep {
                        b.failed_messages.remove(0);
                    }
                    b.failed_messages.push(
                        r.original_id
                            .clone()
                            .unwrap_or_else(|| r.message_id.clone()),
                    );
                }
                b.failures_in_a_row += 1;
            }
            Settled::NotStarted => b.failures_in_a_row += 1,
            _ => {}
        }
        let limit = self.cfg.health.max_consecutive_failures;
        let start_limit = self.cfg.health.max_start_failures;
        let tripped = if limit > 0 && b.failures_in_a_row >= limit {
            Some(format!(
                "{} jobs in a row failed, timed out or could not start (health.max_consecutive_failures = {limit})",
                b.failures_in_a_row
            ))
        } else if start_limit > 0 && b.start_failures.failures >= start_limit {
            Some(format!(
                "{} jobs in a row could not start (health.max_start_failures = {start_limit})",
                b.start_failures.failures
            ))
        } else {
            None
        };
        let Some(why) = tripped else {
            return;
        };
        // Unhealthy for good already (a lasting GPU failure, an unkillable
        // job): that stands, its reason too; a cool-down would let a
        // success heal it.
        if b.broken.is_some() && b.broken_until.is_none() {
            return;
        }
        if b.broken.is_none() {
            tracing::error!(reason = %why, action = ?self.cfg.health.on_unhealthy, "this instance is unhealthy: intake closed");
            inc(&c.unhealthy_trips);
            self.notifier.notify(
                "spotguard: instance unhealthy",
                json!({"event": "unhealthy", "instance_id": self.instance_id, "reason": why}),
            );
        } else {
            tracing::warn!(reason = %why, "the job let through after the cool-down failed too: intake closed again");
        }
        if self.cfg.health.on_unhealthy == OnUnhealthy::Replace {
            // On every trip, the half-open one's too (a call before may
            // have been lost), once no job runs (see `due`): a replacement
            // must not kill one.
            b.replace_pending = true;
        }
        // Tripped, or tripped again after the half-open try: closed for
        // another cool-down.
        b.broken = Some(why.clone());
        b.broken_until = Some(Instant::now() + BREAKER_COOLDOWN);
        self.status.set_unhealthy(Some(why));
    }

    fn on_effect(
        &self,
        st: &mut Loop,
        e: Effect,
        tx: &mpsc::UnboundedSender<Effect>,
        ctx: &Arc<JobCtx<Q, W>>,
        chans: &Chans,
    ) {
        let now = Instant::now();
        let c = &self.status.counters;
        let b = &mut st.books;
        match e {
            Effect::Received(Ok(msgs)) => {
                b.receive.succeeded();
                if msgs.is_empty() {
                    return;
                }
                b.last_activity = now;
                for _ in &msgs {
                    inc(&c.messages_received);
                }
                let (mode, mut run) = state::on_late_messages(&b.mode);
                // A long poll that was out when the breaker tripped (or the
                // health check failed): its messages go back unstarted.
                if let Some(why) = b.unhealthy_now(now) {
                    tracing::info!(count = msgs.len(), reason = %why, "unhealthy: messages of a long poll handed back unstarted");
                    run = false;
                }
                if mode != b.mode {
                    tracing::info!(
                        from = b.mode.name(),
                        to = mode.name(),
                        "messages arrived; back to work"
                    );
                    b.mode = mode;
                }
                if run {
                    for m in msgs {
                        st.job_starts.insert(m.id.clone(), now);
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
                    b.handbacks_in_flight += 1;
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
                // Not idleness: an SQS outage, a denied receive or a subnet
                // with no route to the queue's region says nothing about
                // whether work waits. Were it idleness, every instance
                // would end itself and its replacement do the same.
                b.last_activity = now;
                b.receive.failed(now, receive_backoff);
                inc(&c.receive_errors);
                let backoff = receive_backoff(b.receive.failures);
                tracing::warn!(error = %e, ?backoff, "receive failed");
            }
            Effect::HandedBack { asked, done } => {
                b.handbacks_in_flight -= 1;
                for _ in 0..done {
                    inc(&c.messages_returned_unstarted);
                }
                for _ in done..asked {
                    inc(&c.settle_errors);
                }
            }
            Effect::ScaleIn(r) => {
                b.scale_in.in_flight = false;
                let accepted = match r {
                    Ok(ScaleIn::Accepted) => {
                        tracing::info!(
                            "the group accepted our termination (desired capacity decremented)"
                        );
                        true
                    }
                    Ok(ScaleIn::Refused(why)) => {
                        inc(&c.scale_in_refusals);
                        tracing::info!(reason = %why, "the group refused to scale in (at MinSize): the instance is needed; resuming work");
                        false
                    }
                    Err(e) => {
                        // Lost answer, timeout, another ValidationError: the
                        // instance may be terminating. Keep intake closed
                        // until its state is confirmed.
                        inc(&c.aws_errors);
                        tracing::warn!(error = %e, "scale-in answer unclear; intake stays closed until the instance's state is confirmed");
                        b.confirm_needed = true;
                        b.confirm = Pending::new(now + CONFIRM_DELAY);
                        b.confirm_in_service = 0;
                        return;
                    }
                };
                self.scale_in_result(b, accepted, now);
            }
            Effect::Confirmed(r) => match r {
                Ok(state) => {
                    b.confirm.succeeded();
                    // Accepted only if the group is terminating it (or it
                    // left the group); any other state (InService, Standby,
                    // Pending...) means it stays: back to work.
                    let leaving = match state.as_deref() {
                        // Listed in no group: a terminating instance stays
                        // listed until it is gone (and the agent with it),
                        // so this one stays: standalone, or detached.
                        None => {
                            b.group = None;
                            b.not_in_group = true;
                            false
                        }
                        Some(s) => s.starts_with("Terminating") || s == "Terminated",
                    };
                    if !leaving && b.confirm_in_service == 0 {
                        // Auto Scaling may list a terminating instance as
                        // InService for a while: one more look before
                        // intake reopens on a dying instance.
                        b.confirm_in_service = 1;
                        b.confirm.not_before = now + CONFIRM_DELAY;
                        tracing::info!(state = ?state, "still listed as staying after an unclear scale-in answer; looking again");
                        return;
                    }
                    b.confirm_needed = false;
                    b.confirm_in_service = 0;
                    tracing::info!(state = ?state, leaving, "instance state after an unclear scale-in answer");
                    self.scale_in_result(b, leaving, now);
                }
                Err(e) => {
                    inc(&c.aws_errors);
                    b.confirm.failed(now, |_| CALL_RETRY);
                    tracing::warn!(error = %e, "cannot confirm the instance's state; retrying");
                }
            },
            Effect::Protection(want, r, mark) => {
                match r {
                    Ok(()) => {
                        b.protection.succeeded();
                        b.protected = want;
                        b.protected_at = want.then_some(now);
                        tracing::info!(protected = want, "scale-in protection set");
                    }
                    Err(e) => {
                        inc(&c.aws_errors);
                        b.protection.failed(now, |_| CALL_RETRY);
                        tracing::warn!(error = %e, "cannot set scale-in protection");
                    }
                }
                match mark {
                    Some(Err(e)) if is_denied(e.code.as_deref()) => {
                        inc(&c.aws_errors);
                        // Not allowed to tag: retrying sooner changes nothing.
                        if !b.mark_denied {
                            b.mark_denied = true;
                            tracing::warn!(error = %e, "cannot write the liveness mark (IAM: ec2:CreateTags on this instance, tag spotguard:alive): the controller cannot tell this agent alive and releases its protection only after failover.max_busy_age");
                        }
                    }
                    Some(Err(e)) if want => {
                        inc(&c.aws_errors);
                        // The next re-assertion (mark, then protection)
                        // comes sooner than PROTECTION_REFRESH: 15 s, then
                        // doubling, so that an EC2 this instance cannot
                        // reach (a private subnet without its endpoint)
                        // does not become a protection call every 15 s.
                        b.mark_failures = b.mark_failures.saturating_add(1);
                        let again = mark_retry_after(b.mark_failures);
                        tracing::warn!(error = %e, again_in = ?again, "cannot write the liveness mark; writing it again");
                        // (An instance up for less than that: at the usual
                        // cadence. Its first mark failed, so its tag says
                        // `idle` or nothing, which is never judged dead.)
                        if b.protected {
                            b.protected_at =
                                Some(now.checked_sub(PROTECTION_REFRESH - again).unwrap_or(now));
                        }
                    }
                    Some(Err(e)) => {
                        inc(&c.aws_errors);
                        tracing::warn!(error = %e, "cannot mark the liveness tag idle; the next busy spell writes it again");
                    }
                    Some(Ok(())) => {
                        b.mark_denied = false;
                        b.mark_failures = 0;
                    }
                    None => {}
                }
            }
            Effect::Group(r) => match r {
                Ok(Some(g)) => {
                    b.group_lookup.succeeded();
                    tracing::info!(group = %g, "Auto Scaling group found");
                    b.group = Some(g);
                    b.not_in_group = false;
                }
                Ok(None) => {
                    b.group_lookup.succeeded();
                    b.group_lookup.not_before = now + GROUP_LOOK_AGAIN;
                    if !b.not_in_group {
                        tracing::warn!(again_in = ?GROUP_LOOK_AGAIN, "this instance is in no Auto Scaling group: no protection, no lifecycle hook until it is");
                    }
                    b.not_in_group = true;
                }
                Err(e) => {
                    inc(&c.aws_errors);
                    b.group_lookup.failed(now, |_| CALL_RETRY);
                    tracing::warn!(error = %e, "cannot find this instance's Auto Scaling group");
                }
            },
            Effect::Intake(r) => {
                let every = self.cfg.scale_in.intake_check.0;
                match r {
                    Ok(intake) => {
                        let closed = intake.closed;
                        b.group_surplus = intake.surplus;
                        b.intake_known = true;
                        b.intake.succeeded();
                        b.intake.not_before = now + every;
                        if closed != b.intake_closed {
                            tracing::info!(
                                closed,
                                "the controller changed this group's intake (spotguard:intake)"
                            );
                        }
                        b.intake_closed = closed;
                    }
                    Err(e) => {
                        // The last reading holds until one succeeds.
                        b.intake_known = true;
                        inc(&c.aws_errors);
                        b.intake.failed(now, |_| every);
                        tracing::warn!(error = %e, "cannot read this group's intake tag");
                    }
                }
            }
            Effect::LifecycleCompleted(r) => match r {
                Ok(()) => {
                    b.lifecycle.succeeded();
                    b.lifecycle_completed = true;
                    tracing::info!("lifecycle action completed (CONTINUE)");
                }
                Err(e) => {
                    inc(&c.aws_errors);
                    let warm_only = b
                        .mode
                        .drain()
                        .is_some_and(|d| !d.has(DrainReason::LifecycleTerminated));
                    if warm_only {
                        // A warm-pool transition may have no lifecycle action
                        // waiting (the termination hook applies to
                        // `Terminated`): one try, then no more.
                        b.lifecycle.succeeded();
                        b.lifecycle_completed = true;
                        tracing::info!(error = %e, "no lifecycle action to complete for the warm-pool transition");
                    } else {
                        b.lifecycle.failed(now, |_| CALL_RETRY);
                        tracing::warn!(error = %e, "cannot complete the lifecycle action");
                    }
                }
            },
            Effect::Health(o) => {
                b.health_check.succeeded();
                b.health_check.not_before = now + self.cfg.health.interval.0;
                b.check_known = true;
                self.status.set_checks(&o.checks);
                match o.failure {
                    None => {
                        if let Some(why) = b.check_failing.take() {
                            tracing::info!(was = %why, "the health checks pass again: intake reopens");
                        }
                    }
                    Some(why) => {
                        if b.check_failing.is_none() {
                            inc(&c.unhealthy_trips);
                            tracing::error!(reason = %why, "a health check fails: intake closed");
                        }
                        b.check_failing = Some(why.clone());
                        // A GPU lost, an uncorrectable error, a fatal Xid:
                        // no pass later makes the instance fit again. For
                        // good, as an unkillable job is: the notice, and
                        // replaced once idle if so configured.
                        if o.lasting && (b.broken.is_none() || b.broken_until.is_some()) {
                            tracing::error!(reason = %why, action = ?self.cfg.health.on_unhealthy, "this instance is unhealthy for good: intake closed");
                            if b.broken.is_none() {
                                self.notifier.notify(
                                    "spotguard: instance unhealthy",
                                    json!({"event": "unhealthy", "instance_id": self.instance_id, "reason": why}),
                                );
                            }
                            b.broken = Some(why);
                            b.broken_until = None;
                            if self.cfg.health.on_unhealthy == OnUnhealthy::Replace {
                                b.replace_pending = true;
                            }
                        }
                    }
                }
                self.status.set_unhealthy(b.unhealthy().map(str::to_string));
            }
            Effect::MarkedUnhealthy(r) => match r {
                Ok(()) => {
                    b.mark.succeeded();
                    tracing::warn!("instance marked Unhealthy: the group replaces it");
                }
                Err(e) => {
                    // Tried again (1, 2, 4 ... s): a throttled call must not
                    // leave a broken instance eating the queue. Not when
                    // AWS says it never will (no group, no permission), and
                    // not once the breaker has closed again.
                    inc(&c.aws_errors);
                    b.mark.failed(now, receive_backoff);
                    let permanent = matches!(
                        e.code.as_deref(),
                        Some("ValidationError" | "AccessDenied" | "AccessDeniedException")
                    );
                    b.replace_pending = !permanent && b.broken.is_some();
                    tracing::warn!(error = %e, retry_in = ?receive_backoff(b.mark.failures), "cannot mark the instance unhealthy");
                }
            },
            Effect::HookHeartbeat(r) => match r {
                Ok(()) => {
                    b.hook_heartbeat.succeeded();
                    b.hook_heartbeats_sent += 1;
                    b.hook_heartbeat.not_before =
                        now + self.cfg.interruption.lifecycle_heartbeat_interval.0;
                    tracing::info!(sent = b.hook_heartbeats_sent, "lifecycle heartbeat sent");
                }
                Err(e) => {
                    // Retried soon, not after the full interval: one
                    // throttled call must not let the hook time out.
                    inc(&c.aws_errors);
                    b.hook_heartbeat.failed(now, |_| CALL_RETRY);
                    tracing::warn!(error = %e, "lifecycle heartbeat failed; retrying");
                }
            },
        }
    }

    fn scale_in_result(&self, b: &mut Books, accepted: bool, now: Instant) {
        if accepted {
            b.scale_in.succeeded();
        } else {
            let retry = self.cfg.scale_in.retry_interval.0;
            b.scale_in
                .failed(now, |n| state::scale_in_backoff(retry, n));
            tracing::info!(wait = ?b.scale_in.not_before.duration_since(now), "next scale-in attempt not before");
            // The idle timer starts again after the refusal.
            b.last_activity = now;
        }
        b.mode = state::on_scale_in_result(&b.mode, accepted);
    }

    /// Starts whatever [`due`] says is due. Returns true when the agent
    /// should exit.
    fn housekeeping(
        &self,
        st: &mut Loop,
        settings: &Settings,
        tx: &mpsc::UnboundedSender<Effect>,
    ) -> bool {
        let now = Instant::now();
        let d = due(&st.books, st.jobs.len(), settings, now);
        let b = &mut st.books;
        if let Some(m) = d.mode {
            if matches!(
                m,
                Mode::ScalingIn {
                    requested: false,
                    ..
                }
            ) && !matches!(b.mode, Mode::ScalingIn { .. })
            {
                tracing::info!(idle_for = ?now.duration_since(b.last_activity), "idle: intake stopped, scaling in");
            }
            b.mode = m;
        }
        let spawn = |f: std::pin::Pin<Box<dyn Future<Output = Effect> + Send>>| {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(f.await);
            });
        };
        let (id, fleet) = (self.instance_id.clone(), self.fleet.clone());
        if let Some(max) = d.receive {
            b.receive.start();
            let queue = self.queue.clone();
            let (wait, vis) = (
                self.cfg.queue.wait_time.0,
                self.cfg.queue.visibility_timeout.0,
            );
            spawn(Box::pin(async move {
                Effect::Received(queue.receive(max, wait, vis).await)
            }));
        }
        if d.lookup_group {
            b.group_lookup.start();
            let (fleet, id) = (fleet.clone(), id.clone());
            spawn(Box::pin(
                async move { Effect::Group(fleet.group_of(&id).await) },
            ));
        }
        if let (true, Some(group)) = (d.read_intake, b.group.clone()) {
            b.intake.start();
            let fleet = fleet.clone();
            spawn(Box::pin(async move {
                Effect::Intake(fleet.intake(&group).await)
            }));
        }
        if let (Some(want), Some(group)) = (d.protect, b.group.clone()) {
            b.protection.start();
            let (fleet, id) = (fleet.clone(), id.clone());
            // With the mark: protecting, the time; unprotecting, `idle`
            // (not a time), so that a busy spell whose mark cannot be
            // written shows no old time for the controller to take for a
            // dead agent. Both at once: an EC2 endpoint this instance
            // cannot reach must not hold the protection back (a job
            // already runs).
            let mark = if want {
                crate::aws::alive_mark(self.clock.now())
            } else {
                crate::aws::IDLE_MARK.to_string()
            };
            spawn(Box::pin(async move {
                let (marked, set) = tokio::join!(
                    fleet.mark_alive(&id, &mark),
                    fleet.set_protection(&group, &id, want)
                );
                Effect::Protection(want, set, Some(marked))
            }));
        }
        if d.request_scale_in {
            b.scale_in.start();
            inc(&self.status.counters.scale_in_requests);
            let (fleet, id) = (fleet.clone(), id.clone());
            // Handing back with the group already above its desired
            // capacity: no decrement (it would be refused at MinSize 0, and
            // no replacement comes for a surplus instance).
            let decrement = !(b.intake_closed && b.group_surplus);
            spawn(Box::pin(async move {
                Effect::ScaleIn(fleet.terminate_self(&id, decrement).await)
            }));
        }
        if d.confirm_state {
            b.confirm.start();
            let (fleet, id) = (fleet.clone(), id.clone());
            spawn(Box::pin(async move {
                Effect::Confirmed(fleet.lifecycle_state(&id).await)
            }));
        }
        let hook = self.cfg.interruption.lifecycle_hook.clone();
        if let (true, Some(hook), Some(group)) = (d.hook_heartbeat, hook.clone(), b.group.clone()) {
            b.hook_heartbeat.start();
            let (fleet, id) = (fleet.clone(), id.clone());
            spawn(Box::pin(async move {
                Effect::HookHeartbeat(fleet.lifecycle_heartbeat(&group, &hook, &id).await)
            }));
        }
        if let (true, Some(hook), Some(group)) = (d.complete_lifecycle, hook, b.group.clone()) {
            b.lifecycle.start();
            let (fleet, id) = (fleet.clone(), id.clone());
            spawn(Box::pin(async move {
                Effect::LifecycleCompleted(fleet.complete_lifecycle(&group, &hook, &id).await)
            }));
        }
        if d.mark_unhealthy {
            b.replace_pending = false;
            b.mark.start();
            let (fleet, id) = (fleet.clone(), id.clone());
            spawn(Box::pin(async move {
                Effect::MarkedUnhealthy(fleet.mark_unhealthy(&id).await)
            }));
        }
        if let (true, Some(check)) = (d.health_check, self.health.clone()) {
            b.health_check.start();
            spawn(Box::pin(async move { Effect::Health(check.check().await) }));
        }
        if let Some(drain) = b.mode.drain() {
            if st.jobs.is_empty() && !b.drain_complete_logged {
                b.drain_complete_logged = true;
                tracing::info!(reasons = ?drain.reasons, "no job left");
            }
        }
        d.exit
    }
}

#[cfg(test)]
#[path = "runner_tests.rs"]
mod tests;
