//! Catch-up pacing against a broker with mosquitto's default per-client queue
//! (`max_queued_messages 1000`): 16 sensors at `SG_SOAK_RATE` (default 250) readings/s each,
//! the broker stopped for 5 s every 30 s for `SG_SOAK_SECS` (default 180), a persistent QoS 1
//! subscriber throughout. Run twice in one process: unpaced (`catch_up_rate` far above any
//! link, as before issue 11) and with the default pacing. Prints, for each, the readings the
//! gateway had acknowledged by the broker and how many of them the subscriber never saw.
//! `cargo bench --bench catchup`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Gateway, Mosquitto, Subscriber};

const DEVICES: usize = 16;
const OUTAGE: Duration = Duration::from_secs(5);
const EVERY: Duration = Duration::from_secs(30);

struct Outcome {
    acked_unique: u64,
    seen: u64,
    republished: u64,
}

async fn soak(label: &str, mqtt_extra: &str, secs: u64, rate: u32) -> Outcome {
    let dir = common::tempdir();
    // Mosquitto's default subscriber queue (the harness lifts it; a later line wins).
    let mut broker = Mosquitto::start_custom(true, "max_queued_messages 1000".into());
    let mut sub = Subscriber::connect_with(broker.port, "sensorgate/c/devices/#", Some(&format!("soak-{label}"))).await;
    let mut config = format!(
        "[gateway]\nid = \"c\"\nmetrics_interval = \"1s\"\n[mqtt]\nport = {}\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n{mqtt_extra}\n\
         [queue]\nmax_readings = 1000000\nmax_bytes = \"256MiB\"\n",
        broker.port
    );
    let (ptys, devices) = common::line_devices(dir.path(), DEVICES);
    config += &devices;
    let gw = Gateway::start(dir.path(), &config);
    let writers = common::json_sensors(ptys, rate);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(HashSet::<(String, u64)>::new()));
    let collector = {
        let seen = std::sync::Arc::clone(&seen);
        let mut rx = std::mem::replace(&mut sub.rx, tokio::sync::mpsc::channel(1).1);
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if m.topic.ends_with("/readings") || m.topic.ends_with("/backlog") {
                    let v = m.json();
                    let dev = v["_gw"]["device"].as_str().unwrap_or("?").to_string();
                    seen.lock().unwrap().insert((dev, v["n"].as_u64().unwrap_or(u64::MAX)));
                }
            }
        })
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(EVERY - OUTAGE).await;
        broker.stop_gracefully();
        tokio::time::sleep(OUTAGE).await;
        broker.restart();
    }
    for w in &writers {
        w.abort();
    }
    // Everything the gateway holds goes out; then the subscriber gets what the broker kept.
    let mut metrics = Subscriber::connect(broker.port, "sensorgate/c/metrics").await;
    let (m, _) = metrics
        .wait_for(Duration::from_secs(120), |m| {
            let v = m.json();
            v["devices"].as_object().unwrap().values().all(|d| d["queued"] == 0 && d["in_flight"] == 0)
        })
        .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let v = m.json();
    let sum = |k: &str| -> u64 { v["devices"].as_object().unwrap().values().map(|d| d[k].as_u64().unwrap()).sum() };
    collector.abort();
    drop(gw);
    let seen = seen.lock().unwrap().len() as u64;
    // Acknowledged once each at least; republished readings may have been acknowledged twice.
    Outcome {
        acked_unique: sum("readings") - sum("dropped_oldest") - sum("expired") - sum("poisoned"),
        seen,
        republished: sum("republished"),
    }
}

fn main() {
    let secs = std::env::var("SG_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(180);
    let rate = std::env::var("SG_SOAK_RATE").ok().and_then(|s| s.parse().ok()).unwrap_or(250);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!(
        "{secs} s, {DEVICES} × {rate}/s, broker stopped {}s every {}s, max_queued_messages 1000, persistent QoS 1 subscriber",
        OUTAGE.as_secs(),
        EVERY.as_secs()
    );
    println!("| catch-up | acknowledged by the broker | seen by the subscriber | never seen | republished |");
    println!("|---|---|---|---|---|");
    for (label, extra) in [("unpaced", "catch_up_rate = 100000000"), ("paced (default)", "")] {
        let o = rt.block_on(soak(label.split(' ').next().unwrap(), extra, secs, rate));
        let missing = o.acked_unique.saturating_sub(o.seen);
        println!(
            "| {label} | {} | {} | {missing} ({:.2} %) | {} |",
            o.acked_unique,
            o.seen,
            missing as f64 * 100.0 / o.acked_unique.max(1) as f64,
            o.republished
        );
    }
}
