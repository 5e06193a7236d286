//! Modbus RTU polling benchmark: simulated slaves (rmodbus's server side) on pseudo-terminals,
//! paced like a real line at the configured baud rate (`simulate::modbus::serve_paced`) → the
//! release `sensorgate` binary → a real mosquitto → a subscriber.
//!
//! `cargo bench --bench modbus` (about 3 minutes) prints:
//! 1. polls/s on one bus at 9600 and 115 200 baud, the meter's register map and a
//!    single-register slave, next to the wire-time limit and the gateway's own time per
//!    transaction;
//! 2. poll → broker latency: from the time the slave's reply has fully arrived on the line
//!    (the simulator writes it into input registers 8-11, read as the `sent_us` point) to the
//!    subscriber's receipt — the gateway's after-reply silence, decoding, queue, MQTT, broker;
//! 3. gateway CPU per 1000 polls, saturated and at a realistic rate, each next to the same
//!    gateway forwarding as many stream readings per second in the same run (machines here
//!    differ 2-3x from day to day; the ratio does not);
//! 4. peak RSS (VmHWM) with 32 slaves on 4 buses, and the same gateway idle with one stream
//!    device and no bus.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{memory_mib, Gateway, Mosquitto, Subscriber};
use sensorgate::config::Config;
use sensorgate::decode::Format;
use sensorgate::framing::Framing;
use sensorgate::modbus::{plan, rtu, Transaction};
use sensorgate::simulate::modbus::{self as sim, Pacing, SimBus, SimSlave};
use sensorgate::simulate::{PtyLink, SimSpec};

/// A slave that is one 16-bit register (the meter's temperature).
const SINGLE_POINT: &str =
    "[[bus.device.point]]\nname = \"temperature\"\ntable = \"input\"\naddress = 6\ntype = \"i16\"\n";
/// Where the simulator writes its send time, and the point that reads it.
const CLOCK_AT: u16 = 8;
const CLOCK_POINT: &str = "[[bus.device.point]]\nname = \"sent_us\"\ntable = \"input\"\naddress = 8\ntype = \"u64\"\n";

#[derive(Clone, Copy, PartialEq)]
enum Map {
    /// `simulate::modbus::METER_POINTS`: 7 points, 4 requests (coil, discrete, holding, input).
    Meter,
    /// The meter and its send-time clock (input 0..12 in one request).
    MeterClock,
    /// One register.
    Single,
}

impl Map {
    fn points(self) -> String {
        match self {
            Map::Meter => sim::METER_POINTS.to_string(),
            Map::MeterClock => format!("{}\n{CLOCK_POINT}", sim::METER_POINTS),
            Map::Single => SINGLE_POINT.to_string(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Map::Meter => "meter",
            Map::MeterClock => "meter+clock",
            Map::Single => "1 register",
        }
    }
}

#[derive(Clone, Copy)]
struct Scenario {
    label: &'static str,
    buses: usize,
    /// Per bus.
    slaves: usize,
    baud: u32,
    map: Map,
    interval: Duration,
    /// The reference: stream devices (JSON lines) instead of buses, each at `stream_rate`/s.
    streams: usize,
    stream_rate: u32,
    /// The measured window, after a second of warm-up.
    secs: f64,
}

impl Scenario {
    fn bus(label: &'static str, buses: usize, slaves: usize, baud: u32, map: Map, interval_ms: u64, secs: f64) -> Self {
        let interval = Duration::from_millis(interval_ms);
        Self { label, buses, slaves, baud, map, interval, streams: 0, stream_rate: 0, secs }
    }

    /// The same gateway with `streams` stream devices at `rate`/s each instead.
    fn reference(self, streams: usize, rate: u32) -> Self {
        Self { label: "reference", buses: 0, slaves: 0, streams, stream_rate: rate, ..self }
    }

    fn config(&self, broker: u16, dir: &std::path::Path) -> String {
        let mut text = format!("[gateway]\nid = \"b\"\nmetrics_interval = \"1h\"\n[mqtt]\nport = {broker}\n");
        for b in 0..self.buses {
            text += &format!(
                "[[bus]]\nname = \"bus{b}\"\npath = \"{}\"\nbaud = {}\nrequest_timeout = \"300ms\"\nretries = 1\n",
                dir.join(format!("bus{b}")).display(),
                self.baud
            );
            for s in 0..self.slaves {
                text += &format!(
                    "[[bus.device]]\nname = \"b{b}s{s}\"\nunit = {}\npoll_interval = \"{}ms\"\n",
                    s + 1,
                    self.interval.as_millis()
                );
                text += &self.map.points();
            }
        }
        for d in 0..self.streams {
            let path = dir.join(format!("d{d}"));
            text += &format!(
                "[[device]]\nname = \"d{d}\"\npath = \"{}\"\nframing = \"lines\"\nformat = \"json\"\n",
                path.display()
            );
        }
        text
    }

