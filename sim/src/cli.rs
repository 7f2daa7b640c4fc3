//! `spotguard-sim run SCENARIO.toml [--seed N] [--policy ...] [--out DIR]`
//! and `spotguard-sim sweep --seeds 1..N SCENARIO.toml`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::report;
use crate::run::{run, Outcome, Policy};
use crate::scenario::Scenario;

#[derive(Debug, Parser)]
#[command(
    name = "spotguard-sim",
    version,
    about = "Simulate a spot GPU fleet under spotguard, in virtual time"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Which {
    Spotguard,
    /// spotguard with the first fallback only.
    #[value(name = "spotguard-2-regions")]
    TwoRegions,
    Seed,
    SingleRegion,
    /// Every policy (spotguard-2-regions only for a scenario with a cascade).
    All,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a scenario: table on stdout, summary.json and report.html in --out.
    Run {
        scenario: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, value_enum, default_value = "all")]
        policy: Which,
        #[arg(long, default_value = "sim-out")]
        out: PathBuf,
        /// Override the scenario's boot time (running to a working agent),
        /// e.g. `2m` or `6m`: how much the figures depend on it.
        #[arg(long)]
        boot: Option<String>,
    },
    /// Run the spotguard policy over many seeds and check the invariants.
    Sweep {
        scenario: PathBuf,
        /// A range `A..B` (B included).
        #[arg(long, default_value = "1..10")]
        seeds: String,
    },
}

fn policies(w: Which) -> Vec<Policy> {
    match w {
        Which::Spotguard => vec![Policy::Spotguard],
        Which::TwoRegions => vec![Policy::TwoRegions],
        Which::Seed => vec![Policy::Seed],
        Which::SingleRegion => vec![Policy::SingleRegion],
        Which::All => vec![
            Policy::Spotguard,
            Policy::TwoRegions,
            Policy::Seed,
            Policy::SingleRegion,
        ],
    }
}

fn progress_bar(label: &str) -> impl FnMut(f64) {
    let tty = std::io::stderr().is_terminal();
    let label = label.to_string();
    let mut last = -1i64;
    move |f: f64| {
        let pct = (f * 100.0) as i64;
        if pct == last {
            return;
        }
        last = pct;
        let mut e = std::io::stderr();
        if tty {
            let filled = (f * 30.0) as usize;
            let _ = write!(
                e,
                "\r{label:<14} [{}{}] {pct:3}%",
                "#".repeat(filled),
                " ".repeat(30 - filled)
            );
            if pct >= 100 {
                let _ = writeln!(e);
            }
        } else if pct % 25 == 0 {
            let _ = writeln!(e, "{label}: {pct}%");
        }
    }
}

