//! One run: a scenario, a seed and a policy, in virtual time on one
//! thread. The agents are the real `Runner` (state machine, job code,
//! heartbeats, drains, scale-in) over the in-memory SQS and the simulated
//! Auto Scaling; under `spotguard` the controller is the real handler.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use spotguard_agent::aws::Message;
use spotguard_agent::config::Config as AgentConfig;
use spotguard_agent::fakes::MemQueue;
use spotguard_agent::imds::{ImdsStats, SpotAction, TargetLifecycleState};
use spotguard_agent::notify::Notifier;
use spotguard_agent::runner::Runner;
use spotguard_agent::status::Status;
use spotguard_agent::watch::{Change, Detected, WatchEvent};
use spotguard_agent::worker::{
    Ended, JobFiles, JobNotice, Outcome as JobOutcome, StopReason, Worker, CHECKPOINT_ATTR,
};
use spotguard_common::clock::{Clock, TokioClock};
use spotguard_controller::aws::{Cloud, GroupUpdate, MetricSpec, TargetTracking};
use spotguard_controller::handler::Controller;

use crate::apis::{SimCloud, SimFleet};
use crate::scenario::Scenario;
use crate::world::{lock, wall, Group, Instance, Kill, Pool, Rng, Shared, State, Tracking, World};

/// The failover policies compared side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The real controller with the scenario's settings over its whole
    /// cascade; agents protect busy instances.
    Spotguard,
    /// The same, with the primary and the first fallback only (for a
    /// scenario with a cascade: what the extra regions bring).
    TwoRegions,
    /// The original design: open the fallback on the first failed launch,
    /// set it to MaxSize and desired 0 on the first success; the fallback
    /// tracks visible messages with the seed's target (10 x the
    /// per-instance target unless the scenario says). As the seed
    /// describes, its agents protect busy instances and idle ones scale
    /// themselves in, so its kills measure the failback.
    Seed,
    /// One region, no failover.
    SingleRegion,
}

impl Policy {
    /// Runs the real controller (and agents that protect busy instances).
    pub fn is_spotguard(&self) -> bool {
        matches!(self, Policy::Spotguard | Policy::TwoRegions)
    }

    /// How many of the scenario's fallback groups the policy uses.
    pub fn fallbacks_used(&self, s: &Scenario) -> usize {
        let n = s.cascade().len();
        match self {
            Policy::Spotguard => n,
            Policy::TwoRegions | Policy::Seed => n.min(1),
            Policy::SingleRegion => 0,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Policy::Spotguard => "spotguard",
            Policy::TwoRegions => "spotguard-2-regions",
            Policy::Seed => "seed",
            Policy::SingleRegion => "single-region",
        }
    }
}

const PRIMARY: &str = "gpu-primary";
const FALLBACK: &str = "gpu-fallback";

/// The group name of fallback `k` (0: the first).
fn fallback_name(k: usize) -> String {
    match k {
        0 => FALLBACK.to_string(),
        _ => format!("{FALLBACK}-{}", k + 1),
    }
}
const METRIC: &str = "BacklogPerInstance";

/// README: "a dead agent's instance is released within 30 minutes" (of its
/// last liveness mark, which is before the death).
const DEAD_RELEASE_BOUND: Duration = Duration::from_secs(30 * 60);
const SEED_METRIC: &str = "ApproximateNumberOfMessagesVisible";

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub policy: String,
    pub seed: u64,
    pub jobs: usize,
    pub done: usize,
    pub dead_lettered: usize,
    pub still_queued: usize,
    pub lost: usize,
    /// Messages still queued at the end with no instance left to take
    /// them (the baselines cannot start an empty group): not a failover
    /// loss, counted apart from `still_queued`'s others.
    pub stranded: usize,
    pub wait_p50_s: f64,
    pub wait_p95_s: f64,
    /// From enqueued to done, of the jobs done.
    pub completion_p50_s: f64,
    pub completion_p95_s: f64,
    /// Executions killed, by cause: `Reclaimed` (spot), `GroupScaleIn`
    /// (target tracking), `Failback` (a lowered gate), `AgentScaleIn`,
    /// `Replaced`.
    pub killed: BTreeMap<String, usize>,
    pub duplicates: usize,
    pub duplicates_explained: usize,
    pub primary_instance_hours: f64,
    pub fallback_instance_hours: f64,
    /// Instance-hours of each group: the primary, then each fallback used.
    pub group_instance_hours: Vec<f64>,
    pub cost_usd: f64,
    /// Inter-region data transfer in `cost_usd`.
    pub transfer_usd: f64,
    /// Busy instance-hours over running instance-hours (1.0 at most; EC2's
    /// refund of spot instances it reclaims in their first hour aside).
    pub utilization: f64,
    /// Mode changes of the cascade, each counted when it happens.
    pub mode_changes: usize,
    /// Instances the group scaled in while a job ran (it started before
    /// its protection landed): drained by the lifecycle hook, or killed
    /// without one.
    pub busy_scaled_in: usize,
    /// Agents that died (`faults.agent_death_per_hour`).
    pub agent_deaths: usize,
    pub violations: Vec<String>,
}

