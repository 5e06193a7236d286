//! `\n`-terminated text lines, `\r` stripped. No I/O, no async, no allocation per frame.

use super::Splitter;
use crate::reject::Reject;

/// Lines framer. Blank lines (keep-alives, `\r\n\r\n`) are not frames and are not counted.
#[derive(Debug)]
pub struct LinesFramer {
    split: Splitter,
    max: usize,
}

impl LinesFramer {
    /// `max` is the longest line accepted, without its terminator.
    pub fn new(max: usize) -> Self {
        // +1 so a line of exactly `max` bytes followed by `\r` still fits.
        Self { split: Splitter::new(b'\n', max + 1), max }
    }

    /// Part of a frame is held.
    pub fn has_partial(&self) -> bool {
        self.split.has_partial()
    }

    pub fn push(&mut self, chunk: &[u8], mut on_frame: impl FnMut(Result<&[u8], Reject>)) {
        let max = self.max;
        self.split.push(chunk, |frame| match frame {
            Ok(line) => {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.len() > max {
                    on_frame(Err(Reject::Oversize));
                } else if !line.iter().all(u8::is_ascii_whitespace) {
                    on_frame(Ok(line));
                }
            }
            Err(e) => on_frame(Err(e)),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_cr_and_skips_blank_lines() {
        let mut f = LinesFramer::new(64);
        let mut out = Vec::new();
        f.push(b"a=1\r\n\r\n  \nb=2\n", |l| out.push(l.map(<[u8]>::to_vec)));
        assert_eq!(out, vec![Ok(b"a=1".to_vec()), Ok(b"b=2".to_vec())]);
    }
}
