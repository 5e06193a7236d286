//! `[[bus]]`: a serial port shared by Modbus RTU slaves (`[[bus.device]]`), each a device in
//! every sense of the contract, with its points (`[[bus.device.point]]`). The schema and its
//! checks; the bus task lives in `device::bus`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::de_duration;
use super::validate::{check_port, check_topic_name};
use super::{d_data_bits, d_open_timeout, d_stop_bits, DeviceConfig, FlowControl, Input, Parity, PortConfig, Problem};
use crate::modbus::point::Encoded;
use crate::modbus::{Point, PointType};
use crate::payload::RESERVED_KEY;

/// One bus: its port, its timing, its slaves.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "BusToml")]
pub struct BusConfig {
    /// Used in logs.
    pub name: String,
    pub port: PortConfig,
    /// Per request: the whole response must be in within this.
    pub request_timeout: Duration,
    /// Per request, after a timeout or a bad CRC.
    pub retries: u32,
    /// Extra silence between transactions, for slow slaves.
    pub turnaround: Duration,
    pub slaves: Vec<SlaveConfig>,
}

/// A slave on a bus: a device (`[[bus.device]]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlaveConfig {
    /// The device name (topics, logs, metrics).
    pub name: String,
    /// Modbus unit id, 1..=247 (checked by validation; wider here so that 300 is explained).
    pub unit: u32,
    #[serde(default = "d_poll_interval", deserialize_with = "de_duration")]
    pub poll_interval: Duration,
    #[serde(default, rename = "point")]
    pub points: Vec<Point>,
    /// The bus it is on (its `name`), filled in from the enclosing `[[bus]]`.
    #[serde(skip)]
    pub bus: String,
}

impl SlaveConfig {
    /// The unit id (validated to be 1..=247).
    pub fn unit_id(&self) -> u8 {
        self.unit as u8
    }

    /// The point `name` and what writing `value` to it puts on the wire. The `write`
    /// command checks a request with it at once, and the bus again when it makes the write
    /// (a reload may have changed the point meanwhile).
    ///
    /// # Errors
    /// Why it cannot be written, for the command's answer: no such point, not writable, or
    /// a value the point's type cannot take.
    pub fn write_of(&self, name: &str, value: &serde_json::Value) -> Result<(&Point, Encoded), String> {
        let writable =
            || self.points.iter().filter(|p| p.writable).map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ");
        let device = &self.name;
        let point = self
            .points
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| format!("{device:?} has no point {name:?}; its writable points: {}", writable()))?;
        if !point.writable {
            return Err(format!(
                "point {name:?} of {device:?} is not writable (writable = true in its [[bus.device.point]] allows it); \
                 writable points: {}",
                writable()
            ));
        }
        Ok((point, point.encode(value)?))
    }
}

/// A `[[bus]]` table as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct BusToml {
    name: String,
    path: PathBuf,
    #[serde(default = "d_baud")]
    baud: u32,
    /// Modbus RTU's default is 8E1.
    #[serde(default = "d_parity")]
    parity: Parity,
    #[serde(default = "d_data_bits")]
    data_bits: u8,
    #[serde(default = "d_stop_bits")]
    stop_bits: u8,
    #[serde(default = "d_open_timeout", deserialize_with = "de_duration")]
    open_timeout: Duration,
    #[serde(default = "d_request_timeout", deserialize_with = "de_duration")]
    request_timeout: Duration,
    #[serde(default = "d_retries")]
    retries: u32,
    #[serde(default, deserialize_with = "de_duration")]
    turnaround: Duration,
    #[serde(default, rename = "device")]
    devices: Vec<SlaveConfig>,
}

impl From<BusToml> for BusConfig {
    fn from(t: BusToml) -> Self {
        let port = PortConfig {
            path: t.path,
            baud: t.baud,
            data_bits: t.data_bits,
            parity: t.parity,
            stop_bits: t.stop_bits,
            flow_control: FlowControl::None,
            open_timeout: t.open_timeout,
        };
        let slaves = t.devices.into_iter().map(|s| SlaveConfig { bus: t.name.clone(), ..s }).collect();
        Self {
            name: t.name,
            port,
            request_timeout: t.request_timeout,
            retries: t.retries,
            turnaround: t.turnaround,
            slaves,
        }
    }
}

fn d_baud() -> u32 {
    9600
}
fn d_parity() -> Parity {
    Parity::Even
}
fn d_request_timeout() -> Duration {
    Duration::from_millis(300)
}
fn d_retries() -> u32 {
    1
}
fn d_poll_interval() -> Duration {
    Duration::from_secs(1)
}

