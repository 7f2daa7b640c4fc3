//! IMDSv2 client.
//!
//! Its one job is to tell "nothing pending" (404) apart from "IMDS is not
//! answering properly" (timeouts, resets, 5xx, 401 storms). The first is a
//! value, the second an error that the caller logs, counts and retries; no
//! fault is ever turned into a notice, and IMDSv1 is never used as a fallback.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Serialize;
use spotguard_common::imds::paths;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The real IMDS address. Tests and local runs always pass their own.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";

#[derive(Debug, Clone)]
pub struct ImdsConfig {
    /// Base URI, e.g. `http://169.254.169.254` or `http://127.0.0.1:1338`.
    pub endpoint: String,
    /// TTL asked for each session token. 6 h is the IMDS maximum
    /// (REFERENCE.md); a long TTL means one PUT per six hours.
    pub token_ttl: Duration,
    /// Total time for one HTTP exchange. IMDS answers in about a millisecond;
    /// 1 s is what the AWS SDKs' IMDS clients use (aws-config's imds client:
    /// connect and read timeouts of 1 s) and keeps a stuck request from
    /// delaying the next poll of a 1 s loop by more than one period.
    pub request_timeout: Duration,
    /// Attempts per `get` for retryable faults (transport, timeout, 5xx).
    /// Three attempts with the backoff below stay well inside one poll period.
    pub max_attempts: u32,
    /// First retry delay, doubled per retry (50 ms, 100 ms).
    pub backoff: Duration,
    /// Cap on a body. The largest real body is the scheduled-events array, a
    /// few hundred bytes per event; 64 KiB leaves room and bounds memory if
    /// something else answers on the address.
    pub max_body_bytes: usize,
}

impl Default for ImdsConfig {
    fn default() -> Self {
        ImdsConfig {
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token_ttl: Duration::from_secs(paths::MAX_TOKEN_TTL_SECS),
            request_timeout: Duration::from_secs(1),
            max_attempts: 3,
            backoff: Duration::from_millis(50),
            max_body_bytes: 64 * 1024,
        }
    }
}

/// Why a metadata request failed. Each names the URL it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("invalid IMDS endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("IMDS request {url} timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("IMDS request {url} failed: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("IMDS answered HTTP {status} for {url}")]
    Status { url: String, status: u16 },
    #[error("IMDS answered HTTP 401 for {url} again with a fresh token")]
    Unauthorized { url: String },
    #[error("IMDS refused a session token at {url} with HTTP {status}: {hint}")]
    TokenRefused {
        url: String,
        status: u16,
        hint: &'static str,
    },
    #[error("IMDS body from {url} is larger than {limit} bytes")]
    BodyTooLarge { url: String, limit: usize },
}

impl ImdsError {
    /// Faults that a second attempt may cure.
    fn is_retryable(&self) -> bool {
        match self {
            ImdsError::Timeout { .. } | ImdsError::Transport { .. } => true,
            ImdsError::Status { status, .. } | ImdsError::TokenRefused { status, .. } => {
                *status >= 500
            }
            _ => false,
        }
    }

