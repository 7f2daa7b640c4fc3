//! Unit tests of the simulated world's rules: launches over pools,
//! reclaims, the lifecycle hook, target tracking's arithmetic, billing,
//! the generator.

use super::*;
use crate::scenario::Launch;

fn group(zones: &[(&str, i32)], desired: i32) -> Group {
    Group {
        name: "g".into(),
        region: "us-east-1".into(),
        min: 0,
        max: 200,
        desired,
        price: 0.36,
        zones: zones
            .iter()
            .map(|(n, c)| Pool {
                name: format!("us-east-1{n}"),
                instance_type: String::new(),
                capacity: *c,
            })
            .collect(),
        tags: BTreeMap::new(),
        activities: Vec::new(),
        tracking: None,
        last_launch_try: None,
        interruptions_per_hour: 0.0,
        spot_requests_wait: false,
        hook: false,
    }
}

fn world(g: Group) -> World {
    let mut w = World {
        rng: Some(Rng::new(1)),
        ..World::default()
    };
    w.groups.push(g);
    w.instance_secs = vec![0.0];
    w
}

fn base(now: Instant) -> (DateTime<Utc>, Instant) {
    (DateTime::<Utc>::UNIX_EPOCH, now)
}

fn zones_of(w: &World) -> Vec<usize> {
    let mut n = vec![0; w.groups[0].zones.len()];
    for i in w.alive(0) {
        n[i.zone] += 1;
    }
    n
}

#[test]
fn launches_go_to_the_zone_with_fewest_and_a_dry_zone_logs_a_failure_naming_it() {
    let now = Instant::now();
    let mut w = world(group(&[("a", 0), ("b", 10), ("c", 10)], 6));
    w.reconcile_groups(now, &Launch::default(), base(now));
    assert_eq!(zones_of(&w), [0, 3, 3], "balanced over the zones with room");
    let failed: Vec<&Activity> = w.groups[0]
        .activities
        .iter()
        .filter(|a| a.status_code == "Failed")
        .collect();
    assert_eq!(failed.len(), 1, "one failure per attempt for the dry zone");
    assert!(
        failed[0].details.contains("us-east-1a"),
        "{}",
        failed[0].details
    );
    assert_eq!(w.events.len(), 7, "six launches and one failure");
    // Partial fulfilment: 10 more wanted, 14 places left, b full first.
    w.groups[0].desired = 20;
    w.groups[0].zones[1].capacity = 4;
    w.reconcile_groups(now + Duration::from_secs(60), &Launch::default(), base(now));
    assert_eq!(zones_of(&w), [0, 4, 10]);
}

/// Pools per zone x instance type: (zone, type, capacity).
fn typed(pools: &[(&str, &str, i32)], desired: i32) -> Group {
    let mut g = group(&[], desired);
    g.zones = pools
        .iter()
        .map(|(z, t, c)| Pool {
            name: format!("us-east-1{z}"),
            instance_type: (*t).into(),
            capacity: *c,
        })
        .collect();
    g
}

fn failures(w: &World) -> Vec<String> {
    w.groups[0]
        .activities
        .iter()
        .filter(|a| a.status_code == "Failed")
        .map(|a| a.details.clone())
        .collect()
}

#[test]
fn a_dry_instance_type_is_filled_by_another_type_in_its_zone_silently() {
    let now = Instant::now();
    // g4dn dry everywhere, g5 has room: a mixed-instances group moves
    // to g5 in the same zones, logs no failure, stays balanced.
    let mut w = world(typed(
        &[
            ("a", "g4dn.xlarge", 0),
            ("a", "g5.xlarge", 10),
            ("b", "g4dn.xlarge", 0),
            ("b", "g5.xlarge", 10),
        ],
        6,
    ));
    w.reconcile_groups(now, &Launch::default(), base(now));
    assert_eq!(zones_of(&w), [0, 3, 0, 3]);
    assert!(failures(&w).is_empty(), "{:?}", failures(&w));
    assert_eq!(w.events.len(), 6, "six launches, no failure event");
    // Within a zone, the type with the most room left first.
    let mut w = world(typed(&[("a", "g4dn.xlarge", 2), ("a", "g5.xlarge", 5)], 5));
    w.reconcile_groups(now, &Launch::default(), base(now));
    // g5 (4 left), g5 (3), g5 (2), a tie (g4dn first), g5.
    assert_eq!(zones_of(&w), [1, 4], "the most room left first");
}

#[test]
fn a_zone_with_every_type_dry_logs_one_failure_and_the_launch_moves_on() {
    let now = Instant::now();
    let mut w = world(typed(
        &[
            ("a", "g4dn.xlarge", 0),
            ("a", "g5.xlarge", 0),
            ("b", "g4dn.xlarge", 10),
            ("b", "g5.xlarge", 0),
        ],
        4,
    ));
    w.reconcile_groups(now, &Launch::default(), base(now));
    assert_eq!(zones_of(&w), [0, 0, 4, 0]);
    let f = failures(&w);
    assert_eq!(f.len(), 1, "one failure for zone a: {f:?}");
    assert!(f[0].contains("us-east-1a"), "{f:?}");
}

