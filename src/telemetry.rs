//! Counters and notable events. Each event is one function that logs *and* counts, so the
//! log and the metrics topic never disagree. ERROR means data loss or an operator must act.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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
    /// Microseconds since the epoch of the last reading, 0 before the first.
    pub last_reading_us: AtomicU64,
    /// Last time a drop was logged, to keep the log readable under sustained overload.
    last_drop_log_ms: AtomicU64,
    drops_since_log: AtomicU64,
}

impl DeviceCounters {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|c| c.load(Relaxed)).sum()
    }
}

/// Wall-clock microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// A frame was skipped.
pub fn frame_rejected(device: &str, counters: &DeviceCounters, reason: Reject) {
    counters.rejected[reason.index()].fetch_add(1, Relaxed);
    tracing::warn!(device, reason = reason.as_str(), "Discarding frame: {reason}.");
}

/// A reading too large for the broker was skipped (`oversize_packet`).
pub fn packet_too_large(device: &str, counters: &DeviceCounters, size: usize, limit: usize) {
    counters.rejected[Reject::OversizePacket.index()].fetch_add(1, Relaxed);
    tracing::warn!(
        device,
        reason = Reject::OversizePacket.as_str(),
        size,
        limit,
        "Discarding reading: its MQTT packet would exceed mqtt.max_packet_size."
    );
}

/// The queue evicted readings to make room. Logged at most every 10 s per device with the
/// count since the last line, so a sustained overload cannot flood the journal.
pub fn readings_dropped(device: &str, counters: &DeviceCounters, evicted: u32, started: Instant) {
    let since_log = counters.drops_since_log.fetch_add(u64::from(evicted), Relaxed) + u64::from(evicted);
    let now_ms = started.elapsed().as_millis() as u64 + 1;
    let last = counters.last_drop_log_ms.load(Relaxed);
    let due = last == 0 || now_ms.saturating_sub(last) >= 10_000;
    // compare_exchange: one thread logs a given period, even with several pushing.
    if due && counters.last_drop_log_ms.compare_exchange(last, now_ms, Relaxed, Relaxed).is_ok() {
        counters.drops_since_log.fetch_sub(since_log, Relaxed);
        tracing::error!(
            device,
            dropped = since_log,
            "Queue full: dropped the oldest readings (the broker is slow or away)."
        );
    }
}

/// The sensor's frame counter skipped ahead.
pub fn sequence_gap(device: &str, counters: &DeviceCounters, missing: u64) {
    counters.sequence_gaps.fetch_add(missing, Relaxed);
    tracing::warn!(device, missing, "Sensor frame counter skipped: frames lost on the wire.");
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
