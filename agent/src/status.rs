//! What the agent shows: counters, the current mode, and a small local HTTP
//! endpoint with `/healthz`, `/status` (JSON) and `/metrics` (Prometheus text).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::Request;
use serde::Serialize;
use serde_json::json;
use spotguard_common::http::reply;

use crate::imds::ImdsStats;
use crate::state::Mode;

macro_rules! counters {
    ($($name:ident: $help:literal),* $(,)?) => {
        /// Monotonic counters, exported on `/metrics` as `spotguard_agent_<name>_total`.
        #[derive(Debug, Default)]
        pub struct Counters { $(pub $name: AtomicU64,)* }

        impl Counters {
            fn each(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $help, self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    messages_received: "Messages received from SQS.",
    jobs_succeeded: "Jobs that succeeded; their messages were deleted.",
    jobs_failed: "Jobs that failed; their messages return after the error visibility timeout.",
    jobs_timed_out: "Jobs stopped after worker.timeout.",
    jobs_handed_back: "Jobs stopped by a drain, or that gave their work back after a notice; their messages were handed back at once.",
    jobs_handed_over: "Jobs handed back after a notice with their checkpoint reference, re-sent for the next worker.",
    messages_returned_unstarted: "Messages received after intake closed, handed back unstarted.",
    settle_errors: "Deletes or hand-backs that failed; those messages return when their visibility lapses.",
    jobs_not_started: "Jobs that could not start (missing program, no app listening); handed back at once, intake paused.",
    lost_ownership: "Heartbeats refused because the lease lapsed or the handle is stale (another worker may run the job).",
    unhealthy_trips: "Times the agent went unhealthy (failures in a row, or health.command failing).",
    notices_spot: "Spot interruption notices.",
    notices_rebalance: "Rebalance recommendations.",
    notices_lifecycle: "Target lifecycle state changes to Terminated.",
    notices_scheduled: "Scheduled maintenance event changes.",
    drains: "Drains started.",
    receive_errors: "Failed ReceiveMessage calls.",
    aws_errors: "Other failed AWS calls.",
    scale_in_requests: "TerminateInstanceInAutoScalingGroup calls.",
    scale_in_refusals: "Scale-in requests the group refused.",
}

fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Shared between the runner (writer) and the HTTP endpoint (reader).
/// `/healthz`: 503 while the agent is unhealthy (the circuit breaker or
/// `health.command`), or while IMDS has not answered for `imds_stale_ms`
/// (notices would go unseen); 200 otherwise. A pure function of its inputs.
pub fn healthz(
    unhealthy: Option<&str>,
    last_imds_ms: u64,
    started_ms: u64,
    now_ms: u64,
    imds_stale_ms: u64,
) -> (u16, String) {
    if let Some(why) = unhealthy {
        return (503, format!("unhealthy: {why}\n"));
    }
    let since = if last_imds_ms == 0 {
        started_ms
    } else {
        last_imds_ms
    };
    let silent = now_ms.saturating_sub(since);
    if silent >= imds_stale_ms {
        return (
            503,
            format!("unhealthy: IMDS has not answered for {} s\n", silent / 1000),
        );
    }
    (200, "ok\n".into())
}

pub struct Status {
    pub counters: Counters,
    pub imds: Arc<ImdsStats>,
    pub instance_id: String,
    view: Mutex<View>,
    /// Why the agent is unhealthy, if it is.
    unhealthy: Mutex<Option<String>>,
    /// The health checks' last answers, by check (`command`, `gpu_count`,
    /// `gpu_answers`, `gpu_memory`, `gpu_xid`).
    checks: Mutex<std::collections::BTreeMap<&'static str, bool>>,
    started_ms: u64,
    /// IMDS silent this long makes `/healthz` answer 503.
    pub imds_stale_ms: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
struct View {
    mode: Mode,
    jobs_in_flight: usize,
    /// Age of the longest-running job (a job without `worker.timeout`
    /// cannot hold its slot for ever unnoticed).
    oldest_job_secs: u64,
}

impl Status {
    pub fn new(instance_id: String, imds: Arc<ImdsStats>) -> Status {
        Status {
            counters: Counters::default(),
            imds,
            instance_id,
            view: Mutex::new(View {
                mode: Mode::Running,
                jobs_in_flight: 0,
                oldest_job_secs: 0,
            }),
            unhealthy: Mutex::new(None),
            checks: Mutex::new(Default::default()),
            started_ms: now_ms(),
            imds_stale_ms: AtomicU64::new(60_000),
        }
    }

    pub fn set_unhealthy(&self, why: Option<String>) {
        *self.unhealthy.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// The last answer of each check (a check left out this time, as the
    /// Xid check with an unreadable log, keeps its last answer).
    pub fn set_checks(&self, checks: &[(&'static str, bool)]) {
        let mut m = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        for (k, ok) in checks {
            m.insert(k, *ok);
        }
    }

    pub fn checks(&self) -> std::collections::BTreeMap<&'static str, bool> {
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn unhealthy(&self) -> Option<String> {
        self.unhealthy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn healthz(&self) -> (u16, String) {
        healthz(
            self.unhealthy().as_deref(),
            self.imds.last_answer_ms.load(Ordering::Relaxed),
            self.started_ms,
            now_ms(),
            self.imds_stale_ms.load(Ordering::Relaxed),
        )
    }

    pub fn set(&self, mode: &Mode, jobs_in_flight: usize, oldest_job_secs: u64) {
        let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        v.mode = mode.clone();
        v.jobs_in_flight = jobs_in_flight;
        v.oldest_job_secs = oldest_job_secs;
    }

    fn view(&self) -> View {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn json(&self) -> serde_json::Value {
        let v = self.view();
        let counters: serde_json::Map<String, serde_json::Value> = self
            .counters
            .each()
            .into_iter()
            .map(|(k, _, n)| (k.to_string(), json!(n)))
            .collect();
        json!({
            "instance_id": self.instance_id,
            "state": v.mode,
            "jobs_in_flight": v.jobs_in_flight,
            "oldest_job_age_seconds": v.oldest_job_secs,
            "unhealthy": self.unhealthy(),
            "checks": self.checks(),
            "counters": counters,
            "imds": self.imds.snapshot(),
        })
    }

    pub fn prometheus(&self) -> String {
        let v = self.view();
        let mut out = String::new();
        for (name, help, n) in self.counters.each() {
            let _ = writeln!(out, "# HELP spotguard_agent_{name}_total {help}");
            let _ = writeln!(out, "# TYPE spotguard_agent_{name}_total counter");
            let _ = writeln!(out, "spotguard_agent_{name}_total {n}");
        }
        let imds = self.imds.snapshot();
        let _ = writeln!(
            out,
            "# HELP spotguard_agent_imds_errors_total IMDS request failures by kind."
        );
        let _ = writeln!(out, "# TYPE spotguard_agent_imds_errors_total counter");
        for (kind, n) in imds.errors() {
            let _ = writeln!(
                out,
                "spotguard_agent_imds_errors_total{{kind=\"{kind}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP spotguard_agent_jobs_in_flight Jobs running now."
        );
        let _ = writeln!(out, "# TYPE spotguard_agent_jobs_in_flight gauge");
        let _ = writeln!(out, "spotguard_agent_jobs_in_flight {}", v.jobs_in_flight);
        let _ = writeln!(
            out,
            "# HELP spotguard_agent_oldest_job_age_seconds Age of the longest-running job (0: none)."
        );
        let _ = writeln!(out, "# TYPE spotguard_agent_oldest_job_age_seconds gauge");
        let _ = writeln!(
            out,
            "spotguard_agent_oldest_job_age_seconds {}",
            v.oldest_job_secs
        );
        let _ = writeln!(
            out,
            "# HELP spotguard_agent_healthy 1 unless the agent is unhealthy."
        );
        let _ = writeln!(out, "# TYPE spotguard_agent_healthy gauge");
        let _ = writeln!(
            out,
            "spotguard_agent_healthy {}",
            u8::from(self.unhealthy().is_none())
        );
        let checks = self.checks();
        if !checks.is_empty() {
            let _ = writeln!(
                out,
                "# HELP spotguard_agent_health_check 1 while the check passes (its last answer)."
            );
            let _ = writeln!(out, "# TYPE spotguard_agent_health_check gauge");
            for (k, ok) in checks {
                let _ = writeln!(
                    out,
                    "spotguard_agent_health_check{{check=\"{k}\"}} {}",
                    u8::from(ok)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP spotguard_agent_mode The current mode (1 for the active one)."
        );
        let _ = writeln!(out, "# TYPE spotguard_agent_mode gauge");
        for m in [
            "running",
            "intake_stopped",
            "scaling_in",
            "terminating",
            "draining",
        ] {
            let on = u8::from(v.mode.name() == m);
            let _ = writeln!(out, "spotguard_agent_mode{{mode=\"{m}\"}} {on}");
        }
        out
    }
}

/// Serves the endpoint until `shutdown` completes.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    status: Arc<Status>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "status endpoint listening");
    let limits = spotguard_common::http::Limits::exposed();
    spotguard_common::http::serve_within(
        listener,
        shutdown,
        move |req: Request<Incoming>| {
            let status = status.clone();
            async move {
                let r = match req.uri().path() {
                    "/healthz" => {
                        let (code, text) = status.healthz();
                        reply(code, "text/plain", text)
                    }
                    "/status" => reply(200, "application/json", status.json().to_string()),
                    "/metrics" => reply(200, "text/plain; version=0.0.4", status.prometheus()),
                    _ => reply(404, "text/plain", "not found\n"),
                };
                Ok::<_, std::convert::Infallible>(r)
            }
        },
        limits,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_export_each_imds_error_kind_once() {
        let imds = Arc::new(ImdsStats::default());
        imds.timeouts.store(2, Ordering::Relaxed);
        imds.parse_errors.store(1, Ordering::Relaxed);
        imds.requests.store(40, Ordering::Relaxed);
        let text = Status::new("i-1".into(), imds.clone()).prometheus();
        let kinds: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("spotguard_agent_imds_errors_total{"))
            .collect();
        assert_eq!(
            kinds,
            [
                "spotguard_agent_imds_errors_total{kind=\"timeout\"} 2",
                "spotguard_agent_imds_errors_total{kind=\"transport\"} 0",
                "spotguard_agent_imds_errors_total{kind=\"server\"} 0",
                "spotguard_agent_imds_errors_total{kind=\"unauthorized\"} 0",
                "spotguard_agent_imds_errors_total{kind=\"other\"} 0",
                "spotguard_agent_imds_errors_total{kind=\"parse\"} 1",
            ]
        );
        assert_eq!(imds.snapshot().requests, 40);
    }

    #[test]
    fn healthz_answers_503_when_unhealthy_or_imds_silent() {
        let min = 60_000;
        assert_eq!(healthz(None, 1_000_000, 0, 1_030_000, min).0, 200);
        assert_eq!(healthz(None, 1_000_000, 0, 1_060_000, min).0, 503);
        // Never answered: counted from the start.
        assert_eq!(healthz(None, 0, 1_000_000, 1_010_000, min).0, 200);
        let (code, text) = healthz(None, 0, 1_000_000, 1_090_000, min);
        assert_eq!(code, 503);
        assert!(text.contains("IMDS has not answered for 90 s"), "{text}");
        let (code, text) = healthz(Some("5 jobs in a row failed"), 1_000_000, 0, 1_000_000, min);
        assert_eq!(code, 503);
        assert!(text.contains("5 jobs in a row"), "{text}");
    }
}
