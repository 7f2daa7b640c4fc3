//! spotguard-agent: runs on every spot GPU worker.
//!
//! - [`imds`]: the IMDSv2 client (tokens, timeouts, faults never taken for notices).
//! - [`watch`]: polls the notice paths and emits each notice once.
//! - [`cli`]: the command line; `main.rs` only calls [`cli::main`].

pub mod cli;
pub mod imds;
pub mod watch;

/// An error and its sources, outermost first: `a: b: c`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Some errors repeat their source in their own message.
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}
