//! Command line of `spotguard-controller`. `main.rs` only calls [`main`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use spotguard_common::config::error_chain;

use crate::aws::{SdkCloud, SqsEvents};
use crate::config::Config;
use crate::handler::Controller;

#[derive(Debug, Parser)]
#[command(
    name = "spotguard-controller",
    version,
    about = "Backlog metric and cross-region spot failover for a queue-driven GPU fleet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// TOML configuration; without it, SPOTGUARD_* environment variables.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the AWS Lambda runtime API (provided.al2023); configuration from the environment.
    Lambda,
    /// Loop: every run.interval publish the metrics, read events, reconcile.
    Run(ConfigArg),
    /// One tick (publish the metrics, reconcile), after handling --event if given.
    Once {
        #[command(flatten)]
        config: ConfigArg,
        /// An EventBridge event (JSON file) to handle first.
        #[arg(long)]
        event: Option<PathBuf>,
    },
    /// Print the mode, the groups' counts and the plan, changing nothing.
    Status(ConfigArg),
    /// Check the configuration (exit 2 naming what is wrong), including
    /// that the Lambda's environment for it fits Lambda's 4 KB.
    CheckConfig(ConfigArg),
    /// Create or update the target-tracking policies of both groups.
    Setup {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the plan only.
        #[arg(long)]
        dry_run: bool,
    },
}

use spotguard_common::rt::BoxError;

fn load(arg: &ConfigArg) -> Result<Config, crate::config::ConfigError> {
    match &arg.config {
        Some(p) => Config::load(p),
        None => Config::from_env(std::env::vars()),
    }
}

/// Lambda ships logs to CloudWatch: JSON there, text elsewhere.
fn init_logging() {
    spotguard_common::rt::init_logging(std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some());
}

/// Lambda's provided.al2023 runtime executes `./bootstrap` without
/// arguments: the binary packaged under that name serves Lambda.
fn parse_cli() -> Cli {
    let mut args = std::env::args_os();
    let argv0 = args.next();
    let invoked_as_bootstrap = argv0
        .as_deref()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "bootstrap");
    if invoked_as_bootstrap && args.next().is_none() {
        return Cli {
            command: Command::Lambda,
        };
    }
    Cli::parse()
}

