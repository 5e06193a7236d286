//! SIGHUP reload, end to end: only changed devices restart, queued readings survive, MQTT
//! reconnects only when its settings change, and an invalid file changes nothing.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{json_lines as lines, n, write_all, Gateway, Mosquitto, Msg, Subscriber};
use sensorgate::simulate::PtyLink;
use serde_json::Value;

fn config(port: u16, devices: &[(&str, &Path, &str)]) -> String {
    let mut c = format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"200ms\"\n[mqtt]\nport = {port}\nreconnect_min = \"100ms\"\nreconnect_max = \"300ms\"\n"
    );
    for (name, path, extra) in devices {
        c += &format!("[[device]]\nname = \"{name}\"\npath = \"{}\"\nframing = \"lines\"\n{extra}\n", path.display());
    }
    c
}

/// Adds the numbers of the readings among `msgs` to `seen`.
fn note_readings(seen: &mut BTreeSet<u64>, msgs: impl IntoIterator<Item = Msg>) {
    seen.extend(msgs.into_iter().filter(|m| m.topic.ends_with("/readings")).map(|m| m.json()["n"].as_u64().unwrap()));
}

async fn metrics_where(sub: &mut Subscriber, pred: impl Fn(&Value) -> bool) -> Value {
    sub.wait_for(Duration::from_secs(10), |m| m.topic == "sensorgate/it/metrics" && pred(&m.json())).await.0.json()
}

async fn reload(gw: &Gateway, text: &str, expect: &str) -> Value {
    std::fs::write(&gw.config, text).unwrap();
    let before = gw.log_records(expect).len();
    gw.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records = gw.log_records(expect);
        if records.len() > before {
            return records.last().unwrap().clone();
        }
        assert!(std::time::Instant::now() < deadline, "no {expect:?} after SIGHUP:\n{}", gw.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_restarts_only_what_changed_and_refuses_a_bad_file() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    let (mut pa, mut pb, mut pc) =
        (PtyLink::create(&a).unwrap(), PtyLink::create(&b).unwrap(), PtyLink::create(&c).unwrap());
    let mut gw = Gateway::start_with_args(
        dir.path(),
        &config(broker.port, &[("a", &a, ""), ("b", &b, "")]),
        &["--log-format", "json"],
    );
    write_all(&mut pa.master, &lines(0..10)).await;
    write_all(&mut pb.master, &lines(0..10)).await;
    metrics_where(&mut sub, |m| m["devices"]["a"]["delivered"] == 10 && m["devices"]["b"]["delivered"] == 10).await;

    // b changes, c is new, a stays as it is.
    let next = config(broker.port, &[("a", &a, ""), ("b", &b, "idle_timeout = \"1h\""), ("c", &c, "")]);
    let done = reload(&gw, &next, "Configuration reloaded.").await;
    assert_eq!((n(&done, "started"), n(&done, "stopped"), n(&done, "restarted")), (1, 0, 1), "{done}");
    assert_eq!(done["mqtt_reconnected"], false);
    write_all(&mut pa.master, &lines(10..20)).await;
    write_all(&mut pb.master, &lines(10..20)).await;
    write_all(&mut pc.master, &lines(0..10)).await;
    let m = metrics_where(&mut sub, |m| {
        m["devices"]["a"]["delivered"] == 20
            && m["devices"]["b"]["delivered"] == 20
            && m["devices"]["c"]["delivered"] == 10
    })
    .await;
    assert_eq!(n(&m["devices"]["a"], "restarts"), 0, "an unchanged device is not touched");
    assert_eq!(n(&m["devices"]["b"], "readings"), 20, "a restarted device keeps its counters");
    assert_eq!(n(&m["mqtt"], "reconnects"), 0, "MQTT settings did not change: no reconnect");

    // A broken file: refused, every problem logged, nothing changes.
    let refused = reload(
        &gw,
        &(next.clone() + "bogus_key = 1\n"),
        "Reload refused; still running on the previous configuration.",
    )
    .await;
    assert!(refused["error"].as_str().unwrap().contains("sensorgate.toml"), "{refused}");
    let problems = gw.log_records("Invalid configuration.");
    assert!(problems.iter().any(|p| p["problem"].as_str().unwrap().contains("bogus_key")), "{problems:?}");
    write_all(&mut pc.master, &lines(10..15)).await;
    metrics_where(&mut sub, |m| m["devices"]["c"]["delivered"] == 15).await;

    // Removing b stops it (retained state `stopped`); the rest goes on.
    let fewer = config(broker.port, &[("a", &a, ""), ("c", &c, "")]);
    let done = reload(&gw, &fewer, "Configuration reloaded.").await;
    assert_eq!((n(&done, "started"), n(&done, "stopped"), n(&done, "restarted")), (0, 1, 0), "{done}");
    sub.wait_for(Duration::from_secs(5), |m| {
        m.topic == "sensorgate/it/devices/b/state" && m.json()["state"] == "stopped"
    })
    .await;
    let m = metrics_where(&mut sub, |_| true).await;
    assert!(m["devices"].get("b").is_none());

    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(10)).success());
    drop((pa, pb, pc));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_broker_address_reconnects_and_keeps_the_queued_readings() {
    let dir = common::tempdir();
    let mut old = Mosquitto::start();
    let new = Mosquitto::start();
    let mut sub_old = Subscriber::connect(old.port, "sensorgate/it/#").await;
    let mut sub_new = Subscriber::connect(new.port, "sensorgate/it/devices/+/readings").await;
    let a = dir.path().join("a");
    let mut pa = PtyLink::create(&a).unwrap();
    let mut gw = Gateway::start_with_args(dir.path(), &config(old.port, &[("a", &a, "")]), &["--log-format", "json"]);
    write_all(&mut pa.master, &lines(0..5)).await;
    metrics_where(&mut sub_old, |m| m["devices"]["a"]["delivered"] == 5).await;

    // The old broker goes away; readings queue up.
    old.stop();
    write_all(&mut pa.master, &lines(5..50)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The operator points the gateway at the new broker.
    let done = reload(&gw, &config(new.port, &[("a", &a, "")]), "Configuration reloaded.").await;
    assert_eq!(done["mqtt_reconnected"], true, "{done}");
    assert_eq!((n(&done, "started"), n(&done, "stopped"), n(&done, "restarted")), (0, 0, 0));
    let mut got = Vec::new();
    while got.len() < 45 {
        let (m, _) = sub_new.wait_for(Duration::from_secs(10), |_| true).await;
        got.push(m.json()["n"].as_u64().unwrap());
    }
    assert_eq!(got, (5..50).collect::<Vec<u64>>(), "every queued reading, in order, at the new broker");

    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(10)).success());
    let fin = &gw.log_records("Final accounting.")[0];
    assert_eq!((n(fin, "readings"), n(fin, "delivered"), n(fin, "lost")), (50, 50, 0), "{fin}");
    drop(pa);
}

