//! `sensorgate status`: what a gateway says about itself on MQTT (retained states, metrics),
//! gathered into a [`Report`] and rendered as a table or JSON. Sans-IO: no sockets, no clock
//! (times are passed in); `client` does the MQTT I/O.
//!
//! Readings per second come from the difference of two metrics messages. The metrics'
//! `uptime_s` counts whole seconds, too coarse for a `metrics_interval` of a few seconds or
//! less (200 ms in the tests: two messages often carry the same `uptime_s`), so the time between
//! them is the time between their arrivals here; where that disagrees with `uptime_s` by more
//! than its resolution (messages that waited in the gateway's queue and came in a burst), the
//! gateway's `uptime_s` is used instead.

mod client;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use client::{run, Options, Target};

/// The process exit status of `status`: it works as a monitoring check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The gateway is online, metrics arrive, and every device is `up`: exit 0.
    Healthy,
    /// Offline, a device not up, no metrics, or nothing retained for this gateway: exit 1.
    Unhealthy,
    /// The broker cannot be reached, refuses us, or refuses our subscriptions: exit 2.
    Unreachable,
}

impl Verdict {
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Healthy => 0,
            Verdict::Unhealthy => 1,
            Verdict::Unreachable => 2,
        }
    }
}

/// The topics `status` reads (contract: README "MQTT topics").
#[derive(Debug, Clone)]
pub struct StatusTopics {
    pub prefix: String,
    pub gateway: String,
    /// `<prefix>/<gw>`.
    pub base: String,
    /// `<prefix>/<gw>/state`: retained `online` / `offline`.
    pub state: String,
    /// `<prefix>/<gw>/metrics`: not retained, every `metrics_interval`.
    pub metrics: String,
}

impl StatusTopics {
    pub fn new(prefix: &str, gateway: &str) -> Self {
        let base = format!("{prefix}/{gateway}");
        Self {
            prefix: prefix.to_string(),
            gateway: gateway.to_string(),
            state: format!("{base}/state"),
            metrics: format!("{base}/metrics"),
            base,
        }
    }

    /// What to subscribe to: the gateway's state, every device's state, the metrics.
    pub fn filters(&self) -> Vec<String> {
        vec![self.state.clone(), format!("{}/devices/+/state", self.base), self.metrics.clone()]
    }

    /// The device a `<base>/devices/<dev>/state` topic is about.
    fn device_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let rest = topic.strip_prefix(self.base.as_str())?.strip_prefix("/devices/")?;
        rest.strip_suffix("/state").filter(|d| !d.is_empty() && !d.contains('/'))
    }
}

/// A device's retained state message (contract: `{"state","since","restarts","last_error"}`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct DeviceStatus {
    pub state: String,
    pub since: String,
    pub restarts: u64,
    pub last_error: Option<String>,
}

/// The part of a metrics message `status` shows; the rest is ignored.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct MetricsIn {
    /// Absent from gateways older than this field.
    pub version: Option<String>,
    pub uptime_s: u64,
    pub queue: QueueIn,
    pub mqtt: MqttIn,
    pub devices: BTreeMap<String, DeviceIn>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct QueueIn {
    pub readings: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct MqttIn {
    pub connected: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct DeviceIn {
    pub state: String,
    pub readings: u64,
    pub delivered: u64,
    pub dropped_oldest: u64,
    pub expired: u64,
    pub poisoned: u64,
    pub rejected: BTreeMap<String, u64>,
    pub restarts: u64,
    pub last_reading_age_ms: Option<u64>,
}

/// How late a metrics message may arrive after its `metrics_interval` (the broker's delay).
const ARRIVAL_SLACK: Duration = Duration::from_millis(500);
/// MQTT's default port.
pub const DEFAULT_PORT: u16 = 1883;

/// `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT` (port 1883 when not given).
///
/// # Errors
/// An empty host or a port that is not a number from 1 to 65535.
pub fn parse_broker(s: &str) -> Result<(String, u16), String> {
    let port_of = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{p:?} is not a port (1 to 65535)")),
        Ok(n) => Ok(n),
    };
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("an IPv6 address needs its closing ']'")?;
        match after {
            "" => (host, DEFAULT_PORT),
            p => (host, port_of(p.strip_prefix(':').ok_or("expected ':PORT' after ']'")?)?),
        }
    } else {
        match s.split_once(':') {
            Some((host, p)) if !p.contains(':') => (host, port_of(p)?),
            // Several colons: an IPv6 address without brackets and port.
            Some(_) => (s, DEFAULT_PORT),
            None => (s, DEFAULT_PORT),
        }
    };
    if host.is_empty() {
        return Err("the host is empty (e.g. 127.0.0.1:1883)".to_string());
    }
    Ok((host.to_string(), port))
}

