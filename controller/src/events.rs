//! EventBridge envelopes and Auto Scaling activities, turned into launch
//! outcomes. Malformed input is an error that names the field; the caller
//! logs and acknowledges it.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::reconcile::{capacity_code, Launch, LaunchKind, Offering};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A launch outcome of some group, and the envelope's region (group
    /// names repeat across regions; the caller keeps those of the groups
    /// that open a fallback).
    Launch {
        group: String,
        region: Option<String>,
        launch: Launch,
    },
    /// `EC2 Spot Instance Interruption Warning`: logged, not a failover reason.
    SpotInterruption { instance_id: String, action: String },
    /// A scheduled rule: publish the metrics and reconcile.
    Tick,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("event field `{field}`: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
    #[error("unhandled event: source {source_name:?}, detail-type {detail_type:?}")]
    Unknown {
        source_name: String,
        detail_type: String,
    },
}

fn field<'a>(v: &'a Value, path: &[&str], name: &'static str) -> Result<&'a str, EventError> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p).ok_or_else(|| EventError::Field {
            field: name,
            message: "missing".into(),
        })?;
    }
    cur.as_str().ok_or_else(|| EventError::Field {
        field: name,
        message: format!("expected a string, got {cur}"),
    })
}

fn time(s: &str, name: &'static str) -> Result<DateTime<Utc>, EventError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| EventError::Field {
            field: name,
            message: format!("{s:?} is not an RFC 3339 time: {e}"),
        })
}

/// Parses an EventBridge envelope.
pub fn parse(v: &Value, codes: &[String]) -> Result<Event, EventError> {
    let detail_type = field(v, &["detail-type"], "detail-type")?;
    let source = field(v, &["source"], "source")?;
    match (source, detail_type) {
        ("aws.events", "Scheduled Event") => Ok(Event::Tick),
        (
            "aws.autoscaling",
            "EC2 Instance Launch Successful" | "EC2 Instance Launch Unsuccessful",
        ) => {
            let group = field(
                v,
                &["detail", "AutoScalingGroupName"],
                "detail.AutoScalingGroupName",
            )?
            .to_string();
            let activity_id = field(v, &["detail", "ActivityId"], "detail.ActivityId")?.to_string();
            // The end of the activity if known, else its start, else the
            // envelope's time: a missing, empty or unreadable EndTime (AWS
            // sends "" while an activity runs) never drops the event.
            let at = match ["EndTime", "StartTime"]
                .iter()
                .filter_map(|k| v["detail"].get(k).and_then(Value::as_str))
                .find_map(|s| time(s, "detail.EndTime").ok())
            {
                Some(t) => t,
                None => time(field(v, &["time"], "time")?, "time")?,
            };
            let msg = v["detail"]
                .get("StatusMessage")
                .and_then(Value::as_str)
                .unwrap_or("");
            let kind = if detail_type == "EC2 Instance Launch Successful" {
                LaunchKind::Success
            } else {
                match capacity_code(msg, codes) {
                    Some(code) => LaunchKind::CapacityFailure(code),
                    None => LaunchKind::OtherFailure,
                }
            };
            let offering = match kind {
                LaunchKind::CapacityFailure(_) => Offering::of(
                    msg,
                    v["detail"]["Details"]
                        .get("Availability Zone")
                        .and_then(Value::as_str),
                ),
                _ => Offering::default(),
            };
            Ok(Event::Launch {
                group,
                region: v.get("region").and_then(Value::as_str).map(str::to_string),
                launch: Launch {
                    at,
                    activity_id,
                    kind,
                    offering,
                },
            })
        }
        ("aws.ec2", "EC2 Spot Instance Interruption Warning") => Ok(Event::SpotInterruption {
            instance_id: field(v, &["detail", "instance-id"], "detail.instance-id")?.to_string(),
            action: field(v, &["detail", "instance-action"], "detail.instance-action")?.to_string(),
        }),
        _ => Err(EventError::Unknown {
            source_name: source.to_string(),
            detail_type: detail_type.to_string(),
        }),
    }
}

