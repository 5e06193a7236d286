//! The metrics payload (contract: field names are documented in README and stay stable;
//! counters only grow, so rates can be derived).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use serde::Serialize;

use crate::device::{DeviceRuntime, State};
use crate::queue::ReadingQueue;
use crate::reject::Reject;

#[derive(Debug, Serialize)]
pub struct Metrics<'a> {
    /// The gateway's version (Cargo's package version).
    pub version: &'static str,
    pub uptime_s: u64,
    pub process: ProcessMetrics,
    pub queue: QueueMetrics,
    pub mqtt: MqttMetrics,
    pub commands: CommandMetrics,
    /// Present when `[spool] dir` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool: Option<SpoolMetrics>,
    /// Present when `[sparkplug] enabled`: that output's own connection and accounting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sparkplug: Option<OutputMetrics>,
    pub devices: BTreeMap<&'a str, DeviceMetrics>,
}

/// An output other than the main one (Sparkplug B): its connection, its queue, and per device
/// `readings + restored = delivered + dropped_oldest + expired + poisoned + queued + in_flight
/// + spooled`, exact (one lock).
#[derive(Debug, Serialize)]
pub struct OutputMetrics {
    pub connected: bool,
    pub reconnects: u64,
    pub connection_errors: u64,
    pub last_error: Option<String>,
    /// `bdSeq` of the current (or next) connection.
    pub bd_seq: u64,
    pub rebirths_requested: u64,
    pub commands_ignored: u64,
    /// Readings without a field a metric can carry.
    pub skipped: u64,
    pub bd_seq_write_errors: u64,
    /// DCMD writes confirmed by the slave, and refused (checks, bus, slave).
    pub writes: u64,
    pub writes_refused: u64,
    pub queue: OutputQueue,
    /// Its own spool, when `[spool] dir` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool: Option<SpoolMetrics>,
    pub devices: BTreeMap<String, OutputDevice>,
}

#[derive(Debug, Serialize)]
pub struct OutputQueue {
    pub readings: usize,
    pub bytes: usize,
}

#[derive(Debug, Serialize)]
pub struct OutputDevice {
    pub readings: u64,
    pub delivered: u64,
    pub dropped_oldest: u64,
    pub expired: u64,
    pub poisoned: u64,
    pub queued: u64,
    pub in_flight: u64,
    pub spooled: u64,
    pub restored: u64,
}

impl OutputMetrics {
    /// The Sparkplug output's metrics from its queue, connection and counters.
    pub fn sparkplug(
        queue: &ReadingQueue,
        mqtt: &crate::mqtt::MqttShared,
        s: &crate::sparkplug::Stats,
        spool: Option<&crate::spool::SpoolStats>,
    ) -> Self {
        let lanes = queue.stats();
        let (readings, bytes) = queue.depth();
        let devices = lanes
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let d = OutputDevice {
                    readings: l.readings,
                    delivered: l.delivered,
                    dropped_oldest: l.dropped_oldest,
                    expired: l.expired,
                    poisoned: l.poisoned,
                    queued: l.queued,
                    in_flight: l.in_flight,
                    spooled: l.spooled,
                    restored: l.restored,
                };
                (queue.lane_name(i).to_string(), d)
            })
            .collect();
        Self {
            connected: mqtt.is_connected(),
            reconnects: mqtt.reconnects.load(Relaxed),
            connection_errors: mqtt.connection_errors.load(Relaxed),
            last_error: mqtt.last_error(),
            bd_seq: s.bd_seq.load(Relaxed),
            rebirths_requested: s.rebirths_requested.load(Relaxed),
            commands_ignored: s.commands_ignored.load(Relaxed),
            skipped: s.skipped.load(Relaxed),
            bd_seq_write_errors: s.bd_seq_write_errors.load(Relaxed),
            writes: s.writes.load(Relaxed),
            writes_refused: s.writes_refused.load(Relaxed),
            queue: OutputQueue { readings, bytes },
            spool: spool.map(|sp| SpoolMetrics::new(sp, lanes.iter().map(|l| l.spooled).sum())),
            devices,
        }
    }
}

/// The store-and-forward spool.
#[derive(Debug, Serialize)]
pub struct SpoolMetrics {
    /// Bytes on disk now, and readings in the spool (on disk, being written, loaded to replay).
    pub bytes: u64,
    pub readings: u64,
    /// Damaged records, torn tails and stray files skipped.
    pub corrupt: u64,
    /// Failed writes, syncs or deletions (the spool then pauses, memory only, and retries).
    pub write_errors: u64,
    pub fsyncs: u64,
    pub bytes_written: u64,
    /// Why the spool is not writing now; absent while it works.
    pub error: Option<String>,
}

