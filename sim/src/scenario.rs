//! The scenario file: regions and their spot capacity over time, the jobs,
//! and the settings under test. Every field and its unit is in the README
//! (`spotguard-sim` section); durations are written like `90s`, `5m`, `2h`.

use serde::{Deserialize, Serialize};
use spotguard_common::config::Dur;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// Simulated time in all.
    pub duration: Dur,
    pub primary: Region,
    /// The fallback group; absent (and no `fallbacks`): one region only.
    pub fallback: Option<Region>,
    /// A cascade of fallback groups, in order (instead of `fallback`).
    #[serde(default)]
    pub fallbacks: Vec<Region>,
    pub jobs: Jobs,
    #[serde(default)]
    pub agent: Agent,
    #[serde(default)]
    pub controller: Controller,
    #[serde(default)]
    pub launch: Launch,
    #[serde(default)]
    pub faults: Faults,
    /// The scenario without its capacity changes, for the "p95 wait against
    /// no outage" figure.
    #[serde(default)]
    pub baseline_without_changes: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub region: String,
    #[serde(default)]
    pub min: i32,
    pub max: i32,
    /// Desired capacity at the start.
    #[serde(default)]
    pub initial: i32,
    /// Spot price, dollars per instance-hour.
    pub spot_price: f64,
    /// Spot instances the region's pools can hold at the start, when it
    /// has one pool (no `zones`).
    #[serde(default)]
    pub capacity: i32,
    /// Changes of that capacity over time.
    #[serde(default)]
    pub capacity_changes: Vec<CapacityChange>,
    /// The region's spot pools, one per Availability Zone, or one per
    /// instance type in a zone with `types` (instead of `capacity`): a group launches in the zone with the fewest of its
    /// instances first, and in another when that one is dry, as AWS's
    /// "balanced best effort" does, logging a failed activity for the dry
    /// zone each time.
    #[serde(default)]
    pub zones: Vec<Zone>,
    /// Spot interruptions per instance-hour (0.1 = 10 % of instances an hour).
    #[serde(default)]
    pub interruptions_per_hour: f64,
    /// A group without a mixed-instances policy: a spot request that finds
    /// no capacity waits in `PendingSpotBidPlacement` (no `Failed`
    /// activity, no EventBridge event) until capacity comes back; the
    /// controller sees it only by polling the scaling activities.
    #[serde(default)]
    pub spot_requests_wait: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    /// The zone's letter, appended to the region (`a` -> `us-east-1a`).
    pub name: String,
    /// The zone's one pool (or `types`, not both).
    #[serde(default)]
    pub capacity: Option<i32>,
    #[serde(default)]
    pub capacity_changes: Vec<CapacityChange>,
    /// A mixed-instances group's pools in this zone, one per instance type
    /// (instead of `capacity`): a spot pool is an instance type in a zone,
    /// and one type can be dry while another in the same zone is not.
    #[serde(default)]
    pub types: Vec<TypePool>,
}

/// One instance type's spot pool in a zone.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypePool {
    /// The instance type (`g4dn.xlarge`).
    pub name: String,
    pub capacity: i32,
    #[serde(default)]
    pub capacity_changes: Vec<CapacityChange>,
}

/// One spot pool of a region: an instance type in a zone.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// The zone's letter.
    pub zone: String,
    /// The instance type, empty when the scenario names none.
    pub instance_type: String,
    pub capacity: i32,
    pub capacity_changes: Vec<CapacityChange>,
}

