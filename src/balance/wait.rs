//! A bound on how long callers wait for a balancer with no ready endpoint.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use metrics::Counter;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::error::{or_panic, BoxError, ConfigError, NoEndpoints};
use crate::metrics_util::{self, Reason, DEFAULT_NAME};

/// Bounds the wait for a ready endpoint: see [`ReadyTimeout`].
#[derive(Clone)]
pub struct ReadyTimeoutLayer {
    timeout: Duration,
    name: String,
}

impl ReadyTimeoutLayer {
    /// Callers wait at most `timeout` for a ready endpoint.
    ///
    /// # Panics
    ///
    /// If `timeout` is zero; [`try_new`](Self::try_new) returns the error.
    #[track_caller]
    pub fn new(timeout: Duration) -> Self {
        or_panic("ReadyTimeoutLayer::new", Self::try_new(timeout))
    }

    /// Like [`new`](Self::new), but returns a [`ConfigError`] naming
    /// `timeout` when it is zero.
    pub fn try_new(timeout: Duration) -> Result<Self, ConfigError> {
        if timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be more than zero"));
        }
        Ok(ReadyTimeoutLayer {
            timeout,
            name: DEFAULT_NAME.to_owned(),
        })
    }

    /// Sets the `name` label of `tower_scale_rejected_total{reason="no_endpoints"}`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

impl fmt::Debug for ReadyTimeoutLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadyTimeoutLayer")
            .field("timeout", &self.timeout)
            .field("name", &self.name)
            .finish()
    }
}

impl<S> Layer<S> for ReadyTimeoutLayer {
    type Service = ReadyTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReadyTimeout {
            inner,
            timeout: self.timeout,
            sleep: None,
            expired: false,
            refuse_next: false,
            refused: metrics_util::rejected(&self.name, Reason::NoEndpoints),
        }
    }
}

/// Waits at most a configured time for the inner service (a balancer) to
/// become ready; then the call fails with [`NoEndpoints`] instead of waiting
/// forever, as tower's `Balance` alone would with no ready endpoint.
///
/// `poll_ready` never fails (so a `Buffer` worker in front keeps running): when
/// the wait runs out it returns Ready, and the next `call` answers
/// `NoEndpoints` without reaching the inner service. Until the inner service is
/// ready again, later callers do not wait a whole timeout each: they get
/// `NoEndpoints` at once, so a queue of requests empties quickly during an
/// outage and the first ready endpoint ends it.
///
/// Put it directly around the balancer, inside tower's `Buffer` (which polls
/// the balancer from its worker, so an outer bound would not see the wait).
pub struct ReadyTimeout<S> {
    inner: S,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The last wait ran out and the inner service has not been ready since.
    expired: bool,
    /// `poll_ready` gave up: the next call is refused.
    refuse_next: bool,
    refused: Counter,
}

impl<S> ReadyTimeout<S> {
    /// Gets a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Gets a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for ReadyTimeout<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadyTimeout")
            .field("inner", &self.inner)
            .field("timeout", &self.timeout)
            .field("expired", &self.expired)
            .finish_non_exhaustive()
    }
}

impl<S, R> Service<R> for ReadyTimeout<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.refuse_next {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(result) => {
                self.sleep = None;
                self.expired = false;
                Poll::Ready(result.map_err(Into::into))
            }
            Poll::Pending if self.expired => {
                self.refuse_next = true;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
                self.expired = true;
                self.refuse_next = true;
                tracing::warn!(?timeout, "no endpoint became ready in time");
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, request: R) -> Self::Future {
        if std::mem::take(&mut self.refuse_next) {
            self.refused.increment(1);
            return ResponseFuture { inner: None };
        }
        ResponseFuture {
            inner: Some(self.inner.call(request)),
        }
    }
}

pin_project! {
    /// Response future of [`ReadyTimeout`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.as_pin_mut() {
            Some(inner) => inner.poll(cx).map_err(Into::into),
            None => Poll::Ready(Err(NoEndpoints::new().into())),
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("refused", &self.inner.is_none())
            .finish()
    }
}
