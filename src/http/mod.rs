//! HTTP glue: every rejection becomes a response, permits can ride in the
//! response body, and clients retry what was refused before any work started
//! ([`SafeRetry`]).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower::ServiceBuilder;
//! use tower_scale::http::ErrorResponseLayer;
//! use tower_scale::{limit::ConcurrencyLimitLayer, queue::QueueLayer, shed::LoadShedLayer};
//!
//! let api = Router::new()
//!     .route("/work", get(|| async { "done" }))
//!     .layer(
//!         ServiceBuilder::new()
//!             .layer(ErrorResponseLayer::new())
//!             .layer(LoadShedLayer::new())
//!             .layer(QueueLayer::new(64, Duration::from_millis(250)))
//!             .layer(ConcurrencyLimitLayer::new(32)),
//!     );
//! // Probes merged after `layer` stay outside the admission stack.
//! let app: Router = api.merge(Router::new().route("/health", get(|| async { "ok" })));
//! # let _ = app;
//! ```
//!
//! # Mapping
//!
//! | error (anywhere in the `source()` chain) | status | headers |
//! |---|---|---|
//! | [`Overloaded`], [`QueueFull`], [`QueueTimeout`], [`NoEndpoints`] | 503 Service Unavailable | `Retry-After`, `tower-scale-rejected: <reason>` |
//! | [`CircuitOpen`] | 503 Service Unavailable | `Retry-After` from [`CircuitOpen::retry_after`] (the layer's setting when unknown), `tower-scale-rejected: circuit_open` |
//! | [`Draining`] | 503 Service Unavailable | `tower-scale-rejected: draining`, and `Connection: close` on HTTP/1.x; no `Retry-After` |
//! | tower's `timeout::error::Elapsed` | 504 Gateway Timeout | |
//! | anything else | 500 Internal Server Error | |
//!
//! The marker header [`REJECTED_HEADER`] says the request was refused before any
//! work started, so a client may retry it even if it is not idempotent. It is
//! set only when the error itself is one of the refusals (what the layers in
//! front of the application return), not when a refusal is found deeper in the
//! `source()` chain: an application that wraps the refusal it got from a
//! service it called may have done work first, so its error gets the same
//! status without the marker. An application must not return such a refusal
//! unwrapped as its own error (map it, for example with `map_err` into an
//! error of its own): the layer cannot tell it from one made in front of the
//! application.
//! A draining instance is going away: its 503 carries no `Retry-After` (retry
//! on another instance at once) and, on HTTP/1.x, `Connection: close`, so
//! keep-alive clients reconnect (through the load balancer) instead of sending
//! the next request to the same instance. HTTP/2 has no such header (hyper
//! strips it and warns); there the server's GOAWAY, sent when
//! [`Drain::signaled`](crate::drain::Drain::signaled) resolves and the server
//! shuts down gracefully, does the same.
//! `Retry-After` is whole seconds, rounded up, at least 1 (default 1 s; see
//! [`ErrorResponseLayer::retry_after`]). The body of a mapped error is empty, and
//! the text of an unknown error is logged (at `error` level) but not sent to the
//! client unless [`ErrorResponseLayer::expose_errors`] says so (then it is the
//! body of the 500, as plain text).
//!
//! The service's error type is `Infallible`, so axum takes it without a
//! `HandleErrorLayer`, and the response body is a [`ResponseBody`] around the
//! inner body: no boxing.

