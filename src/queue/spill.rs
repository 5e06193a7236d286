//! The queue's side of the spool ([`crate::spool`]): what the memory queue hands to the disk
//! and takes back from it.
//!
//! - **Spill**: with a spool, a reading the memory bound would drop goes to the spool's buffer
//!   instead (counted `spooled`, not `dropped_oldest`); while the broker is away the spool
//!   takes every queued reading ([`ReadingQueue::take_spill`]). The buffer is bounded: what
//!   does not fit, or arrives while the spool is failing, is dropped as before.
//! - **Replay**: the spool loads readings back into a lane's `backlog` (at most
//!   [`BACKLOG_LOADED`] per lane); the connection publishes them after live readings, and each
//!   one's resolution (delivered, expired, poisoned) goes back to the spool, which then deletes
//!   what is delivered.
//!
//! Accounting: a reading in the spool, its buffer or a backlog is `spooled` until handed to the
//! broker; `restored` counts what the spool held at start.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{Entry, Inner, ReadingQueue};

/// Readings a lane holds loaded from the spool at most; the spool loads more at half.
pub const BACKLOG_LOADED: usize = 256;

/// A reading's place in the spool: its segment and the end of its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolRef {
    pub seg: u64,
    pub end: u64,
}

/// A reading on its way to the spool.
#[derive(Debug)]
pub struct SpillEntry {
    pub lane: usize,
    pub payload: Bytes,
    /// Wall-clock time it was queued, for `max_age` after a restart.
    pub at_us: u64,
}

/// Wakes the spool's thread; raising it again before the thread woke costs one atomic load.
#[derive(Debug, Default)]
pub struct Signal {
    raised: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Signal {
    pub fn raise(&self) {
        if !self.raised.swap(true, Relaxed) {
            let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.cv.notify_one();
        }
    }

    /// Waits until raised or `timeout`; returns whether it was raised.
    pub fn wait(&self, timeout: Duration) -> bool {
        let g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        if self.raised.swap(false, Relaxed) {
            return true;
        }
        let _g = self.cv.wait_timeout(g, timeout).unwrap_or_else(PoisonError::into_inner);
        self.raised.swap(false, Relaxed)
    }
}

#[derive(Debug)]
pub(super) struct SpillState {
    /// `replay_topic = "readings"`: a device's live readings wait behind its spooled ones.
    pub(super) one_stream: bool,
    /// False while the spool cannot write: readings are dropped in memory as without one.
    healthy: bool,
    buf: Vec<(usize, Entry)>,
    bytes: usize,
    cap: usize,
    resolved: Vec<(usize, SpoolRef)>,
    link_up: bool,
    /// The spool has counted what a previous run left (`restore`). Until then a device's
    /// `spooled` may be short, so in one-stream mode no live reading may go first.
    pub(super) recovered: bool,
}

impl SpillState {
    pub(super) fn accepts(&self, size: usize) -> bool {
        self.healthy && self.bytes + size <= self.cap
    }

    pub(super) fn put(&mut self, lane: usize, entry: Entry) {
        self.bytes += entry.payload.len();
        self.buf.push((lane, entry));
    }
}

impl Inner {
    /// The oldest loaded reading of a lane (which has one).
    pub(super) fn take_backlog(&mut self, device: usize) -> Entry {
        let lane = &mut self.lanes[device];
        lane.stats.spooled -= 1;
        lane.backlog.pop_front().expect("lane has a backlog")
    }

    /// A reading left the ledger: if it came from the spool, the spool may delete it.
    pub(super) fn resolved(&mut self, device: usize, entry: &Entry) {
        if let (Some(r), Some(s)) = (entry.spool, self.spill.as_mut()) {
            s.resolved.push((device, r));
        }
    }
}

fn wall_us(at: Instant) -> u64 {
    crate::telemetry::now_us().saturating_sub(at.elapsed().as_micros() as u64)
}

impl ReadingQueue {
    /// Turns the spool's side on: a spill buffer of `buffer_bytes`, and `signal` to wake the
    /// spool with. `one_stream`: replayed readings go out on the readings topic, in order.
    pub fn enable_spool(&self, buffer_bytes: usize, one_stream: bool, signal: Arc<Signal>) {
        let _ = self.spool_signal.set(signal);
        self.lock().spill = Some(SpillState {
            one_stream,
            healthy: true,
            buf: Vec::new(),
            bytes: 0,
            cap: buffer_bytes,
            resolved: Vec::new(),
            link_up: false,
            recovered: false,
        });
    }

    pub(super) fn wake_spool(&self) {
        if let Some(s) = self.spool_signal.get() {
            s.raise();
        }
    }

    /// The spool can write (again), or cannot: then readings are dropped in memory.
    pub fn set_spool_healthy(&self, healthy: bool) {
        if let Some(s) = self.lock().spill.as_mut() {
            s.healthy = healthy;
        }
    }

