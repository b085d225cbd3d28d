//! Discovery-driven balancing around `tower::balance`: endpoint factories,
//! policies, failure-aware load, active health checks, outlier ejection and
//! slow start (feature `balance`).

/// A load metric as a number, so that policies can weigh it (compare
/// `load / weight`). tower's own metrics (`PendingRequests`' `Count`,
/// `PeakEwma`'s `Cost`) keep their number private, so the weighted policies
/// take the loads of [`load`] (or any metric implementing this).
pub trait LoadValue: PartialOrd {
    /// The load as a non-negative number; lesser is less loaded.
    fn value(&self) -> f64;
}

impl LoadValue for f64 {
    fn value(&self) -> f64 {
        *self
    }
}

impl LoadValue for usize {
    fn value(&self) -> f64 {
        *self as f64
    }
}

impl LoadValue for u32 {
    fn value(&self) -> f64 {
        f64::from(*self)
    }
}

pub mod health;
pub mod load;
pub mod policy;
pub mod slow_start;

mod endpoint;
pub use self::endpoint::{Connection, HttpEndpoint, HttpEndpointBuilder, HttpEndpointService};

mod wait;
pub use self::wait::{ReadyTimeout, ReadyTimeoutLayer};
