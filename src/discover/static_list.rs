//! A fixed list of endpoints, changed at run time through a handle.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use metrics::Counter;
use tokio::sync::mpsc;
use tower::discover::Change;

use super::{Endpoint, Weighted};
use crate::metrics_util::{self, DEFAULT_NAME};

/// A discovery source over a list of endpoints that the application sets, with
/// a [`StaticHandle`] to add, remove and replace endpoints at run time.
///
/// It emits an `Insert` for each endpoint at first, then only the differences:
/// an endpoint added again with another weight keeps its service (the weight
/// is shared with it), and [`StaticHandle::replace`] removes only the
/// endpoints that are not in the new set, so endpoints that stay keep their
/// connections and their load figures. It never fails and never ends, even
/// when every handle is dropped.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::net::SocketAddr;
/// use tower::balance::p2c::Balance;
/// use tower::load::{CompleteOnResponse, PendingRequests};
/// use tower::{service_fn, Service, ServiceExt};
/// use tower_scale::discover::{Endpoint, Static};
///
/// let a: SocketAddr = "127.0.0.1:8081".parse().unwrap();
/// let b: SocketAddr = "127.0.0.1:8082".parse().unwrap();
/// // The factory: an endpoint to a service (here one that names its address).
/// let make = |endpoint: &Endpoint| {
///     let addr = endpoint.addr();
///     let svc = service_fn(move |_: ()| async move { Ok::<_, tower::BoxError>(addr) });
///     PendingRequests::new(svc, CompleteOnResponse::default())
/// };
/// let (discover, handle) = Static::new([a], make);
/// let mut balance = Balance::new(discover);
/// assert_eq!(balance.ready().await.unwrap().call(()).await.unwrap(), a);
///
/// handle.replace([Endpoint::new(b).with_weight(50)]);
/// assert_eq!(balance.ready().await.unwrap().call(()).await.unwrap(), b);
/// # }
/// ```
pub struct Static<F, S> {
    make: F,
    ops: mpsc::UnboundedReceiver<Op>,
    changes: VecDeque<Change<SocketAddr, Weighted<S>>>,
    current: HashMap<SocketAddr, Arc<AtomicU32>>,
    inserted: Counter,
    removed: Counter,
}

enum Op {
    Add(Endpoint),
    Remove(SocketAddr),
    Replace(Vec<Endpoint>),
}

/// Changes the endpoints of a [`Static`] source; clones share it.
#[derive(Clone)]
pub struct StaticHandle {
    ops: mpsc::UnboundedSender<Op>,
}

impl<F, S> Static<F, S>
where
    F: FnMut(&Endpoint) -> S,
{
    /// A source over `endpoints` (addresses or [`Endpoint`]s), turned into
    /// services by `make`, and its handle. The metrics name is `"default"`.
    pub fn new<I>(endpoints: I, make: F) -> (Self, StaticHandle)
    where
        I: IntoIterator,
        I::Item: Into<Endpoint>,
    {
        Self::named(DEFAULT_NAME, endpoints, make)
    }

    /// Like [`new`](Self::new), with the `name` label of the source's metrics:
    /// `tower_scale_discovery_updates_total{name, change="insert"|"remove"}`.
    pub fn named<I>(name: &str, endpoints: I, make: F) -> (Self, StaticHandle)
    where
        I: IntoIterator,
        I::Item: Into<Endpoint>,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let counter = |change| {
            metrics_util::counter(
                "tower_scale_discovery_updates_total",
                name,
                "change",
                change,
            )
        };
        let mut source = Static {
            make,
            ops: rx,
            changes: VecDeque::new(),
            current: HashMap::new(),
            inserted: counter("insert"),
            removed: counter("remove"),
        };
        for endpoint in endpoints {
            source.add(endpoint.into());
        }
        (source, StaticHandle { ops: tx })
    }

    fn add(&mut self, endpoint: Endpoint) {
        if let Some(weight) = self.current.get(&endpoint.addr()) {
            let old = weight.swap(endpoint.weight(), Relaxed);
            if old != endpoint.weight() {
                tracing::debug!(%endpoint, old, "endpoint weight changed");
            }
            return;
        }
        let weight = Arc::new(AtomicU32::new(endpoint.weight()));
        let service = Weighted::shared((self.make)(&endpoint), weight.clone());
        self.current.insert(endpoint.addr(), weight);
        self.changes
            .push_back(Change::Insert(endpoint.addr(), service));
        self.inserted.increment(1);
        tracing::info!(%endpoint, "endpoint added");
    }

    fn remove(&mut self, addr: SocketAddr) {
        if self.current.remove(&addr).is_some() {
            self.changes.push_back(Change::Remove(addr));
            self.removed.increment(1);
            tracing::info!(%addr, "endpoint removed");
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Add(endpoint) => self.add(endpoint),
            Op::Remove(addr) => self.remove(addr),
            Op::Replace(set) => {
                let keep: std::collections::HashSet<SocketAddr> =
                    set.iter().map(Endpoint::addr).collect();
                let gone: Vec<SocketAddr> = self
                    .current
                    .keys()
                    .filter(|addr| !keep.contains(addr))
                    .copied()
                    .collect();
                for addr in gone {
                    self.remove(addr);
                }
                for endpoint in set {
                    self.add(endpoint);
                }
            }
        }
    }

    /// The endpoints the source has announced (after the changes it has
    /// emitted so far, and those it is about to).
    pub fn len(&self) -> usize {
        self.current.len()
    }

    /// Whether the source has no endpoint.
    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }
}

