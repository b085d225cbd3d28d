use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::check::{erase, Check, CheckFn};
use super::shared::Shared;
use super::HealthChecks;
use crate::drain::Drain;
use crate::error::{BoxError, ConfigError};

/// Builds [`HealthChecks`]; [`build`](Self::build) checks every setting.
///
/// See the [module docs](super) for an example.
pub struct HealthChecksBuilder {
    interval: Duration,
    checks: Vec<Registered>,
    drain: Option<Drain>,
}

struct Registered {
    name: String,
    critical: bool,
    timeout: Duration,
    run: CheckFn,
}

impl HealthChecksBuilder {
    pub(crate) fn new() -> Self {
        HealthChecksBuilder {
            interval: Duration::from_secs(10),
            checks: Vec::new(),
            drain: None,
        }
    }

    /// How often every check runs (default 10 s). The first runs start when
    /// [`HealthChecks::spawn`] is called. Must be greater than zero.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Adds a critical check: while it fails (or before its first run ends),
    /// the health endpoint and readiness answer 503.
    ///
    /// `check` makes one run's future; it ends with `Ok` (any value) when the
    /// dependency is healthy, and with an error (anything that converts into a
    /// [`BoxError`]: `std::io::Error`, a `String`, `&'static str`, ...) when it
    /// is not. A run that has not ended after `timeout` is dropped and counts
    /// as failed. `name` must be unique and not empty, and `timeout` greater
    /// than zero.
    ///
    /// The future must not block its thread: it runs on the runtime like any
    /// task, and `timeout` can only cut it at an `.await`. Put blocking work
    /// in `tokio::task::spawn_blocking`.
    pub fn critical<F, Fut, T, E>(
        self,
        name: impl Into<String>,
        timeout: Duration,
        check: F,
    ) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.add(name.into(), true, timeout, erase(check))
    }

    /// Adds a non-critical check: while it fails, the report's status is
    /// `"warn"` but the health endpoint and readiness still answer 200.
    /// Otherwise as [`critical`](Self::critical).
    pub fn optional<F, Fut, T, E>(
        self,
        name: impl Into<String>,
        timeout: Duration,
        check: F,
    ) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.add(name.into(), false, timeout, erase(check))
    }

    /// Makes readiness follow `drain`: 503 once [`Drain::is_draining`]. The
    /// health report shows it as `"draining"` without changing its status.
    pub fn drain(mut self, drain: &Drain) -> Self {
        self.drain = Some(drain.clone());
        self
    }

    fn add(mut self, name: String, critical: bool, timeout: Duration, run: CheckFn) -> Self {
        self.checks.push(Registered {
            name,
            critical,
            timeout,
            run,
        });
        self
    }

    /// Checks the settings and makes the checks; no check runs until
    /// [`HealthChecks::spawn`].
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field: `interval` when it is zero;
    /// `checks` for an empty or repeated check name; `checks.timeout` (the
    /// reason names the check) for a zero timeout.
    pub fn build(self) -> Result<HealthChecks, ConfigError> {
        if self.interval.is_zero() {
            return Err(ConfigError::new("interval", "must be greater than zero"));
        }
        let mut names = HashSet::new();
        for check in &self.checks {
            if check.name.is_empty() {
                return Err(ConfigError::new("checks", "a check needs a name"));
            }
            if !names.insert(check.name.as_str()) {
                return Err(ConfigError::new(
                    "checks",
                    format!("two checks are named {:?}", check.name),
                ));
            }
            if check.timeout.is_zero() {
                return Err(ConfigError::new(
                    "checks.timeout",
                    format!("check {:?}: must be greater than zero", check.name),
                ));
            }
        }
        let checks = self
            .checks
            .into_iter()
            .map(|check| Check::new(check.name, check.critical, check.timeout, check.run))
            .collect();
        Ok(HealthChecks {
            shared: Arc::new(Shared::new(self.interval, checks, self.drain)),
        })
    }
}

impl fmt::Debug for HealthChecksBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Names<'a>(&'a [Registered]);

        impl fmt::Debug for Names<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list()
                    .entries(self.0.iter().map(|check| &check.name))
                    .finish()
            }
        }

        f.debug_struct("HealthChecksBuilder")
            .field("interval", &self.interval)
            .field("checks", &Names(&self.checks))
            .field("drain", &self.drain)
            .finish()
    }
}
