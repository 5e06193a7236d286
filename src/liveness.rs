//! Who has reported in lately. Long-lived tasks beat from their own loops — also while they
//! wait on something that is allowed to take long — and the systemd watchdog is fed only
//! while every one of them has. A task that stops being polled (a deadlock, a blocked thread,
//! a device session stuck handing bytes to a decoder that never returns) stops beating.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// How often a waiting task beats.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);

/// The registry of components and their last beat.
#[derive(Debug)]
pub struct Liveness {
    started: Instant,
    parts: Vec<(String, AtomicU64)>,
}

/// One component's handle for beating.
#[derive(Debug, Clone)]
pub struct Beat {
    live: Arc<Liveness>,
    index: usize,
}

impl Liveness {
    /// A registry of the named components, all counted as alive now.
    pub fn new(names: impl IntoIterator<Item = String>) -> Arc<Self> {
        Arc::new(Self { started: Instant::now(), parts: names.into_iter().map(|n| (n, AtomicU64::new(0))).collect() })
    }

    /// The beat handle of the component named `name`.
    ///
    /// # Panics
    /// If no component of that name was registered (a wiring bug).
    pub fn beat_for(self: &Arc<Self>, name: &str) -> Beat {
        let index = self.parts.iter().position(|(n, _)| n == name).unwrap_or_else(|| panic!("no component {name:?}"));
        Beat { live: Arc::clone(self), index }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Components whose last beat is older than `limit`.
    pub fn stale(&self, limit: Duration) -> Vec<&str> {
        let now = self.now_ms();
        let limit = limit.as_millis() as u64;
        self.parts
            .iter()
            .filter(|(_, t)| now.saturating_sub(t.load(Relaxed)) > limit)
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

impl Beat {
    pub fn beat(&self) {
        let live = &self.live;
        live.parts[self.index].1.store(live.now_ms(), Relaxed);
    }
}

/// A ticker for [`beating`]; one per task, so waiting allocates nothing.
pub fn ticker() -> Interval {
    let mut t = tokio::time::interval(BEAT_EVERY);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

/// Drives `fut` to completion, beating on every tick meanwhile.
pub async fn beating<F: Future>(beat: &Beat, tick: &mut Interval, fut: F) -> F::Output {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            out = &mut fut => return out,
            _ = tick.tick() => beat.beat(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_component_that_stops_beating_goes_stale() {
        let live = Liveness::new(["a".to_string(), "b".to_string()]);
        let (a, b) = (live.beat_for("a"), live.beat_for("b"));
        let mut tick = ticker();
        // `a` waits 10 s on something, beating; `b` beats once and then hangs.
        b.beat();
        beating(&a, &mut tick, tokio::time::sleep(Duration::from_secs(10))).await;
        assert_eq!(live.stale(Duration::from_secs(3)), ["b"]);
        b.beat();
        assert!(live.stale(Duration::from_secs(3)).is_empty());
    }
}
