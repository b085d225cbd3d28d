//! The automatic heartbeat: an instance registers itself, reports its load
//! figures on an interval, and deregisters when it drains.
//!
//! [`Heartbeat::builder`] takes any [`InstanceRegistry`] and the instance's
//! [`InstanceInfo`], and the handles of the layers whose figures it reports
//! (a [`LimitHandle`], a [`QueueHandle`], a latency source, a
//! [`Drain`]). [`Heartbeat::spawn`] starts a background task and returns a
//! [`HeartbeatHandle`]: the task registers the instance with the TTL, then
//! heartbeats every interval with the current figures, until the drain starts
//! or [`HeartbeatHandle::stop`] is called; then it deregisters once and ends.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower_scale::drain::Drain;
//! use tower_scale::error::ConfigError;
//! use tower_scale::limit::ConcurrencyLimitLayer;
//! use tower_scale::queue::QueueLayer;
//! use tower_scale::registry::heartbeat::Heartbeat;
//! use tower_scale::registry::{InstanceInfo, InstanceRegistry};
//!
//! async fn serve(registry: Arc<dyn InstanceRegistry>) -> Result<(), ConfigError> {
//!     let drain = Drain::new();
//!     let queue = QueueLayer::new(64, Duration::from_millis(500));
//!     let limit = ConcurrencyLimitLayer::new(32);
//!     // ... stack `drain.layer()`, `queue` and `limit` on the router and serve it.
//!
//!     let info = InstanceInfo::new("api", "api-1", "127.0.0.1:3000".parse().unwrap());
//!     let heartbeat = Heartbeat::builder(registry, info)
//!         .ttl(Duration::from_secs(10)) // heartbeats every 10 s / 3 by default
//!         .limit(limit.handle())
//!         .queue(queue.handle())
//!         .drain(&drain)
//!         .name("api")
//!         .build()?
//!         .spawn();
//!
//!     // ... serve; on SIGTERM:
//! #   tokio::time::sleep(Duration::from_secs(30)).await;
//!     // the drain starts, and the heartbeat deregisters at once,
//!     // so clients stop picking this instance while it finishes its calls.
//!     drain.start();
//!     heartbeat.stop().await; // waits for the deregistration
//!     Ok(())
//! }
//! # use std::time::Duration as D;
//! # use tower_scale::registry::{MembershipStream, RegistryFuture};
//! # struct Nothing;
//! # impl InstanceRegistry for Nothing {
//! #     fn register(&self, _: &InstanceInfo, _: D) -> RegistryFuture<'_, ()> { Box::pin(async { Ok(()) }) }
//! #     fn heartbeat(&self, _: &InstanceInfo, _: D) -> RegistryFuture<'_, ()> { Box::pin(async { Ok(()) }) }
//! #     fn deregister(&self, _: &str, _: &str) -> RegistryFuture<'_, ()> { Box::pin(async { Ok(()) }) }
//! #     fn healthy(&self, _: &str) -> RegistryFuture<'_, Vec<InstanceInfo>> { Box::pin(async { Ok(Vec::new()) }) }
//! #     fn remove_stale(&self, _: &str) -> RegistryFuture<'_, usize> { Box::pin(async { Ok(0) }) }
//! #     fn watch(&self, _: &str) -> MembershipStream { Box::pin(futures::stream::pending()) }
//! # }
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() { serve(Arc::new(Nothing)).await.unwrap() }
//! ```
//!
//! # Timing
//!
//! The registration happens as soon as the task runs; heartbeats follow every
//! [`interval`](HeartbeatBuilder::interval) (default a third of the
//! [`ttl`](HeartbeatBuilder::ttl), 10 s by default), so two heartbeats can be
//! lost before the instance expires. The interval must be shorter than the
//! TTL. Each registry call is bounded by the interval: one that takes longer
//! fails.
//!
//! # Figures
//!
//! Each heartbeat carries [`LoadFigures`] read at that moment:
//!
//! - `in_flight` and `limit` from the [`LimitHandle`]; without one,
//!   `in_flight` is the drain's count of calls in flight (which includes the
//!   calls waiting in a queue) and `limit` is 0 (unknown).
//! - `queue_depth` from the [`QueueHandle`]; without one, the callers parked
//!   in the limit's `poll_ready` waiting for a permit (they are a queue too).
//! - `utilisation` is `(in_flight + queue_depth) / limit`: up to 1 while
//!   nothing waits, above 1 while a queue stands (the demand beyond the
//!   capacity, which is what an autoscaler needs to see); 0 when the limit is
//!   unknown.
//! - `p95_latency_ms` from the [`latency`](HeartbeatBuilder::latency)
//!   source, 0 without one.
//! - `cpu` and `memory_bytes` on Linux, from `/proc/self/stat` (user and
//!   system time, in the kernel's `USER_HZ` of 100 ticks a second, the value
//!   every Linux architecture that Rust targets exposes) and
//!   `/proc/self/status` (`VmRSS`). The CPU share is measured between two
//!   heartbeats (1.0 is one core busy the whole time), so the registration
//!   carries none. Elsewhere both are `None`.
//!
//! Then the [`figures`](HeartbeatBuilder::figures) closure, if any, may
//! change any of them.
//!
//! # Failures
//!
//! The task never panics and never ends early. A registration or heartbeat
//! that fails (or times out) is logged and counted, and the next attempt
//! comes at the next interval: a registration is retried until it succeeds,
//! then heartbeats (which the registry treats as upserts, so a store that
//! lost its data is repopulated) follow. A failed deregistration is logged and
//! counted; the entry then expires after the TTL.
//!
//! # Stopping
//!
//! The task stops when the [drain](HeartbeatBuilder::drain) starts (readiness
//! goes down) or when [`HeartbeatHandle::stop`] is called, whichever comes
//! first; a call to the registry in flight at that moment finishes first
//! (within its bound), then the instance is deregistered once. If the drain
//! has started before the task runs, it does not register at all (it still
//! deregisters once, in case an earlier run left an entry). Dropping the
//! [`HeartbeatHandle`] detaches the task, which keeps running until the drain
//! starts or the runtime shuts down.
//!
//! # Metrics
//!
//! With the `name` label set by [`HeartbeatBuilder::name`] (`"default"`
//! unless set): `tower_scale_registry_errors_total{name, op}`, a counter of
//! registry calls that failed or timed out, with `op` one of `"register"`,
//! `"heartbeat"` and `"deregister"`.
//!
//! Tracing: `info` at registration and deregistration, `warn` at the first
//! failure of a series (later ones of the same series at `debug`, every one
//! counted), and `info` when heartbeats recover.

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use metrics::Counter;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{InstanceInfo, InstanceRegistry, LoadFigures, RegistryError};
use crate::drain::{Drain, Signal};
use crate::error::ConfigError;
use crate::limit::LimitHandle;
use crate::metrics_util::{self, DEFAULT_NAME};
use crate::queue::QueueHandle;

