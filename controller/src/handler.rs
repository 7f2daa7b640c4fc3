//! One invocation of the controller, over a [`Cloud`]: handle an event,
//! publish the metrics, observe, decide ([`crate::reconcile`]) and act.
//! The same code serves Lambda, the `run` loop and `once`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};
use spotguard_common::clock::Clock;

use crate::aws::{Cloud, CloudError, GroupInfo, GroupUpdate};
use crate::config::Config;
use crate::events::{self, Event};
use crate::metrics::{self, MetricValue};
use crate::reconcile::{self, Action, FallbackGroup, Launch, Link, Memory, Mode, Plan, Settings};

/// How long a tick's periodic tasks may take: within the Lambda's 30 s
/// (the template's `Timeout`), after the failover work.
const CRON_BUDGET: std::time::Duration = std::time::Duration::from_secs(12);

pub struct Controller<C> {
    pub cfg: Config,
    pub cloud: C,
    /// Where decisions read the time: the system clock when deployed, a
    /// virtual one in tests and the simulation.
    pub clock: Arc<dyn Clock>,
}

/// What one reconcile saw, decided and did, over the whole cascade.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The cascade's mode ([`reconcile::cascade_mode`]): failed over while
    /// any fallback is, else failing back while any is, else normal.
    pub mode_before: &'static str,
    pub mode: &'static str,
    /// The first fallback's group and plan, as in the reports from before
    /// the cascade (for their readers).
    pub fallback: FallbackGroup,
    pub plan: Plan,
    /// One per fallback group decided, in cascade order.
    pub links: Vec<LinkReport>,
    /// Errors reading the groups after those decided (they kept their state).
    pub unreadable: Vec<String>,
    pub launches_seen: usize,
    /// False for `status` (planned only).
    pub executed: bool,
}

/// One fallback group of the cascade: what was seen and decided.
#[derive(Debug, Clone, Serialize)]
pub struct LinkReport {
    pub region: String,
    pub asg: String,
    pub mode_before: &'static str,
    pub mode: &'static str,
    pub group: FallbackGroup,
    pub plan: Plan,
    /// The codes of the capacity failures of the group before that this
    /// decision saw first (its memory did not have them), one per failure.
    pub new_failures: Vec<String>,
}

/// The capacity failures among `launches` that `after` remembers and
/// `before` did not (by the id the memory keeps, [`reconcile::failure_id`]):
/// each counted once, by its code.
fn new_failures(
    launches: &[Launch],
    before: &Memory,
    after: &Memory,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    launches
        .iter()
        .filter_map(|l| match &l.kind {
            reconcile::LaunchKind::CapacityFailure(code) => {
                Some((reconcile::failure_id(l, now), code))
            }
            _ => None,
        })
        .filter(|(id, _)| {
            !before.failures.iter().any(|f| f.id == *id)
                && after.failures.iter().any(|f| f.id == *id)
                && seen.insert(id.clone())
        })
        .map(|(_, code)| code.clone())
        .collect()
}

/// One reading of every group, in cascade order (0: the primary), each as
/// AWS answered it.
pub type Groups = Vec<Result<GroupInfo, CloudError>>;

/// The data points published, the errors, and the queue's depth (visible,
/// in flight) if it could be read.
pub type Published = (Vec<MetricValue>, Vec<String>, Option<(i64, i64)>);

/// What a tick reads ([`Controller::read`]).
pub struct Reading {
    pub depth: Result<(i64, i64), CloudError>,
    pub groups: Groups,
    /// The scaling activities of each group that opens a link (all but
    /// the last).
    pub activities: Vec<Result<Vec<crate::events::Activity>, CloudError>>,
    /// Each fallback's policy.
    #[allow(clippy::type_complexity)]
    pub policies: Vec<Result<Option<(Option<bool>, crate::aws::TargetTracking)>, CloudError>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TickReport {
    pub metrics: Vec<MetricValue>,
    pub metrics_error: Option<String>,
    pub reconcile: Report,
    /// Groups whose desired capacity was raised from 0 to 1 (scale-out from zero).
    pub raised_from_zero: Vec<String>,
    /// Periodic tasks enqueued: (name, scheduled time).
    pub cron: Vec<(String, String)>,
    /// Instances whose agent was dead ([`crate::liveness`]): their
    /// protection released this tick.
    pub dead_released: Vec<String>,
}

impl<C: Cloud> Controller<C> {
    /// The decision's settings for fallback `i` (its own cap).
    pub fn settings(&self, i: usize) -> Settings {
        let f = &self.cfg.failover;
        Settings {
            failures: f.failures,
            window: f.failure_window.0,
            capacity_ttl: f.capacity_ttl.0,
            recovery_for: f.recovery_for.0,
            min_dwell: f.min_dwell.0,
            step: f.failback_step,
            cap: self.cfg.fallbacks.get(i).map_or(0, |g| g.max_size),
            shortage_for: f.shortage_for.0,
            max_busy_age: Some(f.max_busy_age.0),
        }
    }

    /// The index (0: the primary) of the group whose launch outcomes open
    /// the next link, if `group` in `region` is one: every group but the
    /// last. Without a region (not in the envelope), the first group of
    /// that name.
    fn upstream_index(&self, region: Option<&str>, group: &str) -> Option<usize> {
        self.cfg
            .groups()
            .take(self.cfg.fallbacks.len())
            .position(|(r, g)| g == group && region.is_none_or(|x| x == r))
    }

    /// The lease queue's region: from its URL, else the primary's.
    fn lease_region(url: &str, cfg: &Config) -> String {
        spotguard_common::region::queue_url_region(url)
            .unwrap_or_else(|| cfg.primary.region.clone())
    }

