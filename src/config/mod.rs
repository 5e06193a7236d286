//! Typed configuration: the schema (TOML → structs). Units are parsed in `units.rs`, the
//! whole is checked in `validate.rs`, files are read and errors located in `load.rs`.
//! Sans-IO modules never import this one: each owns its enums, and this schema maps TOML onto them.

mod bus;
mod load;
mod units;
mod validate;

pub use self::bus::{BusConfig, SlaveConfig};
pub use self::load::{ConfigError, Problem};

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use self::units::{de_duration, de_opt_duration, de_opt_size, de_size};
use crate::command::Command;
use crate::decode::{Channel, Decode, Format};
use crate::framing::{Framer, Framing};

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub sparkplug: SparkplugConfig,
    #[serde(default)]
    pub homeassistant: HomeAssistantConfig,
    #[serde(default)]
    pub commands: CommandsConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// `[[device]]` tables: stream devices (a config needs a device or a bus).
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    /// `[[bus]]` tables: Modbus RTU buses and their slaves.
    #[serde(default, rename = "bus")]
    pub buses: Vec<BusConfig>,
    /// The file as written, for the `config` command (secrets redacted there).
    #[serde(skip)]
    pub source: Option<toml::Table>,
}

/// Home Assistant MQTT discovery (device-based, Home Assistant 2024.11 or newer).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeAssistantConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "d_discovery_prefix")]
    pub discovery_prefix: String,
    /// Sensor values with no reading for this long become unavailable in Home Assistant.
    #[serde(default = "d_expire_after", deserialize_with = "de_duration")]
    pub expire_after: Duration,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        Self { enabled: false, discovery_prefix: d_discovery_prefix(), expire_after: d_expire_after() }
    }
}

/// Logging (to stderr; the journal under systemd).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `RUST_LOG`-style filter, e.g. "info" or "info,sensorgate::mqtt=debug"; `RUST_LOG`
    /// overrides it. Read at start (a reload does not change it).
    #[serde(default = "d_log_filter")]
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { filter: d_log_filter() }
    }
}

fn d_log_filter() -> String {
    "info".into()
}

/// Commands over MQTT (`<prefix>/<gateway>/cmd/<name>`); off unless enabled. Whoever may
/// publish to `cmd/#` may run the allowed commands: see README "Commands: the trust model".
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsConfig {
    #[serde(default)]
    pub enabled: bool,
    /// The commands that may run, by name; default: every command. Names are checked at load.
    pub allow: Option<Vec<String>>,
}

impl CommandsConfig {
    /// The commands that may run: none when commands are off. Unknown names in `allow` are a
    /// config problem (see [`Config::validate`]), so they never get here.
    pub fn allowed(&self) -> Vec<Command> {
        match (&self.allow, self.enabled) {
            (_, false) => Vec::new(),
            (None, true) => Command::ALL.into_iter().filter(|c| c.on_by_default()).collect(),
            (Some(names), true) => Command::ALL.into_iter().filter(|c| names.iter().any(|n| n == c.as_str())).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Used in every topic and in the default MQTT client id.
    pub id: String,
    /// How often the metrics topic is published.
    #[serde(default = "d_metrics_interval", deserialize_with = "de_duration")]
    pub metrics_interval: Duration,
    /// How long shutdown may take to drain the queue before the rest is reported lost (or
    /// written to the spool, when there is one).
    #[serde(default = "d_shutdown_timeout", deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
    /// Persistent state (the spool's default home). Default: `$STATE_DIRECTORY` when set (the
    /// systemd unit's `StateDirectory=`), else `/var/lib/sensorgate`.
    pub state_dir: Option<PathBuf>,
}

impl GatewayConfig {
    /// `state_dir`, or its default.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| {
            std::env::var_os("STATE_DIRECTORY")
                // systemd may list several, separated by ':'; ours is the first.
                .and_then(|v| v.to_str().and_then(|s| s.split(':').next()).map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from("/var/lib/sensorgate"))
        })
    }
}

/// `[spool]`: store and forward on disk (see [`crate::spool`]). Without `dir`, memory only.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Relative to `gateway.state_dir`.
    pub dir: Option<PathBuf>,
    /// Bound on disk; the oldest readings of the device holding the most are dropped beyond it.
    #[serde(default = "d_spool_max_bytes", deserialize_with = "de_size")]
    pub max_bytes: u64,
    /// The most a power cut may lose of what reached the spool: one fsync per interval at most.
    #[serde(default = "d_sync_interval", deserialize_with = "de_duration")]
    pub sync_interval: Duration,
    /// Where replayed readings go.
    #[serde(default)]
    pub replay_topic: ReplayTopic,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_bytes: d_spool_max_bytes(),
            sync_interval: d_sync_interval(),
            replay_topic: ReplayTopic::default(),
        }
    }
}

