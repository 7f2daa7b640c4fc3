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

use std::collections::BTreeMap;

use crate::aws::{Attr, Message, Outgoing, Queue};
use crate::worker::{
    Ended, JobFiles, JobNotice, Outcome, StopReason, Worker, CHECKPOINT_ATTR, FIRST_RECEIVED_ATTR,
    INTERRUPTIONS_ATTR, ORIGINAL_ID_ATTR,
};

/// How a message ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Deleted,
    /// Failed job: back after the error visibility timeout.
    Failed,
    /// Timed-out job: stopped, back after the error visibility timeout.
    TimedOut,
    /// Stopped by a drain, or gave its work back after a notice: back at once.
    HandedBack,
    /// As `HandedBack`, re-sent with the job's checkpoint reference.
    HandedOver,
    /// The settling call failed: the message comes back when its visibility
    /// lapses (a possible duplicate if the job had succeeded).
    SettleFailed,
    /// The job could not start (the agent's fault): handed back at once,
    /// not counted as a failure; the runner pauses intake.
    NotStarted,
}

#[derive(Debug, Clone)]
pub struct JobReport {
    pub message_id: String,
    /// The first message's id when this one was re-sent (a hand-over, an
    /// interruption): the same job across its copies.
    pub original_id: Option<String>,
    /// A heartbeat was refused as stale: another worker may run it too.
    pub lost_ownership: bool,
    pub outcome: Outcome,
    pub settled: Settled,
    pub ran_for: Duration,
}

pub struct JobCtx<Q, W> {
    pub queue: Arc<Q>,
    pub worker: Arc<W>,
    pub visibility: Duration,
    pub heartbeat: Duration,
    pub error_visibility: Duration,
    pub timeout: Option<Duration>,
    /// Largest checkpoint reference carried over (bytes).
    pub checkpoint_max: usize,
    /// A FIFO queue (its URL ends in `.fifo`): re-sent messages keep their
    /// group and get a derived deduplication id.
    pub fifo: bool,
    /// FIFO: carry a checkpoint over by re-sending, which puts the job at
    /// the tail of its group (`worker.fifo_resend_checkpoint`). Off, the
    /// message is handed back as it was and the group's order is kept.
    pub fifo_resend: bool,
    /// A job still running this long before the 12-hour cap is stopped,
    /// leaving time for its SIGTERM grace and the settle.
    pub lease_margin: Duration,
    /// The settle's budget after a stop at the drain deadline:
    /// [`SETTLE_BUDGET`], or less when the deadline margin left after the
    /// SIGTERM grace is shorter, so that the hand-back lands before the
    /// instance goes.
    pub deadline_settle_budget: Duration,
    /// `queue.max_interruptions`.
    pub max_interruptions: u32,
}

/// SQS keeps a message invisible at most 12 hours from its receipt
/// (REFERENCE.md, SQS); a `ChangeMessageVisibility` asking for more than
/// what is left is rejected, not clamped.
pub const MAX_INVISIBLE: Duration = Duration::from_secs(12 * 3600);

/// The visibility a heartbeat asks for: the configured one, but never past
/// the 12-hour cap counted from `received`.
pub fn heartbeat_visibility(visibility: Duration, received: Instant, now: Instant) -> Duration {
    let left = (received + MAX_INVISIBLE).saturating_duration_since(now);
    visibility.min(left)
}

/// Attempts for the settling call; each is itself retried by the SDK.
const SETTLE_ATTEMPTS: u32 = 3;

/// The whole settle (delete, hand-back or re-send, with every retry) ends
/// within this: the default deadline margin (25 s) minus the default
/// SIGTERM grace (10 s) leaves 15 s, and this leaves 5 s of that as slack.
/// A settle cut short leaves the message to come back when its visibility
/// lapses: a possible duplicate, never a loss.
pub const SETTLE_BUDGET: Duration = Duration::from_secs(10);

