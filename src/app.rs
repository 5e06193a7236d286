//! Wiring and lifetime: starts every task, restarts a crashed device supervisor, and shuts
//! down in phases with one deadline: devices first, then drain the queue, then `offline` and
//! DISCONNECT. While waiting it says who is late.

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::QoS;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::commands::{self, CommandContext};
use crate::config::Config;
use crate::device::{self, DecoderFactory, DeviceRuntime, PortOpener, SerialOpener, State, SupervisorContext};
use crate::homeassistant::Discovery;
use crate::liveness::{Liveness, BEAT_EVERY};
use crate::metrics::{self, MqttMetrics};
use crate::mqtt::{self, MqttShared};
use crate::queue::{Control, LaneStats, ReadingQueue};
use crate::topics::Topics;

/// Device restart backoff bounds.
const RESTART_MIN: Duration = Duration::from_millis(500);
const RESTART_MAX: Duration = Duration::from_secs(30);

/// The seams: where ports come from, which decoders run, whether backoff is jittered.
#[derive(Clone)]
pub struct Hooks {
    pub opener: Arc<dyn PortOpener>,
    pub decoders: DecoderFactory,
    /// Off in tests that need exact timings.
    pub jitter: bool,
}

impl Default for Hooks {
    fn default() -> Self {
        Self { opener: Arc::new(SerialOpener), decoders: device::default_decoders(), jitter: true }
    }
}

/// How a run ended, per device.
#[derive(Debug, Clone)]
pub struct Report {
    pub devices: Vec<(String, LaneStats)>,
}

