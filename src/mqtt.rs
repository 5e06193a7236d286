//! The broker side: the connection task (sole owner of rumqttc's `EventLoop`) and the sink
//! task (sole publisher through the `AsyncClient`).
//!
//! rumqttc's own buffering is not a bound we can rely on: on a connection error it moves every
//! unacknowledged publish and every request still in its channel into an unbounded `pending`
//! list, and it drops that list when the broker has no session for us. So the queue's ledger is
//! the only record of what is in flight: on every connection error the connection task empties
//! rumqttc's buffers under the send gate and the ledger puts the readings back in the queue.
//! The gate is held by the sink from "take from queue" to "handed to the client", so the order
//! of requests in rumqttc's channel always matches the ledger's order.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, LastWill, MqttOptions, Outgoing, Publish, QoS,
    SubscribeFilter,
};
use tokio::sync::{mpsc, watch, Mutex};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::liveness::{self, Beat};
use crate::queue::{Control, Outbound, ReadingQueue};
use crate::topics::Topics;

/// Requests between the sink and the event loop. Tiny: the queue is the buffer.
const REQUEST_CHANNEL: usize = 8;
/// A connection closed sooner than this after CONNACK was kicked, not lost.
const KICKED_WITHIN: Duration = Duration::from_secs(3);
/// Kicked this many times in a row: another client is using our client id.
const KICKS_FOR_COLLISION: u64 = 3;
/// A connection that lasted this long was healthy: backoff starts over.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// The connection as the sink sees it; `generation` counts connections, so the sink can tell
/// a reconnect it missed (and subscribe again: the session is clean).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Link {
    pub up: bool,
    pub generation: u64,
}

/// State shared by the connection task and the sink.
pub struct MqttShared {
    pub queue: Arc<ReadingQueue>,
    pub topics: Topics,
    pub qos: QoS,
    /// Held from "take from the queue" to "handed to the client" (sink), and while the
    /// connection task resets rumqttc after an error.
    gate: Mutex<()>,
    connected: watch::Sender<Link>,
    /// Filters to subscribe to on every connection (commands, Home Assistant's status).
    subscriptions: Vec<String>,
    /// Incoming publishes, for the command task. Bounded; overflow is counted and dropped.
    incoming: Option<mpsc::Sender<Publish>>,
    pub incoming_dropped: AtomicU64,
    /// Readings topics by queue lane, built as lanes appear.
    reading_topics: std::sync::Mutex<Vec<String>>,
    /// Connections closed right after CONNACK, in a row.
    pub kicked_in_a_row: AtomicU64,
    pub client_id_conflict: AtomicBool,
    /// Why the last connection attempt failed or the connection dropped (kept after
    /// recovery, so the metrics can show what happened).
    last_error: std::sync::Mutex<Option<String>>,
    pub connection_errors: AtomicU64,
    /// Retained gateway and device state to send on every (re)connect.
    on_connect: Box<dyn Fn() -> Vec<Control> + Send + Sync>,
    /// The last messages before `offline` at shutdown (the final metrics).
    on_drained: Box<dyn Fn() -> Vec<Control> + Send + Sync>,
    pub reconnects: AtomicU64,
    ever_connected: AtomicBool,
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
            gate: Mutex::new(()),
            connected: watch::Sender::new(Link::default()),
            subscriptions: Vec::new(),
            incoming: None,
            incoming_dropped: AtomicU64::new(0),
            reading_topics: std::sync::Mutex::default(),
            kicked_in_a_row: AtomicU64::new(0),
            client_id_conflict: AtomicBool::new(false),
            last_error: std::sync::Mutex::default(),
            connection_errors: AtomicU64::new(0),
            on_connect,
            on_drained,
            reconnects: AtomicU64::new(0),
            ever_connected: AtomicBool::new(false),
        }
    }

    /// Subscribes to `filters` on every connection and hands what arrives to `incoming`.
    pub fn with_subscriptions(mut self, filters: Vec<String>, incoming: mpsc::Sender<Publish>) -> Self {
        self.subscriptions = filters;
        self.incoming = Some(incoming);
        self
    }

    /// The readings topic of a queue lane.
    fn reading_topic(&self, lane: usize) -> String {
        let mut topics = self.reading_topics.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while topics.len() <= lane {
            let name = self.queue.lane_name(topics.len());
            topics.push(self.topics.readings(&name));
        }
        topics[lane].clone()
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

/// The client options: clean session (the queue, not the broker, holds our backlog), the
/// `offline` last will, TCP_NODELAY.
pub fn client(config: &Config, topics: &Topics) -> std::io::Result<(AsyncClient, EventLoop)> {
    let m = &config.mqtt;
    let mut opts = MqttOptions::new(config.client_id(), m.host.clone(), m.port);
    opts.set_keep_alive(m.keep_alive)
        .set_clean_session(true)
        .set_inflight(m.inflight)
        .set_max_packet_size(256 * 1024, 256 * 1024)
        .set_last_will(LastWill::new(&topics.state, "offline", QoS::AtLeastOnce, true));
    if let Some(user) = &m.username {
        opts.set_credentials(user.clone(), m.password()?.unwrap_or_default());
    }
    if let Some(tls) = &m.tls {
        let config = tls.client_config()?;
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(config))));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CHANNEL);
    let mut net = rumqttc::NetworkOptions::new();
    // Without it Nagle holds small publishes back for tens of milliseconds.
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(m.connect_timeout.as_secs().max(1));
    eventloop.set_network_options(net);
    Ok((client, eventloop))
}

