//! The controller's configuration: a TOML file, or environment variables
//! (`SPOTGUARD_<SECTION>_<KEY>`, for Lambda). Validated at start; every
//! error names its key.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use spotguard_common::config::{invalid, Invalid, Validate};
pub use spotguard_common::config::{ConfigError, Dur};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub primary: Primary,
    /// The two-region form (`[fallback]`, `SPOTGUARD_FALLBACK_*`): read as
    /// a one-entry `fallbacks`, so configurations written before the
    /// cascade keep working unchanged. Empty after [`Config::parse`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// The cascade, in the order its groups open (`[[fallbacks]]`,
    /// `SPOTGUARD_FALLBACKS` as a TOML array of inline tables). When the
    /// primary is short for capacity the first opens; when that one is
    /// short too, the next; they close in reverse.
    #[serde(default)]
    pub fallbacks: Vec<Fallback>,
    #[serde(default)]
    pub failover: Failover,
    #[serde(default)]
    pub metric: Metric,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub notify: Notify,
    #[serde(default)]
    pub run: Run,
    #[serde(default)]
    pub cron: Cron,
    #[serde(default)]
    pub lease: Lease,
}

/// One controller at a time ([`crate::lease`]): the SQS FIFO queue whose
/// token is the lease. Without it, nothing keeps two controllers (two `run`
/// replicas, `once` beside the Lambda, overlapping invocations) from both
/// acting on the same memory; the controller says so at start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub queue_url: Option<String>,
    /// The token's visibility timeout: how long a holder that died keeps
    /// the others out, and the most a holder may work (less
    /// [`crate::lease::MARGIN`]). 60 s: twice the template's Lambda
    /// `Timeout` (30 s), so an invocation always ends inside its lease, and
    /// a killed one costs at most the next one-minute tick.
    #[serde(default = "d_hold")]
    pub hold: Dur,
}

impl Default for Lease {
    fn default() -> Self {
        Lease {
            queue_url: None,
            hold: d_hold(),
        }
    }
}

fn d_hold() -> Dur {
    Dur(Duration::from_secs(60))
}

/// Periodic tasks: Elastic Beanstalk's `cron.yaml`, from a file or (for
/// the Lambda, `SPOTGUARD_CRON_YAML`) its text.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cron {
    pub file: Option<String>,
    pub yaml: Option<String>,
    /// The tasks, read when the configuration is validated.
    #[serde(skip)]
    pub tasks: Vec<crate::cron::Task>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Primary {
    #[serde(default = "d_primary_region")]
    pub region: String,
    pub asg: String,
    pub queue_url: String,
}

fn d_primary_region() -> String {
    "us-east-1".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    #[serde(default = "d_fallback_region")]
    pub region: String,
    pub asg: String,
    /// MaxSize given to the fallback group on failover.
    #[serde(default = "d_max_size")]
    pub max_size: i32,
    /// Name of the fallback group's target-tracking policy (enabled on failover).
    #[serde(default = "d_policy_name")]
    pub policy_name: String,
    /// Acceptable backlog per instance of this group (its policy's target);
    /// absent: `policy.fallback_target`. An on-demand group may take more
    /// per instance than a spot one, to keep its bill down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
}

impl Fallback {
    /// This group's policy target.
    pub fn target_or(&self, policy: &Policy) -> f64 {
        self.target.unwrap_or(policy.fallback_target)
    }
}

fn d_fallback_region() -> String {
    "us-east-2".into()
}
fn d_max_size() -> i32 {
    10
}
fn d_policy_name() -> String {
    "spotguard-backlog".into()
}

/// The capacity shortage codes of REFERENCE.md, matched exactly. Not
/// listed, on purpose: `Unsupported` (the type is not offered in that zone:
/// permanent, a configuration error) and `SpotMaxPriceTooLow` (a price
/// setting). Another region would fix neither, and with them one bad subnet
/// kept the fleet failed over for ever.
pub const CAPACITY_CODES: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "UnfulfillableCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
];

