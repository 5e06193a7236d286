//! MQTT bytes: the packets we write (PUBLISH encoded directly, the rest through rumqttc's
//! codecs) and the packets we read, framed here so that an oversized packet is skipped rather
//! than fatal. Knows MQTT 3.1.1 and 5; no I/O, no queue, no config.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes as v5q;
use rumqttc::v5::mqttbytes::v5;

/// The protocol spoken on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    #[default]
    V311,
    /// MQTT 5: CONNACK limits, PUBACK reason codes, message expiry, response topics.
    V5,
}

/// The largest packet MQTT can express (the remaining length's four bytes) plus its header.
pub const PROTOCOL_MAX_PACKET: usize = 268_435_455 + 5;
/// The most an MQTT string (topic, client id) can hold.
pub const MAX_STRING: usize = u16::MAX as usize;

/// Something we were asked to write does not fit MQTT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("a string of {0} bytes does not fit MQTT's 65,535")]
    StringTooLong(usize),
    #[error("a packet of {size} bytes is over the limit of {limit}")]
    PacketTooLarge { size: usize, limit: usize },
    #[error("{0}")]
    Codec(String),
}

/// What a PUBLISH carries besides topic and payload.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishMeta<'a> {
    /// 0 at QoS 0.
    pub pkid: u16,
    pub retain: bool,
    /// MQTT 5 only: Message Expiry Interval in seconds.
    pub expiry_s: Option<u32>,
    /// MQTT 5 only: Correlation Data (a command response).
    pub correlation: Option<&'a [u8]>,
}

/// Size on the wire of a PUBLISH, for checking it against a packet-size limit before it is
/// built. MQTT 5 properties are counted at their largest (expiry present).
pub fn publish_size(version: Version, topic_len: usize, payload_len: usize, qos1: bool) -> usize {
    let props = match version {
        Version::V311 => 0,
        Version::V5 => 1 + 5,
    };
    let remaining = 2 + topic_len + if qos1 { 2 } else { 0 } + props + payload_len;
    1 + varint(remaining).1 + remaining
}

/// Appends a PUBLISH to `b`. `put_topic` writes the topic as an MQTT string (see [`put_str`]):
/// it comes from a cache, so there is no String per reading. On error `b` is left as it was.
///
/// # Errors
/// The topic or a property does not fit MQTT, or the packet is over `limit`.
pub fn put_publish(
    b: &mut BytesMut,
    version: Version,
    meta: PublishMeta<'_>,
    payload: &[u8],
    limit: usize,
    put_topic: impl FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let begin = b.len();
    let qos = u8::from(meta.pkid != 0);
    b.put_u8(0b0011_0000 | (qos << 1) | u8::from(meta.retain));
    // Remaining length is written after the topic is known: reserve its 4 bytes.
    let len_at = b.len();
    b.put_slice(&[0; 4]);
    let start = b.len();
    if let Err(e) = put_topic(b) {
        b.truncate(begin);
        return Err(e);
    }
    if meta.pkid != 0 {
        b.put_u16(meta.pkid);
    }
    if version == Version::V5 {
        // Properties written in place: no buffer of their own per reading.
        let expiry_len = if meta.expiry_s.is_some() { 1 + 4 } else { 0 };
        let correlation_len = meta.correlation.map_or(0, |c| 1 + 2 + c.len());
        if let Some(c) = meta.correlation.filter(|c| c.len() > MAX_STRING) {
            b.truncate(begin);
            return Err(EncodeError::StringTooLong(c.len()));
        }
        put_varint(b, expiry_len + correlation_len);
        if let Some(s) = meta.expiry_s {
            b.put_u8(0x02);
            b.put_u32(s);
        }
        if let Some(c) = meta.correlation {
            b.put_u8(0x09);
            b.put_u16(c.len() as u16);
            b.put_slice(c);
        }
    }
    b.put_slice(payload);
    let remaining = b.len() - start;
    let (len, n) = varint(remaining);
    if remaining > 268_435_455 || 1 + n + remaining > limit {
        let size = 1 + n + remaining;
        b.truncate(begin);
        return Err(EncodeError::PacketTooLarge { size, limit });
    }
    b[len_at..len_at + n].copy_from_slice(&len[..n]);
    if n < 4 {
        // Close the gap left by the reservation.
        let gap = 4 - n;
        b.copy_within(len_at + 4.., len_at + n);
        b.truncate(b.len() - gap);
    }
    Ok(())
}

