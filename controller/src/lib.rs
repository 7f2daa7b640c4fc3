//! spotguard-controller: keeps a queue-driven spot GPU fleet running across
//! two regions.
//!
//! - [`reconcile`]: the pure failover decision (modes, gate, memory in tags).
//! - [`metrics`]: the backlog metrics target tracking scales on.
//! - [`events`]: EventBridge envelopes and launch outcomes.
//! - [`aws`]: the AWS calls behind the [`aws::Cloud`] trait, and its SDK implementation.
//! - `fakes` (tests, feature `test-util`): an in-memory `Cloud`.
//! - [`handler`]: one invocation (an event and/or a tick) over a `Cloud`.
//! - [`lease`]: one controller acting at a time (an SQS FIFO token).
//! - [`setup`]: creating the target-tracking policies.
//! - [`config`], [`cli`]: configuration and command line.

pub mod aws;
pub mod cli;
pub mod config;
pub mod cron;
pub mod events;
#[cfg(any(test, feature = "test-util"))]
pub mod fakes;
pub mod handler;
pub mod lease;
pub mod liveness;
pub mod metrics;
pub mod reconcile;
pub mod setup;
