//! Composable [Tower] middleware that keeps a service fast and alive under load.
//!
//! A server that takes more work than it can do must answer "not now" to the
//! excess quickly and keep doing useful work at full speed for the rest, instead
//! of letting queues and latency grow until every client times out. The layers in
//! this crate do that, and each is usable on its own with
//! [`tower::ServiceBuilder`]:
//!
//! | module | layer | what it does |
//! |---|---|---|
//! | [`limit`] | [`ConcurrencyLimitLayer`](limit::ConcurrencyLimitLayer) | at most N calls in flight, one limit shared by every service the layer makes |
//! | [`queue`] | [`QueueLayer`](queue::QueueLayer) | a bounded admission queue with a timeout, FIFO, LIFO or adaptive LIFO |
//! | [`shed`] | [`LoadShedLayer`](shed::LoadShedLayer) | fail at once with [`Overloaded`](error::Overloaded) when the inner service is not ready |
//! | [`breaker`] | [`CircuitBreakerLayer`](breaker::CircuitBreakerLayer) | stop calling what keeps failing, probe it, close when it recovers; fail fast, or not-ready inside a balancer |
//! | [`drain`] | [`DrainLayer`](drain::DrainLayer) from a [`Drain`](drain::Drain) | graceful shutdown: readiness down, then refusals, then wait for every call in flight, within a deadline |
//! | `http` | `ErrorResponseLayer`, `SafeRetry` | turns every rejection into an HTTP response; retries on the client what was refused before any work (feature `http`) |
//! | `health` | `HealthChecks` | application checks in the background; health, readiness (follows the drain) and liveness services (feature `health`) |
//! | `discover` | `Static`, `Dns`, `Registry` | discovery sources for `tower::balance` that never fail and never end (features `balance`, `dns`, `registry`) |
//! | `balance` | `Balancer`, `ConsistentHash`, `HttpEndpoint`, `ReadyTimeoutLayer` | weighted P2C and other policies, a failure-aware load, health checks, ejection, slow start (feature `balance`) |
//! | `registry` | `RedisRegistry`, `MemoryRegistry`, `Heartbeat` | instances register with a TTL and heartbeat their load; watch the membership (features `registry`, `redis`) |
//! | `scale` | `LatencyLayer`, `ScaleMetrics`, `ScaleAdvisor`, `CapacityPlan` | latency percentiles over a sliding window, per-instance and cluster scale figures, an HPA-style replica advisor (feature `registry`) |
//!
//! # Example
//!
//! The admission stack for an axum router (feature `http`), outermost first:
//!
//! ```
//! # #[cfg(feature = "http")] {
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use tower_scale::{http::ErrorResponseLayer, limit::ConcurrencyLimitLayer, queue::QueueLayer, shed::LoadShedLayer};
//!
//! let admission = ServiceBuilder::new()
//!     .layer(ErrorResponseLayer::new())
//!     .layer(LoadShedLayer::new())
//!     .layer(QueueLayer::new(64, Duration::from_millis(500)))
//!     .layer(ConcurrencyLimitLayer::new(16));
//!
//! let app: axum::Router = axum::Router::new()
//!     .route("/api", axum::routing::get(|| async { "hello" }))
//!     .layer(admission);
//! # let _ = app;
//! # }
//! ```
//!
//! # Ordering the layers
//!
//! ```text
//!   request ─▶ ErrorResponse ─▶ Drain ─▶ LoadShed ─▶ Queue ─▶ CircuitBreaker ─▶ Timeout ─▶ ConcurrencyLimit ─▶ app
//!   response ◀─ 503 / 504 / 500 ◀─ Draining ◀─ Overloaded ◀─ QueueFull, QueueTimeout ◀─ CircuitOpen ◀─ Elapsed
//! ```
//!
//! - **The limit is innermost.** It decides how much work runs at once; it never
//!   rejects, it only makes callers wait in `poll_ready`.
//! - **The queue sits in front of the limit.** It bounds how many requests wait
//!   for a permit and for how long. A request that cannot be started within the
//!   queue timeout is answered with [`QueueTimeout`](error::QueueTimeout) and never
//!   reaches the application, so no work is spent on an answer nobody waits for.
//! - **The breaker sits between the queue and the limit**, over the timeout, so
//!   that timeouts count as failures and a request refused by an open breaker
//!   never takes a permit. While open it answers at once, which also drains the
//!   queue in front of it.
//! - **Shedding sits in front of the queue.** With the queue in
//!   [backpressure mode](queue::QueueLayer::backpressure) a full queue turns
//!   `poll_ready` Pending, and `LoadShed` turns that into an immediate
//!   [`Overloaded`](error::Overloaded); with the default mode the queue answers
//!   [`QueueFull`](error::QueueFull) itself and `LoadShed` simply passes calls on.
//! - **The drain sits just inside the error mapping.** It counts every call
//!   the server admitted, including those still waiting in the queue, so a
//!   shutdown waits for them; and once it refuses, a refused request takes no
//!   queue slot or permit.
//! - **Errors become responses outermost.** `ErrorResponseLayer` maps every
//!   rejection to a status code, so axum gets a service whose error is
//!   `Infallible` and no `HandleErrorLayer` is needed.
//! - **Probes and `/metrics` stay outside.** Health checks and scrapes must keep
//!   answering while the API is overloaded: put them on routes that the admission
//!   stack does not wrap (axum's `Router::route_layer`/`layer` apply only to
//!   routes added before the call; merge the probe routes afterwards).
//!
//! # Shared state
//!
//! axum applies route layers once per route, and again for every connection
//! unless the router's state was applied before serving. The state of every layer
//! here (the limit, the queue) belongs to the layer value: every service it makes,
//! and every clone of the layer, shares one limit and one queue. tower's own
//! `ConcurrencyLimitLayer` creates its semaphore in `Layer::layer` and therefore
//! limits each route, or each connection, separately.
//!
//! # Metrics
//!
//! Through the [`metrics`] facade, with a `name` label per layer (`.name("api")`,
//! default `"default"`): `tower_scale_in_flight`, `tower_scale_limit`,
//! `tower_scale_queue_depth`, `tower_scale_queue_wait_seconds` and
//! `tower_scale_rejected_total{reason}`. A layer registers its metric handles
//! once, when it first makes a service or a handle, so install the recorder (for
//! example `metrics-exporter-prometheus`) before building the router. Give each
//! layer its own name: two layers with one name add up their in-flight counts
//! but overwrite each other's limit and queue depth.
//!
//! [Tower]: https://docs.rs/tower
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, rust_2018_idioms, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod breaker;
pub mod drain;
pub mod error;
pub mod limit;
pub mod queue;
pub mod shed;

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod http;

#[cfg(feature = "health")]
#[cfg_attr(docsrs, doc(cfg(feature = "health")))]
pub mod health;

#[cfg(feature = "balance")]
#[cfg_attr(docsrs, doc(cfg(feature = "balance")))]
pub mod balance;

#[cfg(feature = "balance")]
#[cfg_attr(docsrs, doc(cfg(feature = "balance")))]
pub mod discover;

#[cfg(feature = "registry")]
#[cfg_attr(docsrs, doc(cfg(feature = "registry")))]
pub mod registry;

#[cfg(feature = "registry")]
#[cfg_attr(docsrs, doc(cfg(feature = "registry")))]
pub mod scale;

mod metrics_util;
mod wait_list;

#[cfg(test)]
mod test_support;

pub use error::BoxError;