/// Quota errors: per region, so another region can help, but a policy
/// choice rather than a shortage (`failover.on_quota`).
pub const QUOTA_CODES: &[&str] = &["MaxSpotInstanceCountExceeded", "VcpuLimitExceeded"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failover {
    #[serde(default = "d_codes")]
    pub capacity_codes: Vec<String>,
    /// Fail over on the regional quota errors too ([`QUOTA_CODES`]). On by
    /// default: the primary's quota is full, the fallback region's is not,
    /// and the work keeps flowing; off keeps the fleet in one region and
    /// leaves the quota to be raised.
    #[serde(default = "d_true")]
    pub on_quota: bool,
    /// Capacity failures within `failure_window` that trigger failover.
    #[serde(default = "d_failures")]
    pub failures: u32,
    #[serde(default = "d_window")]
    pub failure_window: Dur,
    /// A capacity failure marks the primary unavailable for this long
    /// (3 min, as the best-known spot scheduler, Karpenter, does).
    #[serde(default = "d_ttl")]
    pub capacity_ttl: Dur,
    /// Fail back once the primary has held its desired capacity (InService
    /// plus pending, while the controller asks it to take the fallback's
    /// work) this long, whatever per-zone capacity failures it logs. The
    /// old name `cooldown` is read as this.
    #[serde(default = "d_recovery_for", alias = "cooldown")]
    pub recovery_for: Dur,
    /// Least time in `failed-over` before failing back, and in `failing-back`
    /// before `normal`, so the modes cannot flap.
    #[serde(default = "d_dwell")]
    pub min_dwell: Dur,
    /// How much the fallback MaxSize is lowered per reconcile while failing back.
    #[serde(default = "d_step")]
    pub failback_step: i32,
    /// Fail over only once the primary has also been short of its desired
    /// capacity (desired > InService + pending) this long. A mixed-instances
    /// group retries other pools within seconds, so one failed launch is
    /// routine; 2 minutes is two of the controller's one-minute ticks, and
    /// less than target tracking's own 3-minute scale-out delay.
    #[serde(default = "d_shortage_for")]
    pub shortage_for: Dur,
    /// A spot request waiting in `PendingSpotBidPlacement` or
    /// `WaitingForSpotInstanceId` this long counts as a capacity failure
    /// (groups without a mixed-instances policy show a shortage that way);
    /// 3 minutes, Karpenter's unavailable-offering TTL.
    #[serde(default = "d_spot_wait")]
    pub spot_wait: Dur,
    /// Failing back, fallback instances still busy (protected) this long
    /// after their intake closed have their protection released, with an
    /// alarm (their agents may be dead): set it above your longest job. A
    /// live agent takes no new job once intake is closed.
    #[serde(default = "d_max_busy_age")]
    pub max_busy_age: Dur,
    /// A protected instance whose agent's liveness mark (the instance tag
    /// `spotguard:alive`, refreshed every 10 minutes while it is busy) is
    /// older than this has its protection released, with an alarm: its
    /// agent is dead. 25 minutes is two missed refreshes and a tick, so a
    /// dead agent's instance is released within 30 minutes of its death
    /// and a live one survives one lost refresh. `0s`: never.
    #[serde(default = "d_dead_after")]
    pub dead_after: Dur,
}

impl Default for Failover {
    fn default() -> Self {
        Failover {
            capacity_codes: d_codes(),
            on_quota: true,
            failures: d_failures(),
            failure_window: d_window(),
            capacity_ttl: d_ttl(),
            recovery_for: d_recovery_for(),
            min_dwell: d_dwell(),
            failback_step: d_step(),
            shortage_for: d_shortage_for(),
            spot_wait: d_spot_wait(),
            max_busy_age: d_max_busy_age(),
            dead_after: d_dead_after(),
        }
    }
}

fn d_codes() -> Vec<String> {
    CAPACITY_CODES.iter().map(|s| s.to_string()).collect()
}
fn d_true() -> bool {
    true
}
fn d_failures() -> u32 {
    1
}
fn d_window() -> Dur {
    Dur(Duration::from_secs(600))
}
fn d_ttl() -> Dur {
    Dur(Duration::from_secs(180))
}
fn d_recovery_for() -> Dur {
    Dur(Duration::from_secs(600))
}
fn d_dwell() -> Dur {
    Dur(Duration::from_secs(300))
}
fn d_step() -> i32 {
    1
}
fn d_shortage_for() -> Dur {
    Dur(Duration::from_secs(120))
}
fn d_spot_wait() -> Dur {
    Dur(Duration::from_secs(180))
}
fn d_max_busy_age() -> Dur {
    Dur(Duration::from_secs(24 * 3600))
}
fn d_dead_after() -> Dur {
    Dur(Duration::from_secs(25 * 60))
}

/// How often a busy agent refreshes its liveness mark (the agent's
/// `PROTECTION_REFRESH`): `failover.dead_after` must cover two of them.
pub const MARK_REFRESH: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metric {
    #[serde(default = "d_namespace")]
    pub namespace: String,
    /// Backlog per instance of the primary group.
    #[serde(default = "d_primary_metric")]
    pub primary_name: String,
    /// Backlog per InService instance of the fallback group (its own data
    /// point, in its own region).
    #[serde(default = "d_fallback_metric")]
    pub fallback_name: String,
    /// Count in-flight messages in the backlog too.
    #[serde(default)]
    pub include_in_flight: bool,
}

impl Default for Metric {
    fn default() -> Self {
        Metric {
            namespace: d_namespace(),
            primary_name: d_primary_metric(),
            fallback_name: d_fallback_metric(),
            include_in_flight: false,
        }
    }
}

fn d_namespace() -> String {
    "spotguard".into()
}
fn d_primary_metric() -> String {
    "BacklogPerInstance".into()
}
fn d_fallback_metric() -> String {
    "BacklogPerInstance".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyForm {
    /// The metric this controller publishes.
    CustomMetric,
    /// Metric math over AWS/SQS and AWS/AutoScaling: needs no publisher.
    MetricMath,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default = "d_form")]
    pub form: PolicyForm,
    /// Acceptable backlog per instance of the primary group (REFERENCE.md:
    /// acceptable latency / seconds per message).
    #[serde(default = "d_primary_target")]
    pub primary_target: f64,
    /// Acceptable backlog per instance of the fallback group: the same as
    /// the primary's by default (the original design tracked total visible
    /// messages with target 200, which AWS's guide says does not work: it
    /// does not fall as instances are added).
    #[serde(default = "d_fallback_target")]
    pub fallback_target: f64,
    #[serde(default = "d_primary_policy")]
    pub primary_policy_name: String,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            form: d_form(),
            primary_target: d_primary_target(),
            fallback_target: d_fallback_target(),
            primary_policy_name: d_primary_policy(),
        }
    }
}

