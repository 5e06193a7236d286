//! Hostile input, end to end (real binary, real mosquitto, pseudo-terminals): per device —
//! lines/json, lines/kv, cobs — deeply nested JSON, huge lines, numbers out of range, NaN and
//! infinity, invalid UTF-8, a mebibyte without a delimiter, and seeded random garbage. After each
//! phase a good reading still arrives, no device restarts, every rejected frame is counted under
//! its reason (exactly, where the reason is determinable), `frames_in = readings + rejected.total`,
//! every byte is counted in `bytes_in`, and the gateway's peak RSS stays small.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{memory_mib, n, write_concurrently, Gateway, Mosquitto, Msg, Rng, Subscriber};
use sensorgate::decode::Format;
use sensorgate::framing::Framing;
use sensorgate::simulate::{PtyLink, SimSpec};
use serde_json::Value;

const MIB: usize = 1 << 20;
/// Peak resident memory allowed for the gateway (a debug build) through the whole test.
const MAX_RSS_MIB: f64 = 64.0;

/// A device under attack.
struct Dev {
    name: &'static str,
    spec: SimSpec,
    /// The frame cap configured for it (the JSON device gets the largest allowed, so that
    /// 64 KiB documents reach its decoder).
    max_frame: usize,
}

const DEVS: [Dev; 3] = [
    Dev { name: "j", spec: SimSpec { framing: Framing::Lines, format: Format::Json }, max_frame: 64 * 1024 },
    Dev { name: "k", spec: SimSpec { framing: Framing::Lines, format: Format::Kv }, max_frame: 1024 },
    Dev { name: "c", spec: SimSpec { framing: Framing::Cobs, format: Format::Postcard }, max_frame: 125 },
];

impl Dev {
    fn delim(&self) -> u8 {
        match self.spec.framing {
            Framing::Lines => b'\n',
            Framing::Cobs => 0,
        }
    }

    fn toml(&self, path: &std::path::Path) -> String {
        let (framing, format) = match self.spec.format {
            Format::Json => ("lines", "json"),
            Format::Kv => ("lines", "kv"),
            Format::Postcard => ("cobs", "postcard"),
        };
        format!(
            "[[device]]\nname = \"{}\"\npath = \"{}\"\nframing = \"{framing}\"\nformat = \"{format}\"\nmax_frame = {}\n",
            self.name,
            path.display(),
            self.max_frame
        )
    }

    /// A good reading numbered `n`, preceded by a delimiter (ending whatever came before).
    fn good(&self, n: u64) -> Vec<u8> {
        let mut out = vec![self.delim()];
        self.spec.render(n, common::now_us(), &mut out);
        out
    }

