//! `spotguard-controller` end to end on moto, two regions on one server,
//! through the fault proxy: events through the Lambda handler (in process)
//! and through `once --event` (the binary); failed scaling activities
//! scripted by the proxy, since moto never fails a launch.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use spotguard_controller::aws::SdkCloud;
use spotguard_controller::config::Config;
use spotguard_controller::handler::Controller;
use spotguard_tests::aws_env::AwsEnv;
use spotguard_tests::controller_setup::{controller_config, controller_toml};
use spotguard_tests::proxy::{activities_xml, Fault};
use spotguard_tests::{bin, TempDir};

const CAPACITY: &str = "Could not launch Spot Instances. InsufficientInstanceCapacity - There is no Spot capacity available that matches your request. Launching EC2 instance failed.";
const BAD_AMI: &str = "The image id '[ami-0000]' does not exist. Launching EC2 instance failed.";

struct Ctl {
    env: AwsEnv,
    dir: TempDir,
    queue: String,
    sub: String,
    cfg_path: std::path::PathBuf,
    cfg: Config,
}

/// The primary group `gpu-primary` in us-east-1, short of capacity. moto
/// launches every instance at once; a primary out of spot capacity is short
/// of its desired capacity, so the proxy shows it as AWS would then:
/// desired 3, one instance InService.
fn short_primary(env: &AwsEnv) {
    env.create_group_in("us-east-1", "gpu-primary", 0, 10, 1);
    show_primary_short(env);
}

fn show_primary_short(env: &AwsEnv) {
    env.proxy.rewrite(
        "DescribeAutoScalingGroups",
        "us-east-1",
        "<DesiredCapacity>1</DesiredCapacity>",
        "<DesiredCapacity>3</DesiredCapacity>",
    );
}

fn setup(tag: &str) -> Ctl {
    let env = AwsEnv::start();
    let queue = env.create_queue("jobs", 5);
    short_primary(&env);
    // Work waits: a failover with nothing to do is not made.
    for i in 0..3 {
        env.send(&queue, &format!("waiting {i}"));
    }
    env.create_group_in("us-east-2", "gpu-fallback", 0, 0, 0);
    let (topic, sub) = env.topic_to_queue("spotguard-modes");
    let mut cfg = controller_config(&queue, "gpu-primary", &[("us-east-2", "gpu-fallback", 5)]);
    cfg.notify.sns_topic_arn = Some(topic.clone());
    let dir = TempDir::new(tag);
    let cfg_path = dir.path().join("controller.toml");
    std::fs::write(&cfg_path, controller_toml(&cfg)).unwrap();
    Ctl {
        env,
        dir,
        queue,
        sub,
        cfg_path,
        cfg,
    }
}

impl Ctl {
    /// The controller in process, talking to moto through the proxy.
    fn controller(&self) -> Controller<SdkCloud> {
        let sdk = self.env.sdk_through_proxy();
        Controller {
            cfg: self.cfg.clone(),
            cloud: SdkCloud::new(&sdk, &["us-east-1", "us-east-2"]),
            clock: std::sync::Arc::new(spotguard_common::clock::SystemClock),
        }
    }

    fn handle(
        &self,
        c: &Controller<SdkCloud>,
        event: &Value,
    ) -> Result<Option<spotguard_controller::handler::TickReport>, String> {
        self.env
            .rt
            .block_on(c.handle_event(event))
            .map_err(|e| e.to_string())
    }

    fn tick(&self, c: &Controller<SdkCloud>) -> spotguard_controller::handler::TickReport {
        self.env.rt.block_on(c.tick(Vec::new())).expect("tick")
    }

