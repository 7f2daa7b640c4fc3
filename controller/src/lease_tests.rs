//! The lease over the in-memory cloud, whose FIFO queue answers as SQS
//! does (a group with a message in flight returns nothing more), and two
//! controllers at once, the race injected where it hurts: after both have
//! read the memory, before either writes it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use spotguard_common::clock::TokioClock;

use crate::aws::{Cloud, GroupInfo};
use crate::config::Config;
use crate::fakes::FakeCloud;
use crate::handler::Controller;

const QUEUE: &str = "https://sqs.us-east-1.amazonaws.com/123456789012/jobs";
const LEASE: &str = "https://sqs.us-east-1.amazonaws.com/123456789012/spotguard-lease.fifo";
const ICE: &str = "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity available that matches your request. Launching EC2 instance failed.";

fn start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-28T08:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// The primary short by one (desired 3, 2 InService), an empty fallback,
/// work queued; with or without the lease queue.
fn controller(lease: bool) -> Controller<FakeCloud> {
    let cloud = FakeCloud::default();
    cloud.add_group(
        "us-east-1",
        "gpu-east-1",
        GroupInfo {
            desired: 3,
            max: 10,
            in_service: 2,
            ..Default::default()
        },
    );
    cloud.add_group("us-east-2", "gpu-east-2", GroupInfo::default());
    cloud.set_depth("us-east-1", QUEUE, 40, 2);
    cloud.add_fifo("us-east-1", LEASE);
    cloud.lock().wall = Some((start(), tokio::time::Instant::now()));
    let lease = if lease {
        format!("[lease]\nqueue_url = \"{LEASE}\"\n")
    } else {
        String::new()
    };
    let cfg = format!(
        "[primary]\nasg = \"gpu-east-1\"\nqueue_url = \"{QUEUE}\"\n[fallback]\nasg = \"gpu-east-2\"\n[failover]\nshortage_for = \"0s\"\n[notify]\nsns_topic_arn = \"arn:aws:sns:us-east-1:123456789012:spotguard\"\n{lease}"
    );
    Controller {
        cfg: Config::parse(&cfg, "test").unwrap(),
        cloud,
        clock: Arc::new(TokioClock::new(start())),
    }
}

fn capacity_failure() -> Value {
    json!({
        "version": "0", "id": "e", "detail-type": "EC2 Instance Launch Unsuccessful",
        "source": "aws.autoscaling", "account": "123456789012", "time": "2026-11-28T08:00:00Z",
        "region": "us-east-1", "resources": [],
        "detail": {"StatusCode": "Failed", "StatusMessage": ICE, "AutoScalingGroupName": "gpu-east-1",
                   "ActivityId": "act-1", "StartTime": "2026-11-28T08:00:00Z", "EndTime": ""}
    })
}

fn tick_event() -> Value {
    json!({"source": "aws.events", "detail-type": "Scheduled Event", "time": "2026-11-28T08:00:00Z", "detail": {}})
}

fn lease_depth(c: &Controller<FakeCloud>) -> (i64, i64) {
    c.cloud.lock().fifo[&("us-east-1".to_string(), LEASE.to_string())].depth()
}

/// Two controllers handle `event` at once: the first is held just before
/// its first tag write (both have read the memory by then) while the
/// second runs whole. Returns how many of them acted.
async fn at_once(c: &Controller<FakeCloud>, event: &Value) -> usize {
    c.cloud.gate.arm("CreateOrUpdateTags");
    let first = c.handle_event(event);
    let second = async {
        c.cloud.gate.parked().await;
        let r = c.handle_event(event).await;
        c.cloud.gate.open();
        r
    };
    let (a, b) = tokio::join!(first, second);
    [a.unwrap(), b.unwrap()].iter().flatten().count()
}

#[tokio::test(start_paused = true)]
async fn two_controllers_at_once_one_acts_and_one_announcement() {
    // Without the lease the injected race is real: both act on the same
    // memory and both announce.
    let c = controller(false);
    assert_eq!(at_once(&c, &capacity_failure()).await, 2);
    assert_eq!(c.cloud.lock().published.len(), 2, "the race this guards");

    let c = controller(true);
    assert_eq!(at_once(&c, &capacity_failure()).await, 1);
    let published = c.cloud.lock().published.clone();
    assert_eq!(published.len(), 1, "{published:?}");
    assert!(published[0].2.contains("\"to\":\"failed-over\""));
    assert_eq!(c.cloud.group_of("us-east-2", "gpu-east-2").desired, 1);
    assert_eq!(lease_depth(&c), (1, 0), "given back, one token");
}

