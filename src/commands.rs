//! Incoming MQTT messages: Home Assistant's birth message (republish discovery) and, when
//! enabled, commands on `<prefix>/<gateway>/cmd/<name>` with a JSON body. A request for a known
//! command gets a response on `.../cmd/<name>/response` carrying the request's `id`, refusals
//! included. MQTT 3.1.1 has no response topic or correlation data, so both travel in the JSON.
//!
//! The trust model (README "Commands: the trust model"): whoever may publish to `cmd/#` may
//! run the allowed commands, and nothing more. Nothing they send can make the gateway publish
//! on a topic of their choosing (unknown names get no response at all), grow its memory
//! (requests and ids are capped, responses sit under a byte budget), replay itself (retained
//! requests are ignored) or keep a port cycling (restarts are limited per device). Every
//! refusal is counted by reason in the metrics (`commands.refused`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::command::Command;
use crate::device::Registry;
use crate::homeassistant::SharedDiscovery;
use crate::mqtt::Message;
use crate::queue::{Control, ReadingQueue};
use crate::topics::Topics;

/// Request bodies longer than this are refused unparsed: every command's body is a few dozen
/// bytes, and the incoming limit (256 KiB) is far more than we want to parse and log.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// A request `id` (a string of at most this many bytes, or a number) is echoed in the
/// response; anything else is refused, so a publisher cannot make us repeat a large value.
pub const MAX_ID_BYTES: usize = 128;
/// The command token bucket: this many at once, then one per [`COMMAND_REFILL`].
pub const COMMAND_BURST: u32 = 20;
pub const COMMAND_REFILL: Duration = Duration::from_millis(200);
/// At most one `restart_device` per device in this interval: a board that resets when its
/// port opens gets time to boot. The supervisor's own backoff applies on top.
pub const RESTART_INTERVAL: Duration = Duration::from_secs(10);
/// Command responses (with the other not-retained control messages) waiting to be sent, at
/// most: they go ahead of readings, so this bounds what readings can be held up by.
pub const RESPONSE_BUDGET: usize = 64 * 1024;
/// A `write` not started on the bus within this is answered as failed and never made.
pub const WRITE_START_WITHIN: Duration = Duration::from_secs(5);

/// Why a command message was refused or ignored. One counter per reason; the names are metric
/// keys (`commands.refused.<name>`) and stay stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A retained request: executing it again on every connect would replay it forever.
    /// Ignored, not answered.
    #[error("retained requests are ignored")]
    Retained,
    /// Not a command name (or a name too long for a response topic). Ignored, not answered:
    /// answering would let any publisher make us publish on topics of its choosing.
    #[error("unknown command")]
    Unknown,
    /// More commands than the token bucket allows.
    #[error("too many commands; try again later")]
    RateLimited,
    /// The body is longer than [`MAX_REQUEST_BYTES`].
    #[error("the request is longer than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    /// The body is not a JSON object, or its `id` is not a short string or a number.
    #[error("the body must be a JSON object whose \"id\", if any, is a number or a string of at most {MAX_ID_BYTES} bytes, e.g. {{\"id\":\"1\"}}")]
    BadRequest,
    /// A known command that `[commands] allow` leaves out.
    #[error("this command is not allowed on this gateway (see [commands] allow)")]
    NotAllowed,
    /// `restart_device` again within [`RESTART_INTERVAL`] for the same device.
    #[error("this device was restarted less than {}s ago; try again later", RESTART_INTERVAL.as_secs())]
    RestartTooSoon,
    /// `write` to a bus that already has [`crate::device::WRITES_WAITING`] writes waiting, or
    /// that is not running.
    #[error("the bus is busy with other writes or not running; try again later")]
    BusBusy,
    /// `write` that the slave refused (an exception) or did not confirm in time.
    #[error("the slave did not confirm the write")]
    WriteFailed,
}

