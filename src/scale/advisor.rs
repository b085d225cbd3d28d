//! The HPA-style advisor: desired replicas from targets, tolerance,
//! stabilisation windows and cooldowns.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use metrics::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::snapshot::{Aggregate, ScaleMetrics};
use crate::error::ConfigError;
use crate::metrics_util::DEFAULT_NAME;
use crate::registry::InstanceRegistry;

/// A figure the advisor holds to a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Metric {
    /// The mean utilisation of the instances, `(in_flight + queue_depth) /
    /// limit`.
    Utilisation,
    /// Requests waiting in the admission queues, per instance.
    QueueDepthPerInstance,
    /// The mean of the instances' p95 latencies, in milliseconds.
    P95LatencyMs,
}

impl Metric {
    /// The lower-case name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Utilisation => "utilisation",
            Metric::QueueDepthPerInstance => "queue_depth_per_instance",
            Metric::P95LatencyMs => "p95_latency_ms",
        }
    }
}

/// The value the advisor keeps a metric at by changing the number of
/// replicas (an HPA `target` of type `AverageValue`).
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Target {
    /// Mean utilisation per instance (0.7 keeps 30% headroom).
    Utilisation(f64),
    /// Requests waiting per instance.
    QueueDepthPerInstance(f64),
    /// Mean p95 latency of the instances.
    P95Latency(Duration),
}

impl Target {
    /// The metric the target holds.
    pub fn metric(&self) -> Metric {
        match self {
            Target::Utilisation(_) => Metric::Utilisation,
            Target::QueueDepthPerInstance(_) => Metric::QueueDepthPerInstance,
            Target::P95Latency(_) => Metric::P95LatencyMs,
        }
    }

    /// The target value, in the metric's unit.
    pub fn value(&self) -> f64 {
        match *self {
            Target::Utilisation(value) | Target::QueueDepthPerInstance(value) => value,
            Target::P95Latency(latency) => latency.as_secs_f64() * 1000.0,
        }
    }

    fn field(&self) -> &'static str {
        match self {
            Target::Utilisation(_) => "target.utilisation",
            Target::QueueDepthPerInstance(_) => "target.queue_depth_per_instance",
            Target::P95Latency(_) => "target.p95_latency",
        }
    }
}

/// What the advisor sees at one evaluation: how many replicas there are and
/// the figures its targets hold (`None`: not known, that target sits out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Observation {
    /// Replicas running now (healthy instances).
    pub replicas: u32,
    /// Mean utilisation per instance.
    pub utilisation: Option<f64>,
    /// Requests waiting per instance.
    pub queue_depth_per_instance: Option<f64>,
    /// Mean p95 latency, in milliseconds.
    pub p95_latency_ms: Option<f64>,
}

impl Observation {
    /// `replicas` running, no figures yet.
    pub fn new(replicas: u32) -> Self {
        Observation {
            replicas,
            ..Observation::default()
        }
    }

    /// Sets the mean utilisation per instance.
    pub fn utilisation(mut self, value: f64) -> Self {
        self.utilisation = Some(value);
        self
    }

    /// Sets the requests waiting per instance.
    pub fn queue_depth_per_instance(mut self, value: f64) -> Self {
        self.queue_depth_per_instance = Some(value);
        self
    }

    /// Sets the mean p95 latency, in milliseconds.
    pub fn p95_latency_ms(mut self, value: f64) -> Self {
        self.p95_latency_ms = Some(value);
        self
    }

    fn metric(&self, metric: Metric) -> Option<f64> {
        let value = match metric {
            Metric::Utilisation => self.utilisation,
            Metric::QueueDepthPerInstance => self.queue_depth_per_instance,
            Metric::P95LatencyMs => self.p95_latency_ms,
        }?;
        (value.is_finite() && value >= 0.0).then_some(value)
    }
}

impl From<&Aggregate> for Observation {
    fn from(aggregate: &Aggregate) -> Self {
        Observation {
            replicas: aggregate.instances,
            utilisation: aggregate.utilisation_mean,
            queue_depth_per_instance: aggregate.queue_depth_per_instance,
            p95_latency_ms: aggregate.p95_latency_ms_mean,
        }
    }
}

