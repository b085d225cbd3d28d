//! What the per-call benches share: a counting allocator, an always-ready
//! inner service, how one call is made, and the runtimes.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Ready;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use tokio::runtime::{Builder, Runtime};
use tower::{Service, ServiceExt};

// ---------------------------------------------------------------------------
// Allocation counting.

/// `System`, counting allocations while `COUNTING` is set (a relaxed load
/// otherwise, so the timed runs pay next to nothing for it).
pub(crate) struct CountingAlloc;

pub(crate) static COUNTING: AtomicBool = AtomicBool::new(false);
pub(crate) static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

impl CountingAlloc {
    #[inline]
    fn count(&self) {
        if COUNTING.load(Relaxed) {
            ALLOCATIONS.fetch_add(1, Relaxed);
        }
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.count();
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.count();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------------------
// The inner service and one call.

/// Always ready; answers with the request; never fails.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Echo;

impl Service<u64> for Echo {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, request: u64) -> Self::Future {
        std::future::ready(Ok(request))
    }
}

/// What every benchmarked stack is.
pub(crate) trait Stack:
    Service<u64, Response = u64, Error: Debug + Send, Future: Send> + Clone + Send + 'static
{
}

impl<S> Stack for S where
    S: Service<u64, Response = u64, Error: Debug + Send, Future: Send> + Clone + Send + 'static
{
}

/// One call on a service kept between calls: `ready` then `call`.
#[inline]
pub(crate) async fn call_reuse<S: Stack>(svc: &mut S, request: u64) -> u64 {
    svc.ready()
        .await
        .expect("ready failed")
        .call(request)
        .await
        .expect("call failed")
}

/// One call the way axum and hyper make it: clone the service, `oneshot`.
#[inline]
pub(crate) async fn call_clone_oneshot<S: Stack>(svc: &S, request: u64) -> u64 {
    svc.clone().oneshot(request).await.expect("call failed")
}

// ---------------------------------------------------------------------------
// Runtimes.

pub(crate) fn current_thread() -> Runtime {
    Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("current-thread runtime")
}

pub(crate) fn two_workers() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("multi-thread runtime")
}

/// Calls per stack for the allocation count.
pub(crate) const ALLOC_CALLS: u64 = 10_000;

/// Something done to each benchmarked stack.
pub(crate) trait Visit {
    fn visit<S: Stack>(&mut self, name: &str, svc: S);
}

/// Counts allocations per call for each stack it visits.
pub(crate) struct CountAllocations<'a> {
    pub(crate) rt: &'a Runtime,
    pub(crate) rows: Vec<Row>,
}

pub(crate) struct Row {
    pub(crate) name: String,
    /// Allocations per call, service reused.
    pub(crate) reuse: f64,
    /// Allocations per call, service cloned and driven with `oneshot`.
    pub(crate) clone: f64,
    pub(crate) service_size: usize,
    pub(crate) future_size: usize,
}

impl CountAllocations<'_> {
    fn per_call<F: std::future::Future<Output = ()>>(&self, run: F) -> f64 {
        ALLOCATIONS.store(0, Relaxed);
        COUNTING.store(true, Relaxed);
        self.rt.block_on(run);
        COUNTING.store(false, Relaxed);
        ALLOCATIONS.load(Relaxed) as f64 / ALLOC_CALLS as f64
    }
}

impl Visit for CountAllocations<'_> {
    fn visit<S: Stack>(&mut self, name: &str, mut svc: S) {
        // Warm up first: lazily created state (thread locals, tower's buffer
        // worker's first poll) is not a per-call cost.
        self.rt.block_on(async {
            for i in 0..100 {
                black_box(call_reuse(&mut svc, i).await);
                black_box(call_clone_oneshot(&svc, i).await);
            }
        });
        let reuse = self.per_call(async {
            for i in 0..ALLOC_CALLS {
                black_box(call_reuse(&mut svc, i).await);
            }
        });
        let clone = self.per_call(async {
            for i in 0..ALLOC_CALLS {
                black_box(call_clone_oneshot(&svc, i).await);
            }
        });
        self.rows.push(Row {
            name: name.to_owned(),
            reuse,
            clone,
            service_size: std::mem::size_of::<S>(),
            future_size: std::mem::size_of::<S::Future>(),
        });
    }
}
