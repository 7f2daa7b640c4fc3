//! Instance metadata (IMDSv2) paths, bodies and their parsers.
//!
//! Real IMDS serves one-line JSON as `text/plain`; the popular AWS mock serves
//! tab-indented JSON as `application/json`. Every parser here therefore goes
//! through a JSON parser (never a byte comparison) and ignores unknown fields,
//! so both shapes, and fields AWS may add later, are accepted.

use std::fmt;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};

/// Paths and headers of the IMDSv2 protocol (see REFERENCE.md).
pub mod paths {
    pub const TOKEN: &str = "/latest/api/token";
    pub const SPOT_INSTANCE_ACTION: &str = "/latest/meta-data/spot/instance-action";
    pub const SPOT_TERMINATION_TIME: &str = "/latest/meta-data/spot/termination-time";
    pub const REBALANCE: &str = "/latest/meta-data/events/recommendations/rebalance";
    pub const TARGET_LIFECYCLE_STATE: &str = "/latest/meta-data/autoscaling/target-lifecycle-state";
    pub const SCHEDULED_EVENTS: &str = "/latest/meta-data/events/maintenance/scheduled";
    pub const INSTANCE_ID: &str = "/latest/meta-data/instance-id";
    pub const REGION: &str = "/latest/meta-data/placement/region";
    pub const AVAILABILITY_ZONE: &str = "/latest/meta-data/placement/availability-zone";
    pub const INSTANCE_TYPE: &str = "/latest/meta-data/instance-type";
    pub const INSTANCE_LIFE_CYCLE: &str = "/latest/meta-data/instance-life-cycle";
    pub const IDENTITY_DOCUMENT: &str = "/latest/dynamic/instance-identity/document";

    pub const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
    pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
    /// Upper bound of the token TTL accepted by IMDS (REFERENCE.md: 1..=21600).
    pub const MAX_TOKEN_TTL_SECS: u64 = 21_600;
}

/// Why a metadata body could not be understood. Names the path's body and the
/// field, so a log line says exactly what AWS (or a mock) got wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("{what}: not valid JSON: {message}")]
    Json { what: &'static str, message: String },
    #[error("{what}: field `{field}`: {message}")]
    Field {
        what: &'static str,
        field: &'static str,
        message: String,
    },
    #[error("{what}: unrecognised value {value:?}")]
    Value { what: &'static str, value: String },
}

/// Formats a time the way real IMDS does in the spot and rebalance bodies.
pub fn format_imds_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Formats a time as the scheduled-events body does: `21 Jan 2026 09:00:43 GMT`.
pub fn format_scheduled_time(t: DateTime<Utc>) -> String {
    t.format(SCHEDULED_TIME_FORMAT).to_string()
}

const SCHEDULED_TIME_FORMAT: &str = "%d %b %Y %H:%M:%S GMT";

fn parse_rfc3339(
    what: &'static str,
    field: &'static str,
    s: &str,
) -> Result<DateTime<Utc>, ParseError> {
    DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| ParseError::Field {
            what,
            field,
            message: format!("{s:?} is not an RFC 3339 time: {e}"),
        })
}

fn parse_scheduled_time(field: &'static str, s: &str) -> Result<DateTime<Utc>, ParseError> {
    NaiveDateTime::parse_from_str(s.trim(), SCHEDULED_TIME_FORMAT)
        .map(|t| t.and_utc())
        // Be liberal: accept RFC 3339 too, in case a mock or a future IMDS uses it.
        .or_else(|_| parse_rfc3339(SCHEDULED, field, s))
        .map_err(|_| ParseError::Field {
            what: SCHEDULED,
            field,
            message: format!("{s:?} is neither `21 Jan 2026 09:00:43 GMT` nor RFC 3339"),
        })
}

fn json<'a, T: Deserialize<'a>>(what: &'static str, body: &'a str) -> Result<T, ParseError> {
    serde_json::from_str(body.trim()).map_err(|e| ParseError::Json {
        what,
        message: e.to_string(),
    })
}

/// Serialises a value through its `Display` form (AWS's own spelling).
fn display_str<T: fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

const INSTANCE_ACTION: &str = "spot/instance-action";
const REBALANCE: &str = "events/recommendations/rebalance";
const LIFECYCLE: &str = "autoscaling/target-lifecycle-state";
const SCHEDULED: &str = "events/maintenance/scheduled";