/// Completes at the drain deadline (`deadline` holds it once there is one)
/// or after `timeout`, whichever comes first.
async fn stop_signal(
    mut deadline: watch::Receiver<Option<Instant>>,
    timeout: Option<Duration>,
    lease_stop: Instant,
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
                    biased;
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
        biased;
        _ = timed_out => StopReason::Timeout,
        _ = drained => StopReason::Deadline,
        _ = tokio::time::sleep_until(lease_stop) => StopReason::LeaseLimit,
    }
}

pub async fn run_job<Q: Queue, W: Worker>(
    ctx: Arc<JobCtx<Q, W>>,
    msg: Message,
    deadline: watch::Receiver<Option<Instant>>,
    notices: watch::Receiver<Option<JobNotice>>,
) -> JobReport {
    let started = Instant::now();
    let files = match ctx.worker.state_dir() {
        Some(dir) => match JobFiles::create(dir, &msg.id, &msg.receipt, ctx.worker.job_group()) {
            Ok(f) => Some(f),
            Err(e) => {
                // The job still runs; it only cannot see notices or checkpoint.
                tracing::warn!(message_id = %msg.id, error = %e, "cannot create the job directory");
                None
            }
        },
        None => None,
    };
    // The receive answered just before the job was started: its time is
    // the receipt's, to within the margin's slack.
    let received = started;
    let lease_stop = (received + MAX_INVISIBLE)
        .checked_sub(ctx.lease_margin)
        .unwrap_or(received);
    let stop = stop_signal(deadline, ctx.timeout, lease_stop);
    let lost_flag = std::sync::atomic::AtomicBool::new(false);
    let heartbeat = async {
        let mut tick = tokio::time::interval_at(Instant::now() + ctx.heartbeat, ctx.heartbeat);
        let mut lost = false;
        loop {
            tick.tick().await;
            let vis = heartbeat_visibility(ctx.visibility, received, Instant::now());
            let secs = i32::try_from(vis.as_secs()).unwrap_or(i32::MAX);
            if secs == 0 || lost {
                continue;
            }
            // A transient failure is tried again within seconds, not at the
            // next tick: two missed heartbeats in a row (80 s of SQS errors
            // with the default timings) would let the lease lapse, and the
            // job would run twice (found by the simulation's faults).
            let mut attempt = 0u32;
            let answer = loop {
                match ctx.queue.set_visibility(&msg.receipt, secs).await {
                    Err(e) if attempt < HEARTBEAT_RETRIES && !lease_gone(&e) => {
                        attempt += 1;
                        tracing::warn!(message_id = %msg.id, error = %e, attempt, "visibility heartbeat failed; trying again");
                        tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
                    }
                    r => break r,
                }
            };
            match answer {
                Ok(()) => {}
                // The handle is stale or the lease lapsed: another consumer
                // may hold the message now. Said once, loudly.
                Err(e) if lease_gone(&e) => {
                    lost = true;
                    lost_flag.store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(message_id = %msg.id, error = %e, "lost ownership of the message: its lease lapsed or its handle is stale; another worker may run it");
                }
                Err(e) => {
                    tracing::warn!(message_id = %msg.id, error = %e, "visibility heartbeat failed")
                }
            }
        }
    };
    let ended = tokio::select! {
        biased;
        e = ctx.worker.run(&msg, files.as_ref(), notices, stop) => e,
        _ = heartbeat => Ended { outcome: unreachable_heartbeat(), checkpoint: None },
    };
    let ran_for = started.elapsed();
    let checkpoint = match (&ended.checkpoint, &files) {
        // From an http app's header: within checkpoint_max_bytes too.
        (Some(c), _) => match crate::worker::checkpoint_value(c.as_bytes(), ctx.checkpoint_max) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(message_id = %msg.id, error = %e, "checkpoint not carried over");
                None
            }
        },
        (None, Some(f)) => match f.checkpoint(ctx.checkpoint_max) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(message_id = %msg.id, error = %e, "checkpoint not carried over");
                None
            }
        },
        (None, None) => None,
    };
    let outcome = ended.outcome;
    let budget = if outcome == Outcome::Stopped(StopReason::Deadline) {
        ctx.deadline_settle_budget
    } else {
        SETTLE_BUDGET
    };
    let settled = match tokio::time::timeout(budget, settle(&ctx, &msg, &outcome, checkpoint)).await
    {
        Ok(s) => s,
        Err(_) => {
            tracing::error!(message_id = %msg.id, budget = ?budget, "settling took too long; the message returns when its visibility lapses");
            Settled::SettleFailed
        }
    };
    if let Some(f) = files.clone() {
        // Off the runtime's thread: a big tree takes a while to remove.
        let _ = tokio::task::spawn_blocking(move || f.remove()).await;
    }
    match settled {
        Settled::Deleted => {
            tracing::info!(message_id = %msg.id, ?ran_for, "job done; message deleted")
        }
        Settled::HandedBack => {
            tracing::info!(message_id = %msg.id, ?ran_for, ?outcome, "message handed back")
        }
        Settled::HandedOver => {
            tracing::info!(message_id = %msg.id, ?ran_for, ?outcome, "message handed over with the job's checkpoint")
        }
        _ => tracing::warn!(message_id = %msg.id, ?outcome, ?settled, "job did not succeed"),
    }
    let lost_ownership = lost_flag.load(std::sync::atomic::Ordering::Relaxed);
    if lost_ownership && settled == Settled::Deleted {
        tracing::warn!(message_id = %msg.id, "deleted after ownership was lost: another worker may have run this job too");
    }
    JobReport {
        original_id: msg
            .attributes
            .get(ORIGINAL_ID_ATTR)
            .map(|a| a.value.clone()),
        message_id: msg.id,
        lost_ownership,
        outcome,
        settled,
        ran_for,
    }
}

