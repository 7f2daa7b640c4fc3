//! The handler over the in-memory Cloud: no AWS, no moto, time from a clock.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde_json::json;
use spotguard_common::clock::TokioClock;

use super::*;
use crate::aws::{Cloud, GroupInfo};
use crate::fakes::FakeCloud;

const QUEUE: &str = "https://sqs.us-east-1.amazonaws.com/123456789012/jobs";

fn start() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-28T08:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// A controller over the in-memory cloud: `cfg` (TOML), the primary group
/// (region, name, desired, InService), the fallback groups (region, name;
/// empty), 40 messages visible and 2 in flight, time from tokio's clock.
fn fake_controller(
    cfg: &str,
    (region, name, desired, in_service): (&str, &str, i32, i32),
    fallbacks: &[(&str, &str)],
) -> Controller<FakeCloud> {
    let cloud = FakeCloud::default();
    cloud.add_group(
        region,
        name,
        GroupInfo {
            desired,
            max: 10,
            in_service,
            ..Default::default()
        },
    );
    for (region, name) in fallbacks {
        cloud.add_group(region, name, GroupInfo::default());
    }
    cloud.set_depth("us-east-1", QUEUE, 40, 2);
    Controller {
        cfg: Config::parse(cfg, "test").unwrap(),
        cloud,
        clock: Arc::new(TokioClock::new(start())),
    }
}

/// The primary is short (desired 3, 2 InService); failover needs it short
/// for `shortage`.
fn controller_with(shortage: &str) -> Controller<FakeCloud> {
    fake_controller(
        &format!(
            "[primary]\nasg = \"gpu-east-1\"\nqueue_url = \"{QUEUE}\"\n[fallback]\nasg = \"gpu-east-2\"\n[failover]\nshortage_for = \"{shortage}\"\nmin_dwell = \"60s\"\n[notify]\nsns_topic_arn = \"arn:aws:sns:us-east-1:123456789012:spotguard\"\n"
        ),
        ("us-east-1", "gpu-east-1", 3, 2),
        &[("us-east-2", "gpu-east-2")],
    )
}

fn controller() -> Controller<FakeCloud> {
    controller_with("0s")
}

fn set_primary(c: &Controller<FakeCloud>, desired: i32, in_service: i32) {
    let mut st = c.cloud.lock();
    let p = st
        .groups
        .get_mut(&("us-east-1".into(), "gpu-east-1".into()))
        .unwrap();
    p.desired = desired;
    p.in_service = in_service;
}

fn launch(detail_type: &str, msg: &str, at: &str) -> Value {
    json!({
        "version": "0", "id": "e", "detail-type": detail_type, "source": "aws.autoscaling",
        "account": "123456789012", "time": at, "region": "us-east-1", "resources": [],
        "detail": {"StatusCode": "Failed", "StatusMessage": msg, "AutoScalingGroupName": "gpu-east-1",
                   "ActivityId": format!("act-{}", at[11..19].replace(':', "")), "StartTime": at, "EndTime": ""}
    })
}

const ICE: &str = "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity available that matches your request. Launching EC2 instance failed.";

