//! Store and forward under load, the figures issue 11's closing note asks for: 16 simulated
//! JSON-lines sensors at 1000 readings/s each into the release binary with a spool on a real
//! disk (under the target dir, not tmpfs), in three phases of one run:
//!
//! 1. connected for 30 s after a 5 s warm-up: the reference (bytes written, CPU, the delay of
//!    live readings);
//! 2. the broker away for `SG_OUTAGE_SECS` (default 600): everything goes to the spool (CPU per
//!    100k spooled, write amplification, fsyncs per second, RSS);
//! 3. the broker back: the replay (its rate and duration from the gateway's metrics, CPU per
//!    100k replayed, the delay of fresh readings meanwhile, peak RSS) and the final accounting.
//!
//! `cargo bench --bench spool` (`SG_MQTT="inflight = 1000"` adds `[mqtt]` lines, `;` between
//! them). Three subscribers share what `sensorgate/<gw>/#` carries (the
//! metrics, the live readings, the backlog), so that a subscriber lagging behind the backlog
//! cannot delay the metrics the rates come from or the live readings the delays come from.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cpu_seconds, memory_mib, n, Gateway, Mosquitto, Msg, Subscriber};
use serde_json::Value;
use tokio::sync::watch;

const DEVICES: usize = 16;
const RATE: u32 = 1000;
const GATEWAY: &str = "s";
const WARM_UP: Duration = Duration::from_secs(5);
const CONNECTED: Duration = Duration::from_secs(30);
/// Fresh readings in the first seconds after the broker returns waited for the reconnection
/// itself (and for the last second's readings the spool had not taken yet): reported apart
/// from the replay's steady state.
const RECONNECT_TRANSIENT: Duration = Duration::from_secs(5);
/// What replay adds to a payload (inside `_gw`).
const REPLAYED_MARK: usize = r#","replayed":true"#.len();
/// The longest wait for any one metrics message while the broker is up.
const METRICS_WAIT: Duration = Duration::from_secs(10);

// ---- /proc and /sys ---------------------------------------------------------------------------

/// `write_bytes` of /proc/<pid>/io: bytes this process caused to be sent to the block layer
/// (pages it dirtied; the filesystem journal is not counted here).
fn io_write_bytes(pid: i32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_else(|e| panic!("/proc/{pid}/io: {e}"));
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no write_bytes in /proc/{pid}/io: {io}"))
}

/// The /sys stat file of the block device holding `dir` (machine-wide sectors written,
/// journal included: what the card sees).
fn disk_stat_path(dir: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).unwrap().dev();
    // glibc's gnu_dev_major / gnu_dev_minor.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    PathBuf::from(format!("/sys/dev/block/{major}:{minor}/stat"))
}

/// Bytes written to the device so far (field 7 of its stat file is sectors written), when known.
fn disk_written(stat: &Path) -> Option<u64> {
    let s = std::fs::read_to_string(stat).ok()?;
    s.split_whitespace().nth(6)?.parse::<u64>().ok().map(|sectors| sectors * 512)
}

/// Sum of the file sizes under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// CPU seconds of a process's threads, by the first part of their name (`spool`, `tokio`,
/// `decode`, ...): where the gateway spends it.
fn threads_cpu(pid: i32) -> BTreeMap<String, f64> {
    let mut by = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return by };
    for t in tasks.flatten() {
        let (Ok(comm), Ok(tid)) =
            (std::fs::read_to_string(t.path().join("comm")), t.file_name().to_string_lossy().parse::<i32>())
        else {
            continue;
        };
        let key = comm.trim().split('-').next().unwrap_or_default().to_string();
        // A thread that ended between the listing and the read is skipped.
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) {
            let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
            let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
            // SAFETY: sysconf has no preconditions.
            *by.entry(key).or_insert(0.0) += ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        }
    }
    by
}

/// Process and disk counters at one instant.
#[derive(Clone)]
struct Snap {
    at: Instant,
    gateway_cpu: f64,
    broker_cpu: f64,
    bench_cpu: f64,
    write_bytes: u64,
    disk: Option<u64>,
    threads: BTreeMap<String, f64>,
}

impl Snap {
    fn take(gateway: i32, broker: Option<i32>, disk: &Path) -> Self {
        Self {
            at: Instant::now(),
            gateway_cpu: cpu_seconds(gateway),
            broker_cpu: broker.map_or(0.0, cpu_seconds),
            bench_cpu: cpu_seconds(std::process::id() as i32),
            write_bytes: io_write_bytes(gateway),
            disk: disk_written(disk),
            threads: threads_cpu(gateway),
        }
    }

