//! Harness for the end-to-end tests and benchmarks: finds the workspace's
//! binaries, runs them as child processes (the mock IMDS, the agent), reads
//! their output line by line with arrival times, and drives the mock's
//! control API. Everything talks to 127.0.0.1 only.
//!
//! This is test code: it panics with a message on anything unexpected.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod agent_setup;
pub mod aws_env;
pub mod controller_setup;
pub mod proxy;
pub mod serve;

/// Directory holding the workspace binaries: `SPOTGUARD_BIN_DIR`, else the
/// profile directory this executable was built into (`target/debug` for a
/// test in `target/debug/deps`, `target/release` for a benchmark binary).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SPOTGUARD_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary; panics with the fix if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the workspace first (cargo build --workspace), or set SPOTGUARD_BIN_DIR",
        p.display()
    );
    p
}

/// Lines of a child's stdout, each with the instant it was read.
pub struct Lines {
    rx: mpsc::Receiver<(Instant, String)>,
}

impl Lines {
    pub fn new(out: ChildStdout) -> Lines {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Lines { rx }
    }

    /// The next line within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<(Instant, String)> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next line parsed as JSON; panics if it is not JSON.
    pub fn next_json(&self, timeout: Duration) -> Option<Value> {
        self.next(timeout).map(|(_, l)| {
            serde_json::from_str(&l)
                .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}"))
        })
    }

    /// Discards lines already read.
    pub fn drain(&self) -> usize {
        self.rx.try_iter().count()
    }
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(mut cmd: Command, name: &str) -> (Proc, Lines) {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        if std::env::var_os("SPOTGUARD_TEST_VERBOSE").is_none() {
            cmd.stderr(Stdio::null());
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        (
            Proc {
                child,
                name: name.to_string(),
            },
            Lines::new(out),
        )
    }

    /// Spawns a server that reports where it listens on stderr (a line
    /// containing `marker` followed by its URL, as moto's werkzeug prints
    /// ` * Running on http://127.0.0.1:PORT`); returns it and that URL.
    /// stderr keeps being read (and dropped, or echoed with
    /// `SPOTGUARD_TEST_VERBOSE`), so the child never blocks on it.
    pub fn spawn_reporting(mut cmd: Command, name: &str, marker: &str) -> (Proc, String) {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let err = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        let marker = marker.to_string();
        let verbose = std::env::var_os("SPOTGUARD_TEST_VERBOSE").is_some();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if verbose {
                    eprintln!("{line}");
                }
                if let Some((_, url)) = line.split_once(marker.as_str()) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url.trim().to_string());
                    }
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{name} did not report its address"));
        (
            Proc {
                child,
                name: name.to_string(),
            },
            url,
        )
    }

    /// Spawns with stdout and stderr appended to `log` (no line reader).
    pub fn spawn_logged(mut cmd: Command, name: &str, log: &std::path::Path) -> Proc {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let f2 = f.try_clone().expect("clone log handle");
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `INT`, `USR1`, `KILL`).
    pub fn signal(&self, sig: &str) {
        use nix::sys::signal::{kill, Signal};
        let signal: Signal = format!("SIG{sig}")
            .parse()
            .unwrap_or_else(|e| panic!("signal {sig}: {e}"));
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid()).expect("pid"));
        kill(pid, signal).unwrap_or_else(|e| panic!("kill -{sig} {}: {e}", self.name));
    }

    /// Waits for the exit status up to `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `spotguard-imds-mock` on a free loopback port, with its typed control
/// client.
pub struct MockImds {
    pub proc: Proc,
    pub url: String,
    pub ctl: spotguard_imds_mock::control::Control,
}

impl MockImds {
    pub fn start(extra: &[&str]) -> MockImds {
        let mut cmd = Command::new(bin("spotguard-imds-mock"));
        cmd.args(["--listen", "127.0.0.1:0"]).args(extra);
        let (proc, lines) = Proc::spawn(cmd, "spotguard-imds-mock");
        let (_, first) = lines
            .next(Duration::from_secs(10))
            .expect("spotguard-imds-mock printed no address");
        let url = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {first}"))
            .to_string();
        let (_, second) = lines
            .next(Duration::from_secs(10))
            .expect("spotguard-imds-mock printed no control token");
        let token = second
            .strip_prefix("control token: ")
            .unwrap_or_else(|| panic!("unexpected second line: {second}"))
            .to_string();
        MockImds {
            proc,
            ctl: spotguard_imds_mock::control::Control::new(url.clone()).with_token(token),
            url,
        }
    }

    /// POSTs to the control API and returns the JSON answer; panics unless 200.
    pub fn control(&self, path: &str, body: Value) -> Value {
        self.ctl.post(path, &body).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn raw(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.ctl
            .raw(method, path, body)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The mock's request counts.
    pub fn requests(&self) -> spotguard_imds_mock::control::Requests {
        self.ctl.requests().unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A small deterministic generator (xorshift), so runs repeat with a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Resident memory (VmRSS) and CPU time (user + system) of a process, from /proc.
pub fn proc_usage(pid: u32) -> Option<(u64, Duration)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = clock_ticks_per_second();
    Some((rss_kib, Duration::from_secs_f64(ticks as f64 / hz)))
}

fn clock_ticks_per_second() -> f64 {
    use nix::unistd::{sysconf, SysconfVar};
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as f64,
        _ => 100.0,
    }
}

/// Median and max of a sample, in the sample's unit.
pub fn median_max(xs: &[f64]) -> (f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[n - 1])
}

/// A fresh directory under the system temp dir (tempfile's), removed on
/// drop unless `SPOTGUARD_KEEP_TMP` is set (then its path is printed).
pub struct TempDir(Option<tempfile::TempDir>);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let d = tempfile::Builder::new()
            .prefix(&format!("spotguard-{tag}-"))
            .tempdir()
            .expect("temp dir");
        TempDir(Some(d))
    }
    pub fn path(&self) -> &std::path::Path {
        self.0
            .as_ref()
            .map_or(std::path::Path::new("/nonexistent"), |d| d.path())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let (Some(d), true) = (
            self.0.take(),
            std::env::var_os("SPOTGUARD_KEEP_TMP").is_some(),
        ) {
            eprintln!("kept {}", d.keep().display());
        }
    }
}

