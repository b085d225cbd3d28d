//! The balancer for request-independent policies: it picks in `poll_ready`.

use std::fmt::{self, Display};
use std::hash::Hash;
use std::task::{Context, Poll};

use tower::discover::Discover;
use tower::Service;

use super::core::Core;
use super::future::ResponseFuture;
use super::Policy;
use crate::discover::Weight;
use crate::error::BoxError;
use crate::metrics_util::DEFAULT_NAME;

/// Spreads requests over the endpoints of a [`Discover`] stream with a
/// [`Policy`]: [`WeightedP2c`](super::WeightedP2c),
/// [`RoundRobin`](super::RoundRobin),
/// [`SmoothWeightedRoundRobin`](super::SmoothWeightedRoundRobin) or
/// [`LeastRequests`](super::LeastRequests).
///
/// Like tower's `p2c::Balance`, it picks in `poll_ready`: `poll_ready` is
/// Ready only once the picked endpoint's `poll_ready` is, and the next `call`
/// goes to that endpoint. With no ready endpoint it is Pending (wrap it in
/// [`ReadyTimeout`](crate::balance::ReadyTimeout) to bound the wait). It never
/// fails: a discovery error is logged and skipped, the end of the stream
/// keeps the last set, and an endpoint whose `poll_ready` fails is dropped
/// (until discovery inserts it again) and another is picked. Calls fail only
/// with the endpoint's own error, boxed.
///
/// The endpoint services must have a [`Weight`] (wrap them in
/// [`Weighted`](crate::discover::Weighted); the discovery sources of this
/// crate do), and their keys must be `Display` (the `endpoint` label of the
/// metrics). It is not `Clone`: share it behind tower's `Buffer`. See the
/// [module docs](super) for an example.
pub struct Balancer<D, P, Req>
where
    D: Discover,
    D::Key: Hash,
{
    core: Core<D, Req>,
    policy: P,
    /// The endpoint picked by `poll_ready`, an index in the ready set.
    picked: Option<usize>,
}

impl<D, P, Req> Balancer<D, P, Req>
where
    D: Discover,
    D::Key: Hash,
{
    /// A balancer over the endpoints of `discover`, picking with `policy`;
    /// the `name` label of its metrics is `"default"`.
    pub fn new(discover: D, policy: P) -> Self
    where
        D::Service: Service<Req>,
    {
        Self::named(DEFAULT_NAME, discover, policy)
    }

    /// Like [`new`](Self::new), with the `name` label of the metrics.
    pub fn named(name: &str, discover: D, policy: P) -> Self
    where
        D::Service: Service<Req>,
    {
        Balancer {
            core: Core::new(discover, name),
            policy,
            picked: None,
        }
    }

    /// The number of endpoints, ready or not (as of the last `poll_ready`).
    pub fn len(&self) -> usize {
        self.core.len()
    }

    /// Whether there is no endpoint (as of the last `poll_ready`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }
}

impl<D, P, Req> fmt::Debug for Balancer<D, P, Req>
where
    D: Discover,
    D::Key: Hash,
    P: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("core", &self.core)
            .field("policy", &self.policy)
            .field("picked", &self.picked)
            .finish()
    }
}

impl<D, P, Req> Service<Req> for Balancer<D, P, Req>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone + Display,
    D::Error: Into<BoxError>,
    D::Service: Service<Req> + Weight,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
    P: Policy<D::Service>,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = BoxError;
    type Future = ResponseFuture<<D::Service as Service<Req>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.core.update(cx);
        if self.core.ready_changed() {
            // Indices in the ready set moved: pick again.
            self.picked = None;
        }
        loop {
            if let Some(index) = self.picked.take() {
                match self.core.cache.check_ready_index(cx, index) {
                    Ok(true) => {
                        self.picked = Some(index);
                        return Poll::Ready(Ok(()));
                    }
                    Ok(false) => {
                        tracing::trace!(name = %self.core.name(), "picked endpoint not ready");
                    }
                    Err(failed) => {
                        tracing::warn!(
                            name = %self.core.name(),
                            endpoint = %failed.0,
                            error = %failed.1,
                            "endpoint failed; dropped until discovery inserts it again"
                        );
                    }
                }
                // Either way it left the ready set.
                self.core.mark_ready_changed();
                self.core.report();
            }
            let changed = self.core.take_ready_changed();
            self.picked = self.policy.pick(&mut self.core.cache, changed);
            if self.picked.is_none() {
                // Interest is registered in discovery and in every pending
                // endpoint.
                return Poll::Pending;
            }
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let index = self
            .picked
            .take()
            .expect("poll_ready must be called before call");
        let (_, node) = self
            .core
            .cache
            .get_ready_index_mut(index)
            .expect("the picked endpoint is in the ready set");
        let (future, in_flight) = node.dispatch(request, P::TRACK_IN_FLIGHT);
        ResponseFuture::new(future, in_flight)
    }
}
