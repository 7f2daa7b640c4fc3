//! The simulated AWS: Auto Scaling groups per region over spot capacity
//! that follows the scenario, spot interruptions (rebalance, notice,
//! reclaim), launches that fail with AWS's own StatusMessage forms and
//! EventBridge events, the termination lifecycle hook, target tracking as
//! AWS documents it, and the bill. (SQS is the agent's in-memory queue,
//! with redrive, driven by `run.rs`.)
//!
//! The agents' `Fleet` and the controller's `Cloud` are implemented over
//! this one world in [`crate::apis`], so the real agent and controller code
//! runs against it. Everything is keyed by ordered maps and a seeded generator: the same
//! seed gives the same run.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use spotguard_agent::watch::Detected;
use spotguard_controller::aws::TargetTracking;
use spotguard_controller::events::Activity;

/// SplitMix64: small, seeded, the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// In [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Launched; the agent starts at `ready`.
    Pending {
        ready: Instant,
    },
    InService,
    /// Going away at `at` (its agent and jobs end then).
    Terminating {
        at: Instant,
    },
    Gone,
}

pub struct Instance {
    pub id: String,
    pub group: usize,
    /// Index of its pool (zone and instance type) in the group's pools.
    pub zone: usize,
    /// When it reached `running` (billing starts there): launch + delay.
    pub running_at: Instant,
    /// When it reached InService (its warm-up starts there).
    pub in_service_at: Option<Instant>,
    /// Seconds billed so far.
    pub billed_secs: f64,
    pub state: State,
    pub protected: bool,
    /// Its agent's liveness mark (the `spotguard:alive` tag), if written.
    pub alive_mark: Option<String>,
    /// When its agent died (`faults.agent_death_per_hour`), and whether
    /// that was reported as a protection held too long.
    pub agent_dead_at: Option<Instant>,
    pub dead_reported: bool,
    pub launched: Instant,
    pub ended: Option<Instant>,
    /// The spot notice was given (no decrement may follow).
    pub noticed: bool,
    /// Scheduled: (rebalance at, notice at, reclaim at).
    pub interruption: Option<(Option<Instant>, Instant, Instant)>,
    pub notices: Option<mpsc::Sender<Detected>>,
    pub task: Option<JoinHandle<()>>,
    pub status: Option<Arc<spotguard_agent::status::Status>>,
    pub broken: bool,
    /// Why it ends, once it is ending.
    pub why: Option<Kill>,
    /// In `Terminating:Wait` on the group's lifecycle hook: the hook's
    /// global timeout (the latest end whatever the heartbeats), and whether
    /// its agent has seen the target lifecycle state `Terminated`.
    pub hook: Option<(Instant, bool)>,
    /// Jobs running on it now (message ids), kept by its worker.
    pub running: Vec<String>,
}

impl Instance {
    /// Still on its spot capacity: pending, in service, or waiting on the
    /// termination hook ([`World::on_spot`]).
    pub fn on_spot(&self) -> bool {
        match self.state {
            State::Pending { .. } | State::InService => true,
            State::Terminating { .. } => self.hook.is_some(),
            State::Gone => false,
        }
    }
}

/// One spot pool: an instance type in an Availability Zone.
#[derive(Debug, Clone)]
pub struct Pool {
    /// The zone's name (`us-east-1a`).
    pub name: String,
    /// The instance type (empty: the scenario names none).
    pub instance_type: String,
    /// Spot instances it can hold now.
    pub capacity: i32,
}

/// A target-tracking policy as the group holds it.
pub struct Tracking {
    pub policy: TargetTracking,
    pub enabled: bool,
    /// One value per minute, newest last.
    pub history: VecDeque<f64>,
    pub last_scale_out: Option<Instant>,
}