#[test]
fn a_shrinking_type_pool_reclaims_that_type_in_its_zone_only() {
    let now = Instant::now();
    let mut w = world(typed(&[("a", "g4dn.xlarge", 5), ("a", "g5.xlarge", 5)], 8));
    w.reconcile_groups(now, &Launch::default(), base(now));
    assert_eq!(zones_of(&w), [4, 4]);
    w.groups[0].zones[0].capacity = 1;
    w.interrupt(now, Duration::from_secs(1), Duration::ZERO);
    let noticed: Vec<usize> = w
        .alive(0)
        .filter(|i| i.interruption.is_some())
        .map(|i| i.zone)
        .collect();
    assert_eq!(noticed, [0, 0, 0], "three g4dn, no g5");
}

#[test]
fn a_hooked_scale_in_waits_a_heartbeat_timeout_at_a_time_within_the_global_one() {
    let t0 = Instant::now();
    let mut g = group(&[("a", 10)], 2);
    g.hook = true;
    let mut w = world(g);
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    let ids: Vec<String> = w.alive(0).map(|i| i.id.clone()).collect();
    let (a, b) = (&ids[0], &ids[1]);
    let end = |w: &World, id: &str| match w.instances[id].state {
        State::Terminating { at } => Some(at.duration_since(t0).as_secs()),
        _ => None,
    };
    assert!(!w.hook_heartbeat(a, t0), "no lifecycle action yet");
    w.scale_in(a, t0, Kill::GroupScaleIn);
    assert_eq!(end(&w, a), Some(300), "HeartbeatTimeout");
    // Heartbeats restart the wait, never past the global timeout.
    assert!(w.hook_heartbeat(a, t0 + Duration::from_secs(200)));
    assert_eq!(end(&w, a), Some(500));
    assert!(w.hook_heartbeat(a, t0 + Duration::from_secs(29_900)));
    assert_eq!(end(&w, a), Some(30_000), "100 x 300 s");
    assert!(w.hook_complete(a, t0 + Duration::from_secs(29_950)));
    assert_eq!(end(&w, a), Some(29_950), "CONTINUE ends it now");
    // Over: a later heartbeat or completion is refused, as AWS does.
    assert!(!w.hook_heartbeat(a, t0 + Duration::from_secs(29_960)));
    assert!(!w.hook_complete(a, t0 + Duration::from_secs(29_960)));
    assert_eq!(end(&w, a), Some(29_950));
    // Without a hook the group ends it at once.
    w.groups[0].hook = false;
    w.scale_in(b, t0, Kill::GroupScaleIn);
    assert_eq!(end(&w, b), Some(0));
    assert!(!w.hook_complete(b, t0), "no lifecycle action to complete");
}

#[test]
fn an_instance_waiting_on_the_hook_holds_its_spot_capacity_and_ec2_still_reclaims_it() {
    let t0 = Instant::now();
    let mut g = group(&[("a", 2)], 2);
    g.hook = true;
    let mut w = world(g);
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    let a = w.alive(0).next().map(|i| i.id.clone()).unwrap();
    w.scale_in(&a, t0, Kill::GroupScaleIn);
    // Its replacement finds the pool full: the waiting one still runs.
    w.reconcile_groups(t0 + Duration::from_secs(60), &Launch::default(), base(t0));
    assert_eq!(w.alive(0).count(), 1);
    assert_eq!(w.on_spot(0).count(), 2);
    // The pool shrinks: EC2 may reclaim the waiting one too.
    w.groups[0].zones[0].capacity = 0;
    w.interrupt(
        t0 + Duration::from_secs(61),
        Duration::from_secs(1),
        Duration::ZERO,
    );
    assert!(w.instances[&a].interruption.is_some());
    // The reclaim cuts the hook's wait short, and counts as a reclaim.
    assert!(w.terminate(&a, t0 + Duration::from_secs(181), Kill::Reclaimed));
    assert_eq!(w.instances[&a].why, Some(Kill::Reclaimed));
    assert_eq!(
        w.instances[&a].state,
        State::Terminating {
            at: t0 + Duration::from_secs(181)
        }
    );
    assert!(!w.hook_heartbeat(&a, t0 + Duration::from_secs(182)));
    // Not a busy one: nothing counted as scaled in while busy.
    assert_eq!(w.busy_scaled_in, 0);
}

