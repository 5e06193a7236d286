//! The MQTT side of `status`: one connection of its own (the project's handshake and codec),
//! subscribe, gather until the report is complete or time runs out, print. Every step has a
//! deadline; it never publishes anything, and its will cannot touch the gateway's topics.

use std::future::Future;
use std::io::{self, Write};
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::{Colour, Observation, StatusTopics, Unreachable, Update, Verdict};
use crate::config::Config;
use crate::mqtt::codec::{self, ConnectSpec, Incoming, Read, Reader, Version};
use crate::mqtt::connect::{self, Stream};
use crate::mqtt::{ConnectionError, TcpConnector, MAX_INCOMING};

/// Our keep-alive; a PINGREQ goes out after half of it without one.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// A write the broker does not take within this ends the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// `--watch`: the wait before connecting again after the connection failed.
const RECONNECT_AFTER: Duration = Duration::from_secs(2);
const SUBSCRIBE_PKID: u16 = 1;

/// Which gateway, on which broker, and how to reach it.
pub struct Target {
    pub connector: TcpConnector,
    pub version: Version,
    pub login: Option<(String, String)>,
    pub topics: StatusTopics,
    /// The devices of the gateway's config, when `status` read it.
    pub configured: Vec<String>,
    /// The gateway's `metrics_interval`, when known from its config: with one metrics
    /// message in hand, `status` does not wait for a second that cannot come in time.
    pub metrics_interval: Option<Duration>,
}

impl Target {
    /// Everything from the gateway's config: broker, TLS, credentials, prefix, gateway id.
    ///
    /// # Errors
    /// A credential or certificate file cannot be read.
    pub fn from_config(config: &Config) -> io::Result<Self> {
        let topics = crate::topics::Topics::new(config);
        let (opts, connector) = crate::mqtt::ConnectOptions::new(config, &topics)?;
        Ok(Self {
            connector,
            version: opts.version,
            login: opts.login,
            topics: StatusTopics::new(&config.mqtt.topic_prefix, &config.gateway.id),
            configured: config.all_devices().iter().map(|d| d.name.clone()).collect(),
            metrics_interval: Some(config.gateway.metrics_interval),
        })
    }

    /// Plain TCP, MQTT 3.1.1, no login.
    pub fn plain(host: String, port: u16, prefix: &str, gateway: &str) -> Self {
        Self {
            connector: TcpConnector { host, port, tls: None },
            version: Version::V311,
            login: None,
            topics: StatusTopics::new(prefix, gateway),
            configured: Vec::new(),
            metrics_interval: None,
        }
    }
}

/// How to show it.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Bounds the whole run (one-shot), or each connection attempt and the first screen (`--watch`).
    pub timeout: Duration,
    pub json: bool,
    pub colour: Colour,
    pub watch: bool,
}

/// Runs `status` and prints to `out`; returns the verdict (the exit status). `shutdown` ends
/// `--watch` (a one-shot run does not wait on it).
pub async fn run(
    target: &Target,
    options: Options,
    shutdown: impl Future<Output = ()>,
    out: &mut dyn Write,
) -> Verdict {
    let started = Instant::now();
    let mut obs = Observation::new(target.topics.clone(), target.configured.clone());
    if options.watch {
        return watch(target, options, shutdown, out, &mut obs, started).await;
    }
    match once(target, options.timeout, &mut obs, started).await {
        Ok(()) => {
            let report = obs.report(SystemTime::now(), started.elapsed());
            let text = if options.json { report.json() + "\n" } else { report.table(options.colour) };
            let _ = out.write_all(text.as_bytes());
            report.verdict
        }
        Err(e) => unreachable_broker(target, &e, options.json, out),
    }
}

fn unreachable_broker(target: &Target, e: &ConnectionError, json: bool, out: &mut dyn Write) -> Verdict {
    let u = Unreachable::new(connect::Connector::describe(&target.connector), e.to_string());
    eprintln!("sensorgate status: cannot read the gateway's status from the broker at {}: {}", u.broker, u.error);
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string(&u).expect("serialises"));
    }
    u.verdict
}

