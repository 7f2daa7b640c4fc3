//! The failover decision's tests: pure functions, time passed in.

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

#[test]
fn an_offering_is_read_only_from_a_type_and_a_zone_it_can_tell() {
    // "Spot" is no instance type (no dot), "(later)" no zone.
    let o = Offering::of(
        "We currently do not have sufficient Spot capacity in the zone you requested (later).",
        None,
    );
    assert_eq!((o.instance_type, o.zone), (None, None));
    let o = Offering::of(
        "We currently do not have sufficient g4dn.xlarge capacity in the Availability Zone you requested (us-east-1a).",
        None,
    );
    assert_eq!(o.instance_type.as_deref(), Some("g4dn.xlarge"));
    assert_eq!(o.zone.as_deref(), Some("us-east-1a"));
}

#[test]
fn remembered_times_up_to_the_clock_skew_are_kept_and_later_ones_ignored() {
    let now = t(1000);
    let edge = now + CLOCK_SKEW;
    let after = edge + chrono::TimeDelta::seconds(1);
    let tags: BTreeMap<String, String> = [
        (TAG_SINCE, edge.to_rfc3339()),
        (TAG_LAST_FAILURE, after.to_rfc3339()),
        (
            TAG_FAILURES,
            format!("{}/a {}/b", edge.timestamp(), after.timestamp()),
        ),
        (
            TAG_OFFERINGS,
            format!(
                "{}/us-east-1a/* {}/us-east-1b/*",
                edge.timestamp(),
                after.timestamp()
            ),
        ),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .into();
    let (m, warnings) = Memory::from_tags(&tags, now);
    assert_eq!(m.since, edge, "exactly the skew ahead: kept");
    assert_eq!(m.last_capacity_failure, None, "later: ignored");
    assert_eq!(
        m.failures.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
        ["a"]
    );
    assert_eq!(
        m.unavailable
            .iter()
            .map(|x| x.offering.zone.as_deref().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["us-east-1a"]
    );
    assert_eq!(warnings.len(), 3, "{warnings:?}");
}

#[test]
fn the_offerings_tag_holds_what_fits_in_256_characters() {
    // Entries of 1..=k characters plus a space each: 256 exactly fits.
    let mark = |at: i64, ty: &str| Mark {
        at: t(at),
        offering: Offering {
            zone: None,
            instance_type: Some(ty.to_string()),
        },
    };
    // Each entry is "<10-digit secs>/*/<type>": 13 + type length.
    let base = t(0).timestamp().to_string().len() + 3;
    // Sixteen entries of 15 characters and a space: 256.
    let ty = "x".repeat(15 - base);
    let marks: Vec<Mark> = (0..16).map(|i| mark(i, &ty)).collect();
    let v = offerings_tag(&marks);
    assert_eq!(v.split(' ').count(), 16, "{v}");
    assert_eq!(v.len(), 255, "256 with the last separator counted");
    // One more does not fit: the oldest is left out.
    let marks: Vec<Mark> = (0..17).map(|i| mark(i, &ty)).collect();
    let v = offerings_tag(&marks);
    assert_eq!(v.split(' ').count(), 16);
    assert!(v.starts_with(&t(1).timestamp().to_string()), "{v}");
    // 127 characters and a space, then 128 and a space: 257, one too many.
    let marks = [
        mark(0, &"y".repeat(128 - base)),
        mark(1, &"z".repeat(127 - base)),
    ];
    let v = offerings_tag(&marks);
    assert_eq!(v.len(), 127, "only the newest: {v}");
}

#[test]
fn a_failure_code_is_a_capitalised_word_of_three_or_more_letters() {
    assert_eq!(failure_code("Could not launch. ABC - all capitals"), None);
    assert_eq!(failure_code("Could not launch. Ab - too short"), None);
    assert_eq!(
        failure_code("Could not launch. abc - not capitalised"),
        None
    );
    assert_eq!(
        failure_code(
            "Could not launch Spot Instances. Unsupported - The instance type is not supported."
        ),
        Some("Unsupported".to_string())
    );
}

fn fail_in(at: i64, id: &str, zone: &str) -> Launch {
    Launch {
        offering: Offering {
            zone: Some(zone.into()),
            instance_type: None,
        },
        ..fail(at, id)
    }
}

#[test]
fn a_capacity_failure_lasts_capacity_ttl_and_not_a_second_more() {
    // 179 s after the failure it still counts (a failover, the zone
    // marked unavailable); at 180 s (capacity_ttl) it no longer does.
    let (m, p) = step(
        &Memory::initial(),
        &group(0, 0, 0, 0),
        &[fail_in(0, "a", "us-east-1a")],
        179,
    );
    assert_eq!(m.mode, Mode::FailedOver);
    assert!(p.capacity_unavailable);
    assert_eq!(m.unavailable.len(), 1, "a zone alone is an offering");
    let (m, p) = step(
        &Memory::initial(),
        &group(0, 0, 0, 0),
        &[fail_in(0, "a", "us-east-1a")],
        180,
    );
    assert_eq!(m.mode, Mode::Normal);
    assert!(!p.capacity_unavailable);
    assert!(m.unavailable.is_empty());
}

#[test]
fn failing_back_with_the_primary_unread_holds_the_gate() {
    let g = group(5, 5, 5, 0);
    let m = failing_back(&g);
    let seen = Seen {
        primary: None,
        visible: Some(50),
        in_flight: Some(0),
        ..Seen::default()
    };
    let p = reconcile_seen(&m, &g, &seen, &[], t(760), &settings());
    assert_eq!(p.memory.mode, Mode::FailingBack);
    assert_eq!(max_to(&p), None, "neither stepped down nor opened");
}

#[test]
fn failing_back_with_the_primary_short_keeps_the_hand_over_target() {
    let g = group(3, 3, 3, 3);
    let m = failing_back(&g);
    let before = m.handover_to;
    assert!(before.is_some());
    let (m, _) = step_p(&m, &g, up(10, 4), &[], 760);
    assert_eq!(m.mode, Mode::FailingBack);
    assert_eq!(m.handover_to, before);
}

#[test]
fn the_primary_is_raised_only_while_it_has_fewer_instances_than_the_target() {
    // Failed over, the hand-over target 11, the primary not short.
    let raise = |p: PrimaryGroup| {
        let mut m = failed_over_at(0);
        m.handover_to = Some(11);
        raise_to(&step_p(&m, &group(3, 3, 3, 3), p, &[], 60).1)
    };
    assert_eq!(raise(pg(10, 10, 0)), Some(11));
    // 11 InService, or 10 and one pending: as many as the target.
    assert_eq!(raise(pg(10, 11, 0)), None);
    assert_eq!(raise(pg(10, 10, 1)), None);
}

#[test]
fn failing_back_in_a_cascade_a_closing_group_before_keeps_intake_closed() {
    let g = group(3, 3, 3, 3);
    let mut m = failing_back(&g);
    m.intake_closed = false;
    let seen = Seen {
        primary: Some(whole(&g)),
        visible: Some(50),
        in_flight: Some(0),
        earlier_closing: true,
        ..Seen::default()
    };
    let p = reconcile_seen(&m, &g, &seen, &[], t(760), &settings());
    assert_eq!(p.memory.mode, Mode::FailingBack);
    assert!(p.memory.intake_closed);
}

#[test]
fn a_closed_intake_with_nobody_busy_holds_nothing() {
    let g = group(2, 3, 2, 0);
    let m = failing_back(&g);
    assert!(m.intake_closed);
    assert_eq!(m.held_since, None);
}

#[test]
fn on_failover_the_fallback_takes_the_shortfall_less_what_is_pending() {
    let g = group(0, 0, 0, 0);
    let (m, _) = step_p(&Memory::initial(), &g, pg(10, 4, 2), &[fail(0, "a")], 0);
    let (_, p) = step_p(&m, &g, pg(10, 4, 2), &[], 130);
    assert_eq!(p.memory.mode, Mode::FailedOver);
    assert!(
        p.actions
            .contains(&Action::SetFallbackDesired { from: 0, to: 4 }),
        "{:?}",
        p.actions
    );
    // Already at the shortfall: not set again.
    let g4 = group(4, 0, 0, 0);
    let (m, _) = step_p(&Memory::initial(), &g4, pg(10, 4, 2), &[fail(0, "a")], 0);
    let (_, p) = step_p(&m, &g4, pg(10, 4, 2), &[], 130);
    assert_eq!(p.memory.mode, Mode::FailedOver);
    assert!(!p
        .actions
        .iter()
        .any(|a| matches!(a, Action::SetFallbackDesired { .. })));
}
