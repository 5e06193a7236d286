//! Inputs: what turns a device's data into readings. Every input ends in the one
//! [`ReadingSink`] of its device; a new kind of input (a polled protocol) only has to produce
//! the fields of one reading at a time. Sans-IO: no async, no I/O; the queue push never blocks.

mod stream;

pub use self::stream::{panic_message, NewDecoder, StreamInput};

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::BytesMut;

use crate::decode::{Channel, Decoded};
use crate::queue::ReadingQueue;
use crate::reading::{PacketLimit, PayloadBuilder};
use crate::reject::Reject;
use crate::telemetry::{self, DeviceCounters};

/// The queues of the outputs other than the main one (Sparkplug), each with the device's lane
/// in it. Shared: one pointer in every sink.
pub type OtherOutputs = Arc<[(Arc<ReadingQueue>, usize)]>;

/// One device's share of the shared state: its lane in the queue, its counters and the
/// packet limit its readings must fit.
#[derive(Debug, Clone)]
pub struct SinkTarget {
    pub queue: Arc<ReadingQueue>,
    pub lane: usize,
    pub counters: Arc<DeviceCounters>,
    pub packet_limit: PacketLimit,
    /// The other outputs' queues (Sparkplug) and this device's lane in each.
    pub also: OtherOutputs,
}

/// Where one device's readings go: fields → payload → sequence check → packet-size check →
/// queue push, each step counted, so the accounting identity
/// (`frames_in = readings + rejected`) holds whatever the input.
pub struct ReadingSink {
    device: Box<str>,
    to: SinkTarget,
    builder: PayloadBuilder,
    /// The sensor's last frame counter, to count frames lost on the wire.
    last_sensor_seq: Option<u32>,
}

impl ReadingSink {
    /// The sink of the device called `device`; `channels` with a unit add a `units` member
    /// to its payloads.
    pub fn new(device: &str, channels: &[Channel], to: SinkTarget) -> Self {
        Self { device: device.into(), builder: PayloadBuilder::new(device, channels), to, last_sensor_seq: None }
    }

    /// The device's name.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Input that could not become a reading before its fields were known (a framing
    /// error): counted as a frame in and as rejected by `reason`.
    pub fn reject(&mut self, reason: Reject) {
        self.to.counters.frames_in.fetch_add(1, Relaxed);
        telemetry::frame_rejected(&self.device, &self.to.counters, reason);
    }

    /// One reading: `fields` appends its sensor fields as JSON members (see
    /// [`PayloadBuilder::build`]; `input_len` sizes the room made for them). Received at
    /// `received_at_us` (µs since the epoch).
    ///
    /// # Errors
    /// Why it did not reach the queue (already counted and logged): the reason `fields`
    /// gave, or [`Reject::OversizePacket`].
    pub fn offer(
        &mut self,
        input_len: usize,
        received_at_us: u64,
        fields: impl FnOnce(&mut BytesMut) -> Result<Decoded, Reject>,
    ) -> Result<(), Reject> {
        let (name, counters) = (&*self.device, &*self.to.counters);
        counters.frames_in.fetch_add(1, Relaxed);
        let seq = counters.readings.load(Relaxed) + 1;
        let (payload, decoded) = match self.builder.build(input_len, seq, received_at_us, fields) {
            Ok(built) => built,
            Err(reason) => {
                telemetry::frame_rejected(name, counters, reason);
                return Err(reason);
            }
        };
        if let (Some(s), Some(last)) = (decoded.sensor_seq, self.last_sensor_seq) {
            // A counter that went backwards is a sensor reboot, not a loss.
            if s > last.wrapping_add(1) && s > last {
                telemetry::sequence_gap(name, counters, u64::from(s - last - 1));
            }
        }
        if decoded.sensor_seq.is_some() {
            self.last_sensor_seq = decoded.sensor_seq;
        }
        // After the sequence check: the frame did arrive, it is only too large to publish.
        if let Some((size, limit)) = self.to.packet_limit.exceeded_by(payload.len()) {
            telemetry::packet_too_large(name, counters, size, limit);
            return Err(Reject::OversizePacket);
        }
        counters.readings.store(seq, Relaxed);
        counters.last_reading_us.store(received_at_us, Relaxed);
        // Every output gets the same bytes (a reference count): no copy per output.
        for (queue, lane) in self.to.also.iter() {
            let outcome = queue.push(*lane, payload.clone());
            if outcome.evicted > 0 {
                // Counted in that output's lane stats (its metrics); logged sparingly here.
                telemetry::other_output_dropped(name, outcome.evicted);
            }
        }
        let outcome = self.to.queue.push(self.to.lane, payload);
        if outcome.evicted > 0 {
            telemetry::readings_dropped(name, counters, outcome.evicted);
        }
        Ok(())
    }

