//! Future types.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use super::ewma::Handle;
use super::pending::Guard;
use super::ClassifyLoad;

pin_project! {
    /// Response future of [`FailureAwareEwma`](super::FailureAwareEwma): records
    /// the round trip and its outcome when the response (or error) arrives.
    ///
    /// Dropping it before then records the time the call took as a plain round
    /// trip, as tower's `PeakEwma` does.
    pub struct EwmaFuture<F, C> {
        #[pin]
        inner: F,
        handle: Option<Handle>,
        classify: C,
    }
}

impl<F, C> EwmaFuture<F, C> {
    pub(super) fn new(inner: F, handle: Handle, classify: C) -> Self {
        EwmaFuture {
            inner,
            handle: Some(handle),
            classify,
        }
    }
}

impl<F, C, T, E> Future for EwmaFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    C: ClassifyLoad<T, E>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(handle) = this.handle.take() {
            handle.complete(this.classify.classify(result.as_ref()));
        }
        Poll::Ready(result)
    }
}

impl<F, C> fmt::Debug for EwmaFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EwmaFuture")
            .field("done", &self.handle.is_none())
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// Response future of [`Pending`](super::Pending): the call counts as in
    /// flight until the response (or error) arrives or the future is dropped.
    pub struct PendingFuture<F> {
        #[pin]
        inner: F,
        guard: Option<Guard>,
    }
}

impl<F> PendingFuture<F> {
    pub(super) fn new(inner: F, guard: Guard) -> Self {
        PendingFuture {
            inner,
            guard: Some(guard),
        }
    }
}

impl<F: Future> Future for PendingFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = ready!(this.inner.poll(cx));
        this.guard.take();
        Poll::Ready(output)
    }
}

impl<F> fmt::Debug for PendingFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingFuture")
            .field("done", &self.guard.is_none())
            .finish_non_exhaustive()
    }
}
