//! The Modbus RTU probe of `scan --modbus`: asks every unit for one holding register, over
//! each line setting in turn, and notes who answers. It transmits, so it is opt-in and only
//! runs on a port that stayed silent while we listened (a bus with no master talks to nobody).

use std::io;
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_serial::{ClearBuffer, SerialPort, SerialStream};
use tokio_util::sync::CancellationToken;

use super::Progress;
use crate::modbus::rtu::{self, Fault, Transaction};
use crate::modbus::{Request, Table};

/// Line speeds probed when none are given.
pub const DEFAULT_BAUDS: [u32; 4] = [9600, 19_200, 38_400, 115_200];
/// How long a unit gets to answer when no timeout is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);

/// Parity of a line setting (8 data bits always).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Even,
}

impl Parity {
    /// As a config's `parity` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Parity::None => "none",
            Parity::Even => "even",
        }
    }
}

/// One line setting: speed, 8 data bits, parity, stop bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LineSetting {
    pub baud: u32,
    pub parity: Parity,
    pub stop_bits: u8,
}

impl LineSetting {
    /// Each of `bauds` with 8E1 (Modbus's default), then 8N1, then 8N2.
    pub fn all(bauds: &[u32]) -> Vec<Self> {
        bauds
            .iter()
            .flat_map(|&baud| {
                [(Parity::Even, 1), (Parity::None, 1), (Parity::None, 2)].map(|(parity, stop_bits)| LineSetting {
                    baud,
                    parity,
                    stop_bits,
                })
            })
            .collect()
    }

    /// `8E1` and the like.
    pub fn label(&self) -> String {
        format!("8{}{}", if self.parity == Parity::Even { 'E' } else { 'N' }, self.stop_bits)
    }
}

/// What to probe.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Tried in order; the probe stops after the first setting where any unit answers.
    pub settings: Vec<LineSetting>,
    pub units: RangeInclusive<u8>,
    /// Per unit and setting.
    pub timeout: Duration,
}

/// How a unit answered the read of holding register 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The register's value.
    Value { value: u16 },
    /// An exception response (with a valid CRC): the unit is there, register 0 is not.
    Exception { code: u8 },
}

/// A unit that answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Answer {
    pub unit: u8,
    #[serde(flatten)]
    pub reply: Reply,
}

impl Answer {
    /// What it said, in words.
    pub fn describe(&self) -> String {
        match self.reply {
            Reply::Value { value } => format!("holding register 0 = {value}"),
            Reply::Exception { code } => {
                format!("exception {code:02} ({}) to a read of holding register 0", rtu::exception_name(code))
            }
        }
    }
}

/// The units that answered, at the line setting they answered at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BusReport {
    pub setting: LineSetting,
    pub answers: Vec<Answer>,
}

/// What a probe found, and whether it was stopped first.
#[derive(Debug, Default)]
pub struct Probed {
    pub bus: Option<BusReport>,
    pub interrupted: bool,
}

/// Probes `probe`'s settings and units on the open `stream`.
///
/// # Errors
/// The port failing (settings refused, a write or read error).
pub async fn probe(
    stream: &mut SerialStream,
    path: &Path,
    probe: &Probe,
    cancel: &CancellationToken,
    progress: &mut dyn FnMut(Progress),
) -> io::Result<Probed> {
    let mut buf = [0u8; 64];
    for setting in &probe.settings {
        progress(Progress::Trying(format!(
            "{}: asking Modbus units {}-{} at {} baud {}",
            path.display(),
            probe.units.start(),
            probe.units.end(),
            setting.baud,
            setting.label()
        )));
        stream.set_baud_rate(setting.baud)?;
        stream.set_data_bits(tokio_serial::DataBits::Eight)?;
        stream.set_parity(match setting.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
        })?;
        stream.set_stop_bits(if setting.stop_bits == 2 {
            tokio_serial::StopBits::Two
        } else {
            tokio_serial::StopBits::One
        })?;
        let mut answers = Vec::new();
        for unit in probe.units.clone() {
            progress(Progress::Detail(format!(
                "{}: unit {unit} at {} baud {}",
                path.display(),
                setting.baud,
                setting.label()
            )));
            let t = Transaction::read(unit, &Request { table: Table::Holding, start: 0, count: 1, points: Vec::new() });
            match ask(stream, &t, setting.baud, probe.timeout, cancel, &mut buf).await? {
                Asked::Cancelled => {
                    let bus = (!answers.is_empty()).then_some(BusReport { setting: *setting, answers });
                    return Ok(Probed { bus, interrupted: true });
                }
                Asked::Reply(Some(reply)) => answers.push(Answer { unit, reply }),
                // Silence, a bad CRC (often a wrong line setting) or another unit: not this one.
                Asked::Reply(None) => {}
            }
        }
        if !answers.is_empty() {
            return Ok(Probed { bus: Some(BusReport { setting: *setting, answers }), interrupted: false });
        }
    }
    Ok(Probed::default())
}

enum Asked {
    /// What the unit said; `None` when it said nothing valid.
    Reply(Option<Reply>),
    Cancelled,
}

/// One transaction: the line's silence, the request, then the reply or `timeout`.
async fn ask(
    stream: &mut SerialStream,
    t: &Transaction,
    baud: u32,
    timeout: Duration,
    cancel: &CancellationToken,
    buf: &mut [u8],
) -> io::Result<Asked> {
    tokio::time::sleep(rtu::silence(baud)).await;
    // A late reply to the previous request would be taken for this one's.
    stream.clear(ClearBuffer::Input)?;
    stream.write_all(t.request()).await?;
    stream.flush().await?;
    let deadline = Instant::now() + timeout + rtu::wire_time(t.request().len(), baud);
    let mut got = 0;
    loop {
        if let Some(len) = t.reply_len(&buf[..got]) {
            if got >= len {
                return Ok(Asked::Reply(match t.check(&buf[..len]) {
                    Ok(data) => Some(Reply::Value { value: rtu::words(data).next().unwrap_or_default() }),
                    Err(Fault::Exception(code)) => Some(Reply::Exception { code }),
                    Err(_) => None,
                }));
            }
        }
        if got == buf.len() {
            return Ok(Asked::Reply(None));
        }
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(Asked::Cancelled),
            () = tokio::time::sleep_until(deadline) => return Ok(Asked::Reply(None)),
            r = stream.read(&mut buf[got..]) => match r? {
                0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the port closed")),
                n => got += n,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_in_order() {
        let labels: Vec<String> =
            LineSetting::all(&[9600, 19_200]).iter().map(|s| format!("{} {}", s.baud, s.label())).collect();
        assert_eq!(labels, ["9600 8E1", "9600 8N1", "9600 8N2", "19200 8E1", "19200 8N1", "19200 8N2"]);
    }
}
