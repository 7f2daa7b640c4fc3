//! The agent's configuration file (`/etc/spotguard/agent.toml`).
//!
//! Every key is documented in the README with its default. Unknown keys are
//! errors (a typo must not silently fall back to a default), and every error
//! names the key it is about.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use spotguard_common::config::{invalid, Invalid, Validate};
pub use spotguard_common::config::{ConfigError, Dur};

use crate::imds::DEFAULT_ENDPOINT;

pub const DEFAULT_PATH: &str = "/etc/spotguard/agent.toml";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub queue: QueueConfig,
    pub worker: WorkerConfig,
    #[serde(default)]
    pub imds: ImdsSection,
    #[serde(default)]
    pub interruption: InterruptionConfig,
    #[serde(default)]
    pub notify: NotifyConfig,
    #[serde(default)]
    pub scale_in: ScaleInConfig,
    #[serde(default)]
    pub status: StatusConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub health: HealthConfig,
}

/// What an unhealthy instance does besides closing intake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnUnhealthy {
    /// Log, count, publish the notice, answer 503 on `/healthz`.
    Report,
    /// As `report`, and `SetInstanceHealth Unhealthy`: the group replaces it.
    Replace,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Different messages failing in a row (failed, timed out, or not
    /// started) that make this instance unhealthy: a GPU that fell off the
    /// bus must not empty the queue into the dead-letter queue. 0 disables
    /// the breaker.
    #[serde(default = "d_max_failures")]
    pub max_consecutive_failures: u32,
    /// Jobs that could not start in a row (a missing program, no app
    /// listening) that make this instance unhealthy. Lower than the
    /// breaker's count: each such try burns one receive of a message, and
    /// the queue's maxReceiveCount must not be reached by one broken
    /// instance. An http app that starts slowly should gate intake with
    /// `health.command` instead (`["curl", "-fs", "http://127.0.0.1:8080/health"]`).
    #[serde(default = "d_max_start_failures")]
    pub max_start_failures: u32,
    #[serde(default = "d_on_unhealthy")]
    pub on_unhealthy: OnUnhealthy,
    /// A check (argv, no shell; e.g. `["nvidia-smi"]`) run at start and
    /// every `interval`; while it fails, intake is closed.
    pub command: Option<Vec<String>>,
    #[serde(default = "d_health_interval")]
    pub interval: Dur,
    /// `/healthz` answers 503 when IMDS has not answered for this long
    /// (notices would go unseen). 60 s is 60 missed spot polls.
    #[serde(default = "d_imds_stale")]
    pub imds_unreachable_after: Dur,
    /// The built-in GPU checks ([`crate::gpu`]): `auto` runs them when
    /// `nvidia_smi` is found on an instance type of a GPU family and size
    /// it knows (or with `gpu_count`), `on` always (a missing `nvidia-smi`
    /// is then a failure), `off` never.
    #[serde(default)]
    pub gpu: GpuMode,
    /// GPUs the instance must list; absent: from its instance type (exact
    /// sizes of the g4dn, g5, g5g, g6, g6e, p3, p3dn, p4d, p4de, p5, p5e,
    /// p5en families); another type: `auto` leaves the checks off, `on`
    /// runs them without a count.
    pub gpu_count: Option<u32>,
    /// The `nvidia-smi` to run: a name looked up in PATH, or a path.
    #[serde(default = "d_nvidia_smi")]
    pub nvidia_smi: String,
    /// Where Xid events are read: `journal` (`journalctl -k`; the unit
    /// puts the agent in group `systemd-journal`), a file of `/dev/kmsg`
    /// records (`/dev/kmsg` itself needs CAP_SYSLOG, which the unit does
    /// not give), or empty: no Xid check.
    #[serde(default = "d_kernel_log")]
    pub kernel_log: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuMode {
    #[default]
    Auto,
    On,
    Off,
}

fn d_nvidia_smi() -> String {
    "nvidia-smi".into()
}
fn d_kernel_log() -> String {
    "journal".into()
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            max_consecutive_failures: d_max_failures(),
            max_start_failures: d_max_start_failures(),
            on_unhealthy: d_on_unhealthy(),
            command: None,
            interval: d_health_interval(),
            imds_unreachable_after: d_imds_stale(),
            gpu: GpuMode::Auto,
            gpu_count: None,
            nvidia_smi: d_nvidia_smi(),
            kernel_log: d_kernel_log(),
        }
    }
}

