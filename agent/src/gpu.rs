//! The built-in GPU checks (`[health] gpu`): a broken GPU found before it
//! eats the queue. Each check's verdict is a pure function of what
//! `nvidia-smi` printed and what the kernel logged ([`judge`],
//! [`judge_xids`]); [`GpuCheck`] gathers them.
//!
//! - **Count**: the GPUs `nvidia-smi` lists equal the instance type's
//!   (`health.gpu_count` overrides; [`expected_gpus`]). One GPU of four
//!   gone is the commonest silent failure: jobs still start.
//! - **Answers**: `nvidia-smi` answers within [`SMI_TIMEOUT`] and succeeds;
//!   a hung driver is the commonest GPU failure of all.
//! - **Memory**: no uncorrectable (volatile) ECC error, no page retirement
//!   pending, no row remapping failure, and no field reading an error of
//!   the GPU's own (`[Unknown Error]`). NVIDIA's "GPU memory error
//!   management": a pending retirement takes effect only at the next reset,
//!   and a remapping failure means the GPU should be serviced; a remapping
//!   *pending* does not affect new work (NVML) and passes.
//! - **Xid**: no Xid event since boot among those NVIDIA's "Xid Errors"
//!   catalogue resolves by resetting or replacing the GPU ([`FATAL_XIDS`]),
//!   read from the kernel's messages as the agent's user can, without a
//!   shell: through `journalctl -k` (the unit puts the agent in group
//!   `systemd-journal`; `ProtectKernelLogs=yes` stays, and the agent holds
//!   no CAP_SYSLOG), or from a file of `/dev/kmsg` records.
//!
//! A failure here lasts (`nvidia-smi` not answering: from the third check in
//! a row): nothing short of a reset or a new instance brings the GPU back,
//! so the instance is unhealthy for good (the notice sent; replaced under
//! `on_unhealthy = "replace"`, once idle).

use std::io::BufRead;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::health::{CheckFuture, HealthCheck, Outcome};

/// `nvidia-smi` answers a query in well under a second with the driver
/// loaded and persistence mode on, and in a few seconds per GPU without
/// it: 20 s is a hung driver (or eight GPUs initialised cold), and well
/// under the 60 s `health.interval`.
pub const SMI_TIMEOUT: Duration = Duration::from_secs(20);

/// `nvidia-smi` failing this many checks in a row (over 2 minutes at the
/// default interval) is a GPU or driver gone for good; fewer close intake
/// only while they last (a slow first query without persistence mode, a
/// check racing the driver's start).
pub const SMI_FAILURES_LASTING: u32 = 3;

/// The query: one CSV line per GPU.
pub const QUERY: &str = "index,pci.bus_id,ecc.errors.uncorrected.volatile.total,retired_pages.pending,remapped_rows.pending,remapped_rows.failure";
/// What every driver answers, for one that does not know a memory field.
pub const QUERY_BASIC: &str = "index,pci.bus_id";

/// Xid events after which the GPU is not fit for jobs until it is reset or
/// replaced (NVIDIA, "Xid Errors" and "GPU memory error management").
/// Application faults (13, 31, 43, 45) and a recorded remapping (63) are
/// not among them: the next job may well run. 94 (a contained ECC error) is
/// borderline: NVIDIA restarts the application and resets the GPU "at the
/// earliest convenience"; counted, as the issue asks, since jobs here are
/// the applications.
pub const FATAL_XIDS: &[(u32, &str)] = &[
    (48, "double-bit (uncorrectable) ECC error"),
    (62, "internal micro-controller halt"),
    (
        64,
        "ECC page retirement or row remapping could not be recorded",
    ),
    (74, "NVLink error"),
    (79, "the GPU has fallen off the bus"),
    (94, "contained ECC error"),
    (95, "uncontained ECC error"),
    (119, "GSP RPC timeout"),
    (120, "GSP error"),
    (140, "unrecovered ECC error"),
    // The driver's own verdict: a recovery action (GPU reset, node reboot)
    // required. One that goes back to "None" is not itself counted; an
    // earlier one still stands (the GPU was reset, or the instance goes).
    (154, "the driver asks for a GPU reset or a reboot"),
];

