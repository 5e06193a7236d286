//! COBS frames terminated by 0x00. No I/O, no async, no allocation per frame.

use super::Splitter;
use crate::reject::Reject;

/// COBS framer: yields decoded frame bodies. Empty frames (a lone 0x00, which senders use to
/// resynchronise the receiver) are not frames and are not counted.
#[derive(Debug)]
pub struct CobsFramer {
    split: Splitter,
    scratch: Vec<u8>,
}

impl CobsFramer {
    /// `max` is the longest encoded frame accepted, without the delimiter.
    pub fn new(max: usize) -> Self {
        Self { split: Splitter::new(0, max), scratch: vec![0; max] }
    }

    /// Part of a frame is held.
    pub fn has_partial(&self) -> bool {
        self.split.has_partial()
    }

    pub fn push(&mut self, chunk: &[u8], mut on_frame: impl FnMut(Result<&[u8], Reject>)) {
        let scratch = &mut self.scratch;
        self.split.push(chunk, |frame| match frame {
            Ok([]) => {}
            Ok(encoded) => match cobs::decode(encoded, scratch) {
                Ok(n) => on_frame(Ok(&scratch[..n])),
                Err(_) => on_frame(Err(Reject::BadCobs)),
            },
            Err(e) => on_frame(Err(e)),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_frames_and_rejects_bad_cobs() {
        let mut f = CobsFramer::new(32);
        let mut enc = [0u8; 16];
        let n = cobs::encode(&[1, 0, 2], &mut enc);
        let mut stream = vec![0u8];
        stream.extend_from_slice(&enc[..n]);
        stream.push(0);
        // A code byte pointing past the end of the frame.
        stream.extend_from_slice(&[9, 1, 0]);
        let mut out = Vec::new();
        f.push(&stream, |fr| out.push(fr.map(<[u8]>::to_vec)));
        assert_eq!(out, vec![Ok(vec![1, 0, 2]), Err(Reject::BadCobs)]);
    }
}
