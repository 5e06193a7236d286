//! Home Assistant MQTT discovery (device-based, Home Assistant 2024.11+): one retained config
//! message per serial device with its sensor entities, and one for the gateway's diagnostics.
//! Builds messages only; publishing them (on connect and on Home Assistant's birth message)
//! is the MQTT side's job.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::config::{Config, DeviceConfig, EntityConfig};
use crate::queue::Control;
use crate::topics::Topics;

/// The discovery in force (replaced by reloads), shared by the MQTT side and the commands.
pub type SharedDiscovery = std::sync::Arc<std::sync::Mutex<Option<Discovery>>>;

/// Builds discovery messages for one configuration.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// `<discovery_prefix>/status`: Home Assistant's birth (`online`) and will (`offline`).
    pub status_topic: String,
    messages: Vec<Control>,
}

impl Discovery {
    /// Empty retained payloads for the config topics in `self` that `next` no longer has:
    /// Home Assistant removes those devices (a reload dropped them).
    pub fn removals(&self, next: &Discovery) -> Vec<Control> {
        self.messages
            .iter()
            .filter(|m| !next.messages.iter().any(|n| n.topic == m.topic))
            .map(|m| Control { topic: m.topic.clone(), payload: Bytes::new(), retain: true, correlation: None })
            .collect()
    }
}

impl Discovery {
    pub fn new(config: &Config, topics: &Topics) -> Self {
        let ha = &config.homeassistant;
        let gw_id = object_id(&format!("sensorgate_{}", config.gateway.id));
        let origin = json!({"name": "sensorgate", "sw": env!("CARGO_PKG_VERSION")});
        let gateway_availability =
            json!({"topic": topics.state, "payload_available": "online", "payload_not_available": "offline"});
        let mut messages = Vec::new();

        for dev in &config.all_devices() {
            let dev_id = object_id(&format!("{gw_id}_{}", dev.name));
            let mut cmps = Map::new();
            for e in entities(dev) {
                let mut c = json!({
                    "p": "sensor",
                    "name": e.name.clone().unwrap_or_else(|| e.field.clone()),
                    "unique_id": object_id(&format!("{dev_id}_{}", e.field)),
                    "value_template": format!("{{{{ value_json[{}] }}}}", Value::String(e.field.clone())),
                    "expire_after": ha.expire_after.as_secs(),
                });
                let obj = c.as_object_mut().expect("object literal");
                for (k, v) in [
                    ("unit_of_measurement", &e.unit),
                    ("device_class", &e.device_class),
                    ("state_class", &e.state_class),
                ] {
                    if let Some(v) = v {
                        obj.insert(k.into(), Value::String(v.clone()));
                    }
                }
                cmps.insert(object_id(&e.field), c);
            }
            let payload = json!({
                "dev": {"ids": [dev_id], "name": dev.name, "mf": "sensorgate", "mdl": "serial sensor", "via_device": gw_id},
                "o": origin,
                "cmps": cmps,
                "state_topic": topics.readings(&dev.name),
                "availability": [
                    gateway_availability,
                    {"topic": topics.device_state(&dev.name), "value_template": "{{ 'online' if value_json.state == 'up' else 'offline' }}"},
                ],
                "availability_mode": "all",
                "qos": config.mqtt.qos,
            });
            messages.push(control(format!("{}/device/{dev_id}/config", ha.discovery_prefix), &payload));
        }

        let diag = |name: &str, template: &str, extra: Value| {
            let mut c = json!({
                "p": "sensor",
                "name": name,
                "unique_id": object_id(&format!("{gw_id}_{name}")),
                "entity_category": "diagnostic",
                "value_template": template,
            });
            if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
                c.extend(extra.clone());
            }
            c
        };
        let payload = json!({
            "dev": {"ids": [gw_id], "name": format!("sensorgate {}", config.gateway.id), "mf": "sensorgate", "mdl": "gateway", "sw": env!("CARGO_PKG_VERSION")},
            "o": origin,
            "cmps": {
                "queue_depth": diag("queue depth", "{{ value_json.queue.readings }}", json!({"state_class": "measurement"})),
                "dropped": diag("dropped readings", "{{ value_json.devices.values() | map(attribute='dropped_oldest') | sum }}", json!({"state_class": "total_increasing"})),
                "devices_up": diag("devices up", "{{ value_json.devices.values() | selectattr('state', 'eq', 'up') | list | count }}", json!({})),
                "uptime": diag("uptime", "{{ value_json.uptime_s }}", json!({"unit_of_measurement": "s", "device_class": "duration"})),
            },
            "state_topic": topics.metrics,
            "availability": [gateway_availability],
            "qos": config.mqtt.qos,
        });
        messages.push(control(format!("{}/device/{gw_id}/config", ha.discovery_prefix), &payload));
        Self { status_topic: format!("{}/status", ha.discovery_prefix), messages }
    }

    /// Every discovery message (retained).
    pub fn messages(&self) -> Vec<Control> {
        self.messages.clone()
    }
}

