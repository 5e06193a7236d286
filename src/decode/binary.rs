//! sensorgate-wire `ReadingV1` frames (already COBS-decoded) to JSON members.

use bytes::{BufMut, BytesMut};
use sensorgate_wire::Value;

use super::{Channel, Decode, Decoded};
use crate::payload::write_json_str;
use crate::reject::Reject;

/// Channels get their configured names; unconfigured ids are named `ch<id>`.
pub struct PostcardDecoder {
    /// `"name":` per channel id, JSON-escaped once at start-up.
    names: Vec<Option<Box<[u8]>>>,
}

impl PostcardDecoder {
    pub fn new(channels: &[Channel]) -> Self {
        let mut names = vec![None; 256];
        for ch in channels {
            let mut key = BytesMut::new();
            write_json_str(&mut key, &ch.name);
            key.put_u8(b':');
            names[usize::from(ch.id)] = Some(key.to_vec().into_boxed_slice());
        }
        Self { names }
    }
}

impl Decode for PostcardDecoder {
    fn decode(&mut self, frame: &[u8], out: &mut BytesMut) -> Result<Decoded, Reject> {
        let reading = sensorgate_wire::decode_body(frame)?;
        let mut seen = [false; 256];
        for (i, ch) in reading.channels.iter().enumerate() {
            if std::mem::replace(&mut seen[usize::from(ch.id)], true) {
                return Err(Reject::DuplicateKey);
            }
            if i > 0 {
                out.put_u8(b',');
            }
            match &self.names[usize::from(ch.id)] {
                Some(key) => out.put_slice(key),
                None => {
                    out.put_slice(b"\"ch");
                    out.put_slice(itoa::Buffer::new().format(ch.id).as_bytes());
                    out.put_slice(b"\":");
                }
            }
            match ch.value {
                Value::F32(x) if !x.is_finite() => return Err(Reject::NonFinite),
                Value::F32(x) => out.put_slice(ryu::Buffer::new().format_finite(x).as_bytes()),
                Value::I32(x) => out.put_slice(itoa::Buffer::new().format(x).as_bytes()),
                Value::Bool(b) => out.put_slice(if b { b"true" } else { b"false" }),
            }
        }
        Ok(Decoded { sensor_seq: Some(reading.seq) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensorgate_wire::{encode_frame, Channel, ReadingV1, MAX_FRAME_LEN};

    fn body(r: &ReadingV1) -> Vec<u8> {
        let mut buf = [0u8; MAX_FRAME_LEN];
        let n = encode_frame(r, &mut buf).unwrap();
        let mut dec = vec![0u8; n];
        let m = cobs::decode(&buf[..n - 1], &mut dec).unwrap();
        dec.truncate(m);
        dec
    }

    #[test]
    fn names_channels_from_config() {
        let cfg = [crate::decode::Channel { id: 0, name: "temp".into(), unit: Some("°C".into()) }];
        let mut d = PostcardDecoder::new(&cfg);
        let mut r = ReadingV1::new(7);
        r.channels.push(Channel { id: 0, value: Value::F32(21.5) }).unwrap();
        r.channels.push(Channel { id: 9, value: Value::I32(-3) }).unwrap();
        r.channels.push(Channel { id: 2, value: Value::Bool(true) }).unwrap();
        let mut out = BytesMut::new();
        assert_eq!(d.decode(&body(&r), &mut out), Ok(Decoded { sensor_seq: Some(7) }));
        assert_eq!(&out[..], br#""temp":21.5,"ch9":-3,"ch2":true"#);
    }

    #[test]
    fn rejects_by_reason() {
        let mut d = PostcardDecoder::new(&[]);
        let mut out = BytesMut::new();
        let mut r = ReadingV1::new(1);
        r.channels.push(Channel { id: 1, value: Value::F32(f32::NAN) }).unwrap();
        assert_eq!(d.decode(&body(&r), &mut out), Err(Reject::NonFinite));
        r.channels[0].value = Value::I32(1);
        r.channels.push(Channel { id: 1, value: Value::I32(2) }).unwrap();
        assert_eq!(d.decode(&body(&r), &mut out), Err(Reject::DuplicateKey));
        let mut b = body(&r);
        b[2] ^= 0x40;
        assert_eq!(d.decode(&b, &mut out), Err(Reject::BadCrc));
        assert_eq!(d.decode(&[1, 2], &mut out), Err(Reject::TooShort));
    }
}
