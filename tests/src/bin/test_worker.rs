//! A worker for the end-to-end tests, run by the agent in exec mode.
//!
//! The body is read from stdin. A body starting with `{` is a JSON job
//! `{"id": "...", "sleep_ms": N, "sleep_ms_first": N, "exit": CODE,
//! "crash": bool, "crash_first": bool}` (`sleep_ms_first`
//! and `crash_first` apply on the first receive only; a crash aborts the
//! process half-way through `sleep_ms`);
//! anything else is stored raw. Every execution appends one line per event to
//! the file named by `SPOTGUARD_TEST_RECORD` (O_APPEND, one write per line, so
//! concurrent workers do not interleave):
//! With `"leave_child": true` on the first line, only that line is read: a
//! `sleep 301` child inherits the rest of stdin and outlives the worker.
//! `start <id> <try> <pid> <agent> <ms>` (`<try>`: the receive count plus
//! the interruptions the message was re-sent for), then `done <id> <ms>`,
//! `fail <id> <ms>` or `term <id> <ms>` (`<agent>` is `$TEST_AGENT`, `<ms>`
//! milliseconds since the epoch).
//! With `SPOTGUARD_TEST_RAW_DIR`, the raw body is also copied to
//! `<dir>/<message id>` and the environment to `<dir>/<message id>.env`.

use std::io::{Read, Write};

/// This run's try: the receive count plus the interruptions the message was
/// re-sent for (an interrupted job comes back as a new message, receive
/// count 1, `spotguard.interruptions` counted), as text.
fn try_number() -> String {
    let n = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    (n("SPOTGUARD_RECEIVE_COUNT") + n("SPOTGUARD_ATTR_spotguard_interruptions")).to_string()
}
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static TERM: AtomicBool = AtomicBool::new(false);
static NOTICE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: i32) {
    TERM.store(true, Ordering::SeqCst);
}

extern "C" fn on_notice(_: i32) {
    NOTICE.store(true, Ordering::SeqCst);
}

/// Counting mode (`count_to`): counts from the checkpoint (or 0) to N, one
/// step per `step_ms`, saving the count every `checkpoint_every` steps and,
/// on a notice (SIGUSR1), saving it and exiting 75 unless `ignore_notice`.
/// Records `work <id> <from> <to>` for each execution.
fn count_job(id: &str, job: &serde_json::Value) -> ! {
    let n = job["count_to"].as_u64().unwrap_or(0);
    let step = Duration::from_millis(job["step_ms"].as_u64().unwrap_or(100));
    let every = job["checkpoint_every"].as_u64().unwrap_or(10).max(1);
    let ignore_notice = job["ignore_notice"].as_bool().unwrap_or(false);
    // `no_resume`: a job that cannot resume (starts over every time).
    let from: u64 = std::env::var("SPOTGUARD_CHECKPOINT")
        .ok()
        .filter(|_| !job["no_resume"].as_bool().unwrap_or(false))
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(0);
    let save = |i: u64| {
        if let Some(p) = std::env::var_os("SPOTGUARD_CHECKPOINT_FILE") {
            std::fs::write(p, i.to_string()).expect("checkpoint");
        }
    };
    let mut i = from;
    while i < n {
        std::thread::sleep(step);
        i += 1;
        if i % every == 0 {
            save(i);
        }
        if TERM.load(Ordering::SeqCst) {
            record(&format!("work {id} {from} {i}"));
            record(&format!("term {id}"));
            std::process::exit(143);
        }
        if NOTICE.swap(false, Ordering::SeqCst) {
            // What the agent wrote for us: kind and deadline.
            let notice = std::env::var_os("SPOTGUARD_NOTICE_FILE")
                .and_then(|p| std::fs::read(p).ok())
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .unwrap_or_default();
            record(&format!(
                "notice {id} {} {}",
                notice["kind"].as_str().unwrap_or("-"),
                notice["deadline"].as_str().unwrap_or("-")
            ));
            if ignore_notice {
                continue;
            }
            save(i);
            record(&format!("work {id} {from} {i}"));
            record(&format!("yield {id}"));
            std::process::exit(75);
        }
    }
    record(&format!("work {id} {from} {i}"));
    record(&format!("done {id}"));
    std::process::exit(0);
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn record(line: &str) {
    let line = format!("{line} {}", now_ms());
    if let Some(path) = std::env::var_os("SPOTGUARD_TEST_RECORD") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("record file");
        f.write_all(format!("{line}\n").as_bytes())
            .expect("record write");
    }
}