impl SpoolConfig {
    /// The spool directory, when there is one (`dir` under `state_dir` when relative).
    pub fn path(&self, gateway: &GatewayConfig) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| gateway.state_dir().join(d))
    }

    /// `replay_topic = "readings"`: one ordered stream per device.
    pub fn one_stream(&self) -> bool {
        self.replay_topic == ReplayTopic::Readings
    }
}

/// `[sparkplug]`: a second output, Sparkplug B 3.0, on its own connection (see
/// [`crate::sparkplug`]).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparkplugConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub group_id: String,
    /// Default: `gateway.id`.
    pub edge_node_id: Option<String>,
    /// Births and data only while `spBv1.0/STATE/<primary_host_id>` says online.
    pub primary_host_id: Option<String>,
    /// `[sparkplug.mqtt]`: what differs from `[mqtt]` for the Sparkplug broker.
    #[serde(default)]
    pub mqtt: SparkplugMqtt,
}

/// `[sparkplug.mqtt]`: each key present replaces `[mqtt]`'s.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparkplugMqtt {
    pub host: Option<String>,
    pub port: Option<u16>,
    /// Default: `<mqtt client id>-sparkplug`.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub tls: Option<TlsConfig>,
}

impl SparkplugConfig {
    /// The edge node id: `edge_node_id`, or the gateway's id.
    pub fn edge_node(&self, gateway: &GatewayConfig) -> String {
        self.edge_node_id.clone().unwrap_or_else(|| gateway.id.clone())
    }
}

impl Config {
    /// The Sparkplug connection's settings: `[mqtt]` with `[sparkplug.mqtt]` over it, QoS 0
    /// (Sparkplug's rule for everything but the will).
    pub fn sparkplug_mqtt(&self) -> Config {
        let o = &self.sparkplug.mqtt;
        let mut c = self.clone();
        let m = &mut c.mqtt;
        m.host = o.host.clone().unwrap_or_else(|| m.host.clone());
        m.port = o.port.unwrap_or(m.port);
        m.client_id = Some(o.client_id.clone().unwrap_or_else(|| format!("{}-sparkplug", self.client_id())));
        if o.username.is_some() {
            m.username = o.username.clone();
            m.password_file = o.password_file.clone();
        }
        if o.tls.is_some() {
            m.tls = o.tls.clone();
        }
        m.qos = 0;
        c
    }
}

/// `[spool] replay_topic`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayTopic {
    /// `<prefix>/<gw>/devices/<dev>/backlog`, while live readings go on at once.
    #[default]
    Backlog,
    /// The readings topic: one ordered stream per device, backlog first, then live.
    Readings,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    #[serde(default = "d_host")]
    pub host: String,
    #[serde(default = "d_port")]
    pub port: u16,
    /// 0 or 1. QoS 2 costs two extra round trips per reading and buys nothing here: the queue
    /// already republishes un-acked readings, and consumers must tolerate duplicates anyway.
    #[serde(default = "d_qos")]
    pub qos: u8,
    #[serde(default = "d_topic_prefix")]
    pub topic_prefix: String,
    /// Defaults to `sensorgate-<gateway.id>`.
    pub client_id: Option<String>,
    #[serde(default = "d_keep_alive", deserialize_with = "de_duration")]
    pub keep_alive: Duration,
    #[serde(default = "d_connect_timeout", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Publishes sent but not yet acknowledged (QoS 1) at any moment.
    #[serde(default = "d_inflight")]
    pub inflight: u16,
    /// The largest PUBLISH (fixed header, topic, packet id and payload) the broker accepts.
    /// A reading that would exceed it is rejected (`oversize_packet`) when it is built: an
    /// MQTT 3.1.1 broker answers an oversized packet by closing the connection. Set it to the
    /// broker's limit (mosquitto: `max_packet_size`). Default 256KiB (frames are at most 64KiB).
    #[serde(default = "d_max_packet_size", deserialize_with = "de_size")]
    pub max_packet_size: u64,
    #[serde(default = "d_backoff_min", deserialize_with = "de_duration")]
    pub reconnect_min: Duration,
    #[serde(default = "d_backoff_max", deserialize_with = "de_duration")]
    pub reconnect_max: Duration,
    /// `[mqtt.tls]`: connect with TLS (mqtts); absent means plain TCP.
    pub tls: Option<TlsConfig>,
    /// Readings per second at most during any catch-up after an outage (from the spool or the
    /// memory queue). Default: twice the recent input rate, at least 1000/s.
    pub catch_up_rate: Option<u32>,
    /// Protocol: 4 (MQTT 3.1.1, the default) or 5 (the broker's limits, PUBACK reason codes,
    /// message expiry and response topics are then used).
    #[serde(default = "d_mqtt_version")]
    pub version: u8,
}

