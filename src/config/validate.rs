//! One validation pass over a parsed config that collects every problem, each with its key
//! and its fix.

use std::time::Duration;

use super::{Config, DeviceConfig, Input, MqttConfig, PortConfig, Problem, StreamConfig};
use crate::command::Command;
use crate::framing::Framing;
use crate::payload::RESERVED_KEY;

/// `mqtt.max_packet_size` bounds: below 128 bytes no reading fits beside its topic; above is
/// more than MQTT's remaining-length field can express.
const MIN_PACKET_SIZE: u64 = 128;
const MAX_PACKET_SIZE: u64 = 268_435_455;

/// The longest `query`: a command to a sensor, not a payload.
const MAX_QUERY: usize = 256;
/// `query_interval` and `write_timeout` floor: below it a tick or a write of a few bytes at
/// 9600 baud cannot be kept.
const MIN_WRITE_TIME: Duration = Duration::from_millis(10);

impl MqttConfig {
    /// A username and password would cross the network in clear text: plain TCP (no
    /// `[mqtt.tls]`) to a host that is not this machine. Loopback is exempt (a broker on the
    /// same host, or a local TLS-terminating proxy).
    fn cleartext_credentials(&self) -> Option<Problem> {
        if self.username.is_none() || self.tls.is_some() || is_loopback(&self.host) {
            return None;
        }
        Some(Problem::new(
            "mqtt.username",
            format!(
                "the username and password go to {}:{} over plain TCP, readable by anyone on the way",
                self.host, self.port
            ),
            "add an [mqtt.tls] section (and the broker's TLS port, usually port = 8883)",
        ))
    }
}

