//! Store and forward against the real binary, mosquitto and pseudo-terminals: long outages,
//! SIGTERM and `kill -9` with the broker away, damaged spools, a disk that refuses writes,
//! catch-up pacing and the one-stream replay.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{assert_identities, json_lines, n, render, write_all, Gateway, Mosquitto, Msg, Rng, Subscriber};
use sensorgate::simulate::PtyLink;
use sensorgate::spool::record::{self, Scan};
use serde_json::Value;

fn config(port: u16, spool: &Path, spool_extra: &str, extra: &str, devices: &[(&str, &Path)]) -> String {
    let mut c = format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"200ms\"\nshutdown_timeout = \"3s\"\n\
         [mqtt]\nport = {port}\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n\
         [spool]\ndir = \"{}\"\nsync_interval = \"100ms\"\n{spool_extra}\n{extra}\n",
        spool.display()
    );
    for (name, path) in devices {
        c += &format!("[[device]]\nname = \"{name}\"\npath = \"{}\"\nframing = \"lines\"\n", path.display());
    }
    c
}

/// Writes `count` readings numbered from `start`, one every `every`.
fn stream(mut pty: PtyLink, start: u64, count: u64, every: Duration) -> tokio::task::JoinHandle<PtyLink> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        for i in start..start + count {
            tick.tick().await;
            write_all(&mut pty.master, &render(json_spec(), i..i + 1)).await;
        }
        pty
    })
}

fn json_spec() -> sensorgate::simulate::SimSpec {
    sensorgate::simulate::SimSpec {
        framing: sensorgate::framing::Framing::Lines,
        format: sensorgate::decode::Format::Json,
    }
}

/// The sensor's reading numbers in the spool's files, read as the gateway wrote them.
fn spooled_numbers(spool: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    let Ok(devices) = std::fs::read_dir(spool) else { return out };
    for d in devices.flatten() {
        let mut segs: Vec<PathBuf> = std::fs::read_dir(d.path())
            .map(|r| r.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "seg")).collect())
            .unwrap_or_default();
        segs.sort();
        for seg in segs {
            let bytes = std::fs::read(&seg).unwrap_or_default();
            let mut at = 8.min(bytes.len());
            while let Scan::Record { payload, len, .. } = record::scan(&bytes[at..]) {
                let v: Value = serde_json::from_slice(payload).unwrap();
                out.push(v["n"].as_u64().unwrap());
                at += len;
            }
        }
    }
    out
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "seg")).collect())
        .unwrap_or_default();
    v.sort();
    v
}

async fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metrics(m: &Msg) -> Option<Value> {
    (m.topic == "sensorgate/it/metrics").then(|| m.json())
}

/// Readings as the subscriber saw them, per device: (topic kind, n, replayed flag).
#[derive(Default)]
struct Seen {
    readings: BTreeMap<String, Vec<u64>>,
    backlog: BTreeMap<String, Vec<u64>>,
    /// Redeliveries by the broker itself (its restart with a persistent subscriber), not ours.
    broker_dups: u64,
}

impl Seen {
    /// Records a readings or backlog message; checks the payload is whole and marked right.
    fn add(&mut self, m: &Msg) {
        let backlog = m.topic.ends_with("/backlog");
        if !(backlog || m.topic.ends_with("/readings")) {
            return;
        }
        let v = m.json();
        let device = v["_gw"]["device"].as_str().expect("device in _gw").to_string();
        assert!(m.topic.contains(&format!("/devices/{device}/")), "{} carries {device}", m.topic);
        let replayed = v["_gw"]["replayed"] == true;
        assert_eq!(replayed, backlog, "replayed readings (only those) say so: {} {}", m.topic, m.text());
        let n = v["n"].as_u64().expect("the sensor's number");
        if m.dup {
            self.broker_dups += 1;
            return;
        }
        if backlog {
            self.backlog.entry(device).or_default().push(n);
        } else {
            self.readings.entry(device).or_default().push(n);
        }
    }

    fn all(&self, device: &str) -> Vec<u64> {
        let mut v: Vec<u64> =
            self.readings.get(device).into_iter().chain(self.backlog.get(device)).flatten().copied().collect();
        v.sort_unstable();
        v
    }
}

/// First occurrences in order are increasing: no reading overtakes an older one on its topic.
fn assert_in_order(what: &str, seq: &[u64]) {
    let mut seen = BTreeSet::new();
    let firsts: Vec<u64> = seq.iter().copied().filter(|n| seen.insert(*n)).collect();
    assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{what} out of order: {firsts:?}");
}

