//! The decode thread of one device session: the stream input (framing, decoding, the
//! device's reading sink) fed with the session's chunks. Plain blocking code on its own
//! std::thread, so a slow or pathological decoder can only delay its own device, never a
//! tokio worker (and so never another device or the MQTT connection).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{DecoderFactory, DeviceRuntime};
use crate::config::StreamConfig;
use crate::queue::ReadingQueue;

/// A chunk read from the port and when it was read (µs since the epoch).
pub(crate) type Chunk = (Bytes, u64);

pub(crate) struct Worker {
    pub dev: Arc<DeviceRuntime>,
    pub stream: StreamConfig,
    pub queue: Arc<ReadingQueue>,
    pub decoders: DecoderFactory,
    /// Fired once, at the first decoder panic: the session then ends and is restarted.
    pub panicked: Option<oneshot::Sender<String>>,
}

impl Worker {
    /// Runs until the session drops its sender, then returns after the last chunk.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Chunk>) {
        let mut input = self.dev.stream_input(&self.stream, &self.queue, &self.decoders);
        while let Some((chunk, received_at_us)) = rx.blocking_recv() {
            input.push(&chunk, received_at_us, |_| {});
            if let Some(msg) = input.take_panic() {
                if let Some(tx) = self.panicked.take() {
                    let _ = tx.send(msg);
                }
            }
        }
        // The session is over; a frame begun on this port will never be finished.
        input.end();
    }
}
