//! The README's local run: moto, two mock IMDS instances, two agents and the
//! sample worker, a spot notice part-way, then a timeline and an account of
//! every job. Exits non-zero if a job was lost. Loopback only.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::json;
use spotguard_tests::agent_setup::{base_config, millis, secs, to_toml};
use spotguard_tests::aws_env::{start_agent, AwsEnv};
use spotguard_tests::{now_ms, MockImds, Record, TempDir};

const SHORT_JOBS: usize = 10;
const LONG_JOBS: usize = 2;

/// The demo's agents: the test worker, three jobs at a time, a 10 s idle
/// scale-in (the agent's own config type, serialised).
fn config(queue: &str, imds: &str, agent: &str) -> String {
    let mut c = base_config(queue, imds, agent);
    c.queue.wait_time = secs(2);
    c.queue.error_visibility_timeout = secs(30);
    c.worker.concurrency = 3;
    c.worker.state_dir = std::env::temp_dir()
        .join("spotguard-demo-state")
        .display()
        .to_string();
    c.interruption.poll_interval = millis(500);
    c.interruption.deadline_margin = secs(5);
    c.scale_in.idle_timeout = secs(10);
    to_toml(&c)
}

fn main() {
    let started = now_ms();
    let t = |ms: u128| format!("{:>6.1}s", ms.saturating_sub(started) as f64 / 1000.0);
    let dir = TempDir::new("demo");
    println!(
        "spotguard local run (moto + mock IMDS, loopback only); work dir {}",
        dir.path().display()
    );
    let env = AwsEnv::start();
    let queue = env.create_queue("jobs", 5);
    let ids = env.create_group("gpu-workers", 0, 4, 2);
    println!(
        "{} queue `jobs`, group `gpu-workers` with instances {} and {}",
        t(now_ms()),
        ids[0],
        ids[1]
    );
    let mock_a = MockImds::start(&["--instance-id", &ids[0]]);
    let mock_b = MockImds::start(&["--instance-id", &ids[1]]);
    let _a = start_agent(
        &env,
        dir.path(),
        "agent-a",
        &config(&queue, &mock_a.url, "a"),
    );
    println!("{} agent a started on {}", t(now_ms()), ids[0]);

    let mut jobs = Vec::new();
    for i in 0..LONG_JOBS {
        let id = format!("train-{i}");
        env.send(
            &queue,
            &json!({"id": id, "sleep_ms_first": 120_000, "sleep_ms": 1500}).to_string(),
        );
        jobs.push(id);
    }
    for i in 0..SHORT_JOBS {
        let id = format!("infer-{i}");
        env.send(&queue, &json!({"id": id, "sleep_ms": 700}).to_string());
        jobs.push(id);
    }
    println!(
        "{} enqueued {} jobs ({} long, {} short)",
        t(now_ms()),
        jobs.len(),
        LONG_JOBS,
        SHORT_JOBS
    );

    std::thread::sleep(Duration::from_secs(5));
    let notice = mock_a.control(
        "/mock/spot-interruption",
        json!({"action": "terminate", "in_seconds": 15}),
    );
    let notice_at = now_ms();
    println!(
        "{} SPOT NOTICE for agent a: interruption at {} (jobs still running then are handed back 5 s before)",
        t(notice_at),
        notice["time"].as_str().unwrap_or("?")
    );
    std::thread::sleep(Duration::from_secs(2));
    let _b = start_agent(
        &env,
        dir.path(),
        "agent-b",
        &config(&queue, &mock_b.url, "b"),
    );
    println!("{} agent b started on {}", t(now_ms()), ids[1]);

    // Until every job is done and agent b, idle, has scaled itself in.
    let deadline = Instant::now() + Duration::from_secs(120);
    let all_done = |r: &Record| jobs.iter().all(|j| r.count("done", j) >= 1);
    let mut desired = 2;
    let mut scaled_in_at = None;
    while Instant::now() < deadline {
        if scaled_in_at.is_none() {
            desired = env.group("gpu-workers").desired;
            if desired < 2 {
                scaled_in_at = Some(now_ms());
            }
        }
        if scaled_in_at.is_some()
            && all_done(&Record::read(dir.path()))
            && env.depth(&queue) == (0, 0)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    let r = Record::read(dir.path());
    println!("\ntimeline (worker events, by job):");
    let mut events: Vec<(u128, String)> = Vec::new();
    for l in &r.lines {
        let at: u128 = l.last().and_then(|x| x.parse().ok()).unwrap_or(0);
        let what = match l[0].as_str() {
            "start" => format!("agent {} started {} (try #{})", l[4], l[1], l[2]),
            "done" => format!("{} done", l[1]),
            "term" => format!("{} stopped at the drain deadline -> handed back", l[1]),
            "fail" => format!("{} failed", l[1]),
            _ => continue,
        };
        events.push((at, what));
    }
    // When agent a saw the notice (its log's "state change" for it), not
    // when the mock was told: the agent sees it up to a poll later.
    let seen_at = std::fs::read_to_string(dir.path().join("agent-a.log"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("state change") && l.contains("Spot"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|ts| chrono::DateTime::parse_from_rfc3339(ts).ok())
        .map_or(notice_at, |t| t.timestamp_millis() as u128);
    events.push((
        seen_at,
        "SPOT NOTICE seen by agent a: intake stopped".into(),
    ));
    if let Some(at) = scaled_in_at {
        events.push((
            at,
            format!("agent b idle: group desired capacity 2 -> {desired}"),
        ));
    }
    events.sort();
    for (at, what) in &events {
        println!("  {} {what}", t(*at));
    }

    let done: BTreeSet<&String> = jobs.iter().filter(|j| r.count("done", j) >= 1).collect();
    let handed_back: Vec<&String> = jobs.iter().filter(|j| r.count("term", j) >= 1).collect();
    let redone_by_b = handed_back
        .iter()
        .filter(|j| r.starts(j).iter().any(|(_, agent, _)| agent == "b") && r.count("done", j) >= 1)
        .count();
    let duplicates: usize = jobs
        .iter()
        .map(|j| r.count("done", j).saturating_sub(1))
        .sum();
    let (visible, in_flight) = env.depth(&queue);
    let queued = usize::try_from(visible + in_flight).unwrap_or(0);
    // A job is lost when it was never done and its message is gone.
    let lost = jobs.len().saturating_sub(done.len() + queued);
    let unfinished = jobs.len() - done.len();
    println!("\naccount:");
    println!("  jobs                       {}", jobs.len());
    println!("  done                       {}", done.len());
    println!("  handed back at the notice  {}", handed_back.len());
    println!("  redone by agent b          {redone_by_b}");
    println!("  done twice                 {duplicates}");
    println!("  still queued               {visible} visible, {in_flight} in flight");
    println!("  lost                       {lost}");
    println!("  group desired capacity     2 -> {desired} (agent b scaled itself in when idle)");
    if lost > 0 || unfinished > 0 {
        eprintln!(
            "FAILED: {lost} job(s) lost, {unfinished} not done within the run; logs kept in {}",
            dir.path().display()
        );
        std::mem::forget(dir);
        std::process::exit(1);
    }
}