    /// The connection is up or down; while down, the spool takes every queued reading.
    pub fn set_link_up(&self, up: bool) {
        if let Some(s) = self.lock().spill.as_mut() {
            s.link_up = up;
        }
        if !up {
            self.wake_spool();
        }
    }

    pub fn link_up(&self) -> bool {
        self.lock().spill.as_ref().is_some_and(|s| s.link_up)
    }

    /// What goes to the spool now: the spill buffer, and with `all_live` every queued reading
    /// (the broker is away, or shutdown). Oldest first per device.
    pub fn take_spill(&self, all_live: bool) -> Vec<SpillEntry> {
        let mut guard = self.lock();
        let q = &mut *guard;
        let Some(s) = q.spill.as_mut() else { return Vec::new() };
        s.bytes = 0;
        let mut out: Vec<SpillEntry> = std::mem::take(&mut s.buf)
            .into_iter()
            .map(|(lane, e)| SpillEntry { lane, at_us: wall_us(e.at), payload: e.payload })
            .collect();
        if all_live && s.healthy {
            for (i, lane) in q.lanes.iter_mut().enumerate() {
                let n = lane.items.len() as u64;
                lane.stats.queued -= n;
                lane.stats.queued_bytes = 0;
                lane.stats.spooled += n;
                out.extend(lane.items.drain(..).map(|e| SpillEntry {
                    lane: i,
                    at_us: wall_us(e.at),
                    payload: e.payload,
                }));
                lane.items.shrink_to(64);
            }
            q.len = 0;
            q.bytes = 0;
        }
        out
    }

    /// The spool could not write these: back to the front of their lanes, where the memory
    /// bound applies (the spool is unhealthy by now, so what does not fit is dropped, counted).
    pub fn unspill(&self, entries: Vec<SpillEntry>) {
        let mut q = self.lock();
        let now_us = crate::telemetry::now_us();
        let mut last = None;
        for e in entries.into_iter().rev() {
            // Older than anything queued: they go first.
            let seq = 0;
            let size = e.payload.len();
            let at = Instant::now()
                .checked_sub(Duration::from_micros(now_us.saturating_sub(e.at_us)))
                .unwrap_or_else(Instant::now);
            q.len += 1;
            q.bytes += size;
            let lane = &mut q.lanes[e.lane];
            lane.stats.spooled -= 1;
            lane.stats.queued += 1;
            lane.stats.queued_bytes += size as u64;
            lane.items.push_front(Entry { seq, payload: e.payload, at, strikes: 0, spool: None });
            last = Some(e.lane);
        }
        if let Some(l) = last {
            q.make_room(l);
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Readings found in the spool at start: `maybe_sent` of them were being sent when the
    /// previous run stopped.
    pub fn restore(&self, lane: usize, readings: u64, maybe_sent: u64) {
        let s = &mut self.lock().lanes[lane].stats;
        s.restored += readings;
        s.spooled += readings;
        s.republished += maybe_sent;
    }

    /// The spool has read what a previous run left: live readings may go (one-stream mode
    /// holds them back until then, so none overtakes a restored one).
    pub fn spool_recovered(&self) {
        if let Some(s) = self.lock().spill.as_mut() {
            s.recovered = true;
        }
        self.notify.notify_one();
    }

    /// Room in a lane's backlog, when it is worth loading (at least half empty).
    pub fn backlog_room(&self, lane: usize) -> usize {
        let n = self.lock().lanes[lane].backlog.len();
        if n <= BACKLOG_LOADED / 2 {
            BACKLOG_LOADED - n
        } else {
            0
        }
    }

    /// Readings loaded from the spool for replay.
    pub fn push_backlog(&self, lane: usize, loaded: impl IntoIterator<Item = (SpoolRef, u64, Bytes)>) {
        let now_us = crate::telemetry::now_us();
        let now = Instant::now();
        let mut q = self.lock();
        for (r, at_us, payload) in loaded {
            let seq = q.next_seq;
            q.next_seq += 1;
            let at = now.checked_sub(Duration::from_micros(now_us.saturating_sub(at_us))).unwrap_or(now);
            q.lanes[lane].backlog.push_back(Entry { seq, payload, at, strikes: 0, spool: Some(r) });
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Spooled readings resolved since the last call.
    pub fn take_resolved(&self) -> Vec<(usize, SpoolRef)> {
        self.lock().spill.as_mut().map(|s| std::mem::take(&mut s.resolved)).unwrap_or_default()
    }

    /// The spool dropped `n` readings of a lane it never loaded (it is full).
    pub fn spool_dropped(&self, lane: usize, n: u64) {
        let s = &mut self.lock().lanes[lane].stats;
        s.spooled -= n;
        s.dropped_oldest += n;
    }

    /// Forgets the loaded backlogs (shutdown: they stay in the spool for the next start).
    pub fn unload_backlogs(&self) {
        for lane in &mut self.lock().lanes {
            lane.backlog.clear();
        }
    }
}
