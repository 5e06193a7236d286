//! Writes the committed seed corpora (fuzz/corpus/<target>/seed-*). Run from fuzz/ after a
//! wire-format or config change:
//!
//! ```text
//! cargo +nightly run --example gen_corpus
//! ```
//!
//! Framer seeds start with the two chunking control bytes of `sensorgate_fuzz::frames`.

use std::path::Path;

use sensorgate::decode::Format;
use sensorgate::framing::{CobsFramer, Framing};
use sensorgate::simulate::SimSpec;
use sensorgate_wire::{encode_frame, Channel, ReadingV1, Value, CRC, MAX_FRAME_LEN};

const JSON: SimSpec = SimSpec { framing: Framing::Lines, format: Format::Json };
const KV: SimSpec = SimSpec { framing: Framing::Lines, format: Format::Kv };
const BIN: SimSpec = SimSpec { framing: Framing::Cobs, format: Format::Postcard };
/// A fixed send time, so the corpus is reproducible.
const SENT_US: u64 = 1_700_000_000_000_000;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    lines(&root.join("lines_framer"));
    cobs(&root.join("cobs_framer"));
    wire(&root.join("wire_decode"));
    config(&root.join("config_parse"));
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

/// Control bytes, then the stream.
fn framed(ctl: [u8; 2], stream: &[u8]) -> Vec<u8> {
    let mut v = ctl.to_vec();
    v.extend_from_slice(stream);
    v
}

fn render(spec: SimSpec, range: std::ops::Range<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for n in range {
        spec.render(n, SENT_US, &mut out);
    }
    out
}

