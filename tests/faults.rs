//! Faults, end to end: the real binary, a real mosquitto, pseudo-terminals. Every test checks
//! the accounting identities, counting at both ends.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    assert_identities, cpu_seconds, json_lines as render, memory_mib, n, write_all, Gateway, Mosquitto, Msg, Subscriber,
};
use sensorgate::simulate::PtyLink;
use serde_json::Value;
use tokio::io::AsyncReadExt;

fn config(port: u16, extra: &str, devices: &[(&str, &Path)]) -> String {
    let mut c = format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"200ms\"\nshutdown_timeout = \"3s\"\n\
         [mqtt]\nport = {port}\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n{extra}\n"
    );
    for (name, path) in devices {
        c += &format!("[[device]]\nname = \"{name}\"\npath = \"{}\"\nframing = \"lines\"\n", path.display());
    }
    c
}

async fn metrics_where(sub: &mut Subscriber, timeout: Duration, pred: impl Fn(&Value) -> bool) -> (Value, Vec<Msg>) {
    let (m, skipped) = sub.wait_for(timeout, |m| m.topic == "sensorgate/it/metrics" && pred(&m.json())).await;
    (m.json(), skipped)
}

fn device_state(m: &Msg, device: &str) -> Option<String> {
    (m.topic == format!("sensorgate/it/devices/{device}/state"))
        .then(|| m.json()["state"].as_str().unwrap().to_string())
}