/// Collects until a metrics message satisfies `done` for every device.
async fn collect_until(
    sub: &mut Subscriber,
    seen: &mut Seen,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (m, _) = sub.wait_for(left.max(Duration::from_millis(1)), |_| true).await;
        seen.add(&m);
        if let Some(v) = metrics(&m) {
            if done(&v) {
                return v;
            }
        }
    }
}

fn settled(v: &Value, devices: &[&str], readings: u64) -> bool {
    devices.iter().all(|d| {
        let d = &v["devices"][d];
        d["readings"].as_u64() == Some(readings) && d["queued"] == 0 && d["in_flight"] == 0 && d["spooled"] == 0
    })
}

/// Scenario: a 3 s outage at 400 readings/s with a 100-reading memory queue. Nothing is written
/// while the broker keeps up; during the outage the spool takes everything; afterwards every
/// reading arrives exactly once (duplicates only for what was in flight, counted), the backlog
/// on its own topic and in order, live readings in order on theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_loses_nothing_and_replays_in_order_on_the_backlog_topic() {
    const PER_DEVICE: u64 = 1200;
    let dir = common::tempdir();
    let spool = dir.path().join("spool");
    let mut broker = Mosquitto::start_with(true);
    let mut sub = Subscriber::connect_with(broker.port, "sensorgate/it/#", Some("spool-sub")).await;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let (pty_a, pty_b) = (PtyLink::create(&a).unwrap(), PtyLink::create(&b).unwrap());
    let text = config(broker.port, &spool, "", "[queue]\nmax_readings = 100", &[("a", &a), ("b", &b)]);
    let gw = Gateway::start(dir.path(), &text);
    sub.wait_for(Duration::from_secs(5), |m| m.topic == "sensorgate/it/state" && m.text() == "online").await;

    let every = Duration::from_millis(5);
    let streams = [stream(pty_a, 0, PER_DEVICE, every), stream(pty_b, 0, PER_DEVICE, every)];
    let mut seen = Seen::default();
    // Steady state: readings flow, the spool writes nothing.
    let steady =
        collect_until(&mut sub, &mut seen, Duration::from_secs(5), |v| n(&v["devices"]["a"], "delivered") > 100).await;
    assert_eq!(n(&steady["spool"], "bytes_written"), 0, "{}", steady["spool"]);
    assert_eq!(n(&steady["spool"], "fsyncs"), 0);

    broker.stop_gracefully();
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.restart();
    collect_until(&mut sub, &mut seen, Duration::from_secs(40), |v| settled(v, &["a", "b"], PER_DEVICE)).await;
    // The spool deletes what was delivered at its next round (within a second).
    let last = collect_until(&mut sub, &mut seen, Duration::from_secs(5), |v| v["spool"]["bytes"] == 0).await;
    for s in streams {
        drop(s.await.unwrap());
    }
    let sp = &last["spool"];
    assert!(n(sp, "bytes_written") > 0 && n(sp, "fsyncs") > 0, "the outage went to disk: {sp}");
    assert_eq!((n(sp, "corrupt"), n(sp, "write_errors"), n(sp, "bytes"), n(sp, "readings")), (0, 0, 0, 0), "{sp}");
    for dev in ["a", "b"] {
        let d = &last["devices"][dev];
        assert_identities(d);
        assert_eq!(n(d, "dropped_oldest"), 0, "{dev}: {d}");
        assert_eq!(n(d, "delivered"), PER_DEVICE, "{dev}: {d}");
        let all = seen.all(dev);
        let unique: BTreeSet<u64> = all.iter().copied().collect();
        assert_eq!(unique, (0..PER_DEVICE).collect::<BTreeSet<_>>(), "{dev}: every reading arrived");
        let duplicates = all.len() as u64 - unique.len() as u64;
        assert!(
            duplicates <= n(d, "republished"),
            "{dev}: {duplicates} duplicates, {} republished",
            n(d, "republished")
        );
        let backlog = seen.backlog.get(dev).cloned().unwrap_or_default();
        assert!(backlog.len() > 500, "{dev}: the outage came back on the backlog topic ({})", backlog.len());
        assert_in_order(&format!("{dev} backlog"), &backlog);
        assert_in_order(&format!("{dev} readings"), &seen.readings[dev]);
        eprintln!(
            "{dev}: {} live, {} replayed, {duplicates} duplicates ({} republished)",
            seen.readings[dev].len(),
            backlog.len(),
            n(d, "republished")
        );
    }
    eprintln!("spool: {sp}; broker redeliveries (DUP) at the subscriber: {}", seen.broker_dups);
    drop(gw);
}

