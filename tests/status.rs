//! `sensorgate status` end to end: the real binary reads what a real gateway publishes on a
//! real mosquitto (pseudo-terminals for the serial devices), and gives up on dead brokers
//! within its timeout.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{json_lines, write_all, Gateway, Mosquitto, Subscriber};
use sensorgate::simulate::PtyLink;

/// Runs `sensorgate status <args>`: (exit status, stdout, stderr, how long it took).
async fn status(args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let began = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
            .arg("status")
            .args(&args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let took = began.elapsed();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
            took,
        )
    })
    .await
    .unwrap()
}

fn device_toml(name: &str, path: &Path, extra: &str) -> String {
    format!("[[device]]\nname = \"{name}\"\npath = \"{}\"\nframing = \"lines\"\n{extra}\n", path.display())
}

fn gateway_toml(id: &str, port: u16, devices: &str) -> String {
    format!("[gateway]\nid = \"{id}\"\nmetrics_interval = \"200ms\"\n[mqtt]\nport = {port}\n{devices}")
}

/// A sensor that keeps sending, 20 readings a second, until the test ends.
fn keep_sending(mut pty: PtyLink) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for n in 0.. {
            write_all(&mut pty.master, &json_lines(n..n + 1)).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// The cells of the table row of `device` (split on whitespace: the last error's words too).
fn row<'a>(table: &'a str, device: &str) -> Vec<&'a str> {
    let line = table.lines().find(|l| l.split_whitespace().next() == Some(device));
    line.unwrap_or_else(|| panic!("no row for {device} in:\n{table}")).split_whitespace().collect()
}

/// Waits until the device states (`states`: the latest of each, kept across calls) say what
/// `done` wants.
async fn wait_for_states(
    sub: &mut Subscriber,
    states: &mut BTreeMap<String, serde_json::Value>,
    done: impl Fn(&BTreeMap<String, serde_json::Value>) -> bool,
) {
    sub.wait_for(Duration::from_secs(15), |m| {
        let device = m.topic.split('/').nth(3).unwrap_or_default().to_string();
        states.insert(device, m.json());
        done(states)
    })
    .await;
}