fn d_form() -> PolicyForm {
    PolicyForm::CustomMetric
}
fn d_primary_target() -> f64 {
    20.0
}
fn d_fallback_target() -> f64 {
    20.0
}
fn d_primary_policy() -> String {
    "spotguard-backlog".into()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    pub sns_topic_arn: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// Interval of `run`: metrics are published every minute (target
    /// tracking evaluates one-minute periods).
    #[serde(default = "d_interval")]
    pub interval: Dur,
    /// Queue that EventBridge rules feed with launch events (optional).
    pub events_queue_url: Option<String>,
}

impl Default for Run {
    fn default() -> Self {
        Run {
            interval: d_interval(),
            events_queue_url: None,
        }
    }
}

fn d_interval() -> Dur {
    Dur(Duration::from_secs(60))
}

const SECTIONS: &[&str] = &[
    "primary", "fallback", "failover", "metric", "policy", "notify", "run", "cron", "lease",
];

impl Config {
    /// The queue's region: from its URL, else the primary's (the queue
    /// lives where the control plane is; a local URL names no region).
    pub fn queue_region(&self) -> String {
        spotguard_common::region::queue_url_region(&self.primary.queue_url)
            .unwrap_or_else(|| self.primary.region.clone())
    }

    /// Every group as (region, name): the primary, then the fallbacks in
    /// cascade order.
    pub fn groups(&self) -> impl Iterator<Item = (&str, &str)> {
        std::iter::once((self.primary.region.as_str(), self.primary.asg.as_str())).chain(
            self.fallbacks
                .iter()
                .map(|f| (f.region.as_str(), f.asg.as_str())),
        )
    }

    /// The codes that count toward a failover: the capacity codes, and the
    /// quota codes when `failover.on_quota`.
    pub fn failover_codes(&self) -> Vec<String> {
        let mut codes = self.failover.capacity_codes.clone();
        if self.failover.on_quota {
            codes.extend(QUOTA_CODES.iter().map(|s| s.to_string()));
        }
        codes
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        spotguard_common::config::load(path)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        spotguard_common::config::parse(text, origin)
    }

