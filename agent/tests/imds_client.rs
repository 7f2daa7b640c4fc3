//! The IMDSv2 client and the watcher against the mock IMDS in process:
//! token reuse, expiry and 401 refresh; faults that must never become
//! notices.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use spotguard_agent::imds::{paths, ImdsClient, ImdsConfig, ImdsError};
use spotguard_agent::watch::{self, Change, WatchConfig, WatchEvent};
use spotguard_imds_mock::control::Control;
use spotguard_imds_mock::{JsonStyle, MockConfig};
use tokio::sync::mpsc;

struct Mock {
    addr: SocketAddr,
    ctl: Control,
    /// For metadata requests with their own headers (the token rules).
    http: reqwest::Client,
}

impl Mock {
    async fn start(cfg: MockConfig) -> Mock {
        let (addr, _handle) = spotguard_imds_mock::spawn(cfg).await.unwrap();
        Mock {
            addr,
            ctl: Control::new(format!("http://{addr}")),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The control client blocks: off this runtime, which serves the mock.
    async fn post(&self, path: &str, body: Value) -> Value {
        let (ctl, path) = (self.ctl.clone(), path.to_string());
        tokio::task::spawn_blocking(move || ctl.post(&path, &body))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// How many requests (method, path) got each status.
    async fn count(&self, method: &str, path: &str, status: Value) -> u64 {
        let ctl = self.ctl.clone();
        let counts = tokio::task::spawn_blocking(move || ctl.requests())
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"));
        counts.count(method, path, status)
    }

    fn client(&self, f: impl FnOnce(&mut ImdsConfig)) -> ImdsClient {
        let mut cfg = ImdsConfig {
            endpoint: self.url(),
            ..Default::default()
        };
        f(&mut cfg);
        ImdsClient::new(cfg).unwrap()
    }
}

#[tokio::test]
async fn token_is_fetched_once_and_reused() {
    let m = Mock::start(MockConfig::default()).await;
    let c = m.client(|_| {});
    for _ in 0..5 {
        assert_eq!(
            c.get(paths::INSTANCE_ID).await.unwrap().as_deref(),
            Some("i-0123456789abcdef0")
        );
    }
    assert_eq!(m.count("PUT", paths::TOKEN, json!(200)).await, 1);
    assert_eq!(m.count("GET", paths::INSTANCE_ID, json!(200)).await, 5);
}

#[tokio::test]
async fn token_is_replaced_shortly_before_its_ttl_ends() {
    let m = Mock::start(MockConfig::default()).await;
    // TTL 2 s: replaced after 1.5 s (a quarter of the TTL early).
    let c = m.client(|c| c.token_ttl = Duration::from_secs(2));
    c.get(paths::INSTANCE_ID).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.get(paths::INSTANCE_ID).await.unwrap();
    assert_eq!(m.count("PUT", paths::TOKEN, json!(200)).await, 1);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    c.get(paths::INSTANCE_ID).await.unwrap();
    assert_eq!(m.count("PUT", paths::TOKEN, json!(200)).await, 2);
    // Never a 401 on the way: the old token was still valid when replaced.
    assert_eq!(m.count("GET", paths::INSTANCE_ID, json!(401)).await, 0);
}

#[tokio::test]
async fn a_401_fetches_one_new_token_and_retries() {
    let m = Mock::start(MockConfig::default()).await;
    let c = m.client(|_| {});
    c.get(paths::INSTANCE_ID).await.unwrap();
    m.post("/mock/faults", json!({"status": 401, "count": 1}))
        .await;
    assert_eq!(
        c.get(paths::INSTANCE_ID).await.unwrap().as_deref(),
        Some("i-0123456789abcdef0")
    );
    assert_eq!(m.count("PUT", paths::TOKEN, json!(200)).await, 2);
    assert_eq!(c.stats().snapshot().unauthorized, 1);
}

#[tokio::test]
async fn a_401_storm_is_an_error_not_a_notice() {
    let m = Mock::start(MockConfig::default()).await;
    m.post("/mock/spot-interruption", json!({})).await;
    let c = m.client(|_| {});
    c.get(paths::INSTANCE_ID).await.unwrap();
    m.post("/mock/faults", json!({"status": 401, "count": 50}))
        .await;
    let e = c.get(paths::SPOT_INSTANCE_ACTION).await.unwrap_err();
    assert!(
        matches!(
            e,
            ImdsError::Unauthorized { .. } | ImdsError::TokenRefused { status: 401, .. }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff() {
    let m = Mock::start(MockConfig::default()).await;
    m.post("/mock/spot-interruption", json!({"in_seconds": 120}))
        .await;
    let c = m.client(|_| {});
    c.get(paths::INSTANCE_ID).await.unwrap();
    m.post("/mock/faults", json!({"status": 503, "count": 2}))
        .await;
    let body = c.get(paths::SPOT_INSTANCE_ACTION).await.unwrap().unwrap();
    assert!(body.contains("terminate"));
    assert_eq!(c.stats().snapshot().server_errors, 2);
    // More failures than attempts: an error naming the status, not a notice.
    m.post("/mock/faults", json!({"status": 500, "count": 3}))
        .await;
    let e = c.get(paths::SPOT_INSTANCE_ACTION).await.unwrap_err();
    assert!(e.to_string().contains("500"), "{e}");
}

#[tokio::test]
async fn timeouts_and_resets_are_retried() {
    let m = Mock::start(MockConfig::default()).await;
    let c = m.client(|c| c.request_timeout = Duration::from_millis(300));
    c.get(paths::INSTANCE_ID).await.unwrap();
    m.post("/mock/faults", json!({"delay_ms": 1000, "count": 1}))
        .await;
    assert!(c.get(paths::INSTANCE_ID).await.unwrap().is_some());
    m.post("/mock/faults", json!({"reset": true, "count": 1}))
        .await;
    assert!(c.get(paths::INSTANCE_ID).await.unwrap().is_some());
    let s = c.stats().snapshot();
    assert_eq!(s.timeouts, 1, "{s:?}");
    assert_eq!(s.transport_errors, 1, "{s:?}");
    // Three resets in a row exhaust the attempts: an error, no value.
    m.post("/mock/faults", json!({"reset": true, "count": 3}))
        .await;
    assert!(c.get(paths::SPOT_INSTANCE_ACTION).await.is_err());
}

#[tokio::test]
async fn not_found_is_none() {
    let m = Mock::start(MockConfig::default()).await;
    let c = m.client(|_| {});
    assert_eq!(c.get(paths::SPOT_INSTANCE_ACTION).await.unwrap(), None);
    assert_eq!(c.get(paths::TARGET_LIFECYCLE_STATE).await.unwrap(), None);
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let m = Mock::start(MockConfig::default()).await;
    m.post(
        "/mock/override",
        json!({"path": paths::SCHEDULED_EVENTS, "body": "x".repeat(100_000)}),
    )
    .await;
    let c = m.client(|_| {});
    let e = c.get(paths::SCHEDULED_EVENTS).await.unwrap_err();
    assert!(matches!(e, ImdsError::BodyTooLarge { .. }), "{e}");
}

#[tokio::test]
async fn a_refused_token_never_falls_back_to_imdsv1() {
    // IMDSv1 allowed by the mock: a client that fell back would get an answer.
    let m = Mock::start(MockConfig {
        require_token: false,
        ..Default::default()
    })
    .await;
    m.post("/mock/faults", json!({"status": 403, "count": 1}))
        .await;
    let c = m.client(|_| {});
    let e = c.get(paths::INSTANCE_ID).await.unwrap_err();
    assert!(
        matches!(e, ImdsError::TokenRefused { status: 403, .. }),
        "{e}"
    );
    assert_eq!(m.count("GET", paths::INSTANCE_ID, json!(200)).await, 0);
}

#[tokio::test]
async fn mock_token_rules() {
    let m = Mock::start(MockConfig::default()).await;
    let put = |ttl: Option<&str>, xff: bool| {
        let mut r = m.http.put(format!("{}{}", m.url(), paths::TOKEN));
        if let Some(t) = ttl {
            r = r.header(paths::TOKEN_TTL_HEADER, t);
        }
        if xff {
            r = r.header("X-Forwarded-For", "10.0.0.1");
        }
        r.send()
    };
    assert_eq!(put(None, false).await.unwrap().status(), 400);
    assert_eq!(put(Some("0"), false).await.unwrap().status(), 400);
    assert_eq!(put(Some("21601"), false).await.unwrap().status(), 400);
    assert_eq!(put(Some("60"), true).await.unwrap().status(), 403);
    let v = m
        .http
        .put(format!("{}/2021-01-03/api/token", m.url()))
        .header(paths::TOKEN_TTL_HEADER, "60")
        .send()
        .await
        .unwrap();
    assert_eq!(v.status(), 403);
    let token = put(Some("1"), false).await.unwrap().text().await.unwrap();
    let get = |tok: Option<String>| {
        let mut r = m.http.get(format!("{}{}", m.url(), paths::INSTANCE_ID));
        if let Some(t) = tok {
            r = r.header(paths::TOKEN_HEADER, t);
        }
        r.send()
    };
    assert_eq!(get(None).await.unwrap().status(), 401);
    assert_eq!(get(Some("bogus".into())).await.unwrap().status(), 401);
    assert_eq!(get(Some(token.clone())).await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        get(Some(token)).await.unwrap().status(),
        401,
        "expired token accepted"
    );
}

async fn watcher(m: &Mock, interval_ms: u64) -> mpsc::Receiver<watch::Detected> {
    let client = Arc::new(m.client(|c| {
        c.request_timeout = Duration::from_millis(200);
        c.backoff = Duration::from_millis(5);
    }));
    let every = Duration::from_millis(interval_ms);
    let cfg = WatchConfig {
        spot_interval: every,
        lifecycle_interval: every,
        rebalance_interval: every,
        scheduled_interval: every,
    };
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(watch::run(client, cfg, tx, std::future::pending()));
    rx
}

async fn next(rx: &mut mpsc::Receiver<watch::Detected>, within: Duration) -> Option<WatchEvent> {
    tokio::time::timeout(within, rx.recv())
        .await
        .ok()
        .flatten()
        .map(|d| d.event)
}

#[tokio::test]
async fn watcher_faults_and_garbage_never_make_a_notice() {
    let m = Mock::start(MockConfig::default()).await;
    let mut rx = watcher(&m, 20).await;
    // Garbage on every path but the spot notice, and every kind of fault.
    m.post(
        "/mock/override",
        json!({"path": paths::REBALANCE, "body": "<html>oops</html>"}),
    )
    .await;
    m.post(
        "/mock/override",
        json!({"path": paths::TARGET_LIFECYCLE_STATE, "body": "{\"not\": \"a state\"}"}),
    )
    .await;
    m.post(
        "/mock/override",
        json!({"path": paths::SCHEDULED_EVENTS, "body": "[{\"broken\""}),
    )
    .await;
    m.post("/mock/faults", json!({"status": 500, "count": 30}))
        .await;
    m.post("/mock/faults", json!({"status": 401, "count": 30}))
        .await;
    m.post("/mock/faults", json!({"reset": true, "count": 30}))
        .await;
    m.post("/mock/faults", json!({"delay_ms": 400, "count": 6}))
        .await;
    m.post("/mock/faults", json!({"status": 403, "count": 10}))
        .await;
    m.post("/mock/faults", json!({"status": 400, "count": 10}))
        .await;
    assert_eq!(next(&mut rx, Duration::from_secs(4)).await, None);
    // And the faults were really served (all of them were consumed).
    let r = m
        .http
        .get(format!("{}/mock/requests", m.url()))
        .send()
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let served = |s: Value| {
        v["requests"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["status"] == s)
            .count()
    };
    assert!(served(json!(500)) > 0 && served(json!("reset")) > 0 && served(json!(401)) > 0);
    // A real notice after all that is reported, once.
    m.post(
        "/mock/spot-interruption",
        json!({"action": "stop", "in_seconds": 90}),
    )
    .await;
    match next(&mut rx, Duration::from_secs(3)).await {
        Some(WatchEvent::SpotInterruption {
            change: Change::New,
            action: Some(a),
            deadline_assumed: false,
            ..
        }) => assert_eq!(a.to_string(), "stop"),
        other => panic!("{other:?}"),
    }
    assert_eq!(next(&mut rx, Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn watcher_reads_the_pretty_json_of_the_popular_mock_and_dedups() {
    let m = Mock::start(MockConfig {
        json_style: JsonStyle::Pretty,
        ..Default::default()
    })
    .await;
    let mut rx = watcher(&m, 20).await;
    m.post("/mock/rebalance", json!({})).await;
    assert!(matches!(
        next(&mut rx, Duration::from_secs(2)).await,
        Some(WatchEvent::RebalanceRecommendation {
            change: Change::New,
            ..
        })
    ));
    m.post("/mock/spot-interruption", json!({"in_seconds": 120}))
        .await;
    assert!(matches!(
        next(&mut rx, Duration::from_secs(2)).await,
        Some(WatchEvent::SpotInterruption {
            change: Change::New,
            deadline_assumed: false,
            ..
        })
    ));
    // Polled ~15 more times: no repeat.
    assert_eq!(next(&mut rx, Duration::from_millis(300)).await, None);
    m.post("/mock/spot-interruption", json!({"in_seconds": 150}))
        .await;
    assert!(matches!(
        next(&mut rx, Duration::from_secs(2)).await,
        Some(WatchEvent::SpotInterruption {
            change: Change::Updated,
            ..
        })
    ));
}

#[tokio::test]
async fn watcher_takes_an_unreadable_spot_body_as_a_notice_with_assumed_deadline() {
    let m = Mock::start(MockConfig::default()).await;
    let mut rx = watcher(&m, 20).await;
    let before = chrono::Utc::now();
    m.post(
        "/mock/override",
        json!({"path": paths::SPOT_INSTANCE_ACTION, "body": "{\"action\": \"terminate\", \"time\": "}),
    )
    .await;
    match next(&mut rx, Duration::from_secs(2)).await {
        Some(WatchEvent::SpotInterruption {
            action: None,
            time,
            deadline_assumed: true,
            raw: Some(raw),
            ..
        }) => {
            let secs = (time - before).num_milliseconds();
            assert!((119_000..=122_000).contains(&secs), "{secs} ms");
            assert!(raw.contains("terminate"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(next(&mut rx, Duration::from_millis(300)).await, None);
}
