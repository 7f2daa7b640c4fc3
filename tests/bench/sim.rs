//! Simulation figures: speed (24 simulated hours of a 100-instance fleet
//! with 20,000 jobs, against real time), and the 2-hour outage scenario,
//! all three policies side by side, against the same scenario without the
//! outage. Printed as Markdown for the README (`./scripts/bench`).

use std::time::Instant;

use spotguard_sim::run::{run, Policy};
use spotguard_sim::scenario::Scenario;

fn scenario(name: &str) -> Scenario {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sim/scenarios")
        .join(name);
    match Scenario::load(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench-sim: {e}");
            std::process::exit(2);
        }
    }
}

fn main() {
    let seed = spotguard_tests::arg_u64("--seed", 1);
    // Speed.
    let s = scenario("fleet-24h.toml");
    let began = Instant::now();
    let o = run(&s, seed, Policy::Spotguard, &mut |_| {}).unwrap_or_else(|e| {
        eprintln!("bench-sim: {e}");
        std::process::exit(1)
    });
    let wall = began.elapsed().as_secs_f64();
    let simulated = s.duration.0.as_secs_f64();
    println!("# simulation speed: {} (seed {seed})\n", s.name);
    println!("| simulated s | wall s | simulated s per wall s | jobs done | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| {simulated:.0} | {wall:.1} | {:.0} | {}/{} | >= 5,000 simulated s per wall s ({}) |",
        simulated / wall,
        o.summary.done,
        o.summary.jobs,
        if simulated / wall >= 5000.0 {
            "met"
        } else {
            "missed"
        }
    );
    println!("\nratio against real time: {:.0}x\n", simulated / wall);

    for name in ["outage-2h.toml", "endless-2h.toml", "zone-dry.toml"] {
        compare(&scenario(name), seed);
    }

    // How much the outage figure depends on the boot time (launch to a
    // working agent): 2, 4 (the default) and 6 minutes.
    let s = scenario("outage-2h.toml");
    println!("# {}: sensitivity to the boot time (seed {seed})\n", s.name);
    println!(
        "| boot | policy | p95 wait s | p95 vs no outage | fallback instance-h | total cost $ |"
    );
    println!("|---|---|---|---|---|---|");
    for boot in ["2m", "4m", "6m"] {
        let mut s = s.clone();
        s.launch.boot = boot.parse().unwrap_or(s.launch.boot);
        let base = no_outage_p95(&s, seed);
        for p in [Policy::Spotguard, Policy::Seed, Policy::SingleRegion] {
            if let Ok(o) = run(&s, seed, p, &mut |_| {}) {
                let m = o.summary;
                println!(
                    "| {boot} | {} | {:.0} | {:.2}x | {:.1} | {:.2} |",
                    m.policy,
                    m.wait_p95_s,
                    m.wait_p95_s / base.max(1.0),
                    m.fallback_instance_hours,
                    m.cost_usd
                );
            }
        }
    }
    println!();
}

fn no_outage_p95(s: &Scenario, seed: u64) -> f64 {
    let mut calm = s.clone();
    calm.baseline_without_changes = true;
    run(&calm, seed, Policy::Spotguard, &mut |_| {})
        .map(|o| o.summary.wait_p95_s)
        .unwrap_or(0.0)
}

/// One scenario, the three policies, and the control law's goals (issue
/// 21): p95 wait at most 1.2x the no-outage run, 0 killed, 0 lost,
/// fallback instance-hours at most 1.3x the outage's shortfall, cost at
/// most 1.10x the single-region run.
fn compare(s: &Scenario, seed: u64) {
    let base = no_outage_p95(s, seed);
    let rows: Vec<_> = [Policy::Spotguard, Policy::Seed, Policy::SingleRegion]
        .into_iter()
        .filter_map(|p| run(s, seed, p, &mut |_| {}).ok().map(|o| o.summary))
        .collect();
    let refs: Vec<_> = rows.iter().collect();
    println!(
        "# {} (seed {seed}; p95 wait without the outage: {base:.0} s)\n",
        s.name
    );
    print!("{}", spotguard_sim::report::table(&refs, Some(base)));
    let (ours, single) = (&rows[0], &rows[2]);
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    let killed: usize = ours.killed.values().sum();
    println!(
        "\ngoals for spotguard: p95 <= 1.2x no outage ({:.2}x, {}), 0 killed ({killed}, {}), 0 lost ({}), cost <= 1.10x single-region ({:.2}x, {})\n",
        ours.wait_p95_s / base.max(1.0),
        verdict(ours.wait_p95_s <= 1.2 * base),
        verdict(killed == 0),
        verdict(ours.lost == 0),
        ours.cost_usd / single.cost_usd.max(1e-9),
        verdict(ours.cost_usd <= 1.10 * single.cost_usd),
    );
}