    /// From `earlier` to this one. The broker's CPU only means something when the same broker
    /// process ran at both ends.
    fn since(&self, earlier: &Snap) -> Span {
        Span {
            secs: (self.at - earlier.at).as_secs_f64(),
            gateway_cpu: self.gateway_cpu - earlier.gateway_cpu,
            broker_cpu: self.broker_cpu - earlier.broker_cpu,
            bench_cpu: self.bench_cpu - earlier.bench_cpu,
            write_bytes: self.write_bytes - earlier.write_bytes,
            disk: self.disk.zip(earlier.disk).map(|(b, a)| b - a),
            threads: self
                .threads
                .iter()
                .map(|(k, v)| (k.clone(), v - earlier.threads.get(k).copied().unwrap_or(0.0)))
                .collect(),
        }
    }
}

struct Span {
    secs: f64,
    gateway_cpu: f64,
    broker_cpu: f64,
    bench_cpu: f64,
    write_bytes: u64,
    disk: Option<u64>,
    threads: BTreeMap<String, f64>,
}

impl Span {
    /// `spool 1.2 % · tokio 10.3 % · ...`: each thread group's share of a core.
    fn threads(&self) -> String {
        let shares: Vec<String> = self
            .threads
            .iter()
            .filter(|(_, v)| **v > 0.0)
            .map(|(k, v)| format!("{k} {:.1}", share(*v, self.secs)))
            .collect();
        shares.join(" · ")
    }
}

/// Percent of one core.
fn share(cpu: f64, secs: f64) -> f64 {
    cpu / secs.max(1e-9) * 100.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

// ---- What the subscribers see ------------------------------------------------------------------

/// A metrics subscriber's latest message, with when it arrived.
struct Metrics(watch::Receiver<Option<(Instant, Value)>>);

impl Metrics {
    fn start(mut sub: Subscriber) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(async move {
            while let Some(m) = sub.rx.recv().await {
                if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
                    tx.send_replace(Some((Instant::now(), v)));
                }
            }
        });
        (Self(rx), task)
    }

    /// The next metrics message published from now on (not the one already received), so that
    /// /proc figures taken right after it cover the same instant.
    async fn fresh(&mut self, timeout: Duration, while_: &str) -> (Instant, Value) {
        self.0.borrow_and_update();
        match tokio::time::timeout(timeout, self.0.changed()).await {
            Ok(Ok(())) => self.0.borrow_and_update().clone().expect("a metrics message"),
            _ => panic!("no metrics message within {timeout:?} while {while_}"),
        }
    }
}

/// Sum over the devices of one per-device counter.
fn sum(v: &Value, key: &str) -> u64 {
    v["devices"].as_object().unwrap_or_else(|| panic!("no devices in metrics: {v}")).values().map(|d| n(d, key)).sum()
}

/// Which delays the live subscriber is collecting now.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Window {
    Connected = 0,
    Reconnect = 1,
    Replay = 2,
}

/// Per device, the sensor's numbers must increase on a topic: counts those that do not.
#[derive(Default)]
struct Order {
    last: HashMap<String, u64>,
    backwards: u64,
}

impl Order {
    fn see(&mut self, device: &str, number: u64) {
        match self.last.get_mut(device) {
            Some(last) if number <= *last => self.backwards += 1,
            Some(last) => *last = number,
            None => {
                self.last.insert(device.to_string(), number);
            }
        }
    }
}

/// The live subscriber's findings (`…/devices/+/readings`).
#[derive(Default)]
struct Live {
    window: Option<Window>,
    /// Subscriber receive time − `_gw.received_at_us`, µs, per window.
    delays: [Vec<u64>; 3],
    /// Payload lengths of live readings in the connected window (what the spool stores).
    payload_bytes: u64,
    order: Order,
    malformed: u64,
    replayed_marked: u64,
}

/// The backlog subscriber's findings (`…/devices/+/backlog`).
#[derive(Default)]
struct Backlog {
    messages: u64,
    /// The payloads as built (and spooled): without the replay mark.
    payload_bytes: u64,
    /// The spool's records for them: payload plus header and checksum.
    record_bytes: u64,
    unmarked: u64,
    broker_dups: u64,
    order: Order,
    malformed: u64,
}