/// The action in a spot interruption notice.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SpotAction {
    Terminate,
    Stop,
    Hibernate,
    /// An action AWS does not document today. The notice is still a notice:
    /// the path only answers when an interruption is pending.
    Other(String),
}

impl fmt::Display for SpotAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpotAction::Terminate => "terminate",
            SpotAction::Stop => "stop",
            SpotAction::Hibernate => "hibernate",
            SpotAction::Other(s) => s,
        })
    }
}

impl From<&str> for SpotAction {
    fn from(s: &str) -> Self {
        match s {
            "terminate" => SpotAction::Terminate,
            "stop" => SpotAction::Stop,
            "hibernate" => SpotAction::Hibernate,
            other => SpotAction::Other(other.to_string()),
        }
    }
}

impl Serialize for SpotAction {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        display_str(self, s)
    }
}

/// The body of `spot/instance-action`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct SpotInstanceAction {
    pub action: SpotAction,
    pub time: DateTime<Utc>,
}

pub fn parse_instance_action(body: &str) -> Result<SpotInstanceAction, ParseError> {
    #[derive(Deserialize)]
    struct Raw {
        action: String,
        time: String,
    }
    let raw: Raw = json(INSTANCE_ACTION, body)?;
    if raw.action.is_empty() {
        return Err(ParseError::Field {
            what: INSTANCE_ACTION,
            field: "action",
            message: "empty".into(),
        });
    }
    Ok(SpotInstanceAction {
        action: SpotAction::from(raw.action.as_str()),
        time: parse_rfc3339(INSTANCE_ACTION, "time", &raw.time)?,
    })
}

/// The body of `events/recommendations/rebalance`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct RebalanceRecommendation {
    pub notice_time: DateTime<Utc>,
}

pub fn parse_rebalance(body: &str) -> Result<RebalanceRecommendation, ParseError> {
    #[derive(Deserialize)]
    struct Raw {
        #[serde(rename = "noticeTime")]
        notice_time: String,
    }
    let raw: Raw = json(REBALANCE, body)?;
    Ok(RebalanceRecommendation {
        notice_time: parse_rfc3339(REBALANCE, "noticeTime", &raw.notice_time)?,
    })
}

/// The body of `autoscaling/target-lifecycle-state`: the state the Auto
/// Scaling group wants this instance in next.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetLifecycleState {
    InService,
    Terminated,
    Detached,
    Standby,
    /// `Warmed:Stopped`, `Warmed:Running`, ...: the instance belongs to a warm
    /// pool; the suffix is kept as served.
    Warmed(String),
    /// A well-formed state AWS does not document today.
    Other(String),
}

impl TargetLifecycleState {
    /// Only `Terminated` means the group is taking this instance away. A warm
    /// pool's `Warmed:Terminated` concerns an instance that runs no jobs.
    pub fn is_termination(&self) -> bool {
        matches!(self, TargetLifecycleState::Terminated)
    }
}

impl fmt::Display for TargetLifecycleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetLifecycleState::InService => f.write_str("InService"),
            TargetLifecycleState::Terminated => f.write_str("Terminated"),
            TargetLifecycleState::Detached => f.write_str("Detached"),
            TargetLifecycleState::Standby => f.write_str("Standby"),
            TargetLifecycleState::Warmed(s) => write!(f, "Warmed:{s}"),
            TargetLifecycleState::Other(s) => f.write_str(s),
        }
    }
}

impl Serialize for TargetLifecycleState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        display_str(self, s)
    }
}

/// Longest state name we accept as "well-formed but unknown"; the documented
/// ones are at most 17 characters, so anything longer is garbage (an HTML
/// error page, say), not a state.
const MAX_STATE_LEN: usize = 64;

pub fn parse_target_lifecycle_state(body: &str) -> Result<TargetLifecycleState, ParseError> {
    let s = body.trim();
    let well_formed = !s.is_empty()
        && s.len() <= MAX_STATE_LEN
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == ':');
    if !well_formed {
        return Err(ParseError::Value {
            what: LIFECYCLE,
            value: truncate(s, 80),
        });
    }
    Ok(match s {
        "InService" => TargetLifecycleState::InService,
        "Terminated" => TargetLifecycleState::Terminated,
        "Detached" => TargetLifecycleState::Detached,
        "Standby" => TargetLifecycleState::Standby,
        other => match other.strip_prefix("Warmed:") {
            Some(rest) if !rest.is_empty() => TargetLifecycleState::Warmed(rest.to_string()),
            _ => TargetLifecycleState::Other(other.to_string()),
        },
    })
}

