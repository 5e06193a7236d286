//! One open port: read under the idle timeout, decode what was read, write the query when one
//! is due, end on any I/O error, EOF, silence, failed write or decoder panic. The supervisor
//! decides what happens next.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
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
use crate::input::{panic_message, StreamInput};
use crate::liveness;
use crate::telemetry::now_us;

/// Read buffer size. Decoded in place and cleared after every read (chunks are split off it
/// for a decode thread, so one allocation serves many reads).
const READ_CHUNK: usize = 4096;
/// At shutdown, what the port still holds is read until it has nothing for this long...
const LEFTOVER_QUIET: Duration = Duration::from_millis(10);
/// ...or for this long in all, or this many bytes: a sensor that keeps talking cannot hold
/// the shutdown up. A pseudo-terminal holds 18 KiB, a UART's tty buffers a few tens of KiB.
const LEFTOVER_TIME: Duration = Duration::from_millis(250);
const LEFTOVER_MAX: usize = 64 * 1024;
/// Under overload, the pause after each read (see the session loop).
const OVERLOAD_READ_PAUSE: Duration = Duration::from_millis(5);
/// Chunks waiting for a decode thread. Small on purpose: a slow decoder slows its own port's
/// reads (the kernel buffers, then the sensor waits), it never grows memory.
const CHUNKS_IN_FLIGHT: usize = 8;
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

/// A stream session: reads the port and decodes what it read, in this task, on the input
/// thread the supervisor runs on (see [`InputPool`](super::InputPool)); a device whose
/// decoder proved slow decodes on a thread of its own instead.
async fn run_stream(
    mut port: SerialPort,
    stream: &StreamConfig,
    ctx: &SupervisorContext,
    dev_cancel: &CancellationToken,
    mut up_on_data: bool,
) -> SessionEnd {
    let dev = &ctx.dev;
    let input = dev.stream_input(stream, &ctx.queue, &ctx.decoders);
    let mut decoding = if dev.decodes_alone.load(Relaxed) {
        match DecodeThread::start(dev.name(), input) {
            Ok(t) => Decoding::Alone(t),
            Err(e) => return SessionEnd::Io(e),
        }
    } else {
        Decoding::Inline(Box::new(input))
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
            msg = decoding.panicked() => break SessionEnd::DecoderPanic(msg),
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
                dev.recorder.tap(dev.name(), &buf[buf.len() - n..]);
                if std::mem::take(&mut up_on_data) {
                    dev.set_state(&ctx.queue, State::Up, None);
                }
                // Decoded (or handed over) before anything else is looked at: bytes already
                // read are never lost unaccounted, even if shutdown starts now. No beat
                // meanwhile: a decoder stuck on a frame is a stuck pipeline, and the watchdog is
                // meant to see it.
                match decoding.feed(&mut buf).await {
                    Fed::Done => {}
                    Fed::Slow(took) => {
                        if let Err(e) = decoding.move_to_own_thread(dev, took) {
                            break SessionEnd::Io(e);
                        }
                    }
                    Fed::Panicked(msg) => break SessionEnd::DecoderPanic(msg),
                }
                if ctx.queue.overloaded() {
                    // The broker is behind and the queue is evicting: read in bigger bites.
                    // The bytes wait in the port's buffer (a UART at 115200 baud brings ~58
                    // bytes in 5 ms), one read takes many readings, and the CPU this saves
                    // goes to delivering. What the queue keeps is still the newest.
                    tokio::time::sleep(OVERLOAD_READ_PAUSE).await;
                }
            }
        }
    };
    if matches!(end, SessionEnd::Cancelled) {
        read_leftover(&mut port, &mut buf, &mut decoding, dev).await;
    }
    drop(port);
    if let Some(msg) = decoding.finish(dev).await {
        if !matches!(end, SessionEnd::Cancelled | SessionEnd::DecoderPanic(_)) {
            end = SessionEnd::DecoderPanic(msg);
        }
    }
    end
}

/// A decoder that takes longer than this over one read is moved to a thread of its own: the
/// devices sharing its input thread wait for it once, not at every read. Ours take
/// microseconds (a read holds at most a few KiB); only a pathological one comes near.
pub const SLOW_DECODE: Duration = Duration::from_millis(20);

/// Where a session's bytes are decoded.
enum Decoding {
    /// In the session's task, on its input thread: no hand-over, no extra wake-up. Boxed: the
    /// input is ten times the size of the other variants.
    Inline(Box<StreamInput>),
    /// On the device's own decode thread (its decoder proved slow).
    Alone(DecodeThread),
    /// Only while moving from one to the other.
    Moving,
}