impl Region {
    /// The region's pools, zone by zone and, within a zone, type by type in
    /// the scenario's order: its zones' types, its zones, or one zone `a`
    /// with the region's capacity.
    pub fn pools(&self) -> Vec<PoolSpec> {
        if self.zones.is_empty() {
            return vec![PoolSpec {
                zone: "a".into(),
                instance_type: String::new(),
                capacity: self.capacity,
                capacity_changes: self.capacity_changes.clone(),
            }];
        }
        let mut out = Vec::new();
        for z in &self.zones {
            if z.types.is_empty() {
                out.push(PoolSpec {
                    zone: z.name.clone(),
                    instance_type: String::new(),
                    capacity: z.capacity.unwrap_or(0),
                    capacity_changes: z.capacity_changes.clone(),
                });
            }
            for t in &z.types {
                out.push(PoolSpec {
                    zone: z.name.clone(),
                    instance_type: t.name.clone(),
                    capacity: t.capacity,
                    capacity_changes: t.capacity_changes.clone(),
                });
            }
        }
        out
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityChange {
    pub at: Dur,
    pub capacity: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jobs {
    pub arrivals: Vec<Arrival>,
    /// The queue's redrive policy: a message received this many times goes
    /// to the dead-letter queue.
    #[serde(default = "d_max_receives")]
    pub max_receives: u32,
    /// Data each job moves between the queue's region and the region it
    /// runs in (inputs and results), GB: billed for a job run in another
    /// region than the queue's.
    #[serde(default)]
    pub transfer_gb: f64,
    /// Inter-region data transfer, dollars per GB. EC2's price between two
    /// US regions is $0.02/GB (aws.amazon.com/ec2/pricing/on-demand, "Data
    /// Transfer"); other pairs cost more.
    #[serde(default = "d_transfer_price")]
    pub transfer_usd_per_gb: f64,
}

fn d_transfer_price() -> f64 {
    0.02
}

fn d_max_receives() -> u32 {
    10
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arrival {
    /// Jobs arrive evenly (with seeded jitter) between `start` and `end`.
    pub start: Dur,
    pub end: Dur,
    pub count: u32,
    /// Mean run time; each job takes 0.5 to 1.5 times this.
    pub duration: Dur,
    /// The job writes a checkpoint this often (0: never); a job handed over
    /// resumes from its last one.
    #[serde(default = "d_zero")]
    pub checkpoint_every: Dur,
}

fn d_zero() -> Dur {
    Dur(std::time::Duration::ZERO)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Agent {
    pub idle_timeout: Dur,
    pub visibility_timeout: Dur,
    pub concurrency: u32,
    /// The first this many instances launched have a broken worker (it
    /// cannot start: a missing program).
    pub broken_instances: u32,
}

impl Default for Agent {
    fn default() -> Self {
        Agent {
            idle_timeout: Dur(std::time::Duration::from_secs(300)),
            visibility_timeout: Dur(std::time::Duration::from_secs(120)),
            concurrency: 1,
            broken_instances: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Controller {
    /// Backlog per instance both groups track.
    pub target: f64,
    pub cooldown: Dur,
    pub min_dwell: Dur,
    pub shortage_for: Dur,
    /// The original design's fallback target (visible messages the
    /// fallback group tracks). Absent: 10 x `target`, the seed design's own
    /// ratio (a fallback target of 200 beside a per-instance target of 20).
    pub seed_fallback_target: Option<f64>,
}

impl Default for Controller {
    fn default() -> Self {
        Controller {
            target: 5.0,
            cooldown: Dur(std::time::Duration::from_secs(600)),
            min_dwell: Dur(std::time::Duration::from_secs(300)),
            shortage_for: Dur(std::time::Duration::from_secs(120)),
            seed_fallback_target: None,
        }
    }
}

impl Controller {
    /// The seed policy's fallback target ([`Controller::seed_fallback_target`]).
    pub fn seed_target(&self) -> f64 {
        self.seed_fallback_target.unwrap_or(10.0 * self.target)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Launch {
    /// From the launch to the instance running.
    pub delay: Dur,
    /// From running to the agent started.
    pub boot: Dur,
    /// The rebalance recommendation comes this long before the spot notice
    /// (0: none).
    pub rebalance_lead: Dur,
    /// The share of random interruptions that get a rebalance
    /// recommendation first. AWS: it "might come along with or after the
    /// interruption notice", or not at all (EC2 User Guide, "EC2 instance
    /// rebalance recommendations"); no rate is published, so 0.5.
    pub rebalance_probability: f64,
    /// A group short of instances tries to launch this often.
    pub retry: Dur,
    /// The groups' termination lifecycle hook (the shipped template's,
    /// HeartbeatTimeout 300 s): every termination by a group (target
    /// tracking's scale-in, a lowered MaxSize, the agent's own
    /// `TerminateInstanceInAutoScalingGroup`, an unhealthy replacement)
    /// waits in `Terminating:Wait` while its agent drains, heartbeats and
    /// completes the action, at most min(48 h, 100 x 300 s). Spot reclaims
    /// cut the wait short, as on AWS. `false`: the group terminates at once
    /// (the agent's own request 30 s later), and a job that started before
    /// its protection landed is killed.
    pub lifecycle_hook: bool,
}

impl Default for Launch {
    /// GPU-like: about 90 s from the launch to `running` (EC2's spot
    /// fulfilment plus the instance start), then 4 minutes to a working
    /// agent (NVIDIA driver load, a container image pull and model weights
    /// on a g4dn/g5 AMI take 3-5 minutes). `spotguard-sim run --boot`
    /// shows the figures' sensitivity to it.
    fn default() -> Self {
        Launch {
            delay: Dur(std::time::Duration::from_secs(90)),
            boot: Dur(std::time::Duration::from_secs(240)),
            rebalance_lead: Dur(std::time::Duration::from_secs(300)),
            rebalance_probability: 0.5,
            retry: Dur(std::time::Duration::from_secs(30)),
            lifecycle_hook: true,
        }
    }
}

/// Where the simulated AWS is as unreliable as the real one: API calls
/// that are slow or answer AWS's throttling error, and EventBridge events
/// that come late (so out of order), twice, or not at all (AWS: "best
/// effort delivery ... in some rare cases an event might not be delivered";
/// a rule "can run more than once for a single event").
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Share of the controller's AWS calls (groups, activities, updates,
    /// tags, metrics, queue depth) answered with `Throttling: Rate
    /// exceeded`, the call not applied.
    pub api_error_rate: f64,
    /// Each of those calls takes this long.
    pub api_latency: Dur,
    /// Share of events never delivered.
    pub event_loss: f64,
    /// Share of events delivered twice (each copy with its own delay).
    pub event_duplicate: f64,
    /// Each delivered event comes after a random delay up to this.
    pub event_delay_max: Dur,
    /// The agents' side: the chance, each simulated second, that the next
    /// SQS receive and the next delete by any agent fail
    /// (`ServiceUnavailable`), and the chance that an agent's Auto Scaling
    /// call (protection, its own scale-in) is throttled.
    pub agent_error_rate: f64,
    /// The same for the agents' `ChangeMessageVisibility` calls
    /// (heartbeats, hand-backs). With it the sweep of `harsh.toml` found
    /// jobs run twice: a heartbeat failed twice in a row let the lease
    /// lapse (fixed: a failed heartbeat is tried again within seconds).
    pub visibility_error_rate: f64,
    /// The chance per InService instance-hour that its agent dies (its
    /// process gone, the instance still running and, if it was busy,
    /// still protected from scale-in): the controller must release such
    /// an instance's protection within 30 minutes, by its liveness mark.
    pub agent_death_per_hour: f64,
    /// The agents' protection and liveness-mark calls land this long
    /// after they are made (their other calls stay instant). A job starts
    /// before its instance's protection lands (a job already runs when the
    /// agent asks), so a scale-in in that window picks a busy instance: on
    /// AWS the termination lifecycle hook's drain is what saves the job.
    pub agent_api_latency: Dur,
}

impl Scenario {
    pub fn parse(text: &str, origin: &str) -> Result<Scenario, String> {
        let s: Scenario = toml::from_str(text)
            .map_err(|e| format!("{origin}: {}", e.to_string().trim_end().replace('\n', " ")))?;
        let bad = |key: &str, why: &str| Err(format!("{origin}: `{key}`: {why}"));
        if s.duration.0.is_zero() {
            return bad("duration", "must be greater than zero");
        }
        if s.jobs.arrivals.is_empty() {
            return bad("jobs.arrivals", "must list at least one arrival");
        }
        for (i, a) in s.jobs.arrivals.iter().enumerate() {
            if a.end.0 < a.start.0 {
                return bad(
                    &format!("jobs.arrivals[{i}].end"),
                    "must not be before start",
                );
            }
            if a.duration.0.is_zero() {
                return bad(
                    &format!("jobs.arrivals[{i}].duration"),
                    "must be greater than zero",
                );
            }
        }
        if s.fallback.is_some() && !s.fallbacks.is_empty() {
            return bad(
                "fallback",
                "give either `fallback` or `fallbacks`, not both",
            );
        }
        let mut groups = vec![("primary".to_string(), &s.primary)];
        groups.extend(s.fallback.iter().map(|r| ("fallback".to_string(), r)));
        groups.extend(
            s.fallbacks
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("fallbacks[{i}]"), r)),
        );
        for (key, r) in groups {
            if r.max < 0 || r.min < 0 || r.min > r.max || r.initial > r.max {
                return bad(&format!("{key}.max"), "needs 0 <= min <= initial <= max");
            }
            if !r.zones.is_empty() && (r.capacity != 0 || !r.capacity_changes.is_empty()) {
                return bad(
                    &format!("{key}.zones"),
                    "give the capacity per zone or for the region, not both",
                );
            }
            let mut names: Vec<&str> = r.zones.iter().map(|z| z.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            if names.len() != r.zones.len() {
                return bad(&format!("{key}.zones"), "zone names must differ");
            }
            for (i, z) in r.zones.iter().enumerate() {
                let at = format!("{key}.zones[{i}]");
                if z.types.is_empty() {
                    if z.capacity.is_none() {
                        return bad(&at, "give the zone a `capacity` or `types`");
                    }
                    continue;
                }
                if z.capacity.is_some() || !z.capacity_changes.is_empty() {
                    return bad(
                        &format!("{at}.types"),
                        "give the capacity per instance type or for the zone, not both",
                    );
                }
                if r.spot_requests_wait && z.types.len() > 1 {
                    return bad(
                        &format!("{at}.types"),
                        "a group whose spot requests wait has no mixed-instances policy: one instance type",
                    );
                }
                let mut types: Vec<&str> = z.types.iter().map(|t| t.name.as_str()).collect();
                types.sort_unstable();
                types.dedup();
                if types.len() != z.types.len() {
                    return bad(&format!("{at}.types"), "instance type names must differ");
                }
            }
        }
        for (key, p) in [
            ("faults.api_error_rate", s.faults.api_error_rate),
            ("faults.event_loss", s.faults.event_loss),
            ("faults.event_duplicate", s.faults.event_duplicate),
            ("faults.agent_error_rate", s.faults.agent_error_rate),
            (
                "faults.visibility_error_rate",
                s.faults.visibility_error_rate,
            ),
            ("faults.agent_death_per_hour", s.faults.agent_death_per_hour),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(key, "must be between 0 and 1");
            }
        }
        if !(0.0..=1.0).contains(&s.launch.rebalance_probability) {
            return bad("launch.rebalance_probability", "must be between 0 and 1");
        }
        if !s.jobs.transfer_gb.is_finite() || s.jobs.transfer_gb < 0.0 {
            return bad("jobs.transfer_gb", "must be 0 or more");
        }
        if s.agent.concurrency == 0 {
            return bad("agent.concurrency", "must be at least 1");
        }
        if !s.controller.target.is_finite() || s.controller.target <= 0.0 {
            return bad("controller.target", "must be a positive number");
        }
        Ok(s)
    }

    /// The fallback groups in cascade order (`fallback`, or `fallbacks`).
    pub fn cascade(&self) -> Vec<&Region> {
        self.fallback.iter().chain(&self.fallbacks).collect()
    }

    pub fn load(path: &std::path::Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Scenario::parse(&text, &path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPED: &str = r#"
name = "typed"
duration = "1h"
[primary]
region = "us-east-1"
max = 10
spot_price = 0.25
zones = [
  { name = "a", types = [{ name = "g4dn.xlarge", capacity = 0, capacity_changes = [{ at = "30m", capacity = 5 }] }, { name = "g5.xlarge", capacity = 4 }] },
  { name = "b", capacity = 3 },
]
[jobs]
arrivals = [{ start = "0s", end = "30m", count = 10, duration = "2m" }]
[controller]
target = 2.0
"#;

    #[test]
    fn zones_hold_one_pool_per_instance_type_in_order() {
        let s = Scenario::parse(TYPED, "t.toml").expect("valid");
        let pools: Vec<(String, String, i32, usize)> = s
            .primary
            .pools()
            .into_iter()
            .map(|p| {
                (
                    p.zone,
                    p.instance_type,
                    p.capacity,
                    p.capacity_changes.len(),
                )
            })
            .collect();
        assert_eq!(
            pools,
            [
                ("a".into(), "g4dn.xlarge".into(), 0, 1),
                ("a".into(), "g5.xlarge".into(), 4, 0),
                ("b".into(), String::new(), 3, 0),
            ]
        );
    }

    #[test]
    fn a_zone_with_types_refuses_a_capacity_of_its_own_a_waiting_group_more_types_and_twins() {
        let cases = [
            (
                TYPED.replace(
                    r#"{ name = "a", types"#,
                    r#"{ name = "a", capacity = 2, types"#,
                ),
                "`primary.zones[0].types`: give the capacity per instance type or for the zone",
            ),
            (
                TYPED.replace(
                    "spot_price = 0.25",
                    "spot_price = 0.25\nspot_requests_wait = true",
                ),
                "`primary.zones[0].types`: a group whose spot requests wait",
            ),
            (
                TYPED.replace(r#"name = "g5.xlarge""#, r#"name = "g4dn.xlarge""#),
                "`primary.zones[0].types`: instance type names must differ",
            ),
            (
                TYPED.replace(r#"{ name = "b", capacity = 3 }"#, r#"{ name = "b" }"#),
                "`primary.zones[1]`: give the zone a `capacity` or `types`",
            ),
        ];
        for (text, want) in cases {
            let e = Scenario::parse(&text, "t.toml").unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