pub struct Group {
    pub name: String,
    pub region: String,
    pub min: i32,
    pub max: i32,
    pub desired: i32,
    pub price: f64,
    /// Spot pools, zone by zone, and within a zone one per instance type
    /// (an instance's `zone` indexes this).
    pub zones: Vec<Pool>,
    pub tags: BTreeMap<String, String>,
    pub activities: Vec<Activity>,
    pub tracking: Option<Tracking>,
    pub last_launch_try: Option<Instant>,
    pub interruptions_per_hour: f64,
    /// Spot requests wait in `PendingSpotBidPlacement` instead of failing
    /// (`spot_requests_wait` in the scenario).
    pub spot_requests_wait: bool,
    /// A termination lifecycle hook (`launch.lifecycle_hook`).
    pub hook: bool,
}

/// The shipped template's HeartbeatTimeout
/// (packaging/cloudformation/spotguard-region.yaml).
pub const HOOK_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(300);

/// The hook's global timeout: min(48 h, 100 x HeartbeatTimeout)
/// (REFERENCE.md, "Termination lifecycle hook").
pub const HOOK_GLOBAL_TIMEOUT: Duration = Duration::from_secs(100 * 300);

/// Why a job's execution ended without its own end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kill {
    /// The spot instance was reclaimed.
    Reclaimed,
    /// The group terminated the instance (target tracking's scale-in).
    GroupScaleIn,
    /// A fallback group terminated it because its gate (MaxSize) was
    /// lowered under it: a failback that did not wait for the job.
    Failback,
    /// The agent asked for its own termination while a job ran.
    AgentScaleIn,
    /// The instance was replaced as unhealthy.
    Replaced,
    /// Its agent died while the job ran (the message comes back when its
    /// visibility lapses).
    AgentDied,
}

#[derive(Debug, Default, Clone)]
pub struct JobStats {
    pub enqueued: Option<Instant>,
    pub first_start: Option<Instant>,
    pub done: Vec<Instant>,
    pub starts: u32,
    /// Executions started in a group of another region than the queue's.
    pub remote_starts: u32,
    pub kills: Vec<Kill>,
}

#[derive(Default)]
pub struct World {
    pub start: Option<Instant>,
    pub groups: Vec<Group>,
    pub instances: BTreeMap<String, Instance>,
    pub metrics: BTreeMap<(String, String, String), f64>,
    /// EventBridge events for the controller, in order.
    pub events: Vec<Value>,
    pub jobs: BTreeMap<String, JobStats>,
    pub violations: Vec<String>,
    pub published: Vec<(String, String)>,
    pub cost: f64,
    /// Paid instance-seconds per group (from `running`, 60 s minimum, none
    /// for a spot instance EC2 reclaims in its first hour).
    pub instance_secs: Vec<f64>,
    /// Instance-seconds with at least one job running, per group.
    pub busy_secs: Vec<f64>,
    /// Instance-seconds running (billable before EC2's first-hour refund of
    /// reclaimed spot instances), per group: what utilization divides.
    pub up_secs: Vec<f64>,
    /// Inter-region data transfer, dollars (in `cost` too).
    pub transfer_cost: f64,
    /// The share of random interruptions with an early rebalance
    /// recommendation (`launch.rebalance_probability`).
    pub rebalance_probability: f64,
    /// Dollars of inter-region transfer per job run away from the queue.
    pub transfer_per_job: f64,
    /// Executions killed so far, by cause (`Kill`'s name).
    pub kills_by_cause: BTreeMap<String, usize>,
    /// Agents dead so far (`faults.agent_death_per_hour`).
    pub agent_deaths: usize,
    /// Instances the group scaled in while a job ran on them (a job that
    /// started before its protection landed): the lifecycle hook's drain
    /// saves those jobs, without a hook they are killed.
    pub busy_scaled_in: usize,
    pub faults: crate::scenario::Faults,
    /// The faults' own generator, so that they do not shift the rest.
    pub fault_rng: Option<Rng>,
    pub next_instance: u64,
    pub next_activity: u64,
    pub broken_left: u32,
    pub rng: Option<Rng>,
}

pub type Shared = Arc<Mutex<World>>;

pub fn lock(w: &Shared) -> MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sim time as wall-clock time (the clock the agents and controller read).
pub fn wall(start: DateTime<Utc>, base: Instant, t: Instant) -> DateTime<Utc> {
    start + chrono::Duration::from_std(t.duration_since(base)).unwrap_or_default()
}

