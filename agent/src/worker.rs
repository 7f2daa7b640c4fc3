//! Handing one message to the worker: a program (exec mode) or an HTTP POST
//! in the Elastic Beanstalk sqsd style (http mode), and telling it about a
//! notice while it runs.
//!
//! The message body never passes through a shell: exec mode runs the
//! configured argv directly and writes the body to the job's stdin.
//!
//! A running job learns of a notice at once: in exec mode the notice is
//! written as JSON to the file named by `SPOTGUARD_NOTICE_FILE` (which
//! exists only once there is a notice) and the job's process group gets
//! `worker.notice_signal`; in http mode the JSON is POSTed to
//! `worker.notice_url`. A job may leave a checkpoint reference in the file
//! named by `SPOTGUARD_CHECKPOINT_FILE` (http mode: in the
//! `X-Spotguard-Checkpoint` header of its answer to the job request), which
//! the agent carries over to the next worker when the message is handed back.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::watch;

use crate::aws::Message;
use crate::config::WorkerMode;

/// Attribute carrying a checkpoint reference to the next worker.
pub const CHECKPOINT_ATTR: &str = "spotguard.checkpoint";
/// The first message's id, kept across hand-overs.
pub const ORIGINAL_ID_ATTR: &str = "spotguard.original-message-id";
/// The first message's first receive time (RFC 3339), kept across hand-overs.
pub const FIRST_RECEIVED_ATTR: &str = "spotguard.first-received-at";
/// How many times the job was interrupted (a drain's deadline, or a notice
/// it yielded to) and its message re-sent rather than handed back: a
/// hand-back would spend one of the message's receives towards the
/// dead-letter queue for what is not the message's fault.
pub const INTERRUPTIONS_ATTR: &str = "spotguard.interruptions";
/// Http mode: the header a worker answers with its checkpoint reference, and
/// the header the next worker gets it in.
pub const CHECKPOINT_HEADER: &str = "X-Spotguard-Checkpoint";

/// How a job ended, before its message is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// Non-zero exit, signal, or non-2xx answer.
    Failed(String),
    /// The job could not start: a missing or non-executable program, or no
    /// app listening (http mode). The agent's fault, not the message's: it
    /// is handed back at once without counting as a failure.
    NotStarted(String),
    /// Stopped by the agent, for the reason given.
    Stopped(StopReason),
    /// After a notice the job ended without success: it gave its work back
    /// (typically after saving a checkpoint). Handed back, not a failure.
    Yielded(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The drain deadline came.
    Deadline,
    /// `worker.timeout` elapsed.
    Timeout,
    /// SQS's 12-hour cap on the message's invisibility is near: the job is
    /// handed over with its checkpoint (a re-send starts a new 12 hours),
    /// or without one, stopped as failed.
    LeaseLimit,
}

/// What a running job is told on a notice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobNotice {
    /// `spot_interruption`, `rebalance_recommendation`, `lifecycle_terminated` or `shutdown`.
    pub kind: &'static str,
    /// The spot action (`terminate`, `stop`, `hibernate`), if a spot notice.
    pub action: Option<String>,
    /// When AWS interrupts the instance, if a spot notice.
    pub notice_time: Option<DateTime<Utc>>,
    /// When the agent stops the job if it is still running; `None`: no limit.
    pub deadline: Option<DateTime<Utc>>,
}

/// What every job of this agent shares.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub mode: WorkerMode,
    pub queue_url: String,
    pub queue_name: String,
    pub term_grace: Duration,
    pub content_type: String,
    pub env: Vec<(String, String)>,
    pub http: reqwest::Client,
    /// Exec mode: the signal a job's process group gets on a notice.
    pub notice_signal: Option<Signal>,
    /// Http mode: where the notice is POSTed.
    pub notice_url: Option<String>,
    /// Exec mode: per-job directories for the notice and checkpoint files.
    pub state_dir: PathBuf,
    /// Periodic tasks this instance has run or is running (their
    /// `name@time`), newest last, at most [`PERIODIC_REMEMBERED`]: a slot
    /// sent twice (a retried controller invocation on a standard queue)
    /// that comes back here is deleted without running again.
    pub periodic_seen: Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
    /// Who may send periodic tasks (`worker.periodic_sender_ids`; empty:
    /// anyone who may send to the queue).
    pub periodic_senders: Vec<String>,
    /// Exec mode: the user jobs are switched to (`None`: the agent's own).
    pub job_user: Option<crate::jobuser::JobUser>,
    /// Exec mode: each job's OOM score adjustment.
    pub oom_score_adj: i16,
    /// A job's process that SIGKILL did not end: why (the instance is
    /// unfit for work from then on).
    pub stuck: Arc<std::sync::Mutex<Option<String>>>,
}

/// How long a SIGKILLed job may take to go: a killable process is gone in
/// milliseconds; one still there after 5 s sleeps uninterruptibly.
pub const KILL_WAIT: Duration = Duration::from_secs(5);

/// How many periodic slots an instance remembers: a day of a task every
/// few minutes; a duplicate comes within a tick or two of the original.
pub const PERIODIC_REMEMBERED: usize = 512;

/// A periodic task's message: the attributes Elastic Beanstalk's scheduler
/// writes, and the controller too (`controller/src/cron.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Periodic {
    pub name: String,
    /// ISO 8601, UTC.
    pub scheduled_at: String,
    pub path: String,
}

/// The app's URL with its path (and query) replaced by a periodic task's
/// `path`. The path is queue input: one that is not a plain absolute path
/// (`//host`, `/\\host`, a full URL) is refused, and the result must keep
/// the app's origin, so a message cannot send the POST to another host.
pub fn task_url(app: &str, path: &str) -> Result<String, String> {
    if !path.starts_with('/')
        || path.starts_with("//")
        || path.contains('\\')
        || path.contains("://")
        || path.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err("not a plain absolute path".into());
    }
    let base = reqwest::Url::parse(app).map_err(|e| format!("worker.url: {e}"))?;
    let (p, q) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let mut u = base.clone();
    u.set_path(p);
    u.set_query(q);
    u.set_fragment(None);
    if u.origin() != base.origin() {
        return Err("it would leave the app's host".into());
    }
    Ok(u.to_string())
}

impl Periodic {
    pub fn of(msg: &Message) -> Option<Periodic> {
        let get = |k: &str| {
            msg.attributes
                .get(k)
                .filter(|a| a.binary.is_none())
                .map(|a| a.value.clone())
        };
        let scheduled_at = get("beanstalk.sqsd.scheduled_time")?;
        // sqsd normalises the time to ISO 8601 UTC; an unreadable one is
        // passed as written.
        let scheduled_at = chrono::DateTime::parse_from_rfc3339(&scheduled_at)
            .map(|t| {
                t.with_timezone(&Utc)
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            })
            .unwrap_or(scheduled_at);
        Some(Periodic {
            name: get("beanstalk.sqsd.task_name").unwrap_or_default(),
            scheduled_at,
            path: get("beanstalk.sqsd.path").unwrap_or_else(|| "/".into()),
        })
    }

    /// What makes a slot one: its task, time and path, and who sent it, so
    /// that a forged message (anyone who may send to the queue) cannot mark
    /// the controller's real slot as already run.
    fn key(&self, sender: Option<&str>) -> String {
        format!(
            "{}\u{0}{}\u{0}{}\u{0}{}",
            self.name,
            self.scheduled_at,
            self.path,
            // The principal, not the session: a retried controller
            // invocation may come from another Lambda instance's session.
            sender.map_or("", |s| s.split(':').next().unwrap_or(s))
        )
    }
}