/// The test worker's record file: lines `start ID COUNT PID AGENT MS`,
/// `done ID MS`, `term ID MS`, `fail ID MS`.
#[derive(Debug, Default, Clone)]
pub struct Record {
    pub lines: Vec<Vec<String>>,
}

impl Record {
    pub fn read(dir: &std::path::Path) -> Record {
        let text = std::fs::read_to_string(dir.join("record.txt")).unwrap_or_default();
        Record {
            lines: text
                .lines()
                .map(|l| l.split_whitespace().map(str::to_string).collect())
                .collect(),
        }
    }
    pub fn count(&self, kind: &str, id: &str) -> usize {
        self.lines
            .iter()
            .filter(|l| {
                l.first().map(String::as_str) == Some(kind)
                    && l.get(1).map(String::as_str) == Some(id)
            })
            .count()
    }
    pub fn total(&self, kind: &str) -> usize {
        self.lines
            .iter()
            .filter(|l| l.first().map(String::as_str) == Some(kind))
            .count()
    }
    /// (receive count, agent, ms) of each start of job `id`.
    pub fn starts(&self, id: &str) -> Vec<(u32, String, u128)> {
        self.lines
            .iter()
            .filter(|l| l.len() >= 6 && l[0] == "start" && l[1] == id)
            .map(|l| {
                (
                    l[2].parse().unwrap_or(0),
                    l[4].clone(),
                    l[5].parse().unwrap_or(0),
                )
            })
            .collect()
    }

    /// Times (ms since the epoch) of the `kind` lines of job `id`.
    pub fn times(&self, kind: &str, id: &str) -> Vec<u128> {
        self.lines
            .iter()
            .filter(|l| l.len() >= 2 && l[0] == kind && l[1] == id)
            .filter_map(|l| l.last().and_then(|t| t.parse().ok()))
            .collect()
    }

    /// All start lines: (id, agent, ms).
    pub fn all_starts(&self) -> Vec<(String, String, u128)> {
        self.lines
            .iter()
            .filter(|l| l.len() >= 6 && l[0] == "start")
            .map(|l| (l[1].clone(), l[4].clone(), l[5].parse().unwrap_or(0)))
            .collect()
    }

    /// (from, to) of each `work` line of job `id` (counting jobs).
    pub fn work(&self, id: &str) -> Vec<(u64, u64)> {
        self.lines
            .iter()
            .filter(|l| l.len() >= 4 && l[0] == "work" && l[1] == id)
            .map(|l| (l[2].parse().unwrap_or(0), l[3].parse().unwrap_or(0)))
            .collect()
    }

    /// Receive counts seen by `start` lines of job `id`.
    pub fn receive_counts(&self, id: &str) -> Vec<u32> {
        self.lines
            .iter()
            .filter(|l| {
                l.first().map(String::as_str) == Some("start")
                    && l.get(1).map(String::as_str) == Some(id)
            })
            .filter_map(|l| l.get(2).and_then(|c| c.parse().ok()))
            .collect()
    }
}

/// Milliseconds since the epoch, comparable with the record's times.
pub fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// An sqsd-style worker for http-mode tests: records each POST (headers
/// lower-cased, body) and answers 500 when the body contains `fail`, 200
/// otherwise; a body containing `slow` is answered after 60 s.
pub mod http_worker {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use crate::serve::{body_bytes, reply, Incoming, Request};

    pub type Seen = Arc<Mutex<Vec<(BTreeMap<String, String>, String)>>>;

    pub fn start(rt: &tokio::runtime::Runtime) -> (String, Seen) {
        let seen: Seen = Arc::default();
        let s = seen.clone();
        let addr = crate::serve::spawn(rt, move |req: Request<Incoming>| {
            let s = s.clone();
            async move {
                let headers = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect();
                let body = String::from_utf8_lossy(&body_bytes(req.into_body()).await).into_owned();
                s.lock().unwrap().push((headers, body.clone()));
                if body.contains("slow") {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                let status = if body.contains("fail") { 500 } else { 200 };
                Ok::<_, std::convert::Infallible>(reply(status, "text/plain", "ok"))
            }
        });
        (format!("http://{addr}/work"), seen)
    }
}

/// `--name N` from the command line, or `default`: the benchmarks' options.
pub fn arg_u64(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The environment of a Lambda function whose runtime API is at `api`.
pub fn lambda_env(cmd: &mut Command, api: &str) {
    cmd.env("AWS_LAMBDA_RUNTIME_API", api)
        .env("AWS_LAMBDA_FUNCTION_NAME", "spotguard")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "s")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "g");
}