/// MQTT's variable-length integer: its bytes and how many of them are used (at most 4 for
/// any length MQTT allows).
fn varint(mut x: usize) -> ([u8; 4], usize) {
    let mut out = [0u8; 4];
    let mut n = 0;
    loop {
        let mut byte = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            byte |= 0x80;
        }
        out[n] = byte;
        n += 1;
        if x == 0 || n == 4 {
            return (out, n);
        }
    }
}

fn put_varint(b: &mut BytesMut, x: usize) {
    let (bytes, n) = varint(x);
    b.put_slice(&bytes[..n]);
}

/// A length-prefixed MQTT string; refuses one that does not fit (a `len as u16` would wrap and
/// make the broker misparse the rest of the packet).
///
/// # Errors
/// `s` is longer than 65,535 bytes.
pub fn put_str(b: &mut BytesMut, s: &str) -> Result<(), EncodeError> {
    let len = u16::try_from(s.len()).map_err(|_| EncodeError::StringTooLong(s.len()))?;
    b.put_u16(len);
    b.put_slice(s.as_bytes());
    Ok(())
}

/// What CONNECT says about us.
pub struct ConnectSpec<'a> {
    pub client_id: &'a str,
    pub keep_alive_s: u16,
    pub login: Option<(&'a str, &'a str)>,
    pub will_topic: &'a str,
    pub will_payload: &'a [u8],
    /// The JSON profile's `offline` is retained; Sparkplug's NDEATH is not.
    pub will_retain: bool,
    /// MQTT 5: the most PUBLISHes we accept in flight, and the largest packet we accept.
    pub receive_max: u16,
    pub max_incoming: usize,
}

fn codec_err(e: impl std::fmt::Debug) -> EncodeError {
    EncodeError::Codec(format!("{e:?}"))
}

/// CONNECT with a clean session (the queue, not the broker, holds our backlog) and a QoS 1
/// last will.
///
/// # Errors
/// A field does not fit MQTT.
pub fn put_connect(b: &mut BytesMut, version: Version, c: &ConnectSpec<'_>) -> Result<(), EncodeError> {
    for s in [c.client_id, c.will_topic] {
        if s.len() > MAX_STRING {
            return Err(EncodeError::StringTooLong(s.len()));
        }
    }
    match version {
        Version::V311 => {
            let mut connect = v4::Connect::new(c.client_id);
            connect.keep_alive = c.keep_alive_s;
            connect.clean_session = true;
            connect.last_will = Some(v4::LastWill::new(c.will_topic, c.will_payload, QoS::AtLeastOnce, c.will_retain));
            connect.login = c.login.map(|(u, p)| v4::Login::new(u, p));
            connect.write(b).map_err(codec_err)?;
        }
        Version::V5 => {
            let mut connect = v5::Connect {
                keep_alive: c.keep_alive_s,
                client_id: c.client_id.to_string(),
                clean_start: true,
                properties: None,
            };
            connect.properties = Some(v5::ConnectProperties {
                receive_maximum: Some(c.receive_max.max(1)),
                max_packet_size: Some(u32::try_from(c.max_incoming).unwrap_or(u32::MAX)),
                ..Default::default()
            });
            let will = v5::LastWill::new(c.will_topic, c.will_payload, v5q::QoS::AtLeastOnce, c.will_retain, None);
            let login = c.login.map(|(u, p)| v5::Login::new(u, p));
            v5::Packet::Connect(connect, Some(will), login).write(b, None).map_err(codec_err)?;
        }
    }
    Ok(())
}

