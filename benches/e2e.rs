//! End-to-end benchmark: K simulated sensors on pseudo-terminals → the release `sensorgate`
//! binary → a real mosquitto → a subscriber. Prints delivered readings/s, loss, latency
//! (sensor stamp → subscriber), gateway CPU-seconds per 100k readings and peak RSS.
//!
//! `cargo bench --bench e2e` runs the default scenarios; `SG_BENCH=quick` runs a short set,
//! `SG_BENCH=overload` only the 16-port as-fast-as-possible ones at QoS 0 and 1 (delivery and
//! peak RSS under overload),
//! `SG_BENCH=targets` the cost-per-reading targets (paced and burst 16 x 1000/s, overload at
//! QoS 0 and 1, 16 x 80/s against 128 x 10/s),
//! `SG_BENCH=scale` the scaling set: 16, 32, 64 and 128 paced JSON devices at QoS 0, once with
//! the total rate held at 16 000 readings/s and once at 100 readings/s per device, gateway and
//! floor each, one row per device count (do the input threads scale with the devices?).
//! Figures depend on the machine: README lists the ones measured here.
//!
//! Each rated scenario runs twice: through the gateway and through the **floor**, a minimal
//! forwarder measured in the same run (this bench binary started again as a child process: one
//! thread, no decoding, no queue, each line written to the broker unchanged as a QoS 0
//! PUBLISH, one socket write per batch of ready lines). Machines here differ 2-3x from day to
//! day; the ratio to the floor does not. Sensors either send a burst every 10 ms (`burst`) or
//! one reading per write, evenly paced (`paced`), as an on-board UART delivers them.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cpu_seconds, memory_mib, Gateway, Mosquitto, Subscriber};
use sensorgate::decode::Format;
use sensorgate::framing::Framing;
use sensorgate::mqtt::codec::{self, ConnectSpec, PublishMeta, Version};
use sensorgate::simulate::{PtyLink, SimSpec};
use tokio::io::AsyncWriteExt;

#[derive(Clone, Copy)]
struct Scenario {
    devices: usize,
    spec: SimSpec,
    qos: u8,
    /// Readings per second per port; 0 = as fast as possible.
    rate: u32,
    /// Readings per port.
    count: u64,
    /// One reading per write, evenly paced (else a burst every 10 ms).
    paced: bool,
    /// The minimal forwarder instead of the gateway.
    floor: bool,
}

/// Readings per write when the sensors send as fast as the ptys take...
const OVERLOAD_WRITE: u64 = 32;
/// ...for this long: long enough that the start (queue filling, first reads) is a small part.
const OVERLOAD_TIME: Duration = Duration::from_secs(8);

/// Set in the child process that runs the floor: `<broker port>;<pty path>,<pty path>…`.
const FLOOR_ENV: &str = "SG_BENCH_FLOOR";

const JSON: SimSpec = SimSpec { framing: Framing::Lines, format: Format::Json };
const COBS: SimSpec = SimSpec { framing: Framing::Cobs, format: Format::Postcard };

/// The set `SG_BENCH` names (empty: the default set).
fn bench_set() -> String {
    std::env::var("SG_BENCH").unwrap_or_default()
}

