//! Where decisions get the time from. Production reads the system clock;
//! tests and the simulation read [`TokioClock`], which advances with tokio's
//! clock, so under `tokio::time::pause()` virtual time is the only time and
//! a test of a 12-hour lease runs in milliseconds.

use chrono::{DateTime, Utc};

pub trait Clock: Send + Sync + 'static {
    /// Wall-clock time (UTC): notice times, deadlines, event times.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock. A spot `hibernate`/`stop` pause shows up here as a
/// jump forward, which the monotonic clock does not show.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// UTC derived from tokio's (possibly paused) clock: `start` plus the time
/// tokio says has passed since the clock was made.
#[derive(Debug, Clone)]
pub struct TokioClock {
    start: DateTime<Utc>,
    base: tokio::time::Instant,
}

impl TokioClock {
    pub fn new(start: DateTime<Utc>) -> TokioClock {
        TokioClock {
            start,
            base: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = tokio::time::Instant::now().duration_since(self.base);
        self.start + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_virtual_time() {
        let start = DateTime::parse_from_rfc3339("2026-11-28T08:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let c = TokioClock::new(start);
        assert_eq!(c.now(), start);
        tokio::time::advance(std::time::Duration::from_secs(43_200)).await;
        assert_eq!(c.now(), start + chrono::Duration::hours(12));
    }
}
