//! A stream input's sans-IO half: chunks of bytes in, frames cut, decoded and handed to the
//! device's [`ReadingSink`]. The device session feeds it (on its input thread, or a slow
//! decoder's own thread); the property
//! tests and fuzz targets feed it directly.

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::ReadingSink;
use crate::decode::Decode;
use crate::framing::Framer;
use crate::reject::Reject;

/// Makes a fresh decoder (after a panic the old one's state is suspect).
pub type NewDecoder = Box<dyn FnMut() -> Box<dyn Decode> + Send>;

pub struct StreamInput {
    framer: Framer,
    decoder: Box<dyn Decode>,
    new_decoder: NewDecoder,
    sink: ReadingSink,
    /// The message of the first decoder panic not yet taken.
    panic: Option<String>,
}

impl StreamInput {
    pub fn new(framer: Framer, mut new_decoder: NewDecoder, sink: ReadingSink) -> Self {
        Self { framer, decoder: new_decoder(), new_decoder, sink, panic: None }
    }

    /// Feeds one chunk read at `received_at_us`. Every frame it completes goes to the sink;
    /// `each` sees every frame's outcome in order (queued, or rejected and why). A decoder
    /// panic rejects its frame ([`Reject::DecoderPanic`]), is logged, and the rest of the
    /// bytes go to a fresh decoder; [`take_panic`](Self::take_panic) then tells the session.
    pub fn push(&mut self, chunk: &[u8], received_at_us: u64, mut each: impl FnMut(Result<(), Reject>)) {
        let Self { framer, decoder, new_decoder, sink, panic } = self;
        framer.push(chunk, |frame| {
            let frame = match frame {
                Ok(f) => f,
                Err(reason) => {
                    sink.reject(reason);
                    return each(Err(reason));
                }
            };
            let mut panicked = None;
            let outcome = sink.offer(frame.len(), received_at_us, |out| {
                catch_unwind(AssertUnwindSafe(|| decoder.decode(frame, out))).unwrap_or_else(|p| {
                    panicked = Some(panic_message(&*p));
                    Err(Reject::DecoderPanic)
                })
            });
            if let Some(msg) = panicked {
                tracing::error!(device = sink.device(), panic = %msg, "Decoder panicked; restarting the device session.");
                *decoder = new_decoder();
                panic.get_or_insert(msg);
            }
            each(outcome);
        });
        sink.flush_due();
    }

    /// The first decoder panic since the last call, if any.
    pub fn take_panic(&mut self) -> Option<String> {
        self.panic.take()
    }

    /// The stream is over: a frame begun will never be finished (counted as
    /// [`Reject::Truncated`]), held-back log lines are written.
    pub fn end(mut self) {
        if self.framer.has_partial() {
            self.sink.reject(Reject::Truncated);
        }
        self.sink.end();
    }
}

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