/// The TTL when none is set.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

type Latency = Box<dyn Fn() -> Duration + Send>;
type Adjust = Box<dyn Fn(&mut LoadFigures) + Send>;

/// A configured heartbeat, ready to [`spawn`](Heartbeat::spawn).
///
/// See the [module docs](self) for an example.
pub struct Heartbeat {
    registry: Arc<dyn InstanceRegistry>,
    info: InstanceInfo,
    ttl: Duration,
    interval: Duration,
    sources: Sources,
    drain: Option<Drain>,
    name: String,
}

/// Where the figures come from.
struct Sources {
    limit: Option<LimitHandle>,
    queue: Option<QueueHandle>,
    drain: Option<Drain>,
    latency: Option<Latency>,
    adjust: Option<Adjust>,
    process: Process,
}

/// Builds a [`Heartbeat`]; see [`Heartbeat::builder`].
pub struct HeartbeatBuilder {
    registry: Arc<dyn InstanceRegistry>,
    info: InstanceInfo,
    ttl: Duration,
    interval: Option<Duration>,
    limit: Option<LimitHandle>,
    queue: Option<QueueHandle>,
    latency: Option<Latency>,
    adjust: Option<Adjust>,
    drain: Option<Drain>,
    name: String,
}

impl Heartbeat {
    /// A builder for the heartbeat of `info` in `registry`.
    pub fn builder(registry: Arc<dyn InstanceRegistry>, info: InstanceInfo) -> HeartbeatBuilder {
        HeartbeatBuilder {
            registry,
            info,
            ttl: DEFAULT_TTL,
            interval: None,
            limit: None,
            queue: None,
            latency: None,
            adjust: None,
            drain: None,
            name: DEFAULT_NAME.to_owned(),
        }
    }

