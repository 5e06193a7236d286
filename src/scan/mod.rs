//! `sensorgate scan`: finds sensors on serial ports and writes the config that reads them. It
//! holds one port at a time, opened exclusively, and transmits only when asked to (`--modbus`).
//!
//! Per port: listen at each line speed in turn ([`classify`] decides what was heard), stop at
//! the first speed that is readable; a port that stayed silent may then be probed for Modbus
//! RTU slaves ([`modbus`]). [`report`] turns the results into TOML or JSON. Cancelling (Ctrl-C)
//! ends the port being scanned where it is; what was found so far is still reported.

pub mod classify;
pub mod modbus;
mod ports;
pub mod report;

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tokio_serial::{ClearBuffer, SerialPort, SerialStream};
use tokio_util::sync::CancellationToken;

pub use self::classify::{Classifier, Field, Verdict};
pub use self::ports::{default_ports, given_ports};

/// Line speeds listened at when none are given, fastest first.
pub const DEFAULT_BAUDS: [u32; 5] = [115_200, 57_600, 38_400, 19_200, 9600];

/// What to do on every port.
#[derive(Debug, Clone)]
pub struct Options {
    /// Listened at in this order.
    pub bauds: Vec<u32>,
    /// How long at each speed.
    pub listen: Duration,
    /// Probe silent ports for Modbus RTU slaves (this transmits).
    pub modbus: Option<modbus::Probe>,
}

/// A port to scan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Port {
    /// As given, or as found under /dev.
    pub path: PathBuf,
    /// A `/dev/serial/by-id` link to the same device: the name that survives reboots and
    /// replugging, used in the config when there is one.
    pub stable_path: Option<PathBuf>,
}

impl Port {
    /// The path a config should name.
    pub fn config_path(&self) -> &Path {
        self.stable_path.as_deref().unwrap_or(&self.path)
    }
}

/// One listen at one speed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Heard {
    pub baud: u32,
    pub bytes: u64,
    pub verdict: Verdict,
}

/// What scanning a port came to.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Readable at `baud`: frames the gateway reads, or text of unknown shape.
    Found { baud: u32, verdict: Verdict },
    /// Bytes at every speed, none readable.
    Noise { bytes: u64 },
    /// Not a byte at any speed.
    Silent,
    /// Another program holds the port open exclusively (the gateway, a terminal program).
    Busy,
    /// The port could not be opened or read.
    Failed { reason: String },
    /// Stopped (Ctrl-C) before any speed was listened to in full.
    NotScanned,
}

/// One port's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PortReport {
    #[serde(flatten)]
    pub port: Port,
    /// A device name for the config, derived from the port's name.
    pub name: String,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Every speed listened at, in order.
    pub listened: Vec<Heard>,
    /// Modbus RTU slaves that answered (with `--modbus`, on a port that stayed silent).
    pub modbus: Option<modbus::BusReport>,
    /// The scan was stopped while on this port: it may have found more given the time.
    pub interrupted: bool,
}

/// A step, for the progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// What is being tried now (replaced by the next step on a terminal).
    Trying(String),
    /// A step too small for a log: shown on a terminal only.
    Detail(String),
    /// What a port came to (kept).
    Result(String),
}

/// Scans `ports` one after the other until done or `cancel`; every port gets a report (those
/// not reached: [`Outcome::NotScanned`]).
pub async fn scan(
    ports: &[Port],
    opts: &Options,
    cancel: &CancellationToken,
    progress: &mut dyn FnMut(Progress),
) -> Vec<PortReport> {
    let mut names = Vec::new();
    let mut reports = Vec::new();
    for port in ports {
        let name = unique_name(&mut names, port.config_path());
        let report = if cancel.is_cancelled() {
            PortReport {
                port: port.clone(),
                name,
                outcome: Outcome::NotScanned,
                listened: Vec::new(),
                modbus: None,
                interrupted: true,
            }
        } else {
            let r = scan_port(port, name, opts, cancel, progress).await;
            progress(Progress::Result(report::summary(&r)));
            r
        };
        reports.push(report);
    }
    reports
}