/// TLS to the broker (rustls with the ring provider). The broker's certificate is checked
/// against `ca_file` (or the system's CA store) and against `mqtt.host` as its name.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) the broker's certificate chains to; default: the
    /// system's store (/etc/ssl/certs).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain), for brokers that require one; needs `client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

impl MqttConfig {
    /// The password from `password_file` (trailing newline removed), if credentials are set.
    /// A relative path is looked up in `$CREDENTIALS_DIRECTORY`, where systemd's
    /// `LoadCredential=` puts files for the service.
    ///
    /// The file must be a regular file of at most [`MAX_PASSWORD_FILE`] bytes. It is opened
    /// with `O_NONBLOCK` and checked before a byte is read, so a FIFO (whose open would wait
    /// for a writer), `/dev/zero` (endless) or a directory is refused at once instead of
    /// hanging or filling memory.
    ///
    /// # Errors
    /// The file cannot be read, is not a regular file, or is too large.
    pub fn password(&self) -> std::io::Result<Option<String>> {
        use std::io::{Error, ErrorKind, Read};
        use std::os::unix::fs::OpenOptionsExt;
        let Some(file) = &self.password_file else { return Ok(None) };
        let path = match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) if file.is_relative() => Path::new(&dir).join(file),
            _ => file.clone(),
        };
        let fail = |e: Error| Error::new(e.kind(), format!("{} cannot be read: {e}", path.display()));
        let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&path).map_err(fail)?;
        let meta = f.metadata().map_err(fail)?;
        if !meta.is_file() {
            let what = if meta.is_dir() { "a directory" } else { "not a regular file (a device, FIFO or socket)" };
            return Err(Error::new(ErrorKind::InvalidInput, format!("{} is {what}", path.display())));
        }
        let mut text = String::new();
        // One byte over the limit tells "too large" from "exactly at the limit".
        f.take(MAX_PASSWORD_FILE + 1).read_to_string(&mut text).map_err(fail)?;
        if text.len() as u64 > MAX_PASSWORD_FILE {
            return Err(Error::new(
                ErrorKind::InvalidData,
                format!("{} is larger than {MAX_PASSWORD_FILE} bytes", path.display()),
            ));
        }
        Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()))
    }
}

/// `password_file` larger than this is refused: a password is a line, not a file's worth.
pub const MAX_PASSWORD_FILE: u64 = 4096;
impl TlsConfig {
    /// The rustls client configuration (ring provider; no C toolchain beyond ring's own).
    ///
    /// # Errors
    /// A file cannot be read or holds no usable PEM certificate or key.
    pub fn client_config(&self) -> std::io::Result<rustls::ClientConfig> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what} {}: {e}", path.display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| bad("ca_file", path, &e))?;
                if certs.is_empty() {
                    return Err(bad("ca_file", path, &"no PEM certificate in it"));
                }
                for c in certs {
                    roots.add(c).map_err(|e| bad("ca_file", path, &e))?;
                }
            }
            None => {
                for c in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(c);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_root_certificates(roots);
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| bad("client_cert", cert, &e))?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("client_key", key, &e))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| bad("client_cert", cert, &e))
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: d_host(),
            port: d_port(),
            qos: d_qos(),
            topic_prefix: d_topic_prefix(),
            client_id: None,
            keep_alive: d_keep_alive(),
            connect_timeout: d_connect_timeout(),
            username: None,
            password_file: None,
            inflight: d_inflight(),
            max_packet_size: d_max_packet_size(),
            reconnect_min: d_backoff_min(),
            reconnect_max: d_backoff_max(),
            tls: None,
            catch_up_rate: None,
            version: d_mqtt_version(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Readings held while the broker is slow or away; the oldest go first when full.
    #[serde(default = "d_max_readings")]
    pub max_readings: NonZeroUsize,
    /// Payload bytes held, whichever bound is hit first.
    #[serde(default = "d_max_bytes", deserialize_with = "de_size")]
    pub max_bytes: u64,
    /// Readings older than this are dropped (counted as `expired`) instead of published.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_age: Option<Duration>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { max_readings: d_max_readings(), max_bytes: d_max_bytes(), max_age: None }
    }
}