/// SUBSCRIBE to `filters` at QoS 1.
///
/// # Errors
/// A filter does not fit MQTT.
pub fn put_subscribe(b: &mut BytesMut, version: Version, pkid: u16, filters: &[String]) -> Result<(), EncodeError> {
    if let Some(f) = filters.iter().find(|f| f.len() > MAX_STRING) {
        return Err(EncodeError::StringTooLong(f.len()));
    }
    match version {
        Version::V311 => {
            let filters = filters.iter().map(|f| v4::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
            v4::Subscribe { pkid, filters: filters.collect() }.write(b).map_err(codec_err)?;
        }
        Version::V5 => {
            let filters = filters.iter().map(|f| v5::Filter::new(f.clone(), v5q::QoS::AtLeastOnce));
            let mut s = v5::Subscribe::new_many(filters, None);
            s.pkid = pkid;
            v5::Packet::Subscribe(s).write(b, None).map_err(codec_err)?;
        }
    }
    Ok(())
}

/// PUBACK for an incoming QoS 1 PUBLISH (success; the same bytes in both versions).
pub fn put_puback(b: &mut BytesMut, pkid: u16) {
    b.put_slice(&[0x40, 0x02]);
    b.put_u16(pkid);
}

pub fn put_pingreq(b: &mut BytesMut) {
    b.put_slice(&[0xC0, 0x00]);
}

/// DISCONNECT, normal: the broker discards the last will (the same bytes in both versions).
pub fn put_disconnect(b: &mut BytesMut) {
    b.put_slice(&[0xE0, 0x00]);
}

/// An application message from the broker, as the command task sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    /// MQTT 5 request/response: where to answer, and what to answer with.
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
}

/// What a CONNACK said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// `None` when accepted; the broker's reason otherwise.
    pub refused: Option<String>,
    /// MQTT 5: the broker's Receive Maximum and Maximum Packet Size.
    pub receive_max: Option<u16>,
    pub max_packet_size: Option<u32>,
}

/// A packet from the broker, the same for both versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    ConnAck(ConnAck),
    /// `reason` is MQTT 5's PUBACK reason code (0 success); always 0 in 3.1.1.
    PubAck {
        pkid: u16,
        reason: u8,
    },
    /// The filters (by position) the broker refused, with its return code.
    SubAck {
        pkid: u16,
        refused: Vec<(usize, String)>,
    },
    PingResp,
    Publish {
        pkid: u16,
        qos1: bool,
        message: Message,
    },
    /// MQTT 5: the broker says why it is closing the connection.
    Disconnect {
        reason: String,
    },
    /// A well-formed packet a client never gets (or QoS 2 flows we never start).
    Unexpected(&'static str),
}

/// An incoming packet over `limit`, skipped: its PUBLISH packet id (0 if not a QoS 1 PUBLISH),
/// so that it can still be acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    pub size: usize,
    pub puback: Option<u16>,
}

/// One step of reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    Packet(Incoming),
    Skipped(Skipped),
}

/// The bytes do not make an MQTT packet: the connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed packet from the broker: {0}")]
pub struct Malformed(pub String);

/// Splits the bytes from the broker into packets. A packet over `limit` is not kept: its
/// bytes are dropped as they arrive (memory stays bounded) and it is reported as skipped.
#[derive(Debug)]
pub struct Reader {
    version: Version,
    limit: usize,
    /// Bytes of a skipped packet still to drop, and its report once the head was seen.
    skipping: usize,
    pending: Option<Skipped>,
}

impl Reader {
    pub fn new(version: Version, limit: usize) -> Self {
        Self { version, limit, skipping: 0, pending: None }
    }

