//! The MQTT side against a real mosquitto that goes away, comes back, or sends us what we
//! will not take: the gateway reconnects quickly and never loops.

mod common;

use std::time::{Duration, Instant};

use common::{n, Gateway, Mosquitto, Subscriber};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;
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

fn config(port: u16, extra: &str) -> String {
    format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"200ms\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\n{extra}\n\
         [[device]]\nname = \"d\"\npath = \"/nonexistent/sensorgate-test-port\"\nframing = \"lines\"\n"
    )
}

/// Scenario 1: a broker away for 10 s (connections refused meanwhile) is reconnected to
/// within a second of its return. Before, the backoff had grown to several seconds by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_within_a_second_of_the_brokers_return() {
    let dir = common::tempdir();
    let mut broker = Mosquitto::start();
    let gw = Gateway::start(dir.path(), &config(broker.port, ""));
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/state").await;
    sub.wait_for(Duration::from_secs(5), |m| m.text() == "online").await;
    drop(sub);

    broker.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker.restart();
    let back = Instant::now();
    // The broker lost its retained messages (no persistence): `online` arrives only when the
    // gateway has reconnected and said it again.
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/state").await;
    sub.wait_for(Duration::from_secs(30), |m| m.text() == "online").await;
    let took = back.elapsed();
    eprintln!("broker back after a 10 s outage: gateway reconnected and online after {took:?}");
    // The retry interval is at most 0.9 s; 2 s leaves room for a loaded CI machine.
    assert!(took < Duration::from_secs(2), "reconnected {took:?} after the broker's return");
    drop(gw);
}

/// Scenario 7: a retained message over 256 KiB on a topic we subscribe to is skipped and
/// counted; the connection stays up (before: a reconnect after every SUBSCRIBE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_retained_message_is_skipped_without_reconnecting() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    publish_retained(broker.port, "homeassistant/status", vec![b'x'; 300 * 1024]).await;
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/metrics").await;
    let gw = Gateway::start(dir.path(), &config(broker.port, "[homeassistant]\nenabled = true"));
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