/// Connects, gathers until the report is complete or the timeout, disconnects.
async fn once(
    target: &Target,
    timeout: Duration,
    obs: &mut Observation,
    started: Instant,
) -> Result<(), ConnectionError> {
    let deadline = Instant::now() + timeout;
    let gather = async {
        let mut conn = Conn::open(target, timeout).await?;
        let mut barrier = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if obs.complete(barrier, left, target.metrics_interval) {
                break;
            }
            match conn.next(deadline).await? {
                Some(packet) => barrier |= conn.handle(packet, obs, started).await?.1,
                None => break,
            }
        }
        conn.disconnect().await;
        Ok(())
    };
    match tokio::time::timeout_at(deadline, gather).await {
        Ok(r) => r,
        // Time ran out in the middle of a write: what arrived so far is the report.
        Err(_) if obs.gateway_state().is_some() || obs.metrics_seen() > 0 => Ok(()),
        Err(_) => Err(ConnectionError::Timeout("reading the gateway's status")),
    }
}

/// `--watch`: redraws on every metrics message and state change until `shutdown`;
/// reconnects when the connection fails.
async fn watch(
    target: &Target,
    options: Options,
    shutdown: impl Future<Output = ()>,
    out: &mut dyn Write,
    obs: &mut Observation,
    started: Instant,
) -> Verdict {
    tokio::pin!(shutdown);
    let tty = options.colour == Colour::On || std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut verdict = Verdict::Unreachable;
    let draw = |obs: &Observation, out: &mut dyn Write| {
        let report = obs.report(SystemTime::now(), started.elapsed());
        // Clear the screen and home the cursor (as `top` does); piped, one table after another.
        let clear = if tty { "\x1b[H\x1b[2J" } else { "" };
        let _ = writeln!(out, "{clear}{}", report.table(options.colour));
        let _ = out.flush();
        report.verdict
    };
    loop {
        let session = async {
            let mut conn = Conn::open(target, options.timeout).await?;
            let first_screen = Instant::now() + options.timeout;
            let mut barrier = false;
            let mut drawn = false;
            loop {
                let until = if drawn { Instant::now() + KEEP_ALIVE } else { first_screen };
                match conn.next(until).await? {
                    Some(packet) => {
                        let (update, ping) = conn.handle(packet, obs, started).await?;
                        barrier |= ping;
                        if drawn && update != Update::Ignored {
                            verdict = draw(obs, out);
                        }
                    }
                    None if drawn => continue,
                    None => {}
                }
                // The first screen waits for the retained states and one metrics message.
                let complete = obs.complete(barrier, Duration::ZERO, Some(Duration::ZERO));
                if !drawn && (complete || Instant::now() >= first_screen) {
                    verdict = draw(obs, out);
                    drawn = true;
                }
            }
            #[allow(unreachable_code)] // The loop ends only with an error (or at shutdown, outside).
            Ok::<(), ConnectionError>(())
        };
        let result = tokio::select! {
            biased;
            _ = &mut shutdown => return verdict,
            r = session => r,
        };
        if let Err(e) = result {
            verdict = unreachable_broker(target, &e, false, out);
            let _ = writeln!(out, "(connecting again in {}s; Ctrl-C to stop)", RECONNECT_AFTER.as_secs());
            let _ = out.flush();
        }
        tokio::select! {
            biased;
            _ = &mut shutdown => return verdict,
            _ = tokio::time::sleep(RECONNECT_AFTER) => {}
        }
    }
}

/// One connection to the broker, read and written here only.
struct Conn {
    stream: Box<dyn Stream>,
    buf: BytesMut,
    reader: Reader,
    /// When the next PINGREQ is due, and whether one is unanswered.
    ping_due: Instant,
    ping_outstanding: bool,
    /// The filters, by position, for naming a refused one.
    filters: Vec<String>,
}