/// The primary's scaling activity for a launch that failed for capacity.
fn capacity_failure(id: &str) -> crate::events::Activity {
    crate::events::Activity {
        id: id.into(),
        status_code: "Failed".into(),
        status_message: ICE.into(),
        start: Some(start()),
        end: Some(start()),
        description: "Launching a new EC2 instance. Status Reason: ...".into(),
        details: String::new(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_capacity_failure_opens_the_fallback_and_announces_it() {
    let c = controller();
    let r = c
        .handle_event(&launch(
            "EC2 Instance Launch Unsuccessful",
            ICE,
            "2026-11-28T08:00:00Z",
        ))
        .await
        .unwrap()
        .expect("handled");
    assert_eq!(r.reconcile.mode, "failed-over");
    let f = c.cloud.group_of("us-east-2", "gpu-east-2");
    assert_eq!(
        f.max, 1,
        "the gate opens to the primary's shortfall, not the cap"
    );
    // The primary is short by one (desired 3, 2 InService): the fallback takes it.
    assert_eq!(f.desired, 1);
    assert_eq!(
        f.tags.get("spotguard:mode").map(String::as_str),
        Some("failed-over")
    );
    let published = c.cloud.lock().published.clone();
    assert_eq!(published.len(), 1);
    assert!(
        published[0].2.contains("\"to\":\"failed-over\""),
        "{published:?}"
    );
    // SNS went to the topic's region.
    assert_eq!(c.cloud.calls("Publish"), vec!["us-east-1"]);
}

#[tokio::test(start_paused = true)]
async fn a_bad_zone_or_price_never_fails_over() {
    let c = controller();
    for msg in [
        "Could not launch Spot Instances. Unsupported - The requested configuration is currently not supported. Launching EC2 instance failed.",
        "Could not launch Spot Instances. SpotMaxPriceTooLow - Your Spot request price of 0.1 is lower than the minimum required. Launching EC2 instance failed.",
    ] {
        let r = c
            .handle_event(&launch("EC2 Instance Launch Unsuccessful", msg, "2026-11-28T08:00:00Z"))
            .await
            .unwrap()
            .expect("handled");
        assert_eq!(r.reconcile.mode, "normal", "{msg}");
    }
    assert_eq!(c.cloud.group_of("us-east-2", "gpu-east-2").max, 0);
}

#[tokio::test(start_paused = true)]
async fn every_group_gets_the_fleets_backlog_per_instance_in_its_region_and_one_region_failing_spares_the_other(
) {
    let c = controller();
    {
        let mut st = c.cloud.lock();
        let f = st
            .groups
            .get_mut(&("us-east-2".into(), "gpu-east-2".into()))
            .unwrap();
        f.in_service = 6;
        f.max = 6;
    }
    let (m, errors, depth) = c.publish_metrics().await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(depth, Some((40, 2)));
    let points: Vec<(String, String, f64)> = m
        .iter()
        .map(|p| (p.region.clone(), p.dimensions[0].1.clone(), p.value))
        .collect();
    // One figure: 40 visible over the 2 + 6 InService of the fleet. (Each
    // over its own instances, 20 and 6.7, sized each group for the whole
    // backlog.)
    assert_eq!(
        points,
        vec![
            ("us-east-1".into(), "gpu-east-1".into(), 5.0),
            ("us-east-2".into(), "gpu-east-2".into(), 5.0),
        ]
    );
    // us-east-1's group cannot be read (its region impaired): us-east-2 is
    // still published, carrying the backlog over the instances it can see.
    c.cloud.fail_next(
        "DescribeAutoScalingGroups",
        "us-east-1",
        "Throttling: Rate exceeded",
        1,
    );
    let (m, errors, _) = c.publish_metrics().await;
    assert_eq!(m.len(), 1);
    assert_eq!(
        (m[0].region.as_str(), m[0].value),
        ("us-east-2", 40.0 / 6.0)
    );
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("us-east-1") && errors[0].contains("Throttling"),
        "{errors:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn work_waiting_raises_an_empty_group_from_zero_to_one() {
    let c = controller();
    {
        let mut st = c.cloud.lock();
        let p = st
            .groups
            .get_mut(&("us-east-1".into(), "gpu-east-1".into()))
            .unwrap();
        p.desired = 0;
        p.in_service = 0;
    }
    c.cloud.set_depth("us-east-1", QUEUE, 3, 0);
    let r = c.tick(Vec::new()).await.unwrap();
    assert_eq!(r.raised_from_zero, vec!["gpu-east-1"]);
    assert_eq!(c.cloud.group_of("us-east-1", "gpu-east-1").desired, 1);
    // The metric carries the backlog itself (no instance to divide by).
    assert_eq!(r.metrics[0].value, 3.0);
    // The fallback stays at 0 while not failed over.
    assert_eq!(c.cloud.group_of("us-east-2", "gpu-east-2").desired, 0);

    // Failed over (the primary's one launch failed: desired 1, none
    // InService) with an empty fallback: the fallback is raised too.
    let c = controller();
    set_primary(&c, 1, 0);
    c.cloud.set_depth("us-east-1", QUEUE, 1, 0);
    c.handle_event(&launch(
        "EC2 Instance Launch Unsuccessful",
        ICE,
        "2026-11-28T08:00:00Z",
    ))
    .await
    .unwrap();
    // The failover itself gave the fallback the primary's shortfall (1).
    assert_eq!(c.cloud.group_of("us-east-2", "gpu-east-2").desired, 1);
    // Later its agents scaled it in to 0 while work waits again: raised.
    c.cloud
        .update_group(
            "us-east-2",
            "gpu-east-2",
            crate::aws::GroupUpdate::desired(0),
        )
        .await
        .unwrap();
    let r = c.tick(Vec::new()).await.unwrap();
    assert_eq!(r.reconcile.mode, "failed-over");
    assert_eq!(r.raised_from_zero, vec!["gpu-east-2"]);
    assert_eq!(c.cloud.group_of("us-east-2", "gpu-east-2").desired, 1);

    // Nothing waiting (only in flight): an empty primary is not raised.
    let c = controller();
    set_primary(&c, 0, 0);
    c.cloud.set_depth("us-east-1", QUEUE, 0, 2);
    assert!(c
        .tick(Vec::new())
        .await
        .unwrap()
        .raised_from_zero
        .is_empty());
    assert_eq!(c.cloud.group_of("us-east-1", "gpu-east-1").desired, 0);
}

/// An events queue in memory.
#[derive(Default)]
struct MemEvents {
    msgs: Mutex<Vec<(String, String)>>,
    deleted: Mutex<Vec<String>>,
}

impl EventSource for MemEvents {
    fn receive(
        &self,
    ) -> impl std::future::Future<Output = Result<Vec<(String, String)>, CloudError>> + Send {
        let batch: Vec<_> = {
            let mut m = self.msgs.lock().unwrap();
            let n = m.len().min(10);
            m.drain(..n).collect()
        };
        std::future::ready(Ok(batch))
    }

    fn delete(
        &self,
        receipt: &str,
    ) -> impl std::future::Future<Output = Result<(), CloudError>> + Send {
        self.deleted.lock().unwrap().push(receipt.to_string());
        std::future::ready(Ok(()))
    }
}

#[tokio::test(start_paused = true)]
async fn the_run_loop_handles_queued_events_and_deletes_them_malformed_ones_too() {
    let c = controller();
    let src = MemEvents::default();
    src.msgs.lock().unwrap().extend([
        (
            "r1".to_string(),
            launch(
                "EC2 Instance Launch Unsuccessful",
                ICE,
                "2026-11-28T08:00:00Z",
            )
            .to_string(),
        ),
        ("r2".to_string(), "not json".to_string()),
        (
            "r3".to_string(),
            json!({"source": "aws.s3", "detail-type": "x"}).to_string(),
        ),
    ]);
    let handled = read_events(&c, &src).await;
    assert_eq!(
        handled, 2,
        "the launch event and the unknown one (acknowledged)"
    );
    assert_eq!(*src.deleted.lock().unwrap(), vec!["r1", "r2", "r3"]);
    assert_eq!(c.cloud.group_of("us-east-2", "gpu-east-2").max, 1);
}

#[tokio::test(start_paused = true)]
async fn failover_waits_until_the_primary_has_been_short_for_the_set_time() {
    let c = controller_with("2m");
    let at = |m: u32| {
        launch(
            "EC2 Instance Launch Unsuccessful",
            ICE,
            &format!("2026-11-28T08:0{m}:00Z"),
        )
    };
    let r = c.handle_event(&at(0)).await.unwrap().unwrap();
    assert_eq!(r.reconcile.mode, "normal", "short for 0 s only");
    tokio::time::advance(std::time::Duration::from_secs(60)).await;
    let r = c.handle_event(&at(1)).await.unwrap().unwrap();
    assert_eq!(r.reconcile.mode, "normal");
    tokio::time::advance(std::time::Duration::from_secs(60)).await;
    let r = c.handle_event(&at(2)).await.unwrap().unwrap();
    assert_eq!(
        r.reconcile.mode, "failed-over",
        "short for 2 minutes, with failures"
    );

    // A group that got its capacity (from another pool) never fails over.
    let c = controller_with("2m");
    set_primary(&c, 3, 3);
    for m in 0..5 {
        let r = c.handle_event(&at(m)).await.unwrap().unwrap();
        assert_eq!(r.reconcile.mode, "normal");
        tokio::time::advance(std::time::Duration::from_secs(60)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_unneeded_failover_closes_and_does_not_flap() {
    let c = controller();
    let at = |m: u32| {
        launch(
            "EC2 Instance Launch Unsuccessful",
            ICE,
            &format!("2026-11-28T08:0{m}:00Z"),
        )
    };
    c.handle_event(&at(0)).await.unwrap();
    // No backlog and no busy fallback instance, past the dwell: failing back.
    c.cloud.set_depth("us-east-1", QUEUE, 0, 0);
    tokio::time::advance(std::time::Duration::from_secs(61)).await;
    let r = c.tick(Vec::new()).await.unwrap();
    assert_eq!(r.reconcile.mode, "failing-back");
    // The mode metric for the "failed over too long" alarm: 1 while in use.
    let fo: Vec<f64> = c
        .cloud
        .lock()
        .metrics
        .iter()
        .filter(|m| m.name == "FailedOver")
        .map(|m| m.value)
        .collect();
    assert_eq!(fo.last(), Some(&1.0), "{fo:?}");
    // Capacity failures keep coming while nothing waits: no flap back.
    for m in 2..6 {
        tokio::time::advance(std::time::Duration::from_secs(60)).await;
        c.handle_event(&at(m)).await.unwrap();
        let r = c.tick(Vec::new()).await.unwrap();
        assert_ne!(r.reconcile.mode, "failed-over", "minute {m}");
    }
    // Work waits again and the primary still fails: failed over again.
    c.cloud.set_depth("us-east-1", QUEUE, 5, 0);
    c.handle_event(&at(7)).await.unwrap();
    assert_eq!(
        c.tick(Vec::new()).await.unwrap().reconcile.mode,
        "failed-over"
    );
}

/// Failing back, the fallback's gate held by its 2 busy (protected)
/// instances after its intake closed.
async fn failing_back_held_by_two_busy() -> Controller<FakeCloud> {
    let c = controller();
    c.handle_event(&launch(
        "EC2 Instance Launch Unsuccessful",
        ICE,
        "2026-11-28T08:00:00Z",
    ))
    .await
    .unwrap();
    {
        let mut st = c.cloud.lock();
        let f = st
            .groups
            .get_mut(&("us-east-2".into(), "gpu-east-2".into()))
            .unwrap();
        f.desired = 2;
        f.in_service = 2;
        f.busy = 2;
    }
    // The primary recovers; failing back, the gate stops at the 2 busy ones.
    set_primary(&c, 3, 3);
    tokio::time::advance(std::time::Duration::from_secs(60)).await;
    let ok = json!({"version": "0", "id": "s", "detail-type": "EC2 Instance Launch Successful", "source": "aws.autoscaling",
        "account": "1", "time": "2026-11-28T08:01:00Z", "region": "us-east-1", "resources": [],
        "detail": {"StatusCode": "InProgress", "AutoScalingGroupName": "gpu-east-1", "ActivityId": "s-1", "EndTime": "2026-11-28T08:01:00Z"}});
    c.handle_event(&ok).await.unwrap();
    tokio::time::advance(std::time::Duration::from_secs(700)).await;
    let r = c.tick(Vec::new()).await.unwrap();
    assert_eq!(r.reconcile.mode, "failing-back");
    c.tick(Vec::new()).await.unwrap();
    assert_eq!(
        c.cloud.group_of("us-east-2", "gpu-east-2").max,
        2,
        "held by the busy instances"
    );
    assert!(c.cloud.calls("SetInstanceProtection").is_empty());
    c
}

#[tokio::test(start_paused = true)]
async fn past_max_busy_age_nothing_is_released_while_the_marks_cannot_be_read() {
    let c = failing_back_held_by_two_busy().await;
    // A day later, DescribeTags denied (a policy not updated): not one
    // release, and no alarm; the gate stays held.
    tokio::time::advance(std::time::Duration::from_secs(24 * 3600)).await;
    c.cloud.lock().faults.insert(
        ("DescribeTags", "us-east-1".into()),
        std::iter::repeat_n(
            "UnauthorizedOperation: You are not authorized to perform this operation.".to_string(),
            10,
        )
        .collect(),
    );
    c.cloud.lock().faults.insert(
        ("DescribeTags", "us-east-2".into()),
        std::iter::repeat_n(
            "UnauthorizedOperation: You are not authorized to perform this operation.".to_string(),
            10,
        )
        .collect(),
    );
    c.tick(Vec::new()).await.unwrap();
    assert!(c.cloud.calls("SetInstanceProtection").is_empty());
    assert_eq!(c.cloud.group_of("us-east-2", "gpu-east-2").busy, 2);
    assert!(!c
        .cloud
        .lock()
        .published
        .iter()
        .any(|p| p.1.contains("ALARM")));
}

#[tokio::test(start_paused = true)]
async fn a_gate_held_by_stale_protection_is_released_with_an_alarm() {
    let c = failing_back_held_by_two_busy().await;
    // A day later they are still protected: the one whose agent is not
    // known alive (no liveness mark) is released, with an alarm; the one
    // whose agent marked itself alive 5 minutes ago (a job longer than
    // max_busy_age) is not.
    tokio::time::advance(std::time::Duration::from_secs(24 * 3600 - 300)).await;
    mark(&c, "us-east-2", "i-busy0");
    tokio::time::advance(std::time::Duration::from_secs(300)).await;
    c.tick(Vec::new()).await.unwrap();
    assert_eq!(c.cloud.calls("SetInstanceProtection"), vec!["us-east-2"]);
    assert_eq!(
        c.cloud.group_of("us-east-2", "gpu-east-2").protected,
        vec!["i-busy0"]
    );
    let alarms: Vec<_> = c
        .cloud
        .lock()
        .published
        .iter()
        .filter(|p| p.1.contains("ALARM"))
        .cloned()
        .collect();
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    let body: serde_json::Value = serde_json::from_str(&alarms[0].2).unwrap();
    assert_eq!(body["instances"], json!(["i-busy1"]));
}

/// Writes instance `id`'s liveness mark at the controller's time.
fn mark(c: &Controller<FakeCloud>, region: &str, id: &str) {
    let v = crate::liveness::mark(c.clock.now());
    c.cloud.lock().marks.insert((region.into(), id.into()), v);
}

#[tokio::test(start_paused = true)]
async fn a_dead_agent_is_released_within_30_minutes_and_a_live_busy_one_never() {
    let c = controller();
    set_primary(&c, 3, 3);
    {
        let mut st = c.cloud.lock();
        let p = st
            .groups
            .get_mut(&("us-east-1".into(), "gpu-east-1".into()))
            .unwrap();
        p.busy = 3;
    }
    // i-busy0: a live agent with back-to-back jobs, marking every 10
    // minutes; i-busy1: marked once, then its agent dies; i-busy2: an
    // agent that never marks (older version, or IAM denies the tag).
    mark(&c, "us-east-1", "i-busy0");
    mark(&c, "us-east-1", "i-busy1");
    let mut released_at = None;
    for minute in 1..=6 * 60 {
        tokio::time::advance(std::time::Duration::from_secs(60)).await;
        if minute % 10 == 0 {
            mark(&c, "us-east-1", "i-busy0");
        }
        let r = c.tick(Vec::new()).await.unwrap();
        if !r.dead_released.is_empty() {
            assert_eq!(r.dead_released, vec!["i-busy1"], "minute {minute}");
            assert!(released_at.is_none(), "released twice");
            released_at = Some(minute);
        }
    }
    // Its mark 25 minutes old is still alive; older, dead: released at
    // the next tick, within 30 minutes of the last mark.
    assert_eq!(released_at, Some(26));
    assert_eq!(
        c.cloud.group_of("us-east-1", "gpu-east-1").protected,
        vec!["i-busy0", "i-busy2"],
        "the live agent and the unmarked one keep their protection"
    );
    let alarms: Vec<serde_json::Value> = c
        .cloud
        .lock()
        .published
        .iter()
        .filter(|p| p.1.contains("dead agent"))
        .map(|p| serde_json::from_str(&p.2).unwrap())
        .collect();
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(alarms[0]["event"], "dead_agent_protection_released");
    assert_eq!(alarms[0]["instances"], json!(["i-busy1"]));
    assert_eq!(
        alarms[0]["last_marked"]["i-busy1"],
        "2026-11-28T08:00:00+00:00"
    );
}

#[tokio::test(start_paused = true)]
async fn the_dead_agent_check_can_be_switched_off_and_survives_unreadable_marks() {
    let c = fake_controller(
        &format!(
            "[primary]\nasg = \"gpu-east-1\"\nqueue_url = \"{QUEUE}\"\n[fallback]\nasg = \"gpu-east-2\"\n[failover]\ndead_after = \"0s\"\n"
        ),
        ("us-east-1", "gpu-east-1", 1, 1),
        &[("us-east-2", "gpu-east-2")],
    );
    c.cloud
        .lock()
        .groups
        .get_mut(&("us-east-1".into(), "gpu-east-1".into()))
        .unwrap()
        .busy = 1;
    mark(&c, "us-east-1", "i-busy0");
    tokio::time::advance(std::time::Duration::from_secs(3600)).await;
    let r = c.tick(Vec::new()).await.unwrap();
    assert!(r.dead_released.is_empty());
    assert!(
        c.cloud.calls("DescribeTags").is_empty(),
        "switched off: no call"
    );

    // On: marks that cannot be read (EC2 throttling) release nothing and
    // fail no tick; the next tick reads them.
    let c = controller();
    c.cloud
        .lock()
        .groups
        .get_mut(&("us-east-1".into(), "gpu-east-1".into()))
        .unwrap()
        .busy = 1;
    set_primary(&c, 3, 3);
    mark(&c, "us-east-1", "i-busy0");
    tokio::time::advance(std::time::Duration::from_secs(3600)).await;
    c.cloud.lock().faults.insert(
        ("DescribeTags", "us-east-1".into()),
        ["RequestLimitExceeded: Request limit exceeded.".to_string()].into(),
    );
    let r = c.tick(Vec::new()).await.unwrap();
    assert!(r.dead_released.is_empty());
    let r = c.tick(Vec::new()).await.unwrap();
    assert_eq!(r.dead_released, vec!["i-busy0"]);
}

#[tokio::test(start_paused = true)]
async fn a_decision_made_on_a_stale_memory_is_made_again_and_never_carried_out_stale() {
    let c = controller();
    // Another invocation writes a newer memory right after our first read:
    // the decision is made again on it, and carried out once.
    c.cloud.lock().race = Some((1, ("us-east-2".into(), "gpu-east-2".into()), "7".into()));
    let r = c
        .handle_event(&launch(
            "EC2 Instance Launch Unsuccessful",
            ICE,
            "2026-11-28T08:00:00Z",
        ))
        .await
        .unwrap()
        .unwrap();
    assert!(r.reconcile.executed);
    assert_eq!(c.cloud.group_of("us-east-2", "gpu-east-2").max, 1);
    assert_eq!(c.cloud.calls("CreateOrUpdateTags").len(), 1);
    assert_eq!(
        c.cloud.group_of("us-east-2", "gpu-east-2").tags["spotguard:version"],
        "8",
        "written on top of the newer memory"
    );

    // A writer that never stops: nothing is carried out, and the event is
    // not acknowledged as handled (an error: the events queue keeps it).
    let c = controller();
    {
        let mut st = c.cloud.lock();
        st.race = Some((1, ("us-east-2".into(), "gpu-east-2".into()), String::new()));
        st.race_always = true;
    }
    let e = c
        .handle_event(&launch(
            "EC2 Instance Launch Unsuccessful",
            ICE,
            "2026-11-28T08:00:00Z",
        ))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("kept changing"), "{e}");
    assert_eq!(c.cloud.group_of("us-east-2", "gpu-east-2").max, 0);
    assert!(c.cloud.calls("CreateOrUpdateTags").is_empty());
}

#[tokio::test(start_paused = true)]
async fn running_fallback_jobs_keep_the_failover_open() {
    let c = controller();
    c.handle_event(&launch(
        "EC2 Instance Launch Unsuccessful",
        ICE,
        "2026-11-28T08:00:00Z",
    ))
    .await
    .unwrap();
    // Nothing visible, but 4 jobs in flight on unprotected fallback instances.
    c.cloud.set_depth("us-east-1", QUEUE, 0, 4);
    tokio::time::advance(std::time::Duration::from_secs(600)).await;
    let r = c.tick(Vec::new()).await.unwrap();
    assert_eq!(
        r.reconcile.mode, "failed-over",
        "jobs still run: the fallback is needed"
    );
    c.cloud.set_depth("us-east-1", QUEUE, 0, 0);
    let r = c.tick(Vec::new()).await.unwrap();
    assert_eq!(r.reconcile.mode, "failing-back");
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_primary_does_not_block_the_decision() {
    let c = controller();
    c.cloud.fail_next(
        "DescribeAutoScalingGroups",
        "us-east-1",
        "Throttling: Rate exceeded",
        5,
    );
    let r = c
        .handle_event(&launch(
            "EC2 Instance Launch Unsuccessful",
            ICE,
            "2026-11-28T08:00:00Z",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        r.reconcile.mode, "failed-over",
        "capacity failures alone decide then"
    );
}

/// Three groups of the same name in three regions: spot in us-east-1, then
/// us-east-2, then us-west-2.
fn cascade_controller() -> Controller<FakeCloud> {
    fake_controller(
        &format!(
            r#"
[primary]
asg = "gpu"
queue_url = "{QUEUE}"
[[fallbacks]]
region = "us-east-2"
asg = "gpu"
max_size = 6
[[fallbacks]]
region = "us-west-2"
asg = "gpu"
max_size = 8
[failover]
shortage_for = "0s"
min_dwell = "60s"
"#
        ),
        ("us-east-1", "gpu", 4, 1),
        &[("us-east-2", "gpu"), ("us-west-2", "gpu")],
    )
}

fn launch_in(region: &str, detail_type: &str, msg: &str, at: &str) -> Value {
    let mut v = launch(detail_type, msg, at);
    v["region"] = json!(region);
    v["detail"]["AutoScalingGroupName"] = json!("gpu");
    v["detail"]["ActivityId"] = json!(format!("{region}-{}", at[11..19].replace(':', "")));
    v
}

fn mode_of(c: &Controller<FakeCloud>, region: &str) -> Option<String> {
    c.cloud
        .group_of(region, "gpu")
        .tags
        .get("spotguard:mode")
        .cloned()
}

#[tokio::test(start_paused = true)]
async fn a_three_region_cascade_opens_by_region_and_closes_last_first() {
    let c = cascade_controller();
    // A capacity failure in us-east-2 while it is not in use opens nothing.
    c.handle_event(&launch_in(
        "us-east-2",
        "EC2 Instance Launch Unsuccessful",
        ICE,
        "2026-11-28T08:00:00Z",
    ))
    .await
    .unwrap();
    assert_eq!(mode_of(&c, "us-east-2").as_deref(), Some("normal"));
    assert_eq!(mode_of(&c, "us-west-2").as_deref(), Some("normal"));
    assert_eq!(c.cloud.group_of("us-west-2", "gpu").max, 0);
    // The primary's failure (same group name, its own region) opens us-east-2.
    c.handle_event(&launch_in(
        "us-east-1",
        "EC2 Instance Launch Unsuccessful",
        ICE,
        "2026-11-28T08:00:00Z",
    ))
    .await
    .unwrap();
    assert_eq!(mode_of(&c, "us-east-2").as_deref(), Some("failed-over"));
    assert_eq!(
        c.cloud.group_of("us-east-2", "gpu").max,
        3,
        "the primary's shortfall (4 - 1)"
    );
    assert_eq!(c.cloud.group_of("us-west-2", "gpu").max, 0);
    // us-east-2 runs dry too: short (desired 4, one in service, one
    // pending) with a failure.
    {
        let mut st = c.cloud.lock();
        let g = st
            .groups
            .get_mut(&("us-east-2".into(), "gpu".into()))
            .unwrap();
        g.desired = 4;
        g.in_service = 1;
        g.pending = 1;
    }
    tokio::time::advance(std::time::Duration::from_secs(30)).await;
    c.handle_event(&launch_in(
        "us-east-2",
        "EC2 Instance Launch Unsuccessful",
        ICE,
        "2026-11-28T08:00:30Z",
    ))
    .await
    .unwrap();
    assert_eq!(mode_of(&c, "us-west-2").as_deref(), Some("failed-over"));
    let west = c.cloud.group_of("us-west-2", "gpu");
    assert_eq!(
        west.max, 3,
        "what us-east-2 cannot hold (4 - 1), within its own cap of 8"
    );
    assert_eq!(
        west.desired, 2,
        "us-east-2's shortfall less its pending one"
    );
    // Each group gets its backlog data point in its own region.
    let r = c.tick(Vec::new()).await.unwrap();
    let regions: Vec<&str> = r
        .metrics
        .iter()
        .filter(|m| m.name == "BacklogPerInstance")
        .map(|m| m.region.as_str())
        .collect();
    assert_eq!(regions, ["us-east-1", "us-east-2", "us-west-2"]);
    // The status shows the whole cascade.
    let st = status(&c).await.unwrap();
    let modes: Vec<&str> = st["cascade"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["mode"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(modes, ["-", "failed-over", "failed-over"]);
    assert!(
        st["cascade"][1]["last_capacity_failure"].is_string(),
        "{st}"
    );
    // The primary holds its desired capacity again, for
    // failover.recovery_for: the last opened closes first, the one before
    // a tick later.
    {
        let mut st = c.cloud.lock();
        let g = st
            .groups
            .get_mut(&("us-east-1".into(), "gpu".into()))
            .unwrap();
        g.in_service = 4;
    }
    c.tick(Vec::new()).await.unwrap();
    assert_eq!(mode_of(&c, "us-west-2").as_deref(), Some("failed-over"));
    tokio::time::advance(std::time::Duration::from_secs(600)).await;
    c.tick(Vec::new()).await.unwrap();
    assert_eq!(mode_of(&c, "us-west-2").as_deref(), Some("failing-back"));
    assert_eq!(mode_of(&c, "us-east-2").as_deref(), Some("failed-over"));
    tokio::time::advance(std::time::Duration::from_secs(60)).await;
    c.tick(Vec::new()).await.unwrap();
    assert_eq!(mode_of(&c, "us-east-2").as_deref(), Some("failing-back"));
}

/// The second link of a cascade hands its work back to the first
/// fallback, not to the primary: the hand-over's target is the work in
/// flight of the group before it (us-east-2) and its own, within that
/// group's MaxSize, and it is us-east-2's desired capacity that is raised.
#[tokio::test(start_paused = true)]
async fn a_cascade_link_hands_back_to_the_fallback_before_it() {
    let c = cascade_controller();
    let failed_over = || {
        let mut tags = Memory::initial().to_tags();
        tags.insert("spotguard:mode".into(), "failed-over".into());
        tags
    };
    {
        let mut st = c.cloud.lock();
        let set = |st: &mut crate::fakes::CloudState, region: &str, g: GroupInfo| {
            st.groups.insert((region.into(), "gpu".into()), g);
        };
        // The primary still short: the first link stays open.
        set(
            &mut st,
            "us-east-1",
            GroupInfo {
                desired: 10,
                max: 10,
                in_service: 1,
                ..Default::default()
            },
        );
        // us-east-2 whole again (2 of 2), one busy, room for 6.
        set(
            &mut st,
            "us-east-2",
            GroupInfo {
                desired: 2,
                max: 6,
                in_service: 2,
                busy: 1,
                tags: failed_over(),
                ..Default::default()
            },
        );
        // us-west-2 carries two busy ones, its gate at 2.
        set(
            &mut st,
            "us-west-2",
            GroupInfo {
                desired: 2,
                max: 2,
                in_service: 2,
                busy: 2,
                tags: failed_over(),
                ..Default::default()
            },
        );
    }
    c.tick(Vec::new()).await.unwrap();
    // 1 + 2 busy, within us-east-2's MaxSize of 6 (not us-west-2's 2).
    assert_eq!(c.cloud.group_of("us-east-2", "gpu").desired, 3);
    assert_eq!(
        c.cloud
            .group_of("us-west-2", "gpu")
            .tags
            .get("spotguard:handover-to")
            .map(String::as_str),
        Some("3")
    );
    assert_eq!(
        c.cloud.group_of("us-east-1", "gpu").desired,
        10,
        "not the primary"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_last_region_does_not_stop_the_failover_before_it() {
    let c = cascade_controller();
    c.cloud.fail_next(
        "DescribeAutoScalingGroups",
        "us-west-2",
        "ServiceUnavailable",
        100,
    );
    let r = c
        .handle_event(&launch_in(
            "us-east-1",
            "EC2 Instance Launch Unsuccessful",
            ICE,
            "2026-11-28T08:00:00Z",
        ))
        .await
        .unwrap()
        .expect("handled");
    assert_eq!(mode_of(&c, "us-east-2").as_deref(), Some("failed-over"));
    assert_eq!(c.cloud.group_of("us-east-2", "gpu").max, 3);
    assert_eq!(r.reconcile.links.len(), 1);
    assert!(
        r.reconcile.unreadable[0].contains("ServiceUnavailable"),
        "{:?}",
        r.reconcile.unreadable
    );
    // `status` still answers, and says which group it could not read.
    let st = status(&c).await.unwrap();
    assert!(st["cascade"][2]["error"].is_string(), "{st}");
    assert_eq!(st["cascade"][1]["mode"], "failed-over");
}

#[tokio::test(start_paused = true)]
async fn the_cascade_counts_as_failed_over_while_any_fallback_is_in_use() {
    let c = cascade_controller();
    // The first fallback is back to normal; the second still drains a busy
    // instance (failing back): the alarm metric must say "in use".
    let mut tags = Memory::initial().to_tags();
    tags.insert("spotguard:mode".into(), "failing-back".into());
    {
        let mut st = c.cloud.lock();
        let g = st
            .groups
            .get_mut(&("us-west-2".into(), "gpu".into()))
            .unwrap();
        g.tags = tags;
        g.desired = 1;
        g.max = 1;
        g.in_service = 1;
        g.busy = 1;
    }
    c.cloud.set_depth("us-east-1", QUEUE, 0, 1);
    let r = c.tick(Vec::new()).await.unwrap();
    assert_eq!(r.reconcile.mode, "failing-back");
    let failed_over: Vec<f64> = r
        .metrics
        .iter()
        .filter(|m| m.name == crate::metrics::FAILED_OVER)
        .map(|m| m.value)
        .collect();
    assert_eq!(failed_over, [1.0]);
    assert_eq!(status(&c).await.unwrap()["mode"], "failing-back");
    // The dashboard's link mode: 2 for the link failing back.
    let link_modes: Vec<f64> = r
        .metrics
        .iter()
        .filter(|m| m.name == crate::metrics::LINK_MODE)
        .map(|m| m.value)
        .collect();
    assert!(link_modes.contains(&2.0), "{link_modes:?}");
}

#[tokio::test(start_paused = true)]
async fn periodic_tasks_are_enqueued_once_per_slot_and_retried_when_sending_fails() {
    let mut c = controller();
    c.cfg.cron.tasks = crate::cron::parse(
        "version: 1\ncron:\n - name: report\n   url: /tasks/report\n   schedule: \"*/5 * * * *\"\n",
    )
    .unwrap();
    let sent = |c: &Controller<FakeCloud>| c.cloud.lock().sent.clone();
    let step = |secs: u64| tokio::time::advance(std::time::Duration::from_secs(secs));
    // 08:00:00, first sight: the 08:00 slot is recorded, not fired.
    assert!(c.tick(Vec::new()).await.unwrap().cron.is_empty());
    step(310).await; // 08:05:10
    let r = c.tick(Vec::new()).await.unwrap();
    assert_eq!(
        r.cron,
        [("report".to_string(), "2026-11-28T08:05:00Z".to_string())]
    );
    let (region, url, body, attrs, fifo) = sent(&c)[0].clone();
    assert_eq!(
        (region.as_str(), url.as_str(), fifo),
        ("us-east-1", QUEUE, None)
    );
    assert_eq!(body, crate::cron::BODY);
    assert_eq!(attrs["beanstalk.sqsd.task_name"], "report");
    assert_eq!(
        attrs["beanstalk.sqsd.scheduled_time"],
        "2026-11-28T08:05:00Z"
    );
    assert_eq!(attrs["beanstalk.sqsd.path"], "/tasks/report");
    step(30).await;
    assert!(
        c.tick(Vec::new()).await.unwrap().cron.is_empty(),
        "same slot"
    );
    // 08:10: SQS refuses; the slot is not remembered and goes next tick.
    step(300).await;
    c.cloud
        .fail_next("SendMessage", "us-east-1", "ServiceUnavailable", 1);
    assert!(c.tick(Vec::new()).await.unwrap().cron.is_empty());
    step(20).await;
    assert_eq!(c.tick(Vec::new()).await.unwrap().cron.len(), 1);
    assert_eq!(sent(&c).len(), 2);
    // Down from 08:11 to 09:02: the slots of the last 10 minutes (the
    // catch-up window), oldest first.
    step(51 * 60).await;
    let r = c.tick(Vec::new()).await.unwrap();
    let slot = |at: &str| ("report".to_string(), format!("2026-11-28T{at}:00Z"));
    assert_eq!(r.cron, [slot("08:55"), slot("09:00")]);
    assert_eq!(sent(&c).len(), 4);
    // Two slots due, the second refused: the first stays sent, the memory
    // goes back to it, and the next tick sends the second alone.
    step(11 * 60).await; // 09:13:xx: 09:05 and 09:10 due
    {
        let mut st = c.cloud.lock();
        let q = st
            .faults
            .entry(("SendMessage", "us-east-1".into()))
            .or_default();
        q.push_back(String::new()); // the first answers normally
        q.push_back("ServiceUnavailable".into());
    }
    let r = c.tick(Vec::new()).await.unwrap();
    assert_eq!(r.cron, [slot("09:05")]);
    assert_eq!(
        c.cloud.group_of("us-east-1", "gpu-east-1").tags["spotguard:cron:report"],
        "2026-11-28T09:05:00Z"
    );
    step(20).await;
    let r = c.tick(Vec::new()).await.unwrap();
    assert_eq!(r.cron, [slot("09:10")]);
    assert_eq!(sent(&c).len(), 6);
}

#[tokio::test(start_paused = true)]
async fn a_periodic_slot_is_remembered_before_it_is_sent() {
    let mut c = controller();
    c.cfg.cron.tasks = crate::cron::parse(
        "version: 1\ncron:\n - name: report\n   url: /r\n   schedule: \"*/5 * * * *\"\n",
    )
    .unwrap();
    c.tick(Vec::new()).await.unwrap();
    tokio::time::advance(std::time::Duration::from_secs(310)).await;
    // The memory cannot be written: nothing is sent.
    c.cloud
        .fail_next("CreateOrUpdateTags", "us-east-1", "Throttling", 1);
    assert!(c.tick(Vec::new()).await.unwrap().cron.is_empty());
    assert!(c.cloud.lock().sent.is_empty());
    // A failover decision that cannot be made does not hold the task back.
    c.cloud.fail_next(
        "DescribeAutoScalingGroups",
        "us-east-2",
        "ServiceUnavailable",
        10,
    );
    assert!(c.tick(Vec::new()).await.is_err());
    assert_eq!(c.cloud.lock().sent.len(), 1);
    // Ticks again at the same slot (a retried invocation): nothing more.
    c.cloud.lock().faults.clear();
    assert!(c.tick(Vec::new()).await.unwrap().cron.is_empty());
    assert_eq!(c.cloud.lock().sent.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn tags_of_periodic_tasks_no_longer_configured_are_removed() {
    let mut c = controller();
    c.cfg.cron.tasks = crate::cron::parse(
        "version: 1\ncron:\n - name: kept\n   url: /k\n   schedule: \"*/5 * * * *\"\n",
    )
    .unwrap();
    {
        let mut st = c.cloud.lock();
        let g = st
            .groups
            .get_mut(&("us-east-1".into(), "gpu-east-1".into()))
            .unwrap();
        g.tags
            .insert("spotguard:cron:gone".into(), "2026-11-28T07:00:00Z".into());
        g.tags.insert("team".into(), "render".into());
    }
    c.tick(Vec::new()).await.unwrap();
    let tags = c.cloud.group_of("us-east-1", "gpu-east-1").tags;
    assert!(!tags.contains_key("spotguard:cron:gone"), "{tags:?}");
    assert!(tags.contains_key("spotguard:cron:kept"));
    assert_eq!(
        tags.get("team").map(String::as_str),
        Some("render"),
        "the user's tags stay"
    );
}

/// One dry zone in a whole primary: AWS tries the zone with the fewest
/// instances first, logs a failure there, and launches in another, so a
/// Failed and a Successful activity come every few minutes for ever. The
/// failover that a real outage opened must close, and a failure while
/// failing back must not reopen the gate.
#[tokio::test(start_paused = true)]
async fn a_whole_primary_with_one_dry_zone_fails_back_and_stays_closed() {
    let c = controller();
    c.handle_event(&launch(
        "EC2 Instance Launch Unsuccessful",
        ICE,
        "2026-11-28T08:00:00Z",
    ))
    .await
    .unwrap();
    assert_eq!(
        c.cloud.group_of("us-east-2", "gpu-east-2").tags["spotguard:mode"],
        "failed-over"
    );
    // The region is back but for zone a: the primary holds its 3.
    set_primary(&c, 3, 3);
    let mut modes = Vec::new();
    let mut gates = Vec::new();
    for k in 1..=30u32 {
        tokio::time::advance(std::time::Duration::from_secs(60)).await;
        if k % 3 == 0 {
            let at = (start() + chrono::Duration::minutes(i64::from(k)))
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let mut ok = launch("EC2 Instance Launch Successful", "", &at);
            ok["detail"]["StatusCode"] = json!("InProgress");
            c.handle_event(&launch("EC2 Instance Launch Unsuccessful", ICE, &at))
                .await
                .unwrap();
            c.handle_event(&ok).await.unwrap();
        }
        c.tick(Vec::new()).await.unwrap();
        let f = c.cloud.group_of("us-east-2", "gpu-east-2");
        modes.push(f.tags["spotguard:mode"].clone());
        gates.push(f.max);
    }
    // Failing back once the primary has held its capacity for the 10-minute
    // recovery_for, then normal once the (empty) fallback has dwelt: never
    // back to failed-over, and the gate never reopened.
    let first_back = modes
        .iter()
        .position(|m| m == "failing-back")
        .expect("failed back");
    assert!((9..=11).contains(&first_back), "{modes:?}");
    assert!(
        modes[first_back..].iter().all(|m| m != "failed-over"),
        "{modes:?}"
    );
    assert_eq!(
        modes.last().map(String::as_str),
        Some("normal"),
        "{modes:?}"
    );
    assert!(gates[first_back..].iter().all(|g| *g == 0), "{gates:?}");
}

/// A fallback group that cannot be read (its region impaired, or a group
/// IAM denies) fails the tick, but a primary at 0 with work queued is
/// still raised: after a quiet night it would otherwise stay empty.
#[tokio::test(start_paused = true)]
async fn an_unreadable_fallback_does_not_keep_an_empty_primary_at_zero() {
    let c = controller();
    set_primary(&c, 0, 0);
    c.cloud.fail_next(
        "DescribeAutoScalingGroups",
        "us-east-2",
        "AccessDenied: not authorized to perform autoscaling:DescribeAutoScalingGroups",
        100,
    );
    assert!(c.tick(Vec::new()).await.is_err(), "the failure is reported");
    assert_eq!(c.cloud.group_of("us-east-1", "gpu-east-1").desired, 1);
}

/// `failover.on_quota` through the configuration: the quota codes fail
/// over by default (another region has its own quota), and not at all when
/// it is switched off.
#[tokio::test(start_paused = true)]
async fn quota_failures_fail_over_only_with_on_quota() {
    const QUOTA: &str = "Could not launch Spot Instances. MaxSpotInstanceCountExceeded - Max spot instance count exceeded. Launching EC2 instance failed.";
    let on = controller();
    let r = on
        .handle_event(&launch(
            "EC2 Instance Launch Unsuccessful",
            QUOTA,
            "2026-11-28T08:00:00Z",
        ))
        .await
        .unwrap()
        .expect("handled");
    assert_eq!(r.reconcile.mode, "failed-over");
    let off = fake_controller(
        &format!(
            "[primary]\nasg = \"gpu-east-1\"\nqueue_url = \"{QUEUE}\"\n[fallback]\nasg = \"gpu-east-2\"\n[failover]\nshortage_for = \"0s\"\non_quota = false\n"
        ),
        ("us-east-1", "gpu-east-1", 3, 2),
        &[("us-east-2", "gpu-east-2")],
    );
    let r = off
        .handle_event(&launch(
            "EC2 Instance Launch Unsuccessful",
            QUOTA,
            "2026-11-28T08:00:00Z",
        ))
        .await
        .unwrap();
    assert_eq!(r.map(|r| r.reconcile.mode), Some("normal"));
    assert_eq!(off.cloud.group_of("us-east-2", "gpu-east-2").max, 0);
}

#[tokio::test(start_paused = true)]
async fn periodic_tasks_whose_memory_would_pass_the_groups_50_tags_send_nothing() {
    let mut c = controller();
    c.cfg.cron.tasks = crate::cron::parse(
        "version: 1\ncron:\n - name: a\n   url: /a\n   schedule: \"*/5 * * * *\"\n - name: b\n   url: /b\n   schedule: \"*/5 * * * *\"\n",
    )
    .unwrap();
    // 49 tags of the user's already: AWS keeps at most 50 on a group, so
    // the two slots cannot be remembered, and an unremembered slot is
    // never sent (a retried invocation would send it again).
    {
        let mut st = c.cloud.lock();
        let p = st
            .groups
            .get_mut(&("us-east-1".into(), "gpu-east-1".into()))
            .unwrap();
        for i in 0..49 {
            p.tags.insert(format!("team:{i}"), "x".into());
        }
    }
    for _ in 0..3 {
        assert!(c.tick(Vec::new()).await.unwrap().cron.is_empty());
        tokio::time::advance(std::time::Duration::from_secs(310)).await;
    }
    let st = c.cloud.lock();
    assert!(st.sent.iter().all(|s| s.1 != QUEUE), "{:?}", st.sent);
    let p = &st.groups[&("us-east-1".to_string(), "gpu-east-1".to_string())];
    assert_eq!(p.tags.len(), 49, "the write refused whole, as AWS does");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_region_costs_one_bound_and_the_healthy_link_still_fails_over() {
    let c = cascade_controller();
    // us-west-2 (the last fallback) accepts connections and never answers:
    // each read of it ends, as the SDK's bound makes it, after 10 s.
    {
        let mut st = c.cloud.lock();
        // Every call in the region: groups, policies, activities alike.
        st.latency
            .insert("us-west-2".into(), crate::aws::CALL_TIMEOUT);
        for op in [
            "DescribeAutoScalingGroups",
            "DescribePolicies",
            "DescribeScalingActivities",
        ] {
            let q = st.faults.entry((op, "us-west-2".into())).or_default();
            for _ in 0..20 {
                q.push_back("no answer within 10s".into());
            }
        }
    }
    // A scheduled tick of a Lambda with 20 s left, the primary short and
    // failing: the first link fails over within the deadline.
    c.cloud.lock().activities.insert(
        ("us-east-1".into(), "gpu".into()),
        vec![capacity_failure("a1")],
    );
    let t0 = tokio::time::Instant::now();
    let tick = json!({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}});
    let r = c
        .handle_event_by(&tick, Some(t0 + std::time::Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("acted");
    assert_eq!(r.reconcile.links[0].mode, "failed-over");
    assert!(c.cloud.group_of("us-east-2", "gpu").max >= 1);
    // Read at once: one bound for the whole tick, not one per read in turn.
    assert_eq!(t0.elapsed(), crate::aws::CALL_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn a_tick_reads_each_group_once_and_re_checks_only_before_acting() {
    let mut c = controller();
    c.cfg.cron.tasks = crate::cron::parse(
        "version: 1\ncron:\n - name: report\n   url: /r\n   schedule: \"*/5 * * * *\"\n",
    )
    .unwrap();
    // Nothing to act on (the primary whole, the fallback closed, the
    // memory of the first tick written): one reading of each group.
    set_primary(&c, 3, 3);
    c.tick(Vec::new()).await.unwrap();
    c.cloud.lock().calls.clear();
    tokio::time::advance(std::time::Duration::from_secs(60)).await;
    let r = c.tick(Vec::new()).await.unwrap();
    assert!(r.reconcile.links[0].plan.actions.is_empty(), "{r:?}");
    assert_eq!(c.cloud.calls("DescribeAutoScalingGroups").len(), 2);
    // Failing over: the reading, then the fallback's version re-checked
    // before acting. The scale-out from zero and the periodic tasks read
    // nothing again.
    set_primary(&c, 3, 2);
    c.cloud.lock().calls.clear();
    c.cloud.lock().activities.insert(
        ("us-east-1".into(), "gpu-east-1".into()),
        vec![capacity_failure("a1")],
    );
    let r = c.tick(Vec::new()).await.unwrap();
    assert_eq!(r.reconcile.mode, "failed-over");
    assert_eq!(c.cloud.calls("DescribeAutoScalingGroups").len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_tick_that_fails_over_keeps_the_shortfall_it_handed_and_raises_no_group_set_meanwhile() {
    let c = controller();
    // The primary short by 2 (desired 4, 2 InService), failing: the tick
    // fails over and hands the fallback 2; the scale-out from zero (work
    // waits) must not then set it to 1 from the tick's earlier reading.
    set_primary(&c, 4, 2);
    c.cloud.lock().activities.insert(
        ("us-east-1".into(), "gpu-east-1".into()),
        vec![capacity_failure("a1")],
    );
    let r = c.tick(Vec::new()).await.unwrap();
    assert_eq!(r.reconcile.mode, "failed-over");
    assert!(r.raised_from_zero.is_empty(), "{:?}", r.raised_from_zero);
    assert_eq!(c.cloud.group_of("us-east-2", "gpu-east-2").desired, 2);
    // An empty primary raised by someone else between the reading and the
    // scale-out from zero keeps what they set.
    let c = controller();
    set_primary(&c, 0, 0);
    {
        let mut st = c.cloud.lock();
        st.race = None;
    }
    // The re-read before acting sees desired 5 (set meanwhile).
    let reading = c.read().await;
    set_primary(&c, 5, 0);
    let (m, e, depth) = c
        .publish_metrics_with(reading.depth.clone(), &reading.groups)
        .await;
    let r = c
        .tick_rest(Vec::new(), &reading, (m, e, depth), None)
        .await
        .unwrap();
    assert!(r.raised_from_zero.is_empty());
    assert_eq!(c.cloud.group_of("us-east-1", "gpu-east-1").desired, 5);
}

#[tokio::test(start_paused = true)]
async fn a_tick_publishes_what_the_dashboard_shows_and_a_failure_once() {
    let c = controller();
    let failure = capacity_failure(
        // A real activity id: a UUID, longer than the memory keeps.
        "9f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b",
    );
    c.cloud
        .lock()
        .activities
        .insert(("us-east-1".into(), "gpu-east-1".into()), vec![failure]);
    c.tick(Vec::new()).await.unwrap();
    let points = c.cloud.lock().metrics.clone();
    let value = |name: &str, dims: &[(&str, &str)]| -> Vec<f64> {
        points
            .iter()
            .filter(|p| {
                p.name == name
                    && p.dimensions.len() == dims.len()
                    && dims
                        .iter()
                        .all(|(k, v)| p.dimensions.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|p| p.value)
            .collect()
    };
    let g = |group: &'static str, region: &'static str| {
        [("AutoScalingGroupName", group), ("Region", region)]
    };
    // In the control plane's region, every group's reading and each link's mode.
    assert_eq!(
        value("GroupInService", &g("gpu-east-1", "us-east-1")),
        [2.0]
    );
    assert_eq!(value("GroupDesired", &g("gpu-east-1", "us-east-1")), [3.0]);
    assert_eq!(
        value("GroupMaxSize", &g("gpu-east-2", "us-east-2")),
        [0.0],
        "as read, before the gate opened"
    );
    assert_eq!(
        value("LinkMode", &g("gpu-east-2", "us-east-2")),
        [1.0],
        "failed over"
    );
    assert_eq!(
        value(
            "CapacityFailures",
            &[
                ("AutoScalingGroupName", "gpu-east-1"),
                ("Region", "us-east-1"),
                ("Code", "InsufficientInstanceCapacity")
            ]
        ),
        [1.0]
    );
    let dashboard: Vec<_> = points
        .iter()
        .filter(|p| p.name != "BacklogPerInstance" && p.name != "FailedOver")
        .collect();
    assert!(
        dashboard.iter().all(|p| p.region == "us-east-1"),
        "{dashboard:?}"
    );
    let units: std::collections::BTreeSet<&str> = dashboard.iter().map(|p| p.unit).collect();
    assert_eq!(units.into_iter().collect::<Vec<_>>(), ["Count", "None"]);
    // Every point is in the published list (what the dashboard may show),
    // and every entry of the list is published.
    for p in &points {
        let dims: Vec<&str> = p.dimensions.iter().map(|d| d.0.as_str()).collect();
        assert!(
            crate::metrics::PUBLISHED
                .iter()
                .any(|(n, d)| *n == p.name && d.to_vec() == dims),
            "{} {dims:?} is not in metrics::PUBLISHED",
            p.name
        );
    }
    for (n, _) in crate::metrics::PUBLISHED {
        assert!(points.iter().any(|p| p.name == *n), "{n} never published");
    }
    // The same activity read again next tick is not a new failure.
    c.cloud.lock().metrics.clear();
    tokio::time::advance(std::time::Duration::from_secs(60)).await;
    c.tick(Vec::new()).await.unwrap();
    assert!(c
        .cloud
        .lock()
        .metrics
        .iter()
        .all(|p| p.name != "CapacityFailures"));
}

#[tokio::test(start_paused = true)]
async fn a_failure_an_event_brings_first_is_counted_once() {
    let c = controller();
    let r = c
        .handle_event(&launch(
            "EC2 Instance Launch Unsuccessful",
            ICE,
            "2026-11-28T08:00:00Z",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.reconcile.mode, "failed-over");
    let count = |c: &Controller<FakeCloud>| {
        c.cloud
            .lock()
            .metrics
            .iter()
            .filter(|p| p.name == "CapacityFailures")
            .map(|p| p.value)
            .sum::<f64>()
    };
    assert_eq!(count(&c), 1.0, "counted by the event");
    // The tick after reads the same activity from the group: not again.
    c.cloud.lock().activities.insert(
        ("us-east-1".into(), "gpu-east-1".into()),
        vec![capacity_failure("act-080000")],
    );
    tokio::time::advance(std::time::Duration::from_secs(60)).await;
    c.tick(Vec::new()).await.unwrap();
    assert_eq!(count(&c), 1.0);
}

#[tokio::test(start_paused = true)]
async fn periodic_tasks_begin_only_with_a_calls_bound_left_before_the_cut() {
    let mut c = controller();
    c.cfg.cron.tasks = crate::cron::parse(
        "version: 1\ncron:\n - name: report\n   url: /tasks/report\n   schedule: \"*/5 * * * *\"\n",
    )
    .unwrap();
    c.tick(Vec::new()).await.unwrap(); // first sight of the schedule
    tokio::time::advance(std::time::Duration::from_secs(310)).await;
    // 20 s to the deadline: the cut 15 s away, 5 s for the tasks after one
    // call's bound: none begun (the next tick catches up).
    let r = tick_within(&c, 20).await;
    assert!(r.cron.is_empty());
    // 25 s: exactly one call's bound (10 s) for them: sent.
    let r = tick_within(&c, 25).await;
    assert_eq!(r.cron.len(), 1);
    assert_eq!(r.metrics_error, None, "a clean tick reports no error");
    // Without the lease or a deadline: a tick all the same.
    assert!(c.leased_tick().await.unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn with_under_30_s_left_the_dead_agent_check_waits_for_the_next_tick() {
    let c = controller();
    set_primary(&c, 3, 3);
    c.cloud
        .lock()
        .groups
        .get_mut(&("us-east-1".into(), "gpu-east-1".into()))
        .unwrap()
        .busy = 1;
    mark(&c, "us-east-1", "i-busy0");
    tokio::time::advance(std::time::Duration::from_secs(1800)).await;
    // The cut 29 s away (34 s less the 5 s margin): not begun.
    let r = tick_within(&c, 34).await;
    assert!(r.dead_released.is_empty());
    let r = tick_within(&c, 35).await;
    assert_eq!(r.dead_released, vec!["i-busy0"]);
}

#[tokio::test(start_paused = true)]
async fn a_gate_opened_this_tick_lets_the_fallback_scale_out_from_zero_at_once() {
    // The primary cannot be read (its region impaired): a capacity failure
    // fails over with the gate at the cap, and the empty fallback is
    // raised to 1 in the same tick, from the gate just set (its reading
    // said MaxSize 0).
    let c = controller();
    c.cloud.lock().faults.insert(
        ("DescribeAutoScalingGroups", "us-east-1".into()),
        std::iter::repeat_n("ServiceUnavailable: impaired".to_string(), 50).collect(),
    );
    let r = c
        .tick(vec![Launch {
            at: start(),
            activity_id: "a-1".into(),
            kind: crate::reconcile::LaunchKind::CapacityFailure(
                "InsufficientInstanceCapacity".into(),
            ),
            offering: Default::default(),
        }])
        .await
        .unwrap();
    assert_eq!(r.reconcile.mode, "failed-over");
    assert!(
        r.raised_from_zero.iter().any(|g| g.contains("gpu-east-2")),
        "{:?}",
        r.raised_from_zero
    );
    assert_eq!(c.cloud.group_of("us-east-2", "gpu-east-2").desired, 1);
}

#[tokio::test(start_paused = true)]
async fn on_failover_the_fallbacks_scaling_policy_is_turned_on() {
    let c = controller();
    let name = c.cfg.fallbacks[0].policy_name.clone();
    let spec = crate::aws::MetricSpec::Custom {
        namespace: "spotguard".into(),
        name: "BacklogPerInstance".into(),
        dimensions: Vec::new(),
    };
    c.cloud.lock().policies.insert(
        ("us-east-2".into(), "gpu-east-2".into(), name.clone()),
        (
            Some(false),
            crate::aws::TargetTracking::new(name.clone(), 20.0, spec),
        ),
    );
    c.handle_event(&launch(
        "EC2 Instance Launch Unsuccessful",
        ICE,
        "2026-11-28T08:00:00Z",
    ))
    .await
    .unwrap();
    let st = c.cloud.lock();
    assert_eq!(
        st.policies[&("us-east-2".to_string(), "gpu-east-2".to_string(), name)].0,
        Some(true)
    );
}

#[tokio::test(start_paused = true)]
async fn the_primary_back_whole_is_asked_for_the_fallbacks_work() {
    let c = controller();
    c.handle_event(&launch(
        "EC2 Instance Launch Unsuccessful",
        ICE,
        "2026-11-28T08:00:00Z",
    ))
    .await
    .unwrap();
    {
        let mut st = c.cloud.lock();
        let f = st
            .groups
            .get_mut(&("us-east-2".into(), "gpu-east-2".into()))
            .unwrap();
        f.in_service = 2;
        f.busy = 2;
        let p = st
            .groups
            .get_mut(&("us-east-1".into(), "gpu-east-1".into()))
            .unwrap();
        p.in_service = 3;
        p.busy = 3;
    }
    tokio::time::advance(std::time::Duration::from_secs(60)).await;
    c.tick(Vec::new()).await.unwrap();
    // Whole with its 3, all busy: raised to the work in flight, 3 + 2.
    assert_eq!(c.cloud.group_of("us-east-1", "gpu-east-1").desired, 5);
}

#[tokio::test(start_paused = true)]
async fn each_group_gets_its_metric_name_and_closed_fallbacks_leave_the_fleet_figure() {
    let c = fake_controller(
        &format!(
            "[primary]\nasg = \"gpu-east-1\"\nqueue_url = \"{QUEUE}\"\n[fallback]\nasg = \"gpu-east-2\"\n[metric]\nprimary_name = \"PrimaryBacklog\"\nfallback_name = \"FallbackBacklog\"\n"
        ),
        ("us-east-1", "gpu-east-1", 2, 2),
        &[("us-east-2", "gpu-east-2")],
    );
    {
        let mut st = c.cloud.lock();
        for (region, name) in [("us-east-1", "gpu-east-1"), ("us-east-2", "gpu-east-2")] {
            let g = st.groups.get_mut(&(region.into(), name.into())).unwrap();
            // (A primary's intake tag means nothing: it is never left out.)
            g.tags.insert("spotguard:intake".into(), "closed".into());
        }
        st.groups
            .get_mut(&("us-east-2".into(), "gpu-east-2".into()))
            .unwrap()
            .in_service = 3;
    }
    let r = c.tick(Vec::new()).await.unwrap();
    let backlog: Vec<(&str, &str, f64)> = r
        .metrics
        .iter()
        .filter(|m| m.name.ends_with("Backlog"))
        .map(|m| (m.region.as_str(), m.name.as_str(), m.value))
        .collect();
    // 40 visible over the primary's 2 InService: the fallback's 3 have
    // their intake closed.
    assert_eq!(
        backlog,
        [
            ("us-east-1", "PrimaryBacklog", 20.0),
            ("us-east-2", "FallbackBacklog", 20.0)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn with_the_last_region_unreadable_the_link_before_it_holds_its_gate() {
    // us-east-2 and us-west-2 failed over an hour ago; the primary has been
    // whole as long. us-west-2 cannot be read: it is taken as still failed
    // over, so us-east-2 does not fail back under it.
    let c = cascade_controller();
    let mut m = Memory::initial();
    m.mode = Mode::FailedOver;
    m.since = start() - chrono::Duration::hours(1);
    m.primary_whole_since = Some(start() - chrono::Duration::hours(1));
    {
        let mut st = c.cloud.lock();
        for region in ["us-east-2", "us-west-2"] {
            let g = st.groups.get_mut(&(region.into(), "gpu".into())).unwrap();
            g.tags = m.to_tags();
            g.max = 3;
            g.desired = 3;
            g.in_service = 3;
        }
        let p = st
            .groups
            .get_mut(&("us-east-1".into(), "gpu".into()))
            .unwrap();
        p.in_service = 4;
    }
    c.cloud.fail_next(
        "DescribeAutoScalingGroups",
        "us-west-2",
        "ServiceUnavailable",
        100,
    );
    c.tick(Vec::new()).await.ok();
    assert_eq!(mode_of(&c, "us-east-2").as_deref(), Some("failed-over"));
}

/// A tick as a Lambda invocation with `secs` left before its deadline.
async fn tick_within(c: &Controller<FakeCloud>, secs: u64) -> TickReport {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    c.tick_by(Vec::new(), Some(deadline))
        .await
        .unwrap()
        .unwrap()
}