/// Owns the event loop: connects, reconnects with capped jittered backoff, feeds acks to the
/// ledger. Returns once the sink's DISCONNECT is written, or at `hard_stop`.
#[allow(clippy::disallowed_methods)] // The one place allowed to poll (see clippy.toml).
pub async fn run_connection(
    mut eventloop: EventLoop,
    shared: Arc<MqttShared>,
    mut backoff: Backoff,
    beat: Beat,
    hard_stop: CancellationToken,
) {
    let mut failures: u64 = 0;
    let mut tick = liveness::ticker();
    let mut connected_at: Option<Instant> = None;
    let client_id = eventloop.mqtt_options.client_id();
    loop {
        let event = tokio::select! {
            biased;
            _ = hard_stop.cancelled() => return,
            ev = liveness::beating(&beat, &mut tick, eventloop.poll()) => ev,
        };
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                failures = 0;
                connected_at = Some(Instant::now());
                if shared.ever_connected.swap(true, Relaxed) {
                    shared.reconnects.fetch_add(1, Relaxed);
                }
                let (host, port) = eventloop.mqtt_options.broker_address();
                tracing::info!(broker = %format!("{host}:{port}"), "Connected to the MQTT broker.");
                // The broker may have lost retained state (restart without persistence): send it all.
                for c in (shared.on_connect)() {
                    shared.queue.push_control(c);
                }
                shared.queue.push_control_first(shared.availability(true));
                shared.connected.send_modify(|l| *l = Link { up: true, generation: l.generation + 1 });
            }
            Ok(Event::Incoming(Incoming::PubAck(ack))) => shared.queue.on_acked(ack.pkid),
            Ok(Event::Incoming(Incoming::Publish(p))) => deliver_incoming(&shared, p),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => shared.queue.on_published(pkid),
            Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => shared.queue.on_collision(pkid),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                tracing::info!("Disconnected from the MQTT broker.");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                // Only this task writes the link.
                let was_connected = shared.connected.borrow().up;
                shared.connected.send_modify(|l| l.up = false);
                let lasted = connected_at.take().map(|t| t.elapsed());
                // Reset only after a stable connection: a broker that accepts and then drops
                // us at once must not be hammered at the minimum interval.
                if lasted.is_some_and(|d| d >= STABLE_AFTER) {
                    backoff.reset();
                }
                note_kick(&shared, lasted, &client_id);
                shared.set_last_error(Some(e.to_string()));
                shared.connection_errors.fetch_add(1, Relaxed);
                let requeued = reset_after_error(&mut eventloop, &shared).await;
                let delay = backoff.next_delay();
                log_connection_error(&e, was_connected, failures, requeued, delay);
                tokio::select! {
                    biased;
                    _ = hard_stop.cancelled() => return,
                    _ = liveness::beating(&beat, &mut tick, tokio::time::sleep(delay)) => {}
                }
            }
        }
    }
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

/// Empties rumqttc's buffers (the ledger has everything) and puts in-flight readings back.
async fn reset_after_error(eventloop: &mut EventLoop, shared: &MqttShared) -> u64 {
    let _gate = shared.gate.lock().await;
    // poll() already ran clean(); run it again under the gate to also catch requests the sink
    // handed over in between, then forget all of it.
    eventloop.clean();
    eventloop.pending.clear();
    eventloop.state.events.clear();
    eventloop.state.collision = None;
    shared.queue.requeue_in_flight()
}

