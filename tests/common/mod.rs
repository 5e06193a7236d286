//! Real parts for end-to-end tests: a mosquitto process on 127.0.0.1 and a free port, the
//! real `sensorgate` binary, pseudo-terminals standing in for serial ports, and an MQTT
//! subscriber that timestamps what the broker delivers.
#![allow(dead_code)]
// Each test binary uses a different part of the harness.
// Sync helpers wait on processes, and the subscriber owns its own event loop: neither is the
// gateway code these lints protect.
#![allow(clippy::disallowed_methods)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::sync::mpsc;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn mosquitto_binary() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("mosquitto is not installed: run ./scripts/test.sh (it installs it) or apt-get install mosquitto");
}

/// A mosquitto broker on 127.0.0.1, killed on drop.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    persistent: bool,
    /// More configuration (e.g. a TLS listener), appended after the plain listener.
    extra: String,
}

impl Mosquitto {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// With `persistent`, sessions and queued messages survive a graceful stop
    /// ([`stop_gracefully`](Self::stop_gracefully)): a persistent subscriber misses nothing.
    pub fn start_with(persistent: bool) -> Self {
        Self::start_custom(persistent, String::new())
    }

    /// On a given port (a gateway was told to use it before the broker existed).
    pub fn start_on(port: u16, persistent: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Self { child: None, port, dir, persistent, extra: String::new() };
        m.restart();
        m
    }

    /// With extra configuration lines, e.g. a second (TLS) listener.
    pub fn start_custom(persistent: bool, extra: String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Self { child: None, port: free_port(), dir, persistent, extra };
        m.restart();
        m
    }

    /// Starts (again) on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let conf = self.dir.path().join("mosquitto.conf");
        let persistence = if self.persistent {
            // mosquitto started as root drops to its own user: let that user write its database.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
            format!("persistence true\npersistence_location {}/\nautosave_interval 0\n", self.dir.path().display())
        } else {
            "persistence false\n".to_string()
        };
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\n{persistence}max_queued_messages 1000000\nset_tcp_nodelay true\n{}\n",
                self.port, self.extra
            ),
        )
        .unwrap();
        // Appended across restarts: a failing test prints the whole of it (see Drop).
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("mosquitto.log")).unwrap();
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start listening on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL: the broker vanishes.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM: the broker saves its state (when persistent) and exits.
    pub fn stop_gracefully(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
        // Why a broker closed a connection is only in its log: show it when the test failed.
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default();
            eprintln!("---- mosquitto log (port {}) ----\n{log}", self.port);
        }
    }
}

/// The real binary, run with a config file; killed on drop if still running.
pub struct Gateway {
    child: Child,
    pub log: PathBuf,
    pub config: PathBuf,
}

impl Gateway {
    pub fn start(dir: &Path, config_toml: &str) -> Self {
        Self::start_with_args(dir, config_toml, &[])
    }

    /// With extra command-line arguments (e.g. `--log-format json`).
    pub fn start_with_args(dir: &Path, config_toml: &str, args: &[&str]) -> Self {
        Self::start_with_env(dir, config_toml, args, &[])
    }

    /// With extra environment variables too (e.g. the binary's test hooks).
    pub fn start_with_env(dir: &Path, config_toml: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_configured(dir, config_toml, args, |c| {
            c.envs(env.iter().copied());
        })
    }

    /// With the command adjusted by `configure` before it starts (limits, say).
    pub fn start_configured(
        dir: &Path,
        config_toml: &str,
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        let config = dir.join("sensorgate.toml");
        std::fs::write(&config, config_toml).unwrap();
        let log = dir.join("gateway.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_sensorgate"));
        command
            .args(args)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        configure(&mut command);
        let child = command.spawn().expect("start sensorgate");
        Self { child, log, config }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "gateway did not exit within {timeout:?}; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `fields` of every JSON log record whose message is `message` (needs `--log-format json`).
    pub fn log_records(&self, message: &str) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == message)
            .map(|v| v["fields"].clone())
            .collect()
    }
}

/// utime + stime of a process, in seconds (from /proc).
pub fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// A `VmRSS`/`VmHWM`-style line of /proc/<pid>/status, in MiB.
pub fn memory_mib(pid: i32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- gateway log ----\n{}", self.log_text());
        }
    }
}

