//! Sparkplug B 3.0: a second output for SCADA hosts, beside the JSON / Home Assistant one.
//!
//! ```text
//!  ReadingSink ─ push ─► main queue ─► MQTT connection (JSON profile, will "offline")
//!               └ push ─► Sparkplug queue ─► MQTT connection (Sparkplug profile, will NDEATH)
//! ```
//! The output is the same shape as the JSON one: its own bounded drop-oldest queue (same
//! bounds, fair across devices, its own lanes and accounting), its own connection task and
//! client id. Readings fan out as the same `Bytes` (a reference count, no copy). A slow or
//! absent Sparkplug broker costs the JSON side nothing, and the other way round.
//!
//! Layout: [`proto`] is the payload schema (prost); [`node`] the edge node's state (births,
//! deaths, `seq`, aliases, the primary host), sans-IO; this module binds it to the
//! connection as its [`Profile`](crate::mqtt::Profile) and keeps `bdSeq` in the state
//! directory, so that it survives a restart.
//!
//! Delivery: Sparkplug publishes everything but the will at QoS 0, so a reading counts as
//! delivered once written to the socket; a gap in `seq` is how a host notices a loss (and it
//! asks for a rebirth).

pub mod node;
pub mod proto;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::mqttbytes::QoS;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::device::{Registry, State, WriteRefused};
use crate::liveness::Beat;
use crate::mqtt::{self, Message, MqttShared, Profile, Publish, Will};
use crate::queue::ReadingQueue;
use crate::spool::{self, Spool};
use crate::topics::Topics;
use node::{EdgeNode, Health};

/// The file in the state directory that holds the last `bdSeq`.
pub const BD_SEQ_FILE: &str = "sparkplug-bdseq";
/// How often device states are looked at.
const STATES_EVERY: Duration = Duration::from_millis(100);
/// Node health (NDATA) at most this often.
const HEALTH_EVERY: Duration = Duration::from_secs(10);

/// Counters of the Sparkplug output, for the metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub bd_seq: AtomicU64,
    pub rebirths_requested: AtomicU64,
    pub commands_ignored: AtomicU64,
    /// Readings that carry nothing a metric can hold.
    pub skipped: AtomicU64,
    /// `bdSeq` could not be written to the state directory.
    pub bd_seq_write_errors: AtomicU64,
    /// DCMD writes the slave confirmed, and those refused (by the checks or by the slave).
    pub writes: AtomicU64,
    pub writes_refused: AtomicU64,
}

/// The connection's [`Profile`]: an [`EdgeNode`] plus what it needs from the gateway.
struct SparkplugProfile {
    node: EdgeNode,
    bd_seq_file: PathBuf,
    registry: Arc<Registry>,
    queue: Arc<ReadingQueue>,
    stats: Arc<Stats>,
    states_at: Option<Instant>,
    health_at: Option<Instant>,
    health: Health,
    /// The queue's lane names, by lane.
    lane_names: Vec<Arc<str>>,
}

impl SparkplugProfile {
    fn refresh(&mut self) {
        let now = Instant::now();
        if self.states_at.is_none_or(|t| now.duration_since(t) >= STATES_EVERY) {
            self.states_at = Some(now);
            let now: Vec<(String, bool)> = self
                .registry
                .snapshot()
                .iter()
                .map(|d| (d.name().to_string(), d.status().state == State::Up))
                .collect();
            self.node.set_devices(&now);
        }
        if self.health_at.is_none_or(|t| now.duration_since(t) >= HEALTH_EVERY) {
            self.health_at = Some(now);
            let devices = self.registry.snapshot();
            let lanes = self.queue.stats();
            self.health = Health {
                queue_depth: self.queue.depth().0 as u64,
                dropped: lanes.iter().map(|l| l.dropped_oldest + l.expired + l.poisoned).sum(),
                devices_up: devices.iter().filter(|d| d.status().state == State::Up).count() as u64,
                devices: devices.len() as u64,
            };
        }
    }
}