    /// From `SPOTGUARD_<SECTION>_<KEY>` variables, e.g. `SPOTGUARD_PRIMARY_ASG`,
    /// `SPOTGUARD_FAILOVER_COOLDOWN=15m`, `SPOTGUARD_FAILOVER_CAPACITY_CODES=["A","B"]`.
    /// A value that parses as a TOML value (number, boolean, array) is taken as
    /// such, anything else as a string.
    pub fn from_env(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut root = toml::Table::new();
        for (k, v) in vars {
            let Some(rest) = k.strip_prefix("SPOTGUARD_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            if rest == "fallbacks" {
                // The cascade: a TOML array of inline tables.
                let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
                    .ok()
                    .and_then(|mut t| t.remove("v"))
                    .filter(toml::Value::is_array)
                    .ok_or_else(|| ConfigError::Invalid {
                        origin: "environment".into(),
                        key: k.clone(),
                        message: "expected a TOML array of inline tables, e.g. [{ region = \"us-west-2\", asg = \"gpu-west-2\" }]".into(),
                    })?;
                root.insert("fallbacks".into(), value);
                continue;
            }
            let Some((section, key)) = rest.split_once('_') else {
                continue;
            };
            if !SECTIONS.contains(&section) {
                return Err(ConfigError::Invalid {
                    origin: "environment".into(),
                    key: k.clone(),
                    message: format!(
                        "unknown section `{section}` (expected one of {})",
                        SECTIONS.join(", ")
                    ),
                });
            }
            let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(v.clone()));
            let table = root
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = table {
                t.insert(key.to_string(), value);
            }
        }
        let text = toml::to_string(&root).map_err(|e| ConfigError::Parse {
            origin: "environment".into(),
            message: e.to_string(),
        })?;
        Config::parse(&text, "environment (SPOTGUARD_*)")
    }
}

/// Lambda's limit on a function's environment variables, all together
/// (Lambda quotas: "Environment variables: 4 KB, for all environment
/// variables associated with the function, in aggregate").
pub const LAMBDA_ENV_LIMIT: usize = 4096;

impl Config {
    /// The variables the control template gives the Lambda for this
    /// configuration (`packaging/cloudformation/spotguard-control.yaml`):
    /// the primary, the fallbacks, the topic, the lease queue and the
    /// `cron.yaml` text.
    pub fn lambda_environment(&self) -> Result<std::collections::BTreeMap<String, String>, String> {
        let mut env = std::collections::BTreeMap::new();
        let mut put = |k: &str, v: String| {
            env.insert(format!("SPOTGUARD_{k}"), v);
        };
        put("PRIMARY_REGION", self.primary.region.clone());
        put("PRIMARY_ASG", self.primary.asg.clone());
        put("PRIMARY_QUEUE_URL", self.primary.queue_url.clone());
        let fallbacks: Vec<String> = self
            .fallbacks
            .iter()
            .map(|f| {
                format!(
                    "{{ region = {:?}, asg = {:?}, max_size = {} }}",
                    f.region, f.asg, f.max_size
                )
            })
            .collect();
        put("FALLBACKS", format!("[{}]", fallbacks.join(", ")));
        if let Some(t) = &self.notify.sns_topic_arn {
            put("NOTIFY_SNS_TOPIC_ARN", t.clone());
        }
        if let Some(u) = &self.lease.queue_url {
            put("LEASE_QUEUE_URL", u.clone());
        }
        let cron = match (&self.cron.yaml, &self.cron.file) {
            (Some(text), _) => Some(text.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?,
            ),
            (None, None) => None,
        };
        if let Some(text) = cron {
            put("CRON_YAML", text);
        }
        Ok(env)
    }

    /// Whether the Lambda's environment fits Lambda's 4 KB: its size,
    /// counted as the variables' JSON (names, values and punctuation: the
    /// strictest reading), or a one-line error with the size and what to
    /// cut, so that it is refused here rather than at deploy.
    pub fn check_lambda_environment(&self) -> Result<usize, String> {
        let env = self.lambda_environment()?;
        let size = serde_json::to_string(&env).map_or(usize::MAX, |s| s.len());
        if size > LAMBDA_ENV_LIMIT {
            let cron = env.get("SPOTGUARD_CRON_YAML").map_or(0, String::len);
            return Err(format!(
                "the Lambda's environment would be {size} bytes, over Lambda's {LAMBDA_ENV_LIMIT} (cron.yaml is {cron} of them): shorten cron.yaml or the cascade, or run the controller as a container (`run`), which has no such limit"
            ));
        }
        Ok(size)
    }
}

