//! The failover decision, without I/O.
//!
//! ```text
//!  normal --N capacity failures in the window, primary short for
//!            shortage_for, work waiting, min dwell--> failed-over
//!  failed-over --primary not short for recovery_for, min dwell--> failing-back
//!  failed-over --no backlog, no busy fallback instance, min dwell--> failing-back
//!  failing-back --the same as from normal: new capacity failures, primary
//!                 short for shortage_for, work waiting, min dwell--> failed-over
//!  failing-back --fallback group empty, min dwell--> normal
//! ```
//!
//! Recovery is read from capacity, not from failure timestamps: a primary
//! with one dry Availability Zone logs a capacity failure on every
//! scale-out (AWS tries the zone with the fewest instances first), yet
//! holds its desired capacity from the other zones; it is not short, so it
//! neither fails over nor holds a failover open.
//!
//! The fallback carries what the primary cannot hold, nothing more: its
//! gate (MaxSize) is the primary's desired capacity less its InService
//! instances (pending ones excluded, so the fallback shrinks only as the
//! primary's instances reach service: make before break), within the
//! configured cap and never below its busy instances. While failing back
//! the controller raises the primary's desired capacity by the fallback's
//! instances (within its MaxSize), and once the primary holds all of it,
//! closes the fallback's intake (the `spotguard:intake` tag, read by the
//! fallback's agents): they finish their running job, take no new one, and
//! scale themselves in. Without it, busy fallback agents under a load that
//! never stops would keep taking work, and the failback would never end.
//!
//! The controller is stateless: what it must remember (the mode, when it
//! began, recent capacity failures, the last successful launch) lives in
//! tags on the fallback group ([`Memory`]). Each reconcile reads it, merges
//! the launch outcomes seen since (duplicates and reordering are harmless:
//! failures are keyed by activity id, times merge by maximum), and returns
//! the new memory and the actions that make AWS match it. Every action is
//! idempotent, so a retried invocation does no harm. Two concurrent ones
//! could: tags are last-writer-wins, so a stale decision could undo a newer
//! one. One controller acts at a time (its lease, [`crate::lease`]), and the
//! memory carries a version that the handler checks before it acts.
//!
//! The fallback group's MaxSize is the gate: 0 in `normal`, the configured
//! cap in `failed-over`, lowered step by step in `failing-back`, and never
//! below the number of busy (scale-in-protected) fallback instances, so no
//! running job is killed.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Normal,
    FailedOver,
    FailingBack,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::FailedOver => "failed-over",
            Mode::FailingBack => "failing-back",
        }
    }

    fn parse(s: &str) -> Option<Mode> {
        match s {
            "normal" => Some(Mode::Normal),
            "failed-over" => Some(Mode::FailedOver),
            "failing-back" => Some(Mode::FailingBack),
            _ => None,
        }
    }
}

pub const TAG_MODE: &str = "spotguard:mode";
pub const TAG_SINCE: &str = "spotguard:since";
pub const TAG_FAILURES: &str = "spotguard:capacity-failures";
pub const TAG_LAST_FAILURE: &str = "spotguard:last-capacity-failure";
pub const TAG_LAST_SUCCESS: &str = "spotguard:last-launch-success";
pub const TAG_SHORT_SINCE: &str = "spotguard:primary-short-since";
pub const TAG_HELD_SINCE: &str = "spotguard:gate-held-since";
pub const TAG_VERSION: &str = "spotguard:version";
/// How far a remembered time may lie ahead of the reader's clock: the
/// controllers' clocks are NTP-synchronised (Lambda's and EC2's through
/// the Amazon Time Sync Service, within milliseconds); a minute covers a
/// container host that drifts.
pub const CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
pub const TAG_OFFERINGS: &str = "spotguard:unavailable-offerings";
pub const TAG_WHOLE_SINCE: &str = "spotguard:primary-whole-since";
/// `closed`: the fallback's agents take no new work and scale in once
/// idle (read by the agents of the group; `open` otherwise).
pub const TAG_INTAKE: &str = "spotguard:intake";
/// The InService instances the primary must have before the fallback's
/// intake closes, fixed when the hand-over starts.
pub const TAG_HANDOVER: &str = "spotguard:handover-to";

/// How many capacity failures the memory keeps: a tag value holds at most
/// 256 characters, and each entry takes at most 24.
pub const MAX_FAILURES: usize = 10;
/// Activity ids are shortened to this many characters in the tag; UUIDs
/// differ in their first characters.
const ID_CHARS: usize = 12;

/// Where a capacity failure happened, as far as its message and details
/// name it (`None`: not named).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Offering {
    pub zone: Option<String>,
    pub instance_type: Option<String>,
}

impl Offering {
    /// From a launch failure's StatusMessage ("... sufficient g4dn.xlarge
    /// capacity in the Availability Zone you requested (us-east-1a) ...")
    /// and the zone of its details, if given.
    pub fn of(status_message: &str, zone: Option<&str>) -> Offering {
        let clean = tag_safe;
        let instance_type = status_message
            .split_once("sufficient ")
            .and_then(|(_, rest)| rest.split_once(" capacity"))
            .map(|(t, _)| t)
            .filter(|t| t.contains('.') && !t.contains(' '))
            .and_then(clean);
        let zone = zone.and_then(clean).or_else(|| {
            status_message
                .split('(')
                .skip(1)
                .filter_map(|p| p.split_once(')').map(|(z, _)| z))
                .find(|z| {
                    z.ends_with(|c: char| c.is_ascii_lowercase())
                        && spotguard_common::region::is_region(&z[..z.len() - 1])
                })
                .and_then(clean)
        });
        Offering {
            zone,
            instance_type,
        }
    }
}

/// Only characters that survive the tag encoding (`secs/zone/type`,
/// space-separated), at most 32: event input is outside input. `None` if
/// nothing is left.
fn tag_safe(w: &str) -> Option<String> {
    let w: String = w
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        .take(32)
        .collect();
    (!w.is_empty()).then_some(w)
}

/// An offering (zone x instance type) seen short of capacity: as
/// Karpenter's unavailable-offerings cache, kept for the capacity TTL. It
/// says where the shortage is (status, notifications); the group itself
/// picks its offerings, so no decision rests on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mark {
    pub at: DateTime<Utc>,
    pub offering: Offering,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub at: DateTime<Utc>,
    pub id: String,
}

/// What the controller remembers between invocations (the fallback group's tags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Memory {
    pub mode: Mode,
    pub since: DateTime<Utc>,
    pub failures: Vec<Failure>,
    pub last_capacity_failure: Option<DateTime<Utc>>,
    pub last_success: Option<DateTime<Utc>>,
    /// Since when the primary has been short of its desired capacity
    /// (desired > InService + pending), as last observed.
    pub primary_short_since: Option<DateTime<Utc>>,
    /// Since when it has not been short, as last observed: recovery.
    pub primary_whole_since: Option<DateTime<Utc>>,
    /// The fallback's intake is closed (failing back, the primary holds
    /// the work).
    pub intake_closed: bool,
    /// This hand-over's target: the work in flight when it started (the
    /// primary's busy instances and the fallback's), within the primary's
    /// MaxSize. Fixed, so that new work does not raise it again.
    pub handover_to: Option<i32>,
    /// Since when the failing-back gate has been held up only by busy
    /// (protected) fallback instances.
    pub held_since: Option<DateTime<Utc>>,
    /// Bumped by every write: a writer that read an older version must not
    /// write (a stale decision cannot undo a newer one).
    pub version: u64,
    /// The group's offerings short of capacity within the TTL, newest last.
    pub unavailable: Vec<Mark>,
}

impl Memory {
    /// A group without our tags is in `normal` since the beginning of time.
    pub fn initial() -> Memory {
        Memory {
            mode: Mode::Normal,
            since: DateTime::<Utc>::UNIX_EPOCH,
            failures: Vec::new(),
            last_capacity_failure: None,
            last_success: None,
            primary_short_since: None,
            primary_whole_since: None,
            intake_closed: false,
            handover_to: None,
            held_since: None,
            version: 0,
            unavailable: Vec::new(),
        }
    }

