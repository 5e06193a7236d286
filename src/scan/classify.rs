//! What a port sent during one listen, classified. Sans-IO: bytes in, a verdict out. It runs
//! the gateway's own framers and decoders, so "recognised" means "the gateway would read it".

use bytes::BytesMut;
use serde::Serialize;

use crate::decode::{self, Decode, Format};
use crate::framing::{Framer, Framing};

/// Lines of unknown text kept as examples.
const SAMPLES: usize = 3;
/// Characters of an example line kept.
const SAMPLE_CHARS: usize = 80;
/// Fields remembered per port (a sensor with more is listed up to here).
const MAX_FIELDS: usize = 32;
/// Share of bytes that must be printable ASCII (or tab, CR, LF) for text of unknown shape.
const TEXT_SHARE: f64 = 0.9;

/// One field seen in the decoded readings, with its first value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Field {
    pub name: String,
    pub example: serde_json::Value,
}

/// What one listen heard.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Verdict {
    /// Frames the gateway reads: most complete frames decoded in this framing and format.
    Recognised {
        #[serde(serialize_with = "framing_name")]
        framing: Framing,
        #[serde(serialize_with = "format_name")]
        format: Format,
        /// Readings decoded.
        readings: u32,
        fields: Vec<Field>,
    },
    /// Printable text, but no format the gateway reads.
    Text { lines: u32, samples: Vec<String> },
    /// Not a byte.
    Silence,
    /// Bytes that are neither frames nor text: most often a sensor at another line speed.
    Noise { bytes: u64 },
}

impl Verdict {
    /// The listen found the port's line speed: what it heard is readable.
    pub fn is_readable(&self) -> bool {
        matches!(self, Verdict::Recognised { .. } | Verdict::Text { .. })
    }
}

fn framing_name<S: serde::Serializer>(f: &Framing, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(f.as_str())
}

fn format_name<S: serde::Serializer>(f: &Format, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(f.as_str())
}

/// One format tried on one framing's frames.
struct Trial {
    format: Format,
    decoder: Box<dyn Decode>,
    ok: u32,
    fields: Vec<Field>,
}

/// One framing's frames, and every format it carries tried on each.
struct Cut {
    framing: Framing,
    framer: Framer,
    /// Complete frames (and rejected ones) counted, not the first one if it was rejected.
    frames: u32,
    /// No frame ended yet: the first may be the tail of one sent before we listened.
    first: bool,
    trials: Vec<Trial>,
}

/// Feeds every byte to each framing the gateway has (the one table in `framing`), and each
/// frame to every format that framing carries.
pub struct Classifier {
    bytes: u64,
    printable: u64,
    cuts: Vec<Cut>,
    /// Complete text lines of unknown shape, counted, and the first few kept.
    text_lines: u32,
    samples: Vec<String>,
    line: Vec<u8>,
    first_line: bool,
    out: BytesMut,
}

impl Default for Classifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Classifier {
    pub fn new() -> Self {
        let cuts = Framing::ALL
            .into_iter()
            .map(|framing| Cut {
                framing,
                framer: Framer::new(framing, framing.default_max_frame()),
                frames: 0,
                first: true,
                trials: framing
                    .formats()
                    .iter()
                    .map(|&format| Trial {
                        format,
                        decoder: decode::for_format(format, &[]),
                        ok: 0,
                        fields: Vec::new(),
                    })
                    .collect(),
            })
            .collect();
        Self {
            bytes: 0,
            printable: 0,
            cuts,
            text_lines: 0,
            samples: Vec::new(),
            line: Vec::new(),
            first_line: true,
            out: BytesMut::new(),
        }
    }

    /// Bytes fed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Feeds a chunk as read.
    pub fn push(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        self.printable += chunk.iter().filter(|&&b| is_printable(b)).count() as u64;
        let out = &mut self.out;
        for cut in &mut self.cuts {
            let Cut { framer, frames, first, trials, .. } = cut;
            framer.push(chunk, |frame| {
                let was_first = std::mem::replace(first, false);
                let Ok(frame) = frame else {
                    if !was_first {
                        *frames += 1;
                    }
                    return;
                };
                let mut decoded = false;
                for t in trials.iter_mut() {
                    out.clear();
                    if t.decoder.decode(frame, out).is_ok() {
                        decoded = true;
                        t.ok += 1;
                        note_fields(&mut t.fields, out);
                    }
                }
                // A cut-off first frame does not count against the format; a whole one does.
                if decoded || !was_first {
                    *frames += 1;
                }
            });
        }
        self.collect_text(chunk);
    }

    fn collect_text(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if b != b'\n' {
                if self.line.len() < SAMPLE_CHARS * 4 {
                    self.line.push(b);
                }
                continue;
            }
            let first = std::mem::replace(&mut self.first_line, false);
            let line = std::mem::take(&mut self.line);
            let Ok(text) = std::str::from_utf8(&line) else { continue };
            let text = text.trim_end_matches('\r');
            if text.trim().is_empty() || text.chars().any(|c| c.is_control() && c != '\t') {
                continue;
            }
            self.text_lines += 1;
            if self.samples.len() < SAMPLES && !first {
                self.samples.push(text.chars().take(SAMPLE_CHARS).collect());
            }
        }
    }

    /// What was heard.
    pub fn verdict(&self) -> Verdict {
        if self.bytes == 0 {
            return Verdict::Silence;
        }
        let best = self
            .cuts
            .iter()
            .flat_map(|c| c.trials.iter().map(move |t| (c, t)))
            .filter(|(c, t)| t.ok > 0 && t.ok * 2 > c.frames)
            .max_by_key(|(_, t)| t.ok);
        if let Some((cut, trial)) = best {
            return Verdict::Recognised {
                framing: cut.framing,
                format: trial.format,
                readings: trial.ok,
                fields: trial.fields.clone(),
            };
        }
        if self.printable as f64 >= self.bytes as f64 * TEXT_SHARE {
            let mut samples = self.samples.clone();
            if samples.is_empty() {
                // A single line, or the start of one: still worth showing.
                if let Ok(text) = std::str::from_utf8(&self.line) {
                    samples.push(text.trim_end_matches('\r').chars().take(SAMPLE_CHARS).collect());
                }
            }
            return Verdict::Text { lines: self.text_lines, samples };
        }
        Verdict::Noise { bytes: self.bytes }
    }
}

