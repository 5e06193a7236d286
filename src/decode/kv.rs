//! `key=value` lines (`temp=21.5 hum=40 ok=true id=abc`) to JSON members.

use bytes::{BufMut, BytesMut};

use super::{Decode, Decoded};
use crate::payload::{write_json_str, RESERVED_KEY};
use crate::reject::Reject;

/// Fields one line may carry; more is treated as garbage rather than grown into.
const MAX_FIELDS: usize = 64;

/// Numbers stay numbers (written as sent when that is valid JSON), `true`/`false` become
/// booleans, anything else a string. NaN and infinities are rejected: JSON cannot carry them.
#[derive(Debug, Default)]
pub struct KvDecoder;

impl Decode for KvDecoder {
    fn decode(&mut self, frame: &[u8], out: &mut BytesMut) -> Result<Decoded, Reject> {
        let line = std::str::from_utf8(frame).map_err(|_| Reject::BadUtf8)?;
        let mut seen: heapless::Vec<&str, MAX_FIELDS> = heapless::Vec::new();
        for (i, pair) in line.split_ascii_whitespace().enumerate() {
            let (key, value) = pair.split_once('=').ok_or(Reject::BadKv)?;
            if key.is_empty() || value.is_empty() || !key.bytes().all(is_key_byte) {
                return Err(Reject::BadKv);
            }
            if key == RESERVED_KEY {
                return Err(Reject::ReservedKey);
            }
            if seen.contains(&key) {
                return Err(Reject::DuplicateKey);
            }
            seen.push(key).map_err(|_| Reject::BadKv)?;
            if i > 0 {
                out.put_u8(b',');
            }
            out.put_u8(b'"');
            out.put_slice(key.as_bytes());
            out.put_slice(b"\":");
            write_value(out, value)?;
        }
        if seen.is_empty() {
            return Err(Reject::BadKv);
        }
        Ok(Decoded::default())
    }
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':')
}

fn write_value(out: &mut BytesMut, v: &str) -> Result<(), Reject> {
    if v == "true" || v == "false" {
        out.put_slice(v.as_bytes());
        return Ok(());
    }
    match v.parse::<f64>() {
        Ok(x) if !x.is_finite() => Err(Reject::NonFinite),
        Ok(_) if is_json_number(v) && json_readers_accept(v) => {
            out.put_slice(v.as_bytes());
            Ok(())
        }
        Ok(x) => {
            // Valid for Rust but not as JSON text ("+5", ".5", "5.", or so close to the f64
            // limit that JSON readers overflow): write the value canonically.
            let shortest = x.to_string();
            let canonical =
                if json_readers_accept(&shortest) { shortest } else { ryu::Buffer::new().format_finite(x).to_string() };
            if !json_readers_accept(&canonical) {
                return Err(Reject::NonFinite);
            }
            out.put_slice(canonical.as_bytes());
            Ok(())
        }
        Err(_) => {
            write_json_str(out, v);
            Ok(())
        }
    }
}

/// Whether a JSON reader (serde_json as the reference) takes this number. Only long numbers
/// or ones with an exponent can overflow there, so only those pay for the check.
fn json_readers_accept(v: &str) -> bool {
    v.len() <= 15 && !v.contains(['e', 'E']) || serde_json::from_str::<serde_json::Number>(v).is_ok()
}

/// JSON's number grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    let int_start = i;
    let n = digits(&mut i);
    if n == 0 || (n > 1 && b[int_start] == b'0') {
        return false;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(line: &str) -> Result<String, Reject> {
        let mut out = BytesMut::new();
        KvDecoder.decode(line.as_bytes(), &mut out).map(|_| String::from_utf8(out.to_vec()).unwrap())
    }

    #[test]
    fn converts_pairs_to_members() {
        assert_eq!(
            run("temp=21.50 hum=40 ok=true id=ab\"c x=+5 y=.5 big=1e3").unwrap(),
            r#""temp":21.50,"hum":40,"ok":true,"id":"ab\"c","x":5,"y":0.5,"big":1e3"#
        );
        let json = format!("{{{}}}", run("a=-0.0 b=0 c=007").unwrap());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["c"], 7.0);
    }

    #[test]
    fn rejects_by_reason() {
        assert_eq!(run("temp"), Err(Reject::BadKv));
        assert_eq!(run("=1"), Err(Reject::BadKv));
        assert_eq!(run("a="), Err(Reject::BadKv));
        assert_eq!(run("a b=1"), Err(Reject::BadKv));
        assert_eq!(run("t{x}=1"), Err(Reject::BadKv));
        assert_eq!(run("a=NaN"), Err(Reject::NonFinite));
        assert_eq!(run("a=inf"), Err(Reject::NonFinite));
        assert_eq!(run("a=1e999"), Err(Reject::NonFinite));
        // Finite for Rust, out of range for JSON readers: written canonically or refused,
        // never forwarded as a payload a reader cannot parse.
        for v in ["1.7976931348623158e308", "-1.7976931348623158e308", "17976931348623158000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"] {
            if let Ok(s) = run(&format!("a={v}")) {
                let json = format!("{{{s}}}");
                assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok(), "{json}");
            }
        }
        assert_eq!(run("a=1 a=2"), Err(Reject::DuplicateKey));
        assert_eq!(run("_gw=1"), Err(Reject::ReservedKey));
        let many: String = (0..65).map(|i| format!("k{i}=1 ")).collect();
        assert_eq!(run(&many), Err(Reject::BadKv));
    }

    #[test]
    fn json_number_grammar() {
        for ok in ["0", "-1", "1.5", "1e5", "1E-5", "-0.0e+1"] {
            assert!(is_json_number(ok), "{ok}");
        }
        for bad in ["", "-", "01", "1.", ".1", "+1", "1e", "0x1", "1_0"] {
            assert!(!is_json_number(bad), "{bad}");
        }
    }
}
