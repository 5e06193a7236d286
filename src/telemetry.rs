//! Counters and notable events. Each event is one function that logs *and* counts, so the
//! log and the metrics topic never disagree. ERROR means data loss or an operator must act.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::reject::Reject;

/// Counters owned by one device's session and decoder thread; read by the metrics task.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    pub bytes_in: AtomicU64,
    pub frames_in: AtomicU64,
    /// Frames decoded into readings (= pushed into the queue).
    pub readings: AtomicU64,
    pub rejected: [AtomicU64; Reject::COUNT],
    /// Frames the sensor numbered but that never arrived (binary frames only).
    pub sequence_gaps: AtomicU64,
    pub restarts: AtomicU64,
    /// Queries written to the port in full (devices with a `query`).
    pub queries_sent: AtomicU64,
    /// Microseconds since the epoch of the last reading, 0 before the first.
    pub last_reading_us: AtomicU64,
    /// Modbus: exception responses by code (index = code for 1..=11, 0 for any other).
    pub exceptions: [AtomicU64; 12],
    /// Modbus: poll ticks skipped because the bus was still busy (see `modbus::Schedule`).
    pub poll_overruns: AtomicU64,
    /// Rate limits of this device's per-frame log lines. Here, not in the session, so a
    /// device that flaps (a new session every backoff) cannot start a fresh burst each time.
    logs: Mutex<DeviceLogs>,
    /// Whether any of `logs` holds back events not written yet (read after every chunk).
    held_back: AtomicBool,
}

/// One [`LogLimit`] per kind of per-frame or per-reading log line.
#[derive(Debug, Default)]
struct DeviceLogs {
    rejected: [LogLimit; Reject::COUNT],
    sequence_gap: LogLimit,
    dropped: LogLimit,
}

impl DeviceCounters {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|c| c.load(Relaxed)).sum()
    }

    fn logs(&self) -> std::sync::MutexGuard<'_, DeviceLogs> {
        self.logs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Per-frame log lines at most this often once the burst is spent: a sensor at the wrong baud
/// rate sends thousands of bad frames a second, and a journal line for each one would make
/// journald rate-limit us (hiding the lines that matter) and wear the SD card.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Lines written at once before the limit applies, so a problem is seen with a few examples.
pub const LOG_BURST: u32 = 3;

/// A token bucket for one kind of log line (one device, one reason): [`LOG_BURST`] lines at
/// once, then one per [`LOG_EVERY`]; a quiet spell refills the burst. What is not written is
/// counted, and the next line written says how much. The metrics counters never go through
/// here: they stay exact.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LogLimit {
    /// Lines that may be written now, and when that was last brought up to date.
    tokens: u32,
    refilled: Option<Instant>,
    /// Events not written since the last line, and the sum of their amounts.
    suppressed: u64,
    amount: u64,
}

/// What a line that may be written should report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Events since the previous line that were not written.
    pub suppressed: u64,
    /// The amount of this event plus those of the suppressed ones (e.g. missing frames).
    pub amount: u64,
}

impl LogLimit {
    /// Records one event carrying `amount` at `now`; `Some` when its line is to be written.
    /// The clock is a parameter so tests drive it exactly.
    pub fn admit(&mut self, now: Instant, amount: u64) -> Option<Admitted> {
        self.refill(now);
        self.amount += amount;
        if self.tokens == 0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1;
        Some(self.take())
    }

    /// The events not written yet, if a line may be written for them at `now`: so a flood
    /// that stopped is summed up within a period, not only when the next one starts.
    pub fn due(&mut self, now: Instant) -> Option<Admitted> {
        if self.suppressed == 0 {
            return None;
        }
        self.refill(now);
        let token = self.tokens.checked_sub(1)?;
        self.tokens = token;
        Some(self.take())
    }

    /// The events not written yet, if any, whatever the limit: for a closing summary line.
    pub fn pending(&mut self) -> Option<Admitted> {
        (self.suppressed > 0).then(|| self.take())
    }

