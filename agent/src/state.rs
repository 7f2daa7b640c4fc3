//! The agent's states and their transitions, without I/O.
//!
//! ```text
//!             idle for scale_in.idle_timeout
//!   Running ---------------------------------> ScalingIn --accepted--> Terminating
//!     ^  |  <-----refused / messages arrived----'   |                      |
//!     |  |  (a refusal always resumes work)         |                      |
//!     |  | rebalance (stop-intake)                  |                      |
//!     |  v                                          |                      |
//!   IntakeStopped --idle--> ScalingIn               |                      |
//!                                                   |                      |
//!   any state --spot / lifecycle Terminated / SIGTERM / rebalance (drain)--+--> Draining
//! ```
//!
//! Beside the modes, the controller can close a fallback group's intake
//! (its `spotguard:intake` tag, read by the runner): `Running` then takes
//! no job, and an instance with no job counts as idle at once.
//!
//! `Draining` is final (intake never reopens), but for a drain started by a
//! rebalance recommendation alone, which scales in once idle. Its deadline is the earliest of
//! the spot notice time minus the margin, the shutdown deadline and, for a
//! lifecycle or warm-pool drain, the hook's global timeout minus
//! the margin; a rebalance drain alone has none. Only `Running` takes new
//! work. A spot notice never leads to a scale-in call (the group must
//! replace reclaimed capacity, so desired capacity is not decremented).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::RebalancePolicy;

/// Why a drain was started. A drain can have several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainReason {
    SpotInterruption,
    LifecycleTerminated,
    Rebalance,
    Shutdown,
    /// Target lifecycle state `Warmed:*`: the instance goes (back) into the
    /// warm pool; it drains like a termination, and a return to `InService`
    /// reopens intake.
    WarmPool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drain {
    /// Jobs still running then are stopped and handed back. `None`: no limit.
    pub deadline: Option<DateTime<Utc>>,
    /// In the order they arrived, each once.
    pub reasons: Vec<DrainReason>,
}

impl Drain {
    pub fn has(&self, r: DrainReason) -> bool {
        self.reasons.contains(&r)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Mode {
    /// Taking work.
    Running,
    /// A rebalance recommendation paused intake; running jobs go on.
    IntakeStopped,
    /// Idle: intake stopped. Once no receive is outstanding, the group is
    /// asked to terminate this instance (`requested`). `resume_to_paused`
    /// remembers whether to go back to `IntakeStopped` after a refusal.
    ScalingIn {
        requested: bool,
        resume_to_paused: bool,
    },
    /// The group accepted the termination; waiting to be shut down.
    Terminating,
    /// Intake closed for good; jobs finish until the deadline.
    Draining(Drain),
}

impl Mode {
    pub fn intake_open(&self) -> bool {
        matches!(self, Mode::Running)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Mode::Running => "running",
            Mode::IntakeStopped => "intake_stopped",
            Mode::ScalingIn { .. } => "scaling_in",
            Mode::Terminating => "terminating",
            Mode::Draining(_) => "draining",
        }
    }

    pub fn drain(&self) -> Option<&Drain> {
        match self {
            Mode::Draining(d) => Some(d),
            _ => None,
        }
    }
}

/// A notice, as the state machine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Spot interruption of any action, with the interruption time.
    Spot {
        time: DateTime<Utc>,
    },
    Rebalance,
    /// Target lifecycle state `Terminated`.
    LifecycleTerminated,
    /// Target lifecycle state `Warmed:*`.
    WarmPool,
    /// Target lifecycle state `InService` (after a warm-pool drain).
    InService,
    /// The process came back after a spot `stop`/`hibernate` pause: the
    /// wall clock jumped past the interruption time.
    Resumed,
    /// SIGTERM or SIGINT.
    Shutdown,
}

/// The longest a lifecycle hook can hold an instance, whatever its
/// heartbeats (Auto Scaling user guide, lifecycle hooks: the global timeout
/// is 100 x HeartbeatTimeout or 48 hours, whichever is smaller). The
/// template's 300 s gives 8 h 20 min, not 48 h.
pub fn lifecycle_global_timeout(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout * 100).min(Duration::from_secs(48 * 3600))
}

