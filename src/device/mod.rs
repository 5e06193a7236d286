//! One serial device: its supervisor task and its session (owns the port, decodes what it
//! reads), which run on an input thread, and the decode thread a slow decoder is moved to.

mod bus;
mod pool;
mod port;
mod query;
mod recording;
mod session;
mod supervisor;
mod termios;
mod worker;

pub use self::bus::{supervise_bus, BusContext, WriteJob, STALE_AFTER};
pub use self::port::{Port, PortOpener, SerialOpener, SerialPort};
pub use self::query::WriteError;
pub use self::recording::Recorder;

/// Writes (the `write` command) waiting for one bus; more are refused at once.
pub const WRITES_WAITING: usize = 8;
pub use self::pool::InputPool;
pub use self::session::SessionEnd;
pub use self::supervisor::{supervise, SupervisorContext};

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::Serialize;

use crate::config::{DeviceConfig, StreamConfig};
use crate::decode::Decode;
use crate::input::{ReadingSink, SinkTarget, StreamInput};
use crate::queue::{Control, ReadingQueue};
use crate::reading::PacketLimit;
use crate::telemetry::DeviceCounters;

/// Makes the decoder of a stream device (by name, with its stream settings); the seam where
/// tests put a slow or panicking one.
pub type DecoderFactory = Arc<dyn Fn(&str, &StreamConfig) -> Box<dyn Decode> + Send + Sync>;

/// The production decoders.
pub fn default_decoders() -> DecoderFactory {
    Arc::new(|_: &str, stream: &StreamConfig| stream.decoder())
}

/// Supervisor states (contract: the `state` field of the device state topic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Opening the port.
    Opening,
    /// Port open, reading.
    Up,
    /// No bytes for `idle_timeout`; the port was reopened and is waiting for data.
    Stale,
    /// The session ended (EOF, I/O error, a failed or timed-out write, decoder panic); waiting
    /// before reopening.
    Backoff,
    /// The port cannot be opened (missing, busy, timed out); retrying with backoff.
    Failed,
    /// Stopped for good (shutdown).
    Stopped,
}

/// What the device state topic carries.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub state: State,
    /// RFC 3339 time of the last state change.
    pub since: String,
    pub restarts: u64,
    pub last_error: Option<String>,
}

/// Shared facts about one device: config, counters, current status. A reload that changes a
/// device's config replaces its runtime but hands over the counters and status, so metrics
/// stay monotonic.
pub struct DeviceRuntime {
    /// The device's lane in the queue.
    pub index: usize,
    pub config: DeviceConfig,
    pub counters: Arc<DeviceCounters>,
    /// `mqtt.max_packet_size` for this device's readings (shared; a reload changes it).
    pub packet_limit: PacketLimit,
    state_topic: String,
    status: Arc<Mutex<Status>>,
    /// Asks the supervisor to close and reopen the port now (the `restart_device` command).
    pub restart: tokio::sync::Notify,
    /// A Modbus slave's bus, which takes its writes (the `write` command).
    pub writes: Option<tokio::sync::mpsc::Sender<WriteJob>>,
    /// Its decoder once took longer than `session::SLOW_DECODE` over a read: from then on it
    /// decodes on a thread of its own, not on the input thread it shares.
    pub decodes_alone: std::sync::atomic::AtomicBool,
    /// The other outputs' queues (Sparkplug) and the device's lane in each.
    pub also: crate::input::OtherOutputs,
    /// The `record` command's recording of this device's port (kept across reloads).
    pub recorder: Arc<Recorder>,
}

impl DeviceRuntime {
    pub fn new(index: usize, config: DeviceConfig, state_topic: String, packet_limit: PacketLimit) -> Self {
        let status = Status { state: State::Opening, since: now_rfc3339(), restarts: 0, last_error: None };
        Self {
            index,
            config,
            counters: Arc::default(),
            packet_limit,
            state_topic,
            status: Arc::new(Mutex::new(status)),
            restart: tokio::sync::Notify::new(),
            writes: None,
            decodes_alone: Default::default(),
            also: Arc::default(),
            recorder: Arc::default(),
        }
    }

    /// The same runtime, its readings also going to `also` (other outputs' queues and lanes).
    pub fn with_outputs(self, also: crate::input::OtherOutputs) -> Self {
        Self { also, ..self }
    }

    /// The same runtime, its writes going to `writes` (a Modbus slave's bus).
    pub fn with_writes(self, writes: Option<tokio::sync::mpsc::Sender<WriteJob>>) -> Self {
        Self { writes, ..self }
    }