impl World {
    pub fn group_index(&self, region: &str, name: &str) -> Option<usize> {
        self.groups
            .iter()
            .position(|g| g.region == region && g.name == name)
    }

    pub fn alive(&self, g: usize) -> impl Iterator<Item = &Instance> {
        self.instances.values().filter(move |i| {
            i.group == g && matches!(i.state, State::Pending { .. } | State::InService)
        })
    }

    pub fn in_service(&self, g: usize) -> i32 {
        self.alive(g)
            .filter(|i| i.state == State::InService)
            .count() as i32
    }

    /// The instances of group `g` that hold spot capacity: pending, in
    /// service, or waiting on the termination hook (still running, and
    /// still EC2's to reclaim: "a lifecycle hook does not prevent an
    /// instance from terminating in the event that capacity is no longer
    /// available", EC2 Auto Scaling User Guide, lifecycle hooks).
    pub fn on_spot(&self, g: usize) -> impl Iterator<Item = &Instance> {
        self.instances
            .values()
            .filter(move |i| i.group == g && i.on_spot())
    }

    /// Marks an instance to end at `at`, counting the jobs it kills; false
    /// if it is already ending. A spot reclaim ends an instance waiting on
    /// the termination hook too, at the reclaim.
    pub fn terminate(&mut self, id: &str, at: Instant, why: Kill) -> bool {
        let Some(i) = self.instances.get_mut(id) else {
            return false;
        };
        match i.state {
            State::Pending { .. } | State::InService => {}
            State::Terminating { at: then } if why == Kill::Reclaimed && i.hook.is_some() => {
                i.state = State::Terminating { at: then.min(at) };
                i.why = Some(why);
                i.hook = None;
                return true;
            }
            _ => return false,
        }
        i.state = State::Terminating { at };
        i.why = Some(why);
        true
    }

    /// The group takes an instance out: through its termination lifecycle
    /// hook if it has one (the instance waits while its agent drains, up to
    /// a heartbeat timeout at a time), else at once.
    pub fn scale_in(&mut self, id: &str, now: Instant, why: Kill) {
        let hook = self
            .instances
            .get(id)
            .and_then(|i| self.groups.get(i.group))
            .is_some_and(|g| g.hook);
        // The agent's own request has its own check (apis.rs): a busy
        // instance here is the group's pick.
        let busy = why != Kill::AgentScaleIn
            && self
                .instances
                .get(id)
                .is_some_and(|i| !i.running.is_empty());
        let ends = if hook {
            now + HOOK_HEARTBEAT_TIMEOUT
        } else {
            now
        };
        if !self.terminate(id, ends, why) {
            return;
        }
        if busy {
            // Only a job that started before its protection landed (or a
            // throttled protection call) leaves a busy instance for the
            // group to pick; with neither fault, it is a protection bug.
            self.busy_scaled_in += 1;
            let faultless =
                self.faults.agent_api_latency.0.is_zero() && self.faults.agent_error_rate == 0.0;
            if faultless {
                self.violations.push(format!(
                    "{id}: scaled in by its group ({why:?}) while busy: its protection is missing"
                ));
            }
        }
        if hook {
            if let Some(i) = self.instances.get_mut(id) {
                i.hook = Some((now + HOOK_GLOBAL_TIMEOUT, false));
            }
        }
    }

    /// `RecordLifecycleActionHeartbeat`: the wait restarts, within the
    /// global timeout. Refused (false) for an instance not waiting on it.
    pub fn hook_heartbeat(&mut self, id: &str, now: Instant) -> bool {
        match self.instances.get_mut(id) {
            Some(i) => match (i.state, i.hook) {
                (State::Terminating { .. }, Some((until, _))) => {
                    i.state = State::Terminating {
                        at: (now + HOOK_HEARTBEAT_TIMEOUT).min(until),
                    };
                    true
                }
                _ => false,
            },
            None => false,
        }
    }

