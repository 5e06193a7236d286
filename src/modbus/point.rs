//! A point: one value in a slave's register map (`[[bus.device.point]]`), how its registers
//! or bits become a JSON field, and how a value written to it becomes registers.

use bytes::{BufMut, BytesMut};
use serde::Deserialize;

use crate::payload::write_json_str;

/// The four Modbus tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    Coil,
    Discrete,
    Holding,
    Input,
}

impl Table {
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Coil => "coil",
            Table::Discrete => "discrete",
            Table::Holding => "holding",
            Table::Input => "input",
        }
    }

    /// Coils and discrete inputs hold bits; the others 16-bit registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::Discrete)
    }

    /// The function code that reads this table (01, 02, 03, 04).
    pub fn read_function(self) -> u8 {
        match self {
            Table::Coil => 1,
            Table::Discrete => 2,
            Table::Holding => 3,
            Table::Input => 4,
        }
    }

    /// The most one read request may ask for (Modbus application protocol 1.1b3, 6.1-6.4).
    pub fn max_per_request(self) -> u16 {
        if self.is_bits() {
            2000
        } else {
            125
        }
    }

    /// Whether the master may write it (coils and holding registers).
    pub fn is_writable(self) -> bool {
        matches!(self, Table::Coil | Table::Holding)
    }
}

/// The value type of a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PointType {
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    Bool,
}

impl PointType {
    pub fn as_str(self) -> &'static str {
        match self {
            PointType::U16 => "u16",
            PointType::I16 => "i16",
            PointType::U32 => "u32",
            PointType::I32 => "i32",
            PointType::U64 => "u64",
            PointType::I64 => "i64",
            PointType::F32 => "f32",
            PointType::F64 => "f64",
            PointType::Bool => "bool",
        }
    }

    /// 16-bit registers the type takes.
    pub fn words(self) -> u16 {
        match self {
            PointType::U16 | PointType::I16 | PointType::Bool => 1,
            PointType::U32 | PointType::I32 | PointType::F32 => 2,
            PointType::U64 | PointType::I64 | PointType::F64 => 4,
        }
    }
}

/// The order of the 16-bit words of a 32- or 64-bit value (bytes within a word are always
/// big-endian, as Modbus sends them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WordOrder {
    /// Most significant word first.
    #[default]
    Big,
    /// All words reversed: least significant first.
    Little,
}

/// One point of a slave (contract: the `[[bus.device.point]]` keys).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    /// The field name in the reading.
    pub name: String,
    pub table: Table,
    /// 0-based protocol address.
    pub address: u16,
    #[serde(rename = "type")]
    pub kind: PointType,
    /// For 32- and 64-bit types; a config error on others.
    pub word_order: Option<WordOrder>,
    /// value = raw × scale + offset.
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    /// Unit of measurement (also for Home Assistant).
    pub unit: Option<String>,
    /// May be written through the `write` command.
    #[serde(default)]
    pub writable: bool,
}

fn one() -> f64 {
    1.0
}

/// A raw value read from a point, before scale and offset.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Raw {
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Bool(bool),
}

impl Point {
    /// Registers (or bits) the point takes.
    pub fn width(&self) -> u16 {
        if self.table.is_bits() {
            1
        } else {
            self.kind.words()
        }
    }

