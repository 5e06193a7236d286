//! Capped exponential backoff with jitter. No I/O; the caller sleeps.

use std::time::Duration;

/// Doubles from `min` up to `max`. With jitter, each delay is drawn from [d/2, d] so that a
/// fleet of gateways (or devices) restarted together does not retry in lock-step.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    jitter: bool,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, jitter: bool) -> Self {
        Self { min, max: max.max(min), next: min, jitter }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        if self.jitter {
            d.mul_f64(0.5 + fastrand::f64() * 0.5)
        } else {
            d
        }
    }

    /// Whether delays are drawn at random (off in tests that need exact timing).
    pub fn has_jitter(&self) -> bool {
        self.jitter
    }

    /// After a healthy period: start again from `min`.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500), false);
        let got: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        let mut b = Backoff::new(Duration::from_secs(8), Duration::from_secs(8), true);
        for _ in 0..1000 {
            let d = b.next_delay();
            assert!(d >= Duration::from_secs(4) && d <= Duration::from_secs(8), "{d:?}");
        }
    }
}
