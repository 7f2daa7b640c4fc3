//! Command line of `spotguard-agent`.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::sync::mpsc;

use crate::error_chain;
use crate::imds::{ImdsClient, ImdsConfig, DEFAULT_ENDPOINT};
use crate::watch::{self, WatchConfig};

#[derive(Debug, Parser)]
#[command(
    name = "spotguard-agent",
    version,
    about = "Spot-aware SQS job runner for EC2 GPU workers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch IMDS for interruption notices and print one JSON line per notice.
    Watch(WatchArgs),
}

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// IMDS base URI.
    #[arg(long, env = "AWS_EC2_METADATA_SERVICE_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub imds_endpoint: String,
    /// Interval of the spot-notice and lifecycle-state polls.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub poll_interval: Duration,
    /// Interval of the rebalance-recommendation poll.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub rebalance_interval: Duration,
    /// Interval of the scheduled-maintenance-events poll.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub scheduled_interval: Duration,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parses `30s`, `5m`, `250ms`; zero is refused (a zero interval would spin).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 30s or 5m: {e}"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be greater than zero"));
    }
    Ok(d)
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Watch(args) => {
            init_logging(args.log_format);
            run_async(watch_command(args))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spotguard-agent: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;


fn run_async<F: std::future::Future<Output = Result<(), BoxError>>>(f: F) -> Result<(), BoxError> {
    // One thread: the agent is I/O-bound and its idle footprint matters on
    // every worker (BUILD-NOTES.md: single-threaded runtime, lowest RSS).
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?
        .block_on(f)
}

/// Installs SIGINT and SIGTERM handlers; the returned future completes on
/// the first of them. Installing first means a failure is reported at start.
pub fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, BoxError> {
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

async fn watch_command(args: WatchArgs) -> Result<(), BoxError> {
    let client = Arc::new(ImdsClient::new(ImdsConfig {
        endpoint: args.imds_endpoint,
        ..Default::default()
    })?);
    let cfg = WatchConfig {
        spot_interval: args.poll_interval,
        lifecycle_interval: args.poll_interval,
        rebalance_interval: args.rebalance_interval,
        scheduled_interval: args.scheduled_interval,
    };
    tracing::info!(endpoint = client.endpoint(), ?cfg, "watching IMDS");
    let (tx, mut rx) = mpsc::channel(16);
    // The watcher stops on a signal; its senders then drop and the printer
    // ends after writing every event already detected.
    let watcher = watch::run(client, cfg, tx, shutdown_signal()?);
    let printer = async {
        let mut stdout = std::io::stdout().lock();
        while let Some(d) = rx.recv().await {
            let line =
                serde_json::to_string(&d).map_err(|e| format!("cannot encode event: {e}"))?;
            writeln!(stdout, "{line}")
                .and_then(|_| stdout.flush())
                .map_err(|e| format!("cannot write to stdout: {e}"))?;
        }
        Ok::<(), BoxError>(())
    };
    tokio::join!(watcher, printer).1
}
