//! The queue state shared by every service one `QueueLayer` makes.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use tokio::time::Instant;

use super::codel::Codel;
use super::Order;
use crate::metrics_util::{self, Reason};
use crate::wait_list::{lock, WaitList};

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) capacity: usize,
    pub(crate) timeout: Duration,
    pub(crate) order: Order,
    pub(crate) backpressure: bool,
    pub(crate) name: String,
}

pub(crate) struct Shared {
    pub(crate) config: Config,
    state: Mutex<State>,
    /// Number of queued entries, readable without the lock.
    len: AtomicUsize,
    /// Services parked in `poll_ready` while the queue is full (backpressure).
    space: Mutex<WaitList>,
    space_waiting: AtomicUsize,
    depth: Gauge,
    wait: Histogram,
    pub(crate) full: Counter,
    pub(crate) timed_out: Counter,
}

struct State {
    /// Queued requests in arrival order: the oldest at the front.
    entries: VecDeque<Entry>,
    /// The entry whose turn it is: the only one that polls its inner service.
    head: Option<u64>,
    next_id: u64,
    codel: Option<Codel>,
}

struct Entry {
    id: u64,
    enqueued: Instant,
    waker: Option<Waker>,
}

/// A waker to call once the lock is released.
struct Wake(Option<Waker>);

impl Wake {
    fn wake(self) {
        if let Some(waker) = self.0 {
            waker.wake();
        }
    }
}

/// What a queued entry may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Poll the inner service: it is this entry's turn.
    Go,
    /// Wait: another entry has the turn.
    Wait,
    /// The entry's timeout passed and the queue dropped it.
    Expired,
}

/// How an entry leaves the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leave {
    Dispatched,
    TimedOut,
    Cancelled,
}

impl Shared {
    pub(crate) fn new(config: Config) -> Self {
        let name = config.name.as_str();
        let depth = metrics_util::gauge("tower_scale_queue_depth", name);
        depth.set(0.0);
        let codel = match config.order {
            Order::AdaptiveLifo { target, interval } => Some(Codel::new(target, interval)),
            Order::Fifo | Order::Lifo => None,
        };
        Shared {
            state: Mutex::new(State {
                entries: VecDeque::with_capacity(config.capacity.min(1024)),
                head: None,
                next_id: 0,
                codel,
            }),
            len: AtomicUsize::new(0),
            space: Mutex::new(WaitList::default()),
            space_waiting: AtomicUsize::new(0),
            depth,
            wait: metrics_util::histogram("tower_scale_queue_wait_seconds", name),
            full: metrics_util::rejected(name, Reason::QueueFull),
            timed_out: metrics_util::rejected(name, Reason::QueueTimeout),
            config,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(SeqCst)
    }

    pub(crate) fn is_full(&self) -> bool {
        self.len() >= self.config.capacity
    }

    pub(crate) fn standing(&self) -> bool {
        lock(&self.state)
            .codel
            .as_ref()
            .is_some_and(Codel::standing)
    }

    /// Takes a place in the queue, or `None` if it is full.
    pub(crate) fn enqueue(self: &Arc<Self>) -> Option<Ticket> {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let wake = self.expire(&mut state, now);
        if state.entries.len() >= self.config.capacity {
            self.set_len(state.entries.len());
            drop(state);
            wake.wake();
            return None;
        }
        let id = state.next_id;
        state.next_id = state.next_id.wrapping_add(1);
        state.entries.push_back(Entry {
            id,
            enqueued: Instant::now(),
            waker: None,
        });
        if state.head.is_none() {
            state.head = Some(id);
        }
        self.set_len(state.entries.len());
        drop(state);
        wake.wake();
        Some(Ticket {
            shared: Some(self.clone()),
            id,
        })
    }

    /// Whether it is `id`'s turn to poll its inner service; if not, parks `cx`.
    fn poll_turn(&self, id: u64, cx: &mut Context<'_>) -> Turn {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let wake = self.expire(&mut state, now);
        let turn = if state.head == Some(id) {
            Turn::Go
        } else if let Some(entry) = state.entries.iter_mut().find(|e| e.id == id) {
            match &mut entry.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            Turn::Wait
        } else {
            Turn::Expired
        };
        self.set_len(state.entries.len());
        drop(state);
        wake.wake();
        turn
    }

    /// Drops the entries whose timeout has passed (a prefix: all wait the same
    /// timeout), even if their futures are not polled, so that a caller that
    /// holds its future without polling it cannot hold up the queue. If the
    /// turn was theirs, it passes on; the returned waker is the new head's.
    fn expire(&self, state: &mut State, now: Instant) -> Wake {
        let timeout = self.config.timeout;
        let mut expired_head = false;
        while let Some(front) = state.entries.front() {
            let expired = front
                .enqueued
                .checked_add(timeout)
                .is_some_and(|deadline| now >= deadline);
            if !expired {
                break;
            }
            expired_head |= state.head == Some(front.id);
            state.entries.pop_front();
        }
        if expired_head || (state.head.is_none() && !state.entries.is_empty()) {
            return self.pass_turn(state);
        }
        Wake(None)
    }

    /// Gives the turn to the entry the order picks; returns its waker.
    fn pass_turn(&self, state: &mut State) -> Wake {
        state.head = select(&state.entries, state.codel.as_ref(), self.config.order);
        let next = state.head;
        Wake(next.and_then(|next| {
            state
                .entries
                .iter()
                .find(|e| e.id == next)
                .and_then(|e| e.waker.clone())
        }))
    }

    fn leave(&self, id: u64, how: Leave) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let Some(pos) = state.entries.iter().position(|e| e.id == id) else {
            return;
        };
        // First make the state whole again; metrics and logs come after the
        // lock is released, so nothing that could panic runs in between.
        let oldest = state.entries.front().map_or(now, |e| e.enqueued);
        let entry = state.entries.remove(pos).expect("position is in range");
        let empty = state.entries.is_empty();
        let changed = match &mut state.codel {
            Some(codel) if empty => codel.reset(),
            Some(_) if how == Leave::Cancelled => false,
            Some(codel) => codel.observe(now.saturating_duration_since(oldest), now),
            None => false,
        };
        let standing = state.codel.as_ref().is_some_and(Codel::standing);
        let wake = if state.head == Some(id) {
            self.pass_turn(&mut state)
        } else {
            Wake(None)
        };
        let len = state.entries.len();
        self.set_len(len);
        drop(state);

        wake.wake();
        self.wake_space();
        if how == Leave::Dispatched {
            self.wait
                .record(now.saturating_duration_since(entry.enqueued).as_secs_f64());
        }
        if changed {
            tracing::debug!(
                queue = %self.config.name,
                standing,
                depth = len,
                "adaptive LIFO: {}",
                if standing {
                    "standing queue, serving newest first"
                } else {
                    "queue drained, serving oldest first"
                }
            );
        }
    }