/// A gateway id or topic prefix used in our subscriptions must not be a wildcard.
///
/// # Errors
/// It is empty or contains `+`, `#` or NUL (and, for the gateway id, `/`).
pub fn check_topic_name(what: &str, s: &str, allow_slash: bool) -> Result<(), String> {
    let bad = s.is_empty()
        || s.contains(['+', '#', '\0'])
        || (!allow_slash && s.contains('/'))
        || (allow_slash && (s.starts_with('/') || s.ends_with('/')));
    if bad {
        return Err(format!(
            "{what} {s:?} cannot name an MQTT topic (no '+', '#', empty levels{})",
            if allow_slash { "" } else { " or '/'" }
        ));
    }
    Ok(())
}

/// One metrics message and when it arrived (time since the tool started).
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Duration,
    pub metrics: MetricsIn,
}

/// What one message changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    Gateway,
    Device,
    Metrics,
    /// Not one of ours, or unreadable (noted in the report).
    Ignored,
}

/// Everything received so far: the retained states (kept up to date) and the last two
/// metrics messages.
#[derive(Debug, Clone)]
pub struct Observation {
    topics: StatusTopics,
    /// The devices of the gateway's config, when `status` read it: shown even if the gateway
    /// says nothing about them, and waited for.
    configured: Vec<String>,
    gateway: Option<String>,
    devices: BTreeMap<String, DeviceStatus>,
    previous: Option<Sample>,
    latest: Option<Sample>,
    metrics_seen: u64,
    unreadable: BTreeMap<String, String>,
}

impl Observation {
    pub fn new(topics: StatusTopics, configured: Vec<String>) -> Self {
        Self {
            topics,
            configured,
            gateway: None,
            devices: BTreeMap::new(),
            previous: None,
            latest: None,
            metrics_seen: 0,
            unreadable: BTreeMap::new(),
        }
    }

    pub fn topics(&self) -> &StatusTopics {
        &self.topics
    }

    /// The gateway's retained state, once received.
    pub fn gateway_state(&self) -> Option<&str> {
        self.gateway.as_deref()
    }

    /// Metrics messages received so far.
    pub fn metrics_seen(&self) -> u64 {
        self.metrics_seen
    }

    /// Takes one message from the broker, received `at` (since the tool started). An empty
    /// payload on a state topic is a cleared retained message.
    pub fn take(&mut self, topic: &str, payload: &[u8], at: Duration) -> Update {
        if topic == self.topics.state {
            self.gateway = (!payload.is_empty()).then(|| String::from_utf8_lossy(payload).trim().to_string());
            return Update::Gateway;
        }
        if topic == self.topics.metrics {
            return match serde_json::from_slice::<MetricsIn>(payload) {
                Ok(metrics) => {
                    self.unreadable.remove(topic);
                    self.metrics_seen += 1;
                    self.previous = self.latest.replace(Sample { at, metrics });
                    Update::Metrics
                }
                Err(e) => {
                    self.unreadable.insert(topic.to_string(), e.to_string());
                    Update::Ignored
                }
            };
        }
        let Some(device) = self.topics.device_of(topic) else { return Update::Ignored };
        if payload.is_empty() {
            self.devices.remove(device);
            return Update::Device;
        }
        match serde_json::from_slice::<DeviceStatus>(payload) {
            Ok(status) => {
                self.unreadable.remove(topic);
                self.devices.insert(device.to_string(), status);
                Update::Device
            }
            Err(e) => {
                self.unreadable.insert(topic.to_string(), e.to_string());
                Update::Ignored
            }
        }
    }

