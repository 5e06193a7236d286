//! A device whose decoder takes 200 ms per frame must not delay another device: decoding runs
//! on the device's own thread, never on a tokio worker. In-process gateway (to inject the slow
//! decoder at the seam), real mosquitto, real pseudo-terminals.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use common::{write_all, Mosquitto, Subscriber};
use sensorgate::app::{self, Hooks};
use sensorgate::config::{Config, StreamConfig};
use sensorgate::decode::{Decode, Decoded, Format};
use sensorgate::framing::Framing;
use sensorgate::reject::Reject;
use sensorgate::simulate::{PtyLink, SimSpec};

const SPEC: SimSpec = SimSpec { framing: Framing::Lines, format: Format::Json };

struct Slow {
    inner: Box<dyn Decode>,
    threads: Arc<Mutex<Vec<String>>>,
}

impl Decode for Slow {
    fn decode(&mut self, frame: &[u8], out: &mut BytesMut) -> Result<Decoded, Reject> {
        self.threads.lock().unwrap().push(std::thread::current().name().unwrap_or("?").to_string());
        // CPU-bound decoding stands still on its thread, which is exactly what is simulated.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(200));
        self.inner.decode(frame, out)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_decoder_does_not_delay_other_devices() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/devices/+/readings").await;
    let (slow_path, fast_path) = (dir.path().join("slow"), dir.path().join("fast"));
    let mut slow = PtyLink::create(&slow_path).unwrap();
    let mut fast = PtyLink::create(&fast_path).unwrap();
    let config = Config::from_toml(&format!(
        "[gateway]\nid = \"it\"\n[mqtt]\nport = {}\n\
         [[device]]\nname = \"slow\"\npath = \"{}\"\nframing = \"lines\"\n\
         [[device]]\nname = \"fast\"\npath = \"{}\"\nframing = \"lines\"\n",
        broker.port,
        slow_path.display(),
        fast_path.display()
    ))
    .unwrap();

    let threads = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&threads);
    let decoders = Arc::new(move |name: &str, stream: &StreamConfig| -> Box<dyn Decode> {
        let inner = stream.decoder();
        if name == "slow" {
            Box::new(Slow { inner, threads: Arc::clone(&seen) })
        } else {
            inner
        }
    });
    let hooks = Hooks { decoders, ..Hooks::default() };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(app::run_with(config, async { stop_rx.await.unwrap_or(()) }, hooks));

    // 10 frames = 2 s of decoding on the slow device, starting now.
    let mut burst = Vec::new();
    for n in 0..10 {
        SPEC.render(n, common::now_us(), &mut burst);
    }
    write_all(&mut slow.master, &burst).await;

    // Meanwhile the fast device sends one reading every 20 ms for 2 s.
    const FAST: u64 = 100;
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for n in 0..FAST {
            tick.tick().await;
            let mut line = Vec::new();
            SPEC.render(n, common::now_us(), &mut line);
            write_all(&mut fast.master, &line).await;
        }
        fast
    });

    let mut latencies_ms = Vec::new();
    let mut slow_got = 0;
    while latencies_ms.len() < FAST as usize || slow_got < 10 {
        let (m, _) = sub.wait_for(Duration::from_secs(20), |_| true).await;
        let v = m.json();
        if m.topic.contains("/fast/") {
            let sent = v["sent_us"].as_u64().unwrap();
            latencies_ms.push((m.received_us.saturating_sub(sent)) as f64 / 1000.0);
        } else {
            slow_got += 1;
        }
    }
    let _fast = writer.await.unwrap();
    latencies_ms.sort_by(f64::total_cmp);
    let p = |q: f64| latencies_ms[((latencies_ms.len() - 1) as f64 * q) as usize];
    eprintln!(
        "fast device, sensor → broker → subscriber latency while the other decoder blocks: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        p(0.5),
        p(0.99),
        p(1.0)
    );
    // Decoding on a tokio worker would stall the fast device's reads by up to 200 ms per frame.
    assert!(p(1.0) < 100.0, "fast device was delayed: max {:.1} ms", p(1.0));
    let threads = threads.lock().unwrap().clone();
    assert_eq!(threads.len(), 10);
    assert!(threads.iter().all(|t| t == "decode-slow"), "decoded on {threads:?}");

    stop_tx.send(()).unwrap();
    let report = gateway.await.unwrap().unwrap();
    assert_eq!(report.lost(), 0);
    drop(slow);
}
