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
        let mut state = lock(&self.state);
        if state.entries.len() >= self.config.capacity {
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
        Some(Ticket {
            shared: Some(self.clone()),
            id,
        })
    }

    /// Whether it is `id`'s turn to poll its inner service; if not, parks `cx`.
    fn poll_turn(&self, id: u64, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = lock(&self.state);
        if state.head == Some(id) {
            return Poll::Ready(());
        }
        if let Some(entry) = state.entries.iter_mut().find(|e| e.id == id) {
            match &mut entry.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
        }
        Poll::Pending
    }

    fn leave(&self, id: u64, how: Leave) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let Some(pos) = state.entries.iter().position(|e| e.id == id) else {
            return;
        };
        let oldest = state.entries.front().map(|e| e.enqueued).unwrap_or(now);
        let entry = state.entries.remove(pos).expect("position is in range");
        if how == Leave::Dispatched {
            self.wait
                .record(now.saturating_duration_since(entry.enqueued).as_secs_f64());
        }
        let State {
            entries,
            head,
            codel,
            ..
        } = &mut *state;
        if let Some(codel) = codel {
            let changed = if entries.is_empty() {
                codel.reset()
            } else if how == Leave::Cancelled {
                false
            } else {
                codel.observe(now.saturating_duration_since(oldest), now)
            };
            if changed {
                tracing::debug!(
                    queue = %self.config.name,
                    standing = codel.standing(),
                    depth = entries.len(),
                    "adaptive LIFO: {}",
                    if codel.standing() {
                        "standing queue, serving newest first"
                    } else {
                        "queue drained, serving oldest first"
                    }
                );
            }
        }
        let mut wake = None;
        if *head == Some(id) {
            *head = select(entries, codel.as_ref(), self.config.order);
            if let Some(next) = *head {
                wake = entries
                    .iter()
                    .find(|e| e.id == next)
                    .and_then(|e| e.waker.clone());
            }
        }
        let len = entries.len();
        self.set_len(len);
        drop(state);

        if let Some(waker) = wake {
            waker.wake();
        }
        if self.space_waiting.load(SeqCst) > 0 {
            lock(&self.space).wake_front();
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
        if !space.is_empty() && !self.is_full() {
            space.wake_front();
        }
        Poll::Ready(())
    }

    pub(crate) fn cancel_space_wait(&self, id: u64) {
        let mut space = lock(&self.space);
        let was_front = space.remove(id);
        self.space_waiting.store(space.len(), SeqCst);
        if was_front && !space.is_empty() && !self.is_full() {
            space.wake_front();
        }
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
    pub(crate) fn poll_turn(&self, cx: &mut Context<'_>) -> Poll<()> {
        match &self.shared {
            Some(shared) => shared.poll_turn(self.id, cx),
            None => Poll::Ready(()),
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
