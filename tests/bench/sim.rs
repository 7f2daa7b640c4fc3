//! Simulation figures: speed (24 simulated hours of a 100-instance fleet
//! with 20,000 jobs, against real time), and the 2-hour outage scenario,
//! all three policies side by side, against the same scenario without the
//! outage. Printed as Markdown for the README (`./scripts/bench`).

use std::time::Instant;

use spotguard_sim::run::{run, Outcome, Policy};
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

fn no_outage(s: &Scenario, seed: u64) -> Option<Outcome> {
    let mut calm = s.clone();
    calm.baseline_without_changes = true;
    run(&calm, seed, Policy::Spotguard, &mut |_| {}).ok()
}

fn no_outage_p95(s: &Scenario, seed: u64) -> f64 {
    no_outage(s, seed).map_or(0.0, |o| o.summary.wait_p95_s)
}

/// What any policy that keeps the outage's work moving pays on top of the
/// single-region run: the work that does not fit the primary's pools,
/// minute by minute (the no-outage run's busy instances above the primary's
/// capacity in the outage run), at the first fallback's extra price, plus
/// the inter-region transfer of those jobs (their count from the mean job
/// length). Not a bound on every policy (one may let that work wait), but
/// the price of running it where the capacity is.
fn cost_floor(s: &Scenario, calm: &Outcome, outage: &Outcome, single_cost: f64) -> (f64, f64) {
    let Some(fallback) = s.cascade().first().copied() else {
        return (single_cost, 0.0);
    };
    let cap = outage.series.group_capacity.first();
    let displaced_h: f64 = calm
        .series
        .busy
        .iter()
        .enumerate()
        .map(|(m, b)| (b - cap.and_then(|c| c.get(m)).copied().unwrap_or(f64::MAX)).max(0.0))
        .sum::<f64>()
        / 60.0;
    let (n, secs) = s.jobs.arrivals.iter().fold((0.0, 0.0), |(n, t), a| {
        (
            n + f64::from(a.count),
            t + f64::from(a.count) * a.duration.0.as_secs_f64(),
        )
    });
    let job_h = if n > 0.0 { secs / n / 3600.0 } else { 1.0 };
    let transfer = displaced_h / job_h * s.jobs.transfer_gb * s.jobs.transfer_usd_per_gb;
    let premium = displaced_h * (fallback.spot_price - s.primary.spot_price).max(0.0);
    (single_cost + premium + transfer, displaced_h)
}

/// One scenario, the three policies, and the control law's goals (issue
/// 21): p95 wait at most 1.2x the no-outage run, 0 killed, 0 lost,
/// fallback instance-hours at most 1.3x the outage's shortfall, cost at
/// most 1.10x the single-region run. Beside them, what the goals can be
/// held to: the cost floor of running the displaced work in the fallback,
/// and the p95 when the controller fails over on the first failed launch
/// (`shortage_for` 1 s, no anti-flap wait).
fn compare(s: &Scenario, seed: u64) {
    let calm = no_outage(s, seed);
    let base = calm.as_ref().map_or(0.0, |o| o.summary.wait_p95_s);
    let outs: Vec<Outcome> = [Policy::Spotguard, Policy::Seed, Policy::SingleRegion]
        .into_iter()
        .filter_map(|p| run(s, seed, p, &mut |_| {}).ok())
        .collect();
    let refs: Vec<_> = outs.iter().map(|o| &o.summary).collect();
    println!(
        "# {} (seed {seed}; p95 wait without the outage: {base:.0} s)\n",
        s.name
    );
    print!("{}", spotguard_sim::report::table(&refs, Some(base)));
    let (ours, single) = (&outs[0].summary, &outs[2].summary);
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
    if let Some(calm) = &calm {
        let (floor, displaced_h) = cost_floor(s, calm, &outs[0], single.cost_usd);
        let mut eager = s.clone();
        eager.controller.shortage_for = "0s".parse().unwrap_or(eager.controller.shortage_for);
        let eager_p95 = run(&eager, seed, Policy::Spotguard, &mut |_| {})
            .map_or(f64::NAN, |o| o.summary.wait_p95_s);
        println!(
            "what the goals can be held to: the outage's displaced work, {displaced_h:.1} instance-h, run in the fallback costs at least ${floor:.2} ({:.2}x single-region); failing over on the first failed launch (shortage_for 1 s) gives p95 {eager_p95:.0} s ({:.2}x no outage)\n",
            floor / single.cost_usd.max(1e-9),
            eager_p95 / base.max(1.0),
        );
    }
}