// Nothing in a `Static` is ever pinned: the services wait in a heap queue.
impl<F, S> Unpin for Static<F, S> {}

impl<F, S> Stream for Static<F, S>
where
    F: FnMut(&Endpoint) -> S,
{
    type Item = Result<Change<SocketAddr, Weighted<S>>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(change) = this.changes.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match this.ops.poll_recv(cx) {
                Poll::Ready(Some(op)) => this.apply(op),
                // Every handle is gone: nothing can change any more, but the
                // stream must not end (tower's balancer would ignore it).
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<F, S> fmt::Debug for Static<F, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Static")
            .field("endpoints", &self.current.len())
            .field("pending_changes", &self.changes.len())
            .finish_non_exhaustive()
    }
}

impl StaticHandle {
    /// Adds `endpoint`, or changes its weight if it is known (its service
    /// stays).
    pub fn add(&self, endpoint: impl Into<Endpoint>) {
        let _ = self.ops.send(Op::Add(endpoint.into()));
    }

    /// Removes the endpoint at `addr`, if known.
    pub fn remove(&self, addr: SocketAddr) {
        let _ = self.ops.send(Op::Remove(addr));
    }

    /// Makes `endpoints` the whole set: removes the others, adds the new ones,
    /// updates weights; endpoints that stay are not disturbed.
    pub fn replace<I>(&self, endpoints: I)
    where
        I: IntoIterator,
        I::Item: Into<Endpoint>,
    {
        let set = endpoints.into_iter().map(Into::into).collect();
        let _ = self.ops.send(Op::Replace(set));
    }
}

impl fmt::Debug for StaticHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticHandle").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use futures_util::StreamExt as _;

    use super::*;
    use crate::discover::Weight;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 80))
    }

    /// The changes ready now, as `+n` / `-n` (the last byte of the address).
    fn drain<F, S>(source: &mut Static<F, S>) -> Vec<String>
    where
        F: FnMut(&Endpoint) -> S,
    {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        while let Poll::Ready(Some(Ok(change))) = source.poll_next_unpin(&mut cx) {
            out.push(match change {
                Change::Insert(addr, _) => {
                    format!("+{}", addr.ip().to_string().rsplit('.').next().unwrap())
                }
                Change::Remove(addr) => {
                    format!("-{}", addr.ip().to_string().rsplit('.').next().unwrap())
                }
            });
        }
        out
    }

    /// Replacing the set removes only what left and inserts only what is new;
    /// an endpoint that stays keeps its service (no change is emitted for it),
    /// and a new weight reaches that service in place.
    #[test]
    fn replace_leaves_endpoints_that_stay_alone() {
        let made = Arc::new(AtomicUsize::new(0));
        let counter = made.clone();
        let (mut source, handle) = Static::new([addr(1), addr(2)], move |e: &Endpoint| {
            counter.fetch_add(1, Relaxed);
            e.addr()
        });
        let mut weights = Vec::new();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        while let Poll::Ready(Some(Ok(Change::Insert(_, svc)))) = source.poll_next_unpin(&mut cx) {
            weights.push(svc);
        }
        assert_eq!(weights.len(), 2);
        assert_eq!(made.load(Relaxed), 2);

        handle.replace([
            Endpoint::new(addr(2)).with_weight(7),
            Endpoint::new(addr(3)),
        ]);
        assert_eq!(drain(&mut source), ["-1", "+3"]);
        assert_eq!(
            made.load(Relaxed),
            3,
            "only the new endpoint gets a service"
        );
        let kept = weights.iter().find(|s| *s.get_ref() == addr(2)).unwrap();
        assert_eq!(kept.weight(), 7, "the staying service sees its new weight");

        handle.add(addr(3));
        handle.remove(addr(9));
        assert!(
            drain(&mut source).is_empty(),
            "known and unknown: nothing to emit"
        );
        drop(handle);
        assert!(source.poll_next_unpin(&mut cx).is_pending(), "never ends");
    }
}
