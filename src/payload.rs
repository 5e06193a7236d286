//! The reading payload's fixed parts: the reserved metadata key and JSON string writing.
//! A leaf: decoders, the payload builder and config validation all use it, it uses nothing.

use bytes::{BufMut, BytesMut};

/// The one key the gateway adds to a reading; a sensor field of this name is rejected.
pub const RESERVED_KEY: &str = "_gw";

/// Appends `s` as a JSON string literal.
pub fn write_json_str(out: &mut BytesMut, s: &str) {
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
