//! Application health checks, readiness and liveness.
//!
//! [`HealthChecks`] is a registry of named checks (a database ping, a Redis
//! `PING`, a call to a dependency), each with a timeout and marked critical or
//! not. [`HealthChecks::spawn`] runs them in the background, every
//! [`interval`](HealthChecksBuilder::interval); the probes only read the last
//! results, so a probe never waits for a check, and a check that hangs is cut
//! by its timeout and reported as failed without blocking any endpoint.
//!
//! | endpoint | service | 200 | 503 |
//! |---|---|---|---|
//! | health | [`HealthChecks::health_service`] | status `pass` or `warn` | status `fail`: a critical check fails or has no result yet |
//! | readiness | [`HealthChecks::readiness_service`] | serving, and every critical check passed its last run | the [drain](crate::drain) has started, or a critical check fails or has no result yet |
//! | liveness | [`HealthChecks::liveness_service`] | always, while the process answers | never |
//!
//! Every answer is JSON (`content-type: application/json`,
//! `cache-control: no-store`). The services take any `http::Request<B>`, are
//! `Clone`, and never fail (`Error = Infallible`), so axum takes them with
//! `Router::route_service`; with feature `axum`, [`HealthReport`] and
//! [`Readiness`] are also `IntoResponse`, for handlers.
//!
//! # Example
//!
//! An axum router with the three probes, readiness following the drain
//! (feature `axum`):
//!
//! ```
//! # #[cfg(feature = "axum")]
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use axum::{body::Body, http::Request, routing::get, Router};
//! use tower::ServiceExt;
//! use tower_scale::drain::Drain;
//! use tower_scale::health::HealthChecks;
//!
//! let drain = Drain::new();
//! let checks = HealthChecks::builder()
//!     .interval(Duration::from_secs(5))
//!     .critical("database", Duration::from_secs(1), || async {
//!         // e.g. `sqlx::query("SELECT 1").execute(&pool).await`
//!         Ok::<_, std::io::Error>(())
//!     })
//!     .optional("cache", Duration::from_millis(500), || async {
//!         Err::<(), _>("connection refused")
//!     })
//!     .drain(&drain)
//!     .build()?;
//! checks.spawn(); // the first runs start now, then every 5 s
//!
//! let report = checks.clone();
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     // A handler returning the report, or the services:
//!     .route("/health", get(move || async move { report.report() }))
//!     .route_service("/ready", checks.readiness_service())
//!     .route_service("/live", checks.liveness_service());
//!
//! tokio::time::sleep(Duration::from_millis(1)).await; // let the first runs end
//! let get = |uri| Request::get(uri).body(Body::empty()).unwrap();
//! let health = app.clone().oneshot(get("/health")).await?;
//! assert_eq!(health.status(), 200); // "warn": only the cache fails
//! assert_eq!(app.clone().oneshot(get("/ready")).await?.status(), 200);
//!
//! drain.start(); // readiness goes down; health and liveness do not
//! assert_eq!(app.clone().oneshot(get("/ready")).await?.status(), 503);
//! assert_eq!(app.clone().oneshot(get("/live")).await?.status(), 200);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "axum"))]
//! # fn main() {}
//! ```
//!
//! Mount the probes where the admission stack does not wrap them (merge them
//! after `Router::layer`, see the [crate docs](crate#ordering-the-layers)),
//! so they keep answering while the API sheds load.
//!
//! # Running the checks
//!
//! [`spawn`](HealthChecks::spawn) starts one task per check (constructors spawn
//! none). Each runs its check at once, then every interval; a run is cut after
//! the check's timeout (`"timed out after 1s"`), and a check whose closure or
//! future panics is reported as failed (`"panicked: <message>"`) and runs again
//! at the next interval. A run that outlasts the interval delays that check's
//! next run to the following tick: runs of one check never overlap, and a slow
//! check never delays another. The tasks end by themselves once every clone of
//! the `HealthChecks` (and every service made from it) is dropped, or when
//! [`HealthTask::abort`] is called.
//!
//! A check counts from its last run alone: one failure makes a critical check
//! fail. Leave flap damping to the prober (Kubernetes' `failureThreshold`),
//! which sees the 503s.
//!
//! # Readiness before the first results
//!
//! A critical check that has not finished a run is `pending`, and counts as
//! failing: the health status is `fail` and readiness is down until every
//! critical check has passed once. An instance thus receives traffic only once
//! its dependencies answer. A non-critical pending check makes the status
//! `warn`.
//!
//! # Draining
//!
//! With [`HealthChecksBuilder::drain`], readiness answers 503 from the moment
//! [`Drain::start`](crate::drain::Drain::start) is called, so the load
//! balancer stops sending before refusals begin. The health report shows
//! `"draining": true`, but its status and status code follow the checks only:
//! a draining instance is not unhealthy, and liveness stays 200 until exit.
//!
//! # JSON
//!
//! Health ([`HealthReport`]), with the checks in the order they were
//! registered:
//!
//! ```json
//! {
//!   "status": "warn",
//!   "draining": false,
//!   "checks": {
//!     "database": {"status": "pass", "critical": true, "latency_ms": 1.2,
//!                  "last_error": null, "checked_ago_ms": 3012.5, "consecutive_failures": 0},
//!     "cache": {"status": "fail", "critical": false, "latency_ms": 500.0,
//!               "last_error": "timed out after 500ms", "checked_ago_ms": 2511.0, "consecutive_failures": 3}
//!   }
//! }
//! ```
//!
//! `status` is `pass`, `warn` (a non-critical check fails or is pending) or
//! `fail` (a critical check fails or is pending); a check's `status` is `pass`,
//! `fail` or `pending`, and its `latency_ms`, `checked_ago_ms` and
//! `last_error` are `null` until it has a result. `last_error` is the error of
//! the last run, with its `source()` chain, so it is `null` again once the check
//! recovers. Error texts reach whoever can read the endpoint: keep the health
//! route internal if they can hold secrets.
//!
//! Readiness ([`Readiness`]), with the critical checks that keep it down:
//!
//! ```json
//! {"ready": false, "draining": false, "failing": ["database"], "pending": []}
//! ```
//!
//! Liveness: `{"status":"pass"}`.
//!
//! # Metrics and events
//!
//! `tower_scale_health_check{name=<check>}`: 1 when the check's last run
//! passed, 0 when it failed (registered by [`HealthChecks::spawn`], so install
//! the recorder before). Tracing events when a check changes status: `warn`
//! when it starts failing (with the error), `info` when it recovers, `debug`
//! for its first pass and for further failures. A probe answered before
//! `spawn` was ever called logs one `warn`.

