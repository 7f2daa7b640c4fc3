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
    /// CloudWatch's unit: `Count`, or `None` for a code (the link mode).
    pub unit: &'static str,
}

/// The failover mode of each link (fallback group): 0 normal, 1 failed
/// over, 2 failing back; published in the control plane's region (the
/// primary's, where the dashboard lives), dimensions `AutoScalingGroupName`
/// and `Region` of the fallback.
pub const LINK_MODE: &str = "LinkMode";
/// Each group's instances, as the controller read them this tick, in the
/// control plane's region (AWS/AutoScaling has them only in each group's
/// own region, and only with group metrics collection on).
pub const GROUP_IN_SERVICE: &str = "GroupInService";
pub const GROUP_PENDING: &str = "GroupPending";
pub const GROUP_DESIRED: &str = "GroupDesired";
/// The gate: a fallback's MaxSize (the primary's too).
pub const GROUP_MAX_SIZE: &str = "GroupMaxSize";
/// New capacity failures (those a decision saw first), by the code AWS
/// gave, of the group that failed (`AutoScalingGroupName`, `Region`,
/// `Code`). The failover codes only (other launch failures do not reach
/// the decision), and spot requests stuck past `failover.spot_wait`
/// (`PendingSpotBidPlacement`, `WaitingForSpotInstanceId`).
pub const CAPACITY_FAILURES: &str = "CapacityFailures";

/// Every metric the controller publishes in its namespace, with its
/// dimensions: what the dashboard may show (a test holds the template's
/// dashboard to this list, another the controller's points).
pub const PUBLISHED: &[(&str, &[&str])] = &[
    ("BacklogPerInstance", &["AutoScalingGroupName"]),
    (FAILED_OVER, &["AutoScalingGroupName"]),
    (LINK_MODE, &["AutoScalingGroupName", "Region"]),
    (GROUP_IN_SERVICE, &["AutoScalingGroupName", "Region"]),
    (GROUP_PENDING, &["AutoScalingGroupName", "Region"]),
    (GROUP_DESIRED, &["AutoScalingGroupName", "Region"]),
    (GROUP_MAX_SIZE, &["AutoScalingGroupName", "Region"]),
    (
        CAPACITY_FAILURES,
        &["AutoScalingGroupName", "Region", "Code"],
    ),
];

/// A group's gauge for the dashboard, in the control plane's region.
pub fn fleet_point(
    cfg: &Config,
    name: &str,
    (region, group): (&str, &str),
    value: f64,
    unit: &'static str,
) -> MetricValue {
    MetricValue {
        region: cfg.primary.region.clone(),
        namespace: cfg.metric.namespace.clone(),
        name: name.to_string(),
        dimensions: vec![
            ("AutoScalingGroupName".into(), group.to_string()),
            ("Region".into(), region.to_string()),
        ],
        value,
        unit,
    }
}

