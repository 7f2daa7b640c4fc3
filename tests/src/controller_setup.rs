//! The controller configurations of the end-to-end tests: the controller's
//! own `Config`, edited in place and serialised for the binary.

use spotguard_controller::config::{Config, Fallback};

use crate::agent_setup::secs;

/// The primary group `primary` on `queue` in us-east-1, and the fallbacks
/// (region, group, MaxSize on failover), in cascade order; fast timers for
/// tests: failover without a shortage wait, 60 s capacity marks, a 3 s
/// cool-down, a 1 s dwell.
pub fn controller_config(queue: &str, primary: &str, fallbacks: &[(&str, &str, i32)]) -> Config {
    const MINIMAL: &str = "[primary]\nasg = \"p\"\nqueue_url = \"https://sqs.us-east-1.amazonaws.com/1/q\"\n[fallback]\nasg = \"f\"\n";
    let mut c = Config::parse(MINIMAL, "test base config").expect("valid");
    c.primary.asg = primary.to_string();
    c.primary.queue_url = queue.to_string();
    let template = c.fallbacks[0].clone();
    c.fallbacks = fallbacks
        .iter()
        .map(|(region, asg, max)| Fallback {
            region: region.to_string(),
            asg: asg.to_string(),
            max_size: *max,
            ..template.clone()
        })
        .collect();
    c.failover.shortage_for = secs(0);
    c.failover.capacity_ttl = secs(60);
    c.failover.recovery_for = secs(3);
    c.failover.min_dwell = secs(1);
    c
}

/// The configuration as the binary reads it (`--config`).
pub fn controller_toml(cfg: &Config) -> String {
    // Tasks are read from `cron.yaml`/`cron.file`; set in place they would
    // not reach the binary.
    assert!(
        cfg.cron.tasks.is_empty() || cfg.cron.yaml.is_some() || cfg.cron.file.is_some(),
        "set cron.yaml, not cron.tasks, for a config the binary reads"
    );
    toml::to_string(cfg).expect("the controller's config serialises to TOML")
}