/// Whether `sender` (a message's `SenderId`) is one of `allowed`: an IAM
/// user's or role's unique id, alone or with the session after `:`
/// (SQS gives a role's sender as `AROA…:session`, the session differing per
/// Lambda instance). An empty list allows everyone.
pub fn sender_allowed(allowed: &[String], sender: Option<&str>) -> bool {
    allowed.is_empty()
        || sender.is_some_and(|s| {
            let principal = s.split(':').next().unwrap_or(s);
            allowed.iter().any(|a| a == s || a == principal)
        })
}

/// Queue input as it may appear in a log line: control characters
/// escaped (a newline in a task name would forge a journal line) and at
/// most 200 characters.
pub fn loggable(s: &str) -> String {
    const MAX: usize = 200;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// A job's notice and checkpoint files (exec mode).
#[derive(Debug, Clone)]
pub struct JobFiles {
    /// The job user's group, when it is not the agent's.
    pub group: Option<u32>,
    pub dir: PathBuf,
    pub notice: PathBuf,
    pub checkpoint: PathBuf,
}

impl JobFiles {
    /// `<state_dir>/jobs/<message id>`; message ids are UUIDs, but anything
    /// outside `[A-Za-z0-9-_]` is replaced so no id can leave the directory.
    ///
    /// With `group` (jobs run as another user), the directory is the
    /// agent's, in the job user's group, mode 0770: the job writes there
    /// (its files are in its own group, which the agent, a member, reads
    /// and removes), the agent gives its notice file that group, and nobody
    /// else reads either. No set-group-ID bit: the unit's
    /// `RestrictSUIDSGID=yes` refuses it.
    ///
    /// The directory is per receive (a digest of the receipt handle after
    /// the id): a message delivered twice to one instance runs twice, and
    /// the first to finish must not remove the other's files.
    pub fn create(
        state_dir: &Path,
        message_id: &str,
        receipt: &str,
        group: Option<u32>,
    ) -> std::io::Result<JobFiles> {
        let safe: String = message_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let mut h: u32 = 0x811c_9dc5;
        for b in receipt.bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        let dir = state_dir.join("jobs").join(format!("{safe}.{h:08x}"));
        std::fs::create_dir_all(&dir)?;
        if let Some(gid) = group {
            use std::os::unix::fs::PermissionsExt;
            std::os::unix::fs::chown(&dir, None, Some(gid))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770))?;
        }
        let files = JobFiles {
            group,
            notice: dir.join("notice.json"),
            checkpoint: dir.join("checkpoint"),
            dir,
        };
        // A stale file from an earlier run of the same message must not count.
        let _ = std::fs::remove_file(&files.notice);
        let _ = std::fs::remove_file(&files.checkpoint);
        Ok(files)
    }

    /// The checkpoint reference, if the job left one; `Err` names why it is unusable.
    /// Reads at most `max_bytes + 1` bytes: a job that wrote gigabytes
    /// there costs the agent nothing (the excess is what tells it is too big).
    pub fn checkpoint(&self, max_bytes: usize) -> Result<Option<String>, String> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        // The job owns this path: a symlink it left there (to agent.toml,
        // say) is not followed, and a FIFO does not block the open.
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&self.checkpoint)
        {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", self.checkpoint.display())),
            Ok(f) => f,
        };
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            return Err(format!(
                "{} is not a regular file",
                self.checkpoint.display()
            ));
        }
        let mut bytes = Vec::new();
        file.take(max_bytes as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read {}: {e}", self.checkpoint.display()))?;
        checkpoint_value(&bytes, max_bytes)
    }

    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::debug!(dir = %self.dir.display(), error = %e, "cannot remove the job directory");
        }
    }
}

/// A checkpoint reference: trimmed UTF-8 text without NUL, at most `max_bytes`.
pub fn checkpoint_value(bytes: &[u8], max_bytes: usize) -> Result<Option<String>, String> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| "checkpoint reference is not UTF-8".to_string())?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if text.len() > max_bytes {
        return Err(format!(
            "checkpoint reference of {} bytes exceeds {max_bytes}",
            text.len()
        ));
    }
    if text.contains('\0') {
        return Err("checkpoint reference contains a NUL byte".into());
    }
    Ok(Some(text.to_string()))
}

/// How a job ended, with a checkpoint reference from its answer (http mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub outcome: Outcome,
    pub checkpoint: Option<String>,
}

/// The worker edge: what runs a job. [`WorkerSpec`] is the real one (a
/// process or an sqsd-style app); tests and the simulation pass a scripted
/// one, so the runner and the job code run without processes.
pub trait Worker: Send + Sync + 'static {
    /// Where per-job notice and checkpoint files live (exec mode); `None`
    /// when the worker takes no files.
    fn state_dir(&self) -> Option<&Path>;
    /// The group of the user jobs run as, when it is not the agent's: their
    /// directories are given to it (see [`JobFiles::create`]).
    fn job_group(&self) -> Option<u32> {
        None
    }
    /// Whether any job can run: `Err` names why not (an instance fault that
    /// needs no message to find). Cheap: called before each receive.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    /// No job runs any more: what jobs left behind is ended.
    fn all_done(&self) {}
    /// A job's process could not be ended: why. The instance is unhealthy
    /// for good (it is replaced with `on_unhealthy = "replace"`).
    fn stuck(&self) -> Option<String> {
        None
    }
    /// Runs a job until it ends or `stop` completes, whichever is first,
    /// telling it of every notice on `notices`.
    fn run(
        &self,
        msg: &Message,
        files: Option<&JobFiles>,
        notices: watch::Receiver<Option<JobNotice>>,
        stop: impl Future<Output = StopReason> + Send,
    ) -> impl Future<Output = Ended> + Send;
}

impl Worker for WorkerSpec {
    fn state_dir(&self) -> Option<&Path> {
        match self.mode {
            WorkerMode::Exec(_) => Some(&self.state_dir),
            WorkerMode::Http(_) => None,
        }
    }

    fn job_group(&self) -> Option<u32> {
        self.job_user.as_ref().map(|u| u.gid)
    }

    fn stuck(&self) -> Option<String> {
        self.stuck.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn all_done(&self) {
        if let Some(u) = self.job_user.clone() {
            // A /proc scan: off the runtime's thread (heartbeats, polls).
            tokio::task::spawn_blocking(move || {
                let n = end_processes_of(u.uid);
                if n > 0 {
                    tracing::warn!(user = %u.name, processes = n, "processes of the job user outlived their jobs; killed");
                }
            });
        }
    }

    fn ready(&self) -> Result<(), String> {
        match &self.mode {
            WorkerMode::Exec(argv) => match argv.first() {
                // The PATH the job gets: worker.env's, else the agent's.
                Some(program) => {
                    let path = self
                        .env
                        .iter()
                        .find(|(k, _)| k == "PATH")
                        .map(|(_, v)| std::ffi::OsString::from(v))
                        .or_else(|| std::env::var_os("PATH"));
                    program_ready(program, path.as_deref())
                }
                None => Err("worker.command is empty".into()),
            },
            WorkerMode::Http(_) => Ok(()),
        }
    }

    fn run(
        &self,
        msg: &Message,
        files: Option<&JobFiles>,
        notices: watch::Receiver<Option<JobNotice>>,
        stop: impl Future<Output = StopReason> + Send,
    ) -> impl Future<Output = Ended> + Send {
        execute(self, msg, files, notices, stop)
    }
}

/// Runs a job until it ends or `stop` completes, whichever is first, telling
/// it of every notice on `notices`.
pub async fn execute(
    spec: &WorkerSpec,
    msg: &Message,
    files: Option<&JobFiles>,
    notices: watch::Receiver<Option<JobNotice>>,
    stop: impl Future<Output = StopReason>,
) -> Ended {
    let periodic = Periodic::of(msg);
    let sender = msg.sender_id.as_deref();
    if let Some(p) = &periodic {
        if !sender_allowed(&spec.periodic_senders, sender) {
            // The message's fault: it fails, and goes to the dead-letter
            // queue after its receives, as any bad message does.
            return Ended {
                outcome: Outcome::Failed(format!(
                    "periodic task {:?} sent by {:?}, not one of worker.periodic_sender_ids",
                    loggable(&p.name),
                    loggable(sender.unwrap_or("nobody"))
                )),
                checkpoint: None,
            };
        }
        let mut seen = spec.periodic_seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(&p.key(sender)) {
            tracing::info!(message_id = %msg.id, task = %loggable(&p.name), scheduled_at = %loggable(&p.scheduled_at), "periodic task already run on this instance (sent twice); deleted without running");
            return Ended {
                outcome: Outcome::Succeeded,
                checkpoint: None,
            };
        }
        seen.push_back(p.key(sender));
        while seen.len() > PERIODIC_REMEMBERED {
            seen.pop_front();
        }
    }
    let ended = dispatch(spec, msg, periodic.as_ref(), files, notices, stop).await;
    if let (Some(p), false) = (&periodic, ended.outcome == Outcome::Succeeded) {
        // Not run to its end here: another try (here or elsewhere) may run it.
        let mut seen = spec.periodic_seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|k| *k != p.key(sender));
    }
    ended
}

