//! A garbage flood on every port at once: 16 pseudo-terminals, each written as fast as it takes
//! bytes — seeded random garbage, oversize runs without a delimiter, and one valid reading per
//! chunk — into the release binary with a real mosquitto, for 60 s (`SG_FLOOD_SECS`).
//! Every 5 s it prints the gateway's RSS and CPU; at the end its peak RSS (VmHWM), the totals
//! from the last metrics message (bytes_in, frames_in, readings, rejected by reason, summed over
//! devices) and whether every valid reading written reached a subscriber.
//! `cargo bench --bench flood` (`SG_FLOOD_SECS=10 cargo bench --bench flood` for a quick look).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cpu_seconds, memory_mib, write_all, Gateway, Mosquitto, Rng, Subscriber};
use sensorgate::decode::Format;
use sensorgate::framing::Framing;
use sensorgate::simulate::{PtyLink, SimSpec};
use serde_json::Value;

const DEVICES: usize = 16;
const SPECS: [SimSpec; 3] = [
    SimSpec { framing: Framing::Lines, format: Format::Json },
    SimSpec { framing: Framing::Lines, format: Format::Kv },
    SimSpec { framing: Framing::Cobs, format: Format::Postcard },
];
/// Random bytes every writer takes its garbage from (at random offsets).
const POOL: usize = 8 << 20;
/// Longest oversize run (no delimiter at all); runs are 2 KiB up to this.
const MAX_RUN: usize = 8 << 10;

/// The first half uniform bytes (a delimiter every 256 bytes on average: mostly oversize
/// frames for COBS, decoder food for lines); the second half with a '\n' or 0x00 about every
/// 20 bytes (short frames that reach the decoders of both framings).
fn garbage_pool() -> Vec<u8> {
    let mut rng = Rng(0xf100_d5ee_d000_0001);
    (0..POOL)
        .map(|i| {
            let r = rng.next();
            if i >= POOL / 2 && (r >> 40) % 20 == 0 {
                if r & 1 == 0 {
                    b'\n'
                } else {
                    0
                }
            } else {
                (r >> 8) as u8
            }
        })
        .collect()
}

fn delim(spec: SimSpec) -> u8 {
    match spec.framing {
        Framing::Lines => b'\n',
        Framing::Cobs => 0,
    }
}

#[derive(Default)]
struct Written {
    bytes: AtomicU64,
    readings: AtomicU64,
}

/// Writes chunks until `stop`: 4–16 KiB of garbage, sometimes an oversize run, then a
/// delimiter and one valid reading (numbered from 0).
async fn flood(
    index: usize,
    spec: SimSpec,
    mut pty: PtyLink,
    pool: Arc<Vec<u8>>,
    stop: Arc<AtomicBool>,
    written: Arc<Written>,
) -> PtyLink {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1));
    let run = vec![b'Z'; MAX_RUN];
    let mut chunk = Vec::with_capacity(32 << 10);
    let mut n = 0u64;
    while !stop.load(Relaxed) {
        chunk.clear();
        let len = 4096 + rng.below(12 << 10);
        let at = rng.below(pool.len() - len);
        chunk.extend_from_slice(&pool[at..at + len]);
        if rng.below(4) == 0 {
            chunk.extend_from_slice(&run[..2048 + rng.below(MAX_RUN - 2048)]);
        }
        chunk.push(delim(spec));
        spec.render(n, common::now_us(), &mut chunk);
        write_all(&mut pty.master, &chunk).await;
        written.bytes.fetch_add(chunk.len() as u64, Relaxed);
        written.readings.store(n + 1, Relaxed);
        n += 1;
    }
    pty
}

/// What the subscriber saw: per device, how often each valid reading number arrived.
#[derive(Default)]
struct Tally {
    seen: BTreeMap<String, Vec<u8>>,
    /// Per device, readings that are not ours (garbage that happened to decode).
    other: BTreeMap<String, u64>,
    metrics: Option<Value>,
}

impl Tally {
    fn add(&mut self, topic: &str, payload: &[u8]) {
        let parts: Vec<&str> = topic.split('/').collect();
        match parts.as_slice() {
            [_, _, "metrics"] => self.metrics = serde_json::from_slice(payload).ok(),
            [_, _, "devices", dev, "readings"] => {
                let v: Value = serde_json::from_slice(payload).expect("readings are JSON");
                // Ours carry sent_us (text) or the counter twice (binary).
                let n = match (v.get("n"), v.get("sent_us"), v.get("ch2")) {
                    (Some(n), Some(_), _) => n.as_u64(),
                    (None, None, Some(n)) if v["_gw"]["sensor_seq"] == *n => n.as_u64(),
                    _ => None,
                };
                match n {
                    Some(n) => {
                        let counts = self.seen.entry(dev.to_string()).or_default();
                        if counts.len() <= n as usize {
                            counts.resize(n as usize + 1, 0);
                        }
                        counts[n as usize] = counts[n as usize].saturating_add(1);
                    }
                    None => *self.other.entry(dev.to_string()).or_default() += 1,
                }
            }
            _ => {}
        }
    }

