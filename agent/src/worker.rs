//! Handing one message to the worker: a program (exec mode) or an HTTP POST
//! in the Elastic Beanstalk sqsd style (http mode).
//!
//! The message body never passes through a shell: exec mode runs the
//! configured argv directly and writes the body to the job's stdin.

use std::future::Future;
use std::process::Stdio;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::aws::Message;
use crate::config::WorkerMode;

/// How a job ended, before its message is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Non-zero exit, signal, non-2xx answer, or the job could not start.
    Failed(String),
    /// Stopped by the agent, for the reason given.
    Stopped(StopReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The drain deadline came.
    Deadline,
    /// `worker.timeout` elapsed.
    Timeout,
}

/// What every job of this agent shares.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub mode: WorkerMode,
    pub queue_url: String,
    pub queue_name: String,
    pub term_grace: Duration,
    pub content_type: String,
    pub env: Vec<(String, String)>,
    pub http: reqwest::Client,
}

/// Runs a job until it ends or `stop` completes, whichever is first.
pub async fn execute(
    spec: &WorkerSpec,
    msg: &Message,
    stop: impl Future<Output = StopReason>,
) -> Outcome {
    match &spec.mode {
        WorkerMode::Exec(argv) => exec(spec, argv, msg, stop).await,
        WorkerMode::Http(url) => http(spec, url, msg, stop).await,
    }
}

/// Environment variable name for a message attribute: `SPOTGUARD_ATTR_` and
/// the name with anything but ASCII letters, digits and `_` replaced by `_`.
pub fn attr_env_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("SPOTGUARD_ATTR_{clean}")
}

fn first_received_iso(msg: &Message) -> Option<String> {
    msg.first_received_ms
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

async fn exec(
    spec: &WorkerSpec,
    argv: &[String],
    msg: &Message,
    stop: impl Future<Output = StopReason>,
) -> Outcome {
    let Some((program, args)) = argv.split_first() else {
        return Outcome::Failed("worker.command is empty".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        // Its own process group, so that a stop reaches every process the
        // job started, and a Ctrl-C on the agent's terminal does not.
        .process_group(0)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env("SPOTGUARD_MESSAGE_ID", &msg.id)
        .env("SPOTGUARD_RECEIVE_COUNT", msg.receive_count.to_string())
        .env("SPOTGUARD_QUEUE_URL", &spec.queue_url)
        .env("SPOTGUARD_QUEUE_NAME", &spec.queue_name);
    if let Some(t) = first_received_iso(msg) {
        cmd.env("SPOTGUARD_FIRST_RECEIVED_AT", t);
    }
    for (k, v) in &msg.attributes {
        if v.contains('\0') {
            tracing::warn!(message_id = %msg.id, attribute = %k, "attribute holds a NUL byte; not passed");
            continue;
        }
        cmd.env(attr_env_name(k), v);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("cannot start {program}: {e}")),
    };
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    // Feed stdin concurrently: a job that never reads it must not block us.
    let stdin = child.stdin.take();
    let body = msg.body.clone().into_bytes();
    let feeder = async move {
        if let Some(mut stdin) = stdin {
            // A job that exits without reading stdin closes the pipe: fine.
            let _ = stdin.write_all(&body).await;
            let _ = stdin.shutdown().await;
        }
    };
    let run = async {
        let (_, status) = tokio::join!(feeder, child.wait());
        status
    };
    tokio::pin!(run);
    tokio::pin!(stop);
    tokio::select! {
        status = &mut run => match status {
            Ok(s) if s.success() => Outcome::Succeeded,
            Ok(s) => Outcome::Failed(format!("worker exited with {s}")),
            Err(e) => Outcome::Failed(format!("cannot wait for the worker: {e}")),
        },
        reason = &mut stop => {
            if let Some(pgid) = pgid {
                signal_group(pgid, Signal::SIGTERM);
                if tokio::time::timeout(spec.term_grace, &mut run).await.is_err() {
                    signal_group(pgid, Signal::SIGKILL);
                    let _ = run.await;
                }
            }
            Outcome::Stopped(reason)
        }
    }
}

fn signal_group(pgid: Pid, sig: Signal) {
    // ESRCH: the group is already gone, which is what we want.
    if let Err(e) = killpg(pgid, sig) {
        if e != nix::errno::Errno::ESRCH {
            tracing::warn!(pgid = pgid.as_raw(), ?sig, error = %e, "cannot signal the job's process group");
        }
    }
}

async fn http(
    spec: &WorkerSpec,
    url: &str,
    msg: &Message,
    stop: impl Future<Output = StopReason>,
) -> Outcome {
    let mut req = spec
        .http
        .post(url)
        .header(reqwest::header::USER_AGENT, "aws-sqsd")
        .header(reqwest::header::CONTENT_TYPE, &spec.content_type)
        .header("X-Aws-Sqsd-Msgid", &msg.id)
        .header("X-Aws-Sqsd-Queue", &spec.queue_name)
        .header("X-Aws-Sqsd-Receive-Count", msg.receive_count.to_string());
    if let Some(t) = first_received_iso(msg) {
        req = req.header("X-Aws-Sqsd-First-Received-At", t);
    }
    for (k, v) in &msg.attributes {
        let name = format!("X-Aws-Sqsd-Attr-{k}");
        match (
            reqwest::header::HeaderName::from_bytes(name.as_bytes()),
            reqwest::header::HeaderValue::from_str(v),
        ) {
            (Ok(n), Ok(v)) => req = req.header(n, v),
            _ => {
                tracing::warn!(message_id = %msg.id, attribute = %k, "attribute cannot be an HTTP header; not passed")
            }
        }
    }
    let send = req.body(msg.body.clone()).send();
    tokio::select! {
        r = send => match r {
            Ok(resp) if resp.status().is_success() => Outcome::Succeeded,
            Ok(resp) => Outcome::Failed(format!("worker answered HTTP {}", resp.status())),
            Err(e) => Outcome::Failed(format!("worker request failed: {}", crate::error_chain(&e))),
        },
        // Dropping the request abandons it (the connection is closed).
        reason = stop => Outcome::Stopped(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_env_names_are_sanitised() {
        assert_eq!(attr_env_name("job-kind"), "SPOTGUARD_ATTR_job_kind");
        assert_eq!(attr_env_name("a.b c$"), "SPOTGUARD_ATTR_a_b_c_");
        assert_eq!(attr_env_name("Plain_1"), "SPOTGUARD_ATTR_Plain_1");
    }
}
