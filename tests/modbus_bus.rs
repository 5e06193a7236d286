//! Modbus RTU buses end to end, in process: the gateway polls simulated slaves
//! (`simulate::modbus`, rmodbus's server side) on a pseudo-terminal and publishes to mosquitto.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{n, Mosquitto, Subscriber};
use sensorgate::app;
use sensorgate::config::Config;
use sensorgate::simulate::modbus::{self as sim, SimBus, SimSlave};
use sensorgate::simulate::PtyLink;
use serde_json::Value;

fn config(port: u16, path: &std::path::Path, slaves: &[(&str, u8, &str)]) -> Config {
    let mut text = format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"100ms\"\n[mqtt]\nport = {port}\n\
         [[bus]]\nname = \"rs485\"\npath = \"{}\"\nbaud = 115200\nrequest_timeout = \"50ms\"\nretries = 1\n",
        path.display()
    );
    for (name, unit, interval) in slaves {
        text += &format!("[[bus.device]]\nname = \"{name}\"\nunit = {unit}\npoll_interval = \"{interval}\"\n");
        text += sim::METER_POINTS;
    }
    Config::from_toml(&text).unwrap()
}

/// Simulated meters with these units answering on a pseudo-terminal linked at `dir`/bus.
fn simulated_bus(
    dir: &std::path::Path,
    units: &[u8],
) -> (SimBus, std::path::PathBuf, tokio::task::JoinHandle<std::io::Result<()>>) {
    let pty = PtyLink::create(&dir.join("bus")).unwrap();
    let bus: SimBus = Arc::new(Mutex::new(units.iter().map(|&u| SimSlave::meter(u)).collect()));
    let link = pty.link.clone();
    let sim_bus = Arc::clone(&bus);
    let server = tokio::spawn(async move {
        let mut pty = pty;
        sim::serve(&mut pty.master, sim_bus).await
    });
    (bus, link, server)
}