fn lines(dir: &Path) {
    write(dir, "json-sim-whole", &framed([0, 0], &render(JSON, 0..3)));
    write(dir, "kv-sim-bytewise", &framed([1, 0], &render(KV, 97..100)));
    let mut mixed = b"a=1 b=true id=ab\"c x=+5 y=.5\r\n\r\n  \n".to_vec();
    mixed.extend_from_slice(br#" {"t": 21.50, "s":"x\u00e9\ud83d\ude00" ,"n":{"a":[1,2,null]}} "#);
    mixed.extend_from_slice(b"\r\n\n");
    write(dir, "mixed-crlf-blank", &framed([5, 9], &mixed));
    let nested17 = format!("{{\"a\":{}{}}}\n", "[".repeat(16), "]".repeat(16));
    let mut rejects = b"{\"a\":1\n[1,2]\n42\n{\"_gw\":1}\n{\"\\u005fgw\":1}\n{\"a\":\"\xff\"}\n".to_vec();
    rejects.extend_from_slice(nested17.as_bytes());
    rejects.extend_from_slice(b"temp\n=1\na=\na b=1\na=NaN\na=1e999\na=1 a=2\n_gw=1\nt{x}=1\n");
    write(dir, "rejects", &framed([3, 1], &rejects));
    // max_frame is 128: one line at the cap (+\r), one past it, one endless.
    let mut over = format!("{}\r\n", "k=".to_string() + &"v".repeat(126)).into_bytes();
    over.extend_from_slice(format!("{}\n", "x".repeat(129)).as_bytes());
    over.extend_from_slice(&[b'y'; 300]);
    over.extend_from_slice(b"\nok=1\n");
    write(dir, "oversize", &framed([16, 77], &over));
    write(dir, "kv-values", &framed([0, 0], b"n=-0.0 z=007 e=1E-5 big=+1e300 s=\x01\"\\ u=\xc3\xa9 t=0x10 b=false\n"));
    write(dir, "garbage", &framed([7, 200], b"\x00\xff\xfe\n\x80abc\r\r\n{\n}\n\t\x0b\x0c\n=\n==\n"));
    write(dir, "no-newline-at-end", &framed([2, 3], &render(JSON, 5..6)[..40]));
}

fn frame(r: &ReadingV1) -> Vec<u8> {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let n = encode_frame(r, &mut buf).unwrap();
    buf[..n].to_vec()
}

fn reading(seq: u32, chans: &[(u8, Value)]) -> ReadingV1 {
    let mut r = ReadingV1::new(seq);
    for &(id, value) in chans {
        r.channels.push(Channel { id, value }).unwrap();
    }
    r
}

/// The committed test vectors of wire/tests/vectors.rs.
fn vectors() -> Vec<Vec<u8>> {
    vec![
        vec![0x02, 0x01, 0x01, 0x05, 0x25, 0xb3, 0x83, 0xfe, 0x00],
        vec![0x04, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x07, 0xac, 0x41, 0x24, 0x89, 0xc6, 0x98, 0x00],
        vec![
            0x05, 0x01, 0xac, 0x02, 0x03, 0x01, 0x01, 0x01, 0x0d, 0xac, 0x41, 0x01, 0x01, 0x03, 0x07, 0x02, 0x01, 0x02,
            0x88, 0xa9, 0x26, 0x00,
        ],
    ]
}

/// The COBS-decoded body of one frame (as the gateway sees it).
fn body(frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    CobsFramer::new(MAX_FRAME_LEN).push(frame, |f| out.push(f.unwrap().to_vec()));
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

/// COBS-encodes `body` and appends the delimiter.
fn cobs_encode(body: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    let mut code_at = 0;
    for &b in body {
        if b == 0 || out.len() - code_at == 0xff {
            out[code_at] = (out.len() - code_at) as u8;
            code_at = out.len();
            out.push(0);
            if b == 0 {
                continue;
            }
        }
        out.push(b);
    }
    out[code_at] = (out.len() - code_at) as u8;
    out.push(0);
    out
}

/// Replaces the CRC trailer of `body` with the right one for its data.
fn with_crc(mut data: Vec<u8>) -> Vec<u8> {
    data.extend_from_slice(&CRC.checksum(&data).to_le_bytes());
    data
}

fn extremes() -> ReadingV1 {
    let vals = [
        Value::F32(f32::MAX),
        Value::F32(-0.0),
        Value::F32(f32::MIN_POSITIVE / 2.0),
        Value::F32(1e-45),
        Value::F32(-3.4e38),
        Value::I32(i32::MIN),
        Value::I32(i32::MAX),
        Value::Bool(false),
    ];
    let chans: Vec<(u8, Value)> =
        (0..16).map(|i| (if i == 15 { 255 } else { i as u8 }, vals[i % vals.len()])).collect();
    reading(u32::MAX, &chans)
}

fn cobs(dir: &Path) {
    let sim = render(BIN, 0..3);
    write(dir, "sim-whole", &framed([0, 0], &sim));
    write(dir, "sim-chunked", &framed([3, 5], &render(BIN, 1000..1003)));
    let mut vec_stream = vec![0];
    for v in vectors() {
        vec_stream.extend_from_slice(&v);
    }
    write(dir, "wire-vectors-bytewise", &framed([1, 0], &vec_stream));
    write(dir, "extremes", &framed([0, 0], &frame(&extremes())));
    let nan = reading(7, &[(1, Value::F32(f32::NAN)), (9, Value::F32(f32::INFINITY))]);
    let dup = reading(8, &[(2, Value::I32(1)), (2, Value::I32(2))]);
    let mut bad = frame(&nan);
    bad.extend_from_slice(&frame(&dup));
    // Bad CRC, version 2 with a good CRC, trailing bytes with a good CRC, bad COBS.
    let mut b = body(&frame(&reading(3, &[(0, Value::F32(21.5))])));
    b[2] ^= 0x40;
    bad.extend_from_slice(&cobs_encode(&b));
    let mut v2 = body(&vectors()[0]);
    v2.truncate(v2.len() - 4);
    v2[0] = 2;
    bad.extend_from_slice(&cobs_encode(&with_crc(v2)));
    let mut trailing = body(&vectors()[1]);
    trailing.truncate(trailing.len() - 4);
    trailing.push(0);
    bad.extend_from_slice(&cobs_encode(&with_crc(trailing)));
    bad.extend_from_slice(&[9, 1, 0, 5, 1, 0]);
    write(dir, "rejects", &framed([4, 17], &bad));
    // An endless frame, then a good one (default max_frame is 125 for cobs).
    let mut over = vec![0x01; 300];
    over.push(0);
    over.extend_from_slice(&vectors()[2]);
    write(dir, "oversize", &framed([64, 3], &over));
    write(dir, "garbage", &framed([9, 99], b"\x00\x00\xff\x01\x02\x00garbage\x00\x03\x00"));
}

fn wire(dir: &Path) {
    for (i, v) in vectors().iter().enumerate() {
        write(dir, &format!("vector-{i}"), &body(v));
    }
    write(dir, "sim", &body(&render(BIN, 42..43)));
    write(dir, "extremes", &body(&frame(&extremes())));
    write(dir, "nan-dup", &body(&frame(&reading(9, &[(1, Value::F32(f32::NAN)), (1, Value::Bool(true))]))));
    // Postcard bytes without the CRC: the target appends a correct one.
    let mut raw = body(&vectors()[2]);
    raw.truncate(raw.len() - 4);
    write(dir, "postcard-no-crc", &raw);
    write(dir, "too-short", &[1, 0, 0, 0]);
    let mut bad = body(&vectors()[1]);
    bad[1] ^= 1;
    write(dir, "bad-crc", &bad);
}

fn config(dir: &Path) {
    let example = include_str!("../../config/sensorgate.example.toml");
    write(dir, "example.toml", example.as_bytes());
    let minimal = "[gateway]\nid = \"gw\"\n[[device]]\nname = \"a\"\npath = \"/dev/ttyUSB0\"\nframing = \"lines\"\n";
    write(dir, "minimal.toml", minimal.as_bytes());
    write(
        dir,
        "cobs-channels.toml",
        b"[gateway]\nid = \"gw\"\n[queue]\nmax_bytes = 65536\nmax_age = \"1h\"\n[[device]]\nname = \"soil\"\n\
          path = \"/dev/x\"\nframing = \"cobs\"\nmax_frame = \"1KiB\"\n[[device.channel]]\nid = 0\nname = \"t\"\n\
          unit = \"\xc2\xb0C\"\n[[device.channel]]\nid = 255\nname = \"ch1\"\n",
    );
    write(
        dir,
        "unknown-key.toml",
        minimal.replace("framing = \"lines\"", "framing = \"lines\"\nbaudrate = 9600").as_bytes(),
    );
    write(
        dir,
        "bad-duration-utf8.toml",
        minimal.replace("name = \"a\"", "name = \"\u{e9}\u{1f600}\"\nidle_timeout = \"3 parsecs\"").as_bytes(),
    );
    write(
        dir,
        "semantic-problems.toml",
        b"[gateway]\nid = \"green/house\"\n[mqtt]\nqos = 2\nport = 0\ntopic_prefix = \"/a//b\"\n[log]\nfilter = \"[{\"\n\
          [[device]]\nname = \"a\"\npath = \"/dev/ttyUSB0\"\nframing = \"cobs\"\nformat = \"kv\"\nmax_frame = 8\n\
          [[device]]\nname = \"a\"\npath = \"/dev/ttyUSB0\"\nframing = \"lines\"\nbaud = 0\n\
          [[device.channel]]\nid = 1\nname = \"_gw\"\n[[device.entity]]\nfield = \"\"\nstate_class = \"x\"\n",
    );
    write(dir, "syntax-error.toml", b"[gateway\nid = \"gw\n\xe2\x82\xac = 1\n");
    write(dir, "wrong-types.toml", b"gateway = 1\n[[device]]\nname = 5\nmax_frame = -1\n");
    write(dir, "not-utf8.toml", b"[gateway]\nid = \"\xff\xfe\"\n");
}
