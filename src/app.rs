//! Wiring and lifetime: starts every task, keeps each device's supervisor alive, applies
//! reloads (only what changed), and shuts down in phases with one deadline: devices first,
//! then drain the queue, then the final metrics, `offline` and DISCONNECT. While waiting it
//! says who is late.

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::commands::{self, CommandContext};
use crate::config::{BusConfig, Config, DeviceConfig};
use crate::device::{
    self, BusContext, DecoderFactory, DeviceRuntime, InputPool, PortOpener, Registry, SerialOpener, State,
    SupervisorContext,
};
use crate::homeassistant::{Discovery, SharedDiscovery};
use crate::liveness::{Liveness, BEAT_EVERY};
use crate::metrics::{self, MqttMetrics};
use crate::mqtt::{self, MqttShared};
use crate::queue::{Control, LaneStats, ReadingQueue};
use crate::reading::PacketLimit;
use crate::sparkplug::SparkplugOutput;
use crate::spool::{self, Spool};
use crate::telemetry;
use crate::topics::Topics;

/// Device restart backoff bounds.
const RESTART_MIN: Duration = Duration::from_millis(500);
const RESTART_MAX: Duration = Duration::from_secs(30);
/// Incoming messages waiting for the command task.
const INCOMING: usize = 32;
/// How long a reload waits for the old MQTT connection to say goodbye.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(2);

const CONNECTION: &str = "mqtt-connection";
/// The Sparkplug connection task's liveness name.
const SPARKPLUG: &str = "sparkplug-connection";
/// The Sparkplug output's time to send its NDEATH when the main drain used the whole deadline.
const SPARKPLUG_GRACE: Duration = Duration::from_secs(1);

/// The seams: where ports come from, which decoders run, whether backoff is jittered, how
/// many input threads the stream devices share.
#[derive(Clone)]
pub struct Hooks {
    pub opener: Arc<dyn PortOpener>,
    pub decoders: DecoderFactory,
    /// Off in tests that need exact timings.
    pub jitter: bool,
    /// None: one per core, fewer for fewer devices ([`InputPool::size_for`]).
    pub input_threads: Option<usize>,
}

impl Default for Hooks {
    fn default() -> Self {
        Self { opener: Arc::new(SerialOpener), decoders: device::default_decoders(), jitter: true, input_threads: None }
    }
}

/// How a run ended, per queue lane (a device, or one removed by a reload).
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
    #[error("cannot start the input threads: {0}")]
    InputThreads(std::io::Error),
    #[error("cannot start the spool: {0}")]
    Spool(std::io::Error),
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
    let (_keep, reloads) = mpsc::channel(1);
    run_reloadable(config, shutdown, reloads, hooks).await
}

/// [`run_with`], applying every (already validated) config that arrives on `reloads`.
///
/// # Errors
/// As [`run`].
pub async fn run_reloadable(
    config: Config,
    shutdown: impl Future<Output = ()>,
    mut reloads: mpsc::Receiver<Config>,
    hooks: Hooks,
) -> Result<Report, AppError> {
    let core = Core::new(&config, hooks)?;
    let mut devices: Vec<RunningUnit> = units(&config).iter().map(|u| core.start_unit(u, &[])).collect();
    core.registry.set(runtimes(&devices));
    let mut side = core.start_mqtt(&config)?;
    let (current, current_rx) = watch::channel(Arc::clone(&side.shared));
    let notify_task = tokio::spawn(notify_loop(
        Arc::clone(&core.live),
        Arc::clone(&core.registry),
        current_rx,
        core.draining.clone(),
        core.spool.as_ref().map(|(s, _)| Arc::clone(s)),
    ));
    tracing::info!(devices = devices.len(), gateway = %config.gateway.id, "Gateway running.");
    // Config is valid and every task is running.
    notify(&[sd_notify::NotifyState::Ready]);

    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            biased;
            _ = &mut shutdown => None,
            Some(next) = reloads.recv() => Some(Ok(next)),
            r = &mut side.conn => Some(Err(died("MQTT connection", r))),
        };
        match event {
            None => break,
            Some(Err(e)) => return Err(e),
            Some(Ok(next)) => {
                core.apply(next, &mut devices, &mut side).await?;
                current.send_replace(Arc::clone(&side.shared));
            }
        }
    }
    let report = core.shut_down(devices, side).await;
    let _ = notify_task.await;
    Ok(report)
}

