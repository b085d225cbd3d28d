//! The failure-aware peak-EWMA load.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tower::load::Load;
use tower::{Layer, Service};

use super::future::EwmaFuture;
use super::{ClassifyLoad, LoadOutcome};
use crate::balance::LoadValue;
use crate::breaker::ErrorsAreFailures;
use crate::discover::Weight;
use crate::error::ConfigError;

/// The load of a [`FailureAwareEwma`]: the estimated round-trip time in
/// nanoseconds, times the calls in flight plus one (tower's `PeakEwma` cost).
/// Lesser is less loaded.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Cost(f64);

impl Cost {
    /// The cost as a number (nanoseconds times calls in flight plus one).
    pub fn get(self) -> f64 {
        self.0
    }
}

impl LoadValue for Cost {
    #[inline]
    fn value(&self) -> f64 {
        self.0
    }
}

/// The settings of a [`FailureAwareEwma`], shared by every endpoint a
/// [`FailureAwareEwmaLayer`] wraps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Settings {
    pub(super) default_rtt: Duration,
    pub(super) decay_ns: f64,
    pub(super) penalty: Duration,
    pub(super) max_unavailable: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            default_rtt: Duration::from_millis(30),
            decay_ns: nanos(Duration::from_secs(10)),
            penalty: Duration::from_secs(1),
            max_unavailable: Duration::from_secs(30),
        }
    }
}

/// The state one endpoint's clones and calls in flight share.
struct Shared {
    settings: Settings,
    in_flight: AtomicUsize,
    estimate: Mutex<Estimate>,
}

struct Estimate {
    rtt_ns: f64,
    update_at: Instant,
    /// A `Retry-After` asked for no calls until then.
    unavailable_until: Option<Instant>,
    /// A failure makes the endpoint cost at least the penalty until then.
    penalized_until: Option<Instant>,
    /// Failures since the last success: each lengthens the next penalty.
    failures_in_row: u32,
}

/// The most penalties a run of failures adds up to.
const MAX_PENALTIES: u32 = 8;

impl Estimate {
    /// A failure: a slow one still counts as slow (the peak), but a fast one
    /// never makes the endpoint look faster; either way it costs at least the
    /// penalty for the penalty's length, times the failures in a row (at most
    /// 8), after which it is tried again.
    fn fail(&mut self, rtt_ns: f64, now: Instant, settings: &Settings) {
        if rtt_ns > self.rtt_ns {
            self.update(rtt_ns, now, settings.decay_ns);
        }
        self.failures_in_row = self.failures_in_row.saturating_add(1);
        let window = settings.penalty * self.failures_in_row.min(MAX_PENALTIES);
        self.penalized_until = Some(now + window);
    }

    /// tower's Peak-EWMA update: a higher observation replaces the estimate at
    /// once, a lower one pulls it down by how long ago the last update was.
    fn update(&mut self, rtt_ns: f64, now: Instant, decay_ns: f64) -> f64 {
        self.rtt_ns = if self.rtt_ns < rtt_ns {
            rtt_ns
        } else {
            let elapsed = nanos(now.saturating_duration_since(self.update_at));
            let decay = (-elapsed / decay_ns).exp();
            self.rtt_ns * decay + rtt_ns * (1.0 - decay)
        };
        self.update_at = now;
        self.rtt_ns
    }
}

/// Measures an endpoint's load as a peak-sensitive moving average of its
/// round-trip time, like tower's `PeakEwma`, but a failed call makes it cost
/// a penalty for a while instead of looking fast.
///
/// Clones share the estimate and the in-flight count. See the
/// [module docs](super) for the example and the reasons.
pub struct FailureAwareEwma<S, C = ErrorsAreFailures> {
    inner: S,
    shared: Arc<Shared>,
    classify: C,
}

impl<S> FailureAwareEwma<S> {
    /// Wraps `inner` with the default settings: every `Err` is a failure.
    pub fn new(inner: S) -> Self {
        Self::with_settings(inner, Settings::default(), ErrorsAreFailures::default())
    }
}

impl<S, C> FailureAwareEwma<S, C> {
    pub(super) fn with_settings(inner: S, settings: Settings, classify: C) -> Self {
        FailureAwareEwma {
            inner,
            shared: Arc::new(Shared {
                settings,
                in_flight: AtomicUsize::new(0),
                estimate: Mutex::new(Estimate {
                    rtt_ns: nanos(settings.default_rtt),
                    update_at: Instant::now(),
                    unavailable_until: None,
                    penalized_until: None,
                    failures_in_row: 0,
                }),
            }),
            classify,
        }
    }

