//! The typed events the watcher emits, and their JSON form (one line each in
//! `spotguard-agent watch`).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};

use crate::imds::{ScheduledEvent, ScheduledEventState, SpotAction, TargetLifecycleState};

/// What changed about a notice since the last poll that reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// First seen.
    New,
    /// Seen before with different content (e.g. a new notice time).
    Updated,
    /// A scheduled event that AWS canceled.
    Canceled,
    /// A scheduled event that AWS reports completed.
    Completed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WatchEvent {
    SpotInterruption {
        change: Change,
        /// `None` when the body could not be parsed (see `deadline_assumed`).
        action: Option<SpotAction>,
        /// When AWS will interrupt the instance.
        time: DateTime<Utc>,
        /// True when the body was unreadable and `time` is detection + 2 min,
        /// the documented minimum notice.
        deadline_assumed: bool,
        /// The unreadable body, truncated; absent when it parsed.
        #[serde(skip_serializing_if = "Option::is_none")]
        raw: Option<String>,
    },
    RebalanceRecommendation {
        change: Change,
        notice_time: DateTime<Utc>,
    },
    LifecycleState {
        change: Change,
        state: TargetLifecycleState,
        previous: Option<TargetLifecycleState>,
        /// Only `Terminated` is a termination; `InService` and `Warmed:*` are not.
        terminating: bool,
    },
    ScheduledEvent {
        change: Change,
        event_id: String,
        code: String,
        state: ScheduledEventState,
        description: String,
        not_before: Option<DateTime<Utc>>,
        not_after: Option<DateTime<Utc>>,
        not_before_deadline: Option<DateTime<Utc>>,
    },
}

impl WatchEvent {
    pub(crate) fn scheduled(change: Change, e: &ScheduledEvent) -> Self {
        WatchEvent::ScheduledEvent {
            change,
            event_id: e.event_id.clone(),
            code: e.code.clone(),
            state: e.state.clone(),
            description: e.description.clone(),
            not_before: e.not_before,
            not_after: e.not_after,
            not_before_deadline: e.not_before_deadline,
        }
    }
}

/// An event with the moment the watcher saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Detected {
    #[serde(flatten)]
    pub event: WatchEvent,
    #[serde(serialize_with = "rfc3339_millis")]
    pub detected_at: DateTime<Utc>,
}

fn rfc3339_millis<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_shape() {
        let t = DateTime::parse_from_rfc3339("2026-11-28T08:22:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let d = Detected {
            event: WatchEvent::SpotInterruption {
                change: Change::New,
                action: Some(SpotAction::Terminate),
                time: t,
                deadline_assumed: false,
                raw: None,
            },
            detected_at: t - chrono::Duration::milliseconds(119_500),
        };
        let v: serde_json::Value = serde_json::to_value(&d).unwrap();
        assert_eq!(v["event"], "spot_interruption");
        assert_eq!(v["action"], "terminate");
        assert_eq!(v["time"], "2026-11-28T08:22:00Z");
        assert_eq!(v["change"], "new");
        assert_eq!(v["detected_at"], "2026-11-28T08:20:00.500Z");
        assert!(v.get("raw").is_none());
    }
}