    /// The sensor counter of a delivered reading.
    fn n_of(&self, v: &Value) -> Option<u64> {
        v.get("n").or_else(|| v.get("ch2")).and_then(Value::as_u64)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Reading,
    Rejected(&'static str),
    /// A blank line or a lone delimiter: not a frame, not counted.
    NotAFrame,
}
use Outcome::{NotAFrame, Reading, Rejected};

/// One hostile input, complete with its delimiter.
struct Input {
    what: &'static str,
    bytes: Vec<u8>,
    outcome: Outcome,
}

fn input(what: &'static str, mut bytes: Vec<u8>, delim: u8, outcome: Outcome) -> Input {
    bytes.push(delim);
    Input { what, bytes, outcome }
}

/// `{"a":[[...]]}` with `levels` levels counting the outer object; `close` = false leaves the
/// arrays open.
fn nested_arrays(levels: usize, close: bool) -> Vec<u8> {
    let mut s = b"{\"a\":".to_vec();
    s.extend(std::iter::repeat_n(b'[', levels - 1));
    if close {
        s.extend(std::iter::repeat_n(b']', levels - 1));
        s.push(b'}');
    }
    s
}

/// `{"a":{"a":...{"a":1}...}}`, `levels` objects deep.
fn nested_objects(levels: usize) -> Vec<u8> {
    let mut s = "{\"a\":".repeat(levels - 1).into_bytes();
    s.extend_from_slice(b"{\"a\":1}");
    s.extend(std::iter::repeat_n(b'}', levels - 1));
    s
}

/// A JSON object `{"s":"xxxx..."}` of exactly `len` bytes.
fn long_object(len: usize) -> Vec<u8> {
    let mut s = b"{\"s\":\"".to_vec();
    s.extend(std::iter::repeat_n(b'x', len - s.len() - 2));
    s.extend_from_slice(b"\"}");
    assert_eq!(s.len(), len);
    s
}

/// A COBS frame (with its 0x00) around postcard bytes `data` and `crc`, as the wire crate
/// builds them, without its checks on the content.
fn cobs_frame_with_crc(data: &[u8], crc: u32) -> Vec<u8> {
    let mut body = data.to_vec();
    body.extend_from_slice(&crc.to_le_bytes());
    let mut out = vec![0u8; body.len() + body.len() / 254 + 2];
    let n = cobs::encode(&body, &mut out);
    out.truncate(n);
    out.push(0);
    out
}

fn cobs_frame(data: &[u8]) -> Vec<u8> {
    cobs_frame_with_crc(data, sensorgate_wire::CRC.checksum(data))
}

fn wire_frame(seq: u32, channels: &[sensorgate_wire::Channel]) -> Vec<u8> {
    let mut r = sensorgate_wire::ReadingV1::new(seq);
    r.channels.extend_from_slice(channels).unwrap();
    let mut buf = [0u8; sensorgate_wire::MAX_FRAME_LEN];
    let n = sensorgate_wire::encode_frame(&r, &mut buf).unwrap();
    buf[..n].to_vec()
}

/// The deterministic hostile inputs for a device, each with the outcome it must have.
fn hostile(dev: &Dev) -> Vec<Input> {
    use sensorgate_wire::{Channel, Value as W};
    let d = dev.delim();
    let no_delim_mib: Vec<u8> = (0..MIB).map(|i| b'a' + (i % 26) as u8).collect();
    let mut v = vec![
        // Shared by all three: text aimed at the JSON decoder, and a mebibyte without a delimiter.
        input("nested arrays, 100 levels", nested_arrays(100, true), d, Rejected("too_deep")),
        input("nested objects, 100 levels", nested_objects(100), d, Rejected("too_deep")),
        input("nested arrays, 100 000 levels (200 kB)", nested_arrays(100_000, true), d, Rejected("oversize")),
        input("JSON line of 1 MiB", long_object(MIB), d, Rejected("oversize")),
        input("number out of range", b"{\"x\":1e400}".to_vec(), d, Rejected("bad_json")),
        input("invalid UTF-8", b"{\"s\":\"\xff\xfe\"}".to_vec(), d, Rejected("bad_utf8")),
        input("1 MiB without a delimiter", no_delim_mib, d, Rejected("oversize")),
    ];
    match dev.spec.format {
        Format::Json => v.extend([
            input("nested arrays at the limit, 16 levels", nested_arrays(16, true), d, Reading),
            input("nested arrays, 17 levels", nested_arrays(17, true), d, Rejected("too_deep")),
            input(
                "nested arrays, 32 000 levels (64 kB, reaches the decoder)",
                nested_arrays(32_000, true),
                d,
                Rejected("too_deep"),
            ),
            input("nested arrays, 30 000 levels, never closed", nested_arrays(30_000, false), d, Rejected("too_deep")),
            input("JSON line of exactly max_frame (64 KiB)", long_object(64 * 1024), d, Reading),
            input("JSON line of max_frame + 1", long_object(64 * 1024 + 1), d, Rejected("oversize")),
            input("negative number out of range", b"{\"x\":-1e400}".to_vec(), d, Rejected("bad_json")),
            input("NaN", b"{\"x\":NaN}".to_vec(), d, Rejected("bad_json")),
            input("Infinity", b"{\"x\":-Infinity}".to_vec(), d, Rejected("bad_json")),
            input(
                "integer beyond u64 (valid JSON, passed through)",
                b"{\"big\":123456789012345678901234567890}".to_vec(),
                d,
                Reading,
            ),
            input("UTF-16 surrogate in UTF-8", b"{\"s\":\"\xed\xa0\x80\"}".to_vec(), d, Rejected("bad_utf8")),
            input("overlong UTF-8 in a key", b"{\"\xc0\xaf\":1}".to_vec(), d, Rejected("bad_utf8")),
            input("UTF-8 cut short", b"{\"s\":\"\xe2\x82".to_vec(), d, Rejected("bad_utf8")),
            input("lone surrogate escape", b"{\"s\":\"\\ud800\"}".to_vec(), d, Rejected("bad_json")),
            input("raw NUL in a string", b"{\"s\":\"a\x00b\"}".to_vec(), d, Rejected("bad_json")),
            input("blank line with CR", b"  \t\r".to_vec(), d, NotAFrame),
        ]),
        Format::Kv => {
            let many: String = (0..65).map(|i| format!("k{i}=1 ")).collect();
            v.extend([
                input("kv: 1e400", b"a=1e400".to_vec(), d, Rejected("non_finite")),
                input("kv: -1e400", b"a=-1e400".to_vec(), d, Rejected("non_finite")),
                input("kv: NaN", b"a=NaN".to_vec(), d, Rejected("non_finite")),
                input("kv: nan", b"a=nan".to_vec(), d, Rejected("non_finite")),
                input("kv: inf", b"a=inf".to_vec(), d, Rejected("non_finite")),
                input("kv: -Infinity after a good pair", b"ok=1 a=-Infinity".to_vec(), d, Rejected("non_finite")),
                input(
                    "kv: integer beyond u64 (passed through)",
                    b"big=123456789012345678901234567890".to_vec(),
                    d,
                    Reading,
                ),
                input("kv: invalid UTF-8 in a key", b"\xc0\xaf=1".to_vec(), d, Rejected("bad_utf8")),
                input("kv: 65 pairs", many.into_bytes(), d, Rejected("bad_kv")),
                input("kv: braces in a key", b"a{b}=1".to_vec(), d, Rejected("bad_kv")),
                input("kv: 1 KiB line (the cap)", format!("s={}", "y".repeat(1022)).into_bytes(), d, Reading),
                input("kv: 1 KiB + 1 line", format!("s={}", "y".repeat(1023)).into_bytes(), d, Rejected("oversize")),
            ]);
            // The JSON-aimed inputs are not key=value pairs.
            for i in &mut v[..3] {
                i.outcome = if i.outcome == Rejected("oversize") { i.outcome } else { Rejected("bad_kv") };
            }
            v[4].outcome = Rejected("bad_kv"); // {"x":1e400}
        }
        Format::Postcard => {
            let f = |id, value| Channel { id, value };
            // Channel 0 as an I32 whose varint does not fit 32 bits.
            let mut wide = vec![1, 0, 1, 0, 1];
            wide.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x7f]);
            // 17 channels (the format allows 16), each a Bool.
            let mut seventeen = vec![1, 0, 17];
            for id in 0..17 {
                seventeen.extend_from_slice(&[id, 2, 1]);
            }
            // seq 5, channel 1 = I32 100; one bit of the value flipped after the CRC was taken.
            let mut data = vec![1, 5, 1, 1, 1, 0xc8, 0x01];
            let crc = sensorgate_wire::CRC.checksum(&data);
            data[5] ^= 0x02;
            let bad_crc = cobs_frame_with_crc(&data, crc);
            let strip = |mut b: Vec<u8>| {
                assert_eq!(b.pop(), Some(0));
                b
            };
            v.extend([
                input("cobs: f32 NaN", strip(wire_frame(1, &[f(0, W::F32(f32::NAN))])), d, Rejected("non_finite")),
                input(
                    "cobs: f32 +inf",
                    strip(wire_frame(2, &[f(0, W::F32(f32::INFINITY))])),
                    d,
                    Rejected("non_finite"),
                ),
                input("cobs: i32 varint out of range", strip(cobs_frame(&wide)), d, Rejected("bad_payload")),
                input("cobs: 17 channels", strip(cobs_frame(&seventeen)), d, Rejected("bad_payload")),
                input(
                    "cobs: one channel twice",
                    strip(wire_frame(3, &[f(0, W::I32(1)), f(0, W::I32(2))])),
                    d,
                    Rejected("duplicate_key"),
                ),
                input("cobs: flipped bit", strip(bad_crc), d, Rejected("bad_crc")),
                input(
                    "cobs: extremes pass",
                    strip(wire_frame(4, &[f(0, W::F32(f32::MAX)), f(1, W::I32(i32::MIN))])),
                    d,
                    Reading,
                ),
                input("cobs: lone delimiters", vec![0, 0], d, NotAFrame),
            ]);
            // The JSON-aimed inputs: too long, or not COBS at all.
            for i in &mut v[..7] {
                if i.bytes.len() > dev.max_frame + 1 {
                    i.outcome = Rejected("oversize");
                } else {
                    i.outcome = Rejected("bad_cobs");
                }
            }
        }
    }
    v
}

