//! The connection task against a scripted broker on an in-memory stream, under paused time:
//! exact, fast, and able to misbehave in ways a real broker rarely does on cue.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Mutex as StdMutex;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut};
use rumqttc::mqttbytes::v4;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::liveness::Liveness;

/// Hands out prepared streams, one per connection attempt; refuses when none is left.
struct Scripted {
    streams: StdMutex<VecDeque<Box<dyn connect::Stream>>>,
}

impl Connector for Scripted {
    async fn open(&self, _deadline: Instant) -> io::Result<Box<dyn connect::Stream>> {
        let next = self.streams.lock().unwrap().pop_front();
        next.ok_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused))
    }
    fn describe(&self) -> String {
        "scripted".into()
    }
}

/// The broker's end of one connection: reads packets, writes raw bytes.
struct Peer {
    io: DuplexStream,
    buf: BytesMut,
}

impl Peer {
    /// The next packet we sent, decoded by rumqttc's codec (not ours). Time is paused, so
    /// the generous limit fires at once when nothing more will come: a failure, not a hang.
    async fn packet(&mut self) -> v4::Packet {
        tokio::time::timeout(Duration::from_secs(600), self.next_packet()).await.expect("a packet within 600 s")
    }

    async fn next_packet(&mut self) -> v4::Packet {
        loop {
            match v4::Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return p,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    assert_ne!(self.io.read_buf(&mut self.buf).await.unwrap(), 0, "gateway closed");
                }
                Err(e) => panic!("gateway sent a bad packet: {e:?}"),
            }
        }
    }

    /// Packets until one matches.
    async fn until(&mut self, mut pred: impl FnMut(&v4::Packet) -> bool) -> v4::Packet {
        loop {
            let p = self.packet().await;
            if pred(&p) {
                return p;
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    async fn connack(&mut self) {
        assert!(matches!(self.packet().await, v4::Packet::Connect(..)));
        self.send(&[0x20, 0x02, 0x00, 0x00]).await;
    }

    /// A reading publish's packet id and payload; gateway messages on the way (`online`,
    /// states) are acknowledged, as a broker would.
    async fn reading(&mut self) -> (u16, Bytes) {
        loop {
            if let v4::Packet::Publish(p) = self.packet().await {
                if p.topic.ends_with("/readings") {
                    return (p.pkid, p.payload);
                }
                if p.pkid != 0 {
                    self.puback(p.pkid).await;
                }
            }
        }
    }

    async fn puback(&mut self, pkid: u16) {
        let mut b = BytesMut::new();
        v4::PubAck::new(pkid).write(&mut b).unwrap();
        self.send(&b).await;
    }

    /// True once the gateway closed its end (within 600 s).
    async fn closed(&mut self) -> bool {
        let mut scratch = [0u8; 4096];
        let eof = async {
            loop {
                match self.io.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(600), eof).await.is_ok()
    }
}

struct Harness {
    queue: Arc<ReadingQueue>,
    shared: Arc<MqttShared>,
    stops: Stops,
    task: tokio::task::JoinHandle<()>,
    incoming: mpsc::Receiver<Message>,
}

fn config() -> Config {
    Config::from_toml("[gateway]\nid = \"gw\"\n[[device]]\nname = \"d\"\npath = \"/x\"\nframing = \"lines\"\n").unwrap()
}

/// Starts the connection task over `n` in-memory connections (then refused).
fn start(
    n: usize,
    opts: ConnectOptions,
    qos: QoS,
    wrap: impl Fn(DuplexStream) -> Box<dyn connect::Stream>,
) -> (Harness, Vec<Peer>) {
    let queue = Arc::new(ReadingQueue::new(0, 1000, 1 << 20, None, opts.inflight));
    queue.add_lane("d");
    let (tx, incoming) = mpsc::channel(8);
    let shared = Arc::new(
        MqttShared::new(Arc::clone(&queue), Topics::new(&config()), qos, Box::new(Vec::new), Box::new(Vec::new))
            .with_subscriptions(vec!["sg/gw/cmd/#".into()], tx),
    );
    let mut streams: VecDeque<Box<dyn connect::Stream>> = VecDeque::new();
    let mut peers = Vec::new();
    for _ in 0..n {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        streams.push_back(wrap(ours));
        peers.push(Peer { io: theirs, buf: BytesMut::new() });
    }
    let stops = Stops::default();
    let beat = Liveness::new([]).beat_for("connection");
    let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30), false);
    let task = tokio::spawn(run_connection(
        Scripted { streams: StdMutex::new(streams) },
        opts,
        Arc::clone(&shared),
        backoff,
        beat,
        stops.clone(),
    ));
    (Harness { queue, shared, stops, task, incoming }, peers)
}

fn boxed(s: DuplexStream) -> Box<dyn connect::Stream> {
    Box::new(s)
}

fn push(q: &ReadingQueue, n: u32) {
    q.push(0, Bytes::from(format!("{{\"n\":{n}}}")));
}

fn stats(q: &ReadingQueue) -> crate::queue::LaneStats {
    q.stats()[0]
}

/// Scenario 13: bytes that arrive in the same segment as the CONNACK (amqtt sends retained
/// messages at once) are the start of the session, not lost.
#[tokio::test(start_paused = true)]
async fn bytes_after_the_connack_are_kept() {
    let (mut h, mut peers) = start(1, ConnectOptions::for_tests(10), QoS::AtLeastOnce, boxed);
    let mut p = peers.remove(0);
    assert!(matches!(p.packet().await, v4::Packet::Connect(..)));
    let mut seg = BytesMut::from(&[0x20, 0x02, 0x00, 0x00][..]);
    let mut publish = v4::Publish::new("sg/gw/cmd/metrics", QoS::AtLeastOnce, "{}");
    publish.pkid = 7;
    publish.retain = true;
    publish.write(&mut seg).unwrap();
    p.send(&seg).await;
    let m = tokio::time::timeout(Duration::from_secs(600), h.incoming.recv()).await.expect("delivered").unwrap();
    assert_eq!((m.topic.as_str(), m.retain), ("sg/gw/cmd/metrics", true));
    assert!(matches!(p.until(|p| matches!(p, v4::Packet::PubAck(_))).await, v4::Packet::PubAck(a) if a.pkid == 7));
    assert_eq!(h.shared.connection_errors.load(Relaxed), 0);
    h.task.abort();
}

/// Scenario 3 (client side) and packet-id wrap: ids cycle within the window; an unknown or
/// duplicate PUBACK is ignored, never frees a slot twice.
#[tokio::test(start_paused = true)]
async fn packet_ids_wrap_in_the_window_and_stray_acks_are_ignored() {
    let (h, mut peers) = start(1, ConnectOptions::for_tests(3), QoS::AtLeastOnce, boxed);
    let mut p = peers.remove(0);
    p.connack().await;
    for n in 0..7 {
        push(&h.queue, n);
    }
    // Id 1 went to `online` (acked on the way), so readings take 2, 3, then 1 again.
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(p.reading().await.0);
    }
    assert_eq!(seen, [2, 3, 1]);
    // Unknown id, then a duplicate of a real one: neither may open a slot.
    p.puback(200).await;
    p.puback(2).await;
    p.puback(2).await;
    let (id, _) = p.reading().await;
    assert_eq!(id, 2, "exactly one slot was freed");
    p.puback(3).await;
    p.puback(1).await;
    p.puback(2).await;
    let ids: Vec<u16> = [p.reading().await.0, p.reading().await.0, p.reading().await.0].into();
    assert_eq!(ids, [3, 1, 2]);
    for id in ids {
        p.puback(id).await;
    }
    tokio::task::yield_now().await;
    while stats(&h.queue).delivered < 7 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let s = stats(&h.queue);
    assert_eq!((s.delivered, s.in_flight, s.queued), (7, 0, 0));
    assert_eq!(h.shared.stray_acks.load(Relaxed), 2, "the unknown 200 and the duplicate 2");
    h.task.abort();
}

