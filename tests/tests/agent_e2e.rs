//! `spotguard-agent run` end to end: the agent binary against moto (through
//! the fault proxy) and `spotguard-imds-mock`, with the test worker.

use std::time::Duration;

use serde_json::json;
use spotguard_tests::agent_setup::{fail, fleet, millis, secs, wait};
use spotguard_tests::proxy::Fault;
use spotguard_tests::{bin, now_ms, Record, TempDir};

fn no_scale_in(c: &mut spotguard_agent::config::Config) {
    c.scale_in.enabled = false;
}

/// The status endpoint's port, from the agent's log (`log`, in the
/// fixture's directory): the text log (`addr=127.0.0.1:N`) or the JSON one
/// (`"addr":"127.0.0.1:N"`, SPOTGUARD_LOG_FORMAT=json), the digits after
/// the address on the line that says so.
fn status_port(s: &spotguard_tests::agent_setup::Setup, log: &str) -> String {
    let mut port = String::new();
    wait(s, 20, "the status endpoint's address in the log", || {
        let text = std::fs::read_to_string(s.dir.path().join(log)).unwrap_or_default();
        port = text
            .lines()
            .find(|l| l.contains("status endpoint listening"))
            .and_then(|l| l.split_once("127.0.0.1:"))
            .map(|(_, rest)| rest.chars().take_while(char::is_ascii_digit).collect())
            .unwrap_or_default();
        !port.is_empty()
    });
    port
}

fn get(port: &str, path: &str) -> (u16, String) {
    spotguard_imds_mock::control::request("GET", &format!("http://127.0.0.1:{port}{path}"), "")
        .unwrap()
}

/// The built-in GPU check as shipped, without a GPU: the harness's fake
/// `nvidia-smi`, the expected count from the instance type the mock IMDS
/// gives (g4dn.xlarge: 1), a GPU lost while the agent runs.
#[test]
fn a_gpu_lost_closes_intake_and_the_status_endpoint_says_why() {
    let s = fleet("gpu", 5, 0, 1);
    let fake = s.dir.path().join("gpu");
    std::fs::create_dir_all(&fake).unwrap();
    let smi = fake.join("nvidia-smi");
    std::os::unix::fs::symlink(
        concat!(env!("CARGO_MANIFEST_DIR"), "/fake/nvidia-smi"),
        &smi,
    )
    .unwrap();
    std::fs::write(fake.join("mode"), "healthy").unwrap();
    std::fs::write(fake.join("gpus"), "1").unwrap();
    std::fs::write(
        fake.join("kmsg"),
        "6,1,1,-;NVRM: loading NVIDIA UNIX Kernel Module\n",
    )
    .unwrap();
    let _agent = s.start(
        "agent",
        &s.agent_config(0, "a", |c| {
            c.scale_in.enabled = false;
            c.status.listen = "127.0.0.1:0".into();
            c.health.gpu = spotguard_agent::config::GpuMode::On;
            c.health.nvidia_smi = smi.display().to_string();
            c.health.kernel_log = fake.join("kmsg").display().to_string();
            c.health.interval = secs(1);
        }),
    );
    let port = status_port(&s, "agent.log");
    s.env.send(
        &s.queue,
        &json!({"id": "before", "sleep_ms": 50}).to_string(),
    );
    wait(&s, 30, "the job before to be done", || {
        Record::read(s.dir.path()).count("done", "before") == 1
    });
    assert!(get(&port, "/metrics")
        .1
        .contains("spotguard_agent_health_check{check=\"gpu_count\"} 1\n"));
    // The GPU falls off the bus: nvidia-smi lists none, and the kernel says so.
    std::fs::write(fake.join("mode"), "missing").unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(fake.join("kmsg"))
            .unwrap();
        writeln!(
            f,
            "4,2,2,-;NVRM: Xid (PCI:0000:00:1e): 79, pid=1, GPU has fallen off the bus."
        )
        .unwrap();
    }
    wait(&s, 20, "/healthz to answer 503", || {
        get(&port, "/healthz").0 == 503
    });
    let why = get(&port, "/healthz").1;
    assert!(
        why.contains("0 GPU(s) listed by nvidia-smi, 1 expected") && why.contains("Xid 79"),
        "{why}"
    );
    let status: serde_json::Value = serde_json::from_str(&get(&port, "/status").1).unwrap();
    assert_eq!(status["checks"]["gpu_count"], false);
    assert_eq!(status["checks"]["gpu_xid"], false);
    assert_eq!(status["checks"]["gpu_answers"], true);
    // No job is taken any more.
    s.env.send(
        &s.queue,
        &json!({"id": "after", "sleep_ms": 50}).to_string(),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(Record::read(s.dir.path()).count("start", "after"), 0);
    assert_eq!(s.env.depth(&s.queue), (1, 0));
}