#[test]
fn an_ending_instance_is_not_ended_again_but_a_reclaim_cuts_the_hooks_wait() {
    let t0 = Instant::now();
    let mut w = world(group(&[("a", 10)], 3));
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    let ids: Vec<String> = w.alive(0).map(|i| i.id.clone()).collect();
    let later = t0 + Duration::from_secs(600);
    // Ending without a hook: neither a reclaim nor a scale-in moves it.
    assert!(w.terminate(&ids[0], later, Kill::AgentScaleIn));
    assert!(!w.terminate(&ids[0], t0, Kill::Reclaimed));
    assert!(!w.terminate(&ids[0], t0, Kill::GroupScaleIn));
    assert_eq!(w.instances[&ids[0]].state, State::Terminating { at: later });
    assert_eq!(w.instances[&ids[0]].why, Some(Kill::AgentScaleIn));
    // Waiting on the hook: a scale-in does not move it, a reclaim does.
    w.groups[0].hook = true;
    w.scale_in(&ids[1], t0, Kill::GroupScaleIn);
    assert!(!w.terminate(&ids[1], t0, Kill::Replaced));
    assert_eq!(w.instances[&ids[1]].why, Some(Kill::GroupScaleIn));
    assert!(w.terminate(&ids[1], t0 + Duration::from_secs(120), Kill::Reclaimed));
    assert_eq!(w.instances[&ids[1]].why, Some(Kill::Reclaimed));
    // Gone is gone.
    w.instances.get_mut(&ids[2]).unwrap().state = State::Gone;
    assert!(!w.terminate(&ids[2], t0, Kill::Reclaimed));
}

#[test]
fn a_fallback_at_exactly_its_gate_scaled_in_is_target_trackings() {
    let t0 = Instant::now();
    let mut w = world(group(&[("a", 10)], 0));
    w.groups.push(group(&[("a", 10)], 2));
    w.instance_secs = vec![0.0; 2];
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    w.groups[1].max = 2;
    w.groups[1].desired = 1;
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    let why: Vec<Option<Kill>> = w
        .instances
        .values()
        .filter(|i| i.why.is_some())
        .map(|i| i.why)
        .collect();
    assert_eq!(why, [Some(Kill::GroupScaleIn)]);
}

#[test]
fn launches_balance_against_the_instances_already_in_each_zone() {
    let t0 = Instant::now();
    let mut w = world(group(&[("a", 10), ("b", 0)], 3));
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    assert_eq!(zones_of(&w), [3, 0]);
    w.groups[0].zones[1].capacity = 10;
    w.groups[0].desired = 5;
    let t = t0 + Duration::from_secs(60);
    w.reconcile_groups(t, &Launch::default(), base(t0));
    assert_eq!(zones_of(&w), [3, 2], "both to b, which has fewer");
}

#[test]
fn a_busy_instance_scaled_in_without_faults_is_a_protection_bug() {
    let t0 = Instant::now();
    let mut w = world(group(&[("a", 5)], 2));
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    let ids: Vec<String> = w.alive(0).map(|i| i.id.clone()).collect();
    for id in &ids {
        w.instances.get_mut(id).unwrap().running.push("j1".into());
    }
    w.scale_in(&ids[0], t0, Kill::GroupScaleIn);
    assert_eq!(w.busy_scaled_in, 1);
    assert_eq!(w.violations.len(), 1, "{:?}", w.violations);
    // With the agents' calls late, it is the race, not a bug.
    w.faults.agent_api_latency = "1s".parse().unwrap();
    w.scale_in(&ids[1], t0, Kill::GroupScaleIn);
    assert_eq!(w.busy_scaled_in, 2);
    assert_eq!(w.violations.len(), 1);
}

#[test]
fn a_group_without_mixed_instances_waits_silently_for_spot_capacity() {
    let now = Instant::now();
    let mut g = group(&[("a", 0)], 2);
    g.spot_requests_wait = true;
    let mut w = world(g);
    for k in 0..3 {
        let t = now + Duration::from_secs(60 * k);
        w.reconcile_groups(t, &Launch::default(), base(now));
    }
    let codes: Vec<&str> = w.groups[0]
        .activities
        .iter()
        .map(|a| a.status_code.as_str())
        .collect();
    assert_eq!(codes, [PENDING_SPOT], "one waiting request");
    assert!(
        w.events.is_empty(),
        "no event: AWS sends none while it waits"
    );
    // Capacity back: the request is fulfilled.
    w.groups[0].zones[0].capacity = 5;
    w.reconcile_groups(
        now + Duration::from_secs(300),
        &Launch::default(),
        base(now),
    );
    assert_eq!(w.alive(0).count(), 2);
    assert_eq!(w.groups[0].activities[0].status_code, "Successful");
}

#[test]
fn a_partial_drop_reclaims_only_the_excess_once() {
    let now = Instant::now();
    let mut w = world(group(&[("a", 200)], 88));
    w.reconcile_groups(now, &Launch::default(), base(now));
    assert_eq!(w.alive(0).count(), 88);
    w.groups[0].zones[0].capacity = 20;
    w.interrupt(now, Duration::from_secs(1), Duration::ZERO);
    let noticed = |w: &World| w.alive(0).filter(|i| i.interruption.is_some()).count();
    assert_eq!(noticed(&w), 68);
    // A second later the noticed 68 are leaving, not counted again.
    w.interrupt(
        now + Duration::from_secs(1),
        Duration::from_secs(1),
        Duration::ZERO,
    );
    assert_eq!(noticed(&w), 68);
}

