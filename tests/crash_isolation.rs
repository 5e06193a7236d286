//! A panic in one device's decoder or reader is caught, counted and that device restarted;
//! every other device keeps flowing with exact counts. In-process gateway (to put the faulty
//! part in at the seams), real mosquitto, real pseudo-terminals.
#![allow(clippy::disallowed_methods)] // The subscriber's event loop is its own.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use common::{json_lines as lines, n, write_all, Mosquitto, Subscriber};
use sensorgate::app::{self, Hooks};
use sensorgate::config::{Config, PortConfig, StreamConfig};
use sensorgate::decode::{Decode, Decoded};
use sensorgate::device::{PortOpener, SerialOpener, SerialPort};
use sensorgate::reject::Reject;
use sensorgate::simulate::PtyLink;
use serde_json::Value;
use tokio::io::{AsyncRead, ReadBuf};

fn config(port: u16, devices: &[(&str, &std::path::Path)]) -> Config {
    let mut text = format!("[gateway]\nid = \"it\"\nmetrics_interval = \"100ms\"\n[mqtt]\nport = {port}\n");
    for (name, path) in devices {
        text += &format!("[[device]]\nname = \"{name}\"\npath = \"{}\"\nframing = \"lines\"\n", path.display());
    }
    Config::from_toml(&text).unwrap()
}

async fn metrics_where(sub: &mut Subscriber, pred: impl Fn(&Value) -> bool) -> Value {
    sub.wait_for(Duration::from_secs(10), |m| m.topic == "sensorgate/it/metrics" && pred(&m.json())).await.0.json()
}

struct PanicsOnBoom(Box<dyn Decode>);

impl Decode for PanicsOnBoom {
    fn decode(&mut self, frame: &[u8], out: &mut BytesMut) -> Result<Decoded, Reject> {
        if frame.windows(4).any(|w| w == b"boom") {
            panic!("decoder bug triggered by a frame");
        }
        self.0.decode(frame, out)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decoder_panic_restarts_only_its_device() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let (p, q) = (dir.path().join("p"), dir.path().join("q"));
    let (mut pty_p, mut pty_q) = (PtyLink::create(&p).unwrap(), PtyLink::create(&q).unwrap());
    let decoders = Arc::new(|name: &str, stream: &StreamConfig| -> Box<dyn Decode> {
        let inner = stream.decoder();
        if name == "p" {
            Box::new(PanicsOnBoom(inner))
        } else {
            inner
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(app::run_with(
        config(broker.port, &[("p", &p), ("q", &q)]),
        async { stopped.await.unwrap_or(()) },
        Hooks { decoders, ..Hooks::default() },
    ));

    let mut bytes = lines(0..5);
    bytes.extend_from_slice(b"{\"boom\":1}\n");
    bytes.extend(lines(5..9));
    write_all(&mut pty_p.master, &bytes).await;
    write_all(&mut pty_q.master, &lines(0..10)).await;
    // After the restart p reads on, from the same port.
    let (m, _) = sub
        .wait_for(Duration::from_secs(10), |m| m.topic.ends_with("/p/state") && m.json()["state"] == "backoff")
        .await;
    assert!(m.json()["last_error"].as_str().unwrap().contains("decoder bug triggered by a frame"), "{}", m.text());
    sub.wait_for(Duration::from_secs(10), |m| m.topic.ends_with("/p/state") && m.json()["state"] == "up").await;
    write_all(&mut pty_p.master, &lines(9..12)).await;
    write_all(&mut pty_q.master, &lines(10..20)).await;

    let m =
        metrics_where(&mut sub, |m| m["devices"]["p"]["delivered"] == 12 && m["devices"]["q"]["delivered"] == 20).await;
    let (dp, dq) = (&m["devices"]["p"], &m["devices"]["q"]);
    assert_eq!((n(dp, "frames_in"), n(dp, "readings"), n(&dp["rejected"], "decoder_panic")), (13, 12, 1), "{dp}");
    assert_eq!(n(&dp["rejected"], "total"), 1);
    assert_eq!(n(dp, "restarts"), 1);
    assert_eq!((n(dq, "frames_in"), n(dq, "readings"), n(dq, "restarts"), n(&dq["rejected"], "total")), (20, 20, 0, 0));

    stop.send(()).unwrap();
    assert_eq!(gateway.await.unwrap().unwrap().lost(), 0);
    drop((pty_p, pty_q));
}

/// A port whose first read panics: a bug in the reading path, not in a decoder.
struct PanickyPort;

impl AsyncRead for PanickyPort {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        panic!("driver bug while reading");
    }
}

impl tokio::io::AsyncWrite for PanickyPort {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<std::io::Result<usize>> {
        panic!("driver bug while writing");
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

struct FirstOpenPanics {
    path: std::path::PathBuf,
    fired: AtomicBool,
}

impl PortOpener for FirstOpenPanics {
    fn open<'a>(
        &'a self,
        dev: &'a PortConfig,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<SerialPort>> + Send + 'a>> {
        if dev.path == self.path && !self.fired.swap(true, Ordering::SeqCst) {
            return Box::pin(async { Ok(Box::new(PanickyPort) as SerialPort) });
        }
        SerialOpener.open(dev)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_device_task_is_caught_at_its_join_and_the_device_restarted() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let (x, y) = (dir.path().join("x"), dir.path().join("y"));
    let (mut pty_x, mut pty_y) = (PtyLink::create(&x).unwrap(), PtyLink::create(&y).unwrap());
    let opener = Arc::new(FirstOpenPanics { path: x.clone(), fired: AtomicBool::new(false) });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(app::run_with(
        config(broker.port, &[("x", &x), ("y", &y)]),
        async { stopped.await.unwrap_or(()) },
        Hooks { opener, ..Hooks::default() },
    ));
    write_all(&mut pty_y.master, &lines(0..10)).await;
    write_all(&mut pty_x.master, &lines(0..10)).await;
    let m =
        metrics_where(&mut sub, |m| m["devices"]["x"]["delivered"] == 10 && m["devices"]["y"]["delivered"] == 10).await;
    assert_eq!(n(&m["devices"]["x"], "restarts"), 1, "the crashed supervisor was counted and restarted");
    assert_eq!(n(&m["devices"]["y"], "restarts"), 0);
    stop.send(()).unwrap();
    assert_eq!(gateway.await.unwrap().unwrap().lost(), 0);
    drop((pty_x, pty_y));
}
