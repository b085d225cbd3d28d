//! The shared limit: an atomic in-flight count, a limit, and a fair list of the
//! services waiting for a permit.
//!
//! The uncontended path is one compare-and-swap to take a permit and one
//! `fetch_sub` to give it back; the mutex is touched only while someone waits.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use metrics::Gauge;

use crate::metrics_util;
use crate::wait_list::{lock, WaitList, WakeBatch};

/// Parked waiters, and those a releaser already took a permit for.
#[derive(Debug, Default)]
struct Waiters {
    list: WaitList,
    granted: Vec<u64>,
}

impl Waiters {
    /// Takes free permits for the waiters at the front, in order, and collects
    /// their wakers; true if the batch filled up and more may be granted.
    ///
    /// Handing the permit over (rather than waking the front waiter to take
    /// it) means a waiter that stops polling pins at most the one permit taken
    /// for it, and gives it back when dropped; it cannot hold up the others.
    fn grant(&mut self, limiter: &Limiter, batch: &mut WakeBatch) -> bool {
        while !batch.is_full() && !self.list.is_empty() && limiter.try_take() {
            let (id, waker) = self.list.pop_front_entry().expect("not empty");
            self.granted.push(id);
            limiter.waiting.store(self.list.len(), SeqCst);
            batch.push(waker);
        }
        batch.is_full() && !self.list.is_empty()
    }
}

pub(crate) struct Limiter {
    in_flight: AtomicUsize,
    limit: AtomicUsize,
    /// Length of `waiters`, readable without the lock.
    waiting: AtomicUsize,
    waiters: Mutex<Waiters>,
    name: String,
    in_flight_gauge: Gauge,
    limit_gauge: Gauge,
}

impl Limiter {
    pub(crate) fn new(limit: usize, name: &str) -> Self {
        let limit_gauge = metrics_util::gauge("tower_scale_limit", name);
        limit_gauge.set(limit as f64);
        Limiter {
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            waiting: AtomicUsize::new(0),
            waiters: Mutex::new(Waiters::default()),
            name: name.to_owned(),
            in_flight_gauge: metrics_util::gauge("tower_scale_in_flight", name),
            limit_gauge,
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(SeqCst)
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit.load(SeqCst)
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(SeqCst)
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Sets a new limit. Lowering it revokes no permit already held; raising it
    /// wakes the first waiter, which wakes the next while room remains.
    #[allow(dead_code)] // used by the adaptive limits to come, and by tests
    pub(crate) fn set_limit(&self, limit: usize) {
        self.limit.store(limit, SeqCst);
        self.limit_gauge.set(limit as f64);
        self.wake_if_waiting();
    }

    fn try_take(&self) -> bool {
        let mut current = self.in_flight.load(SeqCst);
        loop {
            if current >= self.limit.load(SeqCst) {
                return false;
            }
            match self
                .in_flight
                .compare_exchange_weak(current, current + 1, SeqCst, SeqCst)
            {
                Ok(_) => {
                    self.in_flight_gauge.increment(1.0);
                    return true;
                }
                Err(actual) => current = actual,
            }
        }
    }

    fn release(&self) {
        self.in_flight.fetch_sub(1, SeqCst);
        self.in_flight_gauge.decrement(1.0);
        self.wake_if_waiting();
    }

    fn wake_if_waiting(&self) {
        // Pairs with the `waiting` store in `poll_acquire`: either this load sees
        // the new waiter, or the waiter's `try_take` sees the freed slot.
        if self.waiting.load(SeqCst) > 0 {
            self.grant();
        }
    }

    /// Grants free permits to waiters, waking them outside the lock.
    fn grant(&self) {
        loop {
            let mut batch = WakeBatch::default();
            let more = lock(&self.waiters).grant(self, &mut batch);
            batch.wake();
            if !more {
                return;
            }
        }
    }
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("name", &self.name)
            .field("in_flight", &self.in_flight())
            .field("limit", &self.limit())
            .field("waiting", &self.waiting())
            .finish()
    }
}

/// One service's claim on the limiter: its place in the wait list, if it waits.
///
/// Cloning gives a claim that does not wait; dropping one leaves the list.
#[derive(Debug)]
pub(crate) struct Acquire {
    limiter: Arc<Limiter>,
    waiter: Option<u64>,
}

impl Acquire {
    pub(crate) fn new(limiter: Arc<Limiter>) -> Self {
        Acquire {
            limiter,
            waiter: None,
        }
    }

    pub(crate) fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// Takes a permit, or parks the task until one may be free. Waiters are
    /// served first come, first served: a newcomer does not overtake them.
    pub(crate) fn poll_acquire(&mut self, cx: &mut Context<'_>) -> Poll<Permit> {
        let limiter = &self.limiter;
        if self.waiter.is_none() && limiter.waiting.load(SeqCst) == 0 && limiter.try_take() {
            return Poll::Ready(Permit::new(limiter.clone()));
        }

        let mut guard = lock(&limiter.waiters);
        let w = &mut *guard;
        if let Some(id) = self.waiter {
            if let Some(pos) = w.granted.iter().position(|g| *g == id) {
                w.granted.swap_remove(pos);
                self.waiter = None;
                return Poll::Ready(Permit::new(limiter.clone()));
            }
        }
        let id = match self.waiter {
            Some(id) if w.list.update(id, cx.waker()) => id,
            _ => {
                let id = w.list.push(cx.waker());
                limiter.waiting.store(w.list.len(), SeqCst);
                self.waiter = Some(id);
                id
            }
        };
        if w.list.is_front(id) && limiter.try_take() {
            w.list.pop_front();
            limiter.waiting.store(w.list.len(), SeqCst);
            self.waiter = None;
            drop(guard);
            // Room for more than this one: pass it on.
            limiter.grant();
            return Poll::Ready(Permit::new(limiter.clone()));
        }
        Poll::Pending
    }
}

impl Clone for Acquire {
    fn clone(&self) -> Self {
        Acquire::new(self.limiter.clone())
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if let Some(id) = self.waiter.take() {
            let mut guard = lock(&self.limiter.waiters);
            let w = &mut *guard;
            if let Some(pos) = w.granted.iter().position(|g| *g == id) {
                // A permit was taken for us: give it back (and on to the next).
                w.granted.swap_remove(pos);
                drop(guard);
                drop(Permit::new(self.limiter.clone()));
                return;
            }
            w.list.remove(id);
            self.limiter.waiting.store(w.list.len(), SeqCst);
            drop(guard);
            self.limiter.grant();
        }
    }
}

/// A slot in a concurrency limit. The slot is given back when the permit is
/// dropped: when the response future completes, errors, panics or is dropped, or,
/// with [`OnBodyEnd`](super::OnBodyEnd), when the response body ends.
#[must_use = "the slot is released as soon as the permit is dropped"]
pub struct Permit {
    limiter: Arc<Limiter>,
}

impl Permit {
    fn new(limiter: Arc<Limiter>) -> Self {
        Permit { limiter }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.release();
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("limit", &self.limiter.name())
            .finish()
    }
}
