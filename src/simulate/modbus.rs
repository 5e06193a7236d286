//! Simulated Modbus RTU slaves on one port (rmodbus's server side): an energy meter's register
//! map whose values change with every request, and faults a test can switch on — a slave that
//! never answers, a corrupted CRC, a reply from the wrong unit. [`serve_paced`] answers as
//! late as a real line at a given baud rate would (a pseudo-terminal has none), for benches.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rmodbus::server::storage::ModbusStorageSmall;
use rmodbus::server::ModbusFrame;
use rmodbus::ModbusProto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::modbus::rtu;
use crate::telemetry::now_us;

/// What a simulated slave does wrong.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Never answers.
    pub silent: bool,
    /// Every reply has its last CRC byte flipped.
    pub bad_crc: bool,
    /// Replies as if it were this unit (a valid frame, CRC right for that unit).
    pub reply_as: Option<u8>,
}

/// One simulated slave.
pub struct SimSlave {
    pub unit: u8,
    pub storage: Box<ModbusStorageSmall>,
    pub faults: Faults,
    /// Requests answered so far (drives the changing values).
    pub answered: u64,
    /// Input registers from this address hold (u64, big word order) the time the reply is
    /// sent, µs since the epoch: for measuring poll → broker latency.
    pub clock_at: Option<u16>,
}

/// The meter's register map (documented for the demo config and the README):
/// - input 0-1: voltage, f32 big word order (230.0 + answered % 10 / 10)
/// - input 2-3: current, f32 little word order (1.5 + answered % 7 / 100)
/// - input 4-5: energy, u32 big (Wh, grows by 7 every request)
/// - input 6: temperature, i16 × 0.1 °C (-5.0 + answered % 50 / 10)
/// - holding 10: setpoint, i16 × 0.1 (writable; starts at 21.5)
/// - coil 0: relay (writable); discrete 0: door closed (toggles every request)
pub const METER_POINTS: &str = r#"
[[bus.device.point]]
name = "voltage"
table = "input"
address = 0
type = "f32"
unit = "V"

[[bus.device.point]]
name = "current"
table = "input"
address = 2
type = "f32"
word_order = "little"
unit = "A"

[[bus.device.point]]
name = "energy"
table = "input"
address = 4
type = "u32"
unit = "Wh"

[[bus.device.point]]
name = "temperature"
table = "input"
address = 6
type = "i16"
scale = 0.1
unit = "°C"

[[bus.device.point]]
name = "setpoint"
table = "holding"
address = 10
type = "i16"
scale = 0.1
unit = "°C"
writable = true

[[bus.device.point]]
name = "relay"
table = "coil"
address = 0
type = "bool"
writable = true

[[bus.device.point]]
name = "door_closed"
table = "discrete"
address = 0
type = "bool"
"#;

impl SimSlave {
    /// A meter answering as `unit` (see [`METER_POINTS`]).
    pub fn meter(unit: u8) -> Self {
        let mut s = Self { unit, storage: Box::default(), faults: Faults::default(), answered: 0, clock_at: None };
        s.storage.holdings[10] = 215;
        s.update(0);
        s
    }

    /// Moves the values on (called before each answer sent at `sent_us`).
    fn update(&mut self, sent_us: u64) {
        let n = self.answered;
        let st = &mut self.storage;
        let v = (230.0 + (n % 10) as f32 / 10.0).to_bits();
        st.inputs[0] = (v >> 16) as u16;
        st.inputs[1] = v as u16;
        let c = (1.5 + (n % 7) as f32 / 100.0).to_bits();
        st.inputs[2] = c as u16;
        st.inputs[3] = (c >> 16) as u16;
        let e = (1000 + 7 * n) as u32;
        st.inputs[4] = (e >> 16) as u16;
        st.inputs[5] = e as u16;
        st.inputs[6] = (-50 + (n % 50) as i16) as u16;
        st.discretes[0] = n % 2 == 0;
        if let Some(at) = self.clock_at {
            for (i, w) in st.inputs[usize::from(at)..usize::from(at) + 4].iter_mut().enumerate() {
                *w = (sent_us >> (48 - 16 * i)) as u16;
            }
        }
    }

    /// The reply to `request`, to be sent at `sent_us`, if this slave is addressed and answers.
    fn answer(&mut self, request: &[u8], sent_us: u64) -> Option<Vec<u8>> {
        if request.first() != Some(&self.unit) || self.faults.silent {
            return None;
        }
        self.update(sent_us);
        let as_unit = self.faults.reply_as.unwrap_or(self.unit);
        let mut req = request.to_vec();
        if as_unit != self.unit {
            // Answer as the other unit: the request as that unit would have got it.
            req = reframe(as_unit, &req[..req.len() - 2])?;
        }
        let mut out = Vec::new();
        let mut frame = ModbusFrame::new(as_unit, &req, ModbusProto::Rtu, &mut out);
        frame.parse().ok()?;
        if frame.processing_required {
            let done = if frame.readonly {
                frame.process_read(&*self.storage)
            } else {
                frame.process_write(&mut *self.storage)
            };
            done.ok()?;
        }
        if !frame.response_required {
            return None;
        }
        frame.finalize_response().ok()?;
        self.answered += 1;
        if self.faults.bad_crc {
            *out.last_mut()? ^= 0xA5;
        }
        Some(out)
    }
}

