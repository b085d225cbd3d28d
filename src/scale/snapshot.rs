//! The per-instance snapshot, its collector, and the aggregate over a
//! registry.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::advisor::{Recommendation, ScaleAdvisor};
use super::window::{LatencyHandle, LatencySummary};
use crate::breaker::BreakerHandle;
use crate::limit::LimitHandle;
use crate::queue::QueueHandle;
use crate::registry::{InstanceInfo, InstanceRegistry, LoadFigures, RegistryError};

/// A count the handles do not expose, read from a closure.
type Count = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The figures of one instance that decide scaling, at one moment.
///
/// Made by a [`ScaleCollector`] (see [`ScaleMetrics::collector`]); a figure
/// whose source was not given to the collector is `None` (`null` in JSON).
/// See the [module docs](crate::scale) for the JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ScaleMetrics {
    /// Calls holding a permit of the concurrency limit.
    pub in_flight: Option<u64>,
    /// The concurrency limit (the instance's capacity).
    pub limit: Option<u64>,
    /// `(in_flight + queue_depth) / limit`: 0 to 1 while nothing waits,
    /// above 1 while a queue stands (the demand the limit cannot serve).
    pub utilisation: Option<f64>,
    /// Requests waiting in the admission queue.
    pub queue_depth: Option<u64>,
    /// How many requests may wait in the queue.
    pub queue_capacity: Option<u64>,
    /// Calls refused by a load shedder so far (from
    /// [`ScaleCollector::shed_count`]).
    pub shed_total: Option<u64>,
    /// Calls refused by the queue (full or timed out) so far (from
    /// [`ScaleCollector::queue_rejections`]).
    pub queue_rejected_total: Option<u64>,
    /// The breaker's state: `closed`, `open`, `half_open`, `forced_open` or
    /// `disabled`.
    pub breaker_state: Option<String>,
    /// The breaker's failure rate over its window.
    pub breaker_failure_rate: Option<f64>,
    /// Calls in the breaker's window.
    pub breaker_calls_in_window: Option<u32>,
    /// Trips the breaker's ejection budget has denied so far.
    pub breaker_denials: Option<u64>,
    /// Calls refused by an open breaker so far (from
    /// [`ScaleCollector::breaker_rejections`]).
    pub breaker_rejected_total: Option<u64>,
    /// Latencies over the sliding window.
    pub latency: Option<LatencySummary>,
    /// The advisor's last recommendation.
    pub recommendation: Option<Recommendation>,
}

impl ScaleMetrics {
    /// A collector with no sources; add the handles of the layers.
    pub fn collector() -> ScaleCollector {
        ScaleCollector::default()
    }

    /// The aggregate of the healthy instances of `service` in `registry`.
    pub async fn aggregate(
        registry: &dyn InstanceRegistry,
        service: &str,
    ) -> Result<Aggregate, RegistryError> {
        let instances = registry.healthy(service).await?;
        Ok(Aggregate::from_instances(service, &instances))
    }

    /// The figures a registry heartbeat carries: what is unknown is 0 (and
    /// `cpu`, `memory_bytes` are `None`: fill them in if you measure them).
    pub fn load_figures(&self) -> LoadFigures {
        LoadFigures {
            in_flight: self.in_flight.unwrap_or(0),
            limit: self.limit.unwrap_or(0),
            utilisation: self.utilisation.unwrap_or(0.0),
            queue_depth: self.queue_depth.unwrap_or(0),
            p95_latency_ms: self.latency.and_then(|l| l.p95_ms).unwrap_or(0.0),
            cpu: None,
            memory_bytes: None,
        }
    }
}

/// Reads a [`ScaleMetrics`] from the handles of the layers; cheap to clone
/// (clones share the sources).
///
/// Every source is optional. The handles do not expose how many calls a
/// [`LoadShed`](crate::shed) or an open breaker refused, nor how many the
/// queue refused (those are only in `tower_scale_rejected_total`): give them
/// as closures if the application counts them.
#[derive(Clone, Default)]
pub struct ScaleCollector {
    limit: Option<LimitHandle>,
    queue: Option<QueueHandle>,
    breaker: Option<BreakerHandle>,
    latency: Option<LatencyHandle>,
    advisor: Option<ScaleAdvisor>,
    shed: Option<Count>,
    queue_rejections: Option<Count>,
    breaker_rejections: Option<Count>,
}

