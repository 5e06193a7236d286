//! Monitoring and control over MQTT, end to end against mosquitto: the metrics payload,
//! retained state after a broker restart, Home Assistant discovery and its birth message,
//! command round trips, client-id collisions.

mod common;

use std::time::Duration;

use common::{json_lines as lines, publish, write_all, Gateway, Mosquitto, Subscriber};
use sensorgate::simulate::PtyLink;

fn config(port: u16, extra: &str, devices: &[(&str, &std::path::Path)]) -> String {
    let mut c = format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"200ms\"\n[mqtt]\nport = {port}\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n{extra}\n"
    );
    for (name, path) in devices {
        c += &format!("[[device]]\nname = \"{name}\"\npath = \"{}\"\nframing = \"lines\"\n", path.display());
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_every_documented_field_and_counters_only_grow() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/metrics").await;
    let a = dir.path().join("a");
    let mut pty = PtyLink::create(&a).unwrap();
    let _gw = Gateway::start(dir.path(), &config(broker.port, "", &[("a", &a)]));
    write_all(&mut pty.master, &lines(0..10)).await;
    let (m1, _) = sub.wait_for(Duration::from_secs(5), |m| m.json()["devices"]["a"]["delivered"] == 10).await;
    write_all(&mut pty.master, &lines(10..15)).await;
    let (m2, _) = sub.wait_for(Duration::from_secs(5), |m| m.json()["devices"]["a"]["delivered"] == 15).await;
    let (v1, v2) = (m1.json(), m2.json());
    for path in [
        "/uptime_s",
        "/process/rss_bytes",
        "/process/cpu_seconds",
        "/queue/readings",
        "/queue/bytes",
        "/queue/max_readings",
        "/queue/max_bytes",
        "/mqtt/connected",
        "/mqtt/reconnects",
        "/mqtt/kicked_after_connect",
        "/mqtt/client_id_conflict",
        "/mqtt/incoming_dropped",
        "/commands/executed",
        "/commands/refused/retained",
        "/commands/refused/unknown",
        "/commands/refused/rate_limited",
        "/commands/refused/too_large",
        "/commands/refused/bad_request",
        "/commands/refused/not_allowed",
        "/commands/refused/restart_too_soon",
        "/commands/responses_dropped",
    ] {
        assert!(v2.pointer(path).is_some(), "{path} missing: {v2}");
    }
    assert!(v2["process"]["rss_bytes"].as_u64().unwrap() > 1_000_000);
    let (d1, d2) = (&v1["devices"]["a"], &v2["devices"]["a"]);
    for key in [
        "bytes_in",
        "frames_in",
        "readings",
        "sequence_gaps",
        "delivered",
        "dropped_oldest",
        "expired",
        "republished",
        "restarts",
    ] {
        let (x, y) = (d1[key].as_u64().unwrap(), d2[key].as_u64().unwrap());
        assert!(y >= x, "{key} went down: {x} → {y}");
    }
    for key in ["queued", "in_flight", "last_reading_age_ms", "state"] {
        assert!(d2.get(key).is_some(), "{key} missing");
    }
    assert_eq!(d2["rejected"].as_object().unwrap().len(), sensorgate::reject::Reject::COUNT + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_state_and_discovery_are_published_again_after_a_broker_restart() {
    let dir = common::tempdir();
    let mut broker = Mosquitto::start(); // no persistence: a restart forgets retained messages
    let a = dir.path().join("a");
    let _pty = PtyLink::create(&a).unwrap();
    let extra = "[homeassistant]\nenabled = true\n";
    let _gw = Gateway::start(dir.path(), &config(broker.port, extra, &[("a", &a)]));
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/devices/a/state").await;
    sub.wait_for(Duration::from_secs(5), |m| m.json()["state"] == "up").await;
    broker.stop();
    broker.restart();
    // Give the gateway its reconnect (backoff ≤ 500 ms), then look as a newcomer would.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut fresh = Subscriber::connect(broker.port, "#").await;
    let mut retained = std::collections::BTreeMap::new();
    while retained.len() < 4 {
        let (m, _) = fresh.wait_for(Duration::from_secs(5), |m| m.retain).await;
        retained.insert(m.topic.clone(), m.text());
    }
    assert_eq!(retained["sensorgate/it/state"], "online");
    assert!(retained["sensorgate/it/devices/a/state"].contains("\"up\""));
    assert!(retained.contains_key("homeassistant/device/sensorgate_it_a/config"), "{retained:?}");
    assert!(retained.contains_key("homeassistant/device/sensorgate_it/config"), "{retained:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_discovery_is_republished_on_its_birth_message() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let a = dir.path().join("a");
    let _pty = PtyLink::create(&a).unwrap();
    let extra = "[homeassistant]\nenabled = true\nexpire_after = \"90s\"\n";
    let text = config(broker.port, extra, &[("a", &a)])
        + "[[device.entity]]\nfield = \"temp\"\nname = \"Temperature\"\nunit = \"°C\"\ndevice_class = \"temperature\"\nstate_class = \"measurement\"\n";
    let mut sub = Subscriber::connect(broker.port, "homeassistant/device/#").await;
    let _gw = Gateway::start(dir.path(), &text);
    let (m, _) =
        sub.wait_for(Duration::from_secs(5), |m| m.topic == "homeassistant/device/sensorgate_it_a/config").await;
    let v = m.json();
    let temp = &v["cmps"]["temp"];
    assert_eq!((temp["p"].as_str(), temp["unit_of_measurement"].as_str()), (Some("sensor"), Some("°C")));
    assert_eq!(
        (temp["device_class"].as_str(), temp["state_class"].as_str()),
        (Some("temperature"), Some("measurement"))
    );
    assert_eq!(temp["expire_after"], 90);
    assert_eq!(v["availability_mode"], "all");
    assert_eq!(v["availability"][0]["topic"], "sensorgate/it/state");
    assert_eq!(v["availability"][1]["topic"], "sensorgate/it/devices/a/state");
    assert_eq!(v["state_topic"], "sensorgate/it/devices/a/readings");
    // Home Assistant restarts: its birth message makes the gateway publish discovery again.
    publish(broker.port, "homeassistant/status", b"online", false).await;
    let (again, _) =
        sub.wait_for(Duration::from_secs(5), |m| m.topic == "homeassistant/device/sensorgate_it_a/config").await;
    assert_eq!(again.json(), v);
    let (gw, _) =
        sub.wait_for(Duration::from_secs(5), |m| m.topic == "homeassistant/device/sensorgate_it/config").await;
    assert_eq!(gw.json()["cmps"]["queue_depth"]["entity_category"], "diagnostic");
}

async fn response(sub: &mut Subscriber, name: &str) -> serde_json::Value {
    let topic = format!("sensorgate/it/cmd/{name}/response");
    sub.wait_for(Duration::from_secs(5), |m| m.topic == topic).await.0.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_answer_with_the_request_id_and_refusals_are_answered_too() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let a = dir.path().join("a");
    let mut pty = PtyLink::create(&a).unwrap();
    let secret = dir.path().join("mqtt-password");
    std::fs::write(&secret, "s3cret-pass\n").unwrap();
    let extra = format!("username = \"gw\"\npassword_file = \"{}\"\n[commands]\nenabled = true\n", secret.display());
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let _gw = Gateway::start(dir.path(), &config(broker.port, &extra, &[("a", &a)]));
    sub.wait_for(Duration::from_secs(5), |m| m.topic == "sensorgate/it/devices/a/state" && m.json()["state"] == "up")
        .await;
    // Subscriptions are made right after connecting; wait for the first metrics to be sure.
    sub.wait_for(Duration::from_secs(5), |m| m.topic.ends_with("/metrics")).await;

    let ask = |name: &'static str, body: &'static str| {
        let port = broker.port;
        async move {
            publish(port, &format!("sensorgate/it/cmd/{name}"), body.as_bytes(), false).await;
        }
    };

    ask("help", r#"{"id":"h1"}"#).await;
    let r = response(&mut sub, "help").await;
    assert_eq!((r["id"].as_str(), r["ok"].as_bool()), (Some("h1"), Some(true)), "{r}");

    ask("restart_device", r#"{"id":2,"device":"a"}"#).await;
    let r = response(&mut sub, "restart_device").await;
    assert_eq!((r["id"].as_u64(), r["ok"].as_bool(), r["result"]["device"].as_str()), (Some(2), Some(true), Some("a")));
    let (m, _) = sub
        .wait_for(Duration::from_secs(5), |m| {
            m.topic.ends_with("/metrics") && m.json()["devices"]["a"]["restarts"] == 1
        })
        .await;
    assert_eq!(m.json()["devices"]["a"]["state"], "up");
    // The restarted device reads on.
    write_all(&mut pty.master, &lines(0..3)).await;
    sub.wait_for(Duration::from_secs(5), |m| {
        m.topic.ends_with("/metrics") && m.json()["devices"]["a"]["delivered"] == 3
    })
    .await;

    ask("restart_device", r#"{"id":3,"device":"nope"}"#).await;
    let r = response(&mut sub, "restart_device").await;
    assert_eq!((r["id"].as_u64(), r["ok"].as_bool()), (Some(3), Some(false)));
    assert!(r["error"].as_str().unwrap().contains("devices: a"), "{r}");

    ask("metrics", "not json").await;
    let r = response(&mut sub, "metrics").await;
    assert_eq!((r["ok"].as_bool(), r["id"].is_null()), (Some(false), true), "{r}");

    ask("config", r#"{"id":"c"}"#).await;
    let (m, _) = sub.wait_for(Duration::from_secs(5), |m| m.topic == "sensorgate/it/cmd/config/response").await;
    let r = m.json();
    assert_eq!(r["ok"], true);
    assert_eq!(r["result"]["mqtt"]["username"], "gw");
    assert_eq!(r["result"]["mqtt"]["password_file"], "<redacted>");
    assert!(!m.text().contains("s3cret"), "secret leaked: {}", m.text());

    ask("metrics", r#"{"id":"m"}"#).await;
    let r = response(&mut sub, "metrics").await;
    assert_eq!((r["id"].as_str(), r["result"]["published"].as_str()), (Some("m"), Some("sensorgate/it/metrics")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_with_one_client_id_say_so_instead_of_flapping_silently() {
    let dir1 = common::tempdir();
    let dir2 = common::tempdir();
    let broker = Mosquitto::start();
    let text = |dir: &std::path::Path| config(broker.port, "client_id = \"same-id\"", &[("a", &dir.join("missing"))]);
    let gw1 = Gateway::start_with_args(dir1.path(), &text(dir1.path()), &["--log-format", "json"]);
    let gw2 = Gateway::start_with_args(dir2.path(), &text(dir2.path()), &["--log-format", "json"]);
    let conflict = "The broker keeps closing the connection right after accepting it: another client is probably using the same client id. Give each gateway its own gateway.id or mqtt.client_id.";
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while gw1.log_records(conflict).is_empty() && gw2.log_records(conflict).is_empty() {
        assert!(std::time::Instant::now() < deadline, "no collision reported:\n{}", gw1.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = gw1.log_records(conflict).into_iter().chain(gw2.log_records(conflict)).next().unwrap();
    assert_eq!(r["client_id"], "same-id");
    assert!(r["kicked"].as_u64().unwrap() >= 3);
}