pub fn main() -> ExitCode {
    let cli = parse_cli();
    init_logging();
    let cfg_arg = match &cli.command {
        Command::Lambda => ConfigArg { config: None },
        Command::Run(c) | Command::Status(c) | Command::CheckConfig(c) => ConfigArg {
            config: c.config.clone(),
        },
        Command::Once { config, .. } | Command::Setup { config, .. } => ConfigArg {
            config: config.config.clone(),
        },
    };
    let cfg = match load(&cfg_arg) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("spotguard-controller: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    if matches!(cli.command, Command::CheckConfig(_)) {
        return match cfg.check_lambda_environment() {
            Ok(size) => {
                println!(
                    "configuration ok; the Lambda's environment is {size} of {} bytes",
                    crate::config::LAMBDA_ENV_LIMIT
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("spotguard-controller: {e}");
                ExitCode::from(2)
            }
        };
    }
    match spotguard_common::rt::block_on(dispatch(cli.command, cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spotguard-controller: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn controller(cfg: Config) -> Controller<SdkCloud> {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await;
    let queue_region = cfg.queue_region();
    let mut regions: Vec<&str> = cfg.groups().map(|(r, _)| r).collect();
    regions.push(queue_region.as_str());
    // The SNS topic may live in a third region.
    let topic_region = cfg
        .notify
        .sns_topic_arn
        .as_deref()
        .and_then(spotguard_common::region::arn_region);
    if let Some(r) = topic_region.as_deref() {
        regions.push(r);
    }
    let lease_region = cfg.lease.queue_url.as_deref().map(|u| {
        spotguard_common::region::queue_url_region(u).unwrap_or_else(|| cfg.primary.region.clone())
    });
    if let Some(r) = lease_region.as_deref() {
        regions.push(r);
    }
    let cloud = SdkCloud::new(&sdk, &regions);
    Controller {
        cfg,
        cloud,
        clock: Arc::new(spotguard_common::clock::SystemClock),
    }
}

fn print(v: &impl serde::Serialize) -> Result<(), BoxError> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn dispatch(cmd: Command, cfg: Config) -> Result<(), BoxError> {
    match cmd {
        Command::Lambda => lambda(controller(cfg).await).await,
        Command::Run(_) => run_loop(controller(cfg).await).await,
        Command::Once { event, .. } => {
            let c = controller(cfg).await;
            let mut out = serde_json::Map::new();
            if let Some(path) = event {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let v: Value = serde_json::from_str(&text)
                    .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
                let r = c.handle_event(&v).await?;
                out.insert("event".into(), serde_json::to_value(r)?);
            }
            out.insert("tick".into(), serde_json::to_value(c.leased_tick().await?)?);
            print(&out)
        }
        Command::CheckConfig(_) => Ok(()),
        Command::Status(_) => {
            let c = controller(cfg).await;
            print(&crate::handler::status(&c).await?)
        }
        Command::Setup { dry_run, .. } => {
            let c = controller(cfg).await;
            let changes = crate::setup::setup(&c.cloud, &c.cfg, dry_run).await?;
            for ch in &changes {
                let verb = match (dry_run, ch.change) {
                    (true, "create") => "would create",
                    (true, "update") => "would update",
                    (false, "create") => "created",
                    (false, "update") => "updated",
                    _ => "unchanged",
                };
                println!(
                    "{verb}: {} / {} policy {} target {} on {}",
                    ch.region, ch.group, ch.policy, ch.target, ch.metric
                );
            }
            Ok(())
        }
    }
}

/// Launch events are acknowledged even when an AWS call fails: the next
/// tick (one minute later, with the scaling activities polled again)
/// recovers, so Lambda's retries never pile up. A scheduled tick that fails
/// is a function error, so that Lambda's `Errors` metric, and the
/// template's controller-errors alarm on it, see AWS and IAM failures (an
/// unreadable group, a denied call, a region impaired) instead of a
/// success; Lambda's own retry of it is one more idempotent tick.
async fn lambda(c: Controller<SdkCloud>) -> Result<(), BoxError> {
    warn_unguarded(&c.cfg);
    let c = Arc::new(c);
    lambda_runtime::run(lambda_runtime::service_fn(
        move |ev: lambda_runtime::LambdaEvent<Value>| {
            let c = c.clone();
            async move {
                let scheduled = matches!(
                    crate::events::parse(&ev.payload, &c.cfg.failover_codes()),
                    Ok(crate::events::Event::Tick)
                );
                // The invocation's deadline (milliseconds since the epoch),
                // as time left on tokio's clock.
                let left = i128::from(ev.context.deadline)
                    - i128::from(chrono::Utc::now().timestamp_millis());
                // Already past (clocks apart): no time at all, not none.
                let ms = u64::try_from(left.max(0)).unwrap_or(u64::MAX);
                let deadline =
                    Some(tokio::time::Instant::now() + std::time::Duration::from_millis(ms));
                match c.handle_event_by(&ev.payload, deadline).await {
                    Ok(Some(r)) => Ok(json!({"handled": true, "mode": r.reconcile.mode})),
                    Ok(None) => Ok(json!({"handled": false})),
                    Err(e) if scheduled => {
                        tracing::error!(error = %e, "the scheduled tick failed");
                        Err(lambda_runtime::Error::from(format!("tick failed: {e}")))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "AWS call failed; the next tick retries");
                        Ok(json!({"handled": false, "error": e.to_string()}))
                    }
                }
            }
        },
    ))
    .await
}

/// Said once at start: without a lease nothing keeps a second controller
/// from acting on the same memory at the same moment.
fn warn_unguarded(cfg: &Config) {
    if cfg.lease.queue_url.is_none() {
        tracing::warn!("no lease.queue_url (SPOTGUARD_LEASE_QUEUE_URL): run exactly one controller, or two may act on the same memory at once");
    }
}

async fn run_loop(c: Controller<SdkCloud>) -> Result<(), BoxError> {
    warn_unguarded(&c.cfg);
    let shutdown = spotguard_common::rt::shutdown_signal()?;
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(c.cfg.run.interval.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let events = match &c.cfg.run.events_queue_url {
        Some(url) => {
            // The events queue's own region (it may differ from the primary's).
            let region = spotguard_common::region::queue_url_region(url)
                .unwrap_or_else(|| c.cfg.primary.region.clone());
            let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new(region.clone()))
                .load()
                .await;
            Some(SqsEvents {
                client: aws_sdk_sqs::Client::new(&sdk),
                url: url.clone(),
                region,
            })
        }
        None => None,
    };
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Some(src) = &events {
            crate::handler::read_events(&c, src).await;
        }
        match c.leased_tick().await {
            Ok(None) => {}
            Ok(Some(r)) => tracing::info!(
                mode = r.reconcile.mode,
                actions = r
                    .reconcile
                    .links
                    .iter()
                    .map(|l| l.plan.actions.len())
                    .sum::<usize>(),
                "tick"
            ),
            Err(e) => tracing::warn!(error = %e, "tick failed; retrying next interval"),
        }
    }
}