/// Runs the gateway with no broker, writes `count` readings, waits until the spool holds them
/// all, and stops it with SIGTERM. Returns its final accounting.
async fn spool_offline(dir: &Path, spool: &Path, device: &Path, count: u64, spool_extra: &str) -> Value {
    let nobody = common::free_port();
    let mut pty = PtyLink::create(device).unwrap();
    let mut gw = Gateway::start_with_args(
        dir,
        &config(nobody, spool, spool_extra, "", &[("d", device)]),
        &["--log-format", "json"],
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    write_all(&mut pty.master, &json_lines(0..count)).await;
    wait_until(Duration::from_secs(10), "the spool to hold every reading", || {
        spooled_numbers(spool).len() as u64 == count
    })
    .await;
    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(10)).success());
    let acct = gw.log_records("Final accounting.");
    assert_eq!(acct.len(), 1, "{}", gw.log_text());
    acct[0].clone()
}

/// Scenario: SIGTERM while the broker is away writes what is queued to the spool (nothing is
/// lost); the next start, with the broker back, delivers all of it, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_broker_away_keeps_everything_for_the_next_start() {
    const COUNT: u64 = 500;
    let dir = common::tempdir();
    let (spool, device) = (dir.path().join("spool"), dir.path().join("d"));
    let acct = spool_offline(dir.path(), &spool, &device, COUNT, "").await;
    assert_eq!((n(&acct, "readings"), n(&acct, "lost"), n(&acct, "spooled")), (COUNT, 0, COUNT), "{acct}");

    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let _pty = PtyLink::create(&device).unwrap();
    let mut gw = Gateway::start(dir.path(), &config(broker.port, &spool, "", "", &[("d", &device)]));
    let mut seen = Seen::default();
    let last = collect_until(&mut sub, &mut seen, Duration::from_secs(20), |v| {
        let d = &v["devices"]["d"];
        d["delivered"] == COUNT && d["spooled"] == 0 && d["in_flight"] == 0
    })
    .await;
    let d = &last["devices"]["d"];
    assert_identities(d);
    assert_eq!((n(d, "restored"), n(d, "readings"), n(d, "republished")), (COUNT, 0, 0), "{d}");
    assert_eq!(seen.backlog["d"], (0..COUNT).collect::<Vec<_>>(), "once each, in order, on the backlog topic");
    assert!(!seen.readings.contains_key("d"));
    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(10)).success());
    assert_eq!(segment_files(&spool.join("d")), Vec::<PathBuf>::new(), "delivered segments are deleted");
}

/// Scenario: `kill -9` at 22 random moments while the broker is away, each followed by a
/// restart. Every reading that was in the spool before a kill is delivered in the end; nothing
/// is delivered twice; every payload is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_never_loses_what_reached_the_spool() {
    let dir = common::tempdir();
    let (spool, device) = (dir.path().join("spool"), dir.path().join("d"));
    let nobody = common::free_port();
    let mut pty = PtyLink::create(&device).unwrap();
    let mut rng = Rng(0x5eed_5eed_9e37_79b9);
    let mut next = 0u64;
    let mut before_kill: BTreeSet<u64> = BTreeSet::new();
    for _ in 0..22 {
        let mut gw = Gateway::start(dir.path(), &config(nobody, &spool, "", "", &[("d", &device)]));
        let until = Instant::now() + Duration::from_millis(200 + rng.below(1000) as u64);
        while Instant::now() < until {
            write_all(&mut pty.master, &json_lines(next..next + 1)).await;
            next += 1;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        before_kill.extend(spooled_numbers(&spool));
        gw.signal(libc::SIGKILL);
        gw.wait(Duration::from_secs(5));
    }
    assert!(before_kill.len() > 500, "the kills caught a spool ({} readings in it)", before_kill.len());

    let broker = Mosquitto::start_on(nobody, false);
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let gw = Gateway::start(dir.path(), &config(nobody, &spool, "", "", &[("d", &device)]));
    let mut seen = Seen::default();
    let last = collect_until(&mut sub, &mut seen, Duration::from_secs(30), |v| {
        let d = &v["devices"]["d"];
        n(d, "restored") > 0 && d["spooled"] == 0 && d["in_flight"] == 0 && d["queued"] == 0
    })
    .await;
    let d = &last["devices"]["d"];
    assert_identities(d);
    let all = seen.all("d");
    let unique: BTreeSet<u64> = all.iter().copied().collect();
    let missing: Vec<u64> = before_kill.difference(&unique).copied().collect();
    assert!(missing.is_empty(), "in the spool before a kill, never delivered: {missing:?}");
    assert_eq!(all.len(), unique.len(), "no reading delivered twice ({} republished)", n(d, "republished"));
    assert_eq!(n(&last["spool"], "corrupt"), 0, "{}", last["spool"]);
    eprintln!("kill -9 ×22: {} readings in the spool before the kills, {} delivered", before_kill.len(), unique.len());
    drop(gw);
}

