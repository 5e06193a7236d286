//! Turning one frame into the sensor fields of a JSON reading. Plain sync code: no async, no
//! tokio types, no I/O. Where it runs (a dedicated thread per device) is decided in `device`.

mod binary;
mod json;
mod kv;

pub use self::binary::PostcardDecoder;
pub use self::json::JsonDecoder;
pub use self::kv::KvDecoder;

use bytes::BytesMut;

use crate::config::{DeviceConfig, Format};
use crate::reject::Reject;

/// What a decoder learned besides the fields.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// The sensor's own frame counter, where the format has one.
    pub sensor_seq: Option<u32>,
}

/// A frame decoder.
pub trait Decode: Send {
    /// Appends the reading's sensor fields to `out` as JSON members (`"a":1,"b":2`), without
    /// braces. Writes nothing for a reading without fields.
    ///
    /// # Errors
    /// A [`Reject`] when the frame must be skipped; `out` may then hold partial output, which
    /// the caller discards.
    fn decode(&mut self, frame: &[u8], out: &mut BytesMut) -> Result<Decoded, Reject>;
}

/// The decoder for a device's configured format.
pub fn for_device(dev: &DeviceConfig) -> Box<dyn Decode> {
    match dev.format() {
        Format::Json => Box::new(JsonDecoder),
        Format::Kv => Box::new(KvDecoder),
        Format::Postcard => Box::new(PostcardDecoder::new(&dev.channels)),
    }
}

/// Appends `s` as a JSON string literal.
pub(crate) fn write_json_str(out: &mut BytesMut, s: &str) {
    use bytes::BufMut;
    out.put_u8(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.put_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.put_slice(format!("\\u{b:04x}").as_bytes());
        } else {
            out.put_slice(esc);
        }
        start = i + 1;
    }
    out.put_slice(&bytes[start..]);
    out.put_u8(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        let mut out = BytesMut::new();
        write_json_str(&mut out, "a\"b\\c\nd\u{1}é");
        let s = std::str::from_utf8(&out).unwrap();
        assert_eq!(serde_json::from_str::<String>(s).unwrap(), "a\"b\\c\nd\u{1}é");
    }
}
