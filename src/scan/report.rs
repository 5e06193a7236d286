//! A scan's results as a config to paste (`[[device]]` and `[[bus]]` tables that `sensorgate
//! check` accepts, the rest as comments), as JSON, and as one progress line per port.

use std::fmt::Write;

use serde::Serialize;

use super::modbus::BusReport;
use super::{Field, Outcome, PortReport, Verdict};
use crate::decode::Format;

/// The JSON document of `scan --json`.
#[derive(Serialize)]
struct Document<'a> {
    ports: &'a [PortReport],
}

/// `reports` as pretty JSON.
pub fn json(reports: &[PortReport]) -> String {
    serde_json::to_string_pretty(&Document { ports: reports }).expect("scan results serialise")
}

/// One line saying what a port came to.
pub fn summary(r: &PortReport) -> String {
    let path = r.port.path.display();
    let mut line = match &r.outcome {
        Outcome::Found { baud, verdict: Verdict::Recognised { format, readings, .. } } => {
            format!("{path}: {} at {baud} baud ({readings} readings)", kind(*format))
        }
        Outcome::Found { baud, verdict: Verdict::Text { lines, .. } } => {
            format!("{path}: text of unknown shape at {baud} baud ({lines} lines; neither JSON nor key=value)")
        }
        Outcome::Found { baud, verdict } => format!("{path}: {verdict:?} at {baud} baud"),
        Outcome::Noise { bytes } => {
            format!("{path}: noise: probably the wrong baud rate ({bytes} bytes at {}, none readable)", bauds(r))
        }
        Outcome::Silent => match &r.modbus {
            Some(bus) => format!(
                "{path}: silent; Modbus RTU unit(s) {} answer at {} baud {}",
                units(bus),
                bus.setting.baud,
                bus.setting.label()
            ),
            None => format!("{path}: silent at {} baud (nothing received)", bauds(r)),
        },
        Outcome::Busy => format!("{path}: busy: another program holds it (the gateway?); skipped"),
        Outcome::Failed { reason } => format!("{path}: {reason}"),
        Outcome::NotScanned => format!("{path}: not scanned"),
    };
    if r.interrupted {
        line += " [scan stopped before this port was done]";
    }
    line
}

fn kind(format: Format) -> &'static str {
    match format {
        Format::Json => "JSON lines",
        Format::Kv => "key=value lines",
        Format::Postcard => "COBS + postcard frames (CRC valid)",
    }
}

fn bauds(r: &PortReport) -> String {
    r.listened.iter().map(|h| h.baud.to_string()).collect::<Vec<_>>().join(", ")
}

fn units(bus: &BusReport) -> String {
    bus.answers.iter().map(|a| a.unit.to_string()).collect::<Vec<_>>().join(", ")
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The config to paste: a table for every port where something was recognised, a comment for
/// every other port.
pub fn toml(reports: &[PortReport]) -> String {
    let mut out = String::from("# sensorgate scan: paste the tables below into your config.\n");
    for r in reports {
        out.push('\n');
        let _ = writeln!(out, "# {}", summary(r));
        if let Some(stable) = &r.port.stable_path {
            if *stable != r.port.path {
                let _ = writeln!(out, "# (stable name: {})", stable.display());
            }
        }
        match &r.outcome {
            Outcome::Found { baud, verdict: Verdict::Recognised { framing, format, fields, .. } } => {
                let _ = writeln!(out, "[[device]]");
                let _ = writeln!(out, "name = {}", quote(&r.name));
                let _ = writeln!(out, "path = {}", quote(&r.port.config_path().display().to_string()));
                let _ = writeln!(out, "baud = {baud}");
                let _ = writeln!(out, "framing = {}", quote(framing.as_str()));
                let _ = writeln!(out, "format = {}", quote(format.as_str()));
                if format.is_binary() {
                    channels(&mut out, fields);
                } else {
                    let list: Vec<String> = fields.iter().map(|f| format!("{} (e.g. {})", f.name, f.example)).collect();
                    let _ = writeln!(out, "# fields seen: {}", list.join(", "));
                }
            }
            Outcome::Found { verdict: Verdict::Text { samples, .. }, .. } => {
                let _ = writeln!(out, "# what it sent, e.g.:");
                for s in samples {
                    let _ = writeln!(out, "#   {s}");
                }
            }
            Outcome::Silent => {
                if let Some(bus) = &r.modbus {
                    bus_table(&mut out, r, bus);
                }
            }
            _ => {}
        }
    }
    out
}

/// The channels binary frames carried (ids and types: the wire has no names or units), and a
/// template to name them.
fn channels(out: &mut String, fields: &[Field]) {
    let list: Vec<String> = fields
        .iter()
        .map(|f| {
            let ty = match &f.example {
                serde_json::Value::Bool(_) => "bool",
                v if v.is_i64() || v.is_u64() => "i32",
                _ => "f32",
            };
            format!("{} {ty} (e.g. {})", f.name.trim_start_matches("ch"), f.example)
        })
        .collect();
    let _ = writeln!(out, "# channels seen (id, type): {}", list.join(", "));
    let _ = writeln!(out, "# The frames carry channel ids and values, no names or units: readings call them ch<id>");
    let _ = writeln!(out, "# until named, e.g.:");
    if let Some(f) = fields.first() {
        let _ = writeln!(out, "# [[device.channel]]");
        let _ = writeln!(out, "# id = {}", f.name.trim_start_matches("ch"));
        let _ = writeln!(out, "# name = \"temperature\"");
        let _ = writeln!(out, "# unit = \"°C\"");
    }
}

fn bus_table(out: &mut String, r: &PortReport, bus: &BusReport) {
    let _ = writeln!(out, "[[bus]]");
    let _ = writeln!(out, "name = {}", quote(&r.name));
    let _ = writeln!(out, "path = {}", quote(&r.port.config_path().display().to_string()));
    let _ = writeln!(out, "baud = {}", bus.setting.baud);
    let _ = writeln!(out, "parity = {}", quote(bus.setting.parity.as_str()));
    let _ = writeln!(out, "data_bits = 8");
    let _ = writeln!(out, "stop_bits = {}", bus.setting.stop_bits);
    for a in &bus.answers {
        out.push('\n');
        let _ = writeln!(out, "# Unit {} answered: {}.", a.unit, a.describe());
        let _ = writeln!(out, "# Its points (registers) are left to you: `check` refuses a slave without points, so");
        let _ = writeln!(out, "# add its register map, or start from this template:");
        let _ = writeln!(out, "[[bus.device]]");
        let _ = writeln!(out, "name = {}", quote(&format!("{}-unit{}", r.name, a.unit)));
        let _ = writeln!(out, "unit = {}", a.unit);
        let _ = writeln!(out, "# [[bus.device.point]]");
        let _ = writeln!(out, "# name = \"register_0\"");
        let _ = writeln!(out, "# table = \"holding\"");
        let _ = writeln!(out, "# address = 0");
        let _ = writeln!(out, "# type = \"u16\"");
    }
}
