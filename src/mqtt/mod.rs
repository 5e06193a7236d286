//! The broker side: one connection task owns the socket. It connects (TCP, optionally TLS),
//! writes readings from the queue in batches — one socket write for everything that is ready,
//! up to the in-flight window — reads acknowledgements, pings, reconnects with backoff.
//!
//! Why not rumqttc's `EventLoop`: it flushes the socket after every single publish (one write
//! syscall and two task wake-ups per reading, about half the gateway's CPU at 16k readings/s),
//! and its own buffers are unbounded on disconnect and forgotten when the broker has no
//! session. Here the queue's ledger is the only record of what is in flight, packet ids are
//! assigned as readings are written, and nothing is buffered outside the queue but the bytes
//! of the batch being written. rumqttc is still used for its MQTT 3.1.1 and 5 codecs.
//!
//! Layout: [`connect`] opens the transport (the [`Connector`] seam: TCP, TLS, or an in-memory
//! stream in tests) and does the handshake; [`session`] runs one connection; [`codec`] turns
//! packets into bytes and back. This module owns the reconnect loop and the shared counters.

pub mod codec;
pub mod connect;
mod pace;
mod session;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use codec::{Message, Version};
pub use connect::{Connector, TcpConnector};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::liveness::{self, Beat};
use crate::queue::{Control, ReadingQueue};
use crate::topics::Topics;
use session::Session;

/// A connection closed sooner than this after CONNACK was kicked, not lost.
const KICKED_WITHIN: Duration = Duration::from_secs(3);
/// Kicked this many times in a row: another client is using our client id.
const KICKS_FOR_COLLISION: u64 = 3;
/// A connection that lasted this long was healthy: backoff starts over.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Largest packet accepted from the broker; larger ones are skipped and counted.
pub const MAX_INCOMING: usize = 256 * 1024;
/// A refused TCP connection (nothing listens: the broker is restarting) costs nothing to
/// retry, so it is retried within a second for this long, not after a growing backoff.
const FAST_RETRY_FOR: Duration = Duration::from_secs(5 * 60);
/// The delay between such retries: drawn from this range, so a fleet does not retry in step.
const FAST_RETRY: (Duration, Duration) = (Duration::from_millis(250), Duration::from_millis(900));

/// The connection as others see it; `generation` counts connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Link {
    pub up: bool,
    pub generation: u64,
}

/// One message a [`Profile`] has the connection send: QoS 0, not retained.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// A last will: QoS 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// An output profile that decides itself what goes on the wire (Sparkplug B): its will,
/// subscriptions, births and deaths, and what a reading becomes. The connection keeps doing
/// the rest (batched writes, pings, reconnects, the ledger). Without one, a connection
/// publishes the JSON profile: readings as they are, the queue's control messages, and
/// `online` / `offline`. A profile's publishes are QoS 0, and its readings count as delivered
/// once written, as QoS 0 readings do.
pub trait Profile: Send {
    /// The will of the next connection attempt; `reused`: the previous attempt's will never
    /// reached a broker (nothing listened), so the same will may be sent again.
    fn will(&mut self, reused: bool) -> Will;
    /// Filters to subscribe to on every connection, before anything is published.
    fn subscriptions(&self) -> Vec<String>;
    fn connected(&mut self);
    fn disconnected(&mut self);
    /// Whether readings may be taken from the queue now (else they wait there).
    fn may_publish(&self) -> bool;
    /// Publishes due now, whatever the readings (births, deaths, node data).
    fn due(&mut self, out: &mut Vec<Publish>);
    /// The publishes of one reading of queue lane `lane` (a device; the profile knows its
    /// queue and names it); false when it cannot be published at all (dropped, and the
    /// profile counts and logs it).
    fn reading(&mut self, lane: usize, payload: &[u8], out: &mut Vec<Publish>) -> bool;
    /// A message on one of the subscriptions.
    fn incoming(&mut self, message: &Message);
    /// The last publish before a clean disconnect.
    fn farewell(&mut self) -> Option<Publish>;
}

/// Why a connection attempt failed or a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("connection refused by the broker: {0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("the broker closed the connection")]
    Closed,
    #[error("the broker closed the connection: {0}")]
    ClosedWithReason(String),
}