fn parse_seeds(s: &str) -> Result<std::ops::RangeInclusive<u64>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("--seeds {s:?}: expected A..B"))?;
    let a: u64 = a
        .trim()
        .parse()
        .map_err(|_| format!("--seeds {s:?}: {a:?} is not a number"))?;
    let b: u64 = b
        .trim()
        .trim_start_matches('=')
        .parse()
        .map_err(|_| format!("--seeds {s:?}: {b:?} is not a number"))?;
    if b < a {
        return Err(format!("--seeds {s:?}: empty range"));
    }
    Ok(a..=b)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            scenario,
            seed,
            policy,
            out,
            boot,
        } => match run_command(&scenario, seed, policy, &out, boot.as_deref()) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("spotguard-sim: {e}");
                ExitCode::from(2)
            }
        },
        Command::Sweep { scenario, seeds } => match sweep(&scenario, &seeds) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("spotguard-sim: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// Runs the chosen policies; returns whether spotguard kept every invariant.
pub fn run_command(
    path: &std::path::Path,
    seed: u64,
    which: Which,
    out: &std::path::Path,
    boot: Option<&str>,
) -> Result<bool, String> {
    let mut s = Scenario::load(path)?;
    if let Some(b) = boot {
        s.launch.boot = b.parse().map_err(|e: String| format!("--boot: {e}"))?;
    }
    let mut outcomes: Vec<(Policy, Outcome)> = Vec::new();
    for p in policies(which) {
        if matches!(which, Which::All) && p == Policy::TwoRegions && s.cascade().len() < 2 {
            continue;
        }
        let o = run(&s, seed, p, &mut progress_bar(p.name()))?;
        outcomes.push((p, o));
    }
    // The same scenario without its capacity changes, for the p95 ratio.
    let no_outage = {
        let mut calm = s.clone();
        calm.baseline_without_changes = true;
        let any_change = std::iter::once(&s.primary)
            .chain(s.cascade())
            .flat_map(|r| r.pools())
            .any(|z| !z.capacity_changes.is_empty());
        if any_change {
            Some(
                run(
                    &calm,
                    seed,
                    Policy::Spotguard,
                    &mut progress_bar("no outage"),
                )?
                .summary
                .wait_p95_s,
            )
        } else {
            None
        }
    };
    let rows: Vec<&crate::run::Summary> = outcomes.iter().map(|o| &o.1.summary).collect();
    let table = report::table(&rows, no_outage);
    println!("{}: seed {seed}\n\n{table}", s.name);
    std::fs::create_dir_all(out).map_err(|e| format!("--out {}: {e}", out.display()))?;
    let summary = serde_json::json!({
        "scenario": s.name,
        "seed": seed,
        "p95_wait_without_the_capacity_changes_s": no_outage,
        "policies": rows,
        // What the report plots, one sample per simulated minute.
        "series": outcomes.iter().map(|(p, o)| (p.name(), &o.series)).collect::<std::collections::BTreeMap<_, _>>(),
    });
    let text = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
    std::fs::write(out.join("summary.json"), text + "\n")
        .map_err(|e| format!("{}: {e}", out.display()))?;
    let named: Vec<(&str, &Outcome)> = outcomes.iter().map(|(p, o)| (p.name(), o)).collect();
    let html = report::html(&s.name, seed, &named, no_outage)?;
    std::fs::write(out.join("report.html"), html).map_err(|e| format!("{}: {e}", out.display()))?;
    println!(
        "wrote {} and {}",
        out.join("summary.json").display(),
        out.join("report.html").display()
    );
    let mut ok = true;
    for (p, o) in &outcomes {
        if p.is_spotguard() && !o.summary.violations.is_empty() {
            ok = false;
            eprintln!(
                "INVARIANT VIOLATED (replay: spotguard-sim run {} --seed {seed} --policy {}):",
                path.display(),
                p.name()
            );
            for v in &o.summary.violations {
                eprintln!("  {v}");
            }
        }
    }
    Ok(ok)
}

fn sweep(path: &std::path::Path, seeds: &str) -> Result<bool, String> {
    let s = Scenario::load(path)?;
    let range = parse_seeds(seeds)?;
    let mut failed = Vec::new();
    let n = range.clone().count();
    for seed in range {
        let o = run(&s, seed, Policy::Spotguard, &mut |_| {})?;
        let v = &o.summary.violations;
        println!(
            "seed {seed}: {}/{} done, p95 wait {:.0} s, lost {}, killed {}, {}",
            o.summary.done,
            o.summary.jobs,
            o.summary.wait_p95_s,
            o.summary.lost,
            o.summary.killed.values().sum::<usize>(),
            if v.is_empty() {
                "ok".to_string()
            } else {
                format!("{} violation(s)", v.len())
            }
        );
        if !v.is_empty() {
            for x in v {
                println!("  {x}");
            }
            failed.push(seed);
        }
    }
    println!("sweep: {} seeds, {} failed", n, failed.len());
    for seed in &failed {
        println!(
            "replay: spotguard-sim run {} --seed {seed} --policy spotguard",
            path.display()
        );
    }
    Ok(failed.is_empty())
}
