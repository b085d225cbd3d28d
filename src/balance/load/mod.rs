//! Loads for power-of-two-choices: a failure-aware peak EWMA, and a count of
//! calls in flight that the weighted policies can read.
//!
//! tower's `Balance` compares the [`Load`](tower::load::Load) of two random
//! endpoints and sends the call to the lesser. tower's `PeakEwma` measures an
//! endpoint by a peak-sensitive moving average of its round-trip time, times
//! its calls in flight plus one; but it records every completion alike, so an
//! endpoint that fails in a millisecond looks like the fastest of all and gets
//! about half of the calls (every pair it is drawn into). [`FailureAwareEwma`]
//! keeps `PeakEwma`'s arithmetic, but a fast failure never makes an endpoint
//! look faster, and after a failure the endpoint costs at least a penalty
//! (1 s by default) for the penalty's length, times the failures in a row (at
//! most 8): P2C sends it nothing meanwhile, tries it again afterwards, and a
//! success clears the penalty at once, so a recovered endpoint takes its share
//! back within a penalty. An endpoint that answers 503 or 429 with
//! `Retry-After` costs at least the penalty until then.
//!
//! [`Pending`] is tower's `PendingRequests` with a readable metric
//! ([`PendingCount`]).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::net::SocketAddr;
//! use std::time::Duration;
//! use tower::balance::p2c::Balance;
//! use tower::{service_fn, Layer, Service, ServiceExt};
//! use tower_scale::balance::load::FailureAwareEwmaLayer;
//! use tower_scale::discover::{Endpoint, Static};
//!
//! let load = FailureAwareEwmaLayer::builder()
//!     .decay(Duration::from_secs(10))
//!     .failure_penalty(Duration::from_millis(500))
//!     .build()
//!     .expect("valid load settings");
//! // The endpoint factory wraps each new endpoint in its own load.
//! let make = move |endpoint: &Endpoint| {
//!     let addr = endpoint.addr();
//!     load.layer(service_fn(move |_: ()| async move { Ok::<_, tower::BoxError>(addr) }))
//! };
//! let a: SocketAddr = "127.0.0.1:8081".parse().unwrap();
//! let (discover, _handle) = Static::new([a], make);
//! let mut balance = Balance::new(discover);
//! assert_eq!(balance.ready().await.unwrap().call(()).await.unwrap(), a);
//! # }
//! ```
//!
//! For an HTTP client, classify by status with [`HttpFailures`]:
//! `FailureAwareEwmaLayer::new().classify(HttpFailures::new())` counts 5xx and
//! 429 as failures and honours `Retry-After` on 503 and 429.
//!
//! # Completion
//!
//! A call completes when its response (or error) arrives, as with tower's
//! `CompleteOnResponse`, not when an HTTP body ends: the estimate measures time
//! to first byte. A response future dropped before then still leaves the
//! in-flight count, and its elapsed time is recorded as a plain round trip (as
//! tower does), so an endpoint that never answers grows expensive.
//!
//! # Settings
//!
//! | setting | default | meaning |
//! |---|---|---|
//! | `default_rtt` | 30 ms | the estimate of a new endpoint |
//! | `decay` | 10 s | time constant: the estimate forgets a peak (a slow call) over a few times this |
//! | `failure_penalty` | 1 s | after a failure the endpoint costs at least this, for this long times the failures in a row (at most 8); keep it well above normal latency |
//! | `max_retry_after` | 30 s | the longest `Retry-After` honoured |
//!
//! With the defaults an endpoint that failed once costs, for a second, as much
//! as one that takes a second to answer; an endpoint that keeps failing is
//! tried about once per penalty window (1 s, then 2 s, ... up to 8 s), so it
//! costs a few failed calls a window, and one that recovered is back in
//! rotation at its first success. (An earlier design fed the penalty into the
//! moving average instead; a recovered endpoint then stayed shunned for tens
//! of seconds while the peak decayed.) Pair it with the passive ejection of
//! [`health`](super::health) to take an endpoint that keeps failing out of
//! rotation altogether.
//!
//! # Cost on the hot path
//!
//! Like `PeakEwma`: one uncontended mutex per `call` completion and per `load`
//! (the estimate and its timestamp change together), and an atomic in-flight
//! count, so clones share one endpoint's figures (tower's `PeakEwma` counts
//! `Arc` references instead and is not `Clone`).

mod classify;
mod ewma;
mod pending;

pub mod future;

pub use self::classify::{ClassifyLoad, HttpFailures, LoadOutcome};
pub use self::ewma::{Cost, FailureAwareEwma, FailureAwareEwmaBuilder, FailureAwareEwmaLayer};
pub use self::pending::{Pending, PendingCount, PendingLayer};

#[cfg(test)]
mod tests;