/// One message as the subscriber received it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// When the subscriber received it, µs since the epoch.
    pub received_us: u64,
    /// The broker's redelivery of a message it sent before (after its restart, say).
    pub dup: bool,
}

impl Msg {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!("{} is not JSON ({e}): {:?}", self.topic, String::from_utf8_lossy(&self.payload))
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

/// An MQTT subscriber; messages arrive on `rx` in broker order.
pub struct Subscriber {
    pub rx: mpsc::Receiver<Msg>,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Connects and subscribes; returns once the broker acknowledged the subscription.
    pub async fn connect(port: u16, filter: &str) -> Self {
        Self::connect_with(port, filter, None).await
    }

    /// With `persistent_id`, a persistent session under that client id: after a broker restart
    /// (with persistence) the broker delivers what it queued meanwhile.
    pub async fn connect_with(port: u16, filter: &str, persistent_id: Option<&str>) -> Self {
        let id = persistent_id.map_or_else(|| format!("test-sub-{}", free_port()), str::to_string);
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_clean_session(persistent_id.is_none())
            .set_inflight(1000);
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let (tx, rx) = mpsc::channel(1_000_000);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (resub, filter) = (client.clone(), filter.to_string());
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut first = true;
            loop {
                match eventloop.poll().await {
                    // After a broker restart without our session, subscribe again.
                    Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                        if std::env::var_os("SG_TEST_DEBUG").is_some() {
                            eprintln!("subscriber connected, session_present={}", ack.session_present);
                        }
                        if !std::mem::take(&mut first) && !ack.session_present {
                            let _ = resub.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let msg = Msg {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            received_us: now_us(),
                            dup: p.dup,
                        };
                        if tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // The broker may be restarted by the test: keep trying.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx).await.expect("SUBACK in time").unwrap();
        Self { rx, client, task }
    }

    /// The next message for which `pred` holds, skipping others (which are returned too).
    pub async fn wait_for(&mut self, timeout: Duration, mut pred: impl FnMut(&Msg) -> bool) -> (Msg, Vec<Msg>) {
        let mut skipped = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if pred(&m) => return (m, skipped),
                Ok(Some(m)) => skipped.push(m),
                Ok(None) => panic!("subscriber closed"),
                Err(_) => panic!(
                    "no matching message within {timeout:?}; last seen: {:?}",
                    skipped.iter().rev().take(5).map(|m| (&m.topic, m.text())).collect::<Vec<_>>()
                ),
            }
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
        let _ = &self.client;
    }
}

/// Writes all of `bytes` to a pseudo-terminal master.
pub async fn write_all(master: &mut tokio_serial::SerialStream, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt;
    master.write_all(bytes).await.unwrap();
    master.flush().await.unwrap();
}

/// A temp dir that outlives the test's early returns and is removed at the end.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Publishes one message at QoS 1 from a throwaway client and waits for the broker's ack.
pub async fn publish(port: u16, topic: &str, payload: &[u8], retain: bool) {
    let mut opts = MqttOptions::new(format!("test-pub-{}", free_port()), "127.0.0.1", port);
    // Large enough for the oversized messages some tests send on purpose.
    opts.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 4);
    client.publish(topic, QoS::AtLeastOnce, retain, payload.to_vec()).await.unwrap();
    let acked = async {
        loop {
            if let Event::Incoming(Incoming::PubAck(_)) = eventloop.poll().await.unwrap() {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), acked).await.expect("PUBACK in time");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
}

/// Readings numbered `range` in `spec`'s encoding, stamped now.
pub fn render(spec: sensorgate::simulate::SimSpec, range: std::ops::Range<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for n in range {
        spec.render(n, now_us(), &mut out);
    }
    out
}

/// JSON-lines readings numbered `range`.
pub fn json_lines(range: std::ops::Range<u64>) -> Vec<u8> {
    use sensorgate::decode::Format;
    use sensorgate::framing::Framing;
    render(sensorgate::simulate::SimSpec { framing: Framing::Lines, format: Format::Json }, range)
}

/// A counter from a metrics object.
pub fn n(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// Both accounting identities of DESIGN.md, checked from the outside on one device's metrics.
pub fn assert_identities(dev: &serde_json::Value) {
    let rejected = n(&dev["rejected"], "total");
    assert_eq!(n(dev, "frames_in"), n(dev, "readings") + rejected, "frames_in = readings + rejected: {dev}");
    assert_eq!(
        n(dev, "readings") + n(dev, "restored"),
        n(dev, "delivered")
            + n(dev, "dropped_oldest")
            + n(dev, "expired")
            + n(dev, "poisoned")
            + n(dev, "queued")
            + n(dev, "in_flight")
            + n(dev, "spooled"),
        "readings + restored = delivered + dropped + expired + poisoned + queued + in_flight + spooled: {dev}"
    );
    let by_reason: u64 = dev["rejected"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "total")
        .map(|(_, v)| v.as_u64().unwrap())
        .sum();
    assert_eq!(by_reason, rejected, "rejected.total is the sum of the reasons: {dev}");
}

/// Runs `sensorgate <command> --config <path>` to completion: (exit status, stdout, stderr).
pub fn sensorgate(command: &str, path: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args([command, "--config"])
        .arg(path)
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// xorshift64*: seeded, so generated garbage (and so a test or bench) is the same every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next() >> 32) % n as u64) as usize
    }
}

/// Writes each stream to its port, all ports at once; returns the ports once everything is
/// written (the gateway reads as it goes: the pseudo-terminal buffer is small).
pub async fn write_concurrently(
    ptys: Vec<sensorgate::simulate::PtyLink>,
    streams: Vec<Vec<u8>>,
) -> Vec<sensorgate::simulate::PtyLink> {
    let tasks: Vec<_> = ptys
        .into_iter()
        .zip(streams)
        .map(|(mut pty, bytes)| {
            tokio::spawn(async move {
                write_all(&mut pty.master, &bytes).await;
                pty
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(tokio::time::timeout(Duration::from_secs(20), t).await.expect("written in time").unwrap());
    }
    out
}

// ---- Brokers we did not write (tests/interop.rs) -------------------------------------------
//
// scripts/test.sh installs them: amqtt (PyPI) into a venv and aedes (npm) into a directory,
// both under `$SG_INTEROP_DIR` (default `~/.cache/sensorgate/interop`); rumqttd (crates.io)
// is a dev-dependency that the test binary itself runs in a child process
// (`run_rumqttd_if_asked`).

/// An MQTT broker the gateway can lose and find again on the same port.
pub trait Broker: Send {
    /// Where MQTT 3.1.1 clients (the test's subscriber) connect.
    fn port(&self) -> u16;
    /// Where the gateway connects with MQTT `version` (3 for 3.1.1, or 5). rumqttd serves the
    /// two on separate listeners; the others on one.
    fn port_for(&self, version: u8) -> u16 {
        let _ = version;
        self.port()
    }
    /// SIGKILL: the broker vanishes with everything it held in memory.
    fn kill(&mut self);
    /// Starts again on the same port (killing it first if it runs).
    fn restart(&mut self);
}

impl Broker for Mosquitto {
    fn port(&self) -> u16 {
        self.port
    }
    fn kill(&mut self) {
        self.stop();
    }
    fn restart(&mut self) {
        Mosquitto::restart(self);
    }
}

/// The broker implementations the interoperability tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Mosquitto,
    /// amqtt 0.12 (Python, asyncio): MQTT 3.1.1 only.
    Amqtt,
    /// aedes 1.2 (Node.js): MQTT 3.1.1 only.
    Aedes,
    /// rumqttd 0.20 (Rust), run by the test binary in a child process.
    Rumqttd,
}

/// Where scripts/test.sh installed amqtt and aedes (the same default as there).
pub fn interop_dir() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("SG_INTEROP_DIR").unwrap_or_else(|| {
        let cache = var("XDG_CACHE_HOME").unwrap_or_else(|| var("HOME").unwrap_or_default().join(".cache"));
        cache.join("sensorgate/interop")
    })
}

impl BrokerKind {
    /// Starts this broker on 127.0.0.1 and a free port. `Err` says what is missing and how to
    /// install it; see [`start_or_skip`](Self::start_or_skip).
    pub fn start(self) -> Result<Box<dyn Broker>, String> {
        let launch = match self {
            BrokerKind::Mosquitto => return Ok(Box::new(Mosquitto::start())),
            BrokerKind::Amqtt => {
                let bin = interop_dir().join("amqtt-venv/bin/amqtt");
                if !bin.exists() {
                    return Err(format!("amqtt is not installed at {}", bin.display()));
                }
                Launch::Amqtt(bin)
            }
            BrokerKind::Aedes => {
                let dir = interop_dir().join("aedes");
                if !dir.join("node_modules/aedes/package.json").exists() {
                    return Err(format!("aedes is not installed under {}", dir.display()));
                }
                Launch::Aedes(dir)
            }
            BrokerKind::Rumqttd => Launch::Rumqttd,
        };
        // Both listeners held at once, so the two ports differ.
        let pair = [TcpListener::bind("127.0.0.1:0").unwrap(), TcpListener::bind("127.0.0.1:0").unwrap()];
        let [port, port5] = pair.map(|l| l.local_addr().unwrap().port());
        let mut b = BrokerProcess { launch, child: None, port, port5, dir: tempfile::tempdir().unwrap() };
        b.restart();
        Ok(Box::new(b))
    }

    /// Starts the broker, or — outside CI only — says why not and returns `None` so the caller
    /// can return early. In CI (`CI=true`) a missing broker fails the test: nothing is skipped
    /// silently there.
    pub fn start_or_skip(self) -> Option<Box<dyn Broker>> {
        match self.start() {
            Ok(b) => Some(b),
            Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("{self:?}: {why}; .ci/run installs it through ./scripts/test.sh")
            }
            Err(why) => {
                eprintln!("SKIPPED ({self:?}): {why}; run ./scripts/test.sh once to install it");
                None
            }
        }
    }
}

enum Launch {
    Amqtt(PathBuf),
    Aedes(PathBuf),
    Rumqttd,
}

/// A broker in a child process on a fixed port, killed on drop.
struct BrokerProcess {
    launch: Launch,
    child: Option<Child>,
    port: u16,
    /// rumqttd's MQTT 5 listener.
    port5: u16,
    dir: tempfile::TempDir,
}

impl BrokerProcess {
    fn command(&self) -> Command {
        match &self.launch {
            Launch::Amqtt(bin) => {
                // No persistence plugin (retained messages and sessions live in memory, as in
                // the other brokers here) and no $SYS publisher.
                let conf = self.dir.path().join("amqtt.yaml");
                std::fs::write(
                    &conf,
                    format!(
                        "listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{}\n\
                         plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n",
                        self.port
                    ),
                )
                .unwrap();
                let mut c = Command::new(bin);
                c.arg("-c").arg(conf);
                c
            }
            Launch::Aedes(dir) => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/brokers/aedes.mjs");
                let mut c = Command::new("node");
                c.arg(script).arg(self.port.to_string()).arg(dir);
                c
            }
            Launch::Rumqttd => {
                let mut c = Command::new(std::env::current_exe().unwrap());
                c.args(["--exact", RUMQTTD_TEST, "--ignored", "--nocapture", "--test-threads=1"])
                    .env(RUMQTTD_PORT_ENV, format!("{},{}", self.port, self.port5));
                c
            }
        }
    }
}

impl Broker for BrokerProcess {
    fn port(&self) -> u16 {
        self.port
    }

