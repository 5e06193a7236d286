//! When each slave of a bus is polled next: every slave ticks at its own interval from the
//! bus's start, without drift; a tick already past when its turn comes (the bus was busy) is
//! skipped and counted, never queued up. Sans-IO: the caller reads the clock.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Schedule {
    slots: Vec<Slot>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    interval: Duration,
    next: Instant,
}

impl Schedule {
    /// Slaves with these intervals, the first polls of all due at `start` (in order).
    pub fn new(intervals: impl IntoIterator<Item = Duration>, start: Instant) -> Self {
        Self { slots: intervals.into_iter().map(|interval| Slot { interval, next: start }).collect() }
    }

    /// A schedule of `(interval, next tick)` per slave (a reload changed the slaves: those
    /// kept keep their ticks).
    pub fn from_slots(slots: impl IntoIterator<Item = (Duration, Instant)>) -> Self {
        Self { slots: slots.into_iter().map(|(interval, next)| Slot { interval, next }).collect() }
    }

    /// Slave `i`'s interval and next tick.
    pub fn slot(&self, i: usize) -> (Duration, Instant) {
        (self.slots[i].interval, self.slots[i].next)
    }

    /// The slave polled next and when: the earliest due, the first in config order on a tie.
    pub fn next(&self) -> Option<(usize, Instant)> {
        self.slots.iter().enumerate().min_by_key(|(i, s)| (s.next, *i)).map(|(i, s)| (i, s.next))
    }

    /// Slave `i` was polled; `now` is when its poll ended. Its next tick is one interval
    /// after the one just served; ticks that have already passed by `now` are skipped.
    /// Returns how many were skipped (the poll overran them).
    pub fn polled(&mut self, i: usize, now: Instant) -> u64 {
        let s = &mut self.slots[i];
        s.next += s.interval;
        if s.next >= now {
            return 0;
        }
        let behind = now - s.next;
        let skipped = (behind.as_nanos() / s.interval.as_nanos()) as u64 + 1;
        s.next += s.interval * skipped as u32;
        skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn slaves_tick_at_their_own_interval_without_drift() {
        let t0 = Instant::now();
        let mut s = Schedule::new([100 * MS, 250 * MS], t0);
        assert_eq!(s.next(), Some((0, t0)));
        // A poll that takes 30 ms does not push the next tick back.
        assert_eq!(s.polled(0, t0 + 30 * MS), 0);
        assert_eq!(s.next(), Some((1, t0)));
        assert_eq!(s.polled(1, t0 + 60 * MS), 0);
        assert_eq!(s.next(), Some((0, t0 + 100 * MS)));
        assert_eq!(s.polled(0, t0 + 130 * MS), 0);
        assert_eq!(s.next(), Some((0, t0 + 200 * MS)));
        assert_eq!(s.polled(0, t0 + 210 * MS), 0);
        assert_eq!(s.next(), Some((1, t0 + 250 * MS)));
    }

    #[test]
    fn ticks_that_cannot_be_made_are_skipped_and_counted() {
        let t0 = Instant::now();
        let mut s = Schedule::new([100 * MS], t0);
        // The poll took 350 ms: ticks at 100, 200 and 300 are gone; the next is at 400.
        assert_eq!(s.polled(0, t0 + 350 * MS), 3);
        assert_eq!(s.next(), Some((0, t0 + 400 * MS)));
        // Ending exactly on the next tick keeps it; a moment later skips it.
        assert_eq!(s.polled(0, t0 + 500 * MS), 0);
        assert_eq!(s.next(), Some((0, t0 + 500 * MS)));
        assert_eq!(s.polled(0, t0 + 600 * MS + Duration::from_nanos(1)), 1);
        assert_eq!(s.next(), Some((0, t0 + 700 * MS)));
    }
}
