//! Who has reported in lately. Long-lived tasks beat from their own loops — also while they
//! wait on something that is allowed to take long — and the systemd watchdog is fed only
//! while every one of them has. A task that stops being polled (a deadlock, a blocked thread,
//! a device session stuck handing bytes to a decoder that never returns) stops beating.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// How often a waiting task beats.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);

/// The registry of components and their last beat.
#[derive(Debug)]
pub struct Liveness {
    started: Instant,
    parts: RwLock<Vec<(String, Arc<AtomicU64>)>>,
}

/// One component's handle for beating; lock-free.
#[derive(Debug, Clone)]
pub struct Beat {
    started: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Liveness {
    /// A registry of the named components, all counted as alive now.
    pub fn new(names: impl IntoIterator<Item = String>) -> Arc<Self> {
        let live = Arc::new(Self { started: Instant::now(), parts: RwLock::default() });
        for n in names {
            live.beat_for(&n);
        }
        live
    }

    /// The beat handle of the component named `name`, registering it (as alive now) if new.
    pub fn beat_for(&self, name: &str) -> Beat {
        let mut parts = self.parts.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let last_ms = match parts.iter().find(|(n, _)| n == name) {
            Some((_, t)) => Arc::clone(t),
            None => {
                let t = Arc::new(AtomicU64::new(self.now_ms()));
                parts.push((name.to_string(), Arc::clone(&t)));
                t
            }
        };
        Beat { started: self.started, last_ms }
    }

    /// Stops watching a component (a device removed by a reload).
    pub fn retire(&self, name: &str) {
        self.parts.write().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|(n, _)| n != name);
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Components whose last beat is older than `limit`.
    pub fn stale(&self, limit: Duration) -> Vec<String> {
        let now = self.now_ms();
        let limit = limit.as_millis() as u64;
        let parts = self.parts.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        parts.iter().filter(|(_, t)| now.saturating_sub(t.load(Relaxed)) > limit).map(|(n, _)| n.clone()).collect()
    }
}

impl Beat {
    pub fn beat(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Relaxed);
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
        // Components come and go with reloads.
        let c = live.beat_for("c");
        tokio::time::advance(Duration::from_secs(4)).await;
        a.beat();
        b.beat();
        assert_eq!(live.stale(Duration::from_secs(3)), ["c"]);
        live.retire("c");
        assert!(live.stale(Duration::from_secs(3)).is_empty());
        drop(c);
    }
}
