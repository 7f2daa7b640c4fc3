//! Benchmark: work lost per spot interruption, with and without checkpoint
//! hand-over, for a job that checkpoints every 10 s.
//!
//! Time is scaled 1:50 (one job "second" is a 20 ms step) so a run takes
//! seconds: the job has 600 s of work and checkpoints every 10 s; the spot
//! notice comes at a random point of agent a's run (seeded); agent b
//! finishes the job. Work lost = work done in all executions - 600 s.
//!
//! - no hand-over: the job cannot resume and starts over on agent b;
//! - hand-over, periodic checkpoints only: the job ignores the notice, is
//!   stopped at the deadline, and b resumes from its last periodic checkpoint;
//! - hand-over, checkpoint on the notice: the job saves when told and yields.
//!
//! Usage: ./scripts/setup-moto && cargo build --release --workspace &&
//!        target/release/bench-checkpoint [--trials 5] [--seed 7]

use std::time::Duration;

use serde_json::json;
use spotguard_tests::agent_setup::{fleet, millis, secs};
use spotguard_tests::{arg_u64, median_max, Record, Rng};

const WORK: u64 = 600;
const EVERY: u64 = 10;
const STEP_MS: u64 = 20;

/// One interrupted run; returns the job seconds lost.
fn run(variant: &str, job: serde_json::Value, notice_after_steps: u64) -> u64 {
    let s = fleet(&format!("bench-ckpt-{variant}"), 10, 0, 2);
    let cfg = |i: usize, agent: &str| {
        s.agent_config(i, agent, |c| {
            c.scale_in.enabled = false;
            c.interruption.poll_interval = millis(100);
            c.interruption.deadline_margin = secs(5);
        })
    };
    let ma = &s.mocks[0];
    s.env.send(&s.queue, &job.to_string());
    let _a = s.start("agent-a", &cfg(0, "a"));
    assert!(s
        .env
        .wait_for(Duration::from_secs(30), || Record::read(s.dir.path())
            .count("start", "job")
            == 1));
    std::thread::sleep(Duration::from_millis(notice_after_steps * STEP_MS));
    // Deadline 1 s after the notice: a job that ignores it runs ~50 more steps.
    ma.control("/mock/spot-interruption", json!({"in_seconds": 6}));
    assert!(s.env.wait_for(Duration::from_secs(30), || {
        let r = Record::read(s.dir.path());
        r.count("yield", "job") + r.count("term", "job") >= 1
    }));
    std::thread::sleep(Duration::from_millis(300));
    let _b = s.start("agent-b", &cfg(1, "b"));
    assert!(
        s.env
            .wait_for(Duration::from_secs(120), || Record::read(s.dir.path())
                .count("done", "job")
                == 1),
        "{variant}: job not finished"
    );
    let total: u64 = Record::read(s.dir.path())
        .work("job")
        .iter()
        .map(|(f, t)| t - f)
        .sum();
    total.saturating_sub(WORK)
}

fn main() {
    let trials = arg_u64("--trials", 5) as usize;
    let mut rng = Rng::new(arg_u64("--seed", 7));
    let base =
        json!({"id": "job", "count_to": WORK, "step_ms": STEP_MS, "checkpoint_every": EVERY});
    let with = |k: &str| {
        let mut j = base.clone();
        j[k] = json!(true);
        j
    };
    let variants = [
        ("no hand-over (job starts over)", with("no_resume")),
        (
            "hand-over, periodic checkpoints only",
            with("ignore_notice"),
        ),
        ("hand-over, checkpoint on the notice", base.clone()),
    ];
    let points: Vec<u64> = (0..trials)
        .map(|_| 100 + (rng.unit() * 300.0) as u64)
        .collect();
    println!("# work lost per interruption: 600 s job, checkpoint every 10 s (time scaled 1:50)\n");
    println!("notice after {points:?} job seconds\n");
    println!("| variant | median lost s | max lost s |");
    println!("|---|---|---|");
    let mut medians = Vec::new();
    for (name, job) in variants {
        let lost: Vec<f64> = points
            .iter()
            .map(|p| run("v", job.clone(), *p) as f64)
            .collect();
        let (med, max) = median_max(&lost);
        println!("| {name} | {med:.0} | {max:.0} |");
        medians.push(med);
    }
    println!(
        "\nratio lost without / with hand-over (periodic checkpoints): {:.1}x",
        medians[0] / medians[1].max(1.0)
    );
}
