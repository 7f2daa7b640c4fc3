//! The metrics target tracking scales on (REFERENCE.md): for each group,
//! backlog per InService instance of that group, or the backlog itself when
//! none is InService. Published in each group's own region, since a
//! target-tracking policy reads metrics of its region only.

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

/// The two data points of one publication: backlog per InService instance
/// of each group, each in its own region.
/// Each group's data point: `in_service` lists the primary's InService
/// count, then each fallback's, in cascade order.
pub fn backlog(cfg: &Config, visible: i64, in_flight: i64, in_service: &[i32]) -> Vec<MetricValue> {
    let b = backlog_of(cfg, visible, in_flight);
    cfg.groups()
        .zip(in_service)
        .enumerate()
        .map(|(i, ((region, asg), n))| {
            let name = if i == 0 {
                &cfg.metric.primary_name
            } else {
                &cfg.metric.fallback_name
            };
            group_point(cfg, region, asg, name, per_instance(b, *n))
        })
        .collect()
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

    #[test]
    fn backlog_per_instance_of_each_group_and_from_zero() {
        let m = backlog(&cfg(false), 100, 30, &[4, 5]);
        assert_eq!(m[0].value, 25.0);
        assert_eq!(m[0].region, "us-east-1");
        assert_eq!(
            m[0].dimensions,
            vec![("AutoScalingGroupName".to_string(), "p".to_string())]
        );
        // The fallback's point falls as its instances are added.
        assert_eq!(m[1].value, 20.0);
        assert_eq!(m[1].region, "us-east-2");
        assert_eq!(m[1].name, "BacklogPerInstance");
        assert_eq!(backlog(&cfg(false), 100, 30, &[4, 10])[1].value, 10.0);
        // No InService instance: the backlog itself.
        assert_eq!(backlog(&cfg(false), 100, 0, &[0, 0])[0].value, 100.0);
        assert_eq!(backlog(&cfg(false), 100, 0, &[0, 0])[1].value, 100.0);
        // In-flight counted when asked.
        assert_eq!(backlog(&cfg(true), 100, 20, &[4, 4])[0].value, 30.0);
        assert_eq!(backlog(&cfg(false), -5, 0, &[1, 1])[0].value, 0.0);
    }
}