#[test]
fn with_a_generator_a_drop_reclaims_old_instances_too() {
    let t0 = Instant::now();
    let mut w = world(group(&[("a", 200)], 0));
    // 40 instances launched a minute apart, then the pool halves.
    for k in 0..40 {
        w.groups[0].desired = k + 1;
        w.reconcile_groups(
            t0 + Duration::from_secs(60 * k as u64),
            &Launch::default(),
            base(t0),
        );
    }
    assert_eq!(w.alive(0).count(), 40);
    w.rng = Some(Rng::new(7));
    w.groups[0].zones[0].capacity = 20;
    let now = t0 + Duration::from_secs(3600);
    w.interrupt(now, Duration::from_secs(1), Duration::ZERO);
    let oldest: Vec<bool> = {
        let mut by_age: Vec<(Instant, bool)> = w
            .alive(0)
            .map(|i| (i.launched, i.interruption.is_some()))
            .collect();
        by_age.sort_by_key(|x| x.0);
        by_age.into_iter().map(|x| x.1).collect()
    };
    assert_eq!(
        oldest.iter().filter(|x| **x).count(),
        20,
        "the excess, once"
    );
    assert!(
        oldest[..20].iter().any(|x| *x),
        "some of the 20 oldest are reclaimed: {oldest:?}"
    );
}

fn policy() -> Tracking {
    Tracking {
        policy: TargetTracking::new(
            "p",
            3.0,
            spotguard_controller::aws::MetricSpec::Custom {
                namespace: "n".into(),
                name: "m".into(),
                dimensions: Vec::new(),
            },
        ),
        enabled: true,
        history: VecDeque::new(),
        last_scale_out: None,
    }
}

#[test]
fn target_tracking_in_proportion_and_warming_instances_count_toward_desired() {
    let mut t = policy();
    // 4 warm instances at 6 per instance (target 3): after three periods
    // above, 4 x 6 / 3 = 8.
    assert_eq!(track_step(&mut t, 4, 0, 20, 4, 0, 6.0), 4);
    assert_eq!(track_step(&mut t, 4, 0, 20, 4, 0, 6.0), 4);
    assert_eq!(track_step(&mut t, 4, 0, 20, 4, 0, 6.0), 8);
    // The 4 new ones warming: scale-out goes on, from the warm ones, the
    // warming ones counting as capacity already there: 4 x 9 / 3 = 12,
    // not 12 more; the same call for capacity again adds nothing.
    assert_eq!(track_step(&mut t, 8, 0, 20, 4, 4, 9.0), 12);
    assert_eq!(track_step(&mut t, 12, 0, 20, 4, 8, 9.0), 12);
    // Within MaxSize.
    assert_eq!(track_step(&mut t, 16, 0, 20, 4, 12, 30.0), 20);
    // Below 90 % of the target for 15 periods: scale in, but not while
    // any instance warms.
    let mut t = policy();
    for _ in 0..14 {
        assert_eq!(track_step(&mut t, 10, 0, 20, 9, 1, 1.0), 10);
    }
    assert_eq!(track_step(&mut t, 10, 0, 20, 9, 1, 1.0), 10, "one warming");
    assert_eq!(track_step(&mut t, 10, 0, 20, 10, 0, 1.5), 5);
    // From an empty group: a value above the target grows it by one.
    let mut t = policy();
    for _ in 0..2 {
        track_step(&mut t, 0, 0, 20, 0, 0, 4.0);
    }
    assert_eq!(track_step(&mut t, 0, 0, 20, 0, 0, 4.0), 2);
}

#[test]
fn billing_starts_at_running_has_a_minute_minimum_and_spares_first_hour_reclaims() {
    let t0 = Instant::now();
    let mut w = world(group(&[("a", 10)], 3));
    let launch = Launch::default(); // 90 s to running
    w.reconcile_groups(t0, &launch, base(t0));
    let ids: Vec<String> = w.alive(0).map(|i| i.id.clone()).collect();
    let mut now = t0;
    let step = Duration::from_secs(1);
    for _ in 0..120 {
        now += step;
        w.bill(now, step);
    }
    // 120 s after launch, 30 s of it running, for each of three.
    assert!(
        (w.instance_secs[0] - 90.0).abs() < 1.5,
        "{}",
        w.instance_secs[0]
    );
    // One scaled in now: billed a full minute; one reclaimed in its
    // first hour: not billed at all.
    w.terminate(&ids[0], now, Kill::GroupScaleIn);
    w.settle(&ids[0]);
    w.terminate(&ids[1], now, Kill::Reclaimed);
    w.settle(&ids[1]);
    assert!((w.instances[&ids[0]].billed_secs - 60.0).abs() < 1e-9);
    assert_eq!(w.instances[&ids[1]].billed_secs, 0.0);
    assert!(
        (w.instance_secs[0] - 90.0).abs() < 1.5,
        "{}",
        w.instance_secs[0]
    );
    let expected = w.instance_secs[0] / 3600.0 * 0.36;
    assert!((w.cost - expected).abs() < 1e-9);
}

