use std::sync::Arc;

use tower::Layer;

use super::{LoadShed, Shared};
use crate::metrics_util::DEFAULT_NAME;

/// Wraps services in [`LoadShed`]; see the [module docs](crate::shed).
#[derive(Clone, Debug)]
pub struct LoadShedLayer {
    shared: Arc<Shared>,
}

impl LoadShedLayer {
    /// A layer that sheds calls while the inner service is not ready.
    pub fn new() -> Self {
        LoadShedLayer {
            shared: Arc::new(Shared::new(DEFAULT_NAME)),
        }
    }

    /// Sets the `name` label of this layer's metrics (default `"default"`).
    pub fn name(self, name: impl Into<String>) -> Self {
        LoadShedLayer {
            shared: Arc::new(Shared::new(&name.into())),
        }
    }
}

impl Default for LoadShedLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShed::with_shared(inner, self.shared.clone())
    }
}