async fn dispatch(
    spec: &WorkerSpec,
    msg: &Message,
    periodic: Option<&Periodic>,
    files: Option<&JobFiles>,
    notices: watch::Receiver<Option<JobNotice>>,
    stop: impl Future<Output = StopReason>,
) -> Ended {
    match &spec.mode {
        WorkerMode::Exec(argv) => exec(spec, argv, msg, periodic, files, notices, stop).await,
        WorkerMode::Http(url) => http(spec, url, msg, periodic, notices, stop).await,
    }
}

/// Whether `program` (a path, or a name looked up in `path` as exec does)
/// is an executable file: what a start would find, without a message.
pub fn program_ready(program: &str, path: Option<&std::ffi::OsStr>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = Path::new(program);
        return match std::fs::metadata(p) {
            Err(e) => Err(format!("worker.command {program}: {e}")),
            Ok(_) if !executable(p) => {
                Err(format!("worker.command {program}: not an executable file"))
            }
            Ok(_) => Ok(()),
        };
    }
    let found = path
        .map(std::env::split_paths)
        .into_iter()
        .flatten()
        .any(|dir| executable(&dir.join(program)));
    if found {
        Ok(())
    } else {
        Err(format!("worker.command {program}: not found on PATH"))
    }
}

/// The pids listed in `/proc` (none if it cannot be read).
fn proc_pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
}

/// SIGKILLs every process whose real uid is `uid` (the job user's, never
/// the agent's): called when no job runs, so all of them are strays.
/// Returns how many were signalled. Linux: `/proc/<pid>/status`.
pub fn end_processes_of(uid: u32) -> usize {
    if uid == 0 || uid == nix::unistd::getuid().as_raw() {
        return 0;
    }
    let mut n = 0;
    for pid in proc_pids() {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let real = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok());
        if real == Some(uid) && nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
        {
            n += 1;
        }
    }
    n
}

/// What a job run as another user keeps of the agent's environment.
pub const JOB_ENV_KEPT: [&str; 5] = ["PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ"];

/// The client an sqsd-style app is reached with: no proxy (the app is on
/// this instance), and no redirect followed: a 307 would replay the POST,
/// body and all, to wherever the answer points.
pub fn http_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// Environment variable name for a message attribute: `SPOTGUARD_ATTR_` and
/// the name with anything but ASCII letters, digits and `_` replaced by `_`.
pub fn attr_env_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("SPOTGUARD_ATTR_{clean}")
}

fn first_received_iso(msg: &Message) -> Option<String> {
    msg.first_received_ms
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn notice_json(msg: &Message, n: &JobNotice) -> String {
    let mut v = serde_json::to_value(n).unwrap_or_else(|_| serde_json::json!({}));
    if let Some(o) = v.as_object_mut() {
        o.insert("message_id".into(), serde_json::json!(msg.id));
    }
    v.to_string()
}

/// Writes the notice file atomically (temporary file, then rename), so a
/// job polling for it never reads half a notice.
/// Attribute values longer than this go to a file, not the environment:
/// 32 KiB keeps the ten SQS allows far under ARG_MAX with the body's
/// variables beside them.
pub const ATTR_ENV_MAX: usize = 32 * 1024;

/// Writes a file the job reads in its directory: created anew (`O_EXCL`,
/// no symlink followed), in the job's group, readable by it.
fn write_job_file(files: &JobFiles, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o640)
        .open(path)?;
    if let Some(gid) = files.group {
        std::os::unix::fs::fchown(&f, None, Some(gid))?;
    }
    f.write_all(bytes)
}

///
/// The job can write in its directory: whatever it left at the temporary
/// name is removed, and the file is created anew (`O_EXCL`, no symlink
/// followed: [`write_job_file`]), so the agent never writes through a link
/// into another file.
fn write_notice(files: &JobFiles, json: &str) {
    let tmp = files.dir.join(".notice.json.tmp");
    let written = write_job_file(files, &tmp, json.as_bytes())
        .and_then(|_| std::fs::rename(&tmp, &files.notice));
    if let Err(e) = written {
        tracing::warn!(file = %files.notice.display(), error = %e, "cannot write the notice file");
    }
}

