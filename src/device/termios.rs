//! Opening a serial port with classic termios (`tcsetattr` and the `Bxxx` baud constants), for
//! systems where the `serialport` crate's way fails.
//!
//! On Linux, `serialport` (under tokio-serial) reads and writes the port settings with the
//! `TCGETS2`/`TCSETS2` ioctls, which take any baud rate. qemu-user 7.2 (Debian 12), which CI
//! uses to run the ARM binary, and some old kernels do not implement them: opening fails with
//! ENOSYS. [`SerialOpener`](super::SerialOpener) then comes here, which can only set the
//! standard rates but needs nothing newer than POSIX.
//!
//! Either way the port is read and written here ([`TermiosPort`]): a port serialport opened is
//! adopted with [`adopt`].

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

use crate::config::{FlowControl, Parity, PortConfig};

/// How `serialport` reports ENOSYS. It flattens every errno it does not map to a kind into
/// `ErrorKind::Unknown` plus nix's text for the errno (no raw errno survives, so
/// `raw_os_error()` is useless here). Seen under qemu-aarch64 7.2 (`-strace`), on the first of
/// the two: `ioctl(9,0x802c542a,...) = -1 errno=38 (Function not implemented)` (TCGETS2).
const ENOSYS_TEXT: &str = "Function not implemented";

/// Whether an open error from tokio-serial means "this kernel (or emulator) lacks an ioctl
/// serialport needs", i.e. whether the classic termios route is worth trying.
pub(super) fn is_enosys(e: &tokio_serial::Error) -> bool {
    e.kind == tokio_serial::ErrorKind::Unknown && e.description == ENOSYS_TEXT
}

/// A port read and written here: non-blocking descriptor, on the tokio reactor's readiness.
pub(super) struct TermiosPort {
    fd: AsyncFd<Exclusive>,
}

/// Opens `dev.path` raw, with the device's line settings, exclusively (like serialport does:
/// an exclusive `flock` plus `TIOCEXCL`, so two gateways never share a port). Blocking: call
/// it from a blocking thread, inside the runtime (the descriptor is registered with the
/// reactor here).
///
/// # Errors
/// The path cannot be opened or locked, it is not a terminal, or the baud rate has no `Bxxx`
/// constant.
pub(super) fn open(dev: &PortConfig) -> io::Result<TermiosPort> {
    // Checked before touching the device, so a bad config fails the same way every time.
    let speed = speed(dev.baud)?;
    let path = CString::new(dev.path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // O_NONBLOCK: AsyncFd needs it, and an open must not wait for a modem's carrier.
    // O_NOCTTY: a gateway started outside systemd must not acquire the port as its terminal.
    // SAFETY: a valid NUL-terminated path and integer flags.
    let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open(2) just returned this descriptor and nothing else owns it.
    let port = Exclusive::claim(unsafe { OwnedFd::from_raw_fd(raw) })?;
    configure(port.0.as_raw_fd(), dev, speed)?;
    // SAFETY: `Exclusive` owns the descriptor and always returns that same one, as register
    // requires.
    let fd = unsafe { AsyncFd::register_with_interest(port, Interest::READABLE | Interest::WRITABLE) }?;
    Ok(TermiosPort { fd })
}

/// Takes over a port serialport opened and configured (it holds the exclusive `flock` and
/// `TIOCEXCL`, as [`open`] does): made non-blocking again (serialport clears `O_NONBLOCK`) and
/// registered with the reactor. Call it inside the runtime.
///
/// # Errors
/// `fcntl` or the registration failed; the port is closed.
pub(super) fn adopt(port: impl IntoRawFd) -> io::Result<TermiosPort> {
    // SAFETY: into_raw_fd hands over the descriptor: nothing else owns or closes it now.
    let port = Exclusive(unsafe { OwnedFd::from_raw_fd(port.into_raw_fd()) });
    let fd = port.0.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as in `open`.
    let fd = unsafe { AsyncFd::register_with_interest(port, Interest::READABLE | Interest::WRITABLE) }?;
    Ok(TermiosPort { fd })
}

/// Logs, once per process, that ports are being opened here.
pub(super) fn log_fallback_once(dev: &PortConfig) {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if !LOGGED.swap(true, Ordering::Relaxed) {
        tracing::info!(
            path = %dev.path.display(),
            "This system lacks the TCGETS2/TCSETS2 ioctls (e.g. qemu-user or an old kernel): serial \
             ports are opened with classic termios, which supports only standard baud rates."
        );
    }
}

/// A descriptor holding the port's exclusive `flock` and `TIOCEXCL`. The lock goes with the
/// descriptor, but `TIOCEXCL` belongs to the terminal: it would outlive our close while anyone
/// else (a pseudo-terminal's creator) holds the terminal, and make every later open by a
/// non-root gateway fail with EBUSY. So it is cleared on drop, as serialport does.
struct Exclusive(OwnedFd);

impl Exclusive {
    fn claim(fd: OwnedFd) -> io::Result<Self> {
        // The lock first: it is what another sensorgate (or serialport user) checks, root
        // included, and failing here must not touch the holder's TIOCEXCL.
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(io::ErrorKind::ResourceBusy, "the port is locked by another process")
            } else {
                e
            });
        }
        // SAFETY: ioctl without argument on a descriptor we own.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCEXCL) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }
}

