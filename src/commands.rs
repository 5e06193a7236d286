//! Incoming MQTT messages: Home Assistant's birth message (republish discovery) and, when
//! enabled, commands on `<prefix>/<gateway>/cmd/<name>` with a JSON body. Every request gets
//! a response on `.../cmd/<name>/response` carrying the request's `id`, errors included.
//! MQTT 3.1.1 has no response topic or correlation data, so both travel in the JSON.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::device::Registry;
use crate::homeassistant::SharedDiscovery;
use crate::mqtt::Message;
use crate::queue::{Control, ReadingQueue};
use crate::topics::Topics;

/// The commands, for `help` and error messages.
pub const COMMANDS: [&str; 4] = ["restart_device", "metrics", "config", "help"];

/// What the command task works with.
pub struct CommandContext {
    pub queue: Arc<ReadingQueue>,
    pub topics: Topics,
    pub devices: Arc<Registry>,
    pub discovery: SharedDiscovery,
    pub commands_enabled: bool,
    /// The configuration in force (shown with secrets redacted).
    pub config: Arc<std::sync::RwLock<crate::config::Config>>,
    pub metrics: Box<dyn Fn() -> Control + Send + Sync>,
}

/// Handles incoming messages until `stop`.
pub async fn run(ctx: CommandContext, mut rx: mpsc::Receiver<Message>, stop: CancellationToken) {
    loop {
        let p = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            p = rx.recv() => match p {
                Some(p) => p,
                None => return,
            },
        };
        ctx.handle(&p);
    }
}

impl CommandContext {
    fn handle(&self, p: &Message) {
        let birth = {
            let d = self.discovery.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            d.as_ref().filter(|d| p.topic == d.status_topic).map(|d| d.messages())
        };
        if let Some(messages) = birth {
            if &p.payload[..] == b"online" {
                tracing::info!("Home Assistant (re)started; publishing discovery again.");
                for m in messages {
                    self.queue.push_control(m);
                }
            }
            return;
        }
        let Some(name) = p.topic.strip_prefix(&self.topics.cmd) else { return };
        if !self.commands_enabled || name.contains('/') {
            return;
        }
        let (id, outcome) = match serde_json::from_slice::<Value>(&p.payload) {
            _ if p.payload.is_empty() => (Value::Null, self.execute(name, &json!({}))),
            Ok(body @ Value::Object(_)) => (body.get("id").cloned().unwrap_or(Value::Null), self.execute(name, &body)),
            _ => (Value::Null, Err("the body must be a JSON object, e.g. {\"id\":\"1\"}".to_string())),
        };
        let response = match &outcome {
            Ok(result) => json!({"id": id, "ok": true, "result": result}),
            Err(error) => json!({"id": id, "ok": false, "error": error}),
        };
        match &outcome {
            Ok(_) => tracing::info!(command = name, id = %id, "Command executed."),
            Err(e) => tracing::warn!(command = name, id = %id, error = %e, "Command refused."),
        }
        let topic = format!("{}{name}/response", self.topics.cmd);
        if !self.queue.push_response(Control { topic, payload: Bytes::from(response.to_string()), retain: false }) {
            tracing::warn!(command = name, "Too many responses waiting; this one is dropped.");
        }
    }

    fn execute(&self, name: &str, body: &Value) -> Result<Value, String> {
        match name {
            "restart_device" => {
                let wanted = body.get("device").and_then(Value::as_str).ok_or_else(|| {
                    format!("give the device to restart: {{\"device\": \"…\"}} (one of {})", self.device_names())
                })?;
                let dev = self
                    .devices
                    .snapshot()
                    .into_iter()
                    .find(|d| d.name() == wanted)
                    .ok_or_else(|| format!("no device {wanted:?}; devices: {}", self.device_names()))?;
                dev.restart.notify_one();
                Ok(json!({"device": wanted}))
            }
            "metrics" => {
                let m = (self.metrics)();
                let topic = m.topic.clone();
                self.queue.push_control(m);
                Ok(json!({"published": topic}))
            }
            "config" => {
                let config = self.config.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                Ok(redacted(config.source.as_ref()))
            }
            "help" => Ok(json!({"commands": COMMANDS})),
            other => Err(format!("unknown command {other:?}; commands: {}", COMMANDS.join(", "))),
        }
    }

    fn device_names(&self) -> String {
        self.devices.snapshot().iter().map(|d| d.name().to_string()).collect::<Vec<_>>().join(", ")
    }
}

/// The config as JSON with anything secret-looking replaced.
pub fn redacted(source: Option<&toml::Table>) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    let k = k.to_ascii_lowercase();
                    if ["password", "secret", "token", "credential"].iter().any(|s| k.contains(s)) || k.ends_with("key")
                    {
                        *v = Value::String("<redacted>".into());
                    } else {
                        walk(v);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut v = source.and_then(|t| serde_json::to_value(t).ok()).unwrap_or(Value::Null);
    walk(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_wherever_they_are() {
        let t: toml::Table = toml::from_str(
            "[mqtt]\nusername = \"gw\"\npassword_file = \"/etc/pw\"\n[tls]\nclient_key = \"/k\"\n[[device]]\napi_token = \"x\"\nname = \"a\"",
        )
        .unwrap();
        let v = redacted(Some(&t));
        assert_eq!(v["mqtt"]["username"], "gw");
        assert_eq!(v["mqtt"]["password_file"], "<redacted>");
        assert_eq!(v["tls"]["client_key"], "<redacted>");
        assert_eq!(v["device"][0]["api_token"], "<redacted>");
        assert_eq!(v["device"][0]["name"], "a");
    }
}