    /// `CompleteLifecycleAction` CONTINUE: the instance ends now.
    pub fn hook_complete(&mut self, id: &str, now: Instant) -> bool {
        match self.instances.get_mut(id) {
            Some(i) if i.hook.is_some() && matches!(i.state, State::Terminating { .. }) => {
                // The action is over: later heartbeats and completions are
                // refused, as AWS refuses them.
                i.state = State::Terminating { at: now };
                i.hook = None;
                true
            }
            _ => false,
        }
    }

    fn activity(
        &mut self,
        g: usize,
        now: Instant,
        ok: bool,
        message: &str,
        zone: Option<&str>,
        base: (DateTime<Utc>, Instant),
    ) -> Value {
        self.next_activity += 1;
        let id = format!("act-{:08}", self.next_activity);
        let t = wall(base.0, base.1, now);
        let group = &mut self.groups[g];
        group.activities.push(Activity {
            id: id.clone(),
            description: "Launching a new EC2 instance".into(),
            status_code: if ok { "Successful" } else { "Failed" }.into(),
            status_message: message.into(),
            start: Some(t),
            end: Some(t),
            details: zone.map_or(String::new(), |z| {
                json!({"Subnet ID": "subnet-sim", "Availability Zone": z}).to_string()
            }),
        });
        if group.activities.len() > 50 {
            group.activities.remove(0);
        }
        let at = t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        json!({
            "version": "0", "id": id, "source": "aws.autoscaling",
            "detail-type": if ok { "EC2 Instance Launch Successful" } else { "EC2 Instance Launch Unsuccessful" },
            "account": "123456789012", "time": at, "region": group.region, "resources": [],
            "detail": {
                "StatusCode": if ok { "InProgress" } else { "Failed" },
                "StatusMessage": message, "AutoScalingGroupName": group.name,
                "ActivityId": id, "RequestId": id, "EC2InstanceId": "",
                "StartTime": at, "EndTime": at, "Cause": "simulated",
                "Details": {"Availability Zone": zone.unwrap_or_default(), "Subnet ID": "subnet-sim"}
            }
        })
    }

