//! moto (the local AWS stand-in), the fault proxy in front of it, and SDK
//! clients for setting up and inspecting queues and Auto Scaling groups.
//! All synchronous for the tests: async work runs on the harness's runtime.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use aws_sdk_autoscaling::types::Instance;
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName};

use crate::proxy::FaultProxy;
use crate::Proc;

/// The moto server: `$MOTO_SERVER`, else the workspace's `.venv` (which
/// `scripts/test` creates).
pub fn moto_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server");
    assert!(
        p.exists(),
        "{} not found: run ./scripts/test (it installs moto into .venv) or set MOTO_SERVER",
        p.display()
    );
    p
}

/// The URL AWS gives a queue (`https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`)
/// for moto's local one: the code under test parses regions from real URLs,
/// and moto finds the queue by account and name, in the request's signing
/// region.
pub fn real_queue_url(region: &str, moto_url: &str) -> String {
    let mut parts = moto_url.trim_end_matches('/').rsplit('/');
    let name = parts.next().unwrap_or_default();
    let account = parts.next().unwrap_or("123456789012");
    format!("https://sqs.{region}.amazonaws.com/{account}/{name}")
}

pub struct AwsEnv {
    pub rt: tokio::runtime::Runtime,
    _moto: Proc,
    pub moto_url: String,
    pub proxy: FaultProxy,
    pub sqs: aws_sdk_sqs::Client,
    pub asg: aws_sdk_autoscaling::Client,
}

#[derive(Debug, Clone)]
pub struct Group {
    pub desired: i32,
    pub min: i32,
    pub max: i32,
    /// (instance id, lifecycle state, protected from scale-in)
    pub instances: Vec<(String, String, bool)>,
    pub tags: std::collections::BTreeMap<String, String>,
}