/// Five different messages in a row: a broken instance trips it after
/// five of the fleet's messages; one bad message, however often it comes
/// back, counts once (`runner.rs`, `on_report`).
fn d_max_failures() -> u32 {
    5
}
/// Three: with the template's maxReceiveCount of 5, one broken instance
/// leaves every message at least two receives for healthy ones.
fn d_max_start_failures() -> u32 {
    3
}
fn d_on_unhealthy() -> OnUnhealthy {
    OnUnhealthy::Report
}
fn d_health_interval() -> Dur {
    Dur(Duration::from_secs(60))
}
fn d_imds_stale() -> Dur {
    Dur(Duration::from_secs(60))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// The SQS queue URL.
    pub url: String,
    /// The queue's region, for URLs that carry none (a VPC endpoint's or a
    /// local stand-in's). The SQS client is made in the queue's region, not
    /// the instance's: a fallback-region worker reads the primary's queue.
    pub region: Option<String>,
    /// Long-poll wait; SQS allows at most 20 s.
    #[serde(default = "d_wait_time")]
    pub wait_time: Dur,
    /// Visibility given to a received message, renewed by the heartbeat
    /// while its job runs. Short, so a message held by a vanished instance
    /// comes back quickly; the heartbeat keeps long jobs invisible.
    #[serde(default = "d_visibility")]
    pub visibility_timeout: Dur,
    /// How often a running job's visibility is renewed; default a third of
    /// `visibility_timeout`, so two renewals can fail before it lapses.
    pub heartbeat_interval: Option<Dur>,
    /// After a failed job, its message reappears after this long (the
    /// queue's redrive policy, not the agent, moves it to a dead-letter queue).
    #[serde(default = "d_error_visibility")]
    pub error_visibility_timeout: Dur,
    /// A job interrupted (stopped at a drain's deadline, or yielding to a
    /// notice) has its message re-sent with a counter instead of handed
    /// back, so a spot storm spends none of its receives (maxReceiveCount);
    /// past this many interruptions it is handed back as any message. 0:
    /// never re-sent. FIFO queues re-send only with
    /// `worker.fifo_resend_checkpoint` (a re-send reorders the group).
    #[serde(default = "d_max_interruptions")]
    pub max_interruptions: u32,
}

/// Ten: a job interrupted ten times in a row meets a storm that a
/// dead-letter queue should see.
fn d_max_interruptions() -> u32 {
    10
}

fn d_wait_time() -> Dur {
    Dur(Duration::from_secs(20))
}
fn d_visibility() -> Dur {
    Dur(Duration::from_secs(60))
}
fn d_error_visibility() -> Dur {
    Dur(Duration::from_secs(30))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Exec mode: the program and its arguments, run directly (no shell).
    pub command: Option<Vec<String>>,
    /// HTTP mode: the URL the body is POSTed to, sqsd style.
    pub url: Option<String>,
    #[serde(default = "d_concurrency")]
    pub concurrency: u32,
    /// A job running longer is stopped and its message handed back. Unset:
    /// no limit (GPU jobs vary too much for a safe universal default).
    pub timeout: Option<Dur>,
    /// Between SIGTERM and SIGKILL of a job's process group.
    #[serde(default = "d_term_grace")]
    pub term_grace: Dur,
    /// Content-Type of the POST in http mode (sqsd's default).
    #[serde(default = "d_content_type")]
    pub content_type: String,
    /// Extra environment for exec-mode jobs.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Exec mode: signal sent to a running job's process group on a notice
    /// (`SIGUSR1`, ..., or `none`).
    #[serde(default = "d_notice_signal")]
    pub notice_signal: String,
    /// Http mode: URL the notice JSON is POSTed to while a job runs.
    pub notice_url: Option<String>,
    /// Exec mode: where each job's notice and checkpoint files live
    /// (`<state_dir>/jobs/<message id>/`).
    #[serde(default = "d_state_dir")]
    pub state_dir: String,
    /// Largest checkpoint reference carried over to the next worker.
    #[serde(default = "d_checkpoint_max")]
    pub checkpoint_max_bytes: usize,
    /// FIFO queues: carry a checkpoint over by re-sending the message, which
    /// puts it at the tail of its group (later messages then run first).
    /// Off by default: the message is handed back as it was and the order
    /// holds, but the job starts over.
    #[serde(default)]
    pub fifo_resend_checkpoint: bool,
    /// Exec mode: the user jobs run as. Unset: `spotguard-job` (the
    /// package creates it) when the agent may switch users, else the
    /// agent's own user. Jobs hold only this user's group and
    /// `worker.groups`, none of the agent's.
    pub user: Option<String>,
    /// Exec mode: more groups for jobs (e.g. `video` for a device node).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Exec mode: each job's OOM score adjustment (0..=1000), so the kernel
    /// ends a job that exhausts memory, not the agent (whose unit sets
    /// -500) and with it every other job's drain.
    #[serde(default = "d_oom_score_adj")]
    pub oom_score_adj: i16,
    /// Who may send periodic tasks: IAM unique ids (`AROA…` of the
    /// controller's role, `AIDA…` of a user), matched against the message's
    /// `SenderId`. Empty: anyone who may send to the queue, which could
    /// otherwise forge a task for any path of the app.
    #[serde(default)]
    pub periodic_sender_ids: Vec<String>,
}

