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
    /// Spot instances the region's pools can hold at the start.
    pub capacity: i32,
    /// Changes of that capacity over time.
    #[serde(default)]
    pub capacity_changes: Vec<CapacityChange>,
    /// Spot interruptions per instance-hour (0.1 = 10 % of instances an hour).
    #[serde(default)]
    pub interruptions_per_hour: f64,
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
}

impl Default for Controller {
    fn default() -> Self {
        Controller {
            target: 5.0,
            cooldown: Dur(std::time::Duration::from_secs(600)),
            min_dwell: Dur(std::time::Duration::from_secs(300)),
            shortage_for: Dur(std::time::Duration::from_secs(120)),
        }
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
    /// A group short of instances tries to launch this often.
    pub retry: Dur,
}

impl Default for Launch {
    fn default() -> Self {
        Launch {
            delay: Dur(std::time::Duration::from_secs(60)),
            boot: Dur(std::time::Duration::from_secs(60)),
            rebalance_lead: Dur(std::time::Duration::from_secs(300)),
            retry: Dur(std::time::Duration::from_secs(30)),
        }
    }
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
