//! Future types.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;

use super::{Call, Classify};
use crate::error::{BoxError, CircuitOpen};

pin_project! {
    /// Response future of [`CircuitBreaker`](super::CircuitBreaker).
    ///
    /// Dropping it before the inner future completes records nothing (and gives
    /// a probe's place back).
    pub struct ResponseFuture<F, C> {
        #[pin]
        state: State<F, C>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, C> {
        Called { #[pin] fut: F, call: Option<Call>, classifier: C },
        Refused { retry_after: Option<Duration> },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn called(fut: F, call: Call, classifier: C) -> Self {
        ResponseFuture {
            state: State::Called {
                fut,
                call: Some(call),
                classifier,
            },
        }
    }

    pub(crate) fn refused(retry_after: Option<Duration>) -> Self {
        ResponseFuture {
            state: State::Refused { retry_after },
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
{
    type Output = Result<C::Output, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Called {
                fut,
                call,
                classifier,
            } => {
                let result = ready!(fut.poll(cx));
                let call = call.take().expect("ResponseFuture polled after completion");
                Poll::Ready(classifier.classify(result, call).map_err(Into::into))
            }
            StateProj::Refused { retry_after } => {
                Poll::Ready(Err(CircuitOpen::new(*retry_after).into()))
            }
        }
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Called { .. } => "called",
            State::Refused { .. } => "refused",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