impl AsRawFd for Exclusive {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        // SAFETY: ioctl without argument on a descriptor still open. Failure (the terminal is
        // gone after an unplug) leaves nothing to clear.
        unsafe { libc::ioctl(self.0.as_raw_fd(), libc::TIOCNXCL) };
    }
}

/// Raw mode and the device's line settings, the same flags serialport sets.
fn configure(fd: RawFd, dev: &PortConfig, speed: libc::speed_t) -> io::Result<()> {
    let check = |r: i32| if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: termios is plain old data; tcgetattr fills it completely before it is read.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid termios pointer, for each call below.
    unsafe {
        check(libc::tcgetattr(fd, &mut t))?;
        libc::cfmakeraw(&mut t);
    }
    // CLOCAL: ignore modem lines (no carrier on a USB adapter); CREAD: enable the receiver.
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    t.c_cflag &= !libc::CSIZE;
    t.c_cflag |= match dev.data_bits {
        5 => libc::CS5,
        6 => libc::CS6,
        7 => libc::CS7,
        _ => libc::CS8,
    };
    match dev.parity {
        Parity::None => {
            t.c_cflag &= !(libc::PARENB | libc::PARODD);
            t.c_iflag &= !libc::INPCK;
            t.c_iflag |= libc::IGNPAR;
        }
        Parity::Odd | Parity::Even => {
            t.c_cflag |= libc::PARENB;
            if dev.parity == Parity::Odd {
                t.c_cflag |= libc::PARODD;
            } else {
                t.c_cflag &= !libc::PARODD;
            }
            t.c_iflag |= libc::INPCK;
            t.c_iflag &= !libc::IGNPAR;
        }
    }
    if dev.stop_bits == 2 {
        t.c_cflag |= libc::CSTOPB;
    } else {
        t.c_cflag &= !libc::CSTOPB;
    }
    t.c_iflag &= !(libc::IXON | libc::IXOFF);
    t.c_cflag &= !libc::CRTSCTS;
    match dev.flow_control {
        FlowControl::None => {}
        FlowControl::Software => t.c_iflag |= libc::IXON | libc::IXOFF,
        FlowControl::Hardware => t.c_cflag |= libc::CRTSCTS,
    }
    // SAFETY: as above.
    unsafe {
        check(libc::cfsetispeed(&mut t, speed))?;
        check(libc::cfsetospeed(&mut t, speed))?;
        check(libc::tcsetattr(fd, libc::TCSANOW, &t))
    }
}

/// The `Bxxx` constant for a baud rate. Rates between them (e.g. 250000 for some sensors) need
/// TCSETS2, which is exactly what is missing when this module is used.
fn speed(baud: u32) -> io::Result<libc::speed_t> {
    Ok(match baud {
        50 => libc::B50,
        75 => libc::B75,
        110 => libc::B110,
        134 => libc::B134,
        150 => libc::B150,
        200 => libc::B200,
        300 => libc::B300,
        600 => libc::B600,
        1200 => libc::B1200,
        1800 => libc::B1800,
        2400 => libc::B2400,
        4800 => libc::B4800,
        9600 => libc::B9600,
        19200 => libc::B19200,
        38400 => libc::B38400,
        57600 => libc::B57600,
        115_200 => libc::B115200,
        230_400 => libc::B230400,
        460_800 => libc::B460800,
        500_000 => libc::B500000,
        576_000 => libc::B576000,
        921_600 => libc::B921600,
        1_000_000 => libc::B1000000,
        1_152_000 => libc::B1152000,
        1_500_000 => libc::B1500000,
        2_000_000 => libc::B2000000,
        2_500_000 => libc::B2500000,
        3_000_000 => libc::B3000000,
        3_500_000 => libc::B3500000,
        4_000_000 => libc::B4000000,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "baud {baud} is not a standard rate, and this system lacks the TCSETS2 ioctl that \
                     sets other rates (fix: use a standard rate such as 9600, 57600, 115200, 230400, \
                     460800 or 921600, or run on a kernel with TCSETS2)"
                ),
            ))
        }
    })
}