    fn devices(&self) -> usize {
        self.buses * self.slaves + self.streams
    }
}

/// What the wire allows one poll of a slave with `map` at `baud`: each request and its reply
/// at 11 bits a byte, and the 3.5-character silence that ends each of the two frames.
struct Limit {
    requests: usize,
    bytes: usize,
    /// Request and reply bytes at 11 bits a byte.
    wire: Duration,
    /// Wire time plus 2 × 3.5 characters per transaction.
    poll: Duration,
}

fn limit(map: Map, baud: u32) -> Limit {
    let text = format!(
        "[gateway]\nid = \"x\"\n[mqtt]\nport = 1883\n[[bus]]\nname = \"x\"\npath = \"/dev/null\"\nbaud = {baud}\n\
         [[bus.device]]\nname = \"s\"\nunit = 1\n{}",
        map.points()
    );
    let config = Config::from_toml(&text).expect("the bench's bus config parses");
    let requests = plan(&config.buses[0].slaves[0].points);
    let bytes: usize = requests.iter().map(|r| Transaction::read(1, r).request().len() + r.reply_len()).sum();
    let wire = rtu::wire_time(bytes, baud);
    Limit { requests: requests.len(), bytes, wire, poll: wire + 2 * rtu::silence(baud) * requests.len() as u32 }
}

struct Outcome {
    sc: Scenario,
    /// Readings received in the window, per second.
    rate: f64,
    cpu: f64,
    readings: u64,
    /// Reply sent (simulator clock) → subscriber, µs.
    latencies: Vec<u64>,
    rss_hwm: f64,
    /// Polls that gave no reading, over the whole run (the gateway's final metrics).
    failed: u64,
    overruns: u64,
    /// The simulator's mean lateness per reply, µs.
    sim_late_us: f64,
    sim_late_max_us: u64,
}

async fn run(sc: Scenario) -> Outcome {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/b/#").await;
    let pacing = Arc::new(Pacing::default());
    let mut servers = Vec::new();
    for b in 0..sc.buses {
        let mut pty = PtyLink::create(&dir.path().join(format!("bus{b}"))).unwrap();
        let slaves = (1..=sc.slaves as u8)
            .map(|u| SimSlave { clock_at: (sc.map == Map::MeterClock).then_some(CLOCK_AT), ..SimSlave::meter(u) })
            .collect();
        let bus: SimBus = Arc::new(Mutex::new(slaves));
        let (baud, pacing) = (sc.baud, Arc::clone(&pacing));
        servers.push(tokio::spawn(async move {
            let _ = sim::serve_paced(&mut pty.master, bus, baud, pacing).await;
            drop(pty);
        }));
    }
    let streams: Vec<PtyLink> =
        (0..sc.streams).map(|d| PtyLink::create(&dir.path().join(format!("d{d}"))).unwrap()).collect();
    let mut gw = Gateway::start(dir.path(), &sc.config(broker.port, dir.path()));
    let mut up = 0;
    while up < sc.devices() {
        sub.wait_for(Duration::from_secs(10), |m| m.topic.ends_with("/state") && m.text().contains("\"up\"")).await;
        up += 1;
    }
    let writers: Vec<_> = streams
        .into_iter()
        .map(|mut pty| {
            let spec = SimSpec { framing: Framing::Lines, format: Format::Json };
            let rate = sc.stream_rate;
            tokio::spawn(async move {
                if rate > 0 {
                    let _ = sensorgate::simulate::run(spec, &mut pty.master, rate, 0, 0).await;
                }
                // Idle (or failed): keep the port open until aborted.
                std::future::pending::<()>().await;
                drop(pty);
            })
        })
        .collect();
    // Warm-up: every slave polled at least once, the queue and the connection in use.
    tokio::time::sleep(Duration::from_secs(1)).await;
    while sub.rx.try_recv().is_ok() {}
    let late0 = (pacing.replies.load(Relaxed), pacing.late_us_total.load(Relaxed));
    let cpu0 = cpu_seconds(gw.pid());
    let started = Instant::now();
    let window = Duration::from_secs_f64(sc.secs);
    let mut readings = 0u64;
    let mut latencies = Vec::new();
    while let Some(left) = window.checked_sub(started.elapsed()) {
        match tokio::time::timeout(left, sub.rx.recv()).await {
            Ok(Some(m)) if m.topic.ends_with("/readings") => {
                readings += 1;
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                if let Some(sent) = v["sent_us"].as_u64() {
                    latencies.push(m.received_us.saturating_sub(sent));
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(gw.pid()) - cpu0;
    let rss_hwm = memory_mib(gw.pid(), "VmHWM:");
    let replies = pacing.replies.load(Relaxed) - late0.0;
    let sim_late_us = (pacing.late_us_total.load(Relaxed) - late0.1) as f64 / replies.max(1) as f64;
    gw.signal(libc::SIGTERM);
    let (fin, _) = sub.wait_for(Duration::from_secs(30), |m| m.topic.ends_with("/metrics")).await;
    let fin = fin.json();
    gw.wait(Duration::from_secs(30));
    let (mut failed, mut overruns) = (0, 0);
    for d in fin["devices"].as_object().unwrap().values() {
        failed += common::n(d, "frames_in") - common::n(d, "readings");
        overruns += d["modbus"]["poll_overruns"].as_u64().unwrap_or(0);
    }
    // After the gateway is gone: closing a port earlier would look like an unplug.
    for task in servers.into_iter().chain(writers) {
        task.abort();
    }
    latencies.sort_unstable();
    eprintln!(
        "{} ({} × {} {}, {} baud, {} streams): {readings} readings in {elapsed:.1} s, {cpu:.2} CPU-s",
        sc.label,
        sc.buses,
        sc.slaves,
        sc.map.name(),
        sc.baud,
        sc.streams
    );
    Outcome {
        sc,
        rate: readings as f64 / elapsed,
        cpu,
        readings,
        latencies,
        rss_hwm,
        failed,
        overruns,
        sim_late_us,
        sim_late_max_us: pacing.late_us_max.load(Relaxed),
    }
}

/// CPU time of process `pid` (all its threads), in seconds, to the nanosecond: /proc's
/// 10 ms ticks are too coarse for a poller that uses 0.01 CPU-s in a run.
fn cpu_seconds(pid: i32) -> f64 {
    let mut clock: libc::clockid_t = 0;
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: both out-pointers point to live locals of the right types.
    let ok = unsafe { libc::clock_getcpuclockid(pid, &mut clock) == 0 && libc::clock_gettime(clock, &mut t) == 0 };
    assert!(ok, "no CPU clock for process {pid}");
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn quantile(v: &[u64], q: f64) -> String {
    v.get(((v.len().max(1) - 1) as f64 * q) as usize).map_or("-".into(), |us| format!("{:.2}", *us as f64 / 1e3))
}

fn cpu_per_1000(o: &Outcome) -> f64 {
    o.cpu / o.readings.max(1) as f64 * 1000.0
}

fn main() {
    // `cargo bench` passes --bench; a filter argument is accepted and ignored.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // The arithmetic first: a config the bench cannot plan fails before minutes of running.
    for map in [Map::Meter, Map::MeterClock, Map::Single] {
        let _ = limit(map, 9600);
    }
    let sat = |map, baud, secs| Scenario::bus("saturated", 1, 8, baud, map, 10, secs);
    // 1. Throughput: 8 slaves due every 10 ms keep one bus busy all the time.
    let mut thr = Vec::new();
    for (map, baud, secs) in
        [(Map::Meter, 9600, 8.0), (Map::Meter, 115_200, 8.0), (Map::Single, 9600, 8.0), (Map::Single, 115_200, 8.0)]
    {
        thr.push(rt.block_on(run(sat(map, baud, secs))));
    }
    println!("\n### Polls/s on one bus (8 slaves due every 10 ms: the bus never idles)\n");
    println!(
        "| slave | baud | requests/poll | bytes/poll | wire ms/poll | limit ms/poll | limit polls/s | measured polls/s | \
         measured/limit | measured ms/transaction | line ms/transaction¹ | gateway's own ms/transaction² | of which its 3.5-char wait | sim late µs (mean/max) | failed polls |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for o in &thr {
        let l = limit(o.sc.map, o.sc.baud);
        let per_tx = 1.0 / o.rate / l.requests as f64;
        let silence = rtu::silence(o.sc.baud);
        // What the simulated line takes per transaction: wire time, the slave's silence.
        let line = l.wire.as_secs_f64() / l.requests as f64 + silence.as_secs_f64() + o.sim_late_us / 1e6;
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.0} % | {:.2} | {:.2} | {:.2} | {} | {:.0} / {} | {} |",
            o.sc.map.name(),
            o.sc.baud,
            l.requests,
            l.bytes,
            ms(l.wire),
            ms(l.poll),
            1.0 / l.poll.as_secs_f64(),
            o.rate,
            o.rate * l.poll.as_secs_f64() * 100.0,
            per_tx * 1e3,
            line * 1e3,
            (per_tx - line) * 1e3,
            ms(silence),
            o.sim_late_us,
            o.sim_late_max_us,
            o.failed,
        );
    }
    println!(
        "\n¹ The simulated slave's part: request + reply wire time, its 3.5-character silence, and how late the \
         simulator was.\n² The rest: the gateway waits 3.5 characters after each reply (to see an overlong \
         reply) on tokio's millisecond timer, then builds the next request; plus pseudo-terminal and task wake-ups."
    );

    // 2-4. Latency, CPU, memory.
    let saturated = thr.iter().find(|o| o.sc.map == Map::Meter && o.sc.baud == 115_200).unwrap();
    let per_stream = (saturated.rate / 8.0).round().max(1.0) as u32;
    let realistic = Scenario::bus("8 slaves × 1 s", 1, 8, 115_200, Map::MeterClock, 1000, 20.0);
    let busy = Scenario::bus("8 slaves × 500 ms", 1, 8, 115_200, Map::MeterClock, 500, 15.0);
    let large = Scenario::bus("32 slaves on 4 buses × 500 ms", 4, 8, 115_200, Map::MeterClock, 500, 20.0);
    let idle = Scenario { label: "idle: 1 stream device, no bus", secs: 5.0, ..realistic.reference(1, 0) };
    let rest = [
        sat(Map::Meter, 115_200, 8.0).reference(8, per_stream),
        realistic,
        realistic.reference(8, 1),
        busy,
        large,
        large.reference(32, 2),
        idle,
    ];
    let mut all: Vec<Outcome> = Vec::new();
    for sc in rest {
        all.push(rt.block_on(run(sc)));
    }
    println!("\n### Latency, CPU, memory (115 200 baud)\n");
    println!(
        "| scenario | subject | readings/s | readings | failed polls | overruns | CPU s / 1000 readings | \
         reply sent → subscriber p50 ms | p99 ms | max ms | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let saturated = thr.iter().find(|o| o.sc.map == Map::Meter && o.sc.baud == 115_200).unwrap();
    for o in std::iter::once(saturated).chain(&all) {
        let subject = if o.sc.buses > 0 {
            format!("{} bus × {} {} slaves", o.sc.buses, o.sc.slaves, o.sc.map.name())
        } else {
            format!("{} stream devices × {}/s", o.sc.streams, o.sc.stream_rate)
        };
        println!(
            "| {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {:.1} |",
            o.sc.label,
            subject,
            o.rate,
            o.readings,
            o.failed,
            o.overruns,
            if o.readings == 0 {
                format!("{:.3} CPU-s in {:.0} s", o.cpu, o.sc.secs)
            } else {
                format!("{:.3}", cpu_per_1000(o))
            },
            quantile(&o.latencies, 0.5),
            quantile(&o.latencies, 0.99),
            quantile(&o.latencies, 1.0),
            o.rss_hwm,
        );
    }
    println!("\nCPU per 1000 polls / CPU per 1000 stream readings at the same rate, same run:");
    let pairs = [(saturated, &all[0]), (&all[1], &all[2]), (&all[4], &all[5])];
    for (polls, reference) in pairs {
        println!(
            "- {}: {:.3} / {:.3} CPU-s = {:.2}×",
            polls.sc.label,
            cpu_per_1000(polls),
            cpu_per_1000(reference),
            cpu_per_1000(polls) / cpu_per_1000(reference).max(1e-9)
        );
    }
}