/// Scenario: a damaged spool — a torn tail, a flipped byte, a stray file in the spool and in
/// a device's directory. Each is counted; everything readable is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_spool_is_counted_and_the_rest_delivered() {
    const COUNT: u64 = 400;
    let dir = common::tempdir();
    let (spool, device) = (dir.path().join("spool"), dir.path().join("d"));
    // 16 KiB segments: the readings fill several.
    spool_offline(dir.path(), &spool, &device, COUNT, "max_bytes = \"128KiB\"").await;
    let segs = segment_files(&spool.join("d"));
    assert!(segs.len() >= 2, "{segs:?}");
    let pristine = spooled_numbers(&spool);
    assert_eq!(pristine, (0..COUNT).collect::<Vec<_>>());
    // Torn tail: the last record of the last segment loses its end.
    let last = segs.last().unwrap();
    let len = std::fs::metadata(last).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(last).unwrap().set_len(len - 7).unwrap();
    // A flipped byte in the middle of the first segment.
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&segs[0], bytes).unwrap();
    std::fs::write(spool.join("README"), "not ours").unwrap();
    std::fs::write(spool.join("d").join("core.1234"), "not ours either").unwrap();

    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let _pty = PtyLink::create(&device).unwrap();
    let gw = Gateway::start(dir.path(), &config(broker.port, &spool, "max_bytes = \"128KiB\"", "", &[("d", &device)]));
    let mut seen = Seen::default();
    let last = collect_until(&mut sub, &mut seen, Duration::from_secs(20), |v| {
        let d = &v["devices"]["d"];
        d["delivered"] == COUNT - 2 && d["spooled"] == 0 && d["in_flight"] == 0
    })
    .await;
    assert_identities(&last["devices"]["d"]);
    assert_eq!(n(&last["spool"], "corrupt"), 4, "torn tail, flipped byte, two stray files: {}", last["spool"]);
    let got = &seen.backlog["d"];
    assert_in_order("backlog", got);
    assert_eq!(got.len() as u64, COUNT - 2, "everything readable, once");
    assert!(!got.contains(&(COUNT - 1)), "the torn record is not delivered");
    assert!(std::fs::read_dir(&spool).unwrap().count() >= 2, "stray files are left alone");
    drop(gw);
}

