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
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, Incoming, LastWill, MqttOptions, Outgoing, QoS};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::liveness::{self, Beat};
use crate::queue::{Control, Outbound, ReadingQueue};
use crate::topics::Topics;

/// Requests between the sink and the event loop. Tiny: the queue is the buffer.
const REQUEST_CHANNEL: usize = 8;

/// State shared by the connection task and the sink.
pub struct MqttShared {
    pub queue: Arc<ReadingQueue>,
    pub topics: Topics,
    pub qos: QoS,
    /// Held from "take from the queue" to "handed to the client" (sink), and while the
    /// connection task resets rumqttc after an error.
    gate: Mutex<()>,
    connected: watch::Sender<bool>,
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
            connected: watch::Sender::new(false),
            on_connect,
            on_drained,
            reconnects: AtomicU64::new(0),
            ever_connected: AtomicBool::new(false),
        }
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
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
        let password = match &m.password_file {
            Some(path) => std::fs::read_to_string(path)?.trim_end_matches(['\r', '\n']).to_string(),
            None => String::new(),
        };
        opts.set_credentials(user.clone(), password);
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
    loop {
        let event = tokio::select! {
            biased;
            _ = hard_stop.cancelled() => return,
            ev = liveness::beating(&beat, &mut tick, eventloop.poll()) => ev,
        };
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                backoff.reset();
                failures = 0;
                if shared.ever_connected.swap(true, Relaxed) {
                    shared.reconnects.fetch_add(1, Relaxed);
                }
                tracing::info!(
                    broker = %format!("{}:{}", eventloop.mqtt_options.broker_address().0, eventloop.mqtt_options.broker_address().1),
                    "Connected to the MQTT broker."
                );
                // The broker may have lost retained state (restart without persistence): send it all.
                for c in (shared.on_connect)() {
                    shared.queue.push_control(c);
                }
                shared.queue.push_control_first(shared.availability(true));
                shared.connected.send_replace(true);
            }
            Ok(Event::Incoming(Incoming::PubAck(ack))) => shared.queue.on_acked(ack.pkid),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => shared.queue.on_published(pkid),
            Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => shared.queue.on_collision(pkid),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                tracing::info!("Disconnected from the MQTT broker.");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                let was_connected = shared.connected.send_replace(false);
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

/// Publishes from the queue while connected. After `draining` fires it keeps going until the
/// queue and the ledger are empty, then publishes the final messages and `offline`, waits for
/// their acknowledgement and disconnects.
pub async fn run_sink(
    client: AsyncClient,
    shared: Arc<MqttShared>,
    beat: Beat,
    draining: CancellationToken,
    hard_stop: CancellationToken,
) {
    let mut connected = shared.connected.subscribe();
    let mut tick = liveness::ticker();
    let mut offline_sent = false;
    loop {
        if hard_stop.is_cancelled() {
            return;
        }
        beat.beat();
        if !*connected.borrow_and_update() {
            tokio::select! {
                biased;
                _ = hard_stop.cancelled() => return,
                _ = liveness::beating(&beat, &mut tick, connected.changed()) => {}
            }
            continue;
        }
        let gate = shared.gate.lock().await;
        if !*connected.borrow() {
            continue;
        }
        if let Some(out) = shared.queue.pop_next() {
            let (topic, payload, retain) = match out {
                Outbound::Reading { device, payload } => (shared.topics.readings[device].clone(), payload, false),
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
            _ = tick.tick() => {}
            _ = shared.queue.notified() => {}
            _ = connected.changed() => {}
            _ = draining.cancelled(), if !draining.is_cancelled() => {}
            // While draining, acknowledgements (not pushes) make the queue idle: look again soon.
            _ = tokio::time::sleep(Duration::from_millis(10)), if draining.is_cancelled() => {}
        }
    }
}
