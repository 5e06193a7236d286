//! Keeps one device running: open with a timeout, run a session, back off, reopen. Every
//! outcome is a state on the device state topic; nothing here can stall another device.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::session::{self, SessionEnd};
use super::{DecoderFactory, DeviceRuntime, PortOpener, State};
use crate::backoff::Backoff;
use crate::liveness::{self, Beat};
use crate::queue::ReadingQueue;
use crate::telemetry;

/// A session that ran this long was healthy: the next failure starts backoff from the minimum.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// What a supervisor needs; cheap to clone.
#[derive(Clone)]
pub struct SupervisorContext {
    pub dev: Arc<DeviceRuntime>,
    pub queue: Arc<ReadingQueue>,
    pub opener: Arc<dyn PortOpener>,
    pub decoders: DecoderFactory,
    pub restart_min: Duration,
    pub restart_max: Duration,
    pub jitter: bool,
    /// Reports this device's supervisor and session to the watchdog.
    pub beat: Beat,
}

/// Runs until `cancel`; returns once the session (and its decode thread, if it has one) has
/// finished.
///
/// States: `opening` → `up` → (session ends) `backoff` → `opening` …; a port that cannot be
/// opened is `failed` until the next attempt; a silent device is `stale` from the idle timeout
/// until bytes arrive again (its port is reopened at once: silence is no reason to wait).
pub async fn supervise(ctx: SupervisorContext, cancel: CancellationToken) {
    let dev = &ctx.dev;
    let mut backoff = Backoff::new(ctx.restart_min, ctx.restart_max, ctx.jitter);
    let mut tick = liveness::ticker();
    let mut stale = false;
    loop {
        if !stale {
            dev.set_state(&ctx.queue, State::Opening, None);
        }
        let open = tokio::time::timeout(dev.config.port.open_timeout, ctx.opener.open(&dev.config.port));
        let opened = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = liveness::beating(&ctx.beat, &mut tick, open) => r,
        };
        let (error, state) = match opened {
            Ok(Ok(port)) => {
                if !stale {
                    dev.set_state(&ctx.queue, State::Up, None);
                }
                let began = Instant::now();
                let end = session::run(port, &ctx, &cancel, stale).await;
                if began.elapsed() >= HEALTHY_AFTER {
                    backoff.reset();
                }
                match end {
                    SessionEnd::Cancelled => break,
                    SessionEnd::Idle(_) => (end.to_string(), State::Stale),
                    SessionEnd::Requested => {
                        tracing::info!(device = dev.name(), "Restart requested; reopening the port.");
                        dev.counters.restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        stale = false;
                        continue;
                    }
                    other => (other.to_string(), State::Backoff),
                }
            }
            Ok(Err(e)) => (format!("cannot open {}: {e}", dev.config.port.path.display()), State::Failed),
            Err(_) => (format!("opening {} timed out", dev.config.port.path.display()), State::Failed),
        };
        stale = state == State::Stale;
        let delay = if stale { Duration::ZERO } else { backoff.next_delay() };
        telemetry::device_restarting(dev.name(), &dev.counters, &error, delay);
        dev.set_state(&ctx.queue, state, Some(error));
        let wait = tokio::time::sleep(delay);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            // An operator's restart skips the wait.
            _ = dev.restart.notified() => {}
            _ = liveness::beating(&ctx.beat, &mut tick, wait) => {}
        }
    }
    dev.set_state(&ctx.queue, State::Stopped, None);
}
