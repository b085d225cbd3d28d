//! Every rejection a tower-scale layer can answer with, in one place.
//!
//! Fallible layers return [`BoxError`], tower's convention; recover the reason
//! with [`downcast_ref`](std::error::Error) or `is::<T>()`:
//!
//! ```
//! use tower_scale::error::{BoxError, QueueFull, QueueTimeout};
//!
//! fn describe(err: &BoxError) -> &'static str {
//!     if err.is::<QueueTimeout>() {
//!         "waited too long in the queue"
//!     } else if err.is::<QueueFull>() {
//!         "the queue was full"
//!     } else {
//!         "something else"
//!     }
//! }
//!
//! let err: BoxError = QueueFull::new().into();
//! assert_eq!(describe(&err), "the queue was full");
//! ```
//!
//! The `http` module maps each of them to a response (503 with `Retry-After` for
//! the rejections here, 504 for tower's timeout, 500 for anything else).

use std::fmt;

/// Alias for a type-erased error type, tower's convention.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The inner service was not ready and the call was refused at once.
///
/// This is tower's own `Overloaded`, re-exported, so handlers that already know
/// it (and tonic, which maps it to `RESOURCE_EXHAUSTED`) keep working.
pub use tower::load_shed::error::Overloaded;

/// The admission queue was full when the call arrived; the request never reached
/// the inner service.
#[derive(Default)]
pub struct QueueFull {
    _p: (),
}

impl QueueFull {
    /// Constructs a new `QueueFull` error.
    pub const fn new() -> Self {
        QueueFull { _p: () }
    }
}

impl fmt::Debug for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("QueueFull")
    }
}

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("admission queue full")
    }
}

impl std::error::Error for QueueFull {}

/// The request waited in the admission queue for the whole queue timeout without
/// being dispatched; it never reached the inner service.
#[derive(Default)]
pub struct QueueTimeout {
    _p: (),
}

impl QueueTimeout {
    /// Constructs a new `QueueTimeout` error.
    pub const fn new() -> Self {
        QueueTimeout { _p: () }
    }
}

impl fmt::Debug for QueueTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("QueueTimeout")
    }
}

impl fmt::Display for QueueTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("timed out waiting in the admission queue")
    }
}

impl std::error::Error for QueueTimeout {}

/// The circuit breaker is open (or half open with every probe taken, or forced
/// open): the call was refused without reaching the inner service.
pub struct CircuitOpen {
    retry_after: Option<std::time::Duration>,
}

impl CircuitOpen {
    /// Constructs a new `CircuitOpen` error; `retry_after` is the time until the
    /// breaker lets probes through, if known.
    pub const fn new(retry_after: Option<std::time::Duration>) -> Self {
        CircuitOpen { retry_after }
    }

    /// The time until the breaker next lets probes through; `None` when it is
    /// forced open or every probe is taken.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }
}

impl fmt::Debug for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitOpen")
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("circuit breaker open")
    }
}

impl std::error::Error for CircuitOpen {}

/// The service is draining before shutdown: the call was refused without
/// reaching the inner service, so it is safe to send again to another instance.
#[derive(Default)]
pub struct Draining {
    _p: (),
}

impl Draining {
    /// Constructs a new `Draining` error.
    pub const fn new() -> Self {
        Draining { _p: () }
    }
}

impl fmt::Debug for Draining {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Draining")
    }
}

impl fmt::Display for Draining {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("service is draining")
    }
}

impl std::error::Error for Draining {}

/// No endpoint of a balancer became ready within the configured wait: the
/// request was not sent anywhere.
#[derive(Default)]
pub struct NoEndpoints {
    _p: (),
}

impl NoEndpoints {
    /// Constructs a new `NoEndpoints` error.
    pub const fn new() -> Self {
        NoEndpoints { _p: () }
    }
}

impl fmt::Debug for NoEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NoEndpoints")
    }
}

impl fmt::Display for NoEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no endpoint became ready in time")
    }
}

impl std::error::Error for NoEndpoints {}

/// An invalid configuration value, found when a layer was built.
///
/// It names the field, so `try_new` and `build` callers can report exactly what
/// to fix:
///
/// ```
/// use tower_scale::limit::ConcurrencyLimitLayer;
///
/// let err = ConcurrencyLimitLayer::try_new(0).unwrap_err();
/// assert_eq!(err.field(), "limit");
/// assert_eq!(err.to_string(), "invalid `limit`: must be at least 1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: &'static str,
    reason: String,
}

impl ConfigError {
    /// Constructs an error for `field`, saying what is wrong with it.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError {
            field,
            reason: reason.into(),
        }
    }

    /// The configuration field that holds the bad value.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What is wrong with the value.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid `{}`: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Unwraps a constructor result, panicking with the error (which names the field).
#[track_caller]
pub(crate) fn or_panic<T>(what: &str, result: Result<T, ConfigError>) -> T {
    match result {
        Ok(value) => value,
        Err(err) => panic!("{what}: {err}"),
    }
}
