//! JSON lines: validated, then passed through byte for byte (no re-serialisation).

use bytes::{BufMut, BytesMut};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{Decode, Decoded};
use crate::payload::RESERVED_KEY;
use crate::reject::Reject;

/// Deepest nesting forwarded (the reading object is level 1). Consumers (Home Assistant
/// templates, Node-RED, databases) choke on deep documents long before serde_json would.
pub const MAX_DEPTH: usize = 16;

/// Accepts one JSON object per frame and keeps every field unchanged.
#[derive(Debug, Default)]
pub struct JsonDecoder;

impl Decode for JsonDecoder {
    fn decode(&mut self, frame: &[u8], out: &mut BytesMut) -> Result<Decoded, Reject> {
        // serde_json does not check UTF-8 inside strings it skips, so check the whole frame.
        std::str::from_utf8(frame).map_err(|_| Reject::BadUtf8)?;
        let shape: ObjectShape = serde_json::from_slice(frame).map_err(|e| match e.classify() {
            serde_json::error::Category::Data if e.to_string().starts_with(TOO_DEEP) => Reject::TooDeep,
            serde_json::error::Category::Data if e.to_string().starts_with(DUPLICATE) => Reject::DuplicateKey,
            serde_json::error::Category::Data => Reject::NotObject,
            _ => Reject::BadJson,
        })?;
        if shape.reserved {
            return Err(Reject::ReservedKey);
        }
        // Valid object: the bytes between the outer braces are the members, as sent.
        let trimmed = frame.trim_ascii();
        let inner = trimmed[1..trimmed.len() - 1].trim_ascii();
        out.put_slice(inner);
        Ok(Decoded::default())
    }
}

const TOO_DEEP: &str = "nesting deeper than";

/// Walks an object without building it or allocating, notes whether the reserved key is
/// present, refuses nesting deeper than [`MAX_DEPTH`] (serde_json's `IgnoredAny` would skip
/// any depth) and refuses a top-level key given twice (readers would keep only one).
struct ObjectShape {
    reserved: bool,
}

/// Top-level keys compared for duplicates; an object with more is passed without the check.
const MAX_CHECKED_KEYS: usize = 64;

impl<'de> Deserialize<'de> for ObjectShape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = ObjectShape;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ObjectShape, A::Error> {
        let mut reserved = false;
        let mut seen: heapless::Vec<u64, MAX_CHECKED_KEYS> = heapless::Vec::new();
        while let Some(KeyInfo { reserved: r, hash }) = map.next_key()? {
            reserved |= r;
            if seen.contains(&hash) {
                return Err(serde::de::Error::custom(DUPLICATE));
            }
            let _ = seen.push(hash);
            map.next_value_seed(Nested(2))?;
        }
        Ok(ObjectShape { reserved })
    }
}

/// Any JSON value at nesting level `.0`, checked for depth, not kept.
#[derive(Clone, Copy)]
struct Nested(usize);

impl<'de> DeserializeSeed<'de> for Nested {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Nested {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.deeper::<A::Error>()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.deeper::<A::Error>()?;
        while map.next_key::<AnyKey>()?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

impl Nested {
    fn deeper<E: serde::de::Error>(self) -> Result<Nested, E> {
        if self.0 > MAX_DEPTH {
            Err(E::custom(format_args!("{TOO_DEEP} {MAX_DEPTH}")))
        } else {
            Ok(Nested(self.0 + 1))
        }
    }
}

const DUPLICATE: &str = "duplicate key";

/// A top-level key: is it the reserved one, and its FNV-1a hash (for duplicates; a 64-bit
/// collision between two keys of one reading is not a practical concern).
struct KeyInfo {
    reserved: bool,
    hash: u64,
}

impl<'de> Deserialize<'de> for KeyInfo {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyInfo;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, v: &str) -> Result<KeyInfo, E> {
                let hash =
                    v.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
                Ok(KeyInfo { reserved: v == RESERVED_KEY, hash })
            }
        }
        d.deserialize_str(V)
    }
}

/// A key in a nested object: only its syntax matters.
struct AnyKey;

impl<'de> Deserialize<'de> for AnyKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| AnyKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(line: &[u8]) -> Result<String, Reject> {
        let mut out = BytesMut::new();
        JsonDecoder.decode(line, &mut out).map(|_| String::from_utf8(out.to_vec()).unwrap())
    }

    #[test]
    fn passes_members_through_unchanged() {
        assert_eq!(
            run(br#" {"t": 21.50, "s":"x\u00e9" ,"n":{"a":[1,2]}} "#).unwrap(),
            r#""t": 21.50, "s":"x\u00e9" ,"n":{"a":[1,2]}"#
        );
        assert_eq!(run(b"{ }").unwrap(), "");
    }

    #[test]
    fn rejects_by_reason() {
        assert_eq!(run(b"{\"a\":1"), Err(Reject::BadJson));
        assert_eq!(run(b"{\"a\":1} trailing"), Err(Reject::BadJson));
        assert_eq!(run(b"[1,2]"), Err(Reject::NotObject));
        assert_eq!(run(b"42"), Err(Reject::NotObject));
        assert_eq!(run(b"{\"_gw\":1}"), Err(Reject::ReservedKey));
        assert_eq!(run(b"{\"\\u005fgw\":1}"), Err(Reject::ReservedKey));
        assert_eq!(run(b"{\"a\":\"\xff\"}"), Err(Reject::BadUtf8));
        assert_eq!(run(br#"{"a":1,"b":{"a":2},"a":3}"#), Err(Reject::DuplicateKey));
        assert_eq!(run(br#"{"a":1,"\u0061":2}"#), Err(Reject::DuplicateKey));
    }

    fn nested(levels: usize) -> String {
        // `levels` counts the outer object: {"a":[[...]]}.
        format!("{{\"a\":{}{}}}", "[".repeat(levels - 1), "]".repeat(levels - 1))
    }

    #[test]
    fn nesting_is_bounded() {
        assert!(run(nested(MAX_DEPTH).as_bytes()).is_ok());
        assert_eq!(run(nested(MAX_DEPTH + 1).as_bytes()), Err(Reject::TooDeep));
        assert_eq!(run(br#"{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{"j":{"k":{"l":{"m":{"n":{"o":{"p":{"q":1}}}}}}}}}}}}}}}}}"#), Err(Reject::TooDeep));
        // Far past serde_json's own recursion limit: still a clean rejection, no stack overflow.
        assert!(matches!(run(nested(100_000).as_bytes()), Err(Reject::TooDeep | Reject::BadJson)));
    }
}
