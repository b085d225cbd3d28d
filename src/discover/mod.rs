//! Discovery sources: streams of endpoint changes for the balancers.
//!
//! Each source is a [`tower::discover::Discover`] stream of
//! [`Change`](tower::discover::Change)s, keyed by the endpoint's address. A
//! `Discover` error fails tower's `Balance::poll_ready` (behind a `Buffer`,
//! for good), and the end of the stream is silently ignored (no update ever
//! arrives again), so the sources here **never yield an error and never
//! end**: failures become metrics and tracing events, and the last good set
//! stays.
//!
//! Sources produce [`Endpoint`]s (an address and a weight) and turn them into
//! services with an endpoint factory, a closure from `&Endpoint` to a service
//! (see [`HttpEndpoint`](crate::balance::HttpEndpoint) for a ready-made HTTP one); each
//! service is wrapped in [`Weighted`], so the policies can read the weight.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::load::Load;
use tower::Service;

/// The weight an endpoint has when none is given.
pub const DEFAULT_WEIGHT: u32 = 100;

/// One instance to send requests to: an address and a relative weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    addr: SocketAddr,
    weight: u32,
}

impl Endpoint {
    /// An endpoint at `addr` with the default weight ([`DEFAULT_WEIGHT`]).
    pub fn new(addr: SocketAddr) -> Self {
        Endpoint {
            addr,
            weight: DEFAULT_WEIGHT,
        }
    }

    /// Sets the relative weight; 0 keeps the endpoint known but sends it
    /// nothing while others can take the load.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The relative weight.
    pub fn weight(&self) -> u32 {
        self.weight
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Endpoint::new(addr)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (weight {})", self.addr, self.weight)
    }
}

/// A service that has a relative weight, read by the weighted policies.
pub trait Weight {
    /// The relative weight (the default is [`DEFAULT_WEIGHT`]).
    fn weight(&self) -> u32;
}

/// A service with the weight of its endpoint; forwards `Service` and tower's
/// `Load`.
///
/// The weight is shared with the discovery source that made the service (and
/// with clones), so a source can change an endpoint's weight without
/// replacing its service.
#[derive(Clone, Debug)]
pub struct Weighted<S> {
    inner: S,
    weight: Arc<AtomicU32>,
}

impl<S> Weighted<S> {
    /// Wraps `inner` with `weight`.
    pub fn new(inner: S, weight: u32) -> Self {
        Weighted {
            inner,
            weight: Arc::new(AtomicU32::new(weight)),
        }
    }

    /// Wraps `inner` with a weight shared with its source.
    pub(crate) fn shared(inner: S, weight: Arc<AtomicU32>) -> Self {
        Weighted { inner, weight }
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

impl<S> Weight for Weighted<S> {
    #[inline]
    fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }
}

impl<S: Service<R>, R> Service<R> for Weighted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: R) -> Self::Future {
        self.inner.call(request)
    }
}

impl<S: Load> Load for Weighted<S> {
    type Metric = S::Metric;

    fn load(&self) -> Self::Metric {
        self.inner.load()
    }
}

/// The metrics of the DNS and registry sources, with a `name` label:
/// `tower_scale_discovery_updates_total{change}`,
/// `tower_scale_discovery_errors_total` and `tower_scale_discovery_endpoints`.
#[cfg(any(feature = "dns", feature = "registry"))]
pub(crate) struct SourceMetrics {
    pub(crate) name: Arc<str>,
    pub(crate) inserted: metrics::Counter,
    pub(crate) removed: metrics::Counter,
    pub(crate) errors: metrics::Counter,
    pub(crate) endpoints: metrics::Gauge,
}

/// Sets `sleep` to fire at `deadline`, reusing the timer when there is one.
#[cfg(any(feature = "dns", feature = "registry"))]
pub(crate) fn rearm(
    sleep: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    deadline: tokio::time::Instant,
) {
    match sleep {
        Some(sleep) => sleep.as_mut().reset(deadline),
        None => *sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
    }
}

#[cfg(any(feature = "dns", feature = "registry"))]
impl SourceMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let updates = |change| {
            crate::metrics_util::counter(
                "tower_scale_discovery_updates_total",
                name,
                "change",
                change,
            )
        };
        SourceMetrics {
            name: name.into(),
            inserted: updates("insert"),
            removed: updates("remove"),
            errors: metrics::counter!("tower_scale_discovery_errors_total", "name" => name.to_owned()),
            endpoints: crate::metrics_util::gauge("tower_scale_discovery_endpoints", name),
        }
    }
}

mod static_list;
pub use self::static_list::{Static, StaticHandle};

#[cfg(feature = "dns")]
#[cfg_attr(docsrs, doc(cfg(feature = "dns")))]
pub mod dns;
#[cfg(feature = "dns")]
#[cfg_attr(docsrs, doc(cfg(feature = "dns")))]
pub use self::dns::{Dns, DnsBuilder};

#[cfg(feature = "registry")]
#[cfg_attr(docsrs, doc(cfg(feature = "registry")))]
pub mod registry;
#[cfg(feature = "registry")]
#[cfg_attr(docsrs, doc(cfg(feature = "registry")))]
pub use self::registry::Registry;