impl SparkplugProfile {
    /// A DCMD write, with the checks of the `write` command: a writable point of a Modbus
    /// slave and a value it can take. Its outcome is logged; the new value shows in the
    /// device's next DDATA.
    fn write(&mut self, w: node::Write) {
        let dev = self.registry.snapshot().into_iter().find(|d| d.name() == w.device);
        let requested = match dev {
            Some(dev) => dev.request_write(&w.metric, &w.value, crate::commands::WRITE_START_WITHIN),
            None => Err(WriteRefused::BadRequest(format!("no device {:?}", w.device))),
        };
        let stats = Arc::clone(&self.stats);
        match requested {
            Ok(result) => {
                tokio::spawn(async move {
                    let outcome =
                        result.await.unwrap_or_else(|_| Err("the bus stopped before the write was made".into()));
                    match outcome {
                        Ok(()) => {
                            stats.writes.fetch_add(1, Relaxed);
                            tracing::info!(device = %w.device, point = %w.metric, value = %w.value, "Sparkplug: DCMD written.");
                        }
                        Err(e) => {
                            stats.writes_refused.fetch_add(1, Relaxed);
                            tracing::warn!(device = %w.device, point = %w.metric, error = %e, "Sparkplug: DCMD write failed.");
                        }
                    }
                });
            }
            Err(e) => {
                stats.writes_refused.fetch_add(1, Relaxed);
                let why = match e {
                    WriteRefused::BadRequest(text) => text,
                    WriteRefused::BusBusy => "the bus is busy (8 writes waiting) or not running".into(),
                };
                tracing::warn!(device = %w.device, point = %w.metric, error = %why, "Sparkplug: DCMD refused.");
            }
        }
    }
}

impl Profile for SparkplugProfile {
    fn will(&mut self, reused: bool) -> Will {
        if reused {
            // No broker saw the last CONNECT: its bdSeq is still free, and the SD card is
            // spared a write per retry while nothing listens.
            let (topic, payload) = self.node.current_will();
            return Will { topic, payload, retain: false };
        }
        let (topic, payload, bd_seq) = self.node.next_will();
        self.stats.bd_seq.store(bd_seq, Relaxed);
        if let Err(e) = store_bd_seq(&self.bd_seq_file, bd_seq) {
            let n = self.stats.bd_seq_write_errors.fetch_add(1, Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::error!(
                    file = %self.bd_seq_file.display(), error = %e,
                    "Sparkplug: cannot save bdSeq; after a restart a host may take the new session for the old one. \
                     Make gateway.state_dir writable."
                );
            }
        }
        Will { topic, payload, retain: false }
    }

    fn subscriptions(&self) -> Vec<String> {
        self.node.subscriptions()
    }

    fn connected(&mut self) {
        self.node.connected();
        self.states_at = None;
        self.health_at = None;
    }

    fn disconnected(&mut self) {
        self.node.disconnected();
    }

    fn may_publish(&self) -> bool {
        self.node.may_publish()
    }

    fn due(&mut self, out: &mut Vec<Publish>) {
        self.refresh();
        self.node.due(self.health, out);
    }

    fn reading(&mut self, lane: usize, payload: &[u8], out: &mut Vec<Publish>) -> bool {
        // Lane names never change (lanes are by name and never removed): looked up once each,
        // not under the queue's lock per reading.
        while self.lane_names.len() <= lane {
            self.lane_names.push(self.queue.lane_name(self.lane_names.len()));
        }
        let device = &*self.lane_names[lane];
        match self.node.reading(device, payload, out) {
            Ok(()) => true,
            Err(e) => {
                let n = self.stats.skipped.fetch_add(1, Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(device, error = %e, skipped = n, "Sparkplug: reading cannot become metrics; dropped.");
                }
                false
            }
        }
    }

