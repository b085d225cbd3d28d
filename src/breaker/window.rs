//! Sliding windows of call outcomes with fixed memory: the last N calls, or the
//! last T seconds in buckets.

use std::time::Duration;

use tokio::time::Instant;

/// Sums over a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

impl Totals {
    pub(crate) fn failure_rate(&self) -> f64 {
        rate(self.failures, self.calls)
    }

    pub(crate) fn slow_rate(&self) -> f64 {
        rate(self.slow, self.calls)
    }
}

fn rate(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        0.0
    } else {
        f64::from(part) / f64::from(whole)
    }
}

const FILLED: u8 = 1;
const FAILED: u8 = 2;
const SLOW: u8 = 4;

#[derive(Debug)]
pub(crate) enum Outcomes {
    Count {
        /// One byte a call: FILLED | FAILED | SLOW.
        ring: Box<[u8]>,
        next: usize,
        totals: Totals,
    },
    Time(TimeWindow),
}

/// The calls of the last `buckets` bucket-width periods, with running sums so
/// that reading the totals is O(1) while time stays in one period.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    buckets: Box<[Bucket]>,
    width: Duration,
    origin: Instant,
    /// Sums of the buckets still in the window as of `latest`.
    sums: Totals,
    /// The newest period seen.
    latest: u64,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Bucket {
    /// Index of the bucket-width period this bucket holds; `u64::MAX` if none.
    period: u64,
    totals: Totals,
}

impl Outcomes {
    pub(crate) fn count(size: u32) -> Self {
        Outcomes::Count {
            ring: vec![0; size as usize].into_boxed_slice(),
            next: 0,
            totals: Totals::default(),
        }
    }

    pub(crate) fn time(duration: Duration, buckets: u32, now: Instant) -> Self {
        Outcomes::Time(TimeWindow {
            buckets: vec![Bucket::EMPTY; buckets as usize].into_boxed_slice(),
            width: duration / buckets,
            origin: now,
            sums: Totals::default(),
            latest: 0,
        })
    }

    /// Whether recording needs the time of completion.
    pub(crate) fn needs_clock(&self) -> bool {
        matches!(self, Outcomes::Time { .. })
    }

    #[inline]
    pub(crate) fn record(&mut self, failed: bool, slow: bool, now: Option<Instant>) {
        match self {
            Outcomes::Count { ring, next, totals } => {
                let old = ring[*next];
                if old & FILLED != 0 {
                    totals.calls -= 1;
                    totals.failures -= u32::from(old & FAILED != 0);
                    totals.slow -= u32::from(old & SLOW != 0);
                }
                ring[*next] =
                    FILLED | if failed { FAILED } else { 0 } | if slow { SLOW } else { 0 };
                *next += 1;
                if *next == ring.len() {
                    *next = 0;
                }
                totals.calls += 1;
                totals.failures += u32::from(failed);
                totals.slow += u32::from(slow);
            }
            Outcomes::Time(window) => {
                window.record(failed, slow, now.expect("a time window is given the time"))
            }
        }
    }

    /// Records `n` successes that were neither slow nor failed (count windows;
    /// a time window never takes the lock-free path that gathers them).
    pub(crate) fn record_successes(&mut self, n: u64) {
        match self {
            Outcomes::Count { ring, totals, .. } if n >= ring.len() as u64 => {
                ring.fill(FILLED);
                *totals = Totals {
                    calls: ring.len() as u32,
                    failures: 0,
                    slow: 0,
                };
            }
            _ => {
                for _ in 0..n {
                    self.record(false, false, None);
                }
            }
        }
    }

    /// The totals as of the last call recorded (for a time window, as of the
    /// newest period seen).
    #[inline]
    pub(crate) fn recorded_totals(&self) -> Totals {
        match self {
            Outcomes::Count { totals, .. } => *totals,
            Outcomes::Time(window) => window.sums,
        }
    }

    #[inline]
    pub(crate) fn totals(&self, now: Option<Instant>) -> Totals {
        match self {
            Outcomes::Count { totals, .. } => *totals,
            Outcomes::Time(window) => window.totals(now.expect("a time window is given the time")),
        }
    }

    pub(crate) fn clear(&mut self) {
        match self {
            Outcomes::Count { ring, next, totals } => {
                ring.fill(0);
                *next = 0;
                *totals = Totals::default();
            }
            Outcomes::Time(window) => {
                window.buckets.fill(Bucket::EMPTY);
                window.sums = Totals::default();
            }
        }
    }
}

impl Bucket {
    const EMPTY: Bucket = Bucket {
        period: u64::MAX,
        totals: Totals {
            calls: 0,
            failures: 0,
            slow: 0,
        },
    };
}

impl Totals {
    fn add(&mut self, other: Totals) {
        self.calls = self.calls.saturating_add(other.calls);
        self.failures = self.failures.saturating_add(other.failures);
        self.slow = self.slow.saturating_add(other.slow);
    }

    fn remove(&mut self, other: Totals) {
        self.calls = self.calls.saturating_sub(other.calls);
        self.failures = self.failures.saturating_sub(other.failures);
        self.slow = self.slow.saturating_sub(other.slow);
    }
}

impl TimeWindow {
    /// The oldest period still in the window when `period` is the newest.
    fn oldest(&self, period: u64) -> u64 {
        period.saturating_sub(self.buckets.len() as u64 - 1)
    }

    /// Moves the window on to `period`: buckets that fell out leave the sums.
    /// Costs O(buckets) once per period, O(1) otherwise.
    fn advance(&mut self, period: u64) {
        if period <= self.latest {
            return;
        }
        let oldest = self.oldest(period);
        for bucket in self.buckets.iter_mut() {
            if bucket.period != u64::MAX && bucket.period < oldest {
                self.sums.remove(bucket.totals);
                *bucket = Bucket::EMPTY;
            }
        }
        self.latest = period;
    }

    fn record(&mut self, failed: bool, slow: bool, now: Instant) {
        let period = period_of(now, self.origin, self.width);
        self.advance(period);
        if period < self.oldest(self.latest) {
            // Completed just before another call moved the window past it.
            return;
        }
        let len = self.buckets.len() as u64;
        let bucket = &mut self.buckets[(period % len) as usize];
        if bucket.period != period {
            // Empty: anything older in this slot left the window in `advance`.
            *bucket = Bucket::EMPTY;
            bucket.period = period;
        }
        let one = Totals {
            calls: 1,
            failures: u32::from(failed),
            slow: u32::from(slow),
        };
        bucket.totals.add(one);
        self.sums.add(one);
    }

    fn totals(&self, now: Instant) -> Totals {
        let period = period_of(now, self.origin, self.width);
        if period <= self.latest {
            return self.sums;
        }
        // Time moved on with no call: leave out what fell out, without
        // changing the window.
        let oldest = self.oldest(period);
        let mut sums = self.sums;
        for bucket in self.buckets.iter() {
            if bucket.period != u64::MAX && bucket.period < oldest {
                sums.remove(bucket.totals);
            }
        }
        sums
    }
}

/// Index of the bucket-width period `now` falls in. 64-bit arithmetic (a
/// 128-bit division costs several times more): 2^64 ns is 584 years.
fn period_of(now: Instant, origin: Instant, width: Duration) -> u64 {
    let nanos = |d: Duration| {
        d.as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()))
    };
    nanos(now.saturating_duration_since(origin)) / nanos(width).max(1)
}