impl Conn {
    /// CONNECT (own client id, clean session, a harmless will), SUBSCRIBE, then a PINGREQ
    /// whose answer comes after the retained messages the broker sends for the subscription.
    async fn open(target: &Target, timeout: Duration) -> Result<Self, ConnectionError> {
        let pid = std::process::id();
        let client_id = format!("sensorgate-status-{pid}");
        // The codec's CONNECT always carries a will. Ours goes to a topic of its own, not
        // retained: the gateway's `offline` will must never be imitated by a tool going away.
        let will_topic = format!("{}/status-tool/{pid}", target.topics.base);
        let spec = ConnectSpec {
            client_id: &client_id,
            keep_alive_s: KEEP_ALIVE.as_secs() as u16,
            login: target.login.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
            will_topic: &will_topic,
            will_payload: b"",
            will_retain: false,
            receive_max: 64,
            max_incoming: MAX_INCOMING,
        };
        let hs = connect::handshake(&target.connector, target.version, &spec, timeout).await?;
        let filters = target.topics.filters();
        let mut conn = Self {
            stream: hs.stream,
            buf: hs.leftover,
            reader: Reader::new(target.version, MAX_INCOMING),
            ping_due: Instant::now() + KEEP_ALIVE / 2,
            ping_outstanding: true,
            filters,
        };
        let mut out = BytesMut::new();
        codec::put_subscribe(&mut out, target.version, SUBSCRIBE_PKID, &conn.filters)
            .map_err(|e| ConnectionError::Protocol(e.to_string()))?;
        codec::put_pingreq(&mut out);
        conn.write(&out).await?;
        Ok(conn)
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ConnectionError> {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ConnectionError::Timeout("writing to the broker")),
        }
    }

    /// The next packet, or `None` at `until`. Pings the broker when due; a PINGREQ still
    /// unanswered when the next is due ends the connection.
    async fn next(&mut self, until: Instant) -> Result<Option<Incoming>, ConnectionError> {
        loop {
            match self.reader.next(&mut self.buf).map_err(|e| ConnectionError::Protocol(e.to_string()))? {
                Some(Read::Packet(p)) => {
                    if p == Incoming::PingResp {
                        self.ping_outstanding = false;
                    }
                    return Ok(Some(p));
                }
                Some(Read::Skipped(s)) => {
                    // Too large to be ours (a metrics message is far smaller); acknowledged anyway.
                    if let Some(pkid) = s.puback {
                        self.puback(pkid).await?;
                    }
                    continue;
                }
                None => {}
            }
            let wake = until.min(self.ping_due);
            match tokio::time::timeout_at(wake, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) => return Err(ConnectionError::Closed),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) if Instant::now() >= until => return Ok(None),
                Err(_) => {
                    if self.ping_outstanding {
                        return Err(ConnectionError::Timeout("PINGRESP"));
                    }
                    let mut b = BytesMut::new();
                    codec::put_pingreq(&mut b);
                    self.write(&b).await?;
                    self.ping_outstanding = true;
                    self.ping_due = Instant::now() + KEEP_ALIVE / 2;
                }
            }
        }
    }

    async fn puback(&mut self, pkid: u16) -> Result<(), ConnectionError> {
        let mut b = BytesMut::new();
        codec::put_puback(&mut b, pkid);
        self.write(&b).await
    }

    /// Acts on one packet: what it changed, and whether it was a PINGRESP (the first one
    /// follows the retained messages).
    async fn handle(
        &mut self,
        packet: Incoming,
        obs: &mut Observation,
        started: Instant,
    ) -> Result<(Update, bool), ConnectionError> {
        match packet {
            Incoming::Publish { pkid, qos1, message } => {
                if qos1 {
                    self.puback(pkid).await?;
                }
                Ok((obs.take(&message.topic, &message.payload, started.elapsed()), false))
            }
            Incoming::SubAck { refused, .. } if !refused.is_empty() => {
                let names: Vec<String> = refused
                    .iter()
                    .map(|(i, code)| format!("{} ({code})", self.filters.get(*i).map_or("?", String::as_str)))
                    .collect();
                Err(ConnectionError::Refused(format!("subscription refused: {}", names.join(", "))))
            }
            Incoming::PingResp => Ok((Update::Ignored, true)),
            Incoming::Disconnect { reason } => Err(ConnectionError::ClosedWithReason(reason)),
            _ => Ok((Update::Ignored, false)),
        }
    }

    /// DISCONNECT (the broker discards our will), briefly: the report does not wait on it.
    async fn disconnect(mut self) {
        let mut b = BytesMut::new();
        codec::put_disconnect(&mut b);
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            let _ = self.stream.write_all(&b).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}