/// The device's entities: as configured, or one per named channel for binary devices.
fn entities(dev: &DeviceConfig) -> Vec<EntityConfig> {
    if let crate::config::Input::Modbus(slave) = &dev.input {
        // One entity per point, with its unit. A bool point has no state class: Home
        // Assistant refuses one on a value that is not a number.
        return slave
            .points
            .iter()
            .map(|p| EntityConfig {
                field: p.name.clone(),
                name: None,
                unit: p.unit.clone(),
                device_class: None,
                state_class: (p.kind != crate::modbus::PointType::Bool && !p.table.is_bits())
                    .then(|| "measurement".into()),
            })
            .collect();
    }
    if !dev.entities.is_empty() || !dev.stream().is_some_and(|s| s.format().is_binary()) {
        return dev.entities.clone();
    }
    dev.channels()
        .iter()
        .map(|c| EntityConfig {
            field: c.name.clone(),
            name: None,
            unit: c.unit.clone(),
            device_class: None,
            state_class: Some("measurement".into()),
        })
        .collect()
}

fn control(topic: String, payload: &Value) -> Control {
    Control { topic, payload: Bytes::from(payload.to_string()), retain: true, correlation: None }
}

/// Home Assistant object ids: letters, digits, `_` and `-` only.
fn object_id(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_discovery_carries_entities_availability_and_expiry() {
        let config = Config::from_toml(
            r#"
[gateway]
id = "gh.1"
[homeassistant]
enabled = true
expire_after = "2m"
[[device]]
name = "th"
path = "/dev/x"
framing = "lines"
[[device.entity]]
field = "temp"
name = "Temperature"
unit = "°C"
device_class = "temperature"
state_class = "measurement"
[[device]]
name = "soil"
path = "/dev/y"
framing = "cobs"
[[device.channel]]
id = 0
name = "moisture"
unit = "%"
"#,
        )
        .unwrap();
        let d = Discovery::new(&config, &Topics::new(&config));
        let m = d.messages();
        assert_eq!(m.len(), 3);
        assert!(m.iter().all(|c| c.retain));
        assert_eq!(m[0].topic, "homeassistant/device/sensorgate_gh_1_th/config");
        let v: Value = serde_json::from_slice(&m[0].payload).unwrap();
        let t = &v["cmps"]["temp"];
        assert_eq!(t["unit_of_measurement"], "°C");
        assert_eq!(t["device_class"], "temperature");
        assert_eq!(t["expire_after"], 120);
        assert_eq!(t["value_template"], "{{ value_json[\"temp\"] }}");
        assert_eq!(v["state_topic"], "sensorgate/gh.1/devices/th/readings");
        assert_eq!(v["availability_mode"], "all");
        assert_eq!(v["availability"][1]["topic"], "sensorgate/gh.1/devices/th/state");
        // Binary channels with units become entities by themselves.
        let v: Value = serde_json::from_slice(&m[1].payload).unwrap();
        assert_eq!(v["cmps"]["moisture"]["unit_of_measurement"], "%");
        let v: Value = serde_json::from_slice(&m[2].payload).unwrap();
        assert_eq!(v["cmps"]["queue_depth"]["entity_category"], "diagnostic");
        assert_eq!(d.status_topic, "homeassistant/status");
    }

    /// A Modbus slave is a device with an entity per point, with the point's unit.
    #[test]
    fn a_modbus_slave_is_a_device_with_an_entity_per_point() {
        let text = format!(
            "[gateway]\nid = \"gw\"\n[homeassistant]\nenabled = true\n[[bus]]\nname = \"b\"\npath = \"/dev/b\"\n\
             [[bus.device]]\nname = \"meter-1\"\nunit = 1\n{}",
            crate::simulate::modbus::METER_POINTS
        );
        let config = Config::from_toml(&text).unwrap();
        let m = Discovery::new(&config, &Topics::new(&config)).messages();
        assert_eq!(m[0].topic, "homeassistant/device/sensorgate_gw_meter-1/config");
        let v: Value = serde_json::from_slice(&m[0].payload).unwrap();
        let cmps = v["cmps"].as_object().unwrap();
        assert_eq!(cmps.len(), 7, "one entity per point");
        assert_eq!(cmps["voltage"]["unit_of_measurement"], "V");
        assert_eq!(cmps["voltage"]["state_class"], "measurement");
        assert!(cmps["relay"].get("state_class").is_none(), "a bool has no state class");
        assert_eq!(v["state_topic"], "sensorgate/gw/devices/meter-1/readings");
    }
}