    /// Runs `work` as the one controller acting ([`crate::lease`]), cut at
    /// the lease's end or at `deadline` (a Lambda invocation's), whichever
    /// comes first, so that nothing is written once another may hold the
    /// lease; `work` is told when it will be cut. A lease another holds is
    /// waited for ([`crate::lease::WAIT`], within the deadline); `Ok(None)`:
    /// still held, and this invocation did nothing. Without
    /// `lease.queue_url`, the work runs unguarded.
    pub async fn leased<T, F>(
        &self,
        deadline: Option<tokio::time::Instant>,
        work: impl FnOnce(Option<tokio::time::Instant>) -> F,
    ) -> Result<Option<T>, CloudError>
    where
        F: std::future::Future<Output = Result<T, CloudError>>,
    {
        let margin = crate::lease::MARGIN;
        let held = match &self.cfg.lease.queue_url {
            None => None,
            Some(url) => {
                let region = Self::lease_region(url, &self.cfg);
                let hold = self.cfg.lease.hold.0;
                let mut wait_until = tokio::time::Instant::now() + crate::lease::WAIT;
                if let Some(d) = deadline {
                    // Leave the work at least half of what is left.
                    let half = d.saturating_duration_since(tokio::time::Instant::now()) / 2;
                    wait_until = wait_until.min(tokio::time::Instant::now() + half);
                }
                match crate::lease::acquire_waiting(
                    &self.cloud,
                    &region,
                    url,
                    hold,
                    self.clock.as_ref(),
                    wait_until,
                )
                .await?
                {
                    Some(l) => Some((region, url, l)),
                    None => {
                        tracing::info!("another controller holds the lease: this one does nothing");
                        return Ok(None);
                    }
                }
            }
        };
        let now = tokio::time::Instant::now();
        let mut end = held
            .as_ref()
            .map(|(_, _, l)| now + l.budget(self.clock.now()));
        if let Some(d) = deadline {
            let by_deadline = now + d.saturating_duration_since(now).saturating_sub(margin);
            end = Some(end.map_or(by_deadline, |e| e.min(by_deadline)));
        }
        let r = match end {
            None => work(None).await,
            Some(e) => {
                let b = e.saturating_duration_since(now);
                tokio::time::timeout(b, work(Some(e)))
                    .await
                    .unwrap_or_else(|_| {
                        Err(CloudError {
                            op: "tick",
                            region: self.cfg.primary.region.clone(),
                            message: format!(
                                "cut short after {b:?}: the lease's end or the invocation's deadline"
                            ),
                        })
                    })
            }
        };
        if let Some((region, url, l)) = &held {
            crate::lease::release(&self.cloud, region, url, l, self.clock.now()).await;
        }
        r.map(Some)
    }

    /// [`Controller::handle_event_by`] without a deadline.
    pub async fn handle_event(&self, v: &Value) -> Result<Option<TickReport>, CloudError> {
        self.handle_event_by(v, None).await
    }

