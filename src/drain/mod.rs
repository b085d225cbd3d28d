//! Graceful drain: tell the load balancer, stop taking new work, finish what was
//! accepted, then exit within a deadline.
//!
//! A [`Drain`] is the handle; [`Drain::layer`] makes a [`DrainLayer`] that
//! counts every call in flight through the services it wraps (clones of the
//! handle and of the layer share one count). A drain goes through three phases:
//!
//! 1. **Serving.** Every call is admitted; [`Drain::is_draining`] is false.
//! 2. **Started** ([`Drain::start`], or [`Drain::drain`]). Readiness turns to 503
//!    (the `health` readiness probe follows [`Drain::is_draining`]) while new
//!    calls are still admitted, for
//!    [`readiness_delay`](DrainBuilder::readiness_delay) (default 0): long enough for
//!    the load balancer to see the failed probe and stop sending. With
//!    [`DrainLayer::release_on_body_end`], every HTTP/1.x response from now on
//!    carries `Connection: close`, so keep-alive clients (a proxy's connection
//!    pool, kube-proxy's per-connection routing) reconnect elsewhere before
//!    refusals begin, the way Envoy's gradual drain does.
//! 3. **Refusing.** New calls fail with [`Draining`] without reaching the inner
//!    service (the `http` mapping answers 503 with the
//!    `tower-scale-rejected: draining` marker, and `Connection: close` on
//!    HTTP/1.x), and [`Drain::signaled`] resolves, so the server stops
//!    accepting connections at the moment refusals begin.
//!
//! [`Drain::drain`] starts the drain if needed and resolves when nothing is in
//! flight any more, or when its timeout passes, with a [`DrainReport`]. Calls
//! are counted until their response future ends (completes, fails, panics or
//! is dropped), or, with [`DrainLayer::release_on_body_end`] (feature `http`),
//! until the HTTP response body ends, so a streaming response is not cut off by
//! the exit. `poll_ready` adds no waiting of its own (it is the inner
//! service's until refusals begin, then always Ready without asking the inner
//! service); refusals happen in `call`. Put the drain outside the layers
//! that wait in `poll_ready` (the recommended stack has `LoadShed` just inside
//! it), so that a caller is never left waiting in an inner `poll_ready` when
//! refusals begin.
//!
//! # Example
//!
//! An axum server that drains on SIGTERM or Ctrl-C (feature `http`):
//!
//! ```no_run
//! # #[cfg(feature = "http")]
//! # async fn run() -> std::io::Result<()> {
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower::ServiceBuilder;
//! use tower_scale::drain::{shutdown_signal, Drain};
//! use tower_scale::http::ErrorResponseLayer;
//!
//! let drain = Drain::builder().readiness_delay(Duration::from_secs(5)).build();
//! let app = Router::new().route("/", get(|| async { "hello" })).layer(
//!     ServiceBuilder::new()
//!         .layer(ErrorResponseLayer::new())
//!         .layer(drain.layer().release_on_body_end()),
//! );
//!
//! // On SIGTERM: start the drain (readiness down, then refusals after 5 s).
//! let on_signal = drain.clone();
//! tokio::spawn(async move {
//!     shutdown_signal().await;
//!     on_signal.start();
//! });
//!
//! // axum stops accepting when refusals begin, and its serve future ends when
//! // every connection has closed. It has no deadline of its own: race it
//! // against the drain's.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! let serve = axum::serve(listener, app).with_graceful_shutdown(drain.signaled());
//! let server = tokio::spawn(async move { serve.await });
//! drain.signaled().await;
//! let report = drain.drain(Duration::from_secs(30)).await;
//! println!("{report}");
//! if report.is_complete() {
//!     // Every admitted call finished; give the server a moment to close
//!     // its connections, but never wait past the deadline.
//!     let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # With tonic
//!
//! tonic's `Server::layer` wraps every service, the health service included,
//! so route the health service around the drain (see `tests/lifecycle/grpc.rs`
//! for a path-based bypass) or accept that probes are refused once refusals
//! begin. Use `.release_on_body_end()` (the gRPC status travels in trailers,
//! and a streaming response ends with its body), pass [`Drain::signaled`] to
//! `serve_with_shutdown`, and with feature `tonic` let
//! [`Drain::report_to_tonic_health`] set the `tonic-health` reporter to
//! `NOT_SERVING` when the drain starts: it only ever sets `NOT_SERVING`, so set
//! your services `SERVING` yourself at startup (a service the reporter has
//! never heard of answers `NOT_FOUND`). Until the gRPC mapping lands, a call
//! refused with [`Draining`] reaches tonic as a plain service error, which
//! hyper turns into a stream reset (`INTERNAL` on the client), not
//! `UNAVAILABLE`; it still never reaches the handler.
//!
//! # Metrics and events
//!
//! With the drain's `name` label (default `"default"`): `tower_scale_draining`
//! (0 or 1), `tower_scale_drain_in_flight` (the calls the drain waits for; a
//! name of its own so that it does not add up with the concurrency limit's
//! `tower_scale_in_flight`) and `tower_scale_rejected_total{reason="draining"}`.
//! Tracing events at `info` when the drain starts and when refusals begin, and
//! at the end of [`Drain::drain`] with the report (`warn` when calls were still
//! in flight at the timeout).