/// Scenario: the disk refuses writes (here the file-size limit, as `LimitFSIZE=` or a full
/// disk would): the gateway says why, keeps running on memory (drop-oldest, counted) and
/// spools again when writes work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_refuses_writes_falls_back_to_memory_and_recovers() {
    let dir = common::tempdir();
    let (spool, device) = (dir.path().join("spool"), dir.path().join("d"));
    // The subscriber's session is made before the outage, so that it misses nothing the
    // gateway publishes the moment the broker is back (a subscriber that connects after the
    // broker starts races the gateway's reconnect).
    let mut broker = Mosquitto::start_with(true);
    let mut sub = Subscriber::connect_with(broker.port, "sensorgate/it/#", Some("efbig-sub")).await;
    broker.stop_gracefully();
    let mut pty = PtyLink::create(&device).unwrap();
    let text = config(broker.port, &spool, "max_bytes = \"1MiB\"", "[queue]\nmax_readings = 50", &[("d", &device)]);
    let gw = Gateway::start_configured(dir.path(), &text, &[], |c| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child before exec.
        unsafe {
            c.pre_exec(|| {
                let lim = libc::rlimit { rlim_cur: 8 * 1024, rlim_max: libc::RLIM_INFINITY };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    write_all(&mut pty.master, &json_lines(0..300)).await;
    wait_until(Duration::from_secs(10), "the spool's write error", || {
        gw.log_text().contains("Spool: cannot write to disk")
    })
    .await;
    assert!(gw.log_text().contains("File too large"), "the reason is given:\n{}", gw.log_text());
    // Space returns.
    let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: prlimit on our own child with a valid new limit and no old-limit pointer.
    assert_eq!(unsafe { libc::prlimit(gw.pid(), libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut()) }, 0);
    wait_until(Duration::from_secs(10), "the spool to resume", || {
        gw.log_text().contains("Spool: writing to disk again.")
    })
    .await;
    write_all(&mut pty.master, &json_lines(300..500)).await;
    wait_until(Duration::from_secs(10), "the new readings in the spool", || spooled_numbers(&spool).contains(&499))
        .await;

    broker.restart();
    let mut seen = Seen::default();
    let last = collect_until(&mut sub, &mut seen, Duration::from_secs(20), |v| settled(v, &["d"], 500)).await;
    let d = &last["devices"]["d"];
    assert_identities(d);
    assert!(n(d, "dropped_oldest") > 0, "memory only meanwhile: {d}");
    assert_eq!(n(d, "delivered") + n(d, "dropped_oldest"), 500, "{d}");
    let sp = &last["spool"];
    assert!(n(sp, "write_errors") >= 1 && sp["error"].is_null(), "{sp}");
    let after: BTreeSet<u64> = seen.all("d").into_iter().filter(|&x| x >= 300).collect();
    assert_eq!(after, (300..500).collect::<BTreeSet<_>>(), "everything after the recovery arrived");
    drop(gw);
}

/// Scenario: `replay_topic = "readings"` and `catch_up_rate = 200`: the spooled readings and
/// live ones that arrive during the replay form one ordered stream per device on the readings
/// topic, and the replay keeps to the rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ordered_stream_and_a_paced_catch_up() {
    const COUNT: u64 = 600;
    const LIVE: u64 = 100;
    const RATE: u64 = 200;
    let dir = common::tempdir();
    let (spool, device) = (dir.path().join("spool"), dir.path().join("d"));
    let acct = spool_offline(dir.path(), &spool, &device, COUNT, "replay_topic = \"readings\"").await;
    assert_eq!(n(&acct, "spooled"), COUNT);

    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/devices/#").await;
    let pty = PtyLink::create(&device).unwrap();
    let text = config(broker.port, &spool, "replay_topic = \"readings\"", "", &[("d", &device)]).replacen(
        "[mqtt]\n",
        &format!("[mqtt]\ncatch_up_rate = {RATE}\n"),
        1,
    );
    let gw = Gateway::start(dir.path(), &text);
    let live = stream(pty, COUNT, LIVE, Duration::from_millis(20));
    let mut arrivals: Vec<(u64, u64)> = Vec::new();
    while arrivals.len() < (COUNT + LIVE) as usize {
        let (m, _) = sub
            .wait_for(Duration::from_secs(30), |m| m.topic.ends_with("/readings") || m.topic.ends_with("/backlog"))
            .await;
        assert!(m.topic.ends_with("/readings"), "no backlog topic in one-stream mode: {}", m.topic);
        arrivals.push((m.json()["n"].as_u64().unwrap(), m.received_us));
    }
    drop(live.await.unwrap());
    let ns: Vec<u64> = arrivals.iter().map(|a| a.0).collect();
    assert_eq!(ns, (0..COUNT + LIVE).collect::<Vec<_>>(), "backlog first, then live, one ordered stream");
    // Half a second of burst, then at most RATE per second.
    let span_s = (arrivals[COUNT as usize - 1].1 - arrivals[0].1) as f64 / 1e6;
    let least = (COUNT - RATE / 2) as f64 / RATE as f64;
    assert!(span_s >= least * 0.95, "{COUNT} replayed in {span_s:.2} s; at {RATE}/s it takes at least {least:.2} s");
    for w in arrivals.windows(RATE as usize + RATE as usize / 2 + 10) {
        assert!(w.last().unwrap().1 - w[0].1 >= 1_000_000, "more than the rate and its burst within a second");
    }
    eprintln!("{COUNT} replayed at {RATE}/s in {span_s:.2} s");
    drop(gw);
}