    /// A layer with the default settings; see [`FailureAwareEwmaLayer`].
    pub fn layer() -> FailureAwareEwmaLayer {
        FailureAwareEwmaLayer::new()
    }

    /// Decides what counts as a failure (default: every `Err`).
    pub fn classify<C2>(self, classify: C2) -> FailureAwareEwma<S, C2> {
        FailureAwareEwma {
            inner: self.inner,
            shared: self.shared,
            classify,
        }
    }

    /// Calls in flight now (from this service and its clones).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Relaxed)
    }

    /// The round-trip estimate now (decayed to the present moment, not
    /// counting `Retry-After`).
    pub fn rtt_estimate(&self) -> Duration {
        let now = Instant::now();
        let mut estimate = self.shared.lock();
        Duration::from_nanos(estimate.update(0.0, now, self.shared.settings.decay_ns) as u64)
    }

    /// Gets a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Gets a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Estimate> {
        // The estimate is a number: a panic elsewhere cannot leave it torn.
        self.estimate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A call dropped before its end (an outer timeout, a client that went
    /// away): its time so far counts as a round trip if it raises the
    /// estimate (so an endpoint that never answers grows expensive), but it
    /// says nothing about success: a failure penalty stays.
    fn cancelled(&self, sent_at: Instant) {
        let now = Instant::now();
        let rtt = nanos(now.saturating_duration_since(sent_at));
        let mut estimate = self.lock();
        if rtt > estimate.rtt_ns {
            estimate.update(rtt, now, self.settings.decay_ns);
        }
    }

    fn record(&self, sent_at: Instant, outcome: LoadOutcome) {
        let settings = &self.settings;
        let now = Instant::now();
        let rtt = nanos(now.saturating_duration_since(sent_at));
        let mut estimate = self.lock();
        match outcome {
            LoadOutcome::Success => {
                estimate.update(rtt, now, settings.decay_ns);
                estimate.failures_in_row = 0;
                estimate.penalized_until = None;
            }
            LoadOutcome::Failure => estimate.fail(rtt, now, settings),
            LoadOutcome::Unavailable(after) => {
                estimate.fail(rtt, now, settings);
                let until = now + after.min(settings.max_unavailable);
                estimate.unavailable_until = Some(match estimate.unavailable_until {
                    Some(before) => before.max(until),
                    None => until,
                });
            }
            LoadOutcome::Ignored => {}
        }
    }
}

/// One call in flight: counted until it is dropped, and its round trip
/// recorded then (on the outcome given to [`complete`](Self::complete), or as a
/// plain observation of the time it took if the call was dropped before its
/// end, as tower's `PeakEwma` does).
pub(super) struct Handle {
    shared: Arc<Shared>,
    sent_at: Instant,
    recorded: bool,
}

impl Handle {
    pub(super) fn complete(mut self, outcome: LoadOutcome) {
        self.recorded = true;
        self.shared.record(self.sent_at, outcome);
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if !self.recorded {
            self.shared.cancelled(self.sent_at);
        }
        self.shared.in_flight.fetch_sub(1, Relaxed);
    }
}

impl<S, C, Request> Service<Request> for FailureAwareEwma<S, C>
where
    S: Service<Request>,
    C: ClassifyLoad<S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = EwmaFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.shared.in_flight.fetch_add(1, Relaxed);
        let handle = Handle {
            shared: self.shared.clone(),
            sent_at: Instant::now(),
            recorded: false,
        };
        EwmaFuture::new(self.inner.call(request), handle, self.classify.clone())
    }
}

impl<S, C> Load for FailureAwareEwma<S, C> {
    type Metric = Cost;

    fn load(&self) -> Cost {
        let shared = &*self.shared;
        let settings = &shared.settings;
        let pending = shared.in_flight.load(Relaxed);
        let now = Instant::now();
        let mut estimate = shared.lock();
        // Decays towards zero with the time since the last update, as in
        // tower's `PeakEwma`, so an endpoint that was slow (or failed) long ago
        // is tried again.
        let mut rtt = estimate.update(0.0, now, settings.decay_ns);
        let until = estimate.unavailable_until.max(estimate.penalized_until);
        if until.is_some_and(|until| now < until) {
            rtt = rtt.max(nanos(settings.penalty));
        }
        drop(estimate);
        Cost(rtt * (pending as f64 + 1.0))
    }
}

impl<S: Weight, C> Weight for FailureAwareEwma<S, C> {
    #[inline]
    fn weight(&self) -> u32 {
        self.inner.weight()
    }
}

