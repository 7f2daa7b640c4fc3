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
#[path = "reconcile_tests.rs"]
mod tests;