    /// The runtime for a new config of the same device, keeping counters and status.
    pub fn with_config(&self, config: DeviceConfig) -> Self {
        Self {
            index: self.index,
            config,
            counters: Arc::clone(&self.counters),
            packet_limit: self.packet_limit.clone(),
            state_topic: self.state_topic.clone(),
            status: Arc::clone(&self.status),
            restart: tokio::sync::Notify::new(),
            writes: None,
            decodes_alone: Default::default(),
            also: Arc::clone(&self.also),
            recorder: Arc::clone(&self.recorder),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Where this device's readings go (its config mapped onto the sans-IO sink).
    pub fn sink(&self, queue: &Arc<ReadingQueue>) -> ReadingSink {
        let to = SinkTarget {
            queue: Arc::clone(queue),
            lane: self.index,
            counters: Arc::clone(&self.counters),
            packet_limit: self.packet_limit.clone(),
            also: Arc::clone(&self.also),
        };
        ReadingSink::new(self.name(), self.config.channels(), to)
    }

    /// The sans-IO input of this device's `stream`: its framer, a decoder from `decoders`,
    /// its sink.
    pub fn stream_input(
        &self,
        stream: &StreamConfig,
        queue: &Arc<ReadingQueue>,
        decoders: &DecoderFactory,
    ) -> StreamInput {
        let (decoders, name, settings) = (Arc::clone(decoders), self.name().to_string(), stream.clone());
        StreamInput::new(stream.framer(), Box::new(move || decoders(&name, &settings)), self.sink(queue))
    }

    /// Checks a write of `value` to `point` against this Modbus slave's config (a clear
    /// refusal at once) and hands it to its bus, which writes between polls and must start
    /// within `start_within`. The receiver gets the slave's answer. The `write` command and
    /// Sparkplug DCMD both come through here.
    ///
    /// # Errors
    /// Not a Modbus slave, not a writable point, a value the point cannot take, or a bus that
    /// is not running or has 8 writes waiting.
    pub fn request_write(
        &self,
        point: &str,
        value: &serde_json::Value,
        start_within: std::time::Duration,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, WriteRefused> {
        let device = self.name();
        let crate::config::Input::Modbus(slave) = &self.config.input else {
            return Err(WriteRefused::BadRequest(format!(
                "{device:?} is not a Modbus slave; only points of [[bus.device]] can be written"
            )));
        };
        slave.write_of(point, value).map_err(WriteRefused::BadRequest)?;
        let (done, result) = tokio::sync::oneshot::channel();
        let job = WriteJob {
            device: device.to_string(),
            point: point.to_string(),
            value: value.clone(),
            start_by: tokio::time::Instant::now() + start_within,
            done,
        };
        if self.writes.as_ref().is_none_or(|tx| tx.try_send(job).is_err()) {
            return Err(WriteRefused::BusBusy);
        }
        Ok(result)
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Records a state change and queues the retained state message.
    pub fn set_state(&self, queue: &ReadingQueue, state: State, error: Option<String>) {
        {
            let mut s = self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            s.state = state;
            s.since = now_rfc3339();
            s.restarts = self.counters.restarts.load(std::sync::atomic::Ordering::Relaxed);
            if error.is_some() {
                s.last_error = error;
            }
            // Queued under the status lock, like `republish_state`: a snapshot taken for a
            // reconnect can then never be queued after (and so replace) a newer state.
            queue.push_control(self.state_message(&s));
        }
        tracing::info!(device = self.name(), state = ?state, "Device state changed.");
    }

    /// Queues the current state again (after a reconnect: the broker may have lost it).
    pub fn republish_state(&self, queue: &ReadingQueue) {
        let s = self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        queue.push_control(self.state_message(&s));
    }

    /// The retained state message for `status`.
    fn state_message(&self, status: &Status) -> Control {
        let payload = serde_json::to_vec(status).expect("status serialises");
        Control { topic: self.state_topic.clone(), payload: Bytes::from(payload), retain: true, correlation: None }
    }
}

/// Why [`DeviceRuntime::request_write`] did not hand a write to the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteRefused {
    /// What is wrong with the request, for the one who made it.
    BadRequest(String),
    /// The bus is not running, or already has its writes waiting.
    BusBusy,
}

/// The devices currently configured, for the tasks that report on all of them.
#[derive(Default)]
pub struct Registry {
    devices: std::sync::RwLock<Vec<Arc<DeviceRuntime>>>,
}

impl Registry {
    /// The devices now, in config order.
    pub fn snapshot(&self) -> Vec<Arc<DeviceRuntime>> {
        self.devices.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Replaces the set (start-up and reloads).
    pub fn set(&self, devices: Vec<Arc<DeviceRuntime>>) {
        *self.devices.write().unwrap_or_else(std::sync::PoisonError::into_inner) = devices;
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// The message of a caught panic.
pub fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    crate::input::panic_message(&*panic)
}
