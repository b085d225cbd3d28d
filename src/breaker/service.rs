use std::fmt;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tower::Service;

use super::future::ResponseFuture;
use super::machine::{Breaker, Completion};
use super::{BreakerHandle, Classify, ErrorsAreFailures};
use crate::error::BoxError;

/// A circuit breaker in front of the inner service.
///
/// Made by [`CircuitBreakerLayer`](super::CircuitBreakerLayer); see the
/// [module docs](crate::breaker).
pub struct CircuitBreaker<S, C = ErrorsAreFailures> {
    inner: S,
    classifier: C,
    /// Not-ready mode: the admission taken in `poll_ready`.
    admitted: Option<Completion>,
    parked: Parked,
}

/// The breaker, this service's place among the tasks parked on it, and the
/// timer that wakes it when the open duration ends.
struct Parked {
    breaker: Arc<Breaker>,
    id: Option<u64>,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.breaker.leave_waiters(&mut self.id);
    }
}

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn with_shared(inner: S, breaker: Arc<Breaker>, classifier: C) -> Self {
        CircuitBreaker {
            inner,
            classifier,
            admitted: None,
            parked: Parked {
                breaker,
                id: None,
                timer: None,
            },
        }
    }

    /// A handle on the shared breaker.
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle::new(self.parked.breaker.clone())
    }

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

impl<S, C, Request> Service<Request> for CircuitBreaker<S, C>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error>,
{
    type Response = C::Output;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let breaker = &self.parked.breaker;
        if !breaker.fail_fast {
            // An admission from before a transition (the breaker tripped or
            // was forced open since) is stale: ask again.
            if self.admitted.as_ref().is_some_and(|a| !a.is_current()) {
                self.admitted = None;
            }
            if self.admitted.is_none() {
                let parked = &mut self.parked;
                let admitted =
                    ready!(parked
                        .breaker
                        .poll_admit(&mut parked.id, &mut parked.timer, cx));
                self.admitted = Some(admitted);
            }
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let breaker = &self.parked.breaker;
        let admitted = if breaker.fail_fast {
            match breaker.admit() {
                Ok(admitted) => admitted,
                Err(refused) => {
                    breaker.rejected.increment(1);
                    return ResponseFuture::refused(refused.retry_after);
                }
            }
        } else {
            self.admitted
                .take()
                .expect("poll_ready must be called before call")
        };
        ResponseFuture::called(
            self.inner.call(request),
            admitted.into_call(),
            self.classifier.clone(),
        )
    }
}

impl<S: Clone, C: Clone> Clone for CircuitBreaker<S, C> {
    /// The clone shares the breaker but not an admission this service holds.
    fn clone(&self) -> Self {
        CircuitBreaker::with_shared(
            self.inner.clone(),
            self.parked.breaker.clone(),
            self.classifier.clone(),
        )
    }
}

impl<S: fmt::Debug, C> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("breaker", &self.parked.breaker)
            .finish()
    }
}

impl<S: tower::load::Load, C> tower::load::Load for CircuitBreaker<S, C> {
    type Metric = S::Metric;

    fn load(&self) -> Self::Metric {
        self.inner.load()
    }
}
