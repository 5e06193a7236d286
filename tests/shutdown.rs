//! Shutdown, end to end (real binary, real mosquitto, pseudo-terminals): SIGTERM ends the
//! process within `gateway.shutdown_timeout` + 1 s whatever is stuck inside, and what a port
//! already holds at SIGTERM is read and delivered before the port closes.
//!
//! A slow or hanging decoder is put in through the binary's test hook
//! (`SENSORGATE_TEST_SLOW_DECODER`, see `src/main.rs`).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{json_lines, n, write_all, Gateway, Mosquitto, Subscriber};
use sensorgate::simulate::PtyLink;
use serde_json::Value;

const HOOK: &str = "SENSORGATE_TEST_SLOW_DECODER";

fn config(port: u16, shutdown_timeout: &str, devices: &[(&str, &Path)]) -> String {
    let mut c = format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"100ms\"\nshutdown_timeout = \"{shutdown_timeout}\"\n\
         [mqtt]\nport = {port}\n"
    );
    for (name, path) in devices {
        c += &format!("[[device]]\nname = \"{name}\"\npath = \"{}\"\nframing = \"lines\"\n", path.display());
    }
    c
}

/// Sends SIGTERM and returns how long the process took to exit.
fn stop(gw: &mut Gateway, at_most: Duration) -> (std::process::ExitStatus, Duration) {
    let began = Instant::now();
    gw.signal(libc::SIGTERM);
    let status = gw.wait(at_most);
    (status, began.elapsed())
}

/// A decoder that never returns cannot hold the process: the gateway names the late device at
/// its deadline and the process is gone within `shutdown_timeout` + 1 s. (Before: the runtime's
/// drop waited for the thread joining the hung decoder, forever.) The healthy device's readings
/// are all delivered meanwhile (it reads on the other input thread: with one core, the two
/// would share one, and a decoder that never returns would hold both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_process_in_time_with_a_hung_decoder() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let (h, ok) = (dir.path().join("h"), dir.path().join("ok"));
    let (mut pty_h, mut pty_ok) = (PtyLink::create(&h).unwrap(), PtyLink::create(&ok).unwrap());
    let text = config(broker.port, "1s", &[("h", &h), ("ok", &ok)]);
    let mut gw = Gateway::start_with_env(dir.path(), &text, &["--log-format", "json"], &[(HOOK, "h:forever")]);
    sub.wait_for(Duration::from_secs(5), |m| m.topic == "sensorgate/it/state" && m.text() == "online").await;

    write_all(&mut pty_h.master, &json_lines(0..1)).await;
    write_all(&mut pty_ok.master, &json_lines(0..5)).await;
    // The hung decoder has its frame; the other device's five readings are through.
    sub.wait_for(Duration::from_secs(10), |m| {
        m.topic == "sensorgate/it/metrics" && {
            let v = m.json();
            n(&v["devices"]["h"], "frames_in") == 1 && n(&v["devices"]["ok"], "delivered") == 5
        }
    })
    .await;

    let (status, took) = stop(&mut gw, Duration::from_secs(10));
    eprintln!("hung decoder: exited {status:?} {took:?} after SIGTERM");
    assert!(took < Duration::from_secs(2), "shutdown_timeout 1s + 1s; took {took:?}");
    let late = gw.log_records("Devices did not stop in time; leaving them behind and draining what was read.");
    assert_eq!(late.len(), 1, "{}", gw.log_text());
    assert_eq!(late[0]["devices"], "h");
    // The hung device did not take the drain's time: only the device phase ran out.
    let deadlines = gw.log_records("Deadline reached.");
    assert_eq!(deadlines.len(), 1, "{deadlines:?}");
    assert_eq!(deadlines[0]["waiting_for"], "devices still stopping: h");
    let finals = gw.log_records("Final accounting.");
    let fin = |d: &str| finals.iter().find(|f| f["device"] == d).cloned().unwrap_or_else(|| panic!("{d}: {finals:?}"));
    assert_eq!((n(&fin("ok"), "delivered"), n(&fin("ok"), "lost")), (5, 0));
    assert_eq!(n(&fin("h"), "readings"), 0);
    drop((pty_h, pty_ok));
}