mod builder;
mod check;
mod report;
mod service;
mod shared;

#[cfg(feature = "axum")]
mod axum_impls;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio::time::Instant;

pub use self::builder::HealthChecksBuilder;
pub use self::report::{CheckReport, CheckStatus, HealthReport, Readiness, Status};
pub use self::service::{HealthService, LivenessService, ReadinessService};

use self::check::Standing;
use self::shared::Shared;

/// A registry of named health checks with their last results; clones share
/// the checks and their results.
///
/// Build it with [`HealthChecks::builder`], start the checks with
/// [`spawn`](Self::spawn), and answer probes with the services or with
/// [`report`](Self::report) and [`readiness`](Self::readiness). See the
/// [module docs](crate::health).
#[derive(Clone)]
pub struct HealthChecks {
    shared: Arc<Shared>,
}

impl HealthChecks {
    /// A builder with no checks, a 10 s interval and no drain.
    pub fn builder() -> HealthChecksBuilder {
        HealthChecksBuilder::new()
    }

    /// Starts running the checks in the background: each at once, then every
    /// interval. If they already run (from an earlier call), nothing new is
    /// started and the handle is on the running tasks; once those have ended
    /// (aborted, or their runtime shut down), a call starts them again.
    ///
    /// The returned handle can be dropped: the tasks end by themselves when
    /// every clone of these checks is gone.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn(&self) -> HealthTask {
        HealthTask {
            handle: self.shared.spawn(),
        }
    }

    /// The last result of every check. Cheap: it reads the stored results
    /// and never runs a check.
    pub fn report(&self) -> HealthReport {
        let now = Instant::now();
        let checks: Vec<CheckReport> = self
            .shared
            .checks
            .iter()
            .map(|check| {
                let state = check.state();
                let last = state.last.as_ref();
                CheckReport {
                    name: check.name.clone(),
                    status: match state.standing() {
                        Standing::Pending => CheckStatus::Pending,
                        Standing::Pass => CheckStatus::Pass,
                        Standing::Fail => CheckStatus::Fail,
                    },
                    critical: check.critical,
                    latency: last.map(|last| last.latency),
                    last_error: last.and_then(|last| last.error.clone()),
                    checked_ago: last.map(|last| now.saturating_duration_since(last.finished_at)),
                    consecutive_failures: state.consecutive_failures,
                }
            })
            .collect();
        let down = |critical: bool| {
            checks
                .iter()
                .any(|check| check.critical == critical && check.status != CheckStatus::Pass)
        };
        let status = if down(true) {
            Status::Fail
        } else if down(false) {
            Status::Warn
        } else {
            Status::Pass
        };
        HealthReport {
            status,
            draining: self.shared.is_draining(),
            checks,
        }
    }

    /// Whether the instance should receive traffic, with the critical checks
    /// that keep it from it.
    pub fn readiness(&self) -> Readiness {
        let mut failing = Vec::new();
        let mut pending = Vec::new();
        for check in self.shared.checks.iter().filter(|check| check.critical) {
            match check.state().standing() {
                Standing::Pass => {}
                Standing::Fail => failing.push(check.name.clone()),
                Standing::Pending => pending.push(check.name.clone()),
            }
        }
        Readiness {
            draining: self.shared.is_draining(),
            failing,
            pending,
        }
    }

    /// Whether the instance is ready: not draining, and every critical check
    /// has passed its last run (so false before their first results). Two
    /// atomic loads.
    pub fn is_ready(&self) -> bool {
        !self.shared.is_draining() && self.shared.critical_down() == 0
    }

    /// The overall status, as in the [`report`](Self::report), without
    /// building the report.
    pub fn status(&self) -> Status {
        if self.shared.critical_down() > 0 {
            Status::Fail
        } else if self.shared.optional_down() > 0 {
            Status::Warn
        } else {
            Status::Pass
        }
    }

    /// Whether the drain given to the builder has started.
    pub fn is_draining(&self) -> bool {
        self.shared.is_draining()
    }

    /// How often the checks run.
    pub fn interval(&self) -> Duration {
        self.shared.interval
    }

    /// The health endpoint as a Tower service: 503 when the status is
    /// `fail`, 200 otherwise, with the [`HealthReport`] as JSON.
    pub fn health_service(&self) -> HealthService {
        HealthService {
            checks: self.clone(),
        }
    }

    /// The readiness endpoint as a Tower service: 200 when
    /// [`is_ready`](Self::is_ready), 503 otherwise, with the [`Readiness`] as
    /// JSON.
    pub fn readiness_service(&self) -> ReadinessService {
        ReadinessService {
            checks: self.clone(),
        }
    }

    /// The liveness endpoint as a Tower service: always 200. It holds nothing
    /// of the checks.
    pub fn liveness_service(&self) -> LivenessService {
        LivenessService::new()
    }
}

impl fmt::Debug for HealthChecks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

/// The handle on the background tasks that run the checks; see
/// [`HealthChecks::spawn`]. Dropping it leaves them running.
#[derive(Clone, Debug)]
pub struct HealthTask {
    handle: AbortHandle,
}

impl HealthTask {
    /// Stops running the checks. Their last results stay in the reports.
    pub fn abort(&self) {
        self.handle.abort();
    }

    /// Whether the tasks have ended: aborted, every clone of the checks
    /// dropped, or their runtime shut down.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

#[cfg(test)]
mod tests;