/// `body` (unit replaced by `unit`) with a fresh CRC, built by rmodbus: a read of the same
/// table and range as `body` asks for.
fn reframe(unit: u8, body: &[u8]) -> Option<Vec<u8>> {
    let mut req = rmodbus::client::ModbusRequest::new(unit, ModbusProto::Rtu);
    let (reg, count) = (u16::from_be_bytes([body[2], body[3]]), u16::from_be_bytes([body[4], body[5]]));
    let mut out = Vec::new();
    match body[1] {
        1 => req.generate_get_coils(reg, count, &mut out),
        2 => req.generate_get_discretes(reg, count, &mut out),
        3 => req.generate_get_holdings(reg, count, &mut out),
        4 => req.generate_get_inputs(reg, count, &mut out),
        _ => return None,
    }
    .ok()?;
    Some(out)
}

/// The slaves on one bus, shared with whoever changes their faults.
pub type SimBus = Arc<Mutex<Vec<SimSlave>>>;

/// Meters answering as `units` (see [`SimSlave::meter`]), ready for [`serve`].
pub fn meters(units: &[u8]) -> SimBus {
    Arc::new(Mutex::new(units.iter().map(|&u| SimSlave::meter(u)).collect()))
}

/// The device name [`bus_toml`] gives the meter answering as `unit`.
pub fn meter_name(unit: u8) -> String {
    format!("meter-{unit}")
}

/// A `[[bus]]` table (named `name`, on `path`, 8E1 at `baud`) polling the meters `units`
/// every `poll_interval`: one `[[bus.device]]` each, named by [`meter_name`], with
/// [`METER_POINTS`]. What `sensorgate simulate --modbus` prints and the demo runs on.
pub fn bus_toml(name: &str, path: &Path, baud: u32, units: &[u8], poll_interval: Duration) -> String {
    // toml quotes and escapes the strings, whatever the path holds.
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut text = format!(
        "[[bus]]\nname = {}\npath = {}\nbaud = {baud}\nparity = \"even\"\n",
        quote(name),
        quote(&path.display().to_string())
    );
    let interval = humantime::format_duration(poll_interval).to_string();
    for &unit in units {
        text += &format!(
            "\n[[bus.device]]\nname = {}\nunit = {unit}\npoll_interval = {}\n",
            quote(&meter_name(unit)),
            quote(&interval)
        );
        text += METER_POINTS;
    }
    text
}

/// Answers requests on `port` until it fails: reads a whole request (its length from its
/// first bytes), lets the addressed slave answer. Bytes that are not a request are skipped.
///
/// # Errors
/// The first I/O error, or end of file.
pub async fn serve<P: AsyncRead + AsyncWrite + Unpin>(port: P, bus: SimBus) -> io::Result<()> {
    serve_with(port, bus, None).await
}

/// How late [`serve_paced`] answered, beyond what the line's timing asks for (the
/// simulator's own error, to be told apart from the gateway's).
#[derive(Debug, Default)]
pub struct Pacing {
    pub replies: AtomicU64,
    pub late_us_total: AtomicU64,
    pub late_us_max: AtomicU64,
}

/// [`serve`], with each reply written when it would have fully arrived on a real line at
/// `baud`: the request's wire time, the 3.5-character silence by which the slave knows the
/// request has ended, then the reply's wire time (11 bits a byte). The silence after the
/// reply is the master's to wait. `pacing` counts how late replies were.
///
/// # Errors
/// The first I/O error, or end of file.
pub async fn serve_paced<P: AsyncRead + AsyncWrite + Unpin>(
    port: P,
    bus: SimBus,
    baud: u32,
    pacing: Arc<Pacing>,
) -> io::Result<()> {
    serve_with(port, bus, Some((baud, pacing))).await
}

