//! Limit how many calls run at once in a service, with one limit shared by every
//! service the layer makes.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_scale::limit::ConcurrencyLimitLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let layer = ConcurrencyLimitLayer::new(2).name("api");
//! let handle = layer.handle();
//!
//! // Two services made from one layer value share one limit of 2.
//! let mut a = ServiceBuilder::new()
//!     .layer(layer.clone())
//!     .service(service_fn(|x: u32| async move { Ok::<_, Infallible>(x * 2) }));
//! let mut b = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(service_fn(|x: u32| async move { Ok::<_, Infallible>(x + 1) }));
//!
//! let first = a.ready().await.unwrap().call(20);
//! let second = b.ready().await.unwrap().call(20);
//! assert_eq!(handle.in_flight(), 2);
//! assert_eq!(handle.available(), 0);
//!
//! assert_eq!(first.await.unwrap(), 40);
//! assert_eq!(second.await.unwrap(), 21);
//! assert_eq!(handle.in_flight(), 0);
//! # }
//! ```
//!
//! # Behaviour
//!
//! `poll_ready` takes a permit, or waits for one; `call` hands the permit to the
//! response future, which releases it when it completes, fails, panics or is
//! dropped. The layer never rejects: to bound the wait, put a
//! [`Queue`](crate::queue) (bounded, with a timeout) or a
//! [`LoadShed`](crate::shed) in front of it. Waiters are served first come,
//! first served: a freed permit is handed to the first waiter and the waiter
//! woken, so a service that stops polling after a Pending `poll_ready` (a
//! timeout around `ready()`, a `LoadShed` in front) pins at most the one permit
//! handed to it, until it is polled again or dropped, and holds up no one else.
//!
//! With feature `http`, [`ConcurrencyLimitLayer::release_on_body_end`] keeps the
//! permit until the response body has ended, errored or been dropped, so that a
//! streaming response counts as in flight until its last byte.
//!
//! # Differences from `tower::limit`
//!
//! - **One limit per layer value.** tower's `ConcurrencyLimitLayer` creates its
//!   semaphore in `Layer::layer`. axum's `Router::layer` calls that once per
//!   route, and, unless the router's state was applied before serving, once more
//!   per route for every connection. So tower's limit is per route at best, and
//!   under HTTP/1 (a connection per request in flight) it never triggers
//!   (measured in `tests/http`: limit 4, 32 connections, 32 handlers at once).
//!   Here the limit belongs to the layer value, like tower's
//!   `GlobalConcurrencyLimitLayer`.
//! - **Cheaper.** Taking a permit is one compare-and-swap and giving it back is
//!   one atomic decrement; tower's semaphore takes a mutex on every release. No
//!   allocation per call; a waiter takes a place in a shared list (which grows
//!   to the largest number of waiters) and a clone of its waker.
//! - **Observable** through [`LimitHandle`] and the metrics below, and the
//!   release point is a policy ([`OnResponse`], or `OnBodyEnd` for HTTP).
//! - The error type stays the inner service's, so it is a drop-in replacement.
//!
//! # Metrics
//!
//! - `tower_scale_in_flight{name}` (gauge): calls holding a permit.
//! - `tower_scale_limit{name}` (gauge): the limit.

mod layer;
mod limiter;
mod service;

pub mod future;

use std::fmt;
use std::sync::Arc;

pub use self::layer::ConcurrencyLimitLayer;
pub use self::limiter::Permit;
pub use self::service::ConcurrencyLimit;

use self::limiter::Limiter;

/// Reads the figures of a shared limit at run time.
///
/// Got from [`ConcurrencyLimitLayer::handle`] or [`ConcurrencyLimit::handle`];
/// clones watch the same limit.
#[derive(Clone)]
pub struct LimitHandle {
    limiter: Arc<Limiter>,
}

impl LimitHandle {
    fn new(limiter: Arc<Limiter>) -> Self {
        LimitHandle { limiter }
    }

    /// Calls holding a permit now.
    pub fn in_flight(&self) -> usize {
        self.limiter.in_flight()
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.limiter.limit()
    }

    /// Permits free now (the limit less the calls in flight, never below 0).
    pub fn available(&self) -> usize {
        self.limit().saturating_sub(self.in_flight())
    }

    /// Services parked in `poll_ready` waiting for a permit.
    pub fn waiting(&self) -> usize {
        self.limiter.waiting()
    }

    /// The `name` label of the limit's metrics.
    pub fn name(&self) -> &str {
        self.limiter.name()
    }
}

impl fmt::Debug for LimitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LimitHandle").field(&self.limiter).finish()
    }
}

/// When a call gives back what it holds: a concurrency permit, or the drain's
/// in-flight count.
///
/// Implemented by [`OnResponse`] (when the response future completes) and, with
/// feature `http`, by `OnBodyEnd` (when the response body ends). Sealed. The
/// [`drain`](crate::drain) layer uses the same two policies.
pub trait ReleasePolicy<T>: Clone + sealed::Sealed {
    /// The response type once a guard of type `G` is attached.
    type Output<G>;

    /// Attaches `guard` to `response`, or drops it.
    fn attach<G>(&self, response: T, guard: G) -> Self::Output<G>;

    /// Asks the client to close the connection after `response` (HTTP/1.x:
    /// `Connection: close`); nothing for other responses. Used by the drain.
    #[doc(hidden)]
    fn close_connection(&self, _response: &mut T) {}
}

pub(crate) mod sealed {
    pub trait Sealed {}
}

/// Release when the response future completes (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct OnResponse {
    _p: (),
}

impl sealed::Sealed for OnResponse {}

impl<T> ReleasePolicy<T> for OnResponse {
    type Output<G> = T;

    #[inline]
    fn attach<G>(&self, response: T, guard: G) -> T {
        drop(guard);
        response
    }
}

/// Release when the HTTP response body has ended, errored or been dropped. See
/// [`ConcurrencyLimitLayer::release_on_body_end`].
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
#[derive(Clone, Copy, Debug, Default)]
pub struct OnBodyEnd {
    _p: (),
}

#[cfg(feature = "http")]
impl sealed::Sealed for OnBodyEnd {}

#[cfg(feature = "http")]
impl<B: http_body::Body> ReleasePolicy<::http::Response<B>> for OnBodyEnd {
    type Output<G> = ::http::Response<crate::http::GuardBody<B, G>>;

    fn attach<G>(&self, response: ::http::Response<B>, guard: G) -> Self::Output<G> {
        response.map(|body| crate::http::GuardBody::new(body, guard))
    }

    fn close_connection(&self, response: &mut ::http::Response<B>) {
        response.headers_mut().insert(
            ::http::header::CONNECTION,
            ::http::HeaderValue::from_static("close"),
        );
    }
}

#[cfg(test)]
mod tests;