    /// Reads the tags at `now`; unreadable values are reported and treated
    /// as absent. So are times later than `now` (with [`CLOCK_SKEW`] of
    /// slack): the controller writes only times it has seen, and anyone
    /// with tag rights could otherwise disable failover for ever (a `since`
    /// in the future) or pin the fleet in the fallback (a last failure in
    /// the future). A time in the past cannot be told from a true one (a
    /// `gate-held-since` a day ago releases busy instances' protection):
    /// that is for IAM, which lets only the controller's role write
    /// `spotguard:*` tags of its own groups.
    pub fn from_tags(tags: &BTreeMap<String, String>, now: DateTime<Utc>) -> (Memory, Vec<String>) {
        let mut m = Memory::initial();
        let mut warnings = Vec::new();
        let latest = now
            .checked_add_signed(CLOCK_SKEW)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let time = |key: &str, warnings: &mut Vec<String>| -> Option<DateTime<Utc>> {
            // An empty value is how an absent time is written (a tag cannot
            // be removed by CreateOrUpdateTags).
            let v = tags.get(key).filter(|v| !v.is_empty())?;
            match DateTime::parse_from_rfc3339(v) {
                Ok(t) if t > latest => {
                    warnings.push(format!(
                        "tag {key}={v:?} is later than now ({}); ignored",
                        now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    ));
                    None
                }
                Ok(t) => Some(t.with_timezone(&Utc)),
                Err(e) => {
                    warnings.push(format!(
                        "tag {key}={v:?} is not an RFC 3339 time ({e}); ignored"
                    ));
                    None
                }
            }
        };
        if let Some(v) = tags.get(TAG_MODE) {
            match Mode::parse(v) {
                Some(mode) => m.mode = mode,
                None => warnings.push(format!(
                    "tag {TAG_MODE}={v:?} is not a mode; taken as normal"
                )),
            }
        }
        if let Some(t) = time(TAG_SINCE, &mut warnings) {
            m.since = t;
        }
        m.last_capacity_failure = time(TAG_LAST_FAILURE, &mut warnings);
        m.last_success = time(TAG_LAST_SUCCESS, &mut warnings);
        m.primary_short_since = time(TAG_SHORT_SINCE, &mut warnings);
        m.primary_whole_since = time(TAG_WHOLE_SINCE, &mut warnings);
        m.intake_closed = tags.get(TAG_INTAKE).is_some_and(|v| v == "closed");
        m.handover_to = match tags.get(TAG_HANDOVER).filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => match v.parse::<i32>() {
                Ok(n) if n >= 0 => Some(n),
                _ => {
                    warnings.push(format!(
                        "tag {TAG_HANDOVER}={v:?} is not a count of instances; ignored"
                    ));
                    None
                }
            },
        };
        m.held_since = time(TAG_HELD_SINCE, &mut warnings);
        if let Some(v) = tags.get(TAG_VERSION) {
            match v.parse() {
                Ok(n) => m.version = n,
                Err(_) => warnings.push(format!(
                    "tag {TAG_VERSION}={v:?} is not a number; taken as 0"
                )),
            }
        }
        if let Some(v) = tags.get(TAG_FAILURES) {
            for entry in v.split_whitespace() {
                let parsed = entry
                    .split_once('/')
                    .and_then(|(secs, id)| Some((secs.parse::<i64>().ok()?, id)))
                    .and_then(|(secs, id)| Some((DateTime::<Utc>::from_timestamp(secs, 0)?, id)));
                match parsed {
                    Some((at, _)) if at > latest => warnings.push(format!(
                        "tag {TAG_FAILURES}: entry {entry:?} is later than now; ignored"
                    )),
                    Some((at, id)) => m.failures.push(Failure {
                        at,
                        id: id.to_string(),
                    }),
                    None => warnings.push(format!(
                        "tag {TAG_FAILURES}: entry {entry:?} unreadable; ignored"
                    )),
                }
            }
        }
        if let Some(v) = tags.get(TAG_OFFERINGS) {
            for entry in v.split_whitespace() {
                let mut parts = entry.splitn(3, '/');
                let parsed = (|| {
                    let at = DateTime::<Utc>::from_timestamp(parts.next()?.parse().ok()?, 0)?;
                    let known = |p: &str| (p != "*").then(|| p.to_string());
                    let zone = known(parts.next()?);
                    let instance_type = known(parts.next()?);
                    Some(Mark {
                        at,
                        offering: Offering {
                            zone,
                            instance_type,
                        },
                    })
                })();
                match parsed {
                    Some(mark) if mark.at > latest => warnings.push(format!(
                        "tag {TAG_OFFERINGS}: entry {entry:?} is later than now; ignored"
                    )),
                    Some(mark) => m.unavailable.push(mark),
                    None => warnings.push(format!(
                        "tag {TAG_OFFERINGS}: entry {entry:?} unreadable; ignored"
                    )),
                }
            }
        }
        (m, warnings)
    }

    pub fn to_tags(&self) -> BTreeMap<String, String> {
        let rfc = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut t = BTreeMap::new();
        t.insert(TAG_MODE.to_string(), self.mode.as_str().to_string());
        t.insert(TAG_SINCE.to_string(), rfc(self.since));
        t.insert(
            TAG_FAILURES.to_string(),
            self.failures
                .iter()
                .map(|f| format!("{}/{}", f.at.timestamp(), f.id))
                .collect::<Vec<_>>()
                .join(" "),
        );
        if let Some(x) = self.last_capacity_failure {
            t.insert(TAG_LAST_FAILURE.to_string(), rfc(x));
        }
        if let Some(x) = self.last_success {
            t.insert(TAG_LAST_SUCCESS.to_string(), rfc(x));
        }
        t.insert(
            TAG_SHORT_SINCE.to_string(),
            self.primary_short_since.map(rfc).unwrap_or_default(),
        );
        t.insert(
            TAG_WHOLE_SINCE.to_string(),
            self.primary_whole_since.map(rfc).unwrap_or_default(),
        );
        t.insert(
            TAG_INTAKE.to_string(),
            if self.intake_closed { "closed" } else { "open" }.to_string(),
        );
        t.insert(
            TAG_HANDOVER.to_string(),
            self.handover_to.map(|n| n.to_string()).unwrap_or_default(),
        );
        t.insert(
            TAG_HELD_SINCE.to_string(),
            self.held_since.map(rfc).unwrap_or_default(),
        );
        t.insert(TAG_VERSION.to_string(), self.version.to_string());
        t.insert(TAG_OFFERINGS.to_string(), offerings_tag(&self.unavailable));
        t
    }

    /// Tags store whole seconds; compare memories at that precision.
    fn normalized(&self) -> Memory {
        Memory::from_tags(&self.to_tags(), DateTime::<Utc>::MAX_UTC).0
    }
}

/// The marks as a tag value: the newest that fit in a tag's 256 characters.
fn offerings_tag(marks: &[Mark]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut len = 0;
    for mark in marks.iter().rev() {
        let o = &mark.offering;
        let e = format!(
            "{}/{}/{}",
            mark.at.timestamp(),
            o.zone.as_deref().unwrap_or("*"),
            o.instance_type.as_deref().unwrap_or("*")
        );
        if len + e.len() + 1 > 256 {
            break;
        }
        len += e.len() + 1;
        out.push(e);
    }
    out.reverse();
    out.join(" ")
}

/// The outcome of one launch attempt in the primary group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub at: DateTime<Utc>,
    pub activity_id: String,
    pub kind: LaunchKind,
    /// Where a capacity failure happened, if named.
    pub offering: Offering,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchKind {
    Success,
    /// A launch failure carrying one of the capacity codes.
    CapacityFailure(String),
    /// Any other failure (bad AMI, IAM, quota, subnet): not a reason to fail over.
    OtherFailure,
}

/// The error code of a launch failure's free-text StatusMessage, parsed
/// from the forms AWS writes (REFERENCE.md, EventBridge events):
/// - "Could not launch Spot Instances. <Code> - <text>. Launching EC2
///   instance failed." (mixed-instances groups): the word before " - ";
/// - "We currently do not have sufficient <type> capacity in the
///   Availability Zone you requested ..." and "There is no Spot capacity
///   available that matches your request.": `InsufficientInstanceCapacity`;
/// - "Max spot instance count exceeded": `MaxSpotInstanceCountExceeded`;
/// - "... than your current vCPU limit ...": `VcpuLimitExceeded`.
///
/// A message in none of these forms has no code: it is not a capacity
/// failure, whatever words it contains.
pub fn failure_code(status_message: &str) -> Option<String> {
    // "<Code> - <text>": a CamelCase word of ASCII letters and digits.
    for (i, _) in status_message.match_indices(" - ") {
        let before = &status_message[..i];
        let word = before
            .rsplit(|c: char| !c.is_ascii_alphanumeric())
            .next()
            .unwrap_or("");
        if word.len() >= 3
            && word.starts_with(|c: char| c.is_ascii_uppercase())
            && word.chars().any(|c| c.is_ascii_lowercase())
        {
            return Some(word.to_string());
        }
    }
    let lower = status_message.to_ascii_lowercase();
    if lower.contains("we currently do not have sufficient") && lower.contains("capacity")
        || lower.contains("there is no spot capacity available")
    {
        return Some("InsufficientInstanceCapacity".into());
    }
    if lower.contains("max spot instance count exceeded") {
        return Some("MaxSpotInstanceCountExceeded".into());
    }
    if lower.contains("current vcpu limit") {
        return Some("VcpuLimitExceeded".into());
    }
    None
}

/// Every form of launch failure that can fail over, as (the control
/// template's EventBridge `wildcard` for it, case-sensitive as EventBridge
/// matches; the code [`failure_code`] reads; a message in that form, from
/// REFERENCE.md). One list for the rule and the parser: a test holds the
/// template's `LaunchUnsuccessfulRule` to it, so the rule neither drops a
/// form the controller fails over on nor wakes it for one that never does
/// (`Unsupported`, `SpotMaxPriceTooLow`). A code added to
/// `failover.capacity_codes` needs its wildcard in the rule too (or the
/// one-minute tick's activity poll finds it).
pub const FAILOVER_FORMS: &[(&str, &str, &str)] = &[
    ("*InsufficientInstanceCapacity*", "InsufficientInstanceCapacity",
     "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity available that matches your request. Launching EC2 instance failed."),
    ("*InsufficientCapacity*", "InsufficientCapacity",
     "Could not launch Spot Instances. InsufficientCapacity - There is not enough capacity to fulfill your request. Launching EC2 instance failed."),
    ("*UnfulfillableCapacity*", "UnfulfillableCapacity",
     "Could not launch Spot Instances. UnfulfillableCapacity - Unable to fulfill capacity due to your request configuration. Launching EC2 instance failed."),
    ("*InsufficientHostCapacity*", "InsufficientHostCapacity",
     "Could not launch On-Demand Instances. InsufficientHostCapacity - There is not enough capacity to fulfill your Dedicated Host request. Launching EC2 instance failed."),
    ("*InsufficientReservedInstanceCapacity*", "InsufficientReservedInstanceCapacity",
     "Could not launch On-Demand Instances. InsufficientReservedInstanceCapacity - Insufficient capacity to fulfill the Reserved Instance request. Launching EC2 instance failed."),
    ("*do not have sufficient*capacity*", "InsufficientInstanceCapacity",
     "We currently do not have sufficient g4dn.xlarge capacity in the Availability Zone you requested (us-east-1a). Our system will be working on provisioning additional capacity."),
    ("*no Spot capacity available*", "InsufficientInstanceCapacity",
     "There is no Spot capacity available that matches your request."),
    ("*MaxSpotInstanceCountExceeded*", "MaxSpotInstanceCountExceeded",
     "Could not launch Spot Instances. MaxSpotInstanceCountExceeded - Max spot instance count exceeded. Launching EC2 instance failed."),
    ("*Max spot instance count exceeded*", "MaxSpotInstanceCountExceeded",
     "Max spot instance count exceeded. Launching EC2 instance failed."),
    ("*VcpuLimitExceeded*", "VcpuLimitExceeded",
     "Could not launch Spot Instances. VcpuLimitExceeded - You have requested more vCPU capacity than your current vCPU limit of 64 allows. Launching EC2 instance failed."),
    ("*current vCPU limit*", "VcpuLimitExceeded",
     "You have requested more vCPU capacity than your current vCPU limit of 64 allows for the instance bucket that the specified instance type belongs to. Launching EC2 instance failed."),
];

/// The failover code of a failure: its parsed code, if it is one of `codes`
/// (exact match).
pub fn capacity_code(status_message: &str, codes: &[String]) -> Option<String> {
    failure_code(status_message).filter(|c| codes.iter().any(|x| x == c))
}

/// What a reconcile sees of the fallback group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FallbackGroup {
    pub desired: i32,
    pub max: i32,
    pub in_service: i32,
    /// InService instances protected from scale-in: their agents run jobs.
    pub busy: i32,
    /// Whether its scaling policy is enabled, where AWS tells (moto does not).
    pub policy_enabled: Option<bool>,
}