/// What feeding one read to the decoder did.
enum Fed {
    Done,
    /// Decoded inline, and it took this long (over [`SLOW_DECODE`]).
    Slow(Duration),
    /// The decoder panicked (inline; the thread's panic arrives through `panicked`).
    Panicked(String),
}

impl Decoding {
    /// Decodes what `buf` holds, or hands it to the decode thread; leaves `buf` empty.
    async fn feed(&mut self, buf: &mut BytesMut) -> Fed {
        let at = now_us();
        match self {
            Decoding::Inline(input) => {
                let began = std::time::Instant::now();
                input.push(buf, at, |_| {});
                buf.clear();
                if let Some(msg) = input.take_panic() {
                    return Fed::Panicked(msg);
                }
                let took = began.elapsed();
                if took > SLOW_DECODE {
                    return Fed::Slow(took);
                }
                Fed::Done
            }
            Decoding::Alone(t) => match t.tx.send((buf.split().freeze(), at)).await {
                Ok(()) => Fed::Done,
                Err(_) => Fed::Panicked("decode thread ended".into()),
            },
            Decoding::Moving => unreachable!("a session never feeds while moving its decoder"),
        }
    }

    /// Resolves with the decode thread's first panic; never for inline decoding (its panics
    /// come back from `feed`).
    async fn panicked(&mut self) -> String {
        match self {
            Decoding::Alone(t) => (&mut t.panicked).await.unwrap_or_else(|_| "decode thread ended".into()),
            _ => std::future::pending().await,
        }
    }

    /// Moves inline decoding (and the frame it has begun) to a new thread of the device's
    /// own, for this session and the device's next ones.
    fn move_to_own_thread(&mut self, dev: &DeviceRuntime, took: Duration) -> io::Result<()> {
        let Decoding::Inline(input) = std::mem::replace(self, Decoding::Moving) else {
            return Ok(());
        };
        tracing::warn!(
            device = dev.name(),
            took_ms = took.as_millis() as u64,
            limit_ms = SLOW_DECODE.as_millis() as u64,
            "Decoding one read took too long; this device now decodes on a thread of its own, so that it delays no other device."
        );
        dev.decodes_alone.store(true, Relaxed);
        *self = Decoding::Alone(DecodeThread::start(dev.name(), *input)?);
        Ok(())
    }

    /// The session is over: inline, a begun frame is counted as truncated; the decode thread
    /// drains what it was given and ends. Returns the thread's panic outside a frame, if any.
    async fn finish(self, dev: &DeviceRuntime) -> Option<String> {
        match self {
            Decoding::Inline(input) => {
                input.end();
                None
            }
            Decoding::Alone(t) => t.finish(dev).await,
            Decoding::Moving => None,
        }
    }
}

/// A decode thread and the session's ends of it.
struct DecodeThread {
    tx: mpsc::Sender<Chunk>,
    panicked: oneshot::Receiver<String>,
    /// Closed when the thread ends, however it ends: lets the session wait for it without
    /// holding a blocking-pool thread.
    ended: oneshot::Receiver<()>,
    handle: std::thread::JoinHandle<()>,
}

impl DecodeThread {
    fn start(device: &str, input: StreamInput) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Chunk>(CHUNKS_IN_FLIGHT);
        let (panic_tx, panicked) = oneshot::channel();
        let (ended_tx, ended) = oneshot::channel::<()>();
        let worker = Worker { input, panicked: Some(panic_tx) };
        let handle = std::thread::Builder::new().name(format!("decode-{device}")).spawn(move || {
            let _ended = ended_tx;
            worker.run(rx);
        })?;
        Ok(Self { tx, panicked, ended, handle })
    }

    async fn finish(self, dev: &DeviceRuntime) -> Option<String> {
        let DecodeThread { tx, mut panicked, mut ended, handle } = self;
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
        match joined {
            Ok(Ok(())) => panicked.try_recv().ok(),
            Ok(Err(panic)) => Some(panic_message(&*panic)),
            Err(e) => Some(e.to_string()),
        }
    }
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
/// in the kernel's buffer — is read and decoded, so it is delivered like everything read
/// before. Reads until the port is quiet for [`LEFTOVER_QUIET`] (a port's readiness reaches
/// the task within one reactor turn, so bytes already buffered are never missed), at most
/// [`LEFTOVER_MAX`] bytes, and waits at most [`LEFTOVER_TIME`] on the port in all (time spent
/// decoding does not count: the shutdown deadline bounds that).
async fn read_leftover(port: &mut SerialPort, buf: &mut BytesMut, decoding: &mut Decoding, dev: &DeviceRuntime) {
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
                dev.recorder.tap(dev.name(), &buf[buf.len() - n..]);
                if let Fed::Panicked(_) = decoding.feed(buf).await {
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