/// One device: its name in topics, its serial port, and the input that makes readings of
/// what the port carries. A `[[device]]` table is a stream input (see [`StreamDeviceToml`]);
/// each `[[bus.device]]` is a Modbus slave on its bus's port (see [`BusConfig::devices`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "StreamDeviceToml")]
pub struct DeviceConfig {
    /// Used in topics and logs.
    pub name: String,
    /// The serial port and its line settings (a slave's is its bus's).
    pub port: PortConfig,
    /// No bytes for this long: the device is stale and its port is reopened.
    pub idle_timeout: Duration,
    /// How the device's data becomes readings.
    pub input: Input,
    /// Home Assistant sensor entities made from this device's reading fields.
    pub entities: Vec<EntityConfig>,
}

/// A serial port and its line settings: what opening it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct PortConfig {
    /// Prefer `/dev/serial/by-id/...`: it survives re-enumeration after an unplug.
    pub path: PathBuf,
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
    pub flow_control: FlowControl,
    pub open_timeout: Duration,
}

/// The kinds of input. A new kind is a variant here, its checks in `validate.rs` and its
/// session in `device::session`; the compiler points at every other place that must choose.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Listening: the port's byte stream is cut into frames and each frame decoded.
    Stream(StreamConfig),
    /// Polled: a Modbus RTU slave on a bus; its bus's task owns the port.
    Modbus(SlaveConfig),
}

/// A stream input: framing, format and the names of binary channels.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamConfig {
    pub framing: Framing,
    /// Defaults to the framing's default (`json` for lines, `postcard` for cobs).
    pub format: Option<Format>,
    /// Longest frame accepted; longer ones are discarded up to the next delimiter and counted.
    pub max_frame: Option<u64>,
    /// Names and units for the numbered channels of binary (postcard) frames.
    pub channels: Vec<Channel>,
    /// Bytes written to the port every `query_interval`, for sensors that answer only when
    /// asked. Validation makes `query` and `query_interval` go together.
    pub query: Option<Vec<u8>>,
    pub query_interval: Option<Duration>,
    /// Every write to the port (the query) must finish within this, or the session ends.
    pub write_timeout: Duration,
}

impl StreamConfig {
    /// The query and its interval, when both are set (a valid config has both or neither).
    pub fn query(&self) -> Option<(&[u8], Duration)> {
        Some((self.query.as_deref()?, self.query_interval?))
    }

    /// The format after applying the framing's default.
    pub fn format(&self) -> Format {
        self.format.unwrap_or(self.framing.default_format())
    }

    /// The frame cap after applying the framing's default.
    pub fn max_frame(&self) -> usize {
        self.max_frame.map_or(self.framing.default_max_frame(), |n| n as usize)
    }

    /// A framer for this stream.
    pub fn framer(&self) -> Framer {
        Framer::new(self.framing, self.max_frame())
    }

    /// The decoder of this stream's format.
    pub fn decoder(&self) -> Box<dyn Decode> {
        crate::decode::for_format(self.format(), &self.channels)
    }
}

impl DeviceConfig {
    /// The stream input's settings, if the device is one.
    pub fn stream(&self) -> Option<&StreamConfig> {
        match &self.input {
            Input::Stream(s) => Some(s),
            Input::Modbus(_) => None,
        }
    }

    /// Names and units of the numbered fields of this device's readings (none: fields name
    /// themselves).
    pub fn channels(&self) -> &[Channel] {
        match &self.input {
            Input::Stream(s) => &s.channels,
            Input::Modbus(_) => &[],
        }
    }
}

