//! The broker side: one connection task owns the socket. It connects (TCP, optionally TLS),
//! writes readings from the queue in batches — one socket write for everything that is ready,
//! up to the in-flight window — reads acknowledgements, pings, reconnects with backoff.
//!
//! Why not rumqttc's `EventLoop`: it flushes the socket after every single publish (one write
//! syscall and two task wake-ups per reading, about half the gateway's CPU at 16k readings/s),
//! and its own buffers are unbounded on disconnect and forgotten when the broker has no
//! session. Here the queue's ledger is the only record of what is in flight, packet ids are
//! assigned as readings are written, and nothing is buffered outside the queue but the bytes
//! of the batch being written. rumqttc is still used for its MQTT 3.1.1 codec
//! (`rumqttc::mqttbytes`).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, LastWill, Login, Packet, PingReq, PubAck, Publish, Subscribe,
    SubscribeFilter,
};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::liveness::{self, Beat};
use crate::queue::{Control, Outbound, ReadingQueue};
use crate::topics::Topics;

/// A connection closed sooner than this after CONNACK was kicked, not lost.
const KICKED_WITHIN: Duration = Duration::from_secs(3);
/// Kicked this many times in a row: another client is using our client id.
const KICKS_FOR_COLLISION: u64 = 3;
/// A connection that lasted this long was healthy: backoff starts over.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// One batch written with one syscall, at most.
const BATCH_BYTES: usize = 64 * 1024;
/// Largest packet accepted from the broker.
const MAX_INCOMING: usize = 256 * 1024;
/// Packet id of our SUBSCRIBE; readings use 1..=inflight, which never reaches it.
const SUBSCRIBE_PKID: u16 = u16::MAX;

/// The connection as others see it; `generation` counts connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Link {
    pub up: bool,
    pub generation: u64,
}

/// Why a connection attempt failed or a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("connection refused by the broker: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("the broker closed the connection")]
    Closed,
}

impl ConnectionError {
    /// A TLS handshake failure (certificate unknown, expired, for another name): rustls'
    /// error inside the I/O error.
    fn is_tls(&self) -> bool {
        matches!(self, ConnectionError::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()))
    }
}

/// How to reach the broker; built once per configuration.
#[derive(Clone)]
pub struct ConnectOptions {
    host: String,
    port: u16,
    client_id: String,
    keep_alive: Duration,
    connect_timeout: Duration,
    login: Option<(String, String)>,
    tls: Option<Arc<rustls::ClientConfig>>,
    inflight: u16,
    will_topic: String,
}

