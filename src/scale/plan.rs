//! Capacity planning from Little's law.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::advisor::ceil_count;
use crate::error::{or_panic, ConfigError};

/// How many instances a load needs, from Little's law.
///
/// Calls in flight on average over the whole service are `L = λ × S` (the
/// arrival rate times the mean service time). One instance runs at most `c`
/// calls at once, and should run at a fraction `U` of that, so the service
/// needs `N = ceil(λ × S / (c × U))` instances, and each then runs at a
/// utilisation of `λ × S / (N × c)`, at most `U`.
///
/// This is the steady state the [`ScaleAdvisor`](super::ScaleAdvisor) with a
/// [`Target::Utilisation`](super::Target::Utilisation) of `U` reaches (up to
/// its tolerance) when each instance's utilisation is its share of `λ × S`
/// over its limit `c`. See the [module docs](crate::scale#capacity-planning)
/// for an example.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CapacityPlan {
    /// The arrival rate λ, in calls per second.
    pub rate_per_sec: f64,
    /// The mean service time S, in milliseconds.
    pub mean_service_time_ms: f64,
    /// The calls one instance runs at once (its concurrency limit) c.
    pub concurrency_per_instance: u32,
    /// The utilisation to plan for U, above 0 and at most 1.
    pub target_utilisation: f64,
    /// `λ × S`: calls in flight on average, over the service.
    pub mean_in_flight: f64,
    /// `ceil(λ × S / (c × U))`: the instances needed (0 when λ or S is 0).
    pub instances: u32,
    /// `λ × S / (instances × c)`: the utilisation each instance then runs at
    /// (0 with no instance).
    pub utilisation: f64,
}

impl CapacityPlan {
    /// The plan for `rate_per_sec` calls per second taking
    /// `mean_service_time` each, on instances that run
    /// `concurrency_per_instance` calls at once, kept at
    /// `target_utilisation`.
    ///
    /// # Panics
    ///
    /// On the errors of [`try_new`](Self::try_new).
    #[track_caller]
    pub fn new(
        rate_per_sec: f64,
        mean_service_time: Duration,
        concurrency_per_instance: u32,
        target_utilisation: f64,
    ) -> Self {
        or_panic(
            "CapacityPlan::new",
            Self::try_new(
                rate_per_sec,
                mean_service_time,
                concurrency_per_instance,
                target_utilisation,
            ),
        )
    }

    /// Like [`new`](Self::new), but returns a [`ConfigError`] naming
    /// `rate_per_sec` (negative or not finite), `concurrency_per_instance`
    /// (0) or `target_utilisation` (not above 0 and at most 1).
    pub fn try_new(
        rate_per_sec: f64,
        mean_service_time: Duration,
        concurrency_per_instance: u32,
        target_utilisation: f64,
    ) -> Result<Self, ConfigError> {
        if !rate_per_sec.is_finite() || rate_per_sec < 0.0 {
            return Err(ConfigError::new(
                "rate_per_sec",
                format!("must be 0 or more, got {rate_per_sec}"),
            ));
        }
        if concurrency_per_instance == 0 {
            return Err(ConfigError::new(
                "concurrency_per_instance",
                "must be at least 1",
            ));
        }
        if !(target_utilisation > 0.0 && target_utilisation <= 1.0) {
            return Err(ConfigError::new(
                "target_utilisation",
                format!("must be above 0 and at most 1, got {target_utilisation}"),
            ));
        }
        let mean_in_flight = rate_per_sec * mean_service_time.as_secs_f64();
        let concurrency = f64::from(concurrency_per_instance);
        let instances = ceil_count(mean_in_flight / (concurrency * target_utilisation));
        let utilisation = if instances == 0 {
            0.0
        } else {
            mean_in_flight / (f64::from(instances) * concurrency)
        };
        Ok(CapacityPlan {
            rate_per_sec,
            mean_service_time_ms: mean_service_time.as_secs_f64() * 1000.0,
            concurrency_per_instance,
            target_utilisation,
            mean_in_flight,
            instances,
            utilisation,
        })
    }
}