impl ConnectionError {
    /// A TLS handshake failure (certificate unknown, expired, for another name): rustls'
    /// error inside the I/O error.
    fn is_tls(&self) -> bool {
        matches!(self, ConnectionError::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()))
    }

    /// Nothing listens at the broker's address (TCP RST): it is restarting or not up yet.
    fn is_refused_tcp(&self) -> bool {
        matches!(self, ConnectionError::Io(e) if e.kind() == io::ErrorKind::ConnectionRefused)
    }

    /// The broker hung up on us (rather than a timeout of ours): what it last read from us
    /// may be what it objects to.
    fn broker_hung_up(&self) -> bool {
        match self {
            ConnectionError::Closed => true,
            // MQTT 5 names a takeover: another client with our id, not something we sent.
            ConnectionError::ClosedWithReason(reason) => reason != "SessionTakenOver",
            ConnectionError::Io(e) => {
                matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
                )
            }
            _ => false,
        }
    }
}

/// How to reach the broker and talk to it; built once per configuration.
#[derive(Clone)]
pub struct ConnectOptions {
    pub client_id: String,
    pub version: Version,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    pub login: Option<(String, String)>,
    pub inflight: u16,
    pub will_topic: String,
    /// The largest packet we send (the broker's own limit, when MQTT 5 tells it, also applies).
    pub max_packet_size: usize,
    /// MQTT 5 Message Expiry Interval on readings (from `queue.max_age`).
    pub expiry_s: Option<u32>,
}

impl ConnectOptions {
    /// Reads the password file and builds the TLS configuration: the options and the
    /// connector for this configuration.
    ///
    /// # Errors
    /// A credential or certificate file cannot be read.
    pub fn new(config: &Config, topics: &Topics) -> io::Result<(Self, TcpConnector)> {
        let m = &config.mqtt;
        let login = match &m.username {
            Some(user) => Some((user.clone(), m.password()?.unwrap_or_default())),
            None => None,
        };
        let tls = m.tls.as_ref().map(|t| t.client_config().map(Arc::new)).transpose()?;
        let opts = Self {
            client_id: config.client_id(),
            version: if m.version == 5 { Version::V5 } else { Version::V311 },
            keep_alive: m.keep_alive,
            connect_timeout: m.connect_timeout,
            login,
            inflight: m.inflight,
            will_topic: topics.state.clone(),
            max_packet_size: usize::try_from(m.max_packet_size).unwrap_or(usize::MAX),
            expiry_s: config.queue.max_age.map(|a| u32::try_from(a.as_secs().max(1)).unwrap_or(u32::MAX)),
        };
        Ok((opts, TcpConnector { host: m.host.clone(), port: m.port, tls }))
    }

    /// Options for tests of the protocol: no login, no TLS, 3.1.1.
    #[cfg(test)]
    pub fn for_tests(inflight: u16) -> Self {
        Self {
            client_id: "test".into(),
            version: Version::V311,
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            login: None,
            inflight,
            will_topic: "sg/gw/state".into(),
            max_packet_size: codec::PROTOCOL_MAX_PACKET,
            expiry_s: None,
        }
    }
}

/// The tokens that end a connection task, by role.
#[derive(Clone, Default)]
pub struct Stops {
    /// Shutdown: empty the queue, send the final messages and `offline`, disconnect.
    pub draining: CancellationToken,
    /// A reload replaces the connection: disconnect at once, cleanly.
    pub switching: CancellationToken,
    /// Stop now, whatever is left.
    pub hard_stop: CancellationToken,
}

/// State shared by the connection task and the rest of the gateway.
pub struct MqttShared {
    pub queue: Arc<ReadingQueue>,
    pub topics: Topics,
    pub qos: QoS,
    connected: watch::Sender<Link>,
    /// Retained gateway and device state to send on every (re)connect.
    on_connect: Box<dyn Fn() -> Vec<Control> + Send + Sync>,
    /// The last messages before `offline` at shutdown (the final metrics).
    on_drained: Box<dyn Fn() -> Vec<Control> + Send + Sync>,
    /// Filters to subscribe to on every connection (commands, Home Assistant's status).
    subscriptions: Vec<String>,
    /// Incoming publishes, for the command task. Bounded; overflow is counted and dropped.
    incoming: Option<mpsc::Sender<Message>>,
    pub incoming_dropped: AtomicU64,
    /// Incoming packets over [`MAX_INCOMING`], skipped (and acknowledged).
    pub incoming_oversize: AtomicU64,
    /// Subscriptions the broker refused (its ACL), on the last connection.
    pub subscriptions_refused: AtomicU64,
    /// Control messages (state, discovery, responses) that could not be encoded or were
    /// over the packet-size limit, dropped.
    pub controls_refused: AtomicU64,
    /// PUBACKs for packet ids not in flight (unknown or duplicate), ignored.
    pub stray_acks: AtomicU64,
    /// MQTT 5 PUBACKs with a failure reason code, by reason.
    puback_refusals: Mutex<BTreeMap<&'static str, u64>>,
    /// Readings and backlog topics by queue lane, built as lanes appear.
    reading_topics: Mutex<Vec<(String, String)>>,
    /// `[spool] replay_topic = "readings"`.
    pub replay_on_readings: bool,
    /// `[mqtt] catch_up_rate`: readings per second at most; None: twice the recent input rate.
    pub catch_up_rate: Option<u32>,
    pub reconnects: AtomicU64,
    ever_connected: AtomicBool,
    /// Connections closed right after CONNACK, in a row.
    pub kicked_in_a_row: AtomicU64,
    pub client_id_conflict: AtomicBool,
    /// Why the last connection attempt failed or the connection dropped (kept after
    /// recovery, so the metrics can show what happened).
    last_error: Mutex<Option<String>>,
    pub connection_errors: AtomicU64,
    /// What this connection publishes, when it is not the JSON profile.
    profile: Option<Mutex<Box<dyn Profile>>>,
}

