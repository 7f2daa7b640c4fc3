//! `spotguard-agent watch` against `spotguard-imds-mock`, both as the
//! binaries users run.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use spotguard_tests::{bin, MockImds, Proc};

fn watch(mock: &MockImds) -> (Proc, spotguard_tests::Lines) {
    let mut cmd = Command::new(bin("spotguard-agent"));
    cmd.args([
        "watch",
        "--imds-endpoint",
        &mock.url,
        "--poll-interval",
        "100ms",
        "--rebalance-interval",
        "100ms",
        "--scheduled-interval",
        "100ms",
    ]);
    // A proxy in the environment must not be used for IMDS.
    cmd.env("HTTP_PROXY", "http://127.0.0.1:9")
        .env("http_proxy", "http://127.0.0.1:9");
    Proc::spawn(cmd, "spotguard-agent watch")
}

const WAIT: Duration = Duration::from_secs(3);
const QUIET: Duration = Duration::from_millis(600);

fn is_rfc3339_millis(s: &str) -> bool {
    // 2026-11-28T08:20:00.123Z
    s.len() == 24
        && s.ends_with('Z')
        && s.as_bytes()[19] == b'.'
        && chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

#[test]
fn watch_reports_each_notice_once_with_parsed_fields() {
    let mock = MockImds::start(&[]);
    let (mut agent, lines) = watch(&mock);

    // Nothing pending: nothing printed.
    assert!(lines.next(QUIET).is_none());

    let set = mock.control(
        "/mock/spot-interruption",
        json!({"action": "terminate", "in_seconds": 120}),
    );
    let ev = lines.next_json(WAIT).expect("spot notice line");
    assert_eq!(ev["event"], "spot_interruption");
    assert_eq!(ev["change"], "new");
    assert_eq!(ev["action"], "terminate");
    assert_eq!(ev["time"], set["time"]);
    assert_eq!(ev["deadline_assumed"], false);
    assert!(
        is_rfc3339_millis(ev["detected_at"].as_str().unwrap()),
        "{ev}"
    );
    // Polled several more times: not repeated.
    assert!(lines.next(QUIET).is_none(), "duplicate notice");

    mock.control("/mock/lifecycle-state", json!({"state": "InService"}));
    let ev = lines.next_json(WAIT).expect("lifecycle line");
    assert_eq!(
        (ev["event"].as_str(), ev["state"].as_str()),
        (Some("lifecycle_state"), Some("InService"))
    );
    assert_eq!(ev["terminating"], false);
    mock.control("/mock/lifecycle-state", json!({"state": "Terminated"}));
    let ev = lines.next_json(WAIT).expect("lifecycle line");
    assert_eq!(ev["state"], "Terminated");
    assert_eq!(ev["previous"], "InService");
    assert_eq!(ev["terminating"], true);

    mock.control("/mock/rebalance", json!({}));
    let ev = lines.next_json(WAIT).expect("rebalance line");
    assert_eq!(ev["event"], "rebalance_recommendation");
    assert!(ev["notice_time"].is_string());

    let event = |state: &str| {
        json!([{"Code": "system-reboot", "Description": "scheduled reboot", "EventId": "instance-event-1",
                "NotBefore": "21 Jan 2027 09:00:43 GMT", "NotAfter": "21 Jan 2027 09:17:23 GMT", "State": state}])
    };
    mock.control("/mock/scheduled-events", event("active"));
    let ev = lines.next_json(WAIT).expect("scheduled line");
    assert_eq!(ev["event"], "scheduled_event");
    assert_eq!(ev["change"], "new");
    assert_eq!(ev["code"], "system-reboot");
    assert_eq!(ev["not_before"], "2027-01-21T09:00:43Z");
    mock.control("/mock/scheduled-events", event("canceled"));
    let ev = lines.next_json(WAIT).expect("scheduled cancel line");
    assert_eq!(
        (ev["change"].as_str(), ev["state"].as_str()),
        (Some("canceled"), Some("canceled"))
    );
    assert!(lines.next(QUIET).is_none());

    // A later notice time is an update.
    mock.control(
        "/mock/spot-interruption",
        json!({"action": "terminate", "in_seconds": 300}),
    );
    let ev = lines.next_json(WAIT).expect("updated notice");
    assert_eq!(ev["change"], "updated");

    agent.signal("TERM");
    let status = agent
        .wait_timeout(Duration::from_secs(3))
        .expect("watch did not stop on SIGTERM");
    assert!(status.success(), "{status}");
}

#[test]
fn watch_survives_a_storm_of_faults_without_a_false_notice() {
    let mock = MockImds::start(&[]);
    let (_agent, lines) = watch(&mock);
    for fault in [
        json!({"status": 500, "count": 20}),
        json!({"reset": true, "count": 20}),
        json!({"status": 401, "count": 20}),
        json!({"delay_ms": 1500, "count": 3}),
        json!({"status": 503, "count": 20}),
    ] {
        mock.control("/mock/faults", fault);
    }
    assert!(
        lines.next(Duration::from_secs(4)).is_none(),
        "a fault became a notice"
    );
    let counts = mock.requests();
    let served = |s: Value| {
        counts
            .requests
            .iter()
            .filter(|e| e.status == s)
            .map(|e| e.count)
            .sum::<u64>()
    };
    assert_eq!(served(json!(500)), 20, "{counts:?}");
    assert_eq!(served(json!("reset")), 20, "{counts:?}");
    // And once IMDS is healthy again, a notice gets through.
    mock.control(
        "/mock/spot-interruption",
        json!({"action": "hibernate", "in_seconds": 60}),
    );
    let ev = lines.next_json(WAIT).expect("notice after faults");
    assert_eq!(ev["action"], "hibernate");
}

#[test]
fn mock_cli_options_shape_the_answers() {
    let mock = MockImds::start(&[
        "--allow-imdsv1",
        "--json-style",
        "pretty",
        "--instance-id",
        "i-0abc",
    ]);
    let (status, body) = mock.raw("GET", "/latest/meta-data/instance-id", "");
    assert_eq!((status, body.as_str()), (200, "i-0abc"));
    mock.control(
        "/mock/rebalance",
        json!({"notice_time": "2026-11-28T08:00:00Z"}),
    );
    let (status, body) = mock.raw(
        "GET",
        "/latest/meta-data/events/recommendations/rebalance",
        "",
    );
    assert_eq!(status, 200);
    assert_eq!(body, "{\n\t\"noticeTime\": \"2026-11-28T08:00:00Z\"\n}");
    let (status, body) = mock.raw("GET", "/latest/meta-data/spot/instance-action", "");
    assert_eq!(status, 404);
    assert!(body.contains("404 - Not Found"));
    // The control API names what is wrong.
    let (status, body) = mock.raw("POST", "/mock/faults", r#"{"status": 999}"#);
    assert_eq!(status, 400);
    assert!(body.contains("status"), "{body}");
    let (status, body) = mock.raw("POST", "/mock/spot-interruption", r#"{"in_secs": 5}"#);
    assert_eq!(status, 400);
    assert!(body.contains("in_secs"), "{body}");
    // Reset clears notices and counts.
    mock.control("/mock/reset", json!({}));
    let (status, _) = mock.raw(
        "GET",
        "/latest/meta-data/events/recommendations/rebalance",
        "",
    );
    assert_eq!(status, 404);
    assert_eq!(mock.requests().total, 1);
}

#[test]
fn mock_requires_a_token_by_default() {
    let mock = MockImds::start(&[]);
    let (status, _) = mock.raw("GET", "/latest/meta-data/instance-id", "");
    assert_eq!(status, 401);
}

#[test]
fn the_mock_control_api_answers_only_with_its_token() {
    let mock = MockImds::start(&["--allow-imdsv1"]);
    let url = format!("{}/mock/spot-interruption", mock.url);
    let notice = || {
        mock.raw("GET", "/latest/meta-data/spot/instance-action", "")
            .0
    };
    let body = r#"{"action":"terminate","in_seconds":120}"#;
    // Anything else on the host: refused, and no notice is set.
    let (status, text) = spotguard_imds_mock::control::request("POST", &url, body).unwrap();
    assert_eq!(status, 403, "{text}");
    let (status, _) =
        spotguard_imds_mock::control::request_with("POST", &url, body, Some("wrong")).unwrap();
    assert_eq!(status, 403);
    assert_eq!(notice(), 404, "no notice was set");
    // With the token it printed: set.
    mock.control(
        "/mock/spot-interruption",
        serde_json::json!({"in_seconds": 120}),
    );
    assert_eq!(notice(), 200);
}