/// Scenario 5: a broker that stops answering is noticed one PINGRESP deadline after the
/// ping, not after two keep-alives; missed ticks do not fire back to back.
#[tokio::test(start_paused = true)]
async fn a_missing_pingresp_ends_the_connection_in_time() {
    let mut opts = ConnectOptions::for_tests(10);
    opts.keep_alive = Duration::from_secs(30);
    opts.connect_timeout = Duration::from_secs(5);
    let (h, mut peers) = start(1, opts, QoS::AtLeastOnce, boxed);
    let mut p = peers.remove(0);
    p.connack().await;
    let began = Instant::now();
    assert!(matches!(p.until(|p| matches!(p, v4::Packet::PingReq)).await, v4::Packet::PingReq));
    assert_eq!(began.elapsed(), Duration::from_secs(30));
    assert!(p.closed().await);
    assert_eq!(began.elapsed(), Duration::from_secs(35), "30 s keep-alive + 5 s PINGRESP deadline");
    assert_eq!(h.shared.last_error().as_deref(), Some("waiting for PINGRESP timed out"));
    h.task.abort();
}

/// A peer that stops reading: the write deadline ends the connection, and the readings come
/// back to the queue.
#[tokio::test(start_paused = true)]
async fn a_write_stall_ends_the_connection_and_requeues() {
    let mut opts = ConnectOptions::for_tests(1000);
    opts.connect_timeout = Duration::from_secs(5);
    let (h, mut peers) = start(1, opts, QoS::AtLeastOnce, boxed);
    let mut p = peers.remove(0);
    p.connack().await;
    // 300 readings of 1 KiB: far more than the 64 KiB pipe holds; the peer reads nothing.
    for n in 0..300 {
        h.queue.push(0, Bytes::from(vec![b'x'; 1000 + n % 2]));
    }
    let mut link = h.shared.link();
    link.wait_for(|l| l.up).await.unwrap();
    link.wait_for(|l| !l.up).await.unwrap();
    assert_eq!(h.shared.last_error().as_deref(), Some("writing to the broker timed out"));
    let s = stats(&h.queue);
    assert_eq!((s.in_flight, s.queued, s.delivered), (0, 300, 0));
    drop(p);
    h.task.abort();
}

