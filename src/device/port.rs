//! Opening a serial port: the seam between the supervisor and the operating system.

use std::future::Future;
use std::io;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

use super::termios;
use crate::config::{FlowControl, Parity, PortConfig};

/// An open port, as a session sees it: read, and written by polls, queries and writes.
pub type SerialPort = Box<dyn Port>;

/// What a session needs of a port.
pub trait Port: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Port for T {}

/// Opens ports. The supervisor wraps every call in the device's `open_timeout`.
pub trait PortOpener: Send + Sync {
    /// Opens the configured path with its line settings.
    fn open<'a>(&'a self, dev: &'a PortConfig) -> Pin<Box<dyn Future<Output = io::Result<SerialPort>> + Send + 'a>>;
}

/// Real serial ports: opened and configured by serialport (through tokio-serial's builder),
/// then read and written through [`termios::TermiosPort`]'s `AsyncFd`, which takes a short
/// read as "drained" and so saves tokio-serial's second read(2) (the one that returns EAGAIN)
/// on every wake-up: ~15 % of the gateway's CPU at one reading per write.
#[derive(Debug, Default, Clone, Copy)]
pub struct SerialOpener;

impl PortOpener for SerialOpener {
    fn open<'a>(&'a self, dev: &'a PortConfig) -> Pin<Box<dyn Future<Output = io::Result<SerialPort>> + Send + 'a>> {
        let builder = tokio_serial::new(dev.path.to_string_lossy(), dev.baud)
            .data_bits(match dev.data_bits {
                5 => tokio_serial::DataBits::Five,
                6 => tokio_serial::DataBits::Six,
                7 => tokio_serial::DataBits::Seven,
                _ => tokio_serial::DataBits::Eight,
            })
            .parity(match dev.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Odd => tokio_serial::Parity::Odd,
                Parity::Even => tokio_serial::Parity::Even,
            })
            .stop_bits(if dev.stop_bits == 2 { tokio_serial::StopBits::Two } else { tokio_serial::StopBits::One })
            .flow_control(match dev.flow_control {
                FlowControl::None => tokio_serial::FlowControl::None,
                FlowControl::Software => tokio_serial::FlowControl::Software,
                FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
            });
        let dev = dev.clone();
        Box::pin(async move {
            // open(2) and the termios ioctls are blocking syscalls: keep them off the workers.
            tokio::task::spawn_blocking(move || match builder.open_native() {
                Ok(tty) => Ok(Box::new(termios::adopt(tty)?) as SerialPort),
                // serialport sets the line with TCGETS2/TCSETS2, which qemu-user (the ARM smoke
                // test in CI) and some old kernels lack: retry with classic termios (termios.rs).
                Err(e) if termios::is_enosys(&e) => {
                    termios::log_fallback_once(&dev);
                    Ok(Box::new(termios::open(&dev)?) as SerialPort)
                }
                Err(e) => Err(io::Error::from(e)),
            })
            .await
            .map_err(io::Error::other)?
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::config::Config;
    use crate::simulate::PtyLink;

    /// Through tokio-serial natively; through the termios fallback when this test binary runs
    /// under qemu-user (`.ci/arm-smoke.sh` covers that end to end).
    #[tokio::test]
    async fn serial_opener_reads_a_pseudo_terminal() {
        let dir = tempfile::tempdir().unwrap();
        let mut pty = PtyLink::create(&dir.path().join("sensor")).unwrap();
        let text = format!(
            "[gateway]\nid = \"gw\"\n[[device]]\nname = \"d\"\npath = {:?}\nframing = \"lines\"\n",
            pty.link.display().to_string()
        );
        let dev = toml::from_str::<Config>(&text).unwrap().devices.remove(0);
        let mut port = SerialOpener.open(&dev.port).await.unwrap();
        pty.master.write_all(b"{\"t\":1}\n").await.unwrap();
        let mut buf = [0u8; 8];
        tokio::time::timeout(Duration::from_secs(5), port.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"{\"t\":1}\n");
    }
}