    /// The TTL each registration and heartbeat carries.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The time between two heartbeats.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Spawns the task that registers, heartbeats and deregisters, and
    /// returns its handle.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn(self) -> HeartbeatHandle {
        let (tx, rx) = oneshot::channel();
        let stop = Stop {
            drain: self.drain.as_ref().map(Drain::started),
            request: Some(rx),
        };
        let errors =
            |op| metrics_util::counter("tower_scale_registry_errors_total", &self.name, "op", op);
        let metrics = Metrics {
            register: errors("register"),
            heartbeat: errors("heartbeat"),
            deregister: errors("deregister"),
        };
        let task = tokio::spawn(self.run(stop, metrics));
        HeartbeatHandle {
            stop: Some(tx),
            task,
        }
    }

    async fn run(mut self, mut stop: Stop, metrics: Metrics) {
        let name = self.name.as_str();
        let (service, id) = (self.info.service.clone(), self.info.id.clone());
        let (service, id) = (service.as_str(), id.as_str());
        let mut registered = false;
        let mut failures = 0u64;
        let mut beats = 0u64;
        let mut next = Instant::now();
        let why = loop {
            if let Some(why) = stop.or_sleep_until(next).await {
                break why;
            }
            next = Instant::now() + self.interval;
            self.info.load = self.sources.read();
            let (op, counter) = if registered {
                ("heartbeat", &metrics.heartbeat)
            } else {
                ("register", &metrics.register)
            };
            let call = if registered {
                self.registry.heartbeat(&self.info, self.ttl)
            } else {
                self.registry.register(&self.info, self.ttl)
            };
            match bounded(self.interval, call).await {
                Ok(()) => {
                    if !registered {
                        registered = true;
                        tracing::info!(name, service, id, addr = %self.info.addr, ttl = ?self.ttl, "instance registered");
                    } else if failures > 0 {
                        tracing::info!(name, service, id, failures, "heartbeats recovered");
                    }
                    failures = 0;
                    // Now and then, prune the index of entries whose TTL has
                    // passed (instances that died without deregistering), so
                    // reads do not grow with churn.
                    beats += 1;
                    if beats.is_multiple_of(STALE_SWEEP_EVERY) {
                        let sweep = self.registry.remove_stale(service);
                        match tokio::time::timeout(self.interval, sweep).await {
                            Ok(Ok(removed)) if removed > 0 => {
                                tracing::debug!(
                                    name,
                                    service,
                                    removed,
                                    "stale registry entries removed"
                                );
                            }
                            Ok(Err(error)) => {
                                tracing::debug!(name, service, %error, "stale-entry sweep failed");
                            }
                            _ => {}
                        }
                    }
                }
                Err(error) => {
                    failures += 1;
                    counter.increment(1);
                    if failures == 1 {
                        tracing::warn!(name, service, id, op, %error, "registry call failed; retrying at the next interval");
                    } else {
                        tracing::debug!(name, service, id, op, %error, failures, "registry call failed again");
                    }
                }
            }
        };
        let call = self.registry.deregister(service, id);
        match bounded(self.interval, call).await {
            Ok(()) => tracing::info!(
                name,
                service,
                id,
                why = why.as_str(),
                "instance deregistered"
            ),
            Err(error) => {
                metrics.deregister.increment(1);
                tracing::warn!(name, service, id, why = why.as_str(), %error, "deregistration failed; the entry expires after its TTL");
            }
        }
    }
}

/// Every this many successful heartbeats, the instance sweeps its service's
/// stale entries (each instance does, so a sweep runs about every
/// `interval × 20 / instances`).
const STALE_SWEEP_EVERY: u64 = 20;

/// `tower_scale_registry_errors_total{name, op}`, registered once at spawn.
struct Metrics {
    register: Counter,
    heartbeat: Counter,
    deregister: Counter,
}

/// `call`, failing if it takes longer than `limit`.
async fn bounded(
    limit: Duration,
    call: impl Future<Output = Result<(), RegistryError>>,
) -> Result<(), RegistryError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(RegistryError::Unavailable(format!(
            "no answer within {limit:?}"
        ))),
    }
}

/// Why the heartbeat stopped.
#[derive(Clone, Copy, Debug)]
enum Why {
    Drain,
    Stop,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Why::Drain => "drain started",
            Why::Stop => "stopped",
        }
    }
}

/// The two ways to stop: the drain starts, or the handle asks.
struct Stop {
    drain: Option<Signal>,
    /// `None` once the handle is dropped without asking (detached).
    request: Option<oneshot::Receiver<()>>,
}