/// An idle gateway stops promptly (a figure for the report; the bound is loose on purpose).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_gateway_stops_promptly() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let p = dir.path().join("p");
    let _pty = PtyLink::create(&p).unwrap();
    let mut gw = Gateway::start(dir.path(), &config(broker.port, "5s", &[("p", &p)]));
    sub.wait_for(Duration::from_secs(5), |m| m.topic == "sensorgate/it/devices/p/state" && m.json()["state"] == "up")
        .await;
    let (status, took) = stop(&mut gw, Duration::from_secs(6));
    eprintln!("idle: exited {status:?} {took:?} after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// Scenario: the broker (on this host) stops first, as systemd stops both in parallel; with
/// nothing queued the gateway does not wait its `shutdown_timeout` for it: the last will says
/// `offline` for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_gone_and_nothing_queued_sigterm_does_not_wait() {
    let dir = common::tempdir();
    let mut broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let p = dir.path().join("p");
    let _pty = PtyLink::create(&p).unwrap();
    let mut gw = Gateway::start(dir.path(), &config(broker.port, "8s", &[("p", &p)]));
    sub.wait_for(Duration::from_secs(5), |m| m.topic == "sensorgate/it/devices/p/state" && m.json()["state"] == "up")
        .await;
    broker.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, took) = stop(&mut gw, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(3), "waited {took:?} for a broker that is gone with nothing to deliver");
    assert!(gw.log_text().contains("no reading is waiting: not waiting for it"), "{}", gw.log_text());
}

/// Readings written before SIGTERM but still in the port's kernel buffer are read, decoded
/// and delivered. A slow decoder (0.5 ms a frame) keeps the buffer full, so at SIGTERM the
/// kernel holds ~18 KiB of readings (before: all of them lost, uncounted, on every run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_port_holds_at_sigterm_is_delivered() {
    const N: u64 = 3000;
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let s = dir.path().join("s");
    let mut pty = PtyLink::create(&s).unwrap();
    let text = config(broker.port, "10s", &[("s", &s)]);
    let mut gw = Gateway::start_with_env(dir.path(), &text, &["--log-format", "json"], &[(HOOK, "s:500us")]);
    sub.wait_for(Duration::from_secs(5), |m| m.topic == "sensorgate/it/devices/s/state" && m.json()["state"] == "up")
        .await;

    // Returns once the last byte is in the kernel's buffer, not once the gateway read it.
    write_all(&mut pty.master, &json_lines(0..N)).await;
    let (status, took) = stop(&mut gw, Duration::from_secs(12));
    assert!(status.success(), "{status:?}");
    eprintln!("leftover: exited {took:?} after SIGTERM");

    let mut received = BTreeSet::new();
    loop {
        let (m, _) = sub.wait_for(Duration::from_secs(10), |_| true).await;
        if m.topic == "sensorgate/it/devices/s/readings" {
            let v: Value = m.json();
            assert!(received.insert(v["n"].as_u64().unwrap()), "delivered twice: {}", m.text());
        } else if m.topic == "sensorgate/it/state" && m.text() == "offline" {
            break;
        }
    }
    let finals = gw.log_records("Final accounting.");
    assert_eq!(finals.len(), 1, "{}", gw.log_text());
    let fin = &finals[0];
    let counts = ["frames_in", "rejected", "readings", "delivered", "lost"].map(|k| n(fin, k));
    assert_eq!(counts, [N, 0, N, N, 0], "frames_in, rejected, readings, delivered, lost: {fin}");
    assert_eq!(received, (0..N).collect::<BTreeSet<_>>(), "the subscriber got every reading");
    drop(pty);
}
