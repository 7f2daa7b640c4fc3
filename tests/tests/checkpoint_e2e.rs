//! Jobs that survive interruptions: running jobs are told of a notice, and a
//! job's checkpoint reference is carried to the next worker by re-sending
//! its message. End to end on moto and the mock IMDS, two agents.

use std::time::Duration;

use serde_json::json;
use spotguard_agent::config::Config;
use spotguard_tests::agent_setup::{base_config, millis, mock_for, secs, setup, wait, Setup};
use spotguard_tests::proxy::Fault;
use spotguard_tests::{MockImds, Proc, Record};

const N: u64 = 60;
const EVERY: u64 = 10;

fn agent_cfg(queue: &str, mock: &MockImds, agent: &str) -> Config {
    let mut c = base_config(queue, &mock.url, agent);
    // FIFO: the re-send with the checkpoint is opt-in (it reorders the group).
    c.worker.fifo_resend_checkpoint = queue.ends_with(".fifo");
    c.scale_in.enabled = false;
    c.interruption.poll_interval = millis(200);
    c.interruption.deadline_margin = secs(5);
    c
}

/// Agent a runs the counting job; a spot notice comes when it has counted
/// `at_least`; then agent b is started. Returns the agents (kept alive).
fn interrupt_then_resume(s: &Setup, queue: &str, at_least: u64, in_seconds: u64) -> (Proc, Proc) {
    let ids = s.env.create_group("workers", 0, 3, 2);
    let (ma, mb) = (mock_for(&ids[0]), mock_for(&ids[1]));
    let a = s.start("agent-a", &agent_cfg(queue, &ma, "a"));
    wait(s, 30, "the job to start on agent a", || {
        Record::read(s.dir.path()).count("start", "count") == 1
    });
    std::thread::sleep(Duration::from_millis(at_least * 100));
    ma.control("/mock/spot-interruption", json!({"in_seconds": in_seconds}));
    wait(s, 30, "agent a to give the job back", || {
        let r = Record::read(s.dir.path());
        r.count("yield", "count") + r.count("term", "count") >= 1
    });
    // Let the hand-over finish before b polls.
    std::thread::sleep(Duration::from_millis(500));
    let b = s.start("agent-b", &agent_cfg(queue, &mb, "b"));
    wait(s, 60, "agent b to finish the job", || {
        Record::read(s.dir.path()).count("done", "count") == 1
    });
    drop((ma, mb));
    (a, b)
}

fn job(ignore_notice: bool) -> String {
    json!({"id": "count", "count_to": N, "step_ms": 100, "checkpoint_every": EVERY, "ignore_notice": ignore_notice})
        .to_string()
}

#[test]
fn a_notice_checkpoints_and_the_next_worker_resumes() {
    let s = setup("ckpt", 5);
    s.env.send(&s.queue, &job(false));
    let _agents = interrupt_then_resume(&s, &s.queue, 25, 30);
    let r = Record::read(s.dir.path());
    let work = r.work("count");
    assert_eq!(work.len(), 2, "{work:?}");
    let (a, b) = (work[0], work[1]);
    assert_eq!(a.0, 0);
    assert!(a.1 >= 20, "agent a counted to {}", a.1);
    assert_eq!(b, (a.1, N), "agent b resumed from agent a's checkpoint");
    let total: u64 = work.iter().map(|(f, t)| t - f).sum();
    assert_eq!(total, N, "no work repeated: the job saved on the notice");
    // The job was told: kind and the deadline (notice time - 5 s margin).
    let notice = r
        .lines
        .iter()
        .find(|l| l[0] == "notice")
        .expect("notice line")
        .clone();
    assert_eq!(notice[2], "spot_interruption");
    assert!(
        chrono::DateTime::parse_from_rfc3339(&notice[3]).is_ok(),
        "{notice:?}"
    );
    // Re-sent with the reference, original deleted, nothing left over.
    let sends = s.env.proxy.calls_of("SendMessage");
    assert_eq!(sends.len(), 1);
    assert!(
        sends[0].body.contains("spotguard.checkpoint"),
        "{}",
        sends[0].body
    );
    assert!(
        sends[0].body.contains("spotguard.original-message-id"),
        "{}",
        sends[0].body
    );
    wait(&s, 10, "queue empty", || s.env.depth(&s.queue) == (0, 0));
}

#[test]
fn a_job_that_ignores_the_notice_is_stopped_at_the_deadline_and_its_last_checkpoint_carried() {
    let s = setup("ckpt-ignore", 5);
    s.env.send(&s.queue, &job(true));
    // Deadline 2 s after the notice (7 s - 5 s margin).
    let _agents = interrupt_then_resume(&s, &s.queue, 15, 7);
    let r = Record::read(s.dir.path());
    assert_eq!(r.count("term", "count"), 1, "stopped at the deadline");
    let work = r.work("count");
    assert_eq!(work.len(), 2, "{work:?}");
    let (a, b) = (work[0], work[1]);
    // b resumes from the last periodic checkpoint: at most EVERY steps lost.
    assert_eq!(b.0, a.1 / EVERY * EVERY, "{work:?}");
    let total: u64 = work.iter().map(|(f, t)| t - f).sum();
    assert!(total <= N + EVERY, "total work {total}");
}