impl SpoolMetrics {
    /// `readings`: the lanes' `spooled`, from the same snapshot as the devices'.
    fn new(s: &crate::spool::SpoolStats, readings: u64) -> Self {
        Self {
            bytes: s.bytes.load(Relaxed),
            readings,
            corrupt: s.corrupt.load(Relaxed),
            write_errors: s.write_errors.load(Relaxed),
            fsyncs: s.fsyncs.load(Relaxed),
            bytes_written: s.bytes_written.load(Relaxed),
            error: s.error(),
        }
    }
}

/// Commands over MQTT (all zero while they are off).
#[derive(Debug, Serialize)]
pub struct CommandMetrics {
    /// Requests executed (answered with `"ok": true`).
    pub executed: u64,
    /// Requests refused or ignored, by reason (`commands::Refusal`): `retained` and `unknown`
    /// get no response, the others an error response.
    pub refused: BTreeMap<&'static str, u64>,
    /// Responses not sent because too many were waiting (`commands::RESPONSE_BUDGET`).
    pub responses_dropped: u64,
}

#[derive(Debug, Serialize)]
pub struct QueueMetrics {
    pub readings: usize,
    pub bytes: usize,
    pub max_readings: usize,
    pub max_bytes: u64,
    /// Control messages (state, metrics, responses) dropped as poisoned.
    pub poisoned_control: u64,
    /// Reports from the MQTT client that contradicted the queue's ledger: bugs, logged at ERROR.
    pub ledger_errors: u64,
}

#[derive(Debug, Serialize)]
pub struct MqttMetrics {
    pub connected: bool,
    pub reconnects: u64,
    /// The broker closed the connection right after accepting it this many times in a row.
    pub kicked_after_connect: u64,
    /// Suspected: another client uses our client id.
    pub client_id_conflict: bool,
    /// Incoming messages (commands) dropped because they arrived faster than handled.
    pub incoming_dropped: u64,
    /// Failed connection attempts and dropped connections so far.
    pub connection_errors: u64,
    /// The most recent of them (e.g. a TLS certificate error); absent if none yet.
    pub last_error: Option<String>,
    /// Incoming messages over 256 KiB, skipped (acknowledged, never handled).
    pub incoming_oversize: u64,
    /// Subscriptions (commands, Home Assistant's status) the broker refused on the last
    /// connection: its ACL does not let this user read them.
    pub subscriptions_refused: u64,
    /// Gateway messages (state, discovery, responses) that MQTT or the broker's packet-size
    /// limit could not carry, dropped.
    pub messages_refused: u64,
    /// MQTT 5: publishes the broker refused in its PUBACK, by reason (`quota_exceeded`,
    /// `not_authorized`, `payload_format_invalid`, …); those readings count as `poisoned`.
    pub puback_refused: std::collections::BTreeMap<&'static str, u64>,
}

/// The gateway process itself.
#[derive(Debug, Serialize)]
pub struct ProcessMetrics {
    /// Resident set size now.
    pub rss_bytes: u64,
    /// User + system CPU time since start.
    pub cpu_seconds: f64,
}

impl ProcessMetrics {
    /// Reads /proc/self/statm and getrusage(2); zeros where unavailable.
    pub fn now() -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
        let rss_pages = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0);
        // SAFETY: getrusage writes into the struct we pass; zeroed is a valid initial value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above; RUSAGE_SELF is always valid.
        let cpu_seconds = if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            tv(usage.ru_utime) + tv(usage.ru_stime)
        } else {
            0.0
        };
        Self { rss_bytes: rss_pages * page, cpu_seconds }
    }
}

/// Per device. `readings + restored = delivered + dropped_oldest + expired + poisoned + queued +
/// in_flight + spooled` and `frames_in = readings + rejected.total` hold in every snapshot.
#[derive(Debug, Serialize)]
pub struct DeviceMetrics {
    pub state: State,
    pub bytes_in: u64,
    pub frames_in: u64,
    pub readings: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    pub sequence_gaps: u64,
    pub delivered: u64,
    pub dropped_oldest: u64,
    pub expired: u64,
    /// Dropped after the broker closed the connection on them repeatedly.
    pub poisoned: u64,
    pub queued: u64,
    pub in_flight: u64,
    /// In the spool, not yet handed to the broker (0 without a spool).
    pub spooled: u64,
    /// Found in the spool at start: the previous run's `spooled`.
    pub restored: u64,
    pub republished: u64,
    pub restarts: u64,
    /// Queries written to the port in full; only on devices configured with a `query`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queries_sent: Option<u64>,
    /// Milliseconds since the last reading; absent before the first.
    pub last_reading_age_ms: Option<u64>,
    /// Modbus slaves only. For them `frames_in` counts polls: each is one reading or one
    /// rejection (`no_response`, `bad_crc`, `wrong_unit`, `short_reply`, `overlong_reply`,
    /// `exception`, `bad_reply`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modbus: Option<ModbusMetrics>,
}