/// The heartbeat loop never ends; this keeps the select total without a panic.
fn unreachable_heartbeat() -> Outcome {
    Outcome::Failed("heartbeat loop ended".into())
}

async fn settle<Q: Queue, W>(
    ctx: &JobCtx<Q, W>,
    msg: &Message,
    outcome: &Outcome,
    checkpoint: Option<String>,
) -> Settled {
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
        Outcome::NotStarted(_) => (
            retry(|| ctx.queue.set_visibility(&msg.receipt, 0)).await,
            Settled::NotStarted,
        ),
        Outcome::Stopped(StopReason::Timeout) => (
            retry(|| ctx.queue.set_visibility(&msg.receipt, err_secs)).await,
            Settled::TimedOut,
        ),
        Outcome::Stopped(StopReason::LeaseLimit) => {
            // FIFO: a re-send reorders the group; only when opted in.
            let checkpoint = checkpoint.filter(|_| !ctx.fifo || ctx.fifo_resend);
            if let Some(c) = checkpoint {
                match resend(ctx, msg, Some(&c), false).await {
                    Ok(()) => return Settled::HandedOver,
                    Err(e) => {
                        tracing::warn!(message_id = %msg.id, error = %e, "checkpoint not carried over")
                    }
                }
            }
            tracing::error!(message_id = %msg.id, "the job ran into SQS's 12-hour visibility cap without a checkpoint: stopped as failed (write checkpoints, or split the job)");
            (
                retry(|| ctx.queue.set_visibility(&msg.receipt, err_secs)).await,
                Settled::TimedOut,
            )
        }
        Outcome::Stopped(StopReason::Deadline) | Outcome::Yielded(_) => {
            let checkpoint = match checkpoint {
                Some(_) if ctx.fifo && !ctx.fifo_resend => {
                    tracing::warn!(message_id = %msg.id, "FIFO queue: checkpoint not carried over, to keep the group's order (worker.fifo_resend_checkpoint opts in)");
                    None
                }
                c => c,
            };
            // Not the message's fault: re-sent with the interruption
            // counted, so it keeps its receives, up to max_interruptions.
            let n = interruptions(msg);
            let count = n < ctx.max_interruptions && (!ctx.fifo || ctx.fifo_resend);
            if let Some(c) = checkpoint {
                match resend(ctx, msg, Some(&c), count).await {
                    Ok(()) => return Settled::HandedOver,
                    Err(e) => {
                        tracing::warn!(message_id = %msg.id, error = %e, "checkpoint not carried over; handing the message back as it was")
                    }
                }
            } else if count {
                match resend(ctx, msg, None, true).await {
                    Ok(()) => return Settled::HandedBack,
                    Err(e) => {
                        tracing::warn!(message_id = %msg.id, error = %e, "cannot re-send the interrupted job; handing the message back (one more receive)")
                    }
                }
            } else if n >= ctx.max_interruptions && ctx.max_interruptions > 0 {
                tracing::warn!(message_id = %msg.id, interruptions = n, "interrupted queue.max_interruptions times: handed back as any message, its receives count again");
            }
            (
                retry(|| ctx.queue.set_visibility(&msg.receipt, 0)).await,
                Settled::HandedBack,
            )
        }
    };
    match result {
        Ok(()) => ok,
        Err(e) => {
            tracing::error!(message_id = %msg.id, error = %e, "cannot settle the message; it returns when its visibility lapses");
            Settled::SettleFailed
        }
    }
}

