//! End-to-end benchmark: K simulated sensors on pseudo-terminals → the release `sensorgate`
//! binary → a real mosquitto → a subscriber. Prints delivered readings/s, loss, latency
//! (sensor stamp → subscriber), gateway CPU-seconds per 100k readings and peak RSS.
//!
//! `cargo bench --bench e2e` runs the default scenarios; `SG_BENCH=quick` runs a short set,
//! `SG_BENCH=overload` only the 16-port as-fast-as-possible one (peak RSS under overload).
//! Figures depend on the machine: README lists the ones measured here.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{cpu_seconds, memory_mib, Gateway, Mosquitto, Subscriber};
use sensorgate::decode::Format;
use sensorgate::framing::Framing;
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
}

const JSON: SimSpec = SimSpec { framing: Framing::Lines, format: Format::Json };
const COBS: SimSpec = SimSpec { framing: Framing::Cobs, format: Format::Postcard };

fn scenarios() -> Vec<Scenario> {
    let quick = std::env::var("SG_BENCH").is_ok_and(|v| v == "quick");
    let s = |devices, spec, qos, rate, count| Scenario { devices, spec, qos, rate, count };
    if quick {
        return vec![s(4, JSON, 1, 0, 20_000), s(16, JSON, 0, 1000, 5_000)];
    }
    if std::env::var("SG_BENCH").is_ok_and(|v| v == "overload") {
        return vec![s(16, JSON, 0, 0, 12_500)];
    }
    vec![
        s(1, JSON, 0, 0, 200_000),
        s(4, JSON, 0, 0, 50_000),
        s(4, JSON, 1, 0, 50_000),
        s(4, COBS, 1, 0, 50_000),
        s(16, JSON, 0, 0, 12_500),
        s(16, JSON, 0, 1000, 10_000),
        s(16, JSON, 1, 1000, 10_000),
        s(16, COBS, 0, 1000, 10_000),
    ]
}

async fn run(sc: Scenario) {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/b/#").await;
    let (framing, format) = match sc.spec.framing {
        Framing::Lines => ("lines", "json"),
        Framing::Cobs => ("cobs", "postcard"),
    };
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
    let gw = Gateway::start(dir.path(), &config);
    let mut up = 0;
    while up < sc.devices {
        let (m, _) =
            sub.wait_for(Duration::from_secs(10), |m| m.topic.ends_with("/state") && m.text().contains("\"up\"")).await;
        let _ = m;
        up += 1;
    }
    let cpu0 = cpu_seconds(gw.pid());
    let broker_pid = broker.pid().expect("broker runs");
    let broker_cpu0 = cpu_seconds(broker_pid);
    let started = Instant::now();
    let writers: Vec<_> = ptys
        .into_iter()
        .map(|mut pty| {
            let spec = sc.spec;
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if sc.rate == 0 {
                    let stamp = common::now_us();
                    for n in 0..sc.count {
                        spec.render(n, stamp, &mut buf);
                    }
                    pty.master.write_all(&buf).await.unwrap();
                } else {
                    sensorgate::simulate::run(spec, &mut pty.master, sc.rate, sc.count, 0).await.unwrap();
                }
                pty
            })
        })
        .collect();

    let total = sc.count * sc.devices as u64;
    let mut got = 0u64;
    let mut latencies = Vec::with_capacity(total as usize);
    let mut last = started;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), sub.rx.recv()).await {
            Ok(Some(m)) if m.topic.ends_with("/readings") => {
                got += 1;
                last = Instant::now();
                if sc.rate > 0 && sc.spec.format == Format::Json {
                    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                    latencies.push(m.received_us.saturating_sub(v["sent_us"].as_u64().unwrap()));
                }
                if got == total {
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
    for w in writers {
        drop(w.await.unwrap());
    }
    // The gateway's own account (final metrics after SIGTERM): what it dropped on purpose.
    let mut gw = gw;
    gw.signal(libc::SIGTERM);
    let (fin, _) = sub.wait_for(Duration::from_secs(30), |m| m.topic.ends_with("/metrics")).await;
    let fin = fin.json();
    let sum =
        |key: &str| -> u64 { fin["devices"].as_object().unwrap().values().map(|d| d[key].as_u64().unwrap()).sum() };
    let (dropped, delivered) = (sum("dropped_oldest"), sum("delivered"));
    gw.wait(Duration::from_secs(30));
    latencies.sort_unstable();
    let p = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q) as usize)
            .map_or("-".to_string(), |us| format!("{:.2}", *us as f64 / 1000.0))
    };
    println!(
        "| {:>2} | {:<5} | {} | {:>10} | {:>9.0} | {:>6} | {:>6} | {:>5} | {:>5} | {:>6} | {:>10.3} | {:>7.1} | {:>4.0} % | {:>4.0} % |",
        sc.devices,
        framing,
        sc.qos,
        if sc.rate == 0 { "max".to_string() } else { format!("{}/s", sc.rate) },
        got as f64 / elapsed,
        dropped,
        // Written by the sensors but neither delivered nor counted as dropped.
        total.saturating_sub(delivered + dropped),
        p(0.5),
        p(0.99),
        p(1.0),
        cpu / got.max(1) as f64 * 100_000.0,
        rss,
        gateway_share,
        broker_share,
    );
}

fn main() {
    // `cargo bench` passes --bench; a filter argument is accepted and ignored.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!(
        "| ports | framing | QoS | rate/port | delivered/s | dropped_oldest (counted) | unaccounted | p50 ms | p99 ms | max ms | CPU s/100k | peak RSS MiB | gateway CPU | broker CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for sc in scenarios() {
        rt.block_on(run(sc));
    }
}
