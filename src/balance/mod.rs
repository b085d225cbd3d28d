//! Discovery-driven balancing around `tower::balance`: endpoint factories,
//! policies, failure-aware load, active health checks, outlier ejection and
//! slow start (feature `balance`).
//!
//! tower gives P2C and the `Discover` trait, but no sources, no weights, no
//! health checks and no ejection. The pieces here fill those gaps and compose
//! with tower's own:
//!
//! | piece | what it does |
//! |---|---|
//! | [`crate::discover`] | sources of endpoint changes that never fail and never end: [`Static`](crate::discover::Static) with a handle, DNS (feature `dns`) |
//! | [`HttpEndpoint`] | an endpoint factory: a hyper-util client for one address inside `CircuitBreaker(not-ready) → ConcurrencyLimit → Timeout` |
//! | [`policy`] | policies tower's `Balance` cannot express (weights, hashing on the request) |
//! | [`load`] | a load that counts failures as expensive, for P2C |
//! | [`health`] | active health checks that take endpoints out of rotation and back |
//! | [`slow_start`] | a ramping share for a new endpoint |
//! | [`ReadyTimeoutLayer`] | callers wait at most a set time for a ready endpoint, then get [`NoEndpoints`](crate::error::NoEndpoints) |
//!
//! The client stack, outermost first (DESIGN.md): `Retry(SafeRetry) → Buffer →
//! ReadyTimeout → Balance`, and per endpoint `CircuitBreaker(not-ready) →
//! ConcurrencyLimit → Timeout → connection`. tower's `Retry` needs a `Clone`
//! service and tower's `Balance` is not `Clone`, so a `Buffer` shares one
//! balancer; `ReadyTimeout` sits inside the `Buffer`, whose worker is what
//! waits for the balancer.
//!
//! Share a balancer between tasks with [`buffered`] rather than
//! `tower::buffer::Buffer::new` directly: it is the same `Buffer`, returned as
//! an opaque `impl Service + Clone + Send`. Naming the whole buffered type
//! inside a spawned future trips a rustc limitation with higher-ranked
//! lifetimes ("higher-ranked lifetime error", "implementation of `Send` is not
//! general enough"); the opaque type does not.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Empty;
//! use tower::balance::p2c::Balance;
//! use tower::buffer::Buffer;
//! use tower::load::{CompleteOnResponse, PendingRequests};
//! use tower::ServiceBuilder;
//! use tower_scale::balance::{HttpEndpoint, ReadyTimeoutLayer};
//! use tower_scale::discover::Static;
//! use tower_scale::http::SafeRetry;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let endpoints = HttpEndpoint::<Empty<Bytes>>::builder()
//!     .timeout(Duration::from_secs(2))
//!     .build()?;
//! let addrs: [std::net::SocketAddr; 2] = ["127.0.0.1:8081".parse()?, "127.0.0.1:8082".parse()?];
//! let (discover, handle) = Static::new(addrs, move |endpoint| {
//!     PendingRequests::new(endpoints.make(endpoint), CompleteOnResponse::default())
//! });
//! let balance = ServiceBuilder::new()
//!     .layer(ReadyTimeoutLayer::new(Duration::from_secs(1)))
//!     .service(Balance::new(discover));
//! let client = ServiceBuilder::new()
//!     .layer(SafeRetry::new().into_layer())
//!     .service(Buffer::new(balance, 1024));
//! # let _ = (client, handle);
//! # Ok(())
//! # }
//! ```

/// A load metric as a number, so that policies can weigh it (compare
/// `load / weight`). tower's own metrics (`PendingRequests`' `Count`,
/// `PeakEwma`'s `Cost`) keep their number private, so the weighted policies
/// take the loads of [`load`] (or any metric implementing this).
pub trait LoadValue: PartialOrd {
    /// The load as a non-negative number; lesser is less loaded.
    fn value(&self) -> f64;
}

impl LoadValue for f64 {
    fn value(&self) -> f64 {
        *self
    }
}

impl LoadValue for usize {
    fn value(&self) -> f64 {
        *self as f64
    }
}

impl LoadValue for u32 {
    fn value(&self) -> f64 {
        f64::from(*self)
    }
}

pub mod health;
pub mod load;
pub mod policy;
pub mod slow_start;

pub use self::policy::{Balancer, ConsistentHash, HashKey};

/// `tower::buffer::Buffer::new(service, bound)`, as an opaque `Clone + Send`
/// service whose future is `Send`: see the [module docs](self) for why.
pub fn buffered<S, Req>(
    service: S,
    bound: usize,
) -> impl tower::Service<Req, Response = S::Response, Error = crate::BoxError, Future: Send>
       + Clone
       + Send
       + 'static
where
    S: tower::Service<Req> + Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<crate::BoxError> + Send + Sync,
    S::Future: Send,
    Req: Send + 'static,
{
    tower::buffer::Buffer::new(service, bound)
}

mod endpoint;
pub use self::endpoint::{Connection, HttpEndpoint, HttpEndpointBuilder, HttpEndpointService};

mod wait;
pub use self::wait::{ReadyTimeout, ReadyTimeoutLayer};