impl Stop {
    fn poll_stop(&mut self, cx: &mut Context<'_>) -> Poll<Why> {
        if let Some(request) = &mut self.request {
            match Pin::new(request).poll(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Why::Stop),
                Poll::Ready(Err(_)) => self.request = None,
                Poll::Pending => {}
            }
        }
        if let Some(drain) = &mut self.drain {
            if Pin::new(drain).poll(cx).is_ready() {
                return Poll::Ready(Why::Drain);
            }
        }
        Poll::Pending
    }

    /// Waits until `deadline`; `Some` if asked to stop first (or already).
    async fn or_sleep_until(&mut self, deadline: Instant) -> Option<Why> {
        let mut sleep = pin!(tokio::time::sleep_until(deadline));
        poll_fn(|cx| {
            if let Poll::Ready(why) = self.poll_stop(cx) {
                return Poll::Ready(Some(why));
            }
            sleep.as_mut().poll(cx).map(|()| None)
        })
        .await
    }
}

impl Sources {
    fn read(&mut self) -> LoadFigures {
        let mut figures = LoadFigures::default();
        match (&self.limit, &self.drain) {
            (Some(limit), _) => {
                figures.in_flight = limit.in_flight() as u64;
                figures.limit = limit.limit() as u64;
            }
            (None, Some(drain)) => figures.in_flight = drain.in_flight() as u64,
            (None, None) => {}
        }
        figures.queue_depth = match (&self.queue, &self.limit) {
            (Some(queue), _) => queue.depth() as u64,
            (None, Some(limit)) => limit.waiting() as u64,
            (None, None) => 0,
        };
        figures.utilisation = utilisation(figures.in_flight, figures.queue_depth, figures.limit);
        if let Some(latency) = &self.latency {
            figures.p95_latency_ms = latency().as_secs_f64() * 1_000.0;
        }
        figures.cpu = self.process.cpu();
        figures.memory_bytes = resident_memory();
        if let Some(adjust) = &self.adjust {
            adjust(&mut figures);
        }
        figures
    }
}

/// `(in_flight + queue_depth) / limit`, 0 when the limit is unknown.
fn utilisation(in_flight: u64, queue_depth: u64, limit: u64) -> f64 {
    if limit == 0 {
        return 0.0;
    }
    (in_flight + queue_depth) as f64 / limit as f64
}

/// The process's CPU time at the last reading, to measure the share between
/// two readings.
#[derive(Default)]
struct Process {
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    last: Option<(Instant, u64)>,
}

impl Process {
    /// The CPU share since the last call (1.0 is one core busy), `None` at
    /// the first call, when no time passed, or off Linux.
    #[cfg(target_os = "linux")]
    fn cpu(&mut self) -> Option<f64> {
        let now = Instant::now();
        let ticks = cpu_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
        let (then, before) = self.last.replace((now, ticks))?;
        let elapsed = now.duration_since(then).as_secs_f64();
        (elapsed > 0.0).then(|| ticks.saturating_sub(before) as f64 / USER_HZ / elapsed)
    }

    #[cfg(not(target_os = "linux"))]
    fn cpu(&mut self) -> Option<f64> {
        None
    }
}

/// Clock ticks a second in `/proc`: fixed at 100 for user space on every
/// Linux architecture Rust targets.
#[cfg(target_os = "linux")]
const USER_HZ: f64 = 100.0;

/// User plus system time, in ticks, from the text of `/proc/self/stat`.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces; the
    // fields after it start at 3 (state), so utime (14) and stime (15) are
    // the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The resident set size from `/proc/self/status`, `None` off Linux.
fn resident_memory() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        vm_rss(&std::fs::read_to_string("/proc/self/status").ok()?)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// `VmRSS` in bytes from the text of `/proc/self/status` (given in kB).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line["VmRSS:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