impl<S: Clone, C: Clone> Clone for FailureAwareEwma<S, C> {
    /// The clone shares the estimate and the in-flight count.
    fn clone(&self) -> Self {
        FailureAwareEwma {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            classify: self.classify.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for FailureAwareEwma<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let estimate = self.shared.lock();
        f.debug_struct("FailureAwareEwma")
            .field("inner", &self.inner)
            .field("rtt_ns", &estimate.rtt_ns)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// Wraps each endpoint in its own [`FailureAwareEwma`], with settings shared by
/// all of them.
///
/// Unlike the other layers of this crate, each service it makes has state of
/// its own (an endpoint's load is its own); clones of that service share it.
/// Use it in the endpoint factory of a discovery source, or on each service of
/// a list. See the [module docs](super) for an example.
#[derive(Clone, Debug)]
pub struct FailureAwareEwmaLayer<C = ErrorsAreFailures> {
    settings: Settings,
    classify: C,
}

impl FailureAwareEwmaLayer {
    /// The defaults: a new endpoint starts at 30 ms, the estimate decays with a
    /// time constant of 10 s, a failure counts as a round trip of at least 1 s,
    /// and a `Retry-After` is honoured for at most 30 s.
    pub fn new() -> Self {
        FailureAwareEwmaLayer {
            settings: Settings::default(),
            classify: ErrorsAreFailures::default(),
        }
    }

    /// A builder starting from the defaults.
    pub fn builder() -> FailureAwareEwmaBuilder {
        FailureAwareEwmaBuilder {
            settings: Settings::default(),
            decay: Duration::from_secs(10),
        }
    }
}

impl Default for FailureAwareEwmaLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> FailureAwareEwmaLayer<C> {
    /// Decides what counts as a failure (default: every `Err`; for HTTP
    /// clients, [`HttpFailures`](super::HttpFailures)).
    pub fn classify<C2>(self, classify: C2) -> FailureAwareEwmaLayer<C2> {
        FailureAwareEwmaLayer {
            settings: self.settings,
            classify,
        }
    }
}

impl<S, C: Clone> Layer<S> for FailureAwareEwmaLayer<C> {
    type Service = FailureAwareEwma<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        FailureAwareEwma::with_settings(inner, self.settings, self.classify.clone())
    }
}

/// Builds a [`FailureAwareEwmaLayer`]; from [`FailureAwareEwmaLayer::builder`].
#[derive(Clone, Debug)]
pub struct FailureAwareEwmaBuilder {
    settings: Settings,
    decay: Duration,
}

impl FailureAwareEwmaBuilder {
    /// The estimate of a new endpoint, before any call completes (default
    /// 30 ms). It decays like any estimate.
    pub fn default_rtt(mut self, rtt: Duration) -> Self {
        self.settings.default_rtt = rtt;
        self
    }

    /// The time constant of the decay (default 10 s): after a lower round trip,
    /// or with no call at all, the estimate moves `1 - e^(-elapsed / decay)`
    /// of the way down. Shorter forgets failures and slowness sooner.
    pub fn decay(mut self, decay: Duration) -> Self {
        self.decay = decay;
        self
    }

    /// After a failure the endpoint costs at least this (default 1 s), for
    /// this long times the failures in a row (at most 8). Set it well above
    /// the endpoints' normal latency (ten times their p99, say): a failure then
    /// costs what a very slow answer would, until the endpoint is tried again.
    pub fn failure_penalty(mut self, penalty: Duration) -> Self {
        self.settings.penalty = penalty;
        self
    }

    /// The longest `Retry-After` honoured (default 30 s): an endpoint that asks
    /// for longer costs at least the penalty for this long.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.settings.max_unavailable = max;
        self
    }

    /// Checks the settings and builds the layer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `default_rtt`, `decay` or `failure_penalty` if
    /// it is zero.
    pub fn build(self) -> Result<FailureAwareEwmaLayer, ConfigError> {
        let nonzero = |field, value: Duration| {
            if value.is_zero() {
                Err(ConfigError::new(field, "must be greater than zero"))
            } else {
                Ok(())
            }
        };
        nonzero("default_rtt", self.settings.default_rtt)?;
        nonzero("decay", self.decay)?;
        nonzero("failure_penalty", self.settings.penalty)?;
        Ok(FailureAwareEwmaLayer {
            settings: Settings {
                decay_ns: nanos(self.decay),
                ..self.settings
            },
            classify: ErrorsAreFailures::default(),
        })
    }
}

/// A duration in nanoseconds, as f64 (lossy beyond about 104 days, harmless).
pub(super) fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}