mod layer;
mod service;
mod shared;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

pub use self::layer::DrainLayer;
pub use self::service::{ConnectionPolicy, DrainService, InFlight, ResponseFuture};
pub use crate::error::Draining;
#[cfg(feature = "http")]
pub use crate::limit::OnBodyEnd;
pub use crate::limit::{OnResponse, ReleasePolicy};

use self::shared::{Shared, REFUSING, SERVING};
use crate::metrics_util::DEFAULT_NAME;

/// The handle on one drain: start it, wait for it, read its figures, and make
/// the layers that count calls for it. Clones share the drain.
///
/// See the [module docs](crate::drain).
#[derive(Clone)]
pub struct Drain {
    shared: Arc<Shared>,
}

impl Drain {
    /// A drain with no readiness delay and the metrics name `"default"`.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder, to set the readiness delay and the metrics name.
    pub fn builder() -> DrainBuilder {
        DrainBuilder {
            readiness_delay: Duration::ZERO,
            name: DEFAULT_NAME.to_owned(),
        }
    }

    /// A layer whose services count their calls for this drain and refuse new
    /// ones once refusals have begun.
    pub fn layer(&self) -> DrainLayer {
        self.shared.register();
        DrainLayer::new(self.shared.clone())
    }

    /// Starts the drain: readiness goes down now, and refusals begin after the
    /// readiness delay. Starting a drain that has started does nothing; returns
    /// whether this call started it.
    pub fn start(&self) -> bool {
        self.shared.start()
    }

    /// Starts the drain if needed and begins refusals now, cutting the
    /// readiness delay short (for an operator who knows the load balancer has
    /// already moved away, or a test).
    pub fn refuse(&self) {
        self.shared.start();
        self.shared.refuse_now();
    }

    /// Starts the drain now if needed, then waits until no call is in flight,
    /// or until `timeout` has passed since this call (`Duration::MAX` waits
    /// without a deadline).
    ///
    /// The wait includes the readiness delay: calls are still admitted until it
    /// ends, so the drain is not complete before then, and a timeout shorter
    /// than the delay cuts the delay short. Once a drain has completed, another
    /// call returns at once. The future owns what it needs (`Send + 'static`).
    pub fn drain(&self, timeout: Duration) -> impl Future<Output = DrainReport> + Send + 'static {
        let shared = self.shared.clone();
        let deadline = deadline_after(timeout);
        shared.start();
        async move {
            if shared.phase() != REFUSING {
                let until = shared.refuse_at().map_or(deadline, |at| at.min(deadline));
                let delay = std::pin::pin!(tokio::time::sleep_until(until));
                let refusing = std::pin::pin!(shared.wait_until(|s| s.phase() == REFUSING));
                first(delay, refusing).await;
            }
            shared.refuse_now();
            let idle = shared.wait_until(|shared| shared.in_flight() == 0);
            let finished = tokio::time::timeout_at(deadline, idle).await.is_ok();
            let report = DrainReport {
                completed: shared.completed(),
                in_flight: if finished { 0 } else { shared.in_flight() },
                refused: shared.refused(),
                elapsed: shared
                    .started_at()
                    .map_or(Duration::ZERO, |at| at.elapsed()),
            };
            if report.is_complete() {
                tracing::info!(name = %shared.name, %report, "drain complete");
            } else {
                tracing::warn!(name = %shared.name, %report, "drain timed out with calls in flight");
            }
            report
        }
    }

    /// A future that resolves when refusals begin: pass it to
    /// `axum::serve(..).with_graceful_shutdown(..)` or tonic's
    /// `serve_with_shutdown`, so the server stops accepting connections exactly
    /// when new calls start being refused. It does not start the drain.
    pub fn signaled(&self) -> Signal {
        let shared = self.shared.clone();
        Signal::new(async move {
            shared.wait_until(|shared| shared.phase() != SERVING).await;
            let refusing = std::pin::pin!(shared.wait_until(|s| s.phase() == REFUSING));
            match shared.refuse_at() {
                // The delay ends, or `refuse` or a drain's timeout cuts it short.
                Some(at) => first(std::pin::pin!(tokio::time::sleep_until(at)), refusing).await,
                None => refusing.await,
            }
            shared.refuse_if_due();
        })
    }

    /// A future that resolves when the drain starts (readiness goes down).
    pub fn started(&self) -> Signal {
        let shared = self.shared.clone();
        Signal::new(async move {
            shared.wait_until(|shared| shared.phase() != SERVING).await;
        })
    }

    /// The readiness delay.
    pub fn readiness_delay(&self) -> Duration {
        self.shared.readiness_delay
    }

    /// The `name` label of the drain's metrics.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Whether the drain has started: readiness should report 503.
    pub fn is_draining(&self) -> bool {
        self.shared.phase() != SERVING
    }

    /// Whether new calls are being refused.
    pub fn is_refusing(&self) -> bool {
        self.shared.refuse_if_due()
    }

    /// The calls in flight through this drain's layers.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    /// Sets the overall status (the service `""`) and each of `services` of a
    /// `tonic-health` reporter to `NOT_SERVING` when the drain starts, so gRPC
    /// load balancers and health probes see it before refusals begin.
    ///
    /// This spawns a task that waits for the drain to start; the handle lets
    /// you abort it.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    #[cfg(feature = "tonic")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
    pub fn report_to_tonic_health<I>(
        &self,
        reporter: tonic_health::server::HealthReporter,
        services: I,
    ) -> tokio::task::JoinHandle<()>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let mut names: Vec<String> = vec![String::new()];
        names.extend(services.into_iter().map(Into::into));
        let started = self.started();
        let name = self.shared.name.clone();
        tokio::spawn(async move {
            started.await;
            for service in &names {
                reporter
                    .set_service_status(service, tonic_health::ServingStatus::NotServing)
                    .await;
            }
            tracing::info!(name = %name, services = ?names, "gRPC health set to NOT_SERVING");
        })
    }
}