fn main() {
    // The first line, then (unless the job says to leave stdin unread) the rest.
    let mut stdin = std::io::BufReader::new(std::io::stdin());
    let mut body = Vec::new();
    std::io::BufRead::read_until(&mut stdin, b'\n', &mut body).expect("stdin");
    let first_line: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if first_line["leave_child"].as_bool().unwrap_or(false) {
        // A helper that inherits the unread stdin and outlives this process:
        // its process group must be ended by the agent, and the agent must
        // settle the job on this process's exit (not wait for stdin).
        let child = std::process::Command::new("sleep")
            .arg("301")
            .stdin(std::process::Stdio::inherit())
            .spawn();
        let id = first_line["id"].as_str().unwrap_or("-").to_string();
        let count = try_number();
        let agent = std::env::var("TEST_AGENT").unwrap_or_else(|_| "-".into());
        record(&format!(
            "start {id} {count} {} {agent}",
            std::process::id()
        ));
        if let Ok(c) = &child {
            record(&format!("child {id} {} {agent}", c.id()));
        }
        std::thread::sleep(Duration::from_millis(
            first_line["sleep_ms"].as_u64().unwrap_or(0),
        ));
        record(&format!("done {id}"));
        std::process::exit(0);
    }
    stdin.read_to_end(&mut body).expect("stdin");
    let msg_id = std::env::var("SPOTGUARD_MESSAGE_ID").unwrap_or_default();
    let count = try_number();
    if let Some(dir) = std::env::var_os("SPOTGUARD_TEST_RAW_DIR") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::write(dir.join(&msg_id), &body).expect("raw body");
        let env: String = std::env::vars()
            .filter(|(k, _)| k.starts_with("SPOTGUARD_"))
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect();
        std::fs::write(dir.join(format!("{msg_id}.env")), env).expect("env copy");
    }
    let job: serde_json::Value = if body.first() == Some(&b'{') {
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)
    } else {
        serde_json::Value::Null
    };
    let id = job["id"].as_str().unwrap_or(&msg_id).to_string();
    let first = count == "1";
    let sleep_ms = match job["sleep_ms_first"].as_u64() {
        Some(ms) if first => ms,
        _ => job["sleep_ms"].as_u64().unwrap_or(0),
    };
    let sleep = Duration::from_millis(sleep_ms);
    let agent = std::env::var("TEST_AGENT").unwrap_or_else(|_| "-".into());
    let exit = job["exit"].as_i64().unwrap_or(0) as i32;
    // SAFETY: the handlers only store to atomics, which is signal-safe.
    unsafe {
        use nix::sys::signal::{signal, SigHandler, Signal};
        let _ = signal(Signal::SIGTERM, SigHandler::Handler(on_term));
        let _ = signal(Signal::SIGUSR1, SigHandler::Handler(on_notice));
    }
    record(&format!(
        "start {id} {count} {} {agent}",
        std::process::id()
    ));
    if job.get("count_to").is_some() {
        count_job(&id, &job);
    }
    let crash_first = job["crash_first"].as_bool().unwrap_or(false) && count == "1";
    if job["crash"].as_bool().unwrap_or(false) || crash_first {
        // Mid-job: half the work, then the crash.
        std::thread::sleep(sleep / 2);
        record(&format!("fail {id}"));
        std::process::abort();
    }
    let end = Instant::now() + sleep;
    while Instant::now() < end {
        if TERM.load(Ordering::SeqCst) {
            record(&format!("term {id}"));
            std::process::exit(143);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if exit == 0 {
        record(&format!("done {id}"));
    } else {
        record(&format!("fail {id}"));
    }
    std::process::exit(exit);
}