/// One sample per simulated minute.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Series {
    pub minutes: Vec<f64>,
    pub visible: Vec<f64>,
    pub in_flight: Vec<f64>,
    pub primary_in_service: Vec<f64>,
    pub primary_pending: Vec<f64>,
    pub fallback_in_service: Vec<f64>,
    pub fallback_pending: Vec<f64>,
    /// Desired capacity of the primary, and of the fallbacks together.
    pub primary_desired: Vec<f64>,
    pub fallback_desired: Vec<f64>,
    /// Instances with a job running, all groups.
    pub busy: Vec<f64>,
    /// Per group (the primary, then each fallback used): its InService
    /// instances, and its pools' spot capacity together.
    pub group_in_service: Vec<Vec<f64>>,
    pub group_capacity: Vec<Vec<f64>>,
    /// Executions killed so far, by cause (`Failback`, `GroupScaleIn`,
    /// `AgentScaleIn`, `Reclaimed`, `Replaced`).
    pub kills: BTreeMap<String, Vec<f64>>,
    pub cost: Vec<f64>,
    /// 0 normal, 1 failed over, 2 failing back.
    pub mode: Vec<f64>,
    pub waits_s: Vec<f64>,
}

pub struct Outcome {
    pub summary: Summary,
    pub series: Series,
}

/// A job: `job=<name> secs=<run time> ckpt=<checkpoint every, s>`.
struct JobSpec {
    name: String,
    secs: u64,
    ckpt: u64,
}

