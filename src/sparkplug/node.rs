//! The edge node's Sparkplug B state, sans-IO: what to publish, in which order, with which
//! sequence numbers and aliases. The connection task asks it for the will before each connect,
//! tells it what happened (connected, a device's state, a message from the broker) and writes
//! the publishes it returns in order; the order it returns them in is the order of `seq`.
//!
//! Rules kept here (Sparkplug B 3.0, chapters 4–6):
//! - `bdSeq` is in the will's NDEATH and in the NBIRTH of the same connection.
//! - An NBIRTH starts `seq` at 0; every later NDATA, DBIRTH, DDATA and DDEATH takes the next
//!   one, modulo 256, whatever device it is about.
//! - A device is born (DBIRTH, with every metric it has sent so far and their last values)
//!   before its first DDATA, again when a reading brings a new metric or a changed type, and
//!   dies (DDEATH) when it leaves `up`.
//! - Aliases are unique across the edge node and never change while the process runs: a metric
//!   keeps its alias across births, and a changed type keeps it too.
//! - With a primary host configured nothing is published while its STATE is not `online`.
//! - A reading received before the current NBIRTH waited (an outage, an offline host): its
//!   metrics say `is_historical`, so a host stores them without taking them as current values.

use std::collections::HashMap;

use prost::Message as _;
use serde_json::Value as Json;

use super::proto::{DataType, Metric, Payload, Value};
pub use crate::mqtt::Publish;
use crate::payload::RESERVED_KEY;

/// The name of the node metric a host writes `true` to, to ask for births again.
pub const REBIRTH: &str = "Node Control/Rebirth";
/// Node metrics other than `bdSeq` and [`REBIRTH`]: the gateway's health, as [`Health`] says.
const HEALTH: [&str; 4] = ["Gateway/Queue Depth", "Gateway/Dropped", "Gateway/Devices Up", "Gateway/Devices"];

/// The gateway's health as node metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Health {
    /// Readings waiting in this output's queue.
    pub queue_depth: u64,
    /// Readings this output dropped (oldest, under pressure; expired; poisoned).
    pub dropped: u64,
    pub devices_up: u64,
    pub devices: u64,
}

impl Health {
    fn values(self) -> [u64; 4] {
        [self.queue_depth, self.dropped, self.devices_up, self.devices]
    }
}

/// A DCMD's request to set one metric of a device (a Modbus point), its value as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub device: String,
    pub metric: String,
    pub value: Json,
}

/// Why a reading was not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("the reading is not a JSON object: {0}")]
    NotAnObject(String),
    #[error("the reading has no fields Sparkplug can carry")]
    NoMetrics,
}

#[derive(Debug, Clone)]
struct MetricDef {
    name: String,
    alias: u64,
    datatype: DataType,
    last: Option<Value>,
}

#[derive(Debug)]
struct Device {
    metrics: Vec<MetricDef>,
    born: bool,
    up: bool,
    dbirth: String,
    ddata: String,
    ddeath: String,
}