    fn count(&self, stats: &ImdsStats) {
        let counter = match self {
            // Each 401 answer was counted when it arrived.
            ImdsError::Unauthorized { .. } => return,
            ImdsError::Timeout { .. } => &stats.timeouts,
            ImdsError::Transport { .. } => &stats.transport_errors,
            ImdsError::Status { status, .. } | ImdsError::TokenRefused { status, .. }
                if *status >= 500 =>
            {
                &stats.server_errors
            }
            _ => &stats.other_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The IMDS counters, named once: the live atomics ([`ImdsStats`]), their
/// snapshot (in `/status`), and each error counter's `kind` label in
/// `/metrics` (`""`: not an error).
macro_rules! imds_counters {
    ($($(#[$doc:meta])* $name:ident => $kind:literal,)*) => {
        /// Counters a status endpoint can export. Each failed attempt counts once.
        #[derive(Debug, Default)]
        pub struct ImdsStats {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// When a poll last answered (ms since the epoch; 0: never), set
            /// by the watcher, for `/healthz`.
            pub last_answer_ms: AtomicU64,
        }

        #[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
        pub struct ImdsStatsSnapshot {
            $(pub $name: u64,)*
        }

        impl ImdsStats {
            pub fn snapshot(&self) -> ImdsStatsSnapshot {
                ImdsStatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        impl ImdsStatsSnapshot {
            /// The error counters as (`kind` label, count), in order.
            pub fn errors(&self) -> Vec<(&'static str, u64)> {
                [$(($kind, self.$name),)*]
                    .into_iter()
                    .filter(|(kind, _)| !kind.is_empty())
                    .collect()
            }
        }
    };
}

imds_counters! {
    requests => "",
    token_fetches => "",
    timeouts => "timeout",
    transport_errors => "transport",
    server_errors => "server",
    /// 401 answers to metadata requests.
    unauthorized => "unauthorized",
    other_errors => "other",
    /// Bodies the watcher could not parse (counted by the watcher).
    parse_errors => "parse",
}

struct CachedToken {
    value: String,
    refresh_at: Instant,
}

pub struct ImdsClient {
    http: reqwest::Client,
    base: String,
    cfg: ImdsConfig,
    token: Mutex<Option<CachedToken>>,
    stats: Arc<ImdsStats>,
}

/// How long before its expiry a token is replaced: 2 min, as the AWS SDKs'
/// IMDS clients do, but never more than a quarter of a short TTL.
fn refresh_margin(ttl: Duration) -> Duration {
    Duration::from_secs(120).min(ttl / 4)
}

impl ImdsClient {
    pub fn new(cfg: ImdsConfig) -> Result<Self, ImdsError> {
        let base = cfg.endpoint.trim_end_matches('/').to_string();
        let bad = |message: String| ImdsError::Endpoint {
            endpoint: cfg.endpoint.clone(),
            message,
        };
        let url = reqwest::Url::parse(&base).map_err(|e| bad(e.to_string()))?;
        if url.scheme() != "http" || url.host().is_none() {
            return Err(bad("expected http://HOST[:PORT]".into()));
        }
        let ttl = cfg.token_ttl.as_secs();
        if !(1..=paths::MAX_TOKEN_TTL_SECS).contains(&ttl) {
            return Err(bad(format!(
                "token TTL {ttl} s is outside 1..={} s",
                paths::MAX_TOKEN_TTL_SECS
            )));
        }
        let http = reqwest::Client::builder()
            // A proxy from the environment must never see metadata requests.
            .no_proxy()
            // A redirect would carry the session token to another host.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.request_timeout)
            .build()
            .map_err(|e| bad(format!("cannot build HTTP client: {e}")))?;
        Ok(ImdsClient {
            http,
            base,
            cfg,
            token: Mutex::new(None),
            stats: Arc::new(ImdsStats::default()),
        })
    }

    pub fn stats(&self) -> Arc<ImdsStats> {
        self.stats.clone()
    }

    pub fn endpoint(&self) -> &str {
        &self.base
    }

    /// GETs a metadata path. `Ok(None)` means 404: nothing there.
    /// Retryable faults are retried with backoff before an error is returned.
    pub async fn get(&self, path: &str) -> Result<Option<String>, ImdsError> {
        let mut attempt = 1;
        loop {
            match self.get_once(path).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    e.count(&self.stats);
                    if !e.is_retryable() || attempt >= self.cfg.max_attempts {
                        return Err(e);
                    }
                    let delay = self.cfg.backoff * 2u32.saturating_pow(attempt - 1);
                    tracing::debug!(error = %e, attempt, ?delay, "IMDS request failed, retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn get_once(&self, path: &str) -> Result<Option<String>, ImdsError> {
        let url = format!("{}{}", self.base, path);
        let token = self.token().await?;
        let resp = self.send_get(&url, &token).await?;
        let resp = if resp.status() == StatusCode::UNAUTHORIZED {
            // The token expired early or IMDS restarted: one fresh token, one retry.
            self.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            self.invalidate(&token).await;
            let token = self.token().await?;
            let resp = self.send_get(&url, &token).await?;
            if resp.status() == StatusCode::UNAUTHORIZED {
                self.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
                self.invalidate(&token).await;
                return Err(ImdsError::Unauthorized { url });
            }
            resp
        } else {
            resp
        };
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => self.read_body(&url, resp).await.map(Some),
            s => Err(ImdsError::Status {
                url,
                status: s.as_u16(),
            }),
        }
    }

    async fn send_get(&self, url: &str, token: &str) -> Result<reqwest::Response, ImdsError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.http
            .get(url)
            .header(paths::TOKEN_HEADER, token)
            .send()
            .await
            .map_err(|e| self.transport(url, e))
    }

    fn transport(&self, url: &str, e: reqwest::Error) -> ImdsError {
        if e.is_timeout() {
            ImdsError::Timeout {
                url: url.to_string(),
                timeout: self.cfg.request_timeout,
            }
        } else {
            ImdsError::Transport {
                url: url.to_string(),
                source: e,
            }
        }
    }

    async fn read_body(&self, url: &str, mut resp: reqwest::Response) -> Result<String, ImdsError> {
        let limit = self.cfg.max_body_bytes;
        let too_large = || ImdsError::BodyTooLarge {
            url: url.to_string(),
            limit,
        };
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let mut buf = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(url, e))? {
            if buf.len() + chunk.len() > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        // Metadata is text; a non-UTF-8 body is garbage that the parsers reject.
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    async fn invalidate(&self, used: &str) {
        let mut guard = self.token.lock().await;
        if guard.as_ref().is_some_and(|t| t.value == used) {
            *guard = None;
        }
    }

    /// The cached token, or a new one. The lock is held across the PUT so
    /// that concurrent pollers share one fetch.
    async fn token(&self) -> Result<String, ImdsError> {
        let mut guard = self.token.lock().await;
        if let Some(t) = guard.as_ref() {
            if Instant::now() < t.refresh_at {
                return Ok(t.value.clone());
            }
        }
        let url = format!("{}{}", self.base, paths::TOKEN);
        let issued = Instant::now();
        self.stats.token_fetches.fetch_add(1, Ordering::Relaxed);
        let resp = self
            .http
            .put(&url)
            .header(
                paths::TOKEN_TTL_HEADER,
                self.cfg.token_ttl.as_secs().to_string(),
            )
            .send()
            .await
            .map_err(|e| self.transport(&url, e))?;
        let status = resp.status();
        if !status.is_success() {
            let hint = match status.as_u16() {
                400 => "the TTL header was rejected",
                403 => "IMDS is disabled for this instance, or the request went through a proxy",
                s if s >= 500 => "IMDS error",
                _ => "unexpected status",
            };
            return Err(ImdsError::TokenRefused {
                url,
                status: status.as_u16(),
                hint,
            });
        }
        let value = self.read_body(&url, resp).await?.trim().to_string();
        if value.is_empty() {
            return Err(ImdsError::TokenRefused {
                url,
                status: status.as_u16(),
                hint: "empty token",
            });
        }
        *guard = Some(CachedToken {
            value: value.clone(),
            refresh_at: issued + self.cfg.token_ttl - refresh_margin(self.cfg.token_ttl),
        });
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_margin_is_two_minutes_or_a_quarter() {
        assert_eq!(
            refresh_margin(Duration::from_secs(21_600)),
            Duration::from_secs(120)
        );
        assert_eq!(
            refresh_margin(Duration::from_secs(4)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn rejects_bad_endpoints_and_ttls() {
        for endpoint in ["169.254.169.254", "https://x", "not a url", "http://"] {
            let cfg = ImdsConfig {
                endpoint: endpoint.into(),
                ..Default::default()
            };
            assert!(ImdsClient::new(cfg).is_err(), "{endpoint} accepted");
        }
        let cfg = ImdsConfig {
            token_ttl: Duration::from_secs(21_601),
            ..Default::default()
        };
        let e = ImdsClient::new(cfg).err().unwrap();
        assert!(e.to_string().contains("TTL"), "{e}");
    }
}
