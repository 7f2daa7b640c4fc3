//! The metrics target tracking scales on (REFERENCE.md): for the primary
//! group, backlog per InService instance, or the backlog itself when none is
//! InService (a quotient with no instances has no value, and target tracking
//! would never scale out from zero); for the fallback group, the visible
//! backlog (target 200 in the original design). Published in each group's
//! own region, since a target-tracking policy reads metrics of its region only.

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

/// The two data points of one publication.
pub fn backlog(
    cfg: &Config,
    visible: i64,
    in_flight: i64,
    primary_in_service: i32,
) -> Vec<MetricValue> {
    let backlog = (visible
        + if cfg.metric.include_in_flight {
            in_flight
        } else {
            0
        })
    .max(0) as f64;
    let per_instance = if primary_in_service > 0 {
        backlog / f64::from(primary_in_service)
    } else {
        backlog
    };
    vec![
        MetricValue {
            region: cfg.primary.region.clone(),
            namespace: cfg.metric.namespace.clone(),
            name: cfg.metric.primary_name.clone(),
            dimensions: vec![("AutoScalingGroupName".into(), cfg.primary.asg.clone())],
            value: per_instance,
        },
        MetricValue {
            region: cfg.fallback.region.clone(),
            namespace: cfg.metric.namespace.clone(),
            name: cfg.metric.fallback_name.clone(),
            dimensions: vec![("AutoScalingGroupName".into(), cfg.fallback.asg.clone())],
            value: backlog,
        },
    ]
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
    fn backlog_per_instance_and_from_zero() {
        let m = backlog(&cfg(false), 100, 30, 4);
        assert_eq!(m[0].value, 25.0);
        assert_eq!(m[0].region, "us-east-1");
        assert_eq!(
            m[0].dimensions,
            vec![("AutoScalingGroupName".to_string(), "p".to_string())]
        );
        assert_eq!(m[1].value, 100.0);
        assert_eq!(m[1].region, "us-east-2");
        // No InService instance: the backlog itself, so the group scales out from zero.
        assert_eq!(backlog(&cfg(false), 100, 0, 0)[0].value, 100.0);
        // In-flight counted when asked.
        assert_eq!(backlog(&cfg(true), 100, 20, 4)[0].value, 30.0);
        assert_eq!(backlog(&cfg(true), 100, 20, 4)[1].value, 120.0);
        assert_eq!(backlog(&cfg(false), -5, 0, 1)[0].value, 0.0);
    }
}
