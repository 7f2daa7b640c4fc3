//! The runner over in-memory fakes, in virtual time: no process, no moto,
//! no real sleeping. Each test drives one transition of `state.rs` as the
//! loop carries it out.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use spotguard_common::clock::{Clock, TokioClock};
use spotguard_common::imds::{SpotAction, TargetLifecycleState};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{advance, Instant};

use super::*;
use crate::config::Config;
use crate::fakes::{MemFleet, MemQueue, ScriptedWorker};
use crate::imds::ImdsStats;
use crate::watch::{Change, Detected, WatchEvent};

const BASE: &str = r#"
[queue]
url = "https://sqs.us-east-1.amazonaws.com/123456789012/jobs"
wait_time = "20s"
visibility_timeout = "60s"
error_visibility_timeout = "30s"
[worker]
command = ["/bin/true"]
[status]
listen = ""
"#;

fn cfg(extra: &str) -> Config {
    Config::parse(&format!("{BASE}{extra}"), "test").expect("test config")
}

struct World {
    /// Every notice the agent sent (SNS and hook).
    sent: crate::notify::Sent,
    queue: Arc<MemQueue>,
    fleet: Arc<MemFleet>,
    worker: Arc<ScriptedWorker>,
    status: Arc<Status>,
    clock: Arc<JumpClock>,
    notices: mpsc::Sender<Detected>,
    ready: Option<oneshot::Sender<()>>,
    shutdown: Option<oneshot::Sender<()>>,
    t0: Instant,
    runner: JoinHandle<()>,
}

/// A health check whose answer the test sets.
struct FlagCheck(std::sync::atomic::AtomicBool, std::sync::atomic::AtomicU32);

impl crate::health::HealthCheck for FlagCheck {
    fn check(&self) -> crate::health::CheckFuture<'_> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let ok = self.0.load(std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if ok {
                crate::health::Outcome::pass("command")
            } else {
                crate::health::Outcome::fail(
                    "command",
                    "health.command nvidia-smi exited with exit status: 9".into(),
                    false,
                )
            }
        })
    }
}

impl World {
    /// Starts the runner; intake opens at once unless `gated`.
    fn start(cfg: Config, fleet: Arc<MemFleet>, gated: bool) -> World {
        World::start_with(cfg, fleet, gated, None)
    }

    fn start_with(
        cfg: Config,
        fleet: Arc<MemFleet>,
        gated: bool,
        health: Option<Arc<dyn crate::health::HealthCheck>>,
    ) -> World {
        let queue = if cfg.queue.url.ends_with(".fifo") {
            MemQueue::new_fifo()
        } else {
            MemQueue::new()
        };
        let worker = ScriptedWorker::new();
        let status = Arc::new(Status::new(
            "i-0test".into(),
            Arc::new(ImdsStats::default()),
        ));
        let clock = Arc::new(JumpClock {
            inner: TokioClock::new(start_time()),
            offset_secs: std::sync::atomic::AtomicI64::new(0),
        });
        let (ntx, nrx) = mpsc::channel(16);
        let sent = crate::notify::Sent::default();
        let (ready_tx, ready_rx) = oneshot::channel::<()>();
        let (sd_tx, sd_rx) = oneshot::channel::<()>();
        let runner = Runner {
            cfg: Arc::new(cfg),
            queue: queue.clone(),
            fleet: fleet.clone(),
            worker: worker.clone(),
            clock: clock.clone(),
            health,
            notifier: Notifier {
                sent: Some(sent.clone()),
                ..Notifier::none()
            },
            status: status.clone(),
            instance_id: "i-0test".into(),
        };
        let handle = tokio::spawn(runner.run(
            nrx,
            async move {
                let _ = ready_rx.await;
            },
            async move {
                let _ = sd_rx.await;
            },
        ));
        let mut w = World {
            sent,
            queue,
            fleet,
            worker,
            status,
            clock,
            notices: ntx,
            ready: Some(ready_tx),
            shutdown: Some(sd_tx),
            t0: Instant::now(),
            runner: handle,
        };
        if !gated {
            w.open();
        }
        w
    }

    fn open(&mut self) {
        if let Some(r) = self.ready.take() {
            let _ = r.send(());
        }
    }

    /// Lets virtual time pass in small steps, so every task runs in between.
    async fn run_for(&self, secs: u64) {
        for _ in 0..secs * 10 {
            advance(Duration::from_millis(100)).await;
            tokio::task::yield_now().await;
        }
    }

    fn at(&self, t: Instant) -> f64 {
        t.duration_since(self.t0).as_secs_f64()
    }

    fn call_times(&self, calls: Vec<(Instant, String)>) -> Vec<f64> {
        calls.into_iter().map(|(t, _)| self.at(t).round()).collect()
    }

    async fn notice(&self, event: WatchEvent) {
        self.notices
            .send(Detected {
                event,
                detected_at: self.clock.now(),
            })
            .await
            .expect("runner gone");
    }

    async fn spot(&self, in_secs: i64) {
        self.spot_action(in_secs, SpotAction::Terminate).await
    }

    async fn spot_action(&self, in_secs: i64, action: SpotAction) {
        let time = self.clock.now() + chrono::Duration::seconds(in_secs);
        self.notice(WatchEvent::SpotInterruption {
            change: Change::New,
            action: Some(action),
            time,
            deadline_assumed: false,
            raw: None,
        })
        .await;
    }

    async fn rebalance(&self) {
        self.notice(WatchEvent::RebalanceRecommendation {
            change: Change::New,
            notice_time: self.clock.now(),
        })
        .await;
    }

    async fn lifecycle_terminated(&self) {
        self.notice(WatchEvent::LifecycleState {
            change: Change::New,
            state: TargetLifecycleState::Terminated,
            previous: Some(TargetLifecycleState::InService),
            terminating: true,
        })
        .await;
    }

    fn counter(
        &self,
        f: impl Fn(&crate::status::Counters) -> &std::sync::atomic::AtomicU64,
    ) -> u64 {
        f(&self.status.counters).load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Virtual time, plus jumps of the wall clock alone (a hibernated machine).
struct JumpClock {
    inner: TokioClock,
    offset_secs: std::sync::atomic::AtomicI64,
}

impl Clock for JumpClock {
    fn now(&self) -> DateTime<Utc> {
        self.inner.now()
            + chrono::Duration::seconds(self.offset_secs.load(std::sync::atomic::Ordering::SeqCst))
    }
}

fn start_time() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-28T08:00:00Z")
        .expect("time")
        .with_timezone(&Utc)
}

fn no_scale_in() -> &'static str {
    "[scale_in]\nenabled = false\n"
}

#[tokio::test(start_paused = true)]
async fn jobs_run_up_to_the_concurrency_and_their_messages_are_deleted() {
    let mut c = cfg(no_scale_in());
    c.worker.concurrency = 2;
    let w = World::start(c, MemFleet::new(None, 0, 1), false);
    let ids: Vec<String> = (0..3).map(|_| w.queue.push("10")).collect();
    w.run_for(15).await;
    // Two at once, the third after the first two.
    let starts: Vec<f64> = w
        .worker
        .events()
        .iter()
        .filter(|e| e.2 == "start")
        .map(|e| w.at(e.0).round())
        .collect();
    assert_eq!(starts, vec![0.0, 0.0, 10.0]);
    w.run_for(10).await;
    assert_eq!(w.queue.deleted(), ids);
    assert_eq!(w.counter(|c| &c.jobs_succeeded), 3);
}

#[tokio::test(start_paused = true)]
async fn receive_failures_back_off_1_2_4_up_to_20_seconds() {
    let w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
    w.queue.fail_next("ReceiveMessage", "ServiceUnavailable", 7);
    w.run_for(100).await;
    let times = w.call_times(w.queue.calls("ReceiveMessage"));
    let gaps: Vec<f64> = times.windows(2).map(|p| p[1] - p[0]).take(7).collect();
    assert_eq!(
        gaps,
        vec![1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0],
        "{times:?}"
    );
    assert_eq!(w.counter(|c| &c.receive_errors), 7);
}