#[tokio::test(start_paused = true)]
async fn two_ticks_at_once_send_a_periodic_slot_once() {
    for (lease, sends) in [(false, 2), (true, 1)] {
        let mut c = controller(lease);
        // The primary whole: no failover, so the first tag write of a tick
        // is the periodic tasks' memory.
        c.cloud
            .lock()
            .groups
            .get_mut(&("us-east-1".into(), "gpu-east-1".into()))
            .unwrap()
            .in_service = 3;
        c.cfg.cron.tasks = crate::cron::parse(
            "version: 1\ncron:\n - name: report\n   url: /r\n   schedule: \"*/5 * * * *\"\n",
        )
        .unwrap();
        // 08:00: the slot is first seen (recorded, not sent).
        assert!(c.handle_event(&tick_event()).await.unwrap().is_some());
        tokio::time::advance(Duration::from_secs(310)).await;
        at_once(&c, &tick_event()).await;
        let to_jobs = c.cloud.lock().sent.iter().filter(|s| s.1 == QUEUE).count();
        assert_eq!(to_jobs, sends, "lease {lease}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_died_keeps_the_others_out_for_hold_then_not() {
    let c = controller(true);
    let hold = c.cfg.lease.hold.0;
    assert_eq!(hold, Duration::from_secs(60));
    // A holder that takes the lease and never gives it back.
    let dead = crate::lease::acquire(&c.cloud, "us-east-1", LEASE, hold, c.clock.now())
        .await
        .unwrap()
        .expect("the first takes it");
    assert_eq!(lease_depth(&c), (0, 1), "seeded and taken");
    // 40 s on, a tick waits its 10 s and gives up: the metrics published
    // (target tracking needs them whoever holds the lease), nothing decided.
    tokio::time::advance(Duration::from_secs(40)).await;
    let t0 = tokio::time::Instant::now();
    assert!(c.handle_event(&tick_event()).await.unwrap().is_none());
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited <= crate::lease::WAIT,
        "{waited:?}"
    );
    assert!(!c.cloud.calls("PutMetricData").is_empty());
    assert!(c.cloud.calls("UpdateAutoScalingGroup").is_empty());
    assert!(c.cloud.calls("CreateOrUpdateTags").is_empty());
    // A Lambda with 8 s left waits only half of them (4 s): the rest is
    // the work's.
    let t0 = tokio::time::Instant::now();
    assert!(c
        .handle_event_by(&tick_event(), Some(t0 + Duration::from_secs(8)))
        .await
        .unwrap()
        .is_none());
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited <= Duration::from_secs(4),
        "{waited:?}"
    );
    // An event of a group that opens no fallback takes no lease.
    let receives = c.cloud.calls("ReceiveMessage").len();
    let mut other = capacity_failure();
    other["detail"]["AutoScalingGroupName"] = json!("someone-elses-group");
    assert!(c.handle_event(&other).await.unwrap().is_none());
    assert_eq!(c.cloud.calls("ReceiveMessage").len(), receives);
    // 55 s on, the tick waits out the dead holder's 60 s and acts.
    tokio::time::advance(Duration::from_secs(5)).await;
    let r = c.handle_event(&tick_event()).await.unwrap();
    assert!(r.is_some(), "decided");
    assert!(
        !c.cloud.calls("CreateOrUpdateTags").is_empty(),
        "the primary's shortage remembered"
    );
    assert_eq!(lease_depth(&c), (1, 0));
    // The dead holder's give-back, late, touches nothing.
    let changes = c.cloud.calls("ChangeMessageVisibility").len();
    crate::lease::release(&c.cloud, "us-east-1", LEASE, &dead, c.clock.now()).await;
    assert_eq!(c.cloud.calls("ChangeMessageVisibility").len(), changes);
}