fn parse_job(body: &str) -> JobSpec {
    let mut j = JobSpec {
        name: String::new(),
        secs: 0,
        ckpt: 0,
    };
    for w in body.split_whitespace() {
        match w.split_once('=') {
            Some(("job", v)) => j.name = v.to_string(),
            Some(("secs", v)) => j.secs = v.parse().unwrap_or(0),
            Some(("ckpt", v)) => j.ckpt = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    j
}

/// The worker on one instance: runs a job for its time, checkpointing as
/// the job says, and resumes from a carried-over checkpoint.
struct SimWorker {
    world: Shared,
    instance: String,
    broken: bool,
}

impl Worker for SimWorker {
    fn state_dir(&self) -> Option<&Path> {
        None
    }

    fn run(
        &self,
        msg: &Message,
        _files: Option<&JobFiles>,
        _notices: watch::Receiver<Option<JobNotice>>,
        stop: impl Future<Output = StopReason> + Send,
    ) -> impl Future<Output = Ended> + Send {
        let job = parse_job(&msg.body);
        let resumed: u64 = msg
            .attributes
            .get(CHECKPOINT_ATTR)
            .and_then(|a| a.value.strip_prefix("progress="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (world, instance, broken) = (self.world.clone(), self.instance.clone(), self.broken);
        async move {
            if broken {
                return Ended {
                    outcome: JobOutcome::NotStarted(
                        "cannot start /opt/worker/run: No such file or directory (os error 2)"
                            .into(),
                    ),
                    checkpoint: None,
                };
            }
            {
                let mut w = lock(&world);
                let now = Instant::now();
                let remote = w
                    .instances
                    .get(&instance)
                    .is_some_and(|i| w.groups[i.group].region != w.groups[0].region);
                let s = w.jobs.entry(job.name.clone()).or_default();
                s.starts += 1;
                s.first_start.get_or_insert(now);
                if remote {
                    s.remote_starts += 1;
                    w.transfer_cost += w.transfer_per_job;
                    w.cost += w.transfer_per_job;
                }
                if let Some(i) = w.instances.get_mut(&instance) {
                    i.running.push(job.name.clone());
                }
            }
            let mut done = resumed.min(job.secs);
            let mut saved = resumed;
            tokio::pin!(stop);
            let outcome = loop {
                if done >= job.secs {
                    break JobOutcome::Succeeded;
                }
                let step = if job.ckpt > 0 {
                    job.ckpt.min(job.secs - done)
                } else {
                    job.secs - done
                };
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep(Duration::from_secs(step)) => {
                        done += step;
                        if job.ckpt > 0 {
                            saved = done;
                        }
                    }
                    r = &mut stop => break JobOutcome::Stopped(r),
                }
            };
            let mut w = lock(&world);
            if let Some(i) = w.instances.get_mut(&instance) {
                if let Some(p) = i.running.iter().position(|n| *n == job.name) {
                    i.running.remove(p);
                }
            }
            if outcome == JobOutcome::Succeeded {
                w.jobs
                    .entry(job.name.clone())
                    .or_default()
                    .done
                    .push(Instant::now());
            }
            let checkpoint = (matches!(outcome, JobOutcome::Stopped(_)) && saved > 0)
                .then(|| format!("progress={saved}"));
            Ended {
                outcome,
                checkpoint,
            }
        }
    }
}

fn agent_config(s: &Scenario) -> AgentConfig {
    let text = format!(
        r#"
[queue]
url = "https://sqs.{region}.amazonaws.com/123456789012/jobs"
wait_time = "20s"
visibility_timeout = "{vis}"
error_visibility_timeout = "30s"
[worker]
command = ["/opt/worker/run"]
concurrency = {conc}
[scale_in]
idle_timeout = "{idle}"
protect_busy = true
follow_intake = true
[status]
listen = ""
{hook}"#,
        region = s.primary.region,
        hook = if s.launch.lifecycle_hook {
            "[interruption]\nlifecycle_hook = \"spotguard-drain\"\n"
        } else {
            ""
        },
        vis = humantime_of(s.agent.visibility_timeout.0),
        conc = s.agent.concurrency,
        idle = humantime_of(s.agent.idle_timeout.0),
    );
    match AgentConfig::parse(&text, "simulation agent config") {
        Ok(c) => c,
        Err(e) => panic!("the simulation's agent config is invalid: {e}"),
    }
}

fn humantime_of(d: Duration) -> String {
    format!("{}s", d.as_secs().max(1))
}

fn controller_config(s: &Scenario, used: usize) -> Option<spotguard_controller::config::Config> {
    if used == 0 {
        return None;
    }
    let mut text = format!(
        r#"
[primary]
region = "{pr}"
asg = "{PRIMARY}"
queue_url = "https://sqs.{pr}.amazonaws.com/123456789012/jobs"
[failover]
recovery_for = "{cool}"
min_dwell = "{dwell}"
shortage_for = "{short}"
[policy]
primary_target = {t}
fallback_target = {t}
"#,
        pr = s.primary.region,
        cool = humantime_of(s.controller.cooldown.0),
        dwell = humantime_of(s.controller.min_dwell.0),
        short = humantime_of(s.controller.shortage_for.0),
        t = s.controller.target,
    );
    for (k, f) in s.cascade().into_iter().take(used).enumerate() {
        text.push_str(&format!(
            "[[fallbacks]]\nregion = \"{}\"\nasg = \"{}\"\nmax_size = {}\n",
            f.region,
            fallback_name(k),
            f.max.max(1)
        ));
    }
    spotguard_controller::config::Config::parse(&text, "simulation controller config").ok()
}

fn tracking(target: f64, region: &str, group: &str, metric: &str, enabled: bool) -> Tracking {
    Tracking {
        policy: TargetTracking::new(
            "spotguard-backlog",
            target,
            MetricSpec::Custom {
                namespace: "spotguard".into(),
                name: metric.into(),
                dimensions: vec![("AutoScalingGroupName".into(), group.into())],
            },
        ),
        enabled: enabled && !region.is_empty(),
        history: Default::default(),
        last_scale_out: None,
    }
}

fn group_of(
    r: &crate::scenario::Region,
    name: &str,
    tracking: Option<Tracking>,
    max: i32,
) -> Group {
    Group {
        name: name.into(),
        region: r.region.clone(),
        min: r.min,
        max,
        desired: r.initial.min(max),
        price: r.spot_price,
        zones: r
            .pools()
            .into_iter()
            .map(|z| Pool {
                name: format!("{}{}", r.region, z.zone),
                instance_type: z.instance_type,
                capacity: z.capacity,
            })
            .collect(),
        tags: BTreeMap::new(),
        activities: Vec::new(),
        tracking,
        last_launch_try: None,
        interruptions_per_hour: r.interruptions_per_hour,
        spot_requests_wait: r.spot_requests_wait,
        hook: false,
    }
}

pub const START: &str = "2026-11-28T00:00:00Z";

/// Runs one policy over the scenario. `progress` gets the fraction done.
pub fn run(
    s: &Scenario,
    seed: u64,
    policy: Policy,
    progress: &mut dyn FnMut(f64),
) -> Result<Outcome, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(simulate(s, seed, policy, progress))
}

async fn simulate(
    s: &Scenario,
    seed: u64,
    policy: Policy,
    progress: &mut dyn FnMut(f64),
) -> Result<Outcome, String> {
    let start: DateTime<Utc> = DateTime::parse_from_rfc3339(START)
        .map_err(|e| e.to_string())?
        .with_timezone(&Utc);
    let base = Instant::now();
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(start));
    let queue = MemQueue::with_redrive(s.jobs.max_receives);
    let t = s.controller.target;
    let used = policy.fallbacks_used(s);
    let two = used > 0;

    let mut w = World {
        rng: Some(Rng::new(seed)),
        broken_left: s.agent.broken_instances,
        rebalance_probability: s.launch.rebalance_probability,
        transfer_per_job: s.jobs.transfer_gb * s.jobs.transfer_usd_per_gb,
        faults: s.faults.clone(),
        fault_rng: Some(Rng::new(seed.wrapping_mul(97).wrapping_add(13))),
        ..World::default()
    };
    w.groups.push(group_of(
        &s.primary,
        PRIMARY,
        Some(tracking(t, &s.primary.region, PRIMARY, METRIC, true)),
        s.primary.max,
    ));
    for (k, f) in s.cascade().into_iter().take(used).enumerate() {
        let name = fallback_name(k);
        let tr = match policy {
            Policy::Seed => tracking(
                s.controller.seed_target(),
                &f.region,
                &name,
                SEED_METRIC,
                false,
            ),
            _ => tracking(t, &f.region, &name, METRIC, false),
        };
        // The gate starts closed: MaxSize 0.
        let mut g = group_of(f, &name, Some(tr), 0);
        g.desired = 0;
        w.groups.push(g);
    }
    for g in &mut w.groups {
        g.hook = s.launch.lifecycle_hook;
    }
    w.instance_secs = vec![0.0; w.groups.len()];
    let world: Shared = Arc::new(std::sync::Mutex::new(w));

    // Arrivals: evenly spread with seeded jitter, each job 0.5-1.5 x its mean.
    let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(7));
    let mut arrivals: Vec<(u64, String)> = Vec::new();
    let mut n = 0u64;
    for a in &s.jobs.arrivals {
        let (from, to) = (a.start.0.as_secs(), a.end.0.as_secs());
        for k in 0..a.count {
            n += 1;
            let span = to.saturating_sub(from) as f64;
            let at = from + ((f64::from(k) + rng.unit()) / f64::from(a.count.max(1)) * span) as u64;
            let secs = (a.duration.0.as_secs_f64() * (0.5 + rng.unit())).max(1.0) as u64;
            let body = format!(
                "job=j{n} secs={secs} ckpt={}",
                a.checkpoint_every.0.as_secs()
            );
            arrivals.push((at.min(to), body));
        }
    }
    arrivals.sort_by_key(|a| a.0);
    let total_jobs = arrivals.len();
    let mut arrivals = arrivals.into_iter().peekable();

    let mut changes: Vec<(u64, usize, usize, i32)> = Vec::new();
    let regions = std::iter::once(&s.primary).chain(s.cascade().into_iter().take(used));
    for (g, r) in regions.enumerate() {
        if s.baseline_without_changes {
            continue;
        }
        for (z, pool) in r.pools().iter().enumerate() {
            for c in &pool.capacity_changes {
                changes.push((c.at.0.as_secs(), g, z, c.capacity));
            }
        }
    }
    changes.sort();

    let agent_cfg = Arc::new(agent_config(s));
    let controller = match controller_config(s, used) {
        Some(cfg) if policy.is_spotguard() => Some(Controller {
            cfg,
            cloud: SimCloud {
                world: world.clone(),
                queue: queue.clone(),
            },
            clock: clock.clone(),
        }),
        _ => None,
    };
    let cloud = SimCloud {
        world: world.clone(),
        queue: queue.clone(),
    };
    let mut seed_open = false;
    // Events on their way: (delivery second, order, event).
    let mut in_transit: Vec<(u64, usize, serde_json::Value)> = Vec::new();
    let mut event_rng = Rng::new(seed.wrapping_mul(131).wrapping_add(5));
    // Its own stream, so that agent deaths change no other draw.
    let mut death_rng = Rng::new(seed.wrapping_mul(977).wrapping_add(11));
    let mut series = Series::default();
    let mut last_mode = 0.0;
    let mut mode_changes = 0;
    let total = s.duration.0.as_secs();
    let step = Duration::from_secs(1);
    let mut last_progress = 0.0;

    for sec in 0..=total {
        if sec > 0 {
            tokio::time::sleep_until(base + Duration::from_secs(sec)).await;
        }
        let now = Instant::now();
        // Arrivals.
        while arrivals.peek().is_some_and(|a| a.0 <= sec) {
            if let Some((_, body)) = arrivals.next() {
                let job = parse_job(&body).name;
                queue.push(&body);
                lock(&world).jobs.entry(job).or_default().enqueued = Some(now);
            }
        }
        // The agents' SQS calls fail now and then (`faults.agent_error_rate`).
        for (op, rate) in [
            ("ReceiveMessage", s.faults.agent_error_rate),
            ("DeleteMessage", s.faults.agent_error_rate),
            ("ChangeMessageVisibility", s.faults.visibility_error_rate),
        ] {
            if rate > 0.0 {
                // One failure waiting at most: failures do not pile up
                // while no agent calls (a boot, an outage) and then fail
                // one call again and again.
                let waiting = queue
                    .lock()
                    .log
                    .faults
                    .get(op)
                    .is_some_and(|q| !q.is_empty());
                if event_rng.unit() < rate && !waiting {
                    queue.fail_next(op, "ServiceUnavailable", 1);
                }
            }
        }
        let mut spawn: Vec<String> = Vec::new();
        let mut notices: Vec<(mpsc::Sender<Detected>, Detected)> = Vec::new();
        let mut late: Vec<(String, Detected)> = Vec::new();
        {
            let mut w = lock(&world);
            while changes.first().is_some_and(|c| c.0 <= sec) {
                let (_, g, z, cap) = changes.remove(0);
                w.groups[g].zones[z].capacity = cap;
            }
            w.interrupt(now, step, s.launch.rebalance_lead.0);
            let wall_of = |t: Instant| wall(start, base, t);
            let ids: Vec<String> = w.instances.keys().cloned().collect();
            for id in ids {
                let Some(i) = w.instances.get_mut(&id) else {
                    continue;
                };
                // The group's lifecycle hook holds it: its agent sees the
                // target lifecycle state `Terminated` on its next IMDS poll.
                if let (Some((until, false)), State::Terminating { .. }) = (i.hook, i.state) {
                    i.hook = Some((until, true));
                    if let Some(tx) = &i.notices {
                        notices.push((
                            tx.clone(),
                            Detected {
                                event: WatchEvent::LifecycleState {
                                    change: Change::New,
                                    state: TargetLifecycleState::Terminated,
                                    previous: Some(TargetLifecycleState::InService),
                                    terminating: true,
                                },
                                detected_at: wall_of(now),
                            },
                        ));
                    }
                }
                // An instance waiting on the hook is still EC2's to reclaim.
                if let (Some((reb, notice, reclaim)), true) = (i.interruption, i.on_spot()) {
                    if let (Some(r), Some(tx)) = (reb, &i.notices) {
                        if r <= now {
                            notices.push((
                                tx.clone(),
                                Detected {
                                    event: WatchEvent::RebalanceRecommendation {
                                        change: Change::New,
                                        notice_time: wall_of(r),
                                    },
                                    detected_at: wall_of(now),
                                },
                            ));
                            i.interruption = Some((None, notice, reclaim));
                        }
                    }
                    if notice <= now && !i.noticed {
                        i.noticed = true;
                        if let Some(tx) = &i.notices {
                            notices.push((tx.clone(), spot_notice(wall_of(reclaim), wall_of(now))));
                        }
                    }
                    if reclaim <= now {
                        w.terminate(&id, now, Kill::Reclaimed);
                    }
                }
            }
            // Boots and ends.
            let ids: Vec<String> = w.instances.keys().cloned().collect();
            for id in ids {
                let state = w.instances[&id].state;
                match state {
                    State::Pending { ready } if ready <= now => {
                        if let Some(i) = w.instances.get_mut(&id) {
                            i.state = State::InService;
                            i.in_service_at = Some(now);
                            // A notice given while it was pending: the real
                            // agent reads `spot/instance-action` on its first
                            // IMDS poll.
                            if let (true, Some((_, _, reclaim))) = (i.noticed, i.interruption) {
                                late.push((
                                    id.clone(),
                                    spot_notice(wall_of(reclaim), wall_of(now)),
                                ));
                            }
                        }
                        spawn.push(id);
                    }
                    State::Terminating { at } if at <= now => {
                        let (running, why, task, group) = {
                            let i = w.instances.get_mut(&id).expect("present");
                            i.state = State::Gone;
                            i.ended = Some(now);
                            (
                                std::mem::take(&mut i.running),
                                i.why,
                                i.task.take(),
                                i.group,
                            )
                        };
                        if let Some(t) = task {
                            t.abort();
                        }
                        w.settle(&id);
                        let why = why.unwrap_or(Kill::GroupScaleIn);
                        for job in &running {
                            w.jobs.entry(job.clone()).or_default().kills.push(why);
                        }
                        *w.kills_by_cause.entry(format!("{why:?}")).or_default() += running.len();
                        if !running.is_empty()
                            && policy.is_spotguard()
                            && matches!(
                                why,
                                Kill::GroupScaleIn | Kill::AgentScaleIn | Kill::Failback
                            )
                        {
                            let what = if group >= 1 {
                                "failback or scale-in of the fallback"
                            } else {
                                "scale-in of the primary"
                            };
                            w.violations.push(format!(
                                "{id}: {} job(s) killed by {what} ({why:?})",
                                running.len()
                            ));
                        }
                    }
                    _ => {}
                }
            }
            // Agents that die: the instance runs on, protected if it was
            // busy; its jobs' messages come back when their visibility
            // lapses. A dead agent's instance still protected 30 minutes
            // after the death breaks the controller's promise.
            let death = s.faults.agent_death_per_hour * step.as_secs_f64() / 3600.0;
            let ids: Vec<String> = w.instances.keys().cloned().collect();
            for id in ids {
                let i = w.instances.get_mut(&id).expect("present");
                if i.state != State::InService {
                    continue;
                }
                match i.agent_dead_at {
                    None if death > 0.0 && i.task.is_some() && death_rng.unit() < death => {
                        if let Some(t) = i.task.take() {
                            t.abort();
                        }
                        i.agent_dead_at = Some(now);
                        let running = std::mem::take(&mut i.running);
                        for job in &running {
                            w.jobs
                                .entry(job.clone())
                                .or_default()
                                .kills
                                .push(Kill::AgentDied);
                        }
                        *w.kills_by_cause.entry("AgentDied".into()).or_default() += running.len();
                        w.agent_deaths += 1;
                    }
                    Some(at)
                        if i.protected
                            && !i.dead_reported
                            && policy.is_spotguard()
                            && now.duration_since(at) > DEAD_RELEASE_BOUND =>
                    {
                        i.dead_reported = true;
                        w.violations.push(format!(
                            "{id}: its agent died {:.0} min ago and it is still protected from scale-in",
                            now.duration_since(at).as_secs_f64() / 60.0
                        ));
                    }
                    _ => {}
                }
            }
            w.reconcile_groups(now, &s.launch, (start, base));
            w.bill(now, step);
        }
        for (tx, d) in notices {
            let _ = tx.try_send(d);
        }
        for id in spawn {
            start_agent(&world, &id, &agent_cfg, &queue, &clock).await;
        }
        for (id, d) in late {
            let tx = lock(&world)
                .instances
                .get(&id)
                .and_then(|i| i.notices.clone());
            if let Some(tx) = tx {
                let _ = tx.try_send(d);
            }
        }

        // The control plane: events as EventBridge delivers them (late,
        // twice or never, as the scenario's faults say), a tick every
        // minute.
        let emitted: Vec<serde_json::Value> = std::mem::take(&mut lock(&world).events);
        for ev in emitted {
            let f = &s.faults;
            let mut roll = || event_rng.unit();
            if roll() < f.event_loss {
                continue;
            }
            let copies = if roll() < f.event_duplicate { 2 } else { 1 };
            for _ in 0..copies {
                let delay = (roll() * f.event_delay_max.0.as_secs() as f64) as u64;
                in_transit.push((sec + delay, in_transit.len(), ev.clone()));
            }
        }
        in_transit.sort_by_key(|e| (e.0, e.1));
        let due = in_transit.partition_point(|e| e.0 <= sec);
        let events: Vec<serde_json::Value> = in_transit.drain(..due).map(|e| e.2).collect();
        let minute = sec % 60 == 0;
        match (policy, &controller) {
            (Policy::Spotguard | Policy::TwoRegions, Some(c)) => {
                for ev in &events {
                    let _ = c.handle_event(ev).await;
                    count_mode(
                        &lock(&world),
                        policy,
                        seed_open,
                        &mut last_mode,
                        &mut mode_changes,
                    );
                }
                if minute {
                    let _ = c.tick(Vec::new()).await;
                    count_mode(
                        &lock(&world),
                        policy,
                        seed_open,
                        &mut last_mode,
                        &mut mode_changes,
                    );
                }
            }
            (Policy::Seed, _) if two => {
                for ev in &events {
                    let primary = ev["detail"]["AutoScalingGroupName"] == PRIMARY;
                    let failed = ev["detail-type"] == "EC2 Instance Launch Unsuccessful";
                    let first = s.cascade().first().copied();
                    let f = &first.map_or(String::new(), |f| f.region.clone());
                    if primary && failed && !seed_open {
                        seed_open = true;
                        let _ = cloud
                            .update_group(f, FALLBACK, GroupUpdate::max(first.map_or(0, |f| f.max)))
                            .await;
                        if let Ok(Some((_, p))) =
                            cloud.policy(f, FALLBACK, "spotguard-backlog").await
                        {
                            let _ = cloud.put_policy(f, FALLBACK, &p, true).await;
                        }
                        mode_changes += 1;
                    } else if primary && !failed && seed_open {
                        mode_changes += 1;
                        seed_open = false;
                        let _ = cloud
                            .update_group(
                                f,
                                FALLBACK,
                                GroupUpdate {
                                    max: Some(0),
                                    desired: Some(0),
                                },
                            )
                            .await;
                        if let Ok(Some((_, p))) =
                            cloud.policy(f, FALLBACK, "spotguard-backlog").await
                        {
                            let _ = cloud.put_policy(f, FALLBACK, &p, false).await;
                        }
                    }
                }
                if minute {
                    publish_simple(&cloud, s, &queue, true).await;
                }
            }
            _ => {
                if minute {
                    publish_simple(&cloud, s, &queue, false).await;
                }
            }
        }

        if minute {
            let mut w = lock(&world);
            w.track(now);
            let (vis, fl) = queue.depth();
            let count = |w: &World, g: std::ops::Range<usize>, pending: bool| -> f64 {
                g.filter(|g| *g < w.groups.len())
                    .map(|g| {
                        w.alive(g)
                            .filter(|i| matches!(i.state, State::Pending { .. }) == pending)
                            .count()
                    })
                    .sum::<usize>() as f64
            };
            // Every fallback of the cascade together.
            let fallbacks = 1..w.groups.len();
            series.minutes.push(sec as f64 / 60.0);
            series.visible.push(vis as f64);
            series.in_flight.push(fl as f64);
            series.primary_in_service.push(count(&w, 0..1, false));
            series.primary_pending.push(count(&w, 0..1, true));
            series
                .fallback_in_service
                .push(count(&w, fallbacks.clone(), false));
            series.fallback_pending.push(count(&w, fallbacks, true));
            series.cost.push(w.cost);
            series.primary_desired.push(f64::from(w.groups[0].desired));
            series
                .fallback_desired
                .push(w.groups.iter().skip(1).map(|g| f64::from(g.desired)).sum());
            series.busy.push(
                w.instances
                    .values()
                    .filter(|i| !i.running.is_empty() && i.state != State::Gone)
                    .count() as f64,
            );

            let n = w.groups.len();
            series.group_in_service.resize(n, Vec::new());
            series.group_capacity.resize(n, Vec::new());
            for g in 0..n {
                let ins = f64::from(w.in_service(g));
                series.group_in_service[g].push(ins);
                let cap = w.groups[g]
                    .zones
                    .iter()
                    .map(|z| f64::from(z.capacity))
                    .sum();
                series.group_capacity[g].push(cap);
            }
            for cause in [
                "Failback",
                "GroupScaleIn",
                "AgentScaleIn",
                "Reclaimed",
                "Replaced",
                "AgentDied",
            ] {
                let k = w.kills_by_cause.get(cause).copied().unwrap_or(0);
                series
                    .kills
                    .entry(cause.to_string())
                    .or_default()
                    .push(k as f64);
            }
            let mode = mode_of(&w, policy, seed_open);
            series.mode.push(mode);
        }
        let frac = sec as f64 / total as f64;
        if frac - last_progress >= 0.01 {
            last_progress = frac;
            progress(frac);
        }
    }
    progress(1.0);

    // Stop everything, then account.
    let mut w = lock(&world);
    for i in w.instances.values_mut() {
        if let Some(t) = i.task.take() {
            t.abort();
        }
    }
    let summary = summarize(
        &mut w,
        &queue,
        s,
        seed,
        policy,
        total_jobs,
        mode_changes,
        &mut series,
    );
    Ok(Outcome { summary, series })
}

