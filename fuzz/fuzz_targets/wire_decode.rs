//! `sensorgate_wire::decode_body` on arbitrary bytes, and on the same bytes with a valid CRC
//! trailer appended (so the postcard payload itself is explored). Whatever decodes must
//! re-encode into one frame the gateway accepts and decode to the same reading.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::framing::CobsFramer;
use sensorgate_wire::{
    decode_body, encode_frame, Channel, ReadingV1, Value, CRC, MAX_CHANNELS, MAX_FRAME_LEN, VERSION,
};

fuzz_target!(|data: &[u8]| {
    roundtrip(data);
    let mut with_crc = data.to_vec();
    with_crc.extend_from_slice(&CRC.checksum(data).to_le_bytes());
    roundtrip(&with_crc);
});

fn roundtrip(body: &[u8]) {
    let Ok(r) = decode_body(body) else { return };
    assert_eq!(r.version, VERSION);
    assert!(r.channels.len() <= MAX_CHANNELS);
    let mut buf = [0u8; MAX_FRAME_LEN];
    let n = encode_frame(&r, &mut buf).unwrap_or_else(|e| panic!("{r:?} does not re-encode: {e:?}"));
    assert_eq!(buf[n - 1], 0, "frame does not end with the delimiter");
    assert!(!buf[..n - 1].contains(&0), "0x00 inside a COBS frame");
    // Undo COBS the way the gateway does, with its default cap for cobs devices.
    let mut framer = CobsFramer::new(MAX_FRAME_LEN);
    let mut bodies = Vec::new();
    framer.push(&buf[..n], |f| bodies.push(f.map(<[u8]>::to_vec)));
    let [Ok(again)] = bodies.as_slice() else { panic!("re-encoded frame of {r:?} framed as {bodies:?}") };
    let r2 = decode_body(again).unwrap_or_else(|e| panic!("re-encoded {r:?} does not decode: {e:?}"));
    assert!(same(&r, &r2), "roundtrip changed the reading: {r:?} -> {r2:?}");
}

/// Equality with floats compared bit for bit (NaN is a legal wire value).
fn same(a: &ReadingV1, b: &ReadingV1) -> bool {
    let ch = |x: &Channel, y: &Channel| {
        x.id == y.id
            && match (x.value, y.value) {
                (Value::F32(p), Value::F32(q)) => p.to_bits() == q.to_bits(),
                (p, q) => p == q,
            }
    };
    a.version == b.version
        && a.seq == b.seq
        && a.channels.len() == b.channels.len()
        && a.channels.iter().zip(&b.channels).all(|(x, y)| ch(x, y))
}
