//! A circuit breaker: stop calling a dependency that keeps failing, probe it
//! after a while, and close again when it recovers.
//!
//! # Example: a server
//!
//! In front of an axum app (feature `http`), fail fast while the app keeps
//! answering 5xx: clients get 503 with `Retry-After` at once, and the app gets
//! room to recover.
//!
//! ```
//! # #[cfg(feature = "http")] {
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower::ServiceBuilder;
//! use tower_scale::breaker::{BreakerConfig, CircuitBreakerLayer, HttpStatus};
//! use tower_scale::http::ErrorResponseLayer;
//!
//! let config = BreakerConfig::builder()
//!     .failure_rate(0.5)
//!     .minimum_calls(20)
//!     .open_duration(Duration::from_secs(10))
//!     .name("api")
//!     .build()
//!     .expect("valid breaker settings");
//! let breaker = CircuitBreakerLayer::new(config).classify(HttpStatus::server_errors());
//! let handle = breaker.handle();
//!
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(ServiceBuilder::new().layer(ErrorResponseLayer::new()).layer(breaker));
//! assert_eq!(handle.state(), tower_scale::breaker::State::Closed);
//! # let _ = app;
//! # }
//! ```
//!
//! # Example: an endpoint inside a balancer
//!
//! In not-ready mode an open breaker makes `poll_ready` Pending, never an
//! error. tower's `Balance` drops an endpoint whose `poll_ready` fails, so a
//! breaker that errored would remove the endpoint for good; a Pending one only
//! makes power-of-two-choices pick another endpoint until the breaker lets
//! probes through.
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Layer};
//! use tower_scale::breaker::{BreakerConfig, CircuitBreakerLayer};
//!
//! let per_endpoint = |addr: &'static str| {
//!     let config = BreakerConfig::builder().name(addr).build().unwrap();
//!     CircuitBreakerLayer::new(config)
//!         .not_ready()
//!         .layer(service_fn(move |req: String| async move {
//!             Ok::<_, std::io::Error>(format!("{addr}: {req}"))
//!         }))
//! };
//! let endpoints = vec![per_endpoint("10.0.0.1:80"), per_endpoint("10.0.0.2:80")];
//! # let _ = endpoints;
//! // tower::balance::p2c::Balance::new(tower::discover::ServiceList::new(endpoints))
//! ```
//!
//! # States
//!
//! | state | admits | leaves when |
//! |---|---|---|
//! | `Closed` | everything; outcomes fill the window | the failure rate (or slow-call rate) over at least `minimum_calls` reaches its threshold, or `consecutive_failures` in a row → `Open` |
//! | `Open` | nothing (fail fast: [`CircuitOpen`] with `retry_after()`; not-ready: `poll_ready` Pending) | `open_duration` passes (a timer armed at the trip moves it, no request needed) → `HalfOpen` |
//! | `HalfOpen` | exactly `half_open_calls` probes at once; others are refused or wait | all probes have answered: failure rate below the threshold → `Closed`, else `Open` again, for a backed-off duration |
//! | `ForcedOpen` | nothing, until [`BreakerHandle::reset`] | by hand only |
//! | `Disabled` | everything; outcomes ignored | by hand only |
//!
//! A call that started in one state and ends in another is not counted, and a
//! call whose future is dropped is not counted at all (a dropped probe gives its
//! place back).
//!
//! In not-ready mode the admission is taken in `poll_ready` and checked again at
//! every later `poll_ready` (tower's balancer re-polls just before dispatch),
//! so a service that was ready before a trip is Pending after it. In HalfOpen a
//! ready service holds a probe place until it is called or dropped: a service
//! kept ready but never called (never picked by the balancer) keeps HalfOpen
//! from judging, so let idle endpoints go or keep `half_open_calls` above the
//! number of idle clones. A parked service is woken when the open duration
//! ends, by the breaker's timer or by one of its own on the runtime that polls
//! it.
//!
//! # Settings
//!
//! | setting | default | resilience4j | how to choose |
//! |---|---|---|---|
//! | `failure_rate` | 0.5 | `failureRateThreshold` (50%) | the error rate at which calling on does more harm than good |
//! | `slow_calls(duration, rate)` | off | `slowCallDurationThreshold` (60 s), `slowCallRateThreshold` (100%) | a duration well above the dependency's p99, a rate that means it is saturated |
//! | `consecutive_failures` | off | (none) | trips fast on a dependency that is down, before the window fills |
//! | `window` | `Count(100)` | `slidingWindowType`, `slidingWindowSize` (count, 100) | a count window for steady traffic, a time window (`Window::time(60 s)`) when traffic varies |
//! | `minimum_calls` | 20 | `minimumNumberOfCalls` (100) | enough calls that one bad request does not open it |
//! | `open_duration` | 30 s | `waitDurationInOpenState` (60 s) | about the time the dependency needs to recover |
//! | `backoff` | off | `enableExponentialBackoff`, `exponentialBackoffMultiplier`, `exponentialMaxWaitDurationInOpenState`, `randomizedWaitFactor` | on for dependencies that stay down for long, with jitter so clients do not probe in step |
//! | `half_open_calls` | 5 | `permittedNumberOfCallsInHalfOpenState` (10) | enough probes to judge recovery, few enough not to knock it over again |
//!
//! # Classification
//!
//! A [`Classify`] decides Success / Failure / Ignored. Provided:
//! [`ErrorsAreFailures`] (the default), [`ClassifyFn`] (a closure), and with
//! feature `http`, [`HttpStatus`] (5xx and errors are failures, 4xx successes,
//! configurable; decided on the status, without touching the body) and
//! [`GrpcStatus`] (UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED, UNKNOWN and
//! RESOURCE_EXHAUSTED are failures, configurable by number, or with feature
//! `tonic` by `tonic::Code`; decided from the headers of a Trailers-Only
//! response, else at the end of the body where the status travels in
//! trailers). The gRPC classifier needs only the `grpc-status` header, so it
//! lives under `http` and works for any gRPC stack, tonic or not.
//!
//! # Metrics
//!
//! - `tower_scale_breaker_state{name}` (gauge: 0 closed, 1 open, 2 half open,
//!   3 forced open, 4 disabled).
//! - `tower_scale_breaker_transitions_total{name, from, to}`.
//! - `tower_scale_breaker_calls_total{name, outcome="success"|"failure"|"ignored"}`.
//! - `tower_scale_rejected_total{name, reason="circuit_open"}` (fail-fast mode).
//! - `tower_scale_breaker_denied_total{name}`: trips the ejection budget denied.
//!
//! Each transition is also a tracing event with the reason (the rate and the
//! window it was judged over).

