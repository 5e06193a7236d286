//! The decode thread of one device session: framing, decoding, pushing into the queue.
//! Plain blocking code on its own std::thread, so a slow or pathological decoder can only
//! delay its own device, never a tokio worker (and so never another device or the MQTT connection).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{DecoderFactory, DeviceRuntime};
use crate::framing::Framer;
use crate::queue::ReadingQueue;
use crate::reading::PayloadBuilder;
use crate::reject::Reject;
use crate::telemetry;

/// A chunk read from the port and when it was read (µs since the epoch).
pub(crate) type Chunk = (Bytes, u64);

pub(crate) struct Worker {
    pub dev: Arc<DeviceRuntime>,
    pub queue: Arc<ReadingQueue>,
    pub decoders: DecoderFactory,
    /// Fired once, at the first decoder panic: the session then ends and is restarted.
    pub panicked: Option<oneshot::Sender<String>>,
}

impl Worker {
    /// Runs until the session drops its sender, then returns after the last chunk.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Chunk>) {
        let dev = Arc::clone(&self.dev);
        let name = dev.name();
        let counters = &dev.counters;
        let mut framer = Framer::new(dev.config.framing, dev.config.max_frame());
        let mut decoder = (self.decoders)(&dev.config);
        let mut builder = PayloadBuilder::new(name, &dev.config.channels);
        let mut last_sensor_seq: Option<u32> = None;
        while let Some((chunk, received_at_us)) = rx.blocking_recv() {
            framer.push(&chunk, |frame| {
                counters.frames_in.fetch_add(1, Relaxed);
                let frame = match frame {
                    Ok(f) => f,
                    Err(reason) => return telemetry::frame_rejected(name, counters, reason),
                };
                let seq = counters.readings.load(Relaxed) + 1;
                let built = catch_unwind(AssertUnwindSafe(|| builder.build(&mut *decoder, frame, seq, received_at_us)));
                let (payload, decoded) = match built {
                    Ok(Ok(ok)) => ok,
                    Ok(Err(reason)) => return telemetry::frame_rejected(name, counters, reason),
                    Err(panic) => {
                        let msg = panic_message(&*panic);
                        telemetry::frame_rejected(name, counters, Reject::DecoderPanic);
                        tracing::error!(device = name, panic = %msg, "Decoder panicked; restarting the device session.");
                        // Its state is suspect: finish this session's bytes with a fresh one.
                        decoder = (self.decoders)(&dev.config);
                        builder = PayloadBuilder::new(name, &dev.config.channels);
                        if let Some(tx) = self.panicked.take() {
                            let _ = tx.send(msg);
                        }
                        return;
                    }
                };
                if let (Some(s), Some(last)) = (decoded.sensor_seq, last_sensor_seq) {
                    // A counter that went backwards is a sensor reboot, not a loss.
                    if s > last.wrapping_add(1) && s > last {
                        telemetry::sequence_gap(name, counters, u64::from(s - last - 1));
                    }
                }
                if decoded.sensor_seq.is_some() {
                    last_sensor_seq = decoded.sensor_seq;
                }
                // After the sequence check: the frame did arrive, it is only too large to publish.
                if let Some((size, limit)) = dev.packet_limit.exceeded_by(payload.len()) {
                    return telemetry::packet_too_large(name, counters, size, limit);
                }
                counters.readings.store(seq, Relaxed);
                counters.last_reading_us.store(received_at_us, Relaxed);
                let outcome = self.queue.push(dev.index, payload);
                if outcome.evicted > 0 {
                    telemetry::readings_dropped(name, counters, outcome.evicted);
                }
            });
            telemetry::flush_due(name, counters);
        }
        // The session is over; a frame begun on this port will never be finished.
        if framer.has_partial() {
            counters.frames_in.fetch_add(1, Relaxed);
            telemetry::frame_rejected(name, counters, Reject::Truncated);
        }
        telemetry::flush_suppressed(name, counters);
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