impl fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Heartbeat")
            .field("service", &self.info.service)
            .field("id", &self.info.id)
            .field("addr", &self.info.addr)
            .field("ttl", &self.ttl)
            .field("interval", &self.interval)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl HeartbeatBuilder {
    /// How long the instance stays healthy without a heartbeat (default
    /// 10 s); must be more than zero.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The time between two heartbeats (default a third of the TTL); must be
    /// more than zero and shorter than the TTL. It also bounds each call to
    /// the registry.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// Reports `in_flight` and `limit` from this limit, and the callers
    /// waiting for a permit as the queue depth when no queue is given.
    pub fn limit(mut self, limit: LimitHandle) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Reports `queue_depth` from this queue.
    pub fn queue(mut self, queue: QueueHandle) -> Self {
        self.queue = Some(queue);
        self
    }

    /// Reports `p95_latency_ms` from `p95`, called at each heartbeat (for
    /// example a closure over the `scale` module's latency window).
    pub fn latency<F>(mut self, p95: F) -> Self
    where
        F: Fn() -> Duration + Send + 'static,
    {
        self.latency = Some(Box::new(p95));
        self
    }

    /// Calls `adjust` on the figures at each heartbeat, after the others are
    /// read, to set or change any of them.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tower_scale::registry::heartbeat::HeartbeatBuilder;
    /// # fn f(builder: HeartbeatBuilder, connections: Arc<std::sync::atomic::AtomicU64>) -> HeartbeatBuilder {
    /// // An instance that counts its own work instead of using a limit.
    /// builder.figures(move |figures| {
    ///     figures.in_flight = connections.load(std::sync::atomic::Ordering::Relaxed);
    ///     figures.limit = 500;
    ///     figures.utilisation = figures.in_flight as f64 / 500.0;
    /// })
    /// # }
    /// ```
    pub fn figures<F>(mut self, adjust: F) -> Self
    where
        F: Fn(&mut LoadFigures) + Send + 'static,
    {
        self.adjust = Some(Box::new(adjust));
        self
    }

    /// Stops heartbeating and deregisters when `drain` starts (readiness goes
    /// down), so clients stop picking the instance while it finishes its
    /// calls; also reports the drain's in-flight count when no limit is
    /// given.
    pub fn drain(mut self, drain: &Drain) -> Self {
        self.drain = Some(drain.clone());
        self
    }

    /// The `name` label of the heartbeat's metrics (default `"default"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The heartbeat, or an error naming `ttl` or `interval` when one is zero
    /// or the interval is not shorter than the TTL.
    pub fn build(self) -> Result<Heartbeat, ConfigError> {
        if self.ttl.is_zero() {
            return Err(ConfigError::new("ttl", "must be more than zero"));
        }
        let interval = self.interval.unwrap_or(self.ttl / 3);
        if interval.is_zero() {
            return Err(ConfigError::new("interval", "must be more than zero"));
        }
        if interval >= self.ttl {
            return Err(ConfigError::new(
                "interval",
                format!(
                    "{interval:?} must be shorter than the ttl ({:?}), or the instance expires between heartbeats",
                    self.ttl
                ),
            ));
        }
        Ok(Heartbeat {
            registry: self.registry,
            info: self.info,
            ttl: self.ttl,
            interval,
            sources: Sources {
                limit: self.limit,
                queue: self.queue,
                drain: self.drain.clone(),
                latency: self.latency,
                adjust: self.adjust,
                process: Process::default(),
            },
            drain: self.drain,
            name: self.name,
        })
    }
}

impl fmt::Debug for HeartbeatBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeartbeatBuilder")
            .field("service", &self.info.service)
            .field("id", &self.info.id)
            .field("ttl", &self.ttl)
            .field("interval", &self.interval)
            .field("limit", &self.limit.is_some())
            .field("queue", &self.queue.is_some())
            .field("latency", &self.latency.is_some())
            .field("figures", &self.adjust.is_some())
            .field("drain", &self.drain.is_some())
            .field("name", &self.name)
            .finish()
    }
}

/// The handle on a running heartbeat, from [`Heartbeat::spawn`].
///
/// Dropping it detaches the task, which keeps running until the drain starts
/// (see the [module docs](self)).
pub struct HeartbeatHandle {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl HeartbeatHandle {
    /// Stops the heartbeat if it is still running, and waits until it has
    /// deregistered the instance (or failed to, within the interval) and
    /// ended.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The task never panics; an error means the runtime is shutting down.
        let _ = (&mut self.task).await;
    }

    /// Ends the heartbeat at once without deregistering, as if the process
    /// had died: the entry stays until its TTL passes. For tests and for
    /// handing an instance's entry over to another process.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Whether the task has ended (after a drain or a stop).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl fmt::Debug for HeartbeatHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeartbeatHandle")
            .field("finished", &self.task.is_finished())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Mutex;

    use tower::{service_fn, Layer, Service, ServiceExt};

    use super::*;
    use crate::limit::ConcurrencyLimitLayer;
    use crate::queue::QueueLayer;
    use crate::registry::{MembershipStream, RegistryFuture};