/// State of a scheduled maintenance event.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ScheduledEventState {
    Active,
    Completed,
    Canceled,
    Other(String),
}

impl fmt::Display for ScheduledEventState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScheduledEventState::Active => "active",
            ScheduledEventState::Completed => "completed",
            ScheduledEventState::Canceled => "canceled",
            ScheduledEventState::Other(s) => s,
        })
    }
}

impl Serialize for ScheduledEventState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        display_str(self, s)
    }
}

/// One entry of `events/maintenance/scheduled`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ScheduledEvent {
    pub event_id: String,
    pub code: String,
    pub description: String,
    pub state: ScheduledEventState,
    pub not_before: Option<DateTime<Utc>>,
    pub not_after: Option<DateTime<Utc>>,
    pub not_before_deadline: Option<DateTime<Utc>>,
}

pub fn parse_scheduled_events(body: &str) -> Result<Vec<ScheduledEvent>, ParseError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Raw {
        event_id: String,
        code: String,
        #[serde(default)]
        description: String,
        state: String,
        #[serde(default)]
        not_before: Option<String>,
        #[serde(default)]
        not_after: Option<String>,
        #[serde(default)]
        not_before_deadline: Option<String>,
    }
    if body.trim().is_empty() {
        return Ok(Vec::new());
    }
    let raw: Vec<Raw> = json(SCHEDULED, body)?;
    let time =
        |field: &'static str, v: &Option<String>| -> Result<Option<DateTime<Utc>>, ParseError> {
            match v.as_deref().map(str::trim) {
                None | Some("") => Ok(None),
                Some(s) => parse_scheduled_time(field, s).map(Some),
            }
        };
    raw.into_iter()
        .map(|r| {
            if r.event_id.is_empty() {
                return Err(ParseError::Field {
                    what: SCHEDULED,
                    field: "EventId",
                    message: "empty".into(),
                });
            }
            Ok(ScheduledEvent {
                not_before: time("NotBefore", &r.not_before)?,
                not_after: time("NotAfter", &r.not_after)?,
                not_before_deadline: time("NotBeforeDeadline", &r.not_before_deadline)?,
                state: match r.state.as_str() {
                    "active" => ScheduledEventState::Active,
                    "completed" => ScheduledEventState::Completed,
                    "canceled" | "cancelled" => ScheduledEventState::Canceled,
                    other => ScheduledEventState::Other(other.to_string()),
                },
                event_id: r.event_id,
                code: r.code,
                description: r.description,
            })
        })
        .collect()
}

