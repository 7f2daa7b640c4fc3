//! Table of configuration mistakes and the message each gets: wrong types,
//! unknown keys, bad durations, missing required keys, bad values. Every
//! message names the file and the key.

const AGENT: &str = "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\n[worker]\ncommand = [\"/bin/true\"]\n";
const CONTROLLER: &str =
    "[primary]\nasg = \"gpu-1\"\nqueue_url = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\n[fallback]\nasg = \"gpu-2\"\n";

fn agent_err(text: &str) -> String {
    match spotguard_agent::config::Config::parse(text, "agent.toml") {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => spotguard_agent::error_chain(&e),
    }
}

fn controller_err(text: &str) -> String {
    match spotguard_controller::config::Config::parse(text, "controller.toml") {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn agent_configuration_errors() {
    let table: &[(&str, &str, &[&str])] = &[
        // (what, appended or full text, fragments the message must hold)
        (
            "wrong type: string for a number",
            "[scale_in]\nidle_timeout = 30\n",
            &["idle_timeout", "string"],
        ),
        (
            "unknown key",
            "[scale_in]\nidle_timout = \"30s\"\n",
            &["idle_timout", "unknown field"],
        ),
        (
            "unknown section",
            "[scaling]\nx = 1\n",
            &["scaling", "unknown field"],
        ),
        (
            "bad duration",
            "[interruption]\npoll_interval = \"fast\"\n",
            &["poll_interval", "not a duration"],
        ),
        (
            "zero duration",
            "[interruption]\npoll_interval = \"0s\"\n",
            &["interruption.poll_interval", "greater than zero"],
        ),
        (
            "bad enum",
            "[interruption]\nrebalance = \"panic\"\n",
            &["rebalance", "unknown variant"],
        ),
        (
            "margin shorter than grace",
            "[interruption]\ndeadline_margin = \"5s\"\n",
            &["interruption.deadline_margin", "worker.term_grace"],
        ),
        (
            "bad listen address",
            "[status]\nlisten = \"localhost:9464\"\n",
            &["status.listen"],
        ),
        (
            "bad IMDS endpoint",
            "[imds]\nendpoint = \"169.254.169.254\"\n",
            &["imds.endpoint"],
        ),
        (
            "bad topic",
            "[notify]\nsns_topic_arn = \"notices\"\n",
            &["notify.sns_topic_arn"],
        ),
        (
            "a NUL in an environment value",
            "[worker.env]\nTOKEN = \"a\\u0000b\"\n",
            &["worker.env", "\"TOKEN\"", "NUL"],
        ),
    ];
    for (what, extra, fragments) in table {
        let msg = agent_err(&format!("{AGENT}{extra}"));
        assert!(msg.starts_with("agent.toml: "), "{what}: {msg}");
        for f in *fragments {
            assert!(msg.contains(f), "{what}: {f:?} missing in {msg}");
        }
    }
    let full: &[(&str, &str, &[&str])] = &[
        ("missing queue", "[worker]\ncommand = [\"/bin/true\"]\n", &["missing field `queue`"]),
        ("missing queue.url", "[queue]\n[worker]\ncommand = [\"/bin/true\"]\n", &["missing field `url`"]),
        ("missing worker", "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\n", &["missing field `worker`"]),
        ("neither command nor url", "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\n[worker]\n", &["worker.command", "exactly one"]),
        ("number for a list", "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\n[worker]\ncommand = 5\n", &["command", "sequence"]),
        ("long poll over 20 s", "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\nwait_time = \"30s\"\n[worker]\ncommand = [\"/bin/true\"]\n", &["queue.wait_time", "20s"]),
        ("not a queue URL", "[queue]\nurl = \"jobs\"\n[worker]\ncommand = [\"/bin/true\"]\n", &["queue.url"]),
        ("negative concurrency", "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\n[worker]\ncommand = [\"a\"]\nconcurrency = -1\n", &["concurrency"]),
        ("bad notice signal", "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\n[worker]\ncommand = [\"a\"]\nnotice_signal = \"SIGWHAT\"\n", &["worker.notice_signal"]),
        ("not TOML", "[queue\nurl = ", &["agent.toml"]),
        ("an https worker without TLS", "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\n[worker]\nurl = \"https://127.0.0.1:8080/\"\n", &["worker.url", "without TLS"]),
        ("an OOM score that outranks the agent", "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\n[worker]\ncommand = [\"/bin/true\"]\noom_score_adj = -600\n", &["worker.oom_score_adj", "0..=1000"]),
        ("a NUL in an argument", "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/1/jobs\"\n[worker]\ncommand = [\"/bin/echo\", \"a\\u0000b\"]\n", &["worker.command", "NUL"]),
    ];
    for (what, text, fragments) in full {
        let msg = agent_err(text);
        for f in *fragments {
            assert!(msg.contains(f), "{what}: {f:?} missing in {msg}");
        }
    }
}

#[test]
fn controller_configuration_errors() {
    let table: &[(&str, &str, &[&str])] = &[
        (
            "bad duration",
            "[failover]\ncooldown = \"later\"\n",
            &["cooldown", "not a duration"],
        ),
        (
            "wrong type",
            "[failover]\nfailures = \"one\"\n",
            &["failures"],
        ),
        (
            "zero failures",
            "[failover]\nfailures = 0\n",
            &["failover.failures"],
        ),
        (
            "no codes",
            "[failover]\ncapacity_codes = []\n",
            &["failover.capacity_codes"],
        ),
        (
            "unknown key",
            "[run]\nintervall = \"1m\"\n",
            &["intervall", "unknown field"],
        ),
        (
            "bad form",
            "[policy]\nform = \"magic\"\n",
            &["form", "unknown variant"],
        ),
        (
            "negative target",
            "[policy]\nprimary_target = -1.0\n",
            &["policy.primary_target"],
        ),
    ];
    for (what, extra, fragments) in table {
        let msg = controller_err(&format!("{CONTROLLER}{extra}"));
        assert!(msg.starts_with("controller.toml: "), "{what}: {msg}");
        for f in *fragments {
            assert!(msg.contains(f), "{what}: {f:?} missing in {msg}");
        }
    }
    let msg = controller_err("[primary]\nasg = \"a\"\n");
    assert!(msg.contains("missing field"), "{msg}");
    let msg =
        controller_err(&CONTROLLER.replace("asg = \"gpu-2\"", "asg = \"gpu-2\"\nmax_size = 0"));
    assert!(msg.contains("fallback.max_size"), "{msg}");
}
