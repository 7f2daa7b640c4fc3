//! The interruption watcher: polls the four notice paths of IMDS, each on its
//! own interval and in its own task (a slow path never delays another), and
//! sends each notice once on a channel.

mod event;
mod tracker;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

pub use event::{Change, Detected, WatchEvent};
pub use tracker::{
    LifecycleTracker, Observed, Polled, RebalanceTracker, ScheduledTracker, SpotTracker,
    ASSUMED_NOTICE,
};

use crate::error_chain;
use crate::imds::{paths, ImdsClient};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchConfig {
    /// `spot/instance-action`. AWS suggests 5 s; 1 s keeps the median
    /// detection delay near 0.5 s of a 120 s notice for one cheap local call.
    pub spot_interval: Duration,
    /// `autoscaling/target-lifecycle-state`: 1 s like the spot path, since a
    /// scale-in decision should stop intake as promptly.
    pub lifecycle_interval: Duration,
    /// `events/recommendations/rebalance`: 5 s, AWS's suggested interval;
    /// a rebalance recommendation is advice, not a deadline.
    pub rebalance_interval: Duration,
    /// `events/maintenance/scheduled`: 60 s; such events are announced days
    /// ahead.
    pub scheduled_interval: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            spot_interval: Duration::from_secs(1),
            lifecycle_interval: Duration::from_secs(1),
            rebalance_interval: Duration::from_secs(5),
            scheduled_interval: Duration::from_secs(60),
        }
    }
}

/// One polled path and its tracker.
enum Source {
    Spot(SpotTracker),
    Rebalance(RebalanceTracker),
    Lifecycle(LifecycleTracker),
    Scheduled(ScheduledTracker),
}

impl Source {
    fn observe(&mut self, polled: Polled<'_>) -> Observed {
        match self {
            Source::Spot(t) => t.observe(polled, Utc::now()),
            Source::Rebalance(t) => t.observe(polled),
            Source::Lifecycle(t) => t.observe(polled),
            Source::Scheduled(t) => t.observe(polled),
        }
    }
}

/// Polls until `shutdown` completes or the receiver is dropped.
pub async fn run(
    client: Arc<ImdsClient>,
    cfg: WatchConfig,
    tx: mpsc::Sender<Detected>,
    shutdown: impl Future<Output = ()>,
) {
    let (ready, _) = tokio::sync::oneshot::channel();
    run_signalling(client, cfg, tx, ready, shutdown).await
}

/// As [`run`], and completes `ready` once the spot and lifecycle paths have
/// each answered once and whatever they showed has been sent on `tx`: the
/// agent takes no message before it knows whether a notice is already up
/// (a restart during a notice must not take work).
pub async fn run_signalling(
    client: Arc<ImdsClient>,
    cfg: WatchConfig,
    tx: mpsc::Sender<Detected>,
    ready: tokio::sync::oneshot::Sender<()>,
    shutdown: impl Future<Output = ()>,
) {
    let (first_tx, mut first_rx) = mpsc::channel::<()>(2);
    let gate = tokio::spawn(async move {
        for _ in 0..2 {
            if first_rx.recv().await.is_none() {
                return;
            }
        }
        let _ = ready.send(());
    });
    let sources = [
        (
            paths::SPOT_INSTANCE_ACTION,
            cfg.spot_interval,
            Source::Spot(Default::default()),
        ),
        (
            paths::TARGET_LIFECYCLE_STATE,
            cfg.lifecycle_interval,
            Source::Lifecycle(Default::default()),
        ),
        (
            paths::REBALANCE,
            cfg.rebalance_interval,
            Source::Rebalance(Default::default()),
        ),
        (
            paths::SCHEDULED_EVENTS,
            cfg.scheduled_interval,
            Source::Scheduled(Default::default()),
        ),
    ];
    let mut tasks = JoinSet::new();
    for (path, interval, source) in sources {
        let first =
            matches!(source, Source::Spot(_) | Source::Lifecycle(_)).then(|| first_tx.clone());
        tasks.spawn(poll_path(
            client.clone(),
            path,
            interval,
            source,
            tx.clone(),
            first,
        ));
    }
    drop((tx, first_tx));
    tokio::select! {
        _ = shutdown => {}
        // Every poller ends only when the receiver is gone.
        _ = async { while tasks.join_next().await.is_some() {} } => {}
    }
    tasks.abort_all();
    gate.abort();
}

async fn poll_path(
    client: Arc<ImdsClient>,
    path: &'static str,
    interval: Duration,
    mut source: Source,
    tx: mpsc::Sender<Detected>,
    mut first: Option<mpsc::Sender<()>>,
) {
    let mut ticker = tokio::time::interval(interval);
    // After a slow poll, wait a full interval rather than bursting.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stats = client.stats();
    let mut failing = false;
    loop {
        ticker.tick().await;
        let polled = match client.get(path).await {
            Ok(p) => {
                stats.last_answer_ms.store(
                    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0),
                    Ordering::Relaxed,
                );
                if failing {
                    tracing::info!(path, "IMDS answers again");
                    failing = false;
                }
                p
            }
            Err(e) => {
                // Logged and counted; never a notice. Warn on the first
                // failure of a run, then keep quiet until it recovers.
                if !failing {
                    tracing::warn!(path, error = %error_chain(&e), "IMDS poll failed; retrying next interval");
                } else {
                    tracing::debug!(path, error = %error_chain(&e), "IMDS poll failed again");
                }
                failing = true;
                continue;
            }
        };
        let detected_at = Utc::now();
        let observed = source.observe(polled.as_deref());
        if let Some(e) = &observed.parse_error {
            stats.parse_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(path, error = %e, "unreadable IMDS body");
        }
        for event in observed.events {
            tracing::info!(path, ?event, "notice");
            if tx.send(Detected { event, detected_at }).await.is_err() {
                return;
            }
        }
        if let Some(f) = first.take() {
            let _ = f.send(()).await;
        }
    }
}
