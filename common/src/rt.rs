//! How every spotguard binary starts: its log on stderr, a one-thread
//! runtime, and the SIGTERM/SIGINT that ends it.

use std::future::Future;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Logs on stderr, `RUST_LOG` filtering (default `info`): colour only on a
/// terminal (under systemd they land in the journal, where escape codes are
/// noise), JSON lines with `json`.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Runs `f` on a one-thread runtime: the binaries are I/O-bound, and the
/// agent's idle footprint matters on every worker (BUILD-NOTES.md: the
/// single-threaded runtime has the lowest RSS).
pub fn block_on<T, F: Future<Output = Result<T, BoxError>>>(f: F) -> Result<T, BoxError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?
        .block_on(f)
}

/// Installs the SIGTERM and SIGINT handlers; the returned future completes
/// on the first of them. Installing first means a failure is reported at
/// start, not when the signal comes. Call it inside the runtime.
pub fn shutdown_signal() -> Result<impl Future<Output = ()>, BoxError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot watch SIGINT: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_ends_the_shutdown_future_and_errors_pass_through() {
        let r = block_on(async {
            let stop = shutdown_signal()?;
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM)?;
            tokio::time::timeout(std::time::Duration::from_secs(5), stop)
                .await
                .map_err(|_| "no SIGTERM seen".into())
        });
        assert!(r.is_ok(), "{r:?}");
        let e = block_on::<(), _>(async { Err("boom".into()) }).unwrap_err();
        assert_eq!(e.to_string(), "boom");
    }
}
