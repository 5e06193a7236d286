//! A reading the broker refuses must not block every device: an MQTT 3.1.1 broker answers a
//! packet over its `max_packet_size` by closing the connection, and a reading put back at the
//! front of the queue is refused again after every reconnect. Real mosquitto with a packet
//! limit, the real binary, a pseudo-terminal.
//!
//! The broker's limit here is 2 KiB rather than the 512 bytes of the report: the
//! gateway's own metrics message (about 1 KiB for one device) must fit, or the broker closes
//! the connection on it too, and these tests read their counts from it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{assert_identities, json_lines, n, write_all, Gateway, Mosquitto, Subscriber};
use sensorgate::simulate::PtyLink;
use serde_json::Value;

/// mosquitto's limit, for every packet from every client.
const BROKER_LIMIT: usize = 2048;

fn config(port: u16, path: &Path, mqtt: &str) -> String {
    format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"200ms\"\nshutdown_timeout = \"5s\"\n\
         [mqtt]\nport = {port}\nqos = 1\n{mqtt}\n\
         reconnect_min = \"100ms\"\nreconnect_max = \"300ms\"\n\
         [[device]]\nname = \"a\"\npath = \"{}\"\nframing = \"lines\"\nmax_frame = \"4KiB\"\n",
        path.display()
    )
}

/// Reading 0 is a 3000-byte JSON line (its PUBLISH is over the broker's limit), readings
/// 1..=20 are small. Returns the gateway, the subscriber and the numbers of the readings the
/// subscriber received, once the metrics say `done` for device `a`.
async fn one_large_reading_then_twenty_small(
    mqtt: &str,
    done: impl Fn(&Value) -> bool,
) -> (Gateway, PtyLink, Value, Vec<u64>, tempfile::TempDir) {
    let dir = common::tempdir();
    let broker = Mosquitto::start_custom(false, format!("max_packet_size {BROKER_LIMIT}\n"));
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let a = dir.path().join("a");
    let mut pa = PtyLink::create(&a).unwrap();
    let gw = Gateway::start_with_args(dir.path(), &config(broker.port, &a, mqtt), &["--log-format", "json"]);

    let mut bytes = format!("{{\"n\":0,\"blob\":\"{}\"}}\n", "x".repeat(3000)).into_bytes();
    bytes.extend(json_lines(1..21));
    write_all(&mut pa.master, &bytes).await;

    let (m, skipped) = sub
        .wait_for(Duration::from_secs(20), |m| m.topic == "sensorgate/it/metrics" && done(&m.json()["devices"]["a"]))
        .await;
    let got: Vec<u64> =
        skipped.iter().filter(|m| m.topic.ends_with("/readings")).map(|m| m.json()["n"].as_u64().unwrap()).collect();
    drop(broker);
    (gw, pa, m.json(), got, dir)
}

/// `mqtt.max_packet_size` matches the broker's: the large reading is rejected as it is built
/// (`oversize_packet`, logged with its size and the limit), the broker never sees it, and the
/// 20 small readings behind it are delivered without a single reconnect. Before the check,
/// the broker closed the connection on the large reading after every reconnect: 0 of the 20
/// were delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_over_max_packet_size_is_rejected_and_the_rest_flow() {
    let (gw, pa, m, got, _dir) = one_large_reading_then_twenty_small("max_packet_size = \"2KiB\"", |d| {
        d["delivered"] == 20 && d["rejected"]["total"] == 1
    })
    .await;
    let dev = &m["devices"]["a"];
    assert_identities(dev);
    assert_eq!((n(dev, "frames_in"), n(dev, "readings")), (21, 20), "{dev}");
    assert_eq!(n(&dev["rejected"], "oversize_packet"), 1, "{dev}");
    assert_eq!((n(dev, "queued"), n(dev, "in_flight"), n(dev, "poisoned")), (0, 0, 0), "{dev}");
    assert_eq!(n(&m["mqtt"], "reconnects"), 0, "the broker never saw the large reading: {m}");
    assert_eq!(got, (1..=20).collect::<Vec<u64>>(), "the small readings, in order");

    let logged = gw.log_records("Discarding reading: its MQTT packet would exceed mqtt.max_packet_size.");
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!((&logged[0]["device"], &logged[0]["limit"]), (&Value::from("a"), &Value::from(BROKER_LIMIT)));
    let size = logged[0]["size"].as_u64().unwrap();
    assert!((3000..3200).contains(&size), "the whole PUBLISH of a 3000-byte line: {size}");
    drop(pa);
}

