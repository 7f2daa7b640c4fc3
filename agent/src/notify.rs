//! Telling others about a notice: an SNS message and a user hook command,
//! both optional, both off the runner's path (spawned; a slow hook never
//! delays a drain).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// A hook that runs longer is killed: notices must not pile up hooks.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Every notice sent, (subject, event): the in-memory target of tests.
pub type Sent = std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;

#[derive(Clone)]
pub struct Notifier {
    pub sns: Option<(aws_sdk_sns::Client, String)>,
    pub hook: Option<Vec<String>>,
    /// Tests: every notice, kept.
    pub sent: Option<Sent>,
}

impl Notifier {
    pub fn none() -> Notifier {
        Notifier {
            sns: None,
            hook: None,
            sent: None,
        }
    }

    /// Sends `event` (a JSON object) to every configured target, in the background.
    pub fn notify(&self, subject: &str, event: serde_json::Value) {
        if let Some(sent) = &self.sent {
            sent.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((subject.to_string(), event.clone()));
        }
        let text = event.to_string();
        if let Some((client, topic)) = self.sns.clone() {
            let (subject, text) = (subject.to_string(), text.clone());
            tokio::spawn(async move {
                match crate::aws::sns_publish(&client, &topic, &subject, &text).await {
                    Ok(()) => tracing::info!(%topic, "notice published to SNS"),
                    Err(e) => {
                        tracing::warn!(%topic, error = %e, "cannot publish the notice to SNS")
                    }
                }
            });
        }
        if let Some(argv) = self.hook.clone() {
            tokio::spawn(async move { run_hook(&argv, text).await });
        }
    }
}

/// Runs the hook directly (no shell) with the event on stdin.
async fn run_hook(argv: &[String], event: String) {
    let Some((program, args)) = argv.split_first() else {
        return;
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::piped()).kill_on_drop(true);
    crate::jobuser::without_capabilities(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%program, error = %e, "cannot start notify.hook_command");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(event.as_bytes()).await;
        let _ = stdin.shutdown().await;
    }
    match tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await {
        Ok(Ok(s)) if s.success() => tracing::info!(%program, "notify hook done"),
        Ok(Ok(s)) => tracing::warn!(%program, status = %s, "notify hook failed"),
        Ok(Err(e)) => tracing::warn!(%program, error = %e, "cannot wait for notify hook"),
        Err(_) => tracing::warn!(%program, ?HOOK_TIMEOUT, "notify hook timed out; killed"),
    }
}