async fn exec(
    spec: &WorkerSpec,
    argv: &[String],
    msg: &Message,
    periodic: Option<&Periodic>,
    files: Option<&JobFiles>,
    mut notices: watch::Receiver<Option<JobNotice>>,
    stop: impl Future<Output = StopReason>,
) -> Ended {
    let ended = |outcome| Ended {
        outcome,
        checkpoint: None,
    };
    let Some((program, args)) = argv.split_first() else {
        return ended(Outcome::Failed("worker.command is empty".into()));
    };
    let mut cmd = Command::new(program);
    if spec.job_user.is_some() {
        // Another user's job gets none of the agent's environment (an
        // operator's Environment= may hold credentials; systemd's
        // variables name the agent's state): the locale, the time zone and
        // PATH, then worker.env and the job's own variables below.
        cmd.env_clear();
        for k in JOB_ENV_KEPT {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
        cmd.env("HOME", files.map_or(Path::new("/"), |f| f.dir.as_path()));
    }
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        // Its own process group, so that a stop reaches every process the
        // job started, and a Ctrl-C on the agent's terminal does not.
        .process_group(0)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .env("SPOTGUARD_MESSAGE_ID", &msg.id)
        .env("SPOTGUARD_RECEIVE_COUNT", msg.receive_count.to_string())
        .env("SPOTGUARD_QUEUE_URL", &spec.queue_url)
        .env("SPOTGUARD_QUEUE_NAME", &spec.queue_name);
    if let Some(t) = first_received_iso(msg) {
        cmd.env("SPOTGUARD_FIRST_RECEIVED_AT", t);
    }
    if let Some(id) = &msg.sender_id {
        cmd.env("SPOTGUARD_SENDER_ID", id);
    }
    if let Some(p) = periodic {
        cmd.env("SPOTGUARD_TASK_NAME", &p.name)
            .env("SPOTGUARD_SCHEDULED_AT", &p.scheduled_at)
            .env("SPOTGUARD_TASK_PATH", &p.path);
    }
    if let Some(f) = files {
        cmd.env("SPOTGUARD_NOTICE_FILE", &f.notice)
            .env("SPOTGUARD_CHECKPOINT_FILE", &f.checkpoint);
    }
    let mut named = std::collections::BTreeMap::new();
    for (k, a) in &msg.attributes {
        if a.binary.is_some() {
            continue; // not passed to the worker; carried over on a re-send
        }
        // `job.kind` and `job_kind` are both SPOTGUARD_ATTR_job_kind: the
        // later one wins, and the log says which was lost.
        if let Some(earlier) = named.insert(attr_env_name(k), k) {
            tracing::warn!(message_id = %msg.id, attribute = %loggable(k), replaces = %loggable(earlier), variable = %loggable(&attr_env_name(k)), "two attributes map to one variable; the later is passed");
        }
        if a.value.contains('\0') {
            tracing::warn!(message_id = %msg.id, attribute = %loggable(k), "attribute holds a NUL byte; not passed");
            continue;
        }
        if a.value.len() > ATTR_ENV_MAX {
            // Too big for the environment (Linux refuses one string over
            // 128 KiB, and all of them over ARG_MAX, with E2BIG): a file in
            // the job's directory, named in `<variable>_FILE`.
            let Some(f) = files else {
                tracing::warn!(message_id = %msg.id, attribute = %loggable(k), bytes = a.value.len(), "attribute too big for the environment and no job directory; not passed");
                continue;
            };
            let path = f.dir.join(format!("attr-{}", attr_env_name(k)));
            match write_job_file(f, &path, a.value.as_bytes()) {
                Ok(()) => {
                    cmd.env(format!("{}_FILE", attr_env_name(k)), &path);
                }
                Err(e) => {
                    tracing::warn!(message_id = %msg.id, attribute = %loggable(k), error = %e, "cannot write the attribute's file; not passed")
                }
            }
            continue;
        }
        cmd.env(attr_env_name(k), &a.value);
        match k.as_str() {
            CHECKPOINT_ATTR => {
                cmd.env("SPOTGUARD_CHECKPOINT", &a.value);
            }
            ORIGINAL_ID_ATTR => {
                cmd.env("SPOTGUARD_ORIGINAL_MESSAGE_ID", &a.value);
            }
            _ => {}
        }
    }
    crate::jobuser::prepare_child(&mut cmd, spec.job_user.as_ref(), spec.oom_score_adj);
    if let (Some(_), Some(f)) = (&spec.job_user, files) {
        // The agent's working directory is not the job's to write in.
        cmd.current_dir(&f.dir);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        // E2BIG: the message's attributes and body made the environment
        // too big. The message's fault, not the instance's.
        Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
            return ended(Outcome::Failed(format!(
                "cannot start {program}: the message's attributes make the environment too big: {e}"
            )))
        }
        Err(e) => return ended(Outcome::NotStarted(format!("cannot start {program}: {e}"))),
    };
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    // Feed stdin concurrently: a job that never reads it must not block us.
    let stdin = child.stdin.take();
    let body = msg.body.clone().into_bytes();
    let feeder = async move {
        if let Some(mut stdin) = stdin {
            // A job that exits without reading stdin closes the pipe: fine.
            let _ = stdin.write_all(&body).await;
            let _ = stdin.shutdown().await;
        }
    };
    // The job ends when its leader exits, whether or not stdin was read:
    // a descendant that inherited stdin must not keep the writer (and so the
    // job) waiting. Dropping the feeder closes our end of the pipe.
    let run = async {
        tokio::pin!(feeder);
        let mut fed = false;
        loop {
            tokio::select! {
                status = child.wait() => return status,
                _ = &mut feeder, if !fed => fed = true,
            }
        }
    };
    tokio::pin!(run);
    tokio::pin!(stop);
    let mut noticed = false;
    loop {
        // Biased: an exit already available wins over a deadline that fires
        // in the same poll, so a job that succeeded is never handed back.
        tokio::select! {
            biased;
            status = &mut run => {
                if let Some(pgid) = pgid {
                    end_group(pgid, spec.term_grace).await;
                }
                return ended(match status {
                    Ok(s) if s.success() => Outcome::Succeeded,
                    Ok(s) if noticed => Outcome::Yielded(format!("worker exited with {s} after the notice")),
                    Ok(s) => Outcome::Failed(format!("worker exited with {s}")),
                    Err(e) => Outcome::Failed(format!("cannot wait for the worker: {e}")),
                });
            }
            n = next_notice(&mut notices) => {
                noticed = true;
                if let Some(f) = files {
                    write_notice(f, &notice_json(msg, &n));
                }
                if let (Some(sig), Some(pgid)) = (spec.notice_signal, pgid) {
                    signal_catchers(pgid, sig);
                }
                tracing::info!(message_id = %msg.id, kind = n.kind, "job told of the notice");
            }
            reason = &mut stop => {
                if let Some(pgid) = pgid {
                    // One grace for the whole group: the stop must fit in
                    // the deadline margin with the hand-back after it.
                    let started = tokio::time::Instant::now();
                    signal_group(pgid, Signal::SIGTERM);
                    if tokio::time::timeout(spec.term_grace, &mut run).await.is_err() {
                        signal_group(pgid, Signal::SIGKILL);
                        // SIGKILL ends any process at once, but one in
                        // uninterruptible sleep (a GPU fallen off the bus, a
                        // hung mount) only when that returns, maybe never:
                        // the message is handed back all the same, and the
                        // instance is no longer fit for work.
                        if tokio::time::timeout(KILL_WAIT, &mut run).await.is_err() {
                            let why = format!(
                                "a job's process (group {pgid}) did not end {KILL_WAIT:?} after SIGKILL: uninterruptible (a GPU or a mount that hangs)"
                            );
                            tracing::error!(message_id = %msg.id, reason = %why, "the instance cannot end its jobs");
                            *spec.stuck.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                        }
                    } else {
                        // The leader went; helpers that ignore SIGTERM may
                        // not: the rest of the same grace, then SIGKILL.
                        end_group(pgid, spec.term_grace.saturating_sub(started.elapsed())).await;
                    }
                }
                return ended(Outcome::Stopped(reason));
            }
        }
    }
}

/// Sends `sig` to the processes of group `pgid` that catch it, and only to
/// them: a notice signal whose default action is to terminate (SIGUSR1's is)
/// must not kill a worker that knows nothing of notices, which may well
/// finish before the deadline. Linux: reads `/proc/<pid>/stat` (group) and
/// `/proc/<pid>/status` (`SigCgt`, the caught-signals mask).
pub fn signal_catchers(pgid: Pid, sig: Signal) -> usize {
    let bit = 1u64 << ((sig as i32) - 1);
    let mut sent = 0;
    for pid in proc_pids() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the ")" that closes the command name: state, ppid, pgrp.
        let pgrp = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(2))
            .and_then(|g| g.parse::<i32>().ok());
        if pgrp != Some(pgid.as_raw()) {
            continue;
        }
        let catches = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("SigCgt:"))
                    .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            })
            .is_some_and(|mask| mask & bit != 0);
        if catches && nix::sys::signal::kill(Pid::from_raw(pid), sig).is_ok() {
            sent += 1;
        }
    }
    if sent == 0 {
        tracing::info!(
            pgid = pgid.as_raw(),
            ?sig,
            "no process of the job catches the notice signal; none sent"
        );
    }
    sent
}

/// The next notice for a running job. Once the agent has dropped the sender
/// no notice can come, and this never completes. Cancel-safe: it only
/// awaits `changed()`, so a `select!` may drop it at any await.
async fn next_notice(notices: &mut watch::Receiver<Option<JobNotice>>) -> JobNotice {
    loop {
        if notices.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if let Some(n) = notices.borrow_and_update().clone() {
            return n;
        }
    }
}

/// Ends what is left of a job's process group once its leader has exited:
/// a helper it started would otherwise hold GPU memory into the next job.
/// SIGTERM, then SIGKILL after `grace` (a `setsid` descendant escapes the
/// group; a cgroup per job would catch it too, and is not done).
async fn end_group(pgid: Pid, grace: Duration) {
    if killpg(pgid, None).is_err() {
        return; // nothing left
    }
    tracing::info!(
        pgid = pgid.as_raw(),
        "the job left processes behind; ending them"
    );
    signal_group(pgid, Signal::SIGTERM);
    let end = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if killpg(pgid, None).is_err() {
            return;
        }
    }
    signal_group(pgid, Signal::SIGKILL);
}