/// The GPUs of an instance type (Amazon EC2 accelerated computing instance
/// specifications), for the families spotguard is run on; `None` for any
/// other (the count is then checked only against `health.gpu_count`).
pub fn expected_gpus(instance_type: &str) -> Option<u32> {
    let (family, size) = instance_type.split_once('.')?;
    // Exact sizes only: a size guessed wrong makes every such instance
    // unhealthy (p5.4xlarge has one H100, p5.48xlarge eight).
    let n = match (family, size) {
        ("g4dn", "xlarge" | "2xlarge" | "4xlarge" | "8xlarge" | "16xlarge") => 1,
        ("g4dn", "12xlarge") => 4,
        ("g4dn", "metal") => 8,
        ("g5" | "g6" | "g6e", "xlarge" | "2xlarge" | "4xlarge" | "8xlarge" | "16xlarge") => 1,
        ("g5" | "g6" | "g6e", "12xlarge" | "24xlarge") => 4,
        ("g5" | "g6" | "g6e", "48xlarge") => 8,
        ("g5g", "xlarge" | "2xlarge" | "4xlarge" | "8xlarge") => 1,
        ("g5g", "16xlarge" | "metal") => 2,
        ("p3", "2xlarge") => 1,
        ("p3", "8xlarge") => 4,
        ("p3", "16xlarge") => 8,
        ("p3dn", "24xlarge") => 8,
        ("p4d" | "p4de", "24xlarge") => 8,
        ("p5", "4xlarge") => 1,
        ("p5" | "p5e" | "p5en", "48xlarge") => 8,
        _ => return None,
    };
    Some(n)
}

/// One GPU as the query lists it. `None`: the driver reports the field as
/// not available on this GPU (`[N/A]`, `[Not Supported]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    pub bus: String,
    pub ecc_uncorrected: Option<u64>,
    pub retirement_pending: Option<bool>,
    pub remap_pending: Option<bool>,
    pub remap_failed: Option<bool>,
}

/// `nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits` output;
/// with [`QUERY_BASIC`] only the first two fields are there. A field the
/// GPU does not have reads `[N/A]` or `[Not Supported]`; any other value
/// than a number (or Yes/No) is the GPU's own error (`[Unknown Error]`,
/// `[GPU requires reset]`), and an error here.
pub fn parse_query(text: &str) -> Result<Vec<Gpu>, String> {
    let na = |v: &str| matches!(v, "[N/A]" | "N/A" | "[Not Supported]" | "Not Supported");
    let mut gpus = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() < 2 || f[0].parse::<u32>().is_err() {
            return Err(format!("nvidia-smi printed an unreadable line: {line:?}"));
        }
        let bad = |i: usize| format!("GPU {}: field {} reads {:?}", f[1], i + 1, f[i]);
        // Retirement reads Yes/No; remapped rows may read 0/1 (drivers
        // differ; tools parse them as integers).
        let flag = |i: usize| -> Result<Option<bool>, String> {
            match f.get(i).copied() {
                None => Ok(None),
                Some(v) if na(v) => Ok(None),
                Some("Yes") => Ok(Some(true)),
                Some("No") => Ok(Some(false)),
                Some(v) => v.parse::<u64>().map(|n| Some(n > 0)).map_err(|_| bad(i)),
            }
        };
        let ecc = match f.get(2).copied() {
            None => None,
            Some(v) if na(v) => None,
            Some(v) => Some(v.parse::<u64>().map_err(|_| bad(2))?),
        };
        gpus.push(Gpu {
            bus: f[1].to_string(),
            ecc_uncorrected: ecc,
            retirement_pending: flag(3)?,
            remap_pending: flag(4)?,
            remap_failed: flag(5)?,
        });
    }
    Ok(gpus)
}

/// The count and memory checks on what the query listed. `memory`: the
/// memory fields were queried (a driver that knows them).
pub fn judge(gpus: &[Gpu], expected: Option<u32>, memory: bool) -> Outcome {
    let listed = u32::try_from(gpus.len()).unwrap_or(u32::MAX);
    let mut out = match expected {
        Some(n) if listed != n => Outcome::fail(
            "gpu_count",
            format!("{listed} GPU(s) listed by nvidia-smi, {n} expected"),
            true,
        ),
        None if listed == 0 => {
            Outcome::fail("gpu_count", "no GPU listed by nvidia-smi".into(), true)
        }
        _ => Outcome::pass("gpu_count"),
    };
    if memory {
        let bad: Vec<String> = gpus
            .iter()
            .filter_map(|g| {
                let mut why = Vec::new();
                if let Some(n) = g.ecc_uncorrected.filter(|n| *n > 0) {
                    why.push(format!("{n} uncorrectable ECC error(s)"));
                }
                if g.retirement_pending == Some(true) {
                    why.push("a page retirement pending".to_string());
                }
                // A remapping pending is not among them: NVML says it
                // "won't affect future work on the GPU" (error containment
                // and dynamic page blacklisting cover it until the reset).
                if g.remap_failed == Some(true) {
                    why.push("a row remapping failure".to_string());
                }
                (!why.is_empty()).then(|| format!("GPU {}: {}", g.bus, why.join(", ")))
            })
            .collect();
        out = out.and(if bad.is_empty() {
            Outcome::pass("gpu_memory")
        } else {
            Outcome::fail("gpu_memory", bad.join("; "), true)
        });
    }
    out
}