/// Cuts a string for a log line, on a character boundary.
pub fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        None => s.to_string(),
        Some((i, _)) => format!("{}...", &s[..i]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn instance_action_one_line_and_pretty_are_equal() {
        let one =
            parse_instance_action(r#"{"action": "terminate", "time": "2026-11-28T08:22:00Z"}"#)
                .unwrap();
        let pretty = parse_instance_action(
            "{\n\t\"action\": \"terminate\",\n\t\"time\": \"2026-11-28T08:22:00Z\"\n}\n",
        )
        .unwrap();
        assert_eq!(one, pretty);
        assert_eq!(one.action, SpotAction::Terminate);
        assert_eq!(one.time, t("2026-11-28T08:22:00Z"));
    }

    #[test]
    fn instance_action_ignores_unknown_fields_and_keeps_unknown_actions() {
        let a = parse_instance_action(
            r#"{"action":"stop","time":"2026-11-28T08:22:00.000Z","extra":[1]}"#,
        )
        .unwrap();
        assert_eq!(a.action, SpotAction::Stop);
        let h =
            parse_instance_action(r#"{"action":"hibernate","time":"2026-11-28T08:22:00+00:00"}"#)
                .unwrap();
        assert_eq!(h.action, SpotAction::Hibernate);
        let o = parse_instance_action(r#"{"action":"evaporate","time":"2026-11-28T08:22:00Z"}"#)
            .unwrap();
        assert_eq!(o.action, SpotAction::Other("evaporate".into()));
        assert_eq!(o.action.to_string(), "evaporate");
    }

    #[test]
    fn instance_action_errors_name_the_field() {
        let e = parse_instance_action(r#"{"action":"terminate","time":"soon"}"#).unwrap_err();
        assert!(e.to_string().contains("field `time`"), "{e}");
        let e = parse_instance_action(r#"{"time":"2026-11-28T08:22:00Z"}"#).unwrap_err();
        assert!(matches!(e, ParseError::Json { .. }), "{e}");
        let e = parse_instance_action("<html>500</html>").unwrap_err();
        assert!(matches!(e, ParseError::Json { .. }), "{e}");
        let e =
            parse_instance_action(r#"{"action":"","time":"2026-11-28T08:22:00Z"}"#).unwrap_err();
        assert!(e.to_string().contains("`action`"), "{e}");
    }

    #[test]
    fn rebalance_both_shapes() {
        let a = parse_rebalance(r#"{"noticeTime":"2026-11-28T08:22:00Z"}"#).unwrap();
        let b = parse_rebalance("{\n\t\"noticeTime\": \"2026-11-28T08:22:00Z\"\n}").unwrap();
        assert_eq!(a, b);
        assert!(parse_rebalance(r#"{"noticeTime":"yesterday"}"#).is_err());
        assert!(parse_rebalance("").is_err());
    }

    #[test]
    fn lifecycle_states() {
        use TargetLifecycleState as S;
        assert_eq!(
            parse_target_lifecycle_state("InService").unwrap(),
            S::InService
        );
        assert_eq!(
            parse_target_lifecycle_state("Terminated\n").unwrap(),
            S::Terminated
        );
        assert_eq!(
            parse_target_lifecycle_state("Detached").unwrap(),
            S::Detached
        );
        assert_eq!(parse_target_lifecycle_state("Standby").unwrap(), S::Standby);
        let w = parse_target_lifecycle_state("Warmed:Terminated").unwrap();
        assert_eq!(w, S::Warmed("Terminated".into()));
        assert!(!w.is_termination());
        assert_eq!(w.to_string(), "Warmed:Terminated");
        assert!(S::Terminated.is_termination());
        assert!(!S::InService.is_termination());
        assert_eq!(
            parse_target_lifecycle_state("Pending").unwrap(),
            S::Other("Pending".into())
        );
        assert!(parse_target_lifecycle_state("<html><body>404</body></html>").is_err());
        assert!(parse_target_lifecycle_state("").is_err());
        assert!(parse_target_lifecycle_state(&"A".repeat(65)).is_err());
    }

    #[test]
    fn scheduled_events_both_time_formats_and_states() {
        let body = r#"[{"NotBefore":"21 Jan 2026 09:00:43 GMT","Code":"system-reboot",
            "Description":"scheduled reboot","EventId":"instance-event-0d59937288b749b32",
            "NotAfter":"21 Jan 2026 09:17:23 GMT","NotBeforeDeadline":"31 Jan 2026 09:00:43 GMT",
            "State":"active","Unknown":1},
            {"Code":"instance-stop","EventId":"e2","NotBefore":"2026-01-21T09:00:43Z","State":"canceled"}]"#;
        let ev = parse_scheduled_events(body).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].not_before, Some(t("2026-01-21T09:00:43Z")));
        assert_eq!(ev[0].not_before_deadline, Some(t("2026-01-31T09:00:43Z")));
        assert_eq!(ev[0].state, ScheduledEventState::Active);
        assert_eq!(ev[1].state, ScheduledEventState::Canceled);
        assert_eq!(ev[1].not_after, None);
        assert_eq!(
            format_scheduled_time(t("2026-01-21T09:00:43Z")),
            "21 Jan 2026 09:00:43 GMT"
        );
        assert!(parse_scheduled_events("[]").unwrap().is_empty());
        assert!(parse_scheduled_events("").unwrap().is_empty());
    }

    #[test]
    fn scheduled_events_errors_name_the_field() {
        let e = parse_scheduled_events(
            r#"[{"Code":"x","EventId":"e","State":"active","NotBefore":"tomorrow"}]"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("NotBefore"), "{e}");
        let e =
            parse_scheduled_events(r#"[{"Code":"x","EventId":"","State":"active"}]"#).unwrap_err();
        assert!(e.to_string().contains("EventId"), "{e}");
        assert!(parse_scheduled_events(r#"{"not":"an array"}"#).is_err());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "hé...");
        assert_eq!(truncate("abc", 3), "abc");
    }
}
