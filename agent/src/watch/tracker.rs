//! Pure deduplication of polled metadata: one tracker per path turns each
//! poll's body into at most a few events, so that a notice polled a hundred
//! times is reported once. Trackers compare parsed content, never raw bytes
//! or poll times, and do no I/O: the poller feeds them, tests drive them.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};

use super::event::{Change, WatchEvent};
use crate::imds::{
    parse_instance_action, parse_rebalance, parse_scheduled_events, parse_target_lifecycle_state,
    truncate, ParseError, ScheduledEventState, SpotAction, TargetLifecycleState,
};

/// What one poll returned: `None` for 404 (nothing there), else the body.
pub type Polled<'a> = Option<&'a str>;

/// The outcome of feeding one poll to a tracker.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub events: Vec<WatchEvent>,
    /// A body that could not be parsed: log and count it. On the spot path
    /// it still produced a notice (see [`SpotTracker`]).
    pub parse_error: Option<ParseError>,
}

impl Observed {
    fn none() -> Self {
        Self::default()
    }
    fn event(e: WatchEvent) -> Self {
        Observed {
            events: vec![e],
            parse_error: None,
        }
    }
    fn error(e: ParseError) -> Self {
        Observed {
            events: Vec::new(),
            parse_error: Some(e),
        }
    }
}

/// The documented minimum warning of a spot interruption; used as the
/// deadline when a notice's body cannot be read.
pub const ASSUMED_NOTICE: Duration = Duration::seconds(120);

/// How much of an unreadable body goes into the event and the log.
const RAW_CHARS: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq)]
struct SpotNotice {
    action: Option<SpotAction>,
    time: DateTime<Utc>,
    assumed: bool,
}

/// `spot/instance-action`. The path answers 200 only while an interruption is
/// pending, so even an unreadable 200 body is a notice: its deadline is
/// assumed to be two minutes after detection, and it is kept (not recomputed)
/// on later polls of the same unreadable body.
#[derive(Debug, Default)]
pub struct SpotTracker {
    current: Option<SpotNotice>,
}

impl SpotTracker {
    pub fn observe(&mut self, polled: Polled<'_>, now: DateTime<Utc>) -> Observed {
        // 404: nothing pending. A notice that vanished is remembered, so the
        // same notice coming back is not reported twice.
        let Some(body) = polled else {
            return Observed::none();
        };
        let (notice, parse_error, raw) = match parse_instance_action(body) {
            Ok(a) => (
                SpotNotice {
                    action: Some(a.action),
                    time: a.time,
                    assumed: false,
                },
                None,
                None,
            ),
            Err(e) => {
                if self.current.is_some() {
                    // We already know of a notice; an unreadable repeat adds nothing.
                    return Observed::error(e);
                }
                (
                    SpotNotice {
                        action: None,
                        time: now + ASSUMED_NOTICE,
                        assumed: true,
                    },
                    Some(e),
                    Some(truncate(body.trim(), RAW_CHARS)),
                )
            }
        };
        let change = match &self.current {
            None => Change::New,
            Some(old) if *old == notice => return Observed::none(),
            Some(_) => Change::Updated,
        };
        let event = WatchEvent::SpotInterruption {
            change,
            action: notice.action.clone(),
            time: notice.time,
            deadline_assumed: notice.assumed,
            raw,
        };
        self.current = Some(notice);
        Observed {
            events: vec![event],
            parse_error,
        }
    }
}

/// `events/recommendations/rebalance`. A garbled body is not a recommendation.
#[derive(Debug, Default)]
pub struct RebalanceTracker {
    current: Option<DateTime<Utc>>,
}

impl RebalanceTracker {
    pub fn observe(&mut self, polled: Polled<'_>) -> Observed {
        let Some(body) = polled else {
            return Observed::none();
        };
        match parse_rebalance(body) {
            Err(e) => Observed::error(e),
            Ok(r) => {
                let change = match self.current {
                    None => Change::New,
                    Some(t) if t == r.notice_time => return Observed::none(),
                    Some(_) => Change::Updated,
                };
                self.current = Some(r.notice_time);
                Observed::event(WatchEvent::RebalanceRecommendation {
                    change,
                    notice_time: r.notice_time,
                })
            }
        }
    }
}

