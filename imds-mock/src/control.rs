//! A typed client of the mock's control API (`/mock/...`), for tests,
//! benchmarks and demos. Blocking and std-only (one request per
//! connection), so a harness needs no runtime; from async code, call it in
//! `spawn_blocking`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{method} {url}: {source}")]
    Io {
        method: String,
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} {url}: HTTP {status}: {body}")]
    Status {
        method: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error("{method} {url}: answer is not the expected JSON: {message}")]
    Json {
        method: String,
        url: String,
        message: String,
    },
}

/// One HTTP/1.1 request to an `http://HOST:PORT/PATH` URL: (status, body).
/// For loopback test servers (the mock, the agent's status endpoint).
pub fn request(method: &str, url: &str, body: &str) -> Result<(u16, String), ControlError> {
    request_with(method, url, body, None)
}

/// [`request`] with the control API's token, if any.
pub fn request_with(
    method: &str,
    url: &str,
    body: &str,
    token: Option<&str>,
) -> Result<(u16, String), ControlError> {
    let io = |source: std::io::Error| ControlError::Io {
        method: method.into(),
        url: url.into(),
        source,
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| io(std::io::Error::other("not an http:// URL")))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut s = TcpStream::connect(host).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let token = token
        .map(|t| format!("{}: {t}\r\n", crate::CONTROL_TOKEN_HEADER))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{token}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(io)?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(io)?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            io(std::io::Error::other(format!(
                "not an HTTP answer: {raw:?}"
            )))
        })?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A fault for the next `count` metadata requests (`POST /mock/faults`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fault {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    pub count: u32,
}

/// `GET /mock/requests`.
#[derive(Debug, Clone, Deserialize)]
pub struct Requests {
    pub total: u64,
    pub requests: Vec<Counted>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Counted {
    pub method: String,
    pub path: String,
    /// An HTTP status, or `"reset"` for a dropped connection.
    pub status: Value,
    pub count: u64,
}

impl Requests {
    /// How many (method, path) requests got `status` (a number or "reset").
    pub fn count(&self, method: &str, path: &str, status: impl Into<Value>) -> u64 {
        let status = status.into();
        self.requests
            .iter()
            .filter(|r| r.method == method && r.path == path && r.status == status)
            .map(|r| r.count)
            .sum()
    }
}

/// The control API of a mock at `base` (`http://127.0.0.1:PORT`).
#[derive(Debug, Clone)]
pub struct Control {
    pub base: String,
    /// The control API's token (the mock program prints it at start).
    pub token: Option<String>,
}

impl Control {
    pub fn new(base: impl Into<String>) -> Control {
        Control {
            base: base.into(),
            token: None,
        }
    }

    pub fn with_token(self, token: impl Into<String>) -> Control {
        Control {
            token: Some(token.into()),
            ..self
        }
    }

    /// POSTs `body` to a control `path` and returns the JSON answer;
    /// anything but 200 is an error naming the status and the mock's text.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ControlError> {
        let url = format!("{}{path}", self.base);
        let (status, text) = request_with("POST", &url, &body.to_string(), self.token.as_deref())?;
        if status != 200 {
            return Err(ControlError::Status {
                method: "POST".into(),
                url,
                status,
                body: text,
            });
        }
        serde_json::from_str(&text).map_err(|e| ControlError::Json {
            method: "POST".into(),
            url,
            message: e.to_string(),
        })
    }

    /// Any request to the mock (metadata paths included): (status, body).
    pub fn raw(&self, method: &str, path: &str, body: &str) -> Result<(u16, String), ControlError> {
        request_with(
            method,
            &format!("{}{path}", self.base),
            body,
            self.token.as_deref(),
        )
    }

    /// A spot notice: `action` (terminate, stop, hibernate) in `in_seconds`.
    pub fn spot_interruption(&self, action: &str, in_seconds: i64) -> Result<Value, ControlError> {
        self.post(
            "/mock/spot-interruption",
            &json!({"action": action, "in_seconds": in_seconds}),
        )
    }

    /// A rebalance recommendation, now.
    pub fn rebalance(&self) -> Result<Value, ControlError> {
        self.post("/mock/rebalance", &json!({}))
    }

    /// The target lifecycle state (e.g. `Terminated`).
    pub fn lifecycle_state(&self, state: &str) -> Result<Value, ControlError> {
        self.post("/mock/lifecycle-state", &json!({"state": state}))
    }

    /// The scheduled events served (a JSON array).
    pub fn scheduled_events(&self, events: &Value) -> Result<Value, ControlError> {
        self.post("/mock/scheduled-events", events)
    }

    pub fn fault(&self, f: &Fault) -> Result<Value, ControlError> {
        self.post("/mock/faults", &json!(f))
    }

    /// Serves exactly `body` with `status` at a metadata `path`.
    pub fn override_path(
        &self,
        path: &str,
        status: u16,
        body: &str,
        content_type: &str,
    ) -> Result<Value, ControlError> {
        self.post(
            "/mock/override",
            &json!({"path": path, "status": status, "body": body, "content_type": content_type}),
        )
    }

    /// Clears notices, faults, overrides and counts (tokens stay valid).
    pub fn reset(&self) -> Result<Value, ControlError> {
        self.post("/mock/reset", &json!({}))
    }

    pub fn requests(&self) -> Result<Requests, ControlError> {
        let url = format!("{}/mock/requests", self.base);
        let (_, text) = request_with("GET", &url, "", self.token.as_deref())?;
        serde_json::from_str(&text).map_err(|e| ControlError::Json {
            method: "GET".into(),
            url,
            message: e.to_string(),
        })
    }
}
