//! sd_notify: READY=1 once running, WATCHDOG=1 only while every task reports in, STATUS=,
//! STOPPING=1 at shutdown. A unix datagram socket stands in for systemd. In-process (one test
//! in this binary: it sets NOTIFY_SOCKET for the whole process) so that a decoder can be made
//! to hang.
#![allow(clippy::disallowed_methods)] // The stuck decoder blocks its own thread on purpose.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{write_all, Mosquitto};
use sensorgate::app::{self, Hooks};
use sensorgate::config::{Config, StreamConfig};
use sensorgate::decode::{Decode, Decoded, Format};
use sensorgate::framing::Framing;
use sensorgate::reject::Reject;
use sensorgate::simulate::{PtyLink, SimSpec};

const SPEC: SimSpec = SimSpec { framing: Framing::Lines, format: Format::Json };

/// Hangs on a frame containing "wedge" until released: an infinite loop in a decoder.
struct Hangs {
    inner: Box<dyn Decode>,
    hold: Arc<AtomicBool>,
}

impl Decode for Hangs {
    fn decode(&mut self, frame: &[u8], out: &mut BytesMut) -> Result<Decoded, Reject> {
        if frame.windows(5).any(|w| w == b"wedge") {
            while self.hold.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.inner.decode(frame, out)
    }
}

type Log = Arc<Mutex<Vec<(Instant, String)>>>;

fn since(log: &Log, t: Instant) -> Vec<String> {
    log.lock().unwrap().iter().filter(|(at, _)| *at >= t).map(|(_, m)| m.clone()).collect()
}

async fn wait_until(log: &Log, t: Instant, what: &str, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((at, _)) = log.lock().unwrap().iter().find(|(at, m)| *at >= t && m.contains(what)) {
            return *at;
        }
        assert!(Instant::now() < deadline, "no {what:?} within {timeout:?}; got {:?}", since(log, t));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_ready_feeds_the_watchdog_only_while_the_pipeline_moves_and_says_stopping() {
    let dir = common::tempdir();
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    // SAFETY (edition 2024 would require unsafe): this binary has one test, set before any
    // other thread of ours reads the environment.
    std::env::set_var("NOTIFY_SOCKET", &socket_path);
    std::env::set_var("WATCHDOG_USEC", "2000000");
    let log: Log = Arc::default();
    let collector = {
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf).await {
                log.lock().unwrap().push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        })
    };

    let broker = Mosquitto::start();
    let (ok_path, stuck_path) = (dir.path().join("ok"), dir.path().join("stuck"));
    let (mut ok, mut stuck) = (PtyLink::create(&ok_path).unwrap(), PtyLink::create(&stuck_path).unwrap());
    let config = Config::from_toml(&format!(
        "[gateway]\nid = \"it\"\n[mqtt]\nport = {}\n[[device]]\nname = \"ok\"\npath = \"{}\"\nframing = \"lines\"\n\
         [[device]]\nname = \"stuck\"\npath = \"{}\"\nframing = \"lines\"\n",
        broker.port,
        ok_path.display(),
        stuck_path.display()
    ))
    .unwrap();
    let hold = Arc::new(AtomicBool::new(true));
    let decoders = {
        let hold = Arc::clone(&hold);
        Arc::new(move |name: &str, stream: &StreamConfig| -> Box<dyn Decode> {
            let inner = stream.decoder();
            if name == "stuck" {
                Box::new(Hangs { inner, hold: Arc::clone(&hold) })
            } else {
                inner
            }
        })
    };
    let start = Instant::now();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(app::run_with(
        config,
        async { stopped.await.unwrap_or(()) },
        Hooks { decoders, ..Hooks::default() },
    ));

    // Running: READY=1 first, then watchdog pings (every WATCHDOG_USEC / 4) with a status.
    let ready = wait_until(&log, start, "READY=1", Duration::from_secs(5)).await;
    let first = log.lock().unwrap().first().unwrap().1.clone();
    assert_eq!(first.trim_end(), "READY=1");
    wait_until(&log, ready, "STATUS=2/2 devices up, 0 readings queued, broker connected", Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pings = since(&log, ready).iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 3, "healthy pipeline: {pings} watchdog pings in 2 s");

    // Wedge: the stuck device's decoder hangs; its session fills the hand-off channel and
    // blocks. The other device and the broker are fine, but the pipeline is not moving.
    let mut line = Vec::new();
    SPEC.render(0, common::now_us(), &mut line);
    write_all(&mut stuck.master, b"{\"wedge\":1}\n").await;
    for n in 0..60 {
        let mut l = Vec::new();
        SPEC.render(n, common::now_us(), &mut l);
        write_all(&mut stuck.master, &l).await;
        write_all(&mut ok.master, &l).await;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let wedged = Instant::now();
    let status =
        wait_until(&log, wedged - Duration::from_secs(1), "not reporting: device:stuck", Duration::from_secs(8)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let quiet = since(&log, status);
    assert!(!quiet.iter().any(|m| m.contains("WATCHDOG=1")), "watchdog fed while wedged: {quiet:?}");
    assert!(quiet.iter().filter(|m| m.contains("not reporting: device:stuck")).count() >= 2, "{quiet:?}");

    // Unwedged: the session takes bytes again, and the pings resume.
    let released = Instant::now();
    hold.store(false, Ordering::SeqCst);
    let resumed = wait_until(&log, released, "WATCHDOG=1", Duration::from_secs(5)).await;
    eprintln!(
        "watchdog: stopped {:?} after the wedge began, resumed {:?} after release",
        status.saturating_duration_since(wedged - Duration::from_millis(900)),
        resumed - released
    );

    let stopping = Instant::now();
    stop.send(()).unwrap();
    let report = gateway.await.unwrap().unwrap();
    wait_until(&log, stopping, "STOPPING=1", Duration::from_secs(2)).await;
    assert_eq!(report.lost(), 0);
    collector.abort();
    drop((ok, stuck, line));
}