/// `n` random bytes; with `delim_every` > 0, about one in `delim_every` is `delim` (short
/// frames that reach the decoders rather than the frame cap).
fn garbage(rng: &mut Rng, n: usize, delim: u8, delim_every: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            let r = rng.next();
            if delim_every > 0 && (r >> 32) % delim_every == 0 {
                delim
            } else {
                r as u8
            }
        })
        .collect()
}

/// Frames, and oversize frames among them, in `bytes` (which ends with a delimiter), by the
/// framing rules of the README: blank lines and empty COBS frames are not frames; anything
/// longer than `max_frame` is one oversize frame.
fn frames_in(dev: &Dev, bytes: &[u8]) -> (u64, u64) {
    assert_eq!(bytes.last(), Some(&dev.delim()));
    let (mut frames, mut oversize) = (0, 0);
    for seg in bytes[..bytes.len() - 1].split(|b| *b == dev.delim()) {
        let (frame, over) = match dev.spec.framing {
            Framing::Cobs => (!seg.is_empty(), seg.len() > dev.max_frame),
            Framing::Lines => {
                let line = seg.strip_suffix(b"\r").unwrap_or(seg);
                let over = line.len() > dev.max_frame;
                (over || !line.iter().all(u8::is_ascii_whitespace), over)
            }
        };
        frames += u64::from(frame);
        oversize += u64::from(over);
    }
    (frames, oversize)
}