/// Why the advisor recommends what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reason {
    /// The metrics ask for it: `ceil(current × metric / target)`, the
    /// highest over the targets.
    Metrics,
    /// Every metric is within the tolerance of its target: stay.
    Tolerance,
    /// No target had a figure: the last recommendation stands.
    NoMetrics,
    /// No instance is running: the minimum, and at least one.
    NoInstances,
    /// The metrics ask for fewer than `min_replicas`.
    MinReplicas,
    /// The metrics ask for more than `max_replicas`.
    MaxReplicas,
    /// Held down to the lowest recommendation of the scale-up window.
    ScaleUpStabilisation,
    /// Held up to the highest recommendation of the scale-down window.
    ScaleDownStabilisation,
    /// The last change is more recent than the scale-up cooldown.
    ScaleUpCooldown,
    /// The last change is more recent than the scale-down cooldown.
    ScaleDownCooldown,
}

/// The advisor's answer to one [`Observation`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Recommendation {
    /// Replicas running when it was made.
    pub current: u32,
    /// Replicas to run: what an autoscaler should act on (also the
    /// `tower_scale_desired_replicas` gauge).
    pub desired: u32,
    /// Replicas the metrics alone ask for, within min and max, before
    /// stabilisation and cooldowns.
    pub proposed: u32,
    /// Why `desired` is what it is.
    pub reason: Reason,
    /// The target whose proposal was the highest.
    pub driver: Option<Metric>,
    /// That target's `metric / target`.
    pub ratio: Option<f64>,
    /// What the advisor saw.
    pub observation: Observation,
}

/// Recommends how many replicas a service should run, by the Kubernetes
/// HPA rule; clones share one history.
///
/// Build it with [`ScaleAdvisor::builder`], feed it with
/// [`observe`](Self::observe) or [`observe_aggregate`](Self::observe_aggregate),
/// or let [`spawn`](Self::spawn) poll a registry. See the
/// [module docs](crate::scale#the-advisor) for the rule.
#[derive(Clone)]
pub struct ScaleAdvisor {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    gauge: Gauge,
    state: Mutex<State>,
    latest: watch::Sender<Option<Recommendation>>,
}

#[derive(Clone, Debug)]
struct Config {
    name: String,
    min_replicas: u32,
    max_replicas: u32,
    tolerance: f64,
    targets: Vec<Target>,
    scale_up_window: Duration,
    scale_down_window: Duration,
    scale_up_cooldown: Duration,
    scale_down_cooldown: Duration,
}

#[derive(Debug, Default)]
struct State {
    /// Proposals (after min/max) of the longer of the two windows.
    history: VecDeque<(Instant, u32)>,
    /// Whether the history was started with the first replicas seen.
    seeded: bool,
    last_desired: Option<u32>,
    last_change: Option<Instant>,
}

impl ScaleAdvisor {
    /// A builder: min 1, max unbounded, tolerance 0.1, no target (add at
    /// least one), scale-up window 0, scale-down window 300 s, no cooldowns
    /// (the HPA defaults).
    pub fn builder() -> ScaleAdvisorBuilder {
        ScaleAdvisorBuilder::default()
    }

    /// Evaluates `observation` now (on tokio's clock), records it in the
    /// history, sets the gauge and returns the recommendation.
    pub fn observe(&self, observation: Observation) -> Recommendation {
        let now = Instant::now();
        let mut state = self
            .inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let recommendation = self.inner.config.evaluate(&mut state, now, observation);
        let changed = state.last_desired != Some(recommendation.desired);
        let previous = state.last_desired.replace(recommendation.desired);
        if changed && previous.unwrap_or(observation.replicas) != recommendation.desired {
            state.last_change = Some(now);
        }
        drop(state);
        self.inner.gauge.set(f64::from(recommendation.desired));
        if changed {
            tracing::info!(
                name = %self.inner.config.name,
                current = recommendation.current,
                desired = recommendation.desired,
                previous = ?previous,
                reason = ?recommendation.reason,
                driver = ?recommendation.driver,
                "scale recommendation changed"
            );
        }
        self.inner.latest.send_replace(Some(recommendation));
        recommendation
    }

    /// Evaluates an aggregate of a registry: its instances are the current
    /// replicas, its mean utilisation, queue depth per instance and mean p95
    /// latency the metrics.
    pub fn observe_aggregate(&self, aggregate: &Aggregate) -> Recommendation {
        self.observe(Observation::from(aggregate))
    }