impl Refusal {
    pub const ALL: [Self; 9] = [
        Self::Retained,
        Self::Unknown,
        Self::RateLimited,
        Self::TooLarge,
        Self::BadRequest,
        Self::NotAllowed,
        Self::RestartTooSoon,
        Self::BusBusy,
        Self::WriteFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retained => "retained",
            Self::Unknown => "unknown",
            Self::RateLimited => "rate_limited",
            Self::TooLarge => "too_large",
            Self::BadRequest => "bad_request",
            Self::NotAllowed => "not_allowed",
            Self::RestartTooSoon => "restart_too_soon",
            Self::BusBusy => "bus_busy",
            Self::WriteFailed => "write_failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Command counters; they outlive a reconnect or reload (one per process), so they only grow.
#[derive(Debug, Default)]
pub struct Stats {
    executed: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    responses_dropped: AtomicU64,
}

impl Stats {
    /// The metrics payload's `commands` object.
    pub fn snapshot(&self) -> crate::metrics::CommandMetrics {
        crate::metrics::CommandMetrics {
            executed: self.executed.load(Relaxed),
            refused: Refusal::ALL.iter().map(|r| (r.as_str(), self.refused[r.index()].load(Relaxed))).collect(),
            responses_dropped: self.responses_dropped.load(Relaxed),
        }
    }

    /// Counts a refusal; returns how many of its kind there have been, this one included.
    fn refused(&self, why: Refusal) -> u64 {
        self.refused[why.index()].fetch_add(1, Relaxed) + 1
    }
}

/// What the command task works with.
pub struct CommandContext {
    pub queue: Arc<ReadingQueue>,
    pub topics: Topics,
    pub devices: Arc<Registry>,
    pub discovery: SharedDiscovery,
    /// The commands that may run; empty when commands are off.
    pub allowed: Vec<Command>,
    /// The configuration in force (shown with secrets redacted).
    pub config: Arc<std::sync::RwLock<crate::config::Config>>,
    pub metrics: Box<dyn Fn() -> Control + Send + Sync>,
    pub stats: Arc<Stats>,
}

/// Handles incoming messages until `stop`.
pub async fn run(ctx: CommandContext, mut rx: mpsc::Receiver<Message>, stop: CancellationToken) {
    let mut limits = Limits::new(Instant::now());
    loop {
        let p = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            p = rx.recv() => match p {
                Some(p) => p,
                None => return,
            },
        };
        ctx.handle(&p, &mut limits);
    }
}

/// The rate limits' state, owned by the command task (a reconnect or reload starts afresh).
struct Limits {
    bucket: TokenBucket,
    /// When each device was last restarted by command; only names of configured devices get
    /// in, so this is bounded by the config.
    restarts: HashMap<String, Instant>,
    /// The bucket was empty at the last request: repeat refusals log at DEBUG, not WARN.
    limiting: bool,
}

impl Limits {
    fn new(now: Instant) -> Self {
        Self { bucket: TokenBucket::new(COMMAND_BURST, COMMAND_REFILL, now), restarts: HashMap::new(), limiting: false }
    }
}

/// `capacity` tokens, one more every `every`; one token per command.
struct TokenBucket {
    capacity: u32,
    tokens: u32,
    every: Duration,
    /// When the next token is earned (counted from here).
    last: Instant,
}

impl TokenBucket {
    fn new(capacity: u32, every: Duration, now: Instant) -> Self {
        Self { capacity, tokens: capacity, every, last: now }
    }

    fn take(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.last).as_nanos() / self.every.as_nanos().max(1);
        let earned = u32::try_from(earned).unwrap_or(u32::MAX);
        if earned > 0 {
            self.tokens = self.tokens.saturating_add(earned).min(self.capacity);
            // A full bucket earns nothing more: count afresh from now.
            self.last = if self.tokens == self.capacity { now } else { self.last + self.every * earned };
        }
        if self.tokens == 0 {
            return false;
        }
        if self.tokens == self.capacity {
            self.last = now;
        }
        self.tokens -= 1;
        true
    }
}

