//! Benchmark of `spotguard-controller`:
//! - decision time of one reconcile (the pure function, AWS calls mocked away),
//!   beside parsing the EventBridge event that triggers it;
//! - wall time of one `once` against moto (two regions, through loopback);
//! - start-up to ready of `lambda` (first request to a fake Lambda runtime
//!   API on loopback), beside the same binary's `--version` (process start alone).
//!
//! Usage: cargo build --release --workspace && target/release/bench-controller [--runs 20]

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use spotguard_controller::reconcile::{
    reconcile, FallbackGroup, Launch, LaunchKind, Memory, Settings,
};
use spotguard_tests::aws_env::AwsEnv;
use spotguard_tests::{arg_u64, bin, lambda_env, median_max, TempDir};

fn main() {
    let runs = arg_u64("--runs", 20) as usize;

    // 1. Decision time.
    let s = Settings {
        failures: 1,
        window: Duration::from_secs(600),
        capacity_ttl: Duration::from_secs(180),
        recovery_for: Duration::from_secs(600),
        min_dwell: Duration::from_secs(300),
        step: 1,
        cap: 10,
        ..Settings::default()
    };
    let now = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap_or_default();
    let launches: Vec<Launch> = (0..10)
        .map(|i| Launch {
            at: now - chrono::Duration::seconds(i * 5),
            activity_id: format!("activity-{i:04}"),
            kind: if i % 2 == 0 {
                LaunchKind::CapacityFailure("InsufficientInstanceCapacity".into())
            } else {
                LaunchKind::Success
            },
            offering: Default::default(),
        })
        .collect();
    let g = FallbackGroup {
        desired: 4,
        max: 10,
        in_service: 4,
        busy: 2,
        policy_enabled: Some(true),
    };
    let event = serde_json::json!({
        "version": "0", "id": "e", "detail-type": "EC2 Instance Launch Unsuccessful", "source": "aws.autoscaling",
        "account": "1", "time": "2026-11-28T08:00:00Z", "region": "us-east-1", "resources": [],
        "detail": {"StatusCode": "Failed", "StatusMessage": "InsufficientInstanceCapacity - none", "AutoScalingGroupName": "p",
                   "ActivityId": "a", "StartTime": "2026-11-28T08:00:00Z", "EndTime": "2026-11-28T08:00:00Z"}
    })
    .to_string();
    let iters = 20_000;
    let mut per_decision = Vec::new();
    let mut per_parse = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let mut actions = 0;
        for _ in 0..iters {
            let p = reconcile(
                &Memory::initial(),
                &g,
                std::hint::black_box(&launches),
                now,
                &s,
            );
            actions += p.actions.len();
        }
        std::hint::black_box(actions);
        per_decision.push(t.elapsed().as_secs_f64() * 1e6 / iters as f64);
        let t = Instant::now();
        for _ in 0..iters {
            let v: serde_json::Value =
                serde_json::from_str(std::hint::black_box(&event)).unwrap_or_default();
            std::hint::black_box(v);
        }
        per_parse.push(t.elapsed().as_secs_f64() * 1e6 / iters as f64);
    }
    let (dm, dx) = median_max(&per_decision);
    let (pm, _) = median_max(&per_parse);
    println!("# spotguard-controller benchmark (release build, loopback only)\n");
    println!("## one reconcile decision (10 launch outcomes, pure function), 5 x {iters} runs\n");
    println!("| decision us (median of 5 runs) | slowest run us | parsing the triggering event us | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| {dm:.2} | {dx:.2} | {pm:.2} | {:.1}x the parse |",
        dm / pm
    );

    // 2. Wall time of `once` against moto.
    let env = AwsEnv::start();
    let queue = env.create_queue("jobs", 5);
    env.create_group_in("us-east-1", "gpu-primary", 0, 10, 1);
    env.create_group_in("us-east-2", "gpu-fallback", 0, 0, 0);
    let dir = TempDir::new("bench-ctl");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!("[primary]\nasg = \"gpu-primary\"\nqueue_url = \"{queue}\"\n[fallback]\nasg = \"gpu-fallback\"\n"),
    )
    .expect("config");
    let mut walls = Vec::new();
    for _ in 0..runs {
        let mut cmd = Command::new(bin("spotguard-controller"));
        cmd.arg("once")
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env.agent_env() {
            cmd.env(k, v);
        }
        let t = Instant::now();
        let st = cmd.status().expect("once");
        assert!(st.success(), "once failed");
        walls.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (wm, wx) = median_max(&walls);
    let calls = env.proxy.calls().len() as f64 / runs as f64;
    println!("\n## `spotguard-controller once` against moto ({runs} runs)\n");
    println!("| median ms | max ms | AWS calls per run |");
    println!("|---|---|---|");
    println!("| {wm:.0} | {wx:.0} | {calls:.0} |");

    // 3. Start-up to ready (Lambda).
    let mut ready = Vec::new();
    let mut version = Vec::new();
    for _ in 0..runs {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut cmd = Command::new(bin("spotguard-controller"));
        cmd.arg("lambda");
        lambda_env(&mut cmd, &addr.to_string());
        cmd.env("SPOTGUARD_PRIMARY_ASG", "gpu-primary")
            .env("SPOTGUARD_PRIMARY_QUEUE_URL", &queue)
            .env("SPOTGUARD_FALLBACK_ASG", "gpu-fallback")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env.agent_env() {
            cmd.env(k, v);
        }
        let t = Instant::now();
        let mut child = cmd.spawn().expect("lambda");
        let (mut conn, _) = listener
            .accept()
            .expect("the runtime never asked for an event");
        ready.push(t.elapsed().as_secs_f64() * 1000.0);
        let mut buf = [0u8; 256];
        let _ = conn.read(&mut buf);
        let _ = child.kill();
        let _ = child.wait();
        let t = Instant::now();
        let st = Command::new(bin("spotguard-controller"))
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .expect("version");
        assert!(st.success());
        version.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (rm, rx) = median_max(&ready);
    let (vm, _) = median_max(&version);
    println!(
        "\n## start-up to ready: `lambda` until its first runtime API request ({runs} runs)\n"
    );
    println!("| median ms | max ms | `--version` median ms (process start) | ratio |");
    println!("|---|---|---|---|");
    println!("| {rm:.1} | {rx:.1} | {vm:.1} | {:.1}x |", rm / vm);
}
