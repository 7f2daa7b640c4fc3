//! A local IMDSv2 for running and testing spotguard off EC2.
//!
//! It serves the notice paths and the static metadata the agent reads, with
//! the token rules of real IMDS (REFERENCE.md), and takes orders on a control
//! API under `/mock/` on the same port: set a spot notice, a rebalance
//! recommendation, a target lifecycle state or scheduled events, inject
//! faults (status codes, delays, dropped connections) into the next metadata
//! requests, and count what was asked. The control API needs no token and is
//! never subject to faults.

pub mod control;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SubsecRound, Utc};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use spotguard_common::imds::{format_imds_time, paths};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// How JSON bodies are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum JsonStyle {
    /// As real IMDS: one line, `text/plain`.
    #[default]
    Imds,
    /// As the popular AWS mock (amazon-ec2-metadata-mock): tab-indented,
    /// `application/json`.
    Pretty,
}

#[derive(Debug, Clone)]
pub struct MockConfig {
    pub instance_id: String,
    pub region: String,
    pub availability_zone: String,
    pub instance_type: String,
    pub life_cycle: String,
    /// IMDSv2 only (the default, as on current AMIs): a GET without a token is 401.
    pub require_token: bool,
    pub json_style: JsonStyle,
    /// The control API (`/mock/...`) answers only requests that carry it
    /// in [`CONTROL_TOKEN_HEADER`]: anything on the host can reach a
    /// loopback port, and the control API decides what the agent believes
    /// (notices, its instance id). `None`: no check (in-process tests).
    pub control_token: Option<String>,
}

/// The header the control API's token travels in.
pub const CONTROL_TOKEN_HEADER: &str = "x-mock-token";

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            instance_id: "i-0123456789abcdef0".into(),
            region: "us-east-1".into(),
            availability_zone: "us-east-1a".into(),
            instance_type: "g4dn.xlarge".into(),
            life_cycle: "spot".into(),
            require_token: true,
            json_style: JsonStyle::Imds,
            control_token: None,
        }
    }
}

/// The body real IMDS sends with a 404.
const NOT_FOUND_BODY: &str = r#"<?xml version="1.0" encoding="iso-8859-1"?>
<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"
	"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">
<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">
 <head>
  <title>404 - Not Found</title>
 </head>
 <body>
  <h1>404 - Not Found</h1>
 </body>
</html>
"#;

/// Largest control-API request body accepted.
const MAX_CONTROL_BODY: usize = 1024 * 1024;

#[derive(Debug, Clone)]
struct Fault {
    status: Option<u16>,
    delay: Option<Duration>,
    reset: bool,
    remaining: u32,
}

#[derive(Debug, Clone)]
struct Override {
    status: u16,
    body: String,
    content_type: String,
}

#[derive(Default)]
struct State {
    tokens: HashMap<String, Instant>,
    issued: u64,
    spot: Option<(String, DateTime<Utc>)>,
    rebalance: Option<DateTime<Utc>>,
    lifecycle: Option<String>,
    scheduled: Option<Value>,
    faults: VecDeque<Fault>,
    overrides: HashMap<String, Override>,
    /// (method, path, status or "reset") -> count.
    counts: BTreeMap<(String, String, String), u64>,
}

struct Shared {
    cfg: MockConfig,
    state: Mutex<State>,
}

impl Shared {
    /// The state lock is never held across an await, so a poisoned lock can
    /// only come from a panic in plain code; keep serving the state as is.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection dropped on purpose by a `reset` fault. Returning an error
/// from the service makes hyper close the connection without an answer.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by an injected fault")]
pub struct Dropped;

type Resp = Response<Full<Bytes>>;

fn resp(status: u16, content_type: &str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

fn text(status: u16, body: impl Into<String>) -> Resp {
    resp(status, "text/plain", body.into())
}

fn not_found() -> Resp {
    resp(404, "text/html", NOT_FOUND_BODY)
}

fn control_json(status: u16, v: Value) -> Resp {
    resp(status, "application/json", v.to_string())
}

fn bad_request(msg: impl Into<String>) -> Resp {
    control_json(400, json!({ "error": msg.into() }))
}

/// Serves on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    cfg: MockConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        cfg,
        state: Mutex::new(State::default()),
    });
    spotguard_common::http::serve(listener, shutdown, move |req| handle(shared.clone(), req)).await
}

