//! The count of calls in flight, as a load.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::load::Load;
use tower::{Layer, Service};

use super::future::PendingFuture;
use crate::balance::LoadValue;
use crate::discover::Weight;

/// The load of a [`Pending`]: calls in flight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PendingCount(usize);

impl PendingCount {
    /// Calls in flight.
    pub fn get(self) -> usize {
        self.0
    }
}

impl LoadValue for PendingCount {
    #[inline]
    fn value(&self) -> f64 {
        self.0 as f64
    }
}

/// Measures an endpoint's load as its calls in flight, like tower's
/// `PendingRequests`, but with a metric the weighted policies can read
/// ([`PendingCount`] implements [`LoadValue`]).
///
/// A call counts from `call` until its response future completes or is
/// dropped. Clones share the count. See the [module docs](super).
pub struct Pending<S> {
    inner: S,
    count: Arc<AtomicUsize>,
}

impl<S> Pending<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Pending {
            inner,
            count: Arc::default(),
        }
    }

    /// A layer that wraps each service in its own `Pending`.
    pub fn layer() -> PendingLayer {
        PendingLayer::new()
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

/// Counts a call in flight until dropped.
pub(super) struct Guard(Arc<AtomicUsize>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl<S, Request> Service<Request> for Pending<S>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = PendingFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Request) -> Self::Future {
        self.count.fetch_add(1, Relaxed);
        let guard = Guard(self.count.clone());
        PendingFuture::new(self.inner.call(request), guard)
    }
}

impl<S> Load for Pending<S> {
    type Metric = PendingCount;

    #[inline]
    fn load(&self) -> PendingCount {
        PendingCount(self.count.load(Relaxed))
    }
}

impl<S: Weight> Weight for Pending<S> {
    #[inline]
    fn weight(&self) -> u32 {
        self.inner.weight()
    }
}

impl<S: Clone> Clone for Pending<S> {
    /// The clone shares the count.
    fn clone(&self) -> Self {
        Pending {
            inner: self.inner.clone(),
            count: self.count.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Pending<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending")
            .field("inner", &self.inner)
            .field("in_flight", &self.count.load(Relaxed))
            .finish()
    }
}

/// Wraps each service in its own [`Pending`].
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingLayer {
    _p: (),
}

impl PendingLayer {
    /// A new layer.
    pub fn new() -> Self {
        PendingLayer { _p: () }
    }
}

impl<S> Layer<S> for PendingLayer {
    type Service = Pending<S>;

    fn layer(&self, inner: S) -> Pending<S> {
        Pending::new(inner)
    }
}