fn state_of(states: &BTreeMap<String, serde_json::Value>, device: &str) -> String {
    states.get(device).and_then(|s| s["state"].as_str()).unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_device_shows_its_real_state_and_the_exit_status_says_whether_all_is_well() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let (good, gone, quiet) = (dir.path().join("good"), dir.path().join("gone"), dir.path().join("quiet"));
    let good_pty = PtyLink::create(&good).unwrap();
    let mut gone_pty = PtyLink::create(&gone).unwrap();
    let quiet_pty = PtyLink::create(&quiet).unwrap();
    let devices = device_toml("good", &good, "")
        + &device_toml("gone", &gone, "")
        + &device_toml("quiet", &quiet, "idle_timeout = \"1s\"");
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/devices/+/state").await;
    let gw = Gateway::start(dir.path(), &gateway_toml("it", broker.port, &devices));
    let _sending = keep_sending(good_pty);
    // `gone` sends 5 readings and one line that is not JSON, then is unplugged.
    let mut states = BTreeMap::new();
    wait_for_states(&mut sub, &mut states, |s| state_of(s, "gone") == "up").await;
    write_all(&mut gone_pty.master, &json_lines(0..5)).await;
    write_all(&mut gone_pty.master, b"not json\n").await;
    let mut metrics = Subscriber::connect(broker.port, "sensorgate/it/metrics").await;
    metrics.wait_for(Duration::from_secs(10), |m| m.json()["devices"]["gone"]["frames_in"] == 6).await;
    drop(gone_pty);
    wait_for_states(&mut sub, &mut states, |s| {
        !["", "up", "opening"].contains(&state_of(s, "gone").as_str())
            && state_of(s, "quiet") == "stale"
            && state_of(s, "good") == "up"
    })
    .await;
    let config = gw.config.to_str().unwrap();

    let (code, table, stderr, _) = status(&["--config", config]).await;
    assert_eq!(code, Some(1), "a device not up: exit 1\n{table}{stderr}");
    let first = table.lines().next().unwrap();
    assert!(first.starts_with("gateway it  online  up "), "{table}");
    assert!(first.contains("mqtt connected"), "{table}");
    let good_row = row(&table, "good");
    assert_eq!(good_row[1], "up", "{table}");
    assert!(good_row[3].parse::<f64>().unwrap() > 0.0, "good sends: a rate above 0\n{table}");
    assert_eq!(&good_row[good_row.len() - 2..], ["0", "-"], "no restarts, no error\n{table}");
    let gone_row = row(&table, "gone");
    assert!(["failed", "backoff", "opening"].contains(&gone_row[1]), "{table}");
    // Delivered 5, dropped 0, rejected 1 (bad_json 1).
    assert_eq!(&gone_row[4..8], ["5", "0", "1", "(bad_json"], "{table}");
    let quiet_row = row(&table, "quiet");
    assert_eq!(quiet_row[1], "stale", "{table}");
    assert_eq!(&quiet_row[4..8], ["0", "0", "0", "never"], "{table}");
    assert!(table.contains("problem(s): "), "{table}");
    assert!(table.contains("quiet is stale"), "{table}");

    let (code, json, stderr, _) = status(&["--config", config, "--json"]).await;
    assert_eq!(code, Some(1), "{json}{stderr}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(v["verdict"], "unhealthy");
    assert_eq!(v["exit"], 1);
    assert_eq!(v["gateway"]["id"], "it");
    assert_eq!(v["gateway"]["topic_prefix"], "sensorgate");
    assert_eq!(v["gateway"]["state"], "online");
    assert_eq!(v["gateway"]["mqtt_connected"], true);
    assert_eq!(v["gateway"]["version"], env!("CARGO_PKG_VERSION"), "from the metrics");
    assert!(v["gateway"]["uptime_s"].is_u64());
    assert!(v["gateway"]["queue_readings"].is_u64());
    assert!(v["gateway"]["metrics_messages"].as_u64().unwrap() >= 2, "it waits for two metrics messages: {v}");
    let devices = v["devices"].as_object().unwrap();
    assert_eq!(devices.keys().collect::<Vec<_>>(), ["gone", "good", "quiet"]);

    let good = &v["devices"]["good"];
    assert_eq!(good["state"], "up");
    assert!(good["readings_per_s"].as_f64().unwrap() > 0.0, "{good}");
    assert!(good["delivered"].as_u64().unwrap() > 0, "{good}");
    assert_eq!(good["dropped"], 0);
    assert_eq!(good["rejected"], 0);
    assert_eq!(good["top_rejected"], serde_json::Value::Null);
    assert!(good["last_reading_age_ms"].is_u64(), "{good}");
    assert_eq!(good["restarts"], 0);
    assert_eq!(good["last_error"], serde_json::Value::Null);
    assert!(good["since"].as_str().unwrap().ends_with('Z'), "{good}");

    let gone = &v["devices"]["gone"];
    assert!(["failed", "backoff", "opening"].contains(&gone["state"].as_str().unwrap()), "{gone}");
    assert_eq!(gone["readings_per_s"], 0.0, "unplugged: nothing new");
    assert_eq!(gone["readings"], 5);
    assert_eq!(gone["delivered"], 5);
    assert_eq!(gone["dropped"], 0);
    assert_eq!(gone["rejected"], 1);
    assert_eq!(gone["top_rejected"], serde_json::json!({"reason": "bad_json", "count": 1}));
    assert!(gone["last_reading_age_ms"].is_u64(), "{gone}");
    assert!(gone["restarts"].as_u64().unwrap() >= 1, "{gone}");
    assert!(gone["last_error"].is_string(), "{gone}");

    let quiet = &v["devices"]["quiet"];
    assert_eq!(quiet["state"], "stale");
    assert_eq!(quiet["readings_per_s"], 0.0);
    assert_eq!(quiet["delivered"], 0);
    assert_eq!(quiet["last_reading_age_ms"], serde_json::Value::Null, "never sent anything");
    assert!(quiet["last_error"].as_str().unwrap().contains("1s"), "the idle timeout: {quiet}");
    let problems: Vec<&str> = v["problems"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert!(problems.contains(&"quiet is stale"), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("gone is ")), "{problems:?}");
    assert!(!problems.iter().any(|p| p.starts_with("good")), "{problems:?}");

    // A gateway with only the healthy kind of device: exit 0, by config or by broker address.
    let solo_dir = common::tempdir();
    let solo = solo_dir.path().join("solo");
    let solo_pty = PtyLink::create(&solo).unwrap();
    let mut solo_sub = Subscriber::connect(broker.port, "sensorgate/solo/devices/+/state").await;
    // A fixed client id in the config: `status` must use its own, or it would kick the gateway.
    let solo_toml = gateway_toml("solo", broker.port, &device_toml("s", &solo, ""))
        .replace("[mqtt]\n", "[mqtt]\nclient_id = \"solo-gw\"\n");
    let mut solo_gw = Gateway::start(solo_dir.path(), &solo_toml);
    let _solo_sending = keep_sending(solo_pty);
    wait_for_states(&mut solo_sub, &mut BTreeMap::new(), |s| state_of(s, "s") == "up").await;
    let (code, table, stderr, _) = status(&["--config", solo_gw.config.to_str().unwrap()]).await;
    assert_eq!(code, Some(0), "online, every device up\n{table}{stderr}");
    assert_eq!(row(&table, "s")[1], "up", "{table}");
    assert!(table.contains("ok: online, every device up"), "{table}");
    let broker_addr = format!("127.0.0.1:{}", broker.port);
    let (code, json, stderr, _) = status(&["--broker", &broker_addr, "--gateway", "solo", "--json"]).await;
    assert_eq!(code, Some(0), "{json}{stderr}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["devices"]["s"]["state"], "up");
    assert!(v["devices"]["s"]["readings_per_s"].as_f64().unwrap() > 0.0, "{v}");

    // --watch redraws on every metrics message (piped: one table after another, no escape
    // codes) until SIGINT, then exits with the last verdict.
    let watch = Watch::start(&["--config", solo_gw.config.to_str().unwrap()]).read_until(3, is_table).await;
    let (code, watched) = watch.interrupt();
    assert_eq!(code, Some(0), "{watched}");
    assert!(watched.matches("gateway solo  online").count() >= 3, "{watched}");
    assert!(!watched.contains('\x1b'), "not a terminal: no escape codes\n{watched}");

    // The gateway never noticed: no reconnects, no client-id conflict.
    let mut solo_metrics = Subscriber::connect(broker.port, "sensorgate/solo/metrics").await;
    let (m, _) = solo_metrics.wait_for(Duration::from_secs(5), |_| true).await;
    let mqtt = &m.json()["mqtt"];
    assert_eq!((mqtt["reconnects"].as_u64(), mqtt["kicked_after_connect"].as_u64()), (Some(0), Some(0)), "{mqtt}");

    // Stopped: offline, exit 1 at once (no metrics are coming, none are waited for).
    solo_gw.signal(libc::SIGTERM);
    assert!(solo_gw.wait(Duration::from_secs(10)).success());
    let (code, table, stderr, took) = status(&["--broker", &broker_addr, "--gateway", "solo"]).await;
    assert_eq!(code, Some(1), "{table}{stderr}");
    assert!(table.starts_with("gateway solo  offline"), "{table}");
    assert_eq!(row(&table, "s")[1], "stopped", "the last state it published\n{table}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    drop(quiet_pty);
}

/// `sensorgate status --watch` with its stdout piped, read line by line.
struct Watch {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    /// Everything read so far.
    out: String,
}

impl Watch {
    fn start(args: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
            .args(["status", "--watch"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines, out: String::new() }
    }

    /// Reads until `count` lines for which `pred` holds have come, for at most 20 s (then the
    /// process is killed, which ends the read, and the test fails).
    async fn read_until(mut self, count: usize, pred: fn(&str) -> bool) -> Self {
        let pid = self.child.id() as i32;
        let read = tokio::task::spawn_blocking(move || {
            let mut seen = 0;
            while seen < count {
                let Some(Ok(line)) = self.lines.next() else { return Err(self) };
                seen += usize::from(pred(&line));
                self.out += &line;
                self.out.push('\n');
            }
            Ok(self)
        });
        match tokio::time::timeout(Duration::from_secs(20), read).await {
            Ok(Ok(Ok(w))) => w,
            Ok(Ok(Err(w))) => panic!("watch ended early:\n{}", w.out),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("status --watch did not print the expected lines within 20 s");
            }
        }
    }

    /// SIGINT, as Ctrl-C: (exit status, everything it printed).
    fn interrupt(mut self) -> (Option<i32>, String) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) }, 0);
        let status = self.child.wait().unwrap();
        (status.code(), self.out)
    }
}

