//! Which protected instances have a dead agent.
//!
//! A busy agent protects its instance from scale-in and, with it, writes
//! its liveness mark (the instance tag `spotguard:alive`, the Unix time in
//! seconds), again every 10 minutes while it stays busy, and `idle` when
//! it drops the protection. So a protected instance's mark is a time from
//! this busy spell (or `idle`, while its first mark is on its way or
//! failing), and a time older than `failover.dead_after` means the agent
//! stopped: its instance would hold the group (and a failing-back gate)
//! for ever. Such an instance has its protection released; a live agent
//! with back-to-back jobs never is, however long it stays busy. An
//! instance with no time (an agent from before marks, one that IAM does
//! not let tag, `idle`) cannot be judged here: only
//! `failover.max_busy_age` releases it.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// How far ahead of the controller's clock a mark may be and still count:
/// EC2 instances keep time by the Amazon Time Sync Service (well within a
/// second); 5 minutes is SigV4's own tolerance of a skewed clock.
pub const FUTURE_SLACK: Duration = Duration::from_secs(300);

/// What the controller knows of a protected instance's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Agent {
    /// Marked within `dead_after` (or up to 5 minutes ahead: a clock ahead).
    Alive,
    /// Last marked at this time, longer ago than `dead_after`.
    Dead { last: DateTime<Utc> },
    /// No mark, one that is not a Unix time (`idle`: the agent is not
    /// busy), or one more than 5 minutes ahead.
    Unmarked,
}

/// Each protected instance's agent, from the marks read (instance id ->
/// tag value), at `now`. `dead_after` zero: nobody is judged dead.
pub fn judge(
    protected: &[String],
    marks: &BTreeMap<String, String>,
    now: DateTime<Utc>,
    dead_after: Duration,
) -> Vec<(String, Agent)> {
    protected
        .iter()
        .map(|id| {
            let last = marks
                .get(id)
                .and_then(|v| v.trim().parse::<i64>().ok())
                .and_then(|s| DateTime::from_timestamp(s, 0));
            let agent = match last {
                None => Agent::Unmarked,
                // A clock far ahead would keep a dead agent alive for as
                // long: such a mark is not believed.
                Some(t) if t - now > dur(FUTURE_SLACK) => Agent::Unmarked,
                Some(t) if dead_after.is_zero() || now - t <= dur(dead_after) => Agent::Alive,
                Some(t) => Agent::Dead { last: t },
            };
            (id.clone(), agent)
        })
        .collect()
}

fn dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// The tag value an agent writes at `now`.
pub fn mark(now: DateTime<Utc>) -> String {
    now.timestamp().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().into()
    }

    #[test]
    fn only_a_mark_older_than_dead_after_is_a_dead_agent() {
        let now = at("2026-12-04T12:00:00Z");
        let ids: Vec<String> = [
            "i-fresh", "i-edge", "i-old", "i-none", "i-junk", "i-ahead", "i-far", "i-idle",
        ]
        .map(String::from)
        .to_vec();
        let marks: BTreeMap<String, String> = [
            ("i-fresh", mark(at("2026-12-04T11:51:00Z"))),
            // Exactly dead_after old: still alive (older than, not as old as).
            ("i-edge", mark(at("2026-12-04T11:35:00Z"))),
            ("i-old", mark(at("2026-12-04T11:34:59Z"))),
            ("i-junk", "yesterday".to_string()),
            ("i-ahead", mark(at("2026-12-04T12:05:00Z"))),
            ("i-far", mark(at("2026-12-04T12:05:01Z"))),
            ("i-idle", "idle".to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .into();
        let got = judge(&ids, &marks, now, Duration::from_secs(25 * 60));
        assert_eq!(
            got,
            vec![
                ("i-fresh".to_string(), Agent::Alive),
                ("i-edge".to_string(), Agent::Alive),
                (
                    "i-old".to_string(),
                    Agent::Dead {
                        last: at("2026-12-04T11:34:59Z")
                    }
                ),
                ("i-none".to_string(), Agent::Unmarked),
                ("i-junk".to_string(), Agent::Unmarked),
                ("i-ahead".to_string(), Agent::Alive),
                ("i-far".to_string(), Agent::Unmarked),
                ("i-idle".to_string(), Agent::Unmarked),
            ]
        );
        // Switched off: an old mark is not a dead agent.
        let off = judge(&ids[2..3], &marks, now, Duration::ZERO);
        assert_eq!(off, vec![("i-old".to_string(), Agent::Alive)]);
    }
}