/// The configuration the transitions depend on.
#[derive(Debug, Clone)]
pub struct Policy {
    pub deadline_margin: Duration,
    /// The termination hook's global timeout ([`lifecycle_global_timeout`]).
    pub lifecycle_global: Duration,
    /// `scale_in.enabled`: the instance can leave by itself.
    pub scale_in: bool,
    pub rebalance: RebalancePolicy,
    pub shutdown_deadline: Duration,
}

fn earlier(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// The mode after a notice.
pub fn on_notice(mode: &Mode, notice: &Notice, policy: &Policy, now: DateTime<Utc>) -> Mode {
    let (reason, deadline) = match notice {
        Notice::Spot { time } => {
            // A notice whose time minus the margin is already past: stop now.
            let d = (*time - to_chrono(policy.deadline_margin)).max(now);
            (DrainReason::SpotInterruption, Some(d))
        }
        // A lifecycle hook holds the instance at most its global timeout
        // (REFERENCE.md): jobs still running then are stopped and handed
        // back in time, not killed with the instance.
        Notice::LifecycleTerminated => (
            DrainReason::LifecycleTerminated,
            Some(now + to_chrono(policy.lifecycle_global) - to_chrono(policy.deadline_margin)),
        ),
        Notice::WarmPool => (
            DrainReason::WarmPool,
            Some(now + to_chrono(policy.lifecycle_global) - to_chrono(policy.deadline_margin)),
        ),
        // Back in service from the warm pool: the pool's reason ends; the
        // others hold (a rebalance drain then scales in once idle).
        Notice::InService => return without(mode, DrainReason::WarmPool),
        // Back from a spot stop/hibernate: that reason ends (the jobs were
        // handed back before the pause); other reasons still hold.
        Notice::Resumed => return without(mode, DrainReason::SpotInterruption),
        Notice::Shutdown => (
            DrainReason::Shutdown,
            Some(now + to_chrono(policy.shutdown_deadline)),
        ),
        // With scale-in off the instance cannot leave by itself: closing
        // intake on advice would idle it, paid for, until a reclaim that may
        // never come. A real reclaim sends its spot notice.
        Notice::Rebalance if !policy.scale_in => return mode.clone(),
        Notice::Rebalance => match policy.rebalance {
            RebalancePolicy::Ignore => return mode.clone(),
            RebalancePolicy::StopIntake => {
                return match mode {
                    Mode::Running => Mode::IntakeStopped,
                    Mode::ScalingIn { requested, .. } => Mode::ScalingIn {
                        requested: *requested,
                        resume_to_paused: true,
                    },
                    other => other.clone(),
                }
            }
            RebalancePolicy::Drain => match mode {
                // Already leaving: a recommendation adds nothing.
                Mode::ScalingIn {
                    requested: true, ..
                }
                | Mode::Terminating => return mode.clone(),
                _ => (DrainReason::Rebalance, None),
            },
        },
    };
    match mode {
        Mode::Draining(d) => {
            let mut d = d.clone();
            if !d.has(reason) {
                d.reasons.push(reason);
            }
            d.deadline = earlier(d.deadline, deadline);
            Mode::Draining(d)
        }
        _ => Mode::Draining(Drain {
            deadline,
            reasons: vec![reason],
        }),
    }
}

/// `mode` without the drain reason `r`, which has ended: running again if
/// it was the only one. A drain left to a rebalance alone has no deadline.
fn without(mode: &Mode, r: DrainReason) -> Mode {
    match mode {
        Mode::Draining(d) if d.has(r) => {
            let reasons: Vec<DrainReason> = d.reasons.iter().copied().filter(|x| *x != r).collect();
            if reasons.is_empty() {
                return Mode::Running;
            }
            let deadline = if reasons == [DrainReason::Rebalance] {
                None
            } else {
                d.deadline
            };
            Mode::Draining(Drain { deadline, reasons })
        }
        other => other.clone(),
    }
}

/// The mode once the instance has been idle long enough, if scale-in applies.
/// A drain started by a rebalance recommendation alone (`rebalance =
/// "drain"`) scales in too: it is advice, not a spot notice, and a drained
/// idle instance would otherwise stay paid for until a reclaim that may
/// never come.
pub fn on_idle(mode: &Mode) -> Option<Mode> {
    match mode {
        Mode::Draining(d) if d.reasons == [DrainReason::Rebalance] => Some(Mode::ScalingIn {
            requested: false,
            resume_to_paused: true,
        }),
        Mode::Running => Some(Mode::ScalingIn {
            requested: false,
            resume_to_paused: false,
        }),
        Mode::IntakeStopped => Some(Mode::ScalingIn {
            requested: false,
            resume_to_paused: true,
        }),
        _ => None,
    }
}

/// ScalingIn with no receive outstanding and no job: time to ask the group.
pub fn ready_to_request(mode: &Mode) -> Option<Mode> {
    match mode {
        Mode::ScalingIn {
            requested: false,
            resume_to_paused,
        } => Some(Mode::ScalingIn {
            requested: true,
            resume_to_paused: *resume_to_paused,
        }),
        _ => None,
    }
}

/// Messages arrived from a receive that was outstanding when intake closed.
/// In `ScalingIn` before the request, the instance is not idle after all: it
/// goes back to work. Returns the new mode and whether to run the messages
/// (otherwise they are handed back unstarted).
pub fn on_late_messages(mode: &Mode) -> (Mode, bool) {
    match mode {
        Mode::Running => (Mode::Running, true),
        Mode::ScalingIn {
            requested: false,
            resume_to_paused: false,
        } => (Mode::Running, true),
        other => (other.clone(), false),
    }
}

/// The group's answer to our own termination request. A refusal (the group
/// is at MinSize) means the instance is needed: it goes back to work, also
/// after a rebalance pause, which nothing else would ever reopen when
/// scale-in keeps being refused.
pub fn on_scale_in_result(mode: &Mode, accepted: bool) -> Mode {
    match mode {
        Mode::ScalingIn {
            requested: true, ..
        } => {
            if accepted {
                Mode::Terminating
            } else {
                Mode::Running
            }
        }
        // A notice arrived meanwhile: it decides.
        other => other.clone(),
    }
}

/// What to do once a drain has no job left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AfterDrain {
    pub complete_lifecycle: bool,
    pub exit: bool,
}

