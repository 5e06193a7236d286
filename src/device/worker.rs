//! The decode thread a device is moved to when its decoder proves slow (see `session.rs`):
//! the device's stream input (framing, decoding, the reading sink) fed with the session's
//! chunks. Plain blocking code on its own std::thread, so the slow decoder delays only its
//! own device, never the input thread it shared with others.

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::input::StreamInput;

/// A chunk read from the port and when it was read (µs since the epoch).
pub(crate) type Chunk = (Bytes, u64);

pub(crate) struct Worker {
    pub input: StreamInput,
    /// Fired once, at the first decoder panic: the session then ends and is restarted.
    pub panicked: Option<oneshot::Sender<String>>,
}

impl Worker {
    /// Runs until the session drops its sender, then returns after the last chunk.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Chunk>) {
        while let Some((chunk, received_at_us)) = rx.blocking_recv() {
            self.input.push(&chunk, received_at_us, |_| {});
            if let Some(msg) = self.input.take_panic() {
                if let Some(tx) = self.panicked.take() {
                    let _ = tx.send(msg);
                }
            }
        }
        // The session is over; a frame begun on this port will never be finished.
        self.input.end();
    }
}