impl Device {
    /// Its metric `name`, added with the node's next alias if it is new (then `true`): one
    /// place hands out aliases, so they stay unique across the node.
    fn metric(&mut self, name: String, datatype: DataType, next_alias: &mut u64) -> (&mut MetricDef, bool) {
        match self.metrics.iter().position(|m| m.name == name) {
            Some(i) => (&mut self.metrics[i], false),
            None => {
                self.metrics.push(MetricDef { name, alias: *next_alias, datatype, last: None });
                *next_alias += 1;
                (self.metrics.last_mut().expect("pushed"), true)
            }
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct EdgeNode {
    group: String,
    node: String,
    nbirth: String,
    ndata: String,
    ndeath: String,
    ncmd: String,
    state_topic: Option<String>,
    bd_seq: u64,
    next_seq: u8,
    connected: bool,
    node_born: bool,
    /// `None`: no primary host configured; otherwise its last STATE (offline until told).
    host_online: Option<bool>,
    rebirth: bool,
    devices: HashMap<String, Device>,
    /// Aliases 1..=HEALTH.len()+1 are the node's (Rebirth, then health); devices' follow.
    next_alias: u64,
    last_health: Option<[u64; 4]>,
    /// When this session's NBIRTH went out (ms): readings received before it waited through
    /// an outage or an offline host, and are sent as `is_historical`.
    born_at_ms: u64,
    pub rebirths_requested: u64,
    pub commands_ignored: u64,
}

impl EdgeNode {
    /// The edge node `node` of group `group`; with `primary_host`, it publishes only while that
    /// host's STATE says online. `bd_seq` is the previous connection's (persisted) value.
    pub fn new(group: &str, node: &str, primary_host: Option<&str>, bd_seq: u64) -> Self {
        let t = |kind: &str| format!("spBv1.0/{group}/{kind}/{node}");
        Self {
            group: group.to_string(),
            node: node.to_string(),
            nbirth: t("NBIRTH"),
            ndata: t("NDATA"),
            ndeath: t("NDEATH"),
            ncmd: t("NCMD"),
            state_topic: primary_host.map(|h| format!("spBv1.0/STATE/{h}")),
            bd_seq,
            next_seq: 0,
            connected: false,
            node_born: false,
            host_online: primary_host.map(|_| false),
            rebirth: false,
            devices: HashMap::new(),
            next_alias: HEALTH.len() as u64 + 2,
            last_health: None,
            born_at_ms: 0,
            rebirths_requested: 0,
            commands_ignored: 0,
        }
    }

    /// The filters to subscribe to before anything is published: NCMD, DCMD and the primary
    /// host's STATE.
    pub fn subscriptions(&self) -> Vec<String> {
        let mut f = vec![self.ncmd.clone(), format!("spBv1.0/{}/DCMD/{}/+", self.group, self.node)];
        f.extend(self.state_topic.clone());
        f
    }

    /// The will of the next connection: NDEATH with the next `bdSeq` (which the caller
    /// persists before connecting). Returns (topic, payload, bdSeq).
    pub fn next_will(&mut self) -> (String, Vec<u8>, u64) {
        self.bd_seq = (self.bd_seq + 1) % 256;
        (self.ndeath.clone(), self.ndeath_payload(), self.bd_seq)
    }

    /// The will with the current `bdSeq` again (its CONNECT never reached a broker).
    pub fn current_will(&self) -> (String, Vec<u8>) {
        (self.ndeath.clone(), self.ndeath_payload())
    }

    /// NDEATH of the current connection, published before a clean disconnect.
    pub fn farewell(&mut self) -> Option<Publish> {
        let was_born = std::mem::take(&mut self.node_born);
        let said = (self.connected && was_born)
            .then(|| Publish { topic: self.ndeath.clone(), payload: self.ndeath_payload() });
        // Dead until the next connection: nothing is born again before the DISCONNECT.
        self.connected = false;
        said
    }

    fn ndeath_payload(&self) -> Vec<u8> {
        let bd = metric_named("bdSeq", DataType::Int64, Value::Long(self.bd_seq));
        Payload { timestamp: Some(now_ms()), metrics: vec![bd], ..Default::default() }.encode_to_vec()
    }

    /// A connection was accepted: everything is born again on it.
    pub fn connected(&mut self) {
        self.connected = true;
        self.node_born = false;
        self.last_health = None;
        if self.host_online.is_some() {
            // Until the retained STATE arrives (right after the subscription).
            self.host_online = Some(false);
        }
        for d in self.devices.values_mut() {
            d.born = false;
        }
    }

    pub fn disconnected(&mut self) {
        self.connected = false;
        self.node_born = false;
    }

    /// Whether readings may be published now (else they wait in the queue).
    pub fn may_publish(&self) -> bool {
        self.connected && self.host_online != Some(false)
    }

    /// A message on one of [`subscriptions`](Self::subscriptions). Returns the writes a DCMD
    /// asks for (metrics named, or by the alias of the device's birth).
    pub fn incoming(&mut self, topic: &str, payload: &[u8]) -> Vec<Write> {
        let dcmd = format!("spBv1.0/{}/DCMD/{}/", self.group, self.node);
        if let Some(device) = topic.strip_prefix(&dcmd) {
            let writes = self.device_command(device, payload);
            if writes.is_empty() {
                self.ignored(topic);
            }
            return writes;
        }
        self.node_message(topic, payload);
        Vec::new()
    }

    fn device_command(&self, device: &str, payload: &[u8]) -> Vec<Write> {
        let (Ok(p), Some(d)) = (Payload::decode(payload), self.devices.get(device)) else { return Vec::new() };
        p.metrics
            .into_iter()
            .filter_map(|m| {
                let def = d.metrics.iter().find(|def| Some(&def.name) == m.name.as_ref() || Some(def.alias) == m.alias);
                let metric = m.name.or_else(|| def.map(|def| def.name.clone()))?;
                let value = match m.value? {
                    Value::Boolean(b) => Json::Bool(b),
                    Value::Double(f) => serde_json::Number::from_f64(f).map(Json::Number)?,
                    Value::Float(f) => serde_json::Number::from_f64(f64::from(f)).map(Json::Number)?,
                    Value::Long(v)
                        if m.datatype.or(def.map(|d| d.datatype as u32)) == Some(DataType::UInt64 as u32) =>
                    {
                        Json::from(v)
                    }
                    Value::Long(v) => Json::from(v as i64),
                    Value::Int(v) => Json::from(v),
                    Value::String(s) => Json::String(s),
                    Value::Bytes(_) => return None,
                };
                Some(Write { device: device.to_string(), metric, value })
            })
            .collect()
    }

    fn node_message(&mut self, topic: &str, payload: &[u8]) {
        if Some(topic) == self.state_topic.as_deref() {
            let online = match serde_json::from_slice::<Json>(payload) {
                Ok(v) => v.get("online").and_then(Json::as_bool).unwrap_or(false),
                // Sparkplug 2.2 hosts sent the bare word.
                Err(_) => payload.eq_ignore_ascii_case(b"ONLINE"),
            };
            if online && self.host_online == Some(false) {
                tracing::info!(topic, "Sparkplug: the primary host is online; publishing births.");
                self.node_born = false;
            } else if !online && self.host_online == Some(true) {
                tracing::warn!(topic, "Sparkplug: the primary host is offline; readings wait until it is back.");
                self.node_born = false;
            }
            self.host_online = Some(online);
        } else if topic == self.ncmd {
            let asks_rebirth = Payload::decode(payload).is_ok_and(|p| {
                p.metrics.iter().any(|m| {
                    (m.name.as_deref() == Some(REBIRTH) || m.alias == Some(1)) && m.value == Some(Value::Boolean(true))
                })
            });
            if asks_rebirth {
                tracing::info!("Sparkplug: rebirth requested (NCMD).");
                self.rebirths_requested += 1;
                self.rebirth = true;
            } else {
                self.ignored(topic);
            }
        }
    }

    /// A command that asks for nothing this node does (counted, logged at each doubling).
    pub fn ignored(&mut self, topic: &str) {
        self.commands_ignored += 1;
        if self.commands_ignored.is_power_of_two() {
            tracing::warn!(topic, ignored = self.commands_ignored, "Sparkplug: command not supported; ignored.");
        }
    }

    /// The metrics device `name` will send, known from its config (a Modbus slave's points):
    /// it is born with them (values null) as soon as it is `up`, before its first reading.
    pub fn declare(&mut self, name: &str, metrics: impl IntoIterator<Item = (String, DataType)>) {
        let mut next_alias = self.next_alias;
        let d = self.device(name);
        for (metric, datatype) in metrics {
            d.metric(metric, datatype, &mut next_alias);
        }
        self.next_alias = next_alias;
    }

    /// Whether device `name` is `up`, as its supervisor says.
    pub fn set_device_up(&mut self, name: &str, up: bool) {
        let d = self.device(name);
        d.up = up;
    }

    /// The devices configured now and whether each is `up`; one no longer configured (a
    /// reload removed it) is not up: it dies.
    pub fn set_devices(&mut self, now: &[(String, bool)]) {
        for (name, d) in &mut self.devices {
            if !now.iter().any(|(n, _)| n == name) {
                d.up = false;
            }
        }
        for (name, up) in now {
            self.set_device_up(name, *up);
        }
    }

    fn device(&mut self, name: &str) -> &mut Device {
        let (group, node) = (&self.group, &self.node);
        self.devices.entry(name.to_string()).or_insert_with(|| {
            let t = |kind: &str| format!("spBv1.0/{group}/{kind}/{node}/{name}");
            Device {
                metrics: Vec::new(),
                born: false,
                up: false,
                dbirth: t("DBIRTH"),
                ddata: t("DDATA"),
                ddeath: t("DDEATH"),
            }
        })
    }

    fn seq(&mut self) -> Option<u64> {
        let s = self.next_seq;
        self.next_seq = s.wrapping_add(1);
        Some(u64::from(s))
    }

    /// What is due regardless of readings: births (after a connect, a rebirth request, the
    /// host's return), deaths of devices that left `up`, births of those that came back with
    /// known metrics, and NDATA when `health` changed.
    pub fn due(&mut self, health: Health, out: &mut Vec<Publish>) {
        if !self.may_publish() {
            return;
        }
        if !self.node_born {
            // A new session (a connection, the host's return): what was read before waited.
            self.born_at_ms = now_ms();
            self.rebirth = false;
            self.birth_node(health, out);
        } else if std::mem::take(&mut self.rebirth) {
            self.birth_node(health, out);
        }
        let mut names: Vec<String> = self.devices.keys().cloned().collect();
        names.sort_unstable();
        for name in names {
            let d = &self.devices[&name];
            if d.born && !d.up {
                let seq = self.seq();
                let d = self.devices.get_mut(&name).expect("listed");
                d.born = false;
                out.push(Publish {
                    topic: d.ddeath.clone(),
                    payload: Payload { timestamp: Some(now_ms()), seq, ..Default::default() }.encode_to_vec(),
                });
            } else if !d.born && d.up && !d.metrics.is_empty() {
                self.birth_device(&name, now_ms(), out);
            }
        }
        if self.last_health != Some(health.values()) {
            let metrics = HEALTH
                .iter()
                .zip(health.values())
                .enumerate()
                .filter(|(i, (_, v))| self.last_health.is_none_or(|h| h[*i] != *v))
                .map(|(i, (_, v))| Metric {
                    alias: Some(i as u64 + 2),
                    value: Some(Value::Long(v)),
                    ..Default::default()
                })
                .collect();
            self.last_health = Some(health.values());
            let seq = self.seq();
            out.push(Publish {
                topic: self.ndata.clone(),
                payload: Payload { timestamp: Some(now_ms()), metrics, seq, ..Default::default() }.encode_to_vec(),
            });
        }
    }

    fn birth_node(&mut self, health: Health, out: &mut Vec<Publish>) {
        self.next_seq = 0;
        let seq = self.seq();
        let mut metrics = vec![
            metric_named("bdSeq", DataType::Int64, Value::Long(self.bd_seq)),
            Metric { alias: Some(1), ..metric_named(REBIRTH, DataType::Boolean, Value::Boolean(false)) },
        ];
        for (i, (name, v)) in HEALTH.iter().zip(health.values()).enumerate() {
            metrics.push(Metric { alias: Some(i as u64 + 2), ..metric_named(name, DataType::UInt64, Value::Long(v)) });
        }
        self.last_health = Some(health.values());
        out.push(Publish {
            topic: self.nbirth.clone(),
            payload: Payload { timestamp: Some(now_ms()), metrics, seq, ..Default::default() }.encode_to_vec(),
        });
        self.node_born = true;
        for d in self.devices.values_mut() {
            d.born = false;
        }
        // Devices are born right after, by `due`, or at their next reading.
    }

    fn birth_device(&mut self, name: &str, at_ms: u64, out: &mut Vec<Publish>) {
        let seq = self.seq();
        let d = self.devices.get_mut(name).expect("known device");
        let metrics = d
            .metrics
            .iter()
            .map(|m| Metric {
                name: Some(m.name.clone()),
                alias: Some(m.alias),
                datatype: Some(m.datatype as u32),
                is_null: m.last.is_none().then_some(true),
                value: m.last.clone(),
                ..Default::default()
            })
            .collect();
        d.born = true;
        out.push(Publish {
            topic: d.dbirth.clone(),
            payload: Payload { timestamp: Some(at_ms), metrics, seq, ..Default::default() }.encode_to_vec(),
        });
    }

    /// One reading of device `name` (its JSON payload as the JSON profile publishes it):
    /// a DBIRTH first when the device is not born or the reading brings a new metric or type,
    /// then its DDATA, by alias.
    ///
    /// # Errors
    /// The reading carries nothing Sparkplug can publish; nothing is published.
    pub fn reading(&mut self, name: &str, payload: &[u8], out: &mut Vec<Publish>) -> Result<(), Skip> {
        let json: Json = serde_json::from_slice(payload).map_err(|e| Skip::NotAnObject(e.to_string()))?;
        let Json::Object(fields) = json else { return Err(Skip::NotAnObject("not an object".into())) };
        let at_ms = fields
            .get(RESERVED_KEY)
            .and_then(|g| g.get("received_at_us"))
            .and_then(Json::as_u64)
            .map_or_else(now_ms, |us| us / 1000);
        let mut values = Vec::new();
        for (k, v) in &fields {
            if k != RESERVED_KEY {
                flatten(k.clone(), v, &mut values);
            }
        }
        if values.is_empty() {
            return Err(Skip::NoMetrics);
        }
        let historical = (at_ms < self.born_at_ms).then_some(true);
        let mut next_alias = self.next_alias;
        let d = self.device(name);
        // A reading means the device is up, whatever the last look at its state said.
        d.up = true;
        let mut changed = !d.born;
        let mut data = Vec::with_capacity(values.len());
        for (metric, (datatype, value)) in values {
            let (def, new) = d.metric(metric, datatype, &mut next_alias);
            changed |= new;
            if def.datatype != datatype {
                def.datatype = datatype;
                changed = true;
            }
            def.last = Some(value.clone());
            data.push(Metric {
                alias: Some(def.alias),
                value: Some(value),
                is_historical: historical,
                ..Default::default()
            });
        }
        self.next_alias = next_alias;
        if changed {
            // The birth carries this reading's values: its DDATA repeats them, which keeps
            // one DDATA per reading for the host and the accounting.
            self.birth_device(name, at_ms, out);
        }
        let seq = self.seq();
        let topic = self.devices[name].ddata.clone();
        out.push(Publish {
            topic,
            payload: Payload { timestamp: Some(at_ms), metrics: data, seq, ..Default::default() }.encode_to_vec(),
        });
        Ok(())
    }
}

fn metric_named(name: &str, datatype: DataType, value: Value) -> Metric {
    Metric { name: Some(name.to_string()), datatype: Some(datatype as u32), value: Some(value), ..Default::default() }
}

/// A JSON member as Sparkplug metrics: objects flatten into `a/b` names (Sparkplug's folder
/// separator), arrays go as their JSON text, nulls are left out.
fn flatten(name: String, v: &Json, out: &mut Vec<(String, (DataType, Value))>) {
    let typed = match v {
        Json::Null => return,
        Json::Bool(b) => (DataType::Boolean, Value::Boolean(*b)),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                // Two's complement in the 64-bit slot, as the specification says.
                (DataType::Int64, Value::Long(i as u64))
            } else if let Some(u) = n.as_u64() {
                (DataType::UInt64, Value::Long(u))
            } else {
                (DataType::Double, Value::Double(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Json::String(s) => (DataType::String, Value::String(s.clone())),
        Json::Array(_) => (DataType::String, Value::String(v.to_string())),
        Json::Object(members) => {
            for (k, v) in members {
                flatten(format!("{name}/{k}"), v, out);
            }
            return;
        }
    };
    out.push((name, typed));
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
