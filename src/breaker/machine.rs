//! The breaker's shared state: the state machine under a mutex, and the state
//! and generation in one atomic word so that the Closed path reads one atomic.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use metrics::{Counter, Gauge};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::window::{Outcomes, Totals};
use super::{BreakerConfig, EjectionBudget, Outcome, State, Window};
use crate::metrics_util::{self, Reason};
use crate::wait_list::{lock, WaitList};

pub(crate) struct Breaker {
    pub(crate) config: BreakerConfig,
    pub(crate) fail_fast: bool,
    /// `state as u64 | generation << 3`.
    word: AtomicU64,
    machine: Mutex<Machine>,
    /// Not-ready services parked while the breaker admits nothing.
    waiters: Mutex<WaitList>,
    waiting: AtomicUsize,
    tx: watch::Sender<State>,
    budget: Option<Arc<dyn EjectionBudget>>,
    timed_start: bool,
    /// Quick successes recorded without the lock: `generation as u32` in the
    /// high half, a count in the low half; folded into the window under the
    /// lock before anything reads it.
    pending: AtomicU64,
    /// Whether a quick success may take the lock-free path: Closed, a count
    /// window already holding `minimum_calls`, no ejection budget.
    settled: std::sync::atomic::AtomicBool,
    state_gauge: Gauge,
    calls: [Counter; 3],
    pub(crate) rejected: Counter,
    denied: Counter,
}

struct Machine {
    state: State,
    generation: u64,
    window: Outcomes,
    consecutive_failures: u32,
    /// Trips in a row without closing in between, for the backoff.
    reopenings: u32,
    open_until: Option<Instant>,
    holds_budget: bool,
    probes_admitted: u32,
    probes_done: u32,
    probe_failures: u32,
    probe_slow: u32,
    denials: u64,
    jitter_seed: u64,
    /// The state changed or a probe's place freed: wake parked tasks once the
    /// lock is released (a waker may run its task inline).
    pending_wake: bool,
}

struct MachineGuard<'a> {
    guard: Option<std::sync::MutexGuard<'a, Machine>>,
    breaker: &'a Breaker,
}

impl std::ops::Deref for MachineGuard<'_> {
    type Target = Machine;

    fn deref(&self) -> &Machine {
        self.guard.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for MachineGuard<'_> {
    fn deref_mut(&mut self) -> &mut Machine {
        self.guard.as_mut().expect("held until drop")
    }
}

/// A breaker that goes away while open (its endpoint left the balancer)
/// gives its place in the ejection budget back, so the group's budget is not
/// spent on endpoints that no longer exist.
impl Drop for Breaker {
    fn drop(&mut self) {
        let machine = self.machine.get_mut().unwrap_or_else(|e| e.into_inner());
        let held = std::mem::take(&mut machine.holds_budget);
        if let Some(budget) = &self.budget {
            if held {
                budget.release();
            }
            budget.left();
        }
    }
}

impl Drop for MachineGuard<'_> {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else {
            return;
        };
        let wake = std::mem::take(&mut guard.pending_wake);
        drop(guard);
        if wake {
            self.breaker.wake_waiters();
        }
    }
}

const STATE_BITS: u64 = 3;

/// A deadline too far for the clock means: until reset by hand.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 86_400);

fn encode(state: State, generation: u64) -> u64 {
    state as u64 | (generation << STATE_BITS)
}

fn decode(word: u64) -> (State, u64) {
    let state = match word & ((1 << STATE_BITS) - 1) {
        0 => State::Closed,
        1 => State::Open,
        2 => State::HalfOpen,
        3 => State::ForcedOpen,
        _ => State::Disabled,
    };
    (state, word >> STATE_BITS)
}

/// Why a call was not admitted.
pub(crate) struct Refused {
    pub(crate) retry_after: Option<Duration>,
}

