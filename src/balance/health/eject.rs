//! Passive outlier ejection: a not-ready breaker per endpoint, with a shared
//! budget of at most a share of the endpoints ejected at once.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_core::Stream;
use tower::discover::{Change, Discover};
use tower::Layer;

use crate::breaker::{
    BreakerConfig, BreakerHandle, CircuitBreaker, CircuitBreakerLayer, EjectionBudget,
    ErrorsAreFailures, State,
};
use crate::discover::Weight;
use crate::error::{or_panic, ConfigError};

/// An [`EjectionBudget`] that lets at most a share of the current endpoints be
/// ejected (their breakers open) at once.
///
/// The endpoint count is the number of live breakers sharing the budget
/// (every breaker made with it joins, and leaves when dropped), whoever made
/// them: [`Ejecting`], [`HttpEndpoint`](crate::balance::HttpEndpoint) with
/// [`ejection_budget`](crate::balance::HttpEndpointBuilder::ejection_budget),
/// or a breaker layer of your own; [`set_endpoints`](Self::set_endpoints)
/// overrides it. The allowance is
/// `floor(share × endpoints)`, but at least one when there are two endpoints or
/// more and the share is not zero (so a 10 % budget over five endpoints still
/// ejects one), and never the only endpoint. A breaker that opened keeps its
/// place until it closes, even if the count drops meanwhile. (The breaker's own
/// [`MaxOpen`](crate::breaker::MaxOpen) is a fixed number.)
#[derive(Debug)]
pub struct MaxEjectedShare {
    share: f64,
    endpoints: AtomicUsize,
    ejected: AtomicUsize,
    /// `tower_scale_endpoints{name, state="ejected"}`.
    gauge: metrics::Gauge,
}

impl MaxEjectedShare {
    /// At most `share` (0 to 1) of the endpoints ejected at once.
    ///
    /// # Panics
    ///
    /// If `share` is outside `[0, 1]`; [`try_new`](Self::try_new) returns the
    /// error instead.
    #[track_caller]
    pub fn new(share: f64) -> Arc<Self> {
        or_panic("MaxEjectedShare::new", Self::try_new(share))
    }

    /// Like [`new`](Self::new), but returns a [`ConfigError`] naming
    /// `max_ejected`.
    pub fn try_new(share: f64) -> Result<Arc<Self>, ConfigError> {
        Self::try_named(share, crate::metrics_util::DEFAULT_NAME)
    }

    /// Like [`try_new`](Self::try_new), with the `name` label of the
    /// `tower_scale_endpoints{name, state="ejected"}` gauge.
    pub fn try_named(share: f64, name: &str) -> Result<Arc<Self>, ConfigError> {
        if !(0.0..=1.0).contains(&share) {
            return Err(ConfigError::new(
                "max_ejected",
                format!("must be in [0, 1], got {share}"),
            ));
        }
        Ok(Arc::new(MaxEjectedShare {
            share,
            endpoints: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
            gauge: metrics::gauge!("tower_scale_endpoints", "name" => name.to_owned(), "state" => "ejected"),
        }))
    }

    /// How many endpoints may be ejected at once now.
    pub fn allowed(&self) -> usize {
        let n = self.endpoints.load(SeqCst);
        if self.share == 0.0 || n < 2 {
            return 0;
        }
        // A little slack so that 0.29 × 100 is 29, not 28.999...
        let allowed = (self.share * n as f64 + 1e-9).floor() as usize;
        allowed.clamp(1, n)
    }

    /// Endpoints ejected now.
    pub fn ejected(&self) -> usize {
        self.ejected.load(SeqCst)
    }

    /// The endpoint count the allowance is computed from.
    pub fn endpoints(&self) -> usize {
        self.endpoints.load(SeqCst)
    }

    /// Sets the endpoint count (when the breakers are not made by
    /// [`Ejecting`], which keeps it).
    pub fn set_endpoints(&self, n: usize) {
        self.endpoints.store(n, SeqCst);
    }
}

impl EjectionBudget for MaxEjectedShare {
    fn try_open(&self) -> bool {
        let allowed = self.allowed();
        match self
            .ejected
            .fetch_update(SeqCst, SeqCst, |n| (n < allowed).then_some(n + 1))
        {
            Ok(before) => {
                self.gauge.set((before + 1) as f64);
                true
            }
            Err(_) => false,
        }
    }

    fn joined(&self) {
        self.endpoints.fetch_add(1, SeqCst);
    }

    fn left(&self) {
        let _ = self
            .endpoints
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
    }

    fn release(&self) {
        if let Ok(before) = self
            .ejected
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
        {
            self.gauge.set((before - 1) as f64);
        }
    }
}

/// Passive outlier ejection for a discovery source: every endpoint gets a
/// circuit breaker in not-ready mode, and all of them share a
/// [`MaxEjectedShare`] budget.
///
/// See the [module docs](super#passive-outlier-ejection) for an example.
#[derive(Clone)]
pub struct OutlierEjection<C = ErrorsAreFailures> {
    config: BreakerConfig,
    classify: C,
    budget: Arc<MaxEjectedShare>,
}