impl ScaleCollector {
    /// Reads in-flight calls and the limit from a concurrency limit.
    pub fn limit(mut self, handle: LimitHandle) -> Self {
        self.limit = Some(handle);
        self
    }

    /// Reads the depth and capacity of an admission queue.
    pub fn queue(mut self, handle: QueueHandle) -> Self {
        self.queue = Some(handle);
        self
    }

    /// Reads the state, failure rate and denials of a breaker.
    pub fn breaker(mut self, handle: BreakerHandle) -> Self {
        self.breaker = Some(handle);
        self
    }

    /// Reads the latency percentiles of a [`LatencyLayer`](super::LatencyLayer).
    pub fn latency(mut self, handle: LatencyHandle) -> Self {
        self.latency = Some(handle);
        self
    }

    /// Adds the advisor's last recommendation to the snapshot.
    pub fn advisor(mut self, advisor: ScaleAdvisor) -> Self {
        self.advisor = Some(advisor);
        self
    }

    /// Reads the number of calls shed so far.
    pub fn shed_count(mut self, count: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.shed = Some(Arc::new(count));
        self
    }

    /// Reads the number of calls the queue refused so far.
    pub fn queue_rejections(mut self, count: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.queue_rejections = Some(Arc::new(count));
        self
    }

    /// Reads the number of calls an open breaker refused so far.
    pub fn breaker_rejections(mut self, count: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.breaker_rejections = Some(Arc::new(count));
        self
    }

    /// The figures now. Atomic loads, and one pass over the latency window
    /// (a few thousand counters): cheap enough for every scrape or heartbeat,
    /// not meant for every request.
    pub fn collect(&self) -> ScaleMetrics {
        let in_flight = self.limit.as_ref().map(|h| h.in_flight() as u64);
        let limit = self.limit.as_ref().map(|h| h.limit() as u64);
        let queue_depth = self.queue.as_ref().map(|h| h.depth() as u64);
        let utilisation = match (in_flight, limit) {
            (Some(in_flight), Some(limit)) if limit > 0 => {
                Some((in_flight + queue_depth.unwrap_or(0)) as f64 / limit as f64)
            }
            _ => None,
        };
        ScaleMetrics {
            in_flight,
            limit,
            utilisation,
            queue_depth,
            queue_capacity: self.queue.as_ref().map(|h| h.capacity() as u64),
            shed_total: self.shed.as_ref().map(|f| f()),
            queue_rejected_total: self.queue_rejections.as_ref().map(|f| f()),
            breaker_state: self.breaker.as_ref().map(|h| h.state().as_str().to_owned()),
            breaker_failure_rate: self.breaker.as_ref().map(BreakerHandle::failure_rate),
            breaker_calls_in_window: self.breaker.as_ref().map(BreakerHandle::calls_in_window),
            breaker_denials: self.breaker.as_ref().map(BreakerHandle::denials),
            breaker_rejected_total: self.breaker_rejections.as_ref().map(|f| f()),
            latency: self.latency.as_ref().map(LatencyHandle::summary),
            recommendation: self.advisor.as_ref().and_then(ScaleAdvisor::latest),
        }
    }

    /// The figures for a registry heartbeat (see
    /// [`ScaleMetrics::load_figures`]).
    pub fn load_figures(&self) -> LoadFigures {
        self.collect().load_figures()
    }

    /// The snapshot as a Tower service answering JSON (feature `http`).
    #[cfg(feature = "http")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn service(&self) -> super::ScaleService {
        super::ScaleService {
            collector: self.clone(),
        }
    }
}

impl fmt::Debug for ScaleCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScaleCollector")
            .field("limit", &self.limit)
            .field("queue", &self.queue)
            .field("breaker", &self.breaker)
            .field("latency", &self.latency)
            .field("advisor", &self.advisor)
            .field("shed", &self.shed.is_some())
            .field("queue_rejections", &self.queue_rejections.is_some())
            .field("breaker_rejections", &self.breaker_rejections.is_some())
            .finish()
    }
}