/// The spool, and its thread until shutdown takes it.
type SpoolAndThread = (Arc<Spool>, std::sync::Mutex<Option<std::thread::JoinHandle<()>>>);

/// What lives as long as the process, across reloads.
struct Core {
    started: Instant,
    /// The configuration in force.
    config: Arc<RwLock<Config>>,
    topics: Topics,
    queue: Arc<ReadingQueue>,
    /// `mqtt.max_packet_size`, shared with every device's input.
    packet_limit: PacketLimit,
    registry: Arc<Registry>,
    live: Arc<Liveness>,
    discovery: SharedDiscovery,
    /// Command counters (metrics), kept across MQTT sides.
    command_stats: Arc<commands::Stats>,
    hooks: Hooks,
    /// Parent of every device's stop token.
    devices_stop: CancellationToken,
    draining: CancellationToken,
    /// The threads the stream devices' supervisors run on (read, decode); stopped last.
    inputs: Arc<InputPool>,
    /// The spool and its thread, when `[spool] dir` is set.
    spool: Option<SpoolAndThread>,
    /// The Sparkplug B output, when enabled (taken at shutdown).
    sparkplug: std::sync::Mutex<Option<SparkplugOutput>>,
    /// What outlives the output's shutdown: its counters, its connection (and queue, which
    /// every device's readings also go to) and spool.
    sparkplug_stats: Option<SparkplugView>,
}

/// What the metrics read of the Sparkplug output.
type SparkplugView = (Arc<crate::sparkplug::Stats>, Arc<MqttShared>, Option<Arc<Spool>>);

/// What owns a port and is supervised on its own: a listening device, or a Modbus bus with
/// its slaves. Each of its devices has a runtime (lane, counters, state).
#[derive(Debug, Clone, PartialEq)]
enum Unit {
    Device(DeviceConfig),
    Bus(BusConfig),
}

impl Unit {
    /// Its name among the units (and the watchdog's component name).
    fn component(&self) -> String {
        match self {
            Unit::Device(d) => device_component(&d.name),
            Unit::Bus(b) => format!("bus:{}", b.name),
        }
    }

    /// The devices it runs.
    fn devices(&self) -> Vec<DeviceConfig> {
        match self {
            Unit::Device(d) => vec![d.clone()],
            Unit::Bus(b) => b.devices().collect(),
        }
    }
}

/// Every unit of `config`: devices in order, then buses.
fn units(config: &Config) -> Vec<Unit> {
    config.devices.iter().cloned().map(Unit::Device).chain(config.buses.iter().cloned().map(Unit::Bus)).collect()
}

/// The runtimes of every running device, units in order.
fn runtimes(running: &[RunningUnit]) -> Vec<Arc<DeviceRuntime>> {
    running.iter().flat_map(|u| u.runtimes.iter().cloned()).collect()
}

/// A bus's slaves, in config order.
type Slaves = Vec<Arc<DeviceRuntime>>;

/// A unit's running supervisor.
struct RunningUnit {
    unit: Unit,
    runtimes: Vec<Arc<DeviceRuntime>>,
    stop: CancellationToken,
    keeper: JoinHandle<()>,
    /// A bus's: its slaves (a reload sends a new set) and where their writes go.
    bus: Option<(watch::Sender<Slaves>, mpsc::Sender<device::WriteJob>)>,
}

/// One MQTT connection with its tasks; replaced when a reload changes the MQTT settings.
struct MqttSide {
    shared: Arc<MqttShared>,
    conn: JoinHandle<()>,
    helpers: Vec<JoinHandle<()>>,
    /// Asks the connection to disconnect cleanly (a reload).
    switching: CancellationToken,
    /// Ends the connection task at once.
    hard_stop: CancellationToken,
    /// Ends the metrics and command tasks (child of draining).
    helpers_stop: CancellationToken,
}