/// A response topic a request may name: publishable (no wildcards), not empty, and short
/// (the request itself is capped at 4 KiB).
fn valid_response_topic(t: &str) -> bool {
    !t.is_empty() && t.len() <= 1024 && !t.contains(['+', '#', '\0'])
}

impl CommandContext {
    fn handle(&self, p: &Message, limits: &mut Limits) {
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
        if self.allowed.is_empty() || name.contains('/') {
            return;
        }
        if p.retain {
            let n = self.stats.refused(Refusal::Retained);
            if n == 1 {
                let fix = "publish commands without the retain flag; clear this one with an empty retained message";
                tracing::warn!(topic = %p.topic, fix, "Ignoring a retained command request; later ones are only counted.");
            } else {
                tracing::debug!(topic = %p.topic, ignored = n, "Ignoring a retained command request.");
            }
            return;
        }
        // Unknown names get no response: answering would publish on a topic the sender chose.
        let Some(command) = Command::from_name(name) else {
            let n = self.stats.refused(Refusal::Unknown);
            tracing::debug!(name_len = name.len(), ignored = n, "Ignoring a request for an unknown command.");
            return;
        };
        let now = Instant::now();
        let (id, outcome) = if limits.bucket.take(now) {
            limits.limiting = false;
            match request_id(&p.payload) {
                Ok((id, body)) if self.allowed.contains(&command) => (id, self.execute(command, &body, limits, now)),
                Ok((id, _)) => (id, Err(Refused::from(Refusal::NotAllowed))),
                Err(why) => (Value::Null, Err(why.into())),
            }
        } else {
            (Value::Null, Err(Refusal::RateLimited.into()))
        };
        let outcome = match outcome {
            Ok(Done::Now(v)) => Ok(v),
            Err(e) => Err(e),
            Ok(Done::Later(pending)) => {
                // The answer comes from the bus; the command task goes on meanwhile.
                let responder = Responder::new(self, p, name);
                tokio::spawn(async move {
                    let outcome = pending.await;
                    responder.respond(id, outcome, &mut false);
                });
                return;
            }
        };
        Responder::new(self, p, name).respond(id, outcome, &mut limits.limiting);
    }
}

/// Sends the response to one request (now, or once a write is done).
struct Responder {
    queue: Arc<ReadingQueue>,
    stats: Arc<Stats>,
    name: String,
    topic: String,
    correlation: Option<Bytes>,
}

impl Responder {
    fn new(ctx: &CommandContext, p: &Message, name: &str) -> Self {
        // MQTT 5 requests may say where to answer (the broker's ACL for our user decides
        // where we may write); 3.1.1 ones are answered beside the request.
        let topic = match &p.response_topic {
            Some(t) if valid_response_topic(t) => t.clone(),
            _ => format!("{}{name}/response", ctx.topics.cmd),
        };
        Self {
            queue: Arc::clone(&ctx.queue),
            stats: Arc::clone(&ctx.stats),
            name: name.to_string(),
            topic,
            correlation: p.correlation_data.clone(),
        }
    }

    /// `limiting`: whether rate-limit refusals are already being logged (then at DEBUG).
    fn respond(self, id: Value, outcome: Result<Value, Refused>, limiting: &mut bool) {
        let name = self.name.as_str();
        let response = match &outcome {
            Ok(result) => {
                self.stats.executed.fetch_add(1, Relaxed);
                tracing::info!(command = name, id = %id, "Command executed.");
                json!({"id": id, "ok": true, "result": result})
            }
            Err(refused) => {
                let n = self.stats.refused(refused.why);
                let error = refused.to_string();
                if refused.why != Refusal::RateLimited || !std::mem::replace(limiting, true) {
                    tracing::warn!(command = name, id = %id, refused = n, error = %error, "Command refused.");
                } else {
                    tracing::debug!(command = name, refused = n, "Command refused: rate limited.");
                }
                json!({"id": id, "ok": false, "error": error})
            }
        };
        let payload = Bytes::from(response.to_string());
        let response = Control { topic: self.topic, payload, retain: false, correlation: self.correlation };
        if !self.queue.push_response(response, RESPONSE_BUDGET) {
            let n = self.stats.responses_dropped.fetch_add(1, Relaxed) + 1;
            tracing::warn!(command = name, dropped = n, "Too many command responses waiting; this one is dropped.");
        }
    }
}