/// A spot `terminate` notice for `time`, as the agent's IMDS watcher
/// reports it when it sees it at `detected_at`.
fn spot_notice(time: DateTime<Utc>, detected_at: DateTime<Utc>) -> Detected {
    Detected {
        event: WatchEvent::SpotInterruption {
            change: Change::New,
            action: Some(SpotAction::Terminate),
            time,
            deadline_assumed: false,
            raw: None,
        },
        detected_at,
    }
}

/// The cascade's mode as the controller's memory (tags) holds it: 0
/// normal, 1 failed over, 2 failing back.
fn mode_of(w: &World, policy: Policy, seed_open: bool) -> f64 {
    match policy {
        Policy::Spotguard | Policy::TwoRegions => {
            use spotguard_controller::reconcile::{cascade_mode, Memory, Mode};
            let modes = w.groups.iter().skip(1).map(|g| {
                Memory::from_tags(&g.tags, chrono::DateTime::<chrono::Utc>::MAX_UTC)
                    .0
                    .mode
            });
            match cascade_mode(modes) {
                Mode::FailedOver => 1.0,
                Mode::FailingBack => 2.0,
                Mode::Normal => 0.0,
            }
        }
        Policy::Seed => f64::from(u8::from(seed_open)),
        Policy::SingleRegion => 0.0,
    }
}