    /// The next packet in `buf`, `Ok(None)` if more bytes are needed.
    ///
    /// # Errors
    /// The bytes are not MQTT.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Read>, Malformed> {
        if self.skipping > 0 {
            let n = self.skipping.min(buf.len());
            buf.advance(n);
            self.skipping -= n;
            return Ok(if self.skipping == 0 { self.pending.take().map(Read::Skipped) } else { None });
        }
        let Some((header_len, remaining)) = fixed_header(buf)? else { return Ok(None) };
        let total = header_len + remaining;
        if total > self.limit {
            // Enough of the head to find a QoS 1 PUBLISH's packet id: it must still be acked,
            // or the broker keeps the message (and one of its in-flight slots) for us.
            let kind = buf[0] >> 4;
            let qos = (buf[0] >> 1) & 0b11;
            let mut puback = None;
            if kind == 3 && qos == 1 {
                let head = &buf[header_len..];
                if head.len() < 2 {
                    return Ok(None);
                }
                let topic_len = usize::from(u16::from_be_bytes([head[0], head[1]]));
                if head.len() < 2 + topic_len + 2 {
                    return Ok(None);
                }
                puback = Some(u16::from_be_bytes([head[2 + topic_len], head[3 + topic_len]]));
            }
            let skipped = Skipped { size: total, puback };
            let now = total.min(buf.len());
            buf.advance(now);
            self.skipping = total - now;
            if self.skipping == 0 {
                return Ok(Some(Read::Skipped(skipped)));
            }
            self.pending = Some(skipped);
            return Ok(None);
        }
        if buf.len() < total {
            return Ok(None);
        }
        let mut packet = buf.split_to(total);
        let malformed = |e: &dyn std::fmt::Debug| Malformed(format!("{e:?}"));
        let incoming = match self.version {
            Version::V311 => from_v4(v4::Packet::read(&mut packet, total).map_err(|e| malformed(&e))?),
            Version::V5 => from_v5(v5::Packet::read(&mut packet, None).map_err(|e| malformed(&e))?),
        };
        Ok(Some(Read::Packet(incoming)))
    }
}

/// The fixed header's length and the remaining length, once its bytes are there.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, Malformed> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else { return Ok(None) };
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + i, remaining)));
        }
    }
    Err(Malformed("remaining length longer than four bytes".into()))
}

fn from_v4(p: v4::Packet) -> Incoming {
    match p {
        v4::Packet::ConnAck(a) => Incoming::ConnAck(ConnAck {
            refused: (a.code != v4::ConnectReturnCode::Success).then(|| format!("{:?}", a.code)),
            receive_max: None,
            max_packet_size: None,
        }),
        v4::Packet::PubAck(a) => Incoming::PubAck { pkid: a.pkid, reason: 0 },
        v4::Packet::SubAck(a) => Incoming::SubAck {
            pkid: a.pkid,
            refused: a
                .return_codes
                .iter()
                .enumerate()
                .filter(|(_, c)| matches!(c, v4::SubscribeReasonCode::Failure))
                .map(|(i, c)| (i, format!("{c:?}")))
                .collect(),
        },
        v4::Packet::PingResp => Incoming::PingResp,
        v4::Packet::Publish(p) => Incoming::Publish {
            pkid: p.pkid,
            qos1: p.qos != QoS::AtMostOnce,
            message: Message {
                topic: p.topic,
                payload: p.payload,
                retain: p.retain,
                response_topic: None,
                correlation_data: None,
            },
        },
        other => Incoming::Unexpected(v4_name(&other)),
    }
}

fn v4_name(p: &v4::Packet) -> &'static str {
    match p {
        v4::Packet::Connect(_) => "CONNECT",
        v4::Packet::PubRec(_) => "PUBREC",
        v4::Packet::PubRel(_) => "PUBREL",
        v4::Packet::PubComp(_) => "PUBCOMP",
        v4::Packet::Subscribe(_) => "SUBSCRIBE",
        v4::Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        v4::Packet::UnsubAck(_) => "UNSUBACK",
        v4::Packet::PingReq => "PINGREQ",
        v4::Packet::Disconnect => "DISCONNECT",
        _ => "packet",
    }
}

