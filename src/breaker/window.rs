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
    Time {
        buckets: Box<[Bucket]>,
        width: Duration,
        origin: Instant,
    },
}

#[derive(Clone, Copy, Debug, Default)]
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
        Outcomes::Time {
            buckets: vec![
                Bucket {
                    period: u64::MAX,
                    totals: Totals::default()
                };
                buckets as usize
            ]
            .into_boxed_slice(),
            width: duration / buckets,
            origin: now,
        }
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
            Outcomes::Time {
                buckets,
                width,
                origin,
            } => {
                let now = now.expect("a time window is given the time");
                let period = period_of(now, *origin, *width);
                let len = buckets.len() as u64;
                let bucket = &mut buckets[(period % len) as usize];
                if bucket.period != period {
                    *bucket = Bucket {
                        period,
                        totals: Totals::default(),
                    };
                }
                bucket.totals.calls = bucket.totals.calls.saturating_add(1);
                bucket.totals.failures = bucket.totals.failures.saturating_add(u32::from(failed));
                bucket.totals.slow = bucket.totals.slow.saturating_add(u32::from(slow));
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

    #[inline]
    pub(crate) fn totals(&self, now: Option<Instant>) -> Totals {
        match self {
            Outcomes::Count { totals, .. } => *totals,
            Outcomes::Time {
                buckets,
                width,
                origin,
            } => {
                let now = now.expect("a time window is given the time");
                let current = period_of(now, *origin, *width);
                let oldest = current.saturating_sub(buckets.len() as u64 - 1);
                buckets
                    .iter()
                    .filter(|b| b.period != u64::MAX && b.period >= oldest && b.period <= current)
                    .fold(Totals::default(), |mut sum, b| {
                        sum.calls = sum.calls.saturating_add(b.totals.calls);
                        sum.failures = sum.failures.saturating_add(b.totals.failures);
                        sum.slow = sum.slow.saturating_add(b.totals.slow);
                        sum
                    })
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        match self {
            Outcomes::Count { ring, next, totals } => {
                ring.fill(0);
                *next = 0;
                *totals = Totals::default();
            }
            Outcomes::Time { buckets, .. } => {
                for bucket in buckets.iter_mut() {
                    bucket.period = u64::MAX;
                    bucket.totals = Totals::default();
                }
            }
        }
    }
}

fn period_of(now: Instant, origin: Instant, width: Duration) -> u64 {
    let elapsed = now.saturating_duration_since(origin).as_nanos();
    (elapsed / width.as_nanos().max(1)) as u64
}