/// SQS limits (developer guide): at most 10 message attributes, and body
/// plus attributes (names, types, values) at most 256 KiB.
const MAX_ATTRIBUTES: usize = 10;
const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// 64-bit FNV-1a: a stable digest for deduplication ids (not security).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The interruptions a message has been re-sent for (0 when not).
pub fn interruptions(msg: &Message) -> u32 {
    msg.attributes
        .get(INTERRUPTIONS_ATTR)
        .and_then(|a| a.value.trim().parse().ok())
        .unwrap_or(0)
}

/// The message that carries `checkpoint` to the next worker, or why it cannot be sent.
pub fn hand_over_message(msg: &Message, checkpoint: &str, fifo: bool) -> Result<Outgoing, String> {
    resend_message(msg, Some(checkpoint), fifo, false)
}

/// The copy of `msg` that goes back on the queue in its place: with
/// `checkpoint`, and with one more interruption counted if `interrupted`.
pub fn resend_message(
    msg: &Message,
    checkpoint: Option<&str>,
    fifo: bool,
    interrupted: bool,
) -> Result<Outgoing, String> {
    let mut attributes: BTreeMap<String, Attr> = msg.attributes.clone();
    if let Some(c) = checkpoint {
        attributes.insert(CHECKPOINT_ATTR.into(), Attr::string(c));
    }
    let count = interruptions(msg) + u32::from(interrupted);
    if interrupted {
        attributes.insert(INTERRUPTIONS_ATTR.into(), Attr::string(count.to_string()));
    }
    attributes
        .entry(ORIGINAL_ID_ATTR.into())
        .or_insert_with(|| Attr::string(msg.id.clone()));
    if let Some(ms) = msg.first_received_ms {
        if let Some(t) = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms) {
            attributes
                .entry(FIRST_RECEIVED_ATTR.into())
                .or_insert_with(|| {
                    Attr::string(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                });
        }
    }
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(format!(
            "the message would carry {} attributes; SQS allows {MAX_ATTRIBUTES}",
            attributes.len()
        ));
    }
    let size = msg.body.len()
        + attributes
            .iter()
            .map(|(k, a)| k.len() + a.size())
            .sum::<usize>();
    if size > MAX_MESSAGE_BYTES {
        return Err(format!(
            "the message would be {size} bytes; SQS allows {MAX_MESSAGE_BYTES}"
        ));
    }
    let (group_id, dedup_id) = if fifo {
        let group = msg
            .group_id
            .clone()
            .ok_or_else(|| "a FIFO message without MessageGroupId".to_string())?;
        // The same message and checkpoint always give the same id, so a
        // retried send inside SQS's 5-minute window makes no second copy.
        (
            Some(group),
            Some(format!(
                "sg-{:016x}",
                fnv1a(&[&msg.id, checkpoint.unwrap_or(""), &count.to_string()])
            )),
        )
    } else {
        (None, None)
    };
    Ok(Outgoing {
        body: msg.body.clone(),
        attributes,
        group_id,
        dedup_id,
    })
}

