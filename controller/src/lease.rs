//! One controller acts at a time, without Lambda's reserved concurrency.
//!
//! The failover memory and the periodic tasks' slots live in group tags,
//! which are last-writer-wins: two controllers that read the same version
//! both act and both announce (two `run` replicas in a rolling deploy,
//! `once` beside the Lambda, two overlapping Lambda invocations). Reserved
//! concurrency 1 serialised the Lambda, but cannot deploy in accounts with a
//! low concurrency quota and throttles the one-minute tick exactly when
//! launch events crowd it.
//!
//! The lease is a token message in an SQS FIFO queue of its own. What SQS
//! guarantees (Developer Guide, "FIFO queue delivery logic"): while a
//! message of a message group is in flight, no other message of that group
//! is returned, and a received message is not returned again before its
//! visibility timeout ends. So whoever receives the token holds the lease
//! until it gives it back (visibility 0) or `hold` runs out (a holder that
//! died). Several tokens in the one group are harmless: only the head can
//! be in flight, so a token seeded twice never makes two holders.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::aws::{Cloud, CloudError};

/// The token's message group (one group: one holder).
pub const GROUP: &str = "spotguard-lease";

/// A token older than this is replaced when it is given back: SQS deletes
/// a message at the queue's retention period counted from its send (at
/// most 14 days, 4 by default), however often it is received.
pub const REFRESH_AFTER: chrono::Duration = chrono::Duration::hours(24);

/// The holder's work is cut this long before the lease's end (and before
/// a Lambda's deadline), so that nothing is written once another may take
/// the lease. The give-back after it needs one call's bound more
/// ([`Lease::budget`]).
pub const MARGIN: Duration = Duration::from_secs(5);

/// The lease while held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub receipt: String,
    /// When the token was sent (it is replaced after [`REFRESH_AFTER`]).
    pub sent: Option<DateTime<Utc>>,
    /// When SQS may hand the token to another.
    pub until: DateTime<Utc>,
}

impl Lease {
    /// How long the holder may still work: to the lease's end less
    /// [`MARGIN`] and one call's bound, so that the give-back
    /// ([`release`]) still lands inside the lease.
    pub fn budget(&self, now: DateTime<Utc>) -> Duration {
        (self.until - now)
            .to_std()
            .unwrap_or_default()
            .saturating_sub(MARGIN + crate::aws::CALL_TIMEOUT)
    }
}

/// An id no other controller makes: 128 bits from two hashers that the
/// standard library seeds from the operating system's randomness once per
/// process (`RandomState`), over the time and a counter. Time, pid and a
/// counter alone repeat across Lambda environments (the same pid, the
/// counter from 0 at a cold start), and a `ReceiveRequestAttemptId` used
/// twice returns the same message and receipt to both callers.
fn unique(prefix: &str, now: DateTime<Utc>) -> String {
    use std::hash::BuildHasher;
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let half = |salt: u8| {
        std::collections::hash_map::RandomState::new().hash_one((
            salt,
            now.timestamp_nanos_opt(),
            std::process::id(),
            n,
        ))
    };
    format!("{prefix}-{:016x}{:016x}", half(1), half(2))
}

/// How long an invocation waits for a lease another holds: a holder's
/// tick takes a few seconds (one bound, 10 s, when a region hangs), and a
/// tick that gave up at once lost its minute's decision and periodic
/// slots to whatever event invocation held the lease.
pub const WAIT: Duration = Duration::from_secs(10);

