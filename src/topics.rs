//! Topic names (contract; see README "MQTT topics"). Built once at start-up.

use crate::config::Config;

/// Every topic the gateway publishes to.
#[derive(Debug, Clone)]
pub struct Topics {
    /// `<prefix>/<gateway>/state`: retained `online` / `offline`, `offline` is the last will.
    pub state: String,
    /// `<prefix>/<gateway>/metrics`: JSON every `metrics_interval`.
    pub metrics: String,
    /// `<prefix>/<gateway>/devices/<device>/readings`, by device index.
    pub readings: Vec<String>,
    /// `<prefix>/<gateway>/devices/<device>/state`, retained JSON, by device index.
    pub device_state: Vec<String>,
    /// `<prefix>/<gateway>/cmd/`: requests arrive on `<cmd>/<name>`, responses go to
    /// `<cmd>/<name>/response`.
    pub cmd: String,
}

impl Topics {
    /// The filter for every command request.
    pub fn cmd_filter(&self) -> String {
        format!("{}+", self.cmd)
    }
}

impl Topics {
    pub fn new(config: &Config) -> Self {
        let base = format!("{}/{}", config.mqtt.topic_prefix, config.gateway.id);
        let dev = |name: &str, leaf: &str| format!("{base}/devices/{name}/{leaf}");
        Self {
            state: format!("{base}/state"),
            metrics: format!("{base}/metrics"),
            readings: config.devices.iter().map(|d| dev(&d.name, "readings")).collect(),
            device_state: config.devices.iter().map(|d| dev(&d.name, "state")).collect(),
            cmd: format!("{base}/cmd/"),
        }
    }
}
