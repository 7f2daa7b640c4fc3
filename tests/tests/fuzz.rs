//! Property tests over every parser of outside input: IMDS bodies, the
//! watcher's trackers, EventBridge events, the controller's tag memory and
//! decision, SQS message attributes (hand-over message, env names, checkpoint
//! references), and both configuration files. No input may panic; where a
//! parse succeeds, its result must hold together. Each test prints how many
//! cases it ran. The inputs repeat from run to run unless
//! `SPOTGUARD_FUZZ_RANDOM=1` (how the two bugs these found were found).

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// Cases per property: enough to find shallow panics in seconds on 2 cores.
const CASES: u32 = 3000;

fn run<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let config = Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    };
    // Repeatable by default (CI must not fail by chance); set
    // SPOTGUARD_FUZZ_RANDOM=1 to explore new inputs on every run.
    let mut runner = if std::env::var_os("SPOTGUARD_FUZZ_RANDOM").is_some() {
        TestRunner::new(config)
    } else {
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
    };
    runner
        .run(&strategy, test)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    println!("{name}: {CASES} cases, no panic");
}

/// JSON values of bounded depth, with the keys and strings real bodies use.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let key = prop_oneof![
        Just("action".to_string()),
        Just("time".to_string()),
        Just("noticeTime".to_string()),
        Just("EventId".to_string()),
        Just("Code".to_string()),
        Just("State".to_string()),
        Just("NotBefore".to_string()),
        Just("detail-type".to_string()),
        Just("source".to_string()),
        Just("detail".to_string()),
        Just("AutoScalingGroupName".to_string()),
        Just("ActivityId".to_string()),
        Just("StatusMessage".to_string()),
        Just("EndTime".to_string()),
        ".{0,12}",
    ];
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        any::<f64>().prop_map(|n| serde_json::json!(n)),
        prop_oneof![
            Just("terminate".to_string()),
            Just("2026-11-28T08:22:00Z".to_string()),
            Just("21 Jan 2026 09:00:43 GMT".to_string()),
            Just("aws.autoscaling".to_string()),
            Just("EC2 Instance Launch Unsuccessful".to_string()),
            Just("InsufficientInstanceCapacity".to_string()),
            ".{0,24}",
        ]
        .prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Text: arbitrary strings half the time, serialized JSON the other half.
fn body() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        json().prop_map(|v| v.to_string()),
        json().prop_map(|v| format!("{v:#}"))
    ]
}

#[test]
fn imds_bodies_never_panic() {
    use spotguard_common::imds::*;
    run("IMDS bodies", body(), |b| {
        let _ = parse_instance_action(&b);
        let _ = parse_rebalance(&b);
        if let Ok(s) = parse_target_lifecycle_state(&b) {
            prop_assert_eq!(parse_target_lifecycle_state(&s.to_string()).ok(), Some(s));
        }
        let _ = parse_scheduled_events(&b);
        let _ = truncate(&b, 7);
        Ok(())
    });
}

