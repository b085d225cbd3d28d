use std::fmt;
use std::sync::Arc;

use tower::Layer;

use super::shared::Shared;
use super::{DrainService, OnResponse};

/// Counts the calls of every service it wraps for one [`Drain`](super::Drain),
/// and refuses new ones once refusals have begun.
///
/// Made by [`Drain::layer`](super::Drain::layer); clones share the drain.
#[derive(Clone)]
pub struct DrainLayer<P = OnResponse> {
    shared: Arc<Shared>,
    policy: P,
}

impl DrainLayer {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        DrainLayer {
            shared,
            policy: OnResponse::default(),
        }
    }
}

impl<P> DrainLayer<P> {
    /// Counts each call until the HTTP response body has ended, errored or been
    /// dropped, instead of until the response head is ready, so that the drain
    /// waits for streaming responses.
    #[cfg(feature = "http")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn release_on_body_end(self) -> DrainLayer<super::OnBodyEnd> {
        DrainLayer {
            shared: self.shared,
            policy: super::OnBodyEnd::default(),
        }
    }
}

impl<S, P: Clone> Layer<S> for DrainLayer<P> {
    type Service = DrainService<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        DrainService::new(inner, self.shared.clone(), self.policy.clone())
    }
}

impl<P> fmt::Debug for DrainLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainLayer")
            .field("drain", &self.shared)
            .field("policy", &std::any::type_name::<P>())
            .finish()
    }
}