impl OutlierEjection {
    /// Breakers with `config` (each named `<config name>/<endpoint>`), at most
    /// `max_ejected` (0 to 1) of the endpoints ejected at once; every `Err` is
    /// a failure.
    ///
    /// # Panics
    ///
    /// If `max_ejected` is outside `[0, 1]` or `config` is invalid;
    /// [`try_new`](Self::try_new) returns the error instead.
    #[track_caller]
    pub fn new(config: BreakerConfig, max_ejected: f64) -> Self {
        or_panic("OutlierEjection::new", Self::try_new(config, max_ejected))
    }

    /// Like [`new`](Self::new), but returns the [`ConfigError`].
    pub fn try_new(config: BreakerConfig, max_ejected: f64) -> Result<Self, ConfigError> {
        config.validate()?;
        let budget = MaxEjectedShare::try_named(max_ejected, config.name())?;
        Ok(OutlierEjection {
            config,
            classify: ErrorsAreFailures::default(),
            budget,
        })
    }
}

impl<C: Clone> OutlierEjection<C> {
    /// Decides what counts as a failure (default: every `Err`; for HTTP,
    /// [`HttpStatus`](crate::breaker::HttpStatus)).
    pub fn classify<C2>(self, classify: C2) -> OutlierEjection<C2> {
        OutlierEjection {
            config: self.config,
            classify,
            budget: self.budget,
        }
    }

    /// The shared budget: how many endpoints are ejected, and may be.
    pub fn budget(&self) -> &Arc<MaxEjectedShare> {
        &self.budget
    }

    /// Wraps every endpoint `discover` inserts in a breaker, and keeps the
    /// budget's endpoint count.
    pub fn discover<D: Discover>(self, discover: D) -> Ejecting<D, C> {
        Ejecting {
            inner: discover,
            ejection: self,
            breakers: HashMap::new(),
        }
    }

    /// A breaker for one endpoint, named `<config name>/<key>`, sharing the
    /// budget. The endpoint count is not changed: [`discover`](Self::discover)
    /// keeps it, else see [`MaxEjectedShare::set_endpoints`].
    pub fn breaker<S>(&self, key: impl fmt::Display, inner: S) -> CircuitBreaker<S, C> {
        let mut config = self.config.clone();
        config.name = format!("{}/{key}", config.name);
        CircuitBreakerLayer::new(config)
            .not_ready()
            .budget(self.budget.clone())
            .classify(self.classify.clone())
            .layer(inner)
    }
}

impl<C> fmt::Debug for OutlierEjection<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutlierEjection")
            .field("config", &self.config)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

/// A discovery adapter that puts a not-ready breaker in front of every
/// endpoint; made by [`OutlierEjection::discover`].
///
/// Errors and the end of the inner source pass through. When an endpoint is
/// removed (or replaced), its breaker is reset, so an open one gives its place
/// in the budget back.
pub struct Ejecting<D: Discover, C = ErrorsAreFailures> {
    inner: D,
    ejection: OutlierEjection<C>,
    breakers: HashMap<D::Key, BreakerHandle>,
}

impl<D, C> Ejecting<D, C>
where
    D: Discover,
    D::Key: Hash + Eq,
{
    /// The breaker of the endpoint at `key`.
    pub fn breaker(&self, key: &D::Key) -> Option<&BreakerHandle> {
        self.breakers.get(key)
    }

    /// The shared budget.
    pub fn budget(&self) -> &Arc<MaxEjectedShare> {
        &self.ejection.budget
    }
}

fn release(handle: BreakerHandle) {
    // An open breaker of an endpoint that is gone must not hold a place in
    // the budget.
    if matches!(handle.state(), State::Open | State::HalfOpen) {
        handle.reset();
    }
}

impl<D, C> Stream for Ejecting<D, C>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq + Clone + fmt::Display,
    C: Clone,
{
    type Item = Result<Change<D::Key, CircuitBreaker<D::Service, C>>, D::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let change = match ready!(Pin::new(&mut this.inner).poll_discover(cx)) {
            None => return Poll::Ready(None),
            Some(Err(err)) => return Poll::Ready(Some(Err(err))),
            Some(Ok(change)) => change,
        };
        Poll::Ready(Some(Ok(match change {
            Change::Insert(key, service) => {
                let breaker = this.ejection.breaker(&key, service);
                // The new breaker joined the budget's count when made.
                if let Some(old) = this.breakers.insert(key.clone(), breaker.handle()) {
                    release(old);
                }
                Change::Insert(key, breaker)
            }
            Change::Remove(key) => {
                if let Some(old) = this.breakers.remove(&key) {
                    release(old);
                }
                Change::Remove(key)
            }
        })))
    }
}

// Only the inner source is ever pinned, and only through `Pin::new`.
impl<D: Discover + Unpin, C> Unpin for Ejecting<D, C> {}

impl<D: Discover, C> fmt::Debug for Ejecting<D, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ejecting")
            .field("endpoints", &self.breakers.len())
            .field("budget", &self.ejection.budget)
            .finish_non_exhaustive()
    }
}

/// The breaker forwards its endpoint's weight, so a weighted policy can sit
/// over the ejection.
impl<S: Weight, C> Weight for CircuitBreaker<S, C> {
    #[inline]
    fn weight(&self) -> u32 {
        self.get_ref().weight()
    }
}
