//! A FIFO list of parked tasks, each known by an id so that a waiter that goes
//! away (its service dropped, its future cancelled) can leave the list.
//!
//! Used under a `std::sync::Mutex` that is never held across an `.await`.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::task::Waker;

#[derive(Debug, Default)]
pub(crate) struct WaitList {
    waiters: VecDeque<(u64, Waker)>,
    next_id: u64,
}

impl WaitList {
    /// Parks `waker` at the back of the list and returns its id.
    pub(crate) fn push(&mut self, waker: &Waker) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.waiters.push_back((id, waker.clone()));
        id
    }

    /// Replaces the waker of `id`; false if `id` is not in the list.
    pub(crate) fn update(&mut self, id: u64, waker: &Waker) -> bool {
        match self.waiters.iter_mut().find(|(i, _)| *i == id) {
            Some((_, w)) => {
                if !w.will_wake(waker) {
                    w.clone_from(waker);
                }
                true
            }
            None => false,
        }
    }

    /// Removes `id`; returns whether it was at the front.
    pub(crate) fn remove(&mut self, id: u64) -> bool {
        match self.waiters.iter().position(|(i, _)| *i == id) {
            Some(pos) => {
                self.waiters.remove(pos);
                pos == 0
            }
            None => false,
        }
    }

    pub(crate) fn is_front(&self, id: u64) -> bool {
        matches!(self.waiters.front(), Some((i, _)) if *i == id)
    }

    pub(crate) fn pop_front(&mut self) {
        self.waiters.pop_front();
    }

    pub(crate) fn pop_front_entry(&mut self) -> Option<(u64, Waker)> {
        self.waiters.pop_front()
    }

    pub(crate) fn len(&self) -> usize {
        self.waiters.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }
}

/// Locks `mutex`, ignoring poisoning: the critical sections in this crate make
/// their data consistent before calling out, and wakers and logs run after the
/// lock is released.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl WaitList {
    /// The wakers of every parked task (they stay in the list until they
    /// leave), to wake once the lock is released.
    pub(crate) fn wakers(&self) -> Vec<Waker> {
        self.waiters.iter().map(|(_, w)| w.clone()).collect()
    }
}

/// Wakers collected under a lock, woken after it is released (a waker may run
/// its task inline). Holds a few on the stack; callers loop for more.
#[derive(Default)]
pub(crate) struct WakeBatch {
    wakers: [Option<Waker>; 8],
    len: usize,
}

impl WakeBatch {
    pub(crate) fn is_full(&self) -> bool {
        self.len == self.wakers.len()
    }

    pub(crate) fn push(&mut self, waker: Waker) {
        self.wakers[self.len] = Some(waker);
        self.len += 1;
    }

    pub(crate) fn wake(self) {
        for waker in self.wakers.into_iter().flatten() {
            waker.wake();
        }
    }
}
