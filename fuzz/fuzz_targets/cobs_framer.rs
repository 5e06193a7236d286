//! COBS framing under arbitrary chunking, then the postcard decoder on every frame: as received,
//! and with its CRC trailer recomputed so that mutated bodies reach the payload decoder.
//!
//! Input: two control bytes choosing the chunk boundaries (see `sensorgate_fuzz::frames`),
//! then the byte stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate_fuzz::{check_payload, cobs_device, frames, TestDevice, RECEIVED_AT_US};
use sensorgate_wire::{decode_body, Value as Wire, CRC};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let [c0, c1, stream @ ..] = data else { return };
    let dev = cobs_device();
    let frames = frames(dev, [*c0, *c1], stream);
    let device = TestDevice::new(dev);
    // The reading sink every input ends in, fed the decoder's fields of each body.
    let mut sink = device.sink();
    let mut decoder = dev.stream().expect("a stream device").decoder();
    let mut seq = 0u64;
    for frame in frames.iter().flatten() {
        // An empty body is possible (0x01 0x00 is COBS for zero bytes); the decoder rejects it.
        let mut fixed = frame.clone();
        if fixed.len() >= 5 {
            let n = fixed.len() - 4;
            let crc = CRC.checksum(&fixed[..n]).to_le_bytes();
            fixed[n..].copy_from_slice(&crc);
        }
        for body in [frame, &fixed] {
            let Ok(()) = sink.offer(body.len(), RECEIVED_AT_US, |out| decoder.decode(body, out)) else { continue };
            seq += 1;
            let reading = decode_body(body).expect("the decoder accepted a body the wire crate refuses");
            let fields = check_payload(dev, &device.pop(), seq, Some(reading.seq));
            assert_eq!(fields.len(), reading.channels.len(), "{fields:?} vs {reading:?}");
            for ch in &reading.channels {
                let name = dev
                    .channels()
                    .iter()
                    .find(|c| c.id == ch.id)
                    .map_or_else(|| format!("ch{}", ch.id), |c| c.name.clone());
                let got = fields.get(&name).unwrap_or_else(|| panic!("channel {name} missing: {fields:?}"));
                match ch.value {
                    Wire::Bool(b) => assert_eq!(got, &Value::Bool(b)),
                    Wire::I32(x) => assert_eq!(got.as_i64(), Some(i64::from(x)), "{got}"),
                    Wire::F32(x) => {
                        // Shortest f32 digits read back as f64, then narrowed: at most one
                        // rounding step away.
                        let y = got.as_f64().unwrap_or_else(|| panic!("{name} is not a number: {got}")) as f32;
                        let d = (i64::from(y.to_bits() as i32) - i64::from(x.to_bits() as i32)).abs();
                        assert!(y == x || d <= 1, "{name}: sent {x:e}, payload {got}");
                    }
                }
            }
        }
    }
});
