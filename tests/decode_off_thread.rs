//! A device whose decoder takes 200 ms per frame must not delay another device for long. The
//! stream devices read and decode on shared input threads (never on the runtime that owns the
//! MQTT connection); the first read whose decoding takes longer than `SLOW_DECODE` moves the
//! device to a decode thread of its own. Here both devices share one input thread: the fast
//! device waits for the slow one's first frame, once, and never again. In-process gateway (to
//! inject the slow decoder at the seam), real mosquitto, real pseudo-terminals.

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
    let hooks = Hooks { decoders, input_threads: Some(1), ..Hooks::default() };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(app::run_with(config, async { stop_rx.await.unwrap_or(()) }, hooks));
    // Both devices up (each announces it on its state topic) before anything is sent.
    let mut states = Subscriber::connect(broker.port, "sensorgate/it/devices/+/state").await;
    let mut up = std::collections::HashSet::new();
    while up.len() < 2 {
        let (m, _) = states.wait_for(Duration::from_secs(10), |m| m.text().contains("\"up\"")).await;
        up.insert(m.topic.clone());
    }

    // The fast device sends one reading every 20 ms for 3 s, from now on.
    const FAST: u64 = 150;
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
    // The slow device's first frame: decoded on the shared input thread (200 ms), which then
    // moves the slow device to a thread of its own.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut first = Vec::new();
    SPEC.render(0, common::now_us(), &mut first);
    write_all(&mut slow.master, &first).await;

    let mut fast_seen: Vec<(u64, f64)> = Vec::new(); // (sent_us, latency ms)
    let mut moved_at_us = None;
    let mut slow_got = 0;
    while fast_seen.len() < FAST as usize || slow_got < 11 {
        let (m, _) = sub.wait_for(Duration::from_secs(20), |_| true).await;
        let v = m.json();
        if m.topic.contains("/fast/") {
            let sent = v["sent_us"].as_u64().unwrap();
            fast_seen.push((sent, (m.received_us.saturating_sub(sent)) as f64 / 1000.0));
        } else {
            slow_got += 1;
            if moved_at_us.is_none() {
                // Moved: 10 more frames, 2 s of decoding, now on the slow device's own thread.
                moved_at_us = Some(m.received_us);
                let mut burst = Vec::new();
                for n in 1..=10 {
                    SPEC.render(n, common::now_us(), &mut burst);
                }
                write_all(&mut slow.master, &burst).await;
            }
        }
    }
    let _fast = writer.await.unwrap();
    let moved_at_us = moved_at_us.unwrap();
    let during_first: Vec<f64> = fast_seen.iter().filter(|(s, _)| *s < moved_at_us).map(|(_, l)| *l).collect();
    let mut after: Vec<f64> = fast_seen.iter().filter(|(s, _)| *s >= moved_at_us).map(|(_, l)| *l).collect();
    after.sort_by(f64::total_cmp);
    let p = |q: f64| after[((after.len() - 1) as f64 * q) as usize];
    let worst_before = during_first.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "fast device while the slow one decodes on its own thread: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} readings); worst while both shared a thread: {worst_before:.1} ms",
        p(0.5),
        p(0.99),
        p(1.0),
        after.len()
    );
    // The one slow frame on the shared thread did delay it (so the two did share it)...
    assert!(worst_before > 100.0, "the fast device never waited for the slow one's first frame: {worst_before:.1} ms");
    // ...and once moved, 2 s of slow decoding never delays it.
    assert!(after.len() > 50, "too few fast readings after the move: {}", after.len());
    assert!(p(1.0) < 100.0, "fast device was delayed after the move: max {:.1} ms", p(1.0));
    let threads = threads.lock().unwrap().clone();
    assert_eq!(threads.len(), 11);
    assert_eq!(threads[0], "input-0", "first frame decoded on {threads:?}");
    assert!(threads[1..].iter().all(|t| t == "decode-slow"), "decoded on {threads:?}");

    stop_tx.send(()).unwrap();
    let report = gateway.await.unwrap().unwrap();
    assert_eq!(report.lost(), 0);
    drop(slow);
}
