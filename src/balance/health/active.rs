//! Active health checks as a discovery adapter.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use metrics::Gauge;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tower::discover::{Change, Discover};

use super::Probe;
use crate::error::{BoxError, ConfigError};
use crate::metrics_util::{self, DEFAULT_NAME};

/// Settings of [`HealthChecked`]; see the [module docs](super#settings).
#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheckConfig {
    interval: Duration,
    timeout: Duration,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    panic_threshold: f64,
    initially_healthy: bool,
    name: String,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            panic_threshold: 0.5,
            initially_healthy: true,
            name: DEFAULT_NAME.to_owned(),
        }
    }
}

impl HealthCheckConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> HealthCheckConfigBuilder {
        HealthCheckConfigBuilder {
            config: HealthCheckConfig::default(),
        }
    }

    /// The `name` label of the checker's metrics.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.interval.is_zero() {
            return Err(ConfigError::new("interval", "must be greater than zero"));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be greater than zero"));
        }
        if self.healthy_threshold == 0 {
            return Err(ConfigError::new("healthy_threshold", "must be at least 1"));
        }
        if self.unhealthy_threshold == 0 {
            return Err(ConfigError::new(
                "unhealthy_threshold",
                "must be at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.panic_threshold) {
            return Err(ConfigError::new(
                "panic_threshold",
                format!("must be in [0, 1], got {}", self.panic_threshold),
            ));
        }
        Ok(())
    }
}

/// Builds a [`HealthCheckConfig`]; from [`HealthCheckConfig::builder`].
#[derive(Clone, Debug)]
pub struct HealthCheckConfigBuilder {
    config: HealthCheckConfig,
}

impl HealthCheckConfigBuilder {
    /// Time between the starts of two probes of one endpoint (default 10 s).
    /// A probe that takes longer delays the next.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.config.interval = interval;
        self
    }

    /// A probe not done within this fails (default 1 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// Consecutive successful probes that bring an unhealthy endpoint back
    /// (default 2).
    pub fn healthy_threshold(mut self, n: u32) -> Self {
        self.config.healthy_threshold = n;
        self
    }

    /// Consecutive failed probes that make a healthy endpoint unhealthy
    /// (default 3).
    pub fn unhealthy_threshold(mut self, n: u32) -> Self {
        self.config.unhealthy_threshold = n;
        self
    }

    /// When more than this share of the endpoints is unhealthy, route to all
    /// of them (default 0.5; 1 turns panic mode off, 0 keeps every endpoint in
    /// rotation as soon as one is unhealthy).
    pub fn panic_threshold(mut self, share: f64) -> Self {
        self.config.panic_threshold = share;
        self
    }

    /// Whether a new endpoint is in rotation before its first probes (default
    /// true). If false, it joins after `healthy_threshold` successful probes.
    pub fn initially_healthy(mut self, healthy: bool) -> Self {
        self.config.initially_healthy = healthy;
        self
    }

    /// The `name` label of the checker's metrics (default `"default"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first bad field: a zero `interval` or
    /// `timeout`, a zero threshold, or a `panic_threshold` outside `[0, 1]`.
    pub fn build(self) -> Result<HealthCheckConfig, ConfigError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// A discovery adapter that probes each endpoint and keeps only the healthy
/// ones in rotation.
///
/// It wraps any [`Discover`] keyed by [`SocketAddr`] (our sources never fail;
/// an error of another source is logged and skipped, and its end leaves the
/// last set in place). Its stream never fails and never ends. See the
/// [module docs](super) for the example and the rules.
pub struct HealthChecked<D: Discover, P> {
    inner: D,
    inner_done: bool,
    probe: Arc<P>,
    config: Arc<HealthCheckConfig>,
    endpoints: HashMap<SocketAddr, Entry<D::Service>>,
    changes: VecDeque<Change<SocketAddr, D::Service>>,
    results_tx: mpsc::UnboundedSender<Verdict>,
    results: mpsc::UnboundedReceiver<Verdict>,
    generation: u64,
    panic: bool,
    healthy_gauge: Gauge,
    unhealthy_gauge: Gauge,
    panic_gauge: Gauge,
}

struct Entry<S> {
    /// Kept to re-insert the endpoint; the balancer gets clones.
    service: S,
    healthy: bool,
    /// Whether its probes have reached a verdict (a threshold of results one
    /// way): until then it does not count towards the panic threshold.
    checked: bool,
    in_rotation: bool,
    generation: u64,
    task: Option<JoinHandle<()>>,
}

impl<S> Drop for Entry<S> {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What a probe task sends: its first verdict, then every change of state.
/// The task counts the thresholds itself, so the channel carries a message
/// per state change, not per probe: an idle client (whose balancer polls
/// discovery only when a request comes) never finds a backlog of stale
/// results.
struct Verdict {
    addr: SocketAddr,
    generation: u64,
    healthy: bool,
    /// The failure that made it unhealthy.
    error: Option<BoxError>,
}

/// A probe that did not finish within the timeout.
#[derive(Debug)]
struct ProbeTimeout;

impl fmt::Display for ProbeTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("health check timed out")
    }
}