pub fn after_drain(drain: &Drain, hook_configured: bool) -> AfterDrain {
    AfterDrain {
        complete_lifecycle: hook_configured
            && (drain.has(DrainReason::LifecycleTerminated) || drain.has(DrainReason::WarmPool)),
        exit: drain.has(DrainReason::Shutdown),
    }
}

/// Back-off after the group refused a scale-in: `base` doubled per
/// consecutive refusal, capped at 16 x base, so a group at MinSize is asked
/// at most every 16 minutes with the 60 s default, never in a hot loop.
pub fn scale_in_backoff(base: Duration, refusals: u32) -> Duration {
    base * 2u32.pow(refusals.saturating_sub(1).min(4))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }
    fn policy(rebalance: RebalancePolicy) -> Policy {
        Policy {
            deadline_margin: Duration::from_secs(25),
            lifecycle_global: lifecycle_global_timeout(Duration::from_secs(300)),
            scale_in: true,
            rebalance,
            shutdown_deadline: Duration::from_secs(90),
        }
    }
    const NOW: &str = "2026-11-28T08:20:00Z";

    fn every_mode() -> Vec<Mode> {
        vec![
            Mode::Running,
            Mode::IntakeStopped,
            Mode::ScalingIn {
                requested: false,
                resume_to_paused: false,
            },
            Mode::ScalingIn {
                requested: true,
                resume_to_paused: true,
            },
            Mode::Terminating,
            Mode::Draining(Drain {
                deadline: None,
                reasons: vec![DrainReason::LifecycleTerminated],
            }),
            // A rebalance drain has no deadline of its own: a spot notice
            // on top must give it one.
            Mode::Draining(Drain {
                deadline: None,
                reasons: vec![DrainReason::Rebalance],
            }),
            Mode::Draining(Drain {
                deadline: None,
                reasons: vec![DrainReason::WarmPool, DrainReason::Shutdown],
            }),
        ]
    }

    #[test]
    fn a_hook_or_warm_pool_drain_ends_a_margin_before_the_hooks_global_timeout() {
        // 100 x a 300 s heartbeat timeout: 8 h 20 min after 08:20, less 25 s.
        let p = policy(RebalancePolicy::StopIntake);
        for notice in [Notice::LifecycleTerminated, Notice::WarmPool] {
            let next = on_notice(&Mode::Running, &notice, &p, t(NOW));
            let d = next.drain().unwrap();
            assert_eq!(d.deadline, Some(t("2026-11-28T16:39:35Z")), "{notice:?}");
        }
    }

    #[test]
    fn each_mode_has_the_name_status_and_metrics_show() {
        // /status and the spotguard_agent_mode{mode} gauge read these.
        let names: Vec<&str> = every_mode().iter().map(Mode::name).collect();
        assert_eq!(
            names,
            [
                "running",
                "intake_stopped",
                "scaling_in",
                "scaling_in",
                "terminating",
                "draining",
                "draining",
                "draining"
            ]
        );
    }

    #[test]
    fn spot_notice_drains_from_every_mode_with_deadline_before_the_notice() {
        let p = policy(RebalancePolicy::StopIntake);
        for m in every_mode() {
            let next = on_notice(
                &m,
                &Notice::Spot {
                    time: t("2026-11-28T08:22:00Z"),
                },
                &p,
                t(NOW),
            );
            let d = next.drain().unwrap_or_else(|| panic!("{m:?} -> {next:?}"));
            assert_eq!(d.deadline, Some(t("2026-11-28T08:21:35Z")), "{m:?}");
            assert!(d.has(DrainReason::SpotInterruption));
            assert!(!next.intake_open());
            // Nothing after a spot notice leads to a scale-in request.
            assert_eq!(on_idle(&next), None);
            assert_eq!(ready_to_request(&next), None);
        }
    }

    #[test]
    fn a_late_notice_stops_jobs_now_not_in_the_past() {
        let p = policy(RebalancePolicy::StopIntake);
        let next = on_notice(
            &Mode::Running,
            &Notice::Spot {
                time: t("2026-11-28T08:20:10Z"),
            },
            &p,
            t(NOW),
        );
        assert_eq!(next.drain().unwrap().deadline, Some(t(NOW)));
    }

    #[test]
    fn drains_combine_reasons_and_keep_the_earliest_deadline() {
        let p = policy(RebalancePolicy::StopIntake);
        let m = on_notice(&Mode::Running, &Notice::LifecycleTerminated, &p, t(NOW));
        // The hook's global timeout (100 x 300 s: 8 h 20 min), less the margin.
        assert_eq!(
            m.drain().unwrap().deadline,
            Some(t(NOW) + chrono::Duration::seconds(30_000) - chrono::Duration::seconds(25))
        );
        assert_eq!(
            lifecycle_global_timeout(Duration::from_secs(7200)),
            Duration::from_secs(48 * 3600)
        );
        let m = on_notice(&m, &Notice::Shutdown, &p, t(NOW));
        assert_eq!(m.drain().unwrap().deadline, Some(t("2026-11-28T08:21:30Z")));
        let m = on_notice(
            &m,
            &Notice::Spot {
                time: t("2026-11-28T08:22:00Z"),
            },
            &p,
            t(NOW),
        );
        assert_eq!(m.drain().unwrap().deadline, Some(t("2026-11-28T08:21:30Z")));
        let m = on_notice(
            &m,
            &Notice::Spot {
                time: t("2026-11-28T08:21:00Z"),
            },
            &p,
            t(NOW),
        );
        assert_eq!(m.drain().unwrap().deadline, Some(t("2026-11-28T08:20:35Z")));
        // The same notice again changes nothing (duplicates are harmless).
        let again = on_notice(
            &m,
            &Notice::Spot {
                time: t("2026-11-28T08:21:00Z"),
            },
            &p,
            t(NOW),
        );
        assert_eq!(again, m);
        assert_eq!(
            m.drain().unwrap().reasons,
            vec![
                DrainReason::LifecycleTerminated,
                DrainReason::Shutdown,
                DrainReason::SpotInterruption
            ]
        );
    }

    #[test]
    fn rebalance_policies() {
        let ignore = policy(RebalancePolicy::Ignore);
        for m in every_mode() {
            assert_eq!(on_notice(&m, &Notice::Rebalance, &ignore, t(NOW)), m);
        }
        let stop = policy(RebalancePolicy::StopIntake);
        assert_eq!(
            on_notice(&Mode::Running, &Notice::Rebalance, &stop, t(NOW)),
            Mode::IntakeStopped
        );
        assert_eq!(
            on_notice(&Mode::Terminating, &Notice::Rebalance, &stop, t(NOW)),
            Mode::Terminating
        );
        let drain = policy(RebalancePolicy::Drain);
        let m = on_notice(&Mode::Running, &Notice::Rebalance, &drain, t(NOW));
        assert_eq!(
            m,
            Mode::Draining(Drain {
                deadline: None,
                reasons: vec![DrainReason::Rebalance]
            })
        );
    }

    #[test]
    fn idle_scale_in_round_trips() {
        let m = on_idle(&Mode::Running).unwrap();
        assert!(!m.intake_open());
        let m = ready_to_request(&m).unwrap();
        assert_eq!(on_scale_in_result(&m, false), Mode::Running);
        assert_eq!(on_scale_in_result(&m, true), Mode::Terminating);
        // From a paused intake, a refusal means the instance is needed: back
        // to work (nothing else would reopen intake at MinSize).
        let m = ready_to_request(&on_idle(&Mode::IntakeStopped).unwrap()).unwrap();
        assert_eq!(on_scale_in_result(&m, false), Mode::Running);
        // A stop-intake rebalance during scale-in is remembered (late
        // messages are handed back), and a refusal still resumes work.
        let m = on_idle(&Mode::Running).unwrap();
        let m = on_notice(
            &m,
            &Notice::Rebalance,
            &policy(RebalancePolicy::StopIntake),
            t(NOW),
        );
        assert!(!on_late_messages(&m).1);
        let m = ready_to_request(&m).unwrap();
        assert_eq!(on_scale_in_result(&m, false), Mode::Running);
        // Not idle-able while draining or terminating.
        assert_eq!(on_idle(&Mode::Terminating), None);
        assert_eq!(
            on_idle(&on_notice(
                &Mode::Running,
                &Notice::Shutdown,
                &policy(RebalancePolicy::Ignore),
                t(NOW)
            )),
            None
        );
    }

    #[test]
    fn a_rebalance_drain_scales_in_once_idle_and_other_drains_do_not() {
        let drain = policy(RebalancePolicy::Drain);
        let m = on_notice(&Mode::Running, &Notice::Rebalance, &drain, t(NOW));
        let m = ready_to_request(&on_idle(&m).expect("rebalance drain scales in")).unwrap();
        assert_eq!(on_scale_in_result(&m, true), Mode::Terminating);
        // Already asked to leave: the recommendation changes nothing.
        assert_eq!(on_notice(&m, &Notice::Rebalance, &drain, t(NOW)), m);
        // Rebalance then lifecycle: not a rebalance-only drain.
        let m = on_notice(&Mode::Running, &Notice::Rebalance, &drain, t(NOW));
        let m = on_notice(&m, &Notice::LifecycleTerminated, &drain, t(NOW));
        assert_eq!(on_idle(&m), None);
    }

    #[test]
    fn warm_pool_drains_complete_the_hook_and_inservice_reopens_intake() {
        let p = policy(RebalancePolicy::StopIntake);
        let m = on_notice(&Mode::Running, &Notice::WarmPool, &p, t(NOW));
        let d = m.drain().expect("drains");
        assert!(after_drain(d, true).complete_lifecycle);
        assert_eq!(on_notice(&m, &Notice::InService, &p, t(NOW)), Mode::Running);
        // A warm-pool drain joined by a spot notice stays a drain.
        let spot = Notice::Spot {
            time: t("2026-11-28T08:22:00Z"),
        };
        let both = on_notice(&m, &spot, &p, t(NOW));
        assert!(on_notice(&both, &Notice::InService, &p, t(NOW))
            .drain()
            .is_some());
    }

    #[test]
    fn a_resume_after_a_spot_stop_reopens_intake_only_for_that_drain() {
        let p = policy(RebalancePolicy::StopIntake);
        let spot = Notice::Spot {
            time: t("2026-11-28T08:22:00Z"),
        };
        let m = on_notice(&Mode::Running, &spot, &p, t(NOW));
        assert_eq!(on_notice(&m, &Notice::Resumed, &p, t(NOW)), Mode::Running);
        let m = on_notice(&m, &Notice::Shutdown, &p, t(NOW));
        assert!(on_notice(&m, &Notice::Resumed, &p, t(NOW))
            .drain()
            .is_some());
        assert_eq!(
            on_notice(&Mode::Running, &Notice::Resumed, &p, t(NOW)),
            Mode::Running
        );
    }

    #[test]
    fn a_notice_during_scale_in_wins_over_the_answer() {
        let p = policy(RebalancePolicy::StopIntake);
        let m = ready_to_request(&on_idle(&Mode::Running).unwrap()).unwrap();
        let m = on_notice(
            &m,
            &Notice::Spot {
                time: t("2026-11-28T08:22:00Z"),
            },
            &p,
            t(NOW),
        );
        assert!(on_scale_in_result(&m, false).drain().is_some());
        assert!(on_scale_in_result(&m, true).drain().is_some());
    }

    #[test]
    fn our_own_termination_then_lifecycle_terminated_drains() {
        let p = policy(RebalancePolicy::StopIntake);
        let m = on_notice(&Mode::Terminating, &Notice::LifecycleTerminated, &p, t(NOW));
        let d = m.drain().unwrap();
        assert_eq!(
            after_drain(d, true),
            AfterDrain {
                complete_lifecycle: true,
                exit: false
            }
        );
        assert!(!after_drain(d, false).complete_lifecycle);
    }

    #[test]
    fn late_messages() {
        assert_eq!(on_late_messages(&Mode::Running), (Mode::Running, true));
        let idle = on_idle(&Mode::Running).unwrap();
        assert_eq!(on_late_messages(&idle), (Mode::Running, true));
        let paused_idle = on_idle(&Mode::IntakeStopped).unwrap();
        assert!(!on_late_messages(&paused_idle).1);
        assert!(!on_late_messages(&Mode::IntakeStopped).1);
        let drain = on_notice(
            &Mode::Running,
            &Notice::Shutdown,
            &policy(RebalancePolicy::Ignore),
            t(NOW),
        );
        assert!(!on_late_messages(&drain).1);
    }

    #[test]
    fn an_ended_reason_leaves_the_others_and_no_advice_idles_an_instance_that_cannot_leave() {
        let p = policy(RebalancePolicy::Drain);
        // Rebalance drain, then a spot hibernate, then the resume: the
        // rebalance drain holds (it scales in once idle), not the spot one.
        let m = on_notice(&Mode::Running, &Notice::Rebalance, &p, t(NOW));
        let m = on_notice(
            &m,
            &Notice::Spot {
                time: t("2026-11-28T08:22:00Z"),
            },
            &p,
            t(NOW),
        );
        let m = on_notice(&m, &Notice::Resumed, &p, t("2026-11-28T09:00:00Z"));
        assert_eq!(
            m,
            Mode::Draining(Drain {
                deadline: None,
                reasons: vec![DrainReason::Rebalance]
            })
        );
        // Warm pool and a rebalance, then InService: the rebalance drain.
        let m = on_notice(&Mode::Running, &Notice::WarmPool, &p, t(NOW));
        let m = on_notice(&m, &Notice::Rebalance, &p, t(NOW));
        let m = on_notice(&m, &Notice::InService, &p, t(NOW));
        assert_eq!(
            m.drain().map(|d| d.reasons.clone()),
            Some(vec![DrainReason::Rebalance])
        );
        // Scale-in off: a recommendation changes nothing, in either policy.
        for rebalance in [RebalancePolicy::Drain, RebalancePolicy::StopIntake] {
            let off = Policy {
                scale_in: false,
                ..policy(rebalance)
            };
            assert_eq!(
                on_notice(&Mode::Running, &Notice::Rebalance, &off, t(NOW)),
                Mode::Running
            );
        }
        // A spot resume alone still returns to work.
        let m = on_notice(
            &Mode::Running,
            &Notice::Spot {
                time: t("2026-11-28T08:22:00Z"),
            },
            &p,
            t(NOW),
        );
        assert_eq!(on_notice(&m, &Notice::Resumed, &p, t(NOW)), Mode::Running);
    }

    #[test]
    fn after_drain_exit_only_on_shutdown() {
        let d = Drain {
            deadline: None,
            reasons: vec![DrainReason::SpotInterruption],
        };
        assert_eq!(
            after_drain(&d, true),
            AfterDrain {
                complete_lifecycle: false,
                exit: false
            }
        );
        let d = Drain {
            deadline: None,
            reasons: vec![DrainReason::SpotInterruption, DrainReason::Shutdown],
        };
        assert!(after_drain(&d, false).exit);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_secs(60);
        assert_eq!(scale_in_backoff(b, 1), b);
        assert_eq!(scale_in_backoff(b, 2), b * 2);
        assert_eq!(scale_in_backoff(b, 5), b * 16);
        assert_eq!(scale_in_backoff(b, 50), b * 16);
    }
}