    /// The last recommendation, if any.
    pub fn latest(&self) -> Option<Recommendation> {
        *self.inner.latest.borrow()
    }

    /// A receiver that sees every recommendation.
    pub fn subscribe(&self) -> watch::Receiver<Option<Recommendation>> {
        self.inner.latest.subscribe()
    }

    /// Polls the aggregate of `service` in `registry` every `interval` (the
    /// first at once) and observes it. A registry error skips that round
    /// (logged at `warn`); the last recommendation stands.
    ///
    /// The task ends when every clone of the advisor is dropped, or on
    /// [`AdvisorTask::abort`].
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, or if `interval` is zero.
    pub fn spawn(
        &self,
        registry: Arc<dyn InstanceRegistry>,
        service: impl Into<String>,
        interval: Duration,
    ) -> AdvisorTask {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let service = service.into();
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let handle = tokio::spawn(async move {
            loop {
                ticks.tick().await;
                if weak.strong_count() == 0 {
                    break;
                }
                let aggregate = ScaleMetrics::aggregate(&*registry, &service).await;
                let Some(inner) = weak.upgrade() else { break };
                match aggregate {
                    Ok(aggregate) => {
                        ScaleAdvisor { inner }.observe_aggregate(&aggregate);
                    }
                    Err(err) => tracing::warn!(
                        name = %inner.config.name,
                        service = %service,
                        error = %err,
                        "cannot read the registry; the last scale recommendation stands"
                    ),
                }
            }
        });
        AdvisorTask {
            handle: handle.abort_handle(),
        }
    }

    /// The fewest replicas it recommends.
    pub fn min_replicas(&self) -> u32 {
        self.inner.config.min_replicas
    }

    /// The most replicas it recommends.
    pub fn max_replicas(&self) -> u32 {
        self.inner.config.max_replicas
    }

    /// How far from 1 `metric / target` must be to act.
    pub fn tolerance(&self) -> f64 {
        self.inner.config.tolerance
    }

    /// The targets.
    pub fn targets(&self) -> &[Target] {
        &self.inner.config.targets
    }

    /// The `name` label of its gauge.
    pub fn name(&self) -> &str {
        &self.inner.config.name
    }
}

impl fmt::Debug for ScaleAdvisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScaleAdvisor")
            .field("config", &self.inner.config)
            .field("latest", &self.latest())
            .finish()
    }
}