impl Validate for Config {
    /// The fallback given as `[fallback]` becomes the one entry of
    /// `fallbacks`; errors name its keys as written.
    fn validate(mut self) -> Result<Self, Invalid> {
        let single = self.fallback.is_some();
        if let Some(f) = self.fallback.take() {
            if !self.fallbacks.is_empty() {
                return invalid(
                    "fallback",
                    "give either `fallback` (one group) or `fallbacks` (the cascade), not both",
                );
            }
            self.fallbacks.push(f);
        }
        let bad = |key: &str, message: String| invalid(key, message);
        for (key, v) in [
            ("primary.region", &self.primary.region),
            ("primary.asg", &self.primary.asg),
        ] {
            if v.trim().is_empty() {
                return bad(key, "must not be empty".into());
            }
        }
        if self.fallbacks.is_empty() {
            return bad(
                "fallbacks",
                "give at least one fallback group (`[fallback]` or `[[fallbacks]]`)".into(),
            );
        }
        let mut seen = vec![(&self.primary.region, &self.primary.asg)];
        for (i, f) in self.fallbacks.iter().enumerate() {
            let key = |field: &str| {
                if single {
                    format!("fallback.{field}")
                } else {
                    format!("fallbacks[{i}].{field}")
                }
            };
            for (field, v) in [("region", &f.region), ("asg", &f.asg)] {
                if v.trim().is_empty() {
                    return bad(&key(field), "must not be empty".into());
                }
            }
            if seen.contains(&(&f.region, &f.asg)) {
                return bad(
                    &key("asg"),
                    format!(
                        "group {} in {} is already in the cascade (each group once)",
                        f.asg, f.region
                    ),
                );
            }
            seen.push((&f.region, &f.asg));
            if !(1..=10_000).contains(&f.max_size) {
                return bad(&key("max_size"), "must be within 1..=10000".into());
            }
            if f.target.is_some_and(|t| !(t.is_finite() && t > 0.0)) {
                return bad(&key("target"), "must be a positive number".into());
            }
        }
        if !(self.primary.queue_url.starts_with("https://")
            || self.primary.queue_url.starts_with("http://"))
        {
            return bad(
                "primary.queue_url",
                format!("{:?} is not an SQS queue URL", self.primary.queue_url),
            );
        }
        if self.failover.capacity_codes.is_empty() {
            return bad(
                "failover.capacity_codes",
                "must list at least one code".into(),
            );
        }
        if self.failover.failures == 0 {
            return bad("failover.failures", "must be at least 1".into());
        }
        // The memory keeps the last 10 failures (a tag holds 256
        // characters): a threshold above that could never be reached.
        if self.failover.failures as usize > crate::reconcile::MAX_FAILURES {
            return bad(
                "failover.failures",
                format!(
                    "must be at most {} (the failures the controller remembers)",
                    crate::reconcile::MAX_FAILURES
                ),
            );
        }
        let dead = self.failover.dead_after.0;
        if !dead.is_zero() && dead <= 2 * MARK_REFRESH {
            return bad(
                "failover.dead_after",
                "must exceed 20m (two of the agents' 10-minute liveness refreshes), or be 0s (never)".into(),
            );
        }
        if self.failover.failback_step < 1 {
            return bad("failover.failback_step", "must be at least 1".into());
        }
        for (key, d) in [
            ("failover.failure_window", self.failover.failure_window),
            ("failover.capacity_ttl", self.failover.capacity_ttl),
            ("failover.spot_wait", self.failover.spot_wait),
            ("failover.max_busy_age", self.failover.max_busy_age),
            ("run.interval", self.run.interval),
        ] {
            if d.0.is_zero() {
                return bad(key, "must be greater than zero".into());
            }
        }
        for (key, t) in [
            ("policy.primary_target", self.policy.primary_target),
            ("policy.fallback_target", self.policy.fallback_target),
        ] {
            if !(t.is_finite() && t > 0.0) {
                return bad(key, "must be a positive number".into());
            }
        }
        if self
            .notify
            .sns_topic_arn
            .as_deref()
            .is_some_and(|a| !a.starts_with("arn:"))
        {
            return bad("notify.sns_topic_arn", "must be an SNS topic ARN".into());
        }
        if let Some(url) = &self.lease.queue_url {
            // A standard queue may return a message twice, and has no
            // message groups: two holders at once.
            if !(url.starts_with("https://") || url.starts_with("http://"))
                || !url.ends_with(".fifo")
            {
                return bad(
                    "lease.queue_url",
                    format!("{url:?} is not an SQS FIFO queue URL (ending in .fifo)"),
                );
            }
        }
        // SQS takes a visibility timeout of 0 s to 12 h; under MARGIN
        // plus one call's bound no tick could run inside it.
        if !(20..=43_200).contains(&self.lease.hold.0.as_secs())
            || self.lease.hold.0.subsec_nanos() != 0
        {
            return bad(
                "lease.hold",
                "must be whole seconds within 20s..=12h (SQS's visibility timeout)".into(),
            );
        }
        self.cron.tasks = match (&self.cron.file, &self.cron.yaml) {
            (Some(_), Some(_)) => {
                return bad("cron.file", "give either `file` or `yaml`, not both".into())
            }
            (Some(path), None) => {
                let text = std::fs::read_to_string(path).map_err(|e| Invalid {
                    key: "cron.file".into(),
                    message: format!("cannot read {path}: {e}"),
                })?;
                crate::cron::parse(&text).map_err(|m| Invalid {
                    key: "cron.file".into(),
                    message: format!("{path}: {m}"),
                })?
            }
            (None, Some(text)) => crate::cron::parse(text).map_err(|m| Invalid {
                key: "cron.yaml".into(),
                message: m,
            })?,
            (None, None) => Vec::new(),
        };
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[primary]
asg = "gpu-east-1"
queue_url = "https://sqs.us-east-1.amazonaws.com/1/jobs"
[fallback]
asg = "gpu-east-2"
"#;

    #[test]
    fn defaults() {
        let c = Config::parse(MIN, "t").unwrap();
        assert_eq!(c.primary.region, "us-east-1");
        assert_eq!(c.fallbacks.len(), 1);
        assert_eq!(c.fallbacks[0].region, "us-east-2");
        assert!(c.fallback.is_none());
        assert_eq!(c.failover.failures, 1);
        assert_eq!(c.failover.capacity_ttl.0, Duration::from_secs(180));
        assert_eq!(c.failover.recovery_for.0, Duration::from_secs(600));
        assert_eq!(c.policy.primary_target, 20.0);
        assert_eq!(c.policy.fallback_target, 20.0);
        assert_eq!(c.metric.fallback_name, "BacklogPerInstance");
        assert_eq!(c.failover.capacity_codes.len(), 5);
        assert!(c.failover.on_quota);
        assert!(c.failover_codes().iter().any(|x| x == "VcpuLimitExceeded"));
    }

    #[test]
    fn environment_form() {
        let vars = [
            ("SPOTGUARD_PRIMARY_ASG", "a"),
            (
                "SPOTGUARD_PRIMARY_QUEUE_URL",
                "https://sqs.us-east-1.amazonaws.com/1/jobs",
            ),
            ("SPOTGUARD_FALLBACK_ASG", "b"),
            ("SPOTGUARD_FAILOVER_COOLDOWN", "15m"),
            ("SPOTGUARD_FAILOVER_FAILURES", "3"),
            (
                "SPOTGUARD_FAILOVER_CAPACITY_CODES",
                r#"["InsufficientInstanceCapacity"]"#,
            ),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let c = Config::from_env(vars).unwrap();
        assert_eq!(c.primary.asg, "a");
        assert_eq!(c.failover.recovery_for.0, Duration::from_secs(900));
        assert_eq!(c.failover.failures, 3);
        assert_eq!(
            c.failover.capacity_codes,
            vec!["InsufficientInstanceCapacity"]
        );
        let e =
            Config::from_env([("SPOTGUARD_PRIMARY_ASG".to_string(), "a".to_string())]).unwrap_err();
        assert!(
            e.to_string().contains("queue_url") || e.to_string().contains("fallback"),
            "{e}"
        );
        let e = Config::from_env([("SPOTGUARD_BOGUS_X".to_string(), "1".to_string())]).unwrap_err();
        assert!(e.to_string().contains("SPOTGUARD_BOGUS_X"), "{e}");
    }

    const CASCADE: &str = r#"
[primary]
asg = "gpu-east-1"
queue_url = "https://sqs.us-east-1.amazonaws.com/1/jobs"
[[fallbacks]]
region = "us-east-1"
asg = "gpu-east-1-on-demand"
max_size = 4
target = 40.0
[[fallbacks]]
region = "us-west-2"
asg = "gpu-west-2"
"#;

    #[test]
    fn the_cascade_in_order_with_its_own_caps_and_targets() {
        let c = Config::parse(CASCADE, "t").unwrap();
        let names: Vec<_> = c.fallbacks.iter().map(|f| f.asg.as_str()).collect();
        assert_eq!(names, ["gpu-east-1-on-demand", "gpu-west-2"]);
        assert_eq!(c.fallbacks[0].max_size, 4);
        assert_eq!(c.fallbacks[0].target_or(&c.policy), 40.0);
        assert_eq!(c.fallbacks[1].max_size, 10);
        assert_eq!(c.fallbacks[1].target_or(&c.policy), 20.0);
    }

    #[test]
    fn cascade_errors_name_the_entry() {
        for (text, key) in [
            (format!("{CASCADE}[fallback]\nasg = \"x\"\n"), "fallback"),
            (
                CASCADE
                    .replace("gpu-west-2", "gpu-east-1-on-demand")
                    .replace("us-west-2", "us-east-1"),
                "fallbacks[1].asg",
            ),
            (
                CASCADE.replace("gpu-east-1-on-demand", "gpu-east-1"),
                "fallbacks[0].asg",
            ),
            (
                CASCADE.replace("max_size = 4", "max_size = 0"),
                "fallbacks[0].max_size",
            ),
            (
                CASCADE.replace("target = 40.0", "target = -1.0"),
                "fallbacks[0].target",
            ),
            (
                MIN.replace("[fallback]\nasg = \"gpu-east-2\"", ""),
                "fallbacks",
            ),
            (format!("{MIN}max_size = 0\n"), "fallback.max_size"),
        ] {
            let e = Config::parse(&text, "c.toml").unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{key} -> {e}");
        }
    }

    fn vars_base() -> Vec<(String, String)> {
        [
            ("SPOTGUARD_PRIMARY_ASG", "a"),
            (
                "SPOTGUARD_PRIMARY_QUEUE_URL",
                "https://sqs.us-east-1.amazonaws.com/1/jobs",
            ),
            ("SPOTGUARD_FALLBACK_ASG", "b"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec()
    }

    #[test]
    fn the_cascade_from_the_environment() {
        let vars = [
            ("SPOTGUARD_PRIMARY_ASG", "a"),
            (
                "SPOTGUARD_PRIMARY_QUEUE_URL",
                "https://sqs.us-east-1.amazonaws.com/1/jobs",
            ),
            (
                "SPOTGUARD_FALLBACKS",
                r#"[{ region = "us-east-2", asg = "b" }, { region = "us-west-2", asg = "c", max_size = 3 }]"#,
            ),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let c = Config::from_env(vars).unwrap();
        assert_eq!(c.fallbacks.len(), 2);
        assert_eq!(c.fallbacks[1].region, "us-west-2");
        assert_eq!(c.fallbacks[1].max_size, 3);
        let mut with_cron = vars_base();
        with_cron.push((
            "SPOTGUARD_CRON_YAML".to_string(),
            "version: 1\ncron:\n - name: r\n   url: /r\n   schedule: \"*/5 * * * *\"\n".to_string(),
        ));
        assert_eq!(Config::from_env(with_cron).unwrap().cron.tasks.len(), 1);
        let e =
            Config::from_env([("SPOTGUARD_FALLBACKS".to_string(), "b".to_string())]).unwrap_err();
        assert!(e.to_string().contains("SPOTGUARD_FALLBACKS"), "{e}");
    }

    #[test]
    fn cron_yaml_inline_or_from_a_file_errors_naming_the_entry() {
        let c = Config::parse(
            &format!("{MIN}[cron]\nyaml = \"version: 1\\ncron:\\n - name: r\\n   url: /r\\n   schedule: '0 3 * * *'\\n\"\n"),
            "t",
        )
        .unwrap();
        assert_eq!(c.cron.tasks.len(), 1);
        assert_eq!(c.cron.tasks[0].path, "/r");
        let dir = std::env::temp_dir().join(format!("sg-cron-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("cron.yaml");
        std::fs::write(
            &f,
            "version: 1\ncron:\n - name: r\n   url: /r\n   schedule: '0 3 * * X'\n",
        )
        .unwrap();
        let e = Config::parse(
            &format!("{MIN}[cron]\nfile = {:?}\n", f.display().to_string()),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`cron.file`") && e.contains("cron[0] (\"r\"): `schedule`"),
            "{e}"
        );
        let e = Config::parse(
            &format!("{MIN}[cron]\nfile = \"/nonexistent/cron.yaml\"\n"),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot read /nonexistent/cron.yaml"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_lambda_environment_over_4_kb_is_refused_with_its_size() {
        let c = Config::parse(MIN, "t").unwrap();
        let size = c.check_lambda_environment().unwrap();
        assert!(size > 100 && size < 400, "{size}");
        // Twenty tasks with long paths: a cron.yaml Lambda cannot carry.
        let mut yaml = String::from("version: 1\ncron:\n");
        for i in 0..20 {
            yaml.push_str(&format!(
                " - name: nightly-report-of-the-gpu-fleet-{i:02}\n   url: /tasks/reports/nightly/gpu-fleet/{i:02}/{}\n   schedule: \"0 3 * * *\"\n",
                "x".repeat(80)
            ));
        }
        let c = Config::parse(
            &format!(
                "{MIN}[cron]\nyaml = {}\n",
                toml::Value::String(yaml.clone())
            ),
            "t",
        )
        .unwrap();
        assert_eq!(c.cron.tasks.len(), 20);
        let e = c.check_lambda_environment().unwrap_err();
        assert!(
            e.contains("over Lambda's 4096")
                && e.contains(&format!("cron.yaml is {} of them", yaml.len())),
            "{e}"
        );
        // The size counts what Lambda would hold: the same text from a
        // file counts the same.
        let dir = std::env::temp_dir().join(format!("sg-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("cron.yaml");
        std::fs::write(&f, &yaml).unwrap();
        let c = Config::parse(
            &format!("{MIN}[cron]\nfile = {:?}\n", f.display().to_string()),
            "t",
        )
        .unwrap();
        assert_eq!(c.check_lambda_environment().unwrap_err(), e);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_lease_queue_is_fifo_and_its_hold_within_sqs_bounds() {
        let fifo = "https://sqs.us-east-1.amazonaws.com/1/spotguard-lease.fifo";
        let c = Config::from_env([
            ("SPOTGUARD_PRIMARY_ASG".to_string(), "a".to_string()),
            (
                "SPOTGUARD_PRIMARY_QUEUE_URL".into(),
                "https://sqs.us-east-1.amazonaws.com/1/jobs".into(),
            ),
            ("SPOTGUARD_FALLBACK_ASG".into(), "b".into()),
            ("SPOTGUARD_LEASE_QUEUE_URL".into(), fifo.into()),
        ])
        .unwrap();
        assert_eq!(c.lease.queue_url.as_deref(), Some(fifo));
        assert_eq!(c.lease.hold.0, Duration::from_secs(60));
        assert!(Config::parse(MIN, "t").unwrap().lease.queue_url.is_none());
        for (extra, wants) in [
            (
                "[lease]\nqueue_url = \"https://sqs.us-east-1.amazonaws.com/1/lease\"\n",
                "`lease.queue_url`",
            ),
            ("[lease]\nhold = \"10s\"\n", "`lease.hold`"),
            ("[lease]\nhold = \"13h\"\n", "`lease.hold`"),
        ] {
            let e = Config::parse(&format!("{MIN}{extra}"), "c.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(wants), "{extra}: {e}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        for (extra, key) in [
            ("[failover]\nfailures = 11\n", "at most 10"),
            ("[failover]\ncooldown = \"later\"\n", "cooldown"),
            ("[failover]\nfailures = 0\n", "failover.failures"),
            (
                "[failover]\ncapacity_codes = []\n",
                "failover.capacity_codes",
            ),
            ("[policy]\nprimary_target = -1.0\n", "policy.primary_target"),
            ("[policy]\nform = \"magic\"\n", "form"),
            ("[notify]\nsns_topic_arn = \"x\"\n", "notify.sns_topic_arn"),
            ("[run]\nintervall = \"1m\"\n", "intervall"),
        ] {
            let e = Config::parse(&format!("{MIN}{extra}"), "c.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{extra:?} -> {e}");
        }
        let e = Config::parse("[primary]\nasg = \"a\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("queue_url") || e.contains("fallback"), "{e}");
    }
}
