//! Home Assistant discovery as Home Assistant's own code sees it: the real gateway publishes
//! its discovery messages to mosquitto (JSON entities, a binary device's channels, a Modbus
//! meter of `sensorgate simulate --modbus`, the gateway's diagnostics); every one of them is
//! validated by Home Assistant 2026.11's MQTT device-discovery schema and each component by its
//! platform's schema, templates compiled (tests/homeassistant/validate.py, run in the Debian sid
//! chroot scripts/test.sh builds: Home Assistant needs Python >= 3.14). Without that chroot
//! (not root, no debootstrap, no network) the test says so and skips.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Gateway, Mosquitto, Simulator, Subscriber};

fn ha_root() -> Option<PathBuf> {
    let root = common::interop_dir().join("ha-root");
    let ok = Command::new("chroot")
        .arg(&root)
        .args(["/ha/bin/python", "-c", "import homeassistant"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(root);
    }
    eprintln!(
        "SKIPPED: no Home Assistant chroot at {} (scripts/test.sh builds it as root with debootstrap)",
        root.display()
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_discovery_message_passes_home_assistants_own_schemas() {
    let Some(root) = ha_root() else { return };
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "homeassistant/#").await;
    let link = dir.path().join("bus");
    let (_sim, printed) = Simulator::start(dir.path(), &["--modbus", "5", "--link", link.to_str().unwrap()]).await;
    let text = format!(
        "[gateway]\nid = \"gh.1\"\n[mqtt]\nport = {}\n[homeassistant]\nenabled = true\n\
         [[device]]\nname = \"climate\"\npath = \"{}\"\nframing = \"lines\"\n\
         [[device.entity]]\nfield = \"temp\"\nname = \"Temperature\"\nunit = \"°C\"\ndevice_class = \"temperature\"\nstate_class = \"measurement\"\n\
         [[device.entity]]\nfield = \"hum\"\nunit = \"%\"\ndevice_class = \"humidity\"\n\
         [[device]]\nname = \"soil\"\npath = \"{}\"\nframing = \"cobs\"\n\
         [[device.channel]]\nid = 0\nname = \"moisture\"\nunit = \"%\"\n\
         [[device.channel]]\nid = 1\nname = \"pump_on\"\n{printed}",
        broker.port,
        dir.path().join("climate").display(),
        dir.path().join("soil").display(),
    );
    let gw = Gateway::start(dir.path(), &text);
    let mut configs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    while configs.len() < 4 {
        let (m, _) = sub.wait_for(Duration::from_secs(20), |m| m.topic.ends_with("/config")).await;
        configs.insert(m.topic.clone(), m.payload.clone());
    }
    drop(gw);

    let input: String = configs
        .iter()
        .map(|(topic, payload)| {
            let payload: serde_json::Value = serde_json::from_slice(payload).unwrap();
            serde_json::json!({"topic": topic, "payload": payload}).to_string() + "\n"
        })
        .collect();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/homeassistant/validate.py"),
        root.join("root/validate.py"),
    )
    .unwrap();
    std::fs::write(root.join("root/discovery.jsonl"), input).unwrap();
    let out = Command::new("chroot")
        .arg(&root)
        .args(["sh", "-c", "cd /root && /ha/bin/python validate.py < discovery.jsonl"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "Home Assistant refused a discovery message:\n{report}");
    for component in [
        "sensor temp",
        "sensor hum",
        "sensor moisture",
        "sensor pump_on",
        "binary_sensor relay",
        "binary_sensor door_closed",
        "sensor voltage",
        "sensor energy",
        "sensor queue_depth",
        "sensor uptime",
    ] {
        assert!(report.contains(&format!("ok {component} ")), "{component} validated:\n{report}");
    }
}
