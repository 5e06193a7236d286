//! `sensorgate record` and `sensorgate simulate --replay`, the real binary end to end: a record
//! → replay round trip gives the gateway the same readings, and the committed captures
//! (tests/captures: a clean JSON sensor, a line read at the wrong baud rate, a sensor that
//! rebooted mid-frame) turn into the readings and counted rejections a field problem showed.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{n, write_all, Gateway, Mosquitto, Subscriber};
use sensorgate::simulate::PtyLink;

fn sensorgate(args: &[&str], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn config(dir: &Path, port: u16, device: &Path) -> String {
    format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"200ms\"\n[mqtt]\nport = {port}\n\
         [[device]]\nname = \"d\"\npath = \"{}\"\nframing = \"lines\"\nopen_timeout = \"200ms\"\n",
        device.display()
    ) + &format!("# {}\n", dir.display())
}

/// Replays `capture` into a gateway (at `speed`) and returns its readings (payloads) and its
/// final metrics for the device.
async fn replay_into_gateway(
    capture: &Path,
    speed: &str,
    expect_readings: u64,
) -> (Vec<serde_json::Value>, serde_json::Value) {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let link = dir.path().join("d");
    // The gateway first: it waits for the port, which the replay creates.
    let gw = Gateway::start(dir.path(), &config(dir.path(), broker.port, &link));
    let mut sim = sensorgate(
        &["simulate", "--replay", capture.to_str().unwrap(), "--speed", speed, "--link", link.to_str().unwrap()],
        &dir.path().join("replay.log"),
    );
    let waited = tokio::task::spawn_blocking(move || sim.wait().unwrap());
    // Everything until the replay has ended, and then one more metrics message 0.5 s later
    // (what the port still held is decoded by then).
    let mut msgs = Vec::new();
    let (m, earlier) = sub
        .wait_for(Duration::from_secs(30), |m| {
            m.topic == "sensorgate/it/metrics" && m.json()["devices"]["d"]["readings"] == expect_readings
        })
        .await;
    msgs.extend(earlier);
    msgs.push(m);
    let status = waited.await.unwrap();
    assert!(status.success(), "{}", std::fs::read_to_string(dir.path().join("replay.log")).unwrap());
    let ended = std::time::Instant::now();
    let last = loop {
        let (m, skipped) = sub.wait_for(Duration::from_secs(5), |m| m.topic == "sensorgate/it/metrics").await;
        msgs.extend(skipped);
        if ended.elapsed() >= Duration::from_millis(500) {
            break m;
        }
    };
    let readings: Vec<serde_json::Value> =
        msgs.iter().filter(|m| m.topic == "sensorgate/it/devices/d/readings").map(common::Msg::json).collect();
    drop(gw);
    (readings, last.json()["devices"]["d"].clone())
}

fn captures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/captures"))
}

/// Scenario: a sensor writes 50 readings, 20 ms apart; `record` captures them; `simulate
/// --replay` plays the capture to a gateway, which publishes the same 50 readings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_then_replay_gives_the_gateway_the_same_readings() {
    let dir = common::tempdir();
    let port = dir.path().join("sensor");
    let mut pty = PtyLink::create(&port).unwrap();
    let out = dir.path().join("capture.sgcap");
    let mut recorder = sensorgate(
        &["record", "--port", port.to_str().unwrap(), "--out", out.to_str().unwrap(), "--seconds", "2.5"],
        &dir.path().join("record.log"),
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut sent = Vec::new();
    for i in 0..50u64 {
        let line = format!("{{\"n\":{i},\"temp\":{}.5,\"ok\":{}}}\n", 20 + i % 7, i % 2 == 0);
        write_all(&mut pty.master, line.as_bytes()).await;
        sent.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = tokio::task::spawn_blocking(move || recorder.wait().unwrap()).await.unwrap();
    let log = std::fs::read_to_string(dir.path().join("record.log")).unwrap();
    assert!(status.success() && log.contains("Recording finished."), "{log}");

    let (readings, d) = replay_into_gateway(&out, "1", 50).await;
    let fields: Vec<serde_json::Value> = readings
        .into_iter()
        .map(|mut r| {
            r.as_object_mut().unwrap().remove("_gw");
            r
        })
        .collect();
    assert_eq!(fields, sent, "the same readings, in order");
    assert_eq!(n(&d["rejected"], "total"), 0, "{d}");
}

/// Scenario: the committed captures replayed as a field problem: a clean sensor gives its 40
/// readings; the wrong baud rate gives noise, every frame rejected and counted, no reading; a
/// sensor that rebooted mid-frame gives its 20 readings, and the torn frame and the boot banner
/// are rejected and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_captures_reproduce_their_field_problems() {
    let (readings, d) = replay_into_gateway(&captures().join("clean-json.sgcap"), "4", 40).await;
    assert_eq!(readings.len(), 40);
    assert_eq!(n(&d["rejected"], "total"), 0, "{d}");

    let (readings, d) = replay_into_gateway(&captures().join("wrong-baud-noise.sgcap"), "4", 0).await;
    assert!(readings.is_empty());
    assert!(n(&d, "frames_in") > 0 && n(&d["rejected"], "total") == n(&d, "frames_in"), "all rejected: {d}");
    eprintln!("wrong baud: {} frames, rejected {}", n(&d, "frames_in"), d["rejected"]);

    let (readings, d) = replay_into_gateway(&captures().join("reboot-mid-frame.sgcap"), "4", 20).await;
    let ns: Vec<u64> = readings.iter().map(|r| r["n"].as_u64().unwrap()).collect();
    assert_eq!(ns, (0..20).collect::<Vec<_>>());
    assert!(n(&d["rejected"], "total") >= 2, "the torn frame and the banner: {d}");
    eprintln!("reboot mid-frame: {} readings, rejected {}", readings.len(), d["rejected"]);
}