    /// One call the fake registry saw: what, when (since the test began),
    /// and the figures it carried.
    #[derive(Clone, Debug)]
    struct Call {
        op: &'static str,
        at: Duration,
        load: LoadFigures,
    }

    /// A registry that records its calls and fails the next `fail` of them.
    struct Fake {
        start: Instant,
        calls: Mutex<Vec<Call>>,
        fail: AtomicUsize,
    }

    impl Fake {
        fn new() -> Arc<Self> {
            Arc::new(Fake {
                start: Instant::now(),
                calls: Mutex::new(Vec::new()),
                fail: AtomicUsize::new(0),
            })
        }

        fn record(&self, op: &'static str, load: LoadFigures) -> RegistryFuture<'_, ()> {
            let at = Instant::now() - self.start;
            self.calls.lock().unwrap().push(Call { op, at, load });
            let failed = self
                .fail
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok();
            Box::pin(async move {
                if failed {
                    Err(RegistryError::Unavailable("injected".into()))
                } else {
                    Ok(())
                }
            })
        }

        fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        /// The calls as `op@seconds`.
        fn log(&self) -> Vec<String> {
            self.calls()
                .iter()
                .map(|call| format!("{}@{}", call.op, call.at.as_secs()))
                .collect()
        }
    }

    impl InstanceRegistry for Fake {
        fn register(&self, info: &InstanceInfo, ttl: Duration) -> RegistryFuture<'_, ()> {
            assert_eq!(ttl, Duration::from_secs(9));
            self.record("register", info.load)
        }

        fn heartbeat(&self, info: &InstanceInfo, ttl: Duration) -> RegistryFuture<'_, ()> {
            assert_eq!(ttl, Duration::from_secs(9));
            self.record("heartbeat", info.load)
        }