    fn incoming(&mut self, message: &Message) {
        for w in self.node.incoming(&message.topic, &message.payload) {
            self.write(w);
        }
        self.stats.rebirths_requested.store(self.node.rebirths_requested, Relaxed);
        self.stats.commands_ignored.store(self.node.commands_ignored, Relaxed);
    }

    fn farewell(&mut self) -> Option<Publish> {
        self.node.farewell()
    }
}

/// The datatype of a Modbus point's values as its readings carry them (see
/// `Point::write_field`): bits and unscaled booleans are Boolean, floats and anything scaled
/// Double, other integers Int64 (a u64 beyond Int64 would bring a new birth as UInt64).
fn point_datatype(p: &crate::modbus::Point) -> proto::DataType {
    use crate::modbus::PointType;
    let scaled = p.scale != 1.0 || p.offset != 0.0;
    if !scaled && (p.table.is_bits() || p.kind == PointType::Bool) {
        proto::DataType::Boolean
    } else if scaled || matches!(p.kind, PointType::F32 | PointType::F64) {
        proto::DataType::Double
    } else {
        proto::DataType::Int64
    }
}

/// The last `bdSeq` saved in `file`; None when there is none (a first start) or it cannot be
/// read (said at WARN: the count starts over).
pub fn load_bd_seq(file: &Path) -> Option<u64> {
    match std::fs::read_to_string(file) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(n) if n <= 255 => Some(n),
            _ => {
                tracing::warn!(file = %file.display(), "Sparkplug: bdSeq file is damaged; starting again from 0.");
                None
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "Sparkplug: cannot read bdSeq; starting again from 0.");
            None
        }
    }
}

