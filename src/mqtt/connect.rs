//! Reaching the broker: the transport seam ([`Connector`]: TCP, TLS over TCP, or an in-memory
//! stream in tests) and the MQTT handshake (CONNECT → CONNACK) over any of them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::codec::{self, ConnAck, ConnectSpec, Incoming, Read, Reader, Version};
use super::ConnectionError;

/// Anything the connection can run over: TCP, TLS over TCP, a duplex pipe in tests.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Opens a byte stream to the broker. Called once per connection attempt; the caller bounds
/// the whole attempt with the connect timeout, `deadline` is when that runs out.
pub trait Connector: Send + Sync + 'static {
    fn open(&self, deadline: Instant) -> impl Future<Output = io::Result<Box<dyn Stream>>> + Send;
    /// For logs: where we connect to.
    fn describe(&self) -> String;
}

/// TCP (TCP_NODELAY: without it Nagle holds small publishes back for tens of milliseconds),
/// then TLS if configured.
#[derive(Clone)]
pub struct TcpConnector {
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Connector for TcpConnector {
    async fn open(&self, deadline: Instant) -> io::Result<Box<dyn Stream>> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port)).await?.collect();
        let tcp = connect_any(&addrs, deadline).await?;
        tcp.set_nodelay(true)?;
        Ok(match &self.tls {
            Some(config) => {
                let name = rustls_pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                Box::new(tokio_rustls::TlsConnector::from(Arc::clone(config)).connect(name, tcp).await?)
            }
            None => Box::new(tcp),
        })
    }

    fn describe(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Tries each address in turn, each with an equal share of the time left, so that one dead
/// address (a broken IPv6 route, a dead node behind a DNS name) cannot use up the whole
/// timeout. Returns the last error if none answers; a refusal is kept over a timeout, since
/// it says the host is there and a fast retry is worth it.
///
/// # Errors
/// No address accepted the connection in its share of the time.
pub async fn connect_any(addrs: &[SocketAddr], deadline: Instant) -> io::Result<tokio::net::TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the broker's host name resolved to no address");
    for (i, addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let share = left / u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
        match tokio::time::timeout(share, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) => {
                tracing::debug!(%addr, error = %e, "Broker address did not accept the connection.");
                last = e;
            }
            Err(_) => {
                tracing::debug!(%addr, share_ms = share.as_millis() as u64, "Broker address did not answer in time.");
                if last.kind() != io::ErrorKind::ConnectionRefused {
                    last = io::Error::new(io::ErrorKind::TimedOut, format!("{addr} did not answer"));
                }
            }
        }
    }
    Err(last)
}

/// What a successful handshake leaves: the stream, whatever the broker sent after CONNACK in
/// the same read (retained messages may follow it at once), and the broker's limits.
pub struct Handshake {
    pub stream: Box<dyn Stream>,
    pub leftover: BytesMut,
    pub connack: ConnAck,
}

/// Opens the transport and does CONNECT → CONNACK, all before `timeout`.
///
/// # Errors
/// The transport cannot be opened, the broker refuses us or does not answer MQTT, or time runs out.
pub async fn handshake(
    connector: &impl Connector,
    version: Version,
    spec: &ConnectSpec<'_>,
    timeout: Duration,
) -> Result<Handshake, ConnectionError> {
    let deadline = Instant::now() + timeout;
    let attempt = async {
        let mut stream = connector.open(deadline).await?;
        let mut buf = BytesMut::new();
        codec::put_connect(&mut buf, version, spec).map_err(|e| ConnectionError::Protocol(e.to_string()))?;
        stream.write_all(&buf).await?;
        stream.flush().await?;
        buf.clear();
        let mut reader = Reader::new(version, spec.max_incoming);
        loop {
            match reader.next(&mut buf).map_err(|e| ConnectionError::Protocol(e.to_string()))? {
                Some(Read::Packet(Incoming::ConnAck(connack))) => {
                    if let Some(reason) = connack.refused {
                        return Err(ConnectionError::Refused(reason));
                    }
                    return Ok(Handshake { stream, leftover: buf, connack });
                }
                Some(other) => return Err(ConnectionError::Protocol(format!("expected CONNACK, got {other:?}"))),
                None => {
                    if stream.read_buf(&mut buf).await? == 0 {
                        return Err(ConnectionError::Closed);
                    }
                }
            }
        }
    };
    tokio::time::timeout_at(deadline, attempt).await.map_err(|_| ConnectionError::Timeout("connecting"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener whose accept backlog is full drops further SYNs: connecting to it hangs,
    /// like a dead address. The next address must still get its share of the time.
    #[tokio::test]
    async fn a_dead_first_address_does_not_use_up_the_timeout() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        // Fill the backlog (never accepted): later connects get no answer.
        let socket = socket2_listen_backlog_zero(&dead);
        let mut fillers = Vec::new();
        for _ in 0..8 {
            fillers.push(std::net::TcpStream::connect_timeout(&dead_addr, Duration::from_millis(200)));
        }
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let began = Instant::now();
        let tcp = connect_any(&[dead_addr, good_addr], Instant::now() + Duration::from_secs(2)).await;
        assert_eq!(tcp.expect("the second address answers").peer_addr().unwrap(), good_addr);
        let took = began.elapsed();
        assert!(took < Duration::from_millis(1900), "the good address got its share: {took:?}");
        drop((socket, fillers));
    }

    /// `listen(fd, 0)` again on a bound std listener: a backlog of (about) one.
    fn socket2_listen_backlog_zero(l: &std::net::TcpListener) -> i32 {
        use std::os::fd::AsRawFd;
        let fd = l.as_raw_fd();
        // SAFETY: fd is a valid listening socket owned by `l`, which outlives this call.
        assert_eq!(unsafe { libc::listen(fd, 0) }, 0);
        fd
    }

    #[tokio::test]
    async fn all_refused_keeps_the_refusal() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = connect_any(&[a, b], Instant::now() + Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }
}
