//! Chunking never matters: a byte stream split into chunks anywhere gives exactly the frames,
//! rejections and payloads of the same stream fed whole, for the lines and the cobs framer and
//! the decoders behind them (through each device's stream input and reading sink, the decode
//! thread's own code). Streams mix simulator readings, garbage,
//! runs around and past `max_frame`, and delimiters.

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use sensorgate::config::{Config, DeviceConfig};
use sensorgate::decode::Format;
use sensorgate::framing::Framing;
use sensorgate::reject::Reject;
use sensorgate::simulate::SimSpec;
use sensorgate_wire::{encode_frame, Channel, ReadingV1, Value, MAX_FRAME_LEN};
use support::TestDevice;

#[path = "support/device.rs"]
mod support;

const JSON: SimSpec = SimSpec { framing: Framing::Lines, format: Format::Json };
const KV: SimSpec = SimSpec { framing: Framing::Lines, format: Format::Kv };
const BIN: SimSpec = SimSpec { framing: Framing::Cobs, format: Format::Postcard };
const SENT_US: u64 = 1_700_000_000_000_000;

/// One piece of a generated stream.
#[derive(Debug, Clone)]
enum Seg {
    /// Simulator reading `n` (lines: JSON when the flag is set, else kv; cobs: postcard).
    Reading(u64, bool),
    /// Arbitrary bytes, delimiters included.
    Garbage(Vec<u8>),
    /// `len` copies of one byte: frames at, just under and past the cap, and endless ones.
    Run(u8, usize),
    /// Lines: `\n` or `\r\n`; cobs: 0x00.
    Delim(bool),
    /// Cobs only: a well-formed frame of an arbitrary (possibly duplicate, NaN) reading.
    Wire(ReadingV1),
    /// Cobs only: arbitrary bytes, validly COBS-encoded and delimited (bad CRC, too short...).
    CobsOf(Vec<u8>),
    /// Cobs only: arbitrary bytes with a correct CRC appended, COBS-encoded and delimited (bad
    /// version, bad payload).
    CobsCrc(Vec<u8>),
    /// Lines only: one of a few crafted lines, each rejected for its own reason (or accepted).
    Text(&'static str),
}

const TEXTS: &[&str] = &[
    "{\"_gw\":1}\n",
    "_gw=1\n",
    "{\"a\":[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]}\n",
    "[1,2]\n",
    "a=NaN b=1\n",
    "a=1 a=2\n",
    "{\"a\":1e400}\n",
    "{\"a\":\"\\ud800\"}\n",
    "t=21.5 ok=true id=ab\"c x=+5\r\n",
    " { \"t\" : 21.50 } \r\n",
];

fn render(framing: Framing, segs: &[Seg]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in segs {
        match (s, framing) {
            (Seg::Reading(n, true), Framing::Lines) => JSON.render(*n, SENT_US, &mut out),
            (Seg::Reading(n, false), Framing::Lines) => KV.render(*n, SENT_US, &mut out),
            (Seg::Reading(n, _), Framing::Cobs) => BIN.render(*n, SENT_US, &mut out),
            (Seg::Garbage(g), _) => out.extend_from_slice(g),
            (Seg::Run(b, len), _) => out.extend(std::iter::repeat_n(*b, *len)),
            (Seg::Delim(crlf), Framing::Lines) => out.extend_from_slice(if *crlf { b"\r\n" } else { b"\n" }),
            (Seg::Delim(_), Framing::Cobs) => out.push(0),
            (Seg::Wire(r), _) => {
                let mut buf = [0u8; MAX_FRAME_LEN];
                let n = encode_frame(r, &mut buf).expect("any reading fits MAX_FRAME_LEN");
                out.extend_from_slice(&buf[..n]);
            }
            (Seg::CobsOf(body), _) => cobs_frame(&mut out, body),
            (Seg::CobsCrc(data), _) => {
                let mut body = data.clone();
                body.extend_from_slice(&sensorgate_wire::CRC.checksum(data).to_le_bytes());
                cobs_frame(&mut out, &body);
            }
            (Seg::Text(t), _) => out.extend_from_slice(t.as_bytes()),
        }
    }
    out
}

fn cobs_frame(out: &mut Vec<u8>, body: &[u8]) {
    let mut buf = vec![0u8; cobs::max_encoding_length(body.len())];
    let n = cobs::encode(body, &mut buf);
    out.extend_from_slice(&buf[..n]);
    out.push(0);
}

fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<f32>().prop_map(Value::F32),
        Just(Value::F32(f32::NAN)),
        any::<i32>().prop_map(Value::I32),
        any::<bool>().prop_map(Value::Bool),
    ]
}