impl BusConfig {
    /// The slaves as devices: each with the bus's port and a Modbus input.
    pub fn devices(&self) -> impl Iterator<Item = DeviceConfig> + '_ {
        self.slaves.iter().map(|s| DeviceConfig {
            name: s.name.clone(),
            port: self.port.clone(),
            // Unused: a slave's silence is seen poll by poll (stale after 3 failed polls).
            idle_timeout: s.poll_interval,
            input: Input::Modbus(s.clone()),
            entities: Vec::new(),
        })
    }

    /// Every problem of `bus[b]`.
    pub(super) fn validate(&self, p: &mut Vec<Problem>, b: usize) {
        let k = |field: &str| format!("bus[{b}].{field}");
        check_topic_name(p, &k("name"), &self.name);
        check_port(p, &k(""), &self.port);
        if self.request_timeout < Duration::from_millis(10) || self.request_timeout > Duration::from_secs(60) {
            p.push(Problem::new(k("request_timeout"), "must be between 10ms and 60s", "use e.g. \"300ms\""));
        }
        if self.retries > 10 {
            p.push(Problem::new(k("retries"), "must be at most 10", "use 0 to 3 (default 1)"));
        }
        if self.turnaround > Duration::from_secs(10) {
            p.push(Problem::new(k("turnaround"), "must be at most 10s", "use e.g. \"5ms\" for a slow slave"));
        }
        if self.slaves.is_empty() {
            p.push(Problem::new(
                k("device"),
                "the bus has no slaves",
                "add a [[bus.device]] table per slave (name, unit, poll_interval, [[bus.device.point]])",
            ));
        }
        for (s, slave) in self.slaves.iter().enumerate() {
            let k = |field: &str| format!("bus[{b}].device[{s}].{field}");
            if !(1..=247).contains(&slave.unit) {
                p.push(Problem::new(
                    k("unit"),
                    format!("unit {} is not a slave address", slave.unit),
                    "use the slave's address, 1 to 247 (0 is broadcast, 248-255 are reserved)",
                ));
            } else if let Some(o) = self.slaves[..s].iter().position(|o| o.unit == slave.unit) {
                p.push(Problem::new(
                    k("unit"),
                    format!("unit {} is also bus[{b}].device[{o}]", slave.unit),
                    "give each slave on a bus its own address",
                ));
            }
            if slave.poll_interval < Duration::from_millis(10) {
                p.push(Problem::new(k("poll_interval"), "must be at least 10ms", "use e.g. \"1s\""));
            }
            if slave.points.is_empty() {
                p.push(Problem::new(
                    k("point"),
                    "the slave has no points",
                    "add a [[bus.device.point]] per value to read (name, table, address, type)",
                ));
            }
            for (i, point) in slave.points.iter().enumerate() {
                validate_point(p, &format!("bus[{b}].device[{s}].point[{i}]"), point, &slave.points[..i]);
            }
        }
    }
}

fn validate_point(p: &mut Vec<Problem>, key: &str, point: &Point, before: &[Point]) {
    let k = |field: &str| format!("{key}.{field}");
    if point.name.is_empty() || point.name == RESERVED_KEY || point.name.chars().any(char::is_control) {
        p.push(Problem::new(
            k("name"),
            format!("{:?} cannot be used as a field name", point.name),
            format!("use a plain name such as \"voltage\" (not empty, not {RESERVED_KEY:?})"),
        ));
    } else if before.iter().any(|o| o.name == point.name) {
        p.push(Problem::new(k("name"), format!("{:?} is used twice", point.name), "give each point its own name"));
    }
    let wide = point.kind.words() > 1;
    if point.table.is_bits() && point.kind != PointType::Bool {
        p.push(Problem::new(
            k("type"),
            format!("a {} table holds single bits, not {}", point.table.as_str(), point.kind.as_str()),
            "use type = \"bool\", or table = \"holding\"/\"input\" for a register value",
        ));
    }
    if point.word_order.is_some() && (!wide || point.table.is_bits()) {
        p.push(Problem::new(
            k("word_order"),
            format!("word_order applies to 32- and 64-bit types, not {}", point.kind.as_str()),
            "remove word_order",
        ));
    }
    if point.end() > 65_536 {
        p.push(Problem::new(
            k("address"),
            format!("{} registers from {} run past the last address (65535)", point.width(), point.address),
            "check the address in the slave's register map (0-based)",
        ));
    }
    if point.writable && !point.table.is_writable() {
        p.push(Problem::new(
            k("writable"),
            format!("the {} table is read-only in Modbus", point.table.as_str()),
            "only coil and holding points can be writable; remove writable",
        ));
    }
    if !point.scale.is_finite() || point.scale == 0.0 {
        p.push(Problem::new(k("scale"), "must be a finite number other than 0", "use e.g. 0.1 (default 1.0)"));
    }
    if !point.offset.is_finite() {
        p.push(Problem::new(k("offset"), "must be a finite number", "use e.g. -40.0 (default 0.0)"));
    }
    let overlaps =
        |o: &&Point| o.table == point.table && u32::from(o.address) < point.end() && u32::from(point.address) < o.end();
    if let Some(o) = before.iter().find(overlaps) {
        if o.kind != point.kind || o.word_order != point.word_order || o.address != point.address {
            p.push(Problem::new(
                k("address"),
                format!(
                    "{} {}..{} overlaps point {:?} ({} at {}) with a different type or layout",
                    point.table.as_str(),
                    point.address,
                    point.end(),
                    o.name,
                    o.kind.as_str(),
                    o.address
                ),
                "fix the address or the type from the slave's register map; one register cannot hold two values",
            ));
        }
    }
}