    /// The address just past the point.
    pub fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.width())
    }

    fn scaled(&self) -> bool {
        self.scale != 1.0 || self.offset != 0.0
    }

    /// Appends `"name":value` for this point. `words` are its registers (register tables),
    /// `bit` its bit (coil and discrete tables). A float that is NaN or infinite (a sensor's
    /// "no value") is written as `null`: JSON has no NaN, and dropping the field would hide it.
    pub fn write_field(&self, words: &[u16], bit: bool, out: &mut BytesMut) {
        write_json_str(out, &self.name);
        out.put_u8(b':');
        let raw = if self.table.is_bits() { Raw::Bool(bit) } else { self.raw(words) };
        match raw {
            Raw::Bool(b) if !self.scaled() => out.put_slice(if b { b"true" } else { b"false" }),
            Raw::Unsigned(u) if !self.scaled() => out.put_slice(itoa::Buffer::new().format(u).as_bytes()),
            Raw::Signed(i) if !self.scaled() => out.put_slice(itoa::Buffer::new().format(i).as_bytes()),
            raw => {
                let x = match raw {
                    Raw::Unsigned(u) => u as f64,
                    Raw::Signed(i) => i as f64,
                    Raw::Float(f) => f,
                    Raw::Bool(b) => f64::from(u8::from(b)),
                } * self.scale
                    + self.offset;
                // -39 × 0.1 is -3.9000000000000004 in binary floating point: 15 significant
                // digits (all an f64 holds for sure) drop that noise, not the value.
                let x = if self.scaled() && x.is_finite() { format!("{x:.14e}").parse().unwrap_or(x) } else { x };
                if x.is_finite() {
                    out.put_slice(ryu::Buffer::new().format_finite(x).as_bytes());
                } else {
                    out.put_slice(b"null");
                }
            }
        }
    }

    /// The raw value of a register point from its words (at least `kind.words()` of them).
    fn raw(&self, words: &[u16]) -> Raw {
        let n = usize::from(self.kind.words());
        let mut bits: u64 = 0;
        for i in 0..n {
            let w = match self.word_order.unwrap_or_default() {
                WordOrder::Big => words[i],
                WordOrder::Little => words[n - 1 - i],
            };
            bits = (bits << 16) | u64::from(w);
        }
        match self.kind {
            PointType::U16 | PointType::U32 | PointType::U64 => Raw::Unsigned(bits),
            PointType::I16 => Raw::Signed(i64::from(bits as u16 as i16)),
            PointType::I32 => Raw::Signed(i64::from(bits as u32 as i32)),
            PointType::I64 => Raw::Signed(bits as i64),
            PointType::F32 => Raw::Float(widen(f32::from_bits(bits as u32))),
            PointType::F64 => Raw::Float(f64::from_bits(bits)),
            PointType::Bool => Raw::Bool(bits != 0),
        }
    }

    /// The registers (or the bit) that make `value` on this point: scale and offset applied
    /// in reverse, then range-checked for the type.
    ///
    /// # Errors
    /// Why the value cannot be written, for the command's answer.
    pub fn encode(&self, value: &serde_json::Value) -> Result<Encoded, String> {
        let x = match value {
            serde_json::Value::Bool(b) => f64::from(u8::from(*b)),
            serde_json::Value::Number(n) => n.as_f64().ok_or("not a number")?,
            _ => return Err(format!("point {:?} takes a number or a boolean", self.name)),
        };
        let raw = (x - self.offset) / self.scale;
        if !raw.is_finite() {
            return Err("value is not finite after scale and offset".into());
        }
        if self.table.is_bits() || self.kind == PointType::Bool {
            if raw != 0.0 && raw != 1.0 {
                return Err(format!("point {:?} takes 0/1 or false/true, not {x}", self.name));
            }
            let bit = raw == 1.0;
            return Ok(if self.table.is_bits() { Encoded::Bit(bit) } else { Encoded::Words(vec![u16::from(bit)]) });
        }
        let integer = |lo: f64, hi: f64| -> Result<f64, String> {
            let r = raw.round();
            if (r - raw).abs() > 1e-9 * raw.abs().max(1.0) {
                return Err(format!("{x} does not map to a whole raw value (raw {raw}) on point {:?}", self.name));
            }
            if r < lo || r > hi {
                return Err(format!(
                    "{x} is out of range for point {:?} ({}: raw {lo}..={hi})",
                    self.name,
                    self.kind.as_str()
                ));
            }
            Ok(r)
        };
        let bits: u64 = match self.kind {
            PointType::U16 => integer(0.0, f64::from(u16::MAX))? as u64,
            PointType::I16 => integer(f64::from(i16::MIN), f64::from(i16::MAX))? as i64 as i16 as u16 as u64,
            PointType::U32 => integer(0.0, f64::from(u32::MAX))? as u64,
            PointType::I32 => integer(f64::from(i32::MIN), f64::from(i32::MAX))? as i64 as i32 as u32 as u64,
            // 2^64 and 2^63 are exact in f64; values near them lose precision either way.
            PointType::U64 => integer(0.0, 18_446_744_073_709_549_568.0)? as u64,
            PointType::I64 => integer(-9_223_372_036_854_775_808.0, 9_223_372_036_854_774_784.0)? as i64 as u64,
            PointType::F32 => {
                if raw.abs() > f64::from(f32::MAX) {
                    return Err(format!("{x} is out of range for an f32 point"));
                }
                u64::from((raw as f32).to_bits())
            }
            PointType::F64 => raw.to_bits(),
            PointType::Bool => unreachable!("handled above"),
        };
        let n = usize::from(self.kind.words());
        let mut words: Vec<u16> = (0..n).map(|i| (bits >> (16 * (n - 1 - i))) as u16).collect();
        if self.word_order == Some(WordOrder::Little) {
            words.reverse();
        }
        Ok(Encoded::Words(words))
    }
}

/// An f32 as the f64 of its shortest decimal form: 230.3f32 becomes 230.3, not
/// 230.3000030517578 (the meter meant 230.3; the extra digits are the f32's rounding).
fn widen(f: f32) -> f64 {
    if !f.is_finite() {
        return f64::from(f);
    }
    ryu::Buffer::new().format_finite(f).parse().unwrap_or(f64::from(f))
}