    fn port_for(&self, version: u8) -> u16 {
        match (&self.launch, version) {
            (Launch::Rumqttd, 5) => self.port5,
            _ => self.port,
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        let log_path = self.dir.path().join("broker.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        let mut child = self
            .command()
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the broker");
        // Python and Node take a moment to start; a broker that dies at once says why.
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "broker exited ({status}) before listening; its log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "broker did not start listening on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- broker log ----\n{}",
                std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
            );
        }
    }
}

/// The name of the (ignored) test through which a test binary runs rumqttd in a child process;
/// a test binary that starts [`BrokerKind::Rumqttd`] defines it as
/// `#[test] #[ignore] fn rumqttd_broker() { common::run_rumqttd_if_asked() }`.
pub const RUMQTTD_TEST: &str = "rumqttd_broker";
const RUMQTTD_PORT_ENV: &str = "SG_RUMQTTD_PORT";

/// Runs rumqttd (`$SG_RUMQTTD_PORT` = `<MQTT 3.1.1 port>,<MQTT 5 port>` on 127.0.0.1) until
/// killed, when started by [`BrokerKind::Rumqttd`]; returns at once otherwise.
/// A separate process, because rumqttd cannot be stopped in-process and the tests kill it.
pub fn run_rumqttd_if_asked() {
    let Some((port, port5)) = std::env::var(RUMQTTD_PORT_ENV).ok().and_then(|p| {
        let (a, b) = p.split_once(',')?;
        Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?))
    }) else {
        return;
    };
    // rumqttd's own configuration format (its rumqttd.toml); `dynamic_filters` lets a client
    // publish to a topic before anyone has subscribed to it.
    let listener = |name: &str, port: u16| {
        format!(
            "[{name}.1]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nnext_connection_delay_ms = 1\n\
             [{name}.1.connections]\nconnection_timeout_ms = 5000\nmax_payload_size = 262144\n\
             max_inflight_count = 200\ndynamic_filters = true\n"
        )
    };
    let text = format!(
        "id = 0\n[router]\nmax_connections = 64\nmax_outgoing_packet_count = 1000\n\
         max_segment_size = 16777216\nmax_segment_count = 4\n{}{}",
        listener("v4", port),
        listener("v5", port5)
    );
    let config: rumqttd::Config = toml::from_str(&text).expect("rumqttd config");
    let result = rumqttd::Broker::new(config).start();
    panic!("rumqttd stopped: {result:?}");
}

