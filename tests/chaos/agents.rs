//! Chaos run: several agents (separate processes, each with its own mock
//! IMDS and moto instance id) consume one queue while faults are injected;
//! every job records each execution. At the end a table: jobs, executions,
//! completed, duplicates (each explained by a kill or a failed settle),
//! lost, false drains, faults by kind. Exits non-zero if a job was lost or
//! not completed, a drain happened without a notice or SIGTERM, or a
//! duplicate is unexplained. Loopback only; bounded in time.
//!
//! Usage: ./scripts/setup-moto && cargo build --workspace --bins &&
//!        target/debug/spotguard-chaos [--seed 1] [--jobs 300] [--agents 3] [--timeout 600]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use spotguard_tests::agent_setup::{base_config, millis, secs, to_toml};
use spotguard_tests::aws_env::{start_agent, AwsEnv};
use spotguard_tests::proxy::Fault;
use spotguard_tests::{arg_u64, now_ms, MockImds, Proc, Record, Rng, TempDir};

struct Slot {
    tag: String,
    instance: String,
    mock: MockImds,
    proc: Option<Proc>,
    generation: u32,
    /// Notices or SIGTERMs given to the current process (drains it may log).
    given: u32,
    /// When a noticed instance "vanishes" (the notice time).
    vanishes_at: Option<Instant>,
    /// Logs of finished processes: (path, notices/SIGTERMs given).
    past: Vec<(PathBuf, u32)>,
}

fn config(
    queue: &str,
    mock: &MockImds,
    tag: &str,
    state: &std::path::Path,
    broken: bool,
) -> String {
    let mut c = base_config(queue, &mock.url, tag);
    if broken {
        // A broken install: the worker program is missing on this agent.
        c.worker.command = Some(vec!["/nonexistent/spotguard-test-worker".into()]);
    }
    c.queue.visibility_timeout = secs(10);
    c.queue.heartbeat_interval = Some(secs(3));
    c.worker.concurrency = 2;
    c.worker.term_grace = secs(1);
    c.worker.state_dir = state.display().to_string();
    c.interruption.poll_interval = millis(200);
    c.interruption.deadline_margin = secs(3);
    c.scale_in.enabled = false;
    to_toml(&c)
}

