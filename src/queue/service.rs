use std::fmt;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tower::Service;

use super::future::ResponseFuture;
use super::shared::Shared;
use super::{QueueHandle, QueueLayer};
use crate::error::BoxError;

/// A bounded admission queue in front of a service that is not ready.
///
/// Made by [`QueueLayer`]; see the [module docs](crate::queue).
pub struct Queue<S> {
    inner: S,
    shared: Arc<Shared>,
    ready: Option<Route>,
    space: SpaceWait,
}

/// Where the next call goes, decided in `poll_ready`.
#[derive(Clone, Copy, Debug)]
enum Route {
    /// The queue was empty and the inner service ready: call it at once.
    Direct,
    /// Wait in the queue for a turn.
    Enqueue,
}

/// This service's place among those parked in `poll_ready` for room in a full
/// queue (backpressure mode); dropping it leaves that list.
struct SpaceWait {
    shared: Arc<Shared>,
    id: Option<u64>,
}

impl Drop for SpaceWait {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.shared.cancel_space_wait(id);
        }
    }
}

impl<S> Queue<S> {
    pub(crate) fn with_shared(inner: S, shared: Arc<Shared>) -> Self {
        Queue {
            inner,
            space: SpaceWait {
                shared: shared.clone(),
                id: None,
            },
            shared,
            ready: None,
        }
    }

    /// A [`QueueLayer`] with room for `capacity` waiting requests, each waiting at
    /// most `timeout`.
    ///
    /// # Panics
    ///
    /// If `capacity` or `timeout` is zero.
    #[track_caller]
    pub fn layer(capacity: usize, timeout: std::time::Duration) -> QueueLayer {
        QueueLayer::new(capacity, timeout)
    }

    /// A handle on the shared queue.
    pub fn handle(&self) -> QueueHandle {
        QueueHandle::new(self.shared.clone())
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

impl<S, Request> Service<Request> for Queue<S>
where
    S: Service<Request> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Request>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.ready.is_some() {
            return Poll::Ready(Ok(()));
        }
        if self.shared.len() == 0 {
            match self.inner.poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    self.ready = Some(Route::Direct);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err.into())),
                // The request will queue, and only the entry whose turn it is polls
                // its inner service: drop the registration this poll made (in a
                // limit's wait list, say) so it cannot hold up the entry whose
                // turn it is.
                Poll::Pending => self.inner = self.inner.clone(),
            }
        }
        if self.shared.config.backpressure {
            ready!(self.shared.poll_space(&mut self.space.id, cx));
        }
        self.ready = Some(Route::Enqueue);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self
            .ready
            .take()
            .expect("poll_ready must be called before call")
        {
            Route::Direct => ResponseFuture::called(self.inner.call(request)),
            Route::Enqueue => match self.shared.enqueue() {
                Some(ticket) => {
                    let clone = self.inner.clone();
                    let inner = std::mem::replace(&mut self.inner, clone);
                    let sleep = Box::pin(tokio::time::sleep(self.shared.config.timeout));
                    ResponseFuture::queued(inner, request, ticket, sleep)
                }
                None => {
                    self.shared.full.increment(1);
                    tracing::trace!("admission queue full; call refused");
                    ResponseFuture::full()
                }
            },
        }
    }
}

impl<S: Clone> Clone for Queue<S> {
    /// The clone shares the queue but not this service's readiness.
    fn clone(&self) -> Self {
        Queue::with_shared(self.inner.clone(), self.shared.clone())
    }
}

impl<S: fmt::Debug> fmt::Debug for Queue<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .field("ready", &self.ready)
            .finish()
    }
}

impl<S: tower::load::Load> tower::load::Load for Queue<S> {
    type Metric = S::Metric;

    fn load(&self) -> Self::Metric {
        self.inner.load()
    }
}
