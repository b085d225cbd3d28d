//! Discovery-driven balancing around `tower::balance`: endpoint factories,
//! policies, failure-aware load, active health checks, outlier ejection and
//! slow start (feature `balance`).

pub mod health;
pub mod load;
pub mod policy;
pub mod slow_start;

mod wait;
pub use self::wait::{ReadyTimeout, ReadyTimeoutLayer};