impl AwsEnv {
    pub fn start() -> AwsEnv {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        // Port 0: moto binds a free port itself and reports it (no
        // bind-then-release race with other tests).
        let mut cmd = Command::new(moto_server_bin());
        cmd.args(["-H", "127.0.0.1", "-p", "0"]);
        let (moto, moto_url) = Proc::spawn_reporting(cmd, "moto_server", " * Running on ");
        let end = Instant::now() + Duration::from_secs(30);
        let addr = moto_url.trim_start_matches("http://").to_string();
        while std::net::TcpStream::connect(addr.as_str()).is_err() {
            assert!(Instant::now() < end, "moto did not start at {moto_url}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let proxy = FaultProxy::start(&rt, moto_url.clone());
        let sdk = rt.block_on(
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new("us-east-1"))
                .endpoint_url(&moto_url)
                .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                    "test", "test", None, None, "test",
                ))
                .load(),
        );
        AwsEnv {
            sqs: aws_sdk_sqs::Client::new(&sdk),
            asg: aws_sdk_autoscaling::Client::new(&sdk),
            rt,
            _moto: moto,
            moto_url,
            proxy,
        }
    }

    /// An SDK configuration that reaches moto through the fault proxy (for
    /// a controller in process); clients are made per region from it.
    pub fn sdk_through_proxy(&self) -> aws_config::SdkConfig {
        self.rt.block_on(
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new("us-east-1"))
                .endpoint_url(&self.proxy.url)
                .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                    "test", "test", None, None, "test",
                ))
                .load(),
        )
    }

    /// The environment an agent needs to reach moto through the proxy. No
    /// `AWS_REGION`: as on an instance, the agent takes its region from its
    /// own (mock) IMDS and each client the region of its resource.
    pub fn agent_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.proxy.url.clone()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            // No profile files or IMDS credentials lookups on the test machine.
            ("AWS_CONFIG_FILE", "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// A queue with a dead-letter queue after `max_receives` receives.
    pub fn create_queue(&self, name: &str, max_receives: u32) -> String {
        self.rt.block_on(async {
            let dlq = self
                .sqs
                .create_queue()
                .queue_name(format!("{name}-dlq"))
                .send()
                .await
                .expect("dlq");
            let dlq_url = dlq.queue_url().expect("dlq url");
            let arn = self
                .sqs
                .get_queue_attributes()
                .queue_url(dlq_url)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .expect("dlq arn");
            let arn = arn
                .attributes()
                .and_then(|a| a.get(&QueueAttributeName::QueueArn))
                .expect("arn")
                .clone();
            let q = self
                .sqs
                .create_queue()
                .queue_name(name)
                .attributes(QueueAttributeName::VisibilityTimeout, "30")
                .attributes(
                    QueueAttributeName::RedrivePolicy,
                    format!(
                        r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"{max_receives}"}}"#
                    ),
                )
                .send()
                .await
                .expect("queue");
            real_queue_url("us-east-1", q.queue_url().expect("queue url"))
        })
    }

    /// Auto Scaling in another region of the same moto.
    pub fn asg_in(&self, region: &str) -> aws_sdk_autoscaling::Client {
        let conf = self.rt.block_on(
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new(region.to_string()))
                .endpoint_url(&self.moto_url)
                .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                    "test", "test", None, None, "test",
                ))
                .load(),
        );
        aws_sdk_autoscaling::Client::new(&conf)
    }

    /// A FIFO queue (`<name>.fifo`) without content-based deduplication.
    pub fn create_fifo_queue(&self, name: &str) -> String {
        self.rt.block_on(async {
            let q = self
                .sqs
                .create_queue()
                .queue_name(format!("{name}.fifo"))
                .attributes(QueueAttributeName::FifoQueue, "true")
                .attributes(QueueAttributeName::VisibilityTimeout, "30")
                .send()
                .await
                .expect("fifo queue");
            real_queue_url("us-east-1", q.queue_url().expect("queue url"))
        })
    }

    pub fn send_fifo(&self, queue: &str, body: &str, group: &str, dedup: &str) -> String {
        self.rt.block_on(async {
            self.sqs
                .send_message()
                .queue_url(queue)
                .message_body(body)
                .message_group_id(group)
                .message_deduplication_id(dedup)
                .send()
                .await
                .expect("send fifo")
                .message_id()
                .unwrap_or_default()
                .to_string()
        })
    }

    /// A group of `desired` instances in us-east-1; returns their ids.
    pub fn create_group(&self, name: &str, min: i32, max: i32, desired: i32) -> Vec<String> {
        self.create_group_in("us-east-1", name, min, max, desired)
    }

    /// A group of `desired` instances in `region`; returns their ids.
    pub fn create_group_in(
        &self,
        region: &str,
        name: &str,
        min: i32,
        max: i32,
        desired: i32,
    ) -> Vec<String> {
        let asg = self.asg_in(region);
        self.rt.block_on(async {
            asg.create_launch_configuration()
                .launch_configuration_name(format!("{name}-lc"))
                .image_id("ami-12c6146b")
                .instance_type("g4dn.xlarge")
                .send()
                .await
                .expect("launch configuration");
            asg.create_auto_scaling_group()
                .auto_scaling_group_name(name)
                .launch_configuration_name(format!("{name}-lc"))
                .min_size(min)
                .max_size(max)
                .desired_capacity(desired)
                .availability_zones(format!("{region}a"))
                .send()
                .await
                .expect("group");
        });
        self.group_in(region, name)
            .instances
            .into_iter()
            .map(|i| i.0)
            .collect()
    }

    pub fn group(&self, name: &str) -> Group {
        self.group_in("us-east-1", name)
    }

    pub fn group_in(&self, region: &str, name: &str) -> Group {
        let asg = self.asg_in(region);
        self.rt.block_on(async {
            let out = asg
                .describe_auto_scaling_groups()
                .auto_scaling_group_names(name)
                .send()
                .await
                .expect("describe groups");
            let g = out.auto_scaling_groups().first().expect("group exists");
            Group {
                desired: g.desired_capacity().unwrap_or(-1),
                min: g.min_size().unwrap_or(-1),
                max: g.max_size().unwrap_or(-1),
                instances: g
                    .instances()
                    .iter()
                    .map(|i: &Instance| {
                        (
                            i.instance_id().unwrap_or_default().to_string(),
                            i.lifecycle_state()
                                .map(|s| s.as_str().to_string())
                                .unwrap_or_default(),
                            i.protected_from_scale_in().unwrap_or(false),
                        )
                    })
                    .collect(),
                tags: g
                    .tags()
                    .iter()
                    .filter_map(|t| {
                        Some((t.key()?.to_string(), t.value().unwrap_or("").to_string()))
                    })
                    .collect(),
            }
        })
    }

    pub fn set_desired(&self, name: &str, desired: i32) {
        self.rt.block_on(async {
            self.asg
                .set_desired_capacity()
                .auto_scaling_group_name(name)
                .desired_capacity(desired)
                .send()
                .await
                .expect("set desired");
        });
    }

    pub fn send(&self, queue: &str, body: &str) -> String {
        self.send_with_attrs(queue, body, &[])
    }

    pub fn send_with_attrs(&self, queue: &str, body: &str, attrs: &[(&str, &str)]) -> String {
        self.rt.block_on(async {
            let mut req = self.sqs.send_message().queue_url(queue).message_body(body);
            for (k, v) in attrs {
                req = req.message_attributes(
                    *k,
                    MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value(*v)
                        .build()
                        .expect("attribute"),
                );
            }
            req.send()
                .await
                .expect("send")
                .message_id()
                .unwrap_or_default()
                .to_string()
        })
    }

    /// (visible, in flight) messages.
    pub fn depth(&self, queue: &str) -> (i64, i64) {
        self.rt.block_on(async {
            let out = self
                .sqs
                .get_queue_attributes()
                .queue_url(queue)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                .send()
                .await
                .expect("attributes");
            let get = |k: QueueAttributeName| {
                out.attributes()
                    .and_then(|a| a.get(&k))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(-1)
            };
            (
                get(QueueAttributeName::ApproximateNumberOfMessages),
                get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            )
        })
    }

    /// Waits until `f` holds, polling every 100 ms; false on timeout.
    pub fn wait_for(&self, timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if f() {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Writes an agent config and starts `spotguard-agent run` on it, with
/// stderr in `<dir>/<name>.log`.
pub fn start_agent(env: &AwsEnv, dir: &Path, name: &str, config: &str) -> Proc {
    let cfg_path = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg_path, config).expect("write config");
    let mut cmd = Command::new(crate::bin("spotguard-agent"));
    cmd.arg("run").arg("--config").arg(&cfg_path);
    for (k, v) in env.agent_env() {
        cmd.env(k, v);
    }
    cmd.env("SPOTGUARD_TEST_RECORD", dir.join("record.txt"));
    cmd.env("RUST_LOG", "info");
    Proc::spawn_logged(cmd, name, &dir.join(format!("{name}.log")))
}

impl AwsEnv {
    /// An SNS topic delivering raw messages to a new queue; (topic ARN, queue URL).
    pub fn topic_to_queue(&self, name: &str) -> (String, String) {
        let queue = self.create_queue(&format!("{name}-sub"), 10);
        self.rt.block_on(async {
            let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new("us-east-1"))
                .endpoint_url(&self.moto_url)
                .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                    "test", "test", None, None, "test",
                ))
                .load()
                .await;
            let sns = aws_sdk_sns::Client::new(&sdk);
            let topic = sns.create_topic().name(name).send().await.expect("topic");
            let arn = topic.topic_arn().expect("topic arn").to_string();
            let qarn = self
                .sqs
                .get_queue_attributes()
                .queue_url(&queue)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .expect("queue arn");
            let qarn = qarn
                .attributes()
                .and_then(|a| a.get(&QueueAttributeName::QueueArn))
                .expect("arn")
                .clone();
            sns.subscribe()
                .topic_arn(&arn)
                .protocol("sqs")
                .endpoint(qarn)
                .attributes("RawMessageDelivery", "true")
                .send()
                .await
                .expect("subscribe");
            (arn, queue)
        })
    }

    /// Bodies of up to 10 messages received (and left in flight) from `queue`.
    pub fn peek(&self, queue: &str) -> Vec<String> {
        self.rt.block_on(async {
            let out = self
                .sqs
                .receive_message()
                .queue_url(queue)
                .max_number_of_messages(10)
                .send()
                .await
                .expect("receive");
            out.messages()
                .iter()
                .filter_map(|m| m.body().map(str::to_string))
                .collect()
        })
    }
}