impl AsyncRead for TermiosPort {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            // What this read may fill: less than that is a short read.
            let room = buf.remaining();
            // try_io clears the readiness when read(2) says EAGAIN (WouldBlock), so the next
            // poll waits for the reactor instead of spinning. A short read clears it too, as
            // tokio's TcpStream does: the kernel had no more, so the read that would say EAGAIN
            // is saved (bytes arriving meanwhile are a new event, which clearing keeps).
            let read = guard.try_io(|fd| {
                // SAFETY: read(2) writes at most `len` bytes into the unfilled part and never
                // de-initialises it; only the `n` bytes it wrote are marked initialised below.
                let n = unsafe {
                    let unfilled = buf.unfilled_mut();
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match read {
                Ok(Ok(n)) => {
                    if n > 0 && n < room {
                        guard.clear_ready();
                    }
                    // SAFETY: read(2) initialised these `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                // EIO after a hang-up (an unplugged adapter, a closed pseudo-terminal) ends the
                // session like any other error.
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for TermiosPort {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let written = guard.try_io(|fd| {
                // SAFETY: write(2) only reads `buf.len()` bytes from `buf`.
                let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match written {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // write(2) hands bytes to the tty layer; there is no user-space buffer to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::config::Config;
    use crate::simulate::PtyLink;

    fn device(path: &std::path::Path, extra: &str) -> PortConfig {
        let text = format!(
            "[gateway]\nid = \"gw\"\n[[device]]\nname = \"d\"\npath = {:?}\nframing = \"lines\"\n{extra}",
            path.display().to_string()
        );
        let mut c: Config = toml::from_str(&text).unwrap();
        c.devices.remove(0).port
    }

    async fn open_blocking(dev: PortConfig) -> io::Result<TermiosPort> {
        tokio::task::spawn_blocking(move || open(&dev)).await.unwrap()
    }

    #[tokio::test]
    async fn bytes_written_to_the_pty_arrive_through_the_port() {
        let dir = tempfile::tempdir().unwrap();
        let mut pty = PtyLink::create(&dir.path().join("sensor")).unwrap();
        let dev = device(&pty.link, "baud = 9600\nstop_bits = 2\nflow_control = \"hardware\"");
        let mut port = open_blocking(dev).await.unwrap();

        // The settings reached the terminal (a pseudo-terminal forces CS8 without parity, so
        // those two cannot be checked here).
        // SAFETY: plain old data, filled by tcgetattr on an open descriptor before it is read.
        let t = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(port.fd.as_raw_fd(), &mut t), 0);
            assert_eq!(libc::cfgetospeed(&t), libc::B9600);
            assert_eq!(libc::cfgetispeed(&t), libc::B9600);
            t
        };
        assert_ne!(t.c_cflag & libc::CSTOPB, 0);
        assert_ne!(t.c_cflag & libc::CRTSCTS, 0);
        assert_eq!(t.c_iflag & (libc::IXON | libc::IXOFF), 0);
        assert_ne!(t.c_cflag & libc::CLOCAL, 0);
        assert_eq!(t.c_lflag & libc::ICANON, 0, "raw mode");

        // More than one read's worth, written in pieces: readiness must be re-armed each time.
        let mut got = Vec::new();
        for chunk in 0..20u8 {
            let bytes: Vec<u8> = (0..200).map(|i| b'a' + (i + chunk) % 26).collect();
            pty.master.write_all(&bytes).await.unwrap();
            let mut buf = [0u8; 64];
            while got.len() < (usize::from(chunk) + 1) * 200 {
                let n = tokio::time::timeout(Duration::from_secs(5), port.read(&mut buf)).await.unwrap().unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
        }
        let want: Vec<u8> = (0..20u8).flat_map(|c| (0..200).map(move |i| b'a' + (i + c) % 26)).collect();
        assert_eq!(got, want);

        // A second opener is refused while the port is held...
        let busy = open_blocking(device(&pty.link, "")).await.err().expect("locked");
        assert_eq!(busy.kind(), io::ErrorKind::ResourceBusy, "{busy}");
        // ...and admitted once it is closed.
        drop(port);
        let port = open_blocking(device(&pty.link, "")).await.unwrap();

        // The other end going away (an unplug) ends reading with an error or EOF, promptly.
        let mut port = port;
        drop(pty);
        let mut buf = [0u8; 16];
        let end = tokio::time::timeout(Duration::from_secs(5), port.read(&mut buf)).await.unwrap();
        assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    }

    #[tokio::test]
    async fn a_non_standard_baud_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let pty = PtyLink::create(&dir.path().join("sensor")).unwrap();
        let e = open_blocking(device(&pty.link, "baud = 250000")).await.err().expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let text = e.to_string();
        assert!(text.contains("baud 250000 is not a standard rate") && text.contains("115200"), "{text}");
    }

    #[tokio::test]
    async fn a_missing_path_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_blocking(device(&dir.path().join("nope"), "")).await.err().expect("missing");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn recognises_enosys_as_serialport_reports_it() {
        // The text serialport copies from nix is the C library's text for the errno too.
        let os = io::Error::from_raw_os_error(libc::ENOSYS).to_string();
        assert!(os.starts_with(ENOSYS_TEXT), "{os}");
        let e = tokio_serial::Error::new(tokio_serial::ErrorKind::Unknown, ENOSYS_TEXT);
        assert!(is_enosys(&e));
        assert!(!is_enosys(&tokio_serial::Error::new(tokio_serial::ErrorKind::NoDevice, ENOSYS_TEXT)));
        assert!(!is_enosys(&tokio_serial::Error::new(tokio_serial::ErrorKind::Unknown, "Input/output error")));
    }
}