impl MqttShared {
    pub fn new(
        queue: Arc<ReadingQueue>,
        topics: Topics,
        qos: QoS,
        on_connect: Box<dyn Fn() -> Vec<Control> + Send + Sync>,
        on_drained: Box<dyn Fn() -> Vec<Control> + Send + Sync>,
    ) -> Self {
        Self {
            queue,
            topics,
            qos,
            connected: watch::Sender::new(Link::default()),
            on_connect,
            on_drained,
            subscriptions: Vec::new(),
            incoming: None,
            incoming_dropped: AtomicU64::new(0),
            incoming_oversize: AtomicU64::new(0),
            subscriptions_refused: AtomicU64::new(0),
            controls_refused: AtomicU64::new(0),
            stray_acks: AtomicU64::new(0),
            puback_refusals: Mutex::default(),
            reading_topics: Mutex::default(),
            replay_on_readings: false,
            catch_up_rate: None,
            reconnects: AtomicU64::new(0),
            ever_connected: AtomicBool::new(false),
            kicked_in_a_row: AtomicU64::new(0),
            client_id_conflict: AtomicBool::new(false),
            last_error: Mutex::default(),
            connection_errors: AtomicU64::new(0),
            profile: None,
        }
    }

    /// Publishes what `profile` decides instead of the JSON profile (see [`Profile`]).
    pub fn with_profile(mut self, profile: Box<dyn Profile>) -> Self {
        self.subscriptions = profile.subscriptions();
        self.profile = Some(Mutex::new(profile));
        self
    }

    fn profile(&self) -> Option<std::sync::MutexGuard<'_, Box<dyn Profile>>> {
        self.profile.as_ref().map(|p| p.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn has_profile(&self) -> bool {
        self.profile.is_some()
    }

    /// Subscribes to `filters` on every connection and hands what arrives to `incoming`.
    pub fn with_subscriptions(mut self, filters: Vec<String>, incoming: mpsc::Sender<Message>) -> Self {
        self.subscriptions = filters;
        self.incoming = Some(incoming);
        self
    }

    /// Appends the topic of a queue lane's readings (`replayed`: from the spool, on the backlog
    /// topic unless `[spool] replay_topic = "readings"`) to `out`.
    fn put_reading_topic(&self, lane: usize, replayed: bool, out: &mut BytesMut) -> Result<(), codec::EncodeError> {
        let mut topics = self.reading_topics.lock().unwrap_or_else(PoisonError::into_inner);
        while topics.len() <= lane {
            let name = self.queue.lane_name(topics.len());
            topics.push((self.topics.readings(&name), self.topics.backlog(&name)));
        }
        let (live, backlog) = &topics[lane];
        codec::put_str(out, if replayed && !self.replay_on_readings { backlog } else { live })
    }

    /// The length of a lane's readings topic.
    fn reading_topic_len(&self, lane: usize) -> usize {
        let mut out = BytesMut::new();
        let _ = self.put_reading_topic(lane, false, &mut out);
        out.len().saturating_sub(2)
    }

    /// The most recent connection error, if there was one.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set_last_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(PoisonError::into_inner) = e;
    }

    /// MQTT 5 PUBACK refusals so far, by reason code name.
    pub fn puback_refusals(&self) -> BTreeMap<&'static str, u64> {
        self.puback_refusals.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn count_puback_refusal(&self, reason: &'static str) -> u64 {
        let mut m = self.puback_refusals.lock().unwrap_or_else(PoisonError::into_inner);
        let n = m.entry(reason).or_default();
        *n += 1;
        *n
    }

