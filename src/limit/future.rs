//! Future types.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use super::limiter::Permit;
use super::ReleasePolicy;

pin_project! {
    /// Response future of [`ConcurrencyLimit`](super::ConcurrencyLimit): it holds
    /// the permit, so completing, failing, panicking or dropping it releases the
    /// slot (or hands the permit to the response body, per the release policy).
    pub struct ResponseFuture<F, P> {
        #[pin]
        inner: F,
        permit: Option<Permit>,
        policy: P,
    }
}

impl<F, P> ResponseFuture<F, P> {
    pub(crate) fn new(inner: F, permit: Permit, policy: P) -> Self {
        ResponseFuture {
            inner,
            permit: Some(permit),
            policy,
        }
    }
}

impl<F, P, T, E> Future for ResponseFuture<F, P>
where
    F: Future<Output = Result<T, E>>,
    P: ReleasePolicy<T>,
{
    type Output = Result<P::Output<Permit>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let permit = this
            .permit
            .take()
            .expect("ResponseFuture polled after completion");
        Poll::Ready(result.map(|response| this.policy.attach(response, permit)))
    }
}

impl<F, P> fmt::Debug for ResponseFuture<F, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("permit", &self.permit)
            .finish_non_exhaustive()
    }
}