/// `autoscaling/target-lifecycle-state`. Every change of state is an event
/// (the first one seen included); only `Terminated` is marked terminating.
#[derive(Debug, Default)]
pub struct LifecycleTracker {
    current: Option<TargetLifecycleState>,
}

impl LifecycleTracker {
    pub fn observe(&mut self, polled: Polled<'_>) -> Observed {
        let Some(body) = polled else {
            return Observed::none();
        };
        match parse_target_lifecycle_state(body) {
            Err(e) => Observed::error(e),
            Ok(state) if self.current.as_ref() == Some(&state) => Observed::none(),
            Ok(state) => {
                let previous = self.current.replace(state.clone());
                Observed::event(WatchEvent::LifecycleState {
                    change: if previous.is_none() {
                        Change::New
                    } else {
                        Change::Updated
                    },
                    terminating: state.is_termination(),
                    state,
                    previous,
                })
            }
        }
    }
}

/// `events/maintenance/scheduled`, keyed by `EventId`. An event is reported
/// when first seen, when its content changes, and when it turns `canceled`
/// or `completed`. Events that drop out of the list are remembered, so one
/// that reappears unchanged is not reported again.
#[derive(Debug, Default)]
pub struct ScheduledTracker {
    known: HashMap<String, crate::imds::ScheduledEvent>,
}

