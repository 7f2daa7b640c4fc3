//! One job, from receipt to settled message: run it while its visibility is
//! renewed, stop it at the drain deadline or its timeout, then delete the
//! message (success only) or hand it back.
//!
//! Nothing is lost: a message is deleted only after its job succeeded; every
//! other ending gives it back to the queue, at once (visibility 0) when the
//! job was stopped by a drain, after `error_visibility_timeout` when it
//! failed. If even that call fails, the message still comes back when its
//! visibility lapses, which the heartbeat no longer renews.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::aws::{Message, Queue};
use crate::worker::{execute, Outcome, StopReason, WorkerSpec};

/// How a message ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Deleted,
    /// Failed job: back after the error visibility timeout.
    Failed,
    /// Timed-out job: stopped, back after the error visibility timeout.
    TimedOut,
    /// Stopped by a drain: back at once.
    HandedBack,
    /// The settling call failed: the message comes back when its visibility
    /// lapses (a possible duplicate if the job had succeeded).
    SettleFailed,
}

#[derive(Debug, Clone)]
pub struct JobReport {
    pub message_id: String,
    pub outcome: Outcome,
    pub settled: Settled,
    pub ran_for: Duration,
}

pub struct JobCtx<Q> {
    pub queue: Arc<Q>,
    pub spec: WorkerSpec,
    pub visibility: Duration,
    pub heartbeat: Duration,
    pub error_visibility: Duration,
    pub timeout: Option<Duration>,
}

/// Attempts for the settling call; each is itself retried by the SDK.
const SETTLE_ATTEMPTS: u32 = 3;

/// Completes at the drain deadline (`deadline` holds it once there is one)
/// or after `timeout`, whichever comes first.
async fn stop_signal(
    mut deadline: watch::Receiver<Option<Instant>>,
    timeout: Option<Duration>,
) -> StopReason {
    let timed_out = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let drained = async {
        loop {
            let at = *deadline.borrow_and_update();
            match at {
                Some(at) => tokio::select! {
                    _ = tokio::time::sleep_until(at) => return,
                    r = deadline.changed() => if r.is_err() { tokio::time::sleep_until(at).await; return },
                },
                None => {
                    if deadline.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = timed_out => StopReason::Timeout,
        _ = drained => StopReason::Deadline,
    }
}

pub async fn run_job<Q: Queue>(
    ctx: Arc<JobCtx<Q>>,
    msg: Message,
    deadline: watch::Receiver<Option<Instant>>,
) -> JobReport {
    let started = Instant::now();
    let stop = stop_signal(deadline, ctx.timeout);
    let heartbeat = async {
        let mut tick = tokio::time::interval_at(Instant::now() + ctx.heartbeat, ctx.heartbeat);
        loop {
            tick.tick().await;
            let secs = i32::try_from(ctx.visibility.as_secs()).unwrap_or(i32::MAX);
            if let Err(e) = ctx.queue.set_visibility(&msg.receipt, secs).await {
                tracing::warn!(message_id = %msg.id, error = %e, "visibility heartbeat failed");
            }
        }
    };
    let outcome = tokio::select! {
        o = execute(&ctx.spec, &msg, stop) => o,
        _ = heartbeat => unreachable_heartbeat(),
    };
    let ran_for = started.elapsed();
    let settled = settle(&ctx, &msg, &outcome).await;
    match settled {
        Settled::Deleted => {
            tracing::info!(message_id = %msg.id, ?ran_for, "job done; message deleted")
        }
        Settled::HandedBack => {
            tracing::info!(message_id = %msg.id, ?ran_for, "job stopped at the drain deadline; message handed back")
        }
        _ => tracing::warn!(message_id = %msg.id, ?outcome, ?settled, "job did not succeed"),
    }
    JobReport {
        message_id: msg.id,
        outcome,
        settled,
        ran_for,
    }
}

/// The heartbeat loop never ends; this keeps the select total without a panic.
fn unreachable_heartbeat() -> Outcome {
    Outcome::Failed("heartbeat loop ended".into())
}

async fn settle<Q: Queue>(ctx: &JobCtx<Q>, msg: &Message, outcome: &Outcome) -> Settled {
    let err_secs = i32::try_from(ctx.error_visibility.as_secs()).unwrap_or(i32::MAX);
    let (result, ok) = match outcome {
        Outcome::Succeeded => (
            retry(|| ctx.queue.delete(&msg.receipt)).await,
            Settled::Deleted,
        ),
        Outcome::Failed(_) => (
            retry(|| ctx.queue.set_visibility(&msg.receipt, err_secs)).await,
            Settled::Failed,
        ),
        Outcome::Stopped(StopReason::Timeout) => (
            retry(|| ctx.queue.set_visibility(&msg.receipt, err_secs)).await,
            Settled::TimedOut,
        ),
        Outcome::Stopped(StopReason::Deadline) => hand_back(ctx.queue.as_ref(), msg).await,
    };
    match result {
        Ok(()) => ok,
        Err(e) => {
            tracing::error!(message_id = %msg.id, error = %e, "cannot settle the message; it returns when its visibility lapses");
            Settled::SettleFailed
        }
    }
}

async fn hand_back<Q: Queue>(
    queue: &Q,
    msg: &Message,
) -> (Result<(), crate::aws::AwsError>, Settled) {
    (
        retry(|| queue.set_visibility(&msg.receipt, 0)).await,
        Settled::HandedBack,
    )
}

/// Hands back messages that were received but never started.
pub async fn hand_back_unstarted<Q: Queue>(queue: &Q, msgs: &[Message]) -> usize {
    let mut ok = 0;
    for m in msgs {
        match retry(|| queue.set_visibility(&m.receipt, 0)).await {
            Ok(()) => ok += 1,
            Err(e) => {
                tracing::error!(message_id = %m.id, error = %e, "cannot hand back an unstarted message")
            }
        }
    }
    ok
}

async fn retry<F, Fut>(mut f: F) -> Result<(), crate::aws::AwsError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::aws::AwsError>>,
{
    let mut attempt = 1;
    loop {
        match f().await {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= SETTLE_ATTEMPTS => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, attempt, "retrying");
                // 100 ms, 200 ms: short, the deadline is close when this matters.
                tokio::time::sleep(Duration::from_millis(100) * attempt).await;
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stop_signal_fires_at_the_earliest_of_deadline_and_timeout() {
        let (tx, rx) = watch::channel(None);
        let start = Instant::now();
        let h = tokio::spawn(stop_signal(rx, Some(Duration::from_secs(100))));
        tokio::time::sleep(Duration::from_secs(5)).await;
        tx.send(Some(start + Duration::from_secs(30))).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        // A tighter deadline replaces the first one.
        tx.send(Some(start + Duration::from_secs(20))).unwrap();
        assert_eq!(h.await.unwrap(), StopReason::Deadline);
        assert_eq!(start.elapsed(), Duration::from_secs(20));

        let (_tx, rx) = watch::channel(None);
        let start = Instant::now();
        assert_eq!(
            stop_signal(rx, Some(Duration::from_secs(7))).await,
            StopReason::Timeout
        );
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn stop_signal_without_limits_never_fires() {
        let (tx, rx) = watch::channel(None::<Instant>);
        let r = tokio::time::timeout(Duration::from_secs(3600), stop_signal(rx, None)).await;
        assert!(r.is_err());
        drop(tx);
    }
}
