//! The metrics target tracking scales on (REFERENCE.md): one figure for the
//! whole fleet, the backlog per InService instance of the open groups
//! together (the primary, and each fallback whose gate is open), published
//! to every group in its own region (a target-tracking policy reads metrics
//! of its region only). Target tracking sets new capacity = current x
//! metric / target, so with one shared figure the groups' sum converges to
//! backlog / target; a figure per group, each over its own instances,
//! would size every group for the whole backlog (up to twice the capacity
//! while failed over). A closed group (gate 0) cannot grow, whatever it is
//! told.

use serde::Serialize;

use crate::config::Config;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricValue {
    pub region: String,
    pub namespace: String,
    pub name: String,
    /// (name, value); `AutoScalingGroupName` = the group.
    pub dimensions: Vec<(String, String)>,
    pub value: f64,
}

/// 1 while the fallback is in use (failed over or failing back), 0 in
/// normal; the template's "failed over too long" alarm watches it.
pub const FAILED_OVER: &str = "FailedOver";

/// Backlog per InService instance; with none InService, the backlog
/// itself (a quotient has no value then; the controller also raises the
/// desired capacity from 0, see [`crate::handler`]).
pub fn per_instance(backlog: f64, in_service: i32) -> f64 {
    if in_service > 0 {
        backlog / f64::from(in_service)
    } else {
        backlog
    }
}

/// A group as the fleet's figure sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open {
    /// 0: the primary; `k`: fallback `k`.
    pub index: usize,
    pub in_service: i32,
    /// Its intake is closed (`spotguard:intake`, failing back): its
    /// instances finish their jobs and take no new one.
    pub intake_closed: bool,
}

/// The fleet's backlog per InService instance: the primary's instances and
/// those of every fallback whose intake is open, summed (a closed gate
/// runs none, or busy ones still working); with none, the backlog itself. Instances that take no new work do not lower the figure the
/// primary grows by.
pub fn fleet_per_instance(backlog: f64, groups: &[Open]) -> f64 {
    let n: i32 = groups
        .iter()
        .filter(|g| g.index == 0 || !g.intake_closed)
        .map(|g| g.in_service.max(0))
        .sum();
    per_instance(backlog, n)
}

/// The backlog the metrics divide: visible messages, plus in-flight ones
/// when `metric.include_in_flight`.
pub fn backlog_of(cfg: &Config, visible: i64, in_flight: i64) -> f64 {
    (visible
        + if cfg.metric.include_in_flight {
            in_flight
        } else {
            0
        })
    .max(0) as f64
}

/// One group's data point, in the group's region.
pub fn group_point(cfg: &Config, region: &str, group: &str, name: &str, value: f64) -> MetricValue {
    MetricValue {
        region: region.to_string(),
        namespace: cfg.metric.namespace.clone(),
        name: name.to_string(),
        dimensions: vec![("AutoScalingGroupName".into(), group.to_string())],
        value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(in_flight: bool) -> Config {
        let mut c = Config::parse(
            "[primary]\nasg = \"p\"\nqueue_url = \"https://sqs.us-east-1.amazonaws.com/1/q\"\n[fallback]\nasg = \"f\"\n",
            "t",
        )
        .unwrap();
        c.metric.include_in_flight = in_flight;
        c
    }

    fn open(index: usize, in_service: i32) -> Open {
        Open {
            index,
            in_service,
            intake_closed: false,
        }
    }

    #[test]
    fn one_figure_for_the_fleet_over_the_open_groups() {
        // Failed over: 4 in the primary, 5 in the open fallback.
        let v = fleet_per_instance(90.0, &[open(0, 4), open(1, 5)]);
        assert_eq!(v, 10.0);
        // A closed fallback (gate 0, nothing running) does not count.
        assert_eq!(fleet_per_instance(90.0, &[open(0, 4), open(1, 0)]), 22.5);
        // A gate lowered to 0 under instances still running: they count.
        assert_eq!(fleet_per_instance(90.0, &[open(0, 4), open(1, 2)]), 15.0);
        // Failing back with its intake closed: its instances take no work.
        let closed = Open {
            intake_closed: true,
            ..open(1, 5)
        };
        assert_eq!(fleet_per_instance(90.0, &[open(0, 4), closed]), 22.5);
        // The primary counts even at MaxSize 0.
        assert_eq!(fleet_per_instance(90.0, &[open(0, 3)]), 30.0);
        // None InService: the backlog itself.
        assert_eq!(fleet_per_instance(90.0, &[open(0, 0), open(1, 0)]), 90.0);
        assert_eq!(backlog_of(&cfg(true), 100, 20), 120.0);
        assert_eq!(backlog_of(&cfg(false), 100, 20), 100.0);
        assert_eq!(backlog_of(&cfg(false), -5, 0), 0.0);
    }

    /// Target tracking: new capacity = current x metric / target, each group
    /// on its own. With one fleet figure, the groups' total converges to
    /// backlog / target; with a figure per group over its own instances
    /// (the old law), each group alone converged to it (twice the fleet).
    #[test]
    fn the_fleets_total_converges_to_backlog_over_target() {
        let (backlog, target) = (120.0, 4.0);
        let mut sizes = [3i32, 9i32];
        for _ in 0..50 {
            let v = fleet_per_instance(backlog, &[open(0, sizes[0]), open(1, sizes[1])]);
            for n in sizes.iter_mut() {
                *n = ((f64::from(*n) * v / target).round() as i32).max(1);
            }
        }
        assert_eq!(sizes[0] + sizes[1], 30, "{sizes:?}");
        // The old per-group figure: each group sized for the whole backlog.
        let mut old = [3i32, 9i32];
        for _ in 0..50 {
            for n in old.iter_mut() {
                let v = per_instance(backlog, *n);
                *n = ((f64::from(*n) * v / target).round() as i32).max(1);
            }
        }
        assert_eq!(old, [30, 30]);
    }
}