/// Raising `mqtt.inflight` on reload under a steady stream at QoS 1: every reading is
/// delivered and the ledger comes back to zero in flight. Before the queue's in-flight table
/// followed the reload, packet ids above the startup window (2) vanished from the ledger:
/// `delivered` fell behind and `in_flight` grew forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_inflight_on_reload_keeps_the_ledger_exact() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let a = dir.path().join("a");
    let pa = PtyLink::create(&a).unwrap();
    let with_inflight =
        |n: u16| config(broker.port, &[("a", &a, "")]).replace("[mqtt]\n", &format!("[mqtt]\ninflight = {n}\n"));
    let mut gw = Gateway::start_with_args(dir.path(), &with_inflight(2), &["--log-format", "json"]);

    // A steady stream, 10 readings every 5 ms, until told to stop.
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut pa = pa;
            let mut written = 0;
            while !stop.is_cancelled() {
                write_all(&mut pa.master, &lines(written..written + 10)).await;
                written += 10;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (pa, written)
        })
    };
    let reading_at_least =
        |min: u64| move |m: &Msg| m.topic.ends_with("/readings") && m.json()["n"].as_u64() >= Some(min);
    let mut seen = BTreeSet::new();
    let (m, skipped) = sub.wait_for(Duration::from_secs(10), reading_at_least(200)).await;
    note_readings(&mut seen, skipped.into_iter().chain([m]));
    let done = reload(&gw, &with_inflight(50), "Configuration reloaded.").await;
    assert_eq!(done["mqtt_reconnected"], true, "{done}");
    // Well past the old window: 500 more readings through the new connection.
    let after = *seen.last().unwrap() + 500;
    let (m, skipped) = sub.wait_for(Duration::from_secs(20), reading_at_least(after)).await;
    note_readings(&mut seen, skipped.into_iter().chain([m]));
    stop.cancel();
    let (pa, written) = writer.await.unwrap();

    // The broker forwards a publisher's messages in order: every reading acknowledged before
    // this metrics snapshot reached the subscriber before it.
    let (m, skipped) = sub
        .wait_for(Duration::from_secs(10), |m| {
            let dev = || m.json()["devices"]["a"].clone();
            m.topic == "sensorgate/it/metrics"
                && dev()["readings"] == written
                && dev()["queued"] == 0
                && dev()["in_flight"] == 0
        })
        .await;
    note_readings(&mut seen, skipped);
    let m = m.json();
    let dev = &m["devices"]["a"];
    common::assert_identities(dev);
    assert_eq!((n(dev, "delivered"), n(dev, "poisoned")), (written, 0), "{dev}");
    assert_eq!(n(&m["queue"], "ledger_errors"), 0, "{m}");
    assert_eq!(seen, (0..written).collect(), "every reading reached the broker");

    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(10)).success());
    let fin = &gw.log_records("Final accounting.")[0];
    assert_eq!((n(fin, "readings"), n(fin, "delivered"), n(fin, "lost")), (written, written, 0), "{fin}");
    drop(pa);
}
