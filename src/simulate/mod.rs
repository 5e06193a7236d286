//! A sensor simulator: renders readings in every supported framing and writes them at a set
//! rate to a serial port or to a pseudo-terminal it creates and links at a path; and Modbus
//! RTU slaves answering on one ([`modbus`]).

pub mod modbus;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::decode::Format;
use crate::framing::Framing;
use crate::telemetry::now_us;

/// What to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimSpec {
    pub framing: Framing,
    pub format: Format,
}

impl SimSpec {
    /// Appends reading number `n` (stamped with `sent_us`) in this spec's encoding.
    ///
    /// Fields: `n` (the simulator's counter), `temp`, `hum`, `sent_us` (send time, µs since the
    /// epoch, for latency). Binary frames carry `n` as the sensor sequence number and channels
    /// 0 = temp (f32), 1 = hum (f32), 2 = n (i32).
    pub fn render(&self, n: u64, sent_us: u64, out: &mut Vec<u8>) {
        use std::io::Write;
        let temp = 20.0 + (n % 100) as f64 / 10.0;
        let hum = 40.0 + (n % 50) as f64 / 5.0;
        match self.format {
            Format::Json => {
                let _ = writeln!(out, "{{\"n\":{n},\"temp\":{temp:.1},\"hum\":{hum:.1},\"sent_us\":{sent_us}}}");
            }
            Format::Kv => {
                let _ = writeln!(out, "n={n} temp={temp:.1} hum={hum:.1} sent_us={sent_us}");
            }
            Format::Postcard => {
                use sensorgate_wire::{encode_frame, Channel, ReadingV1, Value, MAX_FRAME_LEN};
                let mut r = ReadingV1::new(n as u32);
                let chans = [
                    Channel { id: 0, value: Value::F32(temp as f32) },
                    Channel { id: 1, value: Value::F32(hum as f32) },
                    Channel { id: 2, value: Value::I32(n as i32) },
                ];
                r.channels.extend_from_slice(&chans).expect("3 channels fit");
                let mut buf = [0u8; MAX_FRAME_LEN];
                let len = encode_frame(&r, &mut buf).expect("frame fits MAX_FRAME_LEN");
                out.extend_from_slice(&buf[..len]);
            }
        }
        debug_assert!(self.framing.carries(self.format));
    }
}

/// Writes `count` readings (0 = forever) numbered from `start` at `rate` per second (0 = as
/// fast as the port takes them). Writes are batched every 10 ms, as a busy sensor's UART
/// FIFO would deliver them.
///
/// # Errors
/// The first write error (e.g. the other end closed).
pub async fn run<W: AsyncWrite + Unpin>(
    spec: SimSpec,
    mut port: W,
    rate: u32,
    count: u64,
    start: u64,
) -> io::Result<u64> {
    let begin = Instant::now();
    let mut sent = 0u64;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while count == 0 || sent < count {
        let due = if rate == 0 {
            sent + 256
        } else {
            tick.tick().await;
            (begin.elapsed().as_secs_f64() * f64::from(rate)) as u64 + 1
        };
        let due = if count == 0 { due } else { due.min(count) };
        buf.clear();
        let stamp = now_us();
        while sent < due {
            spec.render(start + sent, stamp, &mut buf);
            sent += 1;
        }
        port.write_all(&buf).await?;
    }
    port.flush().await?;
    Ok(sent)
}

/// A pseudo-terminal whose other end is linked at a path, standing in for a serial adapter.
/// Dropping it removes the link and closes the terminal (what an unplug looks like).
pub struct PtyLink {
    pub master: tokio_serial::SerialStream,
    /// Kept open so the terminal's settings and buffered bytes survive the gateway reopening.
    /// Reading from it takes bytes the gateway has not read (tests use this after it exits).
    pub slave: tokio_serial::SerialStream,
    pub link: PathBuf,
}

impl PtyLink {
    /// Creates the pair and links its device path at `link` (replacing an old link).
    ///
    /// # Errors
    /// When no pseudo-terminal can be allocated or the link cannot be created.
    pub fn create(link: &Path) -> io::Result<Self> {
        use tokio_serial::SerialPort;
        let (master, slave) = tokio_serial::SerialStream::pair().map_err(io::Error::from)?;
        // posix_openpt() leaves the descriptors inheritable: a child process (a gateway started
        // by a test) would hold the terminal open and an unplug would never be seen.
        set_cloexec(&master)?;
        set_cloexec(&slave)?;
        let name = slave.name().ok_or_else(|| io::Error::other("pseudo-terminal has no name"))?;
        match std::fs::remove_file(link) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::os::unix::fs::symlink(&name, link)?;
        Ok(Self { master, slave, link: link.to_owned() })
    }
}

fn set_cloexec(fd: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for PtyLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.link);
    }
}
