use std::sync::{Arc, OnceLock};

use tower::Layer;

use super::{LoadShed, Shared};
use crate::metrics_util::DEFAULT_NAME;

/// Wraps services in [`LoadShed`]; see the [module docs](crate::shed).
#[derive(Clone, Debug)]
pub struct LoadShedLayer {
    name: String,
    /// Made on first use, so that `name` registers metrics only once.
    shared: Arc<OnceLock<Arc<Shared>>>,
}

impl LoadShedLayer {
    /// A layer that sheds calls while the inner service is not ready.
    pub fn new() -> Self {
        LoadShedLayer {
            name: DEFAULT_NAME.to_owned(),
            shared: Arc::default(),
        }
    }

    /// Sets the `name` label of this layer's metrics (default `"default"`).
    pub fn name(self, name: impl Into<String>) -> Self {
        LoadShedLayer {
            name: name.into(),
            shared: Arc::default(),
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
        LoadShed::with_shared(
            inner,
            self.shared
                .get_or_init(|| Arc::new(Shared::new(&self.name)))
                .clone(),
        )
    }
}