#[tokio::test(start_paused = true)]
async fn no_message_is_taken_before_the_first_imds_poll_answers() {
    let mut w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), true);
    w.queue.push("1");
    w.run_for(3).await;
    assert!(w.queue.calls("ReceiveMessage").is_empty());
    // The first poll shows a spot notice, then answers: nothing is taken.
    w.spot(120).await;
    w.open();
    w.run_for(3).await;
    assert!(w.queue.calls("ReceiveMessage").is_empty());
    assert!(w.worker.started().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_spot_notice_hands_back_what_a_receive_in_flight_returns_unstarted() {
    let w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
    w.run_for(1).await;
    // A long poll is outstanding. A message arrives and the notice comes
    // in the same instant: the notice is acted on first.
    assert_eq!(w.queue.calls("ReceiveMessage").len(), 1);
    w.queue.push("5");
    w.spot(120).await;
    w.run_for(2).await;
    assert!(w.worker.started().is_empty(), "{:?}", w.worker.events());
    assert_eq!(w.counter(|c| &c.messages_returned_unstarted), 1);
    assert_eq!(w.queue.depth(), (1, 0));
    // No scale-in call after a spot notice.
    assert!(w
        .fleet
        .calls("TerminateInstanceInAutoScalingGroup")
        .is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_drain_stops_running_jobs_at_the_deadline_and_hands_them_back() {
    let w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
    let id = w.queue.push("1000");
    w.run_for(5).await;
    w.spot(120).await; // deadline: notice time - 25 s margin = t+100
    w.run_for(110).await;
    let end = w
        .worker
        .events()
        .into_iter()
        .find(|e| e.2 == "end")
        .expect("job ended");
    assert_eq!(w.at(end.0).round(), 100.0);
    assert!(end.3.contains("Deadline"), "{end:?}");
    // Re-sent in its place at once (an interruption spends no receive).
    assert_eq!(w.queue.deleted(), vec![id.clone()]);
    assert_eq!(w.queue.depth(), (1, 0), "{id} handed back at once");
    assert_eq!(w.counter(|c| &c.jobs_handed_back), 1);
}

#[tokio::test(start_paused = true)]
async fn at_the_deadline_a_slow_hand_back_gets_only_what_is_left_of_the_margin() {
    // Margin 12 s, grace 10 s: the settle gets 2 s (not the usual 10 s),
    // so the whole deadline path ends by the notice time.
    let w = World::start(
        cfg("[scale_in]\nenabled = false\n[interruption]\ndeadline_margin = \"12s\"\n"),
        MemFleet::new(None, 0, 1),
        false,
    );
    let id = w.queue.push("1000");
    w.run_for(5).await;
    // SQS takes 5 s to take the re-sent copy: past the 2 s budget.
    w.queue.lock().send_latency = Some(Duration::from_secs(5));
    w.spot(120).await; // deadline: t+5+120-12 = t+113
    w.run_for(118).await;
    let end = w
        .worker
        .events()
        .into_iter()
        .find(|e| e.2 == "end")
        .expect("job ended");
    assert_eq!(w.at(end.0).round(), 113.0);
    assert!(
        w.queue.deleted().is_empty(),
        "the hand-back was cut at 2 s: {id} comes back when its visibility lapses"
    );
    assert_eq!(w.queue.depth().1, 1, "still in flight");
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_then_the_runner_exits() {
    let mut w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
    w.queue.push("30");
    w.run_for(5).await;
    let _ = w.shutdown.take().expect("once").send(());
    w.run_for(5).await;
    assert!(!w.runner.is_finished(), "a job is still running");
    w.run_for(30).await;
    assert!(w.runner.is_finished());
    assert_eq!(
        w.queue.deleted().len(),
        1,
        "the job finished before the 90 s deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn stop_intake_then_idle_scale_in_is_accepted() {
    let w = World::start(
        cfg("[scale_in]\nidle_timeout = \"30s\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    w.run_for(1).await;
    w.rebalance().await;
    w.run_for(40).await;
    let calls = w.fleet.calls("TerminateInstanceInAutoScalingGroup");
    assert_eq!(w.call_times(calls), vec![30.0]);
    assert!(w.fleet.lock().terminated);
    // Terminating: no more receives after the first (abandoned) one.
    let receives = w.queue.calls("ReceiveMessage").len();
    w.queue.push("1");
    w.run_for(30).await;
    assert_eq!(w.queue.calls("ReceiveMessage").len(), receives);
    assert!(w.worker.started().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_refused_scale_in_resumes_work_even_after_stop_intake_and_backs_off() {
    // MinSize 1, desired 1: every scale-in is refused.
    let w = World::start(
        cfg("[scale_in]\nidle_timeout = \"30s\"\nretry_interval = \"60s\"\n"),
        MemFleet::new(Some("g"), 1, 1),
        false,
    );
    w.run_for(1).await;
    w.rebalance().await;
    w.run_for(35).await;
    assert_eq!(w.counter(|c| &c.scale_in_refusals), 1);
    // The refusal means the instance is needed: intake reopens.
    w.queue.push("1");
    w.run_for(5).await;
    assert_eq!(
        w.worker.started().len(),
        1,
        "intake reopened after the refusal"
    );
    // Then the refusals back off: 60 s, 120 s after each (idle 30 s is shorter).
    w.run_for(300).await;
    let times = w.call_times(w.fleet.calls("TerminateInstanceInAutoScalingGroup"));
    let gaps: Vec<f64> = times.windows(2).map(|p| p[1] - p[0]).collect();
    assert_eq!(times[0], 30.0, "{times:?}");
    assert!(
        gaps.len() >= 2 && gaps[1] >= 120.0 && gaps[1] <= 121.0,
        "{times:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_job_started_after_a_drain_ended_is_told_of_no_notice() {
    // A rebalance drain at MinSize: the scale-in is refused, the agent
    // works again, and the drain's notice must not reach its next job (a
    // worker that checkpoints and exits on a notice would yield for ever).
    let w = World::start(
        cfg("[scale_in]\nidle_timeout = \"30s\"\n[interruption]\nrebalance = \"drain\"\n"),
        MemFleet::new(Some("g"), 1, 1),
        false,
    );
    w.run_for(1).await;
    w.rebalance().await;
    w.run_for(35).await;
    assert_eq!(w.counter(|c| &c.scale_in_refusals), 1);
    w.queue.push("10");
    w.run_for(15).await;
    assert_eq!(w.worker.started().len(), 1);
    assert_eq!(w.queue.deleted().len(), 1);
    let told = w.worker.notices.lock().unwrap().clone();
    assert!(told.is_empty(), "{told:?}");
}

#[tokio::test(start_paused = true)]
async fn failing_receives_are_not_idleness() {
    let w = World::start(
        cfg("[scale_in]\nidle_timeout = \"30s\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    // Two minutes of denied receives (backoff 1, 2, 4 ... 30 s between).
    w.queue.fail_next("ReceiveMessage", "AccessDenied", 9);
    w.run_for(120).await;
    assert!(w.queue.calls("ReceiveMessage").len() >= 6);
    assert!(
        w.fleet
            .calls("TerminateInstanceInAutoScalingGroup")
            .is_empty(),
        "scaled in while the queue could not be read"
    );
    // Once receives answer (empty), the idle timer runs from the last failure.
    w.run_for(120).await;
    assert_eq!(
        w.fleet.calls("TerminateInstanceInAutoScalingGroup").len(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn an_instance_not_yet_listed_in_its_group_is_looked_up_again() {
    let fleet = MemFleet::new(None, 0, 2);
    let w = World::start(
        cfg("[scale_in]\nenabled = false\nprotect_busy = true\n"),
        fleet,
        false,
    );
    w.run_for(5).await;
    assert_eq!(w.fleet.calls("DescribeAutoScalingInstances").len(), 1);
    // Listed a little later (Describe calls are eventually consistent).
    w.fleet.lock().group = Some("g".into());
    w.run_for(60).await;
    assert_eq!(w.fleet.calls("DescribeAutoScalingInstances").len(), 2);
    w.queue.push("30");
    w.run_for(5).await;
    assert!(
        w.fleet.lock().protected,
        "a busy instance is protected once its group is known"
    );
}

#[tokio::test(start_paused = true)]
async fn a_standalone_instance_keeps_working_after_its_scale_in_finds_no_group() {
    // The default configuration on an instance in no group: the idle
    // scale-in is answered with a ValidationError that is not the MinSize
    // refusal (unclear), and the confirmation lists it in no group.
    let w = World::start(
        cfg("[scale_in]\nidle_timeout = \"30s\"\n"),
        MemFleet::new(None, 0, 1),
        false,
    );
    w.run_for(45).await;
    assert_eq!(
        w.fleet.calls("TerminateInstanceInAutoScalingGroup").len(),
        1
    );
    w.queue.push("1");
    w.run_for(30).await;
    assert_eq!(w.worker.started().len(), 1, "parked as terminating");
    // Nothing to scale in: not tried again.
    w.run_for(600).await;
    assert_eq!(
        w.fleet.calls("TerminateInstanceInAutoScalingGroup").len(),
        1
    );
    w.queue.push("1");
    w.run_for(30).await;
    assert_eq!(w.worker.started().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_standalone_instance_takes_work_after_a_rebalance() {
    // Found in no group (the idle scale-in's check), then a rebalance
    // recommendation (stop-intake, the default): nothing can take the
    // instance away, so it must not stop taking work.
    let w = World::start(
        cfg("[scale_in]\nidle_timeout = \"30s\"\n"),
        MemFleet::new(None, 0, 1),
        false,
    );
    w.run_for(70).await;
    assert_eq!(
        w.fleet.calls("TerminateInstanceInAutoScalingGroup").len(),
        1
    );
    w.rebalance().await;
    w.run_for(5).await;
    w.queue.push("1");
    w.run_for(30).await;
    assert_eq!(w.worker.started().len(), 1, "intake stopped for ever");
}

#[tokio::test(start_paused = true)]
async fn a_detached_instance_works_on_and_never_parks_as_terminating() {
    let w = World::start(
        cfg("[scale_in]\nidle_timeout = \"30s\"\nprotect_busy = true\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    w.queue.push("5");
    w.run_for(10).await;
    // Detached by an operator: out of the group.
    w.fleet.lock().group = None;
    w.notice(WatchEvent::LifecycleState {
        change: Change::New,
        state: TargetLifecycleState::Detached,
        previous: Some(TargetLifecycleState::InService),
        terminating: false,
    })
    .await;
    w.run_for(120).await;
    assert!(w
        .fleet
        .calls("TerminateInstanceInAutoScalingGroup")
        .is_empty());
    w.queue.push("1");
    w.run_for(30).await;
    assert_eq!(w.worker.started().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_rebalance_drain_scales_in_once_idle() {
    let w = World::start(
        cfg("[scale_in]\nidle_timeout = \"30s\"\n[interruption]\nrebalance = \"drain\"\n"),
        MemFleet::new(Some("g"), 0, 3),
        false,
    );
    w.queue.push("20");
    w.run_for(2).await;
    w.rebalance().await;
    w.run_for(60).await;
    // The job finished (no deadline on a rebalance drain), then 30 s idle.
    assert_eq!(w.queue.deleted().len(), 1);
    let times = w.call_times(w.fleet.calls("TerminateInstanceInAutoScalingGroup"));
    assert_eq!(times, vec![50.0]);
    assert_eq!(w.fleet.lock().desired, 2);
}

#[tokio::test(start_paused = true)]
async fn an_unclear_scale_in_answer_keeps_intake_closed_until_the_state_is_confirmed() {
    let w = World::start(
        cfg("[scale_in]\nidle_timeout = \"30s\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    // The answer is lost (a ValidationError that is not the MinSize
    // refusal), and the confirmation fails twice before it answers.
    w.fleet
        .fail_next("TerminateInstanceInAutoScalingGroup", "ValidationError", 1);
    w.fleet
        .fail_next("DescribeAutoScalingInstances", "Throttling", 2);
    // Idle from 0; the request waits for the long poll out at 30 s (20-40 s).
    w.run_for(41).await;
    let asked = w.call_times(w.fleet.calls("TerminateInstanceInAutoScalingGroup"));
    assert_eq!(asked, vec![40.0]);
    w.queue.push("1");
    w.run_for(25).await;
    assert!(
        w.worker.started().is_empty(),
        "intake stayed closed while unconfirmed"
    );
    w.run_for(10).await;
    // Read 10 s after the answer (two throttled tries 5 s apart), then
    // InService twice, 10 s apart (the fake never terminated): back to work.
    let confirms = w.call_times(w.fleet.calls("DescribeAutoScalingInstances"));
    assert_eq!(confirms, vec![50.0, 55.0, 60.0, 70.0]);
    assert_eq!(w.worker.started().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_unclear_scale_in_that_did_apply_is_not_reopened_on_one_stale_reading() {
    let w = World::start(
        cfg("[scale_in]\nidle_timeout = \"30s\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    // The terminate applied but its answer was lost; the first reading
    // still lists the instance InService.
    w.fleet
        .fail_next("TerminateInstanceInAutoScalingGroup", "ValidationError", 1);
    w.fleet.lock().state_override = Some("InService".into());
    w.run_for(41).await;
    w.queue.push("1");
    w.run_for(12).await;
    assert_eq!(w.fleet.calls("DescribeAutoScalingInstances").len(), 1);
    w.fleet.lock().state_override = Some("Terminating:Wait".into());
    w.run_for(30).await;
    assert_eq!(w.fleet.calls("DescribeAutoScalingInstances").len(), 2);
    assert!(
        w.worker.started().is_empty(),
        "work taken on a dying instance"
    );
}

#[tokio::test(start_paused = true)]
async fn lifecycle_terminated_heartbeats_retry_soon_and_completion_waits_for_jobs() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\n[interruption]\nlifecycle_hook = \"drain\"\nlifecycle_heartbeat_interval = \"20s\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    w.queue.push("100");
    w.run_for(10).await;
    w.fleet
        .fail_next("RecordLifecycleActionHeartbeat", "Throttling", 1);
    w.fleet
        .fail_next("CompleteLifecycleAction", "Throttling", 1);
    w.lifecycle_terminated().await;
    w.run_for(110).await;
    let beats = w.call_times(w.fleet.calls("RecordLifecycleActionHeartbeat"));
    // A failed heartbeat is retried after 5 s, not after the full 20 s.
    assert_eq!(beats, vec![10.0, 15.0, 35.0, 55.0, 75.0, 95.0], "{beats:?}");
    // The job ran to its end (no deadline), then the hook completes; the
    // first try fails and is retried 5 s later.
    assert_eq!(w.queue.deleted().len(), 1);
    let completes = w.call_times(w.fleet.calls("CompleteLifecycleAction"));
    assert_eq!(completes, vec![100.0, 105.0]);
    assert!(w.fleet.lock().lifecycle_completed);
}

#[tokio::test(start_paused = true)]
async fn the_hook_is_completed_only_once_the_long_poll_is_back() {
    let mut c = cfg("[scale_in]\nenabled = false\n[interruption]\nlifecycle_hook = \"drain\"\n");
    c.worker.concurrency = 2;
    let w = World::start(c, MemFleet::new(Some("g"), 0, 2), false);
    // One job of 10 s; the free slot's long poll is out until 20 s.
    w.queue.push("10");
    w.run_for(2).await;
    w.lifecycle_terminated().await;
    w.run_for(30).await;
    assert_eq!(w.queue.deleted().len(), 1);
    assert_eq!(
        w.call_times(w.fleet.calls("CompleteLifecycleAction")),
        vec![20.0]
    );
}

#[tokio::test(start_paused = true)]
async fn protection_is_not_refreshed_while_the_group_takes_the_instance_out() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\nprotect_busy = true\n[interruption]\nlifecycle_hook = \"drain\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    // A 40-minute job; the group starts terminating the instance at 1 min.
    w.queue.push("2400");
    w.run_for(60).await;
    assert_eq!(w.fleet.calls("SetInstanceProtection").len(), 1);
    w.fleet.lock().state_override = Some("Terminating:Wait".into());
    w.lifecycle_terminated().await;
    // Past the 10-minute refresh, several times over: no call AWS refuses.
    w.run_for(1800).await;
    assert_eq!(
        w.fleet.calls("SetInstanceProtection").len(),
        1,
        "{:?}",
        w.fleet.calls("SetInstanceProtection")
    );
}

#[tokio::test(start_paused = true)]
async fn protection_is_set_once_for_back_to_back_jobs_and_dropped_when_idle() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\nprotect_busy = true\nidle_timeout = \"30s\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    for _ in 0..6 {
        w.queue.push("10");
    }
    w.run_for(100).await;
    assert_eq!(w.queue.deleted().len(), 6);
    let calls: Vec<String> = w
        .fleet
        .calls("SetInstanceProtection")
        .into_iter()
        .map(|c| c.1)
        .collect();
    assert_eq!(calls, vec!["i-0test true", "i-0test false"]);
    assert!(!w.fleet.lock().protected);
    // The liveness mark: a time when protecting, `idle` when not (an old
    // time left behind would make a later busy spell whose mark fails look
    // like a dead agent).
    let marks: Vec<String> = w
        .fleet
        .calls("CreateTags")
        .into_iter()
        .map(|c| c.1)
        .collect();
    assert_eq!(marks.len(), 2, "{marks:?}");
    assert!(
        marks[0]
            .strip_prefix("i-0test ")
            .is_some_and(|v| v.parse::<i64>().is_ok()),
        "{marks:?}"
    );
    assert_eq!(marks[1], "i-0test idle");
}

#[tokio::test(start_paused = true)]
async fn a_job_that_cannot_start_is_handed_back_uncounted_and_pauses_intake() {
    // The start-failure breaker off, to see the pauses alone.
    let w = World::start(
        cfg("[scale_in]\nenabled = false\n[health]\nmax_start_failures = 0\n"),
        MemFleet::new(None, 0, 1),
        false,
    );
    w.queue.push("0 nostart");
    w.run_for(40).await;
    // Tried at 0, then after pauses of 5, 10, 20 s: not a hot loop.
    let tries: Vec<f64> = w
        .worker
        .events()
        .iter()
        .filter(|e| e.2 == "nostart")
        .map(|e| w.at(e.0).round())
        .collect();
    assert_eq!(tries, vec![0.0, 5.0, 15.0, 35.0]);
    assert_eq!(w.counter(|c| &c.jobs_failed), 0);
    assert_eq!(w.counter(|c| &c.jobs_not_started), 4);
    // Handed back at once each time (visibility 0), never deleted.
    assert!(w.queue.deleted().is_empty());
    let vis: Vec<String> = w
        .queue
        .calls("ChangeMessageVisibility")
        .into_iter()
        .map(|c| c.1)
        .collect();
    assert!(vis.iter().all(|v| v.ends_with(" 0")), "{vis:?}");
}

#[tokio::test(start_paused = true)]
async fn a_14_hour_job_never_asks_past_the_12_hour_cap_and_stops_before_it() {
    let w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
    w.queue.push(&(14 * 3600).to_string());
    // 12 h of heartbeats (every 20 s), in 10 s steps.
    for _ in 0..(12 * 360) {
        advance(Duration::from_secs(10)).await;
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    w.run_for(60).await;
    // Every heartbeat was accepted by the fake, which rejects anything past
    // 12 h from receipt as SQS does: none failed.
    let vis = w.queue.calls("ChangeMessageVisibility");
    assert!(vis.len() > 2000, "{}", vis.len());
    assert!(
        w.queue.lock().rejected.is_empty(),
        "{:?}",
        w.queue.lock().rejected
    );
    let end = w
        .worker
        .events()
        .into_iter()
        .find(|e| e.2 == "end")
        .expect("stopped");
    assert!(end.3.contains("LeaseLimit"), "{end:?}");
    let at = w.at(end.0);
    assert!(
        at < 12.0 * 3600.0 && at > 12.0 * 3600.0 - 120.0,
        "stopped at {at}"
    );
    // No checkpoint: stopped as failed, back after the error visibility.
    assert_eq!(w.counter(|c| &c.jobs_timed_out), 1);
    assert!(w.queue.deleted().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_apps_checkpoint_answer_is_held_to_checkpoint_max_bytes() {
    // The scripted worker answers as an http app does (no files): its
    // checkpoint "ckpt-of-<id>" is longer than the 4 bytes allowed.
    let mut c = cfg(no_scale_in());
    c.worker.checkpoint_max_bytes = 4;
    let w = World::start(c, MemFleet::new(None, 0, 1), false);
    w.queue.push("1000 ckpt");
    w.run_for(2).await;
    w.spot(120).await;
    w.run_for(110).await;
    let st = w.queue.lock();
    assert_eq!(st.messages.len(), 1);
    assert!(
        !st.messages[0]
            .attributes
            .contains_key("spotguard.checkpoint"),
        "{:?}",
        st.messages[0].attributes
    );
}

#[tokio::test(start_paused = true)]
async fn on_fifo_a_job_stopped_at_the_12_hour_cap_re_sends_its_checkpoint_only_when_opted_in() {
    let mut c = cfg(no_scale_in());
    c.queue.url = "https://sqs.us-east-1.amazonaws.com/123456789012/jobs.fifo".into();
    let w = World::start(c, MemFleet::new(None, 0, 1), false);
    w.queue
        .push_group(&format!("{} ckpt", 14 * 3600), Some("g"));
    for _ in 0..(12 * 360) {
        advance(Duration::from_secs(10)).await;
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    w.run_for(60).await;
    assert_eq!(w.counter(|c| &c.jobs_timed_out), 1);
    // The group's order holds: no re-send at its tail.
    assert!(w.queue.calls("SendMessage").is_empty());
}

#[tokio::test(start_paused = true)]
async fn fifo_groups_run_one_message_at_a_time_in_order_and_a_failure_blocks_the_rest() {
    let mut c = cfg(no_scale_in());
    c.queue.url = "https://sqs.us-east-1.amazonaws.com/123456789012/jobs.fifo".into();
    c.worker.concurrency = 4;
    let w = World::start(c, MemFleet::new(None, 0, 1), true);
    // Group g: 10 s, a failure, then 10 s; group h: 5 s, 5 s.
    let g1 = w.queue.push_group("10", Some("g"));
    let g2 = w.queue.push_group("10 fail", Some("g"));
    let g3 = w.queue.push_group("10", Some("g"));
    let h1 = w.queue.push_group("5", Some("h"));
    let h2 = w.queue.push_group("5", Some("h"));
    let mut w = w;
    w.open();
    w.run_for(25).await;
    let ev = w.worker.events();
    let span = |id: &str| {
        let s = ev
            .iter()
            .find(|e| e.1 == id && e.2 == "start")
            .map(|e| w.at(e.0).round());
        let e = ev
            .iter()
            .find(|e| e.1 == id && e.2 == "end")
            .map(|e| w.at(e.0).round());
        (s, e)
    };
    // Never two of a group at once, each after the one before it.
    assert_eq!(span(&g1), (Some(0.0), Some(10.0)));
    assert_eq!(span(&g2), (Some(10.0), Some(20.0)), "{ev:?}");
    assert_eq!(span(&h1), (Some(0.0), Some(5.0)));
    assert_eq!(span(&h2), (Some(5.0), Some(10.0)));
    // g2 failed: g3 is not run before g2 comes back (error visibility 30 s).
    assert_eq!(span(&g3), (None, None), "{ev:?}");
    w.run_for(60).await;
    let ev = w.worker.events();
    let starts: Vec<&str> = ev
        .iter()
        .filter(|e| e.2 == "start" && (e.1 == g2 || e.1 == g3))
        .map(|e| e.1.as_str())
        .collect();
    assert_eq!(
        starts,
        vec![g2.as_str(), g2.as_str()],
        "g2 retried before g3"
    );
}

#[tokio::test(start_paused = true)]
async fn after_a_spot_hibernate_the_resumed_agent_takes_work_again() {
    let w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
    w.queue.push("1000");
    w.run_for(5).await;
    w.spot_action(120, SpotAction::Hibernate).await;
    w.run_for(110).await;
    assert_eq!(
        w.queue.depth(),
        (1, 0),
        "stopped at the deadline and handed back"
    );
    let started = w.worker.started().len();
    // Hibernated for an hour: the wall clock jumps, the monotonic one does not.
    w.clock
        .offset_secs
        .fetch_add(3600, std::sync::atomic::Ordering::SeqCst);
    w.run_for(3).await;
    assert!(
        w.worker.started().len() > started,
        "intake reopened after the resume: {:?}",
        w.worker.events()
    );
}

#[tokio::test(start_paused = true)]
async fn a_terminate_notice_is_not_undone_by_a_clock_jump() {
    let w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
    w.spot(120).await;
    w.run_for(2).await;
    w.clock
        .offset_secs
        .fetch_add(3600, std::sync::atomic::Ordering::SeqCst);
    w.queue.push("1");
    w.run_for(3).await;
    assert!(w.worker.started().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_warm_pool_transition_drains_completes_the_hook_and_inservice_reopens() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\n[interruption]\nlifecycle_hook = \"warm\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    w.queue.push("10");
    w.run_for(2).await;
    w.notice(WatchEvent::LifecycleState {
        change: Change::New,
        state: TargetLifecycleState::Warmed("Running".into()),
        previous: Some(TargetLifecycleState::InService),
        terminating: false,
    })
    .await;
    w.queue.push("1");
    w.run_for(15).await;
    // The running job finished, the new message was not taken, the hook completed.
    assert_eq!(w.worker.started().len(), 1);
    assert_eq!(
        w.call_times(w.fleet.calls("CompleteLifecycleAction")),
        vec![10.0]
    );
    // The hook held the transition while the job ran: heartbeats for it
    // (the default 20 s interval, the first at once).
    assert_eq!(
        w.call_times(w.fleet.calls("RecordLifecycleActionHeartbeat")),
        vec![2.0]
    );
    // Back in service from the pool: work again.
    w.notice(WatchEvent::LifecycleState {
        change: Change::New,
        state: TargetLifecycleState::InService,
        previous: Some(TargetLifecycleState::Warmed("Running".into())),
        terminating: false,
    })
    .await;
    w.run_for(3).await;
    assert_eq!(w.worker.started().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn on_fifo_a_checkpoint_is_re_sent_only_when_opted_in() {
    for resend in [false, true] {
        let mut c = cfg(no_scale_in());
        c.queue.url = "https://sqs.us-east-1.amazonaws.com/123456789012/jobs.fifo".into();
        c.worker.fifo_resend_checkpoint = resend;
        let w = World::start(c, MemFleet::new(None, 0, 1), false);
        w.queue.push_group("1000 ckpt", Some("g"));
        w.run_for(2).await;
        w.spot(120).await;
        w.run_for(100).await;
        let sends = w.queue.calls("SendMessage").len();
        assert_eq!(sends, usize::from(resend), "resend {resend}");
        // Either way the work is there again, once.
        assert_eq!(w.queue.depth(), (1, 0), "resend {resend}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_job_comes_back_without_spending_a_receive_up_to_its_cap() {
    for (before, resent) in [(None, true), (Some("9"), true), (Some("10"), false)] {
        let w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
        let id = w.queue.push("1000");
        if let Some(n) = before {
            let mut st = w.queue.lock();
            st.messages[0].attributes.insert(
                "spotguard.interruptions".into(),
                crate::aws::Attr::string(n),
            );
        }
        w.run_for(2).await;
        w.spot(120).await;
        w.run_for(110).await;
        let st = w.queue.lock();
        assert_eq!(st.messages.len(), 1, "{before:?}");
        let m = &st.messages[0];
        if resent {
            // A new message in its place: no receive spent, one
            // interruption more, the original deleted.
            assert_ne!(m.id, id, "{before:?}");
            assert_eq!(m.receive_count, 0, "{before:?}");
            let want = before
                .map_or(1, |n| n.parse::<u32>().unwrap() + 1)
                .to_string();
            assert_eq!(m.attributes["spotguard.interruptions"].value, want);
            assert_eq!(st.deleted, vec![id.clone()]);
        } else {
            // Past queue.max_interruptions (10): handed back, its receive counts.
            assert_eq!(m.id, id);
            assert_eq!(m.receive_count, 1);
            assert!(st.deleted.is_empty());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn failures_in_a_row_trip_the_breaker_close_intake_and_replace_the_instance() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\n[health]\nmax_consecutive_failures = 3\non_unhealthy = \"replace\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    for _ in 0..6 {
        w.queue.push("1 fail");
    }
    w.run_for(10).await;
    // Three failures, then no more intake: the other messages stay queued
    // with their receive counts untouched.
    assert_eq!(w.worker.started().len(), 3);
    assert_eq!(w.counter(|c| &c.jobs_failed), 3);
    assert_eq!(w.counter(|c| &c.unhealthy_trips), 1);
    assert!(w.status.unhealthy().is_some());
    assert_eq!(w.status.healthz().0, 503);
    assert!(w.fleet.lock().unhealthy, "SetInstanceHealth Unhealthy");
    w.run_for(60).await;
    assert_eq!(w.worker.started().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn one_poison_message_failing_again_and_again_does_not_trip_the_breaker() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\n[health]\nmax_consecutive_failures = 3\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    w.queue.push("1 fail");
    // Back every 30 s (error_visibility_timeout): five failures of one message.
    w.run_for(150).await;
    assert_eq!(w.counter(|c| &c.jobs_failed), 5);
    assert_eq!(w.counter(|c| &c.unhealthy_trips), 0);
    assert!(w.status.unhealthy().is_none());
    // Three different messages failing in a row still do.
    w.queue.lock().messages.clear();
    for _ in 0..3 {
        w.queue.push("1 fail");
    }
    w.run_for(10).await;
    assert_eq!(w.counter(|c| &c.unhealthy_trips), 1);
}

#[tokio::test(start_paused = true)]
async fn the_unhealthy_mark_is_retried_and_sent_again_on_every_trip() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\n[health]\nmax_consecutive_failures = 2\non_unhealthy = \"replace\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    // Throttled twice: tried again 1 s and 2 s later, then marked.
    w.fleet.fail_next("SetInstanceHealth", "Throttling", 2);
    w.queue.push("1 fail");
    w.queue.push("1 fail");
    w.run_for(10).await;
    let times = w.call_times(w.fleet.calls("SetInstanceHealth"));
    assert_eq!(times.len(), 3, "{times:?}");
    assert!(w.fleet.lock().unhealthy);
    // Half-open after the cool-down: the job let through fails, and the
    // mark goes out again (the group may not have acted on the first).
    w.fleet.lock().unhealthy = false;
    w.queue.push("1 fail");
    w.run_for(620).await;
    assert_eq!(w.worker.started().len(), 3);
    assert_eq!(w.fleet.calls("SetInstanceHealth").len(), 4);
    assert!(w.fleet.lock().unhealthy);
}

#[tokio::test(start_paused = true)]
async fn a_mark_still_failing_when_the_breaker_closes_is_dropped() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\n[health]\nmax_consecutive_failures = 2\non_unhealthy = \"replace\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    // Auto Scaling throttles every mark for a long while.
    w.fleet.fail_next("SetInstanceHealth", "Throttling", 1000);
    w.queue.push("1 fail");
    w.queue.push("1 fail");
    w.run_for(10).await;
    assert!(!w.fleet.calls("SetInstanceHealth").is_empty());
    // The cool-down ends, the job let through succeeds: healthy again.
    w.queue.lock().messages.retain(|m| m.body != "1 fail");
    w.queue.push("1");
    w.run_for(620).await;
    assert!(w.status.unhealthy().is_none());
    let before = w.fleet.calls("SetInstanceHealth").len();
    w.run_for(600).await;
    assert_eq!(
        w.fleet.calls("SetInstanceHealth").len(),
        before,
        "kept marking a healthy instance"
    );
}

#[tokio::test(start_paused = true)]
async fn the_half_open_breaker_lets_one_job_through_at_any_concurrency() {
    for concurrency in [4u32, 8] {
        let mut c = cfg("[scale_in]\nenabled = false\n[health]\nmax_consecutive_failures = 2\n");
        c.worker.concurrency = concurrency;
        let w = World::start(c, MemFleet::new(None, 0, 1), false);
        for _ in 0..20 {
            w.queue.push("1 fail");
        }
        w.run_for(10).await;
        assert!(w.status.unhealthy().is_some());
        let tripped = w.worker.started().len();
        assert_eq!(tripped, concurrency as usize, "the first batch ran");
        // Past the cool-down: one job through; it fails, closed again.
        w.run_for(620).await;
        assert_eq!(
            w.worker.started().len(),
            tripped + 1,
            "concurrency {concurrency}"
        );
        assert!(w.status.unhealthy().is_some());
    }
}

#[tokio::test(start_paused = true)]
async fn a_job_that_sigkill_cannot_end_makes_the_instance_unhealthy_for_good() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\n[health]\non_unhealthy = \"replace\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    *w.worker.stuck.lock().unwrap() = Some("group 42 did not end after SIGKILL".into());
    w.run_for(15).await;
    assert!(w.status.unhealthy().is_some_and(|u| u.contains("SIGKILL")));
    assert!(w.fleet.lock().unhealthy, "replaced");
    // No cool-down ends it: no half-open try, ever.
    w.queue.push("1");
    w.run_for(1800).await;
    assert!(w.worker.started().is_empty());
}

#[tokio::test(start_paused = true)]
async fn copies_of_one_re_sent_job_count_once_for_the_breaker() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\n[health]\nmax_consecutive_failures = 3\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    // Two copies of one job (re-sent after interruptions: new ids, the
    // first id in an attribute) and one other job, all failing.
    for _ in 0..2 {
        w.queue.push("1 fail");
        let mut st = w.queue.lock();
        let last = st.messages.len() - 1;
        st.messages[last].attributes.insert(
            "spotguard.original-message-id".into(),
            crate::aws::Attr::string("first-id"),
        );
    }
    w.queue.push("1 fail");
    w.run_for(5).await;
    assert_eq!(w.counter(|c| &c.jobs_failed), 3);
    assert_eq!(
        w.counter(|c| &c.unhealthy_trips),
        0,
        "two jobs failed, not three"
    );
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_count_of_failures() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\n[health]\nmax_consecutive_failures = 3\n"),
        MemFleet::new(None, 0, 1),
        false,
    );
    for body in ["1 fail", "1 fail", "1", "1 fail", "1 fail", "1"] {
        w.queue.push(body);
    }
    w.run_for(20).await;
    assert_eq!(w.worker.started().len(), 6);
    assert!(w.status.unhealthy().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_failing_health_command_gates_intake_until_it_passes() {
    let check = Arc::new(FlagCheck(
        std::sync::atomic::AtomicBool::new(false),
        std::sync::atomic::AtomicU32::new(0),
    ));
    let w = World::start_with(
        cfg("[scale_in]\nenabled = false\n[health]\ncommand = [\"nvidia-smi\"]\ninterval = \"30s\"\n"),
        MemFleet::new(None, 0, 1),
        false,
        Some(check.clone()),
    );
    w.queue.push("1");
    w.run_for(40).await;
    // Checked at start and 30 s later; failing, so nothing was taken.
    assert_eq!(check.1.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(w.queue.calls("ReceiveMessage").is_empty());
    assert_eq!(w.status.healthz().0, 503);
    check.0.store(true, std::sync::atomic::Ordering::SeqCst);
    w.run_for(30).await;
    assert_eq!(w.worker.started().len(), 1);
    assert!(w.status.unhealthy().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_missing_program_closes_intake_before_any_receive() {
    let w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
    *w.worker.unready.lock().unwrap() = Some("worker.command /opt/run-job: not found".into());
    w.queue.push("1");
    w.run_for(30).await;
    assert!(
        w.queue.calls("ReceiveMessage").is_empty(),
        "a receive was spent"
    );
    assert_eq!(w.status.healthz().0, 503);
    assert_eq!(
        w.status.unhealthy().as_deref(),
        Some("worker.command /opt/run-job: not found")
    );
    // Installed: intake opens at the next check (10 s), no restart needed.
    *w.worker.unready.lock().unwrap() = None;
    w.run_for(12).await;
    assert_eq!(w.worker.started().len(), 1);
    assert!(w.status.unhealthy().is_none());
}

#[tokio::test(start_paused = true)]
async fn three_jobs_that_cannot_start_make_the_instance_unhealthy() {
    let w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
    w.queue.push("0 nostart");
    w.run_for(600).await;
    let tries = w
        .worker
        .events()
        .iter()
        .filter(|e| e.2 == "nostart")
        .count();
    assert_eq!(tries, 3, "at most 3 receives burnt by this instance");
    assert!(w
        .status
        .unhealthy()
        .is_some_and(|u| u.contains("could not start")));
}

#[tokio::test(start_paused = true)]
async fn sigterm_before_the_first_imds_answer_still_exits() {
    let mut w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), true);
    w.run_for(2).await;
    let _ = w.shutdown.take().expect("once").send(());
    w.run_for(2).await;
    assert!(w.runner.is_finished(), "the agent hung waiting for IMDS");
}

#[tokio::test(start_paused = true)]
async fn the_breaker_lets_a_job_through_after_its_cool_down_and_a_success_closes_it() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\n[health]\nmax_consecutive_failures = 2\n"),
        MemFleet::new(None, 0, 1),
        false,
    );
    w.queue.push("1 fail");
    w.queue.push("1 fail");
    w.run_for(5).await;
    assert!(w.status.unhealthy().is_some());
    // The downstream outage ends: only good work is left.
    w.queue.lock().messages.retain(|m| m.body != "1 fail");
    w.queue.push("1");
    w.run_for(60).await;
    assert_eq!(w.worker.started().len(), 2, "closed during the cool-down");
    w.run_for(600).await;
    // Half-open: one job through; it succeeds and the breaker closes.
    assert_eq!(w.worker.started().len(), 3);
    assert!(w.status.unhealthy().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_replacement_waits_until_no_job_runs() {
    let mut c = cfg("[scale_in]\nenabled = false\n[health]\nmax_consecutive_failures = 2\non_unhealthy = \"replace\"\n");
    c.worker.concurrency = 3;
    let w = World::start(c, MemFleet::new(Some("g"), 0, 2), false);
    w.queue.push("100");
    w.queue.push("1 fail");
    w.queue.push("1 fail");
    w.run_for(10).await;
    assert!(w.status.unhealthy().is_some());
    assert!(!w.fleet.lock().unhealthy, "not while the long job runs");
    w.run_for(100).await;
    assert_eq!(w.queue.deleted().len(), 1, "the long job finished");
    assert!(w.fleet.lock().unhealthy, "marked once idle");
}

#[tokio::test(start_paused = true)]
async fn a_busy_instance_reasserts_its_protection() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\nprotect_busy = true\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    w.queue.push("1500");
    w.run_for(1300).await;
    let on: Vec<f64> = w
        .fleet
        .calls("SetInstanceProtection")
        .into_iter()
        .filter(|c| c.1.ends_with("true"))
        .map(|c| w.at(c.0).round())
        .collect();
    assert_eq!(
        on,
        vec![0.0, 600.0, 1200.0],
        "re-asserted every 10 minutes while busy"
    );
}

/// The fleet calls of `ops`, in order: (seconds since start, op, detail).
fn sequence(w: &World, ops: &[&str]) -> Vec<(f64, &'static str, String)> {
    w.fleet
        .lock()
        .log
        .calls
        .iter()
        .filter(|c| ops.contains(&c.1))
        .map(|c| (w.at(c.0).round(), c.1, c.2.clone()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_busy_agent_marks_itself_alive_with_each_protection() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\nprotect_busy = true\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    w.queue.push("1500");
    w.run_for(1300).await;
    let seq: Vec<(f64, &str)> = sequence(&w, &["CreateTags", "SetInstanceProtection"])
        .into_iter()
        .map(|(t, op, _)| (t, op))
        .collect();
    assert_eq!(
        seq,
        vec![
            (0.0, "CreateTags"),
            (0.0, "SetInstanceProtection"),
            (600.0, "CreateTags"),
            (600.0, "SetInstanceProtection"),
            (1200.0, "CreateTags"),
            (1200.0, "SetInstanceProtection"),
        ],
        "the mark with each protection, again at every re-assertion"
    );
    // The value is the wall-clock time in Unix seconds.
    let first = &w.fleet.calls("CreateTags")[0].1;
    assert_eq!(
        first,
        &format!("i-0test {}", start_time().timestamp()),
        "{first}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_mark_is_written_again_within_a_minute_and_a_refused_one_is_not() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\nprotect_busy = true\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    // Throttled twice: protection is set regardless, and the mark is
    // tried again 15 s, then 30 s later, not 10 minutes later.
    w.fleet.fail_next("CreateTags", "RequestLimitExceeded", 2);
    w.queue.push("1500");
    w.run_for(700).await;
    let marks: Vec<f64> = w.call_times(w.fleet.calls("CreateTags"));
    assert_eq!(marks, vec![0.0, 15.0, 45.0, 645.0]);
    // EC2 unreachable for good: 15, 30, 60 ... s apart, then every 10
    // minutes, not a protection call every 15 s.
    let waits: Vec<u64> = (1..=8)
        .map(|n| crate::runner::mark_retry_after(n).as_secs())
        .collect();
    assert_eq!(waits, [15, 30, 60, 120, 240, 480, 600, 600]);
    assert!(w.fleet.lock().protected);

    // Refused by IAM: no faster retry (it would change nothing), the
    // normal 10-minute cadence.
    let w = World::start(
        cfg("[scale_in]\nenabled = false\nprotect_busy = true\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    w.fleet.fail_next("CreateTags", "UnauthorizedOperation", 3);
    w.queue.push("1500");
    w.run_for(1300).await;
    assert_eq!(
        w.call_times(w.fleet.calls("CreateTags")),
        vec![0.0, 600.0, 1200.0]
    );
    assert!(w.fleet.lock().protected);
}

#[tokio::test(start_paused = true)]
async fn an_unclear_answer_then_standby_resumes_work() {
    let w = World::start(
        cfg("[scale_in]\nidle_timeout = \"30s\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    w.fleet
        .fail_next("TerminateInstanceInAutoScalingGroup", "RequestTimeout", 1);
    w.fleet.lock().state_override = Some("Standby".into());
    w.run_for(45).await;
    w.queue.push("1");
    w.run_for(25).await;
    assert_eq!(
        w.worker.started().len(),
        1,
        "Standby is not leaving: back to work"
    );
}

#[tokio::test(start_paused = true)]
async fn fifo_receives_ask_for_one_message() {
    let mut c = cfg(no_scale_in());
    c.queue.url = "https://sqs.us-east-1.amazonaws.com/123456789012/jobs.fifo".into();
    c.worker.concurrency = 4;
    let w = World::start(c, MemFleet::new(None, 0, 1), false);
    w.run_for(2).await;
    let calls = w.queue.calls("ReceiveMessage");
    assert!(
        !calls.is_empty() && calls.iter().all(|c| c.1 == "max=1"),
        "{calls:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_warm_pool_completion_without_a_waiting_action_is_tried_once() {
    let w = World::start(
        cfg("[scale_in]\nenabled = false\n[interruption]\nlifecycle_hook = \"warm\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
    );
    w.fleet.lock().no_lifecycle_action = true;
    w.notice(WatchEvent::LifecycleState {
        change: Change::New,
        state: TargetLifecycleState::Warmed("Running".into()),
        previous: Some(TargetLifecycleState::InService),
        terminating: false,
    })
    .await;
    w.run_for(60).await;
    assert_eq!(w.fleet.calls("CompleteLifecycleAction").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_job_that_ran_across_a_hibernation_is_handed_back_then_intake_reopens() {
    let w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
    w.run_for(2).await;
    // The notice comes; the pause happens before the deadline stopped the job.
    w.spot_action(120, SpotAction::Hibernate).await;
    w.run_for(1).await;
    let id = w.queue.push("1000");
    w.run_for(1).await;
    // (intake is closed by the notice: the job is started by hand below)
    assert!(w.worker.started().is_empty());
    w.clock
        .offset_secs
        .fetch_add(3600, std::sync::atomic::Ordering::SeqCst);
    w.run_for(3).await;
    // Resumed: intake reopens and the message runs.
    assert_eq!(w.worker.started(), vec![id]);
}

fn following(extra: &str) -> Config {
    cfg(&format!(
        "[scale_in]\nprotect_busy = true\nfollow_intake = true\nintake_check = \"60s\"\nidle_timeout = \"5m\"\n{extra}"
    ))
}

#[tokio::test(start_paused = true)]
async fn a_closed_intake_lets_the_running_job_finish_then_scales_in_with_a_decrement() {
    // A fallback agent under a load that never stops: a job always waits.
    let w = World::start(following(""), MemFleet::new(Some("g"), 0, 3), false);
    for _ in 0..20 {
        w.queue.push("50");
    }
    w.run_for(70).await;
    assert_eq!(w.worker.started().len(), 2);
    // The controller closes the group's intake (failing back).
    w.fleet.lock().intake_closed = true;
    w.run_for(150).await;
    // Read at 120 s: the job started at 100 s runs to its end, no new one
    // starts, and the instance leaves at once (no idle timeout) with the
    // group's desired capacity decremented (no replacement).
    assert_eq!(w.worker.started().len(), 3);
    assert_eq!(w.queue.deleted().len(), 3, "every job started finished");
    let calls = w.fleet.calls("TerminateInstanceInAutoScalingGroup");
    assert_eq!(w.call_times(calls), vec![150.0]);
    let st = w.fleet.lock();
    assert!(st.terminated);
    assert_eq!(st.desired, 2);
}

#[tokio::test(start_paused = true)]
async fn an_intake_reopened_before_the_job_ends_takes_work_again() {
    let w = World::start(following(""), MemFleet::new(Some("g"), 0, 3), false);
    for _ in 0..20 {
        w.queue.push("200");
    }
    w.run_for(10).await;
    w.fleet.lock().intake_closed = true;
    w.run_for(60).await;
    // Failed over again (the primary short): the tag reads open.
    w.fleet.lock().intake_closed = false;
    w.run_for(180).await;
    // Read open at 120 s, before the job's end at 200 s: the next starts.
    assert!(w.fleet.calls("DescribeAutoScalingGroups").len() >= 3);
    assert!(w.worker.started().len() >= 2, "{:?}", w.worker.started());
    assert!(!w.fleet.lock().terminated);
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_does_not_follow_the_intake_tag_never_reads_it() {
    // In the queue's own region (the primary), unset follow_intake is off.
    let w = World::start(
        cfg("[scale_in]\nprotect_busy = true\n"),
        MemFleet::new(Some("g"), 0, 3),
        false,
    );
    w.fleet.lock().intake_closed = true;
    for _ in 0..3 {
        w.queue.push("20");
    }
    w.run_for(90).await;
    assert_eq!(w.worker.started().len(), 3);
    assert!(w.fleet.calls("DescribeAutoScalingGroups").is_empty());
}

#[tokio::test(start_paused = true)]
async fn handing_back_from_a_group_already_below_its_instances_leaves_without_a_decrement() {
    // Target tracking took the fallback's desired capacity to 0 (its
    // MinSize) while this busy instance was protected: a decrement would be
    // refused ("desiredSize equals minSize") for ever. The agent leaves
    // without it; as the group runs more than its desired, none replaces it.
    let w = World::start(following(""), MemFleet::new(Some("g"), 0, 0), false);
    w.fleet.lock().intake_closed = true;
    w.queue.push("30");
    w.run_for(5).await;
    w.run_for(60).await;
    let calls: Vec<String> = w
        .fleet
        .calls("TerminateInstanceInAutoScalingGroup")
        .into_iter()
        .map(|c| c.1)
        .collect();
    assert_eq!(calls, ["i-0test decrement=false"]);
    let st = w.fleet.lock();
    assert!(st.terminated);
    assert_eq!(st.desired, 0);
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_follows_the_intake_tag_reads_it_without_protection_or_hook() {
    // The packaged defaults: no protect_busy, no lifecycle hook.
    let w = World::start(
        cfg("[scale_in]\nfollow_intake = true\nidle_timeout = \"5m\"\n"),
        MemFleet::new(Some("g"), 0, 3),
        false,
    );
    w.fleet.lock().intake_closed = true;
    for _ in 0..3 {
        w.queue.push("20");
    }
    w.run_for(30).await;
    assert!(!w.fleet.calls("DescribeAutoScalingGroups").is_empty());
    assert!(w.worker.started().is_empty(), "{:?}", w.worker.started());
    assert!(
        w.fleet.lock().terminated,
        "idle with intake closed: gone at once"
    );
}

/// A spot notice never leads to a decrement of the group, with scale-in on:
/// the drained agent stays idle well past its idle timeout and asks
/// nothing (the group must replace the reclaimed capacity).
#[tokio::test(start_paused = true)]
async fn a_spot_notice_never_decrements_the_group_even_with_scale_in_on() {
    let w = World::start(
        cfg("[scale_in]\nidle_timeout = \"10s\"\n"),
        MemFleet::new(Some("g"), 0, 3),
        false,
    );
    w.queue.push("5");
    w.run_for(8).await;
    w.spot(600).await;
    // Idle for ten times the idle timeout after the job, before the reclaim.
    w.run_for(100).await;
    assert_eq!(w.queue.deleted().len(), 1, "the job before the notice ran");
    assert!(
        w.fleet
            .calls("TerminateInstanceInAutoScalingGroup")
            .is_empty(),
        "a spot-noticed instance asked to be terminated"
    );
    assert_eq!(w.fleet.lock().desired, 3);
    // The control: without the notice the same agent scales in.
    let w = World::start(
        cfg("[scale_in]\nidle_timeout = \"10s\"\n"),
        MemFleet::new(Some("g"), 0, 3),
        false,
    );
    w.queue.push("5");
    w.run_for(40).await;
    assert_eq!(
        w.fleet.calls("TerminateInstanceInAutoScalingGroup").len(),
        1
    );
}

/// Two heartbeats failing in a row (an SQS blip) must not let the lease
/// lapse: the job would run twice. The failed one is tried again within
/// seconds.
#[tokio::test(start_paused = true)]
async fn a_lease_another_consumer_took_is_seen_as_lost_with_sqss_own_answer() {
    use crate::aws::Queue as _;
    let w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
    w.queue.push("200");
    w.run_for(5).await;
    // Two heartbeats fail with all their retries: the 60 s lease lapses.
    w.queue
        .fail_next("ChangeMessageVisibility", "ServiceUnavailable", 8);
    w.run_for(70).await;
    assert_eq!(
        w.counter(|c| &c.lost_ownership),
        0,
        "an expired handle is OK on SQS"
    );
    // Another consumer receives it; the next heartbeat is refused as SQS
    // refuses it (InvalidParameterValue, not moto's codes).
    let other = w
        .queue
        .receive(1, Duration::ZERO, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(other.len(), 1);
    // Counted when the job ends (at 200 s).
    w.run_for(150).await;
    assert_eq!(w.counter(|c| &c.lost_ownership), 1);
    assert!(w
        .queue
        .lock()
        .rejected
        .iter()
        .any(|(op, code)| *op == "ChangeMessageVisibility" && code == "InvalidParameterValue"));
}

#[tokio::test(start_paused = true)]
async fn a_failed_heartbeat_is_tried_again_before_the_lease_lapses() {
    let w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
    w.queue.push("150");
    w.run_for(5).await;
    // Visibility 60 s, heartbeats every 20 s: the next two calls fail.
    w.queue
        .fail_next("ChangeMessageVisibility", "ServiceUnavailable", 2);
    w.run_for(160).await;
    assert_eq!(w.queue.deleted().len(), 1, "{:?}", w.worker.events());
    assert_eq!(w.counter(|c| &c.lost_ownership), 0);
    assert_eq!(w.worker.started().len(), 1);
}

/// A check whose answer the test sets.
struct SetCheck(std::sync::Mutex<crate::health::Outcome>);

impl crate::health::HealthCheck for SetCheck {
    fn check(&self) -> crate::health::CheckFuture<'_> {
        let o = self.0.lock().unwrap().clone();
        Box::pin(async move { o })
    }
}

#[tokio::test(start_paused = true)]
async fn a_gpu_lost_mid_job_makes_the_instance_unhealthy_for_good_replaced_once_idle() {
    use crate::health::Outcome;
    let healthy = Outcome::pass("gpu_answers")
        .and(Outcome::pass("gpu_count"))
        .and(Outcome::pass("gpu_xid"));
    let check = Arc::new(SetCheck(std::sync::Mutex::new(healthy.clone())));
    let w = World::start_with(
        cfg("[scale_in]\nenabled = false\n[health]\non_unhealthy = \"replace\"\ninterval = \"30s\"\n"),
        MemFleet::new(Some("g"), 0, 2),
        false,
        Some(check.clone()),
    );
    w.queue.push("100");
    w.run_for(5).await;
    assert_eq!(w.worker.started().len(), 1);
    assert!(w
        .status
        .prometheus()
        .contains("spotguard_agent_health_check{check=\"gpu_count\"} 1"));
    // The GPU falls off the bus while the job runs.
    *check.0.lock().unwrap() = Outcome::pass("gpu_answers")
        .and(Outcome::fail(
            "gpu_count",
            "0 GPU(s) listed by nvidia-smi, 1 expected".into(),
            true,
        ))
        .and(Outcome::fail(
            "gpu_xid",
            "Xid 79 on GPU 0000:00:1e (the GPU has fallen off the bus)".into(),
            true,
        ));
    w.queue.push("1");
    w.run_for(31).await;
    assert_eq!(w.worker.started().len(), 1, "intake closed");
    assert_eq!(w.status.healthz().0, 503);
    assert!(
        w.status.healthz().1.contains("Xid 79"),
        "{}",
        w.status.healthz().1
    );
    let m = w.status.prometheus();
    assert!(
        m.contains("spotguard_agent_health_check{check=\"gpu_count\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("spotguard_agent_health_check{check=\"gpu_answers\"} 1"),
        "{m}"
    );
    assert_eq!(w.status.json()["checks"]["gpu_xid"], false);
    let sent = w.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].1["event"], "unhealthy");
    assert!(sent[0].1["reason"].as_str().unwrap().contains("0 GPU(s)"));
    // Not under a running job: the group replaces it once idle.
    assert!(!w.fleet.lock().unhealthy, "replaced under a running job");
    w.run_for(70).await;
    assert!(
        w.fleet.lock().unhealthy,
        "SetInstanceHealth Unhealthy once idle"
    );
    // A later pass (the driver answering again) does not reopen intake,
    // and the failing checks send no second notice.
    *check.0.lock().unwrap() = healthy;
    w.run_for(60).await;
    assert_eq!(w.worker.started().len(), 1);
    assert_eq!(w.status.healthz().0, 503);
    assert_eq!(w.sent.lock().unwrap().len(), 1);
    assert_eq!(w.counter(|c| &c.unhealthy_trips), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_visibility_heartbeat_is_tried_again_1_then_2_seconds_later() {
    let c = cfg(no_scale_in());
    let hb = c.heartbeat_interval().as_secs_f64();
    let w = World::start(c, MemFleet::new(None, 0, 1), false);
    w.queue.push(&format!("{}", (hb as u64) * 3));
    w.run_for(1).await;
    assert_eq!(w.worker.started().len(), 1);
    w.queue
        .fail_next("ChangeMessageVisibility", "ServiceUnavailable", 2);
    w.run_for(hb as u64 * 2).await;
    let t = w.call_times(w.queue.calls("ChangeMessageVisibility"));
    assert!(t.len() >= 4, "{t:?}");
    // The first a heartbeat after the start; failed, 1 s, failed, 2 s,
    // answered; the next one a heartbeat later.
    assert_eq!(t[0], hb, "{t:?}");
    assert_eq!((t[1] - t[0], t[2] - t[1]), (1.0, 2.0), "{t:?}");
    assert_eq!(t[3] - t[0], hb, "{t:?}");
    // The job kept its lease: it ran once and its message was deleted.
    w.run_for(hb as u64 * 2).await;
    assert_eq!(w.worker.started().len(), 1);
    assert_eq!(w.queue.deleted().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_checkpoint_at_a_spot_notice_is_handed_over_on_a_standard_queue() {
    let w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
    w.queue.push("1000 ckpt");
    w.run_for(2).await;
    w.spot(120).await;
    w.run_for(110).await;
    assert_eq!(w.counter(|c| &c.jobs_handed_over), 1);
    let st = w.queue.lock();
    assert_eq!(st.messages.len(), 1);
    let ckpt = st.messages[0]
        .attributes
        .get("spotguard.checkpoint")
        .map(|a| a.value.clone());
    assert!(
        ckpt.is_some_and(|c| c.starts_with("ckpt-of-")),
        "{:?}",
        st.messages[0].attributes
    );
}

#[tokio::test(start_paused = true)]
async fn on_fifo_a_failed_re_send_is_tried_three_times_100_then_200_ms_apart() {
    for (failures, handed_over) in [(2, 1), (3, 0)] {
        let mut c = cfg(no_scale_in());
        c.queue.url = "https://sqs.us-east-1.amazonaws.com/123456789012/jobs.fifo".into();
        c.worker.fifo_resend_checkpoint = true;
        let w = World::start(c, MemFleet::new(None, 0, 1), false);
        w.queue.push_group("1000 ckpt", Some("g"));
        w.run_for(2).await;
        w.queue
            .fail_next("SendMessage", "ServiceUnavailable", failures);
        w.spot(120).await;
        w.run_for(110).await;
        let sends: Vec<f64> = w
            .queue
            .calls("SendMessage")
            .into_iter()
            .map(|(t, _)| w.at(t))
            .collect();
        // FIFO deduplicates a retry: three attempts at most.
        assert_eq!(sends.len(), 3, "{failures} failures: {sends:?}");
        let gaps = [sends[1] - sends[0], sends[2] - sends[1]];
        assert!(
            (gaps[0] - 0.1).abs() < 0.05 && (gaps[1] - 0.2).abs() < 0.05,
            "{gaps:?}"
        );
        assert_eq!(
            w.counter(|c| &c.jobs_handed_over),
            handed_over,
            "{failures} failures"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_stops_the_heartbeats() {
    let c = cfg(no_scale_in());
    let hb = c.heartbeat_interval().as_secs();
    let w = World::start(c, MemFleet::new(None, 0, 1), false);
    w.queue.push(&format!("{}", hb * 4));
    w.run_for(1).await;
    // An answer that says the lease is gone (moto's words; SQS's own are
    // tested in job.rs).
    w.queue
        .fail_next("ChangeMessageVisibility", "MessageNotInflight", 1);
    w.run_for(hb * 3).await;
    // One heartbeat, lost; none after it (it would only extend another's lease).
    assert_eq!(w.queue.calls("ChangeMessageVisibility").len(), 1);
    // Counted when the job ends.
    w.run_for(hb * 2).await;
    assert_eq!(w.queue.calls("ChangeMessageVisibility").len(), 1);
    assert_eq!(w.counter(|c| &c.lost_ownership), 1);
}

#[tokio::test(start_paused = true)]
async fn on_a_standard_queue_a_job_at_the_12_hour_cap_hands_its_checkpoint_over() {
    let w = World::start(cfg(no_scale_in()), MemFleet::new(None, 0, 1), false);
    w.queue.push(&format!("{} ckpt", 14 * 3600));
    for _ in 0..(12 * 360) {
        advance(Duration::from_secs(10)).await;
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    w.run_for(60).await;
    // No reordering to protect: re-sent with its checkpoint, not failed.
    assert_eq!(w.counter(|c| &c.jobs_handed_over), 1);
    assert_eq!(w.counter(|c| &c.jobs_timed_out), 0);
    assert_eq!(w.queue.calls("SendMessage").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_breaker_trip_does_not_turn_a_lasting_gpu_failure_into_a_cool_down() {
    use crate::health::Outcome;
    let check = Arc::new(SetCheck(std::sync::Mutex::new(Outcome::pass("gpu_count"))));
    let mut c = cfg(
        "[scale_in]\nenabled = false\n[health]\nmax_consecutive_failures = 3\ninterval = \"30s\"\n",
    );
    c.worker.concurrency = 3;
    let w = World::start_with(
        c,
        MemFleet::new(Some("g"), 0, 2),
        false,
        Some(check.clone()),
    );
    for _ in 0..3 {
        w.queue.push("40 fail");
    }
    w.run_for(5).await;
    assert_eq!(w.worker.started().len(), 3);
    // The GPU goes at 30 s; the three jobs then fail at 40 s: the breaker
    // trips on top of the lasting failure.
    *check.0.lock().unwrap() = Outcome::fail(
        "gpu_count",
        "0 GPU(s) listed by nvidia-smi, 1 expected".into(),
        true,
    );
    w.run_for(40).await;
    assert_eq!(w.counter(|c| &c.jobs_failed), 3);
    // nvidia-smi answering again, and work waiting past the breaker's
    // 10-minute cool-down: no half-open job, no heal.
    *check.0.lock().unwrap() = Outcome::pass("gpu_count");
    w.queue.push("1");
    w.run_for(11 * 60).await;
    assert_eq!(w.worker.started().len(), 3, "a job was let through");
    assert_eq!(w.status.healthz().0, 503);
    assert!(
        w.status.healthz().1.contains("0 GPU(s)"),
        "{}",
        w.status.healthz().1
    );
}

/// `due`'s settings for the pure tests below: one slot, no scale-in.
fn bare_settings() -> Settings {
    Settings {
        concurrency: 1,
        idle_timeout: Duration::from_secs(300),
        scale_in: false,
        protect_busy: false,
        hook: false,
        health_check: false,
        fifo: false,
        follow_intake: None,
    }
}

#[test]
fn in_no_group_a_rebalance_stop_ends_but_a_spot_drain_stays() {
    use crate::state::{Drain, DrainReason, Mode};
    let now = Instant::now();
    let s = bare_settings();
    let mut b = Books::new(now);
    b.not_in_group = true;
    let drain = |r: DrainReason| {
        Mode::Draining(Drain {
            deadline: None,
            reasons: vec![r],
        })
    };
    for m in [Mode::IntakeStopped, drain(DrainReason::Rebalance)] {
        b.mode = m.clone();
        assert_eq!(due(&b, 0, &s, now).mode, Some(Mode::Running), "{m:?}");
    }
    b.mode = drain(DrainReason::SpotInterruption);
    assert_eq!(
        due(&b, 0, &s, now).mode,
        None,
        "a spot notice is not advice"
    );
    // In a group, the rebalance's stop stays (the group may take it).
    b.not_in_group = false;
    b.mode = Mode::IntakeStopped;
    assert_eq!(due(&b, 0, &s, now).mode, None);
}

#[test]
fn a_broken_worker_is_unhealthy_until_its_pause_ends_not_at_its_end() {
    let now = Instant::now();
    let mut b = Books::new(now);
    b.broken = Some("no such program".into());
    b.broken_until = Some(now + Duration::from_secs(60));
    assert_eq!(
        b.unhealthy_now(now + Duration::from_secs(59)),
        Some("no such program")
    );
    assert_eq!(b.unhealthy_now(now + Duration::from_secs(60)), None);
    b.broken_until = None;
    assert_eq!(
        b.unhealthy_now(now + Duration::from_secs(3600)),
        Some("no such program"),
        "no end: broken until it is fixed"
    );
}