/// A file that is not a capture is refused with the reason, exit status 1.
#[test]
fn replaying_something_else_says_why() {
    let dir = common::tempdir();
    let file = dir.path().join("x.json");
    std::fs::write(&file, "{\"temp\":1}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args(["simulate", "--replay", file.to_str().unwrap(), "--link", dir.path().join("l").to_str().unwrap()])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a sensorgate capture"), "{stderr}");
}

/// Scenario: the running gateway records a device on request (`record` command, allowed by
/// name: it is off by default); the capture holds exactly the bytes the port sent meanwhile,
/// and `record` without being allowed is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_gateway_records_a_device_on_request() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let link = dir.path().join("d");
    let mut pty = PtyLink::create(&link).unwrap();
    let state = dir.path().join("state");
    let text = config(dir.path(), broker.port, &link).replacen(
        "[mqtt]",
        &format!(
            "state_dir = \"{}\"\n[commands]\nenabled = true\nallow = [\"record\", \"help\"]\n[mqtt]",
            state.display()
        ),
        1,
    );
    let gw = Gateway::start(dir.path(), &text);
    sub.wait_for(Duration::from_secs(10), |m| m.topic == "sensorgate/it/devices/d/state" && m.json()["state"] == "up")
        .await;
    common::publish(broker.port, "sensorgate/it/cmd/record", br#"{"id":"r1","device":"d","seconds":2}"#, false).await;
    let (r, _) = sub.wait_for(Duration::from_secs(10), |m| m.topic == "sensorgate/it/cmd/record/response").await;
    let r = r.json();
    assert_eq!(r["ok"], true, "{r}");
    let file = std::path::PathBuf::from(r["result"]["file"].as_str().unwrap());
    assert!(file.starts_with(state.join("captures")), "{r}");
    let mut sent = Vec::new();
    for i in 0..10 {
        let line = common::json_lines(i..i + 1);
        write_all(&mut pty.master, &line).await;
        sent.extend_from_slice(&line);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // After its two seconds the next read ends the recording; that read is not in it.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    write_all(&mut pty.master, &common::json_lines(10..11)).await;
    sub.wait_for(Duration::from_secs(10), |m| m.topic == "sensorgate/it/devices/d/readings" && m.json()["n"] == 10)
        .await;
    let mut capture =
        sensorgate::capture::CaptureReader::new(std::io::BufReader::new(std::fs::File::open(&file).unwrap())).unwrap();
    assert_eq!(capture.header.port, link.display().to_string());
    let mut got = Vec::new();
    while let Some(c) = capture.next_chunk().unwrap() {
        got.extend_from_slice(&c.bytes);
    }
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&sent), "the port's bytes while recording");
    assert!(gw.log_text().contains("Recording finished."), "{}", gw.log_text());
    drop(gw);

    // Off by default: commands on, no allow list.
    let text = config(dir.path(), broker.port, &link).replacen("[mqtt]", "[commands]\nenabled = true\n[mqtt]", 1);
    let gw = Gateway::start(dir.path(), &text);
    sub.wait_for(Duration::from_secs(10), |m| m.topic == "sensorgate/it/state" && m.text() == "online").await;
    common::publish(broker.port, "sensorgate/it/cmd/record", br#"{"id":"r2","device":"d"}"#, false).await;
    let (r, _) = sub
        .wait_for(Duration::from_secs(10), |m| m.topic == "sensorgate/it/cmd/record/response" && m.json()["id"] == "r2")
        .await;
    assert_eq!(r.json()["ok"], false, "{}", r.text());
    drop(gw);
}