/// A scaling activity as `DescribeScalingActivities` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    pub id: String,
    pub description: String,
    pub status_code: String,
    pub status_message: String,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    /// The activity's `Details`, a JSON object as a string (its
    /// "Availability Zone", "Subnet ID").
    pub details: String,
}

impl Activity {
    fn zone(&self) -> Option<String> {
        let v: Value = serde_json::from_str(&self.details).ok()?;
        v.get("Availability Zone")?.as_str().map(str::to_string)
    }
}

/// Launch outcomes among activities; terminations and unfinished launches are skipped.
pub fn launches_of(activities: &[Activity], codes: &[String]) -> Vec<Launch> {
    activities
        .iter()
        .filter(|a| a.description.starts_with("Launching"))
        .filter_map(|a| {
            let at = a.end.or(a.start)?;
            let kind = match a.status_code.as_str() {
                "Successful" => LaunchKind::Success,
                "Failed" | "Cancelled" => match capacity_code(&a.status_message, codes) {
                    Some(code) => LaunchKind::CapacityFailure(code),
                    None => LaunchKind::OtherFailure,
                },
                _ => return None,
            };
            let offering = match kind {
                LaunchKind::CapacityFailure(_) => {
                    Offering::of(&a.status_message, a.zone().as_deref())
                }
                _ => Offering::default(),
            };
            Some(Launch {
                at,
                activity_id: a.id.clone(),
                kind,
                offering,
            })
        })
        .collect()
}

/// Spot requests of groups without a mixed-instances policy wait in these
/// states while no capacity is found, instead of failing (REFERENCE.md).
pub const SPOT_WAIT_STATES: &[&str] = &["PendingSpotBidPlacement", "WaitingForSpotInstanceId"];