fn from_v5(p: v5::Packet) -> Incoming {
    match p {
        v5::Packet::ConnAck(a) => Incoming::ConnAck(ConnAck {
            refused: (a.code != v5::ConnectReturnCode::Success).then(|| format!("{:?}", a.code)),
            receive_max: a.properties.as_ref().and_then(|p| p.receive_max),
            max_packet_size: a.properties.as_ref().and_then(|p| p.max_packet_size),
        }),
        v5::Packet::PubAck(a) => Incoming::PubAck { pkid: a.pkid, reason: puback_code(&a.reason) },
        v5::Packet::SubAck(a) => Incoming::SubAck {
            pkid: a.pkid,
            refused: a
                .return_codes
                .iter()
                .enumerate()
                .filter(|(_, c)| !matches!(c, v5::SubscribeReasonCode::Success(_)))
                .map(|(i, c)| (i, format!("{c:?}")))
                .collect(),
        },
        v5::Packet::PingResp(_) => Incoming::PingResp,
        v5::Packet::Publish(p) => {
            let (response_topic, correlation_data) =
                p.properties.map(|pr| (pr.response_topic, pr.correlation_data)).unwrap_or_default();
            Incoming::Publish {
                pkid: p.pkid,
                qos1: p.qos != v5q::QoS::AtMostOnce,
                message: Message {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload,
                    retain: p.retain,
                    response_topic,
                    correlation_data,
                },
            }
        }
        v5::Packet::Disconnect(d) => Incoming::Disconnect { reason: format!("{:?}", d.reason_code) },
        v5::Packet::PubRec(_) => Incoming::Unexpected("PUBREC"),
        v5::Packet::PubRel(_) => Incoming::Unexpected("PUBREL"),
        v5::Packet::PubComp(_) => Incoming::Unexpected("PUBCOMP"),
        v5::Packet::Auth(_) => Incoming::Unexpected("AUTH"),
        _ => Incoming::Unexpected("packet"),
    }
}