        fn deregister(&self, service: &str, id: &str) -> RegistryFuture<'_, ()> {
            assert_eq!((service, id), ("api", "api-1"));
            self.record("deregister", LoadFigures::default())
        }

        fn healthy(&self, _: &str) -> RegistryFuture<'_, Vec<InstanceInfo>> {
            Box::pin(async { Ok(Vec::new()) })
        }

        fn remove_stale(&self, _: &str) -> RegistryFuture<'_, usize> {
            Box::pin(async { Ok(0) })
        }

        fn watch(&self, _: &str) -> MembershipStream {
            Box::pin(futures_util::stream::pending())
        }
    }

    fn builder(fake: &Arc<Fake>) -> HeartbeatBuilder {
        let info = InstanceInfo::new("api", "api-1", "127.0.0.1:3000".parse().unwrap());
        Heartbeat::builder(fake.clone(), info).ttl(Duration::from_secs(9))
    }

    async fn advance(secs: u64) {
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }

    /// It registers at once, then heartbeats every interval (a third of the
    /// TTL by default) with the figures of the moment: in flight and limit
    /// from the limit, depth from the queue, utilisation counting the queue,
    /// p95 from the latency source, then the custom closure.
    #[tokio::test(start_paused = true)]
    async fn registers_then_heartbeats_on_the_interval_with_current_figures() {
        let fake = Fake::new();
        let limit = ConcurrencyLimitLayer::new(2);
        let queue = QueueLayer::new(8, Duration::from_secs(3600));
        let mut svc = queue.layer(limit.layer(service_fn(|()| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, std::convert::Infallible>(())
        })));
        let heartbeat = builder(&fake)
            .limit(limit.handle())
            .queue(queue.handle())
            .latency(|| Duration::from_micros(12_500))
            .figures(|figures| figures.memory_bytes = Some(42))
            .build()
            .unwrap();
        assert_eq!(heartbeat.interval(), Duration::from_secs(3));
        let handle = heartbeat.spawn();

        advance(1).await;
        assert_eq!(fake.log(), ["register@0"]);
        let first = fake.calls()[0].load;
        assert_eq!((first.in_flight, first.limit, first.queue_depth), (0, 2, 0));
        assert_eq!(first.utilisation, 0.0);
        assert_eq!(first.p95_latency_ms, 12.5);
        assert_eq!(first.cpu, None, "no CPU share before a second reading");
        assert_eq!(
            first.memory_bytes,
            Some(42),
            "the closure has the last word"
        );

        // Two calls take the permits, a third waits in the queue.
        for _ in 0..3 {
            let call = svc.ready().await.unwrap().call(());
            tokio::spawn(call);
        }
        advance(3).await;
        assert_eq!(fake.log(), ["register@0", "heartbeat@3"]);
        let busy = fake.calls()[1].load;
        assert_eq!((busy.in_flight, busy.limit, busy.queue_depth), (2, 2, 1));
        assert_eq!(busy.utilisation, 1.5, "a standing queue counts");
        #[cfg(target_os = "linux")]
        assert!(busy.cpu.is_some(), "measured between two heartbeats");

        advance(6).await;
        assert_eq!(
            fake.log(),
            ["register@0", "heartbeat@3", "heartbeat@6", "heartbeat@9"]
        );
        assert!(!handle.is_finished());
    }

    /// When the drain starts, it deregisters once and ends.
    #[tokio::test(start_paused = true)]
    async fn deregisters_once_when_the_drain_starts() {
        let fake = Fake::new();
        let drain = Drain::new();
        let handle = builder(&fake).drain(&drain).build().unwrap().spawn();
        advance(4).await;
        drain.start();
        advance(1).await;
        assert_eq!(fake.log(), ["register@0", "heartbeat@3", "deregister@4"]);
        assert!(handle.is_finished());
        advance(30).await;
        assert_eq!(fake.log().len(), 3, "nothing after the deregistration");
        handle.stop().await;
        assert_eq!(
            fake.log().len(),
            3,
            "stopping after the drain does nothing more"
        );
    }

    /// `stop` deregisters once and waits for it.
    #[tokio::test(start_paused = true)]
    async fn stop_deregisters_and_waits() {
        let fake = Fake::new();
        let handle = builder(&fake).build().unwrap().spawn();
        advance(7).await;
        handle.stop().await;
        assert_eq!(
            fake.log(),
            ["register@0", "heartbeat@3", "heartbeat@6", "deregister@7"]
        );
    }

    /// A drain that started before the task ran: no registration, one
    /// deregistration.
    #[tokio::test(start_paused = true)]
    async fn a_drain_started_before_spawning_never_registers() {
        let fake = Fake::new();
        let drain = Drain::new();
        drain.start();
        let handle = builder(&fake).drain(&drain).build().unwrap().spawn();
        advance(10).await;
        assert_eq!(fake.log(), ["deregister@0"]);
        assert!(handle.is_finished());
    }

    /// Failed calls are retried at the next interval: the registration until
    /// it succeeds, then heartbeats, which go on after a failure.
    #[tokio::test(start_paused = true)]
    async fn keeps_going_after_errors() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let prometheus = recorder.handle();
        let errors = |op: &str| -> Option<f64> {
            let series = format!(r#"tower_scale_registry_errors_total{{name="api",op="{op}"}}"#);
            prometheus
                .render()
                .lines()
                .find_map(|line| line.strip_prefix(&series)?.trim().parse().ok())
        };
        let fake = Fake::new();
        fake.fail.store(2, SeqCst);
        let heartbeat = builder(&fake).name("api").build().unwrap();
        let handle = metrics::with_local_recorder(&recorder, || heartbeat.spawn());
        advance(10).await;
        assert_eq!(
            fake.log(),
            ["register@0", "register@3", "register@6", "heartbeat@9"]
        );
        fake.fail.store(1, SeqCst);
        advance(6).await;
        assert_eq!(&fake.log()[4..], ["heartbeat@12", "heartbeat@15"]);
        assert!(!handle.is_finished());
        fake.fail.store(1, SeqCst);
        handle.stop().await;
        assert_eq!(fake.log().last().unwrap(), "deregister@16");
        assert_eq!(errors("register"), Some(2.0));
        assert_eq!(errors("heartbeat"), Some(1.0));
        assert_eq!(errors("deregister"), Some(1.0));
    }

    /// A registry that never answers: each call fails after the interval, and
    /// the heartbeat goes on; a stop is not blocked for longer than that.
    #[tokio::test(start_paused = true)]
    async fn a_registry_that_hangs_times_out() {
        struct Hang(AtomicUsize);
        impl InstanceRegistry for Hang {
            fn register(&self, _: &InstanceInfo, _: Duration) -> RegistryFuture<'_, ()> {
                self.0.fetch_add(1, SeqCst);
                Box::pin(std::future::pending())
            }
            fn heartbeat(&self, _: &InstanceInfo, _: Duration) -> RegistryFuture<'_, ()> {
                unreachable!("never registered")
            }
            fn deregister(&self, _: &str, _: &str) -> RegistryFuture<'_, ()> {
                self.0.fetch_add(100, SeqCst);
                Box::pin(std::future::pending())
            }
            fn healthy(&self, _: &str) -> RegistryFuture<'_, Vec<InstanceInfo>> {
                unreachable!()
            }
            fn remove_stale(&self, _: &str) -> RegistryFuture<'_, usize> {
                unreachable!()
            }
            fn watch(&self, _: &str) -> MembershipStream {
                unreachable!()
            }
        }
        let hang = Arc::new(Hang(AtomicUsize::new(0)));
        let info = InstanceInfo::new("api", "api-1", "127.0.0.1:3000".parse().unwrap());
        let handle = Heartbeat::builder(hang.clone(), info)
            .ttl(Duration::from_secs(9))
            .build()
            .unwrap()
            .spawn();
        advance(10).await;
        assert_eq!(hang.0.load(SeqCst), 4, "registrations at 0, 3, 6 and 9");
        let begun = Instant::now();
        handle.stop().await;
        assert_eq!(hang.0.load(SeqCst), 104, "one deregistration");
        assert!(Instant::now() - begun <= Duration::from_secs(6));
    }

    /// Dropping the handle leaves the heartbeat running.
    #[tokio::test(start_paused = true)]
    async fn dropping_the_handle_detaches() {
        let fake = Fake::new();
        let drain = Drain::new();
        drop(builder(&fake).drain(&drain).build().unwrap().spawn());
        advance(4).await;
        assert_eq!(fake.log(), ["register@0", "heartbeat@3"]);
        drain.start();
        advance(1).await;
        assert_eq!(fake.log().last().unwrap(), "deregister@4");
    }

    /// Without a limit, the drain's count is the in-flight figure.
    #[tokio::test(start_paused = true)]
    async fn without_a_limit_the_drain_counts_in_flight() {
        let fake = Fake::new();
        let drain = Drain::new();
        let mut svc = drain.layer().layer(service_fn(|()| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, std::convert::Infallible>(())
        }));
        let call = svc.ready().await.unwrap().call(());
        tokio::spawn(call);
        let handle = builder(&fake).drain(&drain).build().unwrap().spawn();
        advance(1).await;
        let load = fake.calls()[0].load;
        assert_eq!((load.in_flight, load.limit, load.utilisation), (1, 0, 0.0));
        handle.stop().await;
    }

    /// The interval must be shorter than the TTL, and neither zero; the
    /// error names the field.
    #[test]
    fn build_names_the_bad_field() {
        let fake = Fake::new();
        let err = builder(&fake)
            .interval(Duration::from_secs(9))
            .build()
            .unwrap_err();
        assert_eq!(err.field(), "interval");
        let err = builder(&fake).interval(Duration::ZERO).build().unwrap_err();
        assert_eq!(err.field(), "interval");
        let err = builder(&fake).ttl(Duration::ZERO).build().unwrap_err();
        assert_eq!(err.field(), "ttl");
        let ok = builder(&fake)
            .interval(Duration::from_secs(8))
            .build()
            .unwrap();
        assert_eq!(
            (ok.ttl(), ok.interval()),
            (Duration::from_secs(9), Duration::from_secs(8))
        );
        let default = Heartbeat::builder(
            fake.clone(),
            InstanceInfo::new("a", "b", "127.0.0.1:1".parse().unwrap()),
        )
        .build()
        .unwrap();
        assert_eq!(default.ttl(), DEFAULT_TTL);
        assert_eq!(default.interval(), DEFAULT_TTL / 3);
    }

    /// The handle can be kept anywhere (axum state, another task); the
    /// heartbeat can be built on one thread and spawned from another.
    #[test]
    fn handles_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        fn assert_send<T: Send + 'static>() {}
        assert_send_sync::<HeartbeatHandle>();
        assert_send::<Heartbeat>();
        assert_send::<HeartbeatBuilder>();
    }

    #[test]
    fn proc_files_parse() {
        let stat = "4242 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 1 0";
        assert_eq!(cpu_ticks(stat), Some(175));
        assert_eq!(cpu_ticks("garbage"), None);
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t1\n";
        assert_eq!(vm_rss(status), Some(1234 * 1024));
        assert_eq!(vm_rss("Name:\tx\n"), None);
        assert_eq!(utilisation(3, 0, 4), 0.75);
        assert_eq!(utilisation(3, 0, 0), 0.0);
        #[cfg(target_os = "linux")]
        assert!(resident_memory().unwrap() > 0);
    }
}