impl Report {
    /// Readings still queued or unacknowledged when the process stopped.
    pub fn lost(&self) -> u64 {
        self.devices.iter().map(|(_, s)| s.queued + s.in_flight).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot set up the MQTT client: {0}")]
    Setup(#[from] std::io::Error),
    #[error("the {0} task stopped unexpectedly: {1}")]
    CriticalTaskDied(&'static str, String),
}

/// Runs the gateway until `shutdown` completes, then shuts down within
/// `gateway.shutdown_timeout`.
///
/// # Errors
/// [`AppError`] when the MQTT client cannot be set up or a task the gateway cannot live
/// without dies; the binary then exits non-zero so systemd restarts it.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<Report, AppError> {
    run_with(config, shutdown, Hooks::default()).await
}

/// [`run`] with explicit seams.
///
/// # Errors
/// As [`run`].
pub async fn run_with(config: Config, shutdown: impl Future<Output = ()>, hooks: Hooks) -> Result<Report, AppError> {
    let started = Instant::now();
    let topics = Topics::new(&config);
    let queue = Arc::new(ReadingQueue::new(
        config.devices.len(),
        config.queue.max_readings.get(),
        config.queue.max_bytes as usize,
        config.queue.max_age,
        config.mqtt.inflight,
    ));
    let devices: Arc<[Arc<DeviceRuntime>]> = config
        .devices
        .iter()
        .enumerate()
        .map(|(i, d)| Arc::new(DeviceRuntime::new(i, d.clone(), topics.device_state[i].clone())))
        .collect();

    let live = Liveness::new(
        [CONNECTION.to_string(), SINK.to_string()].into_iter().chain(devices.iter().map(|d| device_component(d))),
    );

    let (client, eventloop) = mqtt::client(&config, &topics)?;
    let discovery = config.homeassistant.enabled.then(|| Discovery::new(&config, &topics));
    let on_connect = {
        let devices = Arc::clone(&devices);
        let discovery = discovery.clone();
        Box::new(move || {
            let states = devices.iter().map(|d| d.state_message(&d.status()));
            states.chain(discovery.iter().flat_map(Discovery::messages)).collect::<Vec<Control>>()
        })
    };
    // Filled in below, once `shared` exists: the final metrics are read from it.
    let final_metrics: Arc<std::sync::OnceLock<Box<dyn Fn() -> Control + Send + Sync>>> = Arc::default();
    let on_drained = {
        let f = Arc::clone(&final_metrics);
        Box::new(move || f.get().map(|f| vec![f()]).unwrap_or_default())
    };
    let qos = if config.mqtt.qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
    let mut filters = Vec::new();
    if let Some(d) = &discovery {
        filters.push(d.status_topic.clone());
    }
    if config.commands.enabled {
        filters.push(topics.cmd_filter());
    }
    let (incoming_tx, incoming_rx) = tokio::sync::mpsc::channel(INCOMING);
    let shared = Arc::new(
        MqttShared::new(Arc::clone(&queue), topics.clone(), qos, on_connect, on_drained)
            .with_subscriptions(filters, incoming_tx),
    );
    let snapshot = {
        let (config, devices, shared) = (config.clone(), Arc::clone(&devices), Arc::downgrade(&shared));
        move || -> Control {
            let shared = shared.upgrade().expect("the sink holds the shared state while it drains");
            metrics_message(&config, &devices, &shared, started)
        }
    };
    let _ = final_metrics.set(Box::new(snapshot));

    let hard_stop = CancellationToken::new();
    let draining = CancellationToken::new();
    let devices_stop = CancellationToken::new();
    let backoff = Backoff::new(config.mqtt.reconnect_min, config.mqtt.reconnect_max, hooks.jitter);
    let mut conn = tokio::spawn(mqtt::run_connection(
        eventloop,
        Arc::clone(&shared),
        backoff,
        live.beat_for(CONNECTION),
        hard_stop.clone(),
    ));
    let mut sink = tokio::spawn(mqtt::run_sink(
        client,
        Arc::clone(&shared),
        live.beat_for(SINK),
        draining.clone(),
        hard_stop.clone(),
    ));
    let metrics_task = tokio::spawn(metrics_loop(
        config.clone(),
        Arc::clone(&devices),
        Arc::clone(&shared),
        started,
        draining.clone(),
    ));
    let command_task = tokio::spawn(commands::run(
        CommandContext {
            queue: Arc::clone(&queue),
            topics: topics.clone(),
            devices: Arc::clone(&devices),
            discovery,
            commands_enabled: config.commands.enabled,
            config: commands::redacted(config.source.as_ref()),
            metrics: {
                let (config, devices, shared) = (config.clone(), Arc::clone(&devices), Arc::downgrade(&shared));
                Box::new(move || {
                    let shared = shared.upgrade().expect("commands run while the MQTT side lives");
                    metrics_message(&config, &devices, &shared, started)
                })
            },
        },
        incoming_rx,
        draining.clone(),
    ));
    let notify_task =
        tokio::spawn(notify_loop(Arc::clone(&live), Arc::clone(&devices), Arc::clone(&shared), draining.clone()));

    let ctx_for = |dev: &Arc<DeviceRuntime>| SupervisorContext {
        dev: Arc::clone(dev),
        queue: Arc::clone(&queue),
        opener: Arc::clone(&hooks.opener),
        decoders: Arc::clone(&hooks.decoders),
        started,
        restart_min: RESTART_MIN,
        restart_max: RESTART_MAX,
        jitter: hooks.jitter,
        beat: live.beat_for(&device_component(dev)),
    };
    let mut supervisors = JoinSet::new();
    let mut task_device = std::collections::HashMap::new();
    for dev in devices.iter() {
        let h = supervisors.spawn(device::supervise(ctx_for(dev), devices_stop.clone()));
        task_device.insert(h.id(), dev.index);
    }
    tracing::info!(devices = devices.len(), gateway = %config.gateway.id, "Gateway running.");
    // Config is valid and every task is running.
    notify(&[sd_notify::NotifyState::Ready]);

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            r = &mut conn => return Err(died("MQTT connection", r)),
            r = &mut sink => return Err(died("MQTT sink", r)),
            Some(r) = supervisors.join_next_with_id() => {
                // A supervisor only returns at shutdown; anything else is a crash in it.
                let (id, why) = match r {
                    Ok((id, ())) => (id, "returned".to_string()),
                    Err(e) => (e.id(), if e.is_panic() { device::panic_text(e.into_panic()) } else { e.to_string() }),
                };
                let Some(index) = task_device.remove(&id) else { continue };
                let dev = &devices[index];
                tracing::error!(device = dev.name(), error = %why, "Device supervisor crashed; restarting it.");
                dev.counters.restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let h = supervisors.spawn(device::supervise(ctx_for(dev), devices_stop.clone()));
                task_device.insert(h.id(), index);
            }
        }
    }

