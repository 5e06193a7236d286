//! Keeps one device running: open with a timeout, run a session, back off, reopen. Every
//! outcome is a state on the device state topic; nothing here can stall another device.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::session::{self, SessionEnd};
use super::{DecoderFactory, DeviceRuntime, PortOpener, State};
use crate::backoff::Backoff;
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
    pub started: Instant,
    pub restart_min: Duration,
    pub restart_max: Duration,
    pub jitter: bool,
}

/// Runs until `cancel`; returns once the session and its decode thread have finished.
pub async fn supervise(ctx: SupervisorContext, cancel: CancellationToken) {
    let dev = &ctx.dev;
    let mut backoff = Backoff::new(ctx.restart_min, ctx.restart_max, ctx.jitter);
    loop {
        dev.set_state(&ctx.queue, State::Opening, None);
        let opened = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = tokio::time::timeout(dev.config.open_timeout, ctx.opener.open(&dev.config)) => r,
        };
        let (error, state) = match opened {
            Ok(Ok(port)) => {
                dev.set_state(&ctx.queue, State::Up, None);
                let began = Instant::now();
                let end = session::run(port, &ctx, &cancel).await;
                if began.elapsed() >= HEALTHY_AFTER {
                    backoff.reset();
                }
                match end {
                    SessionEnd::Cancelled => break,
                    SessionEnd::Idle(_) => (end.to_string(), State::Stale),
                    other => (other.to_string(), State::Backoff),
                }
            }
            Ok(Err(e)) => (format!("cannot open {}: {e}", dev.config.path.display()), State::Backoff),
            Err(_) => (format!("opening {} timed out", dev.config.path.display()), State::Backoff),
        };
        let delay = backoff.next_delay();
        telemetry::device_restarting(dev.name(), &dev.counters, &error, delay);
        if state == State::Stale {
            dev.set_state(&ctx.queue, State::Stale, Some(error.clone()));
        }
        dev.set_state(&ctx.queue, State::Backoff, Some(error));
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    dev.set_state(&ctx.queue, State::Stopped, None);
}
