//! The shipped example config parses, and the values it shows as defaults are the defaults.

use sensorgate::config::Config;

fn example() -> Config {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/sensorgate.example.toml")).unwrap();
    Config::from_toml(&text).unwrap_or_else(|p| panic!("example config is invalid: {p:?}"))
}

fn minimal() -> Config {
    Config::from_toml(
        "[gateway]\nid = \"greenhouse\"\n[[device]]\nname = \"climate\"\npath = \"/dev/x\"\nframing = \"lines\"\n",
    )
    .unwrap()
}

#[test]
fn example_config_is_valid() {
    let c = example();
    assert_eq!(c.devices.len(), 3);
    assert_eq!(c.devices[2].channels().len(), 3);
}

#[test]
fn example_config_shows_the_real_defaults() {
    let (e, m) = (example(), minimal());
    // Debug output compares every field, so a default changed in code but not in the example fails.
    assert_eq!(format!("{:?}", e.gateway), format!("{:?}", m.gateway));
    assert_eq!(format!("{:?}", e.mqtt), format!("{:?}", m.mqtt));
    assert_eq!(format!("{:?}", e.queue), format!("{:?}", m.queue));
    assert_eq!(format!("{:?}", e.homeassistant), format!("{:?}", m.homeassistant));
    assert_eq!(format!("{:?}", e.commands), format!("{:?}", m.commands));
    assert_eq!(e.log, m.log);
    let (ed, md) = (&e.devices[0], &m.devices[0]);
    // Every line setting but the path, which differs on purpose.
    let port =
        |d: &sensorgate::config::DeviceConfig| sensorgate::config::PortConfig { path: "".into(), ..d.port.clone() };
    assert_eq!((port(ed), ed.idle_timeout), (port(md), md.idle_timeout));
    let (es, ms) = (ed.stream().unwrap(), md.stream().unwrap());
    assert_eq!(
        (es.format(), es.max_frame(), es.query(), es.write_timeout),
        (ms.format(), ms.max_frame(), ms.query(), ms.write_timeout)
    );
}