fn signal_group(pgid: Pid, sig: Signal) {
    // ESRCH: the group is already gone, which is what we want.
    if let Err(e) = killpg(pgid, sig) {
        if e != nix::errno::Errno::ESRCH {
            tracing::warn!(pgid = pgid.as_raw(), ?sig, error = %e, "cannot signal the job's process group");
        }
    }
}

/// How long a notice POST may take; the worker only has to accept it.
const NOTICE_POST_TIMEOUT: Duration = Duration::from_secs(5);

/// POSTs `body` (a notice, or a stop) to the app's `worker.notice_url`, if
/// set, off the job's path: a slow endpoint must not delay the job's end.
fn post_to_app(spec: &WorkerSpec, message_id: &str, body: String, what: &'static str) {
    let Some(url) = spec.notice_url.clone() else {
        return;
    };
    let (client, id) = (spec.http.clone(), message_id.to_string());
    tokio::spawn(async move {
        let r = client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Aws-Sqsd-Msgid", &id)
            .timeout(NOTICE_POST_TIMEOUT)
            .body(body)
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {
                tracing::info!(message_id = %id, what, "worker told")
            }
            Ok(resp) => {
                tracing::warn!(message_id = %id, what, status = %resp.status(), "POST to the notice URL refused")
            }
            Err(e) => {
                tracing::warn!(message_id = %id, what, error = %crate::error_chain(&e), "POST to the notice URL failed")
            }
        }
    });
}

