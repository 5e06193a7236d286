//! Splitting a byte stream into frames. Sans-IO: no I/O, no async, no allocation per frame.
//!
//! Both framings share one delimiter splitter with a hard cap: memory stays at `max_frame`
//! even when no delimiter ever arrives, and after an overflow everything up to the next
//! delimiter is discarded and counted once as [`Reject::Oversize`].

mod cobs;
mod lines;

pub use self::cobs::CobsFramer;
pub use self::lines::LinesFramer;

use serde::Deserialize;

use crate::decode::Format;
use crate::reject::Reject;

/// How a byte stream is cut into frames (`framing` in a device's config). The one table of
/// which formats each framing carries and what it defaults to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// `\n`-terminated text, `\r` stripped.
    Lines,
    /// COBS frames terminated by 0x00.
    Cobs,
}

impl Framing {
    pub const ALL: [Self; 2] = [Self::Lines, Self::Cobs];

    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Framing::Lines => "lines",
            Framing::Cobs => "cobs",
        }
    }

    /// The framing called `name` in the config file.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// The formats this framing carries, its default first.
    pub fn formats(self) -> &'static [Format] {
        match self {
            Framing::Lines => &[Format::Json, Format::Kv],
            Framing::Cobs => &[Format::Postcard],
        }
    }

    /// The format used when none is configured.
    pub fn default_format(self) -> Format {
        self.formats()[0]
    }

    /// Whether frames of this framing can hold `format`.
    pub fn carries(self, format: Format) -> bool {
        self.formats().contains(&format)
    }

    /// The framing that carries `format`.
    pub fn for_format(format: Format) -> Self {
        Self::ALL.into_iter().find(|f| f.carries(format)).expect("every format has a framing")
    }

    /// The frame cap used when none is configured: a long text line; a whole wire frame.
    pub fn default_max_frame(self) -> usize {
        match self {
            Framing::Lines => 1024,
            Framing::Cobs => sensorgate_wire::MAX_FRAME_LEN,
        }
    }
}

/// The framer a device uses.
#[derive(Debug)]
pub enum Framer {
    Lines(LinesFramer),
    Cobs(CobsFramer),
}

impl Framer {
    /// A framer for `framing` that holds frames of at most `max_frame` bytes.
    pub fn new(framing: Framing, max_frame: usize) -> Self {
        match framing {
            Framing::Lines => Framer::Lines(LinesFramer::new(max_frame)),
            Framing::Cobs => Framer::Cobs(CobsFramer::new(max_frame)),
        }
    }

    /// True while part of a frame is held (the session ending now would cut it off).
    pub fn has_partial(&self) -> bool {
        match self {
            Framer::Lines(f) => f.has_partial(),
            Framer::Cobs(f) => f.has_partial(),
        }
    }

    /// Feeds a chunk; calls `on_frame` for every complete frame or rejected one, in order.
    /// A partial frame at the end is kept for the next chunk.
    pub fn push(&mut self, chunk: &[u8], on_frame: impl FnMut(Result<&[u8], Reject>)) {
        match self {
            Framer::Lines(f) => f.push(chunk, on_frame),
            Framer::Cobs(f) => f.push(chunk, on_frame),
        }
    }
}

/// Splits at a delimiter byte, holding at most `max` bytes of an unfinished frame.
#[derive(Debug)]
pub(crate) struct Splitter {
    delim: u8,
    max: usize,
    buf: Vec<u8>,
    /// Inside an oversize frame: drop bytes until the next delimiter.
    discarding: bool,
}

impl Splitter {
    pub(crate) fn new(delim: u8, max: usize) -> Self {
        Self { delim, max, buf: Vec::with_capacity(max), discarding: false }
    }

