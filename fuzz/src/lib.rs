//! Helpers shared by the fuzz targets: the devices they use, input splitting and the payload
//! invariants. Everything here goes through sensorgate's public API only; readings go through
//! the gateway's own stream input and reading sink ([`TestDevice`], shared with the tests).

use std::sync::OnceLock;

use sensorgate::config::{Config, DeviceConfig, StreamConfig};
use sensorgate::payload::RESERVED_KEY;
use sensorgate::reject::Reject;
use serde_json::Value;

#[path = "../../tests/support/device.rs"]
mod support;
pub use support::TestDevice;

/// `received_at_us` passed to every build: the largest value, so its formatting is covered.
pub const RECEIVED_AT_US: u64 = u64::MAX;

/// Devices used by the framer targets. Names, channel names and units need JSON escaping
/// (quotes, backslashes, control characters, non-ASCII), which validation allows.
const DEVICES: &str = r#"
[gateway]
id = "fuzz"

[[device]]
name = 'json"\é'
path = "/dev/fuzz-json"
framing = "lines"
format = "json"
max_frame = 128

[[device]]
name = "kv"
path = "/dev/fuzz-kv"
framing = "lines"
format = "kv"
max_frame = 128

[[device]]
name = "soil"
path = "/dev/fuzz-cobs"
framing = "cobs"

[[device.channel]]
id = 0
name = "temperature"
unit = "°C"

[[device.channel]]
id = 1
name = 'q"uote\back'
unit = "%\u0001\t"

[[device.channel]]
id = 255
name = "last"
"#;

fn devices() -> &'static [DeviceConfig] {
    static DEVS: OnceLock<Vec<DeviceConfig>> = OnceLock::new();
    DEVS.get_or_init(|| {
        Config::from_toml(DEVICES).unwrap_or_else(|p| panic!("fuzz device config is invalid: {p:?}")).devices
    })
}

/// The lines devices: JSON, then kv (same framing and `max_frame`).
pub fn lines_devices() -> &'static [DeviceConfig] {
    &devices()[..2]
}

/// The cobs device (postcard, channels configured, default `max_frame`).
pub fn cobs_device() -> &'static DeviceConfig {
    &devices()[2]
}

/// One framer output, owned.
pub type FrameOut = Result<Vec<u8>, Reject>;

/// Feeds `stream` to a fresh framer for `dev` in the chunks given by `ctl`, and checks that
/// the frames and rejections are exactly those of feeding it whole.
///
/// `ctl[0]` is the largest chunk (0: the whole stream in one chunk), `ctl[1]` seeds the
/// chunk lengths, so the fuzzer controls where the boundaries fall.
pub fn frames(dev: &DeviceConfig, ctl: [u8; 2], stream: &[u8]) -> Vec<FrameOut> {
    let settings = dev.stream().expect("a stream device");
    let whole = feed(settings, std::iter::once(stream));
    let chunked = feed(settings, Chunks::new(ctl, stream));
    assert_eq!(chunked.0, whole.0, "chunking changed the frames (ctl {ctl:?})");
    assert_eq!(chunked.1, whole.1, "chunking changed has_partial (ctl {ctl:?})");
    for f in chunked.0.iter().flatten() {
        let max = settings.max_frame();
        assert!(f.len() <= max, "frame of {} bytes passed max_frame {max}", f.len());
    }
    chunked.0
}

fn feed<'a>(settings: &StreamConfig, chunks: impl Iterator<Item = &'a [u8]>) -> (Vec<FrameOut>, bool) {
    let mut framer = settings.framer();
    let mut out = Vec::new();
    for c in chunks {
        framer.push(c, |f| out.push(f.map(<[u8]>::to_vec)));
    }
    (out, framer.has_partial())
}

/// Chunk lengths from a tiny xorshift PRNG: 1 to `ctl[0]` bytes each.
pub struct Chunks<'a> {
    rest: &'a [u8],
    max: usize,
    state: u32,
}

impl<'a> Chunks<'a> {
    pub fn new(ctl: [u8; 2], stream: &'a [u8]) -> Self {
        let max = if ctl[0] == 0 { usize::MAX } else { usize::from(ctl[0]) };
        Self { rest: stream, max, state: u32::from(ctl[1]).wrapping_mul(0x9E37_79B9) | 1 }
    }
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        let n = if self.max == usize::MAX { self.rest.len() } else { 1 + self.state as usize % self.max };
        let (c, rest) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = rest;
        Some(c)
    }
}

/// Checks a payload built for `dev` with sequence number `seq`; returns its sensor fields.
pub fn check_payload(
    dev: &DeviceConfig,
    payload: &[u8],
    seq: u64,
    sensor_seq: Option<u32>,
) -> serde_json::Map<String, Value> {
    let v: Value = serde_json::from_slice(payload)
        .unwrap_or_else(|e| panic!("payload is not valid JSON ({e}): {:?}", String::from_utf8_lossy(payload)));
    let Value::Object(mut obj) = v else { panic!("payload is not an object: {:?}", String::from_utf8_lossy(payload)) };
    let gw = obj.remove(RESERVED_KEY).unwrap_or_else(|| panic!("payload has no {RESERVED_KEY}: {obj:?}"));
    let Value::Object(gw) = gw else { panic!("{RESERVED_KEY} is not an object: {gw:?}") };
    assert_eq!(gw.get("device").and_then(Value::as_str), Some(dev.name.as_str()), "{gw:?}");
    assert_eq!(gw.get("seq").and_then(Value::as_u64), Some(seq), "{gw:?}");
    assert_eq!(gw.get("received_at_us").and_then(Value::as_u64), Some(RECEIVED_AT_US), "{gw:?}");
    assert_eq!(gw.get("sensor_seq").and_then(Value::as_u64), sensor_seq.map(u64::from), "{gw:?}");
    let units: serde_json::Map<String, Value> =
        dev.channels().iter().filter_map(|c| Some((c.name.clone(), Value::String(c.unit.clone()?)))).collect();
    match gw.get("units") {
        None => assert!(units.is_empty(), "units missing: {gw:?}"),
        Some(Value::Object(u)) => assert_eq!(u, &units),
        Some(other) => panic!("units is not an object: {other:?}"),
    }
    obj
}