    // Phase 1: stop reading. Supervisors end their sessions; decode threads finish the bytes
    // already read, so every frame read is counted somewhere.
    let deadline = Instant::now() + config.gateway.shutdown_timeout;
    notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!(timeout_ms = config.gateway.shutdown_timeout.as_millis() as u64, "Shutting down: stopping devices.");
    devices_stop.cancel();
    let devices_done = wait_with_progress(async { while supervisors.join_next().await.is_some() {} }, deadline, || {
        let late: Vec<&str> = devices.iter().filter(|d| d.status().state != State::Stopped).map(|d| d.name()).collect();
        format!("devices still stopping: {}", late.join(", "))
    })
    .await;
    if !devices_done {
        supervisors.abort_all();
    }

    // Phase 2: drain the queue, then `offline`, then DISCONNECT.
    tracing::info!(queued = queue.depth().0, "Shutting down: draining the queue.");
    draining.cancel();
    let q = Arc::clone(&queue);
    let drained = wait_with_progress(&mut sink, deadline, || {
        let (n, _) = q.depth();
        format!("MQTT sink still draining: {n} readings queued, broker connected: {}", shared.is_connected())
    })
    .await;
    let closed = drained
        && wait_with_progress(&mut conn, deadline.max(Instant::now() + Duration::from_secs(1)), || {
            "MQTT connection still closing".into()
        })
        .await;
    hard_stop.cancel();
    if !drained {
        let _ = sink.await;
    }
    if !closed {
        let _ = conn.await;
    }
    let _ = metrics_task.await;
    let _ = notify_task.await;
    let _ = command_task.await;

    let report = Report { devices: devices.iter().map(|d| d.name().to_string()).zip(queue.stats()).collect() };
    for ((name, s), dev) in report.devices.iter().zip(devices.iter()) {
        let lost = s.queued + s.in_flight;
        let c = &dev.counters;
        let fields =
            (c.frames_in.load(Relaxed), c.rejected_total(), s.readings, s.delivered, s.dropped_oldest, s.expired);
        if lost > 0 {
            tracing::error!(device = %name, lost, "Shutdown deadline passed: readings not delivered.");
        }
        tracing::info!(
            device = %name,
            frames_in = fields.0,
            rejected = fields.1,
            readings = fields.2,
            delivered = fields.3,
            dropped_oldest = fields.4,
            expired = fields.5,
            lost,
            "Final accounting."
        );
    }
    tracing::info!(lost = report.lost(), "Gateway stopped.");
    Ok(report)
}

fn died(what: &'static str, r: Result<(), tokio::task::JoinError>) -> AppError {
    let why = match r {
        Ok(()) => "it returned".to_string(),
        Err(e) if e.is_panic() => device::panic_text(e.into_panic()),
        Err(e) => e.to_string(),
    };
    tracing::error!(task = what, error = %why, "A task the gateway cannot live without stopped.");
    AppError::CriticalTaskDied(what, why)
}

/// Awaits `fut` until `deadline`, logging `who()` every second meanwhile. True if it finished.
async fn wait_with_progress<F: Future>(fut: F, deadline: Instant, who: impl Fn() -> String) -> bool {
    tokio::pin!(fut);
    let mut tick = tokio::time::interval_at(Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut fut => return true,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(waiting_for = %who(), "Shutdown deadline reached.");
                return false;
            }
            _ = tick.tick() => tracing::info!(waiting_for = %who(), "Shutdown in progress."),
        }
    }
}