/// Saves `bd_seq` so that a power cut leaves the old value or the new one, never neither:
/// a temporary file, synced, renamed over the old one.
fn store_bd_seq(file: &Path, bd_seq: u64) -> io::Result<()> {
    let tmp = file.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{bd_seq}")?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, file)?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The running Sparkplug output.
pub struct SparkplugOutput {
    pub queue: Arc<ReadingQueue>,
    pub shared: Arc<MqttShared>,
    pub stats: Arc<Stats>,
    pub edge_node: String,
    /// Its own spool (a sibling of the main one), when `[spool] dir` is set.
    pub spool: Option<Arc<Spool>>,
    spool_thread: Option<std::thread::JoinHandle<()>>,
    conn: JoinHandle<()>,
    hard_stop: CancellationToken,
}

/// The Sparkplug output's spool directory: beside the main one (`<dir>-sparkplug`), not in
/// it, where the main spool would take it for a device.
pub fn spool_dir(main: &Path) -> PathBuf {
    let name = main.file_name().map_or_else(|| "spool".into(), |n| n.to_string_lossy().into_owned());
    main.with_file_name(format!("{name}-sparkplug"))
}

impl SparkplugOutput {
    /// Starts the output of `config` (`[sparkplug] enabled`): its queue, and its connection
    /// task, which drains at `draining` (NDEATH, then DISCONNECT).
    ///
    /// # Errors
    /// A credential or certificate file of its connection cannot be read.
    /// With `spool` (the main output's settings), readings its broker cannot take now (away,
    /// slow) go to disk as the main output's do, in a spool of its own beside the main one
    /// ([`spool_dir`]), and come back later as historical data: live readings first, each in
    /// its device's order.
    pub fn start(
        config: &Config,
        registry: Arc<Registry>,
        beat: Beat,
        draining: CancellationToken,
        jitter: bool,
        spool: Option<spool::Settings>,
    ) -> io::Result<Self> {
        let sp = &config.sparkplug;
        let conn_config = config.sparkplug_mqtt();
        let topics = Topics::new(config);
        let (opts, connector) = mqtt::ConnectOptions::new(&conn_config, &topics)?;
        let queue = Arc::new(ReadingQueue::new(
            0,
            config.queue.max_readings.get(),
            config.queue.max_bytes as usize,
            config.queue.max_age,
            conn_config.mqtt.inflight,
        ));
        let (spool, spool_thread) = match spool {
            Some(settings) => {
                let settings = spool::Settings { dir: spool_dir(&settings.dir), one_stream: false, ..settings };
                let spool = Spool::new(settings, Arc::clone(&queue));
                let thread = spool.start()?;
                (Some(spool), Some(thread))
            }
            None => (None, None),
        };
        let state_dir = config.gateway.state_dir();
        if let Err(e) = std::fs::create_dir_all(&state_dir) {
            tracing::error!(dir = %state_dir.display(), error = %e, "Sparkplug: cannot create the state directory.");
        }
        let bd_seq_file = state_dir.join(BD_SEQ_FILE);
        // The first connection after a first start uses bdSeq 0.
        let last = load_bd_seq(&bd_seq_file).unwrap_or(255);
        let edge_node = sp.edge_node(&config.gateway);
        let stats = Arc::new(Stats::default());
        let mut node = EdgeNode::new(&sp.group_id, &edge_node, sp.primary_host_id.as_deref(), last);
        for slave in config.buses.iter().flat_map(|b| &b.slaves) {
            node.declare(&slave.name, slave.points.iter().map(|p| (p.name.clone(), point_datatype(p))));
        }
        let profile = SparkplugProfile {
            node,
            bd_seq_file,
            registry,
            queue: Arc::clone(&queue),
            stats: Arc::clone(&stats),
            states_at: None,
            health_at: None,
            health: Health::default(),
            lane_names: Vec::new(),
        };
        let nothing = || Box::new(Vec::new) as Box<dyn Fn() -> Vec<crate::queue::Control> + Send + Sync>;
        let shared = Arc::new(
            MqttShared::new(Arc::clone(&queue), topics, QoS::AtMostOnce, nothing(), nothing())
                .with_profile(Box::new(profile)),
        );
        let hard_stop = CancellationToken::new();
        let stops = mqtt::Stops { draining, switching: CancellationToken::new(), hard_stop: hard_stop.clone() };
        let backoff = Backoff::new(config.mqtt.reconnect_min, config.mqtt.reconnect_max, jitter);
        let conn = tokio::spawn(mqtt::run_connection(connector, opts, Arc::clone(&shared), backoff, beat, stops));
        tracing::info!(group = %sp.group_id, edge_node = %edge_node, "Sparkplug B output started.");
        Ok(Self { queue, shared, stats, edge_node, spool, spool_thread, conn, hard_stop })
    }

    /// At the start of shutdown: what is in the spool stays there for the next start.
    pub fn stop_replay(&self) {
        if let Some(spool) = &self.spool {
            spool.stop_replay();
        }
    }

    /// After `draining` was cancelled: waits for the connection to publish what is queued and
    /// its NDEATH, until `deadline` (with a spool and no broker, not at all: the queue goes to
    /// disk), then stops it and writes what is left to the spool. Returns whether it drained.
    pub async fn finish(mut self, deadline: tokio::time::Instant) -> bool {
        // Not connected: with a spool or nothing queued, there is nothing to wait for.
        let wait = self.shared.is_connected() || (self.spool.is_none() && self.queue.depth().0 > 0);
        let drained = wait && tokio::time::timeout_at(deadline, &mut self.conn).await.is_ok();
        if !drained {
            self.hard_stop.cancel();
            let _ = self.conn.await;
        }
        match (&self.spool, self.spool_thread.take()) {
            (Some(spool), Some(thread)) => {
                self.queue.requeue_in_flight();
                spool.finish(thread);
            }
            _ => {
                let left = self.queue.depth().0;
                if left > 0 {
                    tracing::error!(queued = left, "Sparkplug: shutdown deadline passed: readings not delivered.");
                }
            }
        }
        drained
    }
}
