//! spotguard-agent: runs on every spot GPU worker.
//!
//! - [`imds`]: the IMDSv2 client (tokens, timeouts, faults never taken for notices).
//! - [`watch`]: polls the notice paths and emits each notice once.
//! - [`cli`]: the command line; `main.rs` only calls [`cli::main`].

pub mod cli;
pub mod imds;
pub mod watch;