#[test]
fn jobs_are_run_once_and_deleted_after_success() {
    let s = fleet("normal", 5, 0, 1);
    let ids = &s.ids;
    // Port 0: the agent binds a free port and logs it.
    let _agent = s.start(
        "agent",
        &s.agent_config(0, "a", |c| {
            c.worker.concurrency = 3;
            c.scale_in.enabled = false;
            c.status.listen = "127.0.0.1:0".into();
        }),
    );
    let port = status_port(&s, "agent.log");
    for i in 0..8 {
        s.env.send(
            &s.queue,
            &json!({"id": format!("j{i}"), "sleep_ms": 150}).to_string(),
        );
    }
    wait(&s, 60, "8 jobs done and the queue empty", || {
        Record::read(s.dir.path()).total("done") == 8 && s.env.depth(&s.queue) == (0, 0)
    });
    let r = Record::read(s.dir.path());
    for i in 0..8 {
        let id = format!("j{i}");
        assert_eq!(r.count("start", &id), 1, "{id} started more than once");
        assert_eq!(r.count("done", &id), 1);
    }
    assert_eq!(s.env.proxy.calls_of("DeleteMessage").len(), 8);
    // The status endpoint tells the same story.
    let get = |path: &str| get(&port, path);
    assert_eq!(get("/healthz"), (200, "ok\n".to_string()));
    let status: serde_json::Value = serde_json::from_str(&get("/status").1).unwrap();
    assert_eq!(status["state"]["mode"], "running");
    assert_eq!(status["jobs_in_flight"], 0);
    assert_eq!(status["counters"]["jobs_succeeded"], 8);
    assert_eq!(status["instance_id"], ids[0]);
    let metrics = get("/metrics").1;
    assert!(
        metrics.contains("spotguard_agent_jobs_succeeded_total 8\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("spotguard_agent_mode{mode=\"running\"} 1\n"),
        "{metrics}"
    );
    // The group was never touched: scale-in is off and nothing was noticed.
    assert!(s
        .env
        .proxy
        .calls_of("TerminateInstanceInAutoScalingGroup")
        .is_empty());
}

/// A notice hook that writes what it is given to `hook.json`: (the hook,
/// its output file).
fn recording_hook(
    s: &spotguard_tests::agent_setup::Setup,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let hook_out = s.dir.path().join("hook.json");
    let hook = s.dir.path().join("hook.sh");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\ncat > '{}'\n", hook_out.display()),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (hook, hook_out)
}

#[test]
fn a_spot_notice_stops_intake_and_hands_the_long_job_to_another_agent() {
    let s = fleet("notice", 5, 0, 2);
    let mock_a = &s.mocks[0];
    // The notice hook runs when agent a sees the notice: its file's time
    // marks the detection.
    let (hook, hook_out) = recording_hook(&s);
    let mut agent_a = s.start(
        "agent-a",
        &s.agent_config(0, "a", |c| {
            c.worker.concurrency = 2;
            c.scale_in.enabled = false;
            c.interruption.poll_interval = millis(200);
            c.interruption.deadline_margin = secs(5);
            c.notify.hook_command = Some(vec![hook.display().to_string()]);
        }),
    );
    // A long job (60 s on its first run, 0.2 s after) and short ones.
    s.env.send(
        &s.queue,
        &json!({"id": "long", "sleep_ms_first": 60000, "sleep_ms": 200}).to_string(),
    );
    wait(&s, 30, "the long job to start", || {
        Record::read(s.dir.path()).count("start", "long") == 1
    });
    for i in 0..4 {
        s.env.send(
            &s.queue,
            &json!({"id": format!("s{i}"), "sleep_ms": 300}).to_string(),
        );
    }
    wait(&s, 30, "some short jobs done on agent a", || {
        Record::read(s.dir.path()).total("done") >= 2
    });
    // Notice: interruption in 8 s, so jobs are stopped 3 s from now (8 - 5 margin).
    let noticed = now_ms();
    let set = mock_a.control(
        "/mock/spot-interruption",
        json!({"action": "terminate", "in_seconds": 8}),
    );
    let notice_time = chrono::DateTime::parse_from_rfc3339(set["time"].as_str().unwrap()).unwrap();
    let deadline = (notice_time.timestamp_millis() - 5000) as u128;
    for i in 4..8 {
        s.env.send(
            &s.queue,
            &json!({"id": format!("s{i}"), "sleep_ms": 300}).to_string(),
        );
    }
    wait(&s, 20, "the long job to be stopped", || {
        Record::read(s.dir.path()).count("term", "long") == 1
    });
    let r = Record::read(s.dir.path());
    let term_at = r.times("term", "long")[0];
    // Stopped at the deadline (notice time - 5 s margin), not before, not much after.
    assert!(
        // (3 s of slack: four tests share two cores.)
        term_at + 50 >= deadline && term_at <= deadline + 3000,
        "long job stopped {} ms after the deadline",
        term_at as i128 - deadline as i128
    );
    // Intake stopped at the detection: agent a (the only agent yet) sends
    // no receive once its notice hook has run, though messages wait (a
    // receive in flight then has its messages handed back unstarted).
    let detected = std::fs::metadata(&hook_out)
        .and_then(|m| m.modified())
        .map(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis())
        .expect("the notice hook ran");
    assert!(
        detected >= noticed,
        "the hook ran before the notice was set"
    );
    let late: Vec<u128> = s
        .env
        .proxy
        .calls_of("ReceiveMessage")
        .iter()
        .map(|c| c.arrived_ms)
        .filter(|t| *t > detected)
        .map(|t| t - detected)
        .collect();
    assert!(late.is_empty(), "receives {late:?} ms after the detection");
    let before = s.env.proxy.calls_of("ReceiveMessage").len();
    assert!(before >= 2, "{before} receives in all");
    // The message is back at once (re-sent in its place), not after 30 s.
    let _agent_b = s.start(
        "agent-b",
        &s.agent_config(1, "b", |c| {
            c.worker.concurrency = 2;
            c.scale_in.enabled = false;
        }),
    );
    wait(
        &s,
        30,
        "agent b to finish the long job and the rest",
        || {
            let r = Record::read(s.dir.path());
            r.count("done", "long") == 1 && (0..8).all(|i| r.count("done", &format!("s{i}")) >= 1)
        },
    );
    let r = Record::read(s.dir.path());
    let starts = r.starts("long");
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!((starts[0].0, starts[0].1.as_str()), (1, "a"));
    assert_eq!(
        (starts[1].0, starts[1].1.as_str()),
        (2, "b"),
        "seen again, one interruption more (re-sent, not handed back)"
    );
    // Back at once: agent b got it within seconds of its
    // start, not after the 30 s visibility timeout.
    let b_took = starts[1].2 - term_at;
    assert!(
        b_took < 8000,
        "agent b started the long job {b_took} ms after it was stopped"
    );
    // Nothing lost: every job done, the queue empty.
    wait(&s, 10, "queue empty", || s.env.depth(&s.queue) == (0, 0));
    // After a spot notice the agent never decrements the group.
    assert!(s
        .env
        .proxy
        .calls_of("TerminateInstanceInAutoScalingGroup")
        .is_empty());
    assert_eq!(s.env.group("workers").desired, 2);
    // And agent a keeps running (the instance is going away; systemd stops it).
    assert!(agent_a.child.try_wait().unwrap().is_none());
}

#[test]
fn idle_instance_scales_itself_in_with_the_desired_capacity_decremented() {
    let s = fleet("idle", 5, 0, 2);
    let ids = &s.ids;
    let _agent = s.start(
        "agent",
        &s.agent_config(0, "a", |c| c.scale_in.idle_timeout = secs(2)),
    );
    // One job first: the idle clock starts after it.
    s.env
        .send(&s.queue, &json!({"id": "j", "sleep_ms": 500}).to_string());
    wait(&s, 30, "the group to shrink to 1", || {
        s.env.group("workers").desired == 1
    });
    let g = s.env.group("workers");
    assert!(
        !g.instances
            .iter()
            .any(|(id, state, _)| id == &ids[0] && state == "InService"),
        "{g:?}"
    );
    let r = Record::read(s.dir.path());
    assert_eq!(r.count("done", "j"), 1);
    let calls = s.env.proxy.calls_of("TerminateInstanceInAutoScalingGroup");
    assert_eq!(calls.len(), 1);
    assert!(
        calls[0]
            .body
            .contains("ShouldDecrementDesiredCapacity=true"),
        "{}",
        calls[0].body
    );
    assert!(calls[0].body.contains(&ids[0]));
}

#[test]
fn a_group_at_min_size_refuses_and_the_agent_resumes_without_a_hot_loop() {
    let s = fleet("minsize", 5, 1, 1);
    // moto does not enforce MinSize on this call; AWS answers ValidationError
    // ("Currently, desiredSize equals minSize"), which the proxy stands in for.
    s.env.proxy.inject(
        "TerminateInstanceInAutoScalingGroup",
        Fault::Respond {
            status: 400,
            body: "<ErrorResponse><Error><Type>Sender</Type><Code>ValidationError</Code><Message>Currently, desiredSize equals minSize (1). Terminating instance without replacement will violate group's min size constraint. Either set shouldDecrementDesiredCapacity flag to false or lower group's min size.</Message></Error><RequestId>fault</RequestId></ErrorResponse>".into(),
        },
        100,
    );
    let _agent = s.start(
        "agent",
        &s.agent_config(0, "a", |c| {
            c.scale_in.idle_timeout = secs(1);
            c.scale_in.retry_interval = secs(2);
        }),
    );
    wait(&s, 30, "a first refused scale-in", || {
        !s.env
            .proxy
            .calls_of("TerminateInstanceInAutoScalingGroup")
            .is_empty()
    });
    // Work still gets done after the refusal.
    s.env.send(
        &s.queue,
        &json!({"id": "after", "sleep_ms": 100}).to_string(),
    );
    wait(&s, 30, "a job after the refusal", || {
        Record::read(s.dir.path()).count("done", "after") == 1
    });
    std::thread::sleep(Duration::from_secs(8));
    let n = s
        .env
        .proxy
        .calls_of("TerminateInstanceInAutoScalingGroup")
        .len();
    // Backoff 2 s, 4 s, 8 s after each refusal (and the idle timer restarts
    // after the job): a handful of calls in ~10 s, not a hot loop.
    assert!((2..=5).contains(&n), "{n} scale-in calls");
    let g = s.env.group("workers");
    assert_eq!(g.desired, 1);
    assert_eq!(g.instances.len(), 1);
}

#[test]
fn lifecycle_terminated_drains_then_completes_the_hook() {
    let s = fleet("lifecycle", 5, 0, 1);
    let (ids, mock) = (&s.ids, &s.mocks[0]);
    let _agent = s.start(
        "agent",
        &s.agent_config(0, "a", |c| {
            c.scale_in.enabled = false;
            c.interruption.poll_interval = millis(200);
            c.interruption.lifecycle_hook = Some("drain-hook".into());
            c.interruption.lifecycle_heartbeat_interval = secs(1);
        }),
    );
    s.env
        .send(&s.queue, &json!({"id": "j", "sleep_ms": 3500}).to_string());
    wait(&s, 30, "the job to start", || {
        Record::read(s.dir.path()).count("start", "j") == 1
    });
    mock.control("/mock/lifecycle-state", json!({"state": "Terminated"}));
    s.env.send(
        &s.queue,
        &json!({"id": "later", "sleep_ms": 10}).to_string(),
    );
    wait(&s, 30, "CompleteLifecycleAction", || {
        !s.env.proxy.calls_of("CompleteLifecycleAction").is_empty()
    });
    let r = Record::read(s.dir.path());
    // No deadline: the job finished; nothing new was taken.
    assert_eq!(r.count("done", "j"), 1);
    assert_eq!(r.count("start", "later"), 0);
    let complete = &s.env.proxy.calls_of("CompleteLifecycleAction")[0];
    for part in [
        "LifecycleActionResult=CONTINUE",
        "LifecycleHookName=drain-hook",
        "AutoScalingGroupName=workers",
    ] {
        assert!(
            complete.body.contains(part),
            "{part} missing: {}",
            complete.body
        );
    }
    assert!(complete.body.contains(&ids[0]));
    assert!(!s
        .env
        .proxy
        .calls_of("RecordLifecycleActionHeartbeat")
        .is_empty());
    // The completion came after the job ended.
    let done_at = r.times("done", "j")[0];
    assert!(done_at <= now_ms());
    assert_eq!(s.env.proxy.calls_of("CompleteLifecycleAction").len(), 1);
}

#[test]
fn sigterm_drains_then_exits_zero() {
    let s = fleet("sigterm", 5, 0, 1);
    let mut agent = s.start(
        "agent",
        &s.agent_config(0, "a", |c| {
            c.worker.concurrency = 2;
            c.scale_in.enabled = false;
            c.interruption.shutdown_deadline = secs(4);
        }),
    );
    s.env.send(
        &s.queue,
        &json!({"id": "short", "sleep_ms": 1500}).to_string(),
    );
    s.env.send(
        &s.queue,
        &json!({"id": "long", "sleep_ms_first": 60000, "sleep_ms": 10}).to_string(),
    );
    wait(&s, 30, "both jobs to start", || {
        let r = Record::read(s.dir.path());
        r.count("start", "short") == 1 && r.count("start", "long") == 1
    });
    agent.signal("TERM");
    s.env.send(
        &s.queue,
        &json!({"id": "queued", "sleep_ms": 10}).to_string(),
    );
    let status = agent.wait_timeout(Duration::from_secs(20));
    let Some(status) = status else {
        fail(&s, "agent did not exit after SIGTERM")
    };
    assert!(status.success(), "{status}");
    let r = Record::read(s.dir.path());
    assert_eq!(r.count("done", "short"), 1, "the short job finished");
    assert_eq!(
        r.count("term", "long"),
        1,
        "the long job was stopped at the shutdown deadline"
    );
    assert_eq!(r.count("start", "queued"), 0, "nothing new after SIGTERM");
    // Long (handed back) and queued are visible; nothing in flight.
    wait(&s, 5, "two messages visible again", || {
        s.env.depth(&s.queue) == (2, 0)
    });
}

#[test]
fn a_crashing_worker_retries_then_dead_letters() {
    let s = fleet("crash", 2, 0, 1);
    let _agent = s.start("agent", &s.agent_config(0, "a", no_scale_in));
    s.env
        .send(&s.queue, &json!({"id": "crash", "crash": true}).to_string());
    s.env
        .send(&s.queue, &json!({"id": "exit3", "exit": 3}).to_string());
    s.env
        .send(&s.queue, &json!({"id": "ok", "sleep_ms": 10}).to_string());
    let dlq = s.queue.replace("/jobs", "/jobs-dlq");
    wait(&s, 60, "both failing jobs in the dead-letter queue", || {
        s.env.depth(&dlq).0 == 2
    });
    let r = Record::read(s.dir.path());
    assert_eq!(r.count("done", "ok"), 1);
    // maxReceiveCount 2: each failing job ran twice, then SQS moved it.
    assert_eq!(r.count("start", "crash"), 2);
    assert_eq!(r.count("start", "exit3"), 2);
    assert_eq!(s.env.depth(&s.queue), (0, 0));
}

#[test]
fn a_body_of_shell_metacharacters_reaches_the_worker_byte_for_byte() {
    let s = fleet("shell", 5, 0, 1);
    let raw = TempDir::new("raw");
    let _agent = s.start(
        "agent",
        &s.agent_config(0, "a", |c| {
            c.scale_in.enabled = false;
            c.worker.env.insert(
                "SPOTGUARD_TEST_RAW_DIR".into(),
                raw.path().display().to_string(),
            );
        }),
    );
    let body = "$(touch /tmp/spotguard-pwned); `id` && echo \"$HOME\" | cat > /dev/null; 'q' \\n %s {} * ? [a] ~ # ! ; < > ' \" \t é ✓\n second line";
    let id = s
        .env
        .send_with_attrs(&s.queue, body, &[("job-kind", "render $(id)")]);
    wait(&s, 30, "the job", || {
        raw.path().join(&id).exists() && s.env.depth(&s.queue) == (0, 0)
    });
    let got = std::fs::read(raw.path().join(&id)).unwrap();
    assert_eq!(got, body.as_bytes());
    assert!(!std::path::Path::new("/tmp/spotguard-pwned").exists());
    let env = std::fs::read_to_string(raw.path().join(format!("{id}.env"))).unwrap();
    assert!(
        env.contains(&format!("SPOTGUARD_MESSAGE_ID={id}\n")),
        "{env}"
    );
    assert!(env.contains("SPOTGUARD_RECEIVE_COUNT=1\n"), "{env}");
    assert!(env.contains("SPOTGUARD_QUEUE_NAME=jobs\n"), "{env}");
    assert!(
        env.contains("SPOTGUARD_ATTR_job_kind=render $(id)\n"),
        "{env}"
    );
}

#[test]
fn check_config_prints_defaults_and_names_bad_keys() {
    let dir = TempDir::new("check");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\n[worker]\ncommand = [\"/bin/true\"]\n[worker.env]\nAPI_TOKEN = \"s3cr3t-value\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("spotguard-agent"))
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // Printed into cloud-init's log: the key, never the secret.
    assert!(text.contains("API_TOKEN = "), "{text}");
    assert!(!text.contains("s3cr3t"), "{text}");
    assert!(text.contains("idle_timeout = \"30s\""), "{text}");
    assert!(text.contains("listen = \"127.0.0.1:9464\""), "{text}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\n[worker]\ncommand = [\"/bin/true\"]\n[scale_in]\nidle_timeout = \"soon\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("spotguard-agent"))
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("idle_timeout"), "{err}");
    let out = std::process::Command::new(bin("spotguard-agent"))
        .args(["run", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml"));
}

#[test]
fn http_mode_posts_with_the_sqsd_headers() {
    let s = fleet("http", 2, 0, 1);
    let (url, seen) = spotguard_tests::http_worker::start(&s.env.rt);
    let _agent = s.start(
        "agent",
        &s.agent_config(0, "a", |c| {
            c.scale_in.enabled = false;
            c.worker.command = None;
            c.worker.url = Some(url.clone());
        }),
    );
    let ok_id = s
        .env
        .send_with_attrs(&s.queue, r#"{"task":"render"}"#, &[("customer", "acme")]);
    let fail_id = s.env.send(&s.queue, r#"{"task":"fail"}"#);
    let dlq = s.queue.replace("/jobs", "/jobs-dlq");
    wait(&s, 60, "ok deleted, fail dead-lettered", || {
        s.env.depth(&s.queue) == (0, 0) && s.env.depth(&dlq).0 == 1
    });
    let seen = seen.lock().unwrap().clone();
    let (h, body) = seen
        .iter()
        .find(|(h, _)| h.get("x-aws-sqsd-msgid") == Some(&ok_id))
        .expect("ok job posted");
    assert_eq!(body, r#"{"task":"render"}"#);
    assert_eq!(h.get("user-agent").map(String::as_str), Some("aws-sqsd"));
    assert_eq!(
        h.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(h.get("x-aws-sqsd-queue").map(String::as_str), Some("jobs"));
    assert_eq!(
        h.get("x-aws-sqsd-receive-count").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        h.get("x-aws-sqsd-attr-customer").map(String::as_str),
        Some("acme")
    );
    let first = h
        .get("x-aws-sqsd-first-received-at")
        .expect("first received at");
    assert!(
        chrono::DateTime::parse_from_rfc3339(first).is_ok(),
        "{first}"
    );
    // The failing one was posted twice (maxReceiveCount 2), counts 1 then 2.
    let counts: Vec<&str> = seen
        .iter()
        .filter(|(h, _)| h.get("x-aws-sqsd-msgid") == Some(&fail_id))
        .filter_map(|(h, _)| h.get("x-aws-sqsd-receive-count").map(String::as_str))
        .collect();
    assert_eq!(counts, vec!["1", "2"]);
}

#[test]
fn a_job_over_worker_timeout_is_stopped_and_handed_back() {
    let s = fleet("timeout", 5, 0, 1);
    let _agent = s.start(
        "agent",
        &s.agent_config(0, "a", |c| {
            c.scale_in.enabled = false;
            c.worker.timeout = Some(secs(1));
        }),
    );
    s.env.send(
        &s.queue,
        &json!({"id": "slow", "sleep_ms_first": 30000, "sleep_ms": 10}).to_string(),
    );
    wait(
        &s,
        30,
        "the slow job stopped, then done on its second run",
        || Record::read(s.dir.path()).count("done", "slow") == 1,
    );
    let r = Record::read(s.dir.path());
    assert_eq!(r.count("term", "slow"), 1);
    assert_eq!(r.receive_counts("slow"), vec![1, 2]);
}

#[test]
fn busy_instances_are_protected_from_scale_in_and_released_when_idle() {
    let s = fleet("protect", 5, 0, 1);
    let ids = &s.ids;
    let _agent = s.start(
        "agent",
        &s.agent_config(0, "a", |c| {
            c.worker.concurrency = 2;
            c.scale_in.enabled = false;
            c.scale_in.protect_busy = true;
            c.scale_in.idle_timeout = secs(2);
        }),
    );
    let protected = || {
        s.env
            .group("workers")
            .instances
            .iter()
            .any(|(id, _, p)| id == &ids[0] && *p)
    };
    for i in 0..4 {
        s.env.send(
            &s.queue,
            &json!({"id": format!("j{i}"), "sleep_ms": 1500}).to_string(),
        );
    }
    wait(&s, 30, "protection while busy", protected);
    wait(&s, 30, "all done", || {
        Record::read(s.dir.path()).total("done") == 4
    });
    wait(&s, 10, "protection released when idle", || !protected());
    // On once for the busy spell, off once idle (idle_timeout): not per job.
    let calls = s.env.proxy.calls_of("SetInstanceProtection").len();
    assert_eq!(calls, 2, "{calls} SetInstanceProtection calls for 4 jobs");
    // Its liveness mark (signed by hand): the time before the protection,
    // `idle` before its release; read back through the controller's
    // DescribeTags.
    let tags: Vec<String> = s
        .env
        .proxy
        .calls_of("CreateTags")
        .iter()
        .map(|c| {
            c.body
                .split('&')
                .find_map(|kv| kv.strip_prefix("Tag.1.Value="))
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(tags.len(), 2, "{tags:?}");
    let mark: i64 = tags[0].parse().unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!(now - 120 < mark && mark <= now, "{mark} vs {now}");
    assert_eq!(tags[1], "idle");
    // 250 ids (two calls: 200 to a filter) and EC2's throttling twice
    // (RequestLimitExceeded, HTTP 503: retried).
    let cloud =
        spotguard_controller::aws::SdkCloud::new(&s.env.sdk_through_proxy(), &["us-east-1"]);
    let mut asked: Vec<String> = (0..249).map(|i| format!("i-{i:017x}")).collect();
    asked.push(ids[0].clone());
    s.env.proxy.inject(
        "DescribeTags",
        spotguard_tests::proxy::Fault::Error {
            status: 503,
            code: "RequestLimitExceeded",
        },
        2,
    );
    let marks = s
        .env
        .rt
        .block_on(spotguard_controller::aws::Cloud::alive_marks(
            &cloud,
            "us-east-1",
            &asked,
        ))
        .unwrap();
    assert_eq!(s.env.proxy.calls_of("DescribeTags").len(), 4);
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert_eq!(marks[&ids[0]], "idle");
}

#[test]
fn a_long_poll_in_flight_at_a_notice_is_abandoned_and_its_messages_handed_back_unstarted() {
    let s = fleet("longpoll", 5, 0, 1);
    let (ids, mock) = (&s.ids, &s.mocks[0]);
    let (hook, hook_out) = recording_hook(&s);
    let _agent = s.start(
        "agent",
        &s.agent_config(0, "a", |c| {
            c.scale_in.enabled = false;
            c.interruption.poll_interval = millis(200);
            c.notify.hook_command = Some(vec![hook.display().to_string()]);
            c.queue.wait_time = secs(20);
        }),
    );
    // Let the agent start its 20 s long poll on the empty queue.
    wait(&s, 30, "a receive in flight", || {
        !s.env.proxy.calls_of("ReceiveMessage").is_empty()
    });
    std::thread::sleep(Duration::from_secs(2));
    mock.control("/mock/spot-interruption", json!({"in_seconds": 60}));
    wait(&s, 10, "the notice hook", || {
        hook_out.exists()
            && std::fs::metadata(&hook_out)
                .map(|m| m.len() > 0)
                .unwrap_or(false)
    });
    // The poll still in flight gets this message: it must go back unstarted.
    s.env.send(&s.queue, &json!({"id": "late"}).to_string());
    wait(&s, 30, "the late message handed back", || {
        s.env
            .proxy
            .calls_of("ChangeMessageVisibility")
            .iter()
            .any(|c| c.body.contains("\"VisibilityTimeout\":0"))
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(Record::read(s.dir.path()).count("start", "late"), 0);
    assert_eq!(s.env.depth(&s.queue), (1, 0), "visible again at once");
    let event: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&hook_out).unwrap()).unwrap();
    assert_eq!(event["event"], "spot_interruption");
    assert_eq!(event["instance_id"], ids[0]);
}

#[test]
fn notices_are_published_to_sns() {
    let s = fleet("sns", 5, 0, 1);
    let (ids, mock) = (&s.ids, &s.mocks[0]);
    let (topic, sub) = s.env.topic_to_queue("spotguard-notices");
    let _agent = s.start(
        "agent",
        &s.agent_config(0, "a", |c| {
            c.scale_in.enabled = false;
            c.interruption.poll_interval = millis(200);
            c.notify.sns_topic_arn = Some(topic.clone());
        }),
    );
    std::thread::sleep(Duration::from_secs(1));
    mock.control(
        "/mock/spot-interruption",
        json!({"action": "stop", "in_seconds": 60}),
    );
    let mut got = Vec::new();
    wait(&s, 20, "an SNS message", || {
        got.extend(s.env.peek(&sub));
        !got.is_empty()
    });
    let v: serde_json::Value = serde_json::from_str(&got[0]).expect("JSON message");
    assert_eq!(v["event"], "spot_interruption");
    assert_eq!(v["action"], "stop");
    assert_eq!(v["instance_id"], ids[0]);
    assert_eq!(v["agent_mode"], "draining");
    assert_eq!(s.env.proxy.calls_of("Publish").len(), 1);
}

/// The failback hand-over on moto: a fallback agent under a load that never
/// stops (a job always waiting) sees the controller close its group's
/// intake (the `spotguard:intake` tag), finishes its running job, takes no
/// new one, and scales itself in with the decrement.
#[test]
fn a_closed_intake_tag_ends_the_fallback_agents_work_without_killing_its_job() {
    let s = fleet("intake", 5, 0, 2);
    let _agent = s.start(
        "agent",
        &s.agent_config(0, "a", |c| {
            // In the queue's region here, so following is set, not derived.
            c.scale_in.follow_intake = Some(true);
            c.scale_in.intake_check = secs(1);
            c.scale_in.protect_busy = true;
            c.scale_in.idle_timeout = secs(300);
        }),
    );
    for i in 0..20 {
        s.env.send(
            &s.queue,
            &json!({"id": format!("j{i}"), "sleep_ms": 3000}).to_string(),
        );
    }
    wait(&s, 30, "a first job done", || {
        Record::read(s.dir.path()).total("done") >= 1
    });
    let asg = s.env.asg_in("us-east-1");
    s.env.rt.block_on(async {
        asg.create_or_update_tags()
            .tags(
                aws_sdk_autoscaling::types::Tag::builder()
                    .resource_id("workers")
                    .resource_type("auto-scaling-group")
                    .key("spotguard:intake")
                    .value("closed")
                    .propagate_at_launch(false)
                    .build(),
            )
            .send()
            .await
            .expect("tag");
    });
    let closed_at_done = Record::read(s.dir.path()).total("done");
    wait(&s, 30, "the agent's own scale-in", || {
        !s.env
            .proxy
            .calls_of("TerminateInstanceInAutoScalingGroup")
            .is_empty()
    });
    let r = Record::read(s.dir.path());
    // At most the job running at the closure and one started before the
    // next read of the tag (1 s) ran after it; each of them finished.
    let started = r.total("start");
    assert!(
        started <= closed_at_done + 2,
        "{started} started, {closed_at_done} done at the closure"
    );
    assert_eq!(r.total("done"), started, "every job started finished");
    let calls = s.env.proxy.calls_of("TerminateInstanceInAutoScalingGroup");
    assert_eq!(calls.len(), 1);
    assert!(
        calls[0]
            .body
            .contains("ShouldDecrementDesiredCapacity=true"),
        "{}",
        calls[0].body
    );
    assert_eq!(s.env.group("workers").desired, 1);
    // The rest of the work waits for the primary.
    assert!(s.env.depth(&s.queue).0 >= 20 - started as i64 - 1);
}
