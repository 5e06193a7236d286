//! A corpus of bad configurations, one case per class of mistake, each run through the real
//! binary (`sensorgate check --config FILE`): exit status 78, and stderr names the file, the key,
//! the problem and the fix. `run` refuses the same files with the same status.
//!
//! The corpus is a table ([`corpus`]); every case is checked and every failure reported at once.

mod common;

use std::path::Path;
use std::time::Duration;

const EX_CONFIG: i32 = 78;

const GW: &str = "[gateway]\nid = \"gw\"\n";
const DEV_A: &str = "[[device]]\nname = \"a\"\npath = \"/dev/ttyUSB0\"\nframing = \"lines\"\n";
const DEV_B: &str = "[[device]]\nname = \"b\"\npath = \"/dev/ttyUSB1\"\nframing = \"lines\"\n";
const COBS_A: &str = "[[device]]\nname = \"a\"\npath = \"/dev/ttyUSB0\"\nframing = \"cobs\"\n";

/// A valid gateway with device `a` (lines/json); `top` goes before the device (whole tables),
/// `dev` inside device `a`.
fn cfg(top: &str, dev: &str) -> String {
    format!("{GW}{top}{DEV_A}{dev}")
}

/// A gateway with bus `b` (`bus` adds keys to it) and slave `m` (unit 1; `slave` adds keys)
/// with one point (`point` replaces its keys after the name).
fn bus(bus: &str, slave: &str, point: &str) -> String {
    let point = if point.is_empty() { "table = \"holding\"\naddress = 0\ntype = \"u16\"\n" } else { point };
    format!(
        "{GW}[[bus]]\nname = \"b\"\npath = \"/dev/ttyUSB5\"\n{bus}[[bus.device]]\nname = \"m\"\nunit = 1\n{slave}[[bus.device.point]]\nname = \"p\"\n{point}"
    )
}

/// Like [`cfg`] with a COBS device `a`.
fn cobs(dev: &str) -> String {
    format!("{GW}{COBS_A}{dev}")
}

/// Device `a` with its `name = "a"` replaced.
fn named(name: &str) -> String {
    cfg("", "").replace("name = \"a\"", &format!("name = {name:?}"))
}

/// One expected problem in the output.
struct Want {
    /// Exactly as printed between the location and the message, e.g. `device[1].name`.
    key: &'static str,
    /// Each must occur in the message.
    message: &'static [&'static str],
    /// Must occur in the fix (which must not be empty).
    fix: &'static str,
}

struct Case {
    name: &'static str,
    text: String,
    want: Want,
    /// A fragment of `text` on the line the problem must point at (parse errors carry a line).
    line_of: Option<&'static str>,
}

fn case(
    name: &'static str,
    text: String,
    key: &'static str,
    message: &'static [&'static str],
    fix: &'static str,
) -> Case {
    Case { name, text, want: Want { key, message, fix }, line_of: None }
}

impl Case {
    fn at(mut self, fragment: &'static str) -> Self {
        assert!(self.text.contains(fragment), "{}: {fragment:?} is not in the text", self.name);
        self.line_of = Some(fragment);
        self
    }
}

const FIX_UNKNOWN: &str = "remove the key or correct its spelling";
const FIX_MISSING: &str = "add the key";
const FIX_DURATION: &str = "write durations with a unit, like \"500ms\", \"30s\" or \"2m\"";
const FIX_SIZE: &str = "write sizes like \"1KiB\" or \"8MiB\", or a number of bytes";
const FIX_SYNTAX: &str = "fix the TOML syntax at this line";
const FIX_TYPE: &str = "shows every key with its type";
const FIX_TOPIC: &str = "use 1 to 64 characters without '+', '#', '/', spaces or control characters";