/// Counts a mode change when it happens (after each controller call), not
/// from a once-a-minute sample that would miss a change and its reversal.
fn count_mode(w: &World, policy: Policy, seed_open: bool, last: &mut f64, changes: &mut usize) {
    let m = mode_of(w, policy, seed_open);
    if m != *last {
        *changes += 1;
        *last = m;
    }
}

async fn publish_simple(cloud: &SimCloud, s: &Scenario, queue: &MemQueue, fallback_visible: bool) {
    let (visible, _) = queue.depth();
    let p = &s.primary;
    if let Ok(g) = cloud.group(&p.region, PRIMARY).await {
        let v = spotguard_controller::metrics::per_instance(visible as f64, g.in_service);
        let m = spotguard_controller::metrics::MetricValue {
            region: p.region.clone(),
            namespace: "spotguard".into(),
            name: METRIC.into(),
            dimensions: vec![("AutoScalingGroupName".into(), PRIMARY.into())],
            value: v,
            unit: "Count",
        };
        let _ = cloud.put_metric(&m).await;
    }
    if let (true, Some(f)) = (fallback_visible, s.cascade().first()) {
        let m = spotguard_controller::metrics::MetricValue {
            region: f.region.clone(),
            namespace: "spotguard".into(),
            name: SEED_METRIC.into(),
            dimensions: vec![("AutoScalingGroupName".into(), FALLBACK.into())],
            value: visible as f64,
            unit: "Count",
        };
        let _ = cloud.put_metric(&m).await;
    }
}

