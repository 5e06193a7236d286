//! Lines framing under arbitrary chunking, then the JSON and kv decoders on every frame.
//!
//! Input: two control bytes choosing the chunk boundaries (see `sensorgate_fuzz::frames`),
//! then the byte stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate_fuzz::{check_payload, frames, lines_devices, Chunks, TestDevice, RECEIVED_AT_US};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let [c0, c1, stream @ ..] = data else { return };
    let devs = lines_devices();
    // Both devices frame identically; one framer run serves both decoders.
    let frames = frames(&devs[0], [*c0, *c1], stream);
    for f in frames.iter().flatten() {
        assert!(!f.contains(&b'\n'), "a frame kept its delimiter: {f:?}");
        assert!(!f.iter().all(u8::is_ascii_whitespace), "a blank line became a frame: {f:?}");
    }
    for dev in devs {
        // The device's stream input: the same cuts, each frame decoded and queued or rejected.
        let readings = TestDevice::new(dev).stream(Chunks::new([*c0, *c1], stream), RECEIVED_AT_US);
        assert_eq!(readings.len(), frames.len(), "one outcome per frame");
        let mut seq = 0;
        for (frame, reading) in frames.iter().zip(&readings) {
            let (frame, payload) = match (frame, reading) {
                (Ok(frame), Ok(payload)) => (frame, payload),
                (Err(cut), not) => {
                    assert_eq!(not, &Err(*cut), "a framing reject must stay one");
                    continue;
                }
                (Ok(_), Err(_)) => continue,
            };
            seq += 1;
            let fields = check_payload(dev, payload, seq, None);
            match dev.stream().expect("a stream device").format() {
                // Passed through unchanged: the same members as the frame itself.
                sensorgate::decode::Format::Json => {
                    let sent: Value = serde_json::from_slice(frame).expect("accepted frame is JSON");
                    assert_eq!(sent, Value::Object(fields), "members changed in transit");
                }
                // One member per pair (duplicates are rejected).
                _ => {
                    let pairs = frame.split(u8::is_ascii_whitespace).filter(|p| !p.is_empty()).count();
                    assert_eq!(fields.len(), pairs, "{:?}", String::from_utf8_lossy(frame));
                }
            }
        }
    }
});