impl ConnectOptions {
    /// Reads the password file and builds the TLS configuration.
    ///
    /// # Errors
    /// A credential or certificate file cannot be read.
    pub fn new(config: &Config, topics: &Topics) -> io::Result<Self> {
        let m = &config.mqtt;
        let login = match &m.username {
            Some(user) => Some((user.clone(), m.password()?.unwrap_or_default())),
            None => None,
        };
        let tls = m.tls.as_ref().map(|t| t.client_config().map(Arc::new)).transpose()?;
        Ok(Self {
            host: m.host.clone(),
            port: m.port,
            client_id: config.client_id(),
            keep_alive: m.keep_alive,
            connect_timeout: m.connect_timeout,
            login,
            tls,
            inflight: m.inflight,
            will_topic: topics.state.clone(),
        })
    }
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
    incoming: Option<mpsc::Sender<rumqttc::mqttbytes::v4::Publish>>,
    pub incoming_dropped: AtomicU64,
    /// Readings topics by queue lane, built as lanes appear.
    reading_topics: std::sync::Mutex<Vec<String>>,
    pub reconnects: AtomicU64,
    ever_connected: AtomicBool,
    /// Connections closed right after CONNACK, in a row.
    pub kicked_in_a_row: AtomicU64,
    pub client_id_conflict: AtomicBool,
    /// Why the last connection attempt failed or the connection dropped (kept after
    /// recovery, so the metrics can show what happened).
    last_error: std::sync::Mutex<Option<String>>,
    pub connection_errors: AtomicU64,
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
            reading_topics: std::sync::Mutex::default(),
            reconnects: AtomicU64::new(0),
            ever_connected: AtomicBool::new(false),
            kicked_in_a_row: AtomicU64::new(0),
            client_id_conflict: AtomicBool::new(false),
            last_error: std::sync::Mutex::default(),
            connection_errors: AtomicU64::new(0),
        }
    }

    /// Subscribes to `filters` on every connection and hands what arrives to `incoming`.
    pub fn with_subscriptions(
        mut self,
        filters: Vec<String>,
        incoming: mpsc::Sender<rumqttc::mqttbytes::v4::Publish>,
    ) -> Self {
        self.subscriptions = filters;
        self.incoming = Some(incoming);
        self
    }

    /// Appends the readings topic of a queue lane to `out`.
    fn put_reading_topic(&self, lane: usize, out: &mut BytesMut) {
        let mut topics = self.reading_topics.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while topics.len() <= lane {
            let name = self.queue.lane_name(topics.len());
            topics.push(self.topics.readings(&name));
        }
        put_str(out, &topics[lane]);
    }

    /// The most recent connection error, if there was one.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_last_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = e;
    }

    pub fn is_connected(&self) -> bool {
        self.connected.borrow().up
    }

    /// The retained `online` / `offline` message.
    pub fn availability(&self, online: bool) -> Control {
        let payload = if online { "online" } else { "offline" };
        Control { topic: self.topics.state.clone(), payload: Bytes::from_static(payload.as_bytes()), retain: true }
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

/// Owns the connection: connects, reconnects with capped jittered backoff, writes readings in
/// batches, feeds acknowledgements to the ledger. After `draining` it empties the queue, sends
/// the final messages and `offline`, and disconnects; after `switching` (a reload) it
/// disconnects at once. Returns then, or at `hard_stop`.
pub async fn run_connection(
    opts: ConnectOptions,
    shared: Arc<MqttShared>,
    mut backoff: Backoff,
    beat: Beat,
    draining: CancellationToken,
    switching: CancellationToken,
    hard_stop: CancellationToken,
) {
    let mut failures: u64 = 0;
    let mut tick = liveness::ticker();
    loop {
        let attempt = tokio::select! {
            biased;
            _ = hard_stop.cancelled() => return,
            _ = switching.cancelled() => return,
            r = liveness::beating(&beat, &mut tick, connect(&opts)) => r,
        };
        let (error, lasted, requeued) = match attempt {
            Err(e) => (e, None, 0),
            Ok(stream) => {
                failures = 0;
                if shared.ever_connected.swap(true, Relaxed) {
                    shared.reconnects.fetch_add(1, Relaxed);
                }
                tracing::info!(broker = %format!("{}:{}", opts.host, opts.port), "Connected to the MQTT broker.");
                // The broker may have lost retained state (restart without persistence): send it all.
                for c in (shared.on_connect)() {
                    shared.queue.push_control(c);
                }
                shared.queue.push_control_first(shared.availability(true));
                shared.connected.send_modify(|l| *l = Link { up: true, generation: l.generation + 1 });
                let began = Instant::now();
                let mut session = Session::new(&opts, &shared, &beat, &draining, &switching, &hard_stop);
                let end = session.run(stream).await;
                shared.connected.send_modify(|l| l.up = false);
                // Whatever was handed over but not acknowledged goes back, in order.
                let requeued = shared.queue.requeue_in_flight();
                match end {
                    Ok(Finished::Disconnected) => {
                        tracing::info!("Disconnected from the MQTT broker.");
                        return;
                    }
                    Ok(Finished::Stopped) => return,
                    Err(e) => (e, Some(began.elapsed()), requeued),
                }
            }
        };
        failures += 1;
        // Reset only after a stable connection: a broker that accepts and then drops us at
        // once must not be hammered at the minimum interval.
        if lasted.is_some_and(|d| d >= STABLE_AFTER) {
            backoff.reset();
        }
        note_kick(&shared, lasted, &opts.client_id);
        shared.set_last_error(Some(error.to_string()));
        shared.connection_errors.fetch_add(1, Relaxed);
        let delay = backoff.next_delay();
        log_connection_error(&error, lasted.is_some(), failures, requeued, delay);
        tokio::select! {
            biased;
            _ = hard_stop.cancelled() => return,
            _ = switching.cancelled() => return,
            _ = liveness::beating(&beat, &mut tick, tokio::time::sleep(delay)) => {}
        }
    }
}

/// Anything the connection can run over: TCP, or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// TCP (TCP_NODELAY: without it Nagle holds small publishes back for tens of milliseconds),
/// TLS if configured, CONNECT with the `offline` last will and a clean session (the queue, not
/// the broker, holds our backlog), CONNACK — all within `connect_timeout`.
async fn connect(opts: &ConnectOptions) -> Result<Box<dyn Stream>, ConnectionError> {
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect((opts.host.as_str(), opts.port)).await?;
        tcp.set_nodelay(true)?;
        let mut stream: Box<dyn Stream> = match &opts.tls {
            Some(config) => {
                let name = rustls_pki_types::ServerName::try_from(opts.host.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                Box::new(tokio_rustls::TlsConnector::from(Arc::clone(config)).connect(name, tcp).await?)
            }
            None => Box::new(tcp),
        };
        let mut connect = Connect::new(opts.client_id.clone());
        connect.keep_alive = opts.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16;
        connect.clean_session = true;
        connect.last_will = Some(LastWill::new(&opts.will_topic, "offline", QoS::AtLeastOnce, true));
        connect.login = opts.login.as_ref().map(|(u, p)| Login::new(u.clone(), p.clone()));
        let mut buf = BytesMut::new();
        connect.write(&mut buf).map_err(|e| ConnectionError::Protocol(e.to_string()))?;
        stream.write_all(&buf).await?;
        buf.clear();
        loop {
            match Packet::read(&mut buf, MAX_INCOMING) {
                Ok(Packet::ConnAck(ConnAck { code: ConnectReturnCode::Success, .. })) => return Ok(stream),
                Ok(Packet::ConnAck(ack)) => return Err(ConnectionError::Refused(ack.code)),
                Ok(other) => return Err(ConnectionError::Protocol(format!("expected CONNACK, got {other:?}"))),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    if stream.read_buf(&mut buf).await? == 0 {
                        return Err(ConnectionError::Closed);
                    }
                }
                Err(e) => return Err(ConnectionError::Protocol(e.to_string())),
            }
        }
    };
    tokio::time::timeout(opts.connect_timeout, attempt).await.map_err(|_| ConnectionError::Timeout("connecting"))?
}

