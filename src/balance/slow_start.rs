//! Slow start: a newly added endpoint receives a ramping share of traffic.
//!
//! A new instance has cold caches, an unwarmed JIT or connection pools still
//! opening; sending it a full share at once makes its first seconds slow. For
//! a `window` after an endpoint is added, [`SlowStart`] scales its weight (for
//! the weighted policies, through [`Weight`]) by a factor that ramps from
//! `min_share` to 1, then behaves exactly like the endpoint it wraps. For
//! tower's own `Balance`, which reads no weight, turn on
//! [`inflate_load`](SlowStartBuilder::inflate_load): the load is then
//! inflated by the same factor instead. (Not both: under a weighted policy an
//! inflated load makes an idle new endpoint lose every comparison with idle
//! peers, and it would get nothing until the window ends.)
//!
//! The factor follows Envoy's slow start: `max(min_share, (t / window) ^ (1 /
//! aggression))` at `t` after the start. With `aggression` 1 (the default) the
//! ramp is linear; above 1 it rises fast and flattens, below 1 it stays low
//! longer.
//!
//! - **Weight**: the endpoint's weight times the factor, rounded, at least 1
//!   (a weight of 0 stays 0).
//! - **Load**, with `inflate_load`: `(load + 1) / factor − 1`, as if the endpoint had `1 / factor`
//!   times its work. For a peak-EWMA cost (nanoseconds) that is the cost
//!   divided by the factor; for a count of calls in flight, an idle new
//!   endpoint looks like one with `1 / factor − 1` calls, so P2C picks it only
//!   over endpoints at least that busy.
//!
//! The load of the wrapped service must be readable as a number
//! ([`LoadValue`]): use the loads of [`load`](super::load).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::time::Duration;
//! use tower::load::Load;
//! use tower::{service_fn, Layer};
//! use tower_scale::balance::load::Pending;
//! use tower_scale::balance::slow_start::SlowStartLayer;
//! use tower_scale::balance::LoadValue;
//! use tower_scale::discover::{Weight, Weighted};
//!
//! let slow_start = SlowStartLayer::new(Duration::from_secs(60));
//! // In an endpoint factory: the ramp starts when the endpoint is made.
//! let svc = slow_start.layer(Pending::new(Weighted::new(
//!     service_fn(|_: ()| async { Ok::<_, tower::BoxError>(()) }),
//!     100,
//! )));
//! assert_eq!(svc.weight(), 10); // min_share: 10 % at first
//! tokio::time::advance(Duration::from_secs(30)).await;
//! assert_eq!(svc.weight(), 50);
//! assert_eq!(svc.load().value(), 0.0); // the load is left alone by default
//! tokio::time::advance(Duration::from_secs(30)).await;
//! assert_eq!(svc.weight(), 100);
//! # }
//! ```
//!
//! To restart the ramp whenever an endpoint (re)joins the balancer, after an
//! active health check brought it back for instance, wrap the discovery
//! source instead: [`SlowStartLayer::discover`].

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use tokio::time::Instant;
use tower::discover::{Change, Discover};
use tower::load::Load;
use tower::{Layer, Service};

use super::LoadValue;
use crate::discover::Weight;
use crate::error::{or_panic, ConfigError};

#[derive(Clone, Copy, Debug, PartialEq)]
struct Ramp {
    window: Duration,
    aggression: f64,
    min_share: f64,
    inflate_load: bool,
}

impl Ramp {
    fn factor(&self, start: Instant) -> f64 {
        let elapsed = start.elapsed();
        if elapsed >= self.window {
            return 1.0;
        }
        let time = elapsed.as_secs_f64() / self.window.as_secs_f64();
        time.powf(1.0 / self.aggression)
            .max(self.min_share)
            .min(1.0)
    }
}

/// An endpoint whose weight and load ramp up for a window after it was made.
///
/// Made by [`SlowStartLayer`]; clones share the start. See the
/// [module docs](self).
#[derive(Clone)]
pub struct SlowStart<S> {
    inner: S,
    start: Instant,
    ramp: Ramp,
}

impl<S> SlowStart<S> {
    /// The share of its full weight the endpoint gets now (from `min_share`
    /// to 1).
    pub fn factor(&self) -> f64 {
        self.ramp.factor(self.start)
    }

    /// Whether the window is over.
    pub fn is_warm(&self) -> bool {
        self.start.elapsed() >= self.ramp.window
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

impl<S: Service<R>, R> Service<R> for SlowStart<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: R) -> Self::Future {
        self.inner.call(request)
    }
}

impl<S: Weight> Weight for SlowStart<S> {
    fn weight(&self) -> u32 {
        let weight = self.inner.weight();
        if weight == 0 {
            return 0;
        }
        let factor = self.factor();
        if factor >= 1.0 {
            return weight;
        }
        ((f64::from(weight) * factor).round() as u32).max(1)
    }
}