/// Serves on an ephemeral loopback port in the background; for tests.
pub async fn spawn(
    cfg: MockConfig,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let handle = tokio::spawn(serve(listener, cfg, std::future::pending()));
    Ok((addr, handle))
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Resp, Dropped> {
    let path = req.uri().path().to_string();
    if path == "/mock" || path.starts_with("/mock/") {
        if let Some(want) = &shared.cfg.control_token {
            let got = req
                .headers()
                .get(CONTROL_TOKEN_HEADER)
                .and_then(|v| v.to_str().ok());
            if got != Some(want.as_str()) {
                return Ok(text(
                    403,
                    format!(
                        "control API: missing or wrong {CONTROL_TOKEN_HEADER} (printed at start)\n"
                    ),
                ));
            }
        }
        return Ok(control(&shared, req).await);
    }
    let method = req.method().to_string();
    let fault = {
        let mut st = shared.state();
        let f = st.faults.front_mut().map(|f| {
            f.remaining -= 1;
            f.clone()
        });
        if st.faults.front().is_some_and(|f| f.remaining == 0) {
            st.faults.pop_front();
        }
        f
    };
    let record = |status: String| {
        *shared
            .state()
            .counts
            .entry((method.clone(), path.clone(), status))
            .or_default() += 1;
    };
    if let Some(f) = fault {
        if let Some(d) = f.delay {
            tokio::time::sleep(d).await;
        }
        if f.reset {
            record("reset".into());
            return Err(Dropped);
        }
        if let Some(s) = f.status {
            record(s.to_string());
            return Ok(text(s, format!("injected fault: HTTP {s}\n")));
        }
    }
    let r = metadata(&shared, &req, &path);
    record(r.status().as_u16().to_string());
    Ok(r)
}

fn metadata(shared: &Shared, req: &Request<Incoming>, path: &str) -> Resp {
    let cfg = &shared.cfg;
    let headers = req.headers();
    if req.method() == Method::PUT {
        if path != paths::TOKEN {
            // A versioned token path is 403 on real IMDS; other PUTs are not served.
            return if path.ends_with("/api/token") {
                text(403, "Forbidden")
            } else {
                text(405, "Method Not Allowed")
            };
        }
        if headers.contains_key("x-forwarded-for") {
            return text(403, "Forbidden");
        }
        let ttl = headers
            .get(paths::TOKEN_TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|t| (1..=paths::MAX_TOKEN_TTL_SECS).contains(t));
        let Some(ttl) = ttl else {
            return text(400, "Bad Request");
        };
        let mut st = shared.state();
        let now = Instant::now();
        st.tokens.retain(|_, exp| *exp > now);
        st.issued += 1;
        // Unique, not secret: a mock token only has to be told apart.
        let token = format!(
            "MOCK{:016x}{:08x}",
            st.issued,
            Utc::now().timestamp_subsec_nanos()
        );
        st.tokens
            .insert(token.clone(), now + Duration::from_secs(ttl));
        let mut r = text(200, token);
        if let Ok(v) = HeaderValue::from_str(&ttl.to_string()) {
            r.headers_mut().insert(paths::TOKEN_TTL_HEADER, v);
        }
        return r;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(405, "Method Not Allowed");
    }
    match headers.get(paths::TOKEN_HEADER) {
        Some(tok) => {
            let st = shared.state();
            let valid = tok
                .to_str()
                .ok()
                .and_then(|t| st.tokens.get(t))
                .is_some_and(|exp| *exp > Instant::now());
            if !valid {
                return text(401, "Unauthorized");
            }
        }
        None if cfg.require_token => return text(401, "Unauthorized"),
        None => {}
    }
    let st = shared.state();
    if let Some(o) = st.overrides.get(path) {
        return resp(o.status, &o.content_type, o.body.clone());
    }
    let body_json = |v: Value| -> Resp {
        match cfg.json_style {
            JsonStyle::Imds => text(200, v.to_string()),
            JsonStyle::Pretty => resp(200, "application/json", pretty_tabs(&v)),
        }
    };
    match path {
        paths::SPOT_INSTANCE_ACTION => match &st.spot {
            Some((action, time)) => body_json(json!({"action": action, "time": format_imds_time(*time)})),
            None => not_found(),
        },
        paths::SPOT_TERMINATION_TIME => match &st.spot {
            Some((action, time)) if action == "terminate" => text(200, format_imds_time(*time)),
            _ => not_found(),
        },
        paths::REBALANCE => match st.rebalance {
            Some(t) => body_json(json!({"noticeTime": format_imds_time(t)})),
            None => not_found(),
        },
        paths::TARGET_LIFECYCLE_STATE => match &st.lifecycle {
            Some(s) => text(200, s.clone()),
            None => not_found(),
        },
        paths::SCHEDULED_EVENTS => match &st.scheduled {
            Some(v) => body_json(v.clone()),
            None => not_found(),
        },
        paths::INSTANCE_ID => text(200, cfg.instance_id.clone()),
        paths::REGION => text(200, cfg.region.clone()),
        paths::AVAILABILITY_ZONE => text(200, cfg.availability_zone.clone()),
        paths::INSTANCE_TYPE => text(200, cfg.instance_type.clone()),
        paths::INSTANCE_LIFE_CYCLE => text(200, cfg.life_cycle.clone()),
        paths::IDENTITY_DOCUMENT => body_json(json!({
            "accountId": "123456789012",
            "architecture": "x86_64",
            "availabilityZone": cfg.availability_zone,
            "imageId": "ami-0123456789abcdef0",
            "instanceId": cfg.instance_id,
            "instanceType": cfg.instance_type,
            "region": cfg.region,
            "version": "2017-09-30",
        })),
        "/latest/meta-data" | "/latest/meta-data/" => text(
            200,
            "autoscaling/\nevents/\ninstance-id\ninstance-life-cycle\ninstance-type\nplacement/\nspot/",
        ),
        _ => not_found(),
    }
}

fn pretty_tabs(v: &Value) -> String {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    match serde::Serialize::serialize(v, &mut ser) {
        Ok(()) => String::from_utf8_lossy(&out).into_owned(),
        Err(_) => v.to_string(),
    }
}

async fn read_json<T: for<'de> Deserialize<'de>>(req: Request<Incoming>) -> Result<T, Resp> {
    let bytes = Limited::new(req.into_body(), MAX_CONTROL_BODY)
        .collect()
        .await
        .map_err(|e| bad_request(format!("cannot read the request body: {e}")))?
        .to_bytes();
    let body = if bytes.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        &bytes[..]
    };
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpotReq {
    #[serde(default = "default_action")]
    action: String,
    in_seconds: Option<i64>,
    time: Option<DateTime<Utc>>,
}

fn default_action() -> String {
    "terminate".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RebalanceReq {
    notice_time: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LifecycleReq {
    state: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultReq {
    status: Option<u16>,
    delay_ms: Option<u64>,
    #[serde(default)]
    reset: bool,
    #[serde(default = "one")]
    count: u32,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideReq {
    path: String,
    #[serde(default = "ok_status")]
    status: u16,
    body: String,
    #[serde(default = "text_plain")]
    content_type: String,
}

fn ok_status() -> u16 {
    200
}

fn text_plain() -> String {
    "text/plain".into()
}

/// Notice times are whole seconds, as in real IMDS bodies.
fn whole_seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(0)
}

async fn control(shared: &Shared, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::POST, "/mock/spot-interruption") => {
            let r: SpotReq = match read_json(req).await {
                Ok(r) => r,
                Err(e) => return e,
            };
            if r.action.is_empty() || r.action.len() > 64 {
                return bad_request("field `action`: expected terminate, stop or hibernate");
            }
            let time = match (r.time, r.in_seconds) {
                (Some(t), None) => whole_seconds(t),
                (None, secs) => {
                    let secs = secs.unwrap_or(120);
                    if !(-86_400..=86_400).contains(&secs) {
                        return bad_request("field `in_seconds`: must be within one day");
                    }
                    whole_seconds(Utc::now()) + chrono::Duration::seconds(secs)
                }
                (Some(_), Some(_)) => {
                    return bad_request("give either `time` or `in_seconds`, not both")
                }
            };
            shared.state().spot = Some((r.action.clone(), time));
            control_json(
                200,
                json!({"action": r.action, "time": format_imds_time(time)}),
            )
        }
        (Method::POST, "/mock/rebalance") => {
            let r: RebalanceReq = match read_json(req).await {
                Ok(r) => r,
                Err(e) => return e,
            };
            let t = whole_seconds(r.notice_time.unwrap_or_else(Utc::now));
            shared.state().rebalance = Some(t);
            control_json(200, json!({"noticeTime": format_imds_time(t)}))
        }
        (Method::POST, "/mock/lifecycle-state") => {
            let r: LifecycleReq = match read_json(req).await {
                Ok(r) => r,
                Err(e) => return e,
            };
            if r.state.is_empty() {
                return bad_request("field `state`: must not be empty");
            }
            shared.state().lifecycle = Some(r.state.clone());
            control_json(200, json!({"state": r.state}))
        }
        (Method::POST, "/mock/scheduled-events") => {
            let v: Value = match read_json(req).await {
                Ok(v) => v,
                Err(e) => return e,
            };
            if !v.is_array() {
                return bad_request("body: expected a JSON array of scheduled events");
            }
            let n = v.as_array().map_or(0, Vec::len);
            shared.state().scheduled = Some(v);
            control_json(200, json!({"events": n}))
        }
        (Method::POST, "/mock/faults") => {
            let r: FaultReq = match read_json(req).await {
                Ok(r) => r,
                Err(e) => return e,
            };
            if r.status.is_none() && r.delay_ms.is_none() && !r.reset {
                return bad_request("give at least one of `status`, `delay_ms`, `reset`");
            }
            if r.status.is_some_and(|s| !(100..=599).contains(&s)) {
                return bad_request("field `status`: must be an HTTP status 100..=599");
            }
            if r.count == 0 {
                return bad_request("field `count`: must be at least 1");
            }
            let mut st = shared.state();
            st.faults.push_back(Fault {
                status: r.status,
                delay: r.delay_ms.map(Duration::from_millis),
                reset: r.reset,
                remaining: r.count,
            });
            let pending: u32 = st.faults.iter().map(|f| f.remaining).sum();
            control_json(200, json!({"pending_faults": pending}))
        }
        (Method::POST, "/mock/override") => {
            let r: OverrideReq = match read_json(req).await {
                Ok(r) => r,
                Err(e) => return e,
            };
            if !r.path.starts_with('/') {
                return bad_request("field `path`: must start with /");
            }
            if StatusCode::from_u16(r.status).is_err() {
                return bad_request("field `status`: not an HTTP status");
            }
            shared.state().overrides.insert(
                r.path.clone(),
                Override {
                    status: r.status,
                    body: r.body,
                    content_type: r.content_type,
                },
            );
            control_json(200, json!({"path": r.path}))
        }
        (Method::POST, "/mock/reset") => {
            let mut st = shared.state();
            // Tokens survive a reset, so a running agent is not thrown into 401s.
            let tokens = std::mem::take(&mut st.tokens);
            let issued = st.issued;
            *st = State {
                tokens,
                issued,
                ..State::default()
            };
            control_json(200, json!({"reset": true}))
        }
        (Method::GET, "/mock/requests") => {
            let st = shared.state();
            let mut total = 0;
            let list: Vec<Value> = st
                .counts
                .iter()
                .map(|((method, path, status), n)| {
                    total += n;
                    let status = status
                        .parse::<u16>()
                        .map_or_else(|_| json!(status), |s| json!(s));
                    json!({"method": method, "path": path, "status": status, "count": n})
                })
                .collect();
            control_json(200, json!({"total": total, "requests": list}))
        }
        (_, p) => control_json(404, json!({"error": format!("no control endpoint {p}")})),
    }
}