    /// Launches what the groups are short of, against spot capacity; ends
    /// what is above desired (unprotected only: pending first, then the
    /// newest).
    pub fn reconcile_groups(
        &mut self,
        now: Instant,
        launch: &crate::scenario::Launch,
        base: (DateTime<Utc>, Instant),
    ) {
        for g in 0..self.groups.len() {
            let alive: Vec<String> = self.alive(g).map(|i| i.id.clone()).collect();
            let have = alive.len() as i32;
            let desired = self.groups[g].desired.min(self.groups[g].max).max(0);
            // Above a lowered gate of a fallback group, the ends are the
            // failback's; otherwise target tracking's.
            let why = if g >= 1 && self.groups[g].max < have {
                Kill::Failback
            } else {
                Kill::GroupScaleIn
            };
            if have > desired {
                // Scale in: the group picks unprotected instances (pending
                // first, then the newest); protected ones stay.
                let mut victims: Vec<(bool, Instant, String)> = self
                    .alive(g)
                    .filter(|i| !i.protected)
                    .map(|i| (i.state == State::InService, i.launched, i.id.clone()))
                    .collect();
                victims.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
                for (_, _, id) in victims.into_iter().take((have - desired) as usize) {
                    self.scale_in(&id, now, why);
                }
                continue;
            }
            if have == desired {
                continue;
            }
            let due = self.groups[g]
                .last_launch_try
                .is_none_or(|t| now.duration_since(t) >= launch.retry.0);
            if !due {
                continue;
            }
            self.groups[g].last_launch_try = Some(now);
            // Balanced best effort (AWS): each launch goes to the zone with
            // the fewest of the group's instances; within it, a
            // mixed-instances group takes the instance type with the most
            // spot capacity left (capacity-optimized), silently: another
            // type filling the launch is no failure. A zone with every type
            // dry logs a failed activity naming it and the launch moves to
            // another zone, until one succeeds or every zone is dry.
            let (zone_of, first_pool) = zones_of_pools(&self.groups[g].zones);
            // A pool's capacity is used by every instance still on it (one
            // waiting on the hook too); the zones' balance counts the
            // group's own (a terminating instance has left it).
            let mut per_pool = vec![0i32; zone_of.len()];
            for i in self.on_spot(g) {
                if let Some(n) = per_pool.get_mut(i.zone) {
                    *n += 1;
                }
            }
            let mut per_zone = vec![0i32; first_pool.len()];
            for i in self.alive(g) {
                if let Some(z) = zone_of.get(i.zone) {
                    per_zone[*z] += 1;
                }
            }
            let mut dry = vec![false; per_zone.len()];
            let mut want = desired - have;
            while want > 0 {
                let Some(z) = (0..per_zone.len())
                    .filter(|z| !dry[*z])
                    .min_by_key(|z| (per_zone[*z], *z))
                else {
                    break;
                };
                let pools = &self.groups[g].zones;
                let free = (0..pools.len())
                    .filter(|p| zone_of[*p] == z && per_pool[*p] < pools[*p].capacity)
                    .min_by_key(|p| (per_pool[*p] - pools[*p].capacity, *p));
                let Some(p) = free else {
                    let zone = pools[first_pool[z]].name.clone();
                    if self.groups[g].spot_requests_wait {
                        // The request waits in its zone, silently: one
                        // pending activity until capacity comes back.
                        let waiting = self.groups[g]
                            .activities
                            .iter()
                            .any(|a| a.status_code == PENDING_SPOT);
                        if !waiting {
                            self.activity(g, now, false, "", Some(&zone), base);
                            if let Some(a) = self.groups[g].activities.last_mut() {
                                a.status_code = PENDING_SPOT.into();
                                a.end = None;
                            }
                        }
                        break;
                    }
                    dry[z] = true;
                    let ev = self.activity(g, now, false, CAPACITY_FAILURE, Some(&zone), base);
                    self.events.push(ev);
                    continue;
                };
                // A launch: a request that waited is fulfilled now.
                for a in self.groups[g].activities.iter_mut() {
                    if a.status_code == PENDING_SPOT {
                        a.status_code = "Successful".into();
                        a.end = Some(wall(base.0, base.1, now));
                    }
                }
                per_pool[p] += 1;
                per_zone[z] += 1;
                want -= 1;
                self.next_instance += 1;
                let id = format!("i-{:017x}", self.next_instance);
                let broken = self.broken_left > 0;
                if broken {
                    self.broken_left -= 1;
                }
                self.instances.insert(
                    id.clone(),
                    Instance {
                        id,
                        group: g,
                        zone: p,
                        running_at: now + launch.delay.0,
                        in_service_at: None,
                        billed_secs: 0.0,
                        state: State::Pending {
                            ready: now + launch.delay.0 + launch.boot.0,
                        },
                        protected: false,
                        alive_mark: None,
                        agent_dead_at: None,
                        dead_reported: false,
                        launched: now,
                        ended: None,
                        noticed: false,
                        interruption: None,
                        notices: None,
                        task: None,
                        status: None,
                        broken,
                        why: None,
                        hook: None,
                        running: Vec::new(),
                    },
                );
                let zone = self.groups[g].zones[p].name.clone();
                let ev = self.activity(g, now, true, "", Some(&zone), base);
                self.events.push(ev);
            }
        }
    }

