use std::fmt;
use std::sync::{Arc, OnceLock};

use tower::Layer;

use super::machine::Breaker;
use super::{BreakerConfig, BreakerHandle, CircuitBreaker, EjectionBudget, ErrorsAreFailures};
use crate::error::{or_panic, ConfigError};

/// Puts one shared circuit breaker in front of every service it wraps.
///
/// See the [module docs](crate::breaker) for examples.
#[derive(Clone)]
pub struct CircuitBreakerLayer<C = ErrorsAreFailures> {
    config: BreakerConfig,
    fail_fast: bool,
    budget: Option<Arc<dyn EjectionBudget>>,
    classifier: C,
    /// Made on first use, so builder methods register metrics once; clones
    /// share it.
    breaker: Arc<OnceLock<Arc<Breaker>>>,
}

impl CircuitBreakerLayer {
    /// A fail-fast breaker with `config`; every `Err` counts as a failure.
    ///
    /// # Panics
    ///
    /// If `config` is invalid (a config from [`BreakerConfig::builder`] has been
    /// checked already); [`try_new`](Self::try_new) returns the error instead.
    #[track_caller]
    pub fn new(config: BreakerConfig) -> Self {
        or_panic("CircuitBreakerLayer::new", Self::try_new(config))
    }

    /// Like [`new`](Self::new), but returns the [`ConfigError`].
    pub fn try_new(config: BreakerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(CircuitBreakerLayer {
            config,
            fail_fast: true,
            budget: None,
            classifier: ErrorsAreFailures::default(),
            breaker: Arc::default(),
        })
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// Not-ready mode, for an endpoint inside a balancer: while the breaker
    /// admits nothing, `poll_ready` is Pending (never an error), so the
    /// balancer routes around the endpoint and keeps it.
    pub fn not_ready(self) -> Self {
        CircuitBreakerLayer {
            fail_fast: false,
            breaker: Arc::default(),
            ..self
        }
    }

    /// Decides what counts as a failure (default: every `Err`).
    pub fn classify<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2> {
        CircuitBreakerLayer {
            config: self.config,
            fail_fast: self.fail_fast,
            budget: self.budget,
            classifier,
            breaker: Arc::default(),
        }
    }

    /// Asks `budget` before opening; denied, the breaker stays closed and
    /// counts the denial.
    pub fn budget(self, budget: Arc<dyn EjectionBudget>) -> Self {
        CircuitBreakerLayer {
            budget: Some(budget),
            breaker: Arc::default(),
            ..self
        }
    }

    fn breaker(&self) -> &Arc<Breaker> {
        self.breaker.get_or_init(|| {
            Arc::new(Breaker::new(
                self.config.clone(),
                self.fail_fast,
                self.budget.clone(),
            ))
        })
    }

    /// A handle on the shared breaker: its state, transitions, and manual
    /// control.
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle::new(self.breaker().clone())
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::with_shared(inner, self.breaker().clone(), self.classifier.clone())
    }
}

impl<C> fmt::Debug for CircuitBreakerLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("config", &self.config)
            .field("fail_fast", &self.fail_fast)
            .field("budget", &self.budget.is_some())
            .finish()
    }
}