/// New capacity failures of `group` (region, name), by code, in the
/// control plane's region.
pub fn failures_point(
    cfg: &Config,
    (region, group): (&str, &str),
    code: &str,
    count: usize,
) -> MetricValue {
    MetricValue {
        region: cfg.primary.region.clone(),
        namespace: cfg.metric.namespace.clone(),
        name: CAPACITY_FAILURES.to_string(),
        dimensions: vec![
            ("AutoScalingGroupName".into(), group.to_string()),
            ("Region".into(), region.to_string()),
            ("Code".into(), code.to_string()),
        ],
        value: count as f64,
        unit: "Count",
    }
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
        unit: "Count",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The control template's dashboard body, its `${...}` filled in.
    fn dashboard() -> serde_json::Value {
        let t = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/cloudformation/spotguard-control.yaml"
        ))
        .unwrap();
        let at = t.find("DashboardBody: !Sub |").expect("a dashboard");
        let body: Vec<&str> = t[at..]
            .lines()
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with("        "))
            .collect();
        let mut text = body.join("\n");
        for (k, v) in [
            ("${AWS::Region}", "us-east-1"),
            ("${JobQueue.QueueName}", "jobs"),
            ("${DeadLetterQueue.QueueName}", "jobs-dlq"),
            ("${PrimaryGroupName}", "gpu"),
            ("${Controller}", "controller"),
            ("${DashboardBacklogTarget}", "20"),
        ] {
            text = text.replace(k, v);
        }
        assert!(!text.contains("${"), "a substitution left: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// (namespace, name, dimension names) of every metric the dashboard
    /// shows, SEARCH expressions included.
    fn shown(d: &serde_json::Value) -> Vec<(String, String, Vec<String>)> {
        let mut out = Vec::new();
        for w in d["widgets"].as_array().unwrap() {
            for m in w["properties"]["metrics"].as_array().unwrap() {
                let m = m.as_array().unwrap();
                if let Some(e) = m[0]["expression"].as_str() {
                    // SEARCH('{ns,dim,...} MetricName="X"', ...)
                    let inner = &e[e.find("'{").unwrap() + 2..];
                    let (schema, rest) = inner.split_once('}').unwrap();
                    let mut parts = schema.split(',').map(str::to_string);
                    let ns = parts.next().unwrap();
                    let name = rest.split('"').nth(1).unwrap().to_string();
                    out.push((ns, name, parts.collect()));
                    continue;
                }
                let strs: Vec<String> = m
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect();
                let dims = strs[2..].iter().step_by(2).cloned().collect();
                out.push((strs[0].clone(), strs[1].clone(), dims));
            }
        }
        out
    }

    #[test]
    fn the_dashboard_shows_only_what_is_published_and_all_the_issue_asks() {
        let d = dashboard();
        let shown = shown(&d);
        let aws: &[(&str, &str, &[&str])] = &[
            (
                "AWS/SQS",
                "ApproximateNumberOfMessagesVisible",
                &["QueueName"],
            ),
            (
                "AWS/SQS",
                "ApproximateNumberOfMessagesNotVisible",
                &["QueueName"],
            ),
            ("AWS/SQS", "ApproximateAgeOfOldestMessage", &["QueueName"]),
            ("AWS/Lambda", "Errors", &["FunctionName"]),
            ("AWS/Lambda", "Throttles", &["FunctionName"]),
        ];
        for (ns, name, dims) in &shown {
            let ok = if ns == "spotguard" {
                PUBLISHED
                    .iter()
                    .any(|(n, d)| n == name && d.to_vec() == *dims)
            } else {
                aws.iter()
                    .any(|(a, n, d)| a == ns && n == name && d.to_vec() == *dims)
            };
            assert!(
                ok,
                "the dashboard shows {ns} {name} {dims:?}, which nothing publishes so"
            );
        }
        // What the fleet's users asked to see: backlog and its age, backlog
        // per instance, InService and pending per group, each link's mode,
        // failures by code, the dead-letter queue, the controller's errors.
        for name in [
            "ApproximateNumberOfMessagesVisible",
            "ApproximateAgeOfOldestMessage",
            "BacklogPerInstance",
            GROUP_IN_SERVICE,
            GROUP_PENDING,
            LINK_MODE,
            CAPACITY_FAILURES,
            "Errors",
        ] {
            assert!(
                shown.iter().any(|s| s.1 == name),
                "{name} not on the dashboard"
            );
        }
        let dlq = d.to_string().contains("\"QueueName\",\"jobs-dlq\"");
        assert!(dlq, "the dead-letter queue");
        // The widgets tile the 24-column grid without overlapping.
        let mut cells = std::collections::BTreeSet::new();
        for w in d["widgets"].as_array().unwrap() {
            let f = |k: &str| w[k].as_u64().unwrap();
            assert!(f("x") + f("width") <= 24, "{w}");
            for x in f("x")..f("x") + f("width") {
                for y in f("y")..f("y") + f("height") {
                    assert!(cells.insert((x, y)), "widgets overlap at ({x}, {y})");
                }
            }
        }
    }

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
