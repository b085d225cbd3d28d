use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tower::Layer;

use super::shared::{Config, Shared};
use super::{Order, Queue, QueueHandle};
use crate::error::{or_panic, ConfigError};
use crate::metrics_util::DEFAULT_NAME;

/// Puts one shared, bounded admission queue in front of every service it wraps.
///
/// See the [module docs](crate::queue) for an example.
#[derive(Clone)]
pub struct QueueLayer {
    config: Config,
    /// The shared queue, made on first use so that builder methods register
    /// metrics only under the final name; clones share it.
    shared: Arc<OnceLock<Arc<Shared>>>,
}

impl QueueLayer {
    /// A FIFO queue with room for `capacity` waiting requests; a request not
    /// dispatched within `timeout` is answered with
    /// [`QueueTimeout`](crate::error::QueueTimeout).
    ///
    /// # Panics
    ///
    /// If `capacity` or `timeout` is zero; [`try_new`](Self::try_new) returns the
    /// error instead.
    #[track_caller]
    pub fn new(capacity: usize, timeout: Duration) -> Self {
        or_panic("QueueLayer::new", Self::try_new(capacity, timeout))
    }

    /// Like [`new`](Self::new), but returns a [`ConfigError`] naming `capacity`
    /// or `timeout`.
    pub fn try_new(capacity: usize, timeout: Duration) -> Result<Self, ConfigError> {
        if capacity == 0 {
            return Err(ConfigError::new("capacity", "must be at least 1"));
        }
        if timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be greater than zero"));
        }
        Ok(Self::from_config(Config {
            capacity,
            timeout,
            order: Order::Fifo,
            backpressure: false,
            name: DEFAULT_NAME.to_owned(),
        }))
    }

    fn from_config(config: Config) -> Self {
        QueueLayer {
            config,
            shared: Arc::default(),
        }
    }

    fn reconfigure(self, change: impl FnOnce(&mut Config)) -> Self {
        let mut config = self.config;
        change(&mut config);
        Self::from_config(config)
    }

    /// The shared queue, made by the first service or handle.
    fn shared(&self) -> &Arc<Shared> {
        self.shared
            .get_or_init(|| Arc::new(Shared::new(self.config.clone())))
    }

    /// Sets the dispatch order (default [`Order::Fifo`]).
    ///
    /// # Panics
    ///
    /// If an [`Order::AdaptiveLifo`] target or interval is zero;
    /// [`try_order`](Self::try_order) returns the error instead.
    #[track_caller]
    pub fn order(self, order: Order) -> Self {
        or_panic("QueueLayer::order", self.try_order(order))
    }

    /// Like [`order`](Self::order), but returns a [`ConfigError`] naming
    /// `order.target` or `order.interval`.
    pub fn try_order(self, order: Order) -> Result<Self, ConfigError> {
        order.validate()?;
        Ok(self.reconfigure(|c| c.order = order))
    }

    /// Makes `poll_ready` Pending while the queue is full, instead of answering
    /// [`QueueFull`](crate::error::QueueFull) from `call`.
    ///
    /// For stacks that honour readiness (a [`LoadShed`](crate::shed) in front, a
    /// tower `Buffer`, a balancer). Do not use it directly under axum or hyper,
    /// which drive `poll_ready` inside each request: there a Pending is a wait
    /// with no bound.
    pub fn backpressure(self) -> Self {
        self.reconfigure(|c| c.backpressure = true)
    }

    /// Sets the `name` label of this layer's metrics (default `"default"`).
    ///
    /// Like every builder method here, this starts a new queue: configure the
    /// layer before cloning or using it.
    pub fn name(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.reconfigure(|c| c.name = name)
    }

    /// A handle on the shared queue.
    pub fn handle(&self) -> QueueHandle {
        QueueHandle::new(self.shared().clone())
    }
}

impl<S> Layer<S> for QueueLayer {
    type Service = Queue<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Queue::with_shared(inner, self.shared().clone())
    }
}

impl fmt::Debug for QueueLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("QueueLayer").field(&self.config).finish()
    }
}
