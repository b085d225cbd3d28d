//! The state one drain shares between its handle, its layers and their
//! services: a phase, an in-flight count and a notification for waiters.
//!
//! The hot path is one `fetch_add` and one load when a call starts, and one
//! `fetch_sub` and one load when it ends; the notification (a lock) is touched
//! only once a drain has started.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics_util::{self, Reason};

/// Serving: readiness is up, every call is admitted.
pub(crate) const SERVING: u8 = 0;
/// Started: readiness is down, calls are still admitted until the delay ends.
pub(crate) const STARTED: u8 = 1;
/// Refusing: new calls get `Draining`; the server should stop accepting.
pub(crate) const REFUSING: u8 = 2;

pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) readiness_delay: Duration,
    phase: AtomicU8,
    in_flight: AtomicUsize,
    /// Calls that ended (in any way) after the drain started.
    completed: AtomicU64,
    /// Calls refused with `Draining`.
    refused: AtomicU64,
    started_at: OnceLock<Instant>,
    /// Woken on every phase change, and when in-flight reaches zero after the
    /// drain started.
    changed: Notify,
    metrics: OnceLock<Metrics>,
}

struct Metrics {
    draining: Gauge,
    in_flight: Gauge,
    refused: Counter,
}

impl Shared {
    pub(crate) fn new(name: String, readiness_delay: Duration) -> Arc<Self> {
        Arc::new(Shared {
            name,
            readiness_delay,
            phase: AtomicU8::new(SERVING),
            in_flight: AtomicUsize::new(0),
            completed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            started_at: OnceLock::new(),
            changed: Notify::new(),
            metrics: OnceLock::new(),
        })
    }

    /// The metric handles, registered on first use under the final name.
    fn metrics(&self) -> &Metrics {
        self.metrics.get_or_init(|| {
            let draining = metrics_util::gauge("tower_scale_draining", &self.name);
            draining.set(0.0);
            Metrics {
                draining,
                in_flight: metrics_util::gauge("tower_scale_drain_in_flight", &self.name),
                refused: metrics_util::rejected(&self.name, Reason::Draining),
            }
        })
    }

    /// Registers the metrics now, so they are exported before the first call.
    pub(crate) fn register(&self) {
        self.metrics();
    }

    pub(crate) fn phase(&self) -> u8 {
        self.phase.load(SeqCst)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(SeqCst)
    }

    pub(crate) fn completed(&self) -> u64 {
        self.completed.load(SeqCst)
    }

    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(SeqCst)
    }

    pub(crate) fn started_at(&self) -> Option<Instant> {
        self.started_at.get().copied()
    }

    /// When refusals begin, once the drain has started; `None` before, or
    /// when the delay is too long to add to the clock (refusals then begin
    /// only through `refuse_now`).
    pub(crate) fn refuse_at(&self) -> Option<Instant> {
        self.started_at()?.checked_add(self.readiness_delay)
    }

    /// Starts the drain; false if it had already started.
    pub(crate) fn start(&self) -> bool {
        let now = Instant::now();
        let _ = self.started_at.set(now);
        if self
            .phase
            .compare_exchange(SERVING, STARTED, SeqCst, SeqCst)
            .is_err()
        {
            return false;
        }
        self.metrics().draining.set(1.0);
        tracing::info!(
            name = %self.name,
            in_flight = self.in_flight(),
            readiness_delay = ?self.readiness_delay,
            "drain started: readiness is down"
        );
        self.changed.notify_waiters();
        self.refuse_if_due();
        true
    }

    /// Moves to refusing if the readiness delay has passed; true when refusing.
    pub(crate) fn refuse_if_due(&self) -> bool {
        match self.phase() {
            SERVING => false,
            REFUSING => true,
            _ => match self.refuse_at() {
                Some(at) if Instant::now() >= at => self.refuse_now(),
                _ => false,
            },
        }
    }

    /// Moves to refusing now (the readiness delay is cut short when a drain's
    /// timeout passes first); always true.
    pub(crate) fn refuse_now(&self) -> bool {
        if self
            .phase
            .compare_exchange(STARTED, REFUSING, SeqCst, SeqCst)
            .is_ok()
        {
            tracing::info!(
                name = %self.name,
                in_flight = self.in_flight(),
                "drain refusing new calls"
            );
            self.changed.notify_waiters();
        }
        true
    }

    /// Counts a call in, or refuses it (false) once refusals have begun.
    ///
    /// The count goes up before the phase is read, and a drain moves the phase
    /// before it reads the count, so a drain that sees zero in flight cannot
    /// miss a call that was admitted.
    #[inline]
    pub(crate) fn enter(&self) -> bool {
        self.in_flight.fetch_add(1, SeqCst);
        if self.phase() != SERVING && self.refuse_if_due() {
            self.leave(false);
            self.refused.fetch_add(1, SeqCst);
            self.metrics().refused.increment(1);
            return false;
        }
        self.metrics().in_flight.increment(1.0);
        true
    }

    /// Counts a call out; `admitted` is false for a call that `enter` refused.
    #[inline]
    pub(crate) fn leave(&self, admitted: bool) {
        if admitted {
            self.metrics().in_flight.decrement(1.0);
        }
        let before = self.in_flight.fetch_sub(1, SeqCst);
        if self.phase() != SERVING {
            if admitted {
                self.completed.fetch_add(1, SeqCst);
            }
            if before == 1 {
                self.changed.notify_waiters();
            }
        }
    }

    /// Waits for the next change, checking `done` first without losing a
    /// notification sent in between.
    pub(crate) async fn wait_until(&self, mut done: impl FnMut(&Self) -> bool) {
        loop {
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if done(self) {
                return;
            }
            notified.await;
        }
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("name", &self.name)
            .field("phase", &phase_name(self.phase()))
            .field("in_flight", &self.in_flight())
            .field("readiness_delay", &self.readiness_delay)
            .finish()
    }
}

pub(crate) fn phase_name(phase: u8) -> &'static str {
    match phase {
        SERVING => "serving",
        STARTED => "started",
        _ => "refusing",
    }
}