mod classify;
mod config;
mod layer;
mod machine;
mod service;
mod window;

#[cfg(feature = "http")]
mod http;

pub mod future;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

pub use self::classify::{Classify, ClassifyFn, ErrorsAreFailures};
pub use self::config::{Backoff, BreakerConfig, BreakerConfigBuilder, Window};
pub use self::layer::CircuitBreakerLayer;
pub use self::machine::Call;
pub use self::service::CircuitBreaker;
pub use crate::error::CircuitOpen;

#[cfg(feature = "http")]
pub use self::http::{GrpcBody, GrpcStatus, HttpStatus};

use self::machine::Breaker;

/// The state of a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum State {
    /// Admits every call and watches the outcomes.
    Closed = 0,
    /// Admits nothing until the open duration passes.
    Open = 1,
    /// Admits a limited number of probes.
    HalfOpen = 2,
    /// Admits nothing, set by hand.
    ForcedOpen = 3,
    /// Admits everything and watches nothing, set by hand.
    Disabled = 4,
}

impl State {
    /// The lower-case name used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
        }
    }
}

/// How a call went, for the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Outcome {
    /// It worked.
    Success = 0,
    /// It failed: counts toward opening.
    Failure = 1,
    /// It tells nothing about the service's health (a 4xx, a cancellation).
    Ignored = 2,
}

/// A budget shared by a group of breakers, asked before one opens: the
/// balancer's max-ejection percentage uses it so that breakers never eject
/// every endpoint at once.
pub trait EjectionBudget: Send + Sync + 'static {
    /// Whether one more breaker may open; if true, it holds a share until
    /// [`release`](Self::release).
    fn try_open(&self) -> bool;

    /// A breaker that held a share closed (or was reset or disabled).
    fn release(&self);

    /// A breaker sharing this budget was made (default: nothing), so a
    /// budget that is a share of the group knows the group's size.
    fn joined(&self) {}

    /// A breaker sharing this budget was dropped (default: nothing).
    fn left(&self) {}
}

/// An [`EjectionBudget`] that lets at most `max` breakers of a group be open at
/// once.
#[derive(Debug)]
pub struct MaxOpen {
    max: usize,
    open: AtomicUsize,
}

impl MaxOpen {
    /// At most `max` breakers open at once.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(MaxOpen {
            max,
            open: AtomicUsize::new(0),
        })
    }

    /// Breakers of the group open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl EjectionBudget for MaxOpen {
    fn try_open(&self) -> bool {
        self.open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        let _ = self
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }
}

/// Reads and steers a breaker at run time.
///
/// Got from [`CircuitBreakerLayer::handle`] or [`CircuitBreaker::handle`].
#[derive(Clone)]
pub struct BreakerHandle {
    breaker: Arc<Breaker>,
}

impl BreakerHandle {
    fn new(breaker: Arc<Breaker>) -> Self {
        BreakerHandle { breaker }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.breaker.state()
    }

    /// A receiver that sees every transition.
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.breaker.subscribe()
    }

    /// Opens the breaker until [`reset`](Self::reset), whatever the outcomes.
    pub fn force_open(&self) {
        self.breaker.set(State::ForcedOpen, "forced open by hand");
    }

    /// Admits everything and records nothing until [`reset`](Self::reset)
    /// (resilience4j's disabled state; a forced close).
    pub fn disable(&self) {
        self.breaker.set(State::Disabled, "disabled by hand");
    }

    /// Back to Closed with an empty window.
    pub fn reset(&self) {
        self.breaker.set(State::Closed, "reset by hand");
    }

    /// The failure rate over the current window (0 when it is empty).
    pub fn failure_rate(&self) -> f64 {
        self.breaker.totals().failure_rate()
    }

    /// Calls in the current window.
    pub fn calls_in_window(&self) -> u32 {
        self.breaker.totals().calls
    }

    /// Trips the ejection budget has denied so far.
    pub fn denials(&self) -> u64 {
        self.breaker.denials()
    }

    /// The `name` label of the breaker's metrics.
    pub fn name(&self) -> &str {
        self.breaker.config.name()
    }
}

impl fmt::Debug for BreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BreakerHandle").field(&self.breaker).finish()
    }
}

#[cfg(test)]
mod tests;