    /// Whether a one-shot run has what it needs: the retained states (`barrier`: the broker
    /// answered the PINGREQ sent right after SUBSCRIBE, so the retained messages it sends for a
    /// subscription have arrived) and, from an online gateway, two metrics messages, or one
    /// when the second cannot arrive in the time `left` (`interval`, when known). Nothing more
    /// is coming from a gateway that is offline or has nothing retained.
    pub fn complete(&self, barrier: bool, left: Duration, interval: Option<Duration>) -> bool {
        if !barrier {
            return false;
        }
        // A broker may hold some retained messages back behind its in-flight window (mosquitto:
        // 20) and answer the PINGREQ first: a configured device's state may still be coming.
        if self.gateway.is_some() && !self.configured.iter().all(|d| self.devices.contains_key(d)) {
            return false;
        }
        match self.gateway.as_deref() {
            Some("online") => match self.metrics_seen {
                0 => false,
                1 => interval.is_some_and(|i| i + ARRIVAL_SLACK > left),
                _ => true,
            },
            _ => true,
        }
    }

    /// The report as of `now` (wall clock, for the age of `since`); `waited`: how long the
    /// tool waited, for the notes.
    pub fn report(&self, now: SystemTime, waited: Duration) -> Report {
        let configured = &self.configured;
        let latest = self.latest.as_ref();
        let mut names: Vec<&str> = configured.iter().map(String::as_str).collect();
        match latest {
            Some(s) => names.extend(s.metrics.devices.keys().map(String::as_str)),
            // Without metrics the retained states are all there is.
            None => names.extend(self.devices.keys().map(String::as_str)),
        }
        names.sort_unstable();
        names.dedup();
        let mut notes = Vec::new();
        let rate_dt = match (&self.previous, latest) {
            (Some(a), Some(b)) => elapsed(a, b),
            _ => None,
        };
        let devices: BTreeMap<String, DeviceRow> = names
            .iter()
            .map(|&name| {
                let status = self.devices.get(name);
                let m = latest.and_then(|s| s.metrics.devices.get(name));
                let before = self.previous.as_ref().and_then(|s| s.metrics.devices.get(name));
                (name.to_string(), device_row(status, m, before, rate_dt, now))
            })
            .collect();
        if let Some(s) = latest {
            let gone: Vec<&str> = self
                .devices
                .keys()
                .map(String::as_str)
                .filter(|d| !s.metrics.devices.contains_key(*d) && !configured.iter().any(|c| c == d))
                .collect();
            if !gone.is_empty() {
                notes.push(format!(
                    "retained state of device(s) the gateway no longer reports, not shown: {}",
                    gone.join(", ")
                ));
            }
        }
        let online = self.gateway.as_deref() == Some("online");
        match (self.metrics_seen, rate_dt) {
            (0, _) if online => {
                notes.push(format!("no metrics message on {} within {}", self.topics.metrics, human(waited)));
            }
            // Offline or unknown: no metrics are coming; the retained states are the last word.
            (0, _) => notes.push("device states are the last the gateway published".to_string()),
            (1, _) => notes.push(format!("rate: n/a (one metrics message within {})", human(waited))),
            (_, None) => notes.push("rate: n/a (the gateway restarted between the two metrics messages)".to_string()),
            _ => {}
        }
        for (topic, error) in &self.unreadable {
            notes.push(format!("unreadable message on {topic}: {error}"));
        }
        let gateway = GatewayRow {
            id: self.topics.gateway.clone(),
            topic_prefix: self.topics.prefix.clone(),
            state: self.gateway.clone(),
            version: latest.and_then(|s| s.metrics.version.clone()),
            uptime_s: latest.map(|s| s.metrics.uptime_s),
            mqtt_connected: latest.map(|s| s.metrics.mqtt.connected),
            queue_readings: latest.map(|s| s.metrics.queue.readings),
            queue_bytes: latest.map(|s| s.metrics.queue.bytes),
            metrics_messages: self.metrics_seen,
        };
        let mut problems = Vec::new();
        match self.gateway.as_deref() {
            Some("online") => {}
            Some(other) => problems.push(format!("gateway is {other}")),
            None => problems.push(format!("nothing retained on {} (wrong gateway id or prefix?)", self.topics.state)),
        }
        if online && self.metrics_seen == 0 {
            problems.push("no metrics".to_string());
        }
        for (name, d) in &devices {
            match d.state.as_deref() {
                Some("up") => {}
                Some(state) => problems.push(format!("{name} is {state}")),
                None => problems.push(format!("{name}: no state")),
            }
        }
        let verdict = if problems.is_empty() { Verdict::Healthy } else { Verdict::Unhealthy };
        Report { verdict, exit: verdict.exit_code(), gateway, devices, problems, notes }
    }
}