async fn metrics_where(sub: &mut Subscriber, pred: impl Fn(&Value) -> bool) -> Value {
    sub.wait_for(Duration::from_secs(20), |m| m.topic == "sensorgate/it/metrics" && pred(&m.json())).await.0.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_slave_costs_the_others_only_its_timeout_and_goes_stale() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let (bus, link, server) = simulated_bus(dir.path(), &[1, 2, 3]);
    bus.lock().unwrap()[1].faults.silent = true;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = config(broker.port, &link, &[("m1", 1, "100ms"), ("m2", 2, "100ms"), ("m3", 3, "100ms")]);
    let gateway = tokio::spawn(app::run(config, async { stopped.await.unwrap_or(()) }));

    let (stale, _) = sub
        .wait_for(Duration::from_secs(10), |m| {
            m.topic == "sensorgate/it/devices/m2/state" && m.json()["state"] == "stale"
        })
        .await;
    assert!(stale.json()["last_error"].as_str().unwrap().contains("no response"), "{}", stale.text());
    let (reading, _) = sub.wait_for(Duration::from_secs(10), |m| m.topic == "sensorgate/it/devices/m1/readings").await;
    let r = reading.json();
    assert_eq!(r["setpoint"], 21.5);
    assert!(r["voltage"].as_f64().unwrap() >= 230.0 && r["energy"].as_u64().unwrap() >= 1000, "{r}");
    let m = metrics_where(&mut sub, |m| n(&m["devices"]["m1"], "readings") >= 20).await;
    let (m1, m2) = (&m["devices"]["m1"], &m["devices"]["m2"]);
    assert_eq!(n(m2, "readings"), 0);
    assert_eq!(n(m2, "frames_in"), m2["rejected"]["no_response"].as_u64().unwrap());
    assert_eq!(n(m1, "frames_in"), n(m1, "readings"), "{m1}");
    common::assert_identities(m1);
    stop.send(()).unwrap();
    let report = gateway.await.unwrap().unwrap();
    assert_eq!(report.lost(), 0);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_reaches_the_slave_between_polls_and_bad_writes_are_refused() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let (bus, link, server) = simulated_bus(dir.path(), &[1]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut config = config(broker.port, &link, &[("m1", 1, "50ms")]);
    config.commands.enabled = true;
    let gateway = tokio::spawn(app::run(config, async { stopped.await.unwrap_or(()) }));
    sub.wait_for(Duration::from_secs(10), |m| m.topic == "sensorgate/it/devices/m1/readings").await;

    let response =
        |id: &'static str| move |m: &common::Msg| m.topic == "sensorgate/it/cmd/write/response" && m.json()["id"] == id;
    let write = |id: &str, point: &str, value: &str| {
        format!(r#"{{"id":"{id}","device":"m1","point":"{point}","value":{value}}}"#)
    };
    common::publish(broker.port, "sensorgate/it/cmd/write", write("1", "setpoint", "19.5").as_bytes(), false).await;
    let (ok, _) = sub.wait_for(Duration::from_secs(10), response("1")).await;
    assert_eq!(ok.json()["ok"], true, "{}", ok.text());
    assert_eq!(bus.lock().unwrap()[0].storage.holdings[10], 195, "the register holds 19.5 / 0.1");
    sub.wait_for(Duration::from_secs(10), |m| {
        m.topic == "sensorgate/it/devices/m1/readings" && m.json()["setpoint"] == 19.5
    })
    .await;
    common::publish(broker.port, "sensorgate/it/cmd/write", write("2", "relay", "true").as_bytes(), false).await;
    let (ok, _) = sub.wait_for(Duration::from_secs(10), response("2")).await;
    assert_eq!(ok.json()["ok"], true, "{}", ok.text());
    assert!(bus.lock().unwrap()[0].storage.coils[0]);

    for (id, point, value, error) in [
        ("3", "voltage", "1", "not writable"),
        ("4", "setpoint", "5000", "out of range"),
        ("5", "nope", "1", "has no point"),
        ("6", "setpoint", "\"warm\"", "takes a number"),
    ] {
        common::publish(broker.port, "sensorgate/it/cmd/write", write(id, point, value).as_bytes(), false).await;
        let (refused, _) = sub.wait_for(Duration::from_secs(10), response(id)).await;
        let r = refused.json();
        assert_eq!(r["ok"], false);
        assert!(r["error"].as_str().unwrap().contains(error), "{r}");
    }
    assert_eq!(bus.lock().unwrap()[0].storage.holdings[10], 195, "refused writes wrote nothing");
    stop.send(()).unwrap();
    assert_eq!(gateway.await.unwrap().unwrap().lost(), 0);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_and_removes_a_slave_leaves_the_others_polling() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let (_bus, link, server) = simulated_bus(dir.path(), &[1, 2, 3]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (reload, reloads) = tokio::sync::mpsc::channel(1);
    let first = config(broker.port, &link, &[("m1", 1, "100ms"), ("m2", 2, "100ms")]);
    let gateway =
        tokio::spawn(app::run_reloadable(first, async { stopped.await.unwrap_or(()) }, reloads, app::Hooks::default()));
    metrics_where(&mut sub, |m| n(&m["devices"]["m2"], "readings") >= 3).await;
    reload.send(config(broker.port, &link, &[("m1", 1, "100ms"), ("m3", 3, "100ms")])).await.unwrap();
    let (gone, seen) = sub
        .wait_for(Duration::from_secs(10), |m| {
            m.topic == "sensorgate/it/devices/m2/state" && m.json()["state"] == "stopped"
        })
        .await;
    let m = metrics_where(&mut sub, |m| n(&m["devices"]["m3"], "readings") >= 5).await;
    assert_eq!(n(&m["devices"]["m1"], "restarts"), 0, "the bus's port stayed open");
    assert_eq!(m["devices"]["m1"]["state"], "up");
    let m1_states: Vec<_> = seen.iter().filter(|s| s.topic == "sensorgate/it/devices/m1/state").collect();
    assert!(m1_states.iter().all(|s| s.json()["state"] == "up"), "m1 never left up: {m1_states:?}");
    assert!(gone.json()["state"] == "stopped");
    assert!(m["devices"].get("m2").is_none(), "m2 is gone from the metrics: {}", m["devices"]);
    common::assert_identities(&m["devices"]["m3"]);
    stop.send(()).unwrap();
    let report = gateway.await.unwrap().unwrap();
    assert_eq!(report.lost(), 0);
    // m2's lane is kept to the end: what it read was delivered.
    let (_, m2) = report.devices.iter().find(|(name, _)| name == "m2").unwrap();
    assert!(m2.readings >= 3 && m2.delivered == m2.readings, "{m2:?}");
    server.abort();
}
