//! End to end: the real binary, a real mosquitto, pseudo-terminals as serial ports.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{assert_identities, n, render, write_all, Gateway, Mosquitto, Msg, Subscriber};
use sensorgate::decode::Format;
use sensorgate::framing::Framing;
use sensorgate::simulate::{PtyLink, SimSpec};
use serde_json::Value;

const LINES_JSON: SimSpec = SimSpec { framing: Framing::Lines, format: Format::Json };
const LINES_KV: SimSpec = SimSpec { framing: Framing::Lines, format: Format::Kv };
const COBS: SimSpec = SimSpec { framing: Framing::Cobs, format: Format::Postcard };

fn device_toml(name: &str, path: &Path, spec: SimSpec, extra: &str) -> String {
    let framing = match spec.framing {
        Framing::Lines => "lines",
        Framing::Cobs => "cobs",
    };
    let format = match spec.format {
        Format::Json => "json",
        Format::Kv => "kv",
        Format::Postcard => "postcard",
    };
    format!(
        "[[device]]\nname = \"{name}\"\npath = \"{}\"\nframing = \"{framing}\"\nformat = \"{format}\"\n{extra}\n",
        path.display()
    )
}

fn gateway_toml(port: u16, devices: &str) -> String {
    format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"200ms\"\nshutdown_timeout = \"5s\"\n\
         [mqtt]\nport = {port}\nqos = 1\n\n{devices}"
    )
}