    /// Interruptions: at the scenario's rate, and whenever a pool (a zone,
    /// or an instance type in it) shrank below what runs on it (any of
    /// them, in a seeded random order). An instance already
    /// given its notice is leaving: it is not counted against the pool
    /// again (a drop from 88 to 20 reclaims 68, not all 88).
    pub fn interrupt(&mut self, now: Instant, dt: Duration, lead: Duration) {
        let mut picks: Vec<(String, bool)> = Vec::new();
        for g in 0..self.groups.len() {
            let rate = self.groups[g].interruptions_per_hour;
            for (z, pool) in self.groups[g].zones.iter().enumerate() {
                let mut staying: Vec<(Instant, String)> = self
                    .on_spot(g)
                    .filter(|i| i.zone == z && i.interruption.is_none())
                    .map(|i| (i.launched, i.id.clone()))
                    .collect();
                staying.sort();
                let excess = (staying.len() as i32 - pool.capacity).max(0) as usize;
                // Which instances EC2 reclaims when a pool shrinks is not
                // documented: any of them, busy ones too, in a seeded
                // random order (newest first without a generator, for the
                // unit tests). Newest first spared the busy old ones.
                staying.reverse();
                if excess > 0 {
                    if let Some(rng) = self.rng.as_mut() {
                        for k in (1..staying.len()).rev() {
                            let j = (rng.next_u64() % (k as u64 + 1)) as usize;
                            staying.swap(k, j);
                        }
                    }
                }
                for (_, id) in staying.iter().take(excess) {
                    picks.push((id.clone(), false));
                }
            }
            if rate > 0.0 {
                let p = rate * dt.as_secs_f64() / 3600.0;
                let running: Vec<String> = self
                    .on_spot(g)
                    .filter(|i| i.interruption.is_none())
                    .map(|i| i.id.clone())
                    .collect();
                for id in running {
                    let roll = self.rng.as_mut().map_or(1.0, Rng::unit);
                    if roll < p && !picks.iter().any(|(x, _)| *x == id) {
                        let early = self.rng.as_mut().map_or(1.0, Rng::unit);
                        picks.push((id, early < self.rebalance_probability));
                    }
                }
            }
        }
        for (id, with_rebalance) in picks {
            if let Some(i) = self.instances.get_mut(&id) {
                let early = with_rebalance && !lead.is_zero();
                let notice = if early { now + lead } else { now };
                let rebalance = early.then_some(now);
                i.interruption = Some((rebalance, notice, notice + Duration::from_secs(120)));
            }
        }
    }

    /// Target tracking, once a minute (REFERENCE.md): scale out after 3
    /// periods above the target, in after 15 below 90 % of it, to capacity
    /// in proportion to metric / target. During the 300 s warm-up of an
    /// instance, AWS keeps scaling out, but counts warming instances as
    /// part of the desired capacity of the next scale-out rather than of
    /// the current capacity, and does not scale in ("Set the default
    /// instance warmup", EC2 Auto Scaling User Guide). The desired capacity
    /// may fall below the busy, protected instances, as on AWS; the group
    /// then takes only unprotected ones ([`World::reconcile_groups`]).
    pub fn track(&mut self, now: Instant) {
        const WARMUP: Duration = Duration::from_secs(300);
        for g in 0..self.groups.len() {
            let (warm, warming) = self.alive(g).fold((0i32, 0i32), |(w, n), i| match i.state {
                State::InService
                    if i.in_service_at
                        .is_some_and(|t| now.duration_since(t) >= WARMUP) =>
                {
                    (w + 1, n)
                }
                _ => (w, n + 1),
            });
            let (region, name) = (self.groups[g].region.clone(), self.groups[g].name.clone());
            let group = &mut self.groups[g];
            let Some(t) = group.tracking.as_mut() else {
                continue;
            };
            if !t.enabled {
                t.history.clear();
                continue;
            }
            let metric = match &t.policy.spec {
                spotguard_controller::aws::MetricSpec::Custom { name: m, .. } => self
                    .metrics
                    .get(&(region.clone(), name.clone(), m.clone()))
                    .copied(),
                spotguard_controller::aws::MetricSpec::BacklogMath { .. } => None,
            };
            let Some(v) = metric else {
                continue;
            };
            let d = track_step(t, group.desired, group.min, group.max, warm, warming, v);
            if d > group.desired {
                t.last_scale_out = Some(now);
            }
            group.desired = d;
        }
    }

    /// An agent's Auto Scaling call throttled (`faults.agent_error_rate`).
    pub fn agent_call_fails(&mut self) -> bool {
        let rate = self.faults.agent_error_rate;
        rate > 0.0 && self.fault_rng.as_mut().map_or(1.0, Rng::unit) < rate
    }

