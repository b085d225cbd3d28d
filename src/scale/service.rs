use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use metrics::Histogram;
use tokio::time::Instant;
use tower::Service;

use super::future::ResponseFuture;
use super::layer::LatencyLayer;
use super::window::{LatencyHandle, Window};

/// What the services of one [`LatencyLayer`] share: the window and the
/// histogram handle, registered once.
pub(crate) struct Recorder {
    window: Arc<Window>,
    histogram: Histogram,
}

impl Recorder {
    pub(crate) fn new(window: Arc<Window>, name: &str) -> Self {
        Recorder {
            window,
            histogram: crate::metrics_util::histogram("tower_scale_latency_seconds", name),
        }
    }

    pub(crate) fn record(&self, start: Instant) {
        let now = Instant::now();
        let latency = now.saturating_duration_since(start);
        self.window.record_at(now, latency);
        self.histogram.record(latency.as_secs_f64());
    }
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// Records the latency of every call of the inner service; made by
/// [`LatencyLayer`]. See the [module docs](crate::scale#recording-latencies).
///
/// A call counts from `call` until its response future completes, with a
/// response or an error; a future dropped before then records nothing.
#[derive(Clone, Debug)]
pub struct LatencyService<S> {
    inner: S,
    recorder: Arc<Recorder>,
}

impl<S> LatencyService<S> {
    /// Wraps `inner`, recording into `handle`'s window.
    pub fn new(inner: S, handle: &LatencyHandle) -> Self {
        let layer = LatencyLayer::from_handle(handle.clone());
        tower::Layer::layer(&layer, inner)
    }

    pub(crate) fn with_recorder(inner: S, recorder: Arc<Recorder>) -> Self {
        LatencyService { inner, recorder }
    }

    /// A handle on the window this service records into.
    pub fn handle(&self) -> LatencyHandle {
        LatencyHandle {
            window: self.recorder.window.clone(),
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

impl<S, Request> Service<Request> for LatencyService<S>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let start = Instant::now();
        ResponseFuture::new(self.inner.call(request), start, self.recorder.clone())
    }
}

impl<S: tower::load::Load> tower::load::Load for LatencyService<S> {
    type Metric = S::Metric;

    fn load(&self) -> Self::Metric {
        self.inner.load()
    }
}
