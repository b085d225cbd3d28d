//! Standing-queue detection for adaptive LIFO, in the manner of CoDel.
//!
//! CoDel watches the queueing delay: if it stays above a target for a whole
//! interval, the queue is not a burst that will drain but a standing queue. Serving newest-first changes the
//! delays the dispatched requests see, so the delay watched here is that of the
//! *oldest* waiting request at each dispatch, which does not depend on the order.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct Codel {
    target: Duration,
    interval: Duration,
    standing: bool,
    /// When the oldest request has been older than `target` at every look since
    /// some moment, the time one interval after that moment.
    above_until: Option<Instant>,
}

impl Codel {
    pub(crate) fn new(target: Duration, interval: Duration) -> Self {
        Codel {
            target,
            interval,
            standing: false,
            above_until: None,
        }
    }

    pub(crate) fn standing(&self) -> bool {
        self.standing
    }

    /// Records the age of the oldest queued request; returns whether the
    /// standing state changed.
    ///
    /// Like CoDel, a timer starts at the first look above the target, and the
    /// queue stands once every look for a whole interval stayed above it; one
    /// look at or below the target ends it (the oldest request is fresh, so the
    /// queue is short and the order hardly matters).
    pub(crate) fn observe(&mut self, oldest_age: Duration, now: Instant) -> bool {
        let standing = if oldest_age <= self.target {
            self.above_until = None;
            false
        } else {
            let until = *self.above_until.get_or_insert(
                now.checked_add(self.interval)
                    .unwrap_or(now + Duration::from_secs(86400 * 365 * 30)),
            );
            self.standing || now >= until
        };
        std::mem::replace(&mut self.standing, standing) != standing
    }

    /// The queue emptied: whatever stood has drained. Returns whether the
    /// standing state changed.
    pub(crate) fn reset(&mut self) -> bool {
        self.above_until = None;
        std::mem::replace(&mut self.standing, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn stands_only_after_a_whole_interval_above_target() {
        let start = Instant::now();
        let mut codel = Codel::new(5 * MS, 100 * MS);
        assert!(!codel.observe(10 * MS, start));
        assert!(!codel.observe(20 * MS, start + 50 * MS));
        assert!(!codel.standing());
        assert!(codel.observe(30 * MS, start + 100 * MS));
        assert!(codel.standing());
    }

    #[test]
    fn one_short_wait_in_the_interval_means_no_standing_queue() {
        let start = Instant::now();
        let mut codel = Codel::new(5 * MS, 100 * MS);
        codel.observe(10 * MS, start);
        codel.observe(2 * MS, start + 50 * MS);
        assert!(!codel.observe(30 * MS, start + 100 * MS));
        assert!(!codel.standing());
    }

    #[test]
    fn leaves_standing_when_an_interval_stays_below_target_or_the_queue_empties() {
        let start = Instant::now();
        let mut codel = Codel::new(5 * MS, 100 * MS);
        codel.observe(10 * MS, start);
        codel.observe(10 * MS, start + 100 * MS);
        assert!(codel.standing());
        assert!(!codel.observe(6 * MS, start + 150 * MS));
        assert!(codel.standing());
        assert!(codel.observe(1 * MS, start + 200 * MS));
        assert!(!codel.standing());

        codel.observe(10 * MS, start + 300 * MS);
        codel.observe(10 * MS, start + 400 * MS);
        assert!(codel.standing());
        assert!(codel.reset());
        assert!(!codel.standing());
    }
}