/// `localhost`, 127.0.0.0/8 and ::1: traffic that never leaves the machine.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Config {
    /// What works but should not be left so (the gateway runs; `check` prints these and
    /// still succeeds).
    pub fn warnings(&self) -> Vec<Problem> {
        self.mqtt.cleartext_credentials().into_iter().collect()
    }

    /// Every semantic problem, all at once.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        check_topic_name(&mut p, "gateway.id", &self.gateway.id);
        if self.gateway.metrics_interval < Duration::from_millis(100) {
            p.push(Problem::new("gateway.metrics_interval", "must be at least 100ms", "use e.g. \"30s\""));
        }
        let m = &self.mqtt;
        if m.host.trim().is_empty() {
            p.push(Problem::new("mqtt.host", "is empty", "set the broker's host name or address"));
        } else if m.host.contains("://")
            || m.host.contains('/')
            || (m.host.contains(':') && m.host.parse::<std::net::Ipv6Addr>().is_err())
        {
            p.push(Problem::new(
                "mqtt.host",
                format!("{:?} is not a host name or address (a scheme, port or path is included)", m.host),
                "give only the host, e.g. \"broker.local\"; the port goes in mqtt.port, TLS in [mqtt.tls]",
            ));
        }
        if m.port == 0 {
            p.push(Problem::new("mqtt.port", "must not be 0", "use the broker's port, usually 1883"));
        }
        if m.qos > 1 {
            p.push(Problem::new(
                "mqtt.qos",
                format!("QoS {} is not supported", m.qos),
                "use 1 (at least once, the default) or 0 (at most once)",
            ));
        }
        if m.topic_prefix.is_empty()
            || m.topic_prefix.starts_with('/')
            || m.topic_prefix.ends_with('/')
            || m.topic_prefix.contains(['+', '#', '\0'])
            || m.topic_prefix.split('/').any(str::is_empty)
        {
            p.push(Problem::new(
                "mqtt.topic_prefix",
                format!("{:?} is not a usable topic prefix", m.topic_prefix),
                "use levels separated by single '/', without '+', '#' or a leading/trailing '/', e.g. \"sensorgate\"",
            ));
        }
        if let Some(id) = &m.client_id {
            if id.is_empty() || id.len() > 128 {
                p.push(Problem::new(
                    "mqtt.client_id",
                    "must be 1 to 128 bytes",
                    "remove it to use sensorgate-<gateway.id>",
                ));
            }
        }
        if m.keep_alive < Duration::from_secs(5) || m.keep_alive > Duration::from_secs(65535) {
            p.push(Problem::new("mqtt.keep_alive", "must be between 5s and 65535s", "use e.g. \"30s\""));
        }
        if m.connect_timeout < Duration::from_secs(1) {
            p.push(Problem::new("mqtt.connect_timeout", "must be at least 1s", "use e.g. \"10s\""));
        }
        if !matches!(m.version, 4 | 5) {
            p.push(Problem::new(
                "mqtt.version",
                format!("MQTT protocol version {} is not supported", m.version),
                "use 4 (MQTT 3.1.1, the default) or 5 (MQTT 5)",
            ));
        }
        if m.inflight == 0 {
            p.push(Problem::new("mqtt.inflight", "must be at least 1", "use e.g. 100"));
        }
        if !(MIN_PACKET_SIZE..=MAX_PACKET_SIZE).contains(&m.max_packet_size) {
            p.push(Problem::new(
                "mqtt.max_packet_size",
                "must be between 128 bytes and 268435455 bytes (MQTT's largest packet)",
                "use the broker's limit, e.g. \"256KiB\"",
            ));
        }
        if m.reconnect_min.is_zero() || m.reconnect_min > m.reconnect_max {
            p.push(Problem::new(
                "mqtt.reconnect_min",
                "must be above zero and not above mqtt.reconnect_max",
                "use e.g. reconnect_min = \"200ms\", reconnect_max = \"30s\"",
            ));
        }
        match (&m.username, &m.password_file) {
            (None, Some(_)) => p.push(Problem::new(
                "mqtt.password_file",
                "is given without mqtt.username",
                "add mqtt.username, or remove mqtt.password_file",
            )),
            (_, Some(_)) => {
                if let Err(e) = self.mqtt.password() {
                    p.push(Problem::new(
                        "mqtt.password_file",
                        e.to_string(),
                        "check the path (relative paths are looked up in $CREDENTIALS_DIRECTORY): a regular file of at most 4KiB holding the password, readable by the gateway's user",
                    ));
                }
            }
            _ => {}
        }
        if let Some(tls) = &m.tls {
            if tls.client_cert.is_some() != tls.client_key.is_some() {
                p.push(Problem::new(
                    "mqtt.tls.client_cert",
                    "client_cert and client_key go together",
                    "give both (a certificate and its private key), or neither",
                ));
            } else if let Err(e) = tls.client_config() {
                // The message starts with the key it is about ("ca_file /x: ...").
                let msg = e.to_string();
                let key = match msg.split_whitespace().next() {
                    Some(k @ ("ca_file" | "client_cert" | "client_key")) => format!("mqtt.tls.{k}"),
                    _ => "mqtt.tls".to_string(),
                };
                p.push(Problem::new(key, msg, "point the mqtt.tls files at readable PEM files"));
            }
        }
        if let Some(allow) = &self.commands.allow {
            if allow.is_empty() && self.commands.enabled {
                p.push(Problem::new(
                    "commands.allow",
                    "is empty, so no command could run",
                    format!("list the commands to allow ({}), or set commands.enabled = false", Command::names()),
                ));
            }
            for (i, name) in allow.iter().enumerate() {
                if Command::from_name(name).is_none() {
                    p.push(Problem::new(
                        format!("commands.allow[{i}]"),
                        format!("{name:?} is not a command"),
                        format!("use some of: {}", Command::names()),
                    ));
                }
            }
        }
        let ha = &self.homeassistant;
        if ha.discovery_prefix.is_empty()
            || ha.discovery_prefix.contains(['+', '#', '\0'])
            || ha.discovery_prefix.split('/').any(str::is_empty)
        {
            p.push(Problem::new(
                "homeassistant.discovery_prefix",
                format!("{:?} is not a usable topic prefix", ha.discovery_prefix),
                "use Home Assistant's discovery prefix, \"homeassistant\" unless you changed it there",
            ));
        }
        if ha.expire_after < Duration::from_secs(1) {
            p.push(Problem::new("homeassistant.expire_after", "must be at least 1s", "use e.g. \"5m\""));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.filter) {
            p.push(Problem::new(
                "log.filter",
                format!("{:?} is not a log filter ({e})", self.log.filter),
                "use a level (\"info\", \"debug\") or directives like \"info,sensorgate::mqtt=debug\"",
            ));
        }
        if self.queue.max_bytes < 1024 {
            p.push(Problem::new("queue.max_bytes", "must be at least 1KiB", "use e.g. \"8MiB\""));
        }
        self.validate_spool(&mut p);
        self.validate_sparkplug(&mut p);
        if self.homeassistant.enabled {
            for (key, message, fix) in crate::homeassistant::id_problems(self) {
                p.push(Problem::new(&key, message, fix));
            }
        }
        if self.devices.is_empty() && self.buses.is_empty() {
            p.push(Problem::new(
                "device",
                "no [[device]] or [[bus]] is configured",
                "add a [[device]] table per listening serial port, or a [[bus]] per Modbus RTU bus",
            ));
        }
        for (i, d) in self.devices.iter().enumerate() {
            self.validate_device(&mut p, i, d);
        }
        for (b, bus) in self.buses.iter().enumerate() {
            bus.validate(&mut p, b);
            self.check_bus_against_others(&mut p, b, bus);
        }
        self.check_slave_names(&mut p);
        p
    }

    fn validate_spool(&self, p: &mut Vec<Problem>) {
        if self.mqtt.catch_up_rate == Some(0) {
            p.push(Problem::new("mqtt.catch_up_rate", "must be at least 1", "leave it out for twice the input rate"));
        }
        let s = &self.spool;
        if s.max_bytes < 64 * 1024 {
            p.push(Problem::new("spool.max_bytes", "must be at least 64KiB", "use e.g. \"256MiB\""));
        }
        if s.sync_interval < Duration::from_millis(10) || s.sync_interval > Duration::from_secs(3600) {
            p.push(Problem::new("spool.sync_interval", "must be between 10ms and 1h", "use e.g. \"1s\""));
        }
        let dirs = s.path(&self.gateway).map(|main| {
            // The Sparkplug output's spool lives beside the main one.
            let sparkplug = self.sparkplug.enabled.then(|| crate::sparkplug::spool_dir(&main));
            std::iter::once(main).chain(sparkplug)
        });
        for dir in dirs.into_iter().flatten() {
            if let Err(e) = crate::spool::probe_dir(&dir) {
                let key =
                    if s.dir.as_ref().is_some_and(|d| d.is_relative()) { "gateway.state_dir" } else { "spool.dir" };
                p.push(Problem::new(
                    key,
                    format!("the spool directory {} cannot be used: {e}", dir.display()),
                    "create it writable for the gateway's user (the systemd unit's StateDirectory= does), or choose another",
                ));
            }
        }
    }

    fn validate_sparkplug(&self, p: &mut Vec<Problem>) {
        let s = &self.sparkplug;
        if !s.enabled {
            return;
        }
        // Sparkplug ids are topic levels: no separators or wildcards, not empty.
        let bad = |id: &str| id.is_empty() || id.contains(['/', '+', '#']);
        if bad(&s.group_id) {
            p.push(Problem::new(
                "sparkplug.group_id",
                "must be set, without '/', '+' or '#'",
                "name the group of edge nodes, e.g. group_id = \"plant-1\"",
            ));
        }
        if bad(&s.edge_node(&self.gateway)) {
            p.push(Problem::new("sparkplug.edge_node_id", "must not contain '/', '+' or '#'", "e.g. \"greenhouse\""));
        }
        if s.primary_host_id.as_deref().is_some_and(bad) {
            p.push(Problem::new(
                "sparkplug.primary_host_id",
                "must not be empty or contain '/', '+' or '#'",
                "the host application's id, as in spBv1.0/STATE/<id>",
            ));
        }
        for d in
            self.devices.iter().map(|d| &d.name).chain(self.buses.iter().flat_map(|b| b.slaves.iter().map(|s| &s.name)))
        {
            if d.contains(['+', '#']) {
                p.push(Problem::new(
                    "sparkplug.enabled",
                    format!("device {d:?} cannot be a Sparkplug device id"),
                    "rename it",
                ));
            }
        }
        let m = self.sparkplug_mqtt();
        if let Some(problem) = m.mqtt.cleartext_credentials() {
            p.push(Problem { key: "sparkplug.mqtt.username".into(), ..problem });
        }
    }

    /// Slaves are devices: their names are topic levels, unique among every device.
    fn check_slave_names(&self, p: &mut Vec<Problem>) {
        let slaves: Vec<(String, &str)> = (self.buses.iter().enumerate())
            .flat_map(|(b, bus)| {
                bus.slaves.iter().enumerate().map(move |(s, sl)| (format!("bus[{b}].device[{s}]"), sl.name.as_str()))
            })
            .collect();
        for (k, (key, name)) in slaves.iter().enumerate() {
            check_topic_name(p, &format!("{key}.name"), name);
            let earlier = (self.devices.iter().position(|d| d.name == *name).map(|i| format!("device[{i}]")))
                .or_else(|| slaves[..k].iter().find(|(_, n)| n == name).map(|(other, _)| other.clone()));
            if let Some(earlier) = earlier {
                p.push(Problem::new(
                    format!("{key}.name"),
                    format!("{name:?} is also the name of {earlier}"),
                    "give every device its own name (slaves are devices: they have their own topics)",
                ));
            }
        }
    }

    /// A bus's path and name against the devices and the buses before it.
    fn check_bus_against_others(&self, p: &mut Vec<Problem>, b: usize, bus: &super::BusConfig) {
        let path = &bus.port.path;
        let other = self.devices.iter().position(|d| d.port.path == *path).map(|i| format!("device[{i}]"));
        let other =
            other.or_else(|| self.buses[..b].iter().position(|o| o.port.path == *path).map(|o| format!("bus[{o}]")));
        if let Some(other) = other {
            p.push(Problem::new(
                format!("bus[{b}].path"),
                format!("{} is also the path of {other}", path.display()),
                "one port is owned by one device or one bus; put every slave of a port under one [[bus]]",
            ));
        }
        if let Some(o) = self.buses[..b].iter().position(|o| o.name == bus.name) {
            p.push(Problem::new(
                format!("bus[{b}].name"),
                format!("{:?} is also the name of bus[{o}]", bus.name),
                "give every bus its own name",
            ));
        }
    }

    fn validate_device(&self, p: &mut Vec<Problem>, i: usize, d: &DeviceConfig) {
        let k = |field: &str| format!("device[{i}].{field}");
        check_topic_name(p, &k("name"), &d.name);
        if let Some(j) = self.devices[..i].iter().position(|o| o.name == d.name) {
            p.push(Problem::new(
                k("name"),
                format!("{:?} is also the name of device[{j}]", d.name),
                "give every device its own name",
            ));
        }
        if let Some(j) = self.devices[..i].iter().position(|o| o.port.path == d.port.path) {
            p.push(Problem::new(
                k("path"),
                format!("{} is also the path of device[{j}]", d.port.path.display()),
                "a port can be read by one device only; remove one of them",
            ));
        }
        check_port(p, &k(""), &d.port);
        if d.idle_timeout < Duration::from_millis(100) {
            p.push(Problem::new(k("idle_timeout"), "must be at least 100ms", "use e.g. \"30s\""));
        }
        match &d.input {
            Input::Stream(stream) => {
                self.validate_stream(p, i, stream);
                validate_query(p, i, stream, d.idle_timeout);
            }
            // Slaves come from [[bus]] tables, checked with their bus.
            Input::Modbus(_) => {}
        }
        // Fields of binary frames are named by channels; text formats name their own.
        let binary = d.stream().is_some_and(|s| s.format().is_binary());
        for (e, ent) in d.entities.iter().enumerate() {
            let key = |f: &str| format!("device[{i}].entity[{e}].{f}");
            if ent.field.is_empty() || ent.field == RESERVED_KEY {
                p.push(Problem::new(
                    key("field"),
                    format!("{:?} is not a reading field", ent.field),
                    "name a field the sensor sends, e.g. \"temp\"",
                ));
            }
            let unnamed_channel = ent.field.strip_prefix("ch").and_then(|n| n.parse::<u8>().ok()).is_some();
            if binary && !unnamed_channel && !d.channels().iter().any(|c| c.name == ent.field) {
                p.push(Problem::new(
                    key("field"),
                    format!("{:?} is not a channel of this binary device", ent.field),
                    "name a [[device.channel]] of this device (or ch<id> for an unnamed one)",
                ));
            }
            if d.entities[..e].iter().any(|o| o.field == ent.field) {
                p.push(Problem::new(
                    key("field"),
                    format!("{:?} has two entities", ent.field),
                    "keep one [[device.entity]] per field",
                ));
            }
            if let Some(sc) = &ent.state_class {
                if !matches!(sc.as_str(), "measurement" | "total" | "total_increasing") {
                    p.push(Problem::new(
                        key("state_class"),
                        format!("{sc:?} is not a Home Assistant state class"),
                        "use \"measurement\", \"total\" or \"total_increasing\"",
                    ));
                }
            }
        }
    }

    /// The `[[device]]` keys of a stream input: framing, format, frame cap, channels.
    fn validate_stream(&self, p: &mut Vec<Problem>, i: usize, s: &StreamConfig) {
        let k = |field: &str| format!("device[{i}].{field}");
        let (framing, format) = (s.framing, s.format());
        if !framing.carries(format) {
            let carrier = Framing::for_format(format);
            let kind = if format.is_binary() { "is binary" } else { "is a text format" };
            let formats: Vec<String> = framing.formats().iter().map(|f| format!("{:?}", f.as_str())).collect();
            p.push(Problem::new(
                k("format"),
                format!("{:?} {kind} and needs framing = {:?}", format.as_str(), carrier.as_str()),
                format!(
                    "use format = {} with {} (default {:?}), or framing = {:?}",
                    formats.join(" or "),
                    framing.as_str(),
                    framing.default_format().as_str(),
                    carrier.as_str()
                ),
            ));
        }
        let max = s.max_frame();
        if !(16..=65536).contains(&max) {
            p.push(Problem::new(k("max_frame"), "must be between 16 bytes and 64KiB", "use e.g. \"1KiB\""));
        } else if max as u64 > self.queue.max_bytes / 4 {
            p.push(Problem::new(
                k("max_frame"),
                "is larger than a quarter of queue.max_bytes",
                "lower max_frame or raise queue.max_bytes",
            ));
        }
        if !s.channels.is_empty() && !s.format().is_binary() {
            p.push(Problem::new(
                k("channel"),
                "channel names only apply to binary (postcard) frames",
                "remove the [[device.channel]] tables, text formats name their own fields",
            ));
        }
        for (c, ch) in s.channels.iter().enumerate() {
            if ch.name.is_empty() || ch.name == RESERVED_KEY || ch.name.chars().any(char::is_control) {
                p.push(Problem::new(
                    format!("device[{i}].channel[{c}].name"),
                    format!("{:?} cannot be used as a field name", ch.name),
                    format!("use a plain name such as \"temperature\" (not empty, not {:?})", RESERVED_KEY),
                ));
            }
            if s.channels[..c].iter().any(|o| o.id == ch.id) {
                p.push(Problem::new(
                    format!("device[{i}].channel[{c}].id"),
                    format!("channel id {} is listed twice", ch.id),
                    "give each channel id one entry",
                ));
            }
            // `ch<id>` is how an unnamed channel appears; another channel may not take that name.
            if ch.name.strip_prefix("ch").and_then(|n| n.parse::<u8>().ok()).is_some_and(|id| id != ch.id) {
                p.push(Problem::new(
                    format!("device[{i}].channel[{c}].name"),
                    format!("{:?} is the default name of channel {}", ch.name, &ch.name[2..]),
                    "choose a name that is not ch<number> of another channel",
                ));
            }
            if s.channels[..c].iter().any(|o| o.name == ch.name) {
                p.push(Problem::new(
                    format!("device[{i}].channel[{c}].name"),
                    format!("channel name {:?} is used twice", ch.name),
                    "give each channel its own name",
                ));
            }
        }
    }
}