/// What a subscriber's collector does with each reading it receives.
trait Collect: Send + 'static {
    /// A reading with the sensor's number `number` from `device`.
    fn reading(&mut self, m: &Msg, v: &Value, number: u64, device: &str);
    /// A payload that is not a reading (not JSON, no `n` or no `_gw.device`).
    fn malformed(&mut self);
}

impl Collect for Live {
    fn reading(&mut self, m: &Msg, v: &Value, number: u64, device: &str) {
        self.order.see(device, number);
        if v["_gw"]["replayed"] == true {
            self.replayed_marked += 1;
        }
        let (Some(window), Some(at)) = (self.window, v["_gw"]["received_at_us"].as_u64()) else { return };
        self.delays[window as usize].push(m.received_us.saturating_sub(at));
        if window == Window::Connected {
            self.payload_bytes += m.payload.len() as u64;
        }
    }

    fn malformed(&mut self) {
        self.malformed += 1;
    }
}

impl Collect for Backlog {
    fn reading(&mut self, m: &Msg, v: &Value, number: u64, device: &str) {
        if m.dup {
            self.broker_dups += 1;
            return;
        }
        self.messages += 1;
        self.order.see(device, number);
        if v["_gw"]["replayed"] == true {
            let payload = m.payload.len() - REPLAYED_MARK;
            self.payload_bytes += payload as u64;
            self.record_bytes += sensorgate::spool::record::encoded_len(payload) as u64;
        } else {
            self.unmarked += 1;
        }
    }

    fn malformed(&mut self) {
        self.malformed += 1;
    }
}

/// Hands every message `sub` receives to `state`, as it arrives.
fn collect<T: Collect>(mut sub: Subscriber, state: Arc<Mutex<T>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(m) = sub.rx.recv().await {
            let v: Option<Value> = serde_json::from_slice(&m.payload).ok();
            let reading = v.as_ref().and_then(|v| Some((v, v["n"].as_u64()?, v["_gw"]["device"].as_str()?)));
            let mut state = state.lock().unwrap();
            match reading {
                Some((v, number, device)) => state.reading(&m, v, number, device),
                None => state.malformed(),
            }
        }
    })
}

/// (count, p50, p99, max) in ms, or dashes when nothing was measured.
fn quantiles(delays: &mut [u64]) -> (usize, String, String, String) {
    delays.sort_unstable();
    let q = |q: f64| {
        delays
            .get(((delays.len().max(1) - 1) as f64 * q) as usize)
            .map_or("-".to_string(), |us| format!("{:.2}", *us as f64 / 1000.0))
    };
    (delays.len(), q(0.5), q(0.99), q(1.0))
}

// ---- The run ------------------------------------------------------------------------------------

/// `$SG_MQTT`: more `[mqtt]` lines, to see what a setting changes (e.g. `inflight = 1000`,
/// `catch_up_rate = 20000`).
fn config(port: u16, spool: &Path, devices: &str) -> String {
    let mqtt_extra = std::env::var("SG_MQTT").unwrap_or_default().replace(';', "\n");
    let c = format!(
        "[gateway]\nid = \"{GATEWAY}\"\nmetrics_interval = \"1s\"\n\
         [mqtt]\nport = {port}\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n{mqtt_extra}\n\
         [spool]\ndir = \"{}\"\nmax_bytes = \"4GiB\"\nsync_interval = \"1s\"\n",
        spool.display()
    );
    c + devices
}