fn main() {
    let seed = arg_u64("--seed", 1);
    let jobs = arg_u64("--jobs", 300) as usize;
    let agents = arg_u64("--agents", 3) as usize;
    let timeout = Duration::from_secs(arg_u64("--timeout", 600));
    let mut rng = Rng::new(seed);
    let dir = TempDir::new("chaos");
    let env = AwsEnv::start();
    let queue = env.create_queue("jobs", 20);
    // Spare instances for the replacements of noticed ones.
    let mut instances = env
        .create_group("chaos", 0, 60, (agents * 6) as i32)
        .into_iter();
    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    let start = |slot: &mut Slot, env: &AwsEnv| {
        slot.generation += 1;
        let name = format!("{}-{}", slot.tag, slot.generation);
        // Agent a0's first process has a broken worker binary: it must not
        // burn the queue's receive counts (it pauses and trips its breaker).
        let broken = slot.tag == "a0" && slot.generation == 1;
        let cfg = config(
            &queue,
            &slot.mock,
            &slot.tag,
            &dir.path().join("state"),
            broken,
        );
        slot.proc = Some(start_agent(env, dir.path(), &name, &cfg));
        slot.given = 0;
    };
    let mut slots: Vec<Slot> = (0..agents)
        .map(|i| {
            let instance = instances.next().expect("instance");
            Slot {
                tag: format!("a{i}"),
                mock: MockImds::start(&["--instance-id", &instance]),
                instance,
                proc: None,
                generation: 0,
                given: 0,
                vanishes_at: None,
                past: Vec::new(),
            }
        })
        .collect();
    for s in slots.iter_mut() {
        start(s, &env);
    }
    let ids: Vec<String> = (0..jobs).map(|k| format!("j{k}")).collect();
    let mut crashing = 0;
    let mut leaving = 0;
    for id in &ids {
        let crash = rng.unit() < 0.05;
        let leave = !crash && rng.unit() < 0.05;
        crashing += u32::from(crash);
        leaving += u32::from(leave);
        // 0.5 to 2.5 s per job: long enough for faults to land mid-job.
        let sleep = 500 + (rng.unit() * 2000.0) as u64;
        let body = if leave {
            // 200 KB after the first line: more than a pipe holds, unread.
            format!(
                "{}\n{}",
                json!({"id": id, "sleep_ms": sleep, "leave_child": true}),
                "x".repeat(200_000)
            )
        } else {
            json!({"id": id, "sleep_ms": sleep, "crash_first": crash}).to_string()
        };
        env.send(&queue, &body);
    }
    faults.insert("worker crash", crashing);
    faults.insert("worker ignores stdin, leaves a child", leaving);
    faults.insert("broken worker binary (a0's first process)", 1);
    println!(
        "chaos run: seed {seed}, {jobs} jobs, {agents} agents; work dir {}",
        dir.path().display()
    );

    let began = Instant::now();
    // (agent tag, ms since the epoch) of every SIGKILL of an agent process.
    let mut kills: Vec<(String, u128)> = Vec::new();
    let mut next_fault = Instant::now() + Duration::from_millis(1500);
    let all_done = |r: &Record| ids.iter().all(|id| r.count("done", id) >= 1);
    loop {
        let r = Record::read(dir.path());
        if all_done(&r) && env.depth(&queue) == (0, 0) {
            break;
        }
        if began.elapsed() > timeout {
            println!("timed out after {:?}", timeout);
            break;
        }
        // Noticed instances vanish at the notice time; a replacement starts.
        for s in slots.iter_mut() {
            if s.vanishes_at.is_some_and(|t| Instant::now() >= t) {
                s.vanishes_at = None;
                if let Some(p) = s.proc.take() {
                    let name = format!("{}-{}", s.tag, s.generation);
                    s.past
                        .push((dir.path().join(format!("{name}.log")), s.given));
                    kills.push((s.tag.clone(), now_ms()));
                    drop(p); // SIGKILL: the instance is gone
                }
                let instance = instances.next().expect("spare instance");
                s.mock = MockImds::start(&["--instance-id", &instance]);
                s.instance = instance;
                start(s, &env);
            }
            // An agent that exited after SIGTERM is restarted (systemd would).
            let exited = s
                .proc
                .as_mut()
                .is_some_and(|p| p.child.try_wait().ok().flatten().is_some());
            if exited {
                let name = format!("{}-{}", s.tag, s.generation);
                s.past
                    .push((dir.path().join(format!("{name}.log")), s.given));
                s.proc = None;
                start(s, &env);
            }
        }
        // Faults until 80 % of the jobs are done, then let the run settle.
        let done_now = ids.iter().filter(|id| r.count("done", id) >= 1).count();
        if Instant::now() >= next_fault && done_now * 5 < jobs * 4 && began.elapsed() < timeout / 2
        {
            next_fault =
                Instant::now() + Duration::from_millis(1000 + (rng.unit() * 1500.0) as u64);
            let i = (rng.unit() * agents as f64) as usize % agents;
            let s = &mut slots[i];
            let busy = s.vanishes_at.is_some() || s.given > 0;
            match (rng.unit() * 8.0) as u32 {
                0 if !busy => {
                    // SIGKILL and restart: jobs in flight run on (their
                    // process groups survive) and may complete twice, as
                    // may jobs that completed but were not deleted yet.
                    kills.push((s.tag.clone(), now_ms()));
                    if let Some(p) = s.proc.take() {
                        let name = format!("{}-{}", s.tag, s.generation);
                        s.past
                            .push((dir.path().join(format!("{name}.log")), s.given));
                        drop(p);
                    }
                    start(s, &env);
                    *faults.entry("agent SIGKILL + restart").or_default() += 1;
                }
                1 if !busy => {
                    s.mock
                        .control("/mock/spot-interruption", json!({"in_seconds": 6}));
                    s.given += 1;
                    s.vanishes_at = Some(Instant::now() + Duration::from_secs(6));
                    *faults.entry("spot notice (instance replaced)").or_default() += 1;
                }
                2 if !busy => {
                    if let Some(p) = &s.proc {
                        p.signal("TERM");
                        s.given += 1;
                        *faults.entry("agent SIGTERM + restart").or_default() += 1;
                    }
                }
                3 => {
                    s.mock
                        .control("/mock/faults", json!({"status": 500, "count": 20}));
                    *faults.entry("IMDS 5xx x20").or_default() += 1;
                }
                4 => {
                    s.mock
                        .control("/mock/faults", json!({"delay_ms": 1500, "count": 4}));
                    s.mock
                        .control("/mock/faults", json!({"reset": true, "count": 10}));
                    s.mock
                        .control("/mock/faults", json!({"status": 401, "count": 10}));
                    *faults.entry("IMDS timeouts, resets, 401s").or_default() += 1;
                }
                5 => {
                    let op = ["ReceiveMessage", "DeleteMessage", "ChangeMessageVisibility"]
                        [(rng.unit() * 3.0) as usize % 3];
                    env.proxy.inject(op, Fault::server_error(), 3);
                    *faults.entry("SQS 5xx x3").or_default() += 1;
                }
                6 => {
                    env.proxy.inject("*", Fault::throttle(), 3);
                    *faults.entry("SQS throttling x3").or_default() += 1;
                }
                _ => {
                    env.proxy
                        .inject("*", Fault::Delay(Duration::from_millis(1500)), 2);
                    env.proxy.inject("ReceiveMessage", Fault::Reset, 2);
                    *faults
                        .entry("SQS slow answers + dropped connections")
                        .or_default() += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // Account.
    for s in slots.iter_mut() {
        if let Some(p) = s.proc.take() {
            let name = format!("{}-{}", s.tag, s.generation);
            s.past
                .push((dir.path().join(format!("{name}.log")), s.given));
            drop(p);
        }
    }
    let r = Record::read(dir.path());
    let executions = r.total("start");
    let completed = ids.iter().filter(|id| r.count("done", id) >= 1).count();
    let duplicates: usize = ids
        .iter()
        .map(|id| r.count("done", id).saturating_sub(1))
        .sum();
    let (visible, in_flight) = env.depth(&queue);
    let queued = usize::try_from(visible + in_flight).unwrap_or(0);
    let lost = jobs.saturating_sub(completed + queued);
    let mut false_drains = 0;
    let mut settle_errors = 0;
    for s in &slots {
        for (log, given) in &s.past {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let drains = text.matches("drain started").count() as u32;
            false_drains += drains.saturating_sub(*given);
            settle_errors += text.matches("cannot settle").count()
                + text.matches("cannot delete the original").count();
        }
    }
    // A duplicate is explained when the agent that ran an earlier completed
    // execution was SIGKILLed while it ran or before its delete could have
    // finished (the settle, with injected delays and retries, takes at most
    // a few seconds), or by a failed settle.
    const SETTLE_WINDOW_MS: u128 = 5_000;
    let mut explained_by_kill = 0;
    let mut unexplained = Vec::new();
    for id in ids.iter().filter(|id| r.count("done", id) > 1) {
        // Executions that completed: a start followed by its done.
        let starts = r.starts(id);
        let dones = r.times("done", id);
        let explained = dones.iter().take(dones.len() - 1).any(|done| {
            let run = starts.iter().rfind(|(_, _, at)| at <= done);
            run.is_some_and(|(_, agent, started)| {
                kills.iter().any(|(tag, at)| {
                    tag == agent && at >= started && *at <= done + SETTLE_WINDOW_MS
                })
            })
        });
        if explained {
            explained_by_kill += dones.len() - 1;
        } else {
            unexplained.push(id.clone());
        }
    }
    let unexplained_count = unexplained.len().saturating_sub(settle_errors);
    println!(
        "\n| jobs | executions | completed | duplicates | explained by kills / failed settles | lost | false drains | seconds |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {jobs} | {executions} | {completed} | {duplicates} | {explained_by_kill} / {settle_errors} | {lost} | {false_drains} | {:.0} |",
        began.elapsed().as_secs_f64()
    );
    if unexplained_count > 0 {
        println!("unexplained duplicates: {unexplained:?}");
    }
    println!("\n| fault | count |\n|---|---|");
    for (k, n) in &faults {
        println!("| {k} | {n} |");
    }
    // Helpers left behind by jobs must have been ended with their group,
    // unless their agent was SIGKILLed while the job ran (then nothing is
    // left to end them; on an instance, systemd's control-group kill does).
    std::thread::sleep(Duration::from_secs(2));
    let text = std::fs::read_to_string(dir.path().join("record.txt")).unwrap_or_default();
    let mut leftovers = 0;
    let mut leftovers_after_kill = 0;
    for l in text.lines().filter(|l| l.starts_with("child ")) {
        let w: Vec<&str> = l.split_whitespace().collect();
        let (Some(pid), Some(agent), Some(at)) = (
            w.get(2).and_then(|p| p.parse::<i32>().ok()),
            w.get(3),
            w.get(4).and_then(|t| t.parse::<u128>().ok()),
        ) else {
            continue;
        };
        let alive = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| c == b"sleep\x00301\x00")
            .unwrap_or(false);
        if !alive {
            continue;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        if kills.iter().any(|(tag, k)| tag == agent && *k >= at) {
            leftovers_after_kill += 1;
        } else {
            leftovers += 1;
        }
    }
    println!(
        "\nleftover job processes (`sleep 301`): {leftovers} (and {leftovers_after_kill} whose agent was SIGKILLed mid-job)"
    );
    let ok = lost == 0
        && completed == jobs
        && false_drains == 0
        && unexplained_count == 0
        && leftovers == 0;
    if !ok {
        eprintln!("CHAOS FAILED (logs kept in {})", dir.path().display());
        std::mem::forget(dir);
        std::process::exit(1);
    }
    println!("\nchaos: 1 passed, 0 failed");
}