impl Config {
    fn evaluate(
        &self,
        state: &mut State,
        now: Instant,
        observation: Observation,
    ) -> Recommendation {
        let current = observation.replicas;
        let mut recommendation = Recommendation {
            current,
            desired: current,
            proposed: current,
            reason: Reason::Metrics,
            driver: None,
            ratio: None,
            observation,
        };

        // 1. What the metrics ask for: the highest proposal over the targets.
        let unclamped = if current == 0 {
            // A registry read that finds nobody: a Redis that restarted empty,
            // a partition, or a service scaled to zero. Hold the last
            // recommendation (never swing to the minimum on one read, and a
            // service at zero stays there); a fresh advisor asks for the
            // minimum, at least one.
            recommendation.reason = Reason::NoInstances;
            if let Some(last) = state.last_desired {
                recommendation.proposed = last;
                recommendation.desired = last;
                return recommendation;
            }
            self.min_replicas.max(1)
        } else {
            let mut best: Option<u32> = None;
            let mut all_within = true;
            for target in &self.targets {
                let Some(value) = observation.metric(target.metric()) else {
                    continue;
                };
                let ratio = value / target.value();
                let proposal = if (ratio - 1.0).abs() <= self.tolerance {
                    current
                } else {
                    all_within = false;
                    ceil_count(f64::from(current) * ratio)
                };
                if best.is_none_or(|best| proposal > best) {
                    best = Some(proposal);
                    recommendation.driver = Some(target.metric());
                    recommendation.ratio = Some(ratio);
                }
            }
            let Some(best) = best else {
                // Nothing to go on: hold the last recommendation, record nothing.
                recommendation.reason = Reason::NoMetrics;
                recommendation.proposed = self.clamp(current);
                recommendation.desired = state.last_desired.unwrap_or(recommendation.proposed);
                return recommendation;
            };
            if all_within {
                recommendation.reason = Reason::Tolerance;
            }
            best
        };
        let proposed = self.clamp(unclamped);
        if proposed > unclamped {
            recommendation.reason = Reason::MinReplicas;
        } else if proposed < unclamped {
            recommendation.reason = Reason::MaxReplicas;
        }
        recommendation.proposed = proposed;

        // 2. Stabilisation, as the HPA does it: the lowest proposal of the
        // scale-up window bounds a rise, the highest of the scale-down window
        // bounds a fall. The history starts with the replicas first seen.
        if !std::mem::replace(&mut state.seeded, true) {
            state.history.push_back((now, current));
        }
        let keep = self.scale_up_window.max(self.scale_down_window);
        while state
            .history
            .front()
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) >= keep && at < now)
        {
            state.history.pop_front();
        }
        let within = |at: Instant, window: Duration| now.saturating_duration_since(at) < window;
        let mut up_bound = proposed;
        let mut down_bound = proposed;
        for &(at, past) in &state.history {
            if within(at, self.scale_up_window) {
                up_bound = up_bound.min(past);
            }
            if within(at, self.scale_down_window) {
                down_bound = down_bound.max(past);
            }
        }
        state.history.push_back((now, proposed));
        // The HPA clamps the current replica count; here "current" is the
        // instances the registry shows, which can lag behind (instances
        // still starting, a partial read after a Redis restart), so the last
        // recommendation is the base: a dip in the visible count cannot skip
        // the scale-down window.
        let base = state.last_desired.unwrap_or(current);
        let stabilised = base.clamp(up_bound, down_bound);
        if stabilised < proposed {
            recommendation.reason = Reason::ScaleUpStabilisation;
        } else if stabilised > proposed {
            recommendation.reason = Reason::ScaleDownStabilisation;
        }

        // 3. Cooldowns: no change in a direction until its cooldown has
        // passed since the last change.
        let mut desired = stabilised;
        if let (Some(previous), Some(changed_at)) = (state.last_desired, state.last_change) {
            let since = now.saturating_duration_since(changed_at);
            if desired > previous && since < self.scale_up_cooldown {
                desired = previous;
                recommendation.reason = Reason::ScaleUpCooldown;
            } else if desired < previous && since < self.scale_down_cooldown {
                desired = previous;
                recommendation.reason = Reason::ScaleDownCooldown;
            }
        }
        recommendation.desired = self.clamp(desired);
        recommendation
    }

    fn clamp(&self, replicas: u32) -> u32 {
        replicas.clamp(self.min_replicas, self.max_replicas)
    }
}

/// `ceil(x)` for a replica count, ignoring float rounding noise (a relative
/// 1e-9), so that `0.7 × 10 / 0.7` gives 10, not 11.
pub(crate) fn ceil_count(x: f64) -> u32 {
    if x.is_nan() || x <= 0.0 {
        return 0;
    }
    let ceil = (x * (1.0 - 1e-9)).ceil();
    if ceil >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        ceil as u32
    }
}

/// Builds a [`ScaleAdvisor`]; see [`ScaleAdvisor::builder`].
#[derive(Clone, Debug)]
pub struct ScaleAdvisorBuilder {
    config: Config,
}

impl Default for ScaleAdvisorBuilder {
    fn default() -> Self {
        ScaleAdvisorBuilder {
            config: Config {
                name: DEFAULT_NAME.to_owned(),
                min_replicas: 1,
                max_replicas: u32::MAX,
                tolerance: 0.1,
                targets: Vec::new(),
                scale_up_window: Duration::ZERO,
                scale_down_window: Duration::from_secs(300),
                scale_up_cooldown: Duration::ZERO,
                scale_down_cooldown: Duration::ZERO,
            },
        }
    }
}

impl ScaleAdvisorBuilder {
    /// Sets the `name` label of `tower_scale_desired_replicas` (default
    /// `"default"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// The fewest replicas to recommend (default 1; 0 is allowed, for an
    /// autoscaler that scales to zero: once at zero, a read that finds no
    /// instance keeps the recommendation there).
    pub fn min_replicas(mut self, min: u32) -> Self {
        self.config.min_replicas = min;
        self
    }