async fn scan_port(
    port: &Port,
    name: String,
    opts: &Options,
    cancel: &CancellationToken,
    progress: &mut dyn FnMut(Progress),
) -> PortReport {
    let mut report = PortReport {
        port: port.clone(),
        name,
        outcome: Outcome::NotScanned,
        listened: Vec::new(),
        modbus: None,
        interrupted: false,
    };
    let first = opts.bauds.first().copied().unwrap_or(DEFAULT_BAUDS[0]);
    progress(Progress::Trying(format!("{}: opening", port.path.display())));
    let mut stream = match open_exclusive(&port.path, first) {
        Ok(s) => s,
        Err(OpenError::Busy) => {
            report.outcome = Outcome::Busy;
            return report;
        }
        Err(OpenError::Io(e)) => {
            report.outcome = Outcome::Failed { reason: open_failure(&e) };
            return report;
        }
    };
    let mut buf = vec![0u8; 4096];
    for &baud in &opts.bauds {
        progress(Progress::Trying(format!(
            "{}: listening at {baud} baud for {}",
            port.path.display(),
            humantime::format_duration(opts.listen)
        )));
        let heard = match listen(&mut stream, baud, opts.listen, cancel, &mut buf).await {
            Ok(Listen::Done(c)) => Heard { baud, bytes: c.bytes(), verdict: c.verdict() },
            Ok(Listen::Cancelled) => {
                report.interrupted = true;
                break;
            }
            Err(e) => {
                report.outcome = Outcome::Failed { reason: format!("reading failed at {baud} baud: {e}") };
                return report;
            }
        };
        let readable = heard.verdict.is_readable();
        report.listened.push(heard);
        if readable {
            break;
        }
    }
    report.outcome = outcome_of(&report.listened);
    if let (Outcome::Silent, Some(probe), false) = (&report.outcome, &opts.modbus, report.interrupted) {
        match modbus::probe(&mut stream, &port.path, probe, cancel, progress).await {
            Ok(found) => {
                report.interrupted |= found.interrupted;
                report.modbus = found.bus;
            }
            Err(e) => report.outcome = Outcome::Failed { reason: format!("Modbus probe failed: {e}") },
        }
    }
    report
}

/// The port's outcome from its listens: the readable one, else noise, else silence.
fn outcome_of(listened: &[Heard]) -> Outcome {
    if let Some(h) = listened.iter().find(|h| h.verdict.is_readable()) {
        return Outcome::Found { baud: h.baud, verdict: h.verdict.clone() };
    }
    match listened.iter().map(|h| h.bytes).max() {
        None => Outcome::NotScanned,
        Some(0) => Outcome::Silent,
        Some(_) => Outcome::Noise { bytes: listened.iter().map(|h| h.bytes).sum() },
    }
}

enum Listen {
    Done(Classifier),
    Cancelled,
}

/// Sets `baud`, drops what arrived before, and classifies what comes in `listen`.
async fn listen(
    stream: &mut SerialStream,
    baud: u32,
    listen: Duration,
    cancel: &CancellationToken,
    buf: &mut [u8],
) -> io::Result<Listen> {
    stream.set_baud_rate(baud).map_err(io::Error::from)?;
    stream.clear(ClearBuffer::Input).map_err(io::Error::from)?;
    let deadline = Instant::now() + listen;
    let mut c = Classifier::new();
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(Listen::Cancelled),
            () = tokio::time::sleep_until(deadline) => return Ok(Listen::Done(c)),
            r = stream.read(buf) => match r {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the port closed")),
                Ok(n) => c.push(&buf[..n]),
                Err(e) => return Err(e),
            },
        }
    }
}

/// Why a port was not opened.
#[derive(Debug)]
pub enum OpenError {
    /// Another program holds it (TIOCEXCL or an exclusive flock).
    Busy,
    Io(io::Error),
}

