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
    println!("#### simulation speed: {} (seed {seed})\n", s.name);
    println!("| simulated s | wall s | simulated s per wall s | jobs done | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| {simulated:.0} | {wall:.1} | {:.0} | {}/{} | wall <= 60 s ({}) |",
        simulated / wall,
        o.summary.done,
        o.summary.jobs,
        if wall <= 60.0 { "met" } else { "missed" }
    );
    println!("\nratio against real time: {:.0}x\n", simulated / wall);

    // The 2-hour outage, all three policies.
    let s = scenario("outage-2h.toml");
    let mut calm = s.clone();
    calm.baseline_without_changes = true;
    let base = run(&calm, seed, Policy::Spotguard, &mut |_| {})
        .map(|o| o.summary.wait_p95_s)
        .unwrap_or(0.0);
    let rows: Vec<_> = [Policy::Spotguard, Policy::Seed, Policy::SingleRegion]
        .into_iter()
        .filter_map(|p| run(&s, seed, p, &mut |_| {}).ok().map(|o| o.summary))
        .collect();
    let refs: Vec<_> = rows.iter().collect();
    println!(
        "#### {} (seed {seed}; p95 wait without the outage: {base:.0} s)\n",
        s.name
    );
    print!("{}", spotguard_sim::report::table(&refs, Some(base)));
    let ours = &rows[0];
    let seed_row = &rows[1];
    println!(
        "\ngoals for spotguard: p95 <= 1.2x no outage ({}), 0 killed on failback ({}), fewer fallback instance-hours than the original ({}), 0 lost ({})",
        if ours.wait_p95_s <= 1.2 * base { "met" } else { "missed" },
        if !ours.killed.contains_key("GroupScaleIn") { "met" } else { "missed" },
        if ours.fallback_instance_hours < seed_row.fallback_instance_hours { "met" } else { "missed" },
        if ours.lost == 0 { "met" } else { "missed" },
    );
}