/// The time between two metrics messages: their arrivals, unless those disagree with the
/// gateway's whole-second `uptime_s` by more than its resolution (then `uptime_s`, if it moved).
/// `None` when the gateway restarted in between (its counters started over).
fn elapsed(a: &Sample, b: &Sample) -> Option<Duration> {
    if b.metrics.uptime_s < a.metrics.uptime_s {
        return None;
    }
    let arrivals = b.at.checked_sub(a.at)?;
    let uptime = Duration::from_secs(b.metrics.uptime_s - a.metrics.uptime_s);
    let disagree = arrivals.abs_diff(uptime) > Duration::from_millis(1500);
    match (disagree, uptime.is_zero(), arrivals.is_zero()) {
        (false, _, false) => Some(arrivals),
        (true, false, _) | (false, false, true) => Some(uptime),
        _ => None,
    }
}

fn device_row(
    status: Option<&DeviceStatus>,
    m: Option<&DeviceIn>,
    before: Option<&DeviceIn>,
    dt: Option<Duration>,
    now: SystemTime,
) -> DeviceRow {
    let state = status.map(|s| s.state.clone()).or_else(|| m.map(|m| m.state.clone())).filter(|s| !s.is_empty());
    let since = status.map(|s| s.since.clone()).filter(|s| !s.is_empty());
    let since_s = since
        .as_deref()
        .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
        .map(|t| now.duration_since(t).unwrap_or_default().as_secs());
    let readings_per_s = match (m, before, dt) {
        (Some(m), Some(b), Some(dt)) if m.readings >= b.readings && !dt.is_zero() => {
            // Two decimals are more than a person reads; the JSON stays short.
            Some(((m.readings - b.readings) as f64 / dt.as_secs_f64() * 100.0).round() / 100.0)
        }
        _ => None,
    };
    let top_rejected = m.and_then(|m| {
        m.rejected
            .iter()
            .filter(|(reason, n)| reason.as_str() != "total" && **n > 0)
            // The most frequent; on a tie, the first by name (stable output).
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(reason, n)| Rejected { reason: reason.clone(), count: *n })
    });
    DeviceRow {
        state,
        since,
        since_s,
        readings_per_s,
        readings: m.map(|m| m.readings),
        delivered: m.map(|m| m.delivered),
        dropped: m.map(|m| m.dropped_oldest + m.expired + m.poisoned),
        rejected: m.map(|m| m.rejected.get("total").copied().unwrap_or_else(|| m.rejected.values().sum())),
        top_rejected,
        last_reading_age_ms: m.and_then(|m| m.last_reading_age_ms),
        restarts: status.map(|s| s.restarts).or(m.map(|m| m.restarts)),
        last_error: status.and_then(|s| s.last_error.clone()),
    }
}