/// Builds a [`Drain`]; see [`Drain::builder`].
#[derive(Clone, Debug)]
pub struct DrainBuilder {
    readiness_delay: Duration,
    name: String,
}

impl DrainBuilder {
    /// How long readiness reports 503 before refusals begin (default 0): at
    /// least the load balancer's probe interval times its failure threshold,
    /// so that it stops sending before the instance stops accepting.
    pub fn readiness_delay(mut self, delay: Duration) -> Self {
        self.readiness_delay = delay;
        self
    }

    /// The `name` label of the drain's metrics (default `"default"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The drain. Every setting is valid (a delay too long to add to the clock
    /// means refusals begin only through [`Drain::refuse`] or a drain's
    /// timeout), so this cannot fail.
    pub fn build(self) -> Drain {
        Drain {
            shared: Shared::new(self.name, self.readiness_delay),
        }
    }
}

/// `timeout` from now, or a far future when that overflows the clock.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Drain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

/// What a drain did: the calls that finished while it ran, those still in
/// flight when its timeout passed, and how long it took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainReport {
    completed: u64,
    in_flight: usize,
    refused: u64,
    elapsed: Duration,
}

impl DrainReport {
    /// The calls that ended after the drain started (completed, failed,
    /// panicked or dropped by their caller), including those admitted during
    /// the readiness delay.
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// The calls still in flight when the timeout passed (0 when the drain
    /// completed): the work the exit abandons.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The calls refused with [`Draining`].
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// The time from the start of the drain to this report.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Whether every admitted call finished before the timeout.
    pub fn is_complete(&self) -> bool {
        self.in_flight == 0
    }
}

impl fmt::Display for DrainReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "drained in {:?}: {} completed, {} still in flight, {} refused",
            self.elapsed, self.completed, self.in_flight, self.refused
        )
    }
}

/// A future that resolves when a drain reaches a phase; see
/// [`Drain::signaled`] and [`Drain::started`]. `Send + 'static`.
pub struct Signal {
    inner: Pin<Box<dyn Future<Output = ()> + Send + 'static>>,
}

impl Signal {
    fn new(fut: impl Future<Output = ()> + Send + 'static) -> Self {
        Signal {
            inner: Box::pin(fut),
        }
    }
}

impl Future for Signal {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signal").finish_non_exhaustive()
    }
}

/// Resolves when either future does.
async fn first<A, B>(mut a: Pin<&mut A>, mut b: Pin<&mut B>)
where
    A: Future<Output = ()>,
    B: Future<Output = ()>,
{
    std::future::poll_fn(|cx| {
        if a.as_mut().poll(cx).is_ready() || b.as_mut().poll(cx).is_ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Resolves when the process receives SIGTERM (what Kubernetes, systemd and
/// `docker stop` send) or Ctrl-C (SIGINT); Ctrl-C alone where SIGTERM does not
/// exist. If a handler cannot be installed, the failure is logged and the other
/// signal still works.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    first(std::pin::pin!(ctrl_c), std::pin::pin!(terminate)).await;
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests;