    /// One token per period since the last refill, up to the burst.
    fn refill(&mut self, now: Instant) {
        let refilled = *self.refilled.get_or_insert_with(|| {
            self.tokens = LOG_BURST;
            now
        });
        let periods = now.saturating_duration_since(refilled).as_nanos() / LOG_EVERY.as_nanos();
        if periods > 0 {
            let periods = u32::try_from(periods).unwrap_or(u32::MAX);
            self.tokens = LOG_BURST.min(self.tokens.saturating_add(periods));
            // A full bucket restarts the period from now; otherwise keep the remainder.
            self.refilled = Some(if self.tokens == LOG_BURST { now } else { refilled + LOG_EVERY * periods });
        }
    }

    fn take(&mut self) -> Admitted {
        Admitted { suppressed: std::mem::take(&mut self.suppressed), amount: std::mem::take(&mut self.amount) }
    }
}

/// Wall-clock microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// A frame was skipped. Counted always; logged within [`LogLimit`] per device and reason.
pub fn frame_rejected(device: &str, counters: &DeviceCounters, reason: Reject) {
    counters.rejected[reason.index()].fetch_add(1, Relaxed);
    if reason == Reject::Exception {
        // The bus logs each exception once per session with the points that caused it.
        return;
    }
    let what = if reason.is_poll_failure() { "Poll failed" } else { "Discarding frame" };
    limited(
        counters,
        |l| &mut l.rejected[reason.index()],
        1,
        |a| {
            tracing::warn!(device, reason = reason.as_str(), suppressed = a.suppressed, "{what}: {reason}.");
        },
    );
}

/// A reading too large for the broker was skipped (`oversize_packet`). Counted always;
/// logged within [`LogLimit`] like other rejects.
pub fn packet_too_large(device: &str, counters: &DeviceCounters, size: usize, limit: usize) {
    let reason = Reject::OversizePacket;
    counters.rejected[reason.index()].fetch_add(1, Relaxed);
    limited(
        counters,
        |l| &mut l.rejected[reason.index()],
        1,
        |a| {
            tracing::warn!(
                device,
                reason = reason.as_str(),
                size,
                limit,
                suppressed = a.suppressed,
                "Discarding reading: its MQTT packet would exceed mqtt.max_packet_size."
            );
        },
    );
}

/// The queue evicted readings to make room. Logged within [`LogLimit`] with the count of
/// readings dropped since the last line, so a sustained overload cannot flood the journal.
pub fn readings_dropped(device: &str, counters: &DeviceCounters, evicted: u32) {
    limited(counters, |l| &mut l.dropped, u64::from(evicted), |a| log_dropped(device, a));
}

fn log_dropped(device: &str, a: Admitted) {
    tracing::error!(
        device,
        dropped = a.amount,
        suppressed = a.suppressed,
        "Queue full: dropped the oldest readings (the broker is slow or away)."
    );
}

/// Another output's queue (Sparkplug) dropped its oldest readings to take this one. Counted
/// per device in that output's lane stats (its metrics); logged at each doubling of the total,
/// so a broker that stays away cannot flood the journal.
pub fn other_output_dropped(device: &str, evicted: u32) {
    static TOTAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let before = TOTAL.fetch_add(u64::from(evicted), Relaxed);
    let after = before + u64::from(evicted);
    if after.next_power_of_two() != before.next_power_of_two() || before == 0 {
        tracing::error!(
            device,
            dropped_total = after,
            "Sparkplug queue full: dropped the oldest readings (its broker is slow or away)."
        );
    }
}

/// The sensor's frame counter skipped ahead. Logged within [`LogLimit`], with the frames
/// missing since the last line.
pub fn sequence_gap(device: &str, counters: &DeviceCounters, missing: u64) {
    counters.sequence_gaps.fetch_add(missing, Relaxed);
    limited(counters, |l| &mut l.sequence_gap, missing, |a| log_gap(device, a));
}