    /// Writes the log lines the rate limits held back and that are now due; call it after
    /// each batch of input (a chunk, a poll).
    pub fn flush_due(&self) {
        telemetry::flush_due(&self.device, &self.to.counters);
    }

    /// The input session is over: writes every held-back log line.
    pub fn end(&self) {
        telemetry::flush_suppressed(&self.device, &self.to.counters);
    }
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;

    use super::*;

    /// Fields `"f":<text>` with the sensor's counter `sensor_seq`.
    fn fields(text: &str, sensor_seq: Option<u32>) -> impl FnOnce(&mut BytesMut) -> Result<Decoded, Reject> + '_ {
        move |out| {
            out.put_slice(b"\"f\":");
            out.put_slice(text.as_bytes());
            Ok(Decoded { sensor_seq })
        }
    }

    /// The identity an input relies on: every offer and reject is one frame in, and ends as
    /// exactly one reading or one rejection; gaps and evictions are counted on the side.
    #[test]
    fn every_input_is_counted_once_whatever_its_outcome() {
        let queue = Arc::new(ReadingQueue::new(1, 2, 1 << 20, None, 1));
        let counters = Arc::new(DeviceCounters::default());
        let to = SinkTarget {
            queue: Arc::clone(&queue),
            lane: 0,
            counters: Arc::clone(&counters),
            packet_limit: PacketLimit::new(200).for_topic("t"),
            also: Arc::default(),
        };
        let mut sink = ReadingSink::new("d", &[], to);
        sink.reject(Reject::Oversize);
        assert_eq!(sink.offer(4, 1, fields("1", Some(5))), Ok(()));
        assert_eq!(sink.offer(4, 2, |_| Err(Reject::BadKv)), Err(Reject::BadKv));
        assert_eq!(sink.offer(4, 3, fields("2", Some(9))), Ok(()));
        let big = "9".repeat(300);
        assert_eq!(sink.offer(300, 4, fields(&big, None)), Err(Reject::OversizePacket));
        assert_eq!(sink.offer(4, 5, fields("3", None)), Ok(()));
        let c = &*counters;
        assert_eq!(c.frames_in.load(Relaxed), 6);
        assert_eq!(c.readings.load(Relaxed), 3);
        assert_eq!(c.rejected_total(), 3);
        assert_eq!(c.sequence_gaps.load(Relaxed), 3, "sensor counter 5 then 9: 6, 7 and 8 were lost");
        assert_eq!(c.last_reading_us.load(Relaxed), 5);
        let lane = queue.stats()[0];
        assert_eq!((lane.readings, lane.queued, lane.dropped_oldest), (3, 2, 1));
        // Readings are numbered by the sink, rejected ones take no number.
        let crate::queue::Outbound::Reading { payload, .. } = queue.pop_next().unwrap() else { panic!() };
        assert_eq!(&payload[..], br#"{"f":2,"_gw":{"device":"d","seq":2,"received_at_us":3,"sensor_seq":9}}"#);
    }
}