    /// Runs the binary with `args` (config appended) and returns (exit code, stdout).
    fn binary(&self, args: &[&str]) -> (i32, String) {
        let mut cmd = Command::new(bin("spotguard-controller"));
        cmd.args(args).arg("--config").arg(&self.cfg_path);
        for (k, v) in self.env.agent_env() {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("spotguard-controller");
        if !out.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        }
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn fallback(&self) -> spotguard_tests::aws_env::Group {
        self.env.group_in("us-east-2", "gpu-fallback")
    }

    fn fallback_ids(&self) -> Vec<String> {
        self.fallback().instances.into_iter().map(|i| i.0).collect()
    }

    /// Sets the fallback group's desired capacity, as its policy (scaling
    /// out) or its agents (scaling themselves in) would.
    fn set_fallback_desired(&self, desired: i32) {
        let asg = self.env.asg_in("us-east-2");
        self.env.rt.block_on(async {
            asg.set_desired_capacity()
                .auto_scaling_group_name("gpu-fallback")
                .desired_capacity(desired)
                .send()
                .await
                .unwrap();
        });
    }

    /// Protects (busy) or releases fallback instances, as their agents do.
    fn protect_fallback(&self, ids: &[String], on: bool) {
        if ids.is_empty() {
            return;
        }
        let asg = self.env.asg_in("us-east-2");
        self.env.rt.block_on(async {
            asg.set_instance_protection()
                .auto_scaling_group_name("gpu-fallback")
                .set_instance_ids(Some(ids.to_vec()))
                .protected_from_scale_in(on)
                .send()
                .await
                .unwrap();
        });
    }

    /// The primary holds its desired capacity again (1 of 1, as moto has
    /// it): the proxy stops showing it short.
    fn primary_whole(&self) {
        self.env.proxy.clear_rewrites();
    }

    /// Short again: its instances shown leaving (reclaimed), whatever its
    /// desired capacity is by now.
    fn primary_short(&self) {
        self.env.proxy.rewrite(
            "DescribeAutoScalingGroups",
            "us-east-1",
            "<LifecycleState>InService</LifecycleState>",
            "<LifecycleState>Terminating</LifecycleState>",
        );
    }

    /// The fallback's `spotguard:intake` tag, read by its agents.
    fn intake(&self) -> Option<String> {
        self.fallback().tags.get("spotguard:intake").cloned()
    }

    fn mode(&self) -> Option<String> {
        self.fallback().tags.get("spotguard:mode").cloned()
    }

    /// Mode changes announced on SNS so far (each as "from->to").
    fn announced(&self, seen: &mut Vec<String>) -> Vec<String> {
        for _ in 0..3 {
            for body in self.env.peek(&self.sub) {
                let v: Value = serde_json::from_str(&body).unwrap();
                seen.push(format!(
                    "{}->{}",
                    v["from"].as_str().unwrap(),
                    v["to"].as_str().unwrap()
                ));
            }
        }
        seen.clone()
    }
}

fn launch_event(
    detail_type: &str,
    msg: &str,
    activity: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Value {
    let at = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    json!({
        "version": "0", "id": format!("ev-{activity}"), "detail-type": detail_type, "source": "aws.autoscaling",
        "account": "123456789012", "time": at, "region": "us-east-1", "resources": [],
        "detail": {
            "StatusCode": if detail_type.ends_with("Unsuccessful") { "Failed" } else { "InProgress" },
            "StatusMessage": msg, "AutoScalingGroupName": "gpu-primary", "ActivityId": activity,
            "RequestId": "r", "EC2InstanceId": "", "StartTime": at, "EndTime": at, "Cause": "test",
            "Details": {"Availability Zone": "us-east-1a", "Subnet ID": "subnet-1"}
        }
    })
}

/// The value of the first data point of a PutMetricData query body
/// (`MetricData.member.1.Value=...`), parsed: a substring would take
/// `Value=200` for `Value=20`.
fn metric_value(body: &str) -> f64 {
    body.split('&')
        .find_map(|kv| kv.strip_prefix("MetricData.member.1.Value="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no data point value in {body}"))
}

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

fn capacity_failure(id: &str) -> Value {
    launch_event("EC2 Instance Launch Unsuccessful", CAPACITY, id, now())
}

fn success(id: &str) -> Value {
    launch_event("EC2 Instance Launch Successful", "", id, now())
}

#[test]
fn once_with_a_capacity_event_fails_over_and_publishes_the_metrics() {
    let t = setup("ctl-once");
    // 37 more: 40 visible.
    for i in 0..37 {
        t.env.send(&t.queue, &format!("job {i}"));
    }
    // The policies exist (as after `setup`); failover re-puts the fallback's enabled.
    assert_eq!(t.binary(&["setup"]).0, 0);
    let puts_before = t.env.proxy.calls_of("PutScalingPolicy").len();
    let event = t.dir.path().join("event.json");
    std::fs::write(&event, capacity_failure("act-1").to_string()).unwrap();
    let (code, out) = t.binary(&["once", "--event", event.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["event"]["reconcile"]["mode"], "failed-over");
    let g = t.fallback();
    assert_eq!(
        g.max, 2,
        "the gate opened to the primary's shortfall (3 - 1), within the cap of 5"
    );
    assert_eq!(t.mode().as_deref(), Some("failed-over"));
    assert!(g.tags.contains_key("spotguard:since"));
    assert_eq!(t.announced(&mut Vec::new()), vec!["normal->failed-over"]);
    let enable: Vec<_> = t
        .env
        .proxy
        .calls_of("PutScalingPolicy")
        .into_iter()
        .skip(puts_before)
        .collect();
    assert_eq!(enable.len(), 1, "the fallback policy enabled once");
    assert_eq!(enable[0].region, "us-east-2");
    assert!(
        enable[0].body.contains("Enabled=true"),
        "{}",
        enable[0].body
    );
    // Metrics: 40 visible, 1 InService in the primary; each in its group's region.
    let puts = t.env.proxy.calls_of("PutMetricData");
    // The event's new capacity failure, counted once by its code (the
    // tick after finds it remembered).
    let failures: Vec<_> = puts
        .iter()
        .filter(|c| c.body.contains("MetricName=CapacityFailures"))
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0]
            .body
            .contains("Value=InsufficientInstanceCapacity")
            && failures[0].body.contains("Unit=Count"),
        "{}",
        failures[0].body
    );
    // The dashboard's points, in one call of the control plane's region,
    // the link's mode with no unit.
    let fleet = puts
        .iter()
        .find(|c| c.body.contains("MetricName=LinkMode"))
        .expect("the dashboard's points");
    assert_eq!(fleet.region, "us-east-1");
    assert!(
        fleet.body.contains("MetricName=GroupInService"),
        "{}",
        fleet.body
    );
    assert!(fleet.body.contains("Unit=None"), "{}", fleet.body);
    let primary = puts
        .iter()
        .find(|c| c.region == "us-east-1" && c.body.contains("MetricName=BacklogPerInstance"))
        .expect("primary metric");
    assert!(
        primary.body.contains("MetricName=BacklogPerInstance"),
        "{}",
        primary.body
    );
    // One figure for the fleet, after the failover: 40 over the primary's
    // one and the fallback's two (moto launches the shortfall at once).
    assert_eq!(metric_value(&primary.body), 40.0 / 3.0);
    assert!(
        primary.body.contains("Value=gpu-primary"),
        "{}",
        primary.body
    );
    let fallback = puts
        .iter()
        .find(|c| c.region == "us-east-2")
        .expect("fallback metric");
    assert!(
        fallback.body.contains("MetricName=BacklogPerInstance"),
        "{}",
        fallback.body
    );
    // The failover gave the fallback the primary's shortfall (desired 3,
    // 1 InService: 2); the same figure in its region.
    assert_eq!(t.fallback().desired, 2);
    assert_eq!(metric_value(&fallback.body), 40.0 / 3.0);
    // `status` reports the same mode and plans nothing more.
    let (code, out) = t.binary(&["status"]);
    assert_eq!(code, 0);
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["mode"], "failed-over");
    assert_eq!(status["cascade"][1]["mode"], "failed-over");
    assert_eq!(status["cascade"][1]["next"]["actions"], json!([]));
    // The two-region keys are still there.
    assert_eq!(status["plan"]["actions"], json!([]));
    assert_eq!(status["fallback"]["max"], 2);
}

/// The shortage rule as deployed (not 0 s): on moto, with the primary
/// made short through the fault proxy, capacity failures fail over only
/// once the primary has been short for `shortage_for`; with the primary
/// holding its capacity (one dry zone, failures logged on every scale-out)
/// they never do.
#[test]
fn capacity_failures_fail_over_only_after_the_primary_is_short_for_shortage_for() {
    // Times are kept to the second in the tags: 3 s here, checked at 1.1 s
    // (at most 2.1 s counted) and 3.3 s.
    let mut t = setup("ctl-shortage");
    t.cfg.failover.shortage_for = spotguard_tests::agent_setup::secs(3);
    let c = t.controller();
    t.handle(&c, &capacity_failure("s-1")).unwrap();
    assert_ne!(t.mode().as_deref(), Some("failed-over"), "short for 0 s");
    std::thread::sleep(Duration::from_millis(1100));
    t.handle(&c, &capacity_failure("s-2")).unwrap();
    assert_ne!(t.mode().as_deref(), Some("failed-over"), "short for 1 s");
    std::thread::sleep(Duration::from_millis(2200));
    t.handle(&c, &capacity_failure("s-3")).unwrap();
    assert_eq!(t.mode().as_deref(), Some("failed-over"), "short for 3 s");

    // A primary that holds its capacity (the proxy stops showing it short)
    // with failures every second: never.
    let mut t = setup("ctl-whole");
    t.cfg.failover.shortage_for = spotguard_tests::agent_setup::secs(3);
    t.primary_whole();
    let c = t.controller();
    for k in 0..4 {
        t.handle(&c, &capacity_failure(&format!("w-{k}"))).unwrap();
        t.tick(&c);
        std::thread::sleep(Duration::from_millis(1100));
    }
    assert_ne!(t.mode().as_deref(), Some("failed-over"));
    assert_eq!(t.fallback().max, 0);
    assert!(t.announced(&mut Vec::new()).is_empty());
}

#[test]
fn a_bad_ami_failure_does_not_fail_over_and_garbage_is_acknowledged() {
    let t = setup("ctl-ami");
    let c = t.controller();
    t.handle(
        &c,
        &launch_event("EC2 Instance Launch Unsuccessful", BAD_AMI, "ami-1", now()),
    )
    .unwrap();
    assert_eq!(t.fallback().max, 0);
    assert_ne!(t.mode().as_deref(), Some("failed-over"));
    for garbage in [
        json!(null),
        json!("x"),
        json!({"source": "aws.s3", "detail-type": "Object Created"}),
        json!({"detail-type": "EC2 Instance Launch Unsuccessful", "source": "aws.autoscaling", "detail": {}}),
    ] {
        assert!(t.handle(&c, &garbage).unwrap().is_none(), "{garbage}");
    }
    // A launch failure of another group is not ours.
    let mut other = capacity_failure("x-1");
    other["detail"]["AutoScalingGroupName"] = json!("someone-else");
    t.handle(&c, &other).unwrap();
    assert_eq!(t.fallback().max, 0);
    assert!(t.announced(&mut Vec::new()).is_empty());
}

#[test]
fn gradual_failback_keeps_busy_instances_and_returns_to_normal() {
    let t = setup("ctl-failback");
    let c = t.controller();
    t.handle(&c, &capacity_failure("act-1")).unwrap();
    assert_eq!(t.fallback().max, 2, "the primary's shortfall");
    // The fallback group scaled out; both its agents are busy (protected).
    let ids = t.fallback_ids();
    assert_eq!(ids.len(), 2);
    t.protect_fallback(&ids, true);
    std::thread::sleep(Duration::from_millis(1100));
    // The primary holds its desired capacity again; before recovery_for
    // (3 s here) nothing moves but the hand-over: the primary is asked for
    // the work in flight (its 0 busy and the fallback's 2).
    t.primary_whole();
    t.tick(&c);
    assert_eq!(t.mode().as_deref(), Some("failed-over"));
    assert_eq!(
        t.env.group("gpu-primary").desired,
        2,
        "raised by the busy two"
    );
    assert_eq!(t.intake().as_deref(), Some("open"));
    // moto launched it at once: the primary holds the work, the fallback's
    // intake closes (its agents finish their jobs and take no new one).
    t.tick(&c);
    assert_eq!(t.intake().as_deref(), Some("closed"));
    std::thread::sleep(Duration::from_millis(3200));
    let r = t.tick(&c);
    assert_eq!(r.reconcile.mode, "failing-back");
    t.tick(&c);
    let g = t.fallback();
    assert_eq!(g.max, 2, "not below the busy instances");
    for id in &ids {
        assert!(
            g.instances
                .iter()
                .any(|(i, state, p)| i == id && state == "InService" && *p),
            "busy instance {id} kept: {g:?}"
        );
    }
    // Their jobs end; the agents unprotect and scale themselves in.
    t.protect_fallback(&ids, false);
    t.set_fallback_desired(0);
    std::thread::sleep(Duration::from_millis(1100));
    t.tick(&c);
    let r = t.tick(&c);
    assert_eq!(
        r.reconcile.mode,
        "normal",
        "{:?} {:?}",
        r.reconcile,
        t.fallback()
    );
    assert_eq!(t.fallback().max, 0);
    assert_eq!(t.intake().as_deref(), Some("open"));
    assert_eq!(
        t.announced(&mut Vec::new()),
        vec![
            "normal->failed-over",
            "failed-over->failing-back",
            "failing-back->normal"
        ]
    );
    // The controller never terminated an instance; it set desired
    // capacities twice, each through UpdateAutoScalingGroup: the fallback's
    // on failover (the shortfall), the primary's on the hand-over.
    let counts = t.env.proxy.counts();
    assert!(
        !counts.contains_key("TerminateInstanceInAutoScalingGroup"),
        "{counts:?}"
    );
    let desired: Vec<(String, String)> = t
        .env
        .proxy
        .calls_of("UpdateAutoScalingGroup")
        .into_iter()
        .filter_map(|c| {
            c.body
                .split('&')
                .find_map(|kv| kv.strip_prefix("DesiredCapacity="))
                .map(|d| (c.region.clone(), d.to_string()))
        })
        .collect();
    assert_eq!(
        desired,
        [
            ("us-east-2".to_string(), "2".to_string()),
            ("us-east-1".to_string(), "2".to_string())
        ]
    );
}

#[test]
fn a_capacity_failure_during_failback_fails_over_again_only_with_the_primary_short() {
    let t = setup("ctl-refail");
    let c = t.controller();
    t.handle(&c, &capacity_failure("act-1")).unwrap();
    // Its two instances are busy: failing back keeps them.
    t.protect_fallback(&t.fallback_ids(), true);
    t.primary_whole();
    t.tick(&c);
    std::thread::sleep(Duration::from_millis(3200));
    assert_eq!(t.tick(&c).reconcile.mode, "failing-back");
    // A failure (one dry zone) while the primary holds its capacity: the
    // gate does not reopen.
    std::thread::sleep(Duration::from_millis(1100));
    t.handle(&c, &capacity_failure("act-2")).unwrap();
    assert_eq!(t.mode().as_deref(), Some("failing-back"));
    assert_eq!(t.fallback().max, 2, "held by its busy two, not reopened");
    assert_eq!(t.intake().as_deref(), Some("closed"));
    // Short again, with a failure: failed over (shortage_for is 0 here).
    t.primary_short();
    t.handle(&c, &capacity_failure("act-3")).unwrap();
    assert_eq!(t.mode().as_deref(), Some("failed-over"));
    assert_eq!(t.fallback().max, 2);
    assert_eq!(
        t.announced(&mut Vec::new()),
        vec![
            "normal->failed-over",
            "failed-over->failing-back",
            "failing-back->failed-over"
        ]
    );
}

#[test]
fn duplicate_and_reordered_events_do_not_flap() {
    let t = setup("ctl-dup");
    let c = t.controller();
    let old_success = launch_event(
        "EC2 Instance Launch Successful",
        "",
        "ok-old",
        now() - chrono::Duration::seconds(30),
    );
    let fail = capacity_failure("act-1");
    t.handle(&c, &fail).unwrap();
    t.handle(&c, &fail).unwrap();
    t.handle(&c, &old_success).unwrap();
    t.handle(&c, &fail).unwrap();
    std::thread::sleep(Duration::from_millis(3200));
    t.tick(&c);
    // The only success predates the failure: still failed over, announced once.
    assert_eq!(t.mode().as_deref(), Some("failed-over"));
    assert_eq!(t.announced(&mut Vec::new()), vec!["normal->failed-over"]);
    let failures = t
        .fallback()
        .tags
        .get("spotguard:capacity-failures")
        .cloned()
        .unwrap_or_default();
    assert_eq!(failures.split_whitespace().count(), 1, "{failures}");
}

#[test]
fn aws_errors_are_retried_without_a_wrong_mode_change() {
    let t = setup("ctl-errors");
    let c = t.controller();
    // Throttled beyond the SDK's retries: the gate cannot be opened.
    t.env
        .proxy
        .inject("UpdateAutoScalingGroup", Fault::throttle(), 10);
    assert!(t.handle(&c, &capacity_failure("act-1")).is_err());
    assert_ne!(
        t.mode().as_deref(),
        Some("failed-over"),
        "mode recorded without the gate"
    );
    assert!(t.announced(&mut Vec::new()).is_empty());
    t.env.proxy.clear_faults();
    // The event is gone (acknowledged); the scaling activities still tell.
    let at = now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    t.env.proxy.inject(
        "DescribeScalingActivities",
        Fault::Respond {
            status: 200,
            body: activities_xml("gpu-primary", &[("act-1", "Failed", CAPACITY, &at)]),
        },
        100,
    );
    // Transient 5xx on reads are absorbed by the SDK's retries.
    t.env
        .proxy
        .inject("DescribeAutoScalingGroups", Fault::server_error(), 2);
    t.tick(&c);
    assert_eq!(t.mode().as_deref(), Some("failed-over"));
    assert_eq!(t.fallback().max, 2);
    assert_eq!(t.announced(&mut Vec::new()), vec!["normal->failed-over"]);
}

#[test]
fn scripted_failed_activities_fail_over_without_events() {
    let t = setup("ctl-activities");
    let at = now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    t.env.proxy.inject(
        "DescribeScalingActivities",
        Fault::Respond {
            status: 200,
            body: activities_xml(
                "gpu-primary",
                &[
                    ("a-ami", "Failed", BAD_AMI, &at),
                    ("a-cap", "Failed", CAPACITY, &at),
                ],
            ),
        },
        100,
    );
    let (code, out) = t.binary(&["once"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(t.mode().as_deref(), Some("failed-over"));
    let failures = t
        .fallback()
        .tags
        .get("spotguard:capacity-failures")
        .cloned()
        .unwrap_or_default();
    assert!(
        failures.contains("a-cap") && !failures.contains("a-ami"),
        "{failures}"
    );
}

#[test]
fn setup_creates_policies_idempotently() {
    let t = setup("ctl-setup");
    let (code, out) = t.binary(&["setup", "--dry-run"]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("would create").count(), 2, "{out}");
    assert!(t.env.proxy.calls_of("PutScalingPolicy").is_empty());
    let (code, out) = t.binary(&["setup"]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("created").count(), 2, "{out}");
    // Both groups track backlog per instance with the same target.
    assert_eq!(out.matches("target 20 on").count(), 2, "{out}");
    let (code, out) = t.binary(&["setup"]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("unchanged").count(), 2, "{out}");
    assert_eq!(t.env.proxy.calls_of("PutScalingPolicy").len(), 2);
    let regions: Vec<String> = t
        .env
        .proxy
        .calls_of("PutScalingPolicy")
        .iter()
        .map(|c| c.region.clone())
        .collect();
    assert_eq!(regions, vec!["us-east-1", "us-east-2"]);
}

#[test]
fn config_errors_exit_2_naming_the_key() {
    let dir = TempDir::new("ctl-cfg");
    let p = dir.path().join("c.toml");
    std::fs::write(&p, "[primary]\nasg = \"a\"\nqueue_url = \"https://sqs.us-east-1.amazonaws.com/1/q\"\n[fallback]\nasg = \"b\"\n[failover]\ncooldown = \"soon\"\n").unwrap();
    let out = Command::new(bin("spotguard-controller"))
        .args(["status", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cooldown"));
    let out = Command::new(bin("spotguard-controller"))
        .args(["status"])
        .env("SPOTGUARD_PRIMARY_ASG", "a")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("environment"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The controller binary as Lambda runs it, named `bootstrap`: a link, not
/// a copy (an executable being written while another test forks cannot be
/// run: ETXTBSY, seen with three Lambda tests at once).
fn link_bootstrap(at: &std::path::Path) {
    let target = std::fs::canonicalize(bin("spotguard-controller")).unwrap();
    std::os::unix::fs::symlink(target, at).unwrap();
}

/// The controller as Lambda runs it (the binary linked as `bootstrap`, no
/// arguments, the groups `gpu-primary` and `gpu-fallback` and `env` from
/// the environment, AWS through the proxy) against the fake runtime `api`,
/// until it has answered `n` invocations within `within`: the answers.
fn lambda_answers(
    t: &Ctl,
    api: &str,
    responses: &std::sync::Mutex<Vec<Value>>,
    env: &[(&str, &str)],
    n: usize,
    within: Duration,
) -> Vec<Value> {
    let bootstrap = t.dir.path().join("bootstrap");
    link_bootstrap(&bootstrap);
    let mut cmd = Command::new(&bootstrap);
    spotguard_tests::lambda_env(&mut cmd, api);
    cmd.env("SPOTGUARD_PRIMARY_ASG", "gpu-primary")
        .env("SPOTGUARD_PRIMARY_QUEUE_URL", &t.queue)
        .env("SPOTGUARD_FALLBACK_ASG", "gpu-fallback");
    for (k, v) in env {
        cmd.env(k, v);
    }
    for (k, v) in t.env.agent_env() {
        cmd.env(k, v);
    }
    let (_lambda, _) = spotguard_tests::Proc::spawn(cmd, "spotguard-controller lambda");
    assert!(
        t.env
            .wait_for(within, || responses.lock().unwrap().len() == n),
        "responses: {:?}",
        responses.lock().unwrap()
    );
    let answers = responses.lock().unwrap().clone();
    answers
}

/// A fake Lambda runtime API on loopback that hands out `events` one by one
/// and collects the function's responses.
fn fake_runtime(
    rt: &tokio::runtime::Runtime,
    events: Vec<Value>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use spotguard_tests::serve::{body_bytes, reply, Incoming, Request};
    use std::sync::{Arc, Mutex};
    let responses: Arc<Mutex<Vec<Value>>> = Arc::default();
    let queue = Arc::new(Mutex::new(
        events
            .into_iter()
            .enumerate()
            .collect::<std::collections::VecDeque<_>>(),
    ));
    let out = responses.clone();
    let addr = spotguard_tests::serve::spawn(rt, move |req: Request<Incoming>| {
        let (queue, out) = (queue.clone(), out.clone());
        async move {
            let path = req.uri().path().to_string();
            if path.ends_with("/invocation/next") {
                let next = queue.lock().unwrap().pop_front();
                let Some((i, ev)) = next else {
                    // No more events: hold the poll, as Lambda does.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return Ok::<_, std::convert::Infallible>(reply(200, "text/plain", ""));
                };
                let deadline = chrono::Utc::now().timestamp_millis() + 60_000;
                let mut r = reply(200, "application/json", ev.to_string());
                for (k, v) in [
                    ("Lambda-Runtime-Aws-Request-Id", format!("req-{i}")),
                    ("Lambda-Runtime-Deadline-Ms", deadline.to_string()),
                    (
                        "Lambda-Runtime-Invoked-Function-Arn",
                        "arn:aws:lambda:us-east-1:123456789012:function:spotguard".to_string(),
                    ),
                    ("Lambda-Runtime-Trace-Id", "Root=1-0-0".to_string()),
                ] {
                    r.headers_mut().insert(k, v.parse().unwrap());
                }
                return Ok(r);
            }
            let body = body_bytes(req.into_body()).await;
            let v: Value = serde_json::from_slice(&body)
                .unwrap_or(json!({"raw": String::from_utf8_lossy(&body)}));
            out.lock().unwrap().push(json!({"path": path, "body": v}));
            Ok(reply(202, "text/plain", ""))
        }
    });
    (addr.to_string(), responses)
}

#[test]
fn the_lambda_runtime_handles_events_and_acknowledges_garbage() {
    let t = setup("ctl-lambda");
    let (api, responses) = fake_runtime(
        &t.env.rt,
        vec![
            json!({"not": "an event"}),
            capacity_failure("act-1"),
            json!({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}}),
        ],
    );
    let lease = t.env.create_fifo_queue("spotguard-lease");
    let r = lambda_answers(
        &t,
        &api,
        &responses,
        &[
            ("SPOTGUARD_FALLBACK_MAX_SIZE", "4"),
            ("SPOTGUARD_LEASE_QUEUE_URL", &lease),
            // The primary is short from the start here (see `setup`).
            ("SPOTGUARD_FAILOVER_SHORTAGE_FOR", "0s"),
        ],
        3,
        Duration::from_secs(30),
    );
    // Every invocation answered (no error posts, so no retries), in order.
    for (i, resp) in r.iter().enumerate() {
        assert_eq!(
            resp["path"],
            format!("/2018-06-01/runtime/invocation/req-{i}/response"),
            "{r:?}"
        );
    }
    assert_eq!(r[0]["body"]["handled"], false);
    assert_eq!(r[1]["body"]["mode"], "failed-over");
    assert_eq!(t.fallback().max, 2, "the shortfall, within the cap of 4");
    assert_eq!(r[2]["body"]["handled"], true);
    assert!(
        !t.env.proxy.calls_of("PutMetricData").is_empty(),
        "the scheduled tick published the metrics"
    );
    // The launch event and the tick took the lease and gave it back (the
    // garbage took none): one token, visible.
    assert_eq!(t.env.depth(&lease), (1, 0));
    assert_eq!(t.env.proxy.calls_of("ChangeMessageVisibility").len(), 2);
}

/// Another controller holds the lease (its token in flight on the FIFO
/// queue): a scheduled invocation does nothing and says so, no error.
#[test]
fn a_lambda_tick_while_another_holds_the_lease_does_nothing() {
    let t = setup("ctl-lambda-lease");
    let lease = t.env.create_fifo_queue("spotguard-lease");
    t.env
        .send_fifo(&lease, "token", "spotguard-lease", "token-1");
    let held = t.env.rt.block_on(async {
        t.env
            .sqs
            .receive_message()
            .queue_url(&lease)
            .visibility_timeout(300)
            .send()
            .await
            .expect("receive")
            .messages()
            .len()
    });
    assert_eq!(held, 1);
    let (api, responses) = fake_runtime(
        &t.env.rt,
        vec![json!({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}})],
    );
    let r = lambda_answers(
        &t,
        &api,
        &responses,
        &[("SPOTGUARD_LEASE_QUEUE_URL", &lease)],
        1,
        Duration::from_secs(30),
    );
    assert_eq!(
        r[0]["path"], "/2018-06-01/runtime/invocation/req-0/response",
        "{r:?}"
    );
    assert_eq!(r[0]["body"]["handled"], false);
    // The backlog data point went out (target tracking needs one every
    // minute, whoever holds the lease); nothing was decided or written.
    assert!(!t.env.proxy.calls_of("PutMetricData").is_empty());
    assert!(t.env.proxy.calls_of("UpdateAutoScalingGroup").is_empty());
    assert!(t.env.proxy.calls_of("CreateOrUpdateTags").is_empty());
    assert_eq!(t.env.depth(&lease), (0, 1), "no second token seeded");
}

/// A scheduled tick that fails on AWS (the fallback group denied, its
/// region impaired) is a function error, not a success: Lambda's `Errors`
/// metric and the controller-errors alarm must see it. A launch event that
/// fails is still acknowledged (the next tick recovers).
#[test]
fn a_failed_scheduled_tick_is_a_function_error_in_lambda() {
    let t = setup("ctl-lambda-err");
    t.env.proxy.inject(
        "DescribeAutoScalingGroups",
        Fault::Respond {
            status: 403,
            body: "<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>User is not authorized to perform: autoscaling:DescribeAutoScalingGroups</Message></Error><RequestId>r</RequestId></ErrorResponse>".into(),
        },
        1000,
    );
    let (api, responses) = fake_runtime(
        &t.env.rt,
        vec![
            capacity_failure("act-1"),
            json!({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}}),
        ],
    );
    let r = lambda_answers(&t, &api, &responses, &[], 2, Duration::from_secs(60));
    assert_eq!(
        r[0]["path"], "/2018-06-01/runtime/invocation/req-0/response",
        "{r:?}"
    );
    assert_eq!(
        r[1]["path"], "/2018-06-01/runtime/invocation/req-1/error",
        "{r:?}"
    );
    assert!(
        r[1]["body"].to_string().contains("AccessDenied"),
        "the error names the failure: {r:?}"
    );
}

#[test]
fn run_reads_events_from_an_sqs_queue() {
    let t = setup("ctl-run");
    let events = t.env.create_queue("spotguard-events", 5);
    t.env.send(&events, &capacity_failure("act-q").to_string());
    t.env.send(&events, "not json");
    let mut cfg = t.cfg.clone();
    cfg.run.interval = spotguard_tests::agent_setup::secs(1);
    cfg.run.events_queue_url = Some(events.clone());
    std::fs::write(&t.cfg_path, controller_toml(&cfg)).unwrap();
    let mut cmd = Command::new(bin("spotguard-controller"));
    cmd.arg("run").arg("--config").arg(&t.cfg_path);
    for (k, v) in t.env.agent_env() {
        cmd.env(k, v);
    }
    let (mut run, _) = spotguard_tests::Proc::spawn(cmd, "spotguard-controller run");
    assert!(t
        .env
        .wait_for(Duration::from_secs(20), || t.mode().as_deref()
            == Some("failed-over")));
    assert!(
        t.env
            .wait_for(Duration::from_secs(10), || t.env.depth(&events) == (0, 0)),
        "events consumed"
    );
    run.signal("TERM");
    let st = run
        .wait_timeout(Duration::from_secs(10))
        .expect("run stops on SIGTERM");
    assert!(st.success());
}

/// A scripted day of launch outcomes, compressed (cool-down 3 s, dwell 1 s):
/// bursts of capacity failures with duplicates, late and reordered events,
/// API errors, recoveries. The mode changes must be exactly the expected
/// sequence: no flapping, no change on an error.
#[test]
fn a_scripted_day_gives_exactly_the_expected_mode_changes() {
    let t = setup("ctl-day");
    let c = t.controller();
    let mut seen = Vec::new();
    let old = |secs: i64| now() - chrono::Duration::seconds(secs);
    // Morning: launches succeed.
    t.handle(&c, &success("m-1")).unwrap();
    t.tick(&c);
    // A burst of capacity failures, one delivered twice, one bad-AMI failure.
    t.handle(&c, &capacity_failure("b1-1")).unwrap();
    t.handle(&c, &capacity_failure("b1-2")).unwrap();
    t.handle(&c, &capacity_failure("b1-1")).unwrap();
    t.handle(
        &c,
        &launch_event("EC2 Instance Launch Unsuccessful", BAD_AMI, "ami-x", now()),
    )
    .unwrap();
    // A late success from before the burst changes nothing.
    t.handle(
        &c,
        &launch_event("EC2 Instance Launch Successful", "", "m-0", old(120)),
    )
    .unwrap();
    // Throttled beyond retries while the gate is already open: no change.
    // (Enough faults for every read of the tick with the SDK's 3 attempts:
    // an unreadable primary no longer stops the decision, the fallback does.)
    t.env
        .proxy
        .inject("DescribeAutoScalingGroups", Fault::throttle(), 30);
    assert!(t.env.rt.block_on(c.tick(Vec::new())).is_err());
    t.env.proxy.clear_faults();
    t.tick(&c);
    assert_eq!(t.mode().as_deref(), Some("failed-over"));
    // The fallback group took work: one busy (protected) instance, so
    // failing back cannot finish until its job ends.
    t.set_fallback_desired(1);
    t.protect_fallback(&t.fallback_ids(), true);
    // Recovery: a success, the primary whole for recovery_for, then
    // failing back.
    std::thread::sleep(Duration::from_millis(1100));
    t.handle(&c, &success("r-1")).unwrap();
    t.primary_whole();
    t.tick(&c);
    std::thread::sleep(Duration::from_millis(3200));
    t.tick(&c);
    assert_eq!(t.mode().as_deref(), Some("failing-back"));
    // A new burst while failing back with the primary short again (after
    // the dwell): failed over again.
    t.primary_short();
    std::thread::sleep(Duration::from_millis(1100));
    t.handle(&c, &capacity_failure("b2-1")).unwrap();
    t.tick(&c);
    // The old burst re-delivered late: nothing new.
    t.handle(&c, &capacity_failure("b1-2")).unwrap();
    assert_eq!(t.mode().as_deref(), Some("failed-over"));
    // Second recovery; failing back waits for the busy instance.
    std::thread::sleep(Duration::from_millis(1100));
    t.handle(&c, &success("r-2")).unwrap();
    t.primary_whole();
    t.tick(&c);
    std::thread::sleep(Duration::from_millis(3200));
    t.tick(&c);
    std::thread::sleep(Duration::from_millis(1100));
    t.tick(&c);
    assert_eq!(t.mode().as_deref(), Some("failing-back"));
    // Its job ends; the agent unprotects and scales itself in: normal.
    t.protect_fallback(&t.fallback_ids(), false);
    t.set_fallback_desired(0);
    std::thread::sleep(Duration::from_millis(1100));
    t.tick(&c);
    // Evening: a late duplicate of a morning failure, more successes.
    t.handle(
        &c,
        &launch_event("EC2 Instance Launch Unsuccessful", CAPACITY, "b2-1", old(5)),
    )
    .unwrap();
    t.handle(&c, &success("e-1")).unwrap();
    t.tick(&c);
    assert_eq!(
        t.announced(&mut seen),
        vec![
            "normal->failed-over",
            "failed-over->failing-back",
            "failing-back->failed-over",
            "failed-over->failing-back",
            "failing-back->normal",
        ]
    );
    assert_eq!(t.mode().as_deref(), Some("normal"));
    assert_eq!(t.fallback().max, 0);
}

#[test]
fn an_empty_primary_with_work_waiting_is_raised_from_zero_on_moto() {
    let t = setup("ctl-zero");
    let asg = t.env.asg_in("us-east-1");
    t.env.rt.block_on(async {
        asg.set_desired_capacity()
            .auto_scaling_group_name("gpu-primary")
            .desired_capacity(0)
            .send()
            .await
            .unwrap();
    });
    assert_eq!(t.env.group("gpu-primary").desired, 0);
    let c = t.controller();
    // 3 jobs wait (see `setup`), no instance: target tracking alone would
    // never leave 0 below the target; the controller raises the group.
    let r = t.tick(&c);
    assert_eq!(r.raised_from_zero, vec!["gpu-primary"]);
    assert_eq!(t.env.group("gpu-primary").desired, 1);
    let calls = t.env.proxy.calls_of("UpdateAutoScalingGroup");
    assert!(
        calls
            .iter()
            .any(|c| c.region == "us-east-1" && c.body.contains("DesiredCapacity=1")),
        "{:?}",
        calls.iter().map(|c| &c.body).collect::<Vec<_>>()
    );
    // Once it runs, nothing more is raised.
    assert!(t.tick(&c).raised_from_zero.is_empty());
}

#[test]
fn failover_re_enables_a_template_made_policy_keeping_every_field() {
    let t = setup("ctl-policy");
    // A policy as CloudFormation names it, with fields setup does not manage.
    let asg = t.env.asg_in("us-east-2");
    let name = "spotguard-gpu-fallback-BacklogPolicy-1A2B3C4D5E6F";
    t.env.rt.block_on(async {
        use aws_sdk_autoscaling::types as ty;
        asg.put_scaling_policy()
            .auto_scaling_group_name("gpu-fallback")
            .policy_name(name)
            .policy_type("TargetTrackingScaling")
            .estimated_instance_warmup(120)
            .target_tracking_configuration(
                ty::TargetTrackingConfiguration::builder()
                    .target_value(20.0)
                    .disable_scale_in(true)
                    .customized_metric_specification(
                        ty::CustomizedMetricSpecification::builder()
                            .namespace("spotguard")
                            .metric_name("BacklogPerInstance")
                            .statistic(ty::MetricStatistic::Maximum)
                            .unit("Count")
                            .dimensions(
                                ty::MetricDimension::builder()
                                    .name("AutoScalingGroupName")
                                    .value("gpu-fallback")
                                    .build(),
                            )
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .expect("policy");
    });
    let c = t.controller();
    t.handle(&c, &capacity_failure("act-p")).unwrap();
    assert_eq!(t.mode().as_deref(), Some("failed-over"));
    let puts = t.env.proxy.calls_of("PutScalingPolicy");
    assert_eq!(puts.len(), 1, "re-put once");
    let body = &puts[0].body;
    for field in [
        &format!("PolicyName={name}"),
        "DisableScaleIn=true",
        "EstimatedInstanceWarmup=120",
        "Statistic=Maximum",
        "Unit=Count",
        "Enabled=true",
    ] {
        assert!(body.contains(field), "{field} missing from {body}");
    }
    // No second policy was made beside the template's.
    let n = t.env.rt.block_on(async {
        asg.describe_policies()
            .auto_scaling_group_name("gpu-fallback")
            .send()
            .await
            .unwrap()
            .scaling_policies()
            .len()
    });
    assert_eq!(n, 1);
}

/// Three groups in three regions: spot in us-east-1, spot in us-east-2, spot
/// in us-west-2. The first two run dry in turn; the cascade opens in order,
/// each group's data point goes to its own region, `status` shows the whole
/// cascade, and when the primary launches again the last opened closes first.
#[test]
fn a_three_region_cascade_opens_in_order_and_closes_in_reverse() {
    let env = AwsEnv::start();
    let queue = env.create_queue("jobs", 5);
    for i in 0..6 {
        env.send(&queue, &format!("waiting {i}"));
    }
    short_primary(&env);
    env.create_group_in("us-east-2", "gpu-east-2", 0, 0, 0);
    env.create_group_in("us-west-2", "gpu-west-2", 0, 0, 0);
    let cfg = controller_config(
        &queue,
        "gpu-primary",
        &[
            ("us-east-2", "gpu-east-2", 5),
            ("us-west-2", "gpu-west-2", 4),
        ],
    );
    let dir = TempDir::new("ctl-cascade");
    let cfg_path = dir.path().join("controller.toml");
    std::fs::write(&cfg_path, controller_toml(&cfg)).unwrap();
    let sdk = env.sdk_through_proxy();
    let c = Controller {
        cfg,
        cloud: SdkCloud::new(&sdk, &["us-east-1", "us-east-2", "us-west-2"]),
        clock: std::sync::Arc::new(spotguard_common::clock::SystemClock),
    };
    let handle = |ev: &Value| env.rt.block_on(c.handle_event(ev)).expect("handled");
    let tick = || env.rt.block_on(c.tick(Vec::new())).expect("tick");
    let mode = |region: &str, asg: &str| {
        env.group_in(region, asg)
            .tags
            .get("spotguard:mode")
            .cloned()
    };
    let in_region = |mut ev: Value, region: &str, asg: &str| {
        ev["region"] = json!(region);
        ev["detail"]["AutoScalingGroupName"] = json!(asg);
        ev
    };

    handle(&capacity_failure("p-1"));
    assert_eq!(
        mode("us-east-2", "gpu-east-2").as_deref(),
        Some("failed-over")
    );
    assert_eq!(
        env.group_in("us-east-2", "gpu-east-2").max,
        2,
        "the primary's shortfall, within its cap of 5"
    );
    assert_eq!(
        env.group_in("us-east-2", "gpu-east-2").desired,
        2,
        "the primary's shortfall"
    );
    assert_eq!(env.group_in("us-west-2", "gpu-west-2").max, 0);

    // us-east-2 runs dry too: its 2 instances reclaimed (shown leaving),
    // desired 2, and a failure.
    env.proxy.rewrite(
        "DescribeAutoScalingGroups",
        "us-east-2",
        "<LifecycleState>InService</LifecycleState>",
        "<LifecycleState>Terminating</LifecycleState>",
    );
    handle(&in_region(
        capacity_failure("e2-1"),
        "us-east-2",
        "gpu-east-2",
    ));
    assert_eq!(
        mode("us-west-2", "gpu-west-2").as_deref(),
        Some("failed-over")
    );
    let west = env.group_in("us-west-2", "gpu-west-2");
    assert_eq!(
        (west.max, west.desired),
        (2, 2),
        "us-east-2's shortfall, within its cap of 4"
    );

    // Metrics: one data point per group, in its own region.
    tick();
    let regions: std::collections::BTreeSet<String> = env
        .proxy
        .calls_of("PutMetricData")
        .into_iter()
        .filter(|c| c.body.contains("MetricName=BacklogPerInstance"))
        .map(|c| c.region)
        .collect();
    assert_eq!(
        regions.into_iter().collect::<Vec<_>>(),
        ["us-east-1", "us-east-2", "us-west-2"]
    );

    // `status` (the binary, as an operator runs it) shows the cascade.
    let mut cmd = Command::new(bin("spotguard-controller"));
    cmd.args(["status", "--config"]).arg(&cfg_path);
    for (k, v) in env.agent_env() {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("spotguard-controller status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows: Vec<(String, String, i64)> = status["cascade"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["region"].as_str().unwrap().to_string(),
                g["mode"].as_str().unwrap_or("primary").to_string(),
                g["gate_max"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("us-east-1".to_string(), "primary".to_string(), 10),
            ("us-east-2".to_string(), "failed-over".to_string(), 2),
            ("us-west-2".to_string(), "failed-over".to_string(), 2),
        ]
    );
    assert!(
        status["cascade"][0]["unavailable_offerings"][0]["offering"]["zone"] == "us-east-1a",
        "{status}"
    );

    // The primary holds its capacity again (and us-east-2 its own): the
    // primary holds the work in flight, so us-east-2's intake closes at
    // once, and us-west-2, after the group handing back, fails back; after
    // recovery_for us-east-2 fails back too.
    std::thread::sleep(Duration::from_millis(1100));
    env.proxy.clear_rewrites();
    handle(&success("p-ok"));
    let intake = |region: &str, asg: &str| {
        env.group_in(region, asg)
            .tags
            .get("spotguard:intake")
            .cloned()
    };
    assert_eq!(intake("us-east-2", "gpu-east-2").as_deref(), Some("closed"));
    assert_eq!(
        mode("us-east-2", "gpu-east-2").as_deref(),
        Some("failed-over")
    );
    tick();
    assert_eq!(
        mode("us-west-2", "gpu-west-2").as_deref(),
        Some("failing-back")
    );
    std::thread::sleep(Duration::from_millis(3200));
    tick();
    assert_eq!(
        mode("us-east-2", "gpu-east-2").as_deref(),
        Some("failing-back")
    );
}