async fn run(outage: Duration) {
    // On the disk the target dir is on: tmpfs would make the write figures meaningless.
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(tmp).unwrap();
    let dir = tempfile::Builder::new().prefix("spool-bench").tempdir_in(tmp).unwrap();
    let spool = dir.path().join("spool");
    let disk = disk_stat_path(dir.path());
    let mut broker = Mosquitto::start();
    let topic = |rest: &str| format!("sensorgate/{GATEWAY}/{rest}");
    let (mut metrics, metrics_task) = Metrics::start(Subscriber::connect(broker.port, &topic("metrics")).await);
    let live = Arc::new(Mutex::new(Live::default()));
    let live_task = collect(Subscriber::connect(broker.port, &topic("devices/+/readings")).await, Arc::clone(&live));
    let backlog = Arc::new(Mutex::new(Backlog::default()));
    let backlog_task =
        collect(Subscriber::connect(broker.port, &topic("devices/+/backlog")).await, Arc::clone(&backlog));

    let (ptys, devices) = common::line_devices(dir.path(), DEVICES);
    let mut gw = Gateway::start(dir.path(), &config(broker.port, &spool, &devices));
    let pid = gw.pid();
    let writers = common::json_sensors(ptys, RATE);
    let started = Instant::now();
    loop {
        let (_, v) = metrics.fresh(METRICS_WAIT, "waiting for every device to deliver").await;
        let all_up =
            v["devices"].as_object().is_some_and(|d| d.len() == DEVICES && d.values().all(|d| n(d, "delivered") > 0));
        if all_up {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "devices not all delivering after 30 s: {v}");
    }
    tokio::time::sleep(WARM_UP.saturating_sub(started.elapsed())).await;

    // ---- Phase 1: connected, the reference. ----
    println!("phase 1: connected for {CONNECTED:?}");
    let (m0_at, m0) = metrics.fresh(METRICS_WAIT, "starting the connected phase").await;
    let s0 = Snap::take(pid, broker.pid(), &disk);
    live.lock().unwrap().window = Some(Window::Connected);
    tokio::time::sleep(CONNECTED).await;
    let (m1_at, m1) = metrics.fresh(METRICS_WAIT, "ending the connected phase").await;
    let s1 = Snap::take(pid, broker.pid(), &disk);
    live.lock().unwrap().window = None;
    let p1 = s1.since(&s0);
    let p1_readings = sum(&m1, "readings") - sum(&m0, "readings");
    let p1_delivered = sum(&m1, "delivered") - sum(&m0, "delivered");
    let input_rate = p1_readings as f64 / (m1_at - m0_at).as_secs_f64();
    let cpu_per_reading = p1.gateway_cpu / p1_readings.max(1) as f64;
    let p1_rss = (memory_mib(pid, "VmRSS:"), memory_mib(pid, "VmHWM:"));
    let p1_spool_written = n(&m1["spool"], "bytes_written") - n(&m0["spool"], "bytes_written");
    let p1_fsyncs = n(&m1["spool"], "fsyncs") - n(&m0["spool"], "fsyncs");
    println!(
        "  {p1_readings} readings in, {p1_delivered} delivered ({input_rate:.0}/s); gateway wrote {} bytes, spool.bytes_written +{p1_spool_written}",
        p1.write_bytes
    );

    // ---- Phase 2: the broker away. ----
    println!("phase 2: broker stopped for {outage:?}");
    broker.stop();
    let s2a = Snap::take(pid, None, &disk);
    let row_every = Duration::from_secs((outage.as_secs() / 20).max(10));
    println!("| s into outage | RSS MiB | VmHWM MiB | gateway CPU % | write_bytes MiB | spool on disk MiB |");
    println!("|---|---|---|---|---|---|");
    let mut last = s2a.clone();
    while last.at - s2a.at < outage {
        let left = outage.saturating_sub(last.at - s2a.at);
        tokio::time::sleep(row_every.min(left)).await;
        let now = Snap::take(pid, None, &disk);
        let d = now.since(&last);
        println!(
            "| {:>4.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            (now.at - s2a.at).as_secs_f64(),
            memory_mib(pid, "VmRSS:"),
            memory_mib(pid, "VmHWM:"),
            share(d.gateway_cpu, d.secs),
            mib(now.write_bytes - s2a.write_bytes),
            mib(dir_bytes(&spool)),
        );
        last = now;
    }
    let s2b = Snap::take(pid, None, &disk);
    let p2 = s2b.since(&s2a);
    let p2_rss = (memory_mib(pid, "VmRSS:"), memory_mib(pid, "VmHWM:"));
    let p2_on_disk = dir_bytes(&spool);

    // ---- Phase 3: the broker back, the replay. ----
    broker.restart();
    let s3a = Snap::take(pid, broker.pid(), &disk);
    println!("phase 3: broker back; replay until every device's spooled is 0");
    let (mr_at, mr) = metrics.fresh(Duration::from_secs(30), "waiting for the gateway to reconnect").await;
    let outage_written = n(&mr["spool"], "bytes_written") - n(&m1["spool"], "bytes_written");
    let outage_fsyncs = n(&mr["spool"], "fsyncs") - n(&m1["spool"], "fsyncs");
    let spooled_at_reconnect = sum(&mr, "spooled");
    println!(
        "  first metrics {:.1} s after the restart: spooled {spooled_at_reconnect}, spool {}",
        (mr_at - s3a.at).as_secs_f64(),
        mr["spool"]
    );
    println!(
        "| s since broker back | spooled | backlog /s (−Δspooled) | delivered /s | queued | in_flight | gateway CPU % | broker CPU % | bench CPU % | RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let deadline = s3a.at + outage * 4 + Duration::from_secs(120);
    let mut transient = true;
    let (mut row_at, mut row_v, mut row_snap) = (mr_at, mr.clone(), Snap::take(pid, broker.pid(), &disk));
    let (end_at, end) = loop {
        if transient && s3a.at.elapsed() >= RECONNECT_TRANSIENT {
            live.lock().unwrap().window = Some(Window::Replay);
            transient = false;
        } else if transient {
            live.lock().unwrap().window = Some(Window::Reconnect);
        }
        let (at, v) = metrics.fresh(METRICS_WAIT, "replaying").await;
        let done = v["devices"].as_object().is_some_and(|d| d.values().all(|d| n(d, "spooled") == 0));
        if done || at - row_at >= row_every {
            let snap = Snap::take(pid, broker.pid(), &disk);
            let d = snap.since(&row_snap);
            let secs = (at - row_at).as_secs_f64();
            println!(
                "| {:>4.0} | {} | {:.0} | {:.0} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                (at - s3a.at).as_secs_f64(),
                sum(&v, "spooled"),
                (sum(&row_v, "spooled") as f64 - sum(&v, "spooled") as f64) / secs,
                (sum(&v, "delivered") - sum(&row_v, "delivered")) as f64 / secs,
                sum(&v, "queued"),
                sum(&v, "in_flight"),
                share(d.gateway_cpu, d.secs),
                share(d.broker_cpu, d.secs),
                share(d.bench_cpu, d.secs),
                memory_mib(pid, "VmRSS:"),
            );
            (row_at, row_v, row_snap) = (at, v.clone(), snap);
        }
        if done {
            break (at, v);
        }
        assert!(
            Instant::now() < deadline,
            "replay not done {:?} after the broker came back: spooled {} ({v})",
            s3a.at.elapsed(),
            sum(&v, "spooled")
        );
    };
    let s3b = Snap::take(pid, broker.pid(), &disk);
    live.lock().unwrap().window = None;
    let p3 = s3b.since(&s3a);
    let (p3_rss, p3_hwm) = (memory_mib(pid, "VmRSS:"), memory_mib(pid, "VmHWM:"));
    let replay_secs = (end_at - s3a.at).as_secs_f64();
    let live_in_replay = input_rate * p3.secs;

    // The backlog subscriber may still be catching up: wait until it has been quiet for 3 s.
    let mut seen = (backlog.lock().unwrap().messages, Instant::now());
    let settle_deadline = Instant::now() + Duration::from_secs(120);
    while seen.1.elapsed() < Duration::from_secs(3) && Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = backlog.lock().unwrap().messages;
        if now != seen.0 {
            seen = (now, Instant::now());
        }
    }
    let backlog_lag = (seen.1 - end_at).as_secs_f64();
    // The spool deletes delivered segments at its next round.
    let mut spool_left = end["spool"].clone();
    let left_deadline = Instant::now() + Duration::from_secs(10);
    while n(&spool_left, "bytes") > 0 && Instant::now() < left_deadline {
        spool_left = metrics.fresh(METRICS_WAIT, "waiting for the spool to empty").await.1["spool"].clone();
    }

    // Stopped before its sensors, so that the log ends with the shutdown, not with 16 unplugs.
    gw.signal(libc::SIGTERM);
    let status = gw.wait(Duration::from_secs(30));
    for w in writers {
        w.abort();
    }
    // The gateway's log outlives the temp dir (and its spool) for a look afterwards.
    let kept_log = tmp.join("spool-bench-gateway.log");
    std::fs::copy(&gw.log, &kept_log).unwrap();
    let log = gw.log_text();
    let notable: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
    for t in [metrics_task, live_task, backlog_task] {
        t.abort();
    }

    // ---- Report. ----
    let b = backlog.lock().unwrap();
    let mut l = live.lock().unwrap();
    let replayed = b.messages;
    let replay_cpu = p3.gateway_cpu - cpu_per_reading * live_in_replay;
    let per_100k = |cpu: f64, readings: f64| cpu / readings.max(1.0) * 100_000.0;
    let payload_mean = l.payload_bytes as f64 / l.delays[Window::Connected as usize].len().max(1) as f64;
    let [mut d_connected, mut d_reconnect, mut d_replay] = std::mem::take(&mut l.delays);
    let (q1, q2, q3) = (quantiles(&mut d_connected), quantiles(&mut d_reconnect), quantiles(&mut d_replay));
    let disk = |span: &Span| span.disk.map_or("-".to_string(), |b| format!("{:.1}", mib(b)));
    println!();
    println!(
        "## Spool under load: {DEVICES} × {RATE}/s JSON lines, outage {} s, [mqtt] extra: {:?}, spool on {} ({})",
        outage.as_secs(),
        std::env::var("SG_MQTT").unwrap_or_default(),
        tmp.display(),
        disk_stat_path(tmp).display()
    );
    println!();
    println!("| figure | connected (reference) | outage | replay |");
    println!("|---|---|---|---|");
    println!("| duration, s | {:.1} | {:.1} | {:.1} (to spooled = 0) |", p1.secs, p2.secs, replay_secs);
    println!(
        "| readings | {p1_readings} in ({input_rate:.0}/s), {p1_delivered} delivered | {spooled_at_reconnect} spooled (Σ spooled at reconnect) | {replayed} replayed (backlog subscriber), ~{live_in_replay:.0} live |"
    );
    println!(
        "| gateway CPU, % of a core | {:.1} | {:.1} | {:.1} |",
        share(p1.gateway_cpu, p1.secs),
        share(p2.gateway_cpu, p2.secs),
        share(p3.gateway_cpu, p3.secs)
    );
    println!(
        "| gateway CPU s per 100k readings | {:.3} (forwarded) | {:.3} (spooled) | {:.3} (replayed: {:.1} s − {:.3} s/100k × live) |",
        per_100k(p1.gateway_cpu, p1_readings as f64),
        per_100k(p2.gateway_cpu, spooled_at_reconnect as f64),
        per_100k(replay_cpu, replayed as f64),
        p3.gateway_cpu,
        per_100k(p1.gateway_cpu, p1_readings as f64),
    );
    println!(
        "| broker / bench CPU, % of a core | {:.1} / {:.1} | - / {:.1} | {:.1} / {:.1} |",
        share(p1.broker_cpu, p1.secs),
        share(p1.bench_cpu, p1.secs),
        share(p2.bench_cpu, p2.secs),
        share(p3.broker_cpu, p3.secs),
        share(p3.bench_cpu, p3.secs)
    );
    println!("| gateway CPU by thread, % of a core | {} | {} | {} |", p1.threads(), p2.threads(), p3.threads());
    println!(
        "| gateway write_bytes (/proc/<pid>/io), MiB | {:.3} ({} bytes) | {:.1} | {:.1} |",
        mib(p1.write_bytes),
        p1.write_bytes,
        mib(p2.write_bytes),
        mib(p3.write_bytes)
    );
    println!(
        "| spool.bytes_written Δ, MiB | {:.3} ({p1_spool_written} bytes) | {:.1} (to the first metrics after reconnect) | {:.1} |",
        mib(p1_spool_written),
        mib(outage_written),
        mib(n(&end["spool"], "bytes_written") - n(&mr["spool"], "bytes_written"))
    );
    println!(
        "| payload bytes spooled, MiB | - | {:.1} (backlog payloads without the mark; records {:.1}) | - |",
        mib(b.payload_bytes),
        mib(b.record_bytes)
    );
    println!(
        "| write amplification: write_bytes / spool.bytes_written | - | {:.2} | - |",
        p2.write_bytes as f64 / outage_written.max(1) as f64
    );
    // The payload share of what the outage wrote, from the replayed records themselves (the
    // backlog also holds the readings committed just after the reconnection).
    let outage_payload = outage_written as f64 * b.payload_bytes as f64 / b.record_bytes.max(1) as f64;
    println!(
        "| write amplification: write_bytes / payload bytes | - | {:.2} (payload {:.1} MiB = spool.bytes_written × {:.3}) | - |",
        p2.write_bytes as f64 / outage_payload.max(1.0),
        outage_payload / (1024.0 * 1024.0),
        b.payload_bytes as f64 / b.record_bytes.max(1) as f64
    );
    println!(
        "| device writes (whole machine, journal included), MiB | {} | {} ({:.2} × payload) | {} |",
        disk(&p1),
        disk(&p2),
        p2.disk.map_or(f64::NAN, |d| d as f64 / outage_payload.max(1.0)),
        disk(&p3)
    );
    println!(
        "| spool.fsyncs | {p1_fsyncs} | {outage_fsyncs} ({:.1}/s) | {} |",
        outage_fsyncs as f64 / p2.secs,
        n(&end["spool"], "fsyncs") - n(&mr["spool"], "fsyncs")
    );
    println!("| RSS at the end, MiB | {:.1} | {:.1} | {:.1} |", p1_rss.0, p2_rss.0, p3_rss);
    println!("| peak RSS (VmHWM, since start), MiB | {:.1} | {:.1} | {:.1} |", p1_rss.1, p2_rss.1, p3_hwm);
    println!(
        "| spool.bytes at the end, MiB | {:.1} | {:.1} (files on disk; metrics at reconnect: {:.1}) | {:.1} ({} a few s later) |",
        mib(n(&m1["spool"], "bytes")),
        mib(p2_on_disk),
        mib(n(&mr["spool"], "bytes")),
        mib(n(&end["spool"], "bytes")),
        n(&spool_left, "bytes")
    );
    println!(
        "| replay rate, readings/s | - | - | {:.0} (replayed / duration; pacer bound ≈ 2 × {input_rate:.0} − live = {input_rate:.0}) |",
        replayed as f64 / replay_secs
    );
    println!(
        "| fresh-reading delay p50 / p99 / max, ms | {} / {} / {} ({} readings) | - | {} / {} / {} ({} readings, from {} s after the restart); first {} s: {} / {} / {} ({}) |",
        q1.1,
        q1.2,
        q1.3,
        q1.0,
        q3.1,
        q3.2,
        q3.3,
        q3.0,
        RECONNECT_TRANSIENT.as_secs(),
        RECONNECT_TRANSIENT.as_secs(),
        q2.1,
        q2.2,
        q2.3,
        q2.0
    );
    println!(
        "| live readings received / expected | {} / {p1_readings} | - | {} / ~{:.0} |",
        q1.0,
        q2.0 + q3.0,
        input_rate * replay_secs
    );
    println!();
    println!(
        "mean live payload {payload_mean:.1} bytes; backlog subscriber: {} messages, {} out of order or repeated, {} without the replay mark, \
         {} broker DUPs, {} malformed, last one {backlog_lag:.1} s after spooled reached 0; live subscriber: {} out of order, \
         {} marked replayed, {} malformed",
        b.messages,
        b.order.backwards,
        b.unmarked,
        b.broker_dups,
        b.malformed,
        l.order.backwards,
        l.replayed_marked,
        l.malformed
    );
    println!("final spool metrics: {}", end["spool"]);
    println!("gateway exit after SIGTERM: {status}; its log: {} ({} lines)", kept_log.display(), log.lines().count());
    println!("gateway WARN/ERROR lines: {} (first 10 below)", notable.len());
    for line in notable.iter().take(10) {
        println!("    {line}");
    }
    println!();
    println!("| device | readings | restored | delivered | dropped_oldest | expired | poisoned | queued | in_flight | spooled | republished | identity |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut broken = Vec::new();
    for (name, d) in end["devices"].as_object().expect("devices") {
        let left = n(d, "readings") + n(d, "restored");
        let right = ["delivered", "dropped_oldest", "expired", "poisoned", "queued", "in_flight", "spooled"]
            .iter()
            .map(|k| n(d, k))
            .sum::<u64>();
        if left != right || n(d, "dropped_oldest") > 0 {
            broken.push(name.clone());
        }
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            n(d, "readings"),
            n(d, "restored"),
            n(d, "delivered"),
            n(d, "dropped_oldest"),
            n(d, "expired"),
            n(d, "poisoned"),
            n(d, "queued"),
            n(d, "in_flight"),
            n(d, "spooled"),
            n(d, "republished"),
            if left == right { "holds".to_string() } else { format!("BROKEN: {left} ≠ {right}") }
        );
    }
    assert!(broken.is_empty(), "identity broken or readings dropped on {broken:?}; log:\n{}", gw.log_text());
}

fn main() {
    let secs = std::env::var("SG_OUTAGE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run(Duration::from_secs(secs)));
}