/// Launch activities waiting for spot capacity longer than `wait`, as
/// capacity failures: a shortage that never shows as `Failed`. The time is
/// the start plus `wait`, so the same activity always gives the same failure.
pub fn stuck_spot_requests(
    activities: &[Activity],
    now: DateTime<Utc>,
    wait: std::time::Duration,
) -> Vec<Launch> {
    let wait = chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
    activities
        .iter()
        .filter(|a| SPOT_WAIT_STATES.contains(&a.status_code.as_str()))
        .filter_map(|a| {
            let since = a.start?;
            (now - since >= wait).then(|| Launch {
                at: since + wait,
                activity_id: a.id.clone(),
                kind: LaunchKind::CapacityFailure(a.status_code.clone()),
                offering: Offering::of("", a.zone().as_deref()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn codes() -> Vec<String> {
        crate::config::CAPACITY_CODES
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    pub fn launch_event(detail_type: &str, msg: &str) -> Value {
        json!({
            "version": "0", "id": "e1", "detail-type": detail_type, "source": "aws.autoscaling",
            "account": "123456789012", "time": "2026-11-28T08:00:00Z", "region": "us-east-1", "resources": [],
            "detail": {
                "StatusCode": "Failed", "StatusMessage": msg, "AutoScalingGroupName": "gpu-east-1",
                "ActivityId": "0f3c-activity", "RequestId": "r", "EC2InstanceId": "",
                "StartTime": "2026-11-28T07:59:00Z", "EndTime": "2026-11-28T07:59:30Z",
                "Cause": "...", "Details": {"Availability Zone": "us-east-1a", "Subnet ID": "subnet-1"}
            }
        })
    }

    #[test]
    fn launch_events() {
        let e = parse(
            &launch_event(
                "EC2 Instance Launch Unsuccessful",
                "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity available that matches your request. Launching EC2 instance failed.",
            ),
            &codes(),
        )
        .unwrap();
        match e {
            Event::Launch { group, launch, .. } => {
                assert_eq!(group, "gpu-east-1");
                assert_eq!(
                    launch.kind,
                    LaunchKind::CapacityFailure("InsufficientInstanceCapacity".into())
                );
                assert_eq!(launch.activity_id, "0f3c-activity");
                assert_eq!(launch.at.to_rfc3339(), "2026-11-28T07:59:30+00:00");
            }
            e => panic!("{e:?}"),
        }
        let bad_ami = parse(
            &launch_event(
                "EC2 Instance Launch Unsuccessful",
                "The image id '[ami-1]' does not exist.",
            ),
            &codes(),
        )
        .unwrap();
        assert!(matches!(
            bad_ami,
            Event::Launch {
                launch: Launch {
                    kind: LaunchKind::OtherFailure,
                    ..
                },
                ..
            }
        ));
        let ok = parse(
            &launch_event("EC2 Instance Launch Successful", ""),
            &codes(),
        )
        .unwrap();
        assert!(matches!(
            ok,
            Event::Launch {
                launch: Launch {
                    kind: LaunchKind::Success,
                    ..
                },
                ..
            }
        ));
    }

    #[test]
    fn other_events_and_malformed_ones() {
        let tick = json!({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}});
        assert_eq!(parse(&tick, &codes()).unwrap(), Event::Tick);
        let spot = json!({"source": "aws.ec2", "detail-type": "EC2 Spot Instance Interruption Warning",
                          "detail": {"instance-id": "i-1", "instance-action": "terminate"}});
        assert!(matches!(
            parse(&spot, &codes()).unwrap(),
            Event::SpotInterruption { .. }
        ));
        let unknown = json!({"source": "aws.s3", "detail-type": "Object Created"});
        assert!(matches!(
            parse(&unknown, &codes()),
            Err(EventError::Unknown { .. })
        ));
        let mut no_group = launch_event("EC2 Instance Launch Unsuccessful", "x");
        no_group["detail"]
            .as_object_mut()
            .unwrap()
            .remove("AutoScalingGroupName");
        let e = parse(&no_group, &codes()).unwrap_err();
        assert!(e.to_string().contains("detail.AutoScalingGroupName"), "{e}");
        // A time the decision can do without never drops the event: an
        // unreadable or empty EndTime falls back to StartTime, then to the
        // envelope's time.
        let at = |e: Event| match e {
            Event::Launch { launch, .. } => launch.at.to_rfc3339(),
            e => panic!("{e:?}"),
        };
        let mut bad_time = launch_event("EC2 Instance Launch Unsuccessful", "x");
        bad_time["detail"]["EndTime"] = json!("noon");
        assert_eq!(
            at(parse(&bad_time, &codes()).unwrap()),
            "2026-11-28T07:59:00+00:00"
        );
        bad_time["detail"]["EndTime"] = json!("");
        bad_time["detail"]["StartTime"] = json!("");
        assert_eq!(
            at(parse(&bad_time, &codes()).unwrap()),
            "2026-11-28T08:00:00+00:00"
        );
        bad_time["detail"]
            .as_object_mut()
            .unwrap()
            .remove("EndTime");
        assert_eq!(
            at(parse(&bad_time, &codes()).unwrap()),
            "2026-11-28T08:00:00+00:00"
        );
        bad_time["time"] = json!("later");
        assert!(parse(&bad_time, &codes())
            .unwrap_err()
            .to_string()
            .contains("time"));
        for garbage in [
            json!(null),
            json!([1, 2]),
            json!("text"),
            json!({"detail-type": 5}),
        ] {
            assert!(parse(&garbage, &codes()).is_err(), "{garbage}");
        }
    }

    /// AWS's published sample of the event (Auto Scaling user guide,
    /// "Example events"), with its placeholders filled in.
    const AWS_SAMPLE: &str = r#"{
      "version": "0",
      "id": "12345678-1234-1234-1234-123456789012",
      "detail-type": "EC2 Instance Launch Unsuccessful",
      "source": "aws.autoscaling",
      "account": "123456789012",
      "time": "2026-11-28T08:00:05Z",
      "region": "us-west-2",
      "resources": ["auto-scaling-group-arn", "instance-arn"],
      "detail": {
        "StatusCode": "Failed",
        "AutoScalingGroupName": "my-asg",
        "ActivityId": "87654321-4321-4321-4321-210987654321",
        "Details": {"Availability Zone": "us-west-2b", "Subnet ID": "subnet-12345678"},
        "RequestId": "12345678-1234-1234-1234-123456789012",
        "StatusMessage": "message-text",
        "EndTime": "2026-11-28T08:00:04Z",
        "EC2InstanceId": "i-1234567890abcdef0",
        "StartTime": "2026-11-28T08:00:01Z",
        "Cause": "description-text"
      }
    }"#;

    #[test]
    fn every_status_message_form_is_classified_by_its_exact_code() {
        let failover = crate::config::Config::parse(
            "[primary]\nasg = \"p\"\nqueue_url = \"https://sqs.us-east-1.amazonaws.com/1/q\"\n[fallback]\nasg = \"f\"\n",
            "t",
        )
        .unwrap()
        .failover_codes();
        for (msg, code, fails_over) in [
            ("Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity available that matches your request. Launching EC2 instance failed.", Some("InsufficientInstanceCapacity"), true),
            ("Could not launch Spot Instances. UnfulfillableCapacity - Unable to fulfill capacity due to your request configuration. Please adjust your request and try again. Launching EC2 instance failed.", Some("UnfulfillableCapacity"), true),
            ("We currently do not have sufficient g4dn.xlarge capacity in the Availability Zone you requested (us-east-1a). Our system will be working on provisioning additional capacity.", Some("InsufficientInstanceCapacity"), true),
            ("There is no Spot capacity available that matches your request.", Some("InsufficientInstanceCapacity"), true),
            ("Max spot instance count exceeded. Launching EC2 instance failed.", Some("MaxSpotInstanceCountExceeded"), true),
            ("Could not launch Spot Instances. VcpuLimitExceeded - You have requested more vCPU capacity than your current vCPU limit of 64 allows. Launching EC2 instance failed.", Some("VcpuLimitExceeded"), true),
            // Permanent or a setting: another region would not fix them.
            ("Could not launch Spot Instances. Unsupported - The requested configuration is currently not supported. Launching EC2 instance failed.", Some("Unsupported"), false),
            ("Could not launch Spot Instances. SpotMaxPriceTooLow - Your Spot request price of 0.1 is lower than the minimum required Spot request fulfillment price of 0.2. Launching EC2 instance failed.", Some("SpotMaxPriceTooLow"), false),
            ("The image id '[ami-1]' does not exist. Launching EC2 instance failed.", None, false),
            // Words of a code inside other text are not the code.
            ("Subnet note: InsufficientInstanceCapacityWarning seen", None, false),
            ("message-text", None, false),
        ] {
            assert_eq!(crate::reconcile::failure_code(msg).as_deref(), code, "{msg}");
            assert_eq!(capacity_code(msg, &failover).is_some(), fails_over, "{msg}");
        }
        // On-quota off: the quota codes do not fail over.
        let only_capacity = codes();
        assert!(capacity_code("Max spot instance count exceeded.", &only_capacity).is_none());
    }

    /// EventBridge's `wildcard`: `*` any run of characters, the rest
    /// literal and case-sensitive.
    fn wildcard(pattern: &str, text: &str) -> bool {
        let parts: Vec<&str> = pattern.split('*').collect();
        let mut at = 0;
        for (i, p) in parts.iter().enumerate() {
            if i == 0 {
                if !text.starts_with(p) {
                    return false;
                }
                at = p.len();
            } else if i == parts.len() - 1 {
                return text.len() >= at + p.len() && text[at..].ends_with(p);
            } else {
                match text[at..].find(p) {
                    Some(j) => at += j + p.len(),
                    None => return false,
                }
            }
        }
        at == text.len()
    }

    #[test]
    fn the_event_rule_and_the_parser_share_one_list_of_failure_forms() {
        use crate::reconcile::FAILOVER_FORMS;
        let all: Vec<String> = crate::config::CAPACITY_CODES
            .iter()
            .chain(crate::config::QUOTA_CODES)
            .map(|c| c.to_string())
            .collect();
        for (w, code, sample) in FAILOVER_FORMS {
            assert!(wildcard(w, sample), "{w} does not match its own sample");
            assert_eq!(
                capacity_code(sample, &all).as_deref(),
                Some(*code),
                "{sample}"
            );
        }
        for code in &all {
            assert!(
                FAILOVER_FORMS.iter().any(|f| f.1 == code),
                "{code} has no form"
            );
        }
        // Forms that never fail over wake no one.
        for msg in [
            "Could not launch Spot Instances. Unsupported - The requested configuration is currently not supported. Launching EC2 instance failed.",
            "Could not launch Spot Instances. SpotMaxPriceTooLow - Your Spot request price of 0.1 is lower than the minimum required Spot request fulfillment price of 0.2. Launching EC2 instance failed.",
            "The image id '[ami-1]' does not exist. Launching EC2 instance failed.",
        ] {
            assert!(!FAILOVER_FORMS.iter().any(|f| wildcard(f.0, msg)), "{msg}");
        }
        // The template's rule lists exactly these wildcards.
        let template = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/cloudformation/spotguard-control.yaml"
        ))
        .unwrap();
        let rule = &template[template.find("LaunchUnsuccessfulRule:").unwrap()..];
        let rule = &rule[..rule.find("Targets:").unwrap()];
        let mut in_rule: Vec<&str> = rule
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- wildcard: "))
            .map(|w| w.trim_matches('"'))
            .collect();
        let mut forms: Vec<&str> = FAILOVER_FORMS.iter().map(|f| f.0).collect();
        in_rule.sort_unstable();
        forms.sort_unstable();
        assert_eq!(in_rule, forms);
        assert!(wildcard("*a*b*", "xaxbx") && !wildcard("*a*b*", "xbxax"));
    }

    #[test]
    fn the_aws_sample_event_parses() {
        let v: Value = serde_json::from_str(AWS_SAMPLE).unwrap();
        match parse(&v, &codes()).unwrap() {
            Event::Launch { group, launch, .. } => {
                assert_eq!(group, "my-asg");
                assert_eq!(launch.kind, LaunchKind::OtherFailure);
                assert_eq!(launch.activity_id, "87654321-4321-4321-4321-210987654321");
                assert_eq!(launch.at.to_rfc3339(), "2026-11-28T08:00:04+00:00");
            }
            e => panic!("{e:?}"),
        }
        let mut v = v;
        v["detail"]["StatusMessage"] = json!("Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity available that matches your request. Launching EC2 instance failed.");
        v["detail"]["EndTime"] = json!("");
        match parse(&v, &codes()).unwrap() {
            Event::Launch { launch, .. } => {
                assert_eq!(
                    launch.kind,
                    LaunchKind::CapacityFailure("InsufficientInstanceCapacity".into())
                );
                assert_eq!(launch.at.to_rfc3339(), "2026-11-28T08:00:01+00:00");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn activities() {
        let a = |id: &str, desc: &str, code: &str, msg: &str| Activity {
            id: id.into(),
            description: desc.into(),
            status_code: code.into(),
            status_message: msg.into(),
            start: DateTime::from_timestamp(1_800_000_000, 0),
            end: None,
            details: r#"{"Subnet ID":"subnet-1","Availability Zone":"us-east-1c"}"#.into(),
        };
        let l = launches_of(
            &[
                a("1", "Launching a new EC2 instance: i-1", "Successful", ""),
                a(
                    "2",
                    "Launching a new EC2 instance.  Status Reason: ...",
                    "Failed",
                    "InsufficientInstanceCapacity - no",
                ),
                a("3", "Launching a new EC2 instance", "InProgress", ""),
                a("4", "Terminating EC2 instance: i-1", "Successful", ""),
                a(
                    "5",
                    "Launching a new EC2 instance",
                    "Failed",
                    "The image id does not exist",
                ),
            ],
            &codes(),
        );
        let kinds: Vec<_> = l
            .iter()
            .map(|l| (l.activity_id.as_str(), l.kind.clone()))
            .collect();
        // A spot request waiting for capacity: a failure once it waited long enough.
        let mut waiting = a(
            "6",
            "Launching a new EC2 instance",
            "PendingSpotBidPlacement",
            "",
        );
        waiting.start = DateTime::from_timestamp(1_800_000_000, 0);
        let at = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let wait = std::time::Duration::from_secs(180);
        assert!(stuck_spot_requests(std::slice::from_ref(&waiting), at(179), wait).is_empty());
        let stuck = stuck_spot_requests(std::slice::from_ref(&waiting), at(400), wait);
        assert_eq!(stuck.len(), 1);
        assert_eq!(stuck[0].at, at(180));
        assert_eq!(
            stuck[0].kind,
            LaunchKind::CapacityFailure("PendingSpotBidPlacement".into())
        );
        assert_eq!(
            kinds,
            vec![
                ("1", LaunchKind::Success),
                (
                    "2",
                    LaunchKind::CapacityFailure("InsufficientInstanceCapacity".into())
                ),
                ("5", LaunchKind::OtherFailure)
            ]
        );
    }

    #[test]
    fn a_capacity_failure_names_its_zone_and_type_from_event_and_activity_alike() {
        let msg = "We currently do not have sufficient g4dn.xlarge capacity in the Availability Zone you requested (us-east-1a). Our system will be working on provisioning additional capacity.";
        let codes = codes();
        // The event: the zone from detail.Details, the type from the text.
        let mut v: Value = serde_json::from_str(AWS_SAMPLE).unwrap();
        v["detail-type"] = json!("EC2 Instance Launch Unsuccessful");
        v["detail"]["StatusCode"] = json!("Failed");
        v["detail"]["StatusMessage"] = json!(msg);
        v["detail"]["Details"] = json!({"Availability Zone": "us-east-1c"});
        let Event::Launch { launch, .. } = parse(&v, &codes).unwrap() else {
            panic!("a launch")
        };
        assert_eq!(launch.offering.zone.as_deref(), Some("us-east-1c"));
        assert_eq!(
            launch.offering.instance_type.as_deref(),
            Some("g4dn.xlarge")
        );
        // The activity: the zone from its Details JSON.
        let a = Activity {
            id: "a".into(),
            description: "Launching a new EC2 instance. Status Reason: ...".into(),
            status_code: "Failed".into(),
            status_message: msg.into(),
            start: None,
            end: Some(Utc::now()),
            details: r#"{"Subnet ID":"subnet-1","Availability Zone":"us-east-1b"}"#.into(),
        };
        assert_eq!(a.zone().as_deref(), Some("us-east-1b"));
        let l = launches_of(std::slice::from_ref(&a), &codes);
        assert_eq!(l[0].offering.zone.as_deref(), Some("us-east-1b"));
        assert_eq!(l[0].offering.instance_type.as_deref(), Some("g4dn.xlarge"));
        // Without Details, the zone named in the text.
        let bare = Activity {
            details: String::new(),
            ..a
        };
        assert_eq!(bare.zone(), None);
        assert_eq!(
            launches_of(&[bare], &codes)[0].offering.zone.as_deref(),
            Some("us-east-1a")
        );
        // A failure that does not fail over names no offering.
        let other = Activity {
            id: "b".into(),
            description: "Launching a new EC2 instance. Status Reason: ...".into(),
            status_code: "Failed".into(),
            status_message: "The image id '[ami-1]' does not exist. Launching EC2 instance failed."
                .into(),
            start: None,
            end: Some(Utc::now()),
            details: r#"{"Availability Zone":"us-east-1b"}"#.into(),
        };
        assert_eq!(
            launches_of(&[other], &codes)[0].offering,
            Offering::default()
        );
    }
}
