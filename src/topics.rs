//! Topic names (contract; see README "MQTT topics"). `gateway.id` and `mqtt.topic_prefix`
//! cannot change while the process runs (a reload that changes them is refused), so these are
//! fixed for its lifetime.

use crate::config::Config;

/// Every topic the gateway publishes to.
#[derive(Debug, Clone)]
pub struct Topics {
    /// `<prefix>/<gateway>`.
    pub base: String,
    /// `<prefix>/<gateway>/state`: retained `online` / `offline`, `offline` is the last will.
    pub state: String,
    /// `<prefix>/<gateway>/metrics`: JSON every `metrics_interval`.
    pub metrics: String,
    /// `<prefix>/<gateway>/cmd/`: requests arrive on `<cmd>/<name>`, responses go to
    /// `<cmd>/<name>/response`.
    pub cmd: String,
}

impl Topics {
    pub fn new(config: &Config) -> Self {
        let base = format!("{}/{}", config.mqtt.topic_prefix, config.gateway.id);
        Self { state: format!("{base}/state"), metrics: format!("{base}/metrics"), cmd: format!("{base}/cmd/"), base }
    }

    /// `<prefix>/<gateway>/devices/<device>/readings`.
    pub fn readings(&self, device: &str) -> String {
        format!("{}/devices/{device}/readings", self.base)
    }

    /// `<prefix>/<gateway>/devices/<device>/backlog`: readings replayed from the spool.
    pub fn backlog(&self, device: &str) -> String {
        format!("{}/devices/{device}/backlog", self.base)
    }

    /// `<prefix>/<gateway>/devices/<device>/state`: retained JSON.
    pub fn device_state(&self, device: &str) -> String {
        format!("{}/devices/{device}/state", self.base)
    }

    /// The filter for every command request.
    pub fn cmd_filter(&self) -> String {
        format!("{}+", self.cmd)
    }
}