/// What the subscriber has seen so far.
#[derive(Default)]
struct Seen {
    readings: BTreeMap<String, Vec<Msg>>,
    states: BTreeMap<String, Vec<String>>,
    metrics: Option<Value>,
}

impl Seen {
    fn add(&mut self, m: Msg) {
        let parts: Vec<&str> = m.topic.split('/').collect();
        match parts.as_slice() {
            [_, _, "metrics"] => self.metrics = Some(m.json()),
            [_, _, "devices", dev, "readings"] => self.readings.entry(dev.to_string()).or_default().push(m),
            [_, _, "devices", dev, "state"] => {
                let state = m.json()["state"].as_str().unwrap().to_string();
                self.states.entry(dev.to_string()).or_default().push(state);
            }
            _ => {}
        }
    }

    async fn until(&mut self, sub: &mut Subscriber, timeout: Duration, done: impl Fn(&Seen) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(self) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "timed out; last metrics: {:?}", self.metrics);
            let (m, _) = sub.wait_for(left, |_| true).await;
            self.add(m);
        }
    }

    fn device(&self, name: &str) -> &Value {
        &self.metrics.as_ref().expect("metrics seen")["devices"][name]
    }
}

fn reasons(dev: &Value) -> BTreeMap<String, u64> {
    dev["rejected"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, v)| *k != "total" && v.as_u64() != Some(0))
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

/// A metrics snapshot at rest for `dev`: the last reading written is delivered, and every frame
/// before it judged.
fn settled(seen: &Seen, dev: &Dev, readings: u64) -> bool {
    seen.metrics.as_ref().is_some_and(|m| {
        let d = &m["devices"][dev.name];
        d["delivered"] == readings && d["frames_in"] == n(d, "readings") + n(&d["rejected"], "total")
    }) && seen.readings.get(dev.name).map_or(0, Vec::len) as u64 >= readings
}