/// The figures of the healthy instances of a service, together, as their
/// last heartbeats reported them.
///
/// Made by [`ScaleMetrics::aggregate`] or [`Aggregate::from_instances`]; fed
/// to [`ScaleAdvisor::observe_aggregate`]. Means are over every instance,
/// except `utilisation_mean`, which is over the instances that report a limit;
/// a figure is `None` when no instance contributes to it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Aggregate {
    /// The service.
    pub service: String,
    /// Healthy instances.
    pub instances: u32,
    /// Calls in flight, over all instances.
    pub in_flight_total: u64,
    /// Calls in flight per instance.
    pub in_flight_mean: Option<f64>,
    /// The sum of the limits of the instances that report one.
    pub capacity: u64,
    /// Instances reporting a limit.
    pub instances_with_limit: u32,
    /// The mean of the utilisations of the instances that report a limit
    /// (the figure an HPA averages).
    pub utilisation_mean: Option<f64>,
    /// The highest utilisation of one instance.
    pub utilisation_max: Option<f64>,
    /// Requests waiting, over all instances.
    pub queue_depth_total: u64,
    /// Requests waiting per instance.
    pub queue_depth_per_instance: Option<f64>,
    /// The mean of the instances' p95 latencies, in milliseconds, over those
    /// that report one (an instance without a latency source reports 0).
    pub p95_latency_ms_mean: Option<f64>,
    /// The highest p95 latency of one instance, in milliseconds.
    pub p95_latency_ms_max: Option<f64>,
    /// The mean CPU use of the instances that report it.
    pub cpu_mean: Option<f64>,
    /// Resident memory over the instances that report it, in bytes.
    pub memory_bytes_total: Option<u64>,
}

impl Aggregate {
    /// The aggregate of `instances` (taken as healthy) of `service`.
    pub fn from_instances(service: &str, instances: &[InstanceInfo]) -> Self {
        let n = instances.len();
        let mean = |sum: f64, count: usize| (count > 0).then(|| sum / count as f64);
        let max = |values: &mut dyn Iterator<Item = f64>| values.reduce(f64::max);
        let loads = || instances.iter().map(|i| &i.load);

        let with_limit: Vec<&LoadFigures> = loads().filter(|l| l.limit > 0).collect();
        // Figures come from other processes: saturate rather than overflow.
        let total = |values: &mut dyn Iterator<Item = u64>| values.fold(0u64, u64::saturating_add);
        let in_flight_total = total(&mut loads().map(|l| l.in_flight));
        let queue_depth_total = total(&mut loads().map(|l| l.queue_depth));
        // An instance without a latency source reports 0: leave it out.
        let p95s: Vec<f64> = loads()
            .map(|l| l.p95_latency_ms)
            .filter(|&p| p > 0.0)
            .collect();
        let cpus: Vec<f64> = loads().filter_map(|l| l.cpu).collect();
        let memory: Vec<u64> = loads().filter_map(|l| l.memory_bytes).collect();

        Aggregate {
            service: service.to_owned(),
            instances: u32::try_from(n).unwrap_or(u32::MAX),
            in_flight_total,
            in_flight_mean: mean(in_flight_total as f64, n),
            capacity: total(&mut with_limit.iter().map(|l| l.limit)),
            instances_with_limit: u32::try_from(with_limit.len()).unwrap_or(u32::MAX),
            utilisation_mean: mean(
                with_limit.iter().map(|l| l.utilisation).sum(),
                with_limit.len(),
            ),
            utilisation_max: max(&mut with_limit.iter().map(|l| l.utilisation)),
            queue_depth_total,
            queue_depth_per_instance: mean(queue_depth_total as f64, n),
            p95_latency_ms_mean: mean(p95s.iter().sum(), p95s.len()),
            p95_latency_ms_max: max(&mut loads().map(|l| l.p95_latency_ms)),
            cpu_mean: mean(cpus.iter().sum(), cpus.len()),
            memory_bytes_total: (!memory.is_empty()).then(|| total(&mut memory.iter().copied())),
        }
    }
}
