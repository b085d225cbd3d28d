use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::Service;

use super::shared::{Shared, SERVING};
use super::{Draining, ReleasePolicy};
use crate::limit::sealed::Sealed;

/// Whether a drain may ask a client to close the connection a request came
/// on: for HTTP/1.x requests under [`OnBodyEnd`](super::OnBodyEnd); never
/// under [`OnResponse`](super::OnResponse). Sealed.
pub trait ConnectionPolicy<R>: Sealed {
    /// Whether responses to `request` may carry `Connection: close`.
    fn may_close(&self, request: &R) -> bool;
}

impl<R> ConnectionPolicy<R> for super::OnResponse {
    #[inline]
    fn may_close(&self, _: &R) -> bool {
        false
    }
}

#[cfg(feature = "http")]
impl<B> ConnectionPolicy<::http::Request<B>> for super::OnBodyEnd {
    #[inline]
    fn may_close(&self, request: &::http::Request<B>) -> bool {
        // HTTP/2 has no `Connection` header (hyper strips it and warns); its
        // server sends GOAWAY when it shuts down instead.
        request.version() <= ::http::Version::HTTP_11
    }
}
use crate::error::BoxError;

/// Counts calls for a [`Drain`](super::Drain) and refuses new ones once
/// refusals have begun.
///
/// Made by [`DrainLayer`](super::DrainLayer); see the
/// [module docs](crate::drain).
pub struct DrainService<S, P> {
    inner: S,
    shared: Arc<Shared>,
    policy: P,
}

impl<S, P> DrainService<S, P> {
    pub(super) fn new(inner: S, shared: Arc<Shared>, policy: P) -> Self {
        DrainService {
            inner,
            shared,
            policy,
        }
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

impl<S: Clone, P: Clone> Clone for DrainService<S, P> {
    fn clone(&self) -> Self {
        DrainService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            policy: self.policy.clone(),
        }
    }
}

impl<S: fmt::Debug, P> fmt::Debug for DrainService<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainService")
            .field("inner", &self.inner)
            .field("drain", &self.shared)
            .finish()
    }
}

impl<S, P, Request> Service<Request> for DrainService<S, P>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
    P: ReleasePolicy<S::Response> + ConnectionPolicy<Request>,
{
    type Response = P::Output<InFlight>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, P>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Once refusing, `call` answers without the inner service: do not wait
        // for it (or take its permits) first.
        if self.shared.refuse_if_due() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if !self.shared.enter() {
            return ResponseFuture {
                inner: None,
                in_flight: None,
                policy: self.policy.clone(),
                may_close: false,
            };
        }
        let in_flight = InFlight {
            shared: self.shared.clone(),
        };
        let may_close = self.policy.may_close(&request);
        ResponseFuture {
            inner: Some(self.inner.call(request)),
            in_flight: Some(in_flight),
            policy: self.policy.clone(),
            may_close,
        }
    }
}

/// One call counted by a drain, until dropped.
///
/// It rides in the response (with `OnBodyEnd`, in the response body) so that
/// the drain waits for it.
pub struct InFlight {
    shared: Arc<Shared>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.leave(true);
    }
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight").finish_non_exhaustive()
    }
}

pin_project! {
    /// Response future of [`DrainService`]: holds the call's count until it
    /// completes, fails, panics or is dropped (or hands it to the response,
    /// per the release policy).
    pub struct ResponseFuture<F, P> {
        #[pin]
        inner: Option<F>,
        in_flight: Option<InFlight>,
        policy: P,
        may_close: bool,
    }
}

impl<F, P, T, E> Future for ResponseFuture<F, P>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    P: ReleasePolicy<T>,
{
    type Output = Result<P::Output<InFlight>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(Draining::new().into()));
        };
        let result = ready!(inner.poll(cx));
        let in_flight = this
            .in_flight
            .take()
            .expect("ResponseFuture polled after completion");
        Poll::Ready(match result {
            Ok(mut response) => {
                // Once the drain has started, move HTTP/1 keep-alive clients
                // off this instance before refusals begin.
                if *this.may_close && in_flight.shared.phase() != SERVING {
                    this.policy.close_connection(&mut response);
                }
                Ok(this.policy.attach(response, in_flight))
            }
            Err(err) => Err(err.into()),
        })
    }
}

impl<F, P> fmt::Debug for ResponseFuture<F, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("refused", &self.inner.is_none())
            .finish_non_exhaustive()
    }
}