/// Opens `path` for this program alone: serialport's open sets TIOCEXCL and takes an exclusive
/// `flock` (serialport 4.10 `TTYPort::open`), so neither the gateway nor another program can
/// open it while we listen, and a port one of them holds is refused.
///
/// # Errors
/// [`OpenError::Busy`] when another program holds the port; the I/O error otherwise.
pub fn open_exclusive(path: &Path, baud: u32) -> Result<SerialStream, OpenError> {
    // Asked first, without serialport: as root, TIOCEXCL does not stop an open, and serialport
    // would then fail on the flock and close with TIOCNXCL, clearing the holder's TIOCEXCL.
    if held_by_another(path).map_err(OpenError::Io)? {
        return Err(OpenError::Busy);
    }
    // O_NONBLOCK open and a few ioctls: quick, so done on this task (a scan is one port at a time).
    SerialStream::open(&tokio_serial::new(path.to_string_lossy(), baud)).map_err(|e| match e.kind {
        // serialport reports EBUSY (TIOCEXCL) and a refused exclusive flock as NoDevice.
        tokio_serial::ErrorKind::NoDevice => OpenError::Busy,
        _ => OpenError::Io(io::Error::from(e)),
    })
}

/// True when the port is held exclusively: its open fails with EBUSY (TIOCEXCL, for a user
/// other than root) or an exclusive `flock` on it is refused.
fn held_by_another(path: &Path) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(true),
        Err(e) => return Err(e),
    };
    // SAFETY: flock on a descriptor we own; the lock goes with it when `file` is dropped.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(true) } else { Err(e) };
    }
    Ok(false)
}

fn open_failure(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            format!("cannot open: {e} (fix: add this user to the port's group, often dialout, and log in again)")
        }
        io::ErrorKind::NotFound => "cannot open: no such port (unplugged?)".to_string(),
        _ => format!("cannot open: {e}"),
    }
}

/// A device name from a port's file name (`/dev/ttyUSB0` → `ttyusb0`), valid as a topic level
/// and made unique among `taken` with a `-2`, `-3`… suffix.
fn unique_name(taken: &mut Vec<String>, path: &Path) -> String {
    let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let mut base = String::new();
    for c in file.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() || c == '_' {
            base.push(c);
        } else if !base.ends_with('-') {
            base.push('-');
        }
    }
    let mut base = base.trim_matches('-').chars().take(56).collect::<String>();
    if base.is_empty() {
        base = "sensor".into();
    }
    let mut name = base.clone();
    let mut n = 1;
    while taken.contains(&name) {
        n += 1;
        name = format!("{base}-{n}");
    }
    taken.push(name.clone());
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::PtyLink;

    #[test]
    fn names_from_ports() {
        let mut taken = Vec::new();
        let by_id = Path::new("/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A10K3Q2X-if00-port0");
        assert_eq!(unique_name(&mut taken, by_id), "usb-ftdi_ft232r_usb_uart_a10k3q2x-if00-port0");
        assert_eq!(unique_name(&mut taken, Path::new("/dev/ttyUSB0")), "ttyusb0");
        assert_eq!(unique_name(&mut taken, Path::new("/tmp/a/ttyUSB0")), "ttyusb0-2");
        assert_eq!(unique_name(&mut taken, Path::new("/")), "sensor");
    }

    /// What the scan relies on to never read a port together with another program.
    #[tokio::test]
    async fn a_port_open_for_the_scan_is_refused_to_others_and_the_other_way_round() {
        let dir = tempfile::tempdir().unwrap();
        let pty = PtyLink::create(&dir.path().join("p")).unwrap();
        let held = open_exclusive(&pty.link, 9600).unwrap();
        assert!(matches!(open_exclusive(&pty.link, 9600), Err(OpenError::Busy)));
        // serialport's own open (what the gateway uses) is refused too.
        assert!(tokio_serial::new(pty.link.to_string_lossy(), 9600).open_native().is_err());
        drop(held);
        let again = open_exclusive(&pty.link, 9600);
        assert!(again.is_ok(), "closed ports are free again: {:?}", again.err());
    }
}
