//! The probe endpoints as plain Tower services.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use tower::Service;

use super::report::{json_response, LIVE};
use super::HealthChecks;

/// The health endpoint: the [`HealthReport`](super::HealthReport) as JSON, 503
/// when a critical check fails or has no result yet, 200 otherwise.
///
/// Made by [`HealthChecks::health_service`]; takes any `http::Request<B>`,
/// never fails, and reads the stored results without running a check. See the
/// [module docs](super).
#[derive(Clone, Debug)]
pub struct HealthService {
    pub(crate) checks: HealthChecks,
}

impl<B> Service<Request<B>> for HealthService {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        self.checks.shared.warn_if_unspawned();
        ready(Ok(self.checks.report().to_response()))
    }
}

/// The readiness endpoint: 200 while serving, 503 once the drain has started,
/// while a critical check fails, and before every critical check has passed
/// once; the [`Readiness`](super::Readiness) as JSON.
///
/// Made by [`HealthChecks::readiness_service`]; takes any `http::Request<B>`
/// and never fails. See the [module docs](super).
#[derive(Clone, Debug)]
pub struct ReadinessService {
    pub(crate) checks: HealthChecks,
}

impl<B> Service<Request<B>> for ReadinessService {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        self.checks.shared.warn_if_unspawned();
        ready(Ok(self.checks.readiness().to_response()))
    }
}

/// The liveness endpoint: 200 with `{"status":"pass"}` for as long as the
/// process answers, whatever the checks and the drain say (a failing
/// dependency is no reason to restart this process).
///
/// Made by [`HealthChecks::liveness_service`] or [`LivenessService::new`];
/// takes any `http::Request<B>` and never fails.
#[derive(Clone, Copy, Debug, Default)]
pub struct LivenessService {
    _p: (),
}

impl LivenessService {
    /// A liveness service.
    pub const fn new() -> Self {
        LivenessService { _p: () }
    }
}

impl<B> Service<Request<B>> for LivenessService {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        ready(Ok(json_response(StatusCode::OK, LIVE.to_owned())))
    }
}
