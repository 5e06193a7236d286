//! A stream device's query: when it is due, and writing it under the write timeout. Owns no
//! port; the session lends it its own on every poll, so one task still owns the port and
//! reads it while a query is being written.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};

/// Why writing the query failed; either ends the session.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The port took no more bytes for this long (a flow-controlled or wedged line).
    #[error("writing the query timed out after {0:?}")]
    Timeout(Duration),
    #[error("writing the query failed: {0}")]
    Io(io::Error),
}

/// The query of one session and its schedule: due at once, then every interval on a fixed
/// grid (no drift from the time writing takes). A tick that comes while the previous query
/// is still being written is skipped, never made up later in a burst: a sensor asked several
/// times at once would answer several times, or not at all.
#[derive(Debug)]
pub struct Query {
    bytes: Vec<u8>,
    write_timeout: Duration,
    ticks: Interval,
    /// Bytes of the current query written so far; `None` between queries.
    written: Option<usize>,
    /// When the current query must be written by. One timer, reset per query: no allocation.
    deadline: Pin<Box<Sleep>>,
}

impl Query {
    /// A schedule starting now. Needs a tokio runtime (the timers).
    pub fn new(bytes: &[u8], interval: Duration, write_timeout: Duration) -> Self {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let deadline = Box::pin(tokio::time::sleep(write_timeout));
        Self { bytes: bytes.to_vec(), write_timeout, ticks, written: None, deadline }
    }

    /// Drives the schedule and the write: starts a query when it is due and writes it (all of
    /// it, then a flush) into `port`. Ready once a query is written in full, or when writing it
    /// failed or took longer than the write timeout; pending in between. The session polls
    /// it beside the port's read, with the same task context.
    ///
    /// # Errors
    /// The port returned an error, or did not take every byte within the timeout.
    pub fn poll_send<W: AsyncWrite + ?Sized>(
        &mut self,
        mut port: Pin<&mut W>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteError>> {
        // Polled until pending, so the next tick wakes the task; ticks during a write are
        // skipped here.
        while self.ticks.poll_tick(cx).is_ready() {
            if self.written.is_none() {
                self.written = Some(0);
                self.deadline.as_mut().reset(Instant::now() + self.write_timeout);
            }
        }
        let Some(written) = &mut self.written else { return Poll::Pending };
        let done = loop {
            let Some(rest) = self.bytes.get(*written..).filter(|r| !r.is_empty()) else {
                break port.as_mut().poll_flush(cx);
            };
            match port.as_mut().poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => break Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
        };
        // The write is tried before the deadline: one that can finish now is not failed.
        let result = match done {
            Poll::Ready(r) => r.map_err(WriteError::Io),
            Poll::Pending => {
                ready!(self.deadline.as_mut().poll(cx));
                Err(WriteError::Timeout(self.write_timeout))
            }
        };
        self.written = None;
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;

    const EVERY: Duration = Duration::from_millis(100);

    /// The next query written (or failed), and when, since `t0`.
    async fn next(q: &mut Query, port: &mut DuplexStream, t0: Instant) -> (Result<(), WriteError>, Duration) {
        let r = std::future::poll_fn(|cx| q.poll_send(Pin::new(&mut *port), cx)).await;
        (r, t0.elapsed())
    }

    /// Written at once, then on the grid: exact times, however long each took to be noticed.
    #[tokio::test(start_paused = true)]
    async fn the_first_query_is_written_at_once_then_every_interval_without_drift() {
        let t0 = Instant::now();
        let (mut port, mut sensor) = tokio::io::duplex(64);
        let mut q = Query::new(b"R\r", EVERY, Duration::from_secs(1));
        let mut at = Vec::new();
        for _ in 0..5 {
            let (r, when) = next(&mut q, &mut port, t0).await;
            r.unwrap();
            at.push(when);
            // Work after each query (reading the answer) does not push the next one back.
            tokio::time::advance(Duration::from_millis(30)).await;
        }
        assert_eq!(at, (0..5).map(|n| EVERY * n).collect::<Vec<_>>());
        let mut got = [0u8; 10];
        sensor.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"R\rR\rR\rR\rR\r");
    }

    /// The port takes one query and then nothing until the sensor reads at 250 ms: the query
    /// of 100 ms is written then, the tick of 200 ms (during that write) is skipped — no
    /// second query right behind it — and the next is on the grid at 300 ms.
    #[tokio::test(start_paused = true)]
    async fn a_tick_during_a_slow_write_is_skipped_not_queued() {
        let t0 = Instant::now();
        let (mut port, mut sensor) = tokio::io::duplex(2);
        let mut q = Query::new(b"R\r", EVERY, Duration::from_secs(1));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::time::sleep(EVERY * 5 / 2).await;
            let mut buf = [0u8; 2];
            for _ in 0..3 {
                sensor.read_exact(&mut buf).await.unwrap();
                got.extend_from_slice(&buf);
            }
            got
        });
        let mut at = Vec::new();
        for _ in 0..3 {
            let (r, when) = next(&mut q, &mut port, t0).await;
            r.unwrap();
            at.push(when);
        }
        assert_eq!(at, [Duration::ZERO, EVERY * 5 / 2, EVERY * 3]);
        assert_eq!(reader.await.unwrap(), b"R\rR\rR\r");
    }

    /// A port that takes no more bytes ends the write at exactly the timeout, with that error;
    /// the query is cut where the port stopped taking bytes.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_cannot_finish_times_out_after_write_timeout() {
        let t0 = Instant::now();
        let timeout = Duration::from_millis(250);
        let mut q = Query::new(b"R\r", EVERY, timeout);
        // Room for 3 bytes that nobody reads: the first query fits, the second does not.
        let (mut port, mut sensor) = tokio::io::duplex(3);
        next(&mut q, &mut port, t0).await.0.unwrap();
        let (err, when) = next(&mut q, &mut port, t0).await;
        let err = err.unwrap_err();
        assert!(matches!(err, WriteError::Timeout(t) if t == timeout), "{err:?}");
        assert_eq!(when, EVERY + timeout);
        assert_eq!(err.to_string(), "writing the query timed out after 250ms");
        let mut got = [0u8; 3];
        sensor.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"R\rR");
    }

    /// A port that is gone (the other end closed) fails the write at once.
    #[tokio::test(start_paused = true)]
    async fn a_failing_write_is_an_io_error() {
        let t0 = Instant::now();
        let mut q = Query::new(b"R\r", EVERY, Duration::from_secs(1));
        let (mut port, sensor) = tokio::io::duplex(64);
        drop(sensor);
        let (err, when) = next(&mut q, &mut port, t0).await;
        assert!(matches!(&err, Err(WriteError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe), "{err:?}");
        assert_eq!(when, Duration::ZERO);
    }
}