/// [`acquire`], tried again every second until `until` while another
/// holds the lease.
pub async fn acquire_waiting<C: Cloud>(
    cloud: &C,
    region: &str,
    url: &str,
    hold: Duration,
    clock: &dyn spotguard_common::clock::Clock,
    until: tokio::time::Instant,
) -> Result<Option<Lease>, CloudError> {
    loop {
        if let Some(l) = acquire(cloud, region, url, hold, clock.now()).await? {
            return Ok(Some(l));
        }
        if tokio::time::Instant::now() + Duration::from_secs(1) >= until {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Tries to take the lease: `Ok(None)` when another controller holds it.
/// A queue with no token at all (new, purged, or the token expired) gets
/// one, and is tried once more.
pub async fn acquire<C: Cloud>(
    cloud: &C,
    region: &str,
    url: &str,
    hold: Duration,
    now: DateTime<Utc>,
) -> Result<Option<Lease>, CloudError> {
    let visibility = i32::try_from(hold.as_secs()).unwrap_or(i32::MAX);
    let lease = |r: crate::aws::Received| Lease {
        receipt: r.receipt,
        sent: r.sent,
        until: now + chrono::Duration::from_std(hold).unwrap_or(chrono::Duration::MAX),
    };
    let attempt = unique("take", now);
    if let Some(r) = cloud.receive_one(region, url, visibility, &attempt).await? {
        return Ok(Some(lease(r)));
    }
    let (visible, in_flight) = cloud.queue_depth(region, url).await?;
    if visible + in_flight > 0 {
        return Ok(None);
    }
    tracing::info!(%url, "the lease queue holds no token: sending one");
    seed(cloud, region, url, now).await?;
    let attempt = unique("take", now);
    Ok(cloud
        .receive_one(region, url, visibility, &attempt)
        .await?
        .map(lease))
}

/// A token for an empty queue. Its deduplication id is the same for every
/// controller within a 5-minute bucket: two that find the queue empty at
/// once (the counts are approximate, up to a minute behind) make one
/// token, not two that would live for ever.
async fn seed<C: Cloud>(
    cloud: &C,
    region: &str,
    url: &str,
    now: DateTime<Utc>,
) -> Result<(), CloudError> {
    let dedup = format!("token-{}", now.timestamp().div_euclid(300));
    send_token(cloud, region, url, &dedup).await
}

async fn send_token<C: Cloud>(
    cloud: &C,
    region: &str,
    url: &str,
    dedup: &str,
) -> Result<(), CloudError> {
    cloud
        .send_message(
            region,
            url,
            "spotguard controller lease token",
            &BTreeMap::new(),
            Some((GROUP, dedup)),
        )
        .await
}

/// Gives the lease back: the token visible again at once, or, when it is
/// old, a new token sent and the old one deleted (in that order: a failure
/// in between leaves two tokens, which is harmless). A failed give-back
/// costs the others at most `hold`: the token comes back by itself.
///
/// Only while each call, at its bound ([`crate::aws::CALL_TIMEOUT`]),
/// still ends inside the lease: SQS says a change of visibility after the
/// timeout "might" fail, not that it will, so a give-back landing after
/// another controller took the token could free that one's hold. Too late
/// for that, the token is left to come back by itself.
pub async fn release<C: Cloud>(
    cloud: &C,
    region: &str,
    url: &str,
    lease: &Lease,
    now: DateTime<Utc>,
) {
    let call = chrono::Duration::from_std(crate::aws::CALL_TIMEOUT).unwrap_or_default();
    let left = lease.until - now;
    if left <= call {
        tracing::info!(until = %lease.until, "too near the lease's end to give it back safely: it frees itself");
        return;
    }
    if lease.sent.is_some_and(|s| now - s > REFRESH_AFTER) && left > call * 2 {
        let replaced = match send_token(cloud, region, url, &unique("token", now)).await {
            Ok(()) => cloud.delete_message(region, url, &lease.receipt).await,
            Err(e) => Err(e),
        };
        match replaced {
            Ok(()) => {
                tracing::info!("lease token replaced (older than a day)");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot replace the old lease token; giving it back as it is")
            }
        }
    }
    if let Err(e) = cloud
        .change_visibility(region, url, &lease.receipt, 0)
        .await
    {
        tracing::warn!(error = %e, until = %lease.until, "cannot give the lease back; it frees itself at its end");
    }
}

#[cfg(test)]
#[path = "lease_tests.rs"]
mod tests;
