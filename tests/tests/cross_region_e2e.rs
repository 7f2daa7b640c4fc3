//! An agent on a fallback-region instance, started as user-data starts it:
//! its region from its own IMDS (us-east-2), no `AWS_REGION`, the queue URL
//! and topic ARN in AWS's real form (us-east-1), all through moto, which
//! keeps each region's resources apart by the request's signing region.
//! Before per-resource regions, this agent asked us-east-2 for the queue and
//! got `QueueDoesNotExist` on every receive (0 of 6 jobs ran).

use serde_json::json;
use spotguard_tests::agent_setup::{base_config, millis, secs, setup, to_toml, wait};
use spotguard_tests::{MockImds, Record};

#[test]
fn a_fallback_region_agent_runs_primary_jobs_notifies_the_primary_topic_and_scales_in_at_home() {
    let s = setup("xregion", 5);
    assert!(
        s.queue.starts_with("https://sqs.us-east-1.amazonaws.com/"),
        "{}",
        s.queue
    );
    let ids = s.env.create_group_in("us-east-2", "fallback", 0, 3, 2);
    let mock = MockImds::start(&["--instance-id", &ids[0], "--region", "us-east-2"]);
    let (topic, sub) = s.env.topic_to_queue("spotguard-notices");
    assert!(topic.starts_with("arn:aws:sns:us-east-1:"), "{topic}");
    let mut cfg = base_config(&s.queue, &mock.url, "a");
    cfg.worker.concurrency = 2;
    cfg.scale_in.idle_timeout = secs(3);
    cfg.interruption.poll_interval = millis(200);
    cfg.interruption.rebalance_poll_interval = millis(200);
    cfg.notify.sns_topic_arn = Some(topic.clone());
    let _agent = s.start("agent", &cfg);
    for i in 0..6 {
        s.env.send(
            &s.queue,
            &json!({"id": format!("x{i}"), "sleep_ms": 200}).to_string(),
        );
    }
    wait(
        &s,
        60,
        "6 primary-queue jobs done by the fallback agent",
        || Record::read(s.dir.path()).total("done") == 6,
    );
    // A rebalance recommendation: published to the primary region's topic;
    // intake stops, and the idle instance scales itself in, in its own group.
    mock.control("/mock/rebalance", json!({}));
    let mut got = Vec::new();
    wait(&s, 20, "the notice on the us-east-1 topic", || {
        got.extend(s.env.peek(&sub));
        !got.is_empty()
    });
    let v: serde_json::Value = serde_json::from_str(&got[0]).expect("JSON notice");
    assert_eq!(v["event"], "rebalance_recommendation");
    assert_eq!(v["instance_id"], ids[0]);
    wait(&s, 30, "the us-east-2 group to shrink to 1", || {
        s.env.group_in("us-east-2", "fallback").desired == 1
    });
    // Every call went to its resource's region.
    let p = &s.env.proxy;
    for (op, region) in [
        ("ReceiveMessage", "us-east-1"),
        ("DeleteMessage", "us-east-1"),
        ("Publish", "us-east-1"),
        ("TerminateInstanceInAutoScalingGroup", "us-east-2"),
    ] {
        let calls = p.calls_of(op);
        assert!(!calls.is_empty(), "no {op}");
        assert!(
            calls.iter().all(|c| c.region == region),
            "{op}: {:?}",
            calls.iter().map(|c| &c.region).collect::<Vec<_>>()
        );
    }
    assert!(p.calls_of("ReceiveMessage").iter().all(|c| c.status == 200));
    // Its log (stderr, not a terminal, as under systemd) has no colour codes.
    let log = std::fs::read_to_string(s.dir.path().join("agent.log")).expect("agent log");
    assert!(log.contains("starting"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "ANSI escape codes in a non-terminal log"
    );
}

#[test]
fn a_queue_url_without_a_region_is_refused_at_start_naming_queue_region() {
    let dir = spotguard_tests::TempDir::new("noregion");
    let mock = MockImds::start(&[]);
    let mut cfg = base_config(
        "https://vpce-0abc.sqs.us-east-1.vpce.amazonaws.com/1/jobs",
        &mock.url,
        "a",
    );
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, to_toml(&cfg)).expect("write");
    let out = std::process::Command::new(spotguard_tests::bin("spotguard-agent"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("queue.region"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Naming the region makes it valid.
    cfg.queue.region = Some("us-east-1".into());
    std::fs::write(&path, to_toml(&cfg)).expect("write");
    let out = std::process::Command::new(spotguard_tests::bin("spotguard-agent"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
