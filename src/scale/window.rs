//! The sliding latency window: a ring of time slices, each a fixed-size
//! log-linear histogram of atomic counters.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::ConfigError;

/// Linear sub-buckets per power of two: a recorded value lands in a bucket
/// whose width is at most 1/16 of its lower bound, and the midpoint reported
/// is within 1/32 (about 3%) of any value in it.
const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
/// Values are microseconds, capped at 2^36 - 1 µs (about 19 hours).
const MAX_EXP: u32 = 35;
const MAX_MICROS: u64 = (1 << (MAX_EXP + 1)) - 1;
/// Buckets per slice: 16 exact ones for 0..16 µs, then 16 per power of two.
pub(crate) const BUCKETS: usize = ((MAX_EXP - SUB_BITS + 2) as usize) * SUB as usize;
/// The epoch of a slice never written.
const EMPTY: u64 = u64::MAX;

/// The default span of a window.
pub(crate) const DEFAULT_WINDOW: Duration = Duration::from_secs(30);
/// The default number of slices in a window.
pub(crate) const DEFAULT_SLICES: usize = 6;

/// The bucket of a value in microseconds.
pub(crate) fn bucket_of(micros: u64) -> usize {
    let v = micros.min(MAX_MICROS);
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let sub = (v >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as usize) * SUB as usize + sub as usize
}

/// The lower bound and the width of a bucket, in microseconds.
pub(crate) fn bucket_bounds(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < SUB {
        return (index, 1);
    }
    let exp = (index / SUB) as u32 + SUB_BITS - 1;
    let sub = index % SUB;
    let shift = exp - SUB_BITS;
    ((SUB + sub) << shift, 1 << shift)
}

/// One time slice: its epoch (the slice number since the window started),
/// the count per bucket and the sum of the recorded values.
struct Slice {
    epoch: AtomicU64,
    sum_micros: AtomicU64,
    buckets: Box<[AtomicU64]>,
}

