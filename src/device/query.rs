//! A stream device's query: when it is due, and writing it under the write timeout. Owns no
//! port; the session passes its own, so one task still owns the port.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::{Interval, MissedTickBehavior};

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
/// grid (no drift from the time writing takes). Ticks that cannot be kept — a write took
/// longer than the interval — are skipped, never made up in a burst (a sensor asked several
/// times at once would answer several times, or not at all): the ticks missed become one
/// query, sent when the write is done, and the next is on the grid again.
#[derive(Debug)]
pub struct Query {
    bytes: Vec<u8>,
    write_timeout: Duration,
    ticks: Interval,
}

impl Query {
    /// A schedule starting now. Needs a tokio runtime (the interval's timer).
    pub fn new(bytes: &[u8], interval: Duration, write_timeout: Duration) -> Self {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Self { bytes: bytes.to_vec(), write_timeout, ticks }
    }

    /// Waits until the query is due. Cancel safe (a `select!` branch beside the read).
    pub async fn due(&mut self) {
        self.ticks.tick().await;
    }

    /// Writes the whole query and flushes it, within the write timeout.
    ///
    /// # Errors
    /// The port returned an error, or did not take every byte within the timeout.
    pub async fn send<W: AsyncWrite + Unpin + ?Sized>(&self, port: &mut W) -> Result<(), WriteError> {
        let write = async {
            port.write_all(&self.bytes).await?;
            port.flush().await
        };
        match tokio::time::timeout(self.write_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(WriteError::Io(e)),
            Err(_) => Err(WriteError::Timeout(self.write_timeout)),
        }
    }
}

/// Waits for the next query of `query` and returns it; waits forever when there is none (a
/// device that only listens): the session's `select!` then never takes that branch.
pub async fn next_due(query: &mut Option<Query>) -> &Query {
    match query {
        Some(q) => {
            q.due().await;
            q
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::time::Instant;

    use super::*;

    const EVERY: Duration = Duration::from_millis(100);

    /// Due at once, then on the grid: exact times, however long each wait took to be noticed.
    #[tokio::test(start_paused = true)]
    async fn the_first_query_is_due_at_once_then_every_interval_without_drift() {
        let t0 = Instant::now();
        let mut q = Some(Query::new(b"R\r", EVERY, Duration::from_secs(1)));
        let mut at = Vec::new();
        for _ in 0..5 {
            next_due(&mut q).await;
            at.push(t0.elapsed());
            // Work after each tick (the write) does not push the next tick back.
            tokio::time::advance(Duration::from_millis(30)).await;
        }
        let want: Vec<Duration> = (0..5).map(|n| EVERY * n).collect();
        assert_eq!(at, want);
    }

    /// A write that took 2.5 intervals: the two ticks it covered (100 and 200 ms) become one
    /// query, sent as soon as the write is done, not a burst of two; after it the schedule is
    /// back on the grid (300 ms), not shifted by the delay.
    #[tokio::test(start_paused = true)]
    async fn ticks_missed_during_a_slow_write_are_skipped_not_queued() {
        let t0 = Instant::now();
        let mut q = Some(Query::new(b"R\r", EVERY, Duration::from_secs(1)));
        let mut at = Vec::new();
        next_due(&mut q).await;
        tokio::time::advance(EVERY * 5 / 2).await;
        for _ in 0..3 {
            next_due(&mut q).await;
            at.push(t0.elapsed());
        }
        assert_eq!(at, [EVERY * 5 / 2, EVERY * 3, EVERY * 4]);
    }

    /// A device without a query never has one due.
    #[tokio::test(start_paused = true)]
    async fn without_a_query_nothing_is_ever_due() {
        let mut none = None;
        let waited = tokio::time::timeout(Duration::from_secs(3600), next_due(&mut none)).await;
        assert!(waited.is_err());
    }

    /// The bytes arrive as configured; a port that takes no more bytes ends the write at
    /// exactly the timeout, with that error.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_cannot_finish_times_out_after_write_timeout() {
        let timeout = Duration::from_millis(250);
        let q = Query::new(b"R\r", EVERY, timeout);
        // A pipe holding 3 bytes that nobody reads until the end: the first query fits, the
        // second does not.
        let (mut port, mut sensor) = tokio::io::duplex(3);
        q.send(&mut port).await.unwrap();
        let t0 = Instant::now();
        let err = q.send(&mut port).await.unwrap_err();
        assert!(matches!(err, WriteError::Timeout(t) if t == timeout), "{err:?}");
        assert_eq!(t0.elapsed(), timeout);
        assert_eq!(err.to_string(), "writing the query timed out after 250ms");
        let mut got = [0u8; 3];
        sensor.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"R\rR", "the second query was cut off where the port stopped taking bytes");
    }

    /// A port that is gone (the other end closed) fails the write at once.
    #[tokio::test(start_paused = true)]
    async fn a_failing_write_is_an_io_error() {
        let q = Query::new(b"R\r", EVERY, Duration::from_secs(1));
        let (mut port, sensor) = tokio::io::duplex(64);
        drop(sensor);
        let err = q.send(&mut port).await.unwrap_err();
        assert!(matches!(&err, WriteError::Io(e) if e.kind() == io::ErrorKind::BrokenPipe), "{err:?}");
    }
}