/// A Modbus slave's own counters.
#[derive(Debug, Serialize)]
pub struct ModbusMetrics {
    /// Exception responses by code ("02"; "other" for codes outside 1-11); zeros left out.
    pub exceptions: BTreeMap<String, u64>,
    /// Poll ticks skipped because the bus was busy.
    pub poll_overruns: u64,
}

fn modbus_metrics(c: &crate::telemetry::DeviceCounters) -> ModbusMetrics {
    let exceptions = c
        .exceptions
        .iter()
        .enumerate()
        .map(|(code, n)| (code, n.load(Relaxed)))
        .filter(|&(_, n)| n > 0)
        .map(|(code, n)| (if code == 0 { "other".to_string() } else { format!("{code:02}") }, n))
        .collect();
    ModbusMetrics { exceptions, poll_overruns: c.poll_overruns.load(Relaxed) }
}

/// A snapshot. The queue's part (readings and where they are) is taken under one lock, so the
/// second identity holds exactly. `frames_in` is read separately, so while frames are arriving
/// it may differ from `readings + rejected` by the few being decoded; at rest it is exact.
pub fn snapshot<'a>(
    uptime_s: u64,
    devices: &'a [std::sync::Arc<DeviceRuntime>],
    queue: &ReadingQueue,
    config: &crate::config::QueueConfig,
    mqtt: MqttMetrics,
    commands: CommandMetrics,
    spool: Option<&crate::spool::SpoolStats>,
) -> Metrics<'a> {
    let now_us = crate::telemetry::now_us();
    let counters: Vec<_> = devices
        .iter()
        .map(|d| {
            let c = &d.counters;
            let rejected: BTreeMap<_, _> = Reject::ALL
                .iter()
                .map(|r| (r.as_str(), c.rejected[r.index()].load(Relaxed)))
                .chain([("total", c.rejected_total())])
                .collect();
            (c.frames_in.load(Relaxed), rejected)
        })
        .collect();
    let lanes = queue.stats();
    let spool = spool.map(|s| SpoolMetrics::new(s, lanes.iter().map(|l| l.spooled).sum()));
    let (depth, bytes) = queue.depth();
    let ledger = queue.counters();
    let devices = devices
        .iter()
        .zip(counters)
        .map(|(d, (frames_in, rejected))| {
            let c = &d.counters;
            let lane = lanes.get(d.index).copied().unwrap_or_default();
            let last = c.last_reading_us.load(Relaxed);
            let m = DeviceMetrics {
                state: d.status().state,
                bytes_in: c.bytes_in.load(Relaxed),
                frames_in,
                readings: lane.readings,
                rejected,
                sequence_gaps: c.sequence_gaps.load(Relaxed),
                delivered: lane.delivered,
                dropped_oldest: lane.dropped_oldest,
                expired: lane.expired,
                poisoned: lane.poisoned,
                queued: lane.queued,
                in_flight: lane.in_flight,
                spooled: lane.spooled,
                restored: lane.restored,
                republished: lane.republished,
                restarts: c.restarts.load(Relaxed),
                queries_sent: d.config.stream().and_then(|s| s.query()).map(|_| c.queries_sent.load(Relaxed)),
                last_reading_age_ms: (last > 0).then(|| now_us.saturating_sub(last) / 1000),
                modbus: matches!(d.config.input, crate::config::Input::Modbus(_)).then(|| modbus_metrics(c)),
            };
            (d.name(), m)
        })
        .collect();
    Metrics {
        version: env!("CARGO_PKG_VERSION"),
        uptime_s,
        process: ProcessMetrics::now(),
        queue: QueueMetrics {
            readings: depth,
            bytes,
            max_readings: config.max_readings.get(),
            max_bytes: config.max_bytes,
            poisoned_control: ledger.poisoned_control,
            ledger_errors: ledger.ledger_errors,
        },
        mqtt,
        commands,
        spool,
        sparkplug: None,
        devices,
    }
}
