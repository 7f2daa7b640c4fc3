//! Periodic tasks end to end on moto: the controller schedules a cron.yaml
//! task (in virtual time), two agents in http mode run it on an app that
//! handles periodic tasks as `django-eb-sqs-worker` does (from the
//! `X-Aws-Sqsd-Taskname`, `X-Aws-Sqsd-Scheduled-At` and
//! `X-Aws-Sqsd-Sender-Id` headers; no task name is an error), and each slot
//! runs once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use spotguard_common::clock::Clock;
use spotguard_controller::aws::{Cloud, SdkCloud};
use spotguard_controller::handler::Controller;
use spotguard_tests::agent_setup::{fleet, wait};
use spotguard_tests::aws_env::AwsEnv;
use spotguard_tests::controller_setup::controller_config;
use spotguard_tests::proxy::Fault;
use spotguard_tests::serve::{body_bytes, reply, Incoming, Request};

/// A clock the test moves.
#[derive(Clone)]
struct Manual(Arc<Mutex<DateTime<Utc>>>);

impl Manual {
    fn at(t: &str) -> Manual {
        Manual(Arc::new(Mutex::new(parse(t))))
    }
    fn set(&self, t: &str) {
        *self.0.lock().unwrap() = parse(t);
    }
}

impl Clock for Manual {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

fn parse(t: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc)
}

type Runs = Arc<Mutex<Vec<(String, String, String)>>>;