/// `n` pseudo-terminals `d0`…`d<n-1>` in `dir`, and the `[[device]]` tables (JSON lines) that
/// read them.
pub fn line_devices(dir: &Path, n: usize) -> (Vec<sensorgate::simulate::PtyLink>, String) {
    let mut tables = String::new();
    let ptys = (0..n)
        .map(|i| {
            let link = dir.join(format!("d{i}"));
            tables += &format!("[[device]]\nname = \"d{i}\"\npath = \"{}\"\nframing = \"lines\"\n", link.display());
            sensorgate::simulate::PtyLink::create(&link).unwrap()
        })
        .collect();
    (ptys, tables)
}

/// One simulated JSON-lines sensor per port, each writing `rate` readings/s until aborted.
pub fn json_sensors(ptys: Vec<sensorgate::simulate::PtyLink>, rate: u32) -> Vec<tokio::task::JoinHandle<()>> {
    let spec = sensorgate::simulate::SimSpec {
        framing: sensorgate::framing::Framing::Lines,
        format: sensorgate::decode::Format::Json,
    };
    ptys.into_iter()
        .map(|mut pty| {
            tokio::spawn(async move {
                let _ = sensorgate::simulate::run(spec, &mut pty.master, rate, 0, 0).await;
            })
        })
        .collect()
}

/// The marker `simulate --modbus` prints after the config.
pub const SERVING: &str = "# Serving until Ctrl-C or SIGTERM.";

/// `sensorgate simulate <args>` running; killed on drop if still running.
pub struct Simulator {
    pub child: std::process::Child,
    stderr: std::path::PathBuf,
}

impl Simulator {
    /// Starts it and returns it with everything it printed on stdout up to [`SERVING`].
    pub async fn start(dir: &Path, args: &[&str]) -> (Self, String) {
        let stderr = dir.join("simulate.log");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sensorgate"))
            .arg("simulate")
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start sensorgate simulate");
        let stdout = child.stdout.take().unwrap();
        // Ends at the marker, or at EOF if the simulator exits first.
        let read = tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let line = line.unwrap();
                text += &line;
                text += "\n";
                if line == SERVING {
                    break;
                }
            }
            text
        });
        let sim = Self { child, stderr };
        let text = tokio::time::timeout(Duration::from_secs(20), read).await.expect("the config in time").unwrap();
        assert!(text.ends_with(&format!("{SERVING}\n")), "simulate printed:\n{text}\nlog:\n{}", sim.log());
        (sim, text)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