fn d_oom_score_adj() -> i16 {
    500
}

fn d_notice_signal() -> String {
    "SIGUSR1".into()
}
fn d_state_dir() -> String {
    "/var/lib/spotguard".into()
}
/// A reference (an S3 URI, a path) is short; 1 KiB also keeps it far from
/// SQS's 256 KiB message limit.
fn d_checkpoint_max() -> usize {
    1024
}

fn d_concurrency() -> u32 {
    1
}
fn d_term_grace() -> Dur {
    Dur(Duration::from_secs(10))
}
fn d_content_type() -> String {
    "application/json".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImdsSection {
    #[serde(default = "d_imds_endpoint")]
    pub endpoint: String,
    /// An endpoint other than IMDS's link-local addresses (a mock, in
    /// tests and demos) must be allowed explicitly: the agent sends its
    /// session token there and believes the notices it answers, and a job
    /// could listen on a loopback port.
    #[serde(default)]
    pub allow_other_endpoint: bool,
}

impl Default for ImdsSection {
    fn default() -> Self {
        ImdsSection {
            endpoint: d_imds_endpoint(),
            allow_other_endpoint: false,
        }
    }
}

/// IMDS's own addresses (EC2 User Guide, "Access instance metadata"):
/// IPv4 link-local, and IPv6 on Nitro instances.
pub fn is_imds_address(endpoint: &str) -> bool {
    // The URL parser normalises hosts (`[FD00:0EC2::0254]` is `[fd00:ec2::254]`).
    reqwest::Url::parse(endpoint).is_ok_and(|u| {
        matches!(u.host_str(), Some("169.254.169.254" | "[fd00:ec2::254]"))
            && u.port_or_known_default() == Some(80)
    })
}

fn d_imds_endpoint() -> String {
    DEFAULT_ENDPOINT.into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RebalancePolicy {
    Ignore,
    StopIntake,
    Drain,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterruptionConfig {
    /// Spot notice and lifecycle-state poll interval.
    #[serde(default = "d_poll")]
    pub poll_interval: Dur,
    /// Jobs still running at (notice time - margin) are stopped and handed
    /// back. 25 s covers the default 10 s SIGTERM grace, the hand-back calls
    /// (about a second, with retries) and slack, well inside 120 s.
    #[serde(default = "d_margin")]
    pub deadline_margin: Dur,
    /// Rebalance recommendation poll; AWS suggests 5 s, and a rebalance
    /// recommendation is advice, not a deadline.
    #[serde(default = "d_rebalance_poll")]
    pub rebalance_poll_interval: Dur,
    #[serde(default = "d_rebalance")]
    pub rebalance: RebalancePolicy,
    /// Name of the group's termination lifecycle hook; when set, a target
    /// lifecycle state `Terminated` is answered with heartbeats while jobs
    /// run and `CompleteLifecycleAction` CONTINUE once drained.
    pub lifecycle_hook: Option<String>,
    /// Interval of `RecordLifecycleActionHeartbeat`; must stay below the
    /// hook's HeartbeatTimeout (30 s minimum on AWS).
    #[serde(default = "d_hook_heartbeat")]
    pub lifecycle_heartbeat_interval: Dur,
    /// The hook's HeartbeatTimeout (the template's 300 s). Its global
    /// timeout, 100 times this or 48 hours whichever is smaller, is how long
    /// the group waits whatever the heartbeats: jobs still running then are
    /// handed back before it.
    #[serde(default = "d_hook_timeout")]
    pub lifecycle_heartbeat_timeout: Dur,
    /// Deadline of the drain on SIGTERM/SIGINT (systemd's TimeoutStopSec must
    /// be longer).
    #[serde(default = "d_shutdown")]
    pub shutdown_deadline: Dur,
}

impl Default for InterruptionConfig {
    fn default() -> Self {
        InterruptionConfig {
            poll_interval: d_poll(),
            rebalance_poll_interval: d_rebalance_poll(),
            deadline_margin: d_margin(),
            rebalance: d_rebalance(),
            lifecycle_hook: None,
            lifecycle_heartbeat_interval: d_hook_heartbeat(),
            lifecycle_heartbeat_timeout: d_hook_timeout(),
            shutdown_deadline: d_shutdown(),
        }
    }
}

fn d_poll() -> Dur {
    Dur(Duration::from_secs(1))
}
fn d_rebalance_poll() -> Dur {
    Dur(Duration::from_secs(5))
}
fn d_margin() -> Dur {
    Dur(Duration::from_secs(25))
}
fn d_rebalance() -> RebalancePolicy {
    RebalancePolicy::StopIntake
}
fn d_hook_heartbeat() -> Dur {
    Dur(Duration::from_secs(20))
}
/// spotguard-region.yaml's HeartbeatTimeout.
fn d_hook_timeout() -> Dur {
    Dur(Duration::from_secs(300))
}
fn d_shutdown() -> Dur {
    Dur(Duration::from_secs(90))
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// SNS topic that gets a JSON message on every notice.
    pub sns_topic_arn: Option<String>,
    /// Program (argv, no shell) run on every notice with the event JSON on stdin.
    pub hook_command: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleInConfig {
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// No job and no message for this long: terminate this instance.
    #[serde(default = "d_idle")]
    pub idle_timeout: Dur,
    /// First wait after the group refused (desired = MinSize) or the call
    /// failed; doubled per refusal up to 16 times this.
    #[serde(default = "d_retry")]
    pub retry_interval: Dur,
    /// Protect the instance from the group's scale-in while a job runs.
    #[serde(default)]
    pub protect_busy: bool,
    /// Follow the controller's `spotguard:intake` group tag: once it reads
    /// `closed` (failing back, the primary holds the work), take no new
    /// job and scale in when the running ones end. Unset: on when the
    /// instance runs in another region than the queue's (a fallback group),
    /// off in the queue's own region, so that a fleet of 1,000 primary
    /// instances makes no call for it.
    #[serde(default)]
    pub follow_intake: Option<bool>,
    /// How often a following agent reads the tag: one
    /// `DescribeAutoScalingGroups` per fallback instance per minute (200
    /// fallback instances: about 3 calls a second, well under the Auto
    /// Scaling API's rate), and intake closes within a minute of the
    /// controller's decision, which is small beside a job's length.
    #[serde(default = "d_intake_check")]
    pub intake_check: Dur,
}

impl Default for ScaleInConfig {
    fn default() -> Self {
        ScaleInConfig {
            enabled: true,
            idle_timeout: d_idle(),
            retry_interval: d_retry(),
            protect_busy: false,
            follow_intake: None,
            intake_check: d_intake_check(),
        }
    }
}

fn d_intake_check() -> Dur {
    Dur(Duration::from_secs(60))
}

fn d_true() -> bool {
    true
}
fn d_idle() -> Dur {
    Dur(Duration::from_secs(30))
}
fn d_retry() -> Dur {
    Dur(Duration::from_secs(60))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Address of `/healthz`, `/status`, `/metrics`; empty disables it.
    #[serde(default = "d_status")]
    pub listen: String,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig { listen: d_status() }
    }
}

fn d_status() -> String {
    "127.0.0.1:9464".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatKey {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormatKey,
}

/// How a job is handed to the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerMode {
    Exec(Vec<String>),
    Http(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        spotguard_common::config::load(path)
    }

    /// Parses and validates; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        spotguard_common::config::parse(text, origin)
    }

    pub fn worker_mode(&self) -> WorkerMode {
        match (&self.worker.command, &self.worker.url) {
            (Some(c), _) => WorkerMode::Exec(c.clone()),
            (None, Some(u)) => WorkerMode::Http(u.clone()),
            // validate() guarantees exactly one.
            (None, None) => WorkerMode::Exec(Vec::new()),
        }
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.queue.heartbeat_interval()
    }

    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.status.listen.parse().ok()
    }

    /// The notice signal; `None` for `none`.
    pub fn notice_signal(&self) -> Result<Option<nix::sys::signal::Signal>, String> {
        self.worker.notice_signal()
    }

    /// The queue's name: the last segment of its URL.
    /// The queue's region: `queue.region`, else the URL's (validated).
    pub fn queue_region(&self) -> Option<String> {
        self.queue
            .region
            .clone()
            .or_else(|| spotguard_common::region::queue_url_region(self.queue.url.trim()))
    }

    pub fn queue_name(&self) -> &str {
        self.queue
            .url
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("")
    }
}

/// Each section checks its own keys; `Config` runs them in order (the
/// first problem is reported) and those that span sections.
impl Validate for Config {
    fn validate(self) -> Result<Self, Invalid> {
        self.queue.check()?;
        self.worker.check()?;
        self.health.check()?;
        self.interruption.check(&self.worker)?;
        self.scale_in.check()?;
        self.notify.check()?;
        self.status.check()?;
        self.imds.check()?;
        Ok(self)
    }
}

/// Longest a message can stay invisible (SQS: 12 hours from its receipt).
const SQS_MAX_INVISIBLE: Duration = Duration::from_secs(43_200);

fn http_url(u: &str) -> bool {
    (u.starts_with("http://") || u.starts_with("https://")) && reqwest::Url::parse(u).is_ok()
}

fn names_a_program(argv: &[String]) -> bool {
    argv.first().is_some_and(|p| !p.is_empty())
}

impl QueueConfig {
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
            .map_or(self.visibility_timeout.0 / 3, |d| d.0)
    }

    fn check(&self) -> Result<(), Invalid> {
        let url = self.url.trim();
        if !(url.starts_with("https://") || url.starts_with("http://"))
            || url
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or("")
                .is_empty()
        {
            return invalid("queue.url", format!("{url:?} is not an SQS queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)"));
        }
        let from_url = spotguard_common::region::queue_url_region(url);
        match (&self.region, &from_url) {
            (None, None) => {
                return invalid(
                    "queue.region",
                    format!("{url:?} names no region (not https://sqs.REGION.amazonaws.com/...): set queue.region to the queue's region"),
                )
            }
            (Some(r), _) if !spotguard_common::region::is_region(r) => {
                return invalid("queue.region", format!("{r:?} is not a region like us-east-1"))
            }
            (Some(r), Some(u)) if r != u => {
                return invalid(
                    "queue.region",
                    format!("{r:?} contradicts the queue URL, which is in {u}"),
                )
            }
            _ => {}
        }
        if self.wait_time.0 > Duration::from_secs(20) {
            return invalid("queue.wait_time", "SQS long polls last at most 20s");
        }
        if self.wait_time.0 < Duration::from_secs(1) {
            // A short poll answers at once on an empty queue: the receive
            // loop would spin, paying for each call.
            return invalid("queue.wait_time", "must be at least 1s (a long poll)");
        }
        let vis = self.visibility_timeout.0;
        if vis < Duration::from_secs(2) || vis > SQS_MAX_INVISIBLE {
            return invalid(
                "queue.visibility_timeout",
                "must be within 2s..12h (SQS allows 0..43200 s)",
            );
        }
        if self.heartbeat_interval().is_zero() || self.heartbeat_interval() >= vis {
            return invalid(
                "queue.heartbeat_interval",
                "must be greater than zero and shorter than queue.visibility_timeout",
            );
        }
        if self.error_visibility_timeout.0 > SQS_MAX_INVISIBLE {
            return invalid("queue.error_visibility_timeout", "SQS allows at most 12h");
        }
        Ok(())
    }
}