/// The load of a [`SlowStart`]: the inner load, inflated while the endpoint
/// ramps up.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct RampedLoad(f64);

impl LoadValue for RampedLoad {
    #[inline]
    fn value(&self) -> f64 {
        self.0
    }
}

impl<S> Load for SlowStart<S>
where
    S: Load,
    S::Metric: LoadValue,
{
    type Metric = RampedLoad;

    fn load(&self) -> RampedLoad {
        let load = self.inner.load().value();
        if !self.ramp.inflate_load {
            return RampedLoad(load);
        }
        let factor = self.factor();
        if factor >= 1.0 {
            RampedLoad(load)
        } else {
            RampedLoad((load + 1.0) / factor - 1.0)
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for SlowStart<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlowStart")
            .field("inner", &self.inner)
            .field("factor", &self.factor())
            .finish()
    }
}

/// Wraps each service in a [`SlowStart`] whose ramp starts when the layer
/// wraps it.
#[derive(Clone, Copy, Debug)]
pub struct SlowStartLayer {
    ramp: Ramp,
}

impl SlowStartLayer {
    /// A linear ramp over `window`, from 10 % of the full share.
    ///
    /// # Panics
    ///
    /// If `window` is zero; [`try_new`](Self::try_new) returns the error.
    #[track_caller]
    pub fn new(window: Duration) -> Self {
        or_panic("SlowStartLayer::new", Self::try_new(window))
    }

    /// Like [`new`](Self::new), but returns a [`ConfigError`] naming
    /// `window`.
    pub fn try_new(window: Duration) -> Result<Self, ConfigError> {
        Self::builder().window(window).build()
    }

    /// A builder: a 30 s linear ramp from 10 % unless told otherwise.
    pub fn builder() -> SlowStartBuilder {
        SlowStartBuilder {
            ramp: Ramp {
                window: Duration::from_secs(30),
                aggression: 1.0,
                min_share: 0.1,
                inflate_load: false,
            },
        }
    }

    /// Wraps every service `discover` inserts in a [`SlowStart`] starting
    /// then, so the ramp restarts each time an endpoint (re)joins.
    pub fn discover<D: Discover>(self, discover: D) -> SlowStartDiscover<D> {
        SlowStartDiscover {
            inner: discover,
            ramp: self.ramp,
        }
    }
}

impl<S> Layer<S> for SlowStartLayer {
    type Service = SlowStart<S>;

    fn layer(&self, inner: S) -> SlowStart<S> {
        SlowStart {
            inner,
            start: Instant::now(),
            ramp: self.ramp,
        }
    }
}

/// Builds a [`SlowStartLayer`]; from [`SlowStartLayer::builder`].
#[derive(Clone, Debug)]
pub struct SlowStartBuilder {
    ramp: Ramp,
}

impl SlowStartBuilder {
    /// How long the ramp lasts (default 30 s).
    pub fn window(mut self, window: Duration) -> Self {
        self.ramp.window = window;
        self
    }

    /// The exponent of the ramp (default 1, linear): the factor is
    /// `(t / window) ^ (1 / aggression)`.
    pub fn aggression(mut self, aggression: f64) -> Self {
        self.ramp.aggression = aggression;
        self
    }

    /// The share an endpoint gets at least, from its first moment (default
    /// 0.1).
    pub fn min_share(mut self, share: f64) -> Self {
        self.ramp.min_share = share;
        self
    }

    /// Also inflate the load during the ramp (default off): for tower's
    /// `Balance`, which reads no weight. Leave it off under this crate's
    /// weighted policies, which read the ramped weight.
    pub fn inflate_load(mut self, inflate: bool) -> Self {
        self.ramp.inflate_load = inflate;
        self
    }

    /// Checks the settings and builds the layer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `window` (zero), `aggression` (not above
    /// zero) or `min_share` (not in `(0, 1]`).
    pub fn build(self) -> Result<SlowStartLayer, ConfigError> {
        let ramp = self.ramp;
        if ramp.window.is_zero() {
            return Err(ConfigError::new("window", "must be greater than zero"));
        }
        if !(ramp.aggression > 0.0 && ramp.aggression.is_finite()) {
            return Err(ConfigError::new(
                "aggression",
                format!("must be above zero, got {}", ramp.aggression),
            ));
        }
        if !(ramp.min_share > 0.0 && ramp.min_share <= 1.0) {
            return Err(ConfigError::new(
                "min_share",
                format!("must be in (0, 1], got {}", ramp.min_share),
            ));
        }
        Ok(SlowStartLayer { ramp })
    }
}

/// A discovery adapter that wraps every inserted service in a [`SlowStart`]
/// starting at the insert; from [`SlowStartLayer::discover`]. Errors and the
/// end of the inner source pass through.
#[derive(Debug)]
pub struct SlowStartDiscover<D> {
    inner: D,
    ramp: Ramp,
}

impl<D> Stream for SlowStartDiscover<D>
where
    D: Discover + Unpin,
{
    type Item = Result<Change<D::Key, SlowStart<D::Service>>, D::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let change = match ready!(Pin::new(&mut this.inner).poll_discover(cx)) {
            None => return Poll::Ready(None),
            Some(Err(err)) => return Poll::Ready(Some(Err(err))),
            Some(Ok(change)) => change,
        };
        Poll::Ready(Some(Ok(match change {
            Change::Insert(key, inner) => Change::Insert(
                key,
                SlowStart {
                    inner,
                    start: Instant::now(),
                    ramp: this.ramp,
                },
            ),
            Change::Remove(key) => Change::Remove(key),
        })))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;

    use futures::StreamExt;
    use tokio::time::{advance, sleep};
    use tower::balance::p2c::Balance;
    use tower::discover::ServiceList;
    use tower::util::BoxCloneService;
    use tower::{service_fn, BoxError, ServiceExt};

    use super::*;
    use crate::balance::load::Pending;
    use crate::discover::{Endpoint, Static, Weighted};

    const SEC: Duration = Duration::from_secs(1);

    fn weighted(weight: u32) -> Weighted<()> {
        Weighted::new((), weight)
    }

    #[tokio::test(start_paused = true)]
    async fn the_weight_ramps_linearly_over_the_window() {
        let svc = SlowStartLayer::new(10 * SEC).layer(weighted(200));
        assert_eq!(svc.weight(), 20, "min_share");
        advance(3 * SEC).await;
        assert_eq!(svc.weight(), 60);
        advance(5 * SEC).await;
        assert_eq!(svc.weight(), 160);
        assert!(!svc.is_warm());
        advance(2 * SEC).await;
        assert_eq!(svc.weight(), 200);
        assert!(svc.is_warm());
        advance(100 * SEC).await;
        assert_eq!(svc.weight(), 200);
        // A weight of zero stays zero.
        assert_eq!(SlowStartLayer::new(SEC).layer(weighted(0)).weight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn aggression_bends_the_ramp() {
        let layer = SlowStartLayer::builder()
            .window(16 * SEC)
            .aggression(2.0)
            .min_share(0.01)
            .build()
            .unwrap();
        let svc = layer.layer(weighted(100));
        advance(4 * SEC).await;
        assert_eq!(svc.weight(), 50, "(1/4)^(1/2)");
        let svc = SlowStartLayer::builder()
            .window(16 * SEC)
            .aggression(0.5)
            .min_share(0.01)
            .build()
            .unwrap()
            .layer(weighted(100));
        advance(8 * SEC).await;
        assert_eq!(svc.weight(), 25, "(1/2)^2");
    }

    #[tokio::test(start_paused = true)]
    async fn the_load_is_inflated_during_the_window_only() {
        let inflating = SlowStartLayer::builder()
            .window(10 * SEC)
            .inflate_load(true)
            .build()
            .unwrap();
        let plain = SlowStartLayer::new(10 * SEC).layer(Pending::new(service_fn(|()| async {
            Ok::<_, BoxError>(())
        })));
        assert_eq!(plain.load().value(), 0.0, "off by default");
        let mut svc = inflating.layer(Pending::new(service_fn(|()| async {
            sleep(Duration::from_secs(100)).await;
            Ok::<_, BoxError>(())
        })));
        assert_eq!(svc.load().value(), 9.0, "idle at 10 %: like 9 calls");
        let _call = svc.ready().await.unwrap().call(());
        assert_eq!(svc.load().value(), 19.0, "1 call at 10 %: like 19");
        advance(5 * SEC).await;
        assert_eq!(svc.load().value(), 3.0, "1 call at 50 %: like 3");
        advance(5 * SEC).await;
        assert_eq!(svc.load().value(), 1.0);
    }

    #[test]
    fn the_builder_names_the_bad_field() {
        let field = |b: SlowStartBuilder| b.build().unwrap_err().field();
        let b = SlowStartLayer::builder;
        assert_eq!(field(b().window(Duration::ZERO)), "window");
        assert_eq!(field(b().aggression(0.0)), "aggression");
        assert_eq!(field(b().min_share(0.0)), "min_share");
        assert_eq!(field(b().min_share(1.5)), "min_share");
    }

    #[tokio::test(start_paused = true)]
    async fn the_discover_adapter_starts_the_ramp_at_each_insert() {
        let (source, handle) = Static::new(
            ["127.0.0.1:1".parse::<std::net::SocketAddr>().unwrap()],
            |_: &Endpoint| (),
        );
        let mut discover = SlowStartLayer::new(10 * SEC).discover(source);
        let Change::Insert(_, first) = discover.next().await.unwrap().unwrap() else {
            panic!("an insert")
        };
        advance(5 * SEC).await;
        assert_eq!(first.weight(), 50);
        handle.add("127.0.0.1:2".parse::<std::net::SocketAddr>().unwrap());
        let Change::Insert(_, second) = discover.next().await.unwrap().unwrap() else {
            panic!("an insert")
        };
        assert_eq!(second.weight(), 10);
    }

    type Mock = BoxCloneService<(), usize, BoxError>;

    /// P2C over two warm endpoints and one that joins: its share of the calls
    /// ramps up over the window, then is a third.
    #[tokio::test(start_paused = true)]
    async fn p2c_gives_a_new_endpoint_a_ramping_share() {
        let window = 10 * SEC;
        // tower's Balance reads no weight: the load carries the ramp.
        let layer = SlowStartLayer::builder()
            .window(window)
            .inflate_load(true)
            .build()
            .unwrap();
        let endpoint = |id: usize| -> Mock {
            BoxCloneService::new(service_fn(move |()| async move {
                sleep(Duration::from_millis(20)).await;
                Ok::<_, BoxError>(id)
            }))
        };
        let mut warm = vec![
            layer.layer(Pending::new(endpoint(0))),
            layer.layer(Pending::new(endpoint(1))),
        ];
        advance(window).await;
        warm.push(layer.layer(Pending::new(endpoint(2))));
        let mut balance = Balance::new(ServiceList::new(warm));

        // Calls every millisecond; the share of the new one per quarter of the
        // window, then after it.
        let new = Arc::new(AtomicUsize::new(0));
        let mut shares = Vec::new();
        for _ in 0..5 {
            new.store(0, SeqCst);
            let n = 2500;
            for _ in 0..n {
                let fut = balance.ready().await.unwrap().call(());
                let new = new.clone();
                tokio::spawn(async move {
                    if fut.await.unwrap() == 2 {
                        new.fetch_add(1, SeqCst);
                    }
                });
                sleep(Duration::from_millis(1)).await;
            }
            sleep(Duration::from_millis(50)).await;
            shares.push(new.load(SeqCst) as f64 / n as f64);
        }
        eprintln!("share of the new endpoint per quarter, then after: {shares:.3?}");
        assert!(
            shares.windows(2).take(3).all(|w| w[0] < w[1]),
            "rising: {shares:?}"
        );
        assert!(shares[0] < 0.15, "{shares:?}");
        assert!((shares[4] - 1.0 / 3.0).abs() < 0.05, "{shares:?}");
    }

    /// Under this crate's weighted P2C the new endpoint's share ramps with
    /// its weight, even with idle peers and calls one at a time (the load is
    /// left alone).
    #[tokio::test(start_paused = true)]
    async fn weighted_p2c_gives_a_new_endpoint_a_ramping_share() {
        use crate::balance::load::Pending;
        use crate::balance::policy::WeightedP2c;
        use crate::balance::Balancer;
        use crate::discover::{Endpoint, Static};
        use std::net::SocketAddr;

        let addr = |n: u8| SocketAddr::from(([127, 0, 0, n], 80));
        let make = |e: &Endpoint| {
            let addr = e.addr();
            Pending::new(service_fn(move |()| async move { Ok::<_, BoxError>(addr) }))
        };
        let (source, handle) = Static::new([addr(1), addr(2)], make);
        let layer = SlowStartLayer::new(100 * SEC);
        let mut balancer = Balancer::new(layer.discover(source), WeightedP2c::with_seed(7));
        for _ in 0..10 {
            balancer.ready().await.unwrap().call(()).await.unwrap();
        }
        advance(200 * SEC).await; // the first two are warm
        handle.add(addr(3));
        let mut shares = Vec::new();
        for _ in 0..5 {
            let mut new = 0;
            for _ in 0..200 {
                if balancer.ready().await.unwrap().call(()).await.unwrap() == addr(3) {
                    new += 1;
                }
                advance(Duration::from_millis(100)).await;
            }
            shares.push(new as f64 / 200.0);
        }
        let mut after = 0;
        for _ in 0..600 {
            if balancer.ready().await.unwrap().call(()).await.unwrap() == addr(3) {
                after += 1;
            }
        }
        let after = after as f64 / 600.0;
        println!("new endpoint's share per fifth of the window: {shares:?}, then {after:.3}");
        assert!(shares[0] > 0.0 && shares[0] < 0.15, "{shares:?}");
        assert!(shares[4] > shares[0] + 0.1, "{shares:?}");
        assert!((after - 1.0 / 3.0).abs() < 0.08, "{after}");
    }
}
