//! Future types.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::service::Recorder;

pin_project! {
    /// Response future of [`LatencyService`](super::LatencyService): records
    /// the call's latency when the inner future completes.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        recorder: Option<Arc<Recorder>>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, start: Instant, recorder: Arc<Recorder>) -> Self {
        ResponseFuture {
            inner,
            start,
            recorder: Some(recorder),
        }
    }
}

impl<F: Future> Future for ResponseFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = ready!(this.inner.poll(cx));
        if let Some(recorder) = this.recorder.take() {
            recorder.record(*this.start);
        }
        Poll::Ready(output)
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}
