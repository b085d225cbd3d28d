//! Endpoint health: active health checks as a discovery adapter, and passive
//! outlier ejection through per-endpoint circuit breakers with a shared
//! ejection budget.
//!
//! # Example
//!
//! Probe each endpoint of a [`Static`](crate::discover::Static) source every
//! 5 s; an endpoint leaves the balancer after 3 failed probes in a row and
//! comes back after 2 good ones. Here the probe is a closure; [`HttpProbe`]
//! sends `GET <path>` instead.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::net::SocketAddr;
//! use std::time::Duration;
//! use tower::balance::p2c::Balance;
//! use tower::{service_fn, Service, ServiceExt};
//! use tower_scale::balance::health::{HealthCheckConfig, HealthChecked};
//! use tower_scale::balance::load::Pending;
//! use tower_scale::discover::{Endpoint, Static};
//!
//! let a: SocketAddr = "127.0.0.1:8081".parse().unwrap();
//! let make = |endpoint: &Endpoint| {
//!     let addr = endpoint.addr();
//!     Pending::new(service_fn(move |_: ()| async move { Ok::<_, tower::BoxError>(addr) }))
//! };
//! let (discover, _handle) = Static::new([a], make);
//!
//! let config = HealthCheckConfig::builder()
//!     .interval(Duration::from_secs(5))
//!     .timeout(Duration::from_secs(1))
//!     .unhealthy_threshold(3)
//!     .healthy_threshold(2)
//!     .panic_threshold(0.5)
//!     .name("backends")
//!     .build()
//!     .expect("valid health check settings");
//! // Any `Fn(SocketAddr) -> impl Future<Output = Result<(), E>>` is a probe.
//! let probe = |addr: SocketAddr| async move {
//!     tokio::net::TcpStream::connect(addr).await.map(drop)
//! };
//! let checked = HealthChecked::new(discover, probe, config);
//! let mut balance = Balance::new(checked);
//! // Endpoints start healthy (see `initially_healthy`): routed to at once.
//! assert_eq!(balance.ready().await.unwrap().call(()).await.unwrap(), a);
//! # }
//! ```
//!
//! # Active health checks
//!
//! [`HealthChecked`] wraps any [`Discover`](tower::discover::Discover) keyed by
//! `SocketAddr` and emits a `Remove` for an endpoint that turns unhealthy and
//! an `Insert` (a clone of the service it keeps, so clones must share the
//! endpoint's state, as our wrappers do) when it is healthy again. Each
//! endpoint is probed by a task of its own, spawned when the stream first sees
//! the endpoint (constructors spawn nothing) and aborted when the endpoint is
//! removed or the stream dropped. The first probe runs at once, then one every
//! `interval`; a probe not done within `timeout` fails.
//!
//! - **Thresholds.** `unhealthy_threshold` failed probes in a row make a
//!   healthy endpoint unhealthy; `healthy_threshold` good probes in a row bring
//!   it back. A result that agrees with the current state resets the streak.
//! - **Initial state.** New endpoints are healthy until proven otherwise (the
//!   default), so a new set serves at once and a brief probe outage on start-up
//!   does not empty the balancer. With `initially_healthy(false)` an endpoint
//!   joins only after `healthy_threshold` good probes.
//! - **Panic threshold.** When more than `panic_threshold` of the endpoints
//!   are unhealthy, every endpoint is routed to: a health check that fails
//!   everywhere at once is more often the checker's problem (or a shared
//!   dependency's) than every endpoint's, and the few left could not carry the
//!   load anyway. Panic mode ends, and the unhealthy ones leave again, when
//!   the share drops back to the threshold or below.
//! - **Never fails, never ends.** An error of the inner source is logged and
//!   skipped; if the inner source ends, the last set stays and probing goes on.
//!
//! # Passive outlier ejection
//!
//! [`OutlierEjection`] puts a [`CircuitBreaker`](crate::breaker::CircuitBreaker)
//! in not-ready mode in front of every endpoint of a source: while a breaker is
//! open, the endpoint's `poll_ready` is Pending and tower's `Balance` routes
//! around it, keeping it. All breakers share a [`MaxEjectedShare`] budget, so
//! at most a share of the current endpoints is ejected at once and an incident
//! across the cluster does not eject everyone. The breakers forward tower's
//! `Load` and the crate's [`Weight`](crate::discover::Weight).
//!
//! ```
//! use std::time::Duration;
//! use tower::service_fn;
//! use tower_scale::balance::health::OutlierEjection;
//! use tower_scale::balance::load::FailureAwareEwma;
//! use tower_scale::breaker::BreakerConfig;
//! use tower_scale::discover::{Endpoint, Static};
//!
//! let make = |endpoint: &Endpoint| {
//!     let addr = endpoint.addr();
//!     FailureAwareEwma::new(service_fn(move |_: ()| async move { Ok::<_, tower::BoxError>(addr) }))
//! };
//! let (discover, _handle) = Static::new(["127.0.0.1:8081".parse::<std::net::SocketAddr>().unwrap()], make);
//! let breaker = BreakerConfig::builder()
//!     .consecutive_failures(5)
//!     .open_duration(Duration::from_secs(30))
//!     .name("backends")
//!     .build()
//!     .unwrap();
//! // At most 20 % of the endpoints ejected at once.
//! let ejecting = OutlierEjection::new(breaker, 0.2).discover(discover);
//! // tower::balance::p2c::Balance::new(ejecting), or wrap it in `HealthChecked`.
//! # let _ = ejecting;
//! ```
//!
//! # Ordering
//!
//! `source → OutlierEjection → HealthChecked → balancer`: the breakers are made
//! once per endpoint, and a health re-insert hands the balancer a clone that
//! shares its breaker and its load.
//!
//! # Metrics
//!
//! - `tower_scale_endpoints{name, state="healthy"|"unhealthy"}` (gauges), and
//!   with [`OutlierEjection`], `tower_scale_endpoints{name, state="ejected"}`
//!   (the breakers' config name).
//! - `tower_scale_health_panic{name}`: 1 while in panic mode.
//! - The breakers' own metrics, named `<breaker name>/<endpoint>`, and
//!   `tower_scale_breaker_denied_total` for trips the budget refused.
//!
//! Every health change, panic mode entered or left, discovery error and probe
//! task start and stop is also a tracing event.

mod active;
mod eject;
mod probe;

pub use self::active::{HealthCheckConfig, HealthCheckConfigBuilder, HealthChecked};
pub use self::eject::{Ejecting, MaxEjectedShare, OutlierEjection};
pub use self::probe::{HttpProbe, Probe, ProbeFuture};

#[cfg(test)]
mod tests;