/// What a write puts on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    /// A coil (function 05).
    Bit(bool),
    /// Holding registers (06 for one, 16 for more).
    Words(Vec<u16>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(kind: PointType, order: Option<WordOrder>) -> Point {
        Point {
            name: "p".into(),
            table: Table::Holding,
            address: 0,
            kind,
            word_order: order,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            writable: true,
        }
    }

    fn field(p: &Point, words: &[u16]) -> String {
        let mut out = BytesMut::new();
        p.write_field(words, false, &mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    /// Values chosen so that a swapped word or a lost sign shows.
    #[test]
    fn every_type_and_word_order_decodes() {
        use PointType::*;
        let little = Some(WordOrder::Little);
        assert_eq!(field(&point(U16, None), &[0xFFFE]), r#""p":65534"#);
        assert_eq!(field(&point(I16, None), &[0xFFFE]), r#""p":-2"#);
        assert_eq!(field(&point(U32, None), &[0x1234, 0x5678]), r#""p":305419896"#);
        assert_eq!(field(&point(U32, little), &[0x5678, 0x1234]), r#""p":305419896"#);
        assert_eq!(field(&point(I32, None), &[0xFFFF, 0xFFFE]), r#""p":-2"#);
        assert_eq!(field(&point(I32, little), &[0xFFFE, 0xFFFF]), r#""p":-2"#);
        let f = 123.456f32.to_bits();
        assert_eq!(field(&point(F32, None), &[(f >> 16) as u16, f as u16]), r#""p":123.456"#);
        assert_eq!(field(&point(F32, little), &[f as u16, (f >> 16) as u16]), r#""p":123.456"#);
        let d = (-98765.4321f64).to_bits();
        let w = [(d >> 48) as u16, (d >> 32) as u16, (d >> 16) as u16, d as u16];
        assert_eq!(field(&point(F64, None), &w), r#""p":-98765.4321"#);
        let mut rev = w;
        rev.reverse();
        assert_eq!(field(&point(F64, little), &rev), r#""p":-98765.4321"#);
        assert_eq!(field(&point(U64, None), &[0x0102, 0x0304, 0x0506, 0x0708]), r#""p":72623859790382856"#);
        assert_eq!(field(&point(I64, little), &[0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF]), r#""p":-2"#);
        assert_eq!(field(&point(Bool, None), &[7]), r#""p":true"#);
        assert_eq!(field(&point(F32, None), &[0x7FC0, 0]), r#""p":null"#, "NaN is null");
        let scaled = Point { scale: 0.1, offset: -40.0, ..point(I16, None) };
        assert_eq!(field(&scaled, &[0xFFF6]), r#""p":-41.0"#);
        // Not -3.9000000000000004 (-39 × 0.1 in binary), nor 0.30000000000000004.
        let tenths = Point { scale: 0.1, ..point(I16, None) };
        assert_eq!(field(&tenths, &[(-39i16) as u16]), r#""p":-3.9"#);
        assert_eq!(field(&tenths, &[3]), r#""p":0.3"#);
        let f = Point { scale: 0.01, ..point(F32, None) };
        let b = 1234.5f32.to_bits();
        assert_eq!(field(&f, &[(b >> 16) as u16, b as u16]), r#""p":12.345"#);
        let coil = Point { table: Table::Coil, ..point(Bool, None) };
        let mut out = BytesMut::new();
        coil.write_field(&[], true, &mut out);
        assert_eq!(&out[..], br#""p":true"#);
    }

    #[test]
    fn writes_reverse_scale_and_check_the_range() {
        use serde_json::json;
        use PointType::*;
        let sp = Point { scale: 0.1, offset: 0.0, ..point(I16, None) };
        assert_eq!(sp.encode(&json!(21.5)), Ok(Encoded::Words(vec![215])));
        assert_eq!(sp.encode(&json!(-1.0)), Ok(Encoded::Words(vec![0xFFF6])));
        assert!(sp.encode(&json!(5000.0)).unwrap_err().contains("out of range"));
        assert!(sp.encode(&json!(21.55)).unwrap_err().contains("whole raw value"));
        assert!(sp.encode(&json!("x")).is_err());
        assert_eq!(point(U32, None).encode(&json!(305419896)), Ok(Encoded::Words(vec![0x1234, 0x5678])));
        let little = point(U32, Some(WordOrder::Little));
        assert_eq!(little.encode(&json!(305419896)), Ok(Encoded::Words(vec![0x5678, 0x1234])));
        assert!(point(U16, None).encode(&json!(-1)).is_err());
        let f = point(F32, None).encode(&json!(1.5)).unwrap();
        assert_eq!(f, Encoded::Words(vec![0x3FC0, 0]));
        let coil = Point { table: Table::Coil, ..point(Bool, None) };
        assert_eq!(coil.encode(&json!(true)), Ok(Encoded::Bit(true)));
        assert!(coil.encode(&json!(2)).is_err());
        // Decoding what was encoded gives the value back.
        let Encoded::Words(w) = sp.encode(&json!(-12.3)).unwrap() else { panic!() };
        assert_eq!(field(&sp, &w), r#""p":-12.3"#);
    }
}
