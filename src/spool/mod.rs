//! Store and forward: readings the broker cannot take now go to disk, and come back from there.
//!
//! ```text
//!  ReadingQueue ── spill buffer (memory bound hit) ──┐        one thread, "spool":
//!       │  └──── every queued reading (broker away) ─┤──► DeviceLog per device (log.rs):
//!       │                                            │    segments of checksummed records,
//!       ◄── backlog (loaded, at most 256 per device) ┘    group commit every sync_interval
//!  MQTT connection: live readings first, then backlog (paced), acks → resolved → delete
//! ```
//!
//! - **Steady state writes nothing**: while the broker keeps up, the memory queue never hits
//!   its bound and nothing is spilled.
//! - **Durability**: what the spool takes is written at once (`write`, page cache: survives
//!   `kill -9`) and made durable by one group commit (fdatasync of each file written) per
//!   `sync_interval`; while the broker is away every reading is swept to the spool at each
//!   commit, so a power cut loses at most `sync_interval`.
//! - **Bound**: beyond `max_bytes` the device holding the most bytes loses its oldest segment
//!   (counted `dropped_oldest`), as the memory queue does per reading.
//! - **Failure**: a write error (disk full, read-only, I/O) turns the spill off: the memory
//!   queue drops as without a spool, the error is logged and shown in the metrics and systemd
//!   status, and the spool is retried with backoff. Reading and delivery never wait on it.
//!
//! Why a log of our own rather than an embedded database: see the README ("Store and
//! forward"): the comparison in issue 11 found it writes each byte once, syncs once per
//! interval and recovers from a torn tail by skipping, with nothing to compact.

pub mod log;
pub mod record;

use std::collections::hash_map::{Entry, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use self::log::{DeviceLog, Loaded, Pos};
use crate::backoff::Backoff;
use crate::queue::{ReadingQueue, Signal, SpillEntry, SpoolRef};

/// The spill buffer: readings on their way to disk, at most (beyond it, dropped as without a
/// spool: the disk is slower than the input).
const SPILL_BUFFER: usize = 1024 * 1024;
/// Retry of a failing spool.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Delivery progress (cursors, deleted segments) is synced this often at most: a power cut
/// may then deliver up to this much of a replay again, and the replay does not cost an SD
/// card a page write per device per `sync_interval`.
const PROGRESS_SYNC: Duration = Duration::from_secs(30);
/// Idle wake-up, for acknowledgements that arrived without a signal.
const IDLE: Duration = Duration::from_secs(1);

/// What the spool needs from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub sync_interval: Duration,
    /// `replay_topic = "readings"`.
    pub one_stream: bool,
    /// Devices configured, for the segment size.
    pub devices: usize,
}

/// Counters for the metrics (`spool` object).
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// Bytes on disk, as of the spool's last round. (Readings in the spool are the lanes'
    /// `spooled`, exact under the queue's lock.)
    pub bytes: AtomicU64,
    pub corrupt: AtomicU64,
    pub write_errors: AtomicU64,
    pub fsyncs: AtomicU64,
    pub bytes_written: AtomicU64,
    error: Mutex<Option<String>>,
}

impl SpoolStats {
    /// Why the spool is not writing now, if it is not.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set_error(&self, e: Option<String>) {
        *self.error.lock().unwrap_or_else(PoisonError::into_inner) = e;
    }
}

/// Checks that `dir` can hold the spool: creates it if needed and writes a file in it.
///
/// # Errors
/// Why it cannot.
pub fn probe_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    std::fs::write(&probe, b"x")?;
    std::fs::remove_file(&probe)
}

struct Failing {
    retry_at: Instant,
    backoff: Backoff,
}

struct Store {
    logs: HashMap<usize, DeviceLog>,
    failing: Option<Failing>,
    last_sync: Instant,
    last_progress_sync: Instant,
    /// Written since the last sync.
    unsynced: bool,
    scratch: Vec<Loaded>,
    replayed: Vec<u8>,
}

/// The spool and its thread.
pub struct Spool {
    settings: Settings,
    segment_bytes: u64,
    queue: Arc<ReadingQueue>,
    signal: Arc<Signal>,
    store: Mutex<Store>,
    stop: AtomicBool,
    /// Shutdown began: nothing more is loaded for replay.
    replay_stopped: AtomicBool,
    pub stats: SpoolStats,
}