#[test]
fn a_failing_send_hands_the_original_back_unchanged() {
    let s = setup("ckpt-sendfail", 5);
    s.env.send(&s.queue, &job(false));
    s.env.proxy.inject("SendMessage", Fault::server_error(), 50);
    let _agents = interrupt_then_resume(&s, &s.queue, 25, 30);
    let r = Record::read(s.dir.path());
    let work = r.work("count");
    assert_eq!(work.len(), 2, "{work:?}");
    // No checkpoint reached b: it started over, but nothing was lost.
    assert_eq!(work[1], (0, N));
    assert_eq!(
        r.receive_counts("count"),
        vec![1, 2],
        "the same message, received again"
    );
    assert!(s
        .env
        .proxy
        .calls_of("SendMessage")
        .iter()
        .all(|c| c.status == 500));
    wait(&s, 10, "queue empty", || s.env.depth(&s.queue) == (0, 0));
}

#[test]
fn fifo_queues_keep_the_group_and_deduplicate_the_re_send() {
    let s = setup("ckpt-fifo", 5);
    let fifo = s.env.create_fifo_queue("jobs");
    s.env.send_fifo(&fifo, &job(false), "tenant-7", "first");
    let _agents = interrupt_then_resume(&s, &fifo, 25, 30);
    let work = Record::read(s.dir.path()).work("count");
    assert_eq!(work.len(), 2, "{work:?}");
    assert_eq!(work[1].0, work[0].1);
    let sends = s.env.proxy.calls_of("SendMessage");
    assert_eq!(sends.len(), 1);
    let body: serde_json::Value = serde_json::from_str(&sends[0].body).unwrap();
    assert_eq!(body["MessageGroupId"], "tenant-7");
    assert!(body["MessageDeduplicationId"]
        .as_str()
        .is_some_and(|d| d.starts_with("sg-")));
    wait(&s, 10, "queue empty", || s.env.depth(&fifo) == (0, 0));
}

/// An http-mode worker that checkpoints: a job without a checkpoint runs
/// until a notice is POSTed to /notice, then answers 503 with its reference;
/// a job carrying one answers 200. Records (path, checkpoint header, body).
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Option<String>, String)>>>;

fn checkpointing_http_worker(rt: &tokio::runtime::Runtime) -> (String, Seen) {
    use spotguard_tests::serve::{body_bytes, reply, Incoming, Request};
    use std::sync::Arc;
    let seen: Seen = Arc::default();
    let noticed = Arc::new(tokio::sync::Notify::new());
    let s = seen.clone();
    let addr = spotguard_tests::serve::spawn(rt, move |req: Request<Incoming>| {
        let (s, noticed) = (s.clone(), noticed.clone());
        async move {
            let path = req.uri().path().to_string();
            let ckpt = req
                .headers()
                .get("x-spotguard-checkpoint")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = body_bytes(req.into_body()).await;
            s.lock().unwrap().push((
                path.clone(),
                ckpt.clone(),
                String::from_utf8_lossy(&body).into_owned(),
            ));
            let resp = |status: u16, ckpt: Option<&str>| {
                let mut r = reply(status, "text/plain", "");
                if let Some(c) = ckpt {
                    r.headers_mut()
                        .insert("X-Spotguard-Checkpoint", c.parse().unwrap());
                }
                Ok::<_, std::convert::Infallible>(r)
            };
            if path == "/notice" {
                noticed.notify_one();
                return resp(200, None);
            }
            if ckpt.is_some() {
                return resp(200, None);
            }
            let _ = tokio::time::timeout(Duration::from_secs(60), noticed.notified()).await;
            resp(503, Some("s3://bucket/ckpt-42"))
        }
    });
    (format!("http://{addr}"), seen)
}

#[test]
fn http_mode_gets_the_notice_and_carries_the_checkpoint_header() {
    let s = setup("ckpt-http", 5);
    let ids = s.env.create_group("workers", 0, 3, 2);
    let (ma, mb) = (mock_for(&ids[0]), mock_for(&ids[1]));
    let (base, seen) = checkpointing_http_worker(&s.env.rt);
    let http_cfg = |mock: &MockImds, agent: &str| {
        let mut c = agent_cfg(&s.queue, mock, agent);
        c.worker.command = None;
        c.worker.url = Some(format!("{base}/work"));
        c.worker.notice_url = Some(format!("{base}/notice"));
        c
    };
    let id = s.env.send(&s.queue, r#"{"render": "frame-7"}"#);
    let _a = s.start("agent-a", &http_cfg(&ma, "a"));
    wait(&s, 30, "the job posted", || {
        seen.lock().unwrap().iter().any(|e| e.0 == "/work")
    });
    ma.control("/mock/spot-interruption", json!({"in_seconds": 30}));
    wait(&s, 30, "the re-send", || {
        !s.env.proxy.calls_of("SendMessage").is_empty()
    });
    let _b = s.start("agent-b", &http_cfg(&mb, "b"));
    wait(&s, 30, "the job resumed with its checkpoint", || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|e| e.0 == "/work" && e.1.as_deref() == Some("s3://bucket/ckpt-42"))
    });
    wait(&s, 10, "queue empty", || s.env.depth(&s.queue) == (0, 0));
    let seen = seen.lock().unwrap().clone();
    let notice = seen
        .iter()
        .find(|e| e.0 == "/notice")
        .expect("notice posted");
    let n: serde_json::Value = serde_json::from_str(&notice.2).unwrap();
    assert_eq!(n["kind"], "spot_interruption");
    assert_eq!(n["message_id"], id);
    assert!(
        n["deadline"].is_string() && n["notice_time"].is_string(),
        "{n}"
    );
    let resumed = seen.iter().find(|e| e.1.is_some()).unwrap();
    assert_eq!(resumed.2, r#"{"render": "frame-7"}"#, "same body");
}