/// Spot notices that differ (action, time) among gaps (404): each change
/// is reported once, a notice back after a gap is not reported again. The
/// bodies of `body()` hold one valid time, so they never make two different
/// notices; these do.
#[test]
fn a_spot_notice_is_reported_once_per_change_and_never_again_after_a_gap() {
    use spotguard_agent::watch::SpotTracker;
    let notice = (
        prop_oneof![Just("terminate"), Just("stop"), Just("hibernate")],
        prop_oneof![
            Just("2026-11-28T08:22:00Z"),
            Just("2026-11-28T08:24:00Z"),
            Just("2026-11-28T09:00:00Z")
        ],
    );
    run(
        "spot notices that change",
        prop::collection::vec(prop::option::of(notice), 1..12),
        |polls| {
            let now = chrono::Utc::now();
            let mut t = SpotTracker::default();
            let (mut reported, mut expected, mut last) = (0, 0, None);
            for p in &polls {
                let body = p.map(|(a, at)| format!(r#"{{"action":"{a}","time":"{at}"}}"#));
                reported += t.observe(body.as_deref(), now).events.len();
                if p.is_some() && *p != last {
                    expected += 1;
                    last = *p;
                }
            }
            prop_assert_eq!(reported, expected, "{:?}", polls);
            Ok(())
        },
    );
}

#[test]
fn trackers_never_panic_and_never_repeat_a_notice() {
    use spotguard_agent::watch::{
        LifecycleTracker, RebalanceTracker, ScheduledTracker, SpotTracker,
    };
    run(
        "watcher trackers",
        prop::collection::vec(prop::option::of(body()), 1..8),
        |polls| {
            let now = chrono::Utc::now();
            let (mut spot, mut reb, mut life, mut sched) = (
                SpotTracker::default(),
                RebalanceTracker::default(),
                LifecycleTracker::default(),
                ScheduledTracker::default(),
            );
            for p in &polls {
                let _ = spot.observe(p.as_deref(), now);
                let _ = reb.observe(p.as_deref());
                let _ = life.observe(p.as_deref());
                let _ = sched.observe(p.as_deref());
            }
            // The same polls again: nothing new to report.
            for p in &polls {
                prop_assert!(spot.observe(p.as_deref(), now).events.is_empty());
                prop_assert!(reb.observe(p.as_deref()).events.is_empty());
                prop_assert!(sched.observe(p.as_deref()).events.is_empty());
            }
            Ok(())
        },
    );
}

#[test]
fn eventbridge_events_never_panic() {
    let codes: Vec<String> = spotguard_controller::config::CAPACITY_CODES
        .iter()
        .map(|s| s.to_string())
        .collect();
    run("EventBridge events", json(), |v| {
        let _ = spotguard_controller::events::parse(&v, &codes);
        Ok(())
    });
}

#[test]
fn tag_memory_and_decisions_never_panic_and_respect_busy_instances() {
    use spotguard_controller::reconcile::*;
    let tags = prop::collection::btree_map(
        prop_oneof![
            Just(TAG_MODE.to_string()),
            Just(TAG_SINCE.to_string()),
            Just(TAG_FAILURES.to_string()),
            Just(TAG_LAST_FAILURE.to_string()),
            Just(TAG_LAST_SUCCESS.to_string()),
            ".{0,8}"
        ],
        prop_oneof![
            Just("failed-over".to_string()),
            Just("failing-back".to_string()),
            Just("2026-11-28T08:00:00Z".to_string()),
            Just("1795000000/abc 12/x".to_string()),
            ".{0,40}"
        ],
        0..6,
    );
    let launch = (
        any::<i32>(),
        ".{0,20}",
        0u8..3,
        proptest::option::of(".{0,14}"),
        proptest::option::of(".{0,14}"),
    )
        .prop_map(|(secs, id, k, zone, instance_type)| Launch {
            at: chrono::DateTime::<chrono::Utc>::from_timestamp(
                1_800_000_000 + i64::from(secs / 1000),
                0,
            )
            .unwrap_or_default(),
            activity_id: id,
            kind: match k {
                0 => LaunchKind::Success,
                1 => LaunchKind::CapacityFailure("InsufficientInstanceCapacity".into()),
                _ => LaunchKind::OtherFailure,
            },
            // Outside input: anything, as an event could carry it.
            offering: spotguard_controller::reconcile::Offering {
                zone,
                instance_type,
            },
        });
    let group = (-2i32..20, -2i32..20, -2i32..20, -2i32..20).prop_map(
        |(desired, max, in_service, busy)| FallbackGroup {
            desired,
            max,
            in_service,
            busy,
            policy_enabled: None,
        },
    );
    let settings = Settings {
        failures: 2,
        window: std::time::Duration::from_secs(600),
        capacity_ttl: std::time::Duration::from_secs(180),
        recovery_for: std::time::Duration::from_secs(600),
        min_dwell: std::time::Duration::from_secs(300),
        step: 1,
        cap: 10,
        ..Settings::default()
    };
    run(
        "tags + reconcile",
        (
            tags,
            prop::collection::vec(launch, 0..12),
            group,
            any::<i32>(),
        ),
        |(tags, launches, g, now)| {
            let now = chrono::DateTime::<chrono::Utc>::from_timestamp(
                1_800_000_000 + i64::from(now / 100),
                0,
            )
            .unwrap_or_default();
            let (m, _) = Memory::from_tags(&tags, now);
            let p = reconcile(&m, &g, &launches, now, &settings);
            for a in &p.actions {
                if let Action::SetFallbackMaxSize { to, .. } = a {
                    prop_assert!(*to >= g.busy.max(0), "MaxSize {} below {} busy", to, g.busy);
                }
                if let Action::SaveMemory { tags } = a {
                    prop_assert!(tags.values().all(|v| v.len() <= 256));
                }
            }
            // Deciding again on the saved memory changes nothing more.
            let again = reconcile(&p.memory, &g, &launches, now, &settings);
            prop_assert_eq!(again.memory.mode, p.memory.mode);
            Ok(())
        },
    );
}

/// The cascade over random histories (three fallbacks, memories carried
/// through their tags): a fallback is failed over only while the one before
/// it is, no gate goes below its busy instances, every tag fits.
#[test]
fn the_cascade_stays_in_order_over_random_histories() {
    use spotguard_controller::reconcile::*;
    // One step: seconds since the last, an outcome (0 none, 1 success, 2
    // capacity failure) for the primary and the first two fallbacks, each
    // group's (desired, in service, busy), and whether work waits.
    let step = (
        1i64..400,
        prop::collection::vec(0u8..3, 3),
        prop::collection::vec((0i32..12, 0i32..12, 0i32..4), 4),
        any::<bool>(),
    );
    let settings = Settings {
        cap: 8,
        shortage_for: std::time::Duration::from_secs(60),
        min_dwell: std::time::Duration::from_secs(120),
        recovery_for: std::time::Duration::from_secs(300),
        ..Settings::default()
    };
    run(
        "cascade order",
        prop::collection::vec(step, 1..40),
        |steps| {
            let mut memories = vec![Memory::initial(); 3];
            let mut maxes = [0i32; 3];
            let mut now = chrono::DateTime::<chrono::Utc>::from_timestamp(1_800_000_000, 0)
                .unwrap_or_default();
            for (i, (dt, outcomes, groups, waiting)) in steps.iter().enumerate() {
                now += chrono::Duration::seconds(*dt);
                let launches: Vec<Vec<Launch>> = outcomes
                    .iter()
                    .enumerate()
                    .map(|(g, o)| {
                        let kind = match o {
                            1 => LaunchKind::Success,
                            2 => LaunchKind::CapacityFailure("InsufficientInstanceCapacity".into()),
                            _ => return vec![],
                        };
                        vec![Launch {
                            at: now,
                            activity_id: format!("a{i}-{g}"),
                            kind,
                            offering: Offering::default(),
                        }]
                    })
                    .collect();
                let observed: Vec<PrimaryGroup> = groups
                    .iter()
                    .map(|(desired, in_service, _)| PrimaryGroup {
                        desired: *desired,
                        max: 100,
                        in_service: (*in_service).min(*desired),
                        busy: 0,
                        pending: 0,
                    })
                    .collect();
                let fallbacks: Vec<FallbackGroup> = (0..3)
                    .map(|k| {
                        let (desired, in_service, busy) = groups[k + 1];
                        let in_service = in_service.min(desired);
                        FallbackGroup {
                            desired,
                            max: maxes[k],
                            in_service,
                            busy: busy.min(in_service),
                            policy_enabled: None,
                        }
                    })
                    .collect();
                let links: Vec<Link<'_>> = (0..3)
                    .map(|k| Link {
                        memory: &memories[k],
                        group: fallbacks[k],
                        upstream: Some(observed[k]),
                        launches: &launches[k.min(2)],
                        settings: &settings,
                    })
                    .collect();
                let visible = if *waiting { 50 } else { 0 };
                let plans = cascade(&links, Some(visible), Some(0), now);
                for (k, p) in plans.iter().enumerate() {
                    for a in &p.actions {
                        match a {
                            Action::SetFallbackMaxSize { to, .. } => {
                                prop_assert!(
                                    *to >= fallbacks[k].busy,
                                    "gate {} below {} busy",
                                    to,
                                    fallbacks[k].busy
                                );
                                maxes[k] = *to;
                            }
                            Action::SaveMemory { tags } => {
                                prop_assert!(tags.values().all(|v| v.len() <= 256));
                                memories[k] = Memory::from_tags(
                                    tags,
                                    chrono::DateTime::<chrono::Utc>::MAX_UTC,
                                )
                                .0;
                            }
                            _ => {}
                        }
                    }
                }
                for k in 0..2 {
                    if memories[k + 1].mode == Mode::FailedOver {
                        prop_assert_eq!(
                            memories[k].mode,
                            Mode::FailedOver,
                            "step {}: fallback {} open after {} closed",
                            i,
                            k + 2,
                            k + 1
                        );
                    }
                }
            }
            Ok(())
        },
    );
}

#[test]
fn message_attributes_and_checkpoints_never_panic() {
    use spotguard_agent::aws::{Attr, Message};
    use spotguard_agent::job::hand_over_message;
    use spotguard_agent::worker::{attr_env_name, checkpoint_value};
    let attrs = prop::collection::btree_map(".{0,16}", ".{0,32}", 0..12);
    run(
        "SQS attributes, checkpoints",
        (
            attrs,
            any::<String>(),
            prop::collection::vec(any::<u8>(), 0..64),
            any::<bool>(),
            ".{0,40}",
        ),
        |(attrs, ckpt, bytes, fifo, body)| {
            for k in attrs.keys() {
                let n = attr_env_name(k);
                prop_assert!(n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            }
            let _ = checkpoint_value(&bytes, 32);
            let msg = Message {
                id: "m".into(),
                receipt: "r".into(),
                body,
                receive_count: 1,
                first_received_ms: Some(1_800_000_000_000),
                attributes: attrs
                    .into_iter()
                    .map(|(k, v)| (k, Attr::string(v)))
                    .collect::<BTreeMap<_, _>>(),
                group_id: fifo.then(|| "g".to_string()),
                sender_id: None,
                sent_ms: None,
            };
            if let Ok(out) = hand_over_message(&msg, &ckpt, fifo) {
                prop_assert!(out.attributes.len() <= 10);
                prop_assert_eq!(&out.attributes["spotguard.checkpoint"].value, &ckpt);
            }
            Ok(())
        },
    );
}

#[test]
fn configuration_files_never_panic() {
    let valid_agent = "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/q\"\n[worker]\ncommand = [\"/bin/true\"]\n";
    let valid_ctl = "[primary]\nasg = \"a\"\nqueue_url = \"https://sqs.us-east-1.amazonaws.com/1/q\"\n[fallback]\nasg = \"b\"\n";
    let line = prop_oneof![
        Just("[scale_in]".to_string()),
        Just("[interruption]".to_string()),
        Just("[failover]".to_string()),
        Just("[worker]".to_string()),
        "[a-z_]{1,12} = \"[0-9a-z ]{0,6}\"",
        "[a-z_]{1,12} = [0-9-]{1,6}",
        "[a-z_]{1,12} = \\[\"[a-z]{0,4}\"\\]",
        ".{0,30}",
    ];
    run(
        "config files",
        (prop::collection::vec(line, 0..8), any::<bool>()),
        |(lines, agent)| {
            let text = format!(
                "{}{}",
                if agent { valid_agent } else { valid_ctl },
                lines.join("\n")
            );
            let _ = spotguard_agent::config::Config::parse(&text, "fuzz");
            let _ = spotguard_controller::config::Config::parse(&text, "fuzz");
            Ok(())
        },
    );
}