    pub fn is_connected(&self) -> bool {
        self.connected.borrow().up
    }

    /// The connection's state, to wait on.
    #[cfg(test)]
    pub fn link(&self) -> watch::Receiver<Link> {
        self.connected.subscribe()
    }

    /// The retained `online` / `offline` message.
    pub fn availability(&self, online: bool) -> Control {
        let payload = if online { "online" } else { "offline" };
        Control {
            topic: self.topics.state.clone(),
            payload: Bytes::from_static(payload.as_bytes()),
            retain: true,
            correlation: None,
        }
    }
}

/// How the connection task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finished {
    /// DISCONNECT written (drained at shutdown, or replaced by a reload).
    Disconnected,
    /// Told to stop at once.
    Stopped,
}

/// When to try again after a failed attempt or a lost connection.
struct Retry {
    backoff: Backoff,
    jitter: bool,
    /// Since when every attempt was refused at the TCP level.
    refused_since: Option<Instant>,
}

impl Retry {
    fn next_delay(&mut self, error: &ConnectionError, lasted: Option<Duration>) -> Duration {
        // Reset only after a stable connection: a broker that accepts and then drops us at
        // once must not be hammered at the minimum interval.
        if lasted.is_some_and(|d| d >= STABLE_AFTER) {
            self.backoff.reset();
        }
        if !error.is_refused_tcp() {
            self.refused_since = None;
            return self.backoff.next_delay();
        }
        let since = *self.refused_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= FAST_RETRY_FOR {
            return self.backoff.next_delay();
        }
        let (lo, hi) = FAST_RETRY;
        if self.jitter {
            lo + (hi - lo).mul_f64(fastrand::f64())
        } else {
            lo
        }
    }
}

/// Owns the connection: connects, reconnects (within a second while the broker's port is
/// merely closed; with capped jittered backoff for slow failures), writes readings in
/// batches, feeds acknowledgements to the ledger. After `stops.draining` it empties the
/// queue, sends the final messages and `offline`, and disconnects; after `stops.switching`
/// (a reload) it disconnects at once. Returns then, or at `stops.hard_stop`.
pub async fn run_connection(
    connector: impl Connector,
    opts: ConnectOptions,
    shared: Arc<MqttShared>,
    backoff: Backoff,
    beat: Beat,
    stops: Stops,
) {
    let mut failures: u64 = 0;
    let mut pacer = pace::Pacer::new(shared.catch_up_rate, shared.queue.pushed());
    let mut retry = Retry { jitter: backoff.has_jitter(), backoff, refused_since: None };
    let mut tick = liveness::ticker();
    let login = opts.login.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
    let json_will = Will { topic: opts.will_topic.clone(), payload: b"offline".to_vec(), retain: true };
    // Whether the last attempt's CONNECT (and will) can never have reached a broker.
    let mut will_unsent = false;
    loop {
        // A profile's will changes per connection (Sparkplug's bdSeq).
        let will = shared.profile().map_or_else(|| json_will.clone(), |mut p| p.will(will_unsent));
        let spec = codec::ConnectSpec {
            client_id: &opts.client_id,
            keep_alive_s: opts.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16,
            login,
            will_topic: &will.topic,
            will_payload: &will.payload,
            will_retain: will.retain,
            receive_max: 64,
            max_incoming: MAX_INCOMING,
        };
        let attempt = tokio::select! {
            biased;
            _ = stops.hard_stop.cancelled() => return,
            _ = stops.switching.cancelled() => return,
            r = liveness::beating(&beat, &mut tick, connect::handshake(&connector, opts.version, &spec, opts.connect_timeout)) => r,
        };
        will_unsent = matches!(&attempt, Err(e) if e.is_refused_tcp());
        let (error, lasted, requeued, poisoned) = match attempt {
            Err(e) => (e, None, 0, false),
            Ok(hs) => {
                failures = 0;
                retry.refused_since = None;
                if shared.ever_connected.swap(true, Relaxed) {
                    shared.reconnects.fetch_add(1, Relaxed);
                }
                tracing::info!(broker = %connector.describe(), version = ?opts.version, "Connected to the MQTT broker.");
                if let Some(mut p) = shared.profile() {
                    p.connected();
                } else {
                    // The broker may have lost retained state (restart without persistence): send it all.
                    for c in (shared.on_connect)() {
                        shared.queue.push_control(c);
                    }
                    shared.queue.push_control_first(shared.availability(true));
                }
                shared.connected.send_modify(|l| *l = Link { up: true, generation: l.generation + 1 });
                shared.queue.set_link_up(true);
                let began = Instant::now();
                let mut session = Session::new(&opts, &hs.connack, &shared, &beat, &stops, &mut pacer);
                let end = session.run(hs.stream, hs.leftover).await;
                shared.connected.send_modify(|l| l.up = false);
                shared.queue.set_link_up(false);
                if let Some(mut p) = shared.profile() {
                    p.disconnected();
                }
                let poisoned = matches!(&end, Err(e) if e.broker_hung_up()) && session.strike_suspect();
                if poisoned {
                    // Those quick hang-ups were about that reading, not another client with
                    // our client id.
                    shared.kicked_in_a_row.store(0, Relaxed);
                }
                // Whatever was handed over but not acknowledged goes back, in order.
                let requeued = shared.queue.requeue_in_flight();
                match end {
                    Ok(Finished::Disconnected) => {
                        tracing::info!("Disconnected from the MQTT broker.");
                        return;
                    }
                    Ok(Finished::Stopped) => return,
                    Err(e) => (e, Some(began.elapsed()), requeued, poisoned),
                }
            }
        };
        failures += 1;
        if !poisoned {
            note_kick(&shared, lasted, &opts.client_id);
        }
        shared.set_last_error(Some(error.to_string()));
        shared.connection_errors.fetch_add(1, Relaxed);
        let delay = retry.next_delay(&error, lasted);
        log_connection_error(&error, lasted.is_some(), failures, requeued, delay);
        tokio::select! {
            biased;
            _ = stops.hard_stop.cancelled() => return,
            _ = stops.switching.cancelled() => return,
            _ = liveness::beating(&beat, &mut tick, tokio::time::sleep(delay)) => {}
        }
    }
}