impl Core {
    fn new(config: &Config, hooks: Hooks) -> Result<Self, AppError> {
        let streams = units(config).iter().filter(|u| matches!(u, Unit::Device(_))).count();
        let threads = hooks.input_threads.unwrap_or_else(|| InputPool::size_for(streams));
        let inputs = Arc::new(InputPool::new(threads).map_err(AppError::InputThreads)?);
        let queue = Arc::new(ReadingQueue::new(
            0,
            config.queue.max_readings.get(),
            config.queue.max_bytes as usize,
            config.queue.max_age,
            config.mqtt.inflight,
        ));
        let topics = Topics::new(config);
        let discovery = config.homeassistant.enabled.then(|| Discovery::new(config, &topics));
        let spool_settings = config.spool.path(&config.gateway).map(|dir| spool::Settings {
            dir,
            max_bytes: config.spool.max_bytes,
            sync_interval: config.spool.sync_interval,
            one_stream: config.spool.one_stream(),
            devices: units(config).len(),
        });
        let spool = match spool_settings.clone() {
            Some(settings) => {
                let spool = Spool::new(settings, Arc::clone(&queue));
                let thread = spool.start().map_err(AppError::Spool)?;
                Some((spool, std::sync::Mutex::new(Some(thread))))
            }
            None => None,
        };
        let registry: Arc<Registry> = Arc::default();
        let live = Liveness::new([CONNECTION.to_string()]);
        let draining = CancellationToken::new();
        let sparkplug = if config.sparkplug.enabled {
            let beat = live.beat_for(SPARKPLUG);
            Some(
                SparkplugOutput::start(
                    config,
                    Arc::clone(&registry),
                    beat,
                    draining.clone(),
                    hooks.jitter,
                    spool_settings,
                )
                .map_err(AppError::Spool)?,
            )
        } else {
            None
        };
        Ok(Self {
            started: Instant::now(),
            config: Arc::new(RwLock::new(config.clone())),
            topics,
            queue,
            packet_limit: PacketLimit::new(config.mqtt.max_packet_size as usize),
            registry,
            live,
            sparkplug_stats: sparkplug.as_ref().map(|s| (Arc::clone(&s.stats), Arc::clone(&s.shared), s.spool.clone())),
            sparkplug: std::sync::Mutex::new(sparkplug),
            discovery: Arc::new(std::sync::Mutex::new(discovery)),
            command_stats: Arc::default(),
            hooks,
            devices_stop: CancellationToken::new(),
            draining,
            inputs,
            spool,
        })
    }