/// A command's result: at once, or when the bus has done a write.
enum Done {
    Now(Value),
    Later(std::pin::Pin<Box<dyn std::future::Future<Output = Result<Value, Refused>> + Send>>),
}

impl CommandContext {
    fn execute(&self, command: Command, body: &Value, limits: &mut Limits, now: Instant) -> Result<Done, Refused> {
        if command == Command::Write {
            return self.write(body);
        }
        self.execute_now(command, body, limits, now).map(Done::Now)
    }

    /// `write`: checks the request against the slave's config here (a clear refusal at once),
    /// then hands it to the slave's bus, which writes between polls.
    fn write(&self, body: &Value) -> Result<Done, Refused> {
        let bad = |text: String| Refused::new(Refusal::BadRequest, text);
        let usage = "give {\"device\": \"…\", \"point\": \"…\", \"value\": …}";
        let (Some(device), Some(point), Some(value)) =
            (body.get("device").and_then(Value::as_str), body.get("point").and_then(Value::as_str), body.get("value"))
        else {
            return Err(bad(format!("{usage} (a writable point of a Modbus slave)")));
        };
        let dev = self.devices.snapshot().into_iter().find(|d| d.name() == device);
        let dev = dev.ok_or_else(|| bad(format!("no device {device:?}; devices: {}", self.device_names())))?;
        let result = dev.request_write(point, value, WRITE_START_WITHIN).map_err(|e| match e {
            crate::device::WriteRefused::BadRequest(text) => bad(text),
            crate::device::WriteRefused::BusBusy => Refusal::BusBusy.into(),
        })?;
        let reply = json!({"device": device, "point": point, "value": value});
        Ok(Done::Later(Box::pin(async move {
            match result.await {
                Ok(Ok(())) => Ok(reply),
                Ok(Err(e)) => Err(Refused::new(Refusal::WriteFailed, e)),
                // The bus session ended (port lost, reload) before the write was made.
                Err(_) => Err(Refused::new(Refusal::WriteFailed, "the bus stopped before the write was made".into())),
            }
        })))
    }

    fn execute_now(&self, command: Command, body: &Value, limits: &mut Limits, now: Instant) -> Result<Value, Refused> {
        match command {
            Command::Write => unreachable!("write is answered later, see `write`"),
            Command::RestartDevice => {
                let wanted = body.get("device").and_then(Value::as_str).ok_or_else(|| {
                    let names = self.device_names();
                    Refused::new(
                        Refusal::BadRequest,
                        format!("give the device to restart: {{\"device\": \"…\"}} (one of {names})"),
                    )
                })?;
                let dev = self.devices.snapshot().into_iter().find(|d| d.name() == wanted).ok_or_else(|| {
                    let names = self.device_names();
                    Refused::new(Refusal::BadRequest, format!("no device {wanted:?}; devices: {names}"))
                })?;
                if let Some(last) = limits.restarts.get(wanted) {
                    let since = now.duration_since(*last);
                    if since < RESTART_INTERVAL {
                        let wait = (RESTART_INTERVAL - since).as_secs_f64();
                        return Err(Refused::new(
                            Refusal::RestartTooSoon,
                            format!(
                                "{wanted:?} was restarted less than {}s ago; try again in {wait:.1}s",
                                RESTART_INTERVAL.as_secs()
                            ),
                        ));
                    }
                }
                limits.restarts.insert(wanted.to_string(), now);
                dev.restart.notify_one();
                Ok(json!({"device": wanted}))
            }
            Command::Metrics => {
                let m = (self.metrics)();
                let topic = m.topic.clone();
                self.queue.push_control(m);
                Ok(json!({"published": topic}))
            }
            Command::Config => {
                let config = self.config.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                Ok(redacted(config.source.as_ref()))
            }
            Command::Help => Ok(json!({"commands": self.allowed.iter().map(|c| c.as_str()).collect::<Vec<_>>()})),
            Command::Record => self.record(body),
        }
    }

