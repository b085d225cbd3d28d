use std::fmt;
use std::sync::{Arc, OnceLock};

use tower::Layer;

use super::limiter::Limiter;
use super::{ConcurrencyLimit, LimitHandle, OnResponse};
use crate::error::{or_panic, ConfigError};
use crate::metrics_util::DEFAULT_NAME;

/// Applies one shared concurrency limit to every service it wraps.
///
/// See the [module docs](crate::limit) for an example.
#[derive(Clone)]
pub struct ConcurrencyLimitLayer<P = OnResponse> {
    limit: usize,
    name: String,
    /// The shared limit, made on first use so that builder methods register
    /// metrics only under the final name; clones share it.
    limiter: Arc<OnceLock<Arc<Limiter>>>,
    policy: P,
}

impl ConcurrencyLimitLayer {
    /// A layer that lets at most `limit` calls run at once in all the services
    /// it makes, together.
    ///
    /// # Panics
    ///
    /// If `limit` is 0; [`try_new`](Self::try_new) returns the error instead.
    #[track_caller]
    pub fn new(limit: usize) -> Self {
        or_panic("ConcurrencyLimitLayer::new", Self::try_new(limit))
    }

    /// Like [`new`](Self::new), but returns a [`ConfigError`] naming `limit` when
    /// it is 0.
    pub fn try_new(limit: usize) -> Result<Self, ConfigError> {
        if limit == 0 {
            return Err(ConfigError::new("limit", "must be at least 1"));
        }
        Ok(ConcurrencyLimitLayer {
            limit,
            name: DEFAULT_NAME.to_owned(),
            limiter: Arc::default(),
            policy: OnResponse::default(),
        })
    }
}

impl<P> ConcurrencyLimitLayer<P> {
    /// Sets the `name` label of this layer's metrics (default `"default"`).
    ///
    /// This starts a new limit: call it while building the layer, before the
    /// layer is cloned or used.
    pub fn name(self, name: impl Into<String>) -> Self {
        ConcurrencyLimitLayer {
            limit: self.limit,
            name: name.into(),
            limiter: Arc::default(),
            policy: self.policy,
        }
    }

    /// The shared limit, made by the first service or handle.
    pub(crate) fn limiter(&self) -> &Arc<Limiter> {
        self.limiter
            .get_or_init(|| Arc::new(Limiter::new(self.limit, &self.name)))
    }

    /// Holds each permit until the HTTP response body has ended, errored or been
    /// dropped, instead of releasing it when the response head is ready, so that
    /// streaming responses count against the limit.
    #[cfg(feature = "http")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn release_on_body_end(self) -> ConcurrencyLimitLayer<super::OnBodyEnd> {
        ConcurrencyLimitLayer {
            limit: self.limit,
            name: self.name,
            limiter: self.limiter,
            policy: super::OnBodyEnd::default(),
        }
    }

    /// A handle on the shared limit, to read its figures at run time.
    pub fn handle(&self) -> LimitHandle {
        LimitHandle::new(self.limiter().clone())
    }
}

impl<S, P: Clone> Layer<S> for ConcurrencyLimitLayer<P> {
    type Service = ConcurrencyLimit<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit::with_shared(inner, self.limiter().clone(), self.policy.clone())
    }
}

impl<P> fmt::Debug for ConcurrencyLimitLayer<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitLayer")
            .field("name", &self.name)
            .field("limit", &self.limit)
            .field("policy", &std::any::type_name::<P>())
            .finish()
    }
}
