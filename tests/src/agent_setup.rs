//! Shared set-up of the agent end-to-end tests: moto with a queue, a
//! group of workers each with its mock IMDS ([`fleet`]), the agent
//! configuration they start from (the agent's own `Config`, edited in
//! place and serialised), and waiting with logs on failure.

use std::time::Duration;

use spotguard_agent::config::{Config, Dur};

use crate::aws_env::{start_agent, AwsEnv};
use crate::{bin, MockImds, Proc, TempDir};

pub struct Setup {
    pub env: AwsEnv,
    pub dir: TempDir,
    pub queue: String,
    /// The instances of the group `workers` ([`fleet`]), and a mock IMDS
    /// for each, in the same order.
    pub ids: Vec<String>,
    pub mocks: Vec<MockImds>,
}

pub fn setup(tag: &str, max_receives: u32) -> Setup {
    let env = AwsEnv::start();
    let queue = env.create_queue("jobs", max_receives);
    Setup {
        env,
        dir: TempDir::new(tag),
        queue,
        ids: Vec::new(),
        mocks: Vec::new(),
    }
}

/// The agent tests' world: [`setup`], the group `workers` (MinSize `min`,
/// MaxSize 3, `desired` instances) and one mock IMDS per instance.
pub fn fleet(tag: &str, max_receives: u32, min: i32, desired: i32) -> Setup {
    let mut s = setup(tag, max_receives);
    s.ids = s.env.create_group("workers", min, 3, desired);
    s.mocks = s.ids.iter().map(|id| mock_for(id)).collect();
    s
}

impl Setup {
    /// The configuration of agent `agent` on instance `i` ([`base_config`]),
    /// then `edit`.
    pub fn agent_config(&self, i: usize, agent: &str, edit: impl FnOnce(&mut Config)) -> Config {
        let mut c = base_config(&self.queue, &self.mocks[i].url, agent);
        edit(&mut c);
        c
    }

    /// Starts `spotguard-agent run` with `cfg` (serialised to TOML), logging
    /// to `<name>.log` in the test's directory.
    pub fn start(&self, name: &str, cfg: &Config) -> Proc {
        start_agent(&self.env, self.dir.path(), name, &to_toml(cfg))
    }
}

/// A configuration as the agent reads it.
pub fn to_toml(cfg: &Config) -> String {
    toml::to_string(cfg).expect("the agent's config serialises to TOML")
}

/// The agent config the tests start from: short long polls and timers so a
/// test takes seconds, no status endpoint, scale-in on.
pub fn base_config(queue: &str, imds: &str, agent: &str) -> Config {
    const MINIMAL: &str = "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/q\"\n[worker]\ncommand = [\"/bin/true\"]\n";
    let mut c = Config::parse(MINIMAL, "test base config").expect("valid");
    c.queue.url = queue.to_string();
    c.queue.wait_time = secs(1);
    c.queue.visibility_timeout = secs(30);
    c.queue.error_visibility_timeout = secs(1);
    c.worker.command = Some(vec![bin("spotguard-test-worker").display().to_string()]);
    c.worker.term_grace = secs(2);
    c.worker.state_dir = std::env::temp_dir()
        .join(format!("spotguard-state-{agent}-{}", std::process::id()))
        .display()
        .to_string();
    c.worker.env.insert("TEST_AGENT".into(), agent.into());
    c.imds.endpoint = imds.to_string();
    c.imds.allow_other_endpoint = true;
    c.status.listen = String::new();
    c
}

pub fn secs(n: u64) -> Dur {
    Dur(Duration::from_secs(n))
}

pub fn millis(n: u64) -> Dur {
    Dur(Duration::from_millis(n))
}

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