/// The Xid events in kernel log text (one record or line each): (Xid, the
/// GPU's PCI address), from NVIDIA's form `NVRM: Xid (PCI:0000:00:1e): 79,
/// pid=..., ...`; a `/dev/kmsg` record's `pri,seq,time,flags;` prefix is
/// skipped.
pub fn xids_in(text: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(at) = line.find("NVRM: Xid (") else {
            continue;
        };
        let rest = &line[at + "NVRM: Xid (".len()..];
        let Some((inside, after)) = rest.split_once("): ") else {
            continue;
        };
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        // Xid 154 going back to no recovery action: not itself a failure.
        if digits == "154" && after.contains("to 0x0 (None)") {
            continue;
        }
        if let Ok(code) = digits.parse() {
            let bus = inside.split_whitespace().next().unwrap_or(inside);
            out.push((code, bus.trim_start_matches("PCI:").to_string()));
        }
    }
    out
}

/// Adds the fatal ones among `xids` to `fatal`, each (Xid, GPU) once: the
/// list is bounded by the catalogue and the GPUs, not by the log.
fn remember_fatal(fatal: &mut Vec<(u32, String)>, xids: Vec<(u32, String)>) {
    for x in xids {
        if FATAL_XIDS.iter().any(|(c, _)| *c == x.0) && !fatal.contains(&x) {
            fatal.push(x);
        }
    }
}

/// The Xid check on the events seen since boot.
pub fn judge_xids(seen: &[(u32, String)]) -> Outcome {
    let fatal: Vec<String> = seen
        .iter()
        .filter_map(|(code, bus)| {
            FATAL_XIDS
                .iter()
                .find(|(c, _)| c == code)
                .map(|(c, what)| format!("Xid {c} on GPU {bus} ({what})"))
        })
        .collect();
    if fatal.is_empty() {
        Outcome::pass("gpu_xid")
    } else {
        Outcome::fail("gpu_xid", fatal.join("; "), true)
    }
}

/// The kernel log, read from where the last check stopped: `/dev/kmsg`
/// gives each opener the records from the oldest kept, then only new ones,
/// one record per read. Opened without blocking: a read with nothing new
/// answers at once.
struct KernelLog {
    path: PathBuf,
    reader: Option<std::io::BufReader<std::fs::File>>,
    /// Xid events seen since boot (only fatal ones kept: the list is
    /// bounded by the catalogue, not by the log).
    fatal: Vec<(u32, String)>,
    /// Could not be read: said once, and the Xid check left out.
    unreadable: Option<String>,
}

impl KernelLog {
    fn read_new(&mut self) -> Result<(), String> {
        if self.reader.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.path)
                .map_err(|e| format!("{}: {e}", self.path.display()))?;
            self.reader = Some(std::io::BufReader::new(f));
        }
        let Some(r) = self.reader.as_mut() else {
            return Ok(());
        };
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    remember_fatal(&mut self.fatal, xids_in(&line));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                // /dev/kmsg: records were overwritten since the last read;
                // the next read goes on from the oldest kept.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                // Not UTF-8: the record is skipped.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => continue,
                Err(e) => return Err(format!("{}: {e}", self.path.display())),
            }
        }
    }
}

/// Where the kernel's messages are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// `journalctl -k -b`: the journal's copy of this boot's kernel
    /// messages, read whole each time.
    Journal,
    /// A file of `/dev/kmsg` records (or plain lines), read on from where
    /// the last read stopped.
    File(PathBuf),
}

impl KernelSource {
    /// `health.kernel_log`: `journal`, a path, or empty for none.
    pub fn of(setting: &str) -> Option<KernelSource> {
        match setting.trim() {
            "" => None,
            "journal" => Some(KernelSource::Journal),
            path => Some(KernelSource::File(PathBuf::from(path))),
        }
    }
}