/// Waits for a metrics message for which `pred` holds for every listed device.
async fn wait_metrics(sub: &mut Subscriber, devices: &[&str], pred: impl Fn(&Value) -> bool) -> Value {
    let (m, _) = sub
        .wait_for(Duration::from_secs(30), |m| {
            m.topic == "sensorgate/it/metrics" && devices.iter().all(|d| pred(&m.json()["devices"][*d]))
        })
        .await;
    m.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_devices_in_mixed_framings_deliver_every_reading_in_order() {
    const N: u64 = 2000;
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;

    let specs = [("json-a", LINES_JSON), ("kv", LINES_KV), ("bin", COBS), ("json-b", LINES_JSON)];
    let mut ptys = Vec::new();
    let mut devices = String::new();
    for (name, spec) in specs {
        let link = dir.path().join(name);
        ptys.push(PtyLink::create(&link).unwrap());
        devices += &device_toml(name, &link, spec, "");
    }
    let mut gw = Gateway::start(dir.path(), &gateway_toml(broker.port, &devices));

    // All devices write at once, as fast as the gateway reads.
    let started = std::time::Instant::now();
    let streams = specs.iter().map(|(_, spec)| render(*spec, 0..N)).collect();
    let ptys = common::write_concurrently(ptys, streams).await;

    let mut readings: BTreeMap<String, Vec<Msg>> = BTreeMap::new();
    while readings.values().map(Vec::len).sum::<usize>() < (4 * N) as usize {
        let (m, _) = sub.wait_for(Duration::from_secs(30), |m| m.topic.ends_with("/readings")).await;
        let device = m.topic.split('/').nth(3).unwrap().to_string();
        readings.entry(device).or_default().push(m);
    }
    let elapsed = started.elapsed();
    eprintln!("{} readings through mosquitto in {elapsed:?} ({:.0}/s)", 4 * N, (4 * N) as f64 / elapsed.as_secs_f64());

    for (name, spec) in specs {
        let got = &readings[name];
        assert_eq!(got.len() as u64, N, "{name}: every reading delivered exactly once");
        for (i, m) in got.iter().enumerate() {
            let v = m.json();
            let i = i as u64;
            // Sensor fields arrive unchanged, in order; metadata under _gw only.
            match spec.format {
                Format::Postcard => {
                    assert_eq!(v["ch2"], i, "{name}: in order");
                    assert_eq!(v["_gw"]["sensor_seq"], i);
                }
                _ => assert_eq!(v["n"], i, "{name}: in order"),
            }
            assert_eq!(v["_gw"]["device"], name);
            assert_eq!(v["_gw"]["seq"], i + 1);
        }
    }
    // Pass-through keeps the sensor's exact bytes: `temp` with one decimal as sent.
    let first = readings["json-a"][0].text();
    assert!(first.starts_with("{\"n\":0,\"temp\":20.0,\"hum\":40.0,\"sent_us\":"), "{first}");

    let names: Vec<&str> = specs.iter().map(|(n, _)| *n).collect();
    let metrics = wait_metrics(&mut sub, &names, |d| d["delivered"] == N).await;
    for name in &names {
        let d = &metrics["devices"][name];
        assert_identities(d);
        assert_eq!((n(d, "readings"), n(d, "frames_in"), n(&d["rejected"], "total")), (N, N, 0), "{name}: {d}");
        assert_eq!(n(d, "dropped_oldest"), 0);
    }

    gw.signal(libc::SIGTERM);
    let status = gw.wait(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    sub.wait_for(Duration::from_secs(5), |m| m.topic == "sensorgate/it/state" && m.text() == "offline").await;
    drop(ptys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversize_and_corrupt_frames_are_counted_by_reason_and_survived() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let (jl, kl, cl) = (dir.path().join("j"), dir.path().join("k"), dir.path().join("c"));
    let (mut j, mut k, mut c) =
        (PtyLink::create(&jl).unwrap(), PtyLink::create(&kl).unwrap(), PtyLink::create(&cl).unwrap());
    let devices = device_toml("j", &jl, LINES_JSON, "max_frame = 64")
        + &device_toml("k", &kl, LINES_KV, "")
        + &device_toml("c", &cl, COBS, "");
    let _gw = Gateway::start(dir.path(), &gateway_toml(broker.port, &devices));

    // JSON lines: 2 good, 7 bad in 6 ways.
    let mut bytes = b"{\"ok\":1}\n".to_vec();
    bytes.extend_from_slice(b"not json\n");
    bytes.extend_from_slice(&[b'x'; 200]);
    bytes.push(b'\n');
    bytes.extend(std::iter::repeat_n(b'y', 100_000)); // no delimiter for 100 kB...
    bytes.push(b'\n'); // ...counted once
    bytes.extend_from_slice(b"{\"s\":\"\xff\xfe\"}\n");
    bytes.extend_from_slice(b"[1,2]\n");
    bytes.extend_from_slice(b"{\"_gw\":{\"device\":\"spoof\"}}\n");
    bytes.extend_from_slice(b"{\"a\":1\n");
    bytes.extend_from_slice(b"{\"ok\":2}\r\n");
    write_all(&mut j.master, &bytes).await;

    // key=value: 2 good, 3 bad.
    write_all(&mut k.master, b"a=1\na=NaN\nnovalue\na=1 a=2\nb=2 s=hello\n").await;

    // Binary: 2 good, 5 bad.
    let good = render(COBS, 0..1);
    let mut corrupt = render(COBS, 1..2);
    corrupt[3] ^= 0x10; // flips a payload bit: the CRC catches it
    let mut v2 = vec![0u8; sensorgate_wire::MAX_FRAME_LEN];
    let body = {
        let mut r = sensorgate_wire::ReadingV1::new(2);
        r.version = 2;
        let mut b = [0u8; sensorgate_wire::MAX_BODY_LEN];
        postcard::to_slice_crc32(&r, &mut b, sensorgate_wire::CRC.digest()).unwrap().to_vec()
    };
    let len = cobs::encode(&body, &mut v2);
    v2.truncate(len);
    v2.push(0);
    let mut bytes = good.clone();
    bytes.extend_from_slice(&corrupt);
    bytes.extend_from_slice(&[5, 1, 0]); // COBS code pointing past the frame
    bytes.extend_from_slice(&[3, b'A', b'B', 0]); // valid COBS, too short for a reading
    bytes.extend_from_slice(&v2); // valid CRC, unknown version
    bytes.extend_from_slice(&[1u8; 300]); // over max_frame (125 for cobs)
    bytes.push(0);
    bytes.extend_from_slice(&render(COBS, 3..4));
    write_all(&mut c.master, &bytes).await;

    // The good frames come through, with the sensor's fields; the spoofed _gw does not.
    let mut got = Vec::new();
    while got.len() < 6 {
        let (m, _) = sub.wait_for(Duration::from_secs(10), |m| m.topic.ends_with("/readings")).await;
        got.push(m.json());
    }
    assert!(got.iter().all(|v| v["_gw"]["device"] != "spoof"));
    assert!(
        got.iter().any(|v| v["ok"] == 2) && got.iter().any(|v| v["s"] == "hello") && got.iter().any(|v| v["ch2"] == 3)
    );

    // Each device's last frame is a good one: once it is delivered, every frame was judged.
    let metrics = wait_metrics(&mut sub, &["j", "k", "c"], |d| d["delivered"] == 2).await;
    let d = |name: &str| metrics["devices"][name].clone();
    let reasons = |name: &str| -> BTreeMap<String, u64> {
        d(name)["rejected"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, v)| *k != "total" && v.as_u64() != Some(0))
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
            .collect()
    };
    let expect = |pairs: &[(&str, u64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>();
    assert_eq!(
        reasons("j"),
        expect(&[("bad_json", 2), ("bad_utf8", 1), ("not_object", 1), ("oversize", 2), ("reserved_key", 1)])
    );
    assert_eq!(reasons("k"), expect(&[("bad_kv", 1), ("duplicate_key", 1), ("non_finite", 1)]));
    assert_eq!(
        reasons("c"),
        expect(&[("bad_cobs", 1), ("bad_crc", 1), ("bad_version", 1), ("oversize", 1), ("too_short", 1)])
    );
    for name in ["j", "k", "c"] {
        assert_identities(&d(name));
        assert_eq!(n(&d(name), "readings"), 2, "{name}");
        assert_eq!(d(name)["state"], "up", "{name} survived");
        assert_eq!(n(&d(name), "restarts"), 0, "{name}: garbage never ends a session");
    }
}

#[test]
fn check_names_file_key_and_fix_and_exits_78() {
    let dir = common::tempdir();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[gateway]\nid = \"a/b\"\n[mqtt]\nqos = 2\n[[device]]\nname = \"x\"\npath = \"/dev/ttyUSB0\"\nframing = \"lines\"\n",
    )
    .unwrap();
    let (status, _, err) = common::sensorgate("check", &path);
    assert_eq!(status, Some(78));
    assert!(err.contains(&*path.to_string_lossy()), "{err}");
    assert!(err.contains("gateway.id") && err.contains("mqtt.qos") && err.contains("fix:"), "{err}");
    // `run` refuses the same file with the same status, before touching any port.
    assert_eq!(common::sensorgate("run", &path).0, Some(78));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulate_command_feeds_the_gateway_through_a_linked_pty() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/devices/+/readings").await;
    let (kv, bin) = (dir.path().join("kv"), dir.path().join("bin"));
    let sim = |link: &Path, framing: &str, format: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sensorgate"))
            .args([
                "simulate",
                "--rate",
                "500",
                "--count",
                "50",
                "--start",
                "1000",
                "--framing",
                framing,
                "--format",
                format,
            ])
            .arg("--link")
            .arg(link)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut sims = [sim(&kv, "lines", "kv"), sim(&bin, "cobs", "json")];
    // The simulator creates the links; the gateway retries opening until they exist.
    let devices = device_toml("kv", &kv, LINES_KV, "") + &device_toml("bin", &bin, COBS, "");
    let _gw = Gateway::start(dir.path(), &gateway_toml(broker.port, &devices));
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for _ in 0..100 {
        let (m, _) = sub.wait_for(Duration::from_secs(20), |_| true).await;
        let v = m.json();
        let n = v.get("n").or_else(|| v.get("ch2")).and_then(Value::as_u64).unwrap();
        seen.entry(v["_gw"]["device"].as_str().unwrap().to_string()).or_default().push(n);
    }
    for (device, ns) in &seen {
        assert_eq!(ns, &(1000..1050).collect::<Vec<u64>>(), "{device}");
    }
    for s in &mut sims {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(s.id() as i32, libc::SIGTERM) };
        assert!(s.wait().unwrap().success());
    }
    assert!(!kv.exists(), "the simulator removes its link when it stops");
}

#[test]
#[allow(clippy::disallowed_methods)] // A plain test thread, not a tokio worker.
fn under_systemd_log_lines_carry_priorities_and_no_timestamps() {
    use std::os::unix::fs::MetadataExt;
    let dir = common::tempdir();
    let config = dir.path().join("gw.toml");
    // No broker and no port: enough to log a few lines at several levels.
    let text = gateway_toml(common::free_port(), &device_toml("a", &dir.path().join("none"), LINES_JSON, ""));
    std::fs::write(&config, text.replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"300ms\"")).unwrap();
    let log = dir.path().join("journal");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args(["run", "--config"])
        .arg(&config)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env_remove("RUST_LOG")
        .stderr(file)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.iter().all(|l| l.starts_with('<') && l.as_bytes()[2] == b'>'), "{text}");
    assert!(lines.iter().any(|l| l.starts_with("<6>") && l.contains("Gateway running.")), "{text}");
    assert!(lines.iter().any(|l| l.starts_with("<4>") && l.contains("cannot open")), "{text}");
    assert!(!text.contains("2026-") && !text.contains("\x1b["), "no timestamps, no colour: {text}");
}