fn assert_healthy(seen: &Seen, dev: &Dev) {
    let d = seen.device(dev.name);
    assert_eq!(d["state"], "up", "{}: {d}", dev.name);
    assert_eq!(n(d, "restarts"), 0, "{}: hostile input never ends a session: {d}", dev.name);
    let by_reason: u64 = reasons(d).values().sum();
    assert_eq!(by_reason, n(&d["rejected"], "total"), "{}: total is the sum of the reasons: {d}", dev.name);
    for key in ["dropped_oldest", "expired", "queued", "in_flight"] {
        assert_eq!(n(d, key), 0, "{}: {key}: {d}", dev.name);
    }
    let states = &seen.states[dev.name];
    assert!(states.iter().all(|s| s == "opening" || s == "up"), "{}: states {states:?}", dev.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_counted_by_reason_and_survived_on_every_framing() {
    let started = std::time::Instant::now();
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let mut ptys = Vec::new();
    let mut config = format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"100ms\"\nshutdown_timeout = \"5s\"\n[mqtt]\nport = {}\n\n",
        broker.port
    );
    for dev in &DEVS {
        let link = dir.path().join(dev.name);
        ptys.push(PtyLink::create(&link).unwrap());
        config += &dev.toml(&link);
    }
    let gw = Gateway::start(dir.path(), &config);

    // Phase 1: the deterministic inputs, then a good reading, on all three ports at once.
    let inputs: Vec<Vec<Input>> = DEVS.iter().map(hostile).collect();
    let streams: Vec<Vec<u8>> = DEVS
        .iter()
        .zip(&inputs)
        .map(|(dev, inputs)| {
            let mut s: Vec<u8> = inputs.iter().flat_map(|i| i.bytes.iter().copied()).collect();
            s.extend(dev.good(1001));
            s
        })
        .collect();
    let mut ptys = write_concurrently(ptys, streams.clone()).await;
    let mut seen = Seen::default();
    let want_readings: Vec<u64> =
        inputs.iter().map(|i| i.iter().filter(|i| i.outcome == Reading).count() as u64 + 1).collect();
    seen.until(&mut sub, Duration::from_secs(20), |s| {
        DEVS.iter().zip(&want_readings).all(|(dev, &want)| settled(s, dev, want))
    })
    .await;
    let mut before = Vec::new();
    for ((dev, inputs), stream) in DEVS.iter().zip(&inputs).zip(&streams) {
        let d = seen.device(dev.name).clone();
        let mut want: BTreeMap<String, u64> = BTreeMap::new();
        for i in inputs {
            if let Rejected(r) = i.outcome {
                *want.entry(r.to_string()).or_default() += 1;
            }
        }
        let frames = inputs.iter().filter(|i| i.outcome != NotAFrame).count() as u64 + 1;
        let explain = inputs.iter().map(|i| format!("  {:?}: {}", i.outcome, i.what)).collect::<Vec<_>>().join("\n");
        assert_eq!(reasons(&d), want, "{}: rejected by reason; inputs:\n{explain}\nmetrics: {d}", dev.name);
        assert_eq!(n(&d, "frames_in"), frames, "{}: {d}", dev.name);
        assert_eq!(n(&d, "readings"), frames - want.values().sum::<u64>(), "{}: {d}", dev.name);
        assert_eq!(n(&d, "bytes_in"), stream.len() as u64, "{}: every byte read: {d}", dev.name);
        assert_healthy(&seen, dev);
        let last = seen.readings[dev.name].last().unwrap().json();
        assert_eq!(dev.n_of(&last), Some(1001), "{}: the good reading came last: {last}", dev.name);
        before.push(d);
    }
    // What was accepted went through unchanged.
    let j: Vec<String> = seen.readings["j"].iter().map(Msg::text).collect();
    let at_limit = nested_arrays(16, true);
    let at_limit = format!("{},\"_gw\"", String::from_utf8_lossy(&at_limit[..at_limit.len() - 1]));
    assert!(j.iter().any(|t| t.starts_with(&at_limit)), "{at_limit} in {j:?}");
    assert!(j.iter().any(|t| t.starts_with("{\"big\":123456789012345678901234567890,")), "{j:?}");
    assert!(j.iter().any(|t| t.len() > 64 * 1024 && t.contains(&"x".repeat(65_000))), "the 64 KiB line");
    eprintln!("phase 1 (deterministic) done after {:?}", started.elapsed());

    // Phase 2: seeded garbage — uniform bytes, then dense short frames — then a good reading.
    let mut rng = Rng(0x5eed_f00d_6a7b_a6e5);
    let garbage: Vec<Vec<u8>> = DEVS
        .iter()
        .map(|dev| {
            let mut g = garbage(&mut rng, 256 * 1024, dev.delim(), 0);
            g.extend(garbage(&mut rng, 64 * 1024, dev.delim(), 16));
            g.push(dev.delim());
            g
        })
        .collect();
    let streams: Vec<Vec<u8>> = DEVS
        .iter()
        .zip(&garbage)
        .map(|(dev, g)| {
            let mut s = g.clone();
            s.extend(dev.good(1002));
            s
        })
        .collect();
    ptys = write_concurrently(ptys, streams.clone()).await;
    seen.until(&mut sub, Duration::from_secs(20), |s| {
        DEVS.iter().zip(&want_readings).all(|(dev, &want)| settled(s, dev, want + 1))
    })
    .await;
    for (((dev, g), stream), b) in DEVS.iter().zip(&garbage).zip(&streams).zip(&before) {
        let d = seen.device(dev.name).clone();
        let delta = |key: &str| n(&d, key) - n(b, key);
        let (frames, oversize) = frames_in(dev, g);
        // The seed is fixed: no garbage frame happens to be a valid reading.
        assert_eq!(delta("readings"), 1, "{}: only the good reading: {d}", dev.name);
        assert_eq!(delta("frames_in"), frames + 1, "{}: {d}", dev.name);
        assert_eq!(n(&d["rejected"], "total") - n(&b["rejected"], "total"), frames, "{}: {d}", dev.name);
        assert_eq!(n(&d["rejected"], "oversize") - n(&b["rejected"], "oversize"), oversize, "{}: {d}", dev.name);
        assert_eq!(delta("bytes_in"), stream.len() as u64, "{}: {d}", dev.name);
        // Garbage lands on the decoders' own reasons, never on a panic or a cut-off frame.
        let possible: &[&str] = match dev.spec.format {
            Format::Json => &["oversize", "bad_utf8", "bad_json", "not_object", "too_deep"],
            Format::Kv => &["oversize", "bad_utf8", "bad_kv", "non_finite", "duplicate_key", "reserved_key"],
            Format::Postcard => &[
                "oversize",
                "bad_cobs",
                "too_short",
                "bad_crc",
                "bad_version",
                "bad_payload",
                "non_finite",
                "duplicate_key",
            ],
        };
        let grew: BTreeMap<String, u64> = reasons(&d)
            .into_iter()
            .map(|(k, v)| {
                let old = b["rejected"][&k].as_u64().unwrap_or(0);
                (k, v - old)
            })
            .filter(|(_, v)| *v > 0)
            .collect();
        assert!(grew.keys().all(|k| possible.contains(&k.as_str())), "{}: garbage rejected as {grew:?}", dev.name);
        eprintln!("{}: {} garbage bytes, {frames} frames rejected as {grew:?}", dev.name, g.len());
        assert_healthy(&seen, dev);
        let last = seen.readings[dev.name].last().unwrap().json();
        assert_eq!(dev.n_of(&last), Some(1002), "{}: the good reading came last: {last}", dev.name);
    }

    let peak = memory_mib(gw.pid(), "VmHWM:");
    let now = memory_mib(gw.pid(), "VmRSS:");
    eprintln!("gateway RSS {now:.1} MiB, peak {peak:.1} MiB; test took {:?}", started.elapsed());
    assert!(peak < MAX_RSS_MIB, "peak RSS {peak:.1} MiB");
    let log = gw.log_text();
    assert!(!log.contains("panicked") && !log.contains("ERROR"), "{log}");
    drop(ptys);
}