impl Slice {
    fn new() -> Self {
        Slice {
            epoch: AtomicU64::new(EMPTY),
            sum_micros: AtomicU64::new(0),
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// The shared state behind a [`LatencyHandle`].
pub(crate) struct Window {
    slice: Duration,
    slice_nanos: u64,
    slices: Box<[Slice]>,
    /// Set on the first record or read, on the runtime's clock.
    start: OnceLock<Instant>,
    /// Taken only to reuse a slice, once per slice length.
    rotate: Mutex<()>,
}

impl Window {
    pub(crate) fn try_new(window: Duration, slices: usize) -> Result<Self, ConfigError> {
        if slices == 0 {
            return Err(ConfigError::new("slices", "must be at least 1"));
        }
        if slices > 1024 {
            return Err(ConfigError::new(
                "slices",
                format!("must be at most 1024, got {slices}"),
            ));
        }
        let slice = window / slices as u32;
        if slice < Duration::from_millis(1) {
            return Err(ConfigError::new(
                "window",
                format!("must give slices of at least 1ms, got {window:?} over {slices} slices"),
            ));
        }
        Ok(Window {
            slice,
            slice_nanos: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
            slices: (0..slices).map(|_| Slice::new()).collect(),
            start: OnceLock::new(),
            rotate: Mutex::new(()),
        })
    }

    fn start(&self) -> Instant {
        *self.start.get_or_init(Instant::now)
    }

    /// The epoch of `now`, and the nanoseconds since the window started.
    fn epoch(&self, now: Instant) -> (u64, u64) {
        let elapsed = now.saturating_duration_since(self.start());
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        (nanos / self.slice_nanos, nanos)
    }

    /// Records one call that took `latency`, ending at `now`. Three atomic
    /// operations, plus a short lock once per slice length to reuse a slice.
    pub(crate) fn record_at(&self, now: Instant, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let (epoch, _) = self.epoch(now);
        let slice = &self.slices[(epoch % self.slices.len() as u64) as usize];
        if slice.epoch.load(Ordering::Acquire) != epoch {
            self.rotate_to(slice, epoch);
        }
        slice.buckets[bucket_of(micros)].fetch_add(1, Ordering::Relaxed);
        slice
            .sum_micros
            .fetch_add(micros.min(MAX_MICROS), Ordering::Relaxed);
    }

    #[cold]
    fn rotate_to(&self, slice: &Slice, epoch: u64) {
        let _guard = self.rotate.lock().unwrap_or_else(PoisonError::into_inner);
        let current = slice.epoch.load(Ordering::Acquire);
        // Another recorder rotated it first, or this recorder is late and the
        // slice already serves a newer epoch (count it there: it is one sample).
        if current == epoch || (current != EMPTY && current > epoch) {
            return;
        }
        for bucket in slice.buckets.iter() {
            bucket.store(0, Ordering::Relaxed);
        }
        slice.sum_micros.store(0, Ordering::Relaxed);
        slice.epoch.store(epoch, Ordering::Release);
    }

    /// Every bucket summed over the live slices, with the sum of the values
    /// and the time the window covers.
    pub(crate) fn merged(&self, now: Instant) -> Merged {
        let (epoch, elapsed) = self.epoch(now);
        let n = self.slices.len() as u64;
        let mut counts = vec![0u64; BUCKETS];
        let mut sum_micros = 0u64;
        for slice in self.slices.iter() {
            let at = slice.epoch.load(Ordering::Acquire);
            if at == EMPTY || at > epoch || at + n <= epoch {
                continue;
            }
            for (total, bucket) in counts.iter_mut().zip(slice.buckets.iter()) {
                *total += bucket.load(Ordering::Relaxed);
            }
            sum_micros = sum_micros.saturating_add(slice.sum_micros.load(Ordering::Relaxed));
        }
        // The current slice is partly filled; the n - 1 before it are whole.
        let into_current = elapsed - epoch * self.slice_nanos;
        let whole = self.slice_nanos.saturating_mul(n - 1);
        let covered = Duration::from_nanos(whole.saturating_add(into_current).min(elapsed));
        Merged {
            counts,
            sum_micros,
            covered,
        }
    }

    pub(crate) fn span(&self) -> Duration {
        self.slice * self.slices.len() as u32
    }

    pub(crate) fn slices(&self) -> usize {
        self.slices.len()
    }
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Window")
            .field("span", &self.span())
            .field("slices", &self.slices.len())
            .finish_non_exhaustive()
    }
}

/// The live slices merged into one histogram.
pub(crate) struct Merged {
    counts: Vec<u64>,
    sum_micros: u64,
    covered: Duration,
}

impl Merged {
    fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The value at quantile `q` (0 to 1): the midpoint of the bucket that
    /// holds the sample of rank `ceil(q × count)`.
    fn quantile(&self, q: f64, count: u64) -> Option<Duration> {
        if count == 0 {
            return None;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (index, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (lower, width) = bucket_bounds(index);
                return Some(Duration::from_nanos(lower * 1000 + width * 500));
            }
        }
        None
    }
}

/// Reads the latencies recorded by a [`LatencyLayer`](super::LatencyLayer)
/// over its sliding window.
///
/// Got from [`LatencyLayer::handle`](super::LatencyLayer::handle) or
/// [`LatencyHandle::new`]; clones read the same window, and
/// [`record`](Self::record) feeds it by hand. See the [module docs](super).
#[derive(Clone)]
pub struct LatencyHandle {
    pub(crate) window: Arc<Window>,
}

impl LatencyHandle {
    /// A window of 30 s in 6 slices of 5 s, fed by hand with
    /// [`record`](Self::record) or by a layer made with
    /// [`LatencyLayer::from_handle`](super::LatencyLayer::from_handle).
    pub fn new() -> Self {
        LatencyHandle {
            window: Arc::new(
                Window::try_new(DEFAULT_WINDOW, DEFAULT_SLICES).expect("the defaults are valid"),
            ),
        }
    }

    /// A window over `window`, made of `slices` slices: a read covers the
    /// last `window`, less up to one slice (the oldest slice leaves whole
    /// when the newest starts).
    ///
    /// Returns a [`ConfigError`] naming `slices` when it is 0 or above 1024,
    /// or `window` when a slice would be shorter than 1 ms.
    pub fn try_with_window(window: Duration, slices: usize) -> Result<Self, ConfigError> {
        Ok(LatencyHandle {
            window: Arc::new(Window::try_new(window, slices)?),
        })
    }

    /// Records one call that took `latency`, ending now.
    pub fn record(&self, latency: Duration) {
        self.window.record_at(Instant::now(), latency);
    }

    /// The value under which a fraction `q` (0 to 1) of the calls in the
    /// window fell, within about 3%; `None` when the window holds no call.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let merged = self.window.merged(Instant::now());
        let count = merged.count();
        merged.quantile(q, count)
    }

    /// The median latency over the window.
    pub fn p50(&self) -> Option<Duration> {
        self.quantile(0.50)
    }

    /// The 95th percentile latency over the window.
    pub fn p95(&self) -> Option<Duration> {
        self.quantile(0.95)
    }

    /// The 99th percentile latency over the window.
    pub fn p99(&self) -> Option<Duration> {
        self.quantile(0.99)
    }

    /// The 95th percentile in milliseconds, 0 when the window is empty: the
    /// shape of [`LoadFigures::p95_latency_ms`](crate::registry::LoadFigures),
    /// so `move || handle.p95_ms()` is a `Fn() -> f64` for a heartbeat.
    pub fn p95_ms(&self) -> f64 {
        self.p95().map_or(0.0, millis)
    }

    /// Calls in the window.
    pub fn count(&self) -> u64 {
        self.window.merged(Instant::now()).count()
    }

    /// Count, rate, mean and percentiles in one pass over the window.
    pub fn summary(&self) -> LatencySummary {
        let merged = self.window.merged(Instant::now());
        let count = merged.count();
        // Not less than a second (or the whole window, if shorter), so that
        // one call just after the start is not a rate of thousands a second.
        let floor = self.window.span().min(Duration::from_secs(1));
        let secs = merged.covered.max(floor).as_secs_f64();
        LatencySummary {
            count,
            rate_per_sec: if secs > 0.0 { count as f64 / secs } else { 0.0 },
            mean_ms: (count > 0)
                .then(|| round_micros(merged.sum_micros as f64 / count as f64 / 1000.0)),
            p50_ms: merged.quantile(0.50, count).map(millis),
            p95_ms: merged.quantile(0.95, count).map(millis),
            p99_ms: merged.quantile(0.99, count).map(millis),
        }
    }

    /// The span of the window.
    pub fn window(&self) -> Duration {
        self.window.span()
    }
}

impl Default for LatencyHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for LatencyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatencyHandle")
            .field("window", &self.window.span())
            .field("slices", &self.window.slices())
            .finish()
    }
}

/// The latencies over a window, as [`LatencyHandle::summary`] reads them.
///
/// Milliseconds, rounded to the microsecond; the percentiles are `None`
/// (`null` in JSON) when the window holds no call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LatencySummary {
    /// Calls recorded in the window.
    pub count: u64,
    /// Calls per second over the time the window covers, at least a second
    /// (its throughput, the λ of Little's law).
    pub rate_per_sec: f64,
    /// The mean latency (the service time S of Little's law when the layer
    /// sits just around the application).
    pub mean_ms: Option<f64>,
    /// The median.
    pub p50_ms: Option<f64>,
    /// The 95th percentile.
    pub p95_ms: Option<f64>,
    /// The 99th percentile.
    pub p99_ms: Option<f64>,
}

fn millis(duration: Duration) -> f64 {
    round_micros(duration.as_secs_f64() * 1000.0)
}

fn round_micros(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}
