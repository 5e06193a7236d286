//! One open port: read under the idle timeout, hand chunks to the decode thread, write the
//! query when one is due, end on any I/O error, EOF, silence, failed write or decoder panic.
//! The supervisor decides what happens next.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::query::{Query, WriteError};
use super::worker::{Chunk, Worker};
use super::{DeviceRuntime, SerialPort, State, SupervisorContext};
use crate::config::{Input, StreamConfig};
use crate::input::panic_message;
use crate::liveness;
use crate::telemetry::now_us;

/// Read buffer growth step. Chunks are split off it, so one allocation serves many reads.
const READ_CHUNK: usize = 4096;
/// Chunks waiting for the decode thread. Small on purpose: a slow decoder slows its own
/// port's reads (the kernel buffers, then the sensor waits), it never grows memory.
const CHUNKS_IN_FLIGHT: usize = 8;
/// At shutdown, what the port still holds is read until it has nothing for this long...
const LEFTOVER_QUIET: Duration = Duration::from_millis(10);
/// ...or for this long in all, or this many bytes: a sensor that keeps talking cannot hold
/// the shutdown up. A pseudo-terminal holds 18 KiB, a UART's tty buffers a few tens of KiB.
const LEFTOVER_TIME: Duration = Duration::from_millis(250);
const LEFTOVER_MAX: usize = 64 * 1024;
/// Waiting this long for the decode thread at shutdown, the session says so (once).
const DECODER_LATE: Duration = Duration::from_millis(500);

/// Why a session ended. Every variant but `Cancelled` leads to a restart.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    #[error("shutting down")]
    Cancelled,
    /// `read()` returned 0: on Linux, an unplugged adapter or a closed pseudo-terminal.
    #[error("end of file (device unplugged or closed)")]
    Eof,
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
    #[error("no data for {0:?}")]
    Idle(Duration),
    /// Writing the query failed or timed out (`write_timeout`).
    #[error(transparent)]
    Write(WriteError),
    #[error("decoder panicked: {0}")]
    DecoderPanic(String),
    #[error("restart requested")]
    Requested,
}

/// Runs one session of the device's input on its open port. With `up_on_data` (a reopen
/// after silence) the device is reported `up` only once bytes arrive again; until then it
/// stays `stale`.
pub async fn run(
    port: SerialPort,
    ctx: &SupervisorContext,
    dev_cancel: &CancellationToken,
    up_on_data: bool,
) -> SessionEnd {
    match &ctx.dev.config.input {
        Input::Stream(stream) => run_stream(port, stream, ctx, dev_cancel, up_on_data).await,
        // A slave's port belongs to its bus's task (`bus::supervise_bus`), never to a device
        // supervisor; the app starts none for it.
        Input::Modbus(_) => SessionEnd::Io(io::Error::other("a Modbus slave is polled by its bus's task")),
    }
}