/// One connection's reading and writing.
struct Session<'a> {
    shared: &'a MqttShared,
    beat: &'a Beat,
    draining: &'a CancellationToken,
    switching: &'a CancellationToken,
    hard_stop: &'a CancellationToken,
    keep_alive: Duration,
    write_timeout: Duration,
    /// Packet ids 1..=inflight in use, and how many.
    in_use: Vec<bool>,
    used: usize,
    next_pkid: usize,
    /// Bytes of the batch being written, and how far.
    wbuf: BytesMut,
    wpos: usize,
    /// QoS 0 publishes in `wbuf`: delivered once it is written.
    qos0_in_batch: usize,
    rbuf: BytesMut,
    /// The queue may have something for us.
    want_fill: bool,
    /// Shutdown began (noticed once: a cancelled token stays ready forever).
    drain_noticed: bool,
    final_sent: bool,
    disconnecting: bool,
    await_ping: bool,
}

impl<'a> Session<'a> {
    fn new(
        opts: &ConnectOptions,
        shared: &'a MqttShared,
        beat: &'a Beat,
        draining: &'a CancellationToken,
        switching: &'a CancellationToken,
        hard_stop: &'a CancellationToken,
    ) -> Self {
        Self {
            shared,
            beat,
            draining,
            switching,
            hard_stop,
            keep_alive: opts.keep_alive,
            write_timeout: opts.connect_timeout,
            in_use: vec![false; usize::from(opts.inflight) + 1],
            used: 0,
            next_pkid: 0,
            wbuf: BytesMut::with_capacity(BATCH_BYTES + 1024),
            wpos: 0,
            qos0_in_batch: 0,
            rbuf: BytesMut::with_capacity(8 * 1024),
            want_fill: true,
            drain_noticed: false,
            final_sent: false,
            disconnecting: false,
            await_ping: false,
        }
    }

