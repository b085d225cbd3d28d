use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tower::Layer;

use super::service::{LatencyService, Recorder};
use super::window::LatencyHandle;
use crate::error::{or_panic, ConfigError};
use crate::metrics_util::DEFAULT_NAME;

/// Records how long every call of the services it wraps takes, into one
/// sliding window shared by all of them.
///
/// See the [module docs](crate::scale#recording-latencies) for an example.
#[derive(Clone)]
pub struct LatencyLayer {
    handle: LatencyHandle,
    name: String,
    /// Made on first use, so that `name` registers the histogram only once.
    recorder: Arc<OnceLock<Arc<Recorder>>>,
}

impl LatencyLayer {
    /// A layer recording into a window of 30 s, in 6 slices of 5 s.
    pub fn new() -> Self {
        Self::from_handle(LatencyHandle::new())
    }

    /// A layer recording into a window of `window` made of `slices` slices.
    ///
    /// # Panics
    ///
    /// On the errors of [`try_with_window`](Self::try_with_window).
    #[track_caller]
    pub fn with_window(window: Duration, slices: usize) -> Self {
        or_panic(
            "LatencyLayer::with_window",
            Self::try_with_window(window, slices),
        )
    }

    /// Like [`with_window`](Self::with_window), but returns a [`ConfigError`]
    /// naming `slices` when it is 0 or above 1024, or `window` when a slice
    /// would be shorter than 1 ms.
    pub fn try_with_window(window: Duration, slices: usize) -> Result<Self, ConfigError> {
        Ok(Self::from_handle(LatencyHandle::try_with_window(
            window, slices,
        )?))
    }

    /// A layer recording into the window of `handle` (several layers may feed
    /// one window).
    pub fn from_handle(handle: LatencyHandle) -> Self {
        LatencyLayer {
            handle,
            name: DEFAULT_NAME.to_owned(),
            recorder: Arc::default(),
        }
    }

    /// Sets the `name` label of `tower_scale_latency_seconds` (default
    /// `"default"`). Call it while building the layer, before it is used.
    pub fn name(self, name: impl Into<String>) -> Self {
        LatencyLayer {
            handle: self.handle,
            name: name.into(),
            recorder: Arc::default(),
        }
    }

    /// A handle on the window, to read the percentiles.
    pub fn handle(&self) -> LatencyHandle {
        self.handle.clone()
    }

    fn recorder(&self) -> &Arc<Recorder> {
        self.recorder
            .get_or_init(|| Arc::new(Recorder::new(self.handle.window.clone(), &self.name)))
    }
}

impl Default for LatencyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for LatencyLayer {
    type Service = LatencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LatencyService::with_recorder(inner, self.recorder().clone())
    }
}

impl fmt::Debug for LatencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyLayer")
            .field("name", &self.name)
            .field("handle", &self.handle)
            .finish()
    }
}
