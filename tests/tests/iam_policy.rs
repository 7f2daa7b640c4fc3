//! Every AWS call each binary makes is allowed by that binary's IAM policy
//! (packaging/iam), and the policies allow nothing the code does not call.
//!
//! The calls are read from the source: every SDK call in the AWS layers is
//! made in a function that names its operation in `const OP: &str = "..."`
//! (the name its errors carry), and the test also checks that convention by
//! counting `.send()` calls against those constants.

use std::collections::BTreeSet;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `service:Operation` for every `const OP: &str = "Operation"` and every
/// string in a `const _OPS` list.
fn operations(files: &[&str]) -> BTreeSet<String> {
    let mut ops = BTreeSet::new();
    for f in files {
        let text = read(f);
        for line in text.lines() {
            let l = line.trim();
            let names: Vec<&str> =
                if l.starts_with("const OP: &str = ") || l.starts_with("const _OPS") {
                    l.split('"').skip(1).step_by(2).collect()
                } else {
                    continue;
                };
            for n in names {
                ops.insert(format!("{}:{n}", service(n)));
            }
        }
    }
    ops
}

fn service(op: &str) -> &'static str {
    match op {
        "ReceiveMessage"
        | "DeleteMessage"
        | "ChangeMessageVisibility"
        | "SendMessage"
        | "GetQueueAttributes" => "sqs",
        "Publish" => "sns",
        "PutMetricData" => "cloudwatch",
        "CreateTags" | "DescribeTags" => "ec2",
        _ => "autoscaling",
    }
}

fn allowed(policy: &str) -> BTreeSet<String> {
    let v: serde_json::Value = serde_json::from_str(&read(policy)).expect("policy JSON");
    let mut out = BTreeSet::new();
    for st in v["Statement"].as_array().expect("statements") {
        assert_eq!(
            st["Effect"], "Allow",
            "{policy}: only Allow statements expected"
        );
        match &st["Action"] {
            serde_json::Value::String(a) => {
                out.insert(a.clone());
            }
            serde_json::Value::Array(a) => {
                out.extend(a.iter().filter_map(|x| x.as_str().map(str::to_string)))
            }
            other => panic!("{policy}: Action {other}"),
        }
    }
    out
}

fn check(files: &[&str], policy: &str) {
    let used = operations(files);
    let allowed = allowed(policy);
    let missing: Vec<_> = used.difference(&allowed).collect();
    let unused: Vec<_> = allowed.difference(&used).collect();
    assert!(missing.is_empty(), "{policy} does not allow {missing:?}");
    assert!(
        unused.is_empty(),
        "{policy} allows {unused:?}, which the code never calls"
    );
}

#[test]
fn the_agent_policy_allows_exactly_the_agents_calls() {
    check(&["agent/src/aws.rs"], "packaging/iam/agent-policy.json");
}

#[test]
fn the_controller_policy_allows_exactly_the_controllers_calls() {
    check(
        &["controller/src/aws.rs", "controller/src/cli.rs"],
        "packaging/iam/controller-policy.json",
    );
}

#[test]
fn every_sdk_call_names_its_operation() {
    for f in ["agent/src/aws.rs", "controller/src/aws.rs"] {
        let text = read(f);
        // The SNS publish's own `.send()` is in common/src/sns.rs, the EC2
        // tag calls' in common/src/ec2.rs.
        let sends = text.matches(".send()").count()
            + text.matches("common::sns::publish(").count()
            + text.matches("ec2.create_tag(").count()
            + text.matches("ec2.tag_values(").count();
        let ops = text.matches("const OP: &str = ").count();
        assert_eq!(
            sends, ops,
            "{f}: {sends} SDK calls but {ops} named operations"
        );
    }
}