    /// One EventBridge event, within a deadline (a Lambda's). Events that
    /// change nothing (malformed, a spot warning, a group that opens no
    /// fallback) take no lease. A tick publishes the backlog metrics
    /// whoever holds the lease (target tracking needs a data point every
    /// minute), then decides and acts under it; a launch outcome is decided
    /// under it. `Ok(None)`: nothing decided (ignored, or the lease held
    /// throughout the wait; the next tick polls the activities again).
    pub async fn handle_event_by(
        &self,
        v: &Value,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Option<TickReport>, CloudError> {
        match events::parse(v, &self.cfg.failover_codes()) {
            Ok(Event::Tick) => self.tick_by(Vec::new(), deadline).await,
            Ok(Event::Launch { group, region, .. })
                if self.upstream_index(region.as_deref(), &group).is_some() =>
            {
                self.leased(deadline, |_| self.handle(v))
                    .await
                    .map(Option::flatten)
            }
            _ => self.handle(v).await,
        }
    }

    /// A tick as the one controller acting: the reading and the metrics
    /// first, unleased; the rest under the lease. `Ok(None)` when another
    /// held the lease throughout.
    pub async fn leased_tick(&self) -> Result<Option<TickReport>, CloudError> {
        self.tick_by(Vec::new(), None).await
    }

    async fn tick_by(
        &self,
        launches: Vec<Launch>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Option<TickReport>, CloudError> {
        let (reading, published) = self.read_and_publish().await;
        self.leased(deadline, |end| {
            self.tick_rest(launches, &reading, published, end)
        })
        .await
    }

    /// Handles one EventBridge event. Unknown or malformed events are logged
    /// and acknowledged (`Ok(None)`): a retry would not make them valid.
    pub async fn handle(&self, v: &Value) -> Result<Option<TickReport>, CloudError> {
        match events::parse(v, &self.cfg.failover_codes()) {
            Err(e) => {
                tracing::warn!(error = %e, "event ignored");
                Ok(None)
            }
            Ok(Event::Tick) => self.tick(Vec::new()).await.map(Some),
            Ok(Event::Launch {
                group,
                region,
                launch,
            }) => {
                let Some(i) = self.upstream_index(region.as_deref(), &group) else {
                    tracing::info!(%group, ?region, "launch event of a group that opens no fallback; ignored");
                    return Ok(None);
                };
                tracing::info!(%group, ?launch, "launch outcome");
                // The backlog decides whether a fallback is needed at all.
                let depth = match self
                    .cloud
                    .queue_depth(&self.cfg.queue_region(), &self.cfg.primary.queue_url)
                    .await
                {
                    Ok(d) => Some(d),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the queue depth");
                        None
                    }
                };
                let reconcile = self.reconcile_at(vec![(i, launch)], true, depth).await?;
                // A failure an event brings first is counted here (the next
                // tick finds it remembered).
                let failures = self.failure_points(&reconcile);
                let metrics_error = match self.cloud.put_metrics(&failures).await {
                    Ok(()) => None,
                    Err(e) => Some(e.to_string()),
                };
                Ok(Some(TickReport {
                    metrics: if metrics_error.is_none() {
                        failures
                    } else {
                        Vec::new()
                    },
                    metrics_error,
                    reconcile,
                    raised_from_zero: Vec::new(),
                    cron: Vec::new(),
                    dead_released: Vec::new(),
                }))
            }
            Ok(Event::SpotInterruption {
                instance_id,
                action,
            }) => {
                // Informational: an interruption does not mean launches fail.
                tracing::info!(%instance_id, %action, "spot interruption warning");
                Ok(None)
            }
        }
    }

    /// The scheduled work, unguarded (tests, the simulation): publish the
    /// metrics, reconcile, then raise a group that may run from 0 to 1 if
    /// work waits. A metrics failure does not stop the reconcile.
    /// `launches` are the primary's.
    pub async fn tick(&self, launches: Vec<Launch>) -> Result<TickReport, CloudError> {
        let (reading, published) = self.read_and_publish().await;
        self.tick_rest(launches, &reading, published, None).await
    }

    /// One reading of the queue, every group, their activities and
    /// policies, all at once, then the backlog metrics from it.
    async fn read_and_publish(&self) -> (Reading, Published) {
        let reading = self.read().await;
        let published = self
            .publish_metrics_with(reading.depth.clone(), &reading.groups)
            .await;
        for e in &published.1 {
            tracing::warn!(error = %e, "cannot publish a backlog metric");
        }
        (reading, published)
    }

    /// Everything a tick reads, read at once: a region that hangs costs one
    /// call's bound ([`crate::aws::CALL_TIMEOUT`]) for the whole reading,
    /// not one per read in turn, so a healthy group before it is still
    /// decided and acted on within the invocation's deadline.
    pub async fn read(&self) -> Reading {
        let n = self.cfg.fallbacks.len();
        let (depth, groups, activities, policies) = tokio::join!(
            self.read_depth(),
            self.read_groups(),
            futures_util::future::join_all(
                self.cfg
                    .groups()
                    .take(n)
                    .map(|(region, asg)| self.cloud.activities(region, asg))
            ),
            futures_util::future::join_all(self.cfg.fallbacks.iter().map(|f| self.cloud.policy(
                &f.region,
                &f.asg,
                &f.policy_name
            ))),
        );
        Reading {
            depth,
            groups,
            activities,
            policies,
        }
    }

    /// The tick after its reading and metrics: the decision, the periodic
    /// tasks (within `end`, the lease's or the deadline's cut), the
    /// `FailedOver` point, the scale-out from zero.
    async fn tick_rest(
        &self,
        launches: Vec<Launch>,
        reading: &Reading,
        (metrics, errors, depth): Published,
        end: Option<tokio::time::Instant>,
    ) -> Result<TickReport, CloudError> {
        let groups = &reading.groups;
        // The failover decision first; periodic tasks need only the primary
        // group, so a decision that cannot be made this tick does not hold
        // them back, and their time (bounded) comes after it.
        let reconcile = self
            .reconcile_with(
                launches.into_iter().map(|l| (0, l)).collect(),
                true,
                depth,
                Some(reading),
            )
            .await;
        let primary_tags = groups
            .first()
            .and_then(|g| g.as_ref().ok())
            .map(|g| &g.tags);
        // Within what is left before the cut (less a call's bound for the
        // rest of the tick); none begun without a call's bound left, so a
        // slot's memory and its send are not split by the cut.
        let budget = match end {
            None => CRON_BUDGET,
            Some(e) => e
                .saturating_duration_since(tokio::time::Instant::now())
                .saturating_sub(crate::aws::CALL_TIMEOUT)
                .min(CRON_BUDGET),
        };
        let cron = if budget < crate::aws::CALL_TIMEOUT && !self.cfg.cron.tasks.is_empty() {
            tracing::warn!(left = ?budget, "no time left for the periodic tasks this tick; the next one catches up");
            Vec::new()
        } else {
            match tokio::time::timeout(budget, self.run_cron(primary_tags)).await {
                Ok(sent) => sent,
                Err(_) => {
                    tracing::error!(budget = ?budget, "periodic tasks cut short: AWS too slow; a slot remembered but not sent is missed");
                    Vec::new()
                }
            }
        };
        // A fallback that cannot be read or acted on (its region impaired,
        // a group IAM denies) must not keep the primary at 0 with work
        // queued: its scale-out from zero runs whatever the fallbacks do.
        let reconcile = match reconcile {
            Ok(r) => r,
            Err(e) => {
                if let Some((visible, _)) = depth {
                    self.raise_from_zero(visible, &[(0, groups.first())]).await;
                }
                return Err(e);
            }
        };
        // For the "failed over too long" alarm: 1 while any fallback is in
        // use (failed over or failing back).
        let p = &self.cfg.primary;
        let mode_point = metrics::group_point(
            &self.cfg,
            &p.region,
            &p.asg,
            metrics::FAILED_OVER,
            f64::from(u8::from(reconcile.mode != Mode::Normal.as_str())),
        );
        let mut metrics = metrics;
        let mut errors = errors;
        match self.cloud.put_metric(&mode_point).await {
            Ok(()) => metrics.push(mode_point),
            Err(e) => errors.push(e.to_string()),
        }
        // The dashboard's, in the control plane's region, in one call.
        let fleet = self.fleet_points(groups, &reconcile);
        match self.cloud.put_metrics(&fleet).await {
            Ok(()) => metrics.extend(fleet),
            Err(e) => errors.push(e.to_string()),
        }
        let raised_from_zero = match depth {
            Some((visible, _)) => self.scale_from_zero(visible, &reconcile, groups).await,
            None => Vec::new(),
        };
        // Within what is left before the cut: three calls' bounds (the
        // marks, their re-read, the release).
        let time_left = end.is_none_or(|e| {
            e.saturating_duration_since(tokio::time::Instant::now()) >= 3 * crate::aws::CALL_TIMEOUT
        });
        let dead_released = if time_left {
            self.release_dead_agents(groups).await
        } else {
            tracing::warn!("no time left for the dead-agent check this tick");
            Vec::new()
        };
        Ok(TickReport {
            metrics,
            metrics_error: (!errors.is_empty()).then(|| errors.join("; ")),
            reconcile,
            raised_from_zero,
            cron,
            dead_released,
        })
    }

    /// Releases the protection of every protected instance, in every group
    /// read this tick, whose agent's liveness mark is older than
    /// `failover.dead_after` ([`crate::liveness`]), with an alarm: a dead
    /// agent would hold its instance (and a failing-back gate) for ever.
    /// One `DescribeTags` per group with protected instances (200 ids to a
    /// call); the groups at once. A group whose marks cannot be read
    /// releases nothing this tick.
    async fn release_dead_agents(&self, groups: &Groups) -> Vec<String> {
        let dead_after = self.cfg.failover.dead_after.0;
        if dead_after.is_zero() {
            return Vec::new();
        }
        let checks = self
            .cfg
            .groups()
            .zip(groups.iter())
            .filter_map(|((region, asg), g)| {
                let g = g.as_ref().ok().filter(|g| !g.protected.is_empty())?;
                Some(self.release_dead_in(region, asg, &g.protected, dead_after))
            });
        futures_util::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// [`Controller::release_dead_agents`] for one group. The marks of the
    /// instances found dead are read again right before the release: an
    /// agent restarted meanwhile has marked itself alive again.
    async fn release_dead_in(
        &self,
        region: &str,
        asg: &str,
        protected: &[String],
        dead_after: std::time::Duration,
    ) -> Vec<String> {
        let dead = |marks: &BTreeMap<String, String>, ids: &[String]| {
            crate::liveness::judge(ids, marks, self.clock.now(), dead_after)
                .into_iter()
                .filter_map(|(id, a)| match a {
                    crate::liveness::Agent::Dead { last } => Some((id, last)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let read = |ids: Vec<String>| async move {
            match self.cloud.alive_marks(region, &ids).await {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(group = %asg, error = %e, "cannot read the agents' liveness marks; no dead agent released this tick");
                    None
                }
            }
        };
        let Some(marks) = read(protected.to_vec()).await else {
            return Vec::new();
        };
        let suspects: Vec<String> = dead(&marks, protected).into_iter().map(|d| d.0).collect();
        if suspects.is_empty() {
            return Vec::new();
        }
        let Some(again) = read(suspects.clone()).await else {
            return Vec::new();
        };
        let dead = dead(&again, &suspects);
        if dead.is_empty() {
            return Vec::new();
        }
        let ids: Vec<String> = dead.iter().map(|d| d.0.clone()).collect();
        tracing::error!(group = %asg, instances = ?ids, "protected instances whose agent stopped marking itself alive: releasing their protection");
        let mut released = Vec::new();
        for batch in crate::aws::protection_batches(&ids) {
            match self.cloud.release_protection(region, asg, batch).await {
                Ok(r) => released.extend(r),
                Err(e) => {
                    tracing::warn!(group = %asg, error = %e, "cannot release a dead agent's protection; next tick again");
                }
            }
        }
        if released.is_empty() {
            return released;
        }
        let last_marked: serde_json::Map<String, Value> = dead
            .iter()
            .filter(|d| released.contains(&d.0))
            .map(|(id, last)| (id.clone(), json!(last.to_rfc3339())))
            .collect();
        self.alarm(
            "spotguard: ALARM dead agent's protection released",
            json!({
                "event": "dead_agent_protection_released",
                "group": {"region": region, "asg": asg},
                "instances": released,
                "last_marked": last_marked,
                "dead_after_secs": dead_after.as_secs(),
            }),
        )
        .await;
        released
    }

    /// Publishes an alarm to `notify.sns_topic_arn`, if set; a failure is
    /// logged (the action it reports is done).
    async fn alarm(&self, subject: &str, msg: Value) {
        if let Some(topic) = &self.cfg.notify.sns_topic_arn {
            if let Err(e) = self.cloud.publish(topic, subject, &msg.to_string()).await {
                tracing::warn!(error = %e, "cannot publish the alarm");
            }
        }
    }

    /// What the dashboard shows that CloudWatch does not have in the
    /// control plane's region: each group's instances and gate as read
    /// this tick, each link's mode, the new capacity failures by code.
    fn fleet_points(&self, groups: &Groups, report: &Report) -> Vec<MetricValue> {
        use crate::metrics::{self as m, fleet_point};
        let cfg = &self.cfg;
        let mut out = Vec::new();
        for (at, g) in cfg.groups().zip(groups) {
            let Ok(g) = g else { continue };
            for (name, v) in [
                (m::GROUP_IN_SERVICE, g.in_service),
                (m::GROUP_PENDING, g.pending),
                (m::GROUP_DESIRED, g.desired),
                (m::GROUP_MAX_SIZE, g.max),
            ] {
                out.push(fleet_point(cfg, name, at, f64::from(v), "Count"));
            }
        }
        for l in &report.links {
            let code = match l.mode {
                "failed-over" => 1.0,
                "failing-back" => 2.0,
                _ => 0.0,
            };
            out.push(fleet_point(
                cfg,
                m::LINK_MODE,
                (&l.region, &l.asg),
                code,
                "None",
            ));
        }
        out.extend(self.failure_points(report));
        out
    }

    /// The capacity failures a decision saw first, by group and code
    /// (published by ticks and launch events alike: whichever saw a failure
    /// first remembers it, and counts it).
    fn failure_points(&self, report: &Report) -> Vec<MetricValue> {
        if !report.executed {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (i, l) in report.links.iter().enumerate() {
            let mut by_code: std::collections::BTreeMap<&str, usize> = Default::default();
            for c in &l.new_failures {
                *by_code.entry(c.as_str()).or_default() += 1;
            }
            let upstream = self.cfg.groups().nth(i).unwrap_or_default();
            for (c, n) in by_code {
                out.push(crate::metrics::failures_point(&self.cfg, upstream, c, n));
            }
        }
        out
    }

    /// Enqueues the periodic tasks that are due ([`crate::cron::due`]).
    /// The slot is remembered (tags on the primary group) before it is
    /// sent: a memory that cannot be written sends nothing (tried again next
    /// tick), and a retried invocation finds the slot taken and sends
    /// nothing, on any queue. A send that fails puts the memory back, so
    /// the next tick sends it; if that too fails, the slot is missed, and
    /// said so. Never stops the failover work.
    async fn run_cron(
        &self,
        primary_tags: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Vec<(String, String)> {
        use crate::cron;
        let tasks = &self.cfg.cron.tasks;
        if tasks.is_empty() {
            return Vec::new();
        }
        let p = &self.cfg.primary;
        let Some(tags) = primary_tags else {
            tracing::warn!(
                "cannot read the periodic tasks' memory (the primary group); none enqueued"
            );
            return Vec::new();
        };
        // Tags of tasks no longer configured go: a group holds 50.
        let stale: Vec<String> = tags
            .keys()
            .filter(|k| k.starts_with(cron::TAG_PREFIX))
            .filter(|k| !tasks.iter().any(|t| cron::tag_of(&t.name) == **k))
            .cloned()
            .collect();
        if !stale.is_empty() {
            match self.cloud.delete_tags(&p.region, &p.asg, &stale).await {
                Ok(()) => {
                    tracing::info!(tags = ?stale, "tags of periodic tasks no longer configured removed")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot remove the tags of periodic tasks no longer configured")
                }
            }
        }
        let (due, memory) = cron::due(tasks, tags, self.clock.now());
        if memory.is_empty() {
            return Vec::new();
        }
        if let Err(e) = self.cloud.put_tags(&p.region, &p.asg, &memory).await {
            // The write may have been applied all the same (a timeout):
            // then the slots are taken, and must be sent now or never.
            let written = match self.cloud.group(&p.region, &p.asg).await {
                Ok(g) => memory.iter().all(|(k, v)| g.tags.get(k) == Some(v)),
                Err(_) => false,
            };
            if !written {
                tracing::error!(error = %e, "cannot remember the periodic tasks due (a group holds at most 50 tags); none enqueued, tried again next tick");
                return Vec::new();
            }
            tracing::warn!(error = %e, "the memory write answered an error but was applied; sending");
        }
        let fifo = p.queue_url.ends_with(".fifo");
        let mut sent = Vec::new();
        let mut restore = std::collections::BTreeMap::new();
        // Slots come oldest first per task: once one fails, the task's later
        // ones wait for the next tick (its memory goes back to the last slot
        // sent), so none is sent out of order or twice.
        let mut failed: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
        let mut last_sent: std::collections::BTreeMap<&str, String> =
            std::collections::BTreeMap::new();
        for d in &due {
            if failed.contains(d.name.as_str()) {
                continue;
            }
            let ids = cron::fifo_ids(d);
            let r = self
                .cloud
                .send_message(
                    &self.cfg.queue_region(),
                    &p.queue_url,
                    cron::BODY,
                    &cron::message_of(d),
                    fifo.then_some((ids.0.as_str(), ids.1.as_str())),
                )
                .await;
            let at = d.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            match r {
                Ok(()) => {
                    tracing::info!(task = %d.name, scheduled_at = %at, "periodic task enqueued");
                    last_sent.insert(d.name.as_str(), at.clone());
                    sent.push((d.name.clone(), at));
                }
                Err(e) => {
                    tracing::warn!(task = %d.name, scheduled_at = %at, error = %e, "cannot enqueue a periodic task; tried again next tick");
                    failed.insert(d.name.as_str());
                    let key = cron::tag_of(&d.name);
                    if let Some(back) = last_sent.get(d.name.as_str()).or_else(|| tags.get(&key)) {
                        restore.insert(key, back.clone());
                    }
                }
            }
        }
        if !restore.is_empty() {
            if let Err(e) = self.cloud.put_tags(&p.region, &p.asg, &restore).await {
                tracing::error!(error = %e, tasks = ?restore.keys().collect::<Vec<_>>(), "a periodic task could be neither enqueued nor un-remembered: this slot is missed");
            }
        }
        sent
    }

    /// Target tracking cannot grow a group from 0: its new capacity is in
    /// proportion to the current one, and the metric-math form has no value
    /// with no instance (REFERENCE.md). So with work waiting and a group at
    /// 0 that may run (the primary always; a fallback while failed over),
    /// the controller sets its desired capacity to 1, and target tracking
    /// takes it from there. With the one-minute schedule, a job waits about
    /// a minute plus the launch for its first instance.
    async fn scale_from_zero(&self, visible: i64, report: &Report, read: &Groups) -> Vec<String> {
        // The tick's reading, with what this tick's plans set on top (a
        // gate just opened, a desired capacity just raised).
        let mut seen: Vec<Option<Result<GroupInfo, CloudError>>> =
            read.iter().cloned().map(Some).collect();
        if report.executed {
            for (i, l) in report.links.iter().enumerate() {
                for a in &l.plan.actions {
                    let (at, max, desired) = match *a {
                        Action::SetFallbackMaxSize { to, .. } => (i + 1, Some(to), None),
                        Action::SetFallbackDesired { to, .. } => (i + 1, None, Some(to)),
                        Action::SetPrimaryDesired { to, .. } => (i, None, Some(to)),
                        _ => continue,
                    };
                    if let Some(Some(Ok(g))) = seen.get_mut(at) {
                        g.max = max.unwrap_or(g.max);
                        g.desired = desired.unwrap_or(g.desired).min(g.max);
                    }
                }
            }
        }
        let mut groups = vec![(0, seen.first().and_then(Option::as_ref))];
        for (i, l) in report.links.iter().enumerate() {
            if l.mode == Mode::FailedOver.as_str() {
                groups.push((i + 1, seen.get(i + 1).and_then(Option::as_ref)));
            }
        }
        self.raise_from_zero(visible, &groups).await
    }

    /// Raises each empty group of `groups` (index in the cascade, its
    /// reading this tick) to 1 if work waits.
    async fn raise_from_zero(
        &self,
        visible: i64,
        groups: &[(usize, Option<&Result<GroupInfo, CloudError>>)],
    ) -> Vec<String> {
        if visible < 1 {
            return Vec::new();
        }
        let mut raised = Vec::new();
        for &(i, reading) in groups {
            let Some((region, name)) = self.cfg.groups().nth(i) else {
                continue;
            };
            let Some(reading) = reading else {
                continue;
            };
            let empty = |g: &GroupInfo| g.desired == 0 && g.in_service == 0 && g.max >= 1;
            match reading {
                Ok(g) if empty(g) => {
                    // The reading is the tick's (seconds old): read again
                    // before acting, so that a group raised meanwhile (by
                    // a person, a scheduled action) is not set back to 1.
                    match self.cloud.group(region, name).await {
                        Ok(now) if empty(&now) => {}
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the group again for scale-out from zero");
                            continue;
                        }
                    }
                    match self
                        .cloud
                        .update_group(region, name, GroupUpdate::desired(1))
                        .await
                    {
                        Ok(()) => {
                            tracing::info!(%region, group = %name, visible, "work waits and the group is empty: desired capacity 0 -> 1");
                            raised.push(name.to_string());
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot raise the desired capacity from 0")
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the group for scale-out from zero")
                }
            }
        }
        raised
    }

    /// Publishes each group's data point on its own, in its own region: an
    /// error in one region does not stop the others'. Returns what was
    /// published, the errors, and the queue depth (visible, in flight) if
    /// it could be read.
    pub async fn publish_metrics(&self) -> Published {
        let (depth, groups) = tokio::join!(self.read_depth(), self.read_groups());
        self.publish_metrics_with(depth, &groups).await
    }

    /// The queue's depth (visible, in flight).
    async fn read_depth(&self) -> Result<(i64, i64), CloudError> {
        self.cloud
            .queue_depth(&self.cfg.queue_region(), &self.cfg.primary.queue_url)
            .await
    }

    /// Every group (the primary, then the fallbacks in cascade order), read
    /// at once: a region that hangs costs one call's bound
    /// ([`crate::aws::CALL_TIMEOUT`]) for the whole reading, not one per
    /// group read in turn, so a healthy group before it is still decided
    /// and acted on within the invocation's deadline.
    pub async fn read_groups(&self) -> Groups {
        futures_util::future::join_all(self.cfg.groups().map(|(r, g)| self.cloud.group(r, g))).await
    }

    /// [`Controller::publish_metrics`] on a reading already made.
    async fn publish_metrics_with(
        &self,
        depth: Result<(i64, i64), CloudError>,
        groups: &Groups,
    ) -> Published {
        let (visible, in_flight) = match depth {
            Ok(d) => d,
            Err(e) => return (Vec::new(), vec![e.to_string()], None),
        };
        let backlog = metrics::backlog_of(&self.cfg, visible, in_flight);
        let mut published = Vec::new();
        let mut errors = Vec::new();
        // The figure is the fleet's, backlog per InService instance of the
        // open groups together.
        let mut read = Vec::new();
        for ((region, group), g) in self.cfg.groups().zip(groups) {
            match g {
                Ok(g) => read.push((region, group, Some(g))),
                Err(e) => {
                    errors.push(e.to_string());
                    read.push((region, group, None));
                }
            }
        }
        let open: Vec<metrics::Open> = read
            .iter()
            .enumerate()
            .filter_map(|(i, (_, _, g))| {
                g.as_ref().map(|g| metrics::Open {
                    index: i,
                    in_service: g.in_service,
                    intake_closed: i > 0
                        && g.tags
                            .get(reconcile::TAG_INTAKE)
                            .is_some_and(|v| v == "closed"),
                })
            })
            .collect();
        let value = metrics::fleet_per_instance(backlog, &open);
        for (i, (region, group, g)) in read.into_iter().enumerate() {
            if g.is_none() {
                continue;
            }
            let name = if i == 0 {
                &self.cfg.metric.primary_name
            } else {
                &self.cfg.metric.fallback_name
            };
            let point = metrics::group_point(&self.cfg, region, group, name, value);
            match self.cloud.put_metric(&point).await {
                Ok(()) => published.push(point),
                Err(e) => errors.push(e.to_string()),
            }
        }
        tracing::info!(
            visible,
            in_flight,
            published = published.len(),
            "metrics published"
        );
        (published, errors, Some((visible, in_flight)))
    }

    /// Observes, decides and (with `execute`) acts. `launches` are the
    /// primary's outcomes learnt from events.
    pub async fn reconcile(
        &self,
        launches: Vec<Launch>,
        execute: bool,
        depth: Option<(i64, i64)>,
    ) -> Result<Report, CloudError> {
        self.reconcile_at(
            launches.into_iter().map(|l| (0, l)).collect(),
            execute,
            depth,
        )
        .await
    }

    /// [`Controller::reconcile`] with launch outcomes of any group: `(i,
    /// launch)`, `i` the group's index (0: the primary, `k`: fallback `k`).
    /// Each group's recent scaling activities are added, but the last's
    /// (no group after it to open). `depth` is the queue's (visible, in
    /// flight), if read.
    pub async fn reconcile_at(
        &self,
        launches: Vec<(usize, Launch)>,
        execute: bool,
        depth: Option<(i64, i64)>,
    ) -> Result<Report, CloudError> {
        self.reconcile_with(launches, execute, depth, None).await
    }

    /// [`Controller::reconcile_at`] on the tick's reading of the groups, if
    /// one was made (else it reads them, at once). Activities and policies
    /// are read at once too.
    async fn reconcile_with(
        &self,
        launches: Vec<(usize, Launch)>,
        execute: bool,
        depth: Option<(i64, i64)>,
        reading: Option<&Reading>,
    ) -> Result<Report, CloudError> {
        let n = self.cfg.fallbacks.len();
        let now = self.clock.now();
        let groups: Vec<(String, String)> = self
            .cfg
            .groups()
            .map(|(r, g)| (r.to_string(), g.to_string()))
            .collect();
        // Launch outcomes of each group that opens a link: groups 0..n.
        let mut by_group: Vec<Vec<Launch>> = vec![Vec::new(); n];
        for (i, l) in launches {
            if let Some(v) = by_group.get_mut(i) {
                v.push(l);
            }
        }
        let codes = self.cfg.failover_codes();
        let own;
        let reading: &Reading = match reading {
            Some(r) => r,
            None => {
                own = self.read().await;
                &own
            }
        };
        let activities = reading.activities.iter().cloned();
        let policies = reading.policies.iter().cloned();
        for (i, acts) in activities.enumerate() {
            match acts {
                Ok(acts) => {
                    by_group[i].extend(events::launches_of(&acts, &codes));
                    by_group[i].extend(events::stuck_spot_requests(
                        &acts,
                        now,
                        self.cfg.failover.spot_wait.0,
                    ));
                }
                // Events still count; the next tick polls again.
                Err(e) => tracing::warn!(error = %e, "cannot read the scaling activities"),
            }
        }
        let launches_seen = by_group.iter().map(Vec::len).sum();
        // The primary, for the first link's shortage rule; unreadable
        // (throttled, its region impaired), its last reading in the memory
        // stands rather than every decision blocked.
        let primary = match reading.groups.first().cloned().unwrap_or_else(|| {
            Err(CloudError {
                op: "DescribeAutoScalingGroups",
                region: self.cfg.primary.region.clone(),
                message: "not read".into(),
            })
        }) {
            Ok(pg) => Some(reconcile::PrimaryGroup {
                desired: pg.desired,
                max: pg.max,
                in_service: pg.in_service,
                busy: pg.busy,
                pending: pg.pending,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the primary group; deciding on its last reading");
                None
            }
        };
        let policy_enabled: Vec<Option<bool>> = policies
            .map(|p| match p {
                Ok(p) => p.and_then(|(enabled, _)| enabled),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read a fallback policy");
                    None
                }
            })
            .collect();
        let settings: Vec<Settings> = (0..n).map(|i| self.settings(i)).collect();
        // Decide on the memories as read; if another invocation wrote a
        // newer one meanwhile, decide again on it (the launches still
        // count), so a stale decision is never carried out and no event is
        // lost.
        const ATTEMPTS: u32 = 3;
        let mut attempt = 1;
        loop {
            // Each group on its own: one that cannot be read (its region
            // impaired) must not stop the decisions before it. The links
            // up to it are decided; it and those after it keep their state.
            // The first decision on the tick's reading; a decision made
            // again (the memory moved) on a new one.
            let again;
            let fallback_reading: &[Result<GroupInfo, CloudError>] = if attempt == 1 {
                reading.groups.get(1..).unwrap_or_default()
            } else {
                again = self.read_groups().await;
                again.get(1..).unwrap_or_default()
            };
            let mut infos: Vec<GroupInfo> = Vec::with_capacity(n);
            let mut unreadable = Vec::new();
            for g in fallback_reading {
                match g.clone() {
                    Ok(g) => infos.push(g),
                    Err(e) if !infos.is_empty() => {
                        tracing::warn!(error = %e, "cannot read a fallback group; it and the groups after it keep their state this time");
                        unreadable.push(e.to_string());
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            let decided = infos.len();
            let memories: Vec<Memory> = infos
                .iter()
                .map(|g| {
                    let (m, warnings) = Memory::from_tags(&g.tags, now);
                    for w in warnings {
                        tracing::warn!("{w}");
                    }
                    m
                })
                .collect();
            let fallbacks: Vec<FallbackGroup> = infos
                .iter()
                .zip(&policy_enabled)
                .map(|(g, enabled)| FallbackGroup {
                    desired: g.desired,
                    max: g.max,
                    in_service: g.in_service,
                    busy: g.busy,
                    policy_enabled: *enabled,
                })
                .collect();
            let links: Vec<Link<'_>> = (0..decided)
                .map(|i| Link {
                    memory: &memories[i],
                    group: fallbacks[i],
                    // The group before: the primary, or the previous fallback as just read.
                    upstream: match i {
                        0 => primary,
                        _ => Some(reconcile::PrimaryGroup {
                            desired: infos[i - 1].desired,
                            max: infos[i - 1].max,
                            in_service: infos[i - 1].in_service,
                            busy: infos[i - 1].busy,
                            pending: infos[i - 1].pending,
                        }),
                    },
                    launches: &by_group[i],
                    settings: &settings[i],
                })
                .collect();
            let plans = reconcile::cascade_prefix(
                &links,
                decided < n,
                depth.map(|d| d.0),
                depth.map(|d| d.1),
                now,
            );
            let report = Report {
                mode_before: reconcile::cascade_mode(memories.iter().map(|m| m.mode)).as_str(),
                mode: reconcile::cascade_mode(plans.iter().map(|p| p.memory.mode)).as_str(),
                fallback: fallbacks[0],
                plan: plans[0].clone(),
                links: plans
                    .iter()
                    .enumerate()
                    .map(|(i, plan)| LinkReport {
                        region: groups[i + 1].0.clone(),
                        asg: groups[i + 1].1.clone(),
                        mode_before: memories[i].mode.as_str(),
                        mode: plan.memory.mode.as_str(),
                        group: fallbacks[i],
                        plan: plan.clone(),
                        new_failures: new_failures(&by_group[i], &memories[i], &plan.memory, now),
                    })
                    .collect(),
                unreadable,
                launches_seen,
                executed: execute,
            };
            if !execute || plans.iter().all(|p| p.actions.is_empty()) {
                return Ok(report);
            }
            let mut moved = None;
            for (i, f) in self.cfg.fallbacks.iter().take(decided).enumerate() {
                let current = self.cloud.group(&f.region, &f.asg).await?;
                let (now_memory, _) = Memory::from_tags(&current.tags, now);
                if now_memory.version != memories[i].version {
                    moved = Some((i, now_memory.version));
                    break;
                }
            }
            let Some((i, version)) = moved else {
                // Each link's plan on its own: one region's failure does not
                // keep the others from acting; the failed one is decided
                // again next time (its memory unchanged).
                let mut first_error = None;
                for (i, plan) in plans.iter().enumerate() {
                    if let Err(e) = self.execute(i, plan).await {
                        tracing::warn!(error = %e, group = %self.cfg.fallbacks[i].asg, "a fallback's plan was not carried out");
                        first_error.get_or_insert(e);
                    }
                }
                return match first_error {
                    Some(e) => Err(e),
                    None => Ok(report),
                };
            };
            tracing::warn!(
                group = %self.cfg.fallbacks[i].asg,
                read = memories[i].version,
                now = version,
                attempt,
                "another invocation changed the memory meanwhile; deciding again"
            );
            if attempt >= ATTEMPTS {
                // Still racing: nothing is carried out; the caller keeps the
                // event for a retry (and the next tick re-reads activities).
                return Err(CloudError {
                    op: "CreateOrUpdateTags",
                    region: self.cfg.fallbacks[i].region.clone(),
                    message: format!(
                        "the memory kept changing under {ATTEMPTS} decisions; none carried out"
                    ),
                });
            }
            attempt += 1;
        }
    }

    /// Carries out fallback `i`'s plan. Gate first, then the memory, then
    /// the notification: a failed gate call leaves the memory unchanged, so
    /// the next invocation redoes the whole decision; a mode change is
    /// announced only once it is recorded.
    async fn execute(&self, i: usize, plan: &Plan) -> Result<(), CloudError> {
        let f = &self.cfg.fallbacks[i];
        let (before_region, before_asg) = self.cfg.groups().nth(i).unwrap_or_default();
        for a in &plan.actions {
            match a {
                Action::SetFallbackMaxSize { from, to } => {
                    tracing::info!(group = %f.asg, from, to, "setting the fallback MaxSize");
                    self.cloud
                        .update_group(&f.region, &f.asg, GroupUpdate::max(*to))
                        .await?;
                }
                Action::SetFallbackDesired { from, to } => {
                    tracing::info!(group = %f.asg, from, to, "failover: the fallback takes over the shortfall of the group before it");
                    self.cloud
                        .update_group(&f.region, &f.asg, GroupUpdate::desired(*to))
                        .await?;
                }
                Action::SetPrimaryDesired { from, to } => {
                    tracing::info!(group = %before_asg, from, to, "failing back: the group before takes over the fallback's work");
                    self.cloud
                        .update_group(before_region, before_asg, GroupUpdate::desired(*to))
                        .await?;
                }
                Action::EnableFallbackPolicy => {
                    match self.cloud.policy(&f.region, &f.asg, &f.policy_name).await? {
                        Some((_, policy)) => {
                            tracing::info!(group = %f.asg, policy = %f.policy_name, "enabling the fallback scaling policy");
                            self.cloud
                                .put_policy(&f.region, &f.asg, &policy, true)
                                .await?;
                        }
                        None => tracing::warn!(
                            group = %f.asg,
                            policy = %f.policy_name,
                            "the fallback group has no such target-tracking policy; run `spotguard-controller setup`"
                        ),
                    }
                }
                _ => {}
            }
        }
        for a in &plan.actions {
            if let Action::ReleaseStaleProtection { busy, held_since } = a {
                // Only instances whose agent has no mark: a live agent
                // with a long job keeps its protection however long the
                // gate is held (its mark says so), and one marked dead is
                // the dead-agent check's, later this tick. Marks that
                // cannot be read release nothing (next tick again). With
                // the dead-agent check off (`dead_after = 0s`), every
                // protected instance, as before marks.
                let g = self.cloud.group(&f.region, &f.asg).await?;
                let dead_after = self.cfg.failover.dead_after.0;
                let stale: Vec<String> = if dead_after.is_zero() {
                    g.protected.clone()
                } else {
                    let marks = match self.cloud.alive_marks(&f.region, &g.protected).await {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::error!(group = %f.asg, error = %e, "failing back is held past failover.max_busy_age, but the agents' liveness marks cannot be read: nothing released");
                            continue;
                        }
                    };
                    crate::liveness::judge(&g.protected, &marks, self.clock.now(), dead_after)
                        .into_iter()
                        .filter(|(_, a)| *a == crate::liveness::Agent::Unmarked)
                        .map(|(id, _)| id)
                        .collect()
                };
                if stale.is_empty() {
                    tracing::info!(group = %f.asg, busy, "failing back is held past failover.max_busy_age by marked agents only: nothing released here");
                    continue;
                }
                tracing::error!(group = %f.asg, busy, %held_since, instances = ?stale, "failing back has been held by protected fallback instances past failover.max_busy_age: releasing those without a live agent");
                let mut released = Vec::new();
                for batch in crate::aws::protection_batches(&stale) {
                    released.extend(
                        self.cloud
                            .release_protection(&f.region, &f.asg, batch)
                            .await?,
                    );
                }
                self.alarm(
                    "spotguard: ALARM stale scale-in protection released",
                    json!({
                        "event": "stale_protection_released",
                        "fallback": {"region": f.region, "asg": f.asg},
                        "instances": released,
                        "held_since": held_since.to_rfc3339(),
                    }),
                )
                .await;
            }
        }
        for a in &plan.actions {
            if let Action::SaveMemory { tags } = a {
                self.cloud.put_tags(&f.region, &f.asg, tags).await?;
            }
        }
        for a in &plan.actions {
            if let Action::Notify { from, to, reason } = a {
                tracing::info!(from = from.as_str(), to = to.as_str(), %reason, "mode change");
                if let Some(topic) = &self.cfg.notify.sns_topic_arn {
                    let msg = json!({
                        "event": "mode_change",
                        "from": from.as_str(),
                        "to": to.as_str(),
                        "reason": reason,
                        "primary": {"region": self.cfg.primary.region, "asg": self.cfg.primary.asg},
                        "fallback": {"region": f.region, "asg": f.asg},
                        // The cascade: this group's place (1: first
                        // fallback), and the group whose shortage opens it.
                        "position": i + 1,
                        "after": {"region": before_region, "asg": before_asg},
                        // Where the group before is short (zone x type), if named.
                        "unavailable_offerings": plan.memory.unavailable,
                        "at": plan.memory.since.to_rfc3339(),
                    });
                    if let Err(e) = self
                        .cloud
                        .publish(
                            topic,
                            &format!("spotguard: {} -> {}", from.as_str(), to.as_str()),
                            &msg.to_string(),
                        )
                        .await
                    {
                        tracing::warn!(error = %e, "cannot publish the mode change");
                    }
                }
            }
        }
        Ok(())
    }
}

/// `controller status`: the whole cascade as it is and what the next
/// reconcile would do (nothing is changed). For each group: its mode
/// (fallbacks), gate (MaxSize), desired, InService and busy instances, and
/// its last capacity failure as remembered (by the link it opens) or, for
/// the last group, as its recent scaling activities show.
pub async fn status<C: Cloud>(c: &Controller<C>) -> Result<Value, CloudError> {
    let report = c.reconcile(Vec::new(), false, None).await?;
    let (visible, in_flight) = c
        .cloud
        .queue_depth(&c.cfg.queue_region(), &c.cfg.primary.queue_url)
        .await?;
    let codes = c.cfg.failover_codes();
    let mut groups = Vec::new();
    for (i, (region, asg)) in c.cfg.groups().enumerate() {
        let mut entry = json!({
            "position": i,
            "role": if i == 0 { "primary" } else { "fallback" },
            "region": region,
            "asg": asg,
        });
        let Some(o) = entry.as_object_mut() else {
            continue;
        };
        match c.cloud.group(region, asg).await {
            Ok(g) => {
                for (k, v) in [
                    ("gate_max", g.max),
                    ("desired", g.desired),
                    ("in_service", g.in_service),
                    ("pending", g.pending),
                    ("busy", g.busy),
                ] {
                    o.insert(k.into(), json!(v));
                }
            }
            Err(e) => {
                o.insert("error".into(), json!(e.to_string()));
            }
        }
        // Group i's failures are remembered by link i (the one it opens);
        // the last group's are read from its recent activities.
        let (last_failure, unavailable) = match report.links.get(i) {
            Some(l) => (
                l.plan.memory.last_capacity_failure,
                l.plan.memory.unavailable.clone(),
            ),
            None => {
                let last = c
                    .cloud
                    .activities(region, asg)
                    .await
                    .map(|acts| {
                        events::launches_of(&acts, &codes)
                            .into_iter()
                            .filter(|l| matches!(l.kind, reconcile::LaunchKind::CapacityFailure(_)))
                            .map(|l| l.at)
                            .max()
                    })
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "cannot read the last group's activities");
                        None
                    });
                (last, Vec::new())
            }
        };
        o.insert("last_capacity_failure".into(), json!(last_failure));
        o.insert("unavailable_offerings".into(), json!(unavailable));
        if let Some(l) = i.checked_sub(1).and_then(|k| report.links.get(k)) {
            o.insert("mode".into(), json!(l.mode_before));
            o.insert("since".into(), json!(l.plan.memory.since));
            o.insert(
                "next".into(),
                json!({"mode": l.mode, "reason": l.plan.reason, "actions": l.plan.actions}),
            );
        }
        groups.push(entry);
    }
    let first = &report.plan;
    let f = report.fallback;
    Ok(json!({
        "mode": report.mode_before,
        "queue": {"visible": visible, "in_flight": in_flight},
        "cascade": groups,
        "unreadable": report.unreadable,
        // The keys of the two-region status, for its readers: the first
        // fallback's.
        "since": first.memory.since,
        "primary": groups.first(),
        "fallback": {"region": c.cfg.fallbacks.first().map(|f| &f.region), "asg": c.cfg.fallbacks.first().map(|f| &f.asg),
                     "desired": f.desired, "max": f.max, "in_service": f.in_service, "busy": f.busy},
        "capacity_unavailable": first.capacity_unavailable,
        "plan": first,
    }))
}

/// Where `run` reads EventBridge events from (an SQS queue when deployed):
/// (receipt, body) pairs, and deleting one once handled.
pub trait EventSource: Send + Sync {
    fn receive(
        &self,
    ) -> impl std::future::Future<Output = Result<Vec<(String, String)>, CloudError>> + Send;
    fn delete(
        &self,
        receipt: &str,
    ) -> impl std::future::Future<Output = Result<(), CloudError>> + Send;
}

/// Drains the events source: each message is handled, then deleted
/// (malformed ones too: they would never become valid); one whose handling
/// failed on AWS is kept and comes back after its visibility timeout.
pub async fn read_events<C: Cloud, S: EventSource>(c: &Controller<C>, src: &S) -> usize {
    let mut handled = 0;
    for _ in 0..10 {
        let msgs = match src.receive().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the events queue");
                return handled;
            }
        };
        if msgs.is_empty() {
            return handled;
        }
        for (receipt, body) in msgs {
            match serde_json::from_str::<Value>(&body) {
                Ok(v) => {
                    if let Err(e) = c.handle_event(&v).await {
                        tracing::warn!(error = %e, "event not handled; kept for a retry");
                        continue;
                    }
                    handled += 1;
                }
                Err(e) => tracing::warn!(error = %e, "events queue message is not JSON; dropped"),
            }
            if let Err(e) = src.delete(&receipt).await {
                tracing::warn!(error = %e, "cannot delete an event message");
            }
        }
    }
    handled
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;
