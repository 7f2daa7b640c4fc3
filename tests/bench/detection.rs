//! Benchmark: spot-notice detection latency of `spotguard-agent watch`
//! against the original design's 5 s curl loop, on the same mock IMDS, and
//! the idle cost (RSS, CPU) of `watch` with default intervals.
//!
//! Usage: cargo build --release --workspace &&
//!        target/release/bench-detection [--trials 20] [--idle-secs 60] [--seed N]
//!        [--skip-baseline] [--skip-idle]
//!
//! Each trial resets the mock, waits a random fraction of the poller's
//! interval (so the notice lands at a uniformly random poll phase), sets a
//! notice and times until the poller prints its line.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use spotguard_tests::{bin, median_max, proc_usage, Lines, MockImds, Proc, Rng};

struct Opts {
    trials: usize,
    idle_secs: u64,
    seed: u64,
    baseline: bool,
    idle: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        trials: 20,
        idle_secs: 60,
        seed: 42,
        baseline: true,
        idle: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match a.as_str() {
            "--trials" => o.trials = num("--trials") as usize,
            "--idle-secs" => o.idle_secs = num("--idle-secs"),
            "--seed" => o.seed = num("--seed"),
            "--skip-baseline" => o.baseline = false,
            "--skip-idle" => o.idle = false,
            other => panic!("unknown option {other}"),
        }
    }
    o
}

/// Times `trials` notices through a poller whose stdout is `lines`.
fn trials(mock: &MockImds, lines: &Lines, interval: Duration, n: usize, rng: &mut Rng) -> Vec<f64> {
    let mut out = Vec::new();
    for i in 0..n {
        mock.control("/mock/reset", json!({}));
        std::thread::sleep(interval.mul_f64(rng.unit()));
        lines.drain();
        let t0 = Instant::now();
        // A different notice time each trial, so it is a new notice.
        mock.control("/mock/spot-interruption", json!({"in_seconds": 120 + i}));
        loop {
            let (at, _) = lines
                .next(interval * 3 + Duration::from_secs(2))
                .unwrap_or_else(|| panic!("trial {i}: no detection"));
            if at >= t0 {
                out.push(at.duration_since(t0).as_secs_f64());
                break;
            }
        }
    }
    mock.control("/mock/reset", json!({}));
    out
}

fn row(name: &str, xs: &[f64]) -> (f64, f64) {
    let (med, max) = median_max(xs);
    println!("| {name} | {} | {med:.3} | {max:.3} |", xs.len());
    (med, max)
}

fn main() {
    let o = opts();
    let mut rng = Rng::new(o.seed);
    let mock = MockImds::start(&[]);
    println!(
        "# spot-notice detection (seed {}, {} trials each)\n",
        o.seed, o.trials
    );
    println!("| poller | trials | median s | max s |");
    println!("|---|---|---|---|");

    let mut cmd = Command::new(bin("spotguard-agent"));
    cmd.args(["watch", "--imds-endpoint", &mock.url]);
    let (agent, lines) = Proc::spawn(cmd, "spotguard-agent watch");
    std::thread::sleep(Duration::from_millis(1500));
    let ours = trials(&mock, &lines, Duration::from_secs(1), o.trials, &mut rng);
    let (our_med, our_max) = row("spotguard-agent watch (1 s)", &ours);
    drop(agent);

    if o.baseline {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/baseline-poll.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(script).arg(&mock.url).arg("5");
        let (base, lines) = Proc::spawn(cmd, "baseline curl loop");
        std::thread::sleep(Duration::from_millis(500));
        let theirs = trials(&mock, &lines, Duration::from_secs(5), o.trials, &mut rng);
        let (b_med, b_max) = row("original design: curl loop (5 s)", &theirs);
        drop(base);
        println!(
            "\nratio baseline/spotguard: median {:.1}x, max {:.1}x",
            b_med / our_med,
            b_max / our_max
        );
    }
    println!(
        "targets: median <= 0.6 s ({}), max <= 1.2 s ({})",
        if our_med <= 0.6 { "met" } else { "MISSED" },
        if our_max <= 1.2 { "met" } else { "MISSED" }
    );

    if o.idle {
        let mut cmd = Command::new(bin("spotguard-agent"));
        cmd.args(["watch", "--imds-endpoint", &mock.url]);
        let (agent, _lines) = Proc::spawn(cmd, "spotguard-agent watch");
        std::thread::sleep(Duration::from_secs(2));
        let (_, cpu0) = proc_usage(agent.pid()).expect("proc usage");
        let t0 = Instant::now();
        let mut peak = 0;
        while t0.elapsed() < Duration::from_secs(o.idle_secs) {
            std::thread::sleep(Duration::from_secs(1));
            peak = peak.max(proc_usage(agent.pid()).expect("proc usage").0);
        }
        let (rss, cpu1) = proc_usage(agent.pid()).expect("proc usage");
        let wall = t0.elapsed().as_secs_f64();
        let cpu_pct = (cpu1 - cpu0).as_secs_f64() / wall * 100.0;
        println!("\n# idle `watch`, default intervals, {wall:.0} s\n");
        println!("| RSS at end MiB | peak RSS MiB | CPU % of a core |");
        println!("|---|---|---|");
        println!(
            "| {:.1} | {:.1} | {cpu_pct:.3} |",
            rss as f64 / 1024.0,
            peak as f64 / 1024.0
        );
        println!(
            "targets: RSS <= 10 MiB ({}), CPU <= 0.2 % ({})",
            if peak as f64 / 1024.0 <= 10.0 {
                "met"
            } else {
                "MISSED"
            },
            if cpu_pct <= 0.2 { "met" } else { "MISSED" }
        );
    }
}
