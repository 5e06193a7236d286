use super::*;

const MINIMAL: &str = r#"
[gateway]
id = "gw"
[[device]]
name = "a"
path = "/dev/ttyUSB0"
framing = "lines"
"#;

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.mqtt.port, 1883);
    assert_eq!(c.mqtt.qos, 1);
    assert_eq!(c.mqtt.topic_prefix, "sensorgate");
    assert_eq!(c.queue.max_readings.get(), 10_000);
    assert_eq!(c.queue.max_bytes, 8 * 1024 * 1024);
    assert_eq!(c.devices[0].stream().unwrap().format(), Format::Json);
    assert_eq!(c.devices[0].stream().unwrap().max_frame(), 1024);
    assert_eq!(c.devices[0].idle_timeout, Duration::from_secs(30));
    assert_eq!(c.devices[0].stream().unwrap().query(), None);
    assert_eq!(c.devices[0].stream().unwrap().write_timeout, Duration::from_secs(1));
    assert_eq!(c.client_id(), "sensorgate-gw");
}

/// TOML escapes are how control bytes get into a query; the string's bytes are what is sent.
#[test]
fn a_query_is_the_bytes_of_its_toml_string() {
    let text = MINIMAL.replace(
        "framing = \"lines\"",
        "framing = \"lines\"\nquery = \"\\u0002R\\r\\n\"\nquery_interval = \"5s\"\nwrite_timeout = \"200ms\"",
    );
    let c = Config::from_toml(&text).unwrap();
    let s = c.devices[0].stream().unwrap();
    assert_eq!(s.query(), Some((&b"\x02R\r\n"[..], Duration::from_secs(5))));
    assert_eq!(s.write_timeout, Duration::from_millis(200));
}

#[test]
fn unknown_key_names_key_and_line() {
    let text = MINIMAL.replace("framing = \"lines\"", "framing = \"lines\"\nbaudrate = 9600");
    let p = Config::from_toml(&text).unwrap_err();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].key, "device[0].baudrate");
    assert!(p[0].message.contains("unknown field `baudrate`"), "{}", p[0].message);
    assert_eq!(p[0].line, Some(8));
}

#[test]
fn bad_duration_names_the_key() {
    let text = MINIMAL.replace("framing = \"lines\"", "framing = \"lines\"\nidle_timeout = \"3 parsecs\"");
    let p = Config::from_toml(&text).unwrap_err();
    assert_eq!(p[0].key, "device[0].idle_timeout");
    assert!(p[0].message.contains("invalid duration"), "{}", p[0].message);
}

#[test]
fn all_semantic_problems_are_reported_at_once() {
    let text = r#"
[gateway]
id = "green/house"
[mqtt]
qos = 2
[[device]]
name = "a"
path = "/dev/ttyUSB0"
framing = "cobs"
format = "kv"
[[device]]
name = "a"
path = "/dev/ttyUSB0"
framing = "lines"
baud = 0
"#;
    let p = Config::from_toml(text).unwrap_err();
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["gateway.id", "mqtt.qos", "device[0].format", "device[1].name", "device[1].path", "device[1].baud"]
    );
    assert!(p.iter().all(|p| !p.fix.is_empty()));
}

#[test]
fn sizes_accept_units_and_plain_numbers() {
    let text = MINIMAL.replace("framing = \"lines\"", "framing = \"lines\"\nmax_frame = \"2KiB\"")
        + "[queue]\nmax_bytes = 65536\n";
    let c = Config::from_toml(&text).unwrap();
    assert_eq!(c.devices[0].stream().unwrap().max_frame(), 2048);
    assert_eq!(c.queue.max_bytes, 65536);
}

#[test]
fn max_packet_size_takes_a_size_and_is_bounded() {
    assert_eq!(Config::from_toml(MINIMAL).unwrap().mqtt.max_packet_size, 256 * 1024);
    let with = |v: &str| Config::from_toml(&format!("{MINIMAL}[mqtt]\nmax_packet_size = {v}\n"));
    assert_eq!(with("\"512B\"").unwrap().mqtt.max_packet_size, 512);
    assert_eq!(with("268435455").unwrap().mqtt.max_packet_size, 268_435_455);
    for bad in ["127", "\"256MiB\""] {
        let p = with(bad).unwrap_err();
        assert_eq!(p.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), ["mqtt.max_packet_size"], "{bad}");
    }
}
