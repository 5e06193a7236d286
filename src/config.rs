//! Typed configuration: TOML → structs, then one validation pass that collects every problem.
//! No I/O beyond reading the file (and checking that a password file is readable).

use std::fmt;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::commands::Command;

/// `mqtt.max_packet_size` bounds: below 128 bytes no reading fits beside its topic; above is
/// more than MQTT's remaining-length field can express.
const MIN_PACKET_SIZE: u64 = 128;
const MAX_PACKET_SIZE: u64 = 268_435_455;

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
    pub homeassistant: HomeAssistantConfig,
    #[serde(default)]
    pub commands: CommandsConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// `[[device]]` tables; at least one.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
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
            (None, true) => Command::ALL.to_vec(),
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
    /// How long shutdown may take to drain the queue before the rest is reported lost.
    #[serde(default = "d_shutdown_timeout", deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
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

    /// A username and password would cross the network in clear text: plain TCP (no
    /// `[mqtt.tls]`) to a host that is not this machine. Loopback is exempt (a broker on the
    /// same host, or a local TLS-terminating proxy).
    fn cleartext_credentials(&self) -> Option<Problem> {
        if self.username.is_none() || self.tls.is_some() || is_loopback(&self.host) {
            return None;
        }
        Some(Problem::new(
            "mqtt.username",
            format!(
                "the username and password go to {}:{} over plain TCP, readable by anyone on the way",
                self.host, self.port
            ),
            "add an [mqtt.tls] section (and the broker's TLS port, usually port = 8883)",
        ))
    }
}

/// `password_file` larger than this is refused: a password is a line, not a file's worth.
pub const MAX_PASSWORD_FILE: u64 = 4096;

/// `localhost`, 127.0.0.0/8 and ::1: traffic that never leaves the machine.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

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

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Used in topics and logs.
    pub name: String,
    /// Prefer `/dev/serial/by-id/...`: it survives re-enumeration after an unplug.
    pub path: PathBuf,
    #[serde(default = "d_baud")]
    pub baud: u32,
    #[serde(default = "d_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "d_stop_bits")]
    pub stop_bits: u8,
    #[serde(default)]
    pub flow_control: FlowControl,
    pub framing: Framing,
    /// Defaults to `json` for lines and `postcard` for cobs.
    pub format: Option<Format>,
    /// Longest frame accepted; longer ones are discarded up to the next delimiter and counted.
    #[serde(default, deserialize_with = "de_opt_size")]
    pub max_frame: Option<u64>,
    /// No bytes for this long: the device is stale and its port is reopened.
    #[serde(default = "d_idle_timeout", deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    #[serde(default = "d_open_timeout", deserialize_with = "de_duration")]
    pub open_timeout: Duration,
    /// Names and units for the numbered channels of binary (postcard) frames.
    #[serde(default, rename = "channel")]
    pub channels: Vec<ChannelConfig>,
    /// Home Assistant sensor entities made from this device's reading fields.
    #[serde(default, rename = "entity")]
    pub entities: Vec<EntityConfig>,
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

impl DeviceConfig {
    /// The format after applying the framing's default.
    pub fn format(&self) -> Format {
        self.format.unwrap_or(match self.framing {
            Framing::Lines => Format::Json,
            Framing::Cobs => Format::Postcard,
        })
    }

    /// The frame cap after applying the framing's default.
    pub fn max_frame(&self) -> usize {
        match (self.max_frame, self.framing) {
            (Some(n), _) => n as usize,
            (None, Framing::Lines) => 1024,
            (None, Framing::Cobs) => sensorgate_wire::MAX_FRAME_LEN,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub id: u8,
    pub name: String,
    pub unit: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// `\n`-terminated text, `\r` stripped.
    Lines,
    /// COBS frames terminated by 0x00.
    Cobs,
}

impl Format {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Kv => "kv",
            Format::Postcard => "postcard",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line, passed through unchanged.
    Json,
    /// `key=value` pairs separated by spaces.
    Kv,
    /// sensorgate-wire `ReadingV1` (binary, for `cobs`).
    Postcard,
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
fn d_data_bits() -> u8 {
    8
}
fn d_stop_bits() -> u8 {
    1
}
fn d_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
fn d_open_timeout() -> Duration {
    Duration::from_secs(5)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?} ({e}); write it like \"500ms\", \"30s\" or \"2m\""))
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("invalid size {s:?} ({e}); write it like \"1KiB\" or \"8MiB\""))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration with a unit, like \"30s\"")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Duration, E> {
            parse_duration(s).map_err(E::custom)
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Duration, E> {
            Err(E::custom(format!("invalid duration {n}: a duration needs a unit, e.g. \"{n}s\" or \"{n}ms\"")))
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Duration, E> {
            self.visit_i64(n as i64)
        }
        fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Duration, E> {
            Err(E::custom(format!("invalid duration {n}: a duration needs a unit, e.g. \"1500ms\"")))
        }
    }
    d.deserialize_any(V)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// Sizes may be a plain number of bytes or a string with a unit.
fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size like \"1KiB\" or a number of bytes")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<u64, E> {
            parse_size(s).map_err(E::custom)
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u64, E> {
            Ok(n)
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<u64, E> {
            u64::try_from(n)
                .map_err(|_| E::custom(format!("invalid size {n}: a size cannot be negative; write it like \"1KiB\"")))
        }
    }
    d.deserialize_any(V)
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

/// One thing wrong with a configuration, located by key, with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path, e.g. `device[1].baud`.
    pub key: String,
    /// 1-based line in the file, where known.
    pub line: Option<usize>,
    pub message: String,
    pub fix: String,
}