fn log_gap(device: &str, a: Admitted) {
    tracing::warn!(
        device,
        missing = a.amount,
        suppressed = a.suppressed,
        "Sensor frame counter skipped: frames lost on the wire."
    );
}

/// Records an event in the limit `pick` chooses; writes its `line` if admitted (after the
/// lock is released: a slow log writer must not hold the decode thread's lock).
fn limited<F>(counters: &DeviceCounters, pick: F, amount: u64, line: impl FnOnce(Admitted))
where
    F: for<'a> FnOnce(&'a mut DeviceLogs) -> &'a mut LogLimit,
{
    let admitted = pick(&mut counters.logs()).admit(Instant::now(), amount);
    match admitted {
        Some(a) => line(a),
        None => counters.held_back.store(true, Relaxed),
    }
}

/// Writes the summary lines that are due: what the rate limits held back for this device
/// once a line may be written again. Called by the decode thread after every chunk, so a flood
/// that stopped is summed up within [`LOG_EVERY`] while good frames keep coming. Cheap when
/// nothing was held back (one atomic load).
pub fn flush_due(device: &str, counters: &DeviceCounters) {
    if counters.held_back.load(Relaxed) {
        let now = Instant::now();
        write_held_back(device, counters, |l| l.due(now));
    }
}

/// Writes everything the rate limits held back for this device, one line per kind: called
/// when a session ends.
pub fn flush_suppressed(device: &str, counters: &DeviceCounters) {
    write_held_back(device, counters, LogLimit::pending);
}

fn write_held_back(device: &str, counters: &DeviceCounters, mut take: impl FnMut(&mut LogLimit) -> Option<Admitted>) {
    let mut logs = counters.logs();
    for reason in Reject::ALL {
        if let Some(a) = take(&mut logs.rejected[reason.index()]) {
            // Not a frame of its own: a different sentence, so the lines still add up.
            tracing::warn!(
                device,
                reason = reason.as_str(),
                suppressed = a.suppressed,
                "Frames discarded since the last line but not logged: {reason}."
            );
        }
    }
    if let Some(a) = take(&mut logs.sequence_gap) {
        log_gap(device, a);
    }
    if let Some(a) = take(&mut logs.dropped) {
        log_dropped(device, a);
    }
    let left = logs.rejected.iter().chain([&logs.sequence_gap, &logs.dropped]).any(|l| l.suppressed > 0);
    counters.held_back.store(left, Relaxed);
}

/// A device session ended and will be restarted.
pub fn device_restarting(device: &str, counters: &DeviceCounters, error: &str, backoff: Duration) {
    counters.restarts.fetch_add(1, Relaxed);
    tracing::warn!(
        device,
        error,
        backoff_ms = backoff.as_millis() as u64,
        "Device session ended; reopening after backoff."
    );
}

/// What the shutdown is waiting for now. A plain static because its reader is the process
/// watchdog (see `main.rs`), a thread outside the runtime that must work when the runtime is
/// wedged; only the shutdown path writes it.
static SHUTDOWN_STAGE: Mutex<String> = Mutex::new(String::new());

/// Records what the shutdown waits for now (e.g. "devices still stopping: a, b").
pub fn shutdown_stage(what: impl Into<String>) {
    *SHUTDOWN_STAGE.lock().unwrap_or_else(PoisonError::into_inner) = what.into();
}