    /// `record`: `{"device": …, "seconds": 1..=3600 (default 60), "max_bytes": up to 64 MiB
    /// (default 16 MiB)}` records the device's port into `<state_dir>/captures/`.
    fn record(&self, body: &Value) -> Result<Value, Refused> {
        let bad = |text: String| Refused::new(Refusal::BadRequest, text);
        let device = body.get("device").and_then(Value::as_str).ok_or_else(|| {
            bad(format!("give {{\"device\": \"…\", \"seconds\": 60}} (one of {})", self.device_names()))
        })?;
        let seconds = body.get("seconds").map_or(Some(60), Value::as_u64).filter(|s| (1..=3600).contains(s));
        let seconds = seconds.ok_or_else(|| bad("seconds: a whole number from 1 to 3600".into()))?;
        let max_bytes =
            body.get("max_bytes").map_or(Some(16 << 20), Value::as_u64).filter(|b| (1..=64 << 20).contains(b));
        let max_bytes = max_bytes.ok_or_else(|| bad("max_bytes: from 1 to 67108864".into()))?;
        let dev = self.devices.snapshot().into_iter().find(|d| d.name() == device);
        let dev = dev.ok_or_else(|| bad(format!("no device {device:?}; devices: {}", self.device_names())))?;
        if !matches!(dev.config.input, crate::config::Input::Stream(_)) {
            return Err(bad(format!("{device:?} is polled on a bus; only a listening device's port can be recorded")));
        }
        let dir =
            self.config.read().unwrap_or_else(std::sync::PoisonError::into_inner).gateway.state_dir().join("captures");
        let file =
            dev.recorder.start(&dir, device, &dev.config.port, Duration::from_secs(seconds), max_bytes).map_err(bad)?;
        Ok(json!({"device": device, "file": file.display().to_string(), "seconds": seconds, "max_bytes": max_bytes}))
    }

    fn device_names(&self) -> String {
        self.devices.snapshot().iter().map(|d| d.name().to_string()).collect::<Vec<_>>().join(", ")
    }
}

/// A refusal with the text the requester sees (the reason's own, or a more specific one).
struct Refused {
    why: Refusal,
    text: Option<String>,
}

impl Refused {
    fn new(why: Refusal, text: String) -> Self {
        Self { why, text: Some(text) }
    }
}

impl From<Refusal> for Refused {
    fn from(why: Refusal) -> Self {
        Self { why, text: None }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.text {
            Some(t) => f.write_str(t),
            None => write!(f, "{}", self.why),
        }
    }
}

