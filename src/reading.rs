//! Assembling a reading's JSON payload: sensor fields first, gateway metadata under one
//! reserved key. Payloads are cut from a per-device arena, so there is no allocation per
//! reading, only one per arena chunk.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::decode::{Channel, Decoded};
use crate::payload::{write_json_str, RESERVED_KEY};
use crate::reject::Reject;

/// Arena chunk size. A queued reading keeps its chunk alive, and every device holds one chunk
/// it is filling, so chunks stay small: 4 KiB still takes ~20 JSON readings per allocation
/// (16 KiB cost 12 KiB more per device: 1.5 MiB of RSS at 128 devices).
const ARENA_CHUNK: usize = 4 * 1024;
/// Room for the metadata the builder appends.
const META_ROOM: usize = 256;

/// Bytes of the QoS 1 PUBLISH that carries `payload_len` bytes on a topic of `topic_len`
/// bytes: fixed header (type byte, remaining length), topic with its length, packet id,
/// payload. At QoS 0 the packet is 2 bytes shorter; counting them anyway keeps one rule.
pub fn publish_len(topic_len: usize, payload_len: usize) -> usize {
    crate::mqtt::codec::publish_size(crate::mqtt::Version::V311, topic_len, payload_len, true)
}

/// `mqtt.max_packet_size` as one device's readings meet it. An MQTT 3.1.1 broker answers a
/// packet over its limit by closing the connection, and the reading would then block every
/// device after each reconnect: so the limit is checked as a reading is built. The limit is
/// shared by every device and changed in place by a reload.
#[derive(Debug, Clone)]
pub struct PacketLimit {
    max: Arc<AtomicUsize>,
    topic_len: usize,
}

impl PacketLimit {
    /// The shared limit; [`for_topic`](Self::for_topic) binds it to a device's readings topic.
    pub fn new(max_packet_size: usize) -> Self {
        Self { max: Arc::new(AtomicUsize::new(max_packet_size)), topic_len: 0 }
    }

    /// The same shared limit, for readings published on `topic`.
    pub fn for_topic(&self, topic: &str) -> Self {
        Self { max: Arc::clone(&self.max), topic_len: topic.len() }
    }

    /// A new limit for every device (a reload).
    pub fn set(&self, max_packet_size: usize) {
        self.max.store(max_packet_size, Relaxed);
    }

    /// `Some((packet size, limit))` when a reading of `payload_len` bytes does not fit.
    pub fn exceeded_by(&self, payload_len: usize) -> Option<(usize, usize)> {
        let (size, limit) = (publish_len(self.topic_len, payload_len), self.max.load(Relaxed));
        (size > limit).then_some((size, limit))
    }
}

/// Builds payloads for one device.
pub struct PayloadBuilder {
    arena: BytesMut,
    /// `"_gw":{"device":"<name>"`, escaped once.
    meta_head: Box<[u8]>,
    /// `,"units":{...}` for binary devices with units configured.
    units: Option<Box<[u8]>>,
}

impl PayloadBuilder {
    /// Payloads of the device called `device`; `channels` with a unit add a `units` member.
    pub fn new(device: &str, channels: &[Channel]) -> Self {
        let mut head = BytesMut::new();
        head.put_slice(b"\"");
        head.put_slice(RESERVED_KEY.as_bytes());
        head.put_slice(b"\":{\"device\":");
        write_json_str(&mut head, device);
        let with_units: Vec<_> = channels.iter().filter_map(|c| Some((&c.name, c.unit.as_ref()?))).collect();
        let units = (!with_units.is_empty()).then(|| {
            let mut u = BytesMut::new();
            u.put_slice(b",\"units\":{");
            for (i, (name, unit)) in with_units.iter().enumerate() {
                if i > 0 {
                    u.put_u8(b',');
                }
                write_json_str(&mut u, name);
                u.put_u8(b':');
                write_json_str(&mut u, unit);
            }
            u.put_u8(b'}');
            u.to_vec().into_boxed_slice()
        });
        Self { arena: BytesMut::new(), meta_head: head.to_vec().into_boxed_slice(), units }
    }