/// What the shutdown was last recorded waiting for, for the line that says who is late.
pub fn shutdown_waiting_for() -> String {
    let stage = SHUTDOWN_STAGE.lock().unwrap_or_else(PoisonError::into_inner).clone();
    if stage.is_empty() {
        "the shutdown had not started its phases".into()
    } else {
        stage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The limit with exact numbers: a burst, one line per period, the suppressed count on the
    /// next line written, and a quiet spell refilling the burst.
    #[test]
    fn log_limit_bursts_then_writes_one_line_per_period_with_the_suppressed_count() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut l = LogLimit::default();
        let written: Vec<Admitted> = (0..100).filter_map(|_| l.admit(at(0), 1)).collect();
        assert_eq!(written, vec![Admitted { suppressed: 0, amount: 1 }; 3]);
        assert_eq!((0..10).filter_map(|_| l.admit(at(5), 1)).count(), 0);
        // 97 + 10 held back; the first event of the next period says so.
        assert_eq!(l.admit(at(10), 1), Some(Admitted { suppressed: 107, amount: 108 }));
        assert_eq!(l.admit(at(10), 1), None);
        assert_eq!(l.admit(at(19), 1), None);
        assert_eq!(l.admit(at(20), 1), Some(Admitted { suppressed: 2, amount: 3 }));
        // Nothing pending right after a line; one event held back is pending.
        assert_eq!(l.pending(), None);
        assert_eq!(l.admit(at(21), 5), None);
        assert_eq!(l.pending(), Some(Admitted { suppressed: 1, amount: 5 }));
        assert_eq!(l.pending(), None);
        // Held back at 22 s: due only once the next period's token is there (at 30 s).
        assert_eq!(l.admit(at(22), 1), None);
        assert_eq!(l.due(at(29)), None);
        assert_eq!(l.due(at(30)), Some(Admitted { suppressed: 1, amount: 1 }));
        assert_eq!(l.due(at(45)), None, "nothing held back");
        assert_eq!(l.admit(at(45), 1), Some(Admitted { suppressed: 0, amount: 1 }));
        // Quiet for three periods: the whole burst again, nothing suppressed.
        let written: Vec<Admitted> = (0..5).filter_map(|_| l.admit(at(80), 1)).collect();
        assert_eq!(written, vec![Admitted { suppressed: 0, amount: 1 }; 3]);
        assert_eq!(l.pending(), Some(Admitted { suppressed: 2, amount: 2 }));
    }

    /// Under paused tokio time, through the event function: counters exact, the limit per
    /// device and per reason (one reason's flood does not silence another's first line).
    #[tokio::test(start_paused = true)]
    async fn rejects_are_counted_exactly_and_limited_per_reason() {
        let c = DeviceCounters::default();
        for _ in 0..1000 {
            frame_rejected("d", &c, Reject::BadJson);
        }
        frame_rejected("d", &c, Reject::BadUtf8);
        assert_eq!(c.rejected[Reject::BadJson.index()].load(Relaxed), 1000);
        assert_eq!(c.rejected_total(), 1001);
        {
            let mut logs = c.logs();
            assert_eq!(logs.rejected[Reject::BadUtf8.index()].pending(), None);
            let bad_json = logs.rejected[Reject::BadJson.index()].pending();
            assert_eq!(bad_json, Some(Admitted { suppressed: 997, amount: 997 }));
        }
        tokio::time::advance(LOG_EVERY).await;
        frame_rejected("d", &c, Reject::BadJson);
        assert_eq!(c.logs().rejected[Reject::BadJson.index()].tokens, 0, "one token refilled, and spent");
    }

    /// A flood that stopped is summed up by the per-chunk check once a period has passed,
    /// not only when the session ends.
    #[tokio::test(start_paused = true)]
    async fn held_back_lines_are_written_when_due() {
        let c = DeviceCounters::default();
        for _ in 0..10 {
            frame_rejected("d", &c, Reject::BadCrc);
        }
        assert!(c.held_back.load(Relaxed));
        flush_due("d", &c);
        assert!(c.held_back.load(Relaxed), "not due within the period");
        tokio::time::advance(LOG_EVERY).await;
        flush_due("d", &c);
        assert!(!c.held_back.load(Relaxed), "written");
        assert_eq!(c.logs().rejected[Reject::BadCrc.index()].pending(), None);
        assert_eq!(c.rejected_total(), 10);
    }
}