/// What `status` prints: `--json` serialises it as it is; the table shows the same fields.
/// `None` where the gateway did not say (no metrics, no retained state).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub verdict: Verdict,
    /// The exit status this report gives.
    pub exit: u8,
    pub gateway: GatewayRow,
    /// By device name.
    pub devices: BTreeMap<String, DeviceRow>,
    /// Why the verdict is not healthy (empty when it is).
    pub problems: Vec<String>,
    /// What could not be shown, and why.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewayRow {
    pub id: String,
    pub topic_prefix: String,
    /// The retained `online` / `offline`.
    pub state: Option<String>,
    pub version: Option<String>,
    pub uptime_s: Option<u64>,
    pub mqtt_connected: Option<bool>,
    pub queue_readings: Option<u64>,
    pub queue_bytes: Option<u64>,
    pub metrics_messages: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceRow {
    /// From the retained device state (the metrics' where there is none).
    pub state: Option<String>,
    /// RFC 3339, from the retained device state.
    pub since: Option<String>,
    /// Seconds since `since`.
    pub since_s: Option<u64>,
    /// From two metrics messages; `None` with fewer.
    pub readings_per_s: Option<f64>,
    pub readings: Option<u64>,
    pub delivered: Option<u64>,
    /// `dropped_oldest + expired + poisoned`.
    pub dropped: Option<u64>,
    /// `rejected.total`.
    pub rejected: Option<u64>,
    /// The reason with the most rejected frames.
    pub top_rejected: Option<Rejected>,
    pub last_reading_age_ms: Option<u64>,
    pub restarts: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    pub reason: String,
    pub count: u64,
}

/// The broker could not be reached: what `--json` prints then.
#[derive(Debug, Clone, Serialize)]
pub struct Unreachable {
    pub verdict: Verdict,
    pub exit: u8,
    pub broker: String,
    pub error: String,
}

impl Unreachable {
    pub fn new(broker: String, error: String) -> Self {
        Self { verdict: Verdict::Unreachable, exit: Verdict::Unreachable.exit_code(), broker, error }
    }
}

/// ANSI colours for the table, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    Off,
    On,
}

impl Colour {
    /// On only when stdout is a terminal and `NO_COLOR` is unset (<https://no-color.org>).
    pub fn for_stdout() -> Self {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
        if tty && std::env::var_os("NO_COLOR").is_none() {
            Colour::On
        } else {
            Colour::Off
        }
    }

    fn paint(self, code: &str, text: &str) -> String {
        match self {
            Colour::Off => text.to_string(),
            Colour::On => format!("\x1b[{code}m{text}\x1b[0m"),
        }
    }
}

const GREEN: &str = "32";
const YELLOW: &str = "33";
const RED: &str = "31";
const BOLD: &str = "1";
/// The longest `last_error` shown in the table (the JSON has it whole).
const ERROR_WIDTH: usize = 60;

fn state_colour(state: Option<&str>) -> &'static str {
    match state {
        Some("up" | "online") => GREEN,
        Some("opening" | "stale" | "backoff") => YELLOW,
        _ => RED,
    }
}