fn deliver_incoming(shared: &MqttShared, p: Message) {
    let Some(tx) = &shared.incoming else { return };
    if tx.try_send(p).is_err() {
        let n = shared.incoming_dropped.fetch_add(1, Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(dropped = n, "Incoming MQTT messages arrive faster than they are handled; dropping.");
        }
    }
}

/// Counts connections the broker closed right after accepting them. Several in a row mean
/// another client holds the same client id (the broker takes the session over each time one
/// of the two connects): say so instead of flapping silently.
fn note_kick(shared: &MqttShared, lasted: Option<Duration>, client_id: &str) {
    match lasted {
        Some(d) if d < KICKED_WITHIN => {
            let n = shared.kicked_in_a_row.fetch_add(1, Relaxed) + 1;
            if n >= KICKS_FOR_COLLISION && !shared.client_id_conflict.swap(true, Relaxed) {
                tracing::error!(
                    client_id,
                    kicked = n,
                    "The broker keeps closing the connection right after accepting it: another client is probably \
                     using the same client id. Give each gateway its own gateway.id or mqtt.client_id."
                );
            }
        }
        Some(_) => {
            shared.kicked_in_a_row.store(0, Relaxed);
            if shared.client_id_conflict.swap(false, Relaxed) {
                tracing::info!(client_id, "The connection is stable again; client id conflict over.");
            }
        }
        None => {}
    }
}

fn log_connection_error(e: &ConnectionError, was_connected: bool, failures: u64, requeued: u64, delay: Duration) {
    let retry_ms = delay.as_millis() as u64;
    match e {
        ConnectionError::Refused(code) => tracing::error!(
            code = %code, retry_ms,
            "The broker refused the connection; check mqtt.username, mqtt.password_file and the broker's ACLs."
        ),
        // A certificate problem does not fix itself: say so every time, at ERROR.
        _ if e.is_tls() => tracing::error!(
            error = %e, retry_ms,
            "TLS handshake with the broker failed; check mqtt.tls.ca_file, the broker certificate's name (mqtt.host) and dates."
        ),
        _ if was_connected => {
            tracing::warn!(error = %e, requeued, retry_ms, "Lost the MQTT connection; readings in flight will be sent again.")
        }
        // Repeated failures while the broker stays away: one line per attempt would flood the journal.
        _ if failures <= 3 || failures.is_power_of_two() => {
            tracing::warn!(error = %e, attempt = failures, retry_ms, "Cannot connect to the MQTT broker.")
        }
        _ => tracing::debug!(error = %e, attempt = failures, retry_ms, "Cannot connect to the MQTT broker."),
    }
}
