//! Fail at once with [`Overloaded`] when the inner service is not ready, instead
//! of waiting.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_scale::{limit::ConcurrencyLimitLayer, shed::{LoadShedLayer, Overloaded}};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut svc = ServiceBuilder::new()
//!     .layer(LoadShedLayer::new())
//!     .layer(ConcurrencyLimitLayer::new(1))
//!     .service(service_fn(|_: ()| async {
//!         tokio::time::sleep(Duration::from_millis(10)).await;
//!         Ok::<_, std::convert::Infallible>("done")
//!     }));
//!
//! let busy = svc.ready().await.unwrap().call(());
//! // The only permit is taken: the next call is refused at once.
//! let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
//! assert!(err.is::<Overloaded>());
//! assert_eq!(busy.await.unwrap(), "done");
//! # }
//! ```
//!
//! # Behaviour
//!
//! `poll_ready` polls the inner service once and is always Ready (an error from
//! the inner `poll_ready` is passed on). If the inner service was not ready, the
//! next `call` answers [`Overloaded`] without touching it.
//!
//! # Differences from `tower::load_shed`
//!
//! The same behaviour and the same error type (re-exported, so tonic maps it to
//! `RESOURCE_EXHAUSTED`), plus a `tower_scale_rejected_total{reason="overloaded"}`
//! counter and a `name` label, and `tower::load::Load` forwarded so it can sit
//! inside a balancer.
//!
//! # Metrics
//!
//! - `tower_scale_rejected_total{name, reason="overloaded"}` (counter).

mod layer;

pub mod future;

use std::sync::Arc;
use std::task::{Context, Poll};

use metrics::Counter;
use tower::Service;

pub use self::layer::LoadShedLayer;
pub use crate::error::Overloaded;

use self::future::ResponseFuture;
use crate::error::BoxError;

/// Answers [`Overloaded`] at once when the inner service is not ready.
///
/// Made by [`LoadShedLayer`]; see the [module docs](crate::shed).
#[derive(Debug)]
pub struct LoadShed<S> {
    inner: S,
    is_ready: bool,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    rejected: Counter,
}

impl Shared {
    #[cold]
    #[inline(never)]
    fn reject<F>(&self) -> ResponseFuture<F> {
        self.rejected.increment(1);
        tracing::trace!("inner service not ready; call refused as overloaded");
        ResponseFuture::overloaded()
    }

    fn new(name: &str) -> Self {
        Shared {
            rejected: crate::metrics_util::rejected(name, crate::metrics_util::Reason::Overloaded),
        }
    }
}

impl<S> LoadShed<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        LoadShed::with_shared(
            inner,
            Arc::new(Shared::new(crate::metrics_util::DEFAULT_NAME)),
        )
    }

    fn with_shared(inner: S, shared: Arc<Shared>) -> Self {
        LoadShed {
            inner,
            is_ready: false,
            shared,
        }
    }

    /// A [`LoadShedLayer`].
    pub fn layer() -> LoadShedLayer {
        LoadShedLayer::new()
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

impl<S, Request> Service<Request> for LoadShed<S>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.is_ready = match self.inner.poll_ready(cx) {
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            r => r.is_ready(),
        };
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if std::mem::take(&mut self.is_ready) {
            ResponseFuture::called(self.inner.call(request))
        } else {
            self.shared.reject()
        }
    }
}

impl<S: Clone> Clone for LoadShed<S> {
    /// The clone does not inherit this service's readiness.
    fn clone(&self) -> Self {
        LoadShed::with_shared(self.inner.clone(), self.shared.clone())
    }
}

impl<S: tower::load::Load> tower::load::Load for LoadShed<S> {
    type Metric = S::Metric;

    fn load(&self) -> Self::Metric {
        self.inner.load()
    }
}

#[cfg(test)]
mod tests;
