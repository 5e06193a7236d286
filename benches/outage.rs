//! A long broker outage under load: 16 simulated sensors at 1000 readings/s each into the
//! release binary with the default queue, the broker away for 60 s (`SG_OUTAGE_SECS`).
//! Prints RSS and CPU while the broker is down, the drops counted, and the time to drain
//! after it comes back. `cargo bench --bench outage`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{cpu_seconds, memory_mib, Gateway, Mosquitto, Subscriber};

const DEVICES: usize = 16;
const RATE: u32 = 1000;

async fn run(outage: Duration) {
    let dir = common::tempdir();
    let mut broker = Mosquitto::start();
    let mut config = format!(
        "[gateway]\nid = \"o\"\nmetrics_interval = \"1s\"\n[mqtt]\nport = {}\nreconnect_max = \"2s\"\n",
        broker.port
    );
    let (ptys, devices) = common::line_devices(dir.path(), DEVICES);
    config += &devices;
    let gw = Gateway::start(dir.path(), &config);
    let writers = common::json_sensors(ptys, RATE);
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("RSS before the outage: {:.1} MiB", memory_mib(gw.pid(), "VmRSS:"));
    broker.stop();
    let down = Instant::now();
    let cpu0 = cpu_seconds(gw.pid());
    println!("| s into outage | RSS MiB | CPU s since outage |");
    println!("|---|---|---|");
    while down.elapsed() < outage {
        tokio::time::sleep(Duration::from_secs(5)).await;
        println!(
            "| {:>3.0} | {:.1} | {:.2} |",
            down.elapsed().as_secs_f64(),
            memory_mib(gw.pid(), "VmRSS:"),
            cpu_seconds(gw.pid()) - cpu0
        );
    }
    let cpu_down = cpu_seconds(gw.pid()) - cpu0;
    broker.restart();
    let back = Instant::now();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/o/metrics").await;
    let (m, _) = sub
        .wait_for(Duration::from_secs(120), |m| {
            let v = m.json();
            v["mqtt"]["connected"] == true && v["queue"]["readings"] == 0
        })
        .await;
    let v = m.json();
    let dropped: u64 = v["devices"].as_object().unwrap().values().map(|d| d["dropped_oldest"].as_u64().unwrap()).sum();
    let readings: u64 = v["devices"].as_object().unwrap().values().map(|d| d["readings"].as_u64().unwrap()).sum();
    println!(
        "outage {:?} at {} readings/s: CPU {:.2} s ({:.1}% of a core), peak RSS {:.1} MiB, dropped_oldest {dropped} of {readings}, \
         queue drained {:.1} s after the broker came back",
        outage,
        DEVICES as u32 * RATE,
        cpu_down,
        cpu_down / outage.as_secs_f64() * 100.0,
        memory_mib(gw.pid(), "VmHWM:"),
        back.elapsed().as_secs_f64()
    );
    for w in writers {
        w.abort();
    }
}

fn main() {
    let secs = std::env::var("SG_OUTAGE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run(Duration::from_secs(secs)));
}