impl Default for Settings {
    /// The configuration's defaults (`controller/src/config.rs`).
    fn default() -> Settings {
        Settings {
            failures: 1,
            window: Duration::from_secs(600),
            capacity_ttl: Duration::from_secs(180),
            recovery_for: Duration::from_secs(600),
            min_dwell: Duration::from_secs(300),
            step: 1,
            cap: 10,
            shortage_for: Duration::from_secs(120),
            max_busy_age: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

/// What a reconcile sees besides the fallback group, when it can.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Seen {
    /// The primary group; `None`: not observed, and the shortage rule is
    /// not applied (failover on capacity failures alone).
    pub primary: Option<PrimaryGroup>,
    /// Visible messages in the queue, if read.
    pub visible: Option<i64>,
    /// In-flight messages (received, not yet deleted), if read.
    pub in_flight: Option<i64>,
    /// In a cascade: the group before this one is closing or closed (its
    /// capacity, or capacity further up, is back). This group then closes
    /// too and does not open. Always false for the first fallback.
    pub earlier_closing: bool,
    /// In a cascade: a group after this one is still failed over. This
    /// one's failback waits for it (the last opened closes first).
    pub later_open: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PrimaryGroup {
    pub desired: i32,
    /// Its MaxSize: how far a failback may raise its desired capacity.
    pub max: i32,
    pub in_service: i32,
    /// InService instances protected from scale-in: running jobs.
    pub busy: i32,
    /// Instances on their way in (`Pending`, `Pending:Wait`, `Pending:Proceed`).
    pub pending: i32,
}

impl PrimaryGroup {
    pub fn short(&self) -> bool {
        self.desired > self.in_service + self.pending
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub failures: u32,
    pub window: Duration,
    pub capacity_ttl: Duration,
    /// The primary not short of its desired capacity this long: recovered.
    pub recovery_for: Duration,
    pub min_dwell: Duration,
    pub step: i32,
    pub cap: i32,
    /// The primary must be short of its desired capacity this long (with
    /// capacity failures) before a failover.
    pub shortage_for: Duration,
    /// Failing back, busy instances still protected this long after the
    /// fallback's intake closed have their protection released, with an
    /// alarm (a dead agent's instance must not hold `failing-back` for
    /// ever). A live agent takes no job once intake is closed, so only one
    /// whose job outlives this is released: set it above the longest job.
    /// `None`: no limit.
    pub max_busy_age: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    SetFallbackMaxSize {
        from: i32,
        to: i32,
    },
    EnableFallbackPolicy,
    /// Raise the fallback's desired capacity (on failover: the primary's shortfall).
    SetFallbackDesired {
        from: i32,
        to: i32,
    },
    /// Failing back: raise the desired capacity of the group before (the
    /// primary) by the work the fallback carries, within its MaxSize.
    SetPrimaryDesired {
        from: i32,
        to: i32,
    },
    SaveMemory {
        tags: BTreeMap<String, String>,
    },
    Notify {
        from: Mode,
        to: Mode,
        reason: String,
    },
    /// The failing-back gate has been held by `busy` protected instances
    /// since `held_since`, past `max_busy_age`: release their protection
    /// and raise an alarm.
    ReleaseStaleProtection {
        busy: i32,
        held_since: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub memory: Memory,
    /// The primary had a capacity failure within the TTL.
    pub capacity_unavailable: bool,
    /// Failed over only because a later group of the cascade is still
    /// open: this group would fail back otherwise.
    pub holding_for_later: bool,
    pub reason: String,
    pub actions: Vec<Action>,
}

fn dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// `d` before `now`, or the earliest time there is (a configured duration
/// may be absurdly long; it must not panic).
fn before(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    now.checked_sub_signed(dur(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn later(a: Option<DateTime<Utc>>, b: DateTime<Utc>) -> Option<DateTime<Utc>> {
    Some(a.map_or(b, |a| a.max(b)))
}

/// A failure's id as the memory keeps it: only characters that survive the
/// tag encoding (`secs/id`, space-separated; event input is outside
/// input), cut to [`ID_CHARS`]; none left, its time.
pub fn failure_id(l: &Launch, now: DateTime<Utc>) -> String {
    let id: String = l
        .activity_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(ID_CHARS)
        .collect();
    if id.is_empty() {
        format!("t{}", l.at.min(now).timestamp())
    } else {
        id
    }
}

/// Merges launch outcomes into the memory (idempotent, order-independent).
fn merge(m: &mut Memory, launches: &[Launch], now: DateTime<Utc>, s: &Settings) {
    // Expired entries go first, so that one cannot hide a new failure that
    // reuses its id (found by the property test: merging twice differed).
    let horizon = before(now, s.window);
    m.failures.retain(|f| f.at >= horizon);
    for l in launches {
        // An event from the future (clock skew) counts as now.
        let at = l.at.min(now);
        match &l.kind {
            LaunchKind::Success => m.last_success = later(m.last_success, at),
            LaunchKind::CapacityFailure(_) => {
                let id = failure_id(l, now);
                if !m.failures.iter().any(|f| f.id == id) {
                    m.failures.push(Failure { at, id });
                }
                let offering = Offering {
                    zone: l.offering.zone.as_deref().and_then(tag_safe),
                    instance_type: l.offering.instance_type.as_deref().and_then(tag_safe),
                };
                if offering.zone.is_some() || offering.instance_type.is_some() {
                    match m.unavailable.iter_mut().find(|x| x.offering == offering) {
                        Some(x) => x.at = x.at.max(at),
                        None => m.unavailable.push(Mark { at, offering }),
                    }
                }
                m.last_capacity_failure = later(m.last_capacity_failure, at);
            }
            LaunchKind::OtherFailure => {}
        }
    }
    m.failures.retain(|f| f.at >= horizon);
    m.failures.sort_by_key(|f| f.at);
    let ttl = before(now, s.capacity_ttl);
    m.unavailable.retain(|x| x.at > ttl);
    m.unavailable.sort_by(|a, b| {
        (a.at, &a.offering.zone, &a.offering.instance_type).cmp(&(
            b.at,
            &b.offering.zone,
            &b.offering.instance_type,
        ))
    });
    let excess = m.failures.len().saturating_sub(MAX_FAILURES);
    m.failures.drain(..excess);
}

/// The decision, seeing only the fallback group (no shortage rule, no
/// backlog): new memory and the actions to take.
pub fn reconcile(
    memory: &Memory,
    fallback: &FallbackGroup,
    launches: &[Launch],
    now: DateTime<Utc>,
    s: &Settings,
) -> Plan {
    reconcile_seen(memory, fallback, &Seen::default(), launches, now, s)
}

/// The decision: new memory and the actions to take.
pub fn reconcile_seen(
    memory: &Memory,
    fallback: &FallbackGroup,
    seen: &Seen,
    launches: &[Launch],
    now: DateTime<Utc>,
    s: &Settings,
) -> Plan {
    let stored = memory.normalized();
    let mut m = stored.clone();
    merge(&mut m, launches, now, s);
    if seen.earlier_closing {
        // The group before is not in use (or closing): its shortage is not
        // ours. Once it is open again, its shortage must last
        // `shortage_for` anew before this group opens.
        m.primary_short_since = None;
        m.primary_whole_since = None;
    } else if let Some(p) = seen.primary {
        if p.short() {
            m.primary_short_since = Some(m.primary_short_since.map_or(now, |t| t.min(now)));
            m.primary_whole_since = None;
        } else {
            m.primary_short_since = None;
            m.primary_whole_since = Some(m.primary_whole_since.map_or(now, |t| t.min(now)));
        }
    }
    // Not observed (throttled, its region impaired): the last reading
    // stands, short since then or whole; only a primary never read at all
    // leaves the rule unable to hold the failover back.
    let short_long_enough = match (seen.primary, m.primary_short_since, m.primary_whole_since) {
        (None, None, None) => true,
        (_, short, _) => short.is_some_and(|t| now - t >= dur(s.shortage_for)),
    };
    // Nobody needs the fallback: nothing waiting, nothing running (in-flight
    // messages count: busy fallback instances need not be protected), no
    // busy fallback instance.
    let unneeded = seen.visible == Some(0) && seen.in_flight == Some(0) && fallback.busy == 0;
    let capacity_unavailable = m
        .last_capacity_failure
        .is_some_and(|t| now - t < dur(s.capacity_ttl));
    let dwelled = now - m.since >= dur(s.min_dwell);
    // Only failures since the mode began count for a new failover: those
    // before it were already answered (by the failover that `normal` or
    // `failing-back` ended).
    let fresh: Vec<&Failure> = m.failures.iter().filter(|f| f.at >= m.since).collect();
    let failures_in_window = fresh.len() as u32;
    let fresh_unavailable = fresh.iter().any(|f| now - f.at < dur(s.capacity_ttl));
    // Every way into `failed-over` (from normal or failing back): capacity
    // failures, the group before short for `shortage_for`, work waiting,
    // and the minimum dwell in the current mode.
    let fail_over = failures_in_window >= s.failures
        && fresh_unavailable
        && short_long_enough
        && !unneeded
        && !seen.earlier_closing
        && dwelled;
    // Recovery by capacity: the group before has held its desired capacity
    // (InService + pending) for `recovery_for`, whatever per-zone failures
    // it logged meanwhile.
    let recovered = m
        .primary_whole_since
        .is_some_and(|t| now - t >= dur(s.recovery_for));
    let holding_for_later = m.mode == Mode::FailedOver
        && seen.later_open
        && dwelled
        && (recovered || unneeded || seen.earlier_closing);
    let (next, reason) = match m.mode {
        Mode::Normal if fail_over => (
            Mode::FailedOver,
            format!(
                "{failures_in_window} capacity failure(s) in the primary within the window, and the primary short of its desired capacity"
            ),
        ),
        Mode::Normal => (Mode::Normal, "primary healthy".to_string()),
        Mode::FailedOver => {
            if holding_for_later {
                (
                    Mode::FailedOver,
                    "waiting for the later groups of the cascade to close first".to_string(),
                )
            } else if recovered && dwelled {
                (
                    Mode::FailingBack,
                    "the primary has held its desired capacity for failover.recovery_for"
                        .to_string(),
                )
            } else if seen.earlier_closing && dwelled {
                (
                    Mode::FailingBack,
                    "capacity is back earlier in the cascade".to_string(),
                )
            } else if unneeded && dwelled {
                (
                    Mode::FailingBack,
                    "no backlog and no busy fallback instance: the fallback is not needed".to_string(),
                )
            } else if recovered {
                (
                    Mode::FailedOver,
                    "primary recovered; waiting for the minimum dwell".to_string(),
                )
            } else {
                (
                    Mode::FailedOver,
                    "primary capacity not back yet".to_string(),
                )
            }
        }
        Mode::FailingBack => {
            if fail_over {
                (
                    Mode::FailedOver,
                    "capacity failures in the primary while failing back, and the primary short of its desired capacity".to_string(),
                )
            } else if fallback.desired == 0 && fallback.in_service == 0 && dwelled {
                (Mode::Normal, "fallback group drained".to_string())
            } else {
                (Mode::FailingBack, "draining the fallback group".to_string())
            }
        }
    };

    let mut actions = Vec::new();
    if next != m.mode {
        actions.push(Action::Notify {
            from: m.mode,
            to: next,
            reason: reason.clone(),
        });
        m.mode = next;
        m.since = now;
    }

    // What the group before cannot hold: its desired capacity less its
    // InService instances. Pending ones are not counted as held, so the
    // fallback shrinks only as the group before really takes the work.
    let carried = seen
        .primary
        .filter(|_| !seen.earlier_closing)
        .map(|p| (p.desired - p.in_service).max(0));
    // The gate. Never below the busy instances: lowering MaxSize under them
    // would have the group pick instances to terminate.
    let busy = fallback.busy.max(0);
    let target = match next {
        // The primary's shortfall within the cap; the primary unread: the cap.
        Mode::FailedOver => carried.map_or(s.cap, |c| c.min(s.cap)).max(busy),
        // Only down while failing back: to what the primary still cannot
        // hold; closing for another reason, or the primary unread, step by
        // step or held.
        Mode::FailingBack => match carried {
            Some(c) => c.min(fallback.max),
            None if seen.earlier_closing || unneeded => {
                (fallback.max.min(fallback.desired) - s.step).max(0)
            }
            None => fallback.max,
        }
        .max(busy),
        Mode::Normal => busy,
    };
    if target != fallback.max {
        actions.push(Action::SetFallbackMaxSize {
            from: fallback.max,
            to: target,
        });
    }
    // Make before break. Once the group before has capacity again (not
    // short), a hand-over starts: its target is the work in flight then,
    // the primary's busy instances and the fallback's (within the
    // primary's MaxSize), fixed so that new work does not move it. The
    // primary's desired capacity is raised to it while it has fewer
    // instances (InService and pending) than that, also after target
    // tracking lowered it (a busy, protected fleet has a desired capacity
    // below its instances; AWS keeps scale-in off while new instances warm
    // up). Once the primary has that many InService, and its MaxSize can
    // hold all the work in flight, the fallback's intake closes: its agents
    // finish their jobs and leave. A primary at its MaxSize with more work
    // than it can hold keeps the fallback open: the fleet needs both.
    // Failed over, intake reopens as soon as the group before is short
    // again (a new hand-over starts once it is not); failing back, it stays
    // closed.
    let mut primary_holds = false;
    if let (Mode::FailedOver | Mode::FailingBack, Some(p), false) =
        (next, seen.primary, seen.earlier_closing)
    {
        let work = p.busy.max(0) + fallback.busy.max(0);
        if p.short() {
            if next == Mode::FailedOver {
                m.handover_to = None;
            }
        } else {
            // Within the primary's MaxSize whatever the tag says: a larger
            // target (a tampered tag, a MaxSize lowered mid-hand-over) is a
            // desired capacity AWS refuses every tick, and the memory is
            // never saved after a refused action.
            let to = (*m.handover_to.get_or_insert(work.min(p.max))).clamp(0, p.max.max(0));
            m.handover_to = Some(to);
            if p.in_service + p.pending < to && p.desired < to {
                actions.push(Action::SetPrimaryDesired {
                    from: p.desired,
                    to,
                });
            }
            primary_holds = p.in_service >= to && work <= p.max;
        }
    }
    if next == Mode::Normal {
        m.handover_to = None;
    }
    let primary_short = seen.primary.is_some_and(|p| p.short());
    m.intake_closed = match next {
        Mode::Normal => false,
        Mode::FailedOver => !primary_short && (m.intake_closed || primary_holds),
        Mode::FailingBack => m.intake_closed || primary_holds || unneeded || seen.earlier_closing,
    };
    // Busy instances still protected after intake closed: how long, and
    // past the limit release them (their agents may be dead) and say so.
    // A live agent takes no new job once intake is closed, so under a load
    // that never stops it is not released for being busy.
    let held = m.intake_closed && busy > 0;
    m.held_since = if held {
        Some(m.held_since.map_or(now, |t| t.min(now)))
    } else {
        None
    };
    if let (Some(since), Some(limit)) = (m.held_since, s.max_busy_age) {
        if now - since >= dur(limit) {
            actions.push(Action::ReleaseStaleProtection {
                busy,
                held_since: since,
            });
            m.held_since = None;
        }
    }
    let entered_failover = next == Mode::FailedOver && memory.mode != Mode::FailedOver;
    // On failover the fallback takes over what the primary is short of at
    // once, rather than growing from one instance at target tracking's pace
    // (3 minutes per step, with warm-up between). Nothing when it is short
    // of nothing (its pending instances may yet arrive).
    if let (true, Some(p)) = (entered_failover, seen.primary) {
        let shortfall = (p.desired - p.in_service - p.pending).max(0);
        let to = shortfall.min(target);
        if to > fallback.desired {
            actions.push(Action::SetFallbackDesired {
                from: fallback.desired,
                to,
            });
        }
    }
    if next == Mode::FailedOver && (entered_failover || fallback.policy_enabled == Some(false)) {
        actions.push(Action::EnableFallbackPolicy);
    }
    let mut m = m.normalized();
    if m != stored || memory.to_tags() != stored.to_tags() {
        // Wrapping: a version tag written at u64::MAX must not overflow,
        // and versions are only compared for equality, so each write must
        // still change it (saturating would make every later write look
        // like no write to a concurrent writer).
        m.version = stored.version.wrapping_add(1);
        actions.push(Action::SaveMemory { tags: m.to_tags() });
    }
    Plan {
        memory: m,
        capacity_unavailable,
        holding_for_later,
        reason,
        actions,
    }
}

/// The cascade's mode, for the alarm and `status`: failed over while any
/// fallback is, else failing back while any is, else normal.
pub fn cascade_mode(modes: impl IntoIterator<Item = Mode>) -> Mode {
    modes
        .into_iter()
        .fold(Mode::Normal, |acc, m| match (acc, m) {
            (Mode::FailedOver, _) | (_, Mode::FailedOver) => Mode::FailedOver,
            (Mode::FailingBack, _) | (_, Mode::FailingBack) => Mode::FailingBack,
            _ => Mode::Normal,
        })
}

/// One link of the cascade: a fallback group, and what is seen of the
/// group before it (the primary for the first link), whose shortage opens
/// it. Its memory is in its own tags.
#[derive(Debug, Clone)]
pub struct Link<'a> {
    pub memory: &'a Memory,
    pub group: FallbackGroup,
    /// The group before, if read (`None`: the shortage rule is not applied).
    pub upstream: Option<PrimaryGroup>,
    /// Launch outcomes of the group before.
    pub launches: &'a [Launch],
    /// Its cap differs per group; the rest is shared.
    pub settings: &'a Settings,
}

/// The decision over a cascade of fallback groups, first to last: one plan
/// per link. Each link is the two-group decision ([`reconcile_seen`])
/// between a group and the one before it, with two couplings:
/// - a link opens only while the one before is open and not closing (a
///   group that is not in use cannot be short for capacity), and closes
///   when the one before closes (capacity came back earlier in the list);
/// - a link's failback waits while the next link is still failed over, so
///   the last opened starts closing first, one decision ahead of the one
///   before it. That next link is told to close meanwhile.
///
/// With one link this is exactly [`reconcile_seen`].
pub fn cascade(
    links: &[Link<'_>],
    visible: Option<i64>,
    in_flight: Option<i64>,
    now: DateTime<Utc>,
) -> Vec<Plan> {
    cascade_prefix(links, false, visible, in_flight, now)
}

/// [`cascade`] over the first links only, when the one after them could
/// not be read (its region impaired): the links before it are decided
/// (a failover still happens), and that one is taken as failed over, so
/// the last given link holds its gate rather than close under it.
pub fn cascade_prefix(
    links: &[Link<'_>],
    next_unread: bool,
    visible: Option<i64>,
    in_flight: Option<i64>,
    now: DateTime<Utc>,
) -> Vec<Plan> {
    let mut plans: Vec<Plan> = Vec::with_capacity(links.len());
    for (i, l) in links.iter().enumerate() {
        let seen = Seen {
            primary: l.upstream,
            visible,
            in_flight,
            // The group before is closing, or handing its own work back (its
            // intake closed): this one closes too.
            earlier_closing: plans.last().is_some_and(|p| {
                p.memory.mode != Mode::FailedOver || p.holding_for_later || p.memory.intake_closed
            }),
            later_open: match links.get(i + 1) {
                Some(next) => next.memory.mode == Mode::FailedOver,
                None => next_unread,
            },
        };
        plans.push(reconcile_seen(
            l.memory, &l.group, &seen, l.launches, now, l.settings,
        ));
    }
    plans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }
    fn settings() -> Settings {
        Settings {
            failures: 1,
            window: Duration::from_secs(600),
            capacity_ttl: Duration::from_secs(180),
            recovery_for: Duration::from_secs(600),
            min_dwell: Duration::from_secs(300),
            step: 1,
            cap: 10,
            ..Settings::default()
        }
    }
    fn fail(at: i64, id: &str) -> Launch {
        Launch {
            at: t(at),
            activity_id: id.into(),
            kind: LaunchKind::CapacityFailure("InsufficientInstanceCapacity".into()),
            offering: Offering::default(),
        }
    }
    fn ok(at: i64, id: &str) -> Launch {
        Launch {
            at: t(at),
            activity_id: id.into(),
            kind: LaunchKind::Success,
            offering: Offering::default(),
        }
    }
    fn other(at: i64, id: &str) -> Launch {
        Launch {
            at: t(at),
            activity_id: id.into(),
            kind: LaunchKind::OtherFailure,
            offering: Offering::default(),
        }
    }
    fn group(desired: i32, max: i32, in_service: i32, busy: i32) -> FallbackGroup {
        FallbackGroup {
            desired,
            max,
            in_service,
            busy,
            policy_enabled: None,
        }
    }
    fn max_to(p: &Plan) -> Option<i32> {
        p.actions.iter().find_map(|a| match a {
            Action::SetFallbackMaxSize { to, .. } => Some(*to),
            _ => None,
        })
    }
    fn mode_change(p: &Plan) -> Option<(Mode, Mode)> {
        p.actions.iter().find_map(|a| match a {
            Action::Notify { from, to, .. } => Some((*from, *to)),
            _ => None,
        })
    }
    /// The memory after `p`, carried through its tags as AWS would.
    fn carried(m: &Memory, p: &Plan) -> Memory {
        let tags = p
            .actions
            .iter()
            .find_map(|a| match a {
                Action::SaveMemory { tags } => Some(tags.clone()),
                _ => None,
            })
            .unwrap_or_else(|| m.to_tags());
        Memory::from_tags(&tags, DateTime::<Utc>::MAX_UTC).0
    }

    /// Reconciles and carries the memory through its tags, as AWS would.
    fn step(m: &Memory, g: &FallbackGroup, l: &[Launch], now: i64) -> (Memory, Plan) {
        let p = reconcile(m, g, l, t(now), &settings());
        (carried(m, &p), p)
    }

    #[test]
    fn a_capacity_failure_fails_over_and_opens_the_gate() {
        let (m, p) = step(&Memory::initial(), &group(0, 0, 0, 0), &[fail(0, "a1")], 5);
        assert_eq!(m.mode, Mode::FailedOver);
        assert_eq!(mode_change(&p), Some((Mode::Normal, Mode::FailedOver)));
        assert_eq!(max_to(&p), Some(10));
        assert!(p.actions.contains(&Action::EnableFallbackPolicy));
        assert!(p.capacity_unavailable);
    }

    #[test]
    fn other_failures_never_fail_over() {
        let (m, p) = step(
            &Memory::initial(),
            &group(0, 0, 0, 0),
            &[other(0, "ami"), other(1, "iam")],
            5,
        );
        assert_eq!(m.mode, Mode::Normal);
        assert_eq!(mode_change(&p), None);
        assert_eq!(max_to(&p), None);
    }

    #[test]
    fn threshold_within_the_window() {
        let s = Settings {
            failures: 3,
            ..settings()
        };
        let m = Memory::initial();
        let g = group(0, 0, 0, 0);
        let p = reconcile(&m, &g, &[fail(0, "a"), fail(10, "b")], t(20), &s);
        assert_eq!(p.memory.mode, Mode::Normal);
        // The same two again (duplicates) do not make three.
        let p = reconcile(&p.memory, &g, &[fail(0, "a"), fail(10, "b")], t(30), &s);
        assert_eq!(p.memory.mode, Mode::Normal);
        // Outside the window they do not count.
        let p2 = reconcile(&p.memory, &g, &[fail(700, "c")], t(700), &s);
        assert_eq!(p2.memory.mode, Mode::Normal);
        // A third distinct one within the window does.
        let p3 = reconcile(&p.memory, &g, &[fail(40, "c")], t(45), &s);
        assert_eq!(p3.memory.mode, Mode::FailedOver);
    }

    #[test]
    fn a_stale_failure_delivered_late_does_not_fail_over() {
        // Delivered an hour late: outside the TTL and the window.
        let (m, _) = step(
            &Memory::initial(),
            &group(0, 0, 0, 0),
            &[fail(0, "old")],
            3600,
        );
        assert_eq!(m.mode, Mode::Normal);
    }

    fn failed_over_at(at: i64) -> Memory {
        step(
            &Memory::initial(),
            &group(0, 0, 0, 0),
            &[fail(at, "f0")],
            at,
        )
        .0
    }

    fn pg(desired: i32, in_service: i32, pending: i32) -> PrimaryGroup {
        PrimaryGroup {
            pending,
            ..up(desired, in_service)
        }
    }

    /// With `busy` of its InService instances running jobs.
    fn busy(p: PrimaryGroup, busy: i32) -> PrimaryGroup {
        PrimaryGroup { busy, ..p }
    }

    /// Reconciles with the primary and a backlog of 50 seen, and carries
    /// the memory through its tags.
    fn step_p(
        m: &Memory,
        g: &FallbackGroup,
        p: PrimaryGroup,
        l: &[Launch],
        now: i64,
    ) -> (Memory, Plan) {
        let seen = Seen {
            primary: Some(p),
            visible: Some(50),
            in_flight: Some(0),
            ..Seen::default()
        };
        let plan = reconcile_seen(m, g, &seen, l, t(now), &settings());
        (carried(m, &plan), plan)
    }

    fn raise_to(p: &Plan) -> Option<i32> {
        p.actions.iter().find_map(|a| match a {
            Action::SetPrimaryDesired { to, .. } => Some(*to),
            _ => None,
        })
    }

    /// The primary holding 4 busy of its own and room for the fallback's
    /// busy work.
    fn whole(g: &FallbackGroup) -> PrimaryGroup {
        busy(up(4 + g.busy, 4 + g.busy), 4)
    }

    /// Failed over at 0; the primary whole from 100 (asked for the
    /// fallback's work then); failing back at 700 (`recovery_for` 600 s),
    /// its intake closed.
    fn failing_back(g: &FallbackGroup) -> Memory {
        let p = whole(g);
        let (m, _) = step_p(&failed_over_at(0), g, p, &[], 100);
        assert_eq!(m.mode, Mode::FailedOver);
        let (m, _) = step_p(&m, g, p, &[], 700);
        assert_eq!(m.mode, Mode::FailingBack);
        m
    }

    #[test]
    fn recovery_is_the_primary_holding_its_capacity_for_recovery_for() {
        let m = failed_over_at(0);
        let g = group(4, 10, 4, 2);
        // Short for a long time, with launches succeeding in other zones:
        // no recovery.
        let (m, _) = step_p(&m, &g, up(10, 4), &[ok(100, "s1"), ok(4900, "s2")], 5000);
        assert_eq!(m.mode, Mode::FailedOver);
        // Whole (InService + pending = desired) from 5060, while a dry zone
        // logs a capacity failure every few minutes.
        let (m, _) = step_p(&m, &g, pg(10, 8, 2), &[fail(5060, "z1")], 5060);
        assert_eq!(m.primary_whole_since, Some(t(5060)));
        let (m, _) = step_p(&m, &g, up(10, 10), &[fail(5400, "z2")], 5400);
        assert_eq!(m.mode, Mode::FailedOver);
        // Short once: the clock starts again.
        let (m, _) = step_p(&m, &g, up(10, 9), &[], 5500);
        assert_eq!(m.primary_whole_since, None);
        let (m, _) = step_p(&m, &g, up(10, 10), &[fail(5600, "z3")], 5600);
        let (m, _) = step_p(&m, &g, up(10, 10), &[], 6199);
        assert_eq!(m.mode, Mode::FailedOver, "599 s whole");
        let (m, p) = step_p(&m, &g, up(10, 10), &[fail(6200, "z4")], 6200);
        assert_eq!(m.mode, Mode::FailingBack, "600 s whole, failures or not");
        assert_eq!(mode_change(&p), Some((Mode::FailedOver, Mode::FailingBack)));
    }

    #[test]
    fn launch_successes_are_not_a_recovery_while_the_primary_is_short() {
        let m = failed_over_at(100);
        let (m, _) = step_p(&m, &group(2, 10, 2, 0), up(6, 2), &[ok(50, "s-old")], 200);
        let (m, _) = step_p(&m, &group(2, 10, 2, 0), up(6, 3), &[ok(1500, "s")], 2000);
        assert_eq!(m.mode, Mode::FailedOver);
    }

    #[test]
    fn the_gate_is_what_the_primary_cannot_hold_and_failback_makes_before_it_breaks() {
        let m = failed_over_at(0);
        // The primary is short 6: the gate opens that far, not to the cap.
        let (m, p) = step_p(&m, &group(5, 10, 5, 3), up(8, 2), &[], 60);
        assert_eq!(max_to(&p), Some(6));
        assert_eq!(raise_to(&p), None, "not while it is short");
        // Back and whole at 100 with its 8, all busy (its desired shrank
        // meanwhile): asked for the work in flight, its 8 and the
        // fallback's 3 busy; the gate drops to what it cannot hold now (0),
        // never below the busy 3; intake stays open meanwhile.
        let (m, p) = step_p(&m, &group(5, 6, 5, 3), busy(up(8, 8), 8), &[], 100);
        assert_eq!(m.mode, Mode::FailedOver);
        assert_eq!(raise_to(&p), Some(11));
        assert_eq!(max_to(&p), Some(3));
        assert!(!m.intake_closed);
        // Its new instances pending: the gate holds (3 not yet held), no
        // second raise, intake open.
        let (m, p) = step_p(&m, &group(3, 3, 3, 3), busy(pg(11, 8, 3), 8), &[], 160);
        assert_eq!((max_to(&p), raise_to(&p)), (None, None));
        assert!(!m.intake_closed);
        // All InService (the new three idle): it holds the work in flight;
        // intake closes, and no further raise (its own InService are not
        // counted).
        let (m, p) = step_p(&m, &group(3, 3, 3, 3), busy(up(11, 11), 8), &[], 220);
        assert_eq!(m.mode, Mode::FailedOver);
        assert!(m.intake_closed);
        assert_eq!(raise_to(&p), None);
        // Short again (a reclaim) while still failed over: intake reopens
        // and the gate follows the shortfall.
        let (m, p) = step_p(&m, &group(3, 3, 3, 3), busy(up(11, 7), 7), &[], 280);
        assert!(!m.intake_closed);
        assert_eq!(max_to(&p), Some(4));
        // Whole again: a new hand-over; its 11 InService already hold the
        // 8 + 3 in flight: nothing to raise, intake closes.
        let (m, p) = step_p(&m, &group(3, 4, 3, 3), busy(up(11, 11), 8), &[], 340);
        assert!(m.intake_closed);
        assert_eq!(raise_to(&p), None);
        // Recovered (whole since 340): failing back; intake stays closed
        // while the busy agents finish; the gate never goes below them.
        let (m, p) = step_p(&m, &group(3, 3, 3, 3), busy(up(11, 11), 8), &[], 940);
        assert_eq!(m.mode, Mode::FailingBack);
        assert!(m.intake_closed);
        assert_eq!(max_to(&p), None);
        assert_eq!(m.held_since, Some(t(340)), "held since intake closed");
        let (m, p) = step_p(&m, &group(1, 3, 1, 1), busy(up(11, 11), 10), &[], 1000);
        assert_eq!(max_to(&p), Some(1));
        assert!(m.intake_closed);
        let (m, p) = step_p(&m, &group(0, 1, 0, 0), busy(up(11, 11), 11), &[], 1240);
        assert_eq!(max_to(&p), Some(0));
        assert_eq!(m.mode, Mode::Normal);
        assert!(!m.intake_closed);
        assert_eq!(m.held_since, None);
    }

    #[test]
    fn the_primary_is_asked_for_the_fallbacks_work_once_per_hand_over() {
        // Every primary instance busy (protected) under a backlog: each
        // tick the work in flight exceeds its desired capacity by the
        // fallback's busy three. It is asked once, not every tick.
        let g = group(3, 3, 3, 3);
        let mut m = failed_over_at(0);
        let mut raises = Vec::new();
        for (k, desired) in [(1, 8), (2, 11), (3, 11), (4, 11)] {
            let p = busy(up(desired, desired), desired);
            let (next, plan) = step_p(&m, &g, p, &[], 60 * k);
            raises.extend(raise_to(&plan));
            m = next;
        }
        assert_eq!(raises, [11]);
        assert!(m.intake_closed, "it holds the 11 asked for");
    }

    #[test]
    fn a_hand_over_target_past_the_primarys_max_size_is_cut_to_it() {
        // A tag writer (or a MaxSize lowered mid-hand-over) leaves a target
        // of 500 for a primary of MaxSize 10: it is asked for 10, which
        // AWS takes, not 500, which it refuses every tick.
        let g = group(3, 3, 3, 3);
        let mut m = failed_over_at(0);
        m.handover_to = Some(500);
        let p = PrimaryGroup {
            max: 10,
            ..busy(up(4, 4), 4)
        };
        let (next, plan) = step_p(&m, &g, p, &[], 60);
        assert_eq!(raise_to(&plan), Some(10));
        assert_eq!(next.handover_to, Some(10));
    }

    #[test]
    fn a_primary_at_its_max_size_with_more_work_keeps_the_fallback_open() {
        // 10 busy in a primary of MaxSize 10, 3 busy in the fallback: the
        // primary cannot run the 13; the fallback keeps its intake.
        let g = group(3, 3, 3, 3);
        let p = PrimaryGroup {
            max: 10,
            ..busy(up(10, 10), 10)
        };
        let mut m = failed_over_at(0);
        for now in [60, 120, 700, 760, 820] {
            let (next, plan) = step_p(&m, &g, p, &[], now);
            assert_eq!(raise_to(&plan), None, "already at its MaxSize");
            m = next;
        }
        assert_eq!(m.mode, Mode::FailingBack);
        assert!(!m.intake_closed);
        // With room for all of it, it closes.
        let (m, _) = step_p(&m, &g, PrimaryGroup { max: 13, ..p }, &[], 880);
        assert!(m.intake_closed);
    }

    #[test]
    fn routine_churn_in_the_primary_neither_holds_intake_open_nor_reopens_it() {
        // The hand-over's target is the work in flight (7 + 3), not the
        // desired capacity: a primary with a pending replacement or two
        // holds it once 10 are InService, and a later replacement does
        // not reopen the fallback's intake.
        let g = group(3, 3, 3, 3);
        let (m, p) = step_p(&failed_over_at(0), &g, busy(pg(12, 9, 3), 7), &[], 100);
        assert_eq!(m.handover_to, Some(10));
        assert_eq!(raise_to(&p), None, "9 + 3 already on their way");
        assert!(!m.intake_closed, "9 InService of 10");
        let (m, _) = step_p(&m, &g, busy(pg(12, 10, 2), 7), &[], 160);
        assert!(m.intake_closed);
        let (m, _) = step_p(&m, &g, busy(pg(12, 9, 3), 9), &[], 220);
        assert!(m.intake_closed, "a replacement on its way");
        // Target tracking took its desired capacity under its busy
        // instances: the target holds, and the primary is asked again only
        // if it has fewer instances than that.
        let (m, p) = step_p(&m, &g, busy(pg(0, 9, 0), 9), &[], 280);
        assert_eq!(raise_to(&p), Some(10));
        assert!(m.intake_closed);
    }

    #[test]
    fn a_live_busy_fallback_under_a_load_that_never_stops_is_not_released() {
        // Failed over for two days, the fallback's 3 instances always busy
        // (back-to-back jobs), the primary short all along: protection is
        // never released (intake was never closed).
        let g = group(3, 3, 3, 3);
        let mut m = failed_over_at(0);
        for hour in 1..=48 {
            let (next, p) = step_p(
                &m,
                &g,
                up(6, 3),
                &[fail(hour * 3600 - 60, &format!("f{hour}"))],
                hour * 3600,
            );
            assert!(
                !p.actions
                    .iter()
                    .any(|a| matches!(a, Action::ReleaseStaleProtection { .. })),
                "released at hour {hour}"
            );
            m = next;
        }
        // Intake closed at 100 (the primary holds the work), an instance
        // still protected past max_busy_age (24 h) after the closure: its
        // agent is taken as dead.
        let m = failing_back(&g);
        assert!(m.intake_closed);
        let (m, p) = step_p(&m, &g, whole(&g), &[], 100 + 24 * 3600 - 1);
        assert!(!p
            .actions
            .iter()
            .any(|a| matches!(a, Action::ReleaseStaleProtection { .. })));
        let (_, p) = step_p(&m, &g, whole(&g), &[], 100 + 24 * 3600);
        assert!(p.actions.contains(&Action::ReleaseStaleProtection {
            busy: 3,
            held_since: t(100)
        }));
    }

    #[test]
    fn failing_back_respects_the_min_dwell_before_normal() {
        let m = failing_back(&group(0, 10, 0, 0));
        // Empty at once, but only 60 s in failing-back (dwell 300 s).
        let (m2, _) = step_p(&m, &group(0, 0, 0, 0), up(4, 4), &[], 760);
        assert_eq!(m2.mode, Mode::FailingBack);
        let (m3, _) = step_p(&m, &group(0, 0, 0, 0), up(4, 4), &[], 1000);
        assert_eq!(m3.mode, Mode::Normal);
    }

    #[test]
    fn failing_back_returns_to_failed_over_only_as_normal_would_fail_over() {
        let g = group(3, 3, 3, 1);
        let m = failing_back(&g);
        // A capacity failure (one dry zone) while the primary is whole:
        // the gate does not reopen.
        let (m, p) = step_p(&m, &g, whole(&g), &[fail(770, "z1")], 771);
        assert_eq!(m.mode, Mode::FailingBack);
        assert!(!p
            .actions
            .iter()
            .any(|a| matches!(a, Action::SetFallbackDesired { .. })));
        assert_eq!(max_to(&p), Some(1), "down to its busy one, not reopened");
        // Short with failures: not before `shortage_for` (120 s) ...
        let (m, _) = step_p(&m, &g, up(6, 4), &[fail(800, "f1")], 800);
        assert_eq!(m.mode, Mode::FailingBack);
        // ... nor before the min dwell (300 s since 700) ...
        let (m, _) = step_p(&m, &g, up(6, 4), &[fail(930, "f2")], 930);
        assert_eq!(m.mode, Mode::FailingBack, "short 130 s, 230 s in the mode");
        // ... then back to failed over, the gate at the shortfall.
        let (m, p) = step_p(&m, &g, up(6, 4), &[fail(1000, "f3")], 1000);
        assert_eq!(m.mode, Mode::FailedOver);
        assert_eq!(max_to(&p), Some(2), "the gate at the shortfall");
        assert!(!m.intake_closed);
    }

    #[test]
    fn the_failure_that_caused_failover_does_not_bounce_failing_back() {
        // The original failure is re-delivered (duplicate) after failing back.
        let m = failing_back(&group(2, 10, 2, 0));
        let (m2, _) = step_p(&m, &group(2, 10, 2, 0), up(4, 3), &[fail(0, "f0")], 1200);
        assert_eq!(m2.mode, Mode::FailingBack);
    }

    #[test]
    fn back_in_normal_old_failures_do_not_fail_over_again() {
        let m = failing_back(&group(0, 10, 0, 0));
        let (m, _) = step_p(&m, &group(0, 0, 0, 0), up(4, 4), &[], 1001);
        assert_eq!(m.mode, Mode::Normal);
        // Short window and TTL would not matter: re-deliver the old failure too.
        let s = Settings {
            window: Duration::from_secs(3600),
            capacity_ttl: Duration::from_secs(3600),
            ..settings()
        };
        let p = reconcile(&m, &group(0, 0, 0, 0), &[fail(0, "f0")], t(1400), &s);
        assert_eq!(p.memory.mode, Mode::Normal);
        // A new one within the min dwell in normal, the primary short again:
        // not yet; past the dwell (and shortage_for), failed over.
        let (m2, _) = step_p(&m, &group(0, 0, 0, 0), up(4, 3), &[fail(1005, "f9")], 1006);
        assert_eq!(m2.mode, Mode::Normal);
        let (m3, _) = step_p(
            &m2,
            &group(0, 0, 0, 0),
            up(4, 3),
            &[fail(1300, "f10")],
            1301,
        );
        assert_eq!(m3.mode, Mode::FailedOver);
    }

    #[test]
    fn an_unreadable_primary_keeps_its_last_reading() {
        // Whole at the last reading: capacity failures alone (one zone dry)
        // do not fail over while the primary cannot be read.
        let (m, _) = step_p(&Memory::initial(), &group(0, 0, 0, 0), up(4, 4), &[], 0);
        let (m1, _) = step(&m, &group(0, 0, 0, 0), &[fail(400, "a")], 401);
        assert_eq!(m1.mode, Mode::Normal);
        // Short at the last reading, shortage_for (120 s) ago: it counts.
        let (m, _) = step_p(&Memory::initial(), &group(0, 0, 0, 0), up(4, 3), &[], 0);
        let (m2, _) = step(&m, &group(0, 0, 0, 0), &[fail(400, "a")], 401);
        assert_eq!(m2.mode, Mode::FailedOver);
        // Short only just before: not yet.
        let (m, _) = step_p(&Memory::initial(), &group(0, 0, 0, 0), up(4, 3), &[], 350);
        let (m3, _) = step(&m, &group(0, 0, 0, 0), &[fail(400, "a")], 401);
        assert_eq!(m3.mode, Mode::Normal);
    }

    #[test]
    fn normal_holds_the_gate_at_zero_but_never_below_busy() {
        let (m, p) = step(&Memory::initial(), &group(0, 3, 0, 0), &[], 10);
        assert_eq!(m.mode, Mode::Normal);
        assert_eq!(max_to(&p), Some(0));
        let (_, p) = step(&Memory::initial(), &group(2, 3, 2, 2), &[], 10);
        assert_eq!(max_to(&p), Some(2));
    }

    #[test]
    fn a_repeat_with_nothing_new_does_nothing() {
        // Restart in every mode: the same observation twice plans nothing
        // the second time (the primary unread: the gate held as it is).
        let cases = [
            (Memory::initial(), group(0, 0, 0, 0)),
            (failed_over_at(0), group(3, 10, 3, 1)),
            (failing_back(&group(3, 3, 3, 2)), group(3, 2, 3, 2)),
        ];
        let mut modes = Vec::new();
        for (m, g) in cases {
            let (m1, _) = step(&m, &g, &[], 710);
            modes.push(m1.mode);
            let g2 = FallbackGroup {
                max: match m1.mode {
                    Mode::FailedOver => 10,
                    Mode::FailingBack => g.max,
                    Mode::Normal => 0,
                },
                ..g
            };
            let (_, p2) = step(&m1, &g2, &[], 711);
            assert!(p2.actions.is_empty(), "{:?}: {:?}", m1.mode, p2.actions);
        }
        assert_eq!(modes, [Mode::Normal, Mode::FailedOver, Mode::FailingBack]);
    }

    #[test]
    fn policy_is_re_enabled_when_seen_off_while_failed_over() {
        let m = failed_over_at(0);
        let g = FallbackGroup {
            policy_enabled: Some(false),
            ..group(1, 10, 1, 0)
        };
        let (_, p) = step(&m, &g, &[], 30);
        assert!(p.actions.contains(&Action::EnableFallbackPolicy));
        let g = FallbackGroup {
            policy_enabled: Some(true),
            ..group(1, 10, 1, 0)
        };
        let (_, p) = step(&m, &g, &[], 30);
        assert!(!p.actions.contains(&Action::EnableFallbackPolicy));
    }

    #[test]
    fn tags_round_trip_and_bad_tags_are_reported_not_fatal() {
        let m = failed_over_at(0);
        let (back, warnings) = Memory::from_tags(&m.to_tags(), DateTime::<Utc>::MAX_UTC);
        assert_eq!(back, m);
        assert!(warnings.is_empty());
        let mut tags = m.to_tags();
        tags.insert(TAG_MODE.into(), "sideways".into());
        tags.insert(TAG_SINCE.into(), "yesterday".into());
        tags.insert(TAG_FAILURES.into(), "12/a nonsense".into());
        let (back, warnings) = Memory::from_tags(&tags, DateTime::<Utc>::MAX_UTC);
        assert_eq!(back.mode, Mode::Normal);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert_eq!(back.failures.len(), 1);
        assert!(m.to_tags().values().all(|v| v.len() <= 256));
    }

    #[test]
    fn tampered_memory_with_times_ahead_cannot_disable_failover_or_pin_the_fallback() {
        let s = Settings {
            failures: 1,
            ..settings()
        };
        let rfc = |x: i64| t(x).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        // Normal, with a `since` a year ahead: min_dwell would never pass.
        let mut tags = Memory::initial().to_tags();
        tags.insert(TAG_SINCE.into(), rfc(365 * 86_400));
        let (m, warnings) = Memory::from_tags(&tags, t(1000));
        assert_eq!(m.since, DateTime::<Utc>::UNIX_EPOCH, "{warnings:?}");
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].starts_with("tag spotguard:since="),
            "{warnings:?}"
        );
        let p = reconcile(&m, &group(0, 0, 0, 0), &[fail(990, "a")], t(1000), &s);
        assert_eq!(p.memory.mode, Mode::FailedOver, "{}", p.reason);
        // Failed over, a failure and a last failure a day ahead: dropped.
        let mut tags = failed_over_at(0).to_tags();
        tags.insert(
            TAG_FAILURES.into(),
            format!("{}/f", t(86_400 + 1000).timestamp()),
        );
        tags.insert(TAG_LAST_FAILURE.into(), rfc(86_400 + 1000));
        let (m, warnings) = Memory::from_tags(&tags, t(1000));
        assert!(m.failures.is_empty(), "{:?}", m.failures);
        assert_eq!(m.last_capacity_failure, None);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        // Within the clock skew, a time is kept.
        tags.insert(TAG_LAST_FAILURE.into(), rfc(1030));
        let (m, _) = Memory::from_tags(&tags, t(1000));
        assert_eq!(m.last_capacity_failure, Some(t(1030)));
        // A gate held since a time ahead would never release stale
        // protection: ignored too.
        tags.insert(TAG_HELD_SINCE.into(), rfc(5000));
        let (m, _) = Memory::from_tags(&tags, t(1000));
        assert_eq!(m.held_since, None);
        // A version at the maximum wraps instead of overflowing, so the
        // write still changes it for a concurrent writer's check.
        let mut m = failed_over_at(0);
        m.version = u64::MAX;
        let p = reconcile(&m, &group(0, 10, 0, 0), &[fail(900, "z")], t(1000), &s);
        assert!(p
            .actions
            .iter()
            .any(|a| matches!(a, Action::SaveMemory { .. })));
        assert_eq!(p.memory.version, 0);
        // A negative hand-over target is no target.
        let mut tags = failed_over_at(0).to_tags();
        tags.insert(TAG_HANDOVER.into(), "-5".into());
        let (m, warnings) = Memory::from_tags(&tags, t(1000));
        assert_eq!(m.handover_to, None);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
    }

    #[test]
    fn an_expired_failure_does_not_hide_a_new_one_with_its_id() {
        let mut m = Memory::initial();
        m.failures.push(Failure {
            at: t(-5000),
            id: "x".into(),
        });
        let s = Settings {
            failures: 1,
            ..settings()
        };
        let p = reconcile(&m, &group(0, 0, 0, 0), &[fail(0, "x")], t(1), &s);
        assert_eq!(p.memory.mode, Mode::FailedOver);
        // And deciding again on the result changes nothing.
        let again = reconcile(&p.memory, &group(0, 10, 0, 0), &[fail(0, "x")], t(1), &s);
        assert_eq!(again.memory.failures, p.memory.failures);
    }

    #[test]
    fn activity_ids_cannot_break_the_tag_encoding() {
        // Found by the property test: an id with a space and a slash read
        // back from the tag as two failures.
        let mut m = Memory::initial();
        merge(&mut m, &[fail(0, "a 5/x")], t(1), &settings());
        let (back, warnings) = Memory::from_tags(&m.to_tags(), DateTime::<Utc>::MAX_UTC);
        assert_eq!(back.failures.len(), 1, "{warnings:?}");
        assert_eq!(back.failures[0].id, "a5x");
    }

    #[test]
    fn failure_memory_is_bounded() {
        let mut m = Memory::initial();
        let launches: Vec<Launch> = (0..50)
            .map(|i| fail(i, &format!("id-{i:04}-xxxxxxxxxxxx")))
            .collect();
        merge(&mut m, &launches, t(60), &settings());
        assert_eq!(m.failures.len(), MAX_FAILURES);
        assert!(m.to_tags()[TAG_FAILURES].len() <= 256);
    }

    #[test]
    fn capacity_codes_are_found_in_status_messages() {
        let codes: Vec<String> = crate::config::CAPACITY_CODES
            .iter()
            .map(|s| s.to_string())
            .collect();
        let msg = "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity available that matches your request. Launching EC2 instance failed.";
        assert_eq!(
            capacity_code(msg, &codes).as_deref(),
            Some("InsufficientInstanceCapacity")
        );
        assert_eq!(
            capacity_code(
                "The image id '[ami-123]' does not exist. Launching EC2 instance failed.",
                &codes
            ),
            None
        );
        let worded = "We currently do not have sufficient g4dn.xlarge capacity in the Availability Zone you requested (us-east-1a).";
        assert_eq!(
            capacity_code(worded, &codes).as_deref(),
            Some("InsufficientInstanceCapacity")
        );
        assert_eq!(
            capacity_code(worded, &["SpotMaxPriceTooLow".to_string()]),
            None
        );
    }

    /// A three-group cascade carried through its tags, as AWS would.
    struct Cascade {
        memories: Vec<Memory>,
    }

    /// The group before: `desired`, `in_service`, none of them busy.
    fn up(desired: i32, in_service: i32) -> PrimaryGroup {
        PrimaryGroup {
            desired,
            max: 100,
            in_service,
            busy: 0,
            pending: 0,
        }
    }

    impl Cascade {
        fn new(n: usize) -> Cascade {
            Cascade {
                memories: vec![Memory::initial(); n],
            }
        }
        fn modes(&self) -> Vec<Mode> {
            self.memories.iter().map(|m| m.mode).collect()
        }
        /// One decision: `groups[i]` is fallback i, `upstream[i]` the
        /// group before it, `launches[i]` that group's outcomes.
        fn step(
            &mut self,
            groups: &[FallbackGroup],
            upstream: &[PrimaryGroup],
            launches: &[Vec<Launch>],
            visible: i64,
            now: i64,
        ) -> Vec<Plan> {
            let s = settings();
            let links: Vec<Link<'_>> = (0..self.memories.len())
                .map(|i| Link {
                    memory: &self.memories[i],
                    group: groups[i],
                    upstream: Some(upstream[i]),
                    launches: &launches[i],
                    settings: &s,
                })
                .collect();
            let plans = cascade(&links, Some(visible), Some(0), t(now));
            for (m, p) in self.memories.iter_mut().zip(&plans) {
                if let Some(tags) = p.actions.iter().find_map(|a| match a {
                    Action::SaveMemory { tags } => Some(tags.clone()),
                    _ => None,
                }) {
                    *m = Memory::from_tags(&tags, DateTime::<Utc>::MAX_UTC).0;
                }
            }
            plans
        }
    }

    #[test]
    fn the_cascade_opens_in_order() {
        let mut c = Cascade::new(2);
        let closed = [group(0, 0, 0, 0), group(0, 0, 0, 0)];
        // The first fallback's group fails and stays short while it is not
        // in use: that opens nothing (no work of ours is short there).
        for now in [5, 130] {
            let plans = c.step(
                &closed,
                &[up(4, 4), up(2, 0)],
                &[vec![], vec![fail(now - 5, &format!("g1-early-{now}"))]],
                50,
                now,
            );
            assert_eq!(c.modes(), [Mode::Normal, Mode::Normal]);
            assert_eq!(max_to(&plans[1]), None);
        }
        // The primary is short for capacity: the first opens, not the second.
        c.step(
            &closed,
            &[up(4, 1), up(0, 0)],
            &[vec![fail(200, "p1")], vec![]],
            50,
            200,
        );
        let plans = c.step(&closed, &[up(4, 1), up(0, 0)], &[vec![], vec![]], 50, 330);
        assert_eq!(c.modes(), [Mode::FailedOver, Mode::Normal]);
        assert_eq!(
            max_to(&plans[0]),
            Some(3),
            "the primary's shortfall, not the cap"
        );
        assert_eq!(max_to(&plans[1]), None);
        // Now the first fallback is short for capacity too: the second opens
        // once its shortage has lasted `shortage_for`, with the shortfall.
        let open1 = [group(5, 10, 2, 2), group(0, 0, 0, 0)];
        c.step(
            &open1,
            &[up(4, 1), up(5, 2)],
            &[vec![], vec![fail(400, "g1")]],
            50,
            400,
        );
        assert_eq!(
            c.modes(),
            [Mode::FailedOver, Mode::Normal],
            "short for 0 s only"
        );
        let plans = c.step(&open1, &[up(4, 1), up(5, 2)], &[vec![], vec![]], 50, 530);
        assert_eq!(c.modes(), [Mode::FailedOver, Mode::FailedOver]);
        assert_eq!(max_to(&plans[1]), Some(3));
        assert!(plans[1]
            .actions
            .contains(&Action::SetFallbackDesired { from: 0, to: 3 }));
        assert!(plans[1].actions.contains(&Action::EnableFallbackPolicy));
    }

    #[test]
    fn a_shortage_while_the_group_before_is_closed_does_not_count() {
        // The first fallback fails back while its region is still dry: it
        // stays short and keeps failing. When it reopens, the second waits
        // for a fresh `shortage_for` of it.
        let mut c = both_open();
        let ups = [up(4, 4), up(5, 2)];
        let open = [group(5, 10, 2, 0), group(3, 10, 3, 0)];
        for now in [1100, 1700, 1760] {
            c.step(&open, &ups, &[vec![], vec![]], 50, now);
        }
        assert_eq!(c.modes(), [Mode::FailingBack, Mode::FailingBack]);
        let empty = [group(5, 4, 2, 0), group(0, 0, 0, 0)];
        for (k, now) in [1800, 1900, 2000, 2100].into_iter().enumerate() {
            c.step(
                &empty,
                &ups,
                &[vec![], vec![fail(now, &format!("g1-{k}"))]],
                50,
                now,
            );
        }
        assert_eq!(c.modes(), [Mode::FailingBack, Mode::Normal]);
        // The primary fails and is short again: the first reopens once the
        // shortage has lasted `shortage_for`; the second does not yet.
        let short = [up(4, 1), up(5, 2)];
        c.step(
            &empty,
            &short,
            &[vec![fail(2150, "p2")], vec![fail(2150, "g1-x")]],
            50,
            2150,
        );
        assert_eq!(c.modes(), [Mode::FailingBack, Mode::Normal], "short 0 s");
        let plans = c.step(
            &empty,
            &short,
            &[vec![], vec![fail(2270, "g1-y")]],
            50,
            2280,
        );
        assert_eq!(c.modes(), [Mode::FailedOver, Mode::Normal], "{plans:?}");
        c.step(
            &empty,
            &short,
            &[vec![], vec![fail(2400, "g1-z")]],
            50,
            2420,
        );
        assert_eq!(c.modes(), [Mode::FailedOver, Mode::FailedOver]);
    }

    /// Both fallbacks open; returns the cascade at time 430.
    fn both_open() -> Cascade {
        let mut c = Cascade::new(2);
        let closed = [group(0, 0, 0, 0), group(0, 0, 0, 0)];
        c.step(
            &closed,
            &[up(4, 1), up(0, 0)],
            &[vec![fail(100, "p1")], vec![]],
            50,
            100,
        );
        c.step(&closed, &[up(4, 1), up(0, 0)], &[vec![], vec![]], 50, 230);
        let open1 = [group(5, 10, 2, 2), group(0, 0, 0, 0)];
        c.step(
            &open1,
            &[up(4, 1), up(5, 2)],
            &[vec![], vec![fail(300, "g1")]],
            50,
            300,
        );
        c.step(&open1, &[up(4, 1), up(5, 2)], &[vec![], vec![]], 50, 430);
        assert_eq!(c.modes(), [Mode::FailedOver, Mode::FailedOver]);
        c
    }

    #[test]
    fn the_cascade_closes_in_reverse_and_never_below_busy() {
        let mut c = both_open();
        // The primary is back and whole; the first fallback's own region
        // stays dry (its group short): capacity back at the primary closes
        // both all the same, the last opened first.
        let ups = [busy(up(6, 6), 6), PrimaryGroup { max: 4, ..up(5, 2) }];
        let open = [group(4, 4, 4, 2), group(3, 3, 3, 1)];
        let plans = c.step(&open, &ups, &[vec![], vec![]], 50, 650);
        assert_eq!(c.modes(), [Mode::FailedOver, Mode::FailedOver]);
        assert_eq!(
            max_to(&plans[0]),
            Some(2),
            "what the primary cannot hold, not below busy"
        );
        assert_eq!(
            raise_to(&plans[0]),
            Some(8),
            "the primary asked for the busy two"
        );
        assert_eq!(max_to(&plans[1]), None, "its upstream is short 3: held");
        let plans = c.step(&open, &ups, &[vec![], vec![]], 50, 1250);
        assert_eq!(c.modes(), [Mode::FailedOver, Mode::FailingBack]);
        assert!(plans[0].holding_for_later);
        let plans = c.step(&open, &ups, &[vec![], vec![]], 50, 1310);
        assert_eq!(c.modes(), [Mode::FailingBack, Mode::FailingBack]);
        assert_eq!(max_to(&plans[0]), Some(2));
        assert_eq!(max_to(&plans[1]), Some(2), "step by step");
        let plans = c.step(
            &[group(2, 2, 2, 2), group(2, 2, 2, 1)],
            &ups,
            &[vec![], vec![]],
            50,
            1370,
        );
        assert_eq!(max_to(&plans[0]), None, "never below its busy two");
        assert_eq!(max_to(&plans[1]), Some(1), "never below its busy one");
        // Both drain; each goes back to normal once empty.
        c.step(
            &[group(0, 0, 0, 0), group(0, 0, 0, 0)],
            &ups,
            &[vec![], vec![]],
            0,
            1700,
        );
        assert_eq!(c.modes(), [Mode::Normal, Mode::Normal]);
    }

    #[test]
    fn capacity_back_at_the_first_fallback_closes_only_the_second() {
        let mut c = both_open();
        let open = [group(5, 10, 5, 0), group(3, 10, 3, 0)];
        // The primary stays dry; the first fallback's group holds its
        // desired capacity again.
        let ups = [up(4, 1), up(5, 5)];
        c.step(&open, &ups, &[vec![], vec![ok(500, "g1-ok")]], 50, 950);
        assert_eq!(c.modes(), [Mode::FailedOver, Mode::FailedOver]);
        c.step(&open, &ups, &[vec![], vec![]], 50, 1550);
        assert_eq!(c.modes(), [Mode::FailedOver, Mode::FailingBack]);
        c.step(&open, &ups, &[vec![], vec![]], 50, 1610);
        assert_eq!(c.modes(), [Mode::FailedOver, Mode::FailingBack]);
    }

    #[test]
    fn the_cascade_does_not_flap_on_alternating_outcomes() {
        // For four hours the primary and the first fallback alternate every
        // 11 minutes between short with a capacity failure and whole with
        // a success, and the queue between empty and 50 waiting every 7
        // minutes. Each link may close and reopen, but never within its
        // min dwell (300 s), and never out of order.
        let mut c = both_open();
        // No busy instance: an empty queue alone makes a fallback unneeded.
        let open = [group(5, 10, 3, 0), group(3, 10, 3, 0)];
        let mut changes = vec![0; 2];
        let mut last = c.modes();
        let mut last_change = [430i64; 2];
        for minute in 8..240 {
            let at = minute * 60;
            let short_phase = (minute / 11) % 2 == 0;
            let ups = if short_phase {
                [up(4, 2), up(5, 3)]
            } else {
                [up(4, 4), up(5, 5)]
            };
            let launches = if minute % 11 == 0 {
                vec![if short_phase {
                    fail(at, &format!("f{minute}"))
                } else {
                    ok(at, &format!("s{minute}"))
                }]
            } else {
                vec![]
            };
            let visible = if (minute / 7) % 2 == 0 { 50 } else { 0 };
            c.step(&open, &ups, &[launches.clone(), launches], visible, at);
            let now = c.modes();
            for k in 0..2 {
                if now[k] != last[k] {
                    changes[k] += 1;
                    assert!(
                        at - last_change[k] >= 300,
                        "link {k} changed twice within the dwell at {at}"
                    );
                    last_change[k] = at;
                }
            }
            if now[1] == Mode::FailedOver {
                assert_eq!(now[0], Mode::FailedOver, "out of order at {at}");
            }
            last = now;
        }
        // The scenario does move the modes (the test is not vacuous), and
        // the dwell bounds how often: at most one change per 300 s.
        assert!(changes[0] > 2, "{changes:?}");
        assert!(changes.iter().all(|n| *n <= 46), "{changes:?}");
    }

    #[test]
    fn duplicate_and_reordered_events_decide_the_same() {
        let launches = vec![
            fail(100, "a"),
            ok(110, "b"),
            fail(120, "c"),
            other(125, "d"),
        ];
        let mut shuffled: Vec<Launch> = launches.iter().rev().cloned().collect();
        shuffled.extend(launches.iter().cloned());
        let run = |l: &[Launch]| {
            let mut c = Cascade::new(2);
            let closed = [group(0, 0, 0, 0), group(0, 0, 0, 0)];
            let mut out = Vec::new();
            for now in [130, 260, 400] {
                let plans = c.step(
                    &closed,
                    &[up(4, 1), up(3, 0)],
                    &[l.to_vec(), l.to_vec()],
                    50,
                    now,
                );
                out.push((
                    c.modes(),
                    plans.iter().map(|p| p.actions.clone()).collect::<Vec<_>>(),
                ));
            }
            out
        };
        assert_eq!(run(&launches), run(&shuffled));
    }

    #[test]
    fn one_link_is_the_two_group_decision() {
        let m = failed_over_at(0);
        let g = group(3, 10, 3, 1);
        let s = settings();
        let l = [ok(30, "s")];
        let link = Link {
            memory: &m,
            group: g,
            upstream: None,
            launches: &l,
            settings: &s,
        };
        assert_eq!(
            cascade(&[link], None, None, t(700)),
            vec![reconcile(&m, &g, &l, t(700), &s)]
        );
    }

    #[test]
    fn offerings_short_of_capacity_are_marked_for_the_ttl() {
        let worded = "We currently do not have sufficient g4dn.xlarge capacity in the Availability Zone you requested (us-east-1a). Our system will be working on provisioning additional capacity.";
        let o = Offering::of(worded, None);
        assert_eq!(o.zone.as_deref(), Some("us-east-1a"));
        assert_eq!(o.instance_type.as_deref(), Some("g4dn.xlarge"));
        // The mixed-instances form names neither; the details give the zone.
        let o = Offering::of(
            "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity available that matches your request. Launching EC2 instance failed.",
            Some("us-east-1b"),
        );
        assert_eq!(o.zone.as_deref(), Some("us-east-1b"));
        assert_eq!(o.instance_type, None);
        let mut l = fail(0, "a");
        l.offering = Offering::of(worded, None);
        let mut l2 = fail(20, "b");
        l2.offering = Offering::of(worded, None);
        let mut m = Memory::initial();
        merge(&mut m, &[l.clone(), l2, l], t(30), &settings());
        assert_eq!(m.unavailable.len(), 1, "one offering, its latest time");
        assert_eq!(m.unavailable[0].at, t(20));
        let (back, warnings) = Memory::from_tags(&m.to_tags(), DateTime::<Utc>::MAX_UTC);
        assert_eq!(back.unavailable, m.unavailable, "{warnings:?}");
        // Past the capacity TTL (180 s) the mark is gone.
        merge(&mut m, &[], t(201), &settings());
        assert!(m.unavailable.is_empty());
        // Many offerings: the tag keeps the newest that fit.
        let many: Vec<Launch> = (0..30)
            .map(|i| {
                let mut l = fail(i, &format!("x{i}"));
                l.offering = Offering {
                    zone: Some(format!("us-east-1{}", (b'a' + (i % 6) as u8) as char)),
                    instance_type: Some(format!("g{i}dn.12xlarge")),
                };
                l
            })
            .collect();
        let mut m = Memory::initial();
        merge(&mut m, &many, t(40), &settings());
        let tag = &m.to_tags()[TAG_OFFERINGS];
        assert!(tag.len() <= 256 && tag.contains("g29dn"), "{tag}");
    }

    #[test]
    fn future_timestamps_count_as_now() {
        let (m, _) = step(
            &Memory::initial(),
            &group(0, 0, 0, 0),
            &[fail(10_000, "skew")],
            5,
        );
        assert_eq!(m.last_capacity_failure, Some(t(5)));
    }
}