/// A `[[device]]` table as written: a serial port and a stream input, flat.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamDeviceToml {
    /// Used in topics and logs.
    name: String,
    /// Prefer `/dev/serial/by-id/...`: it survives re-enumeration after an unplug.
    path: PathBuf,
    #[serde(default = "d_baud")]
    baud: u32,
    #[serde(default = "d_data_bits")]
    data_bits: u8,
    #[serde(default)]
    parity: Parity,
    #[serde(default = "d_stop_bits")]
    stop_bits: u8,
    #[serde(default)]
    flow_control: FlowControl,
    framing: Framing,
    /// Defaults to `json` for lines and `postcard` for cobs.
    format: Option<Format>,
    /// Longest frame accepted; longer ones are discarded up to the next delimiter and counted.
    #[serde(default, deserialize_with = "de_opt_size")]
    max_frame: Option<u64>,
    /// No bytes for this long: the device is stale and its port is reopened.
    #[serde(default = "d_idle_timeout", deserialize_with = "de_duration")]
    idle_timeout: Duration,
    #[serde(default = "d_open_timeout", deserialize_with = "de_duration")]
    open_timeout: Duration,
    /// Names and units for the numbered channels of binary (postcard) frames.
    #[serde(default, rename = "channel")]
    channels: Vec<Channel>,
    /// Written to the port every `query_interval` (TOML escapes such as `\r` or `\u0002` give
    /// control bytes; the string's UTF-8 bytes are sent).
    query: Option<String>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    query_interval: Option<Duration>,
    #[serde(default = "d_write_timeout", deserialize_with = "de_duration")]
    write_timeout: Duration,
    /// Home Assistant sensor entities made from this device's reading fields.
    #[serde(default, rename = "entity")]
    entities: Vec<EntityConfig>,
}

impl From<StreamDeviceToml> for DeviceConfig {
    fn from(t: StreamDeviceToml) -> Self {
        let stream = StreamConfig {
            framing: t.framing,
            format: t.format,
            max_frame: t.max_frame,
            channels: t.channels,
            query: t.query.map(String::into_bytes),
            query_interval: t.query_interval,
            write_timeout: t.write_timeout,
        };
        let port = PortConfig {
            path: t.path,
            baud: t.baud,
            data_bits: t.data_bits,
            parity: t.parity,
            stop_bits: t.stop_bits,
            flow_control: t.flow_control,
            open_timeout: t.open_timeout,
        };
        Self { name: t.name, port, idle_timeout: t.idle_timeout, input: Input::Stream(stream), entities: t.entities }
    }
}

/// One Home Assistant sensor entity: a field of the device's readings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityConfig {
    /// The reading's field (for binary devices, a channel name).
    pub field: String,
    /// Display name; defaults to the field.
    pub name: Option<String>,
    pub unit: Option<String>,
    /// Home Assistant device class, e.g. "temperature", "humidity".
    pub device_class: Option<String>,
    /// "measurement", "total" or "total_increasing".
    pub state_class: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    #[default]
    None,
    Software,
    Hardware,
}

fn d_metrics_interval() -> Duration {
    Duration::from_secs(30)
}
fn d_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_host() -> String {
    "127.0.0.1".into()
}
fn d_port() -> u16 {
    1883
}
fn d_qos() -> u8 {
    1
}
fn d_topic_prefix() -> String {
    "sensorgate".into()
}
fn d_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn d_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_mqtt_version() -> u8 {
    4
}
fn d_inflight() -> u16 {
    100
}
fn d_max_packet_size() -> u64 {
    256 * 1024
}
fn d_backoff_min() -> Duration {
    Duration::from_millis(200)
}
fn d_backoff_max() -> Duration {
    Duration::from_secs(30)
}
fn d_spool_max_bytes() -> u64 {
    256 * 1024 * 1024
}
fn d_sync_interval() -> Duration {
    Duration::from_secs(1)
}
fn d_max_readings() -> NonZeroUsize {
    NonZeroUsize::new(10_000).expect("non-zero literal")
}
fn d_max_bytes() -> u64 {
    8 * 1024 * 1024
}
fn d_discovery_prefix() -> String {
    "homeassistant".into()
}
fn d_expire_after() -> Duration {
    Duration::from_secs(300)
}
fn d_baud() -> u32 {
    115_200
}
pub(super) fn d_data_bits() -> u8 {
    8
}
pub(super) fn d_stop_bits() -> u8 {
    1
}
fn d_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
pub(super) fn d_open_timeout() -> Duration {
    Duration::from_secs(5)
}
fn d_write_timeout() -> Duration {
    Duration::from_secs(1)
}

impl Config {
    /// Every device: the `[[device]]` tables, then each bus's slaves.
    pub fn all_devices(&self) -> Vec<DeviceConfig> {
        self.devices.iter().cloned().chain(self.buses.iter().flat_map(BusConfig::devices)).collect()
    }

    /// The MQTT client id, after applying the default.
    pub fn client_id(&self) -> String {
        self.mqtt.client_id.clone().unwrap_or_else(|| format!("sensorgate-{}", self.gateway.id))
    }
}

#[cfg(test)]
mod tests;
