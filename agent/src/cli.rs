//! Command line of `spotguard-agent`.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::sync::mpsc;

use spotguard_common::clock::{Clock, SystemClock};

use crate::aws::{AsgFleet, Fleet, Queue, SqsQueue};
use crate::config::{Config, LogFormatKey, WorkerMode};
use crate::error_chain;
use crate::imds::{ImdsClient, ImdsConfig, DEFAULT_ENDPOINT};
use crate::notify::Notifier;
use crate::runner::Runner;
use crate::status::Status;
use crate::watch::{self, Detected, WatchConfig};
use crate::worker::{Worker, WorkerSpec};

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
    /// Consume the SQS queue, drain on interruption notices, scale in when idle.
    Run(ConfigArgs),
    /// Validate the configuration and print it with every default filled in.
    CheckConfig(ConfigArgs),
    /// Watch IMDS for interruption notices and print one JSON line per notice.
    Watch(WatchArgs),
}

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// The TOML configuration file.
    #[arg(long, default_value = crate::config::DEFAULT_PATH)]
    pub config: std::path::PathBuf,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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

/// Logs as `spotguard_common::rt` does: JSON when asked, by the
/// configuration or `SPOTGUARD_LOG_FORMAT=json` (which wins).
pub fn init_logging(format: LogFormat) {
    let format = match std::env::var("SPOTGUARD_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        Ok("text") => LogFormat::Text,
        _ => format,
    };
    spotguard_common::rt::init_logging(format == LogFormat::Json);
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Watch(args) => {
            init_logging(args.log_format);
            run_async(watch_command(args))
        }
        Command::CheckConfig(args) => return check_config(&args),
        Command::Run(args) => {
            let cfg = match Config::load(&args.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("spotguard-agent: {}", error_chain(&e));
                    return ExitCode::from(2);
                }
            };
            init_logging(match cfg.log.format {
                LogFormatKey::Text => LogFormat::Text,
                LogFormatKey::Json => LogFormat::Json,
            });
            run_async(run_command(cfg))
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

use spotguard_common::rt::{block_on as run_async, shutdown_signal, BoxError};

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

fn check_config(args: &ConfigArgs) -> ExitCode {
    match Config::load(&args.config) {
        Ok(cfg) => match effective_text(&cfg) {
            Ok(text) => {
                println!(
                    "# {}: valid; effective configuration with defaults:\n{text}",
                    args.config.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("spotguard-agent: cannot print the configuration: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("spotguard-agent: {}", error_chain(&e));
            ExitCode::from(2)
        }
    }
}

/// The effective configuration as `check-config` prints it (into
/// cloud-init's log, on an instance): `worker.env` by its keys only, its
/// values are secrets.
fn effective_text(cfg: &Config) -> Result<String, toml::ser::Error> {
    let mut shown = cfg.clone();
    for v in shown.worker.env.values_mut() {
        *v = "(set; not shown)".into();
    }
    toml::to_string_pretty(&shown)
}

/// How long start-up waits for IMDS to give the instance id: the agent
/// cannot scale itself in without it; systemd restarts it after a failure.
const STARTUP_IMDS_ATTEMPTS: u32 = 30;

async fn imds_value(client: &ImdsClient, path: &str) -> Result<String, BoxError> {
    let mut last = String::new();
    for attempt in 1..=STARTUP_IMDS_ATTEMPTS {
        match client.get(path).await {
            Ok(Some(v)) if !v.trim().is_empty() => return Ok(v.trim().to_string()),
            Ok(_) => last = "not found (404)".into(),
            Err(e) => last = error_chain(&e),
        }
        tracing::warn!(path, attempt, error = %last, "IMDS not ready; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(format!("cannot read {path} from IMDS: {last}").into())
}

/// Wiring: IMDS, the SDK clients (each in its resource's region), the
/// status endpoint and the worker; then [`run_with`] does the work.
async fn run_command(mut cfg: Config) -> Result<(), BoxError> {
    if !crate::config::is_imds_address(&cfg.imds.endpoint) {
        tracing::warn!(endpoint = %cfg.imds.endpoint, "IMDS endpoint is not IMDS (imds.allow_other_endpoint): notices and the instance's identity come from there");
    }
    let imds = Arc::new(ImdsClient::new(ImdsConfig {
        endpoint: cfg.imds.endpoint.clone(),
        ..Default::default()
    })?);
    let instance_id = imds_value(&imds, crate::imds::paths::INSTANCE_ID).await?;
    // Every client talks to the region its resource lives in (REFERENCE.md,
    // SQS): Auto Scaling to the instance's own region, from IMDS as on any
    // instance (AWS_REGION is not consulted); SQS to the queue's; SNS to the
    // topic's. A fallback-region worker thus reads the primary's queue.
    let own_region = imds_value(&imds, crate::imds::paths::REGION).await?;
    // For the GPU count only: an instance that cannot say its type is
    // checked against health.gpu_count alone.
    let instance_type = match cfg.health.gpu {
        crate::config::GpuMode::Off => None,
        _ => imds
            .get(crate::imds::paths::INSTANCE_TYPE)
            .await
            .ok()
            .flatten(),
    };
    let queue_region = cfg
        .queue_region()
        .ok_or("queue.region: the queue URL names no region; set queue.region")?;
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(own_region.clone()))
        .load()
        .await;
    let in_region = |r: &str| {
        sdk.to_builder()
            .region(aws_config::Region::new(r.to_string()))
            .build()
    };
    // A group in another region than the queue's is a fallback: its agents
    // follow the controller's intake tag unless told otherwise.
    let follow = *cfg
        .scale_in
        .follow_intake
        .get_or_insert(own_region != queue_region);
    let cfg = Arc::new(cfg);
    tracing::info!(%instance_id, region = %own_region, %queue_region, follow_intake = follow, "starting");
    let status = Arc::new(Status::new(instance_id.clone(), imds.stats()));
    // The endpoint answers through the drain, and stops once the work has.
    let (status_stop, status_stopped) = tokio::sync::oneshot::channel::<()>();
    let status_task = match cfg.status_addr() {
        Some(addr) => {
            let listener_status = status.clone();
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("status.listen {addr}: {e}"))?;
            Some(tokio::spawn(async move {
                let stopped = async {
                    let _ = status_stopped.await;
                };
                if let Err(e) = crate::status::serve_on(listener, listener_status, stopped).await {
                    tracing::error!(error = %e, "status endpoint stopped");
                }
            }))
        }
        None => None,
    };
    let sns = match &cfg.notify.sns_topic_arn {
        Some(topic) => {
            let region = spotguard_common::region::arn_region(topic).ok_or_else(|| {
                format!("notify.sns_topic_arn: {topic:?} names no region (arn:aws:sns:REGION:ACCOUNT:NAME)")
            })?;
            Some((aws_sdk_sns::Client::new(&in_region(&region)), topic.clone()))
        }
        None => None,
    };
    let notifier = Notifier {
        sns,
        hook: cfg.notify.hook_command.clone(),
        sent: None,
    };
    let http = crate::worker::http_client()
        .map_err(|e| format!("cannot build the worker HTTP client: {e}"))?;
    let job_user = match cfg.worker_mode() {
        WorkerMode::Exec(_) => {
            crate::jobuser::resolve(cfg.worker.user.as_deref(), &cfg.worker.groups)?
        }
        WorkerMode::Http(_) => None,
    };
    match &job_user {
        Some(u) => tracing::info!(user = %u.name, uid = u.uid, gid = u.gid, "jobs run as"),
        None if nix::unistd::geteuid().is_root()
            && matches!(cfg.worker_mode(), WorkerMode::Exec(_)) =>
        {
            tracing::warn!(
                "jobs run as root: create the user {} (the package does) or set worker.user",
                crate::jobuser::DEFAULT_JOB_USER
            )
        }
        None => {}
    }
    let spec = WorkerSpec {
        mode: cfg.worker_mode(),
        queue_url: cfg.queue.url.clone(),
        queue_name: cfg.queue_name().to_string(),
        term_grace: cfg.worker.term_grace.0,
        content_type: cfg.worker.content_type.clone(),
        env: cfg
            .worker
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        http,
        notice_signal: cfg
            .notice_signal()
            .map_err(|e| format!("worker.notice_signal: {e}"))?,
        notice_url: cfg.worker.notice_url.clone(),
        state_dir: std::path::PathBuf::from(&cfg.worker.state_dir),
        periodic_seen: Default::default(),
        periodic_senders: cfg.worker.periodic_sender_ids.clone(),
        job_user,
        oom_score_adj: cfg.worker.oom_score_adj,
        stuck: Default::default(),
    };
    if let WorkerMode::Exec(argv) = &spec.mode {
        let jobs = spec.state_dir.join("jobs");
        std::fs::create_dir_all(&jobs)
            .map_err(|e| format!("worker.state_dir {}: {e}", spec.state_dir.display()))?;
        if spec.job_user.is_some() {
            // The job user traverses to its own directory (0770, its
            // group) but lists no other: 0711 on the way, whatever the
            // umask made of a state_dir of the operator's.
            use std::os::unix::fs::PermissionsExt;
            for dir in [spec.state_dir.as_path(), jobs.as_path()] {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
                    .map_err(|e| format!("worker.state_dir {}: {e}", dir.display()))?;
            }
        }
        tracing::info!(command = ?argv, concurrency = cfg.worker.concurrency, "exec mode");
    }
    let watch_cfg = WatchConfig {
        spot_interval: cfg.interruption.poll_interval.0,
        lifecycle_interval: cfg.interruption.poll_interval.0,
        rebalance_interval: cfg.interruption.rebalance_poll_interval.0,
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel(64);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let watcher = tokio::spawn(watch::run_signalling(
        imds,
        watch_cfg,
        tx,
        ready_tx,
        std::future::pending(),
    ));
    let edges = Edges {
        queue: Arc::new(SqsQueue {
            client: aws_sdk_sqs::Client::new(&in_region(&queue_region)),
            url: cfg.queue.url.clone(),
            region: queue_region,
        }),
        fleet: Arc::new(AsgFleet {
            client: aws_sdk_autoscaling::Client::new(&sdk),
            ec2: match sdk.credentials_provider() {
                Some(p) => spotguard_common::ec2::Ec2::new(
                    p,
                    &own_region,
                    spotguard_common::ec2::endpoint_override(sdk.endpoint_url()).as_deref(),
                ),
                None => Err("no AWS credentials provider".to_string()),
            },
            region: own_region,
        }),
        worker: Arc::new(spec),
        clock: Arc::new(SystemClock),
        notices: rx,
        ready: async move {
            // A watcher that died before its first poll: run anyway; its
            // end is logged by the runner when the notice channel closes.
            let _ = ready_rx.await;
        },
        health: health_checks(&cfg, instance_type.as_deref().map(str::trim)),
    };
    run_with(
        cfg,
        instance_id,
        notifier,
        status,
        edges,
        shutdown_signal()?,
    )
    .await;
    watcher.abort();
    let _ = status_stop.send(());
    if let Some(t) = status_task {
        let _ = t.await;
    }
    Ok(())
}

/// The agent's edges, each a trait: the SDK ones in production, in-memory
/// fakes in tests and the simulation.
pub struct Edges<Q, F, W, R> {
    pub queue: Arc<Q>,
    pub fleet: Arc<F>,
    pub worker: Arc<W>,
    pub clock: Arc<dyn Clock>,
    /// Notices from the IMDS watcher.
    pub notices: mpsc::Receiver<Detected>,
    /// Completes once the watcher's first poll has answered.
    pub ready: R,
    /// `health.command` and the GPU checks ([`health_checks`]), if any.
    pub health: Option<Arc<dyn crate::health::HealthCheck>>,
}

/// The instance's health checks: `health.command`, then the GPU checks
/// (`health.gpu`; the expected count from `instance_type`).
pub fn health_checks(
    cfg: &Config,
    instance_type: Option<&str>,
) -> Option<Arc<dyn crate::health::HealthCheck>> {
    let mut all: Vec<Arc<dyn crate::health::HealthCheck>> = Vec::new();
    if let Some(argv) = cfg.health.command.clone() {
        all.push(Arc::new(crate::health::CommandCheck { argv }));
    }
    if let Some(g) = crate::gpu::from_config(&cfg.health, instance_type) {
        tracing::info!(nvidia_smi = %g.nvidia_smi.display(), expected = ?g.expected, "GPU checks on");
        all.push(Arc::new(g));
    }
    match all.len() {
        0 => None,
        1 => all.pop(),
        _ => Some(Arc::new(crate::health::All(all))),
    }
}

/// The work, over its edges: runs until a shutdown drain completes.
pub async fn run_with<Q: Queue, F: Fleet, W: Worker, R: std::future::Future<Output = ()>>(
    cfg: Arc<Config>,
    instance_id: String,
    notifier: Notifier,
    status: Arc<Status>,
    edges: Edges<Q, F, W, R>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let health = edges.health;
    status.imds_stale_ms.store(
        u64::try_from(cfg.health.imds_unreachable_after.0.as_millis()).unwrap_or(u64::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
    let runner = Runner {
        cfg,
        queue: edges.queue,
        fleet: edges.fleet,
        worker: edges.worker,
        clock: edges.clock,
        health,
        notifier,
        status,
        instance_id,
    };
    runner.run(edges.notices, edges.ready, shutdown).await;
}