#[test]
fn the_generator_is_splitmix64_and_unit_draws_stay_in_zero_one() {
    // Reference values of SplitMix64 (Steele, Lea, Flood 2014) from the
    // state 7 ^ 0x9E3779B97F4A7C15.
    let mut r = Rng::new(7);
    assert_eq!(r.next_u64(), 0xec77_9c36_93f8_8501);
    assert_eq!(r.next_u64(), 0xfed9_eeb4_936d_e39d);
    let mut r = Rng::new(7);
    assert_eq!(r.unit(), 0.923_700_106_930_455_8);
    let draws: Vec<f64> = (0..10_000).map(|_| r.unit()).collect();
    assert!(draws.iter().all(|x| (0.0..1.0).contains(x)));
    let mean = draws.iter().sum::<f64>() / draws.len() as f64;
    assert!((0.49..0.51).contains(&mean), "{mean}");
}

#[test]
fn wall_time_is_the_start_plus_the_virtual_time_elapsed() {
    let base_t = Instant::now();
    let start = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::days(1);
    let t = wall(start, base_t, base_t + Duration::from_secs(90));
    assert_eq!((t - start).num_seconds(), 90);
}

#[test]
fn groups_are_found_by_region_and_name_and_instances_counted_by_state() {
    let mut w = world(group(&[("a", 10)], 3));
    let mut g2 = group(&[("a", 10)], 2);
    g2.region = "us-east-2".into();
    w.groups.push(g2);
    let mut g3 = group(&[("a", 10)], 0);
    g3.name = "h".into();
    w.groups.push(g3);
    assert_eq!(w.group_index("us-east-1", "g"), Some(0));
    assert_eq!(w.group_index("us-east-2", "g"), Some(1));
    assert_eq!(w.group_index("us-east-1", "h"), Some(2));
    assert_eq!(w.group_index("us-east-2", "h"), None);
    let t0 = Instant::now();
    w.instance_secs = vec![0.0; 3];
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    assert_eq!((w.alive(0).count(), w.alive(1).count()), (3, 2));
    assert_eq!(w.in_service(0), 0, "all pending");
    let ids: Vec<String> = w.alive(0).map(|i| i.id.clone()).collect();
    w.instances.get_mut(&ids[0]).unwrap().state = State::InService;
    w.instances.get_mut(&ids[1]).unwrap().state = State::InService;
    w.instances.get_mut(&ids[2]).unwrap().state = State::Gone;
    assert_eq!(w.in_service(0), 2);
    assert_eq!(w.alive(0).count(), 2);
    assert_eq!(w.in_service(1), 0);
    assert_eq!(w.on_spot(0).count(), 2, "its own, not the other group's");
    assert_eq!(w.on_spot(1).count(), 2);
}

#[test]
fn activities_count_up_and_a_group_keeps_its_last_fifty() {
    let t0 = Instant::now();
    let mut w = world(group(&[("a", 10)], 0));
    let first = w.activity(0, t0, true, "", Some("us-east-1a"), base(t0));
    assert_eq!(first["id"], "act-00000001");
    assert_eq!(first["detail-type"], "EC2 Instance Launch Successful");
    let second = w.activity(0, t0, false, CAPACITY_FAILURE, None, base(t0));
    assert_eq!(second["id"], "act-00000002");
    assert_eq!(second["detail"]["StatusCode"], "Failed");
    for _ in 0..48 {
        w.activity(0, t0, true, "", None, base(t0));
    }
    assert_eq!(w.groups[0].activities.len(), 50);
    assert_eq!(w.groups[0].activities[0].id, "act-00000001");
    w.activity(0, t0, true, "", None, base(t0));
    assert_eq!(w.groups[0].activities.len(), 50);
    assert_eq!(w.groups[0].activities[0].id, "act-00000002");
}

/// Launches `n` instances a minute apart from `t0` (the newest last).
fn launch_apart(w: &mut World, t0: Instant, n: i32) -> Vec<String> {
    for k in 0..n {
        w.groups[0].desired = k + 1;
        let t = t0 + Duration::from_secs(60 * k as u64);
        w.reconcile_groups(t, &Launch::default(), base(t0));
    }
    let mut ids: Vec<(Instant, String)> = w.alive(0).map(|i| (i.launched, i.id.clone())).collect();
    ids.sort();
    ids.into_iter().map(|(_, id)| id).collect()
}

#[test]
fn scale_in_takes_unprotected_instances_pending_first_then_the_newest() {
    let t0 = Instant::now();
    let mut w = world(group(&[("a", 10)], 0));
    let ids = launch_apart(&mut w, t0, 5);
    for id in &ids[..4] {
        w.instances.get_mut(id).unwrap().state = State::InService;
    }
    // ids[4] pending, ids[3] the newest in service but protected.
    w.instances.get_mut(&ids[3]).unwrap().protected = true;
    w.groups[0].desired = 3;
    let now = t0 + Duration::from_secs(600);
    w.reconcile_groups(now, &Launch::default(), base(t0));
    let ending: Vec<&String> = ids
        .iter()
        .filter(|id| matches!(w.instances[*id].state, State::Terminating { .. }))
        .collect();
    assert_eq!(
        ending,
        [&ids[2], &ids[4]],
        "the pending one, then the newest unprotected"
    );
    assert_eq!(w.instances[&ids[2]].why, Some(Kill::GroupScaleIn));
    assert_eq!(w.alive(0).count(), 3);
}

