//! The worker-health edge: a check that says whether this instance can run
//! jobs (a GPU that fell off the bus cannot). [`CommandCheck`] runs
//! `health.command`; tests pass a scripted one.

use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

/// A check longer than this counts as failed (a hung `nvidia-smi` is a
/// sick GPU); well under the default 60 s interval.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

pub trait HealthCheck: Send + Sync + 'static {
    fn check(&self) -> CheckFuture<'_>;
}

/// `health.command`, run directly (no shell), output discarded.
pub struct CommandCheck {
    pub argv: Vec<String>,
}

impl HealthCheck for CommandCheck {
    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async move {
            let Some((program, args)) = self.argv.split_first() else {
                return Err("health.command is empty".into());
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
                Ok(Ok(s)) if s.success() => Ok(()),
                Ok(Ok(s)) => Err(format!("health.command {program} exited with {s}")),
                Ok(Err(e)) => Err(format!("health.command {program}: cannot start: {e}")),
                Err(_) => Err(format!(
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
        assert!(CommandCheck {
            argv: vec!["true".into()]
        }
        .check()
        .await
        .is_ok());
        let e = CommandCheck {
            argv: vec!["false".into()],
        }
        .check()
        .await
        .unwrap_err();
        assert!(e.contains("exited"), "{e}");
        let e = CommandCheck {
            argv: vec!["/nonexistent/nvidia-smi".into()],
        }
        .check()
        .await
        .unwrap_err();
        assert!(e.contains("cannot start"), "{e}");
    }
}