async fn start_agent(
    world: &Shared,
    id: &str,
    cfg: &Arc<AgentConfig>,
    queue: &Arc<MemQueue>,
    clock: &Arc<dyn Clock>,
) {
    let (tx, rx) = mpsc::channel(16);
    let status = Arc::new(Status::new(id.to_string(), Arc::new(ImdsStats::default())));
    let broken = lock(world)
        .instances
        .get(id)
        .is_some_and(|i: &Instance| i.broken);
    let runner = Runner {
        cfg: cfg.clone(),
        queue: queue.clone(),
        fleet: Arc::new(SimFleet {
            world: world.clone(),
            id: id.to_string(),
        }),
        worker: Arc::new(SimWorker {
            world: world.clone(),
            instance: id.to_string(),
            broken,
        }),
        clock: clock.clone(),
        health: None,
        notifier: Notifier::none(),
        status: status.clone(),
        instance_id: id.to_string(),
    };
    let task = tokio::spawn(runner.run(rx, async {}, std::future::pending()));
    let mut w = lock(world);
    if let Some(i) = w.instances.get_mut(id) {
        i.notices = Some(tx);
        i.task = Some(task);
        i.status = Some(status);
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let k = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[k.min(sorted.len() - 1)]
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    w: &mut World,
    queue: &MemQueue,
    _s: &Scenario,
    seed: u64,
    policy: Policy,
    total_jobs: usize,
    mode_changes: usize,
    series: &mut Series,
) -> Summary {
    let st = queue.lock();
    let name_of = |body: &str| parse_job(body).name;
    let queued: std::collections::BTreeSet<String> =
        st.messages.iter().map(|m| name_of(&m.body)).collect();
    let dead: std::collections::BTreeSet<String> =
        st.dead.iter().map(|m| name_of(&m.body)).collect();
    drop(st);
    let mut waits = Vec::new();
    let mut completions = Vec::new();
    let mut killed: BTreeMap<String, usize> = BTreeMap::new();
    let (mut done, mut lost, mut dups, mut explained) = (0, 0, 0, 0);
    for (name, j) in &w.jobs {
        if let (Some(e), Some(f)) = (j.enqueued, j.first_start) {
            waits.push(f.duration_since(e).as_secs_f64());
        }
        if let (Some(e), Some(d)) = (j.enqueued, j.done.first()) {
            completions.push(d.duration_since(e).as_secs_f64());
        }
        for k in &j.kills {
            *killed.entry(format!("{k:?}")).or_default() += 1;
        }
        // No simulated job fails on its own: one in the dead-letter queue
        // got there by interruptions (and faults) alone, which the agent
        // re-sends instead of handing back (queue.max_interruptions).
        if dead.contains(name) {
            w.violations.push(format!(
                "job {name} dead-lettered, yet no simulated job fails on its own: interruptions spent its receives"
            ));
        }
        if !j.done.is_empty() {
            done += 1;
        } else if !queued.contains(name) && !dead.contains(name) {
            lost += 1;
            w.violations.push(format!(
                "job {name} lost: not done, not queued, not dead-lettered"
            ));
        }
        if j.done.len() > 1 {
            dups += j.done.len() - 1;
            // A second completion is explained by an execution that was
            // killed (reclaimed, scaled in) after it finished its work but
            // before its message was deleted.
            if !j.kills.is_empty() {
                explained += j.done.len() - 1;
            } else {
                w.violations
                    .push(format!("job {name}: unexplained duplicate execution"));
            }
        }
    }
    waits.sort_by(f64::total_cmp);
    completions.sort_by(f64::total_cmp);
    series.waits_s = waits.clone();
    let hours = |g: usize| w.instance_secs.get(g).copied().unwrap_or(0.0) / 3600.0;
    let fleet_empty = (0..w.groups.len()).all(|g| w.alive(g).next().is_none());
    let paid: f64 = w.up_secs.iter().sum();
    let busy: f64 = w.busy_secs.iter().sum();
    Summary {
        policy: policy.name().into(),
        seed,
        jobs: total_jobs,
        done,
        dead_lettered: dead.len(),
        still_queued: queued.len(),
        stranded: if fleet_empty { queued.len() } else { 0 },
        lost,
        wait_p50_s: percentile(&waits, 0.5),
        wait_p95_s: percentile(&waits, 0.95),
        completion_p50_s: percentile(&completions, 0.5),
        completion_p95_s: percentile(&completions, 0.95),
        killed,
        duplicates: dups,
        duplicates_explained: explained,
        primary_instance_hours: hours(0),
        fallback_instance_hours: (1..w.instance_secs.len())
            .map(hours)
            .fold(0.0, |a, b| a + b),
        group_instance_hours: (0..w.instance_secs.len()).map(hours).collect(),
        cost_usd: w.cost,
        transfer_usd: w.transfer_cost,
        utilization: if paid > 0.0 { busy / paid } else { 0.0 },
        mode_changes,
        agent_deaths: w.agent_deaths,
        busy_scaled_in: w.busy_scaled_in,
        violations: w.violations.clone(),
    }
}
