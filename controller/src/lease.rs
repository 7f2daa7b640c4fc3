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

/// The lease is held this much less than its visibility timeout, so that
/// the holder's work (cut at [`Lease::budget`]) ends before another can
/// take it; one SDK call's bound ([`crate::aws::CALL_TIMEOUT`]) covers the
/// give-back that may still be on its way.
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
    /// How long the holder may still work.
    pub fn budget(&self, now: DateTime<Utc>) -> Duration {
        (self.until - now)
            .to_std()
            .unwrap_or_default()
            .saturating_sub(MARGIN)
    }
}

/// Unique within the process and across processes (the time and the pid):
/// an id reused within SQS's 5-minute deduplication interval would make a
/// new token a duplicate, accepted and dropped.
fn unique(prefix: &str, now: DateTime<Utc>) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        now.timestamp_millis(),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
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

async fn seed<C: Cloud>(
    cloud: &C,
    region: &str,
    url: &str,
    now: DateTime<Utc>,
) -> Result<(), CloudError> {
    let dedup = unique("token", now);
    cloud
        .send_message(
            region,
            url,
            "spotguard controller lease token",
            &BTreeMap::new(),
            Some((GROUP, &dedup)),
        )
        .await
}

/// Gives the lease back: the token visible again at once, or, when it is
/// old, a new token sent and the old one deleted (in that order: a failure
/// in between leaves two tokens, which is harmless). A failed give-back
/// costs the others at most `hold`: the token comes back by itself.
pub async fn release<C: Cloud>(
    cloud: &C,
    region: &str,
    url: &str,
    lease: &Lease,
    now: DateTime<Utc>,
) {
    if lease.sent.is_some_and(|s| now - s > REFRESH_AFTER) {
        let replaced = match seed(cloud, region, url, now).await {
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