fn arb_reading() -> impl Strategy<Value = ReadingV1> {
    // Small ids so duplicates are common.
    (any::<u32>(), prop::collection::vec((0u8..6, arb_value()), 0..=16)).prop_map(|(seq, chans)| {
        let mut r = ReadingV1::new(seq);
        for (id, value) in chans {
            r.channels.push(Channel { id, value }).expect("at most 16 channels");
        }
        r
    })
}

/// Segments for a device with frame cap `max`.
fn arb_segs(framing: Framing, max: usize) -> impl Strategy<Value = Vec<Seg>> {
    let delim = if framing == Framing::Lines { b'\n' } else { 0 };
    let run_byte = prop::sample::select(vec![b'x', b' ', b'\r', 0xff, 0x01, b'=', delim]);
    let common = prop_oneof![
        4 => (any::<u64>().prop_map(|n| n % 100_000), any::<bool>()).prop_map(|(n, j)| Seg::Reading(n, j)),
        2 => prop::collection::vec(
            prop_oneof![3 => any::<u8>(), 1 => Just(delim), 1 => Just(b'\r')],
            0..48
        )
        .prop_map(Seg::Garbage),
        1 => (run_byte, (max.saturating_sub(3))..(max * 3 + 8)).prop_map(|(b, n)| Seg::Run(b, n)),
        2 => any::<bool>().prop_map(Seg::Delim),
    ];
    let seg = match framing {
        Framing::Lines => prop_oneof![6 => common, 1 => prop::sample::select(TEXTS).prop_map(Seg::Text)].boxed(),
        Framing::Cobs => prop_oneof![
            6 => common,
            2 => arb_reading().prop_map(Seg::Wire),
            1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Seg::CobsOf),
            1 => prop::collection::vec(any::<u8>(), 1..40).prop_map(Seg::CobsCrc),
        ]
        .boxed(),
    };
    prop::collection::vec(seg, 0..40)
}

/// Where to cut the stream.
#[derive(Debug, Clone)]
enum Splits {
    /// At these positions (scaled to the stream's length).
    At(Vec<Index>),
    /// Every `n` bytes.
    Every(usize),
}

fn arb_splits() -> impl Strategy<Value = Splits> {
    prop_oneof![
        3 => prop::collection::vec(any::<Index>(), 0..24).prop_map(Splits::At),
        1 => (1usize..9).prop_map(Splits::Every),
    ]
}

fn chunks<'a>(stream: &'a [u8], splits: &Splits) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = match splits {
        Splits::At(ix) => ix.iter().map(|i| i.index(stream.len() + 1)).collect(),
        Splits::Every(n) => (0..stream.len()).step_by(*n).collect(),
    };
    cuts.push(0);
    cuts.push(stream.len());
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).map(|w| &stream[w[0]..w[1]]).collect()
}

fn devices(framing: Framing, max: usize) -> Vec<DeviceConfig> {
    let dev = |name: &str, format: &str| {
        format!(
            "[[device]]\nname = \"{name}\"\npath = \"/dev/{name}\"\nframing = \"{}\"\nformat = \"{format}\"\nmax_frame = {max}\n",
            if framing == Framing::Lines { "lines" } else { "cobs" }
        )
    };
    let devs = match framing {
        Framing::Lines => dev("j", "json") + &dev("k", "kv"),
        Framing::Cobs => dev("b", "postcard") + "[[device.channel]]\nid = 0\nname = \"temp\"\nunit = \"°C\"\n",
    };
    Config::from_toml(&format!("[gateway]\nid = \"props\"\n{devs}"))
        .unwrap_or_else(|p| panic!("test config is invalid: {p:?}"))
        .devices
}

/// What a device makes of a stream: framer output, then per device the payload or rejection
/// of every framer output, and whether a partial frame is held at the end.
#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Result<Vec<u8>, Reject>>,
    payloads: Vec<Vec<Result<Bytes, Reject>>>,
    partial: bool,
}

impl Outcome {
    /// Every rejection, framer and decoder, in stream order, per device.
    fn rejects(&self) -> Vec<Vec<Reject>> {
        self.payloads.iter().map(|p| p.iter().filter_map(|r| r.as_ref().err().copied()).collect()).collect()
    }
}