    fn config(&self) -> Config {
        self.config.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Starts a unit's supervisor; a runtime in `previous` of the same name hands over its
    /// lane, counters and status (a reload).
    fn start_unit(&self, unit: &Unit, previous: &[Arc<DeviceRuntime>]) -> RunningUnit {
        let writes = match unit {
            Unit::Bus(_) => Some(mpsc::channel(device::WRITES_WAITING)),
            Unit::Device(_) => None,
        };
        let writes_tx = writes.as_ref().map(|(tx, _)| tx.clone());
        let runtimes: Vec<Arc<DeviceRuntime>> =
            unit.devices().into_iter().map(|config| self.runtime(config, previous, writes_tx.as_ref())).collect();
        let stop = self.devices_stop.child_token();
        let beat = self.live.beat_for(&unit.component());
        let mut slaves_tx = None;
        let keeper = match (unit, writes) {
            (Unit::Device(_), _) | (_, None) => {
                let ctx = SupervisorContext {
                    dev: Arc::clone(&runtimes[0]),
                    queue: Arc::clone(&self.queue),
                    opener: Arc::clone(&self.hooks.opener),
                    decoders: Arc::clone(&self.hooks.decoders),
                    restart_min: RESTART_MIN,
                    restart_max: RESTART_MAX,
                    jitter: self.hooks.jitter,
                    beat,
                };
                let stop = stop.clone();
                let inputs = Arc::clone(&self.inputs);
                tokio::spawn(keep_running(runtimes.clone(), Arc::clone(&self.queue), stop.clone(), move || {
                    inputs.spawn(device::supervise(ctx.clone(), stop.clone()))
                }))
            }
            (Unit::Bus(bus), Some((_, rx))) => {
                let (tx, slaves) = watch::channel(runtimes.clone());
                slaves_tx = Some(tx);
                let ctx = BusContext {
                    bus: bus.clone(),
                    slaves,
                    queue: Arc::clone(&self.queue),
                    opener: Arc::clone(&self.hooks.opener),
                    restart_min: RESTART_MIN,
                    restart_max: RESTART_MAX,
                    jitter: self.hooks.jitter,
                    beat,
                    writes: Arc::new(tokio::sync::Mutex::new(rx)),
                };
                let stop = stop.clone();
                tokio::spawn(keep_running(runtimes.clone(), Arc::clone(&self.queue), stop.clone(), move || {
                    tokio::spawn(device::supervise_bus(ctx.clone(), stop.clone()))
                }))
            }
        };
        let bus = slaves_tx.zip(writes_tx);
        RunningUnit { unit: unit.clone(), runtimes, stop, keeper, bus }
    }

    /// The runtime of device `config`: a new lane, or `previous`'s of the same name (its lane,
    /// counters and status) with the new config.
    fn runtime(
        &self,
        config: DeviceConfig,
        previous: &[Arc<DeviceRuntime>],
        writes: Option<&mpsc::Sender<device::WriteJob>>,
    ) -> Arc<DeviceRuntime> {
        let runtime = match previous.iter().find(|p| p.name() == config.name) {
            Some(p) => p.with_config(config),
            None => {
                let lane = self.queue.add_lane(&config.name);
                let limit = self.packet_limit.for_topic(&self.topics.readings(&config.name));
                let state_topic = self.topics.device_state(&config.name);
                let queues = self.sparkplug_stats.iter().map(|(_, conn, _)| &conn.queue);
                let also = queues.map(|q| (Arc::clone(q), q.add_lane(&config.name))).collect();
                DeviceRuntime::new(lane, config, state_topic, limit).with_outputs(also)
            }
        };
        Arc::new(runtime.with_writes(writes.cloned()))
    }

    /// A running bus whose port and timing `next` leaves as they are takes `next`'s slaves
    /// without closing its port: unchanged slaves keep their runtime (and their polls),
    /// changed ones get a new one with their counters, new ones a lane, removed ones stop.
    /// Returns false (nothing done) when `next` is another bus or changes more than slaves.
    fn update_slaves(&self, u: &mut RunningUnit, next: &Unit) -> bool {
        let (Unit::Bus(old), Unit::Bus(new), Some((slaves_tx, writes))) = (&u.unit, next, &u.bus) else {
            return false;
        };
        let line = |b: &BusConfig| BusConfig { slaves: Vec::new(), ..b.clone() };
        if line(old) != line(new) {
            return false;
        }
        let runtimes: Vec<Arc<DeviceRuntime>> = next
            .devices()
            .into_iter()
            .map(|config| match u.runtimes.iter().find(|r| r.name() == config.name && r.config == config) {
                Some(same) => Arc::clone(same),
                None => self.runtime(config, &u.runtimes, Some(writes)),
            })
            .collect();
        for gone in u.runtimes.iter().filter(|r| !runtimes.iter().any(|n| n.name() == r.name())) {
            gone.set_state(&self.queue, State::Stopped, None);
        }
        slaves_tx.send_replace(runtimes.clone());
        u.runtimes = runtimes;
        u.unit = next.clone();
        true
    }

    /// Stops a unit's supervisor and waits for its sessions (and their decoding) to finish.
    async fn stop_unit(&self, u: RunningUnit, deadline: Instant) -> Vec<Arc<DeviceRuntime>> {
        u.stop.cancel();
        let name = u.unit.component();
        if !wait_with_progress(u.keeper, deadline, || format!("{name} still stopping")).await {
            tracing::warn!(unit = %name, "Did not stop in time; leaving it behind.");
        }
        u.runtimes
    }

    fn start_mqtt(&self, config: &Config) -> Result<MqttSide, AppError> {
        let (opts, connector) = mqtt::ConnectOptions::new(config, &self.topics)?;
        let on_connect = {
            let (registry, discovery, queue) =
                (Arc::clone(&self.registry), Arc::clone(&self.discovery), Arc::clone(&self.queue));
            Box::new(move || {
                // Device states are queued here, each under its device's status lock, so a
                // state change racing the reconnect cannot be overtaken by a stale snapshot.
                for d in registry.snapshot() {
                    d.republish_state(&queue);
                }
                let d = discovery.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                d.iter().flat_map(Discovery::messages).collect::<Vec<Control>>()
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
        if config.homeassistant.enabled {
            filters.push(format!("{}/status", config.homeassistant.discovery_prefix));
        }
        if config.commands.enabled {
            filters.push(self.topics.cmd_filter());
        }
        let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING);
        let mut shared = MqttShared::new(Arc::clone(&self.queue), self.topics.clone(), qos, on_connect, on_drained)
            .with_subscriptions(filters, incoming_tx);
        shared.replay_on_readings = config.spool.one_stream();
        shared.catch_up_rate = config.mqtt.catch_up_rate;
        let shared = Arc::new(shared);
        let _ = final_metrics.set(self.metrics_fn(&shared));

        let hard_stop = CancellationToken::new();
        let switching = CancellationToken::new();
        let helpers_stop = self.draining.child_token();
        let backoff = Backoff::new(config.mqtt.reconnect_min, config.mqtt.reconnect_max, self.hooks.jitter);
        let stops =
            mqtt::Stops { draining: self.draining.clone(), switching: switching.clone(), hard_stop: hard_stop.clone() };
        let conn = tokio::spawn(mqtt::run_connection(
            connector,
            opts,
            Arc::clone(&shared),
            backoff,
            self.live.beat_for(CONNECTION),
            stops,
        ));
        let metrics_task = tokio::spawn(metrics_loop(
            Arc::clone(&self.config),
            Arc::clone(&shared),
            self.metrics_fn(&shared),
            helpers_stop.clone(),
        ));
        let command_task = tokio::spawn(commands::run(
            CommandContext {
                queue: Arc::clone(&self.queue),
                topics: self.topics.clone(),
                devices: Arc::clone(&self.registry),
                discovery: Arc::clone(&self.discovery),
                allowed: config.commands.allowed(),
                config: Arc::clone(&self.config),
                metrics: self.metrics_fn(&shared),
                stats: Arc::clone(&self.command_stats),
            },
            incoming_rx,
            helpers_stop.clone(),
        ));
        Ok(MqttSide { shared, conn, helpers: vec![metrics_task, command_task], switching, hard_stop, helpers_stop })
    }

    /// A metrics snapshot maker bound to one MQTT side.
    fn metrics_fn(&self, shared: &Arc<MqttShared>) -> Box<dyn Fn() -> Control + Send + Sync> {
        let (config, registry, shared, started) =
            (Arc::clone(&self.config), Arc::clone(&self.registry), Arc::downgrade(shared), self.started);
        let command_stats = Arc::clone(&self.command_stats);
        let spool = self.spool.as_ref().map(|(s, _)| Arc::clone(s));
        let sparkplug = self.sparkplug_stats.clone();
        Box::new(move || {
            let shared = shared.upgrade().expect("metrics are made while their MQTT side lives");
            let config = config.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let devices = registry.snapshot();
            metrics_message(&config, &devices, &shared, started, &command_stats, spool.as_deref(), sparkplug.as_ref())
        })
    }

    /// Applies a validated config: only what changed is stopped, started or restarted.
    async fn apply(&self, next: Config, devices: &mut Vec<RunningUnit>, side: &mut MqttSide) -> Result<(), AppError> {
        let old = self.config();
        if next.gateway.id != old.gateway.id || next.mqtt.topic_prefix != old.mqtt.topic_prefix {
            tracing::error!(
                "Reload refused: gateway.id and mqtt.topic_prefix name every topic and cannot change while running; \
                 restart the service to apply them. Keeping the running configuration."
            );
            return Ok(());
        }
        let deadline = Instant::now() + next.gateway.shutdown_timeout;
        // Before devices restart or the connection is switched: a reading built from now on
        // meets the new limit.
        self.packet_limit.set(next.mqtt.max_packet_size as usize);
        if next.spool != old.spool || next.gateway.state_dir != old.gateway.state_dir {
            tracing::warn!(
                "The [spool] settings and gateway.state_dir apply at the next restart; keeping the running ones."
            );
        }
        if next.sparkplug != old.sparkplug {
            tracing::warn!("The [sparkplug] settings apply at the next restart; keeping the running ones.");
        }
        if next.queue != old.queue {
            let evicted =
                self.queue.set_bounds(next.queue.max_readings.get(), next.queue.max_bytes as usize, next.queue.max_age);
            tracing::info!(evicted, "Queue bounds changed.");
        }

        let (mut started, mut stopped, mut restarted) = (0, 0, 0);
        let next_units = units(&next);
        // Units whose config changed or that are gone stop first, so that their runtimes
        // (lanes, counters, states) can go to the units that take their devices over.
        let mut kept: Vec<RunningUnit> = Vec::new();
        let mut handed: Vec<Arc<DeviceRuntime>> = Vec::new();
        for mut u in std::mem::take(devices) {
            if next_units.contains(&u.unit) {
                kept.push(u);
                continue;
            }
            let same_bus = next_units.iter().find(|n| n.component() == u.unit.component());
            if same_bus.is_some_and(|n| self.update_slaves(&mut u, n)) {
                restarted += 1;
                kept.push(u);
                continue;
            }
            let component = u.unit.component();
            if next_units.iter().any(|n| n.component() == component) {
                restarted += 1;
            } else {
                stopped += 1;
                self.live.retire(&component);
            }
            handed.extend(self.stop_unit(u, deadline).await);
        }
        for unit in &next_units {
            match kept.iter().position(|k| k.unit == *unit) {
                Some(i) => devices.push(kept.remove(i)),
                None => {
                    if !handed.iter().any(|h| unit.devices().iter().any(|d| d.name == h.name())) {
                        started += 1;
                    }
                    devices.push(self.start_unit(unit, &handed));
                }
            }
        }
        self.registry.set(runtimes(devices));
        *self.config.write().unwrap_or_else(std::sync::PoisonError::into_inner) = next.clone();

        let mut discovery = next.homeassistant.enabled.then(|| Discovery::new(&next, &self.topics));
        let (removals, messages) = {
            let mut d = self.discovery.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let (Some(old), Some(new)) = (d.as_ref(), discovery.as_mut()) {
                new.keep_removed_components(old);
            }
            let removals = match (d.as_ref(), discovery.as_ref()) {
                (Some(old), Some(new)) => old.removals(new),
                (Some(old), None) => {
                    old.messages().into_iter().map(|m| Control { payload: bytes::Bytes::new(), ..m }).collect()
                }
                _ => Vec::new(),
            };
            *d = discovery;
            (removals, d.iter().flat_map(Discovery::messages).collect::<Vec<_>>())
        };
        for m in removals.into_iter().chain(messages) {
            self.queue.push_control(m);
        }

        let reconnect = next.mqtt != old.mqtt
            || next.commands != old.commands
            || next.homeassistant.enabled != old.homeassistant.enabled
            || next.homeassistant.discovery_prefix != old.homeassistant.discovery_prefix;
        if reconnect {
            self.switch_mqtt(&next, side).await?;
        }
        tracing::info!(started, stopped, restarted, mqtt_reconnected = reconnect, "Configuration reloaded.");
        Ok(())
    }

    /// Replaces the MQTT connection: the old one leaves cleanly (no last will), its in-flight
    /// readings go back to the queue, and the new one connects with the new settings.
    async fn switch_mqtt(&self, next: &Config, side: &mut MqttSide) -> Result<(), AppError> {
        // Set the new client up first: if that fails, the old connection stays.
        let new_side = self.start_mqtt_after_old_closes(next, side).await?;
        let old = std::mem::replace(side, new_side);
        old.helpers_stop.cancel();
        for h in old.helpers {
            let _ = h.await;
        }
        Ok(())
    }

    async fn start_mqtt_after_old_closes(&self, next: &Config, old: &mut MqttSide) -> Result<MqttSide, AppError> {
        mqtt::ConnectOptions::new(next, &self.topics)?;
        old.switching.cancel();
        let deadline = Instant::now() + SWITCH_TIMEOUT;
        let closed = tokio::time::timeout_at(deadline, &mut old.conn).await.is_ok();
        old.hard_stop.cancel();
        if !closed {
            let _ = (&mut old.conn).await;
        }
        let requeued = self.queue.requeue_in_flight();
        // The ledger is empty now: size it for the new window before packet ids above the
        // old one are handed out.
        self.queue.set_max_inflight(next.mqtt.inflight);
        tracing::info!(requeued, "MQTT settings changed; reconnecting with the new ones.");
        self.start_mqtt(next)
    }

    /// Phase 1: stop reading (sessions end, decoders finish the bytes already read, so
    /// every frame read is counted). Phase 2: drain, final metrics, `offline`, DISCONNECT.
    async fn shut_down(&self, devices: Vec<RunningUnit>, mut side: MqttSide) -> Report {
        let config = self.config();
        let deadline = Instant::now() + config.gateway.shutdown_timeout;
        // Devices get at most three quarters of the time: a device that never stops (a decoder
        // stuck on a frame) must not leave the drain, the final metrics and `offline` none.
        let devices_deadline = deadline - config.gateway.shutdown_timeout / 4;
        notify(&[sd_notify::NotifyState::Stopping]);
        tracing::info!(
            timeout_ms = config.gateway.shutdown_timeout.as_millis() as u64,
            "Shutting down: stopping devices."
        );
        self.devices_stop.cancel();
        let registry = Arc::clone(&self.registry);
        let late = || -> String {
            let late: Vec<String> = registry
                .snapshot()
                .iter()
                .filter(|d| d.status().state != State::Stopped)
                .map(|d| d.name().to_string())
                .collect();
            late.join(", ")
        };
        let keepers = devices.into_iter().map(|d| d.keeper).collect::<Vec<_>>();
        let all_stopped = wait_with_progress(
            async {
                for k in keepers {
                    let _ = k.await;
                }
            },
            devices_deadline,
            || format!("devices still stopping: {}", late()),
        )
        .await;
        if !all_stopped {
            // Their sessions are left behind (a decoder stuck on a frame cannot be
            // stopped); the process ends without them.
            tracing::error!(
                devices = %late(),
                "Devices did not stop in time; leaving them behind and draining what was read."
            );
        }

        tracing::info!(queued = self.queue.depth().0, "Shutting down: draining the queue.");
        if let Some((spool, _)) = &self.spool {
            // What is in the spool stays there for the next start; the drain is for memory.
            spool.stop_replay();
        }
        if let Some(sp) = &*self.sparkplug.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
            sp.stop_replay();
        }
        self.draining.cancel();
        let (queue, shared) = (Arc::clone(&self.queue), Arc::clone(&side.shared));
        // With a spool and no broker, waiting is pointless: the queue goes to disk. With no
        // broker and no reading left, only the final state would be waited for, and the last
        // will says `offline` for us (a broker on this host stops with us, in parallel).
        let nothing_to_deliver = queue.depth().0 == 0 && queue.stats().iter().all(|l| l.in_flight == 0);
        let drained = if self.spool.is_some() && !shared.is_connected() {
            tracing::info!("The broker is away: the queue goes to the spool instead of draining.");
            false
        } else if nothing_to_deliver && !shared.is_connected() {
            tracing::info!("The broker is away and no reading is waiting: not waiting for it.");
            false
        } else {
            wait_with_progress(&mut side.conn, deadline, || {
                format!(
                    "MQTT connection still draining: {} readings queued, broker connected: {}",
                    queue.depth().0,
                    shared.is_connected()
                )
            })
            .await
        };
        side.hard_stop.cancel();
        if !drained {
            telemetry::shutdown_stage("the MQTT connection task, told to stop at once");
            let _ = side.conn.await;
        }
        let sparkplug = self.sparkplug.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(sp) = sparkplug {
            telemetry::shutdown_stage("the Sparkplug connection (its queue, then NDEATH)");
            sp.finish(deadline.max(Instant::now() + SPARKPLUG_GRACE)).await;
        }
        telemetry::shutdown_stage("the metrics and command tasks");
        for h in side.helpers {
            let _ = h.await;
        }
        if let Some((spool, thread)) = &self.spool {
            telemetry::shutdown_stage("writing what is left to the spool");
            self.queue.requeue_in_flight();
            if let Some(t) = thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
                spool.finish(t);
            }
        }
        telemetry::shutdown_stage("the final accounting");
        self.report()
    }

    /// The final accounting, logged per lane.
    fn report(&self) -> Report {
        let stats = self.queue.stats();
        let runtimes = self.registry.snapshot();
        let report = Report {
            devices: stats.iter().enumerate().map(|(i, s)| (self.queue.lane_name(i).to_string(), *s)).collect(),
        };
        for (i, (name, s)) in report.devices.iter().enumerate() {
            let lost = s.queued + s.in_flight;
            let (frames_in, rejected) = runtimes
                .iter()
                .find(|d| d.index == i)
                .map_or((0, 0), |d| (d.counters.frames_in.load(Relaxed), d.counters.rejected_total()));
            if lost > 0 {
                tracing::error!(device = %name, lost, "Shutdown deadline passed: readings not delivered.");
            }
            tracing::info!(
                device = %name,
                frames_in,
                rejected,
                readings = s.readings,
                delivered = s.delivered,
                dropped_oldest = s.dropped_oldest,
                expired = s.expired,
                poisoned = s.poisoned,
                spooled = s.spooled,
                restored = s.restored,
                lost,
                "Final accounting."
            );
        }
        tracing::info!(lost = report.lost(), "Gateway stopped.");
        report
    }
}

/// Runs a unit's supervisor (`spawn` starts it) until `stop`; a panic in it is caught here,
/// at its join, counted as a restart of its devices and the supervisor started again (after
/// a pause, so a bug that panics at once cannot spin).
async fn keep_running(
    devices: Vec<Arc<DeviceRuntime>>,
    queue: Arc<ReadingQueue>,
    stop: CancellationToken,
    spawn: impl Fn() -> JoinHandle<()>,
) {
    loop {
        let why = match spawn().await {
            Ok(()) => return,
            Err(e) if e.is_panic() => device::panic_text(e.into_panic()),
            Err(e) => e.to_string(),
        };
        for dev in &devices {
            tracing::error!(device = dev.name(), error = %why, "Device supervisor crashed; restarting it.");
            dev.counters.restarts.fetch_add(1, Relaxed);
            dev.set_state(&queue, State::Backoff, Some(format!("supervisor crashed: {why}")));
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                for dev in &devices {
                    dev.set_state(&queue, State::Stopped, None);
                }
                return;
            }
            _ = tokio::time::sleep(RESTART_MIN) => {}
        }
    }
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
    // Kept current for the process watchdog, which names who is late if the process must be ended.
    telemetry::shutdown_stage(who());
    loop {
        tokio::select! {
            _ = &mut fut => return true,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(waiting_for = %who(), "Deadline reached.");
                return false;
            }
            _ = tick.tick() => {
                let who = who();
                tracing::info!(waiting_for = %who, "Still waiting.");
                telemetry::shutdown_stage(who);
            }
        }
    }
}