fn scenarios() -> Vec<Scenario> {
    let s = |devices, spec, qos, rate, count| Scenario { devices, spec, qos, rate, count, paced: false, floor: false };
    // The gateway, then the floor under the same load (QoS 0 JSON lines only: the floor
    // forwards lines unchanged and never waits for an ack).
    let with_floor = |sc: Scenario| {
        let floor = sc.qos == 0 && sc.spec.format == Format::Json;
        std::iter::once(sc).chain(floor.then_some(Scenario { floor: true, ..sc }))
    };
    let paced = |sc: Scenario| Scenario { paced: true, ..sc };
    let list = match bench_set().as_str() {
        "quick" => vec![s(4, JSON, 1, 0, 20_000), s(16, JSON, 0, 1000, 5_000), paced(s(16, JSON, 0, 1000, 5_000))],
        "overload" => vec![s(16, JSON, 0, 0, 10_000_000), s(16, JSON, 1, 0, 10_000_000)],
        "profile" => {
            // One long paced run of the gateway alone (or the floor, SG_BENCH_SUBJECT=floor),
            // to attach a profiler to.
            let sc = paced(s(16, JSON, 0, 1000, 30_000));
            return vec![Scenario { floor: std::env::var("SG_BENCH_SUBJECT").is_ok_and(|v| v == "floor"), ..sc }];
        }
        // The cost-per-reading targets: paced and burst at 16 x 1000/s, overload at QoS 0 and
        // 1, and many slow sensors against few faster ones at the same total rate.
        "targets" => vec![
            paced(s(16, JSON, 0, 1000, 10_000)),
            s(16, JSON, 0, 1000, 10_000),
            paced(s(16, JSON, 1, 1000, 10_000)),
            s(16, JSON, 0, 0, 10_000_000),
            s(16, JSON, 1, 0, 10_000_000),
            paced(s(16, JSON, 0, 80, 800)),
            paced(s(128, JSON, 0, 10, 100)),
        ],
        _ => vec![
            s(1, JSON, 0, 0, 200_000),
            s(4, JSON, 0, 0, 50_000),
            s(4, JSON, 1, 0, 50_000),
            s(4, COBS, 1, 0, 50_000),
            s(16, JSON, 0, 0, 12_500),
            s(16, JSON, 0, 1000, 10_000),
            paced(s(16, JSON, 0, 1000, 10_000)),
            s(16, JSON, 1, 1000, 10_000),
            paced(s(16, JSON, 1, 1000, 10_000)),
            s(16, COBS, 0, 1000, 10_000),
        ],
    };
    list.into_iter().flat_map(with_floor).collect()
}

/// Seconds each scaling scenario sends for.
const SCALE_SECONDS: u64 = 10;

/// The scaling set, as (gateway, floor) pairs: paced JSON lines at QoS 0 on 16…128 devices,
/// first with the total rate constant (16 000/s: what changes is only how many devices share
/// it), then with the rate per device constant (100/s: the load grows with the devices).
fn scale_scenarios() -> Vec<(Scenario, Scenario)> {
    const COUNTS: [usize; 4] = [16, 32, 64, 128];
    const TOTAL_RATE: u32 = 16_000;
    const DEVICE_RATE: u32 = 100;
    let pair = |devices: usize, rate: u32| {
        let count = u64::from(rate) * SCALE_SECONDS;
        let gw = Scenario { devices, spec: JSON, qos: 0, rate, count, paced: true, floor: false };
        (gw, Scenario { floor: true, ..gw })
    };
    let constant_total = COUNTS.iter().map(|&k| pair(k, TOTAL_RATE / k as u32));
    let constant_per_device = COUNTS.iter().map(|&k| pair(k, DEVICE_RATE));
    constant_total.chain(constant_per_device).collect()
}

/// What one scenario measured.
struct Outcome {
    /// Readings the sensors wrote, and how many of them the subscriber received.
    total: u64,
    got: u64,
    /// From the first write to the last delivery.
    elapsed: f64,
    /// The gateway's own count of readings it dropped on purpose (0 for the floor).
    dropped: u64,
    /// Written by the sensors but neither delivered nor counted as dropped.
    unaccounted: u64,
    /// Sensor stamp → subscriber, sorted, µs.
    latencies: Vec<u64>,
    /// CPU-seconds of the subject over the run.
    cpu: f64,
    /// Peak RSS of the subject, MiB.
    rss: f64,
    /// Subject's and broker's share of a core over the run, %.
    subject_share: f64,
    broker_share: f64,
    /// The subject's threads at the end of the load, and how many of them read and decode.
    threads: usize,
    decode_threads: usize,
    /// CPU-seconds of the reading and decoding threads over the run (part of `cpu`).
    decode_cpu: f64,
    /// RSS at the end of the load, MiB (the peak may come from the start-up).
    rss_end: f64,
    /// Context switches of all the subject's threads over the run (each is a sleep or a
    /// preemption: the price of handing a reading from one thread to another).
    switches: u64,
}

impl Outcome {
    fn switches_per_reading(&self) -> f64 {
        self.switches as f64 / self.got.max(1) as f64
    }