impl WorkerConfig {
    /// The notice signal; `None` for `none`.
    pub fn notice_signal(&self) -> Result<Option<nix::sys::signal::Signal>, String> {
        let s = self.notice_signal.trim();
        if s.eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        let name = if s.starts_with("SIG") {
            s.to_string()
        } else {
            format!("SIG{s}")
        };
        name.parse::<nix::sys::signal::Signal>()
            .map(Some)
            .map_err(|e| e.to_string())
    }

    fn check(&self) -> Result<(), Invalid> {
        if self.timeout.is_some_and(|t| t.0 > SQS_MAX_INVISIBLE) {
            return invalid(
                "worker.timeout",
                "must be at most 12h: SQS keeps a message invisible at most 12 hours from its receipt",
            );
        }
        match (&self.command, &self.url) {
            (Some(_), Some(_)) | (None, None) => {
                return invalid(
                    "worker.command",
                    "set exactly one of worker.command or worker.url",
                )
            }
            (Some(c), None) if !names_a_program(c) => {
                return invalid(
                    "worker.command",
                    "must name a program: [\"/path/to/program\", \"arg\", ...]",
                )
            }
            (None, Some(u)) if u.starts_with("https://") => {
                return invalid(
                    "worker.url",
                    "https:// cannot work: the agent is built without TLS (the app runs on this instance: use http:// on loopback)",
                )
            }
            (None, Some(u)) if !u.starts_with("http://") => {
                return invalid("worker.url", format!("{u:?} is not an http:// URL"))
            }
            (Some(c), None) if c[0].contains('/') && !c[0].starts_with('/') => {
                return invalid(
                    "worker.command",
                    format!(
                        "{:?} is a relative path: give an absolute path, or a bare name looked up on PATH",
                        c[0]
                    ),
                )
            }
            (Some(c), None) if c.iter().any(|a| a.contains('\0')) => {
                return invalid(
                    "worker.command",
                    "an argument holds a NUL byte, which no program can be given",
                )
            }
            (None, Some(u)) if !http_url(u) => return invalid("worker.url", "not a valid URL"),
            _ => {}
        }
        if !(1..=256).contains(&self.concurrency) {
            return invalid("worker.concurrency", "must be within 1..=256");
        }
        if self.timeout.is_some_and(|t| t.0.is_zero()) {
            return invalid(
                "worker.timeout",
                "must be greater than zero (leave it unset for no limit)",
            );
        }
        if self.notice_signal().is_err() {
            return invalid(
                "worker.notice_signal",
                format!(
                    "{:?} is not a signal name like \"SIGUSR1\" (or \"none\")",
                    self.notice_signal
                ),
            );
        }
        if let Some(u) = self.notice_url.as_deref().filter(|u| !http_url(u)) {
            return invalid(
                "worker.notice_url",
                format!("{u:?} is not an http:// or https:// URL"),
            );
        }
        if self
            .notice_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https://"))
        {
            return invalid(
                "worker.notice_url",
                "https:// cannot work: the agent is built without TLS (use http:// on loopback)",
            );
        }
        if let Some(k) = self
            .env
            .iter()
            .find(|(_, v)| v.contains('\0'))
            .map(|(k, _)| k)
        {
            return invalid(
                "worker.env",
                format!("the value of {k:?} holds a NUL byte, which no environment can hold"),
            );
        }
        if !(0..=1000).contains(&self.oom_score_adj) {
            return invalid(
                "worker.oom_score_adj",
                "must be within 0..=1000 (a job never outranks the agent for the OOM killer)",
            );
        }
        if self.user.as_deref().is_some_and(str::is_empty) {
            return invalid("worker.user", "must not be empty (leave it unset)");
        }
        if self.state_dir.is_empty() {
            return invalid("worker.state_dir", "must not be empty");
        }
        if !(1..=65_536).contains(&self.checkpoint_max_bytes) {
            return invalid("worker.checkpoint_max_bytes", "must be within 1..=65536");
        }
        if reqwest::header::HeaderValue::from_str(&self.content_type).is_err() {
            return invalid("worker.content_type", "not a valid header value");
        }
        if let Some(k) = self
            .env
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return invalid(
                "worker.env",
                format!("{k:?} is not an environment variable name"),
            );
        }
        Ok(())
    }
}

