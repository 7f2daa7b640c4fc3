//! Shared set-up of the agent end-to-end tests: moto with a queue, the
//! agent configuration they start from, and waiting with logs on failure.

use std::time::Duration;

use crate::aws_env::AwsEnv;
use crate::{bin, MockImds, TempDir};

pub struct Setup {
    pub env: AwsEnv,
    pub dir: TempDir,
    pub queue: String,
}

pub fn setup(tag: &str, max_receives: u32) -> Setup {
    let env = AwsEnv::start();
    let queue = env.create_queue("jobs", max_receives);
    Setup {
        env,
        dir: TempDir::new(tag),
        queue,
    }
}

/// An agent config for the tests: short long polls and timers so a test
/// takes seconds; `extra` is appended (TOML tables).
pub fn config(
    queue: &str,
    mock: &MockImds,
    agent: &str,
    worker_extra: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[queue]
url = "{queue}"
wait_time = "1s"
visibility_timeout = "30s"
error_visibility_timeout = "1s"

[worker]
command = ["{worker}"]
term_grace = "2s"
state_dir = "{state}"
{worker_extra}

[worker.env]
TEST_AGENT = "{agent}"

[imds]
endpoint = "{imds}"

[status]
listen = ""

{extra}
"#,
        worker = bin("spotguard-test-worker").display(),
        imds = mock.url,
        state = std::env::temp_dir()
            .join(format!("spotguard-state-{agent}-{}", std::process::id()))
            .display(),
    )
}

pub const NO_SCALE_IN: &str = "[scale_in]\nenabled = false\n";

pub fn mock_for(instance: &str) -> MockImds {
    MockImds::start(&["--instance-id", instance])
}

/// Prints the agent logs when a test fails, then panics.
pub fn fail(s: &Setup, msg: &str) -> ! {
    for entry in std::fs::read_dir(s.dir.path())
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "log" || e == "txt") {
            eprintln!(
                "===== {}\n{}",
                p.display(),
                std::fs::read_to_string(&p).unwrap_or_default()
            );
        }
    }
    panic!("{msg}");
}

pub fn wait(s: &Setup, secs: u64, what: &str, f: impl FnMut() -> bool) {
    if !s.env.wait_for(Duration::from_secs(secs), f) {
        fail(s, &format!("timed out waiting for: {what}"));
    }
}