impl std::error::Error for ProbeTimeout {}

fn health(healthy: bool) -> &'static str {
    if healthy {
        "healthy"
    } else {
        "unhealthy"
    }
}

impl<D, P> HealthChecked<D, P>
where
    D: Discover<Key = SocketAddr>,
    D::Service: Clone,
    P: Probe,
{
    /// Checks the endpoints of `discover` with `probe` and `config`.
    ///
    /// No task starts here: each endpoint's probe task is spawned (with
    /// `tokio::spawn`) when the stream first sees it, so poll the stream
    /// inside a tokio runtime.
    pub fn new(discover: D, probe: P, config: HealthCheckConfig) -> Self {
        let name = config.name.as_str();
        let endpoints_gauge = |state: &'static str| metrics::gauge!("tower_scale_endpoints", "name" => name.to_owned(), "state" => state);
        let healthy_gauge = endpoints_gauge("healthy");
        let unhealthy_gauge = endpoints_gauge("unhealthy");
        let panic_gauge = metrics_util::gauge("tower_scale_health_panic", name);
        healthy_gauge.set(0.0);
        unhealthy_gauge.set(0.0);
        panic_gauge.set(0.0);
        let (results_tx, results) = mpsc::unbounded_channel();
        HealthChecked {
            inner: discover,
            inner_done: false,
            probe: Arc::new(probe),
            config: Arc::new(config),
            endpoints: HashMap::new(),
            changes: VecDeque::new(),
            results_tx,
            results,
            generation: 0,
            panic: false,
            healthy_gauge,
            unhealthy_gauge,
            panic_gauge,
        }
    }

    /// Like [`new`](Self::new), with the default settings.
    pub fn with_defaults(discover: D, probe: P) -> Self {
        Self::new(discover, probe, HealthCheckConfig::default())
    }
}

impl<D: Discover, P> HealthChecked<D, P> {
    /// Whether the endpoint at `addr` is healthy (None if unknown).
    pub fn is_healthy(&self, addr: SocketAddr) -> Option<bool> {
        self.endpoints.get(&addr).map(|e| e.healthy)
    }

    /// Whether too many endpoints are unhealthy and all are routed to.
    pub fn in_panic(&self) -> bool {
        self.panic
    }

    /// Endpoints known (healthy or not).
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether no endpoint is known.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Gets a reference to the inner discovery source.
    pub fn get_ref(&self) -> &D {
        &self.inner
    }
}

impl<D, P> HealthChecked<D, P>
where
    D: Discover<Key = SocketAddr>,
    D::Service: Clone,
    P: Probe,
{
    fn insert(&mut self, addr: SocketAddr, service: D::Service) {
        if let Some(old) = self.endpoints.get(&addr) {
            // A new service for a known address: start over with it.
            if old.in_rotation {
                self.changes.push_back(Change::Remove(addr));
            }
            self.forget(addr);
        }
        self.generation += 1;
        let task = tokio::spawn(probe_loop(
            self.probe.clone(),
            addr,
            self.generation,
            self.config.clone(),
            self.results_tx.clone(),
        ));
        let healthy = self.config.initially_healthy;
        self.endpoints.insert(
            addr,
            Entry {
                service,
                healthy,
                checked: false,
                in_rotation: false,
                generation: self.generation,
                task: Some(task),
            },
        );
        tracing::debug!(name = %self.config.name, endpoint = %addr, state = health(healthy), "health checks started");
        self.reconcile();
    }

    /// Drops an endpoint (its probe task is aborted); emits nothing.
    fn forget(&mut self, addr: SocketAddr) -> Option<Entry<D::Service>> {
        self.endpoints.remove(&addr)
    }

    fn remove(&mut self, addr: SocketAddr) {
        if let Some(entry) = self.forget(addr) {
            if entry.in_rotation {
                self.changes.push_back(Change::Remove(addr));
            }
            tracing::debug!(name = %self.config.name, endpoint = %addr, "health checks stopped");
            self.reconcile();
        }
    }

    fn on_result(&mut self, verdict: Verdict) {
        let config = &self.config;
        let Some(entry) = self.endpoints.get_mut(&verdict.addr) else {
            return;
        };
        if entry.generation != verdict.generation {
            return;
        }
        entry.checked = true;
        if entry.healthy != verdict.healthy {
            entry.healthy = verdict.healthy;
            match &verdict.error {
                None => {
                    tracing::info!(name = %config.name, endpoint = %verdict.addr, from = "unhealthy", to = "healthy", "endpoint healthy again");
                }
                Some(error) => {
                    tracing::warn!(name = %config.name, endpoint = %verdict.addr, from = "healthy", to = "unhealthy", %error, "endpoint unhealthy");
                }
            }
        }
        self.reconcile();
    }

    /// Brings the set in rotation in line with health and panic mode.
    fn reconcile(&mut self) {
        let total = self.endpoints.len();
        let unhealthy = self.endpoints.values().filter(|e| !e.healthy).count();
        // Endpoints not checked yet do not count: a new set that starts
        // unhealthy (`initially_healthy(false)`) is not a reason to panic.
        let failed = self
            .endpoints
            .values()
            .filter(|e| !e.healthy && e.checked)
            .count();
        let panic = total > 0 && failed as f64 > self.config.panic_threshold * total as f64;
        if panic != self.panic {
            self.panic = panic;
            self.panic_gauge.set(if panic { 1.0 } else { 0.0 });
            if panic {
                tracing::warn!(name = %self.config.name, unhealthy, total, threshold = self.config.panic_threshold, "too many endpoints unhealthy: routing to all of them (panic mode)");
            } else {
                tracing::info!(name = %self.config.name, unhealthy, total, "panic mode over: routing to healthy endpoints only");
            }
        }
        self.healthy_gauge.set((total - unhealthy) as f64);
        self.unhealthy_gauge.set(unhealthy as f64);
        for (addr, entry) in &mut self.endpoints {
            let wanted = entry.healthy || panic;
            if wanted == entry.in_rotation {
                continue;
            }
            entry.in_rotation = wanted;
            self.changes.push_back(if wanted {
                Change::Insert(*addr, entry.service.clone())
            } else {
                Change::Remove(*addr)
            });
        }
    }
}