fn feed(devs: &[DeviceConfig], chunks: &[&[u8]]) -> Outcome {
    // Devices of one test share framing and cap: one framer shows what every device's cuts.
    let mut framer = devs[0].stream().expect("stream devices").framer();
    let mut frames = Vec::new();
    for c in chunks {
        framer.push(c, |f| frames.push(f.map(<[u8]>::to_vec)));
    }
    // Each device's own stream input and reading sink, as on its decode thread.
    let payloads = devs
        .iter()
        .map(|dev| {
            TestDevice::new(dev).stream(chunks.iter().copied(), 0).into_iter().map(|p| p.map(Bytes::from)).collect()
        })
        .collect();
    Outcome { frames, payloads, partial: framer.has_partial() }
}

fn check_split_invariance(framing: Framing, max: usize, segs: &[Seg], splits: &Splits) -> Result<(), TestCaseError> {
    let devs = devices(framing, max);
    let stream = render(framing, segs);
    let whole = feed(&devs, &[&stream]);
    let chunked = feed(&devs, &chunks(&stream, splits));
    prop_assert_eq!(&chunked.frames, &whole.frames, "frames differ");
    prop_assert_eq!(chunked.rejects(), whole.rejects(), "rejection reasons differ");
    prop_assert_eq!(&chunked, &whole, "payloads differ");
    for f in whole.frames.iter().flatten() {
        prop_assert!(f.len() <= max, "a frame of {} bytes passed max_frame {}", f.len(), max);
    }
    Ok(())
}

fn lines_case() -> impl Strategy<Value = (usize, Vec<Seg>, Splits)> {
    // 16 is the smallest cap allowed; the simulator's kv lines are about 50 bytes, its JSON
    // lines about 60.
    prop::sample::select(vec![16usize, 56, 64, 1024, 1024])
        .prop_flat_map(|max| (Just(max), arb_segs(Framing::Lines, max), arb_splits()))
}

fn cobs_case() -> impl Strategy<Value = (usize, Vec<Seg>, Splits)> {
    // The simulator's frames are about 27 bytes; MAX_FRAME_LEN (125) is the default.
    prop::sample::select(vec![16usize, 28, 32, MAX_FRAME_LEN, MAX_FRAME_LEN])
        .prop_flat_map(|max| (Just(max), arb_segs(Framing::Cobs, max), arb_splits()))
}

proptest! {
    // A failing case is saved in tests/proptest-regressions/chunking_props.txt and replayed first.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn lines_chunking_changes_nothing((max, segs, splits) in lines_case()) {
        check_split_invariance(Framing::Lines, max, &segs, &splits)?;
    }

    #[test]
    fn cobs_chunking_changes_nothing((max, segs, splits) in cobs_case()) {
        check_split_invariance(Framing::Cobs, max, &segs, &splits)?;
    }

    /// Only readings, under any chunking: every one arrives, in order, with its own fields.
    #[test]
    fn every_reading_arrives_under_any_chunking(
        ns in prop::collection::vec(0u64..1_000_000, 1..30),
        json in any::<bool>(),
        cobs in any::<bool>(),
        splits in arb_splits(),
    ) {
        let framing = if cobs { Framing::Cobs } else { Framing::Lines };
        let devs = devices(framing, if cobs { MAX_FRAME_LEN } else { 1024 });
        let segs: Vec<Seg> = ns.iter().map(|&n| Seg::Reading(n, json)).collect();
        let stream = render(framing, &segs);
        let out = feed(&devs, &chunks(&stream, &splits));
        prop_assert!(!out.partial);
        prop_assert_eq!(out.frames.len(), ns.len());
        // Lines: the device of the rendered format (JSON device first).
        let payloads = &out.payloads[usize::from(!cobs && !json)];
        for (i, (p, &n)) in payloads.iter().zip(&ns).enumerate() {
            let p = p.as_ref().map_err(|e| TestCaseError::fail(format!("reading {n} rejected: {e:?}")))?;
            let v: serde_json::Value = serde_json::from_slice(p).expect("payload is JSON");
            // The gateway numbers a device's readings from 1.
            prop_assert_eq!(&v["_gw"]["seq"], &serde_json::json!(i + 1));
            if cobs {
                prop_assert_eq!(&v["_gw"]["sensor_seq"], &serde_json::json!(n));
                prop_assert_eq!(&v["ch2"], &serde_json::json!(n));
            } else {
                prop_assert_eq!(&v["n"], &serde_json::json!(n));
                prop_assert_eq!(&v["sent_us"], &serde_json::json!(SENT_US));
            }
        }
    }
}