    fn cpu_per_100k(&self) -> f64 {
        self.cpu / self.got.max(1) as f64 * 100_000.0
    }

    /// Latency quantile `q` in ms, or "-" when none were measured.
    fn latency_ms(&self, q: f64) -> String {
        self.latencies
            .get(((self.latencies.len().max(1) - 1) as f64 * q) as usize)
            .map_or("-".to_string(), |us| format!("{:.2}", *us as f64 / 1000.0))
    }
}

/// Threads of a process (`Threads:` in /proc/<pid>/status), and the ids of those that read
/// and decode (`input-*`, and `decode-*` for a decoder moved to its own thread).
fn threads(pid: i32) -> (usize, Vec<i32>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let count = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("Threads: in /proc/<pid>/status");
    let decode = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?;
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            (comm.starts_with("input-") || comm.starts_with("decode-")).then(|| t.file_name().to_str()?.parse().ok())?
        })
        .collect();
    (count, decode)
}

/// CPU-seconds of the threads `tids` of process `pid`, from the scheduler's own count in
/// nanoseconds (/proc/<pid>/task/<tid>/schedstat): each thread's `stat` is rounded to 10 ms,
/// and with 128 threads the rounding would swamp what they use.
fn threads_cpu(pid: i32, tids: &[i32]) -> f64 {
    tids.iter()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/{pid}/task/{t}/schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>() as f64
        / 1e9
}

/// Context switches (voluntary and not) summed over a process's live threads.
fn context_switches(pid: i32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// The scaling set needs a few descriptors per device (this process holds both ends of each
/// pseudo-terminal; gateway and floor each open one more): raise the soft limit towards the
/// hard one if it is short.
fn ensure_fd_limit(devices: usize) {
    let need = (devices * 4 + 256) as libc::rlim_t;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write to/read from a valid rlimit we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < need {
            lim.rlim_cur = need.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    assert!(
        lim.rlim_cur >= need,
        "RLIMIT_NOFILE {} is below the {need} descriptors {devices} devices need",
        lim.rlim_cur
    );
}

/// The process under test: the gateway, or the floor forwarder started as a child.
enum Subject {
    Gateway(Gateway),
    Floor(std::process::Child),
}

impl Subject {
    fn pid(&self) -> i32 {
        match self {
            Subject::Gateway(g) => g.pid(),
            Subject::Floor(c) => c.id() as i32,
        }
    }
}

/// Writes `count` readings, one per write, one every `1/rate` s (late ticks catch up, so the
/// rate holds on average).
async fn paced_writer(spec: SimSpec, port: &mut tokio_serial::SerialStream, rate: u32, count: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    let mut buf = Vec::with_capacity(256);
    for n in 0..count {
        tick.tick().await;
        buf.clear();
        spec.render(n, common::now_us(), &mut buf);
        port.write_all(&buf).await.unwrap();
    }
}

/// What the floor holds for the broker at most; beyond it, it stops reading its ports.
const FLOOR_MAX_BUF: usize = 1 << 20;

/// The floor: one thread reads every port and writes each line, unchanged, to the broker as
/// a QoS 0 PUBLISH; everything ready is written with one syscall, at most FLOOR_MAX_BUF
/// waits (so under overload the sensors wait, and nothing is dropped). Runs until killed.
fn floor_forwarder(arg: &str) {
    use std::cell::RefCell;
    use std::rc::Rc;
    use tokio::io::AsyncReadExt;

    let (port, paths) = arg.split_once(';').expect("<port>;<paths>");
    let port: u16 = port.parse().unwrap();
    let paths: Vec<String> = paths.split(',').map(str::to_string).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut b = bytes::BytesMut::new();
        let spec = ConnectSpec {
            client_id: "bench-floor",
            keep_alive_s: 0,
            login: None,
            will_topic: "sensorgate/b/floor",
            will_payload: b"offline",
            will_retain: true,
            receive_max: 64,
            max_incoming: 4096,
        };
        codec::put_connect(&mut b, Version::V311, &spec).unwrap();
        tcp.write_all(&b).await.unwrap();
        let mut connack = [0u8; 4];
        tcp.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK");
        let out = Rc::new(RefCell::new(bytes::BytesMut::with_capacity(64 * 1024)));
        let ready = Rc::new(tokio::sync::Notify::new());
        let room = Rc::new(tokio::sync::Notify::new());
        for (i, path) in paths.into_iter().enumerate() {
            let (out, ready, room) = (Rc::clone(&out), Rc::clone(&ready), Rc::clone(&room));
            tokio::task::spawn_local(async move {
                let mut pty = tokio_serial::SerialStream::open(&tokio_serial::new(&path, 115_200)).unwrap();
                let topic = format!("sensorgate/b/devices/d{i}/readings");
                let mut buf = bytes::BytesMut::with_capacity(16 * 1024);
                loop {
                    // Bounded: while the broker is behind, the ports wait (the sensors block).
                    while out.borrow().len() > FLOOR_MAX_BUF {
                        room.notified().await;
                    }
                    if pty.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut out = out.borrow_mut();
                    while let Some(end) = buf.iter().position(|&c| c == b'\n') {
                        let line = buf.split_to(end + 1);
                        let put = |b: &mut bytes::BytesMut| codec::put_str(b, &topic);
                        let meta = PublishMeta::default();
                        codec::put_publish(&mut out, Version::V311, meta, &line[..end], usize::MAX, put).unwrap();
                    }
                    ready.notify_one();
                }
            });
        }
        loop {
            ready.notified().await;
            let batch = out.borrow_mut().split();
            tcp.write_all(&batch).await.unwrap();
            room.notify_waiters();
        }
    });
}