    async fn run(&mut self, stream: Box<dyn Stream>) -> Result<Finished, ConnectionError> {
        let (mut rd, mut wr) = tokio::io::split(stream);
        if !self.shared.subscriptions.is_empty() {
            // A clean session: every connection needs its subscriptions again.
            let filters = self.shared.subscriptions.iter().map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
            let subscribe = Subscribe { pkid: SUBSCRIBE_PKID, filters: filters.collect() };
            subscribe.write(&mut self.wbuf).map_err(|e| ConnectionError::Protocol(e.to_string()))?;
        }
        let mut beats = liveness::ticker();
        let mut ping = tokio::time::interval_at(Instant::now() + self.keep_alive, self.keep_alive);
        let mut write_deadline = Instant::now() + self.write_timeout;
        loop {
            if self.wpos == self.wbuf.len() {
                self.fill();
            }
            let writing = self.wpos < self.wbuf.len();
            tokio::select! {
                biased;
                _ = self.hard_stop.cancelled() => return Ok(Finished::Stopped),
                _ = self.switching.cancelled(), if !self.disconnecting => {
                    // A reload replaces this connection: leave cleanly (no last will); the
                    // ledger puts what is in flight back for the next one.
                    Disconnect.write(&mut self.wbuf).map_err(|e| ConnectionError::Protocol(e.to_string()))?;
                    self.disconnecting = true;
                }
                r = wr.write(&self.wbuf[self.wpos..]), if writing => {
                    let n = r?;
                    if n == 0 {
                        return Err(ConnectionError::Closed);
                    }
                    self.wpos += n;
                    write_deadline = Instant::now() + self.write_timeout;
                    if self.wpos == self.wbuf.len() {
                        self.batch_written();
                        if self.disconnecting {
                            let _ = wr.flush().await;
                            return Ok(Finished::Disconnected);
                        }
                    }
                }
                r = rd.read_buf(&mut self.rbuf) => {
                    if r? == 0 {
                        return Err(ConnectionError::Closed);
                    }
                    self.read_packets()?;
                }
                _ = self.shared.queue.notified(), if !self.want_fill => self.want_fill = true,
                _ = self.draining.cancelled(), if !self.drain_noticed => {
                    self.drain_noticed = true;
                    self.want_fill = true;
                }
                _ = ping.tick() => {
                    if std::mem::replace(&mut self.await_ping, true) {
                        return Err(ConnectionError::Timeout("waiting for PINGRESP"));
                    }
                    PingReq.write(&mut self.wbuf).map_err(|e| ConnectionError::Protocol(e.to_string()))?;
                }
                _ = tokio::time::sleep_until(write_deadline), if writing => {
                    return Err(ConnectionError::Timeout("writing to the broker"));
                }
                _ = beats.tick() => self.beat.beat(),
            }
        }
    }

    /// Encodes everything that is ready into one batch: control messages first, then the
    /// oldest readings, up to the in-flight window and BATCH_BYTES.
    fn fill(&mut self) {
        if !self.want_fill || self.disconnecting {
            return;
        }
        let shared = self.shared;
        let qos1 = shared.qos != QoS::AtMostOnce;
        while self.wbuf.len() < BATCH_BYTES && (!qos1 || self.used + 1 < self.in_use.len()) {
            let Some(out) = shared.queue.pop_next() else {
                self.want_fill = false;
                break;
            };
            let pkid = if qos1 { self.take_pkid() } else { 0 };
            match out {
                Outbound::Reading { device, payload } => {
                    self.put_publish(pkid, false, &payload, |b| shared.put_reading_topic(device, b))
                }
                Outbound::Control(c) => self.put_publish(pkid, c.retain, &c.payload, |b| put_str(b, &c.topic)),
            }
            if qos1 {
                shared.queue.on_published(pkid);
            } else {
                self.qos0_in_batch += 1;
            }
        }
        if self.draining.is_cancelled() && self.wbuf.is_empty() && self.used == 0 && shared.queue.is_idle() {
            if !self.final_sent {
                for c in (shared.on_drained)() {
                    shared.queue.push_control(c);
                }
                shared.queue.push_control(shared.availability(false));
                self.final_sent = true;
                self.want_fill = true;
            } else {
                // Everything delivered, `offline` included.
                let _ = Disconnect.write(&mut self.wbuf);
                self.disconnecting = true;
            }
        }
    }

    /// PUBLISH, written directly: the topic comes from a cache, so no String per reading.
    fn put_publish(&mut self, pkid: u16, retain: bool, payload: &[u8], put_topic: impl FnOnce(&mut BytesMut)) {
        let b = &mut self.wbuf;
        let qos = if pkid == 0 { 0 } else { 1 };
        b.put_u8(0b0011_0000 | (qos << 1) | u8::from(retain));
        // Remaining length is written after the topic is known: reserve its 4 bytes.
        let len_at = b.len();
        b.put_slice(&[0; 4]);
        let start = b.len();
        put_topic(b);
        if pkid != 0 {
            b.put_u16(pkid);
        }
        b.put_slice(payload);
        let remaining = b.len() - start;
        // Variable-length encoding, then close the gap left by the reservation.
        let mut len = [0u8; 4];
        let mut n = 0;
        let mut x = remaining;
        loop {
            let mut byte = (x % 128) as u8;
            x /= 128;
            if x > 0 {
                byte |= 0x80;
            }
            len[n] = byte;
            n += 1;
            if x == 0 {
                break;
            }
        }
        b[len_at..len_at + n].copy_from_slice(&len[..n]);
        if n < 4 {
            let gap = 4 - n;
            b.copy_within(len_at + 4.., len_at + n);
            b.truncate(b.len() - gap);
        }
    }