/// The query keys of a stream input: `query` and `query_interval` together, bounded, and
/// answers expected more often than the device's `idle_timeout`.
fn validate_query(p: &mut Vec<Problem>, i: usize, s: &StreamConfig, idle_timeout: Duration) {
    let k = |field: &str| format!("device[{i}].{field}");
    match (&s.query, s.query_interval) {
        (Some(_), None) => p.push(Problem::new(
            k("query_interval"),
            "must be set when query is",
            "add how often the query is sent, e.g. query_interval = \"5s\"",
        )),
        (None, Some(_)) => p.push(Problem::new(
            k("query_interval"),
            "is set but query is not",
            "add the bytes the sensor answers, e.g. query = \"R\\r\", or remove query_interval",
        )),
        _ => {}
    }
    if let Some(q) = &s.query {
        if q.is_empty() {
            p.push(Problem::new(
                k("query"),
                "is empty",
                "write the bytes the sensor answers, e.g. query = \"R\\r\", or remove query and query_interval",
            ));
        } else if q.len() > MAX_QUERY {
            p.push(Problem::new(
                k("query"),
                format!("is {} bytes long, more than {MAX_QUERY}", q.len()),
                "a query is a short command; shorten it",
            ));
        }
    }
    match s.query_interval {
        Some(every) if every < MIN_WRITE_TIME => {
            p.push(Problem::new(k("query_interval"), "must be at least 10ms", "use e.g. \"5s\""));
        }
        // A sensor that speaks only when asked is silent between queries: it would be `stale`
        // (and its port reopened) before every answer.
        Some(every) if s.query.is_some() && every >= idle_timeout => p.push(Problem::new(
            k("idle_timeout"),
            format!(
                "is {} but query_interval is {}: the device would go stale between answers",
                humantime::format_duration(idle_timeout),
                humantime::format_duration(every)
            ),
            "set idle_timeout longer than query_interval, e.g. to a few intervals",
        )),
        _ => {}
    }
    if s.write_timeout < MIN_WRITE_TIME {
        p.push(Problem::new(k("write_timeout"), "must be at least 10ms", "remove it to use 1s"));
    }
}