/// A stream that keeps written bytes until flushed, like rustls does with the tail of a
/// record. Without a flush after each batch, those bytes wait for the next write.
struct HoldsUntilFlushed {
    inner: DuplexStream,
    held: Vec<u8>,
}

impl tokio::io::AsyncRead for HoldsUntilFlushed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for HoldsUntilFlushed {
    fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while !this.held.is_empty() {
            match Pin::new(&mut this.inner).poll_write(cx, &this.held) {
                Poll::Ready(Ok(n)) => {
                    this.held.drain(..n);
                }
                other => return other.map_ok(|_| ()),
            }
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Scenario 4: a batch's tail reaches the broker at once, not at the next write.
#[tokio::test(start_paused = true)]
async fn a_batch_is_flushed_through_a_buffering_stream() {
    let wrap =
        |s: DuplexStream| -> Box<dyn connect::Stream> { Box::new(HoldsUntilFlushed { inner: s, held: Vec::new() }) };
    let (h, mut peers) = start(1, ConnectOptions::for_tests(10), QoS::AtLeastOnce, wrap);
    let mut p = peers.remove(0);
    p.connack().await;
    push(&h.queue, 1);
    let began = Instant::now();
    let (_, payload) = p.reading().await;
    assert_eq!(&payload[..], b"{\"n\":1}");
    assert_eq!(began.elapsed(), Duration::ZERO, "no wait for a keep-alive");
    h.task.abort();
}

/// A peer that takes a few bytes at a time: every packet still arrives whole and in order.
#[tokio::test(start_paused = true)]
async fn partial_writes_deliver_every_byte() {
    let (h, peers) = {
        let queue_opts = ConnectOptions::for_tests(100);
        start(1, queue_opts, QoS::AtMostOnce, |s| boxed(s))
    };
    let mut p = peers.into_iter().next().unwrap();
    // A 7-byte pipe would be tidier; the reader here takes 3 bytes at a time instead.
    p.connack().await;
    for n in 0..50 {
        push(&h.queue, n);
    }
    let mut got = Vec::new();
    let mut raw = BytesMut::new();
    while got.len() < 50 {
        let mut three = [0u8; 3];
        let k = p.io.read(&mut three).await.unwrap();
        raw.extend_from_slice(&three[..k]);
        while let Ok(pkt) = v4::Packet::read(&mut raw, 1 << 20) {
            if let v4::Packet::Publish(pb) = pkt {
                if pb.topic.ends_with("/readings") {
                    got.push(pb.payload);
                }
            }
        }
    }
    let expected: Vec<Bytes> = (0..50).map(|n| Bytes::from(format!("{{\"n\":{n}}}"))).collect();
    assert_eq!(got, expected);
    h.task.abort();
}

/// Scenario 7: an oversized retained message is skipped (and acknowledged), counted, and the
/// connection stays up: no reconnect loop.
#[tokio::test(start_paused = true)]
async fn an_oversized_incoming_message_is_skipped_not_fatal() {
    let (mut h, mut peers) = start(1, ConnectOptions::for_tests(10), QoS::AtLeastOnce, boxed);
    let mut p = peers.remove(0);
    p.connack().await;
    let mut big = BytesMut::new();
    let mut pb = v4::Publish::new("homeassistant/status", QoS::AtLeastOnce, vec![b'o'; 300 * 1024]);
    pb.pkid = 11;
    pb.write(&mut big).unwrap();
    let mut small = v4::Publish::new("sg/gw/cmd/help", QoS::AtMostOnce, "{}");
    small.pkid = 0;
    small.write(&mut big).unwrap();
    // Sent while the gateway is free to read: in pieces, as TCP would.
    let send = async {
        for chunk in big.chunks(10_000) {
            p.io.write_all(chunk).await.unwrap();
        }
    };
    let (_, m) = tokio::join!(send, h.incoming.recv());
    assert_eq!(m.unwrap().topic, "sg/gw/cmd/help");
    assert!(matches!(p.until(|p| matches!(p, v4::Packet::PubAck(_))).await, v4::Packet::PubAck(a) if a.pkid == 11));
    assert_eq!(h.shared.incoming_oversize.load(Relaxed), 1);
    assert_eq!(h.shared.connection_errors.load(Relaxed), 0);
    h.task.abort();
}

/// A SUBACK that refuses a subscription is shown, not ignored.
#[tokio::test(start_paused = true)]
async fn a_refused_subscription_is_counted() {
    let (h, mut peers) = start(1, ConnectOptions::for_tests(10), QoS::AtLeastOnce, boxed);
    let mut p = peers.remove(0);
    p.connack().await;
    let pkid = match p.until(|p| matches!(p, v4::Packet::Subscribe(_))).await {
        v4::Packet::Subscribe(s) => s.pkid,
        _ => unreachable!(),
    };
    p.send(&[0x90, 0x03, (pkid >> 8) as u8, pkid as u8, 0x80]).await;
    while h.shared.subscriptions_refused.load(Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(h.shared.subscriptions_refused.load(Relaxed), 1);
    assert!(h.shared.is_connected());
    h.task.abort();
}

/// Scenario 8: a topic MQTT cannot carry is refused when encoding; the packets after it are
/// intact and their ids acknowledged.
#[tokio::test(start_paused = true)]
async fn a_topic_over_65535_bytes_is_refused_not_wrapped() {
    let (h, mut peers) = start(1, ConnectOptions::for_tests(3), QoS::AtLeastOnce, boxed);
    let mut p = peers.remove(0);
    p.connack().await;
    let _ = p.until(|p| matches!(p, v4::Packet::Subscribe(_))).await;
    for i in 0..5 {
        let topic = format!("sg/gw/cmd/{}{i}/response", "x".repeat(70_000));
        h.queue.push_control(Control { topic, payload: Bytes::from_static(b"{}"), retain: false, correlation: None });
    }
    for n in 0..4 {
        push(&h.queue, n);
    }
    for expected in 0..4 {
        let (id, payload) = p.reading().await;
        assert_eq!(payload, Bytes::from(format!("{{\"n\":{expected}}}")));
        p.puback(id).await;
    }
    assert_eq!(h.shared.controls_refused.load(Relaxed), 5);
    h.task.abort();
}

/// Scenario 2 (the connection side): a reading the broker hangs up on every time is dropped
/// as poisoned after three strikes, and the readings behind it flow; no client-id conflict
/// is reported for it.
#[tokio::test(start_paused = true)]
async fn a_reading_the_broker_keeps_hanging_up_on_is_dropped_as_poisoned() {
    let (h, peers) = start(4, ConnectOptions::for_tests(1), QoS::AtLeastOnce, boxed);
    push(&h.queue, 0);
    push(&h.queue, 1);
    push(&h.queue, 2);
    let mut peers = peers.into_iter();
    for _ in 0..3 {
        let mut p = peers.next().unwrap();
        p.connack().await;
        let (_, payload) = p.reading().await;
        assert_eq!(&payload[..], b"{\"n\":0}");
        drop(p); // the broker hangs up
    }
    let mut p = peers.next().unwrap();
    p.connack().await;
    for expected in [1, 2] {
        let (id, payload) = p.reading().await;
        assert_eq!(payload, Bytes::from(format!("{{\"n\":{expected}}}")));
        p.puback(id).await;
    }
    while stats(&h.queue).delivered < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let s = stats(&h.queue);
    assert_eq!((s.poisoned, s.delivered, s.in_flight, s.queued), (1, 2, 0, 0));
    assert!(!h.shared.client_id_conflict.load(Relaxed));
    h.task.abort();
}

/// Scenario 1: while the broker's port refuses connections, retries come within a second
/// (jitter off: 250 ms), not after a backoff that grew meanwhile.
#[tokio::test(start_paused = true)]
async fn refused_connections_are_retried_within_a_second() {
    let (h, _peers) = start(0, ConnectOptions::for_tests(10), QoS::AtLeastOnce, boxed);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let attempts = h.shared.connection_errors.load(Relaxed);
    // 60 s / 250 ms, give or take the first attempt.
    assert!((239..=241).contains(&attempts), "{attempts} attempts in 60 s");
    h.task.abort();
}

/// Scenario 12 (connection side): at shutdown with nothing queued the task sends `offline`
/// and disconnects at once, without waiting for a tick.
#[tokio::test(start_paused = true)]
async fn an_idle_drain_disconnects_at_once() {
    let (h, mut peers) = start(1, ConnectOptions::for_tests(10), QoS::AtLeastOnce, boxed);
    let mut p = peers.remove(0);
    p.connack().await;
    let _ = p.until(|p| matches!(p, v4::Packet::Subscribe(_))).await;
    // The `online` message and its ack.
    if let v4::Packet::Publish(pb) = p.until(|p| matches!(p, v4::Packet::Publish(_))).await {
        p.puback(pb.pkid).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let began = Instant::now();
    h.stops.draining.cancel();
    let offline = p.until(|p| matches!(p, v4::Packet::Publish(_))).await;
    let v4::Packet::Publish(pb) = offline else { unreachable!() };
    assert_eq!(&pb.payload[..], b"offline");
    p.puback(pb.pkid).await;
    assert!(matches!(p.packet().await, v4::Packet::Disconnect));
    assert!(began.elapsed() < Duration::from_millis(1), "took {:?}", began.elapsed());
    h.task.await.unwrap();
}

/// MQTT 5: the broker's Receive Maximum bounds the window, and a PUBACK with a failure
/// reason drops the reading, counted by reason, with no reconnect.
#[tokio::test(start_paused = true)]
async fn mqtt5_limits_and_puback_reasons() {
    let mut opts = ConnectOptions::for_tests(10);
    opts.version = Version::V5;
    let (h, mut peers) = start(1, opts, QoS::AtLeastOnce, boxed);
    let mut p = peers.remove(0);
    let mut connect = BytesMut::new();
    while v5::Packet::read(&mut p.buf, None).is_err() {
        p.io.read_buf(&mut p.buf).await.unwrap();
        connect.clear();
    }
    // CONNACK with Receive Maximum 2.
    // Flags, reason 0, 3 bytes of properties: Receive Maximum (0x21) = 2.
    p.send(&[0x20, 0x06, 0x00, 0x00, 0x03, 0x21, 0x00, 0x02]).await;
    for n in 0..4 {
        push(&h.queue, n);
    }
    let mut readings = Vec::new();
    while readings.len() < 2 {
        let pkt = loop {
            match v5::Packet::read(&mut p.buf, None) {
                Ok(pkt) => break pkt,
                Err(_) => {
                    p.io.read_buf(&mut p.buf).await.unwrap();
                }
            }
        };
        if let v5::Packet::Publish(pb) = pkt {
            if pb.topic.ends_with(b"/readings") {
                readings.push(pb.pkid);
            } else {
                let mut b = BytesMut::new();
                v5::Packet::PubAck(v5::PubAck::new(pb.pkid, None)).write(&mut b, None).unwrap();
                p.send(&b).await;
            }
        }
    }
    assert_eq!(stats(&h.queue).in_flight, 2, "the broker's receive maximum of 2 holds");
    let mut b = BytesMut::new();
    let refuse = v5::PubAck { pkid: readings[0], reason: v5::PubAckReason::QuotaExceeded, properties: None };
    v5::Packet::PubAck(refuse).write(&mut b, None).unwrap();
    p.send(&b).await;
    while stats(&h.queue).poisoned == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(h.shared.puback_refusals().get("quota_exceeded"), Some(&1));
    assert_eq!(h.shared.connection_errors.load(Relaxed), 0);
    let _ = p.buf.remaining();
    h.task.abort();
}

use rumqttc::v5::mqttbytes::v5;
#[allow(unused_imports)]
use BufMut as _;