/// Re-sends the message (with the checkpoint, with the interruption
/// counted), then deletes the original. The original is deleted only after
/// the send succeeded: if the send fails, the caller hands the original
/// back as it was (at least once).
async fn resend<Q: Queue, W>(
    ctx: &JobCtx<Q, W>,
    msg: &Message,
    checkpoint: Option<&str>,
    interrupted: bool,
) -> Result<(), String> {
    let out = resend_message(msg, checkpoint, ctx.fifo, interrupted)?;
    let mut attempt = 1;
    let new_id = loop {
        match ctx.queue.send(&out).await {
            Ok(id) => break id,
            // Retrying is safe only where SQS deduplicates (FIFO); on a
            // standard queue a retry after an unseen success would duplicate,
            // which at-least-once allows but we avoid: one attempt there.
            Err(e) if ctx.fifo && attempt < SETTLE_ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "re-send failed; retrying");
                tokio::time::sleep(Duration::from_millis(100) * attempt).await;
                attempt += 1;
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    tracing::info!(message_id = %msg.id, %new_id, checkpoint = checkpoint.is_some(), interrupted, "re-sent in place of the original");
    if let Err(e) = retry(|| ctx.queue.delete(&msg.receipt)).await {
        // Both copies exist now; the original returns after its visibility
        // timeout and runs again: a duplicate, never a loss.
        tracing::error!(message_id = %msg.id, error = %e, "cannot delete the original after the re-send");
    }
    Ok(())
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

/// Quick retries of a failed heartbeat (1, 2 and 4 s later): all within
/// the margin a heartbeat leaves (two thirds of the visibility timeout).
const HEARTBEAT_RETRIES: u32 = 3;

/// The heartbeat's answer when the lease is gone: the handle is stale or the
/// message no longer in flight (another consumer may hold it).
///
/// SQS answers `InvalidParameterValue` ("Message does not exist or is not
/// available for visibility timeout change") for a message someone else
/// received since, and OK for an expired handle nobody took; moto answers
/// `ReceiptHandleIsInvalid` or `MessageNotInflight` (REFERENCE.md). The
/// same code with another text is the 12-hour cap, which is not this.
fn lease_gone(e: &crate::aws::AwsError) -> bool {
    match e.code.as_deref() {
        Some(
            "ReceiptHandleIsInvalid"
            | "MessageNotInflight"
            | "AWS.SimpleQueueService.MessageNotInflight",
        ) => true,
        Some("InvalidParameterValue") => {
            e.message
                .contains("not available for visibility timeout change")
                || e.message.contains("Message does not exist")
        }
        _ => false,
    }
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

    fn msg(fifo_group: Option<&str>) -> Message {
        Message {
            id: "6d0c1b4e-0000-4000-8000-000000000001".into(),
            receipt: "r".into(),
            body: "{\"job\": 1}".into(),
            receive_count: 1,
            first_received_ms: Some(1_800_000_000_000),
            attributes: [("customer".to_string(), Attr::string("acme"))]
                .into_iter()
                .collect(),
            group_id: fifo_group.map(str::to_string),
            sender_id: None,
            sent_ms: None,
        }
    }

    fn aws(code: &str, message: &str) -> crate::aws::AwsError {
        crate::aws::AwsError {
            op: "ChangeMessageVisibility",
            code: Some(code.into()),
            message: message.into(),
            resource: None,
            region: None,
        }
    }

    #[test]
    fn the_lease_is_gone_only_on_the_answers_that_say_so() {
        for (code, text, gone) in [
            ("ReceiptHandleIsInvalid", "", true),
            ("MessageNotInflight", "", true),
            ("AWS.SimpleQueueService.MessageNotInflight", "", true),
            ("InvalidParameterValue", "Value r for parameter ReceiptHandle is invalid. Reason: Message does not exist or is not available for visibility timeout change.", true),
            ("InvalidParameterValue", "Message does not exist", true),
            // The same code for the 12-hour cap: not a lost lease.
            ("InvalidParameterValue", "Value 43300 for parameter VisibilityTimeout is invalid. Reason: Total VisibilityTimeout for the message is beyond the limit [43200 seconds]", false),
            ("ServiceUnavailable", "", false),
            ("ThrottlingException", "Rate exceeded", false),
        ] {
            assert_eq!(lease_gone(&aws(code, text)), gone, "{code} {text}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_settle_call_is_tried_three_times_100_then_200_ms_apart() {
        for (failures, ok) in [(2, true), (3, false)] {
            let calls = std::sync::Mutex::new(Vec::new());
            let t0 = tokio::time::Instant::now();
            let r = retry(|| {
                let mut c = calls.lock().unwrap();
                c.push(t0.elapsed());
                let n = c.len();
                async move {
                    if n <= failures {
                        Err(aws("ServiceUnavailable", ""))
                    } else {
                        Ok(())
                    }
                }
            })
            .await;
            assert_eq!(r.is_ok(), ok, "{failures} failures");
            let c = calls.into_inner().unwrap();
            assert_eq!(
                c,
                [
                    Duration::ZERO,
                    Duration::from_millis(100),
                    Duration::from_millis(300)
                ],
                "{failures} failures"
            );
        }
    }

    #[test]
    fn fnv1a_separates_parts_and_matches_its_vector() {
        // Computed independently (each part followed by a 0 byte).
        assert_eq!(fnv1a(&["spotguard", "m-1"]), 0xd5ad_13db_c315_eec9);
        assert_ne!(fnv1a(&["ab", "c"]), fnv1a(&["a", "bc"]));
    }

    #[test]
    fn a_re_sent_message_is_held_to_sqs_limits_to_the_attribute_and_the_byte() {
        // 10 attributes pass, 11 are refused: customer, six more, and the
        // checkpoint, the original id and the interruptions added.
        let mut m = msg(None);
        m.first_received_ms = None;
        for i in 0..6 {
            m.attributes.insert(format!("a{i}"), Attr::string("x"));
        }
        assert!(resend_message(&m, Some("c"), false, true).is_ok());
        m.attributes.insert("a6".into(), Attr::string("x"));
        let e = resend_message(&m, Some("c"), false, true).unwrap_err();
        assert!(e.contains("11 attributes"), "{e}");
        // 256 KiB: the body and each attribute's name, type and value.
        let mut m = msg(None);
        m.first_received_ms = None;
        m.attributes.clear();
        let original = ORIGINAL_ID_ATTR.len() + "String".len() + m.id.len();
        m.body = "x".repeat(MAX_MESSAGE_BYTES - original);
        assert!(resend_message(&m, None, false, false).is_ok());
        m.body.push('x');
        let e = resend_message(&m, None, false, false).unwrap_err();
        assert!(
            e.contains(&format!(
                "{} bytes; SQS allows 262144",
                MAX_MESSAGE_BYTES + 1
            )),
            "{e}"
        );
    }

    #[test]
    fn hand_over_message_carries_checkpoint_origin_and_group() {
        let m = hand_over_message(&msg(None), "s3://b/ckpt-7", false).unwrap();
        assert_eq!(m.body, "{\"job\": 1}");
        assert_eq!(m.attributes[CHECKPOINT_ATTR].value, "s3://b/ckpt-7");
        assert_eq!(
            m.attributes[ORIGINAL_ID_ATTR].value,
            "6d0c1b4e-0000-4000-8000-000000000001"
        );
        assert_eq!(
            m.attributes[FIRST_RECEIVED_ATTR].value,
            "2027-01-15T08:00:00.000Z"
        );
        assert_eq!(m.attributes["customer"].value, "acme");
        assert_eq!((m.group_id, m.dedup_id), (None, None));
        // FIFO: same group; the same checkpoint gives the same dedup id, another a different one.
        let a = hand_over_message(&msg(Some("g1")), "s3://b/ckpt-7", true).unwrap();
        let b = hand_over_message(&msg(Some("g1")), "s3://b/ckpt-7", true).unwrap();
        let c = hand_over_message(&msg(Some("g1")), "s3://b/ckpt-8", true).unwrap();
        assert_eq!(a.group_id.as_deref(), Some("g1"));
        assert_eq!(a.dedup_id, b.dedup_id);
        assert_ne!(a.dedup_id, c.dedup_id);
        assert!(a.dedup_id.unwrap().len() <= 128);
    }

    #[test]
    fn binary_attributes_survive_a_hand_over_and_count_toward_the_limit() {
        let mut m = msg(None);
        m.attributes.insert(
            "blob".into(),
            Attr::binary("Binary", vec![0, 159, 146, 150]),
        );
        let out = hand_over_message(&m, "c", false).unwrap();
        assert_eq!(
            out.attributes["blob"].binary.as_deref(),
            Some(&[0u8, 159, 146, 150][..])
        );
        assert_eq!(out.attributes["blob"].data_type, "Binary");
        let mut big = msg(None);
        big.attributes.insert(
            "blob".into(),
            Attr::binary("Binary", vec![7; MAX_MESSAGE_BYTES]),
        );
        assert!(hand_over_message(&big, "c", false)
            .unwrap_err()
            .contains("bytes"));
    }

    #[test]
    fn a_second_hand_over_keeps_the_first_origin() {
        let mut m = msg(None);
        m.attributes
            .insert(ORIGINAL_ID_ATTR.into(), Attr::string("first-id"));
        m.attributes.insert(
            FIRST_RECEIVED_ATTR.into(),
            Attr::string("2026-01-01T00:00:00.000Z"),
        );
        let out = hand_over_message(&m, "c2", false).unwrap();
        assert_eq!(out.attributes[ORIGINAL_ID_ATTR].value, "first-id");
        assert_eq!(
            out.attributes[FIRST_RECEIVED_ATTR].value,
            "2026-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn limits_are_checked() {
        let mut m = msg(None);
        for i in 0..8 {
            m.attributes.insert(format!("a{i}"), Attr::string("x"));
        }
        assert!(hand_over_message(&m, "c", false)
            .unwrap_err()
            .contains("attributes"));
        let mut big = msg(None);
        big.body = "x".repeat(MAX_MESSAGE_BYTES);
        assert!(hand_over_message(&big, "c", false)
            .unwrap_err()
            .contains("bytes"));
        assert!(hand_over_message(&msg(None), "c", true)
            .unwrap_err()
            .contains("MessageGroupId"));
    }

    #[tokio::test(start_paused = true)]
    async fn stop_signal_fires_at_the_earliest_of_deadline_and_timeout() {
        let (tx, rx) = watch::channel(None);
        let start = Instant::now();
        let far = start + Duration::from_secs(86_400);
        let h = tokio::spawn(stop_signal(rx, Some(Duration::from_secs(100)), far));
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
            stop_signal(rx, Some(Duration::from_secs(7)), far).await,
            StopReason::Timeout
        );
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_never_ask_past_the_12_hour_cap() {
        let t0 = Instant::now();
        let vis = Duration::from_secs(60);
        assert_eq!(
            heartbeat_visibility(vis, t0, t0 + Duration::from_secs(3600)),
            vis
        );
        let near = t0 + MAX_INVISIBLE - Duration::from_secs(25);
        assert_eq!(heartbeat_visibility(vis, t0, near), Duration::from_secs(25));
        assert_eq!(
            heartbeat_visibility(vis, t0, t0 + MAX_INVISIBLE * 2),
            Duration::ZERO
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stop_signal_without_limits_never_fires() {
        let (tx, rx) = watch::channel(None::<Instant>);
        let far = Instant::now() + Duration::from_secs(86_400);
        let r = tokio::time::timeout(Duration::from_secs(3600), stop_signal(rx, None, far)).await;
        assert!(r.is_err());
        drop(tx);
    }
}