/// A configuration that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the config file: {source} (fix: check the path given to --config and its permissions)", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", render(path, problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

impl ConfigError {
    /// Every problem found (one for a read error).
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { problems, .. } => problems,
        }
    }
}

fn render(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!("{}: {} problem(s) in the configuration", path.display(), problems.len());
    for p in problems {
        out.push('\n');
        out.push_str(&p.to_string_in(path));
    }
    out
}

impl Problem {
    fn new(key: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { key: key.into(), line: None, message: message.into(), fix: fix.into() }
    }

    /// `FILE:LINE: KEY: MESSAGE (fix: FIX)`.
    pub fn to_string_in(&self, path: &Path) -> String {
        let loc = match self.line {
            Some(l) => format!("{}:{l}", path.display()),
            None => path.display().to_string(),
        };
        format!("{loc}: {}: {} (fix: {})", self.key, self.message, self.fix)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (fix: {})", self.key, self.message, self.fix)
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read, [`ConfigError::Invalid`] with every
    /// problem found otherwise.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|problems| ConfigError::Invalid { path: path.to_owned(), problems })
    }

    /// Parses and validates TOML text.
    ///
    /// # Errors
    /// Every problem found; a syntax or type error stops parsing, so it comes alone.
    pub fn from_toml(text: &str) -> Result<Self, Vec<Problem>> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = match e.path().to_string() {
                p if p == "." => String::new(),
                p => p.replace(".device[", "device[").trim_start_matches('.').to_string(),
            };
            let inner = e.into_inner();
            let line = inner.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            // toml's messages may span lines; a problem is one line.
            let message = inner.message().trim().split('\n').map(str::trim).collect::<Vec<_>>().join("; ");
            // toml has no words for some syntax errors (a stray carriage return).
            let message = if message.is_empty() { "invalid TOML syntax".to_string() } else { message };
            // "missing field `id`" under `gateway` is the key `gateway.id`.
            let key = match message.strip_prefix("missing field `").and_then(|m| m.split('`').next()) {
                Some(field) if path.is_empty() => field.to_string(),
                Some(field) => format!("{path}.{field}"),
                None if path.is_empty() => "(top level)".to_string(),
                None => path,
            };
            let fix = fix_for_parse_error(&message);
            vec![Problem { key, line, message, fix }]
        })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(Config { source: toml::from_str(text).ok(), ..config })
        } else {
            Err(problems)
        }
    }

    /// The MQTT client id, after applying the default.
    pub fn client_id(&self) -> String {
        self.mqtt.client_id.clone().unwrap_or_else(|| format!("sensorgate-{}", self.gateway.id))
    }

    /// What works but should not be left so (the gateway runs; `check` prints these and
    /// still succeeds).
    pub fn warnings(&self) -> Vec<Problem> {
        self.mqtt.cleartext_credentials().into_iter().collect()
    }

    /// Every semantic problem, all at once.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        check_topic_name(&mut p, "gateway.id", &self.gateway.id);
        if self.gateway.metrics_interval < Duration::from_millis(100) {
            p.push(Problem::new("gateway.metrics_interval", "must be at least 100ms", "use e.g. \"30s\""));
        }
        let m = &self.mqtt;
        if m.host.trim().is_empty() {
            p.push(Problem::new("mqtt.host", "is empty", "set the broker's host name or address"));
        } else if m.host.contains("://")
            || m.host.contains('/')
            || (m.host.contains(':') && m.host.parse::<std::net::Ipv6Addr>().is_err())
        {
            p.push(Problem::new(
                "mqtt.host",
                format!("{:?} is not a host name or address (a scheme, port or path is included)", m.host),
                "give only the host, e.g. \"broker.local\"; the port goes in mqtt.port, TLS in [mqtt.tls]",
            ));
        }
        if m.port == 0 {
            p.push(Problem::new("mqtt.port", "must not be 0", "use the broker's port, usually 1883"));
        }
        if m.qos > 1 {
            p.push(Problem::new(
                "mqtt.qos",
                format!("QoS {} is not supported", m.qos),
                "use 1 (at least once, the default) or 0 (at most once)",
            ));
        }
        if m.topic_prefix.is_empty()
            || m.topic_prefix.starts_with('/')
            || m.topic_prefix.ends_with('/')
            || m.topic_prefix.contains(['+', '#', '\0'])
            || m.topic_prefix.split('/').any(str::is_empty)
        {
            p.push(Problem::new(
                "mqtt.topic_prefix",
                format!("{:?} is not a usable topic prefix", m.topic_prefix),
                "use levels separated by single '/', without '+', '#' or a leading/trailing '/', e.g. \"sensorgate\"",
            ));
        }
        if let Some(id) = &m.client_id {
            if id.is_empty() || id.len() > 128 {
                p.push(Problem::new(
                    "mqtt.client_id",
                    "must be 1 to 128 bytes",
                    "remove it to use sensorgate-<gateway.id>",
                ));
            }
        }
        if m.keep_alive < Duration::from_secs(5) || m.keep_alive > Duration::from_secs(65535) {
            p.push(Problem::new("mqtt.keep_alive", "must be between 5s and 65535s", "use e.g. \"30s\""));
        }
        if m.connect_timeout < Duration::from_secs(1) {
            p.push(Problem::new("mqtt.connect_timeout", "must be at least 1s", "use e.g. \"10s\""));
        }
        if !matches!(m.version, 4 | 5) {
            p.push(Problem::new(
                "mqtt.version",
                format!("MQTT protocol version {} is not supported", m.version),
                "use 4 (MQTT 3.1.1, the default) or 5 (MQTT 5)",
            ));
        }
        if m.inflight == 0 {
            p.push(Problem::new("mqtt.inflight", "must be at least 1", "use e.g. 100"));
        }
        if !(MIN_PACKET_SIZE..=MAX_PACKET_SIZE).contains(&m.max_packet_size) {
            p.push(Problem::new(
                "mqtt.max_packet_size",
                "must be between 128 bytes and 268435455 bytes (MQTT's largest packet)",
                "use the broker's limit, e.g. \"256KiB\"",
            ));
        }
        if m.reconnect_min.is_zero() || m.reconnect_min > m.reconnect_max {
            p.push(Problem::new(
                "mqtt.reconnect_min",
                "must be above zero and not above mqtt.reconnect_max",
                "use e.g. reconnect_min = \"200ms\", reconnect_max = \"30s\"",
            ));
        }
        match (&m.username, &m.password_file) {
            (None, Some(_)) => p.push(Problem::new(
                "mqtt.password_file",
                "is given without mqtt.username",
                "add mqtt.username, or remove mqtt.password_file",
            )),
            (_, Some(_)) => {
                if let Err(e) = self.mqtt.password() {
                    p.push(Problem::new(
                        "mqtt.password_file",
                        e.to_string(),
                        "check the path (relative paths are looked up in $CREDENTIALS_DIRECTORY): a regular file of at most 4KiB holding the password, readable by the gateway's user",
                    ));
                }
            }
            _ => {}
        }
        if let Some(tls) = &m.tls {
            if tls.client_cert.is_some() != tls.client_key.is_some() {
                p.push(Problem::new(
                    "mqtt.tls.client_cert",
                    "client_cert and client_key go together",
                    "give both (a certificate and its private key), or neither",
                ));
            } else if let Err(e) = tls.client_config() {
                // The message starts with the key it is about ("ca_file /x: ...").
                let msg = e.to_string();
                let key = match msg.split_whitespace().next() {
                    Some(k @ ("ca_file" | "client_cert" | "client_key")) => format!("mqtt.tls.{k}"),
                    _ => "mqtt.tls".to_string(),
                };
                p.push(Problem::new(key, msg, "point the mqtt.tls files at readable PEM files"));
            }
        }
        if let Some(allow) = &self.commands.allow {
            if allow.is_empty() && self.commands.enabled {
                p.push(Problem::new(
                    "commands.allow",
                    "is empty, so no command could run",
                    format!("list the commands to allow ({}), or set commands.enabled = false", Command::names()),
                ));
            }
            for (i, name) in allow.iter().enumerate() {
                if Command::from_name(name).is_none() {
                    p.push(Problem::new(
                        format!("commands.allow[{i}]"),
                        format!("{name:?} is not a command"),
                        format!("use some of: {}", Command::names()),
                    ));
                }
            }
        }
        let ha = &self.homeassistant;
        if ha.discovery_prefix.is_empty()
            || ha.discovery_prefix.contains(['+', '#', '\0'])
            || ha.discovery_prefix.split('/').any(str::is_empty)
        {
            p.push(Problem::new(
                "homeassistant.discovery_prefix",
                format!("{:?} is not a usable topic prefix", ha.discovery_prefix),
                "use Home Assistant's discovery prefix, \"homeassistant\" unless you changed it there",
            ));
        }
        if ha.expire_after < Duration::from_secs(1) {
            p.push(Problem::new("homeassistant.expire_after", "must be at least 1s", "use e.g. \"5m\""));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.filter) {
            p.push(Problem::new(
                "log.filter",
                format!("{:?} is not a log filter ({e})", self.log.filter),
                "use a level (\"info\", \"debug\") or directives like \"info,sensorgate::mqtt=debug\"",
            ));
        }
        if self.queue.max_bytes < 1024 {
            p.push(Problem::new("queue.max_bytes", "must be at least 1KiB", "use e.g. \"8MiB\""));
        }
        if self.devices.is_empty() {
            p.push(Problem::new("device", "no [[device]] is configured", "add a [[device]] table per serial port"));
        }
        for (i, d) in self.devices.iter().enumerate() {
            self.validate_device(&mut p, i, d);
        }
        p
    }

    fn validate_device(&self, p: &mut Vec<Problem>, i: usize, d: &DeviceConfig) {
        let k = |field: &str| format!("device[{i}].{field}");
        check_topic_name(p, &k("name"), &d.name);
        if let Some(j) = self.devices[..i].iter().position(|o| o.name == d.name) {
            p.push(Problem::new(
                k("name"),
                format!("{:?} is also the name of device[{j}]", d.name),
                "give every device its own name",
            ));
        }
        if let Some(j) = self.devices[..i].iter().position(|o| o.path == d.path) {
            p.push(Problem::new(
                k("path"),
                format!("{} is also the path of device[{j}]", d.path.display()),
                "a port can be read by one device only; remove one of them",
            ));
        }
        if d.path.as_os_str().is_empty() {
            p.push(Problem::new(k("path"), "is empty", "use the port's path, e.g. /dev/serial/by-id/usb-..."));
        } else if d.path.is_relative() {
            p.push(Problem::new(
                k("path"),
                format!("{} is a relative path", d.path.display()),
                "use the full path, e.g. /dev/serial/by-id/usb-... or /dev/ttyUSB0",
            ));
        }
        if d.baud == 0 {
            p.push(Problem::new(k("baud"), "must be above 0", "use your sensor's baud rate, e.g. 115200"));
        }
        if !(5..=8).contains(&d.data_bits) {
            p.push(Problem::new(k("data_bits"), "must be 5, 6, 7 or 8", "remove it to use 8"));
        }
        if !(1..=2).contains(&d.stop_bits) {
            p.push(Problem::new(k("stop_bits"), "must be 1 or 2", "remove it to use 1"));
        }
        match (d.framing, d.format()) {
            (Framing::Lines, Format::Json | Format::Kv) | (Framing::Cobs, Format::Postcard) => {}
            (Framing::Lines, Format::Postcard) => p.push(Problem::new(
                k("format"),
                "\"postcard\" is binary and needs framing = \"cobs\"",
                "use format = \"json\" or \"kv\" with lines, or framing = \"cobs\"",
            )),
            (Framing::Cobs, f) => p.push(Problem::new(
                k("format"),
                format!("{:?} is a text format and needs framing = \"lines\"", f.as_str()),
                "use format = \"postcard\" (the default) with cobs",
            )),
        }
        let max = d.max_frame();
        if !(16..=65536).contains(&max) {
            p.push(Problem::new(k("max_frame"), "must be between 16 bytes and 64KiB", "use e.g. \"1KiB\""));
        } else if max as u64 > self.queue.max_bytes / 4 {
            p.push(Problem::new(
                k("max_frame"),
                "is larger than a quarter of queue.max_bytes",
                "lower max_frame or raise queue.max_bytes",
            ));
        }
        if d.idle_timeout < Duration::from_millis(100) {
            p.push(Problem::new(k("idle_timeout"), "must be at least 100ms", "use e.g. \"30s\""));
        }
        if d.open_timeout < Duration::from_millis(100) {
            p.push(Problem::new(k("open_timeout"), "must be at least 100ms", "use e.g. \"5s\""));
        }
        if !d.channels.is_empty() && d.format() != Format::Postcard {
            p.push(Problem::new(
                k("channel"),
                "channel names only apply to binary (postcard) frames",
                "remove the [[device.channel]] tables, text formats name their own fields",
            ));
        }
        for (e, ent) in d.entities.iter().enumerate() {
            let key = |f: &str| format!("device[{i}].entity[{e}].{f}");
            if ent.field.is_empty() || ent.field == crate::reading::RESERVED_KEY {
                p.push(Problem::new(
                    key("field"),
                    format!("{:?} is not a reading field", ent.field),
                    "name a field the sensor sends, e.g. \"temp\"",
                ));
            }
            let unnamed_channel = ent.field.strip_prefix("ch").and_then(|n| n.parse::<u8>().ok()).is_some();
            if d.format() == Format::Postcard && !unnamed_channel && !d.channels.iter().any(|c| c.name == ent.field) {
                p.push(Problem::new(
                    key("field"),
                    format!("{:?} is not a channel of this binary device", ent.field),
                    "name a [[device.channel]] of this device (or ch<id> for an unnamed one)",
                ));
            }
            if d.entities[..e].iter().any(|o| o.field == ent.field) {
                p.push(Problem::new(
                    key("field"),
                    format!("{:?} has two entities", ent.field),
                    "keep one [[device.entity]] per field",
                ));
            }
            if let Some(sc) = &ent.state_class {
                if !matches!(sc.as_str(), "measurement" | "total" | "total_increasing") {
                    p.push(Problem::new(
                        key("state_class"),
                        format!("{sc:?} is not a Home Assistant state class"),
                        "use \"measurement\", \"total\" or \"total_increasing\"",
                    ));
                }
            }
        }
        for (c, ch) in d.channels.iter().enumerate() {
            if ch.name.is_empty() || ch.name == crate::reading::RESERVED_KEY || ch.name.chars().any(char::is_control) {
                p.push(Problem::new(
                    format!("device[{i}].channel[{c}].name"),
                    format!("{:?} cannot be used as a field name", ch.name),
                    format!(
                        "use a plain name such as \"temperature\" (not empty, not {:?})",
                        crate::reading::RESERVED_KEY
                    ),
                ));
            }
            if d.channels[..c].iter().any(|o| o.id == ch.id) {
                p.push(Problem::new(
                    format!("device[{i}].channel[{c}].id"),
                    format!("channel id {} is listed twice", ch.id),
                    "give each channel id one entry",
                ));
            }
            // `ch<id>` is how an unnamed channel appears; another channel may not take that name.
            if ch.name.strip_prefix("ch").and_then(|n| n.parse::<u8>().ok()).is_some_and(|id| id != ch.id) {
                p.push(Problem::new(
                    format!("device[{i}].channel[{c}].name"),
                    format!("{:?} is the default name of channel {}", ch.name, &ch.name[2..]),
                    "choose a name that is not ch<number> of another channel",
                ));
            }
            if d.channels[..c].iter().any(|o| o.name == ch.name) {
                p.push(Problem::new(
                    format!("device[{i}].channel[{c}].name"),
                    format!("channel name {:?} is used twice", ch.name),
                    "give each channel its own name",
                ));
            }
        }
    }
}