impl Spool {
    /// Sets the queue's spool side up; [`start`](Self::start) then recovers what is on disk
    /// and runs.
    pub fn new(settings: Settings, queue: Arc<ReadingQueue>) -> Arc<Self> {
        let signal = Arc::new(Signal::default());
        queue.enable_spool(SPILL_BUFFER, settings.one_stream, Arc::clone(&signal));
        // Several segments per device's fair share, so that dropping one keeps the rest.
        let share = settings.max_bytes / (8 * settings.devices.max(1) as u64);
        let segment_bytes = share.clamp(16 * 1024, 4 * 1024 * 1024);
        let store = Store {
            logs: HashMap::new(),
            failing: None,
            last_sync: Instant::now(),
            last_progress_sync: Instant::now(),
            unsynced: false,
            scratch: Vec::new(),
            replayed: Vec::new(),
        };
        Arc::new(Self {
            settings,
            segment_bytes,
            queue,
            signal,
            store: Mutex::new(store),
            stop: AtomicBool::new(false),
            replay_stopped: AtomicBool::new(false),
            stats: SpoolStats::default(),
        })
    }

    /// Starts the spool's thread: it first reads what a previous run left (restored readings
    /// are replayed like any other), then serves the queue until [`finish`](Self::finish).
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn start(self: &Arc<Self>) -> io::Result<JoinHandle<()>> {
        let me = Arc::clone(self);
        std::thread::Builder::new().name("spool".into()).spawn(move || {
            me.recover();
            me.queue.spool_recovered();
            while !me.stop.load(Relaxed) {
                let timeout = me.next_wait();
                me.signal.wait(timeout);
                if me.stop.load(Relaxed) {
                    break;
                }
                // A bug here must not silently end the spool: the queue would fill its spill
                // buffer and drop with nothing said. Counted, shown, retried like a disk error.
                if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| me.step(false))) {
                    let e = io::Error::other(format!("panicked: {}", crate::device::panic_text(p)));
                    me.fail(&mut me.lock(), &e, "a spool round");
                }
            }
        })
    }

    /// Shutdown, after the connection task ended and its in-flight readings were requeued:
    /// stops the thread, then writes every reading still in memory to the spool and syncs.
    /// Backlogs loaded for replay are forgotten (they are still on disk).
    pub fn finish(&self, thread: JoinHandle<()>) {
        self.stop.store(true, Relaxed);
        self.signal.raise();
        let _ = thread.join();
        self.queue.unload_backlogs();
        {
            let mut s = self.lock();
            for log in s.logs.values_mut() {
                log.unload();
            }
            // A failing spool gets one more try: the alternative is losing these.
            s.failing = None;
        }
        self.queue.set_spool_healthy(true);
        self.step(true);
    }

    /// Shutdown: what is loaded for replay and not yet sent stays on disk for the next start;
    /// what is in flight is still resolved.
    pub fn stop_replay(&self) {
        self.replay_stopped.store(true, Relaxed);
        self.queue.unload_backlogs();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_wait(&self) -> Duration {
        let s = self.lock();
        if !self.queue.link_up() || s.unsynced {
            // Sweep (broker away) or commit at the next interval.
            return self.settings.sync_interval.saturating_sub(s.last_sync.elapsed()).max(Duration::from_millis(1));
        }
        IDLE
    }

    fn log_dir(&self, lane: usize) -> PathBuf {
        self.settings.dir.join(encode_name(&self.queue.lane_name(lane)))
    }

    /// Opens every device's log found on disk and hands their readings to the queue's
    /// accounting. Damage is counted; a directory that cannot be read is a write error.
    fn recover(&self) {
        let entries = match std::fs::read_dir(&self.settings.dir) {
            Ok(e) => e,
            Err(e) => {
                self.fail(&mut self.lock(), &e, "reading the spool directory");
                return;
            }
        };
        let (mut readings, mut corrupt) = (0, 0);
        for e in entries.flatten() {
            let path = e.path();
            let Some(name) = e.file_name().to_str().and_then(decode_name) else {
                corrupt += 1;
                tracing::warn!(file = %path.display(), "Stray entry in the spool directory; ignored.");
                continue;
            };
            if !path.is_dir() {
                corrupt += 1;
                tracing::warn!(file = %path.display(), "Stray file in the spool directory; ignored.");
                continue;
            }
            match DeviceLog::open(&path, self.segment_bytes) {
                Ok((log, rec)) => {
                    let lane = self.queue.add_lane(&name);
                    self.queue.restore(lane, rec.readings, rec.maybe_sent);
                    readings += rec.readings;
                    corrupt += rec.corrupt;
                    if rec.readings > 0 || rec.corrupt > 0 {
                        tracing::info!(
                            device = %name, readings = rec.readings, possibly_sent = rec.maybe_sent,
                            corrupt = rec.corrupt, "Spool: readings kept from before the restart."
                        );
                    }
                    self.lock().logs.insert(lane, log);
                }
                Err(e) => {
                    corrupt += 1;
                    tracing::error!(device = %name, error = %e, "Spool: cannot open this device's spool; skipped.");
                }
            }
        }
        self.stats.corrupt.fetch_add(corrupt, Relaxed);
        if corrupt > 0 {
            tracing::warn!(corrupt, "Spool: damaged records or stray files skipped (counted as spool.corrupt).");
        }
        let mut s = self.lock();
        self.refill(&mut s);
        self.publish_stats(&s);
        drop(s);
        if readings > 0 {
            tracing::info!(readings, "Spool: replaying readings from before the restart.");
        }
    }

    /// One round: spill, acknowledgements, the bound, replay loading, commit.
    fn step(&self, last: bool) {
        let mut s = self.lock();
        if let Some(f) = &s.failing {
            if Instant::now() >= f.retry_at {
                self.queue.set_spool_healthy(true);
                s.failing = None;
            }
        }
        let commit_due = s.last_sync.elapsed() >= self.settings.sync_interval || last;
        // While the broker is away everything goes to disk, once per commit.
        let sweep = last || (!self.queue.link_up() && commit_due);
        let spill = if s.failing.is_none() { self.queue.take_spill(sweep) } else { Vec::new() };
        self.write(&mut s, spill);
        for (lane, r) in self.queue.take_resolved() {
            if let Some(log) = s.logs.get_mut(&lane) {
                if let Err(e) = log.resolve(Pos { seg: r.seg, off: r.end }) {
                    tracing::warn!(error = %e, "Spool: cannot delete a delivered segment.");
                }
            }
        }
        self.enforce_bound(&mut s);
        if !last && !self.replay_stopped.load(Relaxed) {
            self.refill(&mut s);
        }
        let mut wrote = false;
        for log in s.logs.values_mut() {
            match log.write_cursor() {
                Ok(w) => wrote |= w,
                Err(e) => tracing::warn!(error = %e, "Spool: cannot record the delivery position."),
            }
        }
        s.unsynced |= wrote;
        if commit_due && s.unsynced {
            let progress = last || s.last_progress_sync.elapsed() >= PROGRESS_SYNC;
            self.commit(&mut s, progress);
        }
        self.publish_stats(&s);
    }

    fn write(&self, s: &mut Store, spill: Vec<SpillEntry>) {
        if spill.is_empty() {
            return;
        }
        // Grouped by device, in order.
        let mut by_lane: Vec<(usize, Vec<SpillEntry>)> = Vec::new();
        for e in spill {
            match by_lane.iter_mut().find(|(l, _)| *l == e.lane) {
                Some((_, v)) => v.push(e),
                None => by_lane.push((e.lane, vec![e])),
            }
        }
        let mut failed: Vec<SpillEntry> = Vec::new();
        for (lane, entries) in by_lane {
            if s.failing.is_some() {
                failed.extend(entries);
                continue;
            }
            let opened = match s.logs.entry(lane) {
                Entry::Occupied(_) => Ok(()),
                Entry::Vacant(v) => DeviceLog::open(&self.log_dir(lane), self.segment_bytes).map(|(log, _)| {
                    v.insert(log);
                }),
            };
            if let Err(e) = opened {
                self.fail(s, &e, "creating a device's spool directory");
                failed.extend(entries);
                continue;
            }
            let log = s.logs.get_mut(&lane).expect("inserted above");
            let result = log.append(entries.iter().map(|e| (e.at_us, &e.payload[..])));
            let (done, bytes, err) = match result {
                Ok((n, b)) => (n, b, None),
                Err((n, b, e)) => (n, b, Some(e)),
            };
            self.stats.bytes_written.fetch_add(bytes, Relaxed);
            s.unsynced = true;
            if let Some(e) = err {
                failed.extend(entries.into_iter().skip(done as usize));
                self.fail(s, &e, "writing readings");
            }
        }
        if !failed.is_empty() {
            self.queue.unspill(failed);
        }
    }

    fn commit(&self, s: &mut Store, progress: bool) {
        s.last_sync = Instant::now();
        if progress {
            s.last_progress_sync = s.last_sync;
        }
        // Progress left for later keeps `unsynced`: the next commit after PROGRESS_SYNC has it.
        s.unsynced = !progress;
        let mut calls = 0;
        let mut error = None;
        for log in s.logs.values_mut() {
            match log.sync(progress) {
                Ok(n) => calls += n,
                Err(e) => error = Some(e),
            }
        }
        self.stats.fsyncs.fetch_add(calls, Relaxed);
        if let Some(e) = error {
            self.fail(s, &e, "syncing to disk");
        }
    }

    /// The spool cannot write: memory only until the retry.
    fn fail(&self, s: &mut Store, e: &io::Error, doing: &str) {
        self.stats.write_errors.fetch_add(1, Relaxed);
        self.queue.set_spool_healthy(false);
        let f = s.failing.get_or_insert_with(|| Failing {
            retry_at: Instant::now(),
            backoff: Backoff::new(RETRY_MIN, RETRY_MAX, true),
        });
        let delay = f.backoff.next_delay();
        f.retry_at = Instant::now() + delay;
        let reason = format!("{doing}: {e}");
        if self.stats.error().as_deref() != Some(reason.as_str()) {
            tracing::error!(
                dir = %self.settings.dir.display(), error = %e, retry_s = delay.as_secs(),
                "Spool: cannot write to disk ({doing}); keeping readings in memory only (the oldest are dropped when it is full) until it works again."
            );
        }
        self.stats.set_error(Some(reason));
    }

    fn enforce_bound(&self, s: &mut Store) {
        loop {
            let total: u64 = s.logs.values().map(DeviceLog::bytes).sum();
            if total <= self.settings.max_bytes {
                return;
            }
            let Some((&lane, log)) = s.logs.iter_mut().max_by_key(|(_, l)| l.bytes()) else { return };
            match log.drop_oldest() {
                Ok(n) => {
                    if n > 0 {
                        self.queue.spool_dropped(lane, n);
                        tracing::warn!(
                            device = %self.queue.lane_name(lane), dropped = n, max_bytes = self.settings.max_bytes,
                            "Spool full: dropped this device's oldest readings."
                        );
                    }
                }
                Err(e) => {
                    self.fail(s, &e, "deleting the oldest segment");
                    return;
                }
            }
        }
    }

    /// Loads readings for replay where a device's backlog has room.
    fn refill(&self, s: &mut Store) {
        let Store { logs, scratch, replayed, .. } = s;
        let mut corrupt = 0;
        for (&lane, log) in logs.iter_mut() {
            if log.unread() == 0 {
                continue;
            }
            let room = self.queue.backlog_room(lane);
            if room == 0 {
                continue;
            }
            scratch.clear();
            match log.load(room, scratch) {
                Ok(c) => corrupt += c,
                Err(e) => {
                    corrupt += 1;
                    tracing::warn!(device = %self.queue.lane_name(lane), error = %e, "Spool: cannot read back readings.");
                }
            }
            self.queue.push_backlog(
                lane,
                scratch.drain(..).map(|l| {
                    record::mark_replayed(&l.payload, replayed);
                    (SpoolRef { seg: l.end.seg, end: l.end.off }, l.at_us, Bytes::copy_from_slice(replayed))
                }),
            );
        }
        if corrupt > 0 {
            self.stats.corrupt.fetch_add(corrupt, Relaxed);
            tracing::warn!(corrupt, "Spool: damaged records skipped while replaying (counted as spool.corrupt).");
        }
    }

    fn publish_stats(&self, s: &Store) {
        self.stats.bytes.store(s.logs.values().map(DeviceLog::bytes).sum(), Relaxed);
        if s.failing.is_none() && self.stats.error().is_some() {
            tracing::info!(dir = %self.settings.dir.display(), "Spool: writing to disk again.");
            self.stats.set_error(None);
        }
    }
}

/// A device's directory name: its name with every byte outside `[A-Za-z0-9_-]` as `%XX`
/// (device names are MQTT topic levels, which may hold `.` or non-ASCII characters).
fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode_name(dir: &str) -> Option<String> {
    let b = dir.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'-' {
            out.push(b[i]);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests;
