//! `sensorgate simulate --modbus`, the real binary: it serves simulated meters on a
//! pseudo-terminal and prints the `[[bus]]` config that polls them; the real gateway, run on
//! exactly that printed config, polls them and publishes their readings to mosquitto.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Gateway, Mosquitto, Simulator, Subscriber};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_polls_simulated_meters_on_the_config_simulate_prints() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/devices/#").await;
    let link = dir.path().join("bus");
    let (mut sim, printed) = Simulator::start(dir.path(), &["--modbus", "5", "--link", link.to_str().unwrap()]).await;
    assert!(printed.contains(&format!("on {} -> /dev/pts/", link.display())), "{printed}");

    // The printed text is pasted as it is, comments and all.
    let mut gateway =
        Gateway::start(dir.path(), &format!("[gateway]\nid = \"it\"\n[mqtt]\nport = {}\n{printed}", broker.port));
    let topic = "sensorgate/it/devices/meter-5/readings";
    let (first, _) = sub.wait_for(Duration::from_secs(20), |m| m.topic == topic).await;
    let r = first.json();
    // The meter's register map (simulate::modbus::METER_POINTS): values move with every request.
    let voltage = r["voltage"].as_f64().unwrap();
    assert!((230.0..231.0).contains(&voltage), "{r}");
    let current = r["current"].as_f64().unwrap();
    assert!((1.5..1.6).contains(&current), "little word order decoded: {r}");
    let temperature = r["temperature"].as_f64().unwrap();
    assert!((-5.0..0.0).contains(&temperature), "{r}");
    assert_eq!(r["setpoint"], 21.5, "{r}");
    assert_eq!(r["relay"], false, "{r}");
    assert!(r["door_closed"].is_boolean(), "{r}");
    assert_eq!(r["_gw"]["device"], "meter-5", "{r}");
    let energy = r["energy"].as_u64().unwrap();
    let (second, _) = sub.wait_for(Duration::from_secs(20), |m| m.topic == topic).await;
    assert!(second.json()["energy"].as_u64().unwrap() > energy, "the meter counts on: {r} then {}", second.text());

    gateway.signal(libc::SIGTERM);
    assert!(gateway.wait(Duration::from_secs(10)).success(), "{}", gateway.log_text());
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(sim.child.id() as i32, libc::SIGTERM) }, 0);
    let status = tokio::task::spawn_blocking(move || (sim.child.wait().unwrap(), sim)).await.unwrap();
    let (status, sim) = status;
    assert!(status.success(), "simulate exited {status}; log:\n{}", sim.log());
    assert!(sim.log().contains("Simulated meters stopped."), "{}", sim.log());
    assert!(!link.exists(), "the link goes with the simulator");
}

/// `--modbus` with options it does not take, or a bad unit list: a usage error (exit 2, as
/// clap gives every usage error) that says what is wrong, and no pseudo-terminal left behind.
#[test]
fn simulate_modbus_refuses_bad_usage_with_a_clear_message() {
    let dir = common::tempdir();
    let link = dir.path().join("bus");
    let link = link.to_str().unwrap();
    for (args, says) in [
        (vec!["--modbus", "1", "--rate", "5"], "'--modbus <UNITS>...' cannot be used with '--rate <RATE>'"),
        (vec!["--modbus", "1", "--framing", "cobs"], "cannot be used with '--framing <FRAMING>'"),
        (vec!["--modbus", "1", "--format", "kv"], "cannot be used with '--format <FORMAT>'"),
        (vec!["--modbus", "0"], "0 is not in 1..=247"),
        (vec!["--modbus", "248"], "248 is not in 1..=247"),
        (vec!["--modbus", "1,x"], "invalid value 'x' for '--modbus <UNITS>...'"),
        (vec!["--modbus", "1,2,1"], "--modbus names unit 1 twice"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
            .args(["simulate", "--link", link])
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?} should say {says:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(!Path::new(link).exists(), "{args:?} created the pseudo-terminal");
    }
}
