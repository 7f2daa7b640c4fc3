//! One invocation of the controller, over a [`Cloud`]: handle an event,
//! publish the metrics, observe, decide ([`crate::reconcile`]) and act.
//! The same code serves Lambda, the `run` loop and `once`.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};
use spotguard_common::clock::Clock;

use crate::aws::{Cloud, CloudError, GroupInfo};
use crate::config::Config;
use crate::events::{self, Event};
use crate::metrics::{self, MetricValue};
use crate::reconcile::{self, Action, FallbackGroup, Launch, Memory, Plan, Settings};

pub struct Controller<C> {
    pub cfg: Config,
    pub cloud: C,
    /// Where decisions read the time: the system clock when deployed, a
    /// virtual one in tests and the simulation.
    pub clock: Arc<dyn Clock>,
}

/// What one reconcile saw, decided and did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode_before: &'static str,
    pub mode: &'static str,
    pub fallback: FallbackGroup,
    pub launches_seen: usize,
    pub plan: Plan,
    /// False for `status` (planned only).
    pub executed: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TickReport {
    pub metrics: Vec<MetricValue>,
    pub metrics_error: Option<String>,
    pub reconcile: Report,
    /// Groups whose desired capacity was raised from 0 to 1 (scale-out from zero).
    pub raised_from_zero: Vec<String>,
}

impl<C: Cloud> Controller<C> {
    pub fn settings(&self) -> Settings {
        let f = &self.cfg.failover;
        Settings {
            failures: f.failures,
            window: f.failure_window.0,
            capacity_ttl: f.capacity_ttl.0,
            cooldown: f.cooldown.0,
            min_dwell: f.min_dwell.0,
            step: f.failback_step,
            cap: self.cfg.fallback.max_size,
            shortage_for: f.shortage_for.0,
            max_busy_age: Some(f.max_busy_age.0),
        }
    }