impl Breaker {
    pub(crate) fn new(
        config: BreakerConfig,
        fail_fast: bool,
        budget: Option<Arc<dyn EjectionBudget>>,
    ) -> Self {
        let now = Instant::now();
        let window = match config.window {
            Window::Count(n) => Outcomes::count(n),
            Window::Time { duration, buckets } => Outcomes::time(duration, buckets, now),
        };
        if let Some(budget) = &budget {
            budget.joined();
        }
        let name = config.name.as_str();
        let state_gauge = metrics_util::gauge("tower_scale_breaker_state", name);
        state_gauge.set(0.0);
        let outcome = |value| {
            metrics_util::counter("tower_scale_breaker_calls_total", name, "outcome", value)
        };
        Breaker {
            word: AtomicU64::new(encode(State::Closed, 0)),
            machine: Mutex::new(Machine {
                state: State::Closed,
                generation: 0,
                window,
                consecutive_failures: 0,
                reopenings: 0,
                open_until: None,
                holds_budget: false,
                probes_admitted: 0,
                probes_done: 0,
                probe_failures: 0,
                probe_slow: 0,
                denials: 0,
                jitter_seed: 0x9e37_79b9_7f4a_7c15,
                pending_wake: false,
            }),
            waiters: Mutex::new(WaitList::default()),
            waiting: AtomicUsize::new(0),
            tx: watch::Sender::new(State::Closed),
            budget,
            timed_start: config.slow_call_duration.is_some(),
            pending: AtomicU64::new(0),
            settled: std::sync::atomic::AtomicBool::new(false),
            state_gauge,
            calls: [outcome("success"), outcome("failure"), outcome("ignored")],
            rejected: metrics_util::rejected(name, Reason::CircuitOpen),
            denied: metrics_util::counter(
                "tower_scale_breaker_denied_total",
                name,
                "reason",
                "ejection_budget",
            ),
            fail_fast,
            config,
        }
    }