    /// Yields every complete frame in `chunk` (possibly empty ones; the caller decides what
    /// an empty frame means). Frames wholly inside `chunk` are lent without copying.
    pub(crate) fn push(&mut self, mut chunk: &[u8], mut on_frame: impl FnMut(Result<&[u8], Reject>)) {
        while !chunk.is_empty() {
            let Some(i) = memchr::memchr(self.delim, chunk) else {
                if self.discarding {
                    return;
                }
                if self.buf.len() + chunk.len() > self.max {
                    // Count now, not at the delimiter: it may never come.
                    on_frame(Err(Reject::Oversize));
                    self.discarding = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
                return;
            };
            let part = &chunk[..i];
            chunk = &chunk[i + 1..];
            if self.discarding {
                // The tail of a frame already counted as oversize.
                self.discarding = false;
                continue;
            }
            if self.buf.is_empty() {
                on_frame(if part.len() > self.max { Err(Reject::Oversize) } else { Ok(part) });
            } else {
                if self.buf.len() + part.len() > self.max {
                    on_frame(Err(Reject::Oversize));
                } else {
                    self.buf.extend_from_slice(part);
                    on_frame(Ok(&self.buf));
                }
                self.buf.clear();
            }
        }
    }

    /// Bytes held for an unfinished frame.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Inside a frame: bytes held, or an oversize frame still being discarded (already counted).
    pub(crate) fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(s: &mut Splitter, chunk: &[u8]) -> Vec<Result<Vec<u8>, Reject>> {
        let mut out = Vec::new();
        s.push(chunk, |f| out.push(f.map(<[u8]>::to_vec)));
        out
    }

    #[test]
    fn frames_split_across_chunks_are_joined() {
        let mut s = Splitter::new(b'\n', 16);
        assert!(collect(&mut s, b"ab").is_empty());
        assert_eq!(collect(&mut s, b"c\nde\nf"), vec![Ok(b"abc".to_vec()), Ok(b"de".to_vec())]);
        assert_eq!(s.pending(), 1);
        assert_eq!(collect(&mut s, b"\n"), vec![Ok(b"f".to_vec())]);
    }

    #[test]
    fn memory_stays_bounded_without_a_delimiter() {
        let mut s = Splitter::new(b'\n', 8);
        let mut rejects = 0;
        for _ in 0..100_000 {
            s.push(b"xxxxxxxxxxxxxxxx", |f| {
                assert_eq!(f, Err(Reject::Oversize));
                rejects += 1;
            });
            assert!(s.pending() <= 8);
        }
        // One endless frame is one rejection, not one per chunk.
        assert_eq!(rejects, 1);
        assert!(s.buf.capacity() <= 8);
    }

    /// Regression guard for the gap in postcard's CobsAccumulator overflow path and vector's
    /// delimiter codec: after an overflow, the bytes up to the next delimiter belong to the
    /// oversize frame and must not surface as a frame of their own.
    #[test]
    fn after_overflow_discards_up_to_next_delimiter_then_resumes() {
        let mut s = Splitter::new(b'\n', 4);
        assert_eq!(collect(&mut s, b"123456"), vec![Err(Reject::Oversize)]);
        assert!(collect(&mut s, b"789").is_empty(), "tail of the oversize frame leaked as a frame");
        assert_eq!(collect(&mut s, b"0\nok\n"), vec![Ok(b"ok".to_vec())]);
    }

    #[test]
    fn oversize_frame_inside_one_chunk_is_counted_once() {
        let mut s = Splitter::new(b'\n', 4);
        assert_eq!(
            collect(&mut s, b"a\n123456789\nb\n"),
            vec![Ok(b"a".to_vec()), Err(Reject::Oversize), Ok(b"b".to_vec())]
        );
    }

    #[test]
    fn frame_exactly_at_the_cap_is_accepted_across_chunks() {
        let mut s = Splitter::new(b'\n', 4);
        assert!(collect(&mut s, b"12").is_empty());
        assert_eq!(collect(&mut s, b"34\n"), vec![Ok(b"1234".to_vec())]);
        assert!(collect(&mut s, b"123").is_empty());
        assert_eq!(collect(&mut s, b"45\nz\n"), vec![Err(Reject::Oversize), Ok(b"z".to_vec())]);
    }
}