    fn take_pkid(&mut self) -> u16 {
        let slots = self.in_use.len() - 1;
        loop {
            self.next_pkid = self.next_pkid % slots + 1;
            if !self.in_use[self.next_pkid] {
                self.in_use[self.next_pkid] = true;
                self.used += 1;
                return self.next_pkid as u16;
            }
        }
    }

    fn batch_written(&mut self) {
        self.wbuf.clear();
        self.wpos = 0;
        for _ in 0..std::mem::take(&mut self.qos0_in_batch) {
            // Written is delivered at QoS 0.
            self.shared.queue.on_published(0);
        }
        self.want_fill = true;
    }

    fn read_packets(&mut self) -> Result<(), ConnectionError> {
        loop {
            match Packet::read(&mut self.rbuf, MAX_INCOMING) {
                Ok(Packet::PubAck(ack)) => {
                    let slot = usize::from(ack.pkid);
                    if self.in_use.get(slot).copied().unwrap_or(false) {
                        self.in_use[slot] = false;
                        self.used -= 1;
                        self.shared.queue.on_acked(ack.pkid);
                        self.want_fill = true;
                    } else {
                        tracing::warn!(pkid = ack.pkid, "PUBACK for a packet id not in flight.");
                    }
                }
                Ok(Packet::PingResp) => self.await_ping = false,
                Ok(Packet::SubAck(_)) => {}
                Ok(Packet::Publish(p)) => {
                    if p.qos == QoS::AtLeastOnce {
                        PubAck::new(p.pkid)
                            .write(&mut self.wbuf)
                            .map_err(|e| ConnectionError::Protocol(e.to_string()))?;
                    }
                    deliver_incoming(self.shared, p);
                }
                Ok(other) => return Err(ConnectionError::Protocol(format!("unexpected {other:?}"))),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Ok(()),
                Err(e) => return Err(ConnectionError::Protocol(e.to_string())),
            }
        }
    }
}

/// A length-prefixed MQTT string.
fn put_str(b: &mut BytesMut, s: &str) {
    b.put_u16(s.len() as u16);
    b.put_slice(s.as_bytes());
}

/// Hands an incoming publish to the command task without ever waiting for it.
fn deliver_incoming(shared: &MqttShared, p: Publish) {
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
            code = ?code, retry_ms,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Our PUBLISH encoding must be byte-identical to the codec's.
    #[test]
    fn publish_encoding_matches_the_codec() {
        for (payload_len, pkid, retain) in
            [(0, 0, false), (10, 7, true), (200, 1, false), (20_000, 65, false), (3_000_000, 2, true)]
        {
            let payload = vec![b'x'; payload_len];
            let topic = "sensorgate/gw/devices/th/readings";
            let mut expected = BytesMut::new();
            let mut p =
                Publish::new(topic, if pkid == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce }, payload.clone());
            p.pkid = pkid;
            p.retain = retain;
            p.write(&mut expected).unwrap();

            let shared = MqttShared::new(
                Arc::new(ReadingQueue::new(0, 1, 1, None, 1)),
                Topics::new(
                    &Config::from_toml(
                        "[gateway]\nid = \"gw\"\n[[device]]\nname = \"d\"\npath = \"/x\"\nframing = \"lines\"\n",
                    )
                    .unwrap(),
                ),
                QoS::AtLeastOnce,
                Box::new(Vec::new),
                Box::new(Vec::new),
            );
            let (d, s, h) = (CancellationToken::new(), CancellationToken::new(), CancellationToken::new());
            let beat = crate::liveness::Liveness::new([]).beat_for("x");
            let opts = ConnectOptions {
                host: String::new(),
                port: 0,
                client_id: String::new(),
                keep_alive: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(1),
                login: None,
                tls: None,
                inflight: 10,
                will_topic: String::new(),
            };
            let mut session = Session::new(&opts, &shared, &beat, &d, &s, &h);
            session.put_publish(pkid, retain, &payload, |b| put_str(b, topic));
            assert_eq!(&session.wbuf[..], &expected[..], "payload {payload_len}");
            let back = Packet::read(&mut session.wbuf, 4 << 20).unwrap();
            assert!(matches!(back, Packet::Publish(ref q) if q.payload.len() == payload_len && q.topic == topic));
        }
    }
}