/// The `framing` and `format` names of `spec` in the gateway's config.
fn config_names(spec: SimSpec) -> (&'static str, &'static str) {
    match spec.framing {
        Framing::Lines => ("lines", "json"),
        Framing::Cobs => ("cobs", "postcard"),
    }
}

async fn run(sc: Scenario) -> Outcome {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/b/#").await;
    let (framing, format) = config_names(sc.spec);
    let mut config =
        format!("[gateway]\nid = \"b\"\nmetrics_interval = \"1h\"\n[mqtt]\nport = {}\nqos = {}\n", broker.port, sc.qos);
    let mut ptys = Vec::new();
    for i in 0..sc.devices {
        let link = dir.path().join(format!("d{i}"));
        ptys.push(PtyLink::create(&link).unwrap());
        config += &format!(
            "[[device]]\nname = \"d{i}\"\npath = \"{}\"\nframing = \"{framing}\"\nformat = \"{format}\"\n",
            link.display()
        );
    }
    let subject = if sc.floor {
        let paths: Vec<String> =
            (0..sc.devices).map(|i| dir.path().join(format!("d{i}")).display().to_string()).collect();
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .env(FLOOR_ENV, format!("{};{}", broker.port, paths.join(",")))
            .spawn()
            .expect("start the floor forwarder");
        // Ready once its ports are open: a reading written now reaches the broker.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Subject::Floor(child)
    } else {
        let gw = Gateway::start(dir.path(), &config);
        let mut up = 0;
        while up < sc.devices {
            let (m, _) = sub
                .wait_for(Duration::from_secs(10), |m| m.topic.ends_with("/state") && m.text().contains("\"up\""))
                .await;
            let _ = m;
            up += 1;
        }
        Subject::Gateway(gw)
    };
    let gw = &subject;
    let cpu0 = cpu_seconds(gw.pid());
    let switches0 = context_switches(gw.pid());
    let (_, decoders) = threads(gw.pid());
    let decode_cpu0 = threads_cpu(gw.pid(), &decoders);
    let broker_pid = broker.pid().expect("broker runs");
    let broker_cpu0 = cpu_seconds(broker_pid);
    let started = Instant::now();
    // Readings written so far, and writers still writing (an overload run writes for a time,
    // not a count).
    let written = Arc::new(AtomicU64::new(0));
    let writing = Arc::new(AtomicUsize::new(sc.devices));
    let writers: Vec<_> = ptys
        .into_iter()
        .map(|mut pty| {
            let spec = sc.spec;
            let (written, writing) = (Arc::clone(&written), Arc::clone(&writing));
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if sc.rate == 0 {
                    // As fast as the pty takes for OVERLOAD_TIME (at most `count`), in writes
                    // of OVERLOAD_WRITE readings, each stamped when it is written: a reading's
                    // latency includes its wait in the pty's buffer (what a gateway that stops
                    // reading makes stale).
                    let mut n = 0;
                    while n < sc.count && started.elapsed() < OVERLOAD_TIME {
                        buf.clear();
                        let stamp = common::now_us();
                        let k = OVERLOAD_WRITE.min(sc.count - n);
                        for i in n..n + k {
                            spec.render(i, stamp, &mut buf);
                        }
                        pty.master.write_all(&buf).await.unwrap();
                        n += k;
                        written.fetch_add(k, Relaxed);
                    }
                } else if sc.paced {
                    paced_writer(spec, &mut pty.master, sc.rate, sc.count).await;
                } else {
                    sensorgate::simulate::run(spec, &mut pty.master, sc.rate, sc.count, 0).await.unwrap();
                }
                if sc.rate > 0 {
                    written.fetch_add(sc.count, Relaxed);
                }
                writing.fetch_sub(1, Relaxed);
                pty
            })
        })
        .collect();

    let mut got = 0u64;
    let mut latencies = Vec::with_capacity((sc.count * sc.devices as u64).min(1 << 22) as usize);
    let mut last = started;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), sub.rx.recv()).await {
            Ok(Some(m)) if m.topic.ends_with("/readings") => {
                got += 1;
                last = Instant::now();
                if sc.spec.format == Format::Json {
                    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                    latencies.push(m.received_us.saturating_sub(v["sent_us"].as_u64().unwrap()));
                }
                if writing.load(Relaxed) == 0 && got == written.load(Relaxed) {
                    break;
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    // Up to the last delivery: the idle timeout that ends a lossy run is not throughput.
    let elapsed = (last - started).as_secs_f64();
    let cpu = cpu_seconds(gw.pid()) - cpu0;
    // Who is the bottleneck: the broker's share of a core over the same window.
    let broker_share = (cpu_seconds(broker_pid) - broker_cpu0) / elapsed.max(1e-9) * 100.0;
    let gateway_share = cpu / elapsed.max(1e-9) * 100.0;
    let rss = memory_mib(gw.pid(), "VmHWM:");
    let rss_end = memory_mib(gw.pid(), "VmRSS:");
    let decode_cpu = threads_cpu(gw.pid(), &decoders) - decode_cpu0;
    let (thread_count, decoders_now) = threads(gw.pid());
    // Threads that ended during the run take their counts with them: only pool threads left
    // over from opening the ports do, and they switch little.
    let switches = context_switches(gw.pid()).saturating_sub(switches0);
    for w in writers {
        drop(w.await.unwrap());
    }
    let total = written.load(Relaxed);
    let (dropped, delivered) = match subject {
        Subject::Gateway(mut gw) => {
            // The gateway's own account (final metrics after SIGTERM): what it dropped on purpose.
            gw.signal(libc::SIGTERM);
            let (fin, _) = sub.wait_for(Duration::from_secs(30), |m| m.topic.ends_with("/metrics")).await;
            let fin = fin.json();
            let sum = |key: &str| -> u64 {
                fin["devices"].as_object().unwrap().values().map(|d| d[key].as_u64().unwrap()).sum()
            };
            let counts = (sum("dropped_oldest"), sum("delivered"));
            gw.wait(Duration::from_secs(30));
            counts
        }
        // The floor keeps no account: what it lost is what the subscriber did not see.
        Subject::Floor(mut child) => {
            let _ = child.kill();
            let _ = child.wait();
            (0, got)
        }
    };
    latencies.sort_unstable();
    Outcome {
        total,
        got,
        elapsed,
        dropped,
        unaccounted: total.saturating_sub(delivered + dropped),
        latencies,
        cpu,
        rss,
        subject_share: gateway_share,
        broker_share,
        threads: thread_count,
        decode_threads: decoders_now.len(),
        decode_cpu,
        rss_end,
        switches,
    }
}

/// One row of the default table.
fn print_row(sc: &Scenario, o: &Outcome) {
    println!(
        "| {:<7} | {:<6} | {:>2} | {:<5} | {} | {:>10} | {:>9.0} | {:>6} | {:>6} | {:>5} | {:>5} | {:>6} | {:>10.3} | {:>7.1} | {:>4.0} % | {:>4.0} % |",
        if sc.floor { "floor" } else { "gateway" },
        if sc.rate == 0 { "-" } else if sc.paced { "paced" } else { "burst" },
        sc.devices,
        config_names(sc.spec).0,
        sc.qos,
        if sc.rate == 0 { "max".to_string() } else { format!("{}/s", sc.rate) },
        o.got as f64 / o.elapsed,
        o.dropped,
        o.unaccounted,
        o.latency_ms(0.5),
        o.latency_ms(0.99),
        o.latency_ms(1.0),
        o.cpu_per_100k(),
        o.rss,
        o.subject_share,
        o.broker_share,
    );
}

/// The scaling set: one row per device count, gateway beside floor. RSS per added device is
/// the growth of peak RSS from the set's first row (the fixed part cancels out).
fn run_scale(rt: &tokio::runtime::Runtime) {
    let set = scale_scenarios();
    ensure_fd_limit(set.iter().map(|(gw, _)| gw.devices).max().unwrap_or(0));
    println!(
        "| devices | rate/device | offered/s | delivered/s gw | floor | lost gw (counted dropped) | floor | CPU s/100k gw | floor | gw/floor | peak RSS MiB gw | floor | gw RSS at end | RSS KiB per added device gw | floor | gw threads (input + decode) | their share of gw CPU | switches/reading gw | floor | p99 ms gw | floor |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut base: Option<(usize, f64, f64)> = None;
    for (gw_sc, floor_sc) in set {
        let gw = rt.block_on(run(gw_sc));
        let floor = rt.block_on(run(floor_sc));
        let k = gw_sc.devices;
        // A new set starts where the device count falls back.
        if base.is_some_and(|(k0, ..)| k <= k0) {
            base = None;
        }
        let (k0, gw0, floor0) = *base.get_or_insert((k, gw.rss, floor.rss));
        let per_device = |rss: f64, rss0: f64| {
            if k == k0 {
                "-".to_string()
            } else {
                format!("{:.0}", (rss - rss0) * 1024.0 / (k - k0) as f64)
            }
        };
        println!(
            "| {k:>3} | {:>4}/s | {:>6} | {:>6.0} | {:>6.0} | {} ({}) | {} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} ({}) | {:.0} % | {:.2} | {:.2} | {} | {} |",
            gw_sc.rate,
            u64::from(gw_sc.rate) * k as u64,
            gw.got as f64 / gw.elapsed,
            floor.got as f64 / floor.elapsed,
            gw.total - gw.got,
            gw.dropped,
            floor.total - floor.got,
            gw.cpu_per_100k(),
            floor.cpu_per_100k(),
            gw.cpu_per_100k() / floor.cpu_per_100k(),
            gw.rss,
            floor.rss,
            gw.rss_end,
            per_device(gw.rss, gw0),
            per_device(floor.rss, floor0),
            gw.threads,
            gw.decode_threads,
            gw.decode_cpu / gw.cpu.max(1e-9) * 100.0,
            gw.switches_per_reading(),
            floor.switches_per_reading(),
            gw.latency_ms(0.99),
            floor.latency_ms(0.99),
        );
    }
}

fn main() {
    if let Ok(arg) = std::env::var(FLOOR_ENV) {
        floor_forwarder(&arg);
        return;
    }
    // `cargo bench` passes --bench; a filter argument is accepted and ignored.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if bench_set() == "scale" {
        run_scale(&rt);
        return;
    }
    let list = scenarios();
    ensure_fd_limit(list.iter().map(|sc| sc.devices).max().unwrap_or(0));
    println!(
        "| subject | sensor | ports | framing | QoS | rate/port | delivered/s | dropped_oldest (counted) | unaccounted | p50 ms | p99 ms | max ms | CPU s/100k | peak RSS MiB | subject CPU | broker CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for sc in list {
        let outcome = rt.block_on(run(sc));
        print_row(&sc, &outcome);
    }
}
