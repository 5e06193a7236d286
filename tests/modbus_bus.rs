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

async fn metrics_where(sub: &mut Subscriber, pred: impl Fn(&Value) -> bool) -> Value {
    sub.wait_for(Duration::from_secs(20), |m| m.topic == "sensorgate/it/metrics" && pred(&m.json())).await.0.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_slave_costs_the_others_only_its_timeout_and_goes_stale() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let pty = PtyLink::create(&dir.path().join("bus")).unwrap();
    let bus: SimBus = Arc::new(Mutex::new(vec![SimSlave::meter(1), SimSlave::meter(2), SimSlave::meter(3)]));
    bus.lock().unwrap()[1].faults.silent = true;
    let link = pty.link.clone();
    let sim_bus = Arc::clone(&bus);
    let server = tokio::spawn(async move {
        let mut pty = pty;
        sim::serve(&mut pty.master, sim_bus).await
    });
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