async fn serve_with<P: AsyncRead + AsyncWrite + Unpin>(
    mut port: P,
    bus: SimBus,
    paced: Option<(u32, Arc<Pacing>)>,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 256];
    loop {
        let n = port.read(&mut chunk).await?;
        let arrived = Instant::now();
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Ok(len) = rmodbus::guess_request_frame_len(&buf, ModbusProto::Rtu) {
            let len = usize::from(len);
            if buf.len() < len {
                break;
            }
            let request: Vec<u8> = buf.drain(..len).collect();
            let send_at = paced.as_ref().map_or(arrived, |(baud, _)| {
                arrived + rtu::wire_time(len + reply_len(&request), *baud) + rtu::silence(*baud)
            });
            let sent_us = now_us() + send_at.saturating_duration_since(Instant::now()).as_micros() as u64;
            let reply = {
                let mut slaves = bus.lock().unwrap_or_else(PoisonError::into_inner);
                slaves.iter_mut().find_map(|s| s.answer(&request, sent_us))
            };
            if let Some(reply) = reply {
                if let Some((_, pacing)) = &paced {
                    sleep_until(send_at).await;
                    let late = send_at.elapsed().as_micros() as u64;
                    pacing.replies.fetch_add(1, Relaxed);
                    pacing.late_us_total.fetch_add(late, Relaxed);
                    pacing.late_us_max.fetch_max(late, Relaxed);
                }
                port.write_all(&reply).await?;
            }
        }
        if buf.len() > 300 {
            buf.clear();
        }
    }
}

/// The length of a normal reply to `request` (read: unit, function, byte count, data, CRC;
/// write: an 8-byte echo).
fn reply_len(request: &[u8]) -> usize {
    if request.len() < 6 {
        return 5;
    }
    let count = usize::from(u16::from_be_bytes([request[4], request[5]]));
    match request[1] {
        1 | 2 => 5 + count.div_ceil(8),
        3 | 4 => 5 + 2 * count,
        _ => 8,
    }
}

/// Sleeps until `at` to within tens of µs. tokio's timer ticks in whole milliseconds, as long
/// as a 115 200-baud reply takes to send: it would add up to a millisecond to every reply.
async fn sleep_until(at: Instant) {
    let left = at.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return;
    }
    // On a blocking-pool thread, not a runtime worker.
    #[allow(clippy::disallowed_methods)]
    let nap = move || std::thread::sleep(left);
    let _ = tokio::task::spawn_blocking(nap).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::modbus::{Request, Table, Transaction};

    /// Real time: the pacing sleeps on a blocking thread, which paused time cannot drive. The
    /// bounds hold however slow the machine: a reply never comes before the line allows.
    #[tokio::test]
    async fn a_paced_reply_arrives_when_a_real_line_would_deliver_it_stamped_with_that_time() {
        let (mut master, port) = tokio::io::duplex(256);
        let meter = SimSlave { clock_at: Some(8), ..SimSlave::meter(1) };
        let pacing = Arc::new(Pacing::default());
        tokio::spawn(serve_paced(port, Arc::new(Mutex::new(vec![meter])), 9600, Arc::clone(&pacing)));
        // The clock's 4 registers: 8 bytes out, 13 back.
        let tx = Transaction::read(1, &Request { table: Table::Input, start: 8, count: 4, points: vec![] });
        let (asked, asked_us) = (Instant::now(), now_us());
        master.write_all(tx.request()).await.unwrap();
        let mut reply = [0u8; 13];
        master.read_exact(&mut reply).await.unwrap();
        let (took, got_us) = (asked.elapsed(), now_us());

        let line = rtu::wire_time(8 + 13, 9600) + rtu::silence(9600);
        assert!(took >= line, "answered after {took:?}; the line needs {line:?}");
        let sent = rtu::words(tx.check(&reply).unwrap()).fold(0u64, |t, w| t << 16 | u64::from(w));
        assert!(sent >= asked_us + line.as_micros() as u64, "stamped {}µs after the request", sent - asked_us);
        // The stamp is the send time, not later than the reply was read (1 ms for the two
        // clocks, wall and monotonic, drifting apart).
        assert!(sent <= got_us + 1000, "stamped {}µs after it was read", sent - got_us);
        assert_eq!(pacing.replies.load(Relaxed), 1);
    }

    #[test]
    fn the_printed_bus_config_polls_every_meter_with_the_meter_points() {
        let path = Path::new("/tmp/a \"quoted\" dir/bus");
        let bus = bus_toml("sim", path, 9600, &[1, 247], Duration::from_millis(1500));
        let config = Config::from_toml(&format!("[gateway]\nid = \"t\"\n[mqtt]\nport = 1883\n{bus}"))
            .unwrap_or_else(|p| panic!("{p:?}\n{bus}"));
        let [b] = &config.buses[..] else { panic!("one bus: {bus}") };
        assert_eq!(b.port.path, path);
        assert_eq!(b.port.baud, 9600);
        let slaves: Vec<_> =
            b.slaves.iter().map(|s| (s.name.as_str(), s.unit, s.poll_interval, s.points.len())).collect();
        assert_eq!(
            slaves,
            [("meter-1", 1, Duration::from_millis(1500), 7), ("meter-247", 247, Duration::from_millis(1500), 7)]
        );
    }
}