impl HealthConfig {
    fn check(&self) -> Result<(), Invalid> {
        if self.command.as_deref().is_some_and(|c| !names_a_program(c)) {
            return invalid("health.command", "must name a program: [\"nvidia-smi\"]");
        }
        if self.interval.0.is_zero() {
            return invalid("health.interval", "must be greater than zero");
        }
        if self.nvidia_smi.trim().is_empty() || self.nvidia_smi.contains('\0') {
            return invalid(
                "health.nvidia_smi",
                "must name a program: \"nvidia-smi\" or a path",
            );
        }
        if self.gpu_count == Some(0) {
            return invalid(
                "health.gpu_count",
                "must be at least 1 (or `gpu = \"off\"`)",
            );
        }
        Ok(())
    }
}

impl InterruptionConfig {
    /// The margin is checked against the worker's grace (they span sections).
    fn check(&self, worker: &WorkerConfig) -> Result<(), Invalid> {
        for (key, d) in [
            ("interruption.poll_interval", self.poll_interval),
            (
                "interruption.rebalance_poll_interval",
                self.rebalance_poll_interval,
            ),
            (
                "interruption.lifecycle_heartbeat_interval",
                self.lifecycle_heartbeat_interval,
            ),
            ("interruption.shutdown_deadline", self.shutdown_deadline),
        ] {
            if d.0.is_zero() {
                return invalid(key, "must be greater than zero");
            }
        }
        let margin = self.deadline_margin.0;
        if margin <= worker.term_grace.0 {
            return invalid(
                "interruption.deadline_margin",
                format!(
                    "must be longer than worker.term_grace ({}), or hand-backs would finish after the notice time",
                    humantime::format_duration(worker.term_grace.0)
                ),
            );
        }
        // The spot notice comes two minutes before the reclaim.
        if margin >= Duration::from_secs(120) {
            return invalid(
                "interruption.deadline_margin",
                "must be shorter than the 2-minute spot notice",
            );
        }
        if self.lifecycle_hook.as_deref().is_some_and(str::is_empty) {
            return invalid(
                "interruption.lifecycle_hook",
                "must not be empty (leave it unset)",
            );
        }
        // AWS: HeartbeatTimeout is 30..=7200 s (PutLifecycleHook).
        let timeout = self.lifecycle_heartbeat_timeout.0;
        if !(Duration::from_secs(30)..=Duration::from_secs(7200)).contains(&timeout) {
            return invalid(
                "interruption.lifecycle_heartbeat_timeout",
                "must be the hook's HeartbeatTimeout, 30s..=2h",
            );
        }
        // Half: a heartbeat that fails once is retried in 5 s and still
        // lands within the timeout.
        if self.lifecycle_heartbeat_interval.0 * 2 > timeout {
            return invalid(
                "interruption.lifecycle_heartbeat_interval",
                "must be at most half of interruption.lifecycle_heartbeat_timeout, or a missed heartbeat lets the hook time out",
            );
        }
        Ok(())
    }
}

