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
            for (e, boolean) in entities(dev) {
                let mut c = json!({
                    "p": if boolean { "binary_sensor" } else { "sensor" },
                    "name": e.name.clone().unwrap_or_else(|| e.field.clone()),
                    "unique_id": object_id(&format!("{dev_id}_{}", e.field)),
                    "value_template": value_template(&e.field, boolean),
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

        // Ids from fixed keys, not from the display names. `check` refuses a device entity
        // whose id would be one of these (see `id_problems`).
        let diag = |id: &str, name: &str, template: &str, extra: Value| {
            let mut c = json!({
                "p": "sensor",
                "name": name,
                "unique_id": format!("{gw_id}_{id}"),
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
                "queue_depth": diag(DIAGNOSTIC_IDS[0], "queue depth", "{{ value_json.queue.readings }}", json!({"state_class": "measurement"})),
                "dropped": diag(DIAGNOSTIC_IDS[1], "dropped readings", "{{ value_json.devices.values() | map(attribute='dropped_oldest') | sum }}", json!({"state_class": "total_increasing"})),
                "devices_up": diag(DIAGNOSTIC_IDS[2], "devices up", "{{ value_json.devices.values() | selectattr('state', 'eq', 'up') | list | count }}", json!({})),
                "uptime": diag(DIAGNOSTIC_IDS[3], "uptime", "{{ value_json.uptime_s }}", json!({"unit_of_measurement": "s", "device_class": "duration"})),
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

    /// A reload that drops an entity of a device that stays: Home Assistant removes a
    /// component only when the device's config carries it as `{"p": <platform>}`, so the
    /// components `previous` had and `self` lacks are kept in that form.
    pub fn keep_removed_components(&mut self, previous: &Discovery) {
        for m in &mut self.messages {
            let Some(old) = previous.messages.iter().find(|o| o.topic == m.topic) else { continue };
            let (Ok(old), Ok(mut new)) =
                (serde_json::from_slice::<Value>(&old.payload), serde_json::from_slice::<Value>(&m.payload))
            else {
                continue;
            };
            let (Some(old_cmps), Some(new_cmps)) = (old["cmps"].as_object(), new["cmps"].as_object_mut()) else {
                continue;
            };
            let mut changed = false;
            for (key, c) in old_cmps {
                if !new_cmps.contains_key(key) {
                    new_cmps.insert(key.clone(), json!({"p": c["p"]}));
                    changed = true;
                }
            }
            if changed {
                m.payload = Bytes::from(new.to_string());
            }
        }
    }
}

/// The unique-id suffixes (after `sensorgate_<gateway>_`) of the gateway's own entities.
const DIAGNOSTIC_IDS: [&str; 4] = ["queue_depth", "dropped_readings", "devices_up", "uptime"];

/// `{{ value_json[field] }}`, but a reading without the field leaves the state as it is
/// (sensors that send different fields on alternate lines are common: Home Assistant would log
/// a template warning per missing field per reading and blank the state). Before any value,
/// `None` is Home Assistant's "unknown". A boolean field renders ON / OFF (a binary sensor's
/// default payloads).
fn value_template(field: &str, boolean: bool) -> String {
    let f = Value::String(field.to_string());
    let value = if boolean { format!("'ON' if value_json[{f}] else 'OFF'") } else { format!("value_json[{f}]") };
    format!(
        "{{% if {f} in value_json %}}{{{{ {value} }}}}\
         {{% elif this.state in ('unknown', 'unavailable') %}}None\
         {{% else %}}{{{{ this.state }}}}{{% endif %}}"
    )
}

/// Names that become one Home Assistant id once the characters it does not take are replaced:
/// two devices (one discovery topic, one HA device: one device's readings would never show),
/// two entities of a device, or an entity and one of the gateway's own. For `check`: (key,
/// message, fix).
pub fn id_problems(config: &Config) -> Vec<(String, String, String)> {
    let gw_id = object_id(&format!("sensorgate_{}", config.gateway.id));
    let diag: Vec<String> = DIAGNOSTIC_IDS.iter().map(|d| format!("{gw_id}_{d}")).collect();
    let mut problems = Vec::new();
    let mut devices: Vec<(String, String)> = Vec::new();
    for (i, dev) in config.all_devices().iter().enumerate() {
        let key = device_key(config, i);
        let dev_id = object_id(&format!("{gw_id}_{}", dev.name));
        if let Some((other, _)) = devices.iter().find(|(_, id)| *id == dev_id) {
            problems.push((
                format!("{key}.name"),
                format!("{:?} and {other:?} are one device for Home Assistant (id {dev_id})", dev.name),
                "rename one: Home Assistant ids keep only letters, digits, '_' and '-'".to_string(),
            ));
        }
        devices.push((dev.name.clone(), dev_id.clone()));
        let mut fields: Vec<(String, String)> = Vec::new();
        for (e, _) in entities(dev) {
            let id = object_id(&format!("{dev_id}_{}", e.field));
            if let Some((other, _)) = fields.iter().find(|(_, i)| *i == id) {
                problems.push((
                    format!("{key}.entity"),
                    format!(
                        "fields {:?} and {other:?} of {:?} are one entity for Home Assistant (id {id})",
                        e.field, dev.name
                    ),
                    "rename one: Home Assistant ids keep only letters, digits, '_' and '-'".to_string(),
                ));
            }
            if diag.contains(&id) {
                problems.push((
                    format!("{key}.entity"),
                    format!("field {:?} of {:?} takes the id {id} of the gateway's own entity", e.field, dev.name),
                    "rename the device or the field".to_string(),
                ));
            }
            fields.push((e.field.clone(), id));
        }
    }
    problems
}

/// The config key of the `i`-th device of [`Config::all_devices`].
fn device_key(config: &Config, i: usize) -> String {
    if i < config.devices.len() {
        return format!("device[{i}]");
    }
    let mut i = i - config.devices.len();
    for (b, bus) in config.buses.iter().enumerate() {
        if i < bus.slaves.len() {
            return format!("bus[{b}].device[{i}]");
        }
        i -= bus.slaves.len();
    }
    "device".into()
}

/// The device's entities, each with whether it is a boolean (a binary sensor): as configured,
/// one per point of a Modbus slave, or one per named channel of a binary device.
fn entities(dev: &DeviceConfig) -> Vec<(EntityConfig, bool)> {
    if let crate::config::Input::Modbus(slave) = &dev.input {
        // One entity per point, with its unit. An unscaled bit or bool point is a binary
        // sensor: Home Assistant refuses a state class on a value that is not a number.
        return slave
            .points
            .iter()
            .map(|p| {
                let boolean = (p.kind == crate::modbus::PointType::Bool || p.table.is_bits())
                    && p.scale == 1.0
                    && p.offset == 0.0;
                let e = EntityConfig {
                    field: p.name.clone(),
                    name: None,
                    unit: p.unit.clone(),
                    device_class: None,
                    state_class: (!boolean).then(|| "measurement".into()),
                };
                (e, boolean)
            })
            .collect();
    }
    if !dev.entities.is_empty() || !dev.stream().is_some_and(|s| s.format().is_binary()) {
        return dev.entities.iter().map(|e| (e.clone(), false)).collect();
    }
    // A channel's value type is known only from a frame (a Bool channel would be a sensor
    // with a non-numeric state): only channels with a unit are declared measurements.
    dev.channels()
        .iter()
        .map(|c| {
            let e = EntityConfig {
                field: c.name.clone(),
                name: None,
                unit: c.unit.clone(),
                device_class: None,
                state_class: c.unit.is_some().then(|| "measurement".into()),
            };
            (e, false)
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
        assert_eq!(
            t["value_template"],
            "{% if \"temp\" in value_json %}{{ value_json[\"temp\"] }}\
             {% elif this.state in ('unknown', 'unavailable') %}None{% else %}{{ this.state }}{% endif %}"
        );
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

    /// A reload that drops one entity of a device that stays sends that component as
    /// `{"p": platform}`: Home Assistant removes it then (and only then).
    #[test]
    fn a_dropped_entity_is_sent_as_its_platform_alone() {
        let text = |extra: &str| {
            format!(
                "[gateway]\nid = \"gw\"\n[homeassistant]\nenabled = true\n[[device]]\nname = \"th\"\npath = \"/dev/x\"\n\
                 framing = \"lines\"\n[[device.entity]]\nfield = \"temp\"\n{extra}"
            )
        };
        let before = Config::from_toml(&text("[[device.entity]]\nfield = \"hum\"\n")).unwrap();
        let after = Config::from_toml(&text("")).unwrap();
        let old = Discovery::new(&before, &Topics::new(&before));
        let mut new = Discovery::new(&after, &Topics::new(&after));
        new.keep_removed_components(&old);
        let v: Value = serde_json::from_slice(&new.messages()[0].payload).unwrap();
        assert_eq!(v["cmps"]["hum"], json!({"p": "sensor"}));
        assert_eq!(v["cmps"]["temp"]["p"], "sensor", "the kept one is whole");
    }

    /// Names Home Assistant would merge are refused by `check`, with the key.
    #[test]
    fn names_that_collide_as_home_assistant_ids_are_problems() {
        let problems = Config::from_toml(
            r#"
[gateway]
id = "gw"
[homeassistant]
enabled = true
[[device]]
name = "col.1"
path = "/dev/a"
framing = "lines"
[[device.entity]]
field = "x.y"
[[device.entity]]
field = "x_y"
[[device]]
name = "col_1"
path = "/dev/b"
framing = "lines"
[[device]]
name = "queue"
path = "/dev/c"
framing = "lines"
[[device.entity]]
field = "depth"
"#,
        )
        .unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["device[0].entity", "device[1].name", "device[2].entity"], "{problems:?}");
        assert!(problems[1].message.contains("\"col_1\" and \"col.1\" are one device"), "{problems:?}");
        assert!(problems[2].message.contains("sensorgate_gw_queue_depth"), "{problems:?}");
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
        assert_eq!(cmps["relay"]["p"], "binary_sensor");
        assert!(cmps["relay"]["value_template"].as_str().unwrap().contains("'ON' if value_json[\"relay\"] else 'OFF'"));
        assert_eq!(cmps["voltage"]["p"], "sensor");
        assert_eq!(v["state_topic"], "sensorgate/gw/devices/meter-1/readings");
    }
}
