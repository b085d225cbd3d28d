use std::time::Duration;

use crate::error::ConfigError;

/// Which calls the failure and slow-call rates are computed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The last `n` calls.
    Count(u32),
    /// The calls of the last `duration`, kept in `buckets` buckets (fixed
    /// memory; the window slides one bucket at a time).
    Time {
        /// How far back the window reaches.
        duration: Duration,
        /// How many buckets it is kept in.
        buckets: u32,
    },
}

impl Window {
    /// The calls of the last `duration`, in 10 buckets.
    pub const fn time(duration: Duration) -> Self {
        Window::Time {
            duration,
            buckets: 10,
        }
    }
}

/// Exponential backoff of the open duration when the breaker trips again and
/// again without closing in between.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// Each further trip multiplies the open duration by this (at least 1).
    pub multiplier: f64,
    /// The open duration never exceeds this.
    pub max: Duration,
    /// Spread each open duration by up to this fraction either way (0 to 1),
    /// so breakers of many clients do not probe in step.
    pub jitter: f64,
}

/// Settings of a [`CircuitBreakerLayer`](super::CircuitBreakerLayer); see the
/// [module docs](super#settings) for their defaults and resilience4j names.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    pub(crate) failure_rate: f64,
    pub(crate) slow_call_rate: f64,
    pub(crate) slow_call_duration: Option<Duration>,
    pub(crate) consecutive_failures: Option<u32>,
    pub(crate) window: Window,
    pub(crate) minimum_calls: u32,
    pub(crate) open_duration: Duration,
    pub(crate) backoff: Option<Backoff>,
    pub(crate) half_open_calls: u32,
    pub(crate) name: String,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_rate: 0.5,
            slow_call_rate: 1.0,
            slow_call_duration: None,
            consecutive_failures: None,
            window: Window::Count(100),
            minimum_calls: 20,
            open_duration: Duration::from_secs(30),
            backoff: None,
            half_open_calls: 5,
            name: crate::metrics_util::DEFAULT_NAME.to_owned(),
        }
    }
}

impl BreakerConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> BreakerConfigBuilder {
        BreakerConfigBuilder {
            config: BreakerConfig::default(),
        }
    }

    /// The `name` label of the breaker's metrics.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same settings under another metrics name.
    #[cfg(feature = "balance")]
    pub(crate) fn renamed(&self, name: String) -> BreakerConfig {
        BreakerConfig {
            name,
            ..self.clone()
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let rate = |field, value: f64| {
            if (0.0..=1.0).contains(&value) && value > 0.0 {
                Ok(())
            } else {
                Err(ConfigError::new(
                    field,
                    format!("must be in (0, 1], got {value}"),
                ))
            }
        };
        rate("failure_rate", self.failure_rate)?;
        rate("slow_call_rate", self.slow_call_rate)?;
        if self.slow_call_duration.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new(
                "slow_call_duration",
                "must be greater than zero",
            ));
        }
        if self.consecutive_failures == Some(0) {
            return Err(ConfigError::new(
                "consecutive_failures",
                "must be at least 1",
            ));
        }
        match self.window {
            Window::Count(n) if n > 1_000_000 => {
                return Err(ConfigError::new(
                    "window",
                    "a count window keeps a byte per call: at most 1 000 000 calls",
                ))
            }
            Window::Time { buckets, .. } if buckets > 10_000 => {
                return Err(ConfigError::new("window", "at most 10 000 buckets"))
            }
            Window::Count(0) => return Err(ConfigError::new("window", "a count window needs at least 1 call")),
            Window::Count(n) if self.minimum_calls > n => {
                return Err(ConfigError::new(
                    "minimum_calls",
                    format!("{} is larger than the count window of {n} calls, so no rate would ever be judged", self.minimum_calls),
                ))
            }
            Window::Time { duration, .. } if duration.is_zero() => {
                return Err(ConfigError::new("window", "a time window must be longer than zero"))
            }
            Window::Time { buckets: 0, .. } => {
                return Err(ConfigError::new("window", "a time window needs at least 1 bucket"))
            }
            _ => {}
        }
        if self.minimum_calls == 0 {
            return Err(ConfigError::new("minimum_calls", "must be at least 1"));
        }
        if self.open_duration.is_zero() {
            return Err(ConfigError::new(
                "open_duration",
                "must be greater than zero",
            ));
        }
        if self.half_open_calls == 0 {
            return Err(ConfigError::new("half_open_calls", "must be at least 1"));
        }
        if let Some(backoff) = self.backoff {
            if !(backoff.multiplier >= 1.0 && backoff.multiplier.is_finite()) {
                return Err(ConfigError::new("backoff.multiplier", "must be at least 1"));
            }
            if backoff.max < self.open_duration {
                return Err(ConfigError::new(
                    "backoff.max",
                    "must be at least `open_duration`",
                ));
            }
            if !(0.0..=1.0).contains(&backoff.jitter) {
                return Err(ConfigError::new("backoff.jitter", "must be in [0, 1]"));
            }
        }
        Ok(())
    }

    /// How long the breaker stays open after its `trips`-th trip in a row
    /// (0 for the first), before jitter.
    pub(crate) fn open_for(&self, trips: u32) -> Duration {
        match self.backoff {
            None => self.open_duration,
            Some(backoff) => {
                let factor = backoff.multiplier.powi(trips.min(64) as i32);
                let secs =
                    (self.open_duration.as_secs_f64() * factor).min(backoff.max.as_secs_f64());
                Duration::try_from_secs_f64(secs).unwrap_or(backoff.max)
            }
        }
    }
}

/// Builds a [`BreakerConfig`]; [`build`](Self::build) checks every field.
#[derive(Clone, Debug)]
pub struct BreakerConfigBuilder {
    config: BreakerConfig,
}

impl BreakerConfigBuilder {
    /// The failure rate (0 to 1) at or above which the breaker opens
    /// (default 0.5).
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.config.failure_rate = rate;
        self
    }

    /// Counts successful calls slower than `duration` as slow, and opens the
    /// breaker when the slow-call rate reaches `rate` (default: off).
    pub fn slow_calls(mut self, duration: Duration, rate: f64) -> Self {
        self.config.slow_call_duration = Some(duration);
        self.config.slow_call_rate = rate;
        self
    }

    /// Also opens after `n` failures in a row, whatever the window says
    /// (default: off).
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.config.consecutive_failures = Some(n);
        self
    }

    /// The window the rates are computed over (default the last 100 calls).
    pub fn window(mut self, window: Window) -> Self {
        self.config.window = window;
        self
    }

    /// How many calls the window must hold before a rate is judged
    /// (default 20).
    pub fn minimum_calls(mut self, n: u32) -> Self {
        self.config.minimum_calls = n;
        self
    }

    /// How long the breaker stays open before it lets probes through
    /// (default 30 s).
    pub fn open_duration(mut self, duration: Duration) -> Self {
        self.config.open_duration = duration;
        self
    }

    /// Backs the open duration off when probes fail again and again
    /// (default: off).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = Some(backoff);
        self
    }

    /// How many probes HalfOpen lets through at once, and judges before it
    /// closes or opens again (default 5).
    pub fn half_open_calls(mut self, n: u32) -> Self {
        self.config.half_open_calls = n;
        self
    }

    /// The `name` label of the breaker's metrics (default `"default"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// Checks every field; the error names the first bad one.
    pub fn build(self) -> Result<BreakerConfig, ConfigError> {
        self.config.validate()?;
        Ok(self.config)
    }
}