/// The Xid events in `journalctl -o cat` output.
pub fn journal_read(text: &str) -> Vec<(u32, String)> {
    text.lines().flat_map(xids_in).collect()
}

/// The fatal Xids the journal has shown since boot, kept across reads.
struct Journal {
    fatal: Vec<(u32, String)>,
    warned: bool,
}

/// The GPU checks of one instance.
pub struct GpuCheck {
    pub nvidia_smi: PathBuf,
    pub expected: Option<u32>,
    /// [`SMI_TIMEOUT`]; shorter in tests.
    pub timeout: Duration,
    /// Checks in a row in which `nvidia-smi` did not answer.
    smi_failures: std::sync::atomic::AtomicU32,
    log: Option<Arc<Mutex<KernelLog>>>,
    journal: Option<tokio::sync::Mutex<Journal>>,
}

impl GpuCheck {
    /// `kernel_log`: where Xid events are read (`None`: no Xid check).
    pub fn new(
        nvidia_smi: PathBuf,
        expected: Option<u32>,
        kernel_log: Option<KernelSource>,
    ) -> GpuCheck {
        let (file, journal) = match kernel_log {
            None => (None, None),
            Some(KernelSource::Journal) => (
                None,
                Some(tokio::sync::Mutex::new(Journal {
                    fatal: Vec::new(),
                    warned: false,
                })),
            ),
            Some(KernelSource::File(p)) => (Some(p), None),
        };
        GpuCheck {
            nvidia_smi,
            expected,
            timeout: SMI_TIMEOUT,
            smi_failures: Default::default(),
            journal,
            log: file.map(|path| {
                Arc::new(Mutex::new(KernelLog {
                    path,
                    reader: None,
                    fatal: Vec::new(),
                    unreadable: None,
                }))
            }),
        }
    }

    /// Runs `nvidia-smi` with `query`: its output, or why it failed.
    async fn query(&self, query: &str) -> Result<String, String> {
        let mut cmd = tokio::process::Command::new(&self.nvidia_smi);
        cmd.arg(format!("--query-gpu={query}"))
            .arg("--format=csv,noheader,nounits")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        crate::jobuser::without_capabilities(&mut cmd);
        let smi = self.nvidia_smi.display();
        match tokio::time::timeout(self.timeout, cmd.output()).await {
            Err(_) => Err(format!(
                "nvidia-smi did not answer within {:?} (a hung driver)",
                self.timeout
            )),
            Ok(Err(e)) => Err(format!("{smi}: cannot start: {e}")),
            Ok(Ok(o)) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
            Ok(Ok(o)) => {
                let said = [o.stdout.as_slice(), o.stderr.as_slice()]
                    .iter()
                    .flat_map(|b| {
                        String::from_utf8_lossy(b)
                            .lines()
                            .map(str::to_string)
                            .collect::<Vec<_>>()
                    })
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or_default();
                Err(format!(
                    "nvidia-smi exited with {}: {}",
                    o.status,
                    said.trim()
                ))
            }
        }
    }

    async fn smi(&self) -> Outcome {
        use std::sync::atomic::Ordering;
        let answered = match self.query(QUERY).await {
            Ok(t) => Ok((t, true)),
            // An older driver that does not know a memory field: the count
            // still counts, the memory check is left out.
            Err(e) if e.contains("is not a valid field") => {
                self.query(QUERY_BASIC).await.map(|t| (t, false))
            }
            Err(e) => Err(e),
        };
        let (text, memory) = match answered {
            Ok(a) => a,
            Err(e) => {
                let n = self.smi_failures.fetch_add(1, Ordering::Relaxed) + 1;
                let lasting = n >= SMI_FAILURES_LASTING;
                let why = if lasting {
                    format!("{e} ({n} checks in a row)")
                } else {
                    e
                };
                return Outcome::fail("gpu_answers", why, lasting);
            }
        };
        self.smi_failures.store(0, Ordering::Relaxed);
        match parse_query(&text) {
            Ok(gpus) => Outcome::pass("gpu_answers").and(judge(&gpus, self.expected, memory)),
            // A field reading the GPU's own error: the GPU, not the tool.
            Err(e) if e.starts_with("GPU ") => {
                Outcome::pass("gpu_answers").and(Outcome::fail("gpu_memory", e, true))
            }
            Err(e) => Outcome::fail("gpu_answers", e, true),
        }
    }