    /// (distinct readings received, duplicates) for a device, among numbers below `written`.
    fn received(&self, dev: &str, written: u64) -> (u64, u64) {
        let Some(counts) = self.seen.get(dev) else { return (0, 0) };
        let counts = &counts[..counts.len().min(written as usize)];
        let distinct = counts.iter().filter(|c| **c > 0).count() as u64;
        let dups = counts.iter().map(|c| u64::from(c.saturating_sub(1))).sum();
        (distinct, dups)
    }
}

fn sum(metrics: &Value, f: impl Fn(&Value) -> u64) -> u64 {
    metrics["devices"].as_object().unwrap().values().map(f).sum()
}

async fn run(duration: Duration) {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut config = format!("[gateway]\nid = \"f\"\nmetrics_interval = \"1s\"\n[mqtt]\nport = {}\n", broker.port);
    let mut ptys = Vec::new();
    for i in 0..DEVICES {
        let link = dir.path().join(format!("d{i:02}"));
        ptys.push(PtyLink::create(&link).unwrap());
        let spec = SPECS[i % SPECS.len()];
        let (framing, format) = match spec.format {
            Format::Json => ("lines", "json"),
            Format::Kv => ("lines", "kv"),
            Format::Postcard => ("cobs", "postcard"),
        };
        config += &format!(
            "[[device]]\nname = \"d{i:02}\"\npath = \"{}\"\nframing = \"{framing}\"\nformat = \"{format}\"\n",
            link.display()
        );
    }
    let mut sub = Subscriber::connect(broker.port, "sensorgate/f/#").await;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut rx = std::mem::replace(&mut sub.rx, tokio::sync::mpsc::channel(1).1);
    let reader = {
        let tally = Arc::clone(&tally);
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                tally.lock().unwrap().add(&m.topic, &m.payload);
            }
        })
    };
    let mut gw = Gateway::start(dir.path(), &config);
    // Let every device open its port before the flood starts.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let pool = Arc::new(garbage_pool());
    let stop = Arc::new(AtomicBool::new(false));
    let written: Vec<Arc<Written>> = (0..DEVICES).map(|_| Arc::default()).collect();
    let writers: Vec<_> = ptys
        .into_iter()
        .enumerate()
        .map(|(i, pty)| {
            let spec = SPECS[i % SPECS.len()];
            tokio::spawn(flood(i, spec, pty, Arc::clone(&pool), Arc::clone(&stop), Arc::clone(&written[i])))
        })
        .collect();
    let total = |f: fn(&Written) -> u64| written.iter().map(|w| f(w)).sum::<u64>();

    let start = Instant::now();
    let cpu0 = cpu_seconds(gw.pid());
    println!(
        "{DEVICES} ports (lines/json, lines/kv, cobs in turn), flooding for {duration:?}, RSS at start {:.1} MiB",
        memory_mib(gw.pid(), "VmRSS:")
    );
    println!("| s | gateway RSS MiB | gateway CPU % of a core (last 5 s) | MB/s written (last 5 s) | valid readings written |");
    println!("|---|---|---|---|---|");
    let (mut last_cpu, mut last_bytes, mut last_t) = (cpu0, 0u64, start);
    while start.elapsed() < duration {
        let left = duration.saturating_sub(start.elapsed()).min(Duration::from_secs(5));
        tokio::time::sleep(left).await;
        let (cpu, bytes, now) = (cpu_seconds(gw.pid()), total(|w| w.bytes.load(Relaxed)), Instant::now());
        let dt = now.duration_since(last_t).as_secs_f64();
        println!(
            "| {:>3.0} | {:.1} | {:.0} | {:.1} | {} |",
            start.elapsed().as_secs_f64(),
            memory_mib(gw.pid(), "VmRSS:"),
            (cpu - last_cpu) / dt * 100.0,
            (bytes - last_bytes) as f64 / dt / 1e6,
            total(|w| w.readings.load(Relaxed)),
        );
        (last_cpu, last_bytes, last_t) = (cpu, bytes, now);
    }
    stop.store(true, Relaxed);
    let mut ptys = Vec::new();
    for w in writers {
        ptys.push(tokio::time::timeout(Duration::from_secs(10), w).await.expect("writer stops").unwrap());
    }
    let flood_secs = start.elapsed().as_secs_f64();
    let cpu_flood = cpu_seconds(gw.pid()) - cpu0;
    let (bytes_written, readings_written) = (total(|w| w.bytes.load(Relaxed)), total(|w| w.readings.load(Relaxed)));

    // Wait until the gateway has read every byte and the broker delivered every valid reading
    // (or 60 s pass).
    let names: Vec<String> = (0..DEVICES).map(|i| format!("d{i:02}")).collect();
    let settle = Instant::now();
    let settled = loop {
        let done = {
            let t = tally.lock().unwrap();
            let all_received = names
                .iter()
                .zip(&written)
                .all(|(d, w)| t.received(d, w.readings.load(Relaxed)).0 == w.readings.load(Relaxed));
            let read_all = t.metrics.as_ref().is_some_and(|m| {
                sum(m, |d| d["bytes_in"].as_u64().unwrap()) == bytes_written
                    && sum(m, |d| d["queued"].as_u64().unwrap() + d["in_flight"].as_u64().unwrap()) == 0
            });
            all_received && read_all
        };
        if done || settle.elapsed() > Duration::from_secs(60) {
            break done;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // One more snapshot taken at rest.
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let t = tally.lock().unwrap();
    let m = t.metrics.clone().expect("metrics received");
    let get = |d: &Value, k: &str| d[k].as_u64().unwrap_or_else(|| panic!("{k} in {d}"));
    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    for d in m["devices"].as_object().unwrap().values() {
        for (k, v) in d["rejected"].as_object().unwrap() {
            *rejected.entry(k.clone()).or_default() += v.as_u64().unwrap();
        }
    }
    let (bytes_in, frames_in, readings) =
        (sum(&m, |d| get(d, "bytes_in")), sum(&m, |d| get(d, "frames_in")), sum(&m, |d| get(d, "readings")));
    let restarts = sum(&m, |d| get(d, "restarts"));
    let dropped = sum(&m, |d| get(d, "dropped_oldest") + get(d, "expired"));
    let (mut received, mut dups) = (0, 0);
    for (d, w) in names.iter().zip(&written) {
        let (r, du) = t.received(d, w.readings.load(Relaxed));
        received += r;
        dups += du;
    }
    let mut other: BTreeMap<&str, u64> = BTreeMap::new();
    for (d, count) in &t.other {
        let i: usize = d[1..].parse().unwrap();
        let format = match SPECS[i % SPECS.len()].format {
            Format::Json => "json",
            Format::Kv => "kv",
            Format::Postcard => "postcard",
        };
        *other.entry(format).or_default() += count;
    }
    println!();
    println!(
        "flood: {flood_secs:.1} s, {:.1} MB written ({:.1} MB/s)",
        bytes_written as f64 / 1e6,
        bytes_written as f64 / flood_secs / 1e6
    );
    println!(
        "gateway: peak RSS (VmHWM) {:.1} MiB, RSS now {:.1} MiB, CPU {cpu_flood:.1} s over the flood ({:.0}% of a core)",
        memory_mib(gw.pid(), "VmHWM:"),
        memory_mib(gw.pid(), "VmRSS:"),
        cpu_flood / flood_secs * 100.0
    );
    println!("last metrics, summed over {} devices:", m["devices"].as_object().unwrap().len());
    println!("  bytes_in  {bytes_in} (written {bytes_written})");
    println!("  frames_in {frames_in} = readings {readings} + rejected {}", rejected["total"]);
    println!("  restarts {restarts}, dropped_oldest + expired {dropped}");
    println!("| reason | rejected |");
    println!("|---|---|");
    for (k, v) in rejected.iter().filter(|(k, v)| **v > 0 && *k != "total") {
        println!("| {k} | {v} |");
    }
    println!("| total | {} |", rejected["total"]);
    println!(
        "valid readings: written {readings_written}, received at the subscriber {received} distinct ({dups} duplicates), \
         missing {}; readings from garbage that happened to decode (valid frames, by format): {other:?}",
        readings_written - received,
    );
    let ok = settled && received == readings_written && frames_in == readings + rejected["total"] && restarts == 0;
    println!(
        "{}",
        if ok {
            "OK: every valid reading delivered, every frame accounted for, no restarts"
        } else {
            "FAILED: see above"
        }
    );
    drop(t);

    gw.signal(libc::SIGTERM);
    let status = gw.wait(Duration::from_secs(15));
    println!("gateway exit: {status}");
    reader.abort();
    drop(ptys);
    assert!(ok, "flood check failed");
}

fn main() {
    let secs = std::env::var("SG_FLOOD_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run(Duration::from_secs(secs)));
}