fn is_printable(b: u8) -> bool {
    (0x20..0x7f).contains(&b) || matches!(b, b'\t' | b'\r' | b'\n')
}

/// Remembers the names (and first values) of the members a decoder wrote.
fn note_fields(fields: &mut Vec<Field>, members: &[u8]) {
    let mut object = Vec::with_capacity(members.len() + 2);
    object.push(b'{');
    object.extend_from_slice(members);
    object.push(b'}');
    // Decoders write valid JSON members; a failure here would be their bug, not the sensor's.
    let Ok(map) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&object) else { return };
    for (name, example) in map {
        if fields.len() < MAX_FIELDS && !fields.iter().any(|f| f.name == name) {
            fields.push(Field { name, example });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::SimSpec;

    fn classify(chunks: &[&[u8]]) -> Verdict {
        let mut c = Classifier::new();
        for chunk in chunks {
            c.push(chunk);
        }
        c.verdict()
    }

    fn names(v: &Verdict) -> Vec<&str> {
        match v {
            Verdict::Recognised { fields, .. } => fields.iter().map(|f| f.name.as_str()).collect(),
            other => panic!("not recognised: {other:?}"),
        }
    }

    fn rendered(format: Format, n: std::ops::Range<u64>) -> Vec<u8> {
        let spec = SimSpec { framing: Framing::for_format(format), format };
        let mut out = Vec::new();
        for i in n {
            spec.render(i, 1_700_000_000_000_000, &mut out);
        }
        out
    }

    #[test]
    fn json_lines_cut_mid_line_are_recognised() {
        let bytes = rendered(Format::Json, 0..4);
        // Listening began in the middle of the first line.
        let v = classify(&[&bytes[10..40], &bytes[40..]]);
        assert!(
            matches!(v, Verdict::Recognised { framing: Framing::Lines, format: Format::Json, readings: 3, .. }),
            "{v:?}"
        );
        assert_eq!(names(&v), ["hum", "n", "sent_us", "temp"]);
    }

    #[test]
    fn key_value_lines() {
        let v = classify(&[b"t=21.5 rh=40\r\n", b"t=21.6 rh=41\r\nt=2"]);
        assert!(matches!(v, Verdict::Recognised { format: Format::Kv, readings: 2, .. }), "{v:?}");
        let Verdict::Recognised { fields, .. } = &v else { unreachable!() };
        assert_eq!(fields[0], Field { name: "rh".into(), example: serde_json::json!(40) });
    }

    #[test]
    fn cobs_postcard_frames_with_their_channels() {
        let bytes = rendered(Format::Postcard, 5..9);
        let v = classify(&[&bytes]);
        assert!(
            matches!(v, Verdict::Recognised { framing: Framing::Cobs, format: Format::Postcard, readings: 4, .. }),
            "{v:?}"
        );
        let Verdict::Recognised { fields, .. } = &v else { unreachable!() };
        assert_eq!(fields[0], Field { name: "ch0".into(), example: serde_json::json!(20.5) });
        assert_eq!(fields[2], Field { name: "ch2".into(), example: serde_json::json!(5) });
    }

    #[test]
    fn a_frame_with_a_bad_crc_is_not_a_reading() {
        let mut bytes = rendered(Format::Postcard, 0..1);
        bytes[4] ^= 0x10;
        assert_eq!(classify(&[&[0], &bytes]), Verdict::Noise { bytes: bytes.len() as u64 + 1 });
    }

    #[test]
    fn text_of_unknown_shape() {
        let v = classify(&[b"garbage\nHello from sensor v1.2\nT: 21.5 C\nready\n"]);
        assert_eq!(
            v,
            Verdict::Text {
                lines: 4,
                samples: vec!["Hello from sensor v1.2".into(), "T: 21.5 C".into(), "ready".into()]
            }
        );
    }

    #[test]
    fn silence_and_noise() {
        assert_eq!(classify(&[]), Verdict::Silence);
        // What a 9600 baud sensor looks like at 115200: high bytes, framing errors.
        let noise: Vec<u8> = (0..200u32).map(|i| 0x80 | (i * 37 % 128) as u8).collect();
        assert_eq!(classify(&[&noise]), Verdict::Noise { bytes: 200 });
        // A few valid lines drowned in broken ones are not a format.
        let mut mixed = b"x\n".to_vec();
        for _ in 0..3 {
            mixed.extend_from_slice(b"\xfe\xff{\x80\n");
        }
        mixed.extend_from_slice(b"{\"a\":1}\n");
        assert_eq!(classify(&[&mixed]), Verdict::Noise { bytes: mixed.len() as u64 });
    }

    #[test]
    fn noise_before_the_first_line_does_not_hide_the_format() {
        let mut bytes = vec![0xf0, 0x83, 0xfe];
        bytes.extend_from_slice(&rendered(Format::Json, 0..2));
        let v = classify(&[&bytes]);
        assert!(matches!(v, Verdict::Recognised { format: Format::Json, readings: 1, .. }), "{v:?}");
    }
}