impl ScaleInConfig {
    fn check(&self) -> Result<(), Invalid> {
        for (key, d) in [
            ("scale_in.idle_timeout", self.idle_timeout),
            ("scale_in.retry_interval", self.retry_interval),
        ] {
            if d.0.is_zero() {
                return invalid(key, "must be greater than zero");
            }
        }
        Ok(())
    }
}

impl NotifyConfig {
    fn check(&self) -> Result<(), Invalid> {
        if self
            .hook_command
            .as_deref()
            .is_some_and(|h| !names_a_program(h))
        {
            return invalid("notify.hook_command", "must name a program");
        }
        if self
            .sns_topic_arn
            .as_deref()
            .is_some_and(|a| !a.starts_with("arn:"))
        {
            return invalid(
                "notify.sns_topic_arn",
                "must be an SNS topic ARN (arn:aws:sns:...)",
            );
        }
        Ok(())
    }
}

impl StatusConfig {
    fn check(&self) -> Result<(), Invalid> {
        if !self.listen.is_empty() && self.listen.parse::<SocketAddr>().is_err() {
            return invalid(
                "status.listen",
                format!("{:?} is not an IP:PORT address", self.listen),
            );
        }
        Ok(())
    }
}

impl ImdsSection {
    fn check(&self) -> Result<(), Invalid> {
        if crate::imds::ImdsClient::new(crate::imds::ImdsConfig {
            endpoint: self.endpoint.clone(),
            ..Default::default()
        })
        .is_err()
        {
            return invalid(
                "imds.endpoint",
                format!("{:?} is not an http://HOST[:PORT] URI", self.endpoint),
            );
        }
        if !self.allow_other_endpoint && !is_imds_address(&self.endpoint) {
            return invalid(
                "imds.endpoint",
                format!(
                    "{:?} is not IMDS (http://169.254.169.254 or http://[fd00:ec2::254]); set imds.allow_other_endpoint = true for a mock",
                    self.endpoint
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[queue]
url = "https://sqs.us-east-1.amazonaws.com/123456789012/jobs"
[worker]
command = ["/bin/true"]
"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::parse(MIN, "t").unwrap();
        assert_eq!(c.worker.concurrency, 1);
        assert_eq!(c.scale_in.idle_timeout.0, Duration::from_secs(30));
        assert_eq!(c.status.listen, "127.0.0.1:9464");
        assert_eq!(c.imds.endpoint, "http://169.254.169.254");
        assert_eq!(c.interruption.poll_interval.0, Duration::from_secs(1));
        assert_eq!(c.interruption.rebalance, RebalancePolicy::StopIntake);
        assert_eq!(c.heartbeat_interval(), Duration::from_secs(20));
        assert_eq!(c.queue_name(), "jobs");
        assert_eq!(c.worker_mode(), WorkerMode::Exec(vec!["/bin/true".into()]));
    }

    fn err(extra: &str) -> String {
        Config::parse(&format!("{MIN}{extra}"), "agent.toml")
            .unwrap_err()
            .to_string()
    }

    fn err_full(text: &str) -> String {
        Config::parse(text, "agent.toml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[scale_in]\nidle_timeout = \"soon\"\n", "idle_timeout"),
            ("[scale_in]\nidle_timeout = 30\n", "idle_timeout"),
            ("[scale_in]\nidle_timout = \"30s\"\n", "idle_timout"),
            ("[status]\nlisten = \"localhost\"\n", "status.listen"),
            ("[interruption]\nrebalance = \"panic\"\n", "rebalance"),
            (
                "[interruption]\ndeadline_margin = \"5s\"\n",
                "interruption.deadline_margin",
            ),
            (
                "[interruption]\ndeadline_margin = \"3m\"\n",
                "interruption.deadline_margin",
            ),
            ("[imds]\nendpoint = \"169.254.169.254\"\n", "imds.endpoint"),
            (
                "[interruption]\nlifecycle_heartbeat_timeout = \"3h\"\n",
                "interruption.lifecycle_heartbeat_timeout",
            ),
            (
                "[interruption]\nlifecycle_heartbeat_timeout = \"30s\"\nlifecycle_heartbeat_interval = \"30s\"\n",
                "interruption.lifecycle_heartbeat_interval",
            ),
            (
                "[imds]\nendpoint = \"http://127.0.0.1:1338\"\n",
                "imds.allow_other_endpoint",
            ),
            (
                "[notify]\nsns_topic_arn = \"topic\"\n",
                "notify.sns_topic_arn",
            ),
            (
                "[interruption]\npoll_interval = \"0s\"\n",
                "interruption.poll_interval",
            ),
        ];
        for (extra, key) in cases {
            let e = err(extra);
            assert!(e.contains(key), "{extra:?} -> {e}");
        }
    }

    #[test]
    fn only_imds_own_addresses_pass_without_the_explicit_allowance() {
        assert!(is_imds_address("http://169.254.169.254"));
        assert!(is_imds_address("http://[FD00:0EC2::0254]:80"));
        assert!(!is_imds_address("http://127.0.0.1:1338"));
        assert!(!is_imds_address("http://169.254.169.254:1338"));
        assert!(!is_imds_address("http://169.254.169.254.example.com"));
        let q = "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\n[worker]\ncommand = [\"a\"]\n";
        let c = Config::parse(
            &format!(
                "{q}[imds]\nendpoint = \"http://127.0.0.1:1338\"\nallow_other_endpoint = true\n"
            ),
            "t",
        )
        .unwrap();
        assert_eq!(c.imds.endpoint, "http://127.0.0.1:1338");
    }

    #[test]
    fn worker_and_queue_errors() {
        let q = "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\n";
        assert!(err_full(&format!("{q}[worker]\n")).contains("worker.command"));
        assert!(err_full(&format!(
            "{q}[worker]\ncommand = [\"a\"]\nurl = \"http://x/\"\n"
        ))
        .contains("exactly one"));
        assert!(err_full(&format!("{q}[worker]\ncommand = []\n")).contains("worker.command"));
        assert!(
            err_full(&format!("{q}[worker]\ncommand = [\"bin/run\"]\n")).contains("relative path")
        );
        assert!(err_full(&format!("{q}[worker]\nurl = \"ftp://x\"\n")).contains("worker.url"));
        assert!(err_full(&format!(
            "{q}[worker]\ncommand = [\"a\"]\nconcurrency = 0\n"
        ))
        .contains("worker.concurrency"));
        assert!(err_full(&format!(
            "{q}[worker]\ncommand = [\"a\"]\nconcurrency = -1\n"
        ))
        .contains("concurrency"));
        assert!(err_full("[worker]\ncommand = [\"a\"]\n").contains("queue"));
        assert!(
            err_full("[queue]\nurl = \"jobs\"\n[worker]\ncommand = [\"a\"]\n")
                .contains("queue.url")
        );
        assert!(err_full(&format!(
            "{q}wait_time = \"30s\"\n[worker]\ncommand = [\"a\"]\n"
        ))
        .contains("queue.wait_time"));
        assert!(err_full(&format!(
            "{q}wait_time = \"0s\"\n[worker]\ncommand = [\"a\"]\n"
        ))
        .contains("at least 1s"));
        assert!(err_full("not toml at all [").contains("agent.toml"));
    }
}