    /// Adds the cost and instance time of `dt`, per second from `running`
    /// (EC2: pending is not billed; Linux is billed per second).
    pub fn bill(&mut self, now: Instant, dt: Duration) {
        let n = self.groups.len();
        self.instance_secs
            .resize(n.max(self.instance_secs.len()), 0.0);
        self.busy_secs.resize(n.max(self.busy_secs.len()), 0.0);
        self.up_secs.resize(n.max(self.up_secs.len()), 0.0);
        let secs = dt.as_secs_f64();
        for i in self.instances.values_mut() {
            if now <= i.running_at
                || !matches!(
                    i.state,
                    State::Pending { .. } | State::InService | State::Terminating { .. }
                )
            {
                continue;
            }
            i.billed_secs += secs;
            self.instance_secs[i.group] += secs;
            self.up_secs[i.group] += secs;
            self.cost += secs / 3600.0 * self.groups[i.group].price;
            if !i.running.is_empty() {
                self.busy_secs[i.group] += secs;
            }
        }
    }

    /// The bill of an instance that has just ended: EC2's 60-second
    /// minimum, and no charge at all for a spot instance EC2 interrupted in
    /// its first hour ("Billing for interrupted Spot Instances", EC2 User
    /// Guide: Linux, "No charge" in the first hour).
    pub fn settle(&mut self, id: &str) {
        let Some(i) = self.instances.get_mut(id) else {
            return;
        };
        let (g, billed, reclaimed) = (i.group, i.billed_secs, i.why == Some(Kill::Reclaimed));
        let price = self.groups[g].price / 3600.0;
        let adjust = if reclaimed && billed < 3600.0 {
            -billed
        } else if billed > 0.0 && billed < 60.0 {
            60.0 - billed
        } else {
            0.0
        };
        i.billed_secs += adjust;
        self.instance_secs[g] += adjust;
        self.cost += adjust * price;
    }
}

/// The zone of each pool (an index into the zones in the order they first
/// appear) and each zone's first pool (whose name names the zone).
fn zones_of_pools(pools: &[Pool]) -> (Vec<usize>, Vec<usize>) {
    let mut first: Vec<usize> = Vec::new();
    let zone_of = (0..pools.len())
        .map(
            |p| match first.iter().position(|f| pools[*f].name == pools[p].name) {
                Some(z) => z,
                None => {
                    first.push(p);
                    first.len() - 1
                }
            },
        )
        .collect();
    (zone_of, first)
}

/// One target-tracking evaluation of a group: its new desired capacity.
/// `warm`: InService instances past their warm-up; `warming`: the others
/// (pending or warming). Pure, for the unit tests of AWS's arithmetic.
pub fn track_step(
    t: &mut Tracking,
    desired: i32,
    min: i32,
    max: i32,
    warm: i32,
    warming: i32,
    v: f64,
) -> i32 {
    t.history.push_back(v);
    while t.history.len() > 15 {
        t.history.pop_front();
    }
    let target = t.policy.target;
    let above = t.history.len() >= 3 && t.history.iter().rev().take(3).all(|x| *x > target);
    let below = t.history.len() >= 15 && t.history.iter().all(|x| *x < 0.9 * target);
    if above {
        // Capacity in proportion to metric / target, from the warm
        // instances (from 0, from one: a value above the target grows an
        // empty group, REFERENCE.md). Warming ones count as part of the
        // capacity when AWS decides how many to add ("multiple alarm
        // breaches that require a similar amount of capacity to be added
        // result in a single scaling activity"): the desired capacity,
        // which holds them, only rises to what the warm ones call for.
        let want = ((f64::from(warm.max(1)) * v / target).ceil() as i32)
            .max(desired + i32::from(warming == 0))
            .min(max);
        if want > desired {
            return want;
        }
    } else if below && warming == 0 && warm > 0 {
        let want = ((f64::from(warm) * v / target).ceil() as i32).max(min);
        if want < desired {
            t.history.clear();
            return want;
        }
    }
    desired
}

/// The status of a spot request waiting for capacity (a group without a
/// mixed-instances policy).
pub const PENDING_SPOT: &str = "PendingSpotBidPlacement";

/// AWS's StatusMessage of a spot launch that found no capacity in a zone
/// (mixed-instances groups; REFERENCE.md).
pub const CAPACITY_FAILURE: &str = "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity available that matches your request. Launching EC2 instance failed.";

#[cfg(test)]
#[path = "world_tests.rs"]
mod tests;