/// Publishes metrics every `metrics_interval` until draining starts (the sink then sends a
/// final snapshot once the queue is drained).
async fn metrics_loop(
    config: Config,
    devices: Arc<[Arc<DeviceRuntime>]>,
    shared: Arc<MqttShared>,
    started: Instant,
    draining: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.gateway.metrics_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = draining.cancelled() => return,
            _ = tick.tick() => shared.queue.push_control(metrics_message(&config, &devices, &shared, started)),
        }
    }
}

fn metrics_message(config: &Config, devices: &[Arc<DeviceRuntime>], shared: &MqttShared, started: Instant) -> Control {
    let m = metrics::snapshot(
        started.elapsed().as_secs(),
        devices,
        &shared.queue,
        &config.queue,
        MqttMetrics {
            connected: shared.is_connected(),
            reconnects: shared.reconnects.load(Relaxed),
            kicked_after_connect: shared.kicked_in_a_row.load(Relaxed),
            client_id_conflict: shared.client_id_conflict.load(Relaxed),
            incoming_dropped: shared.incoming_dropped.load(Relaxed),
        },
    );
    let payload = serde_json::to_vec(&m).expect("metrics serialise");
    Control { topic: shared.topics.metrics.clone(), payload: payload.into(), retain: false }
}

/// Incoming messages waiting for the command task.
const INCOMING: usize = 32;

const CONNECTION: &str = "mqtt-connection";
const SINK: &str = "mqtt-sink";

fn device_component(dev: &DeviceRuntime) -> String {
    format!("device:{}", dev.name())
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`); a no-op otherwise.
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "Cannot notify systemd.");
    }
}

/// `STATUS=` for systemd, and `WATCHDOG=1` only while every task reports in (see
/// [`crate::liveness`]): a wedged pipeline gets restarted by systemd, a broker outage does not
/// (the connection task keeps reporting in while it backs off).
async fn notify_loop(
    live: Arc<Liveness>,
    devices: Arc<[Arc<DeviceRuntime>]>,
    shared: Arc<MqttShared>,
    draining: CancellationToken,
) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    // Ping four times per watchdog period; a task may miss beats for half of it (but at least
    // three beats) before the pings stop.
    let period = watchdog.map_or(Duration::from_secs(10), |w| (w / 4).max(Duration::from_millis(100)));
    let limit = watchdog.map_or(Duration::MAX, |w| (w / 2).max(3 * BEAT_EVERY));
    let mut tick = tokio::time::interval(period);
    let mut was_stale = false;
    loop {
        tokio::select! {
            biased;
            _ = draining.cancelled() => return,
            _ = tick.tick() => {}
        }
        let up = devices.iter().filter(|d| d.status().state == State::Up).count();
        let (queued, _) = shared.queue.depth();
        let broker = match (shared.is_connected(), shared.client_id_conflict.load(Relaxed)) {
            (_, true) => "flapping (client id conflict suspected)",
            (true, false) => "connected",
            (false, false) => "disconnected",
        };
        let mut status = format!("{up}/{} devices up, {queued} readings queued, broker {broker}", devices.len());
        let stale = live.stale(limit);
        if stale.is_empty() {
            if was_stale {
                tracing::info!("Every task reports in again; feeding the watchdog.");
            }
            was_stale = false;
            let mut states = vec![sd_notify::NotifyState::Status(&status)];
            if watchdog.is_some() {
                states.push(sd_notify::NotifyState::Watchdog);
            }
            notify(&states);
        } else {
            if !was_stale {
                tracing::error!(stalled = %stale.join(", "), "Tasks stopped reporting in; not feeding the watchdog.");
            }
            was_stale = true;
            status += &format!("; not reporting: {}", stale.join(", "));
            notify(&[sd_notify::NotifyState::Status(&status)]);
        }
    }
}