    /// The journal's kernel messages of this boot.
    async fn journal_xids(&self, j: &tokio::sync::Mutex<Journal>) -> Outcome {
        let mut j = j.lock().await;
        // The whole boot's kernel messages each time (small), not from a
        // cursor: with a match (-k) and a cursor whose entry was rotated
        // away, systemd before 255 skips the first matching entry (systemd
        // issue 30288; AL2023 ships 252, Ubuntu 22.04 249).
        let mut cmd = tokio::process::Command::new("journalctl");
        cmd.args(["-k", "-b", "-o", "cat", "--no-pager"]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        crate::jobuser::without_capabilities(&mut cmd);
        let why = match tokio::time::timeout(self.timeout, cmd.output()).await {
            Ok(Ok(o)) if o.status.success() => {
                let xids = journal_read(&String::from_utf8_lossy(&o.stdout));
                remember_fatal(&mut j.fatal, xids);
                return judge_xids(&j.fatal);
            }
            Ok(Ok(o)) => format!(
                "journalctl exited with {}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
            ),
            Ok(Err(e)) => format!("journalctl: cannot start: {e}"),
            Err(_) => format!("journalctl did not answer within {:?}", self.timeout),
        };
        if !j.warned {
            j.warned = true;
            tracing::warn!(error = %why, "cannot read the kernel's messages: the Xid check is left out (group systemd-journal, or health.kernel_log)");
        }
        // Events already seen still count.
        if j.fatal.is_empty() {
            Outcome::default()
        } else {
            judge_xids(&j.fatal)
        }
    }

    async fn xids(&self) -> Outcome {
        if let Some(j) = &self.journal {
            return self.journal_xids(j).await;
        }
        let Some(log) = self.log.clone() else {
            return Outcome::default();
        };
        // Reading a file: off the runtime's threads.
        let read = tokio::task::spawn_blocking(move || {
            let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
            match l.read_new() {
                Ok(()) => Ok(l.fatal.clone()),
                Err(e) => {
                    if l.unreadable.is_none() {
                        tracing::warn!(error = %e, "cannot read the kernel log: the Xid check is left out (health.kernel_log)");
                    }
                    l.unreadable = Some(e.clone());
                    Err(e)
                }
            }
        })
        .await;
        match read {
            Ok(Ok(fatal)) => judge_xids(&fatal),
            _ => Outcome::default(),
        }
    }
}

/// The GPU checks `health` asks for on an instance of `instance_type`:
/// `None` when `gpu = "off"`, or `auto` finds no `nvidia-smi`.
pub fn from_config(
    h: &crate::config::HealthConfig,
    instance_type: Option<&str>,
) -> Option<GpuCheck> {
    use crate::config::GpuMode;
    let found =
        crate::worker::program_ready(&h.nvidia_smi, std::env::var_os("PATH").as_deref()).is_ok();
    match h.gpu {
        GpuMode::Off => return None,
        GpuMode::Auto if !found => {
            tracing::info!(nvidia_smi = %h.nvidia_smi, "no nvidia-smi: the GPU checks are off (health.gpu = \"auto\")");
            return None;
        }
        _ => {}
    }
    let expected = h
        .gpu_count
        .or_else(|| instance_type.and_then(expected_gpus));
    // A GPU image on an instance of another type (nvidia-smi there, no GPU)
    // is not a broken GPU: auto wants a GPU instance type, or a count.
    if h.gpu == GpuMode::Auto && expected.is_none() {
        tracing::info!(instance_type = instance_type.unwrap_or("unknown"), "not a GPU instance type spotguard knows and no health.gpu_count: the GPU checks are off (health.gpu = \"auto\")");
        return None;
    }
    if expected.is_none() {
        tracing::warn!(instance_type = instance_type.unwrap_or("unknown"), "the GPU count is not checked (an instance type of no known family): set health.gpu_count");
    }
    Some(GpuCheck::new(
        PathBuf::from(&h.nvidia_smi),
        expected,
        KernelSource::of(&h.kernel_log),
    ))
}

impl HealthCheck for GpuCheck {
    fn check(&self) -> CheckFuture<'_> {
        Box::pin(async move { self.smi().await.and(self.xids().await) })
    }
}

#[cfg(test)]
#[path = "gpu_tests.rs"]
mod tests;
