//! Future types.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::Service;

use super::shared::{Leave, Ticket, Turn};
use crate::error::{BoxError, QueueFull, QueueTimeout};

pin_project! {
    /// Response future of [`Queue`](super::Queue).
    ///
    /// While the request waits in the queue, the future holds its place:
    /// dropping it leaves the queue at once.
    pub struct ResponseFuture<S, Request>
    where
        S: Service<Request>,
    {
        #[pin]
        state: State<S, Request>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Request>
    where
        S: Service<Request>,
    {
        Called { #[pin] fut: S::Future },
        Queued {
            inner: S,
            request: Option<Request>,
            ticket: Ticket,
            sleep: Pin<Box<Sleep>>,
        },
        Full,
        Done,
    }
}

impl<S: Service<Request>, Request> ResponseFuture<S, Request> {
    pub(crate) fn called(fut: S::Future) -> Self {
        ResponseFuture {
            state: State::Called { fut },
        }
    }

    pub(crate) fn queued(
        inner: S,
        request: Request,
        ticket: Ticket,
        sleep: Pin<Box<Sleep>>,
    ) -> Self {
        ResponseFuture {
            state: State::Queued {
                inner,
                request: Some(request),
                ticket,
                sleep,
            },
        }
    }

    pub(crate) fn full() -> Self {
        ResponseFuture { state: State::Full }
    }
}

impl<S, Request> Future for ResponseFuture<S, Request>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Called { fut } => return fut.poll(cx).map_err(Into::into),
                StateProj::Queued {
                    inner,
                    request,
                    ticket,
                    sleep,
                } => {
                    // The deadline is strict: a request that has waited the whole
                    // timeout is not dispatched, even if its turn came just now,
                    // and even if a busy runtime has not fired the timer yet.
                    let expired = sleep.as_mut().poll(cx).is_ready()
                        || tokio::time::Instant::now() >= sleep.deadline();
                    let turn = if expired {
                        Turn::Expired
                    } else {
                        ticket.poll_turn(cx)
                    };
                    match turn {
                        Turn::Go => {}
                        Turn::Wait => return Poll::Pending,
                        Turn::Expired => {
                            if let Some(shared) = ticket.shared() {
                                shared.timed_out.increment(1);
                            }
                            tracing::trace!("request timed out in the admission queue");
                            ticket.leave(Leave::TimedOut);
                            state.set(State::Done);
                            return Poll::Ready(Err(QueueTimeout::new().into()));
                        }
                    }
                    if let Err(err) = ready!(inner.poll_ready(cx)) {
                        ticket.leave(Leave::Cancelled);
                        state.set(State::Done);
                        return Poll::Ready(Err(err.into()));
                    }
                    ticket.leave(Leave::Dispatched);
                    let request = request.take().expect("request is dispatched once");
                    let fut = inner.call(request);
                    state.set(State::Called { fut });
                }
                StateProj::Full => {
                    state.set(State::Done);
                    return Poll::Ready(Err(QueueFull::new().into()));
                }
                StateProj::Done => panic!("queue ResponseFuture polled after completion"),
            }
        }
    }
}

impl<S: Service<Request>, Request> fmt::Debug for ResponseFuture<S, Request> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Called { .. } => "called",
            State::Queued { .. } => "queued",
            State::Full => "full",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