impl Report {
    /// The table: one gateway line, one line per device, then problems and notes.
    pub fn table(&self, colour: Colour) -> String {
        let g = &self.gateway;
        let mut out = String::new();
        let state = g.state.as_deref().unwrap_or("unknown");
        let _ = write!(
            out,
            "gateway {}  {}",
            g.id,
            colour.paint(&format!("{BOLD};{}", state_colour(g.state.as_deref())), state)
        );
        match g.uptime_s {
            Some(up) => {
                let _ = write!(out, "  up {}", human(Duration::from_secs(up)));
            }
            None => out.push_str("  (no metrics)"),
        }
        if let Some(c) = g.mqtt_connected {
            out.push_str(if c { "  mqtt connected" } else { "  mqtt DISCONNECTED" });
        }
        if let (Some(n), Some(b)) = (g.queue_readings, g.queue_bytes) {
            let _ = write!(out, "  queue {n} readings ({})", bytesize::ByteSize(b).display().iec_short());
        }
        if let Some(v) = &g.version {
            let _ = write!(out, "  v{v}");
        }
        out.push('\n');
        let header = [
            "DEVICE",
            "STATE",
            "FOR",
            "READ/S",
            "DELIVERED",
            "DROPPED",
            "REJECTED",
            "LAST READING",
            "RESTARTS",
            "LAST ERROR",
        ];
        let rows: Vec<[String; 10]> = self.devices.iter().map(|(name, d)| device_cells(name, d)).collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String; 10], state_code: Option<&str>| {
            let mut l = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                let last = i == cells.len() - 1;
                let padded = if last { cell.clone() } else { format!("{cell:<w$}  ") };
                match (i, state_code) {
                    (1, Some(code)) => l.push_str(&colour.paint(code, &padded)),
                    _ => l.push_str(&padded),
                }
            }
            l.trim_end().to_string()
        };
        out.push_str(&colour.paint(BOLD, &line(&header.map(String::from), None)));
        out.push('\n');
        for ((_, d), row) in self.devices.iter().zip(&rows) {
            out.push_str(&line(row, Some(state_colour(d.state.as_deref()))));
            out.push('\n');
        }
        if self.devices.is_empty() {
            out.push_str("(no devices)\n");
        }
        if self.problems.is_empty() {
            out.push_str(&colour.paint(GREEN, "ok: online, every device up"));
        } else {
            let text = format!("{} problem(s): {}", self.problems.len(), self.problems.join("; "));
            out.push_str(&colour.paint(RED, &text));
        }
        out.push('\n');
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }

    /// The same data as one JSON object (one line).
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("a report always serialises")
    }
}

fn device_cells(name: &str, d: &DeviceRow) -> [String; 10] {
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    let rejected = match (&d.rejected, &d.top_rejected) {
        (Some(n), Some(top)) => format!("{n} ({} {})", top.reason, top.count),
        (Some(n), None) => n.to_string(),
        (None, _) => "-".to_string(),
    };
    let last_error = d.last_error.as_deref().map(|e| {
        let e = e.replace(['\n', '\r'], " ");
        if e.chars().count() > ERROR_WIDTH {
            format!("{}…", e.chars().take(ERROR_WIDTH - 1).collect::<String>())
        } else {
            e
        }
    });
    [
        name.to_string(),
        or_dash(d.state.clone()),
        or_dash(d.since_s.map(|s| human(Duration::from_secs(s)))),
        d.readings_per_s.map_or_else(|| "n/a".to_string(), |r| format!("{r:.1}")),
        or_dash(d.delivered.map(|n| n.to_string())),
        or_dash(d.dropped.map(|n| n.to_string())),
        rejected,
        d.last_reading_age_ms.map_or_else(
            || if d.readings.is_some() { "never".to_string() } else { "-".to_string() },
            |ms| format!("{} ago", human_ms(ms)),
        ),
        or_dash(d.restarts.map(|n| n.to_string())),
        or_dash(last_error),
    ]
}

/// `850ms`, `4.2s` under a minute (sub-second precision matters for a reading's age).
fn human_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => human(Duration::from_millis(ms)),
    }
}

/// `42s`, `3m05s`, `2h10m`, `5d03h`: two units at most.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 if d.subsec_millis() > 0 && s < 10 => format!("{:.1}s", d.as_secs_f64()),
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests;
