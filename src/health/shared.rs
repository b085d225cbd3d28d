//! The state every clone of one [`HealthChecks`](super::HealthChecks) shares:
//! the checks with their last results, counts of those not passing (so that
//! readiness is two atomic loads), and the background loop.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use metrics::Gauge;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use super::check::{Check, Outcome, Standing};
use crate::drain::Drain;

pub(crate) struct Shared {
    pub(crate) interval: Duration,
    pub(crate) checks: Vec<Check>,
    pub(crate) drain: Option<Drain>,
    /// Critical checks that are not passing (failing, or no result yet).
    critical_down: AtomicUsize,
    /// Non-critical checks that are not passing.
    optional_down: AtomicUsize,
    /// The background loop, once spawned.
    task: Mutex<Option<AbortHandle>>,
    spawned: AtomicBool,
    warned_unspawned: AtomicBool,
}

impl Shared {
    pub(crate) fn new(interval: Duration, checks: Vec<Check>, drain: Option<Drain>) -> Self {
        let critical = checks.iter().filter(|check| check.critical).count();
        Shared {
            interval,
            critical_down: AtomicUsize::new(critical),
            optional_down: AtomicUsize::new(checks.len() - critical),
            checks,
            drain,
            task: Mutex::new(None),
            spawned: AtomicBool::new(false),
            warned_unspawned: AtomicBool::new(false),
        }
    }

    pub(crate) fn critical_down(&self) -> usize {
        self.critical_down.load(SeqCst)
    }

    pub(crate) fn optional_down(&self) -> usize {
        self.optional_down.load(SeqCst)
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.drain.as_ref().is_some_and(Drain::is_draining)
    }

    /// Starts the loop unless it runs; the handle on the loop that runs.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub(crate) fn spawn(self: &Arc<Self>) -> AbortHandle {
        let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = task.as_ref().filter(|handle| !handle.is_finished()) {
            return handle.clone();
        }
        // Registered here rather than in the task, so a recorder installed
        // for this thread (or globally) before `spawn` sees them.
        let gauges: Vec<Gauge> = self
            .checks
            .iter()
            .map(|check| metrics::gauge!("tower_scale_health_check", "name" => check.name.clone()))
            .collect();
        let weak = Arc::downgrade(self);
        let handle = tokio::spawn(async move {
            let mut loops = JoinSet::new();
            for (index, gauge) in gauges.into_iter().enumerate() {
                loops.spawn(run_check(weak.clone(), index, gauge));
            }
            drop(weak);
            while loops.join_next().await.is_some() {}
        })
        .abort_handle();
        *task = Some(handle.clone());
        self.spawned.store(true, SeqCst);
        handle
    }

    /// Logs once when a probe is answered while the checks have never been
    /// started.
    pub(crate) fn warn_if_unspawned(&self) {
        if !self.checks.is_empty()
            && !self.spawned.load(SeqCst)
            && !self.warned_unspawned.swap(true, SeqCst)
        {
            tracing::warn!(
                "health probe answered before `HealthChecks::spawn`: the checks have not run, \
                 so critical checks report `pending` and readiness stays down"
            );
        }
    }

    /// Stores the end of one run of check `index`, and logs and exports a
    /// change of standing.
    fn record(&self, index: usize, result: Result<(), String>, latency: Duration, gauge: &Gauge) {
        let check = &self.checks[index];
        let mut state = check.state();
        let before = state.standing();
        match &result {
            Ok(()) => state.consecutive_failures = 0,
            Err(_) => state.consecutive_failures = state.consecutive_failures.saturating_add(1),
        }
        let failures = state.consecutive_failures;
        state.last = Some(Outcome {
            error: result.err(),
            latency,
            finished_at: Instant::now(),
        });
        let after = state.standing();
        // Counted under the check's lock, so the counts follow the standings
        // even if two loops briefly overlap (a respawn after an abort).
        let down = if check.critical {
            &self.critical_down
        } else {
            &self.optional_down
        };
        match (before == Standing::Pass, after == Standing::Pass) {
            (false, true) => {
                down.fetch_sub(1, SeqCst);
            }
            (true, false) => {
                down.fetch_add(1, SeqCst);
            }
            _ => {}
        }
        let error = state
            .last
            .as_ref()
            .and_then(|last| last.error.clone())
            .unwrap_or_default();
        drop(state);

        gauge.set(if after == Standing::Pass { 1.0 } else { 0.0 });
        let name = check.name.as_str();
        let critical = check.critical;
        match (before, after) {
            (Standing::Fail, Standing::Pass) => {
                tracing::info!(check = name, critical, ?latency, "health check recovered")
            }
            (Standing::Pending, Standing::Pass) => {
                tracing::debug!(check = name, critical, ?latency, "health check passing")
            }
            (Standing::Pending | Standing::Pass, Standing::Fail) => tracing::warn!(
                check = name,
                critical,
                error = %error,
                "health check failing"
            ),
            (Standing::Fail, Standing::Fail) => tracing::debug!(
                check = name,
                critical,
                error = %error,
                consecutive_failures = failures,
                "health check still failing"
            ),
            _ => {}
        }
    }
}

/// Runs check `index` at once, then at every tick of the interval, until every
/// handle on the checks is gone. A run still going at a tick moves the next run
/// to the first tick after it ends, so runs of one check never overlap and
/// never follow each other back to back.
async fn run_check(shared: Weak<Shared>, index: usize, gauge: Gauge) {
    let mut tick = Instant::now();
    loop {
        let period = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let started = Instant::now();
            let result = shared.checks[index].run_once().await;
            shared.record(index, result, started.elapsed(), &gauge);
            shared.interval
        };
        tick = next_tick(tick, period, Instant::now());
        tokio::time::sleep_until(tick).await;
    }
}

/// The first tick at or after `now` on the schedule `tick + k * period`
/// (k ≥ 1).
fn next_tick(tick: Instant, period: Duration, now: Instant) -> Instant {
    // About 30 years, as tokio's own "far future": a huge interval or a
    // schedule past what `Instant` holds means "not again soon".
    let far = || now + Duration::from_secs(86_400 * 365 * 30);
    let Some(next) = tick.checked_add(period) else {
        return far();
    };
    if next >= now {
        return next;
    }
    let period_nanos = period.as_nanos().max(1);
    let behind = (now - next).as_nanos();
    let missed = behind.div_ceil(period_nanos);
    u32::try_from(missed)
        .ok()
        .and_then(|missed| period.checked_mul(missed))
        .and_then(|skip| next.checked_add(skip))
        .unwrap_or_else(far)
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthChecks")
            .field("interval", &self.interval)
            .field("checks", &self.checks)
            .field("drain", &self.drain)
            .field("critical_down", &self.critical_down())
            .field("optional_down", &self.optional_down())
            .finish()
    }
}