/// A stream session: reads the port, its decode thread feeds the stream input.
async fn run_stream(
    mut port: SerialPort,
    stream: &StreamConfig,
    ctx: &SupervisorContext,
    dev_cancel: &CancellationToken,
    mut up_on_data: bool,
) -> SessionEnd {
    let dev = &ctx.dev;
    let (tx, rx) = mpsc::channel::<Chunk>(CHUNKS_IN_FLIGHT);
    let (panic_tx, mut panic_rx) = oneshot::channel();
    let worker = Worker {
        dev: Arc::clone(dev),
        stream: stream.clone(),
        queue: Arc::clone(&ctx.queue),
        decoders: Arc::clone(&ctx.decoders),
        panicked: Some(panic_tx),
    };
    // Dropped when the thread ends, however it ends: lets the session wait for it without
    // holding a blocking-pool thread (the runtime's drop would wait for that one forever if
    // the decoder hangs).
    let (ended_tx, mut ended) = oneshot::channel::<()>();
    // A dedicated thread rather than spawn_blocking: it lives as long as the session, keeps
    // the device's frames in order, and cannot starve the blocking pool others rely on.
    let thread = std::thread::Builder::new().name(format!("decode-{}", dev.name())).spawn(move || {
        let _ended = ended_tx;
        worker.run(rx);
    });
    let handle = match thread {
        Ok(h) => h,
        Err(e) => return SessionEnd::Io(e),
    };

    let idle = dev.config.idle_timeout;
    let mut idle_deadline = Instant::now() + idle;
    let mut tick = liveness::ticker();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    // The first query goes out now, right after the port opened.
    let mut query = stream.query().map(|(bytes, every)| Query::new(bytes, every, stream.write_timeout));
    let mut end = loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let step = tokio::select! {
            biased;
            _ = dev_cancel.cancelled() => break SessionEnd::Cancelled,
            msg = &mut panic_rx => break SessionEnd::DecoderPanic(msg.unwrap_or_else(|_| "decode thread ended".into())),
            _ = dev.restart.notified() => break SessionEnd::Requested,
            r = liveness::beating(&ctx.beat, &mut tick, tokio::time::timeout_at(idle_deadline, read_or_query(&mut port, &mut buf, &mut query))) => r,
        };
        match step {
            Err(_) => break SessionEnd::Idle(idle),
            Ok(Step::Queried(Ok(()))) => {
                dev.counters.queries_sent.fetch_add(1, Relaxed);
            }
            Ok(Step::Queried(Err(e))) => break SessionEnd::Write(e),
            // Never read again after Ok(0): on an unplugged adapter it repeats forever.
            Ok(Step::Read(Ok(0))) => break SessionEnd::Eof,
            Ok(Step::Read(Err(e))) => break SessionEnd::Io(e),
            Ok(Step::Read(Ok(n))) => {
                idle_deadline = Instant::now() + idle;
                dev.counters.bytes_in.fetch_add(n as u64, Relaxed);
                if std::mem::take(&mut up_on_data) {
                    dev.set_state(&ctx.queue, State::Up, None);
                }
                // Bytes already read are decoded even if shutdown starts now: not racing
                // cancellation here keeps them from being lost unaccounted. No beat while
                // waiting: a decode thread that stops taking bytes is a stuck pipeline, and the
                // watchdog is meant to see it.
                if tx.send((buf.split().freeze(), now_us())).await.is_err() {
                    break SessionEnd::DecoderPanic("decode thread ended".into());
                }
            }
        }
    };
    if matches!(end, SessionEnd::Cancelled) {
        read_leftover(&mut port, &mut buf, &tx, dev).await;
    }
    drop(port);
    drop(tx);
    // The thread drains what it was given, then ends; its panic (outside a frame) shows here.
    if tokio::time::timeout(DECODER_LATE, &mut ended).await.is_err() {
        tracing::warn!(
            device = dev.name(),
            waited_ms = DECODER_LATE.as_millis() as u64,
            "Decode thread still busy with this session's bytes (a decoder stuck on a frame?); waiting."
        );
        let _ = ended.await;
    }
    // It has ended (or is ending): the join cannot block for long.
    let joined = tokio::task::spawn_blocking(move || handle.join()).await;
    if matches!(end, SessionEnd::Cancelled) {
        return end;
    }
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => end = SessionEnd::DecoderPanic(panic_message(&*panic)),
        Err(e) => end = SessionEnd::DecoderPanic(e.to_string()),
    }
    if let Ok(msg) = panic_rx.try_recv() {
        if !matches!(end, SessionEnd::DecoderPanic(_)) {
            end = SessionEnd::DecoderPanic(msg);
        }
    }
    end
}

/// What one turn of a stream session's port brought.
enum Step {
    Read(io::Result<usize>),
    /// A query was written in full, or writing it failed or timed out.
    Queried(Result<(), WriteError>),
}

/// Reads the port into `buf` and, for a device with a query, drives the query's schedule and
/// write on the same port: whichever completes first. The port is read while a query waits to
/// be written (with flow control, the sensor may hold our write until we read its answer).
/// Cancel safe: a read is only polled, so bytes are never lost, and a query's progress lives
/// in `query`.
fn read_or_query<'a>(
    port: &'a mut SerialPort,
    buf: &'a mut BytesMut,
    query: &'a mut Option<Query>,
) -> impl std::future::Future<Output = Step> + 'a {
    std::future::poll_fn(move |cx| {
        if let Some(q) = query.as_mut() {
            if let Poll::Ready(sent) = q.poll_send(Pin::new(&mut *port), cx) {
                return Poll::Ready(Step::Queried(sent));
            }
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut *port), cx, buf).map(Step::Read)
    })
}

/// At shutdown: what the port already holds — bytes the sensor sent before the signal, still
/// in the kernel's buffer — is read and handed to the decode thread, so it is decoded and
/// delivered like everything read before. Reads until the port is quiet for
/// [`LEFTOVER_QUIET`] (a port's readiness reaches the task within one reactor turn, so bytes
/// already buffered are never missed), at most [`LEFTOVER_MAX`] bytes, and waits at most
/// [`LEFTOVER_TIME`] on the port in all (time spent handing bytes to a slow decoder does not
/// count: the shutdown deadline bounds that).
async fn read_leftover(port: &mut SerialPort, buf: &mut BytesMut, tx: &mpsc::Sender<Chunk>, dev: &DeviceRuntime) {
    let mut budget = LEFTOVER_TIME;
    let mut total = 0;
    while total < LEFTOVER_MAX && !budget.is_zero() {
        buf.reserve(READ_CHUNK.min(LEFTOVER_MAX - total));
        let began = Instant::now();
        let read = tokio::time::timeout(LEFTOVER_QUIET.min(budget), port.read_buf(buf)).await;
        budget = budget.saturating_sub(began.elapsed());
        match read {
            Ok(Ok(n)) if n > 0 => {
                total += n;
                dev.counters.bytes_in.fetch_add(n as u64, Relaxed);
                if tx.send((buf.split().freeze(), now_us())).await.is_err() {
                    break;
                }
            }
            // Quiet, EOF or an error: nothing more to take.
            _ => break,
        }
    }
    if total > 0 {
        tracing::debug!(device = dev.name(), bytes = total, "Read what the port held at shutdown.");
    }
}
