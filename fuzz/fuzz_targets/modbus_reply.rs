//! A Modbus RTU reply from a slave we do not control: any bytes, checked against a read
//! request, and when accepted, every point type decoded from it into JSON.
//!
//! Input: unit, table (low 2 bits), start (2 bytes), count (1 byte, 1..=125 registers or
//! up to 255 bits), then the reply's bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sensorgate::modbus::rtu::{bit, words};
use sensorgate::modbus::{Point, PointType, Request, Table, Transaction, WordOrder};

const TABLES: [Table; 4] = [Table::Coil, Table::Discrete, Table::Holding, Table::Input];
const TYPES: [PointType; 9] = [
    PointType::U16,
    PointType::I16,
    PointType::U32,
    PointType::I32,
    PointType::U64,
    PointType::I64,
    PointType::F32,
    PointType::F64,
    PointType::Bool,
];

fuzz_target!(|data: &[u8]| {
    let [unit, table, s0, s1, count, reply @ ..] = data else { return };
    let table = TABLES[usize::from(table & 3)];
    let count = u16::from((*count).max(1)).min(table.max_per_request());
    let start = u16::from_be_bytes([*s0, *s1]).min(u16::MAX - count);
    let req = Request { table, start, count, points: Vec::new() };
    let tx = Transaction::read(*unit, &req);
    // Every prefix: the length is told once two bytes are in, and never shrinks.
    let len = tx.reply_len(reply);
    if reply.len() >= 2 {
        let n = len.expect("two bytes tell the length");
        assert!(n == 5 || n == req.reply_len());
    }
    let Some(n) = len.filter(|&n| reply.len() >= n) else { return };
    let Ok(data) = tx.check(&reply[..n]) else { return };
    assert_eq!(data.len(), req.data_len(), "an accepted reply carries exactly what was asked");
    for kind in TYPES {
        let width = if table.is_bits() { 1 } else { kind.words() };
        if width > count {
            continue;
        }
        for order in [None, Some(WordOrder::Little)] {
            let point = Point {
                name: "p".into(),
                table,
                address: start,
                kind,
                word_order: order,
                scale: 0.1,
                offset: -3.0,
                unit: None,
                writable: false,
            };
            let mut out = BytesMut::from(&b"{"[..]);
            let regs: Vec<u16> = words(data).collect();
            point.write_field(&regs, bit(data, 0), &mut out);
            out.extend_from_slice(b"}");
            let v: serde_json::Value = serde_json::from_slice(&out).expect("a field is valid JSON");
            assert!(v["p"].is_number() || v["p"].is_null() || v["p"].is_boolean(), "{v}");
        }
    }
});