/// Names used as topic levels: no wildcards, separators or NUL, nothing that needs quoting.
fn check_topic_name(p: &mut Vec<Problem>, key: &str, name: &str) {
    let bad = name.is_empty()
        || name.len() > 64
        || name.chars().any(|c| matches!(c, '+' | '#' | '/' | '\0') || c.is_control() || c.is_whitespace());
    if bad {
        p.push(Problem::new(
            key,
            format!("{name:?} cannot be used in MQTT topics"),
            "use 1 to 64 characters without '+', '#', '/', spaces or control characters, e.g. \"greenhouse-1\"",
        ));
    }
}

fn fix_for_parse_error(message: &str) -> String {
    if message.starts_with("unknown field") {
        "remove the key or correct its spelling (config/sensorgate.example.toml lists every key)".into()
    } else if message.starts_with("missing field") {
        "add the key (config/sensorgate.example.toml shows it with an example)".into()
    } else if message.starts_with("unknown variant") {
        "use one of the expected values".into()
    } else if message.starts_with("invalid duration") {
        "write durations with a unit, like \"500ms\", \"30s\" or \"2m\"".into()
    } else if message.starts_with("invalid size") {
        "write sizes like \"1KiB\" or \"8MiB\", or a number of bytes".into()
    } else if message.contains("expected a nonzero") {
        "use a number above 0".into()
    } else if message.starts_with("duplicate key") {
        "keep one of the repeated keys".into()
    } else if message.starts_with("invalid type") || message.starts_with("invalid value") {
        "correct the value; config/sensorgate.example.toml shows every key with its type".into()
    } else {
        // Not about a value: the file is not valid TOML here.
        "fix the TOML syntax at this line (quotes, brackets, `key = value`)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[gateway]
id = "gw"
[[device]]
name = "a"
path = "/dev/ttyUSB0"
framing = "lines"
"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.mqtt.port, 1883);
        assert_eq!(c.mqtt.qos, 1);
        assert_eq!(c.mqtt.topic_prefix, "sensorgate");
        assert_eq!(c.queue.max_readings.get(), 10_000);
        assert_eq!(c.queue.max_bytes, 8 * 1024 * 1024);
        assert_eq!(c.devices[0].format(), Format::Json);
        assert_eq!(c.devices[0].max_frame(), 1024);
        assert_eq!(c.devices[0].idle_timeout, Duration::from_secs(30));
        assert_eq!(c.client_id(), "sensorgate-gw");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = MINIMAL.replace("framing = \"lines\"", "framing = \"lines\"\nbaudrate = 9600");
        let p = Config::from_toml(&text).unwrap_err();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "device[0].baudrate");
        assert!(p[0].message.contains("unknown field `baudrate`"), "{}", p[0].message);
        assert_eq!(p[0].line, Some(8));
    }

    #[test]
    fn bad_duration_names_the_key() {
        let text = MINIMAL.replace("framing = \"lines\"", "framing = \"lines\"\nidle_timeout = \"3 parsecs\"");
        let p = Config::from_toml(&text).unwrap_err();
        assert_eq!(p[0].key, "device[0].idle_timeout");
        assert!(p[0].message.contains("invalid duration"), "{}", p[0].message);
    }

    #[test]
    fn all_semantic_problems_are_reported_at_once() {
        let text = r#"
[gateway]
id = "green/house"
[mqtt]
qos = 2
[[device]]
name = "a"
path = "/dev/ttyUSB0"
framing = "cobs"
format = "kv"
[[device]]
name = "a"
path = "/dev/ttyUSB0"
framing = "lines"
baud = 0
"#;
        let p = Config::from_toml(text).unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["gateway.id", "mqtt.qos", "device[0].format", "device[1].name", "device[1].path", "device[1].baud"]
        );
        assert!(p.iter().all(|p| !p.fix.is_empty()));
    }

    #[test]
    fn sizes_accept_units_and_plain_numbers() {
        let text = MINIMAL.replace("framing = \"lines\"", "framing = \"lines\"\nmax_frame = \"2KiB\"")
            + "[queue]\nmax_bytes = 65536\n";
        let c = Config::from_toml(&text).unwrap();
        assert_eq!(c.devices[0].max_frame(), 2048);
        assert_eq!(c.queue.max_bytes, 65536);
    }

    #[test]
    fn max_packet_size_takes_a_size_and_is_bounded() {
        assert_eq!(Config::from_toml(MINIMAL).unwrap().mqtt.max_packet_size, 256 * 1024);
        let with = |v: &str| Config::from_toml(&format!("{MINIMAL}[mqtt]\nmax_packet_size = {v}\n"));
        assert_eq!(with("\"512B\"").unwrap().mqtt.max_packet_size, 512);
        assert_eq!(with("268435455").unwrap().mqtt.max_packet_size, 268_435_455);
        for bad in ["127", "\"256MiB\""] {
            let p = with(bad).unwrap_err();
            assert_eq!(p.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), ["mqtt.max_packet_size"], "{bad}");
        }
    }
}