// One line per case: a table reads better than rustfmt's seven lines per call.
#[rustfmt::skip]
fn corpus(dir: &Path) -> Vec<Case> {
    let missing = dir.join("no-such-dir/mqtt-password");
    let missing_ca = dir.join("no-such-dir/ca.pem");
    let not_pem = dir.join("not-a-cert.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let some_file = not_pem.display().to_string();
    let big_password = dir.join("big-password");
    std::fs::write(&big_password, "p".repeat(4097)).unwrap();
    let s = |p: &Path| p.display().to_string();
    vec![
        // --- unknown keys: top level, [mqtt], [[device]] (and the nested tables) ---
        case("unknown top-level key", format!("colour = \"blue\"\n{}", cfg("", "")), "colour", &["unknown field `colour`", "expected one of `gateway`"], FIX_UNKNOWN)
            .at("colour"),
        case("unknown top-level table", cfg("[gateway_settings]\nx = 1\n", ""), "gateway_settings", &["unknown field `gateway_settings`"], FIX_UNKNOWN)
            .at("[gateway_settings]"),
        case("unknown key in [mqtt]", cfg("[mqtt]\nhots = \"broker\"\n", ""), "mqtt.hots", &["unknown field `hots`", "`host`"], FIX_UNKNOWN)
            .at("hots"),
        case("unknown key in [mqtt.tls]", cfg("[mqtt.tls]\ncafile = \"/etc/ca.pem\"\n", ""), "mqtt.tls.cafile", &["unknown field `cafile`", "`ca_file`"], FIX_UNKNOWN)
            .at("cafile"),
        case("unknown key in [gateway]", format!("[gateway]\nid = \"gw\"\nname = \"x\"\n{DEV_A}"), "gateway.name", &["unknown field `name`"], FIX_UNKNOWN)
            .at("name = \"x\""),
        case("unknown key in [[device]] (second device)", format!("{GW}{DEV_A}{DEV_B}baudrate = 9600\n"), "device[1].baudrate", &["unknown field `baudrate`", "`baud`"], FIX_UNKNOWN)
            .at("baudrate"),
        case("unknown key in [[device.channel]]", cobs("[[device.channel]]\nid = 1\nname = \"t\"\ncolour = 1\n"), "device[0].channel[0].colour", &["unknown field `colour`"], FIX_UNKNOWN)
            .at("colour"),
        case("unknown key in [[device.entity]]", cfg("", "[[device.entity]]\nfield = \"temp\"\nunits = \"°C\"\n"), "device[0].entity[0].units", &["unknown field `units`", "`unit`"], FIX_UNKNOWN)
            .at("units"),
        // --- the spool: a directory that cannot be created, bounds ---
        case("spool dir under a file", cfg(&format!("[spool]\ndir = \"{some_file}/spool\"\n"), ""), "spool.dir", &["the spool directory", "cannot be used"], "create it writable"),
        case("spool too small", cfg("[spool]\ndir = \"/tmp\"\nmax_bytes = \"1KiB\"\n", ""), "spool.max_bytes", &["at least 64KiB"], "256MiB"),
        // --- Home Assistant ids ---
        case("HA: two devices, one HA id", format!("{GW}[homeassistant]\nenabled = true\n{DEV_A}[[device]]\nname = \"a.x\"\npath = \"/dev/ttyUSB9\"\nframing = \"lines\"\n[[device]]\nname = \"a_x\"\npath = \"/dev/ttyUSB8\"\nframing = \"lines\"\n"), "device[2].name", &["\"a_x\" and \"a.x\" are one device for Home Assistant"], "rename one"),
        // --- Sparkplug B ---
        case("sparkplug without group_id", cfg("[sparkplug]\nenabled = true\n", ""), "sparkplug.group_id", &["must be set"], "group_id = \"plant-1\""),
        case("sparkplug group_id with a slash", cfg("[sparkplug]\nenabled = true\ngroup_id = \"a/b\"\n", ""), "sparkplug.group_id", &["without '/'"], "plant-1"),
        case("sparkplug primary host with a wildcard", cfg("[sparkplug]\nenabled = true\ngroup_id = \"g\"\nprimary_host_id = \"scada#\"\n", ""), "sparkplug.primary_host_id", &["'#'"], "spBv1.0/STATE/<id>"),
        case("unknown key in [sparkplug.mqtt]", cfg("[sparkplug]\nenabled = true\ngroup_id = \"g\"\n[sparkplug.mqtt]\nhostname = \"x\"\n", ""), "sparkplug.mqtt.hostname", &["unknown field `hostname`"], FIX_UNKNOWN)
            .at("hostname"),
        case("catch_up_rate zero", cfg("[mqtt]\ncatch_up_rate = 0\n", ""), "mqtt.catch_up_rate", &["at least 1"], "twice the input rate"),
        // --- values that do not parse ---
        case("bad duration", cfg("", "idle_timeout = \"3 parsecs\"\n"), "device[0].idle_timeout", &["invalid duration \"3 parsecs\""], FIX_DURATION)
            .at("parsecs"),
        case("bad duration in [mqtt]", cfg("[mqtt]\nkeep_alive = \"soon\"\n", ""), "mqtt.keep_alive", &["invalid duration \"soon\""], FIX_DURATION)
            .at("soon"),
        case("bad size", cfg("", "max_frame = \"12 furlongs\"\n"), "device[0].max_frame", &["invalid size \"12 furlongs\""], FIX_SIZE)
            .at("furlongs"),
        case("bad size in [queue]", cfg("[queue]\nmax_bytes = \"lots\"\n", ""), "queue.max_bytes", &["invalid size \"lots\""], FIX_SIZE)
            .at("lots"),
        case("wrong type: port is a string", cfg("[mqtt]\nport = \"abc\"\n", ""), "mqtt.port", &["invalid type: string \"abc\", expected u16"], FIX_TYPE)
            .at("abc"),
        case("wrong type: port out of range", cfg("[mqtt]\nport = 70000\n", ""), "mqtt.port", &["70000", "expected u16"], FIX_TYPE)
            .at("70000"),
        case("wrong type: qos is a string", cfg("[mqtt]\nqos = \"1\"\n", ""), "mqtt.qos", &["invalid type: string \"1\""], FIX_TYPE)
            .at("qos"),
        case("unknown enum value", cfg("", "parity = \"mark\"\n"), "device[0].parity", &["unknown variant `mark`", "`none`, `odd`, `even`"], "use one of the expected values")
            .at("mark"),
        case("[device] instead of [[device]]", format!("{GW}[device]\nname = \"a\"\npath = \"/dev/ttyUSB0\"\nframing = \"lines\"\n"), "device", &["invalid type: map, expected a sequence"], FIX_TYPE)
            .at("[device]"),
        // --- missing required keys ---
        case("missing gateway.id", format!("[gateway]\nmetrics_interval = \"30s\"\n{DEV_A}"), "gateway.id", &["missing field `id`"], FIX_MISSING)
            .at("[gateway]"),
        case("missing device.framing", format!("{GW}{DEV_A}[[device]]\nname = \"b\"\npath = \"/dev/ttyUSB1\"\n"), "device[1].framing", &["missing field `framing`"], FIX_MISSING),
        case("missing device.path", format!("{GW}[[device]]\nname = \"a\"\nframing = \"lines\"\n"), "device[0].path", &["missing field `path`"], FIX_MISSING),
        case("missing [gateway]", DEV_A.to_string(), "gateway", &["missing field `gateway`"], FIX_MISSING),
        // --- devices that clash ---
        case("duplicate device name", format!("{GW}{DEV_A}{}", DEV_B.replace("\"b\"", "\"a\"")), "device[1].name", &["\"a\" is also the name of device[0]"], "give every device its own name"),
        case("duplicate device path", format!("{GW}{DEV_A}{}", DEV_B.replace("ttyUSB1", "ttyUSB0")), "device[1].path", &["/dev/ttyUSB0 is also the path of device[0]"], "a port can be read by one device only"),
        // --- names that cannot be topic levels ---
        case("device name with '/'", named("th/1"), "device[0].name", &["\"th/1\" cannot be used in MQTT topics"], FIX_TOPIC),
        case("device name with '+'", named("th+1"), "device[0].name", &["\"th+1\" cannot be used in MQTT topics"], FIX_TOPIC),
        case("device name with '#'", named("th#1"), "device[0].name", &["\"th#1\" cannot be used in MQTT topics"], FIX_TOPIC),
        case("device name with a space", named("th 1"), "device[0].name", &["\"th 1\" cannot be used in MQTT topics"], FIX_TOPIC),
        case("device name empty", named(""), "device[0].name", &["\"\" cannot be used in MQTT topics"], FIX_TOPIC),
        case("device name with a tab", named("th\t1"), "device[0].name", &["\"th\\t1\" cannot be used in MQTT topics"], FIX_TOPIC),
        case("device name of 65 characters", named(&"x".repeat(65)), "device[0].name", &["cannot be used in MQTT topics"], FIX_TOPIC),
        case("gateway.id with '/'", cfg("", "").replace("id = \"gw\"", "id = \"green/house\""), "gateway.id", &["\"green/house\" cannot be used in MQTT topics"], FIX_TOPIC),
        // --- MQTT ---
        case("QoS 2", cfg("[mqtt]\nqos = 2\n", ""), "mqtt.qos", &["QoS 2 is not supported"], "use 1 (at least once, the default) or 0"),
        case("MQTT 3.1", cfg("[mqtt]\nversion = 3\n", ""), "mqtt.version", &["version 3 is not supported"], "use 4 (MQTT 3.1.1, the default) or 5"),
        case("topic_prefix with '+'", cfg("[mqtt]\ntopic_prefix = \"site/+/gw\"\n", ""), "mqtt.topic_prefix", &["\"site/+/gw\" is not a usable topic prefix"], "without '+', '#'"),
        case("topic_prefix with '#'", cfg("[mqtt]\ntopic_prefix = \"site/#\"\n", ""), "mqtt.topic_prefix", &["\"site/#\" is not a usable topic prefix"], "without '+', '#'"),
        case("topic_prefix with an empty level", cfg("[mqtt]\ntopic_prefix = \"site//gw\"\n", ""), "mqtt.topic_prefix", &["is not a usable topic prefix"], "separated by single '/'"),
        case("reconnect_min above reconnect_max", cfg("[mqtt]\nreconnect_min = \"1m\"\nreconnect_max = \"10s\"\n", ""), "mqtt.reconnect_min", &["not above mqtt.reconnect_max"], "reconnect_min = \"200ms\""),
        case("password_file without username", cfg(&format!("[mqtt]\npassword_file = {:?}\n", some_file), ""), "mqtt.password_file", &["is given without mqtt.username"], "add mqtt.username"),
        case("password_file missing", cfg(&format!("[mqtt]\nusername = \"gw\"\npassword_file = {:?}\n", s(&missing)), ""), "mqtt.password_file", &["no-such-dir/mqtt-password cannot be read", "No such file"], "check the path"),
        case("password_file is a directory", cfg(&format!("[mqtt]\nusername = \"gw\"\npassword_file = {:?}\n", s(dir)), ""), "mqtt.password_file", &["is a directory"], "a regular file of at most 4KiB"),
        case("password_file over 4KiB", cfg(&format!("[mqtt]\nusername = \"gw\"\npassword_file = {:?}\n", s(&big_password)), ""), "mqtt.password_file", &["big-password is larger than 4096 bytes"], "a regular file of at most 4KiB"),
        case("password_file is a device", cfg("[mqtt]\nusername = \"gw\"\npassword_file = \"/dev/null\"\n", ""), "mqtt.password_file", &["/dev/null is not a regular file"], "a regular file of at most 4KiB"),
        case("client_cert without client_key", cfg(&format!("[mqtt.tls]\nclient_cert = {:?}\n", some_file), ""), "mqtt.tls.client_cert", &["client_cert and client_key go together"], "give both"),
        case("client_key without client_cert", cfg(&format!("[mqtt.tls]\nclient_key = {:?}\n", some_file), ""), "mqtt.tls.client_cert", &["client_cert and client_key go together"], "give both"),
        case("ca_file missing", cfg(&format!("[mqtt.tls]\nca_file = {:?}\n", s(&missing_ca)), ""), "mqtt.tls.ca_file", &["ca_file", "no-such-dir/ca.pem", "No such file"], "readable PEM files"),
        case("ca_file not PEM", cfg(&format!("[mqtt.tls]\nca_file = {:?}\n", some_file), ""), "mqtt.tls.ca_file", &["ca_file", "no PEM certificate"], "readable PEM files"),
        // --- commands ---
        case("unknown command in allow", cfg("[commands]\nenabled = true\nallow = [\"help\", \"reboot\"]\n", ""), "commands.allow[1]", &["\"reboot\" is not a command"], "use some of: restart_device, metrics, config, help"),
        case("empty allow", cfg("[commands]\nenabled = true\nallow = []\n", ""), "commands.allow", &["is empty, so no command could run"], "or set commands.enabled = false"),
        // --- devices ---
        case("framing cobs with format kv", cobs("format = \"kv\"\n"), "device[0].format", &["is a text format and needs framing = \"lines\""], "format = \"postcard\""),
        case("framing lines with format postcard", cfg("", "format = \"postcard\"\n"), "device[0].format", &["\"postcard\" is binary and needs framing = \"cobs\""], "framing = \"cobs\""),
        case("max_frame too big", cfg("", "max_frame = \"1MiB\"\n"), "device[0].max_frame", &["must be between 16 bytes and 64KiB"], "\"1KiB\""),
        case("max_frame too small", cfg("", "max_frame = 8\n"), "device[0].max_frame", &["must be between 16 bytes and 64KiB"], "\"1KiB\""),
        case("max_frame above a quarter of the queue", cfg("[queue]\nmax_bytes = \"64KiB\"\n", "max_frame = \"32KiB\"\n"), "device[0].max_frame", &["larger than a quarter of queue.max_bytes"], "raise queue.max_bytes"),
        case("zero baud", cfg("", "baud = 0\n"), "device[0].baud", &["must be above 0"], "115200"),
        case("bad data_bits", cfg("", "data_bits = 9\n"), "device[0].data_bits", &["must be 5, 6, 7 or 8"], "remove it to use 8"),
        case("bad stop_bits", cfg("", "stop_bits = 3\n"), "device[0].stop_bits", &["must be 1 or 2"], "remove it to use 1"),
        case("idle_timeout too short", cfg("", "idle_timeout = \"10ms\"\n"), "device[0].idle_timeout", &["must be at least 100ms"], "\"30s\""),
        case("query without query_interval", cfg("", "query = \"R\\r\"\n"), "device[0].query_interval", &["must be set when query is"], "query_interval = \"5s\""),
        case("query_interval without query", cfg("", "query_interval = \"5s\"\n"), "device[0].query_interval", &["is set but query is not"], "or remove query_interval"),
        case("empty query", cfg("", "query = \"\"\nquery_interval = \"5s\"\n"), "device[0].query", &["is empty"], "the bytes the sensor answers"),
        case("query over 256 bytes", cfg("", &format!("query = \"{}\"\nquery_interval = \"5s\"\n", "R".repeat(257))), "device[0].query", &["is 257 bytes long, more than 256"], "shorten it"),
        case("query_interval too short", cfg("", "query = \"R\\r\"\nquery_interval = \"5ms\"\n"), "device[0].query_interval", &["must be at least 10ms"], "\"5s\""),
        case("query_interval not below idle_timeout", cfg("", "query = \"R\\r\"\nquery_interval = \"1m\"\n"), "device[0].idle_timeout", &["is 30s but query_interval is 1m: the device would go stale between answers"], "longer than query_interval"),
        case("write_timeout too short", cfg("", "write_timeout = \"1ms\"\n"), "device[0].write_timeout", &["must be at least 10ms"], "remove it to use 1s"),
        case("query as a number", cfg("", "query = 82\nquery_interval = \"5s\"\n"), "device[0].query", &["invalid type: integer `82`, expected a string"], FIX_TYPE)
            .at("query = 82"),
        case("channels on a text device", cfg("", "[[device.channel]]\nid = 1\nname = \"t\"\n"), "device[0].channel", &["only apply to binary (postcard) frames"], "remove the [[device.channel]] tables"),
        case("duplicate channel id", cobs("[[device.channel]]\nid = 1\nname = \"t\"\n[[device.channel]]\nid = 1\nname = \"h\"\n"), "device[0].channel[1].id", &["channel id 1 is listed twice"], "give each channel id one entry"),
        case("duplicate channel name", cobs("[[device.channel]]\nid = 1\nname = \"t\"\n[[device.channel]]\nid = 2\nname = \"t\"\n"), "device[0].channel[1].name", &["channel name \"t\" is used twice"], "its own name"),
        case("channel named like another channel's default", cobs("[[device.channel]]\nid = 255\nname = \"ch1\"\n"), "device[0].channel[0].name", &["\"ch1\" is the default name of channel 1"], "not ch<number> of another channel"),
        case("channel named _gw", cobs("[[device.channel]]\nid = 1\nname = \"_gw\"\n"), "device[0].channel[0].name", &["\"_gw\" cannot be used as a field name"], "not \"_gw\""),
        case("bad entity state_class", cfg("", "[[device.entity]]\nfield = \"temp\"\nstate_class = \"average\"\n"), "device[0].entity[0].state_class", &["\"average\" is not a Home Assistant state class"], "\"measurement\""),
        case("entity for _gw", cfg("", "[[device.entity]]\nfield = \"_gw\"\n"), "device[0].entity[0].field", &["\"_gw\" is not a reading field"], "name a field the sensor sends"),
        // --- the rest ---
        case("bad log.filter", cfg("[log]\nfilter = \"info,[[[\"\n", ""), "log.filter", &["\"info,[[[\" is not a log filter"], "\"info,sensorgate::mqtt=debug\""),
        case("metrics_interval too short", cfg("", "").replace("id = \"gw\"", "id = \"gw\"\nmetrics_interval = \"1ms\""), "gateway.metrics_interval", &["must be at least 100ms"], "\"30s\""),
        case("invalid TOML syntax", cfg("[mqtt\nport = 1883\n", ""), "(top level)", &["invalid table header; expected"], FIX_SYNTAX)
            .at("[mqtt"),
        case("unterminated string", cfg("", "").replace("id = \"gw\"", "id = \"gw"), "(top level)", &["invalid basic string"], FIX_SYNTAX),
        case("key given twice", cfg("", "baud = 9600\nbaud = 19200\n"), "(top level)", &["duplicate key `baud`"], "keep one of the repeated keys")
            .at("baud = 19200"),
        case("empty file", String::new(), "gateway", &["missing field `gateway`"], FIX_MISSING),
        case("host with a port", cfg("[mqtt]\nhost = \"broker.local:1883\"\n", ""), "mqtt.host", &["is not a host name or address"], "the port goes in mqtt.port"),
        case("host with a scheme", cfg("[mqtt]\nhost = \"mqtt://broker.local\"\n", ""), "mqtt.host", &["a scheme, port or path is included"], "give only the host"),
        case("relative device path", cfg("", "").replace("/dev/ttyUSB0", "ttyUSB0"), "device[0].path", &["ttyUSB0 is a relative path"], "use the full path"),
        case("entity for a channel a binary device lacks", cobs("[[device.channel]]\nid = 1\nname = \"t\"\n[[device.entity]]\nfield = \"humidity\"\n"), "device[0].entity[0].field", &["\"humidity\" is not a channel of this binary device"], "name a [[device.channel]]"),
        case("duration without a unit", cfg("", "idle_timeout = 30\n"), "device[0].idle_timeout", &["a duration needs a unit, e.g. \"30s\""], FIX_DURATION),
        case("negative size", cfg("", "max_frame = -1\n"), "device[0].max_frame", &["invalid size -1", "cannot be negative"], FIX_SIZE),
        case("zero max_readings", cfg("[queue]\nmax_readings = 0\n", ""), "queue.max_readings", &["nonzero"], "use a number above 0"),
        case("no devices", GW.to_string(), "device", &["no [[device]] or [[bus]] is configured"], "add a [[device]] table"),
        // --- Modbus buses ---
        case("unit out of range", bus("", "", "").replace("unit = 1", "unit = 248"), "bus[0].device[0].unit", &["unit 248 is not a slave address"], "1 to 247"),
        case("unit 0 (broadcast)", bus("", "", "").replace("unit = 1", "unit = 0"), "bus[0].device[0].unit", &["unit 0 is not a slave address"], "0 is broadcast"),
        case("two slaves with one unit", bus("", "", "") + "[[bus.device]]\nname = \"n\"\nunit = 1\n[[bus.device.point]]\nname = \"q\"\ntable = \"coil\"\naddress = 0\ntype = \"bool\"\n", "bus[0].device[1].unit", &["unit 1 is also bus[0].device[0]"], "its own address"),
        case("unknown table", bus("", "", "table = \"registers\"\naddress = 0\ntype = \"u16\"\n"), "bus[0].device[0].point[0].table", &["unknown variant `registers`", "`holding`"], "use one of the expected values")
            .at("registers"),
        case("unknown point type", bus("", "", "table = \"holding\"\naddress = 0\ntype = \"float\"\n"), "bus[0].device[0].point[0].type", &["unknown variant `float`", "`f32`"], "use one of the expected values"),
        case("a 32-bit type on a coil", bus("", "", "table = \"coil\"\naddress = 0\ntype = \"u32\"\n"), "bus[0].device[0].point[0].type", &["a coil table holds single bits, not u32"], "type = \"bool\""),
        case("word_order on a 16-bit type", bus("", "", "table = \"holding\"\naddress = 0\ntype = \"i16\"\nword_order = \"little\"\n"), "bus[0].device[0].point[0].word_order", &["applies to 32- and 64-bit types, not i16"], "remove word_order"),
        case("overlapping points of different types", bus("", "", "table = \"holding\"\naddress = 0\ntype = \"u32\"\n[[bus.device.point]]\nname = \"q\"\ntable = \"holding\"\naddress = 1\ntype = \"u16\"\n"), "bus[0].device[0].point[1].address", &["holding 1..2 overlaps point \"p\" (u32 at 0)"], "one register cannot hold two values"),
        case("writable input register", bus("", "", "table = \"input\"\naddress = 0\ntype = \"u16\"\nwritable = true\n"), "bus[0].device[0].point[0].writable", &["the input table is read-only"], "only coil and holding points"),
        case("point past the last address", bus("", "", "table = \"holding\"\naddress = 65535\ntype = \"f32\"\n"), "bus[0].device[0].point[0].address", &["2 registers from 65535 run past the last address"], "register map"),
        case("scale 0", bus("", "", "table = \"holding\"\naddress = 0\ntype = \"u16\"\nscale = 0.0\n"), "bus[0].device[0].point[0].scale", &["must be a finite number other than 0"], "0.1"),
        case("slave without points", format!("{GW}[[bus]]\nname = \"b\"\npath = \"/dev/ttyUSB5\"\n[[bus.device]]\nname = \"m\"\nunit = 1\n"), "bus[0].device[0].point", &["the slave has no points"], "add a [[bus.device.point]]"),
        case("bus without slaves", format!("{GW}[[bus]]\nname = \"b\"\npath = \"/dev/ttyUSB5\"\n"), "bus[0].device", &["the bus has no slaves"], "add a [[bus.device]]"),
        case("slave named like a device", DEV_A.to_string() + &bus("", "", "").replace("name = \"m\"", "name = \"a\""), "bus[0].device[0].name", &["\"a\" is also the name of device[0]"], "its own name"),
        case("bus on a device's port", DEV_A.to_string() + &bus("", "", "").replace("/dev/ttyUSB5", "/dev/ttyUSB0"), "bus[0].path", &["/dev/ttyUSB0 is also the path of device[0]"], "one port is owned by one device or one bus"),
        case("request_timeout too short", bus("request_timeout = \"1ms\"\n", "", ""), "bus[0].request_timeout", &["must be between 10ms and 60s"], "\"300ms\""),
        case("poll_interval too short", bus("", "poll_interval = \"1ms\"\n", ""), "bus[0].device[0].poll_interval", &["must be at least 10ms"], "\"1s\""),
        case("unknown key in [[bus.device.point]]", bus("", "", "table = \"holding\"\naddress = 0\ntype = \"u16\"\nregister = 3\n"), "bus[0].device[0].point[0].register", &["unknown field `register`"], FIX_UNKNOWN)
            .at("register = 3"),
        case("point named _gw", bus("", "", "").replace("name = \"p\"", "name = \"_gw\""), "bus[0].device[0].point[0].name", &["\"_gw\" cannot be used as a field name"], "not \"_gw\""),
    ]
}

/// The problems in `sensorgate check` output, one string per problem (continuation lines of a
/// multi-line message joined with '\n'), without the leading `FILE[:LINE]: `; and the count
/// the header line announces.
fn problems(stderr: &str, path: &str) -> (Option<usize>, Vec<(Option<usize>, String)>) {
    let mut announced = None;
    let mut out: Vec<(Option<usize>, String)> = Vec::new();
    for line in stderr.lines() {
        if let Some(rest) = line.strip_prefix(path) {
            if let Some(n) = rest.strip_prefix(": ").and_then(|r| r.strip_suffix(" problem(s) in the configuration")) {
                announced = n.parse().ok();
                continue;
            }
            let (line_no, rest) = match rest.strip_prefix(':').map(|r| r.split_once(": ")) {
                Some(Some((n, r))) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => (n.parse().ok(), r),
                _ => (None, rest.strip_prefix(": ").unwrap_or(rest)),
            };
            out.push((line_no, rest.to_string()));
        } else if let Some(last) = out.last_mut() {
            last.1.push('\n');
            last.1.push_str(line);
        }
    }
    (announced, out)
}

/// Checks one expected problem against the parsed output; `Err` says what is wrong.
fn find<'a>(found: &'a [(Option<usize>, String)], want: &Want) -> Result<&'a (Option<usize>, String), String> {
    let prefix = format!("{}: ", want.key);
    let p =
        found.iter().find(|(_, p)| p.starts_with(&prefix)).ok_or_else(|| format!("no problem for key {}", want.key))?;
    let (message, fix) = p.1[prefix.len()..].rsplit_once(" (fix: ").ok_or("no `(fix: ...)`")?;
    for m in want.message {
        if !message.contains(m) {
            return Err(format!("message {message:?} lacks {m:?}"));
        }
    }
    let fix = fix.strip_suffix(')').ok_or("fix not closed")?;
    if fix.trim().is_empty() || !fix.contains(want.fix) {
        return Err(format!("fix {fix:?} lacks {:?}", want.fix));
    }
    Ok(p)
}

