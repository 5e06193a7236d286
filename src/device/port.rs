//! Opening a serial port: the seam between the supervisor and the operating system.

use std::future::Future;
use std::io;
use std::pin::Pin;

use tokio::io::AsyncRead;

use crate::config::{DeviceConfig, FlowControl, Parity};

/// An open port, as the session sees it.
pub type SerialPort = Box<dyn AsyncRead + Send + Unpin>;

/// Opens ports. The supervisor wraps every call in the device's `open_timeout`.
pub trait PortOpener: Send + Sync {
    /// Opens the device's configured path.
    fn open<'a>(&'a self, dev: &'a DeviceConfig) -> Pin<Box<dyn Future<Output = io::Result<SerialPort>> + Send + 'a>>;
}

/// Real serial ports through tokio-serial.
#[derive(Debug, Default, Clone, Copy)]
pub struct SerialOpener;

impl PortOpener for SerialOpener {
    fn open<'a>(&'a self, dev: &'a DeviceConfig) -> Pin<Box<dyn Future<Output = io::Result<SerialPort>> + Send + 'a>> {
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
        Box::pin(async move {
            // open(2) and the termios ioctls are blocking syscalls: keep them off the workers.
            let stream = tokio::task::spawn_blocking(move || {
                tokio_serial::SerialStream::open(&builder).map_err(io::Error::from)
            })
            .await
            .map_err(io::Error::other)??;
            Ok(Box::new(stream) as SerialPort)
        })
    }
}
