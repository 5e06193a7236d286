//! The Sparkplug B output's cost: 16 JSON sensors at `SG_RATE` (default 1000) readings/s each,
//! one reading per write, for `SG_SECS` (default 20) s, against one mosquitto; run twice in one
//! process, the JSON profile alone (the reference) and with `[sparkplug] enabled` beside it.
//! Prints the gateway's CPU (over the measured window, after 3 s of warm-up), RSS and peak
//! RSS, mosquitto's CPU, and what each output delivered. `cargo bench --bench sparkplug`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{Gateway, Mosquitto, Subscriber};

const DEVICES: usize = 16;
const WARM_UP: Duration = Duration::from_secs(3);

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn run(label: &str, sparkplug: bool, secs: u64, rate: u32) {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut config = format!(
        "[gateway]\nid = \"b\"\nmetrics_interval = \"1s\"\nstate_dir = \"{}\"\n[mqtt]\nport = {}\n",
        dir.path().join("state").display(),
        broker.port
    );
    if sparkplug {
        config += "[sparkplug]\nenabled = true\ngroup_id = \"bench\"\n";
    }
    let (ptys, devices) = common::line_devices(dir.path(), DEVICES);
    config += &devices;
    let gw = Gateway::start(dir.path(), &config);
    let mut metrics = Subscriber::connect(broker.port, "sensorgate/b/metrics").await;
    // Both connections up before the sensors start (else the first readings wait, or drop).
    metrics.wait_for(Duration::from_secs(10), |m| m.json()["mqtt"]["connected"] == true).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let writers = common::json_sensors(ptys, rate);
    tokio::time::sleep(WARM_UP).await;
    let broker_pid = broker.pid().unwrap();
    let (cpu0, bcpu0) = (common::cpu_seconds(gw.pid()), common::cpu_seconds(broker_pid));
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (cpu, bcpu) = (common::cpu_seconds(gw.pid()) - cpu0, common::cpu_seconds(broker_pid) - bcpu0);
    let (rss, hwm) = (common::memory_mib(gw.pid(), "VmRSS"), common::memory_mib(gw.pid(), "VmHWM"));
    for w in &writers {
        w.abort();
    }
    // The newest metrics, after the queues settled: older ones wait in the channel.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while metrics.rx.try_recv().is_ok() {}
    let (m, _) = metrics.wait_for(Duration::from_secs(10), |_| true).await;
    let v = m.json();
    if std::env::var_os("SG_DEBUG").is_some() {
        eprintln!("{v}");
    }
    let sum = |devices: &serde_json::Value, k: &str| -> u64 {
        devices.as_object().map_or(0, |d| d.values().map(|d| d[k].as_u64().unwrap_or(0)).sum())
    };
    let readings = sum(&v["devices"], "readings");
    let json = sum(&v["devices"], "delivered");
    let sp = sum(&v["sparkplug"]["devices"], "delivered");
    let sp_dropped = sum(&v["sparkplug"]["devices"], "dropped_oldest");
    let json_dropped = sum(&v["devices"], "dropped_oldest");
    println!(
        "{label:<22} gateway CPU {:>5.1} % of a core ({:.2} s / {secs} s), RSS {rss:.1} MiB (peak {hwm:.1}); \
         mosquitto CPU {:>5.1} %; readings {readings}, JSON delivered {json} (dropped {json_dropped}), Sparkplug delivered {sp} (dropped {sp_dropped})",
        cpu * 100.0 / secs as f64,
        cpu,
        bcpu * 100.0 / secs as f64,
    );
    drop(gw);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = env("SG_SECS", 20);
    let rate = env("SG_RATE", 1000) as u32;
    println!("{DEVICES} sensors x {rate} readings/s, one reading per write, {secs} s measured");
    run("JSON profile alone", false, secs, rate).await;
    run("JSON + Sparkplug B", true, secs, rate).await;
}