fn check(path: &Path) -> (Option<i32>, String, String) {
    common::sensorgate("check", path)
}

#[test]
fn every_class_of_mistake_is_refused_with_file_key_problem_and_fix() {
    let dir = common::tempdir();
    let cases = corpus(dir.path());
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case-{i:02}.toml"));
        std::fs::write(&path, &c.text).unwrap();
        let (code, _, stderr) = check(&path);
        let path_s = path.display().to_string();
        let mut fail = |why: String| failures.push(format!("[{}] {why}\n  stderr: {stderr}", c.name));
        if code != Some(EX_CONFIG) {
            fail(format!("exit status {code:?}, want {EX_CONFIG}"));
            continue;
        }
        let (announced, found) = problems(&stderr, &path_s);
        if announced != Some(1) || found.len() != 1 {
            fail(format!("want exactly 1 problem announced and listed, got {announced:?} and {}", found.len()));
        }
        match find(&found, &c.want) {
            Err(why) => fail(why),
            Ok((line, _)) => {
                if let Some(fragment) = c.line_of {
                    let want_line = c.text.lines().position(|l| l.contains(fragment)).unwrap() + 1;
                    if *line != Some(want_line) {
                        fail(format!("points at line {line:?}, want {want_line} ({fragment:?})"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn the_corpus_base_is_valid() {
    // Every case is one mistake away from these: they must pass, or the cases prove nothing.
    let dir = common::tempdir();
    for (i, text) in [cfg("", ""), cobs(""), format!("{GW}{DEV_A}{DEV_B}")].iter().enumerate() {
        let path = dir.path().join(format!("ok-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (code, stdout, stderr) = check(&path);
        assert_eq!(code, Some(0), "{text}\n{stderr}");
        assert!(stdout.contains(": ok ("), "{stdout}");
    }
}

#[test]
fn several_semantic_problems_are_listed_at_once() {
    let dir = common::tempdir();
    let path = dir.path().join("many.toml");
    let text = "[gateway]\nid = \"green house\"\nmetrics_interval = \"10ms\"\n\
         [mqtt]\nqos = 2\ntopic_prefix = \"a/#\"\npassword_file = \"/etc/hostname\"\n\
         reconnect_min = \"1m\"\nreconnect_max = \"1s\"\n\
         [log]\nfilter = \"[[[\"\n\
         [[device]]\nname = \"a/b\"\npath = \"/dev/ttyUSB0\"\nframing = \"cobs\"\nformat = \"kv\"\nbaud = 0\n\
         [[device]]\nname = \"x\"\npath = \"/dev/ttyUSB1\"\nframing = \"lines\"\ndata_bits = 9\nmax_frame = 8\n\
         [[device.entity]]\nfield = \"t\"\nstate_class = \"avg\"\n\
         [[device]]\nname = \"x\"\npath = \"/dev/ttyUSB1\"\nframing = \"cobs\"\n\
         [[device.channel]]\nid = 3\nname = \"_gw\"\n[[device.channel]]\nid = 3\nname = \"t\"\n";
    std::fs::write(&path, text).unwrap();
    let (code, _, stderr) = check(&path);
    assert_eq!(code, Some(EX_CONFIG), "{stderr}");
    let (announced, found) = problems(&stderr, &path.display().to_string());
    let want = [
        "gateway.id",
        "gateway.metrics_interval",
        "mqtt.qos",
        "mqtt.topic_prefix",
        "mqtt.reconnect_min",
        "mqtt.password_file",
        "log.filter",
        "device[0].name",
        "device[0].baud",
        "device[0].format",
        "device[1].data_bits",
        "device[1].max_frame",
        "device[1].entity[0].state_class",
        "device[2].name",
        "device[2].path",
        "device[2].channel[0].name",
        "device[2].channel[1].id",
    ];
    let keys: Vec<&str> = found.iter().map(|(_, p)| p.split(": ").next().unwrap()).collect();
    assert_eq!(keys, want, "every problem, in file order:\n{stderr}");
    assert_eq!(announced, Some(want.len()), "{stderr}");
    for (_, p) in &found {
        assert!(p.contains(" (fix: ") && !p.ends_with("(fix: )"), "{p}");
    }
}

#[test]
fn a_missing_config_file_is_a_config_error_too() {
    let dir = common::tempdir();
    let path = dir.path().join("nowhere.toml");
    let (code, _, stderr) = check(&path);
    assert_eq!(code, Some(EX_CONFIG), "{stderr}");
    assert!(
        stderr.contains(&*path.display().to_string()) && stderr.contains("cannot read the config file"),
        "{stderr}"
    );
    assert!(stderr.contains("No such file") && stderr.contains("(fix: check the path"), "{stderr}");
}

/// `run` validates before touching a port or the broker: it exits 78 at once, with the same
/// report as `check`.
#[test]
fn run_refuses_the_same_files_with_78() {
    let dir = common::tempdir();
    let cases = corpus(dir.path());
    let picked = ["QoS 2", "unknown key in [[device]] (second device)", "invalid TOML syntax", "duplicate device path"];
    for name in picked {
        let c = cases.iter().find(|c| c.name == name).unwrap();
        let sub = dir.path().join(name.replace(|ch: char| !ch.is_ascii_alphanumeric(), "_"));
        std::fs::create_dir(&sub).unwrap();
        let mut gw = common::Gateway::start(&sub, &c.text);
        let status = gw.wait(Duration::from_secs(10));
        let log = gw.log_text();
        assert_eq!(status.code(), Some(EX_CONFIG), "[{name}] {log}");
        let (_, found) = problems(&log, &gw.config.display().to_string());
        assert_eq!(found.len(), 1, "[{name}] {log}");
        find(&found, &c.want).unwrap_or_else(|why| panic!("[{name}] {why}: {log}"));
        assert!(!log.contains("Gateway running"), "[{name}] {log}");
    }
}

/// Runs `sensorgate check` like [`check`], but kills it if it has not finished within
/// `limit` (a check that hangs is itself the failure).
fn check_within(path: &Path, limit: Duration) -> (Option<i32>, String) {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args(["check", "--config"])
        .arg(path)
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => {
            let out = out.unwrap();
            (out.status.code(), String::from_utf8_lossy(&out.stderr).into())
        }
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid; the waiting thread reaps it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("`sensorgate check` with {} still running after {limit:?}", path.display());
        }
    }
}

/// A FIFO would block `open` until a writer comes; /dev/zero never ends. Either must be a
/// quick, clear config error, never a hang or a memory blow-up.
#[test]
fn a_password_file_that_is_a_fifo_or_dev_zero_is_refused_at_once() {
    let dir = common::tempdir();
    let fifo = dir.path().join("password-fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo has no other preconditions.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    for (file, want) in [
        (fifo.as_path(), &["password-fifo is not a regular file"][..]),
        (Path::new("/dev/zero"), &["/dev/zero is not a regular file"]),
    ] {
        let path = dir.path().join("pw.toml");
        std::fs::write(
            &path,
            cfg(&format!("[mqtt]\nusername = \"gw\"\npassword_file = {:?}\n", file.display().to_string()), ""),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let (code, stderr) = check_within(&path, Duration::from_secs(5));
        assert_eq!(code, Some(EX_CONFIG), "{stderr}");
        let (_, found) = problems(&stderr, &path.display().to_string());
        let want = Want { key: "mqtt.password_file", message: want, fix: "a regular file of at most 4KiB" };
        find(&found, &want).unwrap_or_else(|why| panic!("{why}: {stderr}"));
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }
}

/// Credentials over plain TCP to another host are worth a warning; `check` still passes (the
/// config works). Loopback and TLS are quiet.
#[test]
fn cleartext_credentials_to_another_host_are_warned_about_but_pass() {
    let dir = common::tempdir();
    let secret = dir.path().join("mqtt-password");
    std::fs::write(&secret, "pw\n").unwrap();
    let creds = format!("username = \"gw\"\npassword_file = {:?}\n", secret.display().to_string());
    let cases = [
        ("broker.example.net", "", true),
        ("192.0.2.10", "", true),
        ("127.0.0.1", "", false),
        ("localhost", "", false),
        ("::1", "", false),
        ("broker.example.net", "[mqtt.tls]\n", false),
    ];
    for (host, tls, warned) in cases {
        let path = dir.path().join("creds.toml");
        std::fs::write(&path, cfg(&format!("[mqtt]\nhost = {host:?}\n{creds}{tls}"), "")).unwrap();
        let (code, stdout, stderr) = check(&path);
        assert_eq!(code, Some(0), "[{host} {tls}] {stderr}");
        assert!(stdout.contains(": ok ("), "{stdout}");
        let want = format!(
            "warning: {}: mqtt.username: the username and password go to {host}:1883 over plain TCP",
            path.display()
        );
        assert_eq!(stderr.contains(&want), warned, "[{host} {tls}] {stderr}");
        assert_eq!(stderr.contains("warning:"), warned, "[{host} {tls}] {stderr}");
        if warned {
            assert!(stderr.contains("(fix: add an [mqtt.tls] section"), "{stderr}");
        }
    }
    // Without credentials there is nothing to leak.
    let path = dir.path().join("anon.toml");
    std::fs::write(&path, cfg("[mqtt]\nhost = \"broker.example.net\"\n", "")).unwrap();
    let (code, _, stderr) = check(&path);
    assert_eq!((code, stderr.as_str()), (Some(0), ""));
}
