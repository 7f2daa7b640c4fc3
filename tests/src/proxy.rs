//! A fault-injecting HTTP proxy between the code under test and moto.
//!
//! It covers what moto lacks (REFERENCE.md): it answers
//! `CompleteLifecycleAction` and `RecordLifecycleActionHeartbeat` itself and
//! records them, and it can answer any action with an error status,
//! a throttling error, a delay or a dropped connection, for a given number of
//! calls. Every call is recorded with its action name and body.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};

#[derive(Debug, Clone)]
pub enum Fault {
    /// An error answer with this HTTP status and AWS error code.
    Error { status: u16, code: &'static str },
    /// Wait, then forward.
    Delay(Duration),
    /// Drop the connection without an answer.
    Reset,
    /// Answer this instead of moto (e.g. scripted scaling activities).
    Respond { status: u16, body: String },
}

impl Fault {
    pub fn throttle() -> Fault {
        Fault::Error {
            status: 400,
            code: "ThrottlingException",
        }
    }
    pub fn server_error() -> Fault {
        Fault::Error {
            status: 500,
            code: "InternalFailure",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Call {
    pub action: String,
    /// The region of the SigV4 credential scope.
    pub region: String,
    pub body: String,
    /// The status answered; 0 for a dropped connection.
    pub status: u16,
    /// When the request arrived (ms since the epoch): a long poll's start,
    /// not its answer.
    pub arrived_ms: u128,
}

#[derive(Default)]
struct State {
    /// (action, signing region, find, replace): applied to moto's answers
    /// until cleared, to show what moto cannot (a group short of capacity).
    rewrites: Vec<(String, String, String, String)>,
    calls: Vec<Call>,
    /// action ("*" for any) -> faults to apply in order.
    faults: Vec<(String, Fault, u32)>,
}

#[derive(Clone)]
pub struct FaultProxy {
    pub url: String,
    state: Arc<Mutex<State>>,
}

/// Actions moto does not implement (it answers 500): answered here with success.
const ANSWERED_HERE: &[&str] = &["CompleteLifecycleAction", "RecordLifecycleActionHeartbeat"];

impl FaultProxy {
    /// Starts on a free loopback port, forwarding to `upstream`, on `rt`.
    pub fn start(rt: &tokio::runtime::Runtime, upstream: String) -> FaultProxy {
        let state = Arc::new(Mutex::new(State::default()));
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let st = state.clone();
        let addr: SocketAddr = crate::serve::spawn(rt, move |req| {
            handle(st.clone(), http.clone(), upstream.clone(), req)
        });
        FaultProxy {
            url: format!("http://{addr}"),
            state,
        }
    }

    /// Applies `fault` to the next `count` calls of `action` ("*": any).
    pub fn inject(&self, action: &str, fault: Fault, count: u32) {
        self.state
            .lock()
            .unwrap()
            .faults
            .push((action.to_string(), fault, count));
    }

    pub fn clear_faults(&self) {
        self.state.lock().unwrap().faults.clear();
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Calls of one action.
    /// Rewrites `find` into `replace` in every answer of `action` signed for
    /// `region`, until [`FaultProxy::clear_rewrites`].
    pub fn rewrite(&self, action: &str, region: &str, find: &str, replace: &str) {
        self.state.lock().unwrap().rewrites.push((
            action.into(),
            region.into(),
            find.into(),
            replace.into(),
        ));
    }

    pub fn clear_rewrites(&self) {
        self.state.lock().unwrap().rewrites.clear();
    }

    pub fn calls_of(&self, action: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.action == action)
            .collect()
    }

    /// Counts of calls by action.
    pub fn counts(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for c in self.calls() {
            *m.entry(c.action).or_default() += 1;
        }
        m
    }
}

#[derive(Debug)]
struct Dropped;
impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dropped by an injected fault")
    }
}
impl std::error::Error for Dropped {}

fn action_of(req_target: Option<&str>, body: &str) -> String {
    if let Some(t) = req_target {
        // JSON protocols: "AmazonSQS.ReceiveMessage".
        return t.rsplit('.').next().unwrap_or(t).to_string();
    }
    body.split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .unwrap_or("?")
        .to_string()
}

fn respond(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

async fn handle(
    st: Arc<Mutex<State>>,
    http: reqwest::Client,
    upstream: String,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let arrived_ms = crate::now_ms();
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|_| Dropped)?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok());
    let json_protocol = target.is_some();
    let action = action_of(target, &text);
    let region = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.split("Credential=").nth(1))
        .and_then(|c| c.split('/').nth(2))
        .unwrap_or("")
        .to_string();
    let fault = {
        let mut s = st.lock().unwrap();
        let idx = s
            .faults
            .iter()
            .position(|(a, _, n)| *n > 0 && (a == "*" || *a == action));
        idx.map(|i| {
            s.faults[i].2 -= 1;
            s.faults[i].1.clone()
        })
    };
    let record = |status: u16| {
        st.lock().unwrap().calls.push(Call {
            action: action.clone(),
            region: region.clone(),
            body: text.clone(),
            status,
            arrived_ms,
        });
    };
    match fault {
        Some(Fault::Reset) => {
            record(0);
            return Err(Dropped);
        }
        Some(Fault::Error { status, code }) => {
            record(status);
            return Ok(if json_protocol {
                respond(
                    status,
                    "application/x-amz-json-1.0",
                    format!(
                        r#"{{"__type":"com.amazonaws.sqs#{code}","message":"injected by the fault proxy"}}"#
                    ),
                )
            } else {
                respond(
                    status,
                    "text/xml",
                    format!(
                        "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>injected by the fault proxy</Message></Error><RequestId>fault</RequestId></ErrorResponse>"
                    ),
                )
            });
        }
        Some(Fault::Respond { status, body }) => {
            record(status);
            return Ok(respond(status, "text/xml", body));
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        None => {}
    }
    if ANSWERED_HERE.contains(&action.as_str()) {
        record(200);
        return Ok(respond(
            200,
            "text/xml",
            format!(
                r#"<{action}Response xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/"><{action}Result/><ResponseMetadata><RequestId>proxy</RequestId></ResponseMetadata></{action}Response>"#
            ),
        ));
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut fwd = http.request(parts.method.clone(), format!("{upstream}{path}"));
    for (k, v) in parts.headers.iter() {
        if k != "host" && k != "content-length" {
            fwd = fwd.header(k, v);
        }
    }
    let resp = match fwd.body(body).send().await {
        Ok(r) => r,
        Err(_) => {
            record(502);
            return Ok(respond(502, "text/plain", "upstream unreachable".into()));
        }
    };
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain")
        .to_string();
    let mut extra = Vec::new();
    for h in ["x-amzn-query-error", "x-amzn-requestid"] {
        if let Some(v) = resp.headers().get(h) {
            extra.push((h, v.clone()));
        }
    }
    let mut bytes = resp.bytes().await.unwrap_or_default();
    let rewrites: Vec<_> = st
        .lock()
        .unwrap()
        .rewrites
        .iter()
        .filter(|(a, r, _, _)| *a == action && *r == region)
        .cloned()
        .collect();
    if !rewrites.is_empty() {
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        for (_, _, find, replace) in rewrites {
            text = text.replace(&find, &replace);
        }
        bytes = Bytes::from(text);
    }
    record(status);
    let mut r = respond(status, &ct, String::new());
    *r.body_mut() = Full::new(bytes);
    for (h, v) in extra {
        r.headers_mut().insert(h, v);
    }
    Ok(r)
}

/// A `DescribeScalingActivities` answer with the given activities:
/// (id, status code, status message, time RFC 3339).
pub fn activities_xml(group: &str, activities: &[(&str, &str, &str, &str)]) -> String {
    let members: String = activities
        .iter()
        .map(|(id, code, msg, at)| {
            format!(
                "<member><ActivityId>{id}</ActivityId><AutoScalingGroupName>{group}</AutoScalingGroupName>\
                 <Description>Launching a new EC2 instance</Description><Cause>test</Cause>\
                 <StartTime>{at}</StartTime><EndTime>{at}</EndTime><StatusCode>{code}</StatusCode>\
                 <StatusMessage>{msg}</StatusMessage><Progress>100</Progress></member>"
            )
        })
        .collect();
    format!(
        "<DescribeScalingActivitiesResponse xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\">\
         <DescribeScalingActivitiesResult><Activities>{members}</Activities></DescribeScalingActivitiesResult>\
         <ResponseMetadata><RequestId>proxy</RequestId></ResponseMetadata></DescribeScalingActivitiesResponse>"
    )
}