    /// Handles one EventBridge event. Unknown or malformed events are logged
    /// and acknowledged (`Ok(None)`): a retry would not make them valid.
    pub async fn handle_event(&self, v: &Value) -> Result<Option<TickReport>, CloudError> {
        match events::parse(v, &self.cfg.failover_codes()) {
            Err(e) => {
                tracing::warn!(error = %e, "event ignored");
                Ok(None)
            }
            Ok(Event::Tick) => self.tick(Vec::new()).await.map(Some),
            Ok(Event::Launch { group, launch }) if group == self.cfg.primary.asg => {
                tracing::info!(?launch, "launch outcome in the primary group");
                // The backlog decides whether the fallback is needed at all.
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
                let reconcile = self.reconcile(vec![launch], true, depth).await?;
                Ok(Some(TickReport {
                    metrics: Vec::new(),
                    metrics_error: None,
                    reconcile,
                    raised_from_zero: Vec::new(),
                }))
            }
            Ok(Event::Launch { group, .. }) => {
                tracing::info!(%group, "launch event of another group ignored");
                Ok(None)
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

    /// The scheduled work: publish the metrics, reconcile, then raise a
    /// group that may run from 0 to 1 if work waits. A metrics failure does
    /// not stop the reconcile.
    pub async fn tick(&self, launches: Vec<Launch>) -> Result<TickReport, CloudError> {
        let (metrics, errors, depth) = self.publish_metrics().await;
        for e in &errors {
            tracing::warn!(error = %e, "cannot publish a backlog metric");
        }
        let reconcile = self.reconcile(launches, true, depth).await?;
        // For the "failed over too long" alarm: 1 while the fallback is in use.
        let p = &self.cfg.primary;
        let mode_point = metrics::group_point(
            &self.cfg,
            &p.region,
            &p.asg,
            metrics::FAILED_OVER,
            f64::from(u8::from(reconcile.mode != reconcile::Mode::Normal.as_str())),
        );
        let mut metrics = metrics;
        let mut errors = errors;
        match self.cloud.put_metric(&mode_point).await {
            Ok(()) => metrics.push(mode_point),
            Err(e) => errors.push(e.to_string()),
        }
        let raised_from_zero = match depth {
            Some((visible, _)) => self.scale_from_zero(visible, reconcile.mode).await,
            None => Vec::new(),
        };
        Ok(TickReport {
            metrics,
            metrics_error: (!errors.is_empty()).then(|| errors.join("; ")),
            reconcile,
            raised_from_zero,
        })
    }

    /// Target tracking cannot grow a group from 0: its new capacity is in
    /// proportion to the current one, and the metric-math form has no value
    /// with no instance (REFERENCE.md). So with work waiting and a group at
    /// 0 that may run (the primary always; the fallback while failed over),
    /// the controller sets its desired capacity to 1, and target tracking
    /// takes it from there. With the one-minute schedule, a job waits about
    /// a minute plus the launch for its first instance.
    async fn scale_from_zero(&self, visible: i64, mode: &str) -> Vec<String> {
        if visible < 1 {
            return Vec::new();
        }
        let (p, f) = (&self.cfg.primary, &self.cfg.fallback);
        let mut groups = vec![(p.region.as_str(), p.asg.as_str())];
        if mode == reconcile::Mode::FailedOver.as_str() {
            groups.push((f.region.as_str(), f.asg.as_str()));
        }
        let mut raised = Vec::new();
        for (region, name) in groups {
            match self.cloud.group(region, name).await {
                Ok(g) if g.desired == 0 && g.in_service == 0 && g.max >= 1 => {
                    match self.cloud.set_desired(region, name, 1).await {
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

    /// Publishes each group's data point on its own: an error in one region
    /// does not stop the other's. Returns what was published, the errors,
    /// and the queue depth (visible, in flight) if it could be read.
    pub async fn publish_metrics(&self) -> (Vec<MetricValue>, Vec<String>, Option<(i64, i64)>) {
        let (p, f) = (&self.cfg.primary, &self.cfg.fallback);
        let (visible, in_flight) = match self
            .cloud
            .queue_depth(&self.cfg.queue_region(), &p.queue_url)
            .await
        {
            Ok(d) => d,
            Err(e) => return (Vec::new(), vec![e.to_string()], None),
        };
        let backlog = metrics::backlog_of(&self.cfg, visible, in_flight);
        let mut published = Vec::new();
        let mut errors = Vec::new();
        for (region, group, name) in [
            (&p.region, &p.asg, &self.cfg.metric.primary_name),
            (&f.region, &f.asg, &self.cfg.metric.fallback_name),
        ] {
            let point = match self.cloud.group(region, group).await {
                Ok(g) => metrics::group_point(
                    &self.cfg,
                    region,
                    group,
                    name,
                    metrics::per_instance(backlog, g.in_service),
                ),
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
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

    /// Observes, decides and (with `execute`) acts. `launches` are outcomes
    /// learnt from events; the primary's recent scaling activities are added.
    /// `depth` is the queue's (visible, in flight), if read.
    pub async fn reconcile(
        &self,
        mut launches: Vec<Launch>,
        execute: bool,
        depth: Option<(i64, i64)>,
    ) -> Result<Report, CloudError> {
        let (p, f) = (&self.cfg.primary, &self.cfg.fallback);
        let now = self.clock.now();
        match self.cloud.activities(&p.region, &p.asg).await {
            Ok(acts) => {
                launches.extend(events::launches_of(&acts, &self.cfg.failover_codes()));
                launches.extend(events::stuck_spot_requests(
                    &acts,
                    now,
                    self.cfg.failover.spot_wait.0,
                ));
            }
            // Events still count; the next tick polls again.
            Err(e) => tracing::warn!(error = %e, "cannot read the primary's scaling activities"),
        }
        // The primary, for the shortage rule; unreadable (throttled, its
        // region impaired), the rule is not applied rather than every
        // decision blocked.
        let primary = match self.cloud.group(&p.region, &p.asg).await {
            Ok(pg) => Some(reconcile::PrimaryGroup {
                desired: pg.desired,
                in_service: pg.in_service,
                pending: pg.pending,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the primary group; deciding without the shortage rule");
                None
            }
        };
        let seen = reconcile::Seen {
            primary,
            visible: depth.map(|d| d.0),
            in_flight: depth.map(|d| d.1),
        };
        let policy_enabled = match self.cloud.policy(&f.region, &f.asg, &f.policy_name).await {
            Ok(p) => p.and_then(|(enabled, _)| enabled),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the fallback policy");
                None
            }
        };
        // Decide on the memory as read; if another invocation wrote a newer
        // one meanwhile, decide again on it (the launches still count), so a
        // stale decision is never carried out and no event is lost.
        const ATTEMPTS: u32 = 3;
        let mut attempt = 1;
        loop {
            let g: GroupInfo = self.cloud.group(&f.region, &f.asg).await?;
            let (memory, warnings) = Memory::from_tags(&g.tags);
            for w in warnings {
                tracing::warn!("{w}");
            }
            let fallback = FallbackGroup {
                desired: g.desired,
                max: g.max,
                in_service: g.in_service,
                busy: g.busy,
                policy_enabled,
            };
            let plan = reconcile::reconcile_seen(
                &memory,
                &fallback,
                &seen,
                &launches,
                now,
                &self.settings(),
            );
            let report = Report {
                mode_before: memory.mode.as_str(),
                mode: plan.memory.mode.as_str(),
                fallback,
                launches_seen: launches.len(),
                plan: plan.clone(),
                executed: execute,
            };
            if !execute || plan.actions.is_empty() {
                return Ok(report);
            }
            let current = self.cloud.group(&f.region, &f.asg).await?;
            let (now_memory, _) = Memory::from_tags(&current.tags);
            if now_memory.version == memory.version {
                self.execute(&plan).await?;
                return Ok(report);
            }
            tracing::warn!(
                read = memory.version,
                now = now_memory.version,
                attempt,
                "another invocation changed the memory meanwhile; deciding again"
            );
            if attempt >= ATTEMPTS {
                // Still racing: nothing is carried out; the caller keeps the
                // event for a retry (and the next tick re-reads activities).
                return Err(CloudError {
                    op: "CreateOrUpdateTags",
                    region: f.region.clone(),
                    message: format!(
                        "the memory kept changing under {ATTEMPTS} decisions; none carried out"
                    ),
                });
            }
            attempt += 1;
        }
    }

    /// Gate first, then the memory, then the notification: a failed gate
    /// call leaves the memory unchanged, so the next invocation redoes the
    /// whole decision; a mode change is announced only once it is recorded.
    async fn execute(&self, plan: &Plan) -> Result<(), CloudError> {
        let f = &self.cfg.fallback;
        for a in &plan.actions {
            match a {
                Action::SetFallbackMaxSize { from, to } => {
                    tracing::info!(group = %f.asg, from, to, "setting the fallback MaxSize");
                    self.cloud.set_max_size(&f.region, &f.asg, *to).await?;
                }
                Action::SetFallbackDesired { from, to } => {
                    tracing::info!(group = %f.asg, from, to, "failover: the fallback takes over the primary's shortfall");
                    self.cloud.set_desired(&f.region, &f.asg, *to).await?;
                }
                Action::EnableFallbackPolicy => {
                    match self.cloud.policy(&f.region, &f.asg, &f.policy_name).await? {
                        Some((_, policy)) => {
                            tracing::info!(policy = %f.policy_name, "enabling the fallback scaling policy");
                            self.cloud
                                .put_policy(&f.region, &f.asg, &policy, true)
                                .await?;
                        }
                        None => tracing::warn!(
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
                tracing::error!(group = %f.asg, busy, %held_since, "failing back has been held by protected fallback instances past failover.max_busy_age: releasing their protection (their agents may be dead)");
                let released = self.cloud.release_protection(&f.region, &f.asg).await?;
                if let Some(topic) = &self.cfg.notify.sns_topic_arn {
                    let msg = json!({
                        "event": "stale_protection_released",
                        "fallback": {"region": f.region, "asg": f.asg},
                        "instances": released,
                        "held_since": held_since.to_rfc3339(),
                    });
                    if let Err(e) = self
                        .cloud
                        .publish(
                            topic,
                            "spotguard: ALARM stale scale-in protection released",
                            &msg.to_string(),
                        )
                        .await
                    {
                        tracing::warn!(error = %e, "cannot publish the alarm");
                    }
                }
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
