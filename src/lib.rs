//! sensorgate: serial sensors → MQTT, small, bounded and supervised.
//!
//! ```text
//!  serial port ─► device supervisor (task per device, owns the SerialStream) on an input
//!                 thread ("input-<n>": one per core, a single-threaded runtime each; never
//!                 the runtime of the MQTT connection), read() under idle_timeout, then
//!                   │ framing (lines | cobs) → decode (json | kv | postcard) → ReadingSink
//!                   │ in the same task (a decoder that proves slow moves to "decode-<device>")
//!                   │ bad frame: counted by reason, logged, skipped
//!                   │ push(): synchronous, never blocks; one push per output, the same
//!                   │ Bytes each (outputs are a list: the main one, then Sparkplug B)
//!                   ▼
//!                 ReadingQueue per output (count + byte bound, drop-oldest, fair across
//!                   │ devices; with [spool], a spool thread per output)
//!                   │ pop_next()                 ▲ in-flight readings come back on disconnect
//!                   ▼                            │
//!                 MQTT connection task per output (owns the socket: batched writes, acks,
//!                                       pings, reconnects with backoff; rumqttc's codec only;
//!                                       a Profile decides what Sparkplug puts on the wire)
//!  metrics task: counters → metrics topic;  app::run: cancellation tree + task tracker
//! ```
//!
//! Layout:
//! - [`config`]: typed TOML config, validated as a whole; it maps TOML onto the types of the
//!   sans-IO modules, which never import it.
//! - [`framing`], [`decode`], [`reading`]: sans-IO frame splitting, decoding, payloads;
//!   [`payload`]: the reserved key and JSON string writing (a leaf).
//! - [`input`]: the `ReadingSink` every input ends in (fields → payload → checks → queue →
//!   counters) and the stream input (chunks → framer → decoder → sink). Sans-IO.
//! - [`queue`]: the one bounded queue and the in-flight ledger.
//! - [`device`]: supervisor and session of one serial device, the input threads they run on
//!   and the decode thread a slow decoder is moved to; the bus task
//!   that polls a Modbus RTU bus. [`modbus`]: its sans-IO half (points, plan, RTU, schedule).
//! - [`mqtt`]: the connection task (the only MQTT client code): codec, connect, session.
//! - [`telemetry`]: counters and log-and-count events; [`metrics`]: the metrics payload.
//! - [`commands`]: commands over MQTT ([`command`]: their names, a leaf).
//! - [`sparkplug`]: the Sparkplug B output, a second queue and connection the readings fan
//!   out to (its profile plugs into [`mqtt`]'s connection task).
//! - [`app`]: wiring and phased shutdown; [`simulate`]: simulated sensors and Modbus slaves;
//!   [`capture`]: the file format of `record` and `simulate --replay`; [`scan`]: the field
//!   tool that finds sensors on serial ports (with the framers and decoders above) and
//!   writes their config.
//! - [`status`]: `sensorgate status`, a reader of what a gateway publishes about itself (its
//!   own connection; rendering sans-IO).

pub mod app;
pub mod backoff;
pub mod capture;
pub mod command;
pub mod commands;
pub mod config;
pub mod decode;
pub mod device;
pub mod framing;
pub mod homeassistant;
pub mod input;
pub mod liveness;
pub mod metrics;
pub mod modbus;
pub mod mqtt;
pub mod payload;
pub mod queue;
pub mod reading;
pub mod reject;
pub mod scan;
pub mod simulate;
pub mod sparkplug;
pub mod spool;
pub mod status;
pub mod telemetry;
pub mod topics;
