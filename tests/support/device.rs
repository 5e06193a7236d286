//! One device as the gateway runs it, with a queue of its own: the stream input its decode
//! thread feeds and the reading sink every input ends in. Shared by tests/chunking_props.rs
//! and the fuzz targets (fuzz/src/lib.rs includes this file), so neither carries its own copy
//! of the decode loop.
// Each includer uses a part of it.
#![allow(dead_code)]

use std::sync::Arc;

use sensorgate::config::{DeviceConfig, StreamConfig};
use sensorgate::device::{default_decoders, DeviceRuntime};
use sensorgate::input::ReadingSink;
use sensorgate::queue::{Outbound, ReadingQueue};
use sensorgate::reading::PacketLimit;
use sensorgate::reject::Reject;

pub struct TestDevice {
    runtime: DeviceRuntime,
    stream: StreamConfig,
    queue: Arc<ReadingQueue>,
}

impl TestDevice {
    /// No bound is reached: the queue and the packet limit take everything.
    pub fn new(dev: &DeviceConfig) -> Self {
        let queue = Arc::new(ReadingQueue::new(1, usize::MAX, usize::MAX, None, 1));
        let stream = dev.stream().expect("a stream device").clone();
        Self { runtime: DeviceRuntime::new(0, dev.clone(), String::new(), PacketLimit::new(usize::MAX)), stream, queue }
    }

    /// The device's reading sink.
    pub fn sink(&self) -> ReadingSink {
        self.runtime.sink(&self.queue)
    }

    /// Feeds `chunks`, each received at `received_at_us`, through the device's stream input
    /// (the production decoders), then ends the stream. Per framer output, in order: the
    /// payload queued, or why there is none.
    pub fn stream<'a>(
        &self,
        chunks: impl IntoIterator<Item = &'a [u8]>,
        received_at_us: u64,
    ) -> Vec<Result<Vec<u8>, Reject>> {
        let mut input = self.runtime.stream_input(&self.stream, &self.queue, &default_decoders());
        let mut outcomes = Vec::new();
        for c in chunks {
            input.push(c, received_at_us, |o| outcomes.push(o));
        }
        input.end();
        outcomes.into_iter().map(|o| o.map(|()| self.pop())).collect()
    }

    /// The oldest payload in the queue.
    pub fn pop(&self) -> Vec<u8> {
        match self.queue.pop_next() {
            Some(Outbound::Reading { payload, .. }) => payload.to_vec(),
            other => panic!("expected a queued reading, got {other:?}"),
        }
    }
}