mod body;
mod retry;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{header, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

pub use self::body::{GuardBody, ResponseBody};
#[cfg(feature = "balance")]
pub(crate) use self::retry::retry_after;
pub use self::retry::{RetrySafe, SafeRetry, SafeRetryBuilder};

use crate::error::{
    BoxError, CircuitOpen, Draining, NoEndpoints, Overloaded, QueueFull, QueueTimeout,
};

/// The header that marks a response refused before any work started; its value
/// is the reason (`overloaded`, `queue_full`, `queue_timeout`, `circuit_open`,
/// `draining`, `no_endpoints`).
pub const REJECTED_HEADER: HeaderName = HeaderName::from_static("tower-scale-rejected");

/// What an error means for the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// Refused before any work started (503, with `Retry-After` and the marker
    /// header); the value is the reason label.
    Refused(&'static str),
    /// tower's timeout elapsed (504).
    Timeout,
    /// Anything else (500).
    Internal,
}

impl Rejection {
    /// Classifies `err` by looking through its `source()` chain for the
    /// rejection types of this crate and tower's `Elapsed`.
    pub fn of(err: &(dyn StdError + 'static)) -> Self {
        let mut current = Some(err);
        while let Some(err) = current {
            if err.is::<Overloaded>() {
                return Rejection::Refused("overloaded");
            }
            if err.is::<QueueFull>() {
                return Rejection::Refused("queue_full");
            }
            if err.is::<QueueTimeout>() {
                return Rejection::Refused("queue_timeout");
            }
            if err.is::<CircuitOpen>() {
                return Rejection::Refused("circuit_open");
            }
            if err.is::<Draining>() {
                return Rejection::Refused("draining");
            }
            if err.is::<NoEndpoints>() {
                return Rejection::Refused("no_endpoints");
            }
            if err.is::<tower::timeout::error::Elapsed>() {
                return Rejection::Timeout;
            }
            current = err.source();
        }
        Rejection::Internal
    }

    /// Whether `err` itself, not an error in its `source()` chain, is one of
    /// this crate's refusals: only then was it made by a layer in front of
    /// the application, before any work. An application error that wraps a
    /// refusal it got from a service it called is answered with the same
    /// status, but without the marker header.
    pub fn is_refusal_itself(err: &(dyn StdError + 'static)) -> bool {
        err.is::<Overloaded>()
            || err.is::<QueueFull>()
            || err.is::<QueueTimeout>()
            || err.is::<CircuitOpen>()
            || err.is::<Draining>()
            || err.is::<NoEndpoints>()
    }

    /// The status code this rejection is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Rejection::Refused(_) => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Rejection::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Turns every error of the inner service into a response; see the
/// [module docs](crate::http).
#[derive(Clone, Debug)]
pub struct ErrorResponseLayer {
    config: Arc<Config>,
}

#[derive(Debug)]
struct Config {
    retry_after: HeaderValue,
    expose_errors: bool,
}

impl ErrorResponseLayer {
    /// A layer with `Retry-After: 1` and unknown errors hidden from clients.
    pub fn new() -> Self {
        ErrorResponseLayer {
            config: Arc::new(Config {
                retry_after: retry_after_value(Duration::from_secs(1)),
                expose_errors: false,
            }),
        }
    }

    /// Sets the `Retry-After` of 503 responses: whole seconds, rounded up, at
    /// least 1.
    pub fn retry_after(self, after: Duration) -> Self {
        ErrorResponseLayer {
            config: Arc::new(Config {
                retry_after: retry_after_value(after),
                expose_errors: self.config.expose_errors,
            }),
        }
    }

    /// Sends the text of unknown errors in the body of 500 responses. Off by
    /// default: error texts can leak internals.
    pub fn expose_errors(self, expose: bool) -> Self {
        ErrorResponseLayer {
            config: Arc::new(Config {
                retry_after: self.config.retry_after.clone(),
                expose_errors: expose,
            }),
        }
    }
}

impl Default for ErrorResponseLayer {
    fn default() -> Self {
        Self::new()
    }
}

/// The first error of type `T` in `err`'s `source()` chain.
fn find<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// Whole seconds, rounded up, at least 1.
fn retry_after_value(after: Duration) -> HeaderValue {
    let mut secs = after.as_secs();
    if after.subsec_nanos() > 0 {
        secs = secs.saturating_add(1);
    }
    HeaderValue::from(secs.max(1))
}

impl<S> Layer<S> for ErrorResponseLayer {
    type Service = ErrorResponse<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ErrorResponse {
            inner,
            config: self.config.clone(),
            ready_error: None,
        }
    }
}

/// Turns every error of the inner service into a response.
///
/// Made by [`ErrorResponseLayer`]; see the [module docs](crate::http).
#[derive(Debug)]
pub struct ErrorResponse<S> {
    inner: S,
    config: Arc<Config>,
    /// An error from the inner `poll_ready`, answered by the next call.
    ready_error: Option<BoxError>,
}

impl<S: Clone> Clone for ErrorResponse<S> {
    fn clone(&self) -> Self {
        ErrorResponse {
            inner: self.inner.clone(),
            config: self.config.clone(),
            ready_error: None,
        }
    }
}

impl<S> ErrorResponse<S> {
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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ErrorResponse<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body,
    ResBody::Data: From<String>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.ready_error.is_none() {
            if let Err(err) = ready!(self.inner.poll_ready(cx)) {
                // There is no request to answer yet: the next call answers it,
                // without calling the inner service, which is not ready.
                self.ready_error = Some(err.into());
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let version = request.version();
        let state = match self.ready_error.take() {
            Some(err) => State::Failed { err: Some(err) },
            None => State::Called {
                fut: self.inner.call(request),
            },
        };
        ResponseFuture {
            state,
            config: self.config.clone(),
            version,
        }
    }
}

pin_project! {
    /// Response future of [`ErrorResponse`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        config: Arc<Config>,
        version: Version,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] fut: F },
        Failed { err: Option<BoxError> },
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: http_body::Body,
    B::Data: From<String>,
{
    type Output = Result<Response<ResponseBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match this.state.project() {
            StateProj::Called { fut } => match ready!(fut.poll(cx)) {
                Ok(response) => response.map(ResponseBody::inner),
                Err(err) => error_response(&err.into(), this.config, *this.version),
            },
            StateProj::Failed { err } => {
                let err = err.take().expect("ResponseFuture polled after completion");
                error_response(&err, this.config, *this.version)
            }
        };
        Poll::Ready(Ok(response))
    }
}

fn error_response<B>(err: &BoxError, config: &Config, version: Version) -> Response<ResponseBody<B>>
where
    B: http_body::Body,
    B::Data: From<String>,
{
    let rejection = Rejection::of(err.as_ref());
    let text = (rejection == Rejection::Internal && config.expose_errors).then(|| err.to_string());
    let length = text.as_ref().map_or(0, String::len);
    let mut response = Response::new(ResponseBody::full(text.map(Into::into)));
    *response.status_mut() = rejection.status();
    let headers = response.headers_mut();
    let marked = Rejection::is_refusal_itself(err.as_ref());
    match rejection {
        Rejection::Refused(reason) if !marked => {
            tracing::debug!(
                reason,
                "error wrapping a refusal answered without the marker"
            );
            headers.insert(header::RETRY_AFTER, config.retry_after.clone());
        }
        Rejection::Refused("draining") => {
            tracing::debug!(
                reason = "draining",
                "request refused before any work started"
            );
            headers.insert(REJECTED_HEADER, HeaderValue::from_static("draining"));
            if version <= Version::HTTP_11 {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        Rejection::Refused(reason) => {
            tracing::debug!(reason, "request refused before any work started");
            let retry_after =
                match find::<CircuitOpen>(err.as_ref()).and_then(CircuitOpen::retry_after) {
                    Some(after) => retry_after_value(after),
                    None => config.retry_after.clone(),
                };
            headers.insert(header::RETRY_AFTER, retry_after);
            headers.insert(REJECTED_HEADER, HeaderValue::from_static(reason));
        }
        Rejection::Timeout => tracing::debug!("request timed out"),
        Rejection::Internal => {
            tracing::error!(error = %err, "service error answered with 500");
            if length > 0 {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
            }
        }
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

#[cfg(feature = "axum")]
mod axum_impls;
#[cfg(feature = "axum")]
pub use self::axum_impls::into_response;

#[cfg(test)]
mod tests;