#[test]
fn a_fallback_above_its_lowered_gate_ends_instances_as_failback() {
    let t0 = Instant::now();
    let mut w = world(group(&[("a", 10)], 0));
    w.groups.push(group(&[("a", 10)], 3));
    w.groups[1].region = "us-east-2".into();
    w.instance_secs = vec![0.0; 2];
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    // Target tracking lowers the desired capacity: a scale-in.
    w.groups[1].desired = 2;
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    let why: Vec<Option<Kill>> = w
        .instances
        .values()
        .filter(|i| i.group == 1 && i.why.is_some())
        .map(|i| i.why)
        .collect();
    assert_eq!(why, [Some(Kill::GroupScaleIn)]);
    // The gate (MaxSize) lowered under the two left: the failback's.
    w.groups[1].max = 1;
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    let failback = w
        .instances
        .values()
        .filter(|i| i.why == Some(Kill::Failback))
        .count();
    assert_eq!(failback, 1);
    // The primary's MaxSize below its count is no failback.
    w.groups[0].desired = 2;
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    w.groups[0].max = 1;
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    let primary: Vec<Option<Kill>> = w
        .instances
        .values()
        .filter(|i| i.group == 0 && i.why.is_some())
        .map(|i| i.why)
        .collect();
    assert_eq!(primary, [Some(Kill::GroupScaleIn)]);
}

#[test]
fn a_short_group_tries_again_after_launch_retry_and_a_launch_sets_its_times() {
    let t0 = Instant::now();
    let mut w = world(group(&[("a", 0)], 2));
    w.broken_left = 1;
    let launch = Launch::default();
    let failures = |w: &World| w.events.len();
    w.reconcile_groups(t0, &launch, base(t0));
    assert_eq!(failures(&w), 1);
    w.reconcile_groups(t0 + Duration::from_secs(29), &launch, base(t0));
    assert_eq!(failures(&w), 1, "not before launch.retry (30 s)");
    w.groups[0].zones[0].capacity = 5;
    let t = t0 + Duration::from_secs(30);
    w.reconcile_groups(t, &launch, base(t0));
    assert_eq!(w.alive(0).count(), 2);
    let mut launched: Vec<&Instance> = w.alive(0).collect();
    launched.sort_by_key(|i| i.id.clone());
    assert_eq!(launched[0].running_at, t + launch.delay.0);
    assert_eq!(
        launched[0].state,
        State::Pending {
            ready: t + launch.delay.0 + launch.boot.0
        }
    );
    // The first launched has the broken worker, and only it.
    assert_eq!(
        launched.iter().map(|i| i.broken).collect::<Vec<_>>(),
        [true, false]
    );
    assert_eq!(w.broken_left, 0);
}

#[test]
fn random_interruptions_at_the_rate_with_the_rebalance_share_and_lead() {
    let t0 = Instant::now();
    let mut g = group(&[("a", 100)], 100);
    g.interruptions_per_hour = 900.0; // p = 0.5 in a 2-second step
    let mut w = world(g);
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    w.rebalance_probability = 1.0;
    let lead = Duration::from_secs(300);
    w.interrupt(t0, Duration::from_secs(2), lead);
    let picked: Vec<&Instance> = w.alive(0).filter(|i| i.interruption.is_some()).collect();
    assert!((30..=70).contains(&picked.len()), "{}", picked.len());
    for i in &picked {
        assert_eq!(
            i.interruption,
            Some((Some(t0), t0 + lead, t0 + lead + Duration::from_secs(120)))
        );
    }
    // No rebalance share, or no lead: the notice now, the reclaim 2 min on.
    let mut w2 = world(group(&[("a", 10)], 10));
    w2.groups[0].interruptions_per_hour = 3600.0; // p = 1
    w2.reconcile_groups(t0, &Launch::default(), base(t0));
    w2.rebalance_probability = 1.0;
    w2.interrupt(t0, Duration::from_secs(1), Duration::ZERO);
    assert!(w2
        .alive(0)
        .all(|i| i.interruption == Some((None, t0, t0 + Duration::from_secs(120)))));
    // Rate 0: none.
    let mut w3 = world(group(&[("a", 10)], 10));
    w3.reconcile_groups(t0, &Launch::default(), base(t0));
    w3.interrupt(t0, Duration::from_secs(3600), lead);
    assert!(w3.alive(0).all(|i| i.interruption.is_none()));
}

