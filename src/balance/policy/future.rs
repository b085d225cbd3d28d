//! The response future of the policy services.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use super::core::InFlight;
use crate::error::{BoxError, NoEndpoints};

pin_project! {
    /// Response future of [`Balancer`](super::Balancer) and
    /// [`ConsistentHash`](super::ConsistentHash): the endpoint's future, its
    /// error boxed, holding the endpoint's in-flight count (for
    /// [`LeastRequests`](super::LeastRequests)) until it completes or is
    /// dropped.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        in_flight: Option<InFlight>,
    }
}

impl<F> ResponseFuture<F> {
    #[inline]
    pub(super) fn new(inner: F, in_flight: Option<InFlight>) -> Self {
        ResponseFuture {
            inner: Some(inner),
            in_flight,
        }
    }

    /// A call that found no endpoint to take it.
    pub(super) fn no_endpoints() -> Self {
        ResponseFuture {
            inner: None,
            in_flight: None,
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.inner.as_pin_mut() {
            Some(inner) => {
                let result = ready!(inner.poll(cx));
                this.in_flight.take();
                Poll::Ready(result.map_err(Into::into))
            }
            None => Poll::Ready(Err(NoEndpoints::new().into())),
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("no_endpoints", &self.inner.is_none())
            .finish_non_exhaustive()
    }
}
