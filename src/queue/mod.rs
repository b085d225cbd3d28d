//! A bounded admission queue with a timeout in front of a service that is not
//! ready: FIFO, LIFO, or adaptive LIFO.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_scale::limit::ConcurrencyLimitLayer;
//! use tower_scale::queue::{Order, QueueLayer, QueueTimeout};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let queue = QueueLayer::new(32, Duration::from_millis(100)).order(Order::adaptive_lifo());
//! let mut svc = ServiceBuilder::new()
//!     .layer(queue)
//!     .layer(ConcurrencyLimitLayer::new(1))
//!     .service(service_fn(|ms: u64| async move {
//!         tokio::time::sleep(Duration::from_millis(ms)).await;
//!         Ok::<_, std::convert::Infallible>(ms)
//!     }));
//!
//! // The first call takes the only permit for a second...
//! let slow = svc.ready().await.unwrap().call(1_000);
//! // ...so the next one waits in the queue and gives up after 100 ms.
//! let queued = svc.ready().await.unwrap().call(1);
//! let (slow, queued) = tokio::join!(slow, queued);
//! assert_eq!(slow.unwrap(), 1_000);
//! assert!(queued.unwrap_err().is::<QueueTimeout>());
//! # }
//! ```
//!
//! # Behaviour
//!
//! - **Direct when possible.** When nothing is queued and the inner service is
//!   ready, a call goes straight through: no allocation, no task hop, no timer.
//!   A request that waits costs its timer (one allocation) and a clone of the
//!   inner service, and no task hop.
//! - **Otherwise it queues**, if fewer than `capacity` requests wait; else it
//!   fails at once with [`QueueFull`]. A queued request that is not dispatched
//!   within `timeout` fails with [`QueueTimeout`] and never reaches the inner
//!   service. A caller that drops its future leaves the queue at once.
//! - **No worker task.** Queued requests wait in their own futures; the queue
//!   gives one of them at a time the *turn*, and only that one polls its inner
//!   service's readiness. When it is dispatched (or leaves), the order picks the
//!   next. The turn is not taken back from a waiting entry when a newer request
//!   arrives: under LIFO, the newest request *at the moment the previous one
//!   leaves* goes next.
//! - **`poll_ready` is always Ready** by default, so it is safe under axum and
//!   hyper, which drive readiness inside each request. With
//!   [`backpressure`](QueueLayer::backpressure), `poll_ready` is Pending while
//!   the queue is full; if another caller takes the last place between
//!   `poll_ready` and `call`, the call still gets [`QueueFull`].
//!
//! # Order
//!
//! - [`Order::Fifo`]: oldest first. Fair, but under sustained overload every
//!   admitted request waits nearly the whole timeout.
//! - [`Order::Lifo`]: newest first. Under overload the newest requests are
//!   served quickly and the oldest time out, but a short burst is served in
//!   reverse.
//! - [`Order::AdaptiveLifo`]: FIFO while the queue drains, newest-first while a
//!   queue *stands*: when the age of the oldest waiting request stayed above
//!   `target` (default 5 ms) over a whole `interval` (default 100 ms), in the
//!   manner of CoDel. Back to FIFO as soon as the oldest waiting request is
//!   younger than the target, or the queue empties.
//!
//! # Ordering with other layers
//!
//! Put the queue in front of a [`ConcurrencyLimit`](crate::limit): the limit
//! decides how much runs, the queue how long the rest may wait. With
//! [`backpressure`](QueueLayer::backpressure), a [`LoadShed`](crate::shed) in
//! front turns a full queue into an immediate
//! [`Overloaded`](crate::error::Overloaded); without it the queue answers
//! [`QueueFull`] itself and a `LoadShed` in front never sheds.
//!
//! # Differences from `tower::buffer`
//!
//! tower's `Buffer` also bounds a queue, but sends every request through a worker
//! task (a task hop and a channel per call, even when the service is idle), has
//! no timeout (a request waits until the inner service takes it, however stale),
//! and is always FIFO. It also exists to make a service `Clone`; this queue needs
//! a `Clone` inner service.
//!
//! # Cancel safety
//!
//! Dropping a [`ResponseFuture`](future::ResponseFuture) while it waits removes
//! the request from the queue and passes its turn on; after dispatch, dropping it
//! drops the inner service's future. A queued future that is kept but no longer
//! polled keeps its place, and its turn if it has it, until its timeout passes;
//! then the queue drops it (checked whenever another request arrives or is
//! polled), and the future answers [`QueueTimeout`] if it is ever polled.
//!
//! # Metrics
//!
//! - `tower_scale_queue_depth{name}` (gauge): requests waiting.
//! - `tower_scale_queue_wait_seconds{name}` (histogram): how long dispatched
//!   requests waited (requests that went straight through are not recorded).
//! - `tower_scale_rejected_total{name, reason="queue_full"|"queue_timeout"}`.

mod codel;
mod layer;
mod service;
mod shared;

pub mod future;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use self::layer::QueueLayer;
pub use self::service::Queue;
pub use crate::error::{QueueFull, QueueTimeout};

use self::shared::Shared;
use crate::error::ConfigError;

/// The order in which queued requests are dispatched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Order {
    /// Oldest first.
    #[default]
    Fifo,
    /// Newest first.
    Lifo,
    /// Oldest first while the queue drains, newest first while a queue stands
    /// (see the [module docs](crate::queue#order)).
    AdaptiveLifo {
        /// Queue delay above which a queue counts as standing (default 5 ms).
        target: Duration,
        /// How long the delay must stay above `target` (default 100 ms).
        interval: Duration,
    },
}

impl Order {
    /// [`Order::AdaptiveLifo`] with the default 5 ms target and 100 ms interval.
    pub const fn adaptive_lifo() -> Self {
        Order::AdaptiveLifo {
            target: Duration::from_millis(5),
            interval: Duration::from_millis(100),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Order::AdaptiveLifo { target, interval } = self {
            if target.is_zero() {
                return Err(ConfigError::new(
                    "order.target",
                    "must be greater than zero",
                ));
            }
            if interval.is_zero() {
                return Err(ConfigError::new(
                    "order.interval",
                    "must be greater than zero",
                ));
            }
        }
        Ok(())
    }
}

/// Reads the figures of a shared queue at run time.
///
/// Got from [`QueueLayer::handle`] or [`Queue::handle`].
#[derive(Clone)]
pub struct QueueHandle {
    shared: Arc<Shared>,
}

impl QueueHandle {
    fn new(shared: Arc<Shared>) -> Self {
        QueueHandle { shared }
    }

    /// Requests waiting now.
    pub fn depth(&self) -> usize {
        self.shared.len()
    }

    /// How many requests may wait at once.
    pub fn capacity(&self) -> usize {
        self.shared.config.capacity
    }

    /// How long a request may wait.
    pub fn timeout(&self) -> Duration {
        self.shared.config.timeout
    }

    /// The configured order.
    pub fn order(&self) -> Order {
        self.shared.config.order
    }

    /// With [`Order::AdaptiveLifo`], whether a standing queue was detected and
    /// newest requests go first now; always false for the other orders.
    pub fn is_standing(&self) -> bool {
        self.shared.standing()
    }

    /// The `name` label of the queue's metrics.
    pub fn name(&self) -> &str {
        &self.shared.config.name
    }
}

impl fmt::Debug for QueueHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("QueueHandle").field(&self.shared).finish()
    }
}

#[cfg(test)]
mod tests;