#[test]
fn an_instance_picked_by_a_shrinking_pool_is_not_picked_again_by_the_rate() {
    let t0 = Instant::now();
    let mut g = group(&[("a", 10)], 10);
    g.interruptions_per_hour = 3600.0; // every instance, this second
    let mut w = world(g);
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    w.rebalance_probability = 1.0;
    w.groups[0].zones[0].capacity = 6;
    let lead = Duration::from_secs(300);
    w.interrupt(t0, Duration::from_secs(1), lead);
    // Four by the shrink (no rebalance: capacity is gone now), six by the
    // rate (with the early recommendation), each once.
    let mut early = 0;
    let mut now_ = 0;
    for i in w.alive(0) {
        match i.interruption {
            Some((Some(_), _, _)) => early += 1,
            Some((None, n, _)) if n == t0 => now_ += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((now_, early), (4, 6));
}

#[test]
fn a_shrinking_pool_picks_any_of_its_instances_not_always_the_same() {
    // Two instances, room for one: over seeds, either can be reclaimed (a
    // shuffle that always swaps would always take the same one).
    let mut picked_newest = 0;
    for seed in 0..200 {
        let t0 = Instant::now();
        let mut w = world(group(&[("a", 10)], 0));
        let ids = launch_apart(&mut w, t0, 2);
        w.rng = Some(Rng::new(seed));
        w.groups[0].zones[0].capacity = 1;
        w.interrupt(
            t0 + Duration::from_secs(120),
            Duration::from_secs(1),
            Duration::ZERO,
        );
        if w.instances[&ids[1]].interruption.is_some() {
            picked_newest += 1;
        }
        assert_eq!(w.alive(0).filter(|i| i.interruption.is_some()).count(), 1);
    }
    assert!((60..=140).contains(&picked_newest), "{picked_newest}");
}

#[test]
fn tracking_reads_the_published_metric_counts_warm_instances_and_stops_when_disabled() {
    let t0 = Instant::now();
    let mut g = group(&[("a", 20)], 4);
    g.tracking = Some(policy());
    let mut w = world(g);
    w.reconcile_groups(t0, &Launch::default(), base(t0));
    let ids: Vec<String> = w.alive(0).map(|i| i.id.clone()).collect();
    for id in &ids {
        let i = w.instances.get_mut(id).unwrap();
        i.state = State::InService;
        i.in_service_at = Some(t0);
    }
    w.metrics
        .insert(("us-east-1".into(), "g".into(), "m".into()), 6.0);
    // Warm from 300 s in service: 4 x 6 / 3 = 8 after three periods.
    let at = |m: u64| t0 + Duration::from_secs(300 + 60 * m);
    for m in 0..3 {
        w.track(at(m));
    }
    assert_eq!(w.groups[0].desired, 8);
    assert_eq!(
        w.groups[0].tracking.as_ref().unwrap().last_scale_out,
        Some(at(2))
    );
    // Two of them still warming (in service 100 s): counted as capacity
    // already there, 2 x 6 / 3 = 4, no more than the desired 4.
    let mut w2 = world(group(&[("a", 20)], 4));
    w2.groups[0].tracking = Some(policy());
    w2.reconcile_groups(t0, &Launch::default(), base(t0));
    let ids: Vec<String> = w2.alive(0).map(|i| i.id.clone()).collect();
    for (k, id) in ids.iter().enumerate() {
        let i = w2.instances.get_mut(id).unwrap();
        i.state = State::InService;
        i.in_service_at = Some(if k < 2 {
            t0
        } else {
            at(2) - Duration::from_secs(100)
        });
    }
    w2.metrics
        .insert(("us-east-1".into(), "g".into(), "m".into()), 6.0);
    for m in 0..3 {
        w2.track(at(m));
    }
    assert_eq!(w2.groups[0].desired, 4);
    assert_eq!(w2.groups[0].tracking.as_ref().unwrap().last_scale_out, None);
    // Disabled: no change, and its history is cleared.
    let mut w3 = world(group(&[("a", 20)], 4));
    let mut t = policy();
    t.enabled = false;
    t.history.push_back(9.0);
    w3.groups[0].tracking = Some(t);
    w3.metrics
        .insert(("us-east-1".into(), "g".into(), "m".into()), 60.0);
    for m in 0..5 {
        w3.track(at(m));
    }
    assert_eq!(w3.groups[0].desired, 4);
    assert!(w3.groups[0].tracking.as_ref().unwrap().history.is_empty());
}

#[test]
fn tracking_boundaries_at_the_target_and_at_ninety_percent_of_it() {
    // Exactly at the target is not above it.
    let mut t = policy();
    for _ in 0..5 {
        assert_eq!(track_step(&mut t, 4, 0, 20, 4, 0, 3.0), 4);
    }
    // Exactly 90 % is not below; between 90 % and the target neither.
    for v in [2.7, 2.8] {
        let mut t = policy();
        for _ in 0..20 {
            assert_eq!(track_step(&mut t, 10, 0, 20, 10, 0, v), 10, "{v}");
        }
    }
    // Fifteen periods, one of them not below: no scale-in.
    let mut t = policy();
    for k in 0..15 {
        let v = if k == 7 { 2.9 } else { 1.0 };
        assert_eq!(track_step(&mut t, 10, 0, 20, 10, 0, v), 10);
    }
    // No warm instance: no scale-in, whatever the metric.
    let mut t = policy();
    for _ in 0..20 {
        assert_eq!(track_step(&mut t, 2, 0, 20, 0, 0, 0.0), 2);
    }
    // Desired above what the warm ones call for (the rest not launched):
    // one more than desired.
    let mut t = policy();
    for _ in 0..2 {
        track_step(&mut t, 6, 0, 20, 4, 0, 3.3);
    }
    assert_eq!(track_step(&mut t, 6, 0, 20, 4, 0, 3.3), 7);
    // A scale-in to the same capacity keeps the history: the next period
    // below scales in at once.
    let mut t = policy();
    for _ in 0..14 {
        track_step(&mut t, 5, 0, 20, 5, 0, 2.5);
    }
    assert_eq!(
        track_step(&mut t, 5, 0, 20, 5, 0, 2.5),
        5,
        "ceil(5 x 2.5 / 3) = 5"
    );
    assert_eq!(track_step(&mut t, 5, 0, 20, 5, 0, 1.5), 3);
}

#[test]
fn agent_calls_fail_at_the_scenario_rate() {
    let mut w = world(group(&[("a", 1)], 0));
    w.fault_rng = Some(Rng::new(3));
    assert!((0..100).all(|_| !w.agent_call_fails()), "rate 0");
    w.faults.agent_error_rate = 1.0;
    assert!((0..100).all(|_| w.agent_call_fails()), "rate 1");
    w.faults.agent_error_rate = 0.5;
    let n = (0..1000).filter(|_| w.agent_call_fails()).count();
    assert!((400..=600).contains(&n), "{n}");
}

#[test]
fn billing_counts_busy_and_running_time_and_settles_each_instance_on_its_own() {
    let t0 = Instant::now();
    let mut w = world(group(&[("a", 10)], 4));
    w.busy_secs = vec![0.0];
    w.up_secs = vec![0.0];
    let launch = Launch::default();
    w.reconcile_groups(t0, &launch, base(t0));
    let ids: Vec<String> = w.alive(0).map(|i| i.id.clone()).collect();
    w.instances
        .get_mut(&ids[0])
        .unwrap()
        .running
        .push("j".into());
    // The third never runs: ended while pending, billed nothing.
    w.terminate(&ids[2], t0, Kill::GroupScaleIn);
    w.settle(&ids[2]);
    w.instances.get_mut(&ids[2]).unwrap().state = State::Gone;
    assert_eq!(
        w.instances[&ids[2]].billed_secs, 0.0,
        "no minimum for nothing"
    );
    let step = Duration::from_secs(1);
    let mut now = t0;
    for _ in 0..100 {
        now += step;
        w.bill(now, step);
    }
    // 10 s running for each of the three left (from 90 s); one busy.
    assert!((w.up_secs[0] - 30.0).abs() < 1.5, "{}", w.up_secs[0]);
    assert!((w.busy_secs[0] - 10.0).abs() < 1.5, "{}", w.busy_secs[0]);
    // One scaled in after 10 s: billed 60; the other reclaimed after an
    // hour and 10 s: billed what it ran, not refunded.
    w.terminate(&ids[0], now, Kill::GroupScaleIn);
    w.settle(&ids[0]);
    w.instances.get_mut(&ids[0]).unwrap().state = State::Gone;
    let billed0 = w.instances[&ids[0]].billed_secs;
    assert!((billed0 - 60.0).abs() < 1e-9, "{billed0}");
    for _ in 0..3600 {
        now += step;
        w.bill(now, step);
    }
    let ran = w.instances[&ids[1]].billed_secs;
    assert!(ran > 3600.0);
    w.terminate(&ids[1], now, Kill::Reclaimed);
    w.settle(&ids[1]);
    assert_eq!(w.instances[&ids[1]].billed_secs, ran);
    // The group's total is its instances' bills, the cost its price.
    let total: f64 = w.instances.values().map(|i| i.billed_secs).sum();
    assert!(total > billed0 + ran, "the idle one still running");
    assert!(
        (w.instance_secs[0] - total).abs() < 1e-6,
        "{} {total}",
        w.instance_secs[0]
    );
    assert!((w.cost - total / 3600.0 * 0.36).abs() < 1e-9);
    // Reclaimed after exactly an hour: EC2 refunds only within the first.
    let mut w = world(group(&[("a", 10)], 1));
    w.reconcile_groups(t0, &launch, base(t0));
    let id = w.alive(0).next().map(|i| i.id.clone()).unwrap();
    w.instances.get_mut(&id).unwrap().billed_secs = 3600.0;
    w.terminate(&id, t0, Kill::Reclaimed);
    w.settle(&id);
    assert_eq!(w.instances[&id].billed_secs, 3600.0);
}