/// MQTT 5 PUBACK reason codes (spec 3.4.2.1).
fn puback_code(r: &v5::PubAckReason) -> u8 {
    use v5::PubAckReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

/// A PUBACK reason code's name, for counters and logs.
pub fn puback_reason_name(code: u8) -> &'static str {
    match code {
        0x00 => "success",
        0x10 => "no_matching_subscribers",
        0x80 => "unspecified_error",
        0x83 => "implementation_specific_error",
        0x87 => "not_authorized",
        0x90 => "topic_name_invalid",
        0x91 => "packet_identifier_in_use",
        0x97 => "quota_exceeded",
        0x99 => "payload_format_invalid",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(t: &str) -> impl FnOnce(&mut BytesMut) -> Result<(), EncodeError> + '_ {
        move |b| put_str(b, t)
    }

    /// Our PUBLISH encoding must be byte-identical to the codecs'.
    #[test]
    fn publish_encoding_matches_the_codecs() {
        let t = "sensorgate/gw/devices/th/readings";
        for (payload_len, pkid, retain) in
            [(0, 0, false), (10, 7, true), (200, 1, false), (20_000, 65, false), (3_000_000, 2, true)]
        {
            let payload = vec![b'x'; payload_len];
            let qos = if pkid == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
            let mut expected = BytesMut::new();
            let mut p = v4::Publish::new(t, qos, payload.clone());
            p.pkid = pkid;
            p.retain = retain;
            p.write(&mut expected).unwrap();
            let mut ours = BytesMut::new();
            let meta = PublishMeta { pkid, retain, ..Default::default() };
            put_publish(&mut ours, Version::V311, meta, &payload, PROTOCOL_MAX_PACKET, topic(t)).unwrap();
            assert_eq!(&ours[..], &expected[..], "payload {payload_len}");
            assert_eq!(publish_size(Version::V311, t.len(), payload_len, pkid != 0), ours.len());

            let mut expected = BytesMut::new();
            let qos5 = if pkid == 0 { v5q::QoS::AtMostOnce } else { v5q::QoS::AtLeastOnce };
            let props = v5::PublishProperties {
                message_expiry_interval: Some(60),
                correlation_data: Some(Bytes::from_static(b"c-1")),
                ..Default::default()
            };
            let mut p = v5::Publish::new(t, qos5, payload.clone(), Some(props));
            p.pkid = pkid;
            p.retain = retain;
            v5::Packet::Publish(p).write(&mut expected, None).unwrap();
            let mut ours = BytesMut::new();
            let meta = PublishMeta { pkid, retain, expiry_s: Some(60), correlation: Some(b"c-1") };
            put_publish(&mut ours, Version::V5, meta, &payload, PROTOCOL_MAX_PACKET, topic(t)).unwrap();
            assert_eq!(&ours[..], &expected[..], "v5 payload {payload_len}");
            // The correlation data property (6 bytes) is beyond what publish_size counts.
            assert_eq!(publish_size(Version::V5, t.len(), payload_len, pkid != 0) + 6, ours.len());
        }
    }

    #[test]
    fn strings_that_do_not_fit_are_refused_and_leave_the_buffer_alone() {
        let long = "x".repeat(70_000);
        let mut b = BytesMut::from(&b"before"[..]);
        let e = put_publish(&mut b, Version::V311, PublishMeta::default(), b"p", PROTOCOL_MAX_PACKET, topic(&long));
        assert_eq!(e, Err(EncodeError::StringTooLong(70_000)));
        assert_eq!(&b[..], b"before");
        let e = put_publish(&mut b, Version::V311, PublishMeta::default(), &[0; 600], 512, topic("t"));
        assert_eq!(e, Err(EncodeError::PacketTooLarge { size: 606, limit: 512 }));
        assert_eq!(&b[..], b"before");
    }

    fn v4_publish(topic: &str, pkid: u16, payload_len: usize) -> BytesMut {
        let mut b = BytesMut::new();
        let qos = if pkid == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
        let mut p = v4::Publish::new(topic, qos, vec![b'y'; payload_len]);
        p.pkid = pkid;
        p.write(&mut b).unwrap();
        b
    }

    /// An oversized packet is dropped as it arrives, byte by byte if need be, reported once
    /// with its packet id, and the packet after it is read whole.
    #[test]
    fn oversized_packets_are_skipped_in_any_chunking() {
        let mut wire = v4_publish("homeassistant/status", 9, 300_000);
        wire.extend_from_slice(&[0xD0, 0x00]); // PINGRESP
        for chunk in [1, 7, 4096, wire.len()] {
            let mut reader = Reader::new(Version::V311, 256 * 1024);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(r) = reader.next(&mut buf).unwrap() {
                    got.push(r);
                }
                assert!(buf.len() <= 256 * 1024 + chunk, "memory stays bounded");
            }
            assert_eq!(
                got,
                [
                    Read::Skipped(Skipped { size: 300_000 + 2 + 20 + 2 + 4, puback: Some(9) }),
                    Read::Packet(Incoming::PingResp)
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn packets_are_read_in_both_versions() {
        let mut buf = v4_publish("a/b", 3, 5);
        let mut r = Reader::new(Version::V311, 1024);
        match r.next(&mut buf).unwrap() {
            Some(Read::Packet(Incoming::Publish { pkid: 3, qos1: true, message })) => assert_eq!(message.topic, "a/b"),
            other => panic!("{other:?}"),
        }
        let mut buf = BytesMut::new();
        let props = v5::PublishProperties {
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"c1")),
            ..Default::default()
        };
        let mut p = v5::Publish::new("a/b", v5q::QoS::AtLeastOnce, "x", Some(props));
        p.pkid = 4;
        v5::Packet::Publish(p).write(&mut buf, None).unwrap();
        v5::Packet::PubAck(v5::PubAck { pkid: 8, reason: v5::PubAckReason::QuotaExceeded, properties: None })
            .write(&mut buf, None)
            .unwrap();
        let mut r = Reader::new(Version::V5, 1024);
        match r.next(&mut buf).unwrap() {
            Some(Read::Packet(Incoming::Publish { pkid: 4, message, .. })) => {
                assert_eq!(message.response_topic.as_deref(), Some("reply/here"));
                assert_eq!(message.correlation_data.as_deref(), Some(&b"c1"[..]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.next(&mut buf).unwrap(), Some(Read::Packet(Incoming::PubAck { pkid: 8, reason: 0x97 })));
        assert_eq!(r.next(&mut buf).unwrap(), None);
    }

    #[test]
    fn a_five_byte_remaining_length_is_malformed() {
        let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert!(Reader::new(Version::V311, 1024).next(&mut buf).is_err());
    }
}