/// Publishes metrics every `metrics_interval` (re-read after a reload) until `stop`; at
/// shutdown the connection task sends a final snapshot once the queue is drained.
async fn metrics_loop(
    config: Arc<RwLock<Config>>,
    shared: Arc<MqttShared>,
    snapshot: Box<dyn Fn() -> Control + Send + Sync>,
    stop: CancellationToken,
) {
    let period = || config.read().unwrap_or_else(std::sync::PoisonError::into_inner).gateway.metrics_interval;
    let mut current = period();
    let mut tick = tokio::time::interval(current);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => shared.queue.push_control(snapshot()),
        }
        if period() != current {
            current = period();
            tick = tokio::time::interval_at(Instant::now() + current, current);
        }
    }
}

fn metrics_message(
    config: &Config,
    devices: &[Arc<DeviceRuntime>],
    shared: &MqttShared,
    started: Instant,
    commands: &commands::Stats,
    spool: Option<&Spool>,
    sparkplug: Option<&SparkplugView>,
) -> Control {
    let mut m = metrics::snapshot(
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
            connection_errors: shared.connection_errors.load(Relaxed),
            last_error: shared.last_error(),
            incoming_oversize: shared.incoming_oversize.load(Relaxed),
            subscriptions_refused: shared.subscriptions_refused.load(Relaxed),
            messages_refused: shared.controls_refused.load(Relaxed),
            puback_refused: shared.puback_refusals(),
        },
        commands.snapshot(),
        spool.map(|s| &s.stats),
    );
    m.sparkplug = sparkplug.map(|(stats, conn, spool)| {
        metrics::OutputMetrics::sparkplug(&conn.queue, conn, stats, spool.as_deref().map(|s| &s.stats))
    });
    let payload = serde_json::to_vec(&m).expect("metrics serialise");
    Control { topic: shared.topics.metrics.clone(), payload: payload.into(), retain: false, correlation: None }
}

fn device_component(name: &str) -> String {
    format!("device:{name}")
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
    registry: Arc<Registry>,
    current: watch::Receiver<Arc<MqttShared>>,
    draining: CancellationToken,
    spool: Option<Arc<Spool>>,
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
        let shared = Arc::clone(&current.borrow());
        let devices = registry.snapshot();
        let up = devices.iter().filter(|d| d.status().state == State::Up).count();
        let (queued, _) = shared.queue.depth();
        let broker = match (shared.is_connected(), shared.client_id_conflict.load(Relaxed)) {
            (_, true) => "flapping (client id conflict suspected)",
            (true, false) => "connected",
            (false, false) => "disconnected",
        };
        let mut status = format!("{up}/{} devices up, {queued} readings queued, broker {broker}", devices.len());
        if let (false, Some(e)) = (shared.is_connected(), shared.last_error()) {
            status += &format!(" ({e})");
        }
        if let Some(spool) = &spool {
            match spool.stats.error() {
                Some(e) => status += &format!("; SPOOL FAILING, memory only ({e})"),
                None => {
                    let spooled: u64 = shared.queue.stats().iter().map(|l| l.spooled).sum();
                    status += &format!(", {spooled} readings spooled");
                }
            }
        }
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