    /// The payload of one reading: `fields` appends its sensor fields as JSON members (what a
    /// [`Decode`](crate::decode::Decode) does with a frame), the metadata follows. `input_len`
    /// is the size of what the fields are made from (a frame); room for twice that is made.
    ///
    /// # Errors
    /// The [`Reject`] `fields` returns; nothing is kept of a rejected reading.
    pub fn build(
        &mut self,
        input_len: usize,
        seq: u64,
        received_at_us: u64,
        fields: impl FnOnce(&mut BytesMut) -> Result<Decoded, Reject>,
    ) -> Result<(Bytes, Decoded), Reject> {
        let need = input_len * 2 + META_ROOM + self.units.as_ref().map_or(0, |u| u.len());
        if self.arena.capacity() < need {
            self.arena = BytesMut::with_capacity(ARENA_CHUNK.max(need));
        }
        let a = &mut self.arena;
        a.put_u8(b'{');
        let decoded = match fields(a) {
            Ok(d) => d,
            Err(e) => {
                a.clear();
                return Err(e);
            }
        };
        if a.len() > 1 {
            a.put_u8(b',');
        }
        a.put_slice(&self.meta_head);
        a.put_slice(b",\"seq\":");
        a.put_slice(itoa::Buffer::new().format(seq).as_bytes());
        a.put_slice(b",\"received_at_us\":");
        a.put_slice(itoa::Buffer::new().format(received_at_us).as_bytes());
        if let Some(s) = decoded.sensor_seq {
            a.put_slice(b",\"sensor_seq\":");
            a.put_slice(itoa::Buffer::new().format(s).as_bytes());
        }
        if let Some(u) = &self.units {
            a.put_slice(u);
        }
        a.put_slice(b"}}");
        Ok((a.split().freeze(), decoded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Decode, JsonDecoder, KvDecoder};

    fn build(
        b: &mut PayloadBuilder,
        mut d: impl Decode,
        frame: &[u8],
        seq: u64,
        at: u64,
    ) -> Result<(Bytes, Decoded), Reject> {
        b.build(frame.len(), seq, at, |out| d.decode(frame, out))
    }

    /// Topic-name validation would refuse the quote; payload escaping is what is tested here.
    fn builder() -> PayloadBuilder {
        PayloadBuilder::new("th\"1", &[])
    }

    #[test]
    fn wraps_fields_with_metadata_and_keeps_sensor_fields() {
        let mut b = builder();
        let (p, _) = build(&mut b, JsonDecoder, br#"{"t":21.50,"seq":"sensor's"}"#, 3, 17).unwrap();
        let s = std::str::from_utf8(&p).unwrap();
        assert_eq!(s, r#"{"t":21.50,"seq":"sensor's","_gw":{"device":"th\"1","seq":3,"received_at_us":17}}"#);
        let (p, _) = build(&mut b, JsonDecoder, b"{}", 4, 18).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["_gw"]["seq"], 4);
    }

    #[test]
    fn rejected_frame_leaves_nothing_behind() {
        let mut b = builder();
        assert_eq!(build(&mut b, KvDecoder, b"a=1 b", 1, 1).unwrap_err(), Reject::BadKv);
        let (p, _) = build(&mut b, KvDecoder, b"a=1", 2, 1).unwrap();
        assert!(p.starts_with(b"{\"a\":1,"), "{p:?}");
    }

    /// The length must match the real encoding, at each remaining-length boundary.
    #[test]
    fn publish_len_matches_the_codec() {
        use rumqttc::mqttbytes::{v4::Publish, QoS};
        let topic = "sensorgate/gw/devices/th/readings";
        for payload_len in [0, 1, 90, 91, 92, 16_344, 16_345, 16_346, 2_097_110, 2_097_111, 2_097_112] {
            let mut p = Publish::new(topic, QoS::AtLeastOnce, vec![b'x'; payload_len]);
            p.pkid = 1;
            let mut encoded = BytesMut::new();
            p.write(&mut encoded).unwrap();
            assert_eq!(publish_len(topic.len(), payload_len), encoded.len(), "payload {payload_len}");
        }
    }

    #[test]
    fn packet_limit_is_shared_and_counts_the_topic() {
        let shared = PacketLimit::new(512);
        let topic = "sensorgate/gw/devices/a/readings";
        let a = shared.for_topic(topic);
        // 512 = 1 + 2 (remaining length) + 2 + topic + 2 + payload.
        let fits = 512 - 7 - topic.len();
        assert_eq!(a.exceeded_by(fits), None);
        assert_eq!(a.exceeded_by(fits + 1), Some((513, 512)));
        shared.set(1024);
        assert_eq!(a.exceeded_by(fits + 1), None);
    }

    #[test]
    fn many_payloads_share_few_allocations() {
        let mut b = builder();
        let payloads: Vec<Bytes> =
            (0..1000).map(|i| build(&mut b, KvDecoder, b"t=21.5 h=40", i, 1).unwrap().0).collect();
        // Consecutive payloads are adjacent slices of one chunk.
        let adjacent = payloads.windows(2).filter(|w| w[0].as_ptr_range().end == w[1].as_ptr()).count();
        assert!(adjacent > 900, "only {adjacent} of 999 payloads shared a chunk");
    }
}