async fn probe_loop<P: Probe>(
    probe: Arc<P>,
    addr: SocketAddr,
    generation: u64,
    config: Arc<HealthCheckConfig>,
    verdicts: mpsc::UnboundedSender<Verdict>,
) {
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut healthy = config.initially_healthy;
    let mut checked = false;
    // Consecutive results that agree, and that disagree, with `healthy`.
    let (mut agree, mut disagree) = (0u32, 0u32);
    loop {
        ticks.tick().await;
        let result = match tokio::time::timeout(config.timeout, probe.probe(addr)).await {
            Ok(result) => result,
            Err(_) => Err(ProbeTimeout.into()),
        };
        if let Err(error) = &result {
            tracing::debug!(name = %config.name, endpoint = %addr, %error, "health check failed");
        }
        let threshold = |healthy: bool| {
            if healthy {
                config.healthy_threshold
            } else {
                config.unhealthy_threshold
            }
        };
        let verdict = if result.is_ok() == healthy {
            disagree = 0;
            agree = agree.saturating_add(1);
            // The first verdict: the state is confirmed.
            (!checked && agree >= threshold(healthy)).then_some(None)
        } else {
            agree = 0;
            disagree += 1;
            (disagree >= threshold(!healthy)).then(|| {
                healthy = !healthy;
                disagree = 0;
                result.err()
            })
        };
        if let Some(error) = verdict {
            checked = true;
            let verdict = Verdict {
                addr,
                generation,
                healthy,
                error,
            };
            if verdicts.send(verdict).is_err() {
                return;
            }
        }
    }
}

impl<D, P> Stream for HealthChecked<D, P>
where
    D: Discover<Key = SocketAddr> + Unpin,
    D::Service: Clone,
    D::Error: fmt::Display,
    P: Probe,
{
    type Item = Result<Change<SocketAddr, D::Service>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(change) = this.changes.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            if !this.inner_done {
                match Pin::new(&mut this.inner).poll_discover(cx) {
                    Poll::Ready(Some(Ok(Change::Insert(addr, service)))) => {
                        this.insert(addr, service);
                        continue;
                    }
                    Poll::Ready(Some(Ok(Change::Remove(addr)))) => {
                        this.remove(addr);
                        continue;
                    }
                    Poll::Ready(Some(Err(error))) => {
                        tracing::warn!(name = %this.config.name, %error, "discovery error skipped; the last set stays");
                        continue;
                    }
                    Poll::Ready(None) => {
                        tracing::warn!(name = %this.config.name, "discovery source ended; the last set stays");
                        this.inner_done = true;
                    }
                    Poll::Pending => {}
                }
            }
            match this.results.poll_recv(cx) {
                Poll::Ready(Some(result)) => this.on_result(result),
                // The stream holds a sender, so the channel never closes.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

// Only the inner source is ever pinned, and only through `Pin::new`.
impl<D: Discover + Unpin, P> Unpin for HealthChecked<D, P> {}

impl<D: Discover, P> fmt::Debug for HealthChecked<D, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthChecked")
            .field("name", &self.config.name)
            .field("endpoints", &self.endpoints.len())
            .field(
                "unhealthy",
                &self.endpoints.values().filter(|e| !e.healthy).count(),
            )
            .field("panic", &self.panic)
            .finish_non_exhaustive()
    }
}