/// The app's side of `django-eb-sqs-worker`: a periodic task is identified
/// by its headers and run from a registry of task functions; a request with
/// no task name is refused (400), an unknown one too (404). Records
/// (task, scheduled at, sender id) per run.
fn django_eb_sqs_worker_app(env: &AwsEnv) -> (String, Runs) {
    let runs: Runs = Arc::default();
    let r = runs.clone();
    let addr = spotguard_tests::serve::spawn(&env.rt, move |req: Request<Incoming>| {
        let r = r.clone();
        async move {
            let h = |k: &str| {
                req.headers()
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let (task, at, sender) = (
                h("X-Aws-Sqsd-Taskname"),
                h("X-Aws-Sqsd-Scheduled-At"),
                h("X-Aws-Sqsd-Sender-Id"),
            );
            let path = req.uri().path().to_string();
            let _ = body_bytes(req.into_body()).await;
            let status = match (task, path.as_str()) {
                (None, _) => 400,
                (Some(t), "/periodic/") if t == "cleanup" => {
                    r.lock()
                        .unwrap()
                        .push((t, at.unwrap_or_default(), sender.unwrap_or_default()));
                    200
                }
                _ => 404,
            };
            Ok::<_, std::convert::Infallible>(reply(status, "text/plain", ""))
        }
    });
    (format!("http://{addr}/"), runs)
}

const CRON_YAML: &str = "version: 1\ncron:\n - name: \"cleanup\"\n   url: \"/periodic/\"\n   schedule: \"*/5 * * * *\"\n";

fn controller(env: &AwsEnv, queue: &str, primary: &str, clock: &Manual) -> Controller<SdkCloud> {
    env.create_group_in("us-east-2", "gpu-fallback", 0, 0, 0);
    let mut cfg = controller_config(queue, primary, &[("us-east-2", "gpu-fallback", 10)]);
    cfg.cron.yaml = Some(CRON_YAML.to_string());
    cfg.cron.tasks = spotguard_controller::cron::parse(CRON_YAML).unwrap();
    let sdk = env.sdk_through_proxy();
    Controller {
        cfg,
        cloud: SdkCloud::new(&sdk, &["us-east-1", "us-east-2"]),
        clock: Arc::new(clock.clone()),
    }
}

#[test]
fn a_django_eb_sqs_worker_periodic_task_runs_once_per_schedule_under_two_agents() {
    let s = fleet("cron", 5, 0, 2);
    let (app, runs) = django_eb_sqs_worker_app(&s.env);
    let _agents: Vec<_> = (0..2)
        .map(|i| {
            s.start(
                &format!("agent-{i}"),
                &s.agent_config(i, &format!("a{i}"), |c| {
                    c.worker.command = None;
                    c.worker.url = Some(app.clone());
                    c.scale_in.enabled = false;
                    c.worker.concurrency = 2;
                }),
            )
        })
        .collect();
    let clock = Manual::at("2026-11-29T10:02:00Z");
    let c = controller(&s.env, &s.queue, "workers", &clock);
    // A task removed from cron.yaml left its tag: the first tick deletes it.
    let stale = BTreeMap::from([(
        "spotguard:cron:retired".to_string(),
        "2026-11-28T00:00:00Z".to_string(),
    )]);
    s.env
        .rt
        .block_on(c.cloud.put_tags("us-east-1", "workers", &stale))
        .unwrap();
    assert!(s
        .env
        .group("workers")
        .tags
        .contains_key("spotguard:cron:retired"));
    let tick = |at: &str| {
        clock.set(at);
        s.env.rt.block_on(c.tick(Vec::new())).expect("tick").cron
    };
    // First sight at 10:02: the 10:00 slot is recorded, not run.
    assert!(tick("2026-11-29T10:02:00Z").is_empty());
    assert!(!s
        .env
        .group("workers")
        .tags
        .contains_key("spotguard:cron:retired"));
    assert_eq!(tick("2026-11-29T10:05:10Z").len(), 1);
    assert!(tick("2026-11-29T10:05:40Z").is_empty(), "the same slot");
    assert_eq!(tick("2026-11-29T10:10:03Z").len(), 1);
    // The controller is down from 10:11 to 10:31: the slots of the last
    // 10 minutes (the catch-up window) run, 10:25 and 10:30; 10:15 and
    // 10:20 are not sent.
    assert_eq!(tick("2026-11-29T10:31:00Z").len(), 2);
    wait(&s, 30, "four runs and the queue empty", || {
        runs.lock().unwrap().len() >= 4 && s.env.depth(&s.queue) == (0, 0)
    });
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let runs = runs.lock().unwrap().clone();
    let mut per_slot: BTreeMap<String, usize> = BTreeMap::new();
    for (task, at, sender) in &runs {
        assert_eq!(task, "cleanup");
        assert!(!sender.is_empty(), "X-Aws-Sqsd-Sender-Id");
        *per_slot.entry(at.clone()).or_default() += 1;
    }
    assert_eq!(
        per_slot.into_iter().collect::<Vec<_>>(),
        [
            ("2026-11-29T10:05:00Z".to_string(), 1),
            ("2026-11-29T10:10:00Z".to_string(), 1),
            ("2026-11-29T10:25:00Z".to_string(), 1),
            ("2026-11-29T10:30:00Z".to_string(), 1),
        ]
    );
    // The memory is in the primary group's tags.
    assert_eq!(
        s.env
            .group("workers")
            .tags
            .get("spotguard:cron:cleanup")
            .map(String::as_str),
        Some("2026-11-29T10:30:00Z")
    );
}

#[test]
fn on_a_fifo_queue_a_slot_goes_once_even_when_its_memory_cannot_be_written_at_first() {
    let env = AwsEnv::start();
    let queue = env.create_fifo_queue("jobs");
    env.create_group_in("us-east-1", "workers", 0, 3, 0);
    let clock = Manual::at("2026-11-29T10:02:00Z");
    let mut c = controller(&env, &queue, "workers", &clock);
    // A name SQS would refuse as a FIFO group id ("nightly report").
    c.cfg.cron.tasks = spotguard_controller::cron::parse(
        "version: 1\ncron:\n - name: \"nightly report\"\n   url: \"/periodic/\"\n   schedule: \"*/5 * * * *\"\n",
    )
    .unwrap();
    let tick = |at: &str| {
        clock.set(at);
        env.rt.block_on(c.tick(Vec::new())).expect("tick").cron
    };
    tick("2026-11-29T10:02:00Z");
    // The memory cannot be written (all the SDK's tries fail): nothing is sent.
    env.proxy
        .inject("CreateOrUpdateTags", Fault::server_error(), 3);
    assert!(tick("2026-11-29T10:05:10Z").is_empty());
    assert_eq!(env.depth(&queue), (0, 0));
    // Then it can: the slot goes, once; a retried tick sends nothing more.
    assert_eq!(tick("2026-11-29T10:05:30Z").len(), 1);
    assert!(
        tick("2026-11-29T10:05:30Z").is_empty(),
        "a retried invocation"
    );
    assert_eq!(env.depth(&queue), (1, 0));
}