fn is_table(line: &str) -> bool {
    line.starts_with("gateway ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_carries_on_after_the_broker_restarts() {
    let dir = common::tempdir();
    let mut broker = Mosquitto::start();
    let a = dir.path().join("a");
    let pty = PtyLink::create(&a).unwrap();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/w/devices/+/state").await;
    let toml = gateway_toml("w", broker.port, &device_toml("a", &a, ""))
        .replace("[mqtt]\n", "[mqtt]\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n");
    let gw = Gateway::start(dir.path(), &toml);
    let _sending = keep_sending(pty);
    wait_for_states(&mut sub, &mut BTreeMap::new(), |s| state_of(s, "a") == "up").await;
    drop(sub);
    let watch = Watch::start(&["--timeout", "5s", "--config", gw.config.to_str().unwrap()]);
    let watch = watch.read_until(2, is_table).await;
    broker.restart();
    let watch = watch.read_until(1, |l| l.starts_with("(connecting again in 2s")).await;
    let watch = watch.read_until(2, |l| l.starts_with("gateway w  online")).await;
    let (code, out) = watch.interrupt();
    assert_eq!(code, Some(0), "the last table: online, every device up\n{out}");
    let after = &out[out.find("(connecting again").unwrap()..];
    assert!(row(after, "a")[1] == "up", "{out}");
}

#[tokio::test]
async fn a_dead_broker_exits_2_within_the_timeout() {
    // Nothing listens on this port: refused at once.
    let refused = format!("127.0.0.1:{}", common::free_port());
    let (code, out, stderr, took) =
        status(&["--broker", &refused, "--gateway", "gw", "--timeout", "3s", "--json"]).await;
    assert_eq!(code, Some(2), "{out}{stderr}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["verdict"].as_str(), v["exit"].as_u64()), (Some("unreachable"), Some(2)), "{v}");
    assert!(stderr.contains("cannot read the gateway's status"), "{stderr}");

    // A broker that accepts TCP (the kernel does, from the backlog) but never reads or answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let (code, out, stderr, took) =
        status(&["--broker", &format!("127.0.0.1:{port}"), "--gateway", "gw", "--timeout", "2s"]).await;
    assert_eq!(code, Some(2), "{out}{stderr}");
    assert!(took < Duration::from_secs(4), "returns within --timeout + 2 s: {took:?}");
    assert!(stderr.contains("timed out"), "{stderr}");

    // The same through a config file, with its default timeout bounded by --timeout.
    let dir = common::tempdir();
    let config = dir.path().join("gw.toml");
    let devices = device_toml("a", &dir.path().join("a"), "");
    std::fs::write(&config, gateway_toml("gw", port, &devices)).unwrap();
    let (code, out, stderr, took) = status(&["--config", config.to_str().unwrap(), "--timeout", "2s"]).await;
    assert_eq!(code, Some(2), "{out}{stderr}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    drop(silent);
}