    /// Wakes every service parked for room (backpressure); each checks again,
    /// so one that stopped polling cannot keep the others parked.
    fn wake_space(&self) {
        if self.space_waiting.load(SeqCst) > 0 {
            let wakers = lock(&self.space).wakers();
            for waker in wakers {
                waker.wake();
            }
        }
    }

    fn set_len(&self, len: usize) {
        self.len.store(len, SeqCst);
        self.depth.set(len as f64);
    }

    /// Backpressure: Ready if there is room, else parks `cx` in the space list.
    pub(crate) fn poll_space(&self, waiter: &mut Option<u64>, cx: &mut Context<'_>) -> Poll<()> {
        if waiter.is_none() && !self.is_full() {
            return Poll::Ready(());
        }
        let mut space = lock(&self.space);
        let id = match *waiter {
            Some(id) if space.update(id, cx.waker()) => id,
            _ => {
                let id = space.push(cx.waker());
                self.space_waiting.store(space.len(), SeqCst);
                *waiter = Some(id);
                id
            }
        };
        // Pairs with the `space_waiting` load in `leave`.
        if self.is_full() {
            return Poll::Pending;
        }
        space.remove(id);
        self.space_waiting.store(space.len(), SeqCst);
        *waiter = None;
        Poll::Ready(())
    }

    pub(crate) fn cancel_space_wait(&self, id: u64) {
        let mut space = lock(&self.space);
        space.remove(id);
        self.space_waiting.store(space.len(), SeqCst);
    }
}

/// The entry the queue order picks to go next.
fn select(entries: &VecDeque<Entry>, codel: Option<&Codel>, order: Order) -> Option<u64> {
    let newest_first = match order {
        Order::Fifo => false,
        Order::Lifo => true,
        Order::AdaptiveLifo { .. } => codel.is_some_and(Codel::standing),
    };
    let entry = if newest_first {
        entries.back()
    } else {
        entries.front()
    };
    entry.map(|e| e.id)
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.config.name)
            .field("depth", &self.len())
            .field("capacity", &self.config.capacity)
            .field("timeout", &self.config.timeout)
            .field("order", &self.config.order)
            .field("backpressure", &self.config.backpressure)
            .finish()
    }
}

/// A request's place in the queue. Dropping it leaves the queue (and passes the
/// turn on, if it was this entry's).
#[must_use]
pub(crate) struct Ticket {
    shared: Option<Arc<Shared>>,
    id: u64,
}

impl Ticket {
    pub(crate) fn poll_turn(&self, cx: &mut Context<'_>) -> Turn {
        match &self.shared {
            Some(shared) => shared.poll_turn(self.id, cx),
            None => Turn::Go,
        }
    }

    pub(crate) fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    pub(crate) fn leave(&mut self, how: Leave) {
        if let Some(shared) = self.shared.take() {
            shared.leave(self.id, how);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.leave(Leave::Cancelled);
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket").field("id", &self.id).finish()
    }
}
