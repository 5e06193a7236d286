//! Catch-up pacing: after an outage the connection has a backlog (in the memory queue, or in
//! the spool) and could send it as fast as the socket takes it. A broker passes that burst on
//! to its subscribers, and mosquitto's per-client queue (`max_queued_messages`, 1000 by default)
//! overflows: readings the broker acknowledged never reach a persistent subscriber, where our
//! counters cannot see it. So readings go out at most at `rate` per second, as a token bucket
//! with half a second of burst.
//!
//! `[mqtt] catch_up_rate` sets the rate; by default it is twice the input rate (the highest
//! one-second rate seen, decaying by 5 % a second), and at least [`MIN_AUTO_RATE`]. Live
//! readings are never held back by it: they arrive at most at the input rate, half of what
//! the bucket allows, and they go before backlog (see [`crate::queue`]).

use std::time::Duration;

use tokio::time::Instant;

/// The automatic rate's floor: drains an hour of a quiet gateway's backlog in about a minute,
/// and stays within a default mosquitto subscriber queue per second.
pub const MIN_AUTO_RATE: f64 = 1000.0;
/// A paced connection wakes for this much of the rate at a time.
const BATCH: Duration = Duration::from_millis(10);
/// How often the input rate is sampled.
const SAMPLE: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Pacer {
    fixed: Option<f64>,
    rate: f64,
    tokens: f64,
    last: Instant,
    input_rate: f64,
    sampled_at: Instant,
    sampled_pushed: u64,
}

impl Pacer {
    /// `fixed`: the configured rate; None for the automatic one. `pushed`: readings queued
    /// so far (the input rate is measured from it).
    pub fn new(fixed: Option<u32>, pushed: u64) -> Self {
        let now = Instant::now();
        let fixed = fixed.map(f64::from);
        let rate = fixed.unwrap_or(MIN_AUTO_RATE);
        Self { fixed, rate, tokens: burst(rate), last: now, input_rate: 0.0, sampled_at: now, sampled_pushed: pushed }
    }

    /// The current rate, readings per second.
    #[cfg(test)]
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Measures the input rate (call often; it samples once a second).
    pub fn observe(&mut self, pushed: u64) {
        let now = Instant::now();
        let dt = now.duration_since(self.sampled_at);
        if dt < SAMPLE {
            return;
        }
        let sample = pushed.saturating_sub(self.sampled_pushed) as f64 / dt.as_secs_f64();
        self.sampled_at = now;
        self.sampled_pushed = pushed;
        self.input_rate = sample.max(self.input_rate * 0.95f64.powf(dt.as_secs_f64()));
        if self.fixed.is_none() {
            self.rate = (2.0 * self.input_rate).max(MIN_AUTO_RATE);
        }
    }

    /// Whether a reading may go now.
    pub fn ready(&mut self) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(burst(self.rate));
        self.tokens >= 1.0
    }

    /// A reading went.
    pub fn spend(&mut self) {
        self.tokens -= 1.0;
    }

    /// When the next token is due.
    #[cfg(test)]
    pub fn next_token(&self) -> Instant {
        self.when(1.0)
    }

    /// When a batch's worth of tokens is due ([`BATCH`] of them, at least one): waking for
    /// every token would write one reading per wake-up (measured: 5 CPU-s per 100k replayed
    /// at 4000/s, against 1.0 for live readings).
    pub fn next_batch(&self) -> Instant {
        self.when((self.rate * BATCH.as_secs_f64()).clamp(1.0, burst(self.rate)))
    }

    fn when(&self, tokens: f64) -> Instant {
        let missing = (tokens - self.tokens).max(0.0);
        self.last + Duration::from_secs_f64(missing / self.rate)
    }
}

fn burst(rate: f64) -> f64 {
    (rate / 2.0).max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_fixed_rate_allows_half_a_second_of_burst_then_the_rate() {
        let mut p = Pacer::new(Some(100), 0);
        let mut n = 0;
        while p.ready() {
            p.spend();
            n += 1;
        }
        assert_eq!(n, 50);
        assert_eq!(p.next_token() - Instant::now(), Duration::from_millis(10));
        // 10 ms of the rate is one reading at 100/s.
        assert_eq!(p.next_batch(), p.next_token());
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            while p.ready() {
                p.spend();
                n += 1;
            }
        }
        assert!((1049..=1050).contains(&n), "{n}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_automatic_rate_follows_twice_the_input_rate_and_decays_slowly() {
        let mut p = Pacer::new(None, 0);
        assert_eq!(p.rate(), MIN_AUTO_RATE);
        tokio::time::advance(Duration::from_secs(1)).await;
        p.observe(4000);
        assert_eq!(p.rate(), 8000.0);
        // A paced connection wakes for 80 readings at a time, not for each.
        while p.ready() {
            p.spend();
        }
        assert_eq!(p.next_batch() - p.next_token(), Duration::from_secs_f64(79.0 / 8000.0));
        // The input stops: the rate decays 5 % a second, down to the floor.
        tokio::time::advance(Duration::from_secs(1)).await;
        p.observe(4000);
        assert!((p.rate() - 7600.0).abs() < 1.0, "{}", p.rate());
        tokio::time::advance(Duration::from_secs(120)).await;
        p.observe(4000);
        assert_eq!(p.rate(), MIN_AUTO_RATE);
    }
}