    /// The most replicas to recommend (default unbounded).
    pub fn max_replicas(mut self, max: u32) -> Self {
        self.config.max_replicas = max;
        self
    }

    /// How far from 1 the ratio `metric / target` must be before the advisor
    /// acts (default 0.1, as the HPA).
    pub fn tolerance(mut self, tolerance: f64) -> Self {
        self.config.tolerance = tolerance;
        self
    }

    /// Adds a target; with several, the highest proposal wins.
    pub fn target(mut self, target: Target) -> Self {
        self.config.targets.push(target);
        self
    }

    /// Shorthand for `target(Target::Utilisation(value))`.
    pub fn utilisation(self, value: f64) -> Self {
        self.target(Target::Utilisation(value))
    }

    /// Shorthand for `target(Target::QueueDepthPerInstance(value))`.
    pub fn queue_depth_per_instance(self, value: f64) -> Self {
        self.target(Target::QueueDepthPerInstance(value))
    }

    /// Shorthand for `target(Target::P95Latency(latency))`.
    pub fn p95_latency(self, latency: Duration) -> Self {
        self.target(Target::P95Latency(latency))
    }

    /// A rise goes no higher than the lowest proposal within this window
    /// (default 0: rise at once).
    pub fn scale_up_stabilisation(mut self, window: Duration) -> Self {
        self.config.scale_up_window = window;
        self
    }

    /// A fall goes no lower than the highest proposal within this window
    /// (default 300 s).
    pub fn scale_down_stabilisation(mut self, window: Duration) -> Self {
        self.config.scale_down_window = window;
        self
    }

    /// No rise until this long after the last change (default 0).
    pub fn scale_up_cooldown(mut self, cooldown: Duration) -> Self {
        self.config.scale_up_cooldown = cooldown;
        self
    }

    /// No fall until this long after the last change (default 0).
    pub fn scale_down_cooldown(mut self, cooldown: Duration) -> Self {
        self.config.scale_down_cooldown = cooldown;
        self
    }

    /// The advisor, or a [`ConfigError`] naming the bad field:
    /// `max_replicas` (0), `min_replicas` (above the max), `tolerance`
    /// (negative or not finite), `targets` (none), or `target.utilisation`,
    /// `target.queue_depth_per_instance`, `target.p95_latency` (not above 0).
    ///
    /// Registers the `tower_scale_desired_replicas{name}` gauge.
    pub fn build(self) -> Result<ScaleAdvisor, ConfigError> {
        let config = self.config;
        if config.max_replicas == 0 {
            return Err(ConfigError::new("max_replicas", "must be at least 1"));
        }
        if config.min_replicas > config.max_replicas {
            return Err(ConfigError::new(
                "min_replicas",
                format!(
                    "must not exceed max_replicas ({} > {})",
                    config.min_replicas, config.max_replicas
                ),
            ));
        }
        if !config.tolerance.is_finite() || config.tolerance < 0.0 {
            return Err(ConfigError::new(
                "tolerance",
                format!("must be 0 or more, got {}", config.tolerance),
            ));
        }
        if config.targets.is_empty() {
            return Err(ConfigError::new("targets", "must hold at least one target"));
        }
        for target in &config.targets {
            let value = target.value();
            if !value.is_finite() || value <= 0.0 {
                return Err(ConfigError::new(
                    target.field(),
                    format!("must be above 0, got {value}"),
                ));
            }
        }
        let gauge = crate::metrics_util::gauge("tower_scale_desired_replicas", &config.name);
        Ok(ScaleAdvisor {
            inner: Arc::new(Inner {
                config,
                gauge,
                state: Mutex::new(State::default()),
                latest: watch::Sender::new(None),
            }),
        })
    }
}

/// The handle on the task of [`ScaleAdvisor::spawn`]. Dropping it leaves the
/// task running.
#[derive(Clone, Debug)]
pub struct AdvisorTask {
    handle: AbortHandle,
}

impl AdvisorTask {
    /// Stops polling. The last recommendation stays.
    pub fn abort(&self) {
        self.handle.abort();
    }

    /// Whether the task has ended: aborted, every clone of the advisor
    /// dropped, or its runtime shut down.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}