/// The gateway's own limit lets the large reading through and the broker refuses it: after
/// three connections closed on it, it is dropped as `poisoned` and the 20 small readings are
/// delivered. Before, 0 of the 20 were delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_the_broker_refuses_is_poisoned_after_three_tries() {
    let (_gw, pa, m, got, _dir) = one_large_reading_then_twenty_small("max_packet_size = \"64KiB\"", |d| {
        d["delivered"] == 20 && d["poisoned"] == 1
    })
    .await;
    let dev = &m["devices"]["a"];
    assert_identities(dev);
    assert_eq!((n(dev, "frames_in"), n(dev, "readings"), n(&dev["rejected"], "total")), (21, 21, 0), "{dev}");
    assert_eq!((n(dev, "queued"), n(dev, "in_flight")), (0, 0), "{dev}");
    // At least once: a small reading whose ack was lost in a close may arrive twice.
    let mut unique = got.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique, (1..=20).collect::<Vec<u64>>(), "the small readings, in order: {got:?}");
    drop(pa);
}

/// MQTT 5: the broker says its Maximum Packet Size in CONNACK, so the large reading is
/// refused before it is sent (counted as poisoned) and the connection never drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_the_brokers_packet_limit_is_known_before_sending() {
    let mqtt = "version = 5\nmax_packet_size = \"64KiB\"";
    let (_gw, pa, m, got, _dir) =
        one_large_reading_then_twenty_small(mqtt, |d| d["delivered"] == 20 && d["poisoned"] == 1).await;
    let dev = &m["devices"]["a"];
    assert_identities(dev);
    assert_eq!((n(dev, "readings"), n(dev, "queued"), n(dev, "in_flight")), (21, 0, 0), "{dev}");
    assert_eq!(n(&m["mqtt"], "reconnects"), 0, "nothing over the limit was sent: {m}");
    assert_eq!(n(&m["mqtt"], "connection_errors"), 0, "{m}");
    assert_eq!(got, (1..=20).collect::<Vec<u64>>(), "the small readings, in order, once each");
    drop(pa);
}

/// MQTT 5: a reading on a topic the broker's ACL forbids gets a PUBACK with reason
/// "not authorized": dropped, counted by reason, no reconnect; the other device flows.
/// (MQTT 3.1.1 has no way to say so: mosquitto acks and discards such a publish.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_a_refused_publish_is_counted_by_reason_not_retried() {
    let dir = common::tempdir();
    let acl = dir.path().join("acl");
    // Anonymous clients (the gateway and the test's subscriber) may use everything but the
    // readings of device `secret`.
    std::fs::write(
        &acl,
        "topic readwrite sensorgate/it/state\ntopic readwrite sensorgate/it/metrics\n\
         topic readwrite sensorgate/it/devices/open/#\ntopic readwrite sensorgate/it/devices/secret/state\n",
    )
    .unwrap();
    let broker = Mosquitto::start_custom(false, format!("acl_file {}\n", acl.display()));
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let (open, secret) = (dir.path().join("open"), dir.path().join("secret"));
    let (mut po, mut ps) = (PtyLink::create(&open).unwrap(), PtyLink::create(&secret).unwrap());
    let text = format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"200ms\"\n[mqtt]\nport = {}\nqos = 1\nversion = 5\n\
         [[device]]\nname = \"open\"\npath = \"{}\"\nframing = \"lines\"\n\
         [[device]]\nname = \"secret\"\npath = \"{}\"\nframing = \"lines\"\n",
        broker.port,
        open.display(),
        secret.display()
    );
    let _gw = Gateway::start(dir.path(), &text);
    write_all(&mut ps.master, &json_lines(0..10)).await;
    write_all(&mut po.master, &json_lines(0..10)).await;
    let (m, skipped) = sub
        .wait_for(Duration::from_secs(20), |m| {
            m.topic == "sensorgate/it/metrics" && {
                let v = m.json();
                v["devices"]["open"]["delivered"] == 10 && v["devices"]["secret"]["poisoned"] == 10
            }
        })
        .await;
    let m = m.json();
    for d in ["open", "secret"] {
        assert_identities(&m["devices"][d]);
    }
    assert_eq!(n(&m["mqtt"]["puback_refused"], "not_authorized"), 10, "{m}");
    assert_eq!(n(&m["mqtt"], "reconnects"), 0, "{m}");
    let open_readings = skipped.iter().filter(|m| m.topic == "sensorgate/it/devices/open/readings").count();
    assert_eq!(open_readings, 10);
    assert!(skipped.iter().all(|m| !m.topic.starts_with("sensorgate/it/devices/secret/readings")));
    drop((po, ps));
}
