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
use crate::wait_list::{lock, WaitList};

pub(crate) struct Limiter {
    in_flight: AtomicUsize,
    limit: AtomicUsize,
    /// Length of `waiters`, readable without the lock.
    waiting: AtomicUsize,
    waiters: Mutex<WaitList>,
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
            waiters: Mutex::new(WaitList::default()),
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

    fn has_room(&self) -> bool {
        self.in_flight.load(SeqCst) < self.limit.load(SeqCst)
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
            lock(&self.waiters).wake_front();
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

        let mut waiters = lock(&limiter.waiters);
        let id = match self.waiter {
            Some(id) if waiters.update(id, cx.waker()) => id,
            _ => {
                let id = waiters.push(cx.waker());
                limiter.waiting.store(waiters.len(), SeqCst);
                self.waiter = Some(id);
                id
            }
        };
        if waiters.is_front(id) && limiter.try_take() {
            waiters.pop_front();
            limiter.waiting.store(waiters.len(), SeqCst);
            self.waiter = None;
            if !waiters.is_empty() && limiter.has_room() {
                waiters.wake_front();
            }
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
            let mut waiters = lock(&self.limiter.waiters);
            let was_front = waiters.remove(id);
            self.limiter.waiting.store(waiters.len(), SeqCst);
            // A woken front waiter that leaves passes its turn on.
            if was_front && !waiters.is_empty() && self.limiter.has_room() {
                waiters.wake_front();
            }
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
