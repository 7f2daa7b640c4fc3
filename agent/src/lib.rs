//! spotguard-agent: runs on every spot GPU worker.
//!
//! - [`imds`]: the IMDSv2 client (tokens, timeouts, faults never taken for notices).
//! - [`watch`]: polls the notice paths and emits each notice once.
//! - [`state`]: the agent's modes and their pure transitions (drain, scale-in).
//! - [`runner`]: the event loop that carries the transitions out.
//! - [`job`]: one job, from receipt to a deleted or handed-back message.
//! - [`worker`]: exec and http (sqsd) hand-off of a message to the worker.
//! - [`aws`]: the SQS and Auto Scaling calls behind small traits.
//! - `fakes` (tests, feature `test-util`): in-memory SQS, Auto Scaling and worker.
//! - [`health`]: the worker-health checks (`health.command`, [`gpu`]).
//! - [`gpu`]: the built-in GPU checks (count, nvidia-smi answering, ECC, Xid).
//! - [`config`], [`status`], [`notify`], [`cli`]: file, endpoint, SNS/hook, command line.

pub mod aws;
pub mod cli;
pub mod config;
#[cfg(any(test, feature = "test-util"))]
pub mod fakes;
pub mod gpu;
pub mod health;
pub mod imds;
pub mod job;
pub mod jobuser;
pub mod notify;
pub mod runner;
pub mod state;
pub mod status;
pub mod watch;
pub mod worker;

pub use spotguard_common::config::error_chain;