async fn http(
    spec: &WorkerSpec,
    url: &str,
    msg: &Message,
    periodic: Option<&Periodic>,
    mut notices: watch::Receiver<Option<JobNotice>>,
    stop: impl Future<Output = StopReason>,
) -> Ended {
    // A periodic task goes to its own path on the app (as sqsd sends it).
    // The path comes from the message: it may change only the path and
    // query, never the app's scheme, host or port.
    let target = match periodic {
        Some(p) => match task_url(url, &p.path) {
            Ok(u) => u,
            Err(why) => {
                return Ended {
                    outcome: Outcome::Failed(format!(
                        "periodic task {:?}: path {:?} refused: {why}",
                        p.name, p.path
                    )),
                    checkpoint: None,
                }
            }
        },
        None => url.to_string(),
    };
    let url = target.as_str();
    let mut req = spec
        .http
        .post(url)
        .header(reqwest::header::USER_AGENT, "aws-sqsd")
        .header(reqwest::header::CONTENT_TYPE, &spec.content_type)
        .header("X-Aws-Sqsd-Msgid", &msg.id)
        .header("X-Aws-Sqsd-Queue", &spec.queue_name)
        .header("X-Aws-Sqsd-Receive-Count", msg.receive_count.to_string());
    if let Some(t) = first_received_iso(msg) {
        req = req.header("X-Aws-Sqsd-First-Received-At", t);
    }
    if let Some(t) = msg
        .sent_ms
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
    {
        req = req.header(
            "X-Aws-Sqsd-Sent-At",
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        );
    }
    if let Some(id) = msg
        .sender_id
        .as_deref()
        .and_then(|v| reqwest::header::HeaderValue::from_str(v).ok())
    {
        req = req.header("X-Aws-Sqsd-Sender-Id", id);
    }
    if let Some(p) = periodic {
        for (k, v) in [
            ("X-Aws-Sqsd-Taskname", &p.name),
            ("X-Aws-Sqsd-Scheduled-At", &p.scheduled_at),
            ("X-Aws-Sqsd-Path", &p.path),
        ] {
            match reqwest::header::HeaderValue::from_str(v) {
                Ok(v) => req = req.header(k, v),
                Err(_) => {
                    tracing::warn!(message_id = %msg.id, header = k, "periodic task value cannot be an HTTP header; not passed")
                }
            }
        }
    }
    // sqsd passes its own attributes (beanstalk.sqsd.*) as the headers
    // above, not as attribute headers.
    for (k, a) in msg
        .attributes
        .iter()
        .filter(|(k, a)| a.binary.is_none() && !k.starts_with("beanstalk.sqsd."))
    {
        let name = format!("X-Aws-Sqsd-Attr-{k}");
        match (
            reqwest::header::HeaderName::from_bytes(name.as_bytes()),
            reqwest::header::HeaderValue::from_str(&a.value),
        ) {
            (Ok(n), Ok(v)) => {
                if k == CHECKPOINT_ATTR {
                    req = req.header(CHECKPOINT_HEADER, v.clone());
                }
                req = req.header(n, v);
            }
            _ => {
                tracing::warn!(message_id = %msg.id, attribute = %loggable(k), "attribute cannot be an HTTP header; not passed")
            }
        }
    }
    // A periodic task has no body for the app (sqsd sends none).
    let body = if periodic.is_some() {
        String::new()
    } else {
        msg.body.clone()
    };
    let send = req.body(body).send();
    tokio::pin!(send);
    tokio::pin!(stop);
    let mut noticed = false;
    loop {
        tokio::select! {
            biased;
            r = &mut send => {
                return match r {
                    Ok(resp) if resp.status().is_success() => Ended { outcome: Outcome::Succeeded, checkpoint: None },
                    Ok(resp) => {
                        let checkpoint = resp
                            .headers()
                            .get(CHECKPOINT_HEADER)
                            .map(|v| v.as_bytes().to_vec());
                        let why = format!("worker answered HTTP {}", resp.status());
                        if noticed {
                            let checkpoint = checkpoint.and_then(|b| match checkpoint_value(&b, usize::MAX) {
                                Ok(c) => c,
                                Err(e) => {
                                    tracing::warn!(message_id = %msg.id, error = %e, "checkpoint header unusable");
                                    None
                                }
                            });
                            Ended { outcome: Outcome::Yielded(why), checkpoint }
                        } else {
                            Ended { outcome: Outcome::Failed(why), checkpoint: None }
                        }
                    }
                    // No app listening (not up yet, crashed): the agent's
                    // fault, not the message's.
                    Err(e) if e.is_connect() => Ended {
                        outcome: Outcome::NotStarted(format!("cannot reach the worker at {url}: {}", crate::error_chain(&e))),
                        checkpoint: None,
                    },
                    Err(e) => Ended {
                        outcome: Outcome::Failed(format!("worker request failed: {}", crate::error_chain(&e))),
                        checkpoint: None,
                    },
                };
            }
            n = next_notice(&mut notices) => {
                noticed = true;
                post_to_app(spec, &msg.id, notice_json(msg, &n), "notice");
            }
            // Dropping the request abandons it (the connection is closed),
            // which does not stop the app's work: the app is told on its
            // notice URL to stop this message's job now.
            reason = &mut stop => {
                let body = serde_json::json!({
                    "kind": "stop",
                    "reason": match reason {
                        StopReason::Deadline => "deadline",
                        StopReason::Timeout => "timeout",
                        StopReason::LeaseLimit => "lease_limit",
                    },
                    "message_id": msg.id,
                });
                post_to_app(spec, &msg.id, body.to_string(), "stop");
                // The app was told; its work may still hold the GPU. The
                // slot stays taken for the grace an exec job gets to end.
                tokio::time::sleep(spec.term_grace).await;
                return Ended { outcome: Outcome::Stopped(reason), checkpoint: None };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_env_names_are_sanitised() {
        assert_eq!(attr_env_name("job-kind"), "SPOTGUARD_ATTR_job_kind");
        assert_eq!(attr_env_name("a.b c$"), "SPOTGUARD_ATTR_a_b_c_");
        assert_eq!(attr_env_name("Plain_1"), "SPOTGUARD_ATTR_Plain_1");
    }

    #[test]
    fn a_huge_checkpoint_file_is_refused_after_reading_only_the_limit() {
        let dir = std::env::temp_dir().join(format!("sg-ckpt-{}", std::process::id()));
        let f = JobFiles::create(&dir, "m-1", "r-1", None).unwrap();
        // A sparse 1 GiB file: reading it whole would take a gigabyte.
        let file = std::fs::File::create(&f.checkpoint).unwrap();
        file.set_len(1 << 30).unwrap();
        let e = f.checkpoint(1024).unwrap_err();
        assert!(e.contains("1024") || e.contains("bytes"), "{e}");
        std::fs::write(&f.checkpoint, "s3://b/k\n").unwrap();
        assert_eq!(f.checkpoint(1024).unwrap().as_deref(), Some("s3://b/k"));
        f.remove();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn checkpoint_values() {
        assert_eq!(
            checkpoint_value(b"  s3://b/k \n", 64),
            Ok(Some("s3://b/k".into()))
        );
        assert_eq!(checkpoint_value(b" \n", 64), Ok(None));
        assert!(checkpoint_value(&[0xff, 0xfe], 64).is_err());
        assert!(checkpoint_value(b"a\0b", 64).is_err());
        assert!(checkpoint_value(&[b'x'; 65], 64)
            .unwrap_err()
            .contains("65 bytes"));
    }

    #[test]
    fn job_files_stay_inside_the_state_dir() {
        let base = std::env::temp_dir().join(format!("spotguard-jobfiles-{}", std::process::id()));
        let f = JobFiles::create(&base, "../../etc/passwd", "r", None).unwrap();
        assert!(f.dir.starts_with(base.join("jobs")));
        assert!(!f.dir.to_string_lossy().contains(".."));
        std::fs::write(&f.checkpoint, "42\n").unwrap();
        assert_eq!(f.checkpoint(16), Ok(Some("42".into())));
        // A new run of the same message starts without the old files.
        let again = JobFiles::create(&base, "../../etc/passwd", "r", None).unwrap();
        assert_eq!(again.checkpoint(16), Ok(None));
        // The same message delivered twice at once: one directory each, and
        // the first to finish leaves the other's files alone.
        let first = JobFiles::create(&base, "m-twice", "r1", None).unwrap();
        let second = JobFiles::create(&base, "m-twice", "r2", None).unwrap();
        assert_ne!(first.dir, second.dir);
        std::fs::write(&second.checkpoint, "s3://b/k\n").unwrap();
        first.remove();
        assert_eq!(second.checkpoint(16), Ok(Some("s3://b/k".into())));
        let _ = std::fs::remove_dir_all(base);
    }

    #[test]
    fn links_and_fifos_the_job_leaves_in_its_directory_are_not_followed() {
        use std::os::unix::ffi::OsStrExt;
        let base = std::env::temp_dir().join(format!("sg-links-{}", std::process::id()));
        let f = JobFiles::create(&base, "m-link", "r", None).unwrap();
        let secret = base.join("secret");
        std::fs::write(&secret, "token").unwrap();
        // A checkpoint that links to a file the job may not read: refused,
        // not carried into the next message.
        std::os::unix::fs::symlink(&secret, &f.checkpoint).unwrap();
        let e = f.checkpoint(1024).unwrap_err();
        assert!(e.starts_with("cannot read "), "{e}");
        // A link at the notice's temporary name: the notice is written, the
        // linked file untouched.
        std::os::unix::fs::symlink(&secret, f.dir.join(".notice.json.tmp")).unwrap();
        write_notice(&f, "{\"kind\":\"spot\"}");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "token");
        assert_eq!(
            std::fs::read_to_string(&f.notice).unwrap(),
            "{\"kind\":\"spot\"}"
        );
        // A FIFO with no writer would block a plain open for ever.
        std::fs::remove_file(&f.checkpoint).unwrap();
        let c = std::ffi::CString::new(f.checkpoint.as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let g = f.clone();
        std::thread::spawn(move || tx.send(g.checkpoint(1024)).unwrap());
        let got = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("reading a FIFO checkpoint returned");
        assert_eq!(
            got,
            Err(format!("{} is not a regular file", f.checkpoint.display()))
        );
        let _ = std::fs::remove_dir_all(base);
    }

    #[tokio::test]
    async fn a_job_runs_as_the_job_user_with_its_group_only_no_capability_and_a_raised_oom_score() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: switching a job to another user needs root here");
            return;
        }
        let user = crate::jobuser::resolve(Some("nobody"), &[])
            .unwrap()
            .expect("nobody is another user than root");
        let base = std::env::temp_dir().join(format!("sg-jobuser-{}", std::process::id()));
        let files = JobFiles::create(&base, "m-user", "r", Some(user.gid)).unwrap();
        // The agent's own environment (here cargo's, set for every test
        // run) does not reach the job.
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let script = "{ id -u; id -G; grep -E '^Cap(Prm|Eff|Amb|Inh):' /proc/self/status; \
                      cat /proc/self/oom_score_adj; pwd; \
                      echo \"secret=${CARGO_MANIFEST_DIR:-}\"; } > out; \
                      echo s3://bucket/ckpt > \"$SPOTGUARD_CHECKPOINT_FILE\"";
        let spec = WorkerSpec {
            state_dir: base.clone(),
            job_user: Some(user.clone()),
            ..test_spec(sh(script))
        };
        let msg = plain_msg("m-user");
        let (_tx, rx) = watch::channel(None);
        let ended = execute(&spec, &msg, Some(&files), rx, std::future::pending()).await;
        assert_eq!(ended.outcome, Outcome::Succeeded);
        let out = std::fs::read_to_string(files.dir.join("out")).unwrap();
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        assert_eq!(lines[0], user.uid.to_string(), "{out}");
        // Its own group only: none of the agent's (root's) groups.
        assert_eq!(lines[1], user.gid.to_string(), "{out}");
        for (line, cap) in lines[2..6]
            .iter()
            .zip(["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"])
        {
            assert_eq!(
                line.split_whitespace().collect::<Vec<_>>(),
                [cap, "0000000000000000"],
                "{out}"
            );
        }
        assert_eq!(lines[6], "500", "{out}");
        assert_eq!(std::path::Path::new(lines[7]), files.dir.as_path(), "{out}");
        assert_eq!(lines[8], "secret=", "{out}");
        // Its files are left to its group, which the agent reads them through.
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let m = std::fs::metadata(files.dir.join("out")).unwrap();
        assert_eq!((m.uid(), m.gid()), (user.uid, user.gid));
        assert_eq!(m.permissions().mode() & 0o077, 0o060);
        assert_eq!(files.checkpoint(1024), Ok(Some("s3://bucket/ckpt".into())));
        // The notice the agent writes is the job user's group's to read.
        write_notice(&files, "{}");
        let m = std::fs::metadata(&files.notice).unwrap();
        assert_eq!((m.gid(), m.permissions().mode() & 0o070), (user.gid, 0o040));
        files.remove();
        assert!(!files.dir.exists());
        let _ = std::fs::remove_dir_all(base);
    }

    #[tokio::test]
    async fn http_mode_follows_no_redirect() {
        // The app answers 307 to another server, which counts what reaches it.
        let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other = format!("http://{}/steal", elsewhere.local_addr().unwrap());
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = hits.clone();
        tokio::spawn(spotguard_common::http::serve(
            elsewhere,
            std::future::pending(),
            move |_req| {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async {
                    Ok::<_, std::convert::Infallible>(spotguard_common::http::reply(
                        200,
                        "text/plain",
                        "",
                    ))
                }
            },
        ));
        let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/job", app.local_addr().unwrap());
        tokio::spawn(spotguard_common::http::serve(
            app,
            std::future::pending(),
            move |_req| {
                let mut r = spotguard_common::http::reply(307, "text/plain", "");
                r.headers_mut()
                    .insert(hyper::header::LOCATION, other.parse().unwrap());
                async move { Ok::<_, std::convert::Infallible>(r) }
            },
        ));
        let spec = test_spec(WorkerMode::Http(url));
        let msg = plain_msg("m-redirect");
        let (_tx, rx) = watch::channel(None);
        let ended = execute(&spec, &msg, None, rx, std::future::pending()).await;
        assert_eq!(
            ended.outcome,
            Outcome::Failed("worker answered HTTP 307 Temporary Redirect".into())
        );
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    /// An sqsd-style app on loopback that never answers the job request and
    /// records every request line and body it gets.
    async fn silent_app() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let mut got = Vec::new();
                    while let Ok(n) = sock.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&got).to_string();
                        if text.starts_with("POST /notice") && text.contains("}") {
                            log.lock().unwrap().push(text);
                            let _ = tokio::io::AsyncWriteExt::write_all(
                                &mut sock,
                                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                            )
                            .await;
                            return;
                        }
                    }
                });
            }
        });
        (url, seen)
    }

    /// A worker of `mode` on queue `jobs`, 300 ms of grace, no notices.
    fn test_spec(mode: WorkerMode) -> WorkerSpec {
        WorkerSpec {
            mode,
            queue_url: "https://sqs.us-east-1.amazonaws.com/1/jobs".into(),
            queue_name: "jobs".into(),
            term_grace: Duration::from_millis(300),
            content_type: "application/json".into(),
            env: Vec::new(),
            http: http_client().unwrap(),
            notice_signal: None,
            notice_url: None,
            state_dir: std::env::temp_dir(),
            periodic_seen: Default::default(),
            periodic_senders: Vec::new(),
            job_user: None,
            oom_score_adj: 500,
            stuck: Default::default(),
        }
    }

    #[tokio::test]
    async fn http_mode_tells_the_app_to_stop_a_job_it_abandons() {
        let (url, seen) = silent_app().await;
        let spec = WorkerSpec {
            term_grace: Duration::from_secs(1),
            notice_url: Some(format!("{url}/notice")),
            ..test_spec(WorkerMode::Http(format!("{url}/job")))
        };
        let msg = Message {
            id: "m-stop".into(),
            receipt: "r".into(),
            body: "{}".into(),
            receive_count: 1,
            first_received_ms: None,
            attributes: Default::default(),
            group_id: None,
            sender_id: None,
            sent_ms: None,
        };
        let (_tx, rx) = watch::channel(None);
        let stop = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            StopReason::Deadline
        };
        let t0 = std::time::Instant::now();
        let ended = execute(&spec, &msg, None, rx, stop).await;
        assert_eq!(ended.outcome, Outcome::Stopped(StopReason::Deadline));
        // The slot is held for the grace (1 s) after the stop (at 0.2 s).
        assert!(
            t0.elapsed() >= Duration::from_millis(1200),
            "{:?}",
            t0.elapsed()
        );
        for _ in 0..100 {
            if !seen.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].contains("\"kind\":\"stop\"") && got[0].contains("\"reason\":\"deadline\""),
            "{}",
            got[0]
        );
        assert!(got[0].contains("m-stop"), "{}", got[0]);
    }

    #[tokio::test]
    async fn a_worker_that_leaves_stdin_unread_and_a_child_behind_settles_on_its_exit() {
        // The worker reads nothing, starts a helper that inherits stdin and
        // sleeps, and exits 0; the body is bigger than a pipe holds.
        let dir = std::env::temp_dir().join(format!("sg-stdin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = WorkerSpec {
            state_dir: dir.clone(),
            ..test_spec(sh("sleep 30 & exit 0"))
        };
        let msg = Message {
            id: "m-big".into(),
            receipt: "r".into(),
            body: "x".repeat(300_000),
            receive_count: 1,
            first_received_ms: None,
            attributes: Default::default(),
            group_id: None,
            sender_id: None,
            sent_ms: None,
        };
        let (_tx, rx) = watch::channel(None);
        let started = std::time::Instant::now();
        let ended = tokio::time::timeout(
            Duration::from_secs(10),
            execute(&spec, &msg, None, rx, std::future::pending()),
        )
        .await
        .expect("the job settled on the worker's exit, not on its helper");
        assert_eq!(ended.outcome, Outcome::Succeeded);
        assert!(started.elapsed() < Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A job run by `/bin/sh -c script` (no shell ever sees a message:
    /// the script is the test's own).
    fn sh(script: &str) -> WorkerMode {
        WorkerMode::Exec(vec!["/bin/sh".into(), "-c".into(), script.into()])
    }

    /// A plain job's message (a periodic task's, without its attributes).
    fn plain_msg(id: &str) -> Message {
        Message {
            attributes: Default::default(),
            ..periodic_msg(id)
        }
    }

    fn periodic_msg(id: &str) -> Message {
        Message {
            id: id.into(),
            receipt: "r".into(),
            body: "elasticbeanstalk scheduled job".into(),
            receive_count: 1,
            first_received_ms: None,
            attributes: [
                ("beanstalk.sqsd.task_name", "report"),
                ("beanstalk.sqsd.scheduled_time", "2026-11-29T03:00:00+00:00"),
                ("beanstalk.sqsd.path", "/tasks/report"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), crate::aws::Attr::string(v)))
            .collect(),
            group_id: None,
            sender_id: Some("AROAEXAMPLE:spotguard-controller".into()),
            sent_ms: Some(1_795_000_000_000),
        }
    }

    #[tokio::test]
    async fn a_periodic_task_is_posted_to_its_path_with_the_sqsd_headers_once_per_instance() {
        use spotguard_common::http::{body_bytes, reply, serve};
        type Seen =
            Arc<std::sync::Mutex<Vec<(String, std::collections::BTreeMap<String, String>, usize)>>>;
        let seen: Seen = Arc::default();
        let answer = Arc::new(std::sync::atomic::AtomicU16::new(500));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (s, a) = (seen.clone(), answer.clone());
        tokio::spawn(serve(
            listener,
            std::future::pending(),
            move |req: hyper::Request<hyper::body::Incoming>| {
                let (s, a) = (s.clone(), a.clone());
                async move {
                    let path = req.uri().path().to_string();
                    let headers = req
                        .headers()
                        .iter()
                        .map(|(k, v)| {
                            (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())
                        })
                        .collect();
                    let n = body_bytes(req.into_body()).await.len();
                    s.lock().unwrap().push((path, headers, n));
                    let status = a.load(std::sync::atomic::Ordering::Relaxed);
                    Ok::<_, std::convert::Infallible>(reply(status, "text/plain", ""))
                }
            },
        ));
        let spec = test_spec(WorkerMode::Http(format!("http://{addr}/work")));
        let run = |m: Message| {
            let spec = spec.clone();
            async move {
                let (_tx, rx) = watch::channel(None);
                execute(&spec, &m, None, rx, std::future::pending())
                    .await
                    .outcome
            }
        };
        // The app fails the first try: not remembered, so the retry runs.
        assert!(matches!(run(periodic_msg("m1")).await, Outcome::Failed(_)));
        answer.store(200, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(run(periodic_msg("m1")).await, Outcome::Succeeded);
        // The same slot sent twice: deleted here without running again.
        assert_eq!(run(periodic_msg("m2")).await, Outcome::Succeeded);
        let seen_ref = seen.clone();
        let seen_len = |s: &Seen| s.lock().unwrap().len();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        let (path, h, body_len) = &seen[1];
        assert_eq!(path, "/tasks/report");
        assert_eq!(*body_len, 0, "sqsd posts a periodic task without a body");
        assert_eq!(h["x-aws-sqsd-taskname"], "report");
        assert_eq!(h["x-aws-sqsd-scheduled-at"], "2026-11-29T03:00:00Z");
        assert_eq!(h["x-aws-sqsd-path"], "/tasks/report");
        assert_eq!(
            h["x-aws-sqsd-sender-id"],
            "AROAEXAMPLE:spotguard-controller"
        );
        assert_eq!(h["x-aws-sqsd-msgid"], "m1");
        assert!(h.contains_key("x-aws-sqsd-sent-at"));
        assert!(
            h.keys()
                .all(|k| !k.starts_with("x-aws-sqsd-attr-beanstalk")),
            "{h:?}"
        );
        drop(seen);
        // A forged copy of the slot from another sender is not "already
        // run" here: the real one is not silenced by it, nor it by the real.
        let forged = Message {
            sender_id: Some("AIDAFORGER".into()),
            ..periodic_msg("m3")
        };
        assert_eq!(run(forged.clone()).await, Outcome::Succeeded);
        assert_eq!(
            seen_len(&seen_ref),
            3,
            "the forged copy ran as its own slot"
        );
        // With the senders listed, the forged one fails (the message's fault)
        // and never reaches the app; the controller's, session and all, runs.
        let strict = WorkerSpec {
            periodic_senders: vec!["AROAEXAMPLE".into()],
            periodic_seen: Default::default(),
            ..spec.clone()
        };
        let before = seen_len(&seen_ref);
        let (_tx, rx) = watch::channel(None);
        let ended = execute(&strict, &forged, None, rx, std::future::pending()).await;
        assert_eq!(
            ended.outcome,
            Outcome::Failed(
                "periodic task \"report\" sent by \"AIDAFORGER\", not one of worker.periodic_sender_ids".into()
            )
        );
        assert_eq!(seen_len(&seen_ref), before);
        let (_tx, rx) = watch::channel(None);
        let ended = execute(
            &strict,
            &periodic_msg("m4"),
            None,
            rx,
            std::future::pending(),
        )
        .await;
        assert_eq!(ended.outcome, Outcome::Succeeded);
        assert_eq!(seen_len(&seen_ref), before + 1);
    }

    #[test]
    fn a_missing_or_unexecutable_program_is_found_without_a_message() {
        let dir = std::env::temp_dir().join(format!("sg-prog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("run-job");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let p = script.to_str().unwrap();
        assert_eq!(
            program_ready(p, None),
            Err(format!("worker.command {p}: not an executable file"))
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(program_ready(p, None), Ok(()));
        assert!(program_ready("/nonexistent/run-job", None)
            .unwrap_err()
            .starts_with("worker.command /nonexistent/run-job: "));
        // A bare name is looked up on PATH, as exec does.
        let path = std::ffi::OsString::from(format!("/nonexistent:{}", dir.display()));
        assert_eq!(program_ready("run-job", Some(&path)), Ok(()));
        assert_eq!(
            program_ready("no-such-job", Some(&path)),
            Err("worker.command no-such-job: not found on PATH".into())
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_stopped_job_and_its_helpers_are_gone_within_one_grace() {
        // The leader leaves 1.5 s after SIGTERM; its helper ignores SIGTERM.
        let script = "(trap '' TERM; exec sleep 30) & \
                      trap 'sleep 1.5; exit 0' TERM; \
                      while :; do sleep 0.1; done";
        let spec = WorkerSpec {
            term_grace: Duration::from_secs(2),
            ..test_spec(sh(script))
        };
        let msg = plain_msg("m-grace");
        let (_tx, rx) = watch::channel(None);
        let stop = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            StopReason::Deadline
        };
        let t0 = std::time::Instant::now();
        let ended = execute(&spec, &msg, None, rx, stop).await;
        let took = t0.elapsed() - Duration::from_millis(300);
        assert_eq!(ended.outcome, Outcome::Stopped(StopReason::Deadline));
        // One grace (2 s), not the leader's 1.5 s and then a second grace
        // (3.5 s).
        assert!(took < Duration::from_millis(3000), "{took:?}");
        assert!(took >= Duration::from_millis(1900), "{took:?}");
    }

    #[tokio::test]
    async fn a_process_that_escaped_its_job_is_ended_when_no_job_runs() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: switching a job to another user needs root here");
            return;
        }
        // A uid no one else uses here, so the sweep touches nothing else.
        let uid = 64_321;
        let user = crate::jobuser::JobUser {
            name: "sg-test-stray".into(),
            uid,
            gid: uid,
            groups: vec![uid],
        };
        let spec = WorkerSpec {
            job_user: Some(user),
            // Its own session: out of the job's process group.
            ..test_spec(sh(
                "setsid sleep 300 </dev/null >/dev/null 2>&1 & sleep 0.5; exit 0",
            ))
        };
        let msg = plain_msg("m-stray");
        let (_tx, rx) = watch::channel(None);
        let ended = execute(&spec, &msg, None, rx, std::future::pending()).await;
        assert_eq!(ended.outcome, Outcome::Succeeded);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let strays = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
                .filter(|s| s.contains(&format!("Uid:\t{uid}\t")) && !s.contains("State:\tZ"))
                .count()
        };
        assert_eq!(strays(), 1, "the escapee outlived its job");
        spec.all_done();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(strays(), 0);
    }

    #[tokio::test]
    async fn an_attribute_too_big_for_the_environment_reaches_the_job_as_a_file() {
        let base = std::env::temp_dir().join(format!("sg-bigattr-{}", std::process::id()));
        let files = JobFiles::create(&base, "m-big-attr", "r", None).unwrap();
        // 200 KiB: over Linux's 128 KiB for one environment string, so as a
        // variable the start fails (E2BIG) for every try of the message.
        let big = "p".repeat(200 * 1024);
        let mut msg = plain_msg("m-big-attr");
        msg.attributes
            .insert("prompt".into(), crate::aws::Attr::string(big.clone()));
        let script = "test -z \"${SPOTGUARD_ATTR_prompt:-}\" && wc -c < \"$SPOTGUARD_ATTR_prompt_FILE\" > \"$SPOTGUARD_CHECKPOINT_FILE.out\"";
        let spec = WorkerSpec {
            state_dir: base.clone(),
            ..test_spec(sh(script))
        };
        let (_tx, rx) = watch::channel(None);
        let ended = execute(&spec, &msg, Some(&files), rx, std::future::pending()).await;
        assert_eq!(ended.outcome, Outcome::Succeeded);
        let n = std::fs::read_to_string(files.dir.join("checkpoint.out")).unwrap_or_default();
        assert_eq!(n.trim(), big.len().to_string());
        let _ = std::fs::remove_dir_all(base);
    }

    #[test]
    fn queue_input_in_a_log_line_is_escaped_and_capped() {
        assert_eq!(
            loggable("nightly\nFAKE: root login"),
            "nightly\\nFAKE: root login"
        );
        let long = "x".repeat(500);
        let shown = loggable(&long);
        assert_eq!(shown.chars().count(), 201);
        assert!(shown.ends_with('…'));
        assert!(!sender_allowed(&["AROAEXAMPLE".into()], None));
        assert!(sender_allowed(&[], None));
        assert!(!sender_allowed(
            &["AROAEXAMPLE".into()],
            Some("AROAEXAMPLEX:s")
        ));
    }

    #[test]
    fn a_task_path_cannot_take_the_post_to_another_host() {
        let app = "http://127.0.0.1:8080/work";
        assert_eq!(
            task_url(app, "/tasks/report").unwrap(),
            "http://127.0.0.1:8080/tasks/report"
        );
        assert_eq!(
            task_url(app, "/t?x=1").unwrap(),
            "http://127.0.0.1:8080/t?x=1"
        );
        assert_eq!(task_url(app, "/a/../b").unwrap(), "http://127.0.0.1:8080/b");
        for evil in [
            "http://169.254.169.254/latest",
            "//evil.example/x",
            "/\\evil.example/x",
            "evil",
            "/x y",
            "/x\nHost: evil",
            "https://127.0.0.1:8080/x",
        ] {
            assert!(task_url(app, evil).is_err(), "{evil:?}");
        }
    }
}