/// The line settings of a port; `prefix` is the table's key with a trailing dot
/// (`device[0].`).
pub(super) fn check_port(p: &mut Vec<Problem>, prefix: &str, port: &PortConfig) {
    let k = |field: &str| format!("{prefix}{field}");
    if port.path.as_os_str().is_empty() {
        p.push(Problem::new(k("path"), "is empty", "use the port's path, e.g. /dev/serial/by-id/usb-..."));
    } else if port.path.is_relative() {
        p.push(Problem::new(
            k("path"),
            format!("{} is a relative path", port.path.display()),
            "use the full path, e.g. /dev/serial/by-id/usb-... or /dev/ttyUSB0",
        ));
    }
    if port.baud == 0 {
        p.push(Problem::new(k("baud"), "must be above 0", "use your sensor's baud rate, e.g. 115200"));
    }
    if !(5..=8).contains(&port.data_bits) {
        p.push(Problem::new(k("data_bits"), "must be 5, 6, 7 or 8", "remove it to use 8"));
    }
    if !(1..=2).contains(&port.stop_bits) {
        p.push(Problem::new(k("stop_bits"), "must be 1 or 2", "remove it to use 1"));
    }
    if port.open_timeout < Duration::from_millis(100) {
        p.push(Problem::new(k("open_timeout"), "must be at least 100ms", "use e.g. \"5s\""));
    }
}

/// Names used as topic levels: no wildcards, separators or NUL, nothing that needs quoting.
pub(super) fn check_topic_name(p: &mut Vec<Problem>, key: &str, name: &str) {
    let bad = name.is_empty()
        || name.len() > 64
        || name.chars().any(|c| matches!(c, '+' | '#' | '/' | '\0') || c.is_control() || c.is_whitespace());
    if bad {
        p.push(Problem::new(
            key,
            format!("{name:?} cannot be used in MQTT topics"),
            "use 1 to 64 characters without '+', '#', '/', spaces or control characters, e.g. \"greenhouse-1\"",
        ));
    }
}