/// Writes `count` readings numbered from `start`, one every `every`.
fn stream(mut pty: PtyLink, start: u64, count: u64, every: Duration) -> tokio::task::JoinHandle<PtyLink> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        for i in start..start + count {
            tick.tick().await;
            write_all(&mut pty.master, &render(i..i + 1)).await;
        }
        pty
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplugged_device_is_reopened_when_it_returns_and_others_keep_flowing() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let pty_a = PtyLink::create(&a).unwrap();
    let pty_b = PtyLink::create(&b).unwrap();
    let gw = Gateway::start(dir.path(), &config(broker.port, "", &[("a", &a), ("b", &b)]));

    // b streams through the whole test; a sends 100, is unplugged, comes back, sends 100 more.
    let b_stream = stream(pty_b, 0, 300, Duration::from_millis(20));
    let mut pty_a = stream(pty_a, 0, 100, Duration::from_millis(2)).await.unwrap();
    let (m, _) = metrics_where(&mut sub, Duration::from_secs(10), |m| m["devices"]["a"]["delivered"] == 100).await;
    let b_before = n(&m["devices"]["b"], "delivered");

    // Unplug: the adapter's device node disappears and the line reads as EOF/EIO.
    drop(pty_a);
    let (_, skipped) =
        sub.wait_for(Duration::from_secs(5), |m| device_state(m, "a").as_deref() == Some("failed")).await;
    assert!(skipped.iter().any(|m| device_state(m, "a").as_deref() == Some("backoff")), "session end is reported");
    let gone = Instant::now();
    let cpu0 = cpu_seconds(gw.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_gone = cpu_seconds(gw.pid()) - cpu0;
    let (m, _) = metrics_where(&mut sub, Duration::from_secs(5), |_| true).await;
    assert!(n(&m["devices"]["b"], "delivered") > b_before, "b kept flowing while a was gone");
    assert_eq!(m["devices"]["a"]["state"], "failed");

    // Replug at the same path: reopened without restarting the process.
    pty_a = PtyLink::create(&a).unwrap();
    let replugged = Instant::now();
    sub.wait_for(Duration::from_secs(10), |m| device_state(m, "a").as_deref() == Some("up")).await;
    let pty_a = stream(pty_a, 100, 100, Duration::from_millis(2)).await.unwrap();
    let (first, _) = sub.wait_for(Duration::from_secs(10), |m| m.topic.ends_with("/a/readings")).await;
    let recovery = replugged.elapsed();
    assert_eq!(first.json()["n"], 100);
    assert_eq!(first.json()["_gw"]["seq"], 101, "the gateway's sequence continues across the unplug");

    let (m, _) = metrics_where(&mut sub, Duration::from_secs(10), |m| {
        m["devices"]["a"]["delivered"] == 200 && m["devices"]["b"]["delivered"] == 300
    })
    .await;
    let da = &m["devices"]["a"];
    assert_identities(da);
    assert_identities(&m["devices"]["b"]);
    assert_eq!((n(da, "readings"), n(&da["rejected"], "total")), (200, 0));
    assert!(n(da, "restarts") >= 2, "{da}");
    assert_eq!(n(&m["devices"]["b"], "restarts"), 0);
    eprintln!(
        "unplug: gateway CPU while the device was gone {:.3} s over 2 s; replug → reading delivered in {:?} (absent for {:?})",
        cpu_gone,
        recovery,
        replugged - gone
    );
    // A process spinning on a dead port would burn ~2 s of CPU here.
    assert!(cpu_gone < 0.5, "CPU while the device was gone: {cpu_gone:.3} s");
    drop((pty_a, b_stream.await.unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_sensor_goes_stale_is_reopened_and_comes_back_up_when_it_talks() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let q = dir.path().join("quiet");
    let mut pty = PtyLink::create(&q).unwrap();
    let text = config(broker.port, "", &[("quiet", &q)])
        .replace("framing = \"lines\"", "framing = \"lines\"\nidle_timeout = \"300ms\"");
    let _gw = Gateway::start(dir.path(), &text);
    write_all(&mut pty.master, &render(0..1)).await;
    sub.wait_for(Duration::from_secs(5), |m| m.topic.ends_with("/readings")).await;
    // Silence: stale after the idle timeout, and it stays stale (not `up`) while reopened.
    let (m, _) = sub.wait_for(Duration::from_secs(5), |m| device_state(m, "quiet").as_deref() == Some("stale")).await;
    assert_eq!(m.json()["last_error"], "no data for 300ms");
    let (metrics, skipped) =
        metrics_where(&mut sub, Duration::from_secs(5), |m| n(&m["devices"]["quiet"], "restarts") >= 3).await;
    assert!(skipped.iter().all(|m| device_state(m, "quiet").as_deref() != Some("up")), "a silent device is never `up`");
    assert_eq!(metrics["devices"]["quiet"]["state"], "stale");
    // It talks again: up, and the reading is delivered.
    write_all(&mut pty.master, &render(1..2)).await;
    let (_, skipped) = sub.wait_for(Duration::from_secs(5), |m| m.topic.ends_with("/readings")).await;
    let _ = skipped;
    let (m, _) = metrics_where(&mut sub, Duration::from_secs(5), |m| m["devices"]["quiet"]["delivered"] == 2).await;
    assert_identities(&m["devices"]["quiet"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_keeps_reading_drops_oldest_counted_and_drains_after() {
    const PER_DEVICE: u64 = 1200;
    let dir = common::tempdir();
    let mut broker = Mosquitto::start_with(true);
    let mut sub = Subscriber::connect_with(broker.port, "sensorgate/it/#", Some("outage-sub")).await;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let (pty_a, pty_b) = (PtyLink::create(&a).unwrap(), PtyLink::create(&b).unwrap());
    let text = config(broker.port, "[queue]\nmax_readings = 300", &[("a", &a), ("b", &b)]);
    let gw = Gateway::start(dir.path(), &text);
    sub.wait_for(Duration::from_secs(5), |m| m.topic == "sensorgate/it/state" && m.text() == "online").await;

    // 200 readings/s per device for 6 s; the broker is away from t = 1 s to t = 4 s.
    let every = Duration::from_millis(5);
    let streams = [stream(pty_a, 0, PER_DEVICE, every), stream(pty_b, 0, PER_DEVICE, every)];
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = memory_mib(gw.pid(), "VmRSS:");
    broker.stop_gracefully();
    let cpu0 = cpu_seconds(gw.pid());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_down = cpu_seconds(gw.pid()) - cpu0;
    let rss_down = memory_mib(gw.pid(), "VmRSS:");
    broker.restart();
    let restarted = Instant::now();

    let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut recovery = None;
    let final_metrics = loop {
        let (m, _) = sub.wait_for(Duration::from_secs(20), |_| true).await;
        if m.topic.ends_with("/readings") {
            let v = m.json();
            got.entry(v["_gw"]["device"].as_str().unwrap().into()).or_default().push(v["_gw"]["seq"].as_u64().unwrap());
            if recovery.is_none() && m.received_us > common::now_us() - restarted.elapsed().as_micros() as u64 {
                recovery = Some(restarted.elapsed());
            }
        } else if m.topic.ends_with("/metrics") {
            let v = m.json();
            let done = |d: &str| {
                v["devices"][d]["readings"] == PER_DEVICE
                    && v["devices"][d]["queued"] == 0
                    && v["devices"][d]["in_flight"] == 0
            };
            if done("a") && done("b") {
                break v;
            }
        }
    };
    for s in streams {
        drop(s.await.unwrap());
    }

    for dev in ["a", "b"] {
        let d = &final_metrics["devices"][dev];
        assert_identities(d);
        let (delivered, dropped) = (n(d, "delivered"), n(d, "dropped_oldest"));
        assert_eq!(delivered + dropped, PER_DEVICE, "{dev}: {d}");
        assert!(dropped > 0, "{dev}: a 3 s outage at 400 readings/s overflows a 300-reading queue");
        // Counting at the other end: every delivered reading arrived. A reading in flight when
        // the broker died may have reached it without its ack reaching us; the gateway then
        // puts it back (republished) and, with the queue full, may evict it (dropped_oldest).
        // So the subscriber can hold a few more than `delivered`, never fewer, and never more
        // extra than were republished.
        let seqs = &got[dev];
        let unique: BTreeSet<u64> = seqs.iter().copied().collect();
        let extra = (unique.len() as u64).checked_sub(delivered).unwrap_or_else(|| {
            panic!("{dev}: {} unique readings at the subscriber, {delivered} delivered", unique.len())
        });
        assert!(extra <= n(d, "republished"), "{dev}: {extra} unconfirmed arrivals, {}", n(d, "republished"));
        assert!(unique.iter().all(|s| (1..=PER_DEVICE).contains(s)));
        // Drop-oldest: what was lost is older than everything delivered after the outage.
        let missing: Vec<u64> = (1..=PER_DEVICE).filter(|s| !unique.contains(s)).collect();
        let resumed = seqs.iter().rev().take(50).min().copied().unwrap();
        assert!(missing.iter().all(|s| *s < resumed), "{dev}: newest readings kept");
        eprintln!(
            "{dev}: delivered {delivered}, dropped_oldest {dropped}, republished {}, duplicates at subscriber {}",
            n(d, "republished"),
            seqs.len() - unique.len()
        );
    }
    assert!(n(&final_metrics["mqtt"], "reconnects") >= 1);
    eprintln!(
        "broker outage: gateway CPU while the broker was down {cpu_down:.3} s over 3 s (reading 400 readings/s); \
         RSS {rss_before:.1} MiB before, {rss_down:.1} MiB at the end of the outage; first reading {:?} after the broker came back",
        recovery.unwrap_or_default()
    );
    // Reconnecting in a hot loop would burn most of 3 CPU-seconds.
    assert!(cpu_down < 1.0, "CPU while the broker was down: {cpu_down:.3} s");
}

/// Reads what the gateway left in the pseudo-terminal: complete readings never read.
async fn unread_readings(pty: &mut PtyLink) -> (u64, bool) {
    let mut rest = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), pty.slave.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        rest.extend_from_slice(&buf[..n]);
    }
    let lines: Vec<&[u8]> = rest.split(|b| *b == b'\n').collect();
    // The last piece is an unfinished line (or empty); the first may be the tail of a line
    // the gateway had begun to read and counted as truncated.
    let complete = &lines[..lines.len() - 1];
    let tail = complete.first().is_some_and(|l| serde_json::from_slice::<Value>(l).is_err());
    (complete.iter().filter(|l| serde_json::from_slice::<Value>(l).is_ok()).count() as u64, tail)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_every_reading_is_accounted_for() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let paths: Vec<_> = ["a", "b"].iter().map(|d| dir.path().join(d)).collect();
    let text = config(broker.port, "", &[("a", &paths[0]), ("b", &paths[1])]);
    let mut gw = Gateway::start_with_args(dir.path(), &text, &["--log-format", "json"]);
    sub.wait_for(Duration::from_secs(5), |m| m.topic == "sensorgate/it/state" && m.text() == "online").await;

    // Two writers at full speed, counting each reading once its write completed.
    let written: Vec<_> = (0..2).map(|_| std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0))).collect();
    let writers: Vec<_> = paths
        .iter()
        .zip(&written)
        .map(|(p, count)| {
            let mut pty = PtyLink::create(p).unwrap();
            let count = std::sync::Arc::clone(count);
            tokio::spawn(async move {
                for i in 0.. {
                    let line = render(i..i + 1);
                    let w = tokio::time::timeout(Duration::from_millis(500), write_all(&mut pty.master, &line)).await;
                    if w.is_err() {
                        return pty; // nobody reads any more
                    }
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                unreachable!()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    gw.signal(libc::SIGTERM);
    let status = gw.wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");

    let mut ptys = Vec::new();
    for w in writers {
        ptys.push(w.await.unwrap());
    }
    // The last metrics (published after the drain) and `offline`, in that order.
    let mut received: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut last_metrics = None;
    loop {
        let (m, _) = sub.wait_for(Duration::from_secs(10), |_| true).await;
        if m.topic.ends_with("/readings") {
            let v = m.json();
            received
                .entry(v["_gw"]["device"].as_str().unwrap().into())
                .or_default()
                .insert(v["_gw"]["seq"].as_u64().unwrap());
        } else if m.topic.ends_with("/metrics") {
            last_metrics = Some(m.json());
        } else if m.topic == "sensorgate/it/state" && m.text() == "offline" {
            break;
        }
    }
    let metrics = last_metrics.unwrap();
    let finals = gw.log_records("Final accounting.");
    assert_eq!(finals.len(), 2, "{}", gw.log_text());
    for (i, dev) in ["a", "b"].iter().enumerate() {
        let d = &metrics["devices"][dev];
        assert_identities(d);
        assert_eq!(d["state"], "stopped");
        let (unread, cut) = unread_readings(&mut ptys[i]).await;
        let truncated = n(&d["rejected"], "truncated");
        assert_eq!(truncated, u64::from(cut), "{dev}: a reading cut by the shutdown is counted once");
        let produced = written[i].load(std::sync::atomic::Ordering::SeqCst);
        let fin = finals.iter().find(|f| f["device"] == *dev).unwrap();
        let lost = n(fin, "lost");
        assert_eq!(lost, 0, "the broker was up: nothing lost");
        assert_eq!(n(fin, "delivered"), n(d, "delivered"));
        // Sensor side: written = read and decoded + cut + never read.
        assert_eq!(produced, n(d, "readings") + truncated + unread, "{dev}: {d}");
        // Gateway: decoded = delivered + lost; broker side: delivered = received.
        assert_eq!(n(d, "readings"), n(d, "delivered") + lost + n(d, "dropped_oldest"));
        assert_eq!(received[*dev].len() as u64, n(d, "delivered"), "{dev}");
        eprintln!(
            "{dev}: written {produced}, delivered {}, dropped {}, truncated {truncated}, unread {unread}",
            n(d, "delivered"),
            n(d, "dropped_oldest")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_the_broker_down_reports_what_was_lost() {
    let dir = common::tempdir();
    let mut broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let a = dir.path().join("a");
    let mut pty = PtyLink::create(&a).unwrap();
    let text = config(broker.port, "", &[("a", &a)]).replace("shutdown_timeout = \"3s\"", "shutdown_timeout = \"1s\"");
    let mut gw = Gateway::start_with_args(dir.path(), &text, &["--log-format", "json"]);
    write_all(&mut pty.master, &render(0..50)).await;
    metrics_where(&mut sub, Duration::from_secs(5), |m| m["devices"]["a"]["delivered"] == 50).await;
    broker.stop();
    write_all(&mut pty.master, &render(50..80)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    gw.signal(libc::SIGTERM);
    let status = gw.wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?} with a 1 s deadline");
    let fin = &gw.log_records("Final accounting.")[0];
    assert_eq!((n(fin, "readings"), n(fin, "delivered"), n(fin, "lost")), (80, 50, 30), "{fin}");
    assert_eq!(gw.log_records("Shutdown deadline passed: readings not delivered.")[0]["lost"], 30);
    assert_eq!(gw.log_records("Gateway stopped.")[0]["lost"], 30);
}