/// The request's `id` (null if absent) and body. An empty payload is an empty body.
fn request_id(payload: &[u8]) -> Result<(Value, Value), Refusal> {
    if payload.len() > MAX_REQUEST_BYTES {
        return Err(Refusal::TooLarge);
    }
    if payload.is_empty() {
        return Ok((Value::Null, json!({})));
    }
    let body = match serde_json::from_slice::<Value>(payload) {
        Ok(body @ Value::Object(_)) => body,
        _ => return Err(Refusal::BadRequest),
    };
    let id = match body.get("id") {
        None | Some(Value::Null) => Value::Null,
        Some(id @ Value::Number(_)) => id.clone(),
        Some(id @ Value::String(s)) if s.len() <= MAX_ID_BYTES => id.clone(),
        Some(_) => return Err(Refusal::BadRequest),
    };
    Ok((id, body))
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
    use crate::config::Config;
    use crate::device::DeviceRuntime;
    use crate::queue::Outbound;

    const BASE: &str = "[gateway]\nid = \"gw\"\n[[device]]\nname = \"a\"\npath = \"/dev/a\"\nframing = \"lines\"\n[[device]]\nname = \"b\"\npath = \"/dev/b\"\nframing = \"lines\"\n";

    /// A command context over a real queue and registry, with `commands` as its `[commands]`.
    fn context(commands: &str) -> CommandContext {
        let config = Config::from_toml(&format!("{BASE}[commands]\n{commands}\n")).unwrap();
        let topics = Topics::new(&config);
        let devices = Registry::default();
        let runtimes = config.devices.iter().enumerate();
        devices.set(
            runtimes
                .map(|(i, d)| {
                    Arc::new(DeviceRuntime::new(
                        i,
                        d.clone(),
                        format!("state/{i}"),
                        crate::reading::PacketLimit::new(1 << 20),
                    ))
                })
                .collect(),
        );
        let metrics = topics.metrics.clone();
        CommandContext {
            queue: Arc::new(ReadingQueue::new(2, 100, 1 << 20, None, 10)),
            topics,
            devices: Arc::new(devices),
            discovery: Arc::default(),
            allowed: config.commands.allowed(),
            config: Arc::new(std::sync::RwLock::new(config)),
            metrics: Box::new(move || Control {
                topic: metrics.clone(),
                payload: Bytes::new(),
                retain: false,
                correlation: None,
            }),
            stats: Arc::default(),
        }
    }

    fn request(name: &str, payload: impl Into<Vec<u8>>, retain: bool) -> Message {
        Message {
            topic: format!("sensorgate/gw/cmd/{name}"),
            payload: Bytes::from(payload.into()),
            retain,
            response_topic: None,
            correlation_data: None,
        }
    }

    /// Every response queued so far: (command name, response JSON); other messages skipped.
    fn responses(ctx: &CommandContext) -> Vec<(String, Value)> {
        std::iter::from_fn(|| ctx.queue.pop_next())
            .filter_map(|o| match o {
                Outbound::Control(c) if c.topic.ends_with("/response") => {
                    let name = c.topic.strip_prefix("sensorgate/gw/cmd/")?.strip_suffix("/response")?.to_string();
                    Some((name, serde_json::from_slice(&c.payload).unwrap()))
                }
                _ => None,
            })
            .collect()
    }

    fn refused(ctx: &CommandContext, why: Refusal) -> u64 {
        ctx.stats.snapshot().refused[why.as_str()]
    }

    #[tokio::test(start_paused = true)]
    async fn retained_requests_are_ignored_and_counted() {
        let (ctx, mut limits) = (context("enabled = true"), Limits::new(Instant::now()));
        ctx.handle(&request("restart_device", r#"{"device":"a"}"#, true), &mut limits);
        ctx.handle(&request("help", "", true), &mut limits);
        assert_eq!(responses(&ctx), []);
        assert_eq!(refused(&ctx, Refusal::Retained), 2);
        ctx.handle(&request("help", r#"{"id":1}"#, false), &mut limits);
        assert_eq!(responses(&ctx)[0].1["ok"], true);
        assert_eq!(ctx.stats.snapshot().executed, 1);
    }

    /// MQTT 5: a request that names a response topic and correlation data is answered there,
    /// with the same correlation data; an unusable response topic falls back to `…/response`.
    #[tokio::test(start_paused = true)]
    async fn mqtt5_requests_are_answered_on_their_response_topic() {
        let (ctx, mut limits) = (context("enabled = true"), Limits::new(Instant::now()));
        let mut r = request("help", r#"{"id":1}"#, false);
        r.response_topic = Some("clients/c1/replies".into());
        r.correlation_data = Some(Bytes::from_static(b"req-7"));
        ctx.handle(&r, &mut limits);
        r.response_topic = Some("clients/+/replies".into());
        ctx.handle(&r, &mut limits);
        let sent: Vec<(String, Option<Bytes>)> = std::iter::from_fn(|| ctx.queue.pop_next())
            .filter_map(|o| match o {
                Outbound::Control(c) => Some((c.topic, c.correlation)),
                Outbound::Reading { .. } => None,
            })
            .collect();
        let corr = Some(Bytes::from_static(b"req-7"));
        assert_eq!(
            sent,
            [("clients/c1/replies".to_string(), corr.clone()), ("sensorgate/gw/cmd/help/response".to_string(), corr)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_names_get_no_response_whatever_their_length() {
        let (ctx, mut limits) = (context("enabled = true"), Limits::new(Instant::now()));
        ctx.handle(&request("self_destruct", r#"{"id":"x"}"#, false), &mut limits);
        // With "/response" appended this no longer fits an MQTT string (65,535 bytes).
        ctx.handle(&request(&"x".repeat(65_530), "", false), &mut limits);
        assert_eq!(responses(&ctx), []);
        assert_eq!(refused(&ctx, Refusal::Unknown), 2);
        // Unknown requests cost no token: the whole burst is still there.
        for _ in 0..COMMAND_BURST {
            ctx.handle(&request("help", "", false), &mut limits);
        }
        assert!(responses(&ctx).iter().all(|(_, r)| r["ok"] == true));
    }

    #[tokio::test(start_paused = true)]
    async fn large_requests_and_ids_are_refused_without_echoing_them() {
        let (ctx, mut limits) = (context("enabled = true"), Limits::new(Instant::now()));
        let big_id = "i".repeat(MAX_REQUEST_BYTES);
        ctx.handle(&request("help", format!(r#"{{"id":"{big_id}"}}"#), false), &mut limits);
        let long_id = "i".repeat(MAX_ID_BYTES + 1);
        ctx.handle(&request("help", format!(r#"{{"id":"{long_id}"}}"#), false), &mut limits);
        ctx.handle(&request("help", r#"{"id":{"nested":[1,2,3]}}"#, false), &mut limits);
        ctx.handle(&request("help", "[1]", false), &mut limits);
        let longest_id = "i".repeat(MAX_ID_BYTES);
        ctx.handle(&request("help", format!(r#"{{"id":"{longest_id}"}}"#), false), &mut limits);
        let r = responses(&ctx);
        assert_eq!(r.len(), 5);
        for (_, refusal) in &r[..4] {
            assert_eq!((&refusal["id"], &refusal["ok"]), (&Value::Null, &Value::Bool(false)), "{refusal}");
            assert!(refusal.to_string().len() < 300, "{refusal}");
        }
        assert!(r[0].1["error"].as_str().unwrap().contains("longer than 4096 bytes"), "{}", r[0].1);
        assert!(r[1].1["error"].as_str().unwrap().contains("at most 128 bytes"), "{}", r[1].1);
        assert_eq!((r[4].1["id"].as_str(), r[4].1["ok"].as_bool()), (Some(&*longest_id), Some(true)));
        assert_eq!((refused(&ctx, Refusal::TooLarge), refused(&ctx, Refusal::BadRequest)), (1, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn commands_beyond_the_token_bucket_are_refused_until_tokens_are_earned() {
        let (ctx, mut limits) = (context("enabled = true"), Limits::new(Instant::now()));
        let ask = |limits: &mut Limits, n: u32| {
            for _ in 0..n {
                ctx.handle(&request("help", "", false), limits);
            }
            let r = responses(&ctx);
            (r.iter().filter(|(_, r)| r["ok"] == true).count(), r.iter().filter(|(_, r)| r["ok"] == false).count())
        };
        assert_eq!(ask(&mut limits, COMMAND_BURST + 5), (COMMAND_BURST as usize, 5));
        tokio::time::advance(COMMAND_REFILL * 3 - Duration::from_millis(1)).await;
        assert_eq!(ask(&mut limits, 4), (2, 2));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(ask(&mut limits, 2), (1, 1));
        // A long quiet spell refills the bucket, but only up to the burst.
        tokio::time::advance(COMMAND_REFILL * 1000).await;
        assert_eq!(ask(&mut limits, COMMAND_BURST + 1), (COMMAND_BURST as usize, 1));
        assert_eq!(refused(&ctx, Refusal::RateLimited), 9);
        let last = responses_after(&ctx, &mut limits);
        assert!(last["error"].as_str().unwrap().contains("too many commands"), "{last}");
    }

    fn responses_after(ctx: &CommandContext, limits: &mut Limits) -> Value {
        ctx.handle(&request("help", "", false), limits);
        responses(ctx).pop().unwrap().1
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_is_restarted_at_most_once_per_interval() {
        let (ctx, mut limits) = (context("enabled = true"), Limits::new(Instant::now()));
        let restart = |limits: &mut Limits, dev: &str| {
            ctx.handle(&request("restart_device", format!(r#"{{"device":"{dev}"}}"#), false), limits);
            responses(&ctx).pop().unwrap().1
        };
        let restarted = |dev: usize| {
            let d = &ctx.devices.snapshot()[dev];
            let n = std::pin::pin!(d.restart.notified());
            // A stored permit completes `notified` at its first poll.
            futures_poll_once(n)
        };
        assert_eq!(restart(&mut limits, "a")["ok"], true);
        assert!(restarted(0));
        let again = restart(&mut limits, "a");
        assert_eq!(again["ok"], false);
        assert!(again["error"].as_str().unwrap().contains("try again in 10.0s"), "{again}");
        assert!(!restarted(0));
        // Another device has its own interval.
        assert_eq!(restart(&mut limits, "b")["ok"], true);
        tokio::time::advance(RESTART_INTERVAL - Duration::from_millis(1)).await;
        assert_eq!(restart(&mut limits, "a")["ok"], false);
        assert!(!restarted(0));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(restart(&mut limits, "a")["ok"], true);
        assert!(restarted(0));
        assert_eq!(refused(&ctx, Refusal::RestartTooSoon), 2);
        assert_eq!(ctx.stats.snapshot().executed, 3);
    }

    /// Polls a future once with a no-op waker: true if it completed.
    fn futures_poll_once(f: std::pin::Pin<&mut impl std::future::Future>) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        f.poll(&mut cx).is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn only_allowed_commands_run_and_help_lists_them() {
        let (ctx, mut limits) =
            (context("enabled = true\nallow = [\"help\", \"metrics\"]"), Limits::new(Instant::now()));
        ctx.handle(&request("restart_device", r#"{"id":"r","device":"a"}"#, false), &mut limits);
        ctx.handle(&request("help", r#"{"id":"h"}"#, false), &mut limits);
        let r = responses(&ctx);
        assert_eq!(r[0].0, "restart_device");
        assert_eq!((r[0].1["id"].as_str(), r[0].1["ok"].as_bool()), (Some("r"), Some(false)));
        assert!(r[0].1["error"].as_str().unwrap().contains("not allowed"), "{}", r[0].1);
        assert!(!futures_poll_once(std::pin::pin!(ctx.devices.snapshot()[0].restart.notified())));
        assert_eq!(r[1].1["result"]["commands"], json!(["metrics", "help"]));
        assert_eq!(refused(&ctx, Refusal::NotAllowed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn responses_waiting_stay_under_the_byte_budget() {
        // A `config` response is as large as the config: a long (valid) log filter makes it 4 KiB.
        let big = format!("enabled = true\n[log]\nfilter = \"info,{}=debug\"", "m".repeat(4000));
        let (ctx, mut limits) = (context(&big), Limits::new(Instant::now()));
        for _ in 0..COMMAND_BURST {
            ctx.handle(&request("config", "", false), &mut limits);
        }
        let dropped = ctx.stats.snapshot().responses_dropped;
        let r = responses(&ctx);
        let size = "sensorgate/gw/cmd/config/response".len() + r[0].1.to_string().len();
        assert!(size > 4000, "{size}");
        assert_eq!(r.len(), RESPONSE_BUDGET / size);
        assert_eq!(dropped, u64::from(COMMAND_BURST) - r.len() as u64);
        assert!(dropped > 0);
    }

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