impl ScheduledTracker {
    pub fn observe(&mut self, polled: Polled<'_>) -> Observed {
        let events = match polled.map(parse_scheduled_events) {
            None => return Observed::none(),
            Some(Err(e)) => return Observed::error(e),
            Some(Ok(events)) => events,
        };
        let mut out = Vec::new();
        for ev in events {
            let old = self.known.get(&ev.event_id);
            if old == Some(&ev) {
                continue;
            }
            let state_changed = old.is_none_or(|o| o.state != ev.state);
            let change = match (&ev.state, state_changed) {
                (ScheduledEventState::Canceled, true) => Change::Canceled,
                (ScheduledEventState::Completed, true) => Change::Completed,
                _ if old.is_none() => Change::New,
                _ => Change::Updated,
            };
            out.push(WatchEvent::scheduled(change, &ev));
            self.known.insert(ev.event_id.clone(), ev);
        }
        Observed {
            events: out,
            parse_error: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }
    const NOW: &str = "2026-11-28T08:20:00Z";
    const ONE_LINE: &str = r#"{"action":"terminate","time":"2026-11-28T08:22:00Z"}"#;
    const PRETTY: &str = "{\n\t\"action\": \"terminate\",\n\t\"time\": \"2026-11-28T08:22:00Z\"\n}";

    fn spot_change(o: &Observed) -> Option<(Change, Option<SpotAction>, DateTime<Utc>, bool)> {
        match o.events.as_slice() {
            [] => None,
            [WatchEvent::SpotInterruption {
                change,
                action,
                time,
                deadline_assumed,
                ..
            }] => Some((*change, action.clone(), *time, *deadline_assumed)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn spot_notice_is_reported_once_whatever_its_formatting() {
        let mut tr = SpotTracker::default();
        assert_eq!(tr.observe(None, t(NOW)), Observed::none());
        let first = tr.observe(Some(ONE_LINE), t(NOW));
        assert_eq!(
            spot_change(&first),
            Some((
                Change::New,
                Some(SpotAction::Terminate),
                t("2026-11-28T08:22:00Z"),
                false
            ))
        );
        // Same notice, later polls, other byte shapes: nothing new.
        assert!(tr
            .observe(Some(ONE_LINE), t("2026-11-28T08:20:01Z"))
            .events
            .is_empty());
        assert!(tr
            .observe(Some(PRETTY), t("2026-11-28T08:20:02Z"))
            .events
            .is_empty());
        let reordered = r#"{"time":"2026-11-28T08:22:00.000Z","action":"terminate","x":1}"#;
        assert!(tr
            .observe(Some(reordered), t("2026-11-28T08:20:03Z"))
            .events
            .is_empty());
    }

    #[test]
    fn spot_notice_with_a_new_time_or_action_is_an_update() {
        let mut tr = SpotTracker::default();
        tr.observe(Some(ONE_LINE), t(NOW));
        let later = r#"{"action":"terminate","time":"2026-11-28T08:23:00Z"}"#;
        assert_eq!(
            spot_change(&tr.observe(Some(later), t(NOW))).map(|c| (c.0, c.2)),
            Some((Change::Updated, t("2026-11-28T08:23:00Z")))
        );
        let stop = r#"{"action":"stop","time":"2026-11-28T08:23:00Z"}"#;
        assert_eq!(
            spot_change(&tr.observe(Some(stop), t(NOW))).map(|c| (c.0, c.1)),
            Some((Change::Updated, Some(SpotAction::Stop)))
        );
    }

    #[test]
    fn a_vanished_notice_that_returns_unchanged_is_not_repeated() {
        let mut tr = SpotTracker::default();
        tr.observe(Some(ONE_LINE), t(NOW));
        assert!(tr.observe(None, t(NOW)).events.is_empty());
        assert!(tr.observe(Some(ONE_LINE), t(NOW)).events.is_empty());
    }

    #[test]
    fn unreadable_spot_body_is_a_notice_with_an_assumed_deadline_kept_across_polls() {
        let mut tr = SpotTracker::default();
        let garbage = "<html>oops</html>";
        let o = tr.observe(Some(garbage), t(NOW));
        assert!(o.parse_error.is_some());
        assert_eq!(
            spot_change(&o),
            Some((Change::New, None, t("2026-11-28T08:22:00Z"), true))
        );
        match &o.events[0] {
            WatchEvent::SpotInterruption { raw, .. } => assert_eq!(raw.as_deref(), Some(garbage)),
            e => panic!("{e:?}"),
        }
        // Polled again a second later: same (unknown) notice, deadline not moved.
        let again = tr.observe(Some(garbage), t("2026-11-28T08:20:01Z"));
        assert!(again.events.is_empty());
        assert!(again.parse_error.is_some());
        // The real body arrives: an update with the real time.
        let real = tr.observe(Some(ONE_LINE), t("2026-11-28T08:20:02Z"));
        assert_eq!(
            spot_change(&real),
            Some((
                Change::Updated,
                Some(SpotAction::Terminate),
                t("2026-11-28T08:22:00Z"),
                false
            ))
        );
        // And garbage after a known notice changes nothing.
        assert!(tr
            .observe(Some(garbage), t("2026-11-28T08:20:03Z"))
            .events
            .is_empty());
    }

    #[test]
    fn raw_body_is_truncated() {
        let mut tr = SpotTracker::default();
        let big = "x".repeat(10_000);
        match &tr.observe(Some(&big), t(NOW)).events[0] {
            WatchEvent::SpotInterruption { raw: Some(r), .. } => assert!(r.len() <= RAW_CHARS + 3),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn rebalance_dedup_update_and_garbage() {
        let mut tr = RebalanceTracker::default();
        assert!(tr.observe(None).events.is_empty());
        let garbage = tr.observe(Some("{}"));
        assert!(garbage.events.is_empty() && garbage.parse_error.is_some());
        let body = r#"{"noticeTime":"2026-11-28T08:00:00Z"}"#;
        assert_eq!(
            tr.observe(Some(body)).events,
            vec![WatchEvent::RebalanceRecommendation {
                change: Change::New,
                notice_time: t("2026-11-28T08:00:00Z")
            }]
        );
        assert!(tr
            .observe(Some("{\n\t\"noticeTime\": \"2026-11-28T08:00:00Z\"\n}"))
            .events
            .is_empty());
        let later = tr.observe(Some(r#"{"noticeTime":"2026-11-28T09:00:00Z"}"#));
        assert!(matches!(
            later.events[..],
            [WatchEvent::RebalanceRecommendation {
                change: Change::Updated,
                ..
            }]
        ));
    }

    #[test]
    fn lifecycle_changes_and_termination_flag() {
        let mut tr = LifecycleTracker::default();
        let terminating = |o: Observed| match o.events.as_slice() {
            [WatchEvent::LifecycleState { terminating, .. }] => Some(*terminating),
            [] => None,
            e => panic!("{e:?}"),
        };
        assert_eq!(terminating(tr.observe(None)), None);
        assert_eq!(terminating(tr.observe(Some("InService"))), Some(false));
        assert_eq!(terminating(tr.observe(Some("InService\n"))), None);
        assert_eq!(terminating(tr.observe(Some("Warmed:Running"))), Some(false));
        assert_eq!(
            terminating(tr.observe(Some("Warmed:Terminated"))),
            Some(false)
        );
        let o = tr.observe(Some("Terminated"));
        assert!(matches!(
            &o.events[..],
            [WatchEvent::LifecycleState { previous: Some(TargetLifecycleState::Warmed(p)), terminating: true, .. }]
                if p == "Terminated"
        ));
        assert_eq!(terminating(tr.observe(Some("Terminated"))), None);
        let bad = tr.observe(Some("<html>500 Internal Server Error</html>"));
        assert!(bad.events.is_empty() && bad.parse_error.is_some());
    }

    fn sched(id: &str, state: &str, not_before: &str) -> String {
        format!(
            r#"{{"Code":"system-reboot","Description":"d","EventId":"{id}","NotBefore":"{not_before}","NotAfter":"21 Jan 2026 09:17:23 GMT","State":"{state}"}}"#
        )
    }

    fn changes(o: &Observed) -> Vec<(String, Change)> {
        o.events
            .iter()
            .map(|e| match e {
                WatchEvent::ScheduledEvent {
                    event_id, change, ..
                } => (event_id.clone(), *change),
                e => panic!("{e:?}"),
            })
            .collect()
    }

    #[test]
    fn scheduled_events_new_update_cancel_complete_once_each() {
        let mut tr = ScheduledTracker::default();
        let nb = "21 Jan 2026 09:00:43 GMT";
        assert!(tr.observe(Some("[]")).events.is_empty());
        let a = format!("[{}]", sched("e1", "active", nb));
        assert_eq!(
            changes(&tr.observe(Some(&a))),
            vec![("e1".into(), Change::New)]
        );
        assert!(tr.observe(Some(&a)).events.is_empty());
        let moved = format!("[{}]", sched("e1", "active", "22 Jan 2026 09:00:43 GMT"));
        assert_eq!(
            changes(&tr.observe(Some(&moved))),
            vec![("e1".into(), Change::Updated)]
        );
        let two = format!(
            "[{},{}]",
            sched("e1", "canceled", "22 Jan 2026 09:00:43 GMT"),
            sched("e2", "active", nb)
        );
        assert_eq!(
            changes(&tr.observe(Some(&two))),
            vec![("e1".into(), Change::Canceled), ("e2".into(), Change::New)]
        );
        assert!(tr.observe(Some(&two)).events.is_empty());
        let done = format!("[{}]", sched("e2", "completed", nb));
        assert_eq!(
            changes(&tr.observe(Some(&done))),
            vec![("e2".into(), Change::Completed)]
        );
        // Dropping out of the list and coming back unchanged: not repeated.
        assert!(tr.observe(None).events.is_empty());
        assert!(tr.observe(Some(&done)).events.is_empty());
        // An event first seen already canceled is reported once, as canceled.
        let late = format!("[{}]", sched("e3", "canceled", nb));
        assert_eq!(
            changes(&tr.observe(Some(&late))),
            vec![("e3".into(), Change::Canceled)]
        );
    }

    #[test]
    fn scheduled_garbage_is_an_error_not_an_event() {
        let mut tr = ScheduledTracker::default();
        let o = tr.observe(Some("<html>503</html>"));
        assert!(o.events.is_empty());
        assert!(o.parse_error.is_some());
    }
}
