use std::fmt;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tower::Service;

use super::future::ResponseFuture;
use super::limiter::{Acquire, Limiter, Permit};
use super::{ConcurrencyLimitLayer, LimitHandle, OnResponse, ReleasePolicy};

/// Lets at most a fixed number of calls run at once in the inner service.
///
/// Made by [`ConcurrencyLimitLayer`]; see the [module docs](crate::limit).
pub struct ConcurrencyLimit<S, P = OnResponse> {
    inner: S,
    acquire: Acquire,
    permit: Option<Permit>,
    policy: P,
}

impl<S> ConcurrencyLimit<S> {
    /// Wraps `inner` in a limit of its own of `limit` calls at once.
    ///
    /// # Panics
    ///
    /// If `limit` is 0.
    #[track_caller]
    pub fn new(inner: S, limit: usize) -> Self {
        use tower::Layer;
        ConcurrencyLimitLayer::new(limit).layer(inner)
    }

    /// A [`ConcurrencyLimitLayer`] for `limit` calls at once.
    #[track_caller]
    pub fn layer(limit: usize) -> ConcurrencyLimitLayer {
        ConcurrencyLimitLayer::new(limit)
    }
}

impl<S, P> ConcurrencyLimit<S, P> {
    pub(crate) fn with_shared(inner: S, limiter: Arc<Limiter>, policy: P) -> Self {
        ConcurrencyLimit {
            inner,
            acquire: Acquire::new(limiter),
            permit: None,
            policy,
        }
    }

    /// A handle on the shared limit.
    pub fn handle(&self) -> LimitHandle {
        LimitHandle::new(self.acquire.limiter().clone())
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

impl<S, P, Request> Service<Request> for ConcurrencyLimit<S, P>
where
    S: Service<Request>,
    P: ReleasePolicy<S::Response>,
{
    type Response = P::Output<Permit>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, P>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.permit.is_none() {
            self.permit = Some(ready!(self.acquire.poll_acquire(cx)));
        }
        // The permit is held; now the inner service must be ready too.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let permit = self
            .permit
            .take()
            .expect("poll_ready must be called before call");
        ResponseFuture::new(self.inner.call(request), permit, self.policy.clone())
    }
}

impl<S: Clone, P: Clone> Clone for ConcurrencyLimit<S, P> {
    /// The clone shares the limit but not a permit this service may hold.
    fn clone(&self) -> Self {
        ConcurrencyLimit {
            inner: self.inner.clone(),
            acquire: self.acquire.clone(),
            permit: None,
            policy: self.policy.clone(),
        }
    }
}

impl<S: fmt::Debug, P> fmt::Debug for ConcurrencyLimit<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimit")
            .field("inner", &self.inner)
            .field("limiter", self.acquire.limiter())
            .field("has_permit", &self.permit.is_some())
            .finish()
    }
}

impl<S: tower::load::Load, P> tower::load::Load for ConcurrencyLimit<S, P> {
    type Metric = S::Metric;

    fn load(&self) -> Self::Metric {
        self.inner.load()
    }
}
