//! The MQTT side against a real mosquitto that goes away, comes back, or sends us what we
//! will not take: the gateway reconnects quickly and never loops.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{json_lines, n, write_all, Gateway, Mosquitto, Subscriber};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;
use sensorgate::simulate::PtyLink;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A retained message of any size, as raw packets (rumqttc's client caps outgoing packets).
async fn publish_retained(port: u16, topic: &str, payload: Vec<u8>) {
    let mut b = bytes::BytesMut::new();
    v4::Connect::new("test-big-pub").write(&mut b).unwrap();
    let mut p = v4::Publish::new(topic, QoS::AtLeastOnce, payload);
    p.pkid = 1;
    p.retain = true;
    p.write(&mut b).unwrap();
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(&b).await.unwrap();
    // CONNACK (4 bytes), then PUBACK (4 bytes): the broker has it.
    let mut acks = [0u8; 8];
    tcp.read_exact(&mut acks).await.unwrap();
    assert_eq!((acks[0], acks[4]), (0x20, 0x40), "{acks:?}");
}

fn config(port: u16, device: &Path, extra: &str) -> String {
    format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"200ms\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n{extra}\n\
         [[device]]\nname = \"d\"\npath = \"{}\"\nframing = \"lines\"\n",
        device.display()
    )
}

/// Scenario 1: a broker away for 10 s (connections refused meanwhile) is reconnected to
/// within a second of its return, and the first reading arrives then. Before, the backoff
/// had grown to several seconds by then (measured: 10.3 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_within_a_second_of_the_brokers_return() {
    let dir = common::tempdir();
    let mut broker = Mosquitto::start();
    let path = dir.path().join("s");
    let pty = PtyLink::create(&path).unwrap();
    let gw = Gateway::start(dir.path(), &config(broker.port, &path, ""));
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/state").await;
    sub.wait_for(Duration::from_secs(5), |m| m.text() == "online").await;
    drop(sub);
    // A sensor sending every 50 ms throughout.
    let (stop, sensor) = keep_sending(pty, Duration::from_millis(50));

    broker.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker.restart();
    let back = Instant::now();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    // The broker lost its retained messages (no persistence): `online` arrives only when the
    // gateway has reconnected and said it again; the queued readings follow it.
    sub.wait_for(Duration::from_secs(30), |m| m.topic.ends_with("/state") && m.text() == "online").await;
    let online = back.elapsed();
    sub.wait_for(Duration::from_secs(30), |m| m.topic.ends_with("/readings")).await;
    let first_reading = back.elapsed();
    eprintln!(
        "broker back after a 10 s outage: gateway online again after {online:?}, first reading after {first_reading:?}"
    );
    // The retry interval is at most 0.9 s; 2 s leaves room for a loaded CI machine.
    assert!(first_reading < Duration::from_secs(2), "first reading {first_reading:?} after the broker's return");
    stop.cancel();
    drop(sensor.await.unwrap());
    drop(gw);
}

/// Writes a JSON line every `every` until cancelled; returns the link when it stops.
fn keep_sending(
    mut pty: PtyLink,
    every: Duration,
) -> (tokio_util::sync::CancellationToken, tokio::task::JoinHandle<PtyLink>) {
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        let mut n = 0;
        while !token.is_cancelled() {
            write_all(&mut pty.master, &json_lines(n..n + 1)).await;
            n += 1;
            tokio::time::sleep(every).await;
        }
        pty
    });
    (stop, task)
}

/// Scenario 7: a retained message over 256 KiB on a topic we subscribe to is skipped and
/// counted; the connection stays up (before: a reconnect after every SUBSCRIBE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_retained_message_is_skipped_without_reconnecting() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    publish_retained(broker.port, "homeassistant/status", vec![b'x'; 300 * 1024]).await;
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/metrics").await;
    let gw = Gateway::start(
        dir.path(),
        &config(broker.port, Path::new("/nonexistent/sg-port"), "[homeassistant]\nenabled = true"),
    );
    // Ten metrics messages (2 s) after the skip: still the first connection.
    let mut seen = 0;
    let last = loop {
        let (m, _) = sub.wait_for(Duration::from_secs(10), |_| true).await;
        let v = m.json();
        if n(&v["mqtt"], "incoming_oversize") >= 1 {
            seen += 1;
            if seen == 10 {
                break v;
            }
        }
    };
    assert_eq!(n(&last["mqtt"], "incoming_oversize"), 1, "{last}");
    assert_eq!(n(&last["mqtt"], "reconnects"), 0, "{last}");
    assert_eq!(n(&last["mqtt"], "connection_errors"), 0, "{last}");
    drop(gw);
}