fn log_connection_error(e: &ConnectionError, was_connected: bool, failures: u64, requeued: u64, delay: Duration) {
    let retry_ms = delay.as_millis() as u64;
    match e {
        ConnectionError::ConnectionRefused(code) => tracing::error!(
            code = ?code, retry_ms,
            "The broker refused the connection; check mqtt.username, mqtt.password_file and the broker's ACLs."
        ),
        // A certificate problem does not fix itself: say so every time, at ERROR.
        _ if is_tls_failure(e) => tracing::error!(
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

/// rumqttc reports handshake failures either as its own TLS error or as an I/O error that
/// wraps rustls' (certificate expired, wrong name, unknown issuer).
fn is_tls_failure(e: &ConnectionError) -> bool {
    match e {
        ConnectionError::Tls(_) => true,
        ConnectionError::Io(io) => io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()),
        _ => false,
    }
}

/// Publishes from the queue while connected. After `draining` fires it keeps going until the
/// queue and the ledger are empty, then publishes the final messages and `offline`, waits for
/// their acknowledgement and disconnects.
pub async fn run_sink(
    client: AsyncClient,
    shared: Arc<MqttShared>,
    beat: Beat,
    draining: CancellationToken,
    switching: CancellationToken,
    hard_stop: CancellationToken,
) {
    let mut connected = shared.connected.subscribe();
    let mut tick = liveness::ticker();
    let mut offline_sent = false;
    let mut subscribed: Option<u64> = None;
    loop {
        if hard_stop.is_cancelled() {
            return;
        }
        beat.beat();
        if switching.is_cancelled() {
            // A reload changed the MQTT settings: leave cleanly (no last will), no drain: the
            // queue and the ledger carry over to the next connection.
            let _gate = shared.gate.lock().await;
            if connected.borrow().up {
                let _ = liveness::beating(&beat, &mut tick, client.disconnect()).await;
            }
            return;
        }
        if !connected.borrow_and_update().up {
            tokio::select! {
                biased;
                _ = hard_stop.cancelled() => return,
                _ = switching.cancelled() => {}
                _ = liveness::beating(&beat, &mut tick, connected.changed()) => {}
            }
            continue;
        }
        let gate = shared.gate.lock().await;
        let link = *connected.borrow();
        if !link.up {
            continue;
        }
        if !shared.subscriptions.is_empty() && subscribed != Some(link.generation) {
            // A clean session: every connection needs its subscriptions again.
            let filters = shared.subscriptions.iter().map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
            let subscribe = client.subscribe_many(filters);
            if let Err(e) = liveness::beating(&beat, &mut tick, subscribe).await {
                tracing::error!(error = %e, "The MQTT event loop is gone.");
                return;
            }
            subscribed = Some(link.generation);
            continue;
        }
        if let Some(out) = shared.queue.pop_next() {
            let (topic, payload, retain) = match out {
                Outbound::Reading { device, payload } => (shared.reading_topic(device), payload, false),
                Outbound::Control(c) => (c.topic, c.payload, c.retain),
            };
            // Waits only while rumqttc's tiny channel is full; a connection error empties it.
            let publish = client.publish_bytes(topic, shared.qos, retain, payload);
            if let Err(e) = liveness::beating(&beat, &mut tick, publish).await {
                tracing::error!(error = %e, "The MQTT event loop is gone.");
                return;
            }
            drop(gate);
            continue;
        }
        drop(gate);
        if draining.is_cancelled() && shared.queue.is_idle() {
            if offline_sent {
                let _ = client.disconnect().await;
                return;
            }
            for c in (shared.on_drained)() {
                shared.queue.push_control(c);
            }
            shared.queue.push_control(shared.availability(false));
            offline_sent = true;
            continue;
        }
        tokio::select! {
            biased;
            _ = hard_stop.cancelled() => return,
            _ = switching.cancelled() => {}
            _ = tick.tick() => {}
            _ = shared.queue.notified() => {}
            _ = connected.changed() => {}
            _ = draining.cancelled(), if !draining.is_cancelled() => {}
            // While draining, acknowledgements (not pushes) make the queue idle: look again soon.
            _ = tokio::time::sleep(Duration::from_millis(10)), if draining.is_cancelled() => {}
        }
    }
}