#[tokio::test(start_paused = true)]
async fn a_give_back_too_near_the_leases_end_is_not_made() {
    let c = controller(true);
    let hold = Duration::from_secs(60);
    let a = crate::lease::acquire(&c.cloud, "us-east-1", LEASE, hold, c.clock.now())
        .await
        .unwrap()
        .unwrap();
    // 8 s before its end a give-back (bounded at 10 s) might land after
    // it, and free the hold of whoever took the token meanwhile: not made.
    tokio::time::advance(Duration::from_secs(52)).await;
    crate::lease::release(&c.cloud, "us-east-1", LEASE, &a, c.clock.now()).await;
    assert!(c.cloud.calls("ChangeMessageVisibility").is_empty());
    assert_eq!(lease_depth(&c), (0, 1), "still A's until its end");
    // Then B holds; A's old receipt (SQS gives a new one per receive)
    // cannot free B's hold either.
    tokio::time::advance(Duration::from_secs(9)).await;
    let b = crate::lease::acquire(&c.cloud, "us-east-1", LEASE, hold, c.clock.now())
        .await
        .unwrap()
        .expect("B takes it");
    assert_ne!(a.receipt, b.receipt);
    let e = c
        .cloud
        .change_visibility("us-east-1", LEASE, &a.receipt, 0)
        .await
        .unwrap_err();
    assert!(e.message.contains("InvalidParameterValue"), "{e}");
    assert_eq!(lease_depth(&c), (0, 1), "B's hold survives");
}

#[tokio::test(start_paused = true)]
async fn one_token_seeded_reused_and_replaced_after_a_day() {
    let c = controller(true);
    let lease_sends =
        |c: &Controller<FakeCloud>| c.cloud.lock().sent.iter().filter(|s| s.1 == LEASE).count();
    assert_eq!(lease_depth(&c), (0, 0));
    for _ in 0..3 {
        assert!(c.handle_event(&tick_event()).await.unwrap().is_some());
        tokio::time::advance(Duration::from_secs(60)).await;
    }
    assert_eq!(lease_sends(&c), 1, "seeded once, then reused");
    assert_eq!(lease_depth(&c), (1, 0));
    let first = c.cloud.lock().fifo[&("us-east-1".to_string(), LEASE.to_string())].messages[0]
        .id
        .clone();
    // A day on, SQS's retention would come for the token: it is replaced.
    tokio::time::advance(Duration::from_secs(24 * 3600)).await;
    assert!(c.handle_event(&tick_event()).await.unwrap().is_some());
    assert_eq!(lease_sends(&c), 2);
    let st = c.cloud.lock();
    let q = &st.fifo[&("us-east-1".to_string(), LEASE.to_string())];
    assert_eq!(q.messages.len(), 1, "the old token deleted");
    assert_ne!(q.messages[0].id, first);
    assert_eq!(q.depth(), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn work_is_cut_at_the_leases_end_or_the_invocations_deadline() {
    let c = controller(true);
    // A write that never answers (a hanging region): the tick stops at the
    // lease's end less the margin and one call's bound (60 - 5 - 10 s),
    // and gives the lease back inside it.
    c.cloud.gate.arm("CreateOrUpdateTags");
    let t0 = tokio::time::Instant::now();
    let e = c.handle_event(&capacity_failure()).await.unwrap_err();
    assert!(e.to_string().contains("cut short"), "{e}");
    assert_eq!(t0.elapsed(), Duration::from_secs(45));
    assert_eq!(lease_depth(&c), (1, 0));
    // A Lambda invocation with 10 s left stops 5 s before its deadline.
    c.cloud.gate.arm("CreateOrUpdateTags");
    let t0 = tokio::time::Instant::now();
    let e = c
        .handle_event_by(&capacity_failure(), Some(t0 + Duration::from_secs(10)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cut short"), "{e}");
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    assert_eq!(lease_depth(&c), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_lease_queue_acts_not() {
    let c = controller(true);
    c.cloud.fail_next(
        "ReceiveMessage",
        "us-east-1",
        "AccessDenied: not authorized to perform sqs:ReceiveMessage",
        1,
    );
    let e = c.handle_event(&tick_event()).await.unwrap_err();
    assert!(e.to_string().contains("AccessDenied"), "{e}");
    // The metrics went out (unleased); nothing was decided or acted on.
    assert!(!c.cloud.calls("PutMetricData").is_empty());
    assert!(c.cloud.calls("UpdateAutoScalingGroup").is_empty());
    assert!(c.cloud.calls("CreateOrUpdateTags").is_empty());
}

#[test]
fn attempt_ids_do_not_repeat_at_the_same_instant() {
    // The same time, pid and a counter from 0 (two Lambda environments at
    // a cold start) must still give different ids: 128 random bits.
    let at = start();
    let ids: std::collections::BTreeSet<String> =
        (0..1000).map(|_| super::unique("take", at)).collect();
    assert_eq!(ids.len(), 1000);
    assert!(ids.iter().all(|i| i.len() == "take-".len() + 32));
}