    pub(crate) fn state(&self) -> State {
        decode(self.word.load(Ordering::Acquire)).0
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<State> {
        self.tx.subscribe()
    }

    pub(crate) fn denials(&self) -> u64 {
        lock(&self.machine).denials
    }

    pub(crate) fn totals(&self) -> Totals {
        let mut machine = lock(&self.machine);
        self.fold(&mut machine);
        let now = machine.window.needs_clock().then(Instant::now);
        machine.window.totals(now)
    }

    /// Moves the quick successes recorded without the lock into the window.
    fn fold(&self, m: &mut Machine) {
        let tag = u64::from(m.generation as u32);
        let pending = self.pending.swap(tag << 32, Ordering::AcqRel);
        if pending >> 32 == tag {
            let successes = pending & u64::from(u32::MAX);
            if successes > 0 {
                m.window.record_successes(successes);
                m.consecutive_failures = 0;
            }
        }
    }

    /// The lock-free path for a quick success once the window is settled: a
    /// success that is not slow cannot raise a rate, so it needs no judging,
    /// only counting. False if the call must take the lock.
    #[inline]
    fn record_quick_success(&self, generation: u64) -> bool {
        if !self.settled.load(Ordering::Acquire) {
            return false;
        }
        let tag = u64::from(generation as u32);
        let mut current = self.pending.load(Ordering::Acquire);
        loop {
            if current >> 32 != tag || current & u64::from(u32::MAX) >= u64::from(u32::MAX - 1) {
                return false;
            }
            match self.pending.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Admits a call, or says why not. The Closed path reads one atomic (and the
    /// clock, if the slow-call rule is on).
    pub(crate) fn admit(self: &Arc<Self>) -> Result<Completion, Refused> {
        let (state, generation) = decode(self.word.load(Ordering::Acquire));
        match state {
            State::Closed | State::Disabled => Ok(Completion {
                breaker: Some(self.clone()),
                generation,
                probe: false,
                start: self.timed_start.then(Instant::now),
            }),
            State::ForcedOpen => Err(Refused { retry_after: None }),
            State::Open | State::HalfOpen => self.admit_slow(),
        }
    }

    #[cold]
    fn admit_slow(self: &Arc<Self>) -> Result<Completion, Refused> {
        let now = Instant::now();
        let mut m = self.lock_machine();
        if m.state == State::Open {
            match m.open_until {
                // The timer may not have run (no runtime, or not yet polled).
                Some(until) if now >= until => {
                    self.transition(&mut m, State::HalfOpen, "open duration elapsed")
                }
                until => {
                    return Err(Refused {
                        retry_after: Some(until.map_or(Duration::ZERO, |u| u - now)),
                    })
                }
            }
        }
        match m.state {
            State::HalfOpen if m.probes_admitted < self.config.half_open_calls => {
                m.probes_admitted += 1;
                Ok(Completion {
                    breaker: Some(self.clone()),
                    generation: m.generation,
                    probe: true,
                    start: self.timed_start.then_some(now),
                })
            }
            State::HalfOpen => Err(Refused { retry_after: None }),
            State::Closed | State::Disabled => Ok(Completion {
                breaker: Some(self.clone()),
                generation: m.generation,
                probe: false,
                start: self.timed_start.then_some(now),
            }),
            State::Open | State::ForcedOpen => Err(Refused { retry_after: None }),
        }
    }

    /// Not-ready mode: admits, or parks the task until the state changes.
    pub(crate) fn poll_admit(
        self: &Arc<Self>,
        waiter: &mut Option<u64>,
        timer: &mut Option<Pin<Box<Sleep>>>,
        cx: &mut Context<'_>,
    ) -> Poll<Completion> {
        if let Ok(completion) = self.admit() {
            self.leave_waiters(waiter);
            return Poll::Ready(completion);
        }
        {
            let mut waiters = lock(&self.waiters);
            match *waiter {
                Some(id) if waiters.update(id, cx.waker()) => {}
                _ => {
                    *waiter = Some(waiters.push(cx.waker()));
                    self.waiting.store(waiters.len(), Ordering::SeqCst);
                }
            }
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        // The state may have changed before the task was parked.
        match self.admit() {
            Ok(completion) => {
                self.leave_waiters(waiter);
                *timer = None;
                Poll::Ready(completion)
            }
            Err(refused) => {
                // Open: besides the breaker's own timer (armed on the runtime
                // that saw the trip, which may be gone), wake this task when
                // the open duration ends, on its own runtime.
                if let Some(after) = refused.retry_after {
                    if tokio::runtime::Handle::try_current().is_ok() {
                        let now = Instant::now();
                        let deadline = now.checked_add(after).unwrap_or(now + FAR_FUTURE);
                        let sleep = timer
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                        if sleep.deadline() != deadline {
                            sleep.as_mut().reset(deadline);
                        }
                        if sleep.as_mut().poll(cx).is_ready() {
                            cx.waker().wake_by_ref();
                        }
                    }
                }
                Poll::Pending
            }
        }
    }

    pub(crate) fn leave_waiters(&self, waiter: &mut Option<u64>) {
        if let Some(id) = waiter.take() {
            let mut waiters = lock(&self.waiters);
            waiters.remove(id);
            self.waiting.store(waiters.len(), Ordering::SeqCst);
        }
    }

    fn record(
        self: &Arc<Self>,
        generation: u64,
        probe: bool,
        start: Option<Instant>,
        outcome: Outcome,
    ) {
        self.calls[outcome as usize].increment(1);
        let now = (start.is_some() || self.needs_clock(probe)).then(Instant::now);
        let slow = match (start, now, self.config.slow_call_duration) {
            (Some(start), Some(now), Some(limit)) => {
                outcome != Outcome::Ignored && now - start >= limit
            }
            _ => false,
        };
        if outcome == Outcome::Success && !slow && !probe && self.record_quick_success(generation) {
            return;
        }
        let wake = {
            let mut m = lock(&self.machine);
            self.record_locked(&mut m, generation, probe, outcome, slow, now);
            std::mem::take(&mut m.pending_wake)
        };
        if wake {
            self.wake_waiters();
        }
    }

    #[inline]
    fn record_locked(
        self: &Arc<Self>,
        m: &mut Machine,
        generation: u64,
        probe: bool,
        outcome: Outcome,
        slow: bool,
        now: Option<Instant>,
    ) {
        let failed = outcome == Outcome::Failure;
        self.fold(m);
        if m.generation != generation {
            return;
        }
        match m.state {
            State::Closed => {
                if outcome == Outcome::Ignored {
                    return;
                }
                // Once a count window holds `minimum_calls`, a success that is
                // not slow cannot raise either rate: no need to judge it
                // (unless a budget denied a trip: it is asked again).
                let settled = self.budget.is_none()
                    && matches!(m.window, Outcomes::Count { .. })
                    && m.window.totals(None).calls >= self.config.minimum_calls;
                m.window.record(failed, slow, now);
                m.consecutive_failures = if failed {
                    m.consecutive_failures.saturating_add(1)
                } else {
                    0
                };
                if failed || slow || !settled {
                    self.judge_closed(m);
                }
                let settled = m.state == State::Closed
                    && self.budget.is_none()
                    && matches!(m.window, Outcomes::Count { .. })
                    && m.window.totals(None).calls >= self.config.minimum_calls;
                self.settled.store(settled, Ordering::Release);
            }
            State::HalfOpen if probe => {
                if outcome == Outcome::Ignored {
                    // The probe told nothing: give its place to another.
                    m.probes_admitted -= 1;
                    m.pending_wake = true;
                    return;
                }
                m.probes_done += 1;
                m.probe_failures += u32::from(failed);
                m.probe_slow += u32::from(slow);
                self.judge_half_open(m);
            }
            _ => {}
        }
    }

    fn needs_clock(&self, probe: bool) -> bool {
        !probe && matches!(self.config.window, Window::Time { .. })
    }

    fn judge_closed(self: &Arc<Self>, m: &mut Machine) {
        let config = &self.config;
        if let Some(n) = config.consecutive_failures {
            if m.consecutive_failures >= n {
                let reason = format!("{} failures in a row", m.consecutive_failures);
                return self.trip(m, &reason);
            }
        }
        // Judged right after a call was recorded at `now`: the window is up
        // to date, no need to look at the clock again.
        let totals = m.window.recorded_totals();
        if totals.calls < config.minimum_calls {
            return;
        }
        if totals.failure_rate() >= config.failure_rate {
            let reason = format!(
                "failure rate {:.3} >= {} over {} calls",
                totals.failure_rate(),
                config.failure_rate,
                totals.calls
            );
            self.trip(m, &reason);
        } else if config.slow_call_duration.is_some() && totals.slow_rate() >= config.slow_call_rate
        {
            let reason = format!(
                "slow-call rate {:.3} >= {} over {} calls",
                totals.slow_rate(),
                config.slow_call_rate,
                totals.calls
            );
            self.trip(m, &reason);
        }
    }

    fn judge_half_open(self: &Arc<Self>, m: &mut Machine) {
        let config = &self.config;
        let n = config.half_open_calls;
        if m.probes_done < n {
            return;
        }
        let failure_rate = f64::from(m.probe_failures) / f64::from(n);
        let slow_rate = f64::from(m.probe_slow) / f64::from(n);
        if failure_rate >= config.failure_rate
            || (config.slow_call_duration.is_some() && slow_rate >= config.slow_call_rate)
        {
            m.reopenings = m.reopenings.saturating_add(1);
            let reason = format!(
                "{} of {n} probes failed, {} slow",
                m.probe_failures, m.probe_slow
            );
            self.open(m, &reason);
        } else {
            let reason = format!("{} of {n} probes failed", m.probe_failures);
            self.transition(m, State::Closed, &reason);
        }
    }

    /// Closed to Open, if the ejection budget allows it.
    fn trip(self: &Arc<Self>, m: &mut Machine, reason: &str) {
        if let Some(budget) = &self.budget {
            if !budget.try_open() {
                m.denials += 1;
                self.denied.increment(1);
                tracing::debug!(breaker = %self.config.name, reason, "breaker would open, but the ejection budget is spent");
                return;
            }
            m.holds_budget = true;
        }
        m.reopenings = 0;
        self.open(m, reason);
    }

    fn open(self: &Arc<Self>, m: &mut Machine, reason: &str) {
        let mut duration = self.config.open_for(m.reopenings);
        if let Some(backoff) = self.config.backoff.filter(|b| b.jitter > 0.0) {
            // xorshift: cheap, and different breakers drift apart.
            m.jitter_seed ^= m.jitter_seed << 13;
            m.jitter_seed ^= m.jitter_seed >> 7;
            m.jitter_seed ^= m.jitter_seed << 17;
            let unit = (m.jitter_seed >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
            let factor = 1.0 + backoff.jitter * (2.0 * unit - 1.0);
            duration = Duration::try_from_secs_f64(duration.as_secs_f64() * factor)
                .unwrap_or(Duration::MAX);
        }
        let now = Instant::now();
        // A duration too long for the clock means: until reset by hand.
        let until = now.checked_add(duration).unwrap_or(now + FAR_FUTURE);
        m.open_until = Some(until);
        self.transition(m, State::Open, reason);
        // Move to HalfOpen when the time comes, without waiting for a request.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let breaker: Weak<Breaker> = Arc::downgrade(self);
            let generation = m.generation;
            runtime.spawn(async move {
                tokio::time::sleep_until(until).await;
                if let Some(breaker) = breaker.upgrade() {
                    breaker.open_elapsed(generation);
                }
            });
        }
    }

    fn open_elapsed(&self, generation: u64) {
        let mut m = self.lock_machine();
        if m.generation == generation && m.state == State::Open {
            self.transition(&mut m, State::HalfOpen, "open duration elapsed");
        }
    }

    /// Every state change goes through here: a new generation, the atomic word,
    /// subscribers, metrics, one tracing event, and a wake-up for parked tasks.
    fn transition(&self, m: &mut Machine, to: State, reason: &str) {
        let from = m.state;
        m.state = to;
        m.generation += 1;
        m.probes_admitted = 0;
        m.probes_done = 0;
        m.probe_failures = 0;
        m.probe_slow = 0;
        match to {
            State::Closed | State::Disabled | State::ForcedOpen => {
                if to == State::Closed {
                    m.reopenings = 0;
                }
                m.window.clear();
                m.consecutive_failures = 0;
                m.open_until = None;
            }
            State::HalfOpen => m.open_until = None,
            State::Open => {}
        }
        if m.holds_budget && matches!(to, State::Closed | State::Disabled) {
            m.holds_budget = false;
            if let Some(budget) = &self.budget {
                budget.release();
            }
        }
        // Quick successes of the old state are not counted in the new one.
        self.settled.store(false, Ordering::Release);
        self.pending
            .store(u64::from(m.generation as u32) << 32, Ordering::Release);
        self.word.store(encode(to, m.generation), Ordering::Release);
        self.tx.send_replace(to);
        self.state_gauge.set(to as u8 as f64);
        metrics::counter!(
            "tower_scale_breaker_transitions_total",
            "name" => self.config.name.clone(),
            "from" => from.as_str(),
            "to" => to.as_str(),
        )
        .increment(1);
        match to {
            State::Open | State::ForcedOpen => {
                tracing::warn!(breaker = %self.config.name, from = from.as_str(), to = to.as_str(), reason, "circuit breaker opened")
            }
            _ => {
                tracing::info!(breaker = %self.config.name, from = from.as_str(), to = to.as_str(), reason, "circuit breaker state changed")
            }
        }
        // Woken once the machine lock is released (a waker may run its task
        // inline, and that task may come back to the breaker).
        m.pending_wake = true;
    }

    fn wake_waiters(&self) {
        // Pairs with the fence in `poll_admit`: either this load sees the new
        // waiter, or the waiter's second look sees the new state.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let wakers = lock(&self.waiters).wakers();
            for waker in wakers {
                waker.wake();
            }
        }
    }

    /// Locks the state machine; parked tasks are woken after it is unlocked.
    fn lock_machine(&self) -> MachineGuard<'_> {
        MachineGuard {
            guard: Some(lock(&self.machine)),
            breaker: self,
        }
    }

    pub(crate) fn set(&self, to: State, reason: &str) {
        let mut m = self.lock_machine();
        self.transition(&mut m, to, reason);
    }

    fn release_probe(&self, generation: u64) {
        let mut m = self.lock_machine();
        if m.generation == generation && m.state == State::HalfOpen {
            m.probes_admitted -= 1;
            m.pending_wake = true;
        }
    }
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.config.name)
            .field("state", &self.state())
            .field("fail_fast", &self.fail_fast)
            .finish()
    }
}

/// An admitted call, to be classified when it ends. Dropping it unrecorded (the
/// caller went away) records nothing and gives a probe's place back.
#[must_use = "an admitted call should be recorded"]
pub struct Call {
    inner: Completion,
}

pub(crate) struct Completion {
    breaker: Option<Arc<Breaker>>,
    generation: u64,
    probe: bool,
    start: Option<Instant>,
}

impl Completion {
    /// Whether the breaker is still in the state (generation) that admitted
    /// this call.
    pub(crate) fn is_current(&self) -> bool {
        self.breaker.as_ref().is_some_and(|breaker| {
            decode(breaker.word.load(Ordering::Acquire)).1 == self.generation
        })
    }

    pub(crate) fn into_call(self) -> Call {
        Call { inner: self }
    }
}

impl Call {
    /// Records how the call went.
    pub fn record(mut self, outcome: Outcome) {
        if let Some(breaker) = self.inner.breaker.take() {
            breaker.record(
                self.inner.generation,
                self.inner.probe,
                self.inner.start,
                outcome,
            );
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(breaker) = self.breaker.take() {
            if self.probe {
                breaker.release_probe(self.generation);
            }
        }
    }
}

impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("probe", &self.inner.probe)
            .finish_non_exhaustive()
    }
}
