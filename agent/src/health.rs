//! The worker-health edge: checks that say whether this instance can run
//! jobs (a GPU that fell off the bus cannot). [`CommandCheck`] runs
//! `health.command`, [`crate::gpu::GpuCheck`] the built-in GPU checks,
//! [`All`] runs several; tests pass a scripted one.

use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

/// A check longer than this counts as failed (a hung `nvidia-smi` is a
/// sick GPU); well under the default 60 s interval.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

pub trait HealthCheck: Send + Sync + 'static {
    fn check(&self) -> CheckFuture<'_>;
}

/// One answer of an instance's checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Each check that could be made, by name, and whether it passed (the
    /// `/metrics` gauge per check).
    pub checks: Vec<(&'static str, bool)>,
    /// Why, when any failed (the failures' reasons, joined).
    pub failure: Option<String>,
    /// The failure is one the instance does not recover from (a GPU lost,
    /// an uncorrectable ECC error, a fatal Xid): unhealthy for good, the
    /// notice sent, and replaced under `on_unhealthy = "replace"`. Otherwise
    /// intake stays closed only while the check fails.
    pub lasting: bool,
}

impl Outcome {
    pub fn pass(check: &'static str) -> Outcome {
        Outcome {
            checks: vec![(check, true)],
            ..Outcome::default()
        }
    }

    pub fn fail(check: &'static str, why: String, lasting: bool) -> Outcome {
        Outcome {
            checks: vec![(check, false)],
            failure: Some(why),
            lasting,
        }
    }

    /// `self` and `other` together: every check, every reason.
    pub fn and(mut self, other: Outcome) -> Outcome {
        self.checks.extend(other.checks);
        self.failure = match (self.failure, other.failure) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        };
        self.lasting |= other.lasting;
        self
    }

    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

/// Several checks, run one after another, their answers together.
pub struct All(pub Vec<std::sync::Arc<dyn HealthCheck>>);

impl HealthCheck for All {
    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async move {
            let mut out = Outcome::default();
            for c in &self.0 {
                out = out.and(c.check().await);
            }
            out
        })
    }
}

/// `health.command`, run directly (no shell), output discarded.
pub struct CommandCheck {
    pub argv: Vec<String>,
}

impl HealthCheck for CommandCheck {
    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async move {
            let fail = |why: String| Outcome::fail("command", why, false);
            let Some((program, args)) = self.argv.split_first() else {
                return fail("health.command is empty".into());
            };
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true);
            crate::jobuser::without_capabilities(&mut cmd);
            let child = cmd.status();
            match tokio::time::timeout(CHECK_TIMEOUT, child).await {
                Ok(Ok(s)) if s.success() => Outcome::pass("command"),
                Ok(Ok(s)) => fail(format!("health.command {program} exited with {s}")),
                Ok(Err(e)) => fail(format!("health.command {program}: cannot start: {e}")),
                Err(_) => fail(format!(
                    "health.command {program}: no answer within {CHECK_TIMEOUT:?}"
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn command_checks() {
        let ok = CommandCheck {
            argv: vec!["true".into()],
        }
        .check()
        .await;
        assert_eq!(ok, Outcome::pass("command"));
        let o = CommandCheck {
            argv: vec!["false".into()],
        }
        .check()
        .await;
        assert_eq!(o.checks, [("command", false)]);
        assert!(!o.lasting, "a command's failure lasts only while it fails");
        assert!(o.failure.unwrap().contains("exited"));
        let e = CommandCheck {
            argv: vec!["/nonexistent/nvidia-smi".into()],
        }
        .check()
        .await
        .failure
        .unwrap();
        assert!(e.contains("cannot start"), "{e}");
    }
}
