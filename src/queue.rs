//! The one bounded queue between the decoders and the MQTT connection, and the ledger of what is in
//! flight to the broker. Never blocks a producer, never grows past its bounds.
//!
//! Overflow policy, [`ReadingQueue::push`]: **drop oldest, fairly**. When the queue is full the
//! device holding the most readings (or bytes) loses its oldest one, so a flooding device evicts
//! its own backlog before anyone else's, and what reaches the broker after an outage is the
//! newest data. Who loses data: the device that sent the most while the broker could not keep
//! up. Every eviction is counted per device (`dropped_oldest`).
//!
//! A reading leaves the ledger only when delivered: acknowledged (QoS 1) or written (QoS 0).
//! Readings in flight when the connection drops go back to the front of their device's lane
//! (counted as `republished`): the session is clean, so the broker keeps nothing for us.
//!
//! Poisoned readings, [`ReadingQueue::strike_oldest_in_flight`]: an MQTT 3.1.1 broker answers
//! a publish it refuses (too large, topic not allowed) by closing the connection, so a reading
//! put back at the front would be refused again after every reconnect and stall every device
//! behind it. When the broker closes the connection, the oldest unacknowledged publish gets a
//! strike; strikes survive the requeue and vanish with delivery, and a reading struck `limit`
//! times is dropped and counted (`poisoned`). Who loses data: the one reading the broker would
//! never take (or, rarely, an innocent one whose acknowledgements were lost `limit` times in a
//! row).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

mod spill;
pub use spill::{Signal, SpillEntry, SpoolRef, BACKLOG_LOADED};

/// Per-device accounting kept by the queue. Together with the decoder's counters it makes
/// `readings + restored = delivered + dropped_oldest + expired + poisoned + queued + in_flight
/// + spooled` hold at every moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LaneStats {
    /// Readings ever pushed for this device.
    pub readings: u64,
    pub queued: u64,
    pub queued_bytes: u64,
    pub in_flight: u64,
    pub delivered: u64,
    pub dropped_oldest: u64,
    pub expired: u64,
    /// Dropped after the broker closed the connection on them `limit` times (see the module docs).
    pub poisoned: u64,
    /// Readings sent again after a connection loss (possible duplicates at the broker), and
    /// readings in the spool at start that were possibly sent before the restart.
    pub republished: u64,
    /// Readings in the spool (on disk or being written), not yet handed to the broker.
    pub spooled: u64,
    /// Readings found in the spool at start (the previous run's `spooled`).
    pub restored: u64,
}

/// Something the connection task should publish next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// `replayed`: from the spool (published on the backlog topic, unless configured otherwise).
    Reading {
        device: usize,
        payload: Bytes,
        replayed: bool,
    },
    Control(Control),
}

/// A gateway message (state, metrics): not a reading, not counted as one. The newest message
/// for a topic replaces an unsent older one, so these are bounded by the number of topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    /// MQTT 5: the Correlation Data of the request this message answers.
    pub correlation: Option<Bytes>,
}

/// Control messages waiting at most; state-like ones replace each other by topic, so only
/// command responses can reach this.
const MAX_CONTROL: usize = 256;

/// Ledger-level counters, not tied to a device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounters {
    /// Control messages (state, metrics, responses) dropped as poisoned.
    pub poisoned_control: u64,
    /// Reports from the MQTT client that contradict the ledger (a packet id outside the
    /// in-flight window or reused before its ack, a publish never handed out): bugs, logged
    /// at ERROR. The readings concerned stay accounted for.
    pub ledger_errors: u64,
}

/// A publish dropped by [`ReadingQueue::strike_oldest_in_flight`], for the caller to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poisoned {
    /// A reading of queue lane `device`, named `name`.
    Reading { device: usize, name: Arc<str>, payload: Bytes },
    /// A control message.
    Control { topic: String, payload: Bytes },
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    payload: Bytes,
    at: Instant,
    /// Connections the broker closed while this was its oldest unacknowledged publish.
    strikes: u32,
    /// Where it is in the spool, for a reading replayed from there.
    spool: Option<SpoolRef>,
}

/// Something handed to the MQTT client and not yet delivered.
#[derive(Debug)]
struct InFlight {
    /// Hand-out order, which is the order the broker sees the publishes in.
    order: u64,
    what: Sent,
}

#[derive(Debug)]
enum Sent {
    Reading {
        device: usize,
        entry: Entry,
    },
    /// Kept for its topic and size: control messages are not requeued (they are queued again
    /// on connect), so their strikes are kept by topic instead.
    Control(Control),
}

#[derive(Debug, Default)]
struct Lane {
    /// The device this lane belongs to; lanes outlive a device removed by a reload, until
    /// their readings are delivered.
    name: Arc<str>,
    items: VecDeque<Entry>,
    /// Readings loaded from the spool for replay, oldest first (outside the memory bounds:
    /// the spool loads only as many as [`spill::BACKLOG_LOADED`]).
    backlog: VecDeque<Entry>,
    stats: LaneStats,
}

/// The queue's bounds; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bounds {
    max_len: usize,
    max_bytes: usize,
    max_age: Option<Duration>,
}

#[derive(Debug)]
struct Inner {
    bounds: Bounds,
    lanes: Vec<Lane>,
    len: usize,
    bytes: usize,
    next_seq: u64,
    control: VecDeque<Control>,
    /// Handed to the MQTT client, packet id not yet known (in request order).
    unassigned: VecDeque<InFlight>,
    /// Waiting for PUBACK, indexed by packet id; sized for the MQTT in-flight window.
    awaiting_ack: Vec<Option<InFlight>>,
    /// A publish whose packet id collided (a client that reuses ids before their ack); sent
    /// once that id is acked.
    collided: Option<(u16, InFlight)>,
    /// Publishes displaced from `awaiting_ack` by a packet id reused before its ack (a client
    /// bug): kept so that they are still accounted for and requeued.
    stray: Vec<InFlight>,
    /// Next hand-out order.
    next_order: u64,
    /// Strikes of control messages by topic (see [`Sent::Control`]).
    control_strikes: HashMap<String, u32>,
    counters: QueueCounters,
    /// The spool's side, when one is configured.
    spill: Option<spill::SpillState>,
}

/// Bounded, drop-oldest, fair across devices; see the module docs for the policy.
#[derive(Debug)]
pub struct ReadingQueue {
    inner: Mutex<Inner>,
    notify: Notify,
    /// Set when a push evicts, cleared when pops bring the queue well below its bound: the
    /// inputs read in bigger bites meanwhile (see [`overloaded`](Self::overloaded)).
    overloaded: AtomicBool,
    /// Readings ever pushed (the input rate is measured from it).
    pushed: std::sync::atomic::AtomicU64,
    /// Wakes the spool's thread (see [`spill`]).
    spool_signal: std::sync::OnceLock<Arc<spill::Signal>>,
}

/// What a push did, for the caller to log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PushOutcome {
    /// Readings evicted to make room (from whichever devices held the most); the exact
    /// per-device counts are in the lane stats.
    pub evicted: u32,
}

impl ReadingQueue {
    /// A queue with `devices` lanes (named by number; see [`add_lane`](Self::add_lane) for
    /// named ones). `max_inflight` is the MQTT in-flight window.
    pub fn new(devices: usize, max_len: usize, max_bytes: usize, max_age: Option<Duration>, max_inflight: u16) -> Self {
        let inner = Inner {
            bounds: Bounds { max_len: max_len.max(1), max_bytes, max_age },
            lanes: (0..devices).map(|i| Lane { name: i.to_string().into(), ..Lane::default() }).collect(),
            len: 0,
            bytes: 0,
            next_seq: 0,
            control: VecDeque::new(),
            unassigned: VecDeque::new(),
            awaiting_ack: (0..=max_inflight).map(|_| None).collect(),
            collided: None,
            stray: Vec::new(),
            next_order: 0,
            control_strikes: HashMap::new(),
            counters: QueueCounters::default(),
            spill: None,
        };
        Self {
            inner: Mutex::new(inner),
            notify: Notify::new(),
            overloaded: AtomicBool::new(false),
            pushed: std::sync::atomic::AtomicU64::new(0),
            spool_signal: std::sync::OnceLock::new(),
        }
    }

    /// The lane of device `name`: its existing one (a device removed and added back by
    /// reloads keeps its lane), or a new one.
    pub fn add_lane(&self, name: &str) -> usize {
        let mut q = self.lock();
        if let Some(i) = q.lanes.iter().position(|l| &*l.name == name) {
            return i;
        }
        q.lanes.push(Lane { name: name.into(), ..Lane::default() });
        q.lanes.len() - 1
    }

    /// The device name of a lane.
    pub fn lane_name(&self, lane: usize) -> Arc<str> {
        Arc::clone(&self.lock().lanes[lane].name)
    }

    /// New bounds (a reload): what no longer fits is evicted oldest first and counted.
    pub fn set_bounds(&self, max_len: usize, max_bytes: usize, max_age: Option<Duration>) -> u32 {
        let mut q = self.lock();
        q.bounds = Bounds { max_len: max_len.max(1), max_bytes, max_age };
        let heaviest = (0..q.lanes.len()).max_by_key(|&i| q.lanes[i].stats.queued).unwrap_or(0);
        if q.lanes.is_empty() {
            0
        } else {
            q.make_room(heaviest).0
        }
    }

    /// A new MQTT in-flight window (a reload): packet ids `1..=n` fit the ledger from now on.
    /// Call it between connections, after [`requeue_in_flight`](Self::requeue_in_flight); a
    /// publish still waiting for its ack keeps its slot even if the window shrinks below it.
    pub fn set_max_inflight(&self, n: u16) {
        let mut q = self.lock();
        let occupied = q.awaiting_ack.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
        let len = (usize::from(n) + 1).max(occupied);
        q.awaiting_ack.resize_with(len, || None);
        q.awaiting_ack.shrink_to_fit();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain counters and deques, all still valid.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a reading. Synchronous and short: safe to call from decoder threads.
    pub fn push(&self, device: usize, payload: Bytes) -> PushOutcome {
        let now = Instant::now();
        self.pushed.fetch_add(1, Relaxed);
        let mut q = self.lock();
        let seq = q.next_seq;
        q.next_seq += 1;
        let size = payload.len();
        q.len += 1;
        q.bytes += size;
        let lane = &mut q.lanes[device];
        lane.stats.readings += 1;
        lane.stats.queued += 1;
        lane.stats.queued_bytes += size as u64;
        lane.items.push_back(Entry { seq, payload, at: now, strikes: 0, spool: None });
        let (evicted, spilled) = q.make_room(device);
        drop(q);
        if spilled > 0 {
            self.wake_spool();
        }
        if evicted + spilled > 0 && !self.overloaded.load(Relaxed) {
            self.overloaded.store(true, Relaxed);
        }
        self.notify.notify_one();
        PushOutcome { evicted }
    }

    /// Queues a control message ahead of readings, replacing an unsent one for the same topic.
    pub fn push_control(&self, control: Control) {
        self.insert_control(control, false);
    }

    /// As [`push_control`](Self::push_control), but ahead of every other control message
    /// (the gateway's `online` goes before the device states it qualifies).
    pub fn push_control_first(&self, control: Control) {
        self.insert_control(control, true);
    }

    /// Queues a one-off message (a command response) behind the other control messages,
    /// replacing nothing. Returns false, dropping it, when too many are already waiting or
    /// when the one-off (not retained) messages waiting would exceed `max_bytes` with it:
    /// control messages go ahead of readings, so their bytes are what readings wait behind.
    pub fn push_response(&self, control: Control, max_bytes: usize) -> bool {
        let mut q = self.lock();
        let one_off = |c: &Control| if c.retain { 0 } else { c.topic.len() + c.payload.len() };
        let waiting: usize = q.control.iter().map(one_off).sum();
        if q.control.len() >= MAX_CONTROL || waiting + one_off(&control) > max_bytes {
            return false;
        }
        q.control.push_back(control);
        drop(q);
        self.notify.notify_one();
        true
    }

    fn insert_control(&self, control: Control, first: bool) {
        let mut q = self.lock();
        q.control.retain(|c| c.topic != control.topic);
        if first {
            q.control.push_front(control);
        } else {
            q.control.push_back(control);
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Takes the next thing to publish and records it as handed to the client: control
    /// messages first, then the oldest reading of any device, then readings replayed from the
    /// spool (live data first). Expired readings are counted and skipped here.
    pub fn pop_next(&self) -> Option<Outbound> {
        self.pop_next_paced(true)
    }

    /// As [`pop_next`](Self::pop_next); without `readings`, control messages only (the
    /// connection paces readings during a catch-up).
    pub fn pop_next_paced(&self, readings: bool) -> Option<Outbound> {
        let mut q = self.lock();
        if let Some(c) = q.control.pop_front() {
            let order = q.take_order();
            q.unassigned.push_back(InFlight { order, what: Sent::Control(c.clone()) });
            return Some(Outbound::Control(c));
        }
        if !readings {
            return None;
        }
        let ordered = q.spill.as_ref().is_some_and(|s| s.one_stream);
        let recovered = q.spill.as_ref().is_none_or(|s| s.recovered);
        loop {
            // One ordered stream per device: its live readings wait behind its spooled ones
            // (all of them, until the spool has counted what it holds).
            let live = q
                .lanes
                .iter()
                .enumerate()
                .filter(|(_, l)| !(ordered && (!recovered || l.stats.spooled > 0)))
                .filter_map(|(i, l)| Some((l.items.front()?.seq, i)))
                .min();
            let (device, entry, replayed) = match live {
                Some((_, device)) => (device, q.take_front(device).expect("lane has a front"), false),
                None => {
                    let device =
                        q.lanes.iter().enumerate().filter_map(|(i, l)| Some((l.backlog.front()?.seq, i))).min()?.1;
                    let entry = q.take_backlog(device);
                    if q.lanes[device].backlog.len() == BACKLOG_LOADED / 2 {
                        self.wake_spool();
                    }
                    (device, entry, true)
                }
            };
            let max_age = q.bounds.max_age;
            if max_age.is_some_and(|age| entry.at.elapsed() > age) {
                q.lanes[device].stats.expired += 1;
                q.resolved(device, &entry);
                continue;
            }
            q.lanes[device].stats.in_flight += 1;
            let payload = entry.payload.clone();
            let order = q.take_order();
            q.unassigned.push_back(InFlight { order, what: Sent::Reading { device, entry } });
            if self.overloaded.load(Relaxed) && q.len < q.bounds.max_len / 8 * 7 && q.bytes < q.bounds.max_bytes / 8 * 7
            {
                self.overloaded.store(false, Relaxed);
            }
            return Some(Outbound::Reading { device, payload, replayed });
        }
    }

    /// The client wrote the oldest unassigned publish as packet `pkid` (0 at QoS 0, where
    /// being written is being delivered).
    ///
    /// A packet id outside the in-flight window (see [`set_max_inflight`](Self::set_max_inflight))
    /// is a bug in the caller: it is logged at ERROR and counted (`ledger_errors`), the table
    /// grows so the publish stays accounted for, and debug builds panic.
    pub fn on_published(&self, pkid: u16) {
        let mut q = self.lock();
        let item = match q.collided.take() {
            Some((id, item)) if id == pkid => Some(item),
            other => {
                q.collided = other;
                q.unassigned.pop_front()
            }
        };
        let Some(item) = item else {
            q.counters.ledger_errors += 1;
            tracing::error!(pkid, "Publish reported by the MQTT client was not handed out by the queue.");
            return;
        };
        if pkid == 0 {
            q.delivered(item);
            return;
        }
        let slot = usize::from(pkid);
        let window = q.awaiting_ack.len() - 1;
        if slot > window {
            q.counters.ledger_errors += 1;
            tracing::error!(pkid, window, "Packet id outside the in-flight window; keeping the publish in the ledger.");
            q.awaiting_ack.resize_with(slot + 1, || None);
        }
        if let Some(old) = q.awaiting_ack[slot].replace(item) {
            q.counters.ledger_errors += 1;
            tracing::error!(pkid, "Packet id reused before it was acknowledged.");
            q.stray.push(old);
        }
        drop(q);
        debug_assert!(slot <= window, "packet id {pkid} outside the in-flight window 1..={window}");
    }

    /// The client holds the oldest unassigned publish back until `pkid` is acknowledged.
    pub fn on_collision(&self, pkid: u16) {
        let mut q = self.lock();
        if let Some(item) = q.unassigned.pop_front() {
            q.collided = Some((pkid, item));
        }
    }

    /// The broker acknowledged packet `pkid`.
    pub fn on_acked(&self, pkid: u16) {
        let mut q = self.lock();
        match q.awaiting_ack.get_mut(usize::from(pkid)).and_then(Option::take) {
            Some(item) => q.delivered(item),
            None => tracing::warn!(pkid, "Acknowledgement for a packet id not in flight."),
        }
    }

    /// The broker closed the connection while publishes were waiting for their acks: the
    /// oldest of them (first written: the one the broker refused, unless its ack was lost in
    /// the close) gets a strike. Call it before [`requeue_in_flight`](Self::requeue_in_flight).
    /// At `limit` strikes the publish leaves the ledger, counted as `poisoned` (per device for
    /// a reading, in [`QueueCounters::poisoned_control`] for a control message), and is
    /// returned for the caller to log. Publishes not yet numbered (QoS 0) are never struck.
    pub fn strike_oldest_in_flight(&self, limit: u32) -> Option<Poisoned> {
        let mut guard = self.lock();
        let q = &mut *guard;
        let slot = q.awaiting_ack.iter().enumerate().filter_map(|(i, s)| Some((s.as_ref()?.order, i))).min()?.1;
        let strikes = match &mut q.awaiting_ack[slot].as_mut()?.what {
            Sent::Reading { entry, .. } => {
                entry.strikes += 1;
                entry.strikes
            }
            Sent::Control(c) => {
                if q.control_strikes.len() >= MAX_CONTROL && !q.control_strikes.contains_key(&c.topic) {
                    // Bounded: forget old strikes rather than grow with every response topic.
                    q.control_strikes.clear();
                }
                let n = q.control_strikes.entry(c.topic.clone()).or_insert(0);
                *n += 1;
                *n
            }
        };
        if strikes < limit.max(1) {
            return None;
        }
        let item = q.awaiting_ack[slot].take()?;
        let report = match &item.what {
            Sent::Reading { device, entry } => Poisoned::Reading {
                device: *device,
                name: Arc::clone(&q.lanes[*device].name),
                payload: entry.payload.clone(),
            },
            Sent::Control(c) => Poisoned::Control { topic: c.topic.clone(), payload: c.payload.clone() },
        };
        q.poisoned(item);
        Some(report)
    }

    /// The client could not send what it popped last (over the packet-size limit, a topic
    /// MQTT cannot carry): it is counted as poisoned, never sent.
    pub fn refuse_popped(&self) {
        let mut q = self.lock();
        if let Some(item) = q.unassigned.pop_back() {
            q.poisoned(item);
        }
    }

    /// The broker refused packet `pkid` (an MQTT 5 PUBACK with a failure reason): sending it
    /// again would get the same answer, so it is counted as poisoned.
    pub fn on_refused(&self, pkid: u16) {
        let mut q = self.lock();
        match q.awaiting_ack.get_mut(usize::from(pkid)).and_then(Option::take) {
            Some(item) => q.poisoned(item),
            None => tracing::warn!(pkid, "Refusal for a packet id not in flight."),
        }
    }

    /// The connection dropped: every reading in flight goes back to the front of its lane, in
    /// order, to be published again. Control messages in flight are dropped (they are
    /// re-sent on connect). Returns how many readings were put back.
    pub fn requeue_in_flight(&self) -> u64 {
        let mut q = self.lock();
        let mut back: Vec<(usize, Entry)> = Vec::new();
        let collided = q.collided.take().map(|(_, item)| item);
        let awaiting: Vec<InFlight> = q.awaiting_ack.iter_mut().filter_map(Option::take).collect();
        let stray = std::mem::take(&mut q.stray);
        let items = q.unassigned.drain(..).chain(collided).chain(awaiting).chain(stray).collect::<Vec<_>>();
        for item in items {
            if let Sent::Reading { device, entry } = item.what {
                back.push((device, entry));
            }
        }
        // Newest first, so that pushing each to the front leaves the oldest in front.
        back.sort_by_key(|(_, e)| std::cmp::Reverse(e.seq));
        let n = back.len() as u64;
        let last_device = back.last().map(|(d, _)| *d);
        for (device, entry) in back {
            let lane = &mut q.lanes[device];
            lane.stats.in_flight -= 1;
            lane.stats.republished += 1;
            if entry.spool.is_some() {
                // Still in the spool: back to the front of the replay.
                lane.stats.spooled += 1;
                lane.backlog.push_front(entry);
                continue;
            }
            let size = entry.payload.len();
            lane.stats.queued += 1;
            lane.stats.queued_bytes += size as u64;
            lane.items.push_front(entry);
            q.len += 1;
            q.bytes += size;
        }
        if let Some(d) = last_device {
            q.make_room(d);
        }
        drop(q);
        if n > 0 {
            self.notify.notify_one();
        }
        n
    }

    /// Readings are being evicted to make room: more arrive than the broker takes. Cheap (one
    /// atomic load), for the inputs to check after every read.
    pub fn overloaded(&self) -> bool {
        self.overloaded.load(Relaxed)
    }

    /// Waits until something may have been queued since the last pop.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Nothing queued, nothing in flight (the spool aside).
    pub fn is_idle(&self) -> bool {
        let q = self.lock();
        q.len == 0 && q.control.is_empty() && q.unassigned.is_empty() && q.in_flight_count() == 0
    }

    /// Per-device accounting.
    pub fn stats(&self) -> Vec<LaneStats> {
        self.lock().lanes.iter().map(|l| l.stats).collect()
    }

    /// Ledger-level counters.
    pub fn counters(&self) -> QueueCounters {
        self.lock().counters
    }

    /// Readings pushed so far, all devices.
    pub fn pushed(&self) -> u64 {
        self.pushed.load(Relaxed)
    }

    /// Total readings and payload bytes queued (not counting in flight).
    pub fn depth(&self) -> (usize, usize) {
        let q = self.lock();
        (q.len, q.bytes)
    }
}

impl Inner {
    fn take_front(&mut self, device: usize) -> Option<Entry> {
        let lane = &mut self.lanes[device];
        let entry = lane.items.pop_front()?;
        let size = entry.payload.len();
        lane.stats.queued -= 1;
        lane.stats.queued_bytes -= size as u64;
        // A lane that once held a burst gives the memory back as it drains.
        let cap = lane.items.capacity();
        if cap > 64 && lane.items.len() < cap / 4 {
            lane.items.shrink_to(cap / 2);
        }
        self.len -= 1;
        self.bytes -= size;
        Some(entry)
    }

    /// Makes both bounds hold, oldest readings first: into the spool's buffer while it takes
    /// them, else dropped and counted. Ties go to `pusher`, so a device flooding alone loses
    /// only its own. Returns (dropped, spilled).
    fn make_room(&mut self, pusher: usize) -> (u32, u32) {
        let Bounds { max_len, max_bytes, .. } = self.bounds;
        let (mut evicted, mut spilled) = (0, 0);
        while self.len > max_len || self.bytes > max_bytes {
            let by_bytes = self.len <= max_len;
            let weight = |l: &Lane| if by_bytes { l.stats.queued_bytes } else { l.stats.queued };
            let mut victim = pusher;
            for (i, l) in self.lanes.iter().enumerate() {
                if weight(l) > weight(&self.lanes[victim]) {
                    victim = i;
                }
            }
            let Some(entry) = self.take_front(victim) else { break };
            match self.spill.as_mut().filter(|s| s.accepts(entry.payload.len())) {
                Some(s) => {
                    s.put(victim, entry);
                    self.lanes[victim].stats.spooled += 1;
                    spilled += 1;
                }
                None => {
                    self.lanes[victim].stats.dropped_oldest += 1;
                    evicted += 1;
                }
            }
        }
        (evicted, spilled)
    }

    fn take_order(&mut self) -> u64 {
        self.next_order += 1;
        self.next_order
    }

    /// Delivered: its strikes go with it.
    fn poisoned(&mut self, item: InFlight) {
        match item.what {
            Sent::Reading { device, entry } => {
                let s = &mut self.lanes[device].stats;
                s.in_flight -= 1;
                s.poisoned += 1;
                self.resolved(device, &entry);
            }
            Sent::Control(c) => {
                self.control_strikes.remove(&c.topic);
                self.counters.poisoned_control += 1;
            }
        }
    }

    fn delivered(&mut self, item: InFlight) {
        match item.what {
            Sent::Reading { device, entry } => {
                let s = &mut self.lanes[device].stats;
                s.in_flight -= 1;
                s.delivered += 1;
                self.resolved(device, &entry);
            }
            Sent::Control(c) => {
                if !self.control_strikes.is_empty() {
                    self.control_strikes.remove(&c.topic);
                }
            }
        }
    }

    fn in_flight_count(&self) -> usize {
        self.awaiting_ack.iter().filter(|s| s.is_some()).count()
            + usize::from(self.collided.is_some())
            + self.stray.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(device: usize, n: u32) -> Bytes {
        Bytes::from(format!("d{device}-{n}"))
    }

    /// `readings = delivered + dropped_oldest + expired + poisoned + queued + in_flight`.
    fn assert_identity(s: LaneStats) {
        assert_eq!(
            s.readings,
            s.delivered + s.dropped_oldest + s.expired + s.poisoned + s.queued + s.in_flight,
            "{s:?}"
        );
    }

    /// One QoS 1 connection: hands out everything queued as packets 1, 2, … and acks `acked`
    /// of them; then the broker closes the connection: strike, requeue.
    fn connection(q: &ReadingQueue, acked: &[u16], limit: u32) -> Option<Poisoned> {
        let mut pkid = 0;
        while q.pop_next().is_some() {
            pkid += 1;
            q.on_published(pkid);
        }
        for &id in acked {
            q.on_acked(id);
        }
        let poisoned = q.strike_oldest_in_flight(limit);
        q.requeue_in_flight();
        poisoned
    }

    fn reading_of(o: Outbound) -> Bytes {
        match o {
            Outbound::Reading { payload, .. } => payload,
            Outbound::Control(c) => panic!("unexpected control {c:?}"),
        }
    }

    /// Stalled connection, capacity 4, 10 pushes: 6 dropped oldest, 7..=10 remain in order.
    #[test]
    fn drops_oldest_with_exact_counts() {
        let q = ReadingQueue::new(1, 4, 1 << 20, None, 10);
        let evicted: u32 = (1..=10).map(|n| q.push(0, payload(0, n)).evicted).sum();
        assert_eq!(evicted, 6);
        let s = q.stats()[0];
        assert_eq!((s.dropped_oldest, s.queued), (6, 4));
        let got: Vec<Bytes> = std::iter::from_fn(|| q.pop_next()).map(reading_of).collect();
        assert_eq!(got, (7..=10).map(|n| payload(0, n)).collect::<Vec<_>>());
    }

    /// Overloaded from the first eviction until pops bring the queue below 7/8 of its bound;
    /// filling up to the bound without evicting is not overload.
    #[test]
    fn overloaded_from_an_eviction_until_well_below_the_bound() {
        let q = ReadingQueue::new(1, 16, 1 << 20, None, 10);
        for n in 1..=16 {
            q.push(0, payload(0, n));
        }
        assert!(!q.overloaded());
        assert_eq!(q.push(0, payload(0, 17)).evicted, 1);
        assert!(q.overloaded());
        q.pop_next();
        q.pop_next();
        assert!(q.overloaded(), "14 of 16 queued");
        q.pop_next();
        assert!(!q.overloaded(), "13 of 16 queued");
    }

    #[test]
    fn flooding_device_evicts_its_own_readings_first() {
        let q = ReadingQueue::new(2, 10, 1 << 20, None, 10);
        for n in 0..3 {
            q.push(1, payload(1, n));
        }
        for n in 0..100 {
            q.push(0, payload(0, n));
        }
        let s = q.stats();
        assert_eq!((s[0].dropped_oldest, s[0].queued), (93, 7));
        assert_eq!((s[1].dropped_oldest, s[1].queued), (0, 3));
        // The quiet device pushing into a full queue evicts from the flooder.
        q.push(1, payload(1, 3));
        let s = q.stats();
        assert_eq!((s[0].dropped_oldest, s[1].dropped_oldest, s[1].queued), (94, 0, 4));
    }

    #[test]
    fn byte_bound_evicts_the_heaviest_device() {
        let q = ReadingQueue::new(2, 1000, 100, None, 10);
        q.push(0, Bytes::from(vec![b'x'; 60]));
        q.push(1, Bytes::from(vec![b'y'; 10]));
        q.push(1, Bytes::from(vec![b'y'; 10]));
        q.push(1, Bytes::from(vec![b'y'; 30]));
        let s = q.stats();
        assert_eq!((s[0].dropped_oldest, s[0].queued), (1, 0));
        assert_eq!((s[1].dropped_oldest, s[1].queued_bytes), (0, 50));
        assert_eq!(q.depth(), (3, 50));
    }

    #[test]
    fn pops_oldest_across_devices_and_control_first() {
        let q = ReadingQueue::new(2, 10, 1 << 20, None, 10);
        q.push(1, payload(1, 0));
        q.push(0, payload(0, 0));
        q.push(1, payload(1, 1));
        let c = Control { topic: "t".into(), payload: Bytes::from_static(b"a"), retain: true, correlation: None };
        q.push_control(c.clone());
        q.push_control(Control { topic: "u".into(), ..c.clone() });
        q.push_control(Control { payload: Bytes::from_static(b"b"), ..c.clone() });
        q.push_control_first(Control { topic: "first".into(), ..c });
        let topics: Vec<(String, Bytes)> = std::iter::from_fn(|| match q.pop_next()? {
            Outbound::Control(c) => Some((c.topic, c.payload)),
            Outbound::Reading { .. } => None,
        })
        .collect();
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        assert_eq!(topics, [("first".into(), b("a")), ("u".into(), b("a")), ("t".into(), b("b"))]);
        q.requeue_in_flight();
        let order: Vec<Bytes> = std::iter::from_fn(|| q.pop_next()).map(reading_of).collect();
        assert_eq!(order, [payload(1, 0), payload(0, 0), payload(1, 1)]);
    }

    #[test]
    fn readings_leave_only_when_acknowledged_and_come_back_on_disconnect() {
        let q = ReadingQueue::new(1, 10, 1 << 20, None, 10);
        for n in 0..5 {
            q.push(0, payload(0, n));
        }
        for _ in 0..3 {
            q.pop_next().unwrap();
        }
        q.on_published(1);
        q.on_published(2);
        q.on_acked(1);
        let s = q.stats()[0];
        assert_eq!((s.delivered, s.in_flight, s.queued), (1, 2, 2));
        assert!(!q.is_idle());
        // Connection lost: packet 2 (sent) and the third (not yet written) come back in order.
        assert_eq!(q.requeue_in_flight(), 2);
        let s = q.stats()[0];
        assert_eq!((s.delivered, s.in_flight, s.queued, s.republished), (1, 0, 4, 2));
        let order: Vec<Bytes> = std::iter::from_fn(|| q.pop_next()).map(reading_of).collect();
        assert_eq!(order, (1..5).map(|n| payload(0, n)).collect::<Vec<_>>());
    }

    #[test]
    fn qos0_is_delivered_when_written_and_collisions_resolve_in_order() {
        let q = ReadingQueue::new(1, 10, 1 << 20, None, 10);
        for n in 0..3 {
            q.push(0, payload(0, n));
            q.pop_next().unwrap();
        }
        q.on_published(0);
        q.on_collision(5);
        q.on_published(6);
        q.on_published(5);
        q.on_acked(6);
        q.on_acked(5);
        let s = q.stats()[0];
        assert_eq!((s.delivered, s.in_flight), (3, 0));
        assert!(q.is_idle());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_readings_are_counted_not_sent() {
        let q = ReadingQueue::new(1, 10, 1 << 20, Some(Duration::from_secs(60)), 10);
        q.push(0, payload(0, 0));
        q.push(0, payload(0, 1));
        tokio::time::advance(Duration::from_secs(61)).await;
        q.push(0, payload(0, 2));
        assert_eq!(reading_of(q.pop_next().unwrap()), payload(0, 2));
        let s = q.stats()[0];
        assert_eq!((s.expired, s.in_flight, s.queued), (2, 1, 0));
    }

    #[test]
    fn lanes_are_named_and_reused_and_bounds_can_shrink() {
        let q = ReadingQueue::new(0, 10, 1 << 20, None, 10);
        let a = q.add_lane("a");
        let b = q.add_lane("b");
        assert_eq!((a, b, q.add_lane("a")), (0, 1, 0));
        assert_eq!(&*q.lane_name(b), "b");
        for n in 0..8 {
            q.push(a, payload(a, n));
        }
        q.push(b, payload(b, 0));
        assert_eq!(q.set_bounds(5, 1 << 20, None), 4);
        let s = q.stats();
        assert_eq!((s[a].queued, s[a].dropped_oldest, s[b].queued), (4, 4, 1));
    }

    #[test]
    fn requeue_past_the_bound_counts_drops() {
        let q = ReadingQueue::new(1, 3, 1 << 20, None, 10);
        for n in 0..3 {
            q.push(0, payload(0, n));
        }
        q.pop_next().unwrap();
        q.pop_next().unwrap();
        for n in 3..5 {
            q.push(0, payload(0, n));
        }
        q.requeue_in_flight();
        let s = q.stats()[0];
        // 5 readings, room for 3: the two oldest (the requeued ones) go.
        assert_eq!((s.queued, s.dropped_oldest, s.in_flight), (3, 2, 0));
    }

    /// A reload raised `mqtt.inflight` from 2 to 50: packet ids up to 50 are tracked and acked.
    #[test]
    fn a_raised_inflight_window_tracks_every_packet_id() {
        let q = ReadingQueue::new(1, 100, 1 << 20, None, 2);
        for n in 0..50 {
            q.push(0, payload(0, n));
        }
        q.set_max_inflight(50);
        for pkid in 1..=50 {
            q.pop_next().unwrap();
            q.on_published(pkid);
        }
        assert_eq!(q.stats()[0].in_flight, 50);
        for pkid in 1..=50 {
            q.on_acked(pkid);
        }
        let s = q.stats()[0];
        assert_eq!((s.delivered, s.in_flight, s.queued), (50, 0, 0));
        assert_eq!(q.counters().ledger_errors, 0);
        assert!(q.is_idle());
        // Shrinking again frees the table but keeps a slot still waiting for its ack.
        q.push(0, payload(0, 50));
        q.pop_next().unwrap();
        q.on_published(40);
        q.set_max_inflight(3);
        q.on_acked(40);
        assert_eq!((q.stats()[0].delivered, q.stats()[0].in_flight), (51, 0));
    }

    /// The old failure: a packet id beyond the table vanished from the ledger and `in_flight`
    /// never came down. Now it is a counted bug (a panic in debug builds) and the reading
    /// stays accounted for.
    #[test]
    fn a_packet_id_beyond_the_window_is_a_counted_bug() {
        let q = ReadingQueue::new(1, 10, 1 << 20, None, 2);
        q.push(0, payload(0, 0));
        q.pop_next().unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| q.on_published(3)));
        assert_eq!(r.is_err(), cfg!(debug_assertions));
        assert_eq!(q.counters().ledger_errors, 1);
        assert_eq!(q.stats()[0].in_flight, 1);
        q.on_acked(3);
        let s = q.stats()[0];
        assert_eq!((s.delivered, s.in_flight), (1, 0));
    }

    #[test]
    fn a_reading_survives_two_strikes_and_is_delivered_on_the_third_connection() {
        let q = ReadingQueue::new(1, 10, 1 << 20, None, 10);
        q.push(0, payload(0, 0));
        q.push(0, payload(0, 1));
        assert_eq!(connection(&q, &[], 3), None);
        assert_eq!(connection(&q, &[], 3), None);
        assert_eq!(connection(&q, &[1, 2], 3), None);
        let s = q.stats()[0];
        assert_eq!((s.delivered, s.poisoned, s.republished, s.in_flight, s.queued), (2, 0, 4, 0, 0));
        assert_identity(s);
        assert!(q.is_idle());
    }

    #[test]
    fn a_reading_struck_three_times_is_dropped_and_counted() {
        let q = ReadingQueue::new(2, 10, 1 << 20, None, 10);
        let a = q.add_lane("a");
        q.push(1, payload(1, 0));
        q.push(a, Bytes::from(vec![b'x'; 800]));
        q.push(1, payload(1, 1));
        // The broker acks the reading before the bad one, then closes on the bad one.
        assert_eq!(connection(&q, &[1], 3), None);
        assert_eq!(connection(&q, &[], 3), None);
        let poisoned = connection(&q, &[], 3);
        assert_eq!(poisoned, Some(Poisoned::Reading { device: a, name: "a".into(), payload: vec![b'x'; 800].into() }));
        assert_eq!(connection(&q, &[1], 3), None);
        let s = q.stats();
        assert_eq!((s[a].readings, s[a].poisoned, s[a].delivered, s[a].in_flight), (1, 1, 0, 0));
        assert_eq!((s[1].readings, s[1].poisoned, s[1].delivered, s[1].in_flight), (2, 0, 2, 0));
        s.into_iter().for_each(assert_identity);
        assert_eq!(q.counters(), QueueCounters::default());
        assert!(q.is_idle());
    }

    #[test]
    fn strikes_belong_to_one_reading() {
        let q = ReadingQueue::new(1, 10, 1 << 20, None, 10);
        q.push(0, payload(0, 0));
        q.push(0, payload(0, 1));
        // The first reading takes two strikes, then is delivered: its strikes go with it.
        assert_eq!(connection(&q, &[], 3), None);
        assert_eq!(connection(&q, &[], 3), None);
        // The second one starts from zero: poisoned only at its own third strike.
        assert_eq!(connection(&q, &[1], 3), None);
        assert_eq!(connection(&q, &[], 3), None);
        assert_eq!(
            connection(&q, &[], 3),
            Some(Poisoned::Reading { device: 0, name: "0".into(), payload: payload(0, 1) })
        );
        let s = q.stats()[0];
        assert_eq!((s.delivered, s.poisoned, s.in_flight, s.queued), (1, 1, 0, 0));
        assert_identity(s);
    }

    /// Control messages are not requeued (they are queued again on connect), so their strikes
    /// are kept by topic; delivery clears them.
    #[test]
    fn a_control_message_is_poisoned_by_topic() {
        let q = ReadingQueue::new(1, 10, 1 << 20, None, 10);
        let big =
            Control { topic: "gw/metrics".into(), payload: vec![b'm'; 900].into(), retain: false, correlation: None };
        q.push_control(big.clone());
        assert_eq!(connection(&q, &[], 3), None);
        // Delivered once: its strikes are gone.
        q.push_control(big.clone());
        assert_eq!(connection(&q, &[1], 3), None);
        for _ in 0..2 {
            q.push_control(big.clone());
            assert_eq!(connection(&q, &[], 3), None);
        }
        q.push_control(big.clone());
        q.push(0, payload(0, 0));
        assert_eq!(connection(&q, &[], 3), Some(Poisoned::Control { topic: big.topic, payload: big.payload }));
        assert_eq!(q.counters().poisoned_control, 1);
        // The reading behind it was not struck.
        assert_eq!(connection(&q, &[1], 3), None);
        let s = q.stats()[0];
        assert_eq!((s.delivered, s.poisoned), (1, 0));
    }

    /// At QoS 0 nothing waits for an ack: written is delivered, and what was not yet written
    /// when the connection dropped was never seen by the broker.
    #[test]
    fn qos0_readings_are_never_struck() {
        let q = ReadingQueue::new(1, 10, 1 << 20, None, 10);
        for n in 0..3 {
            q.push(0, payload(0, n));
        }
        for _ in 0..3 {
            q.pop_next().unwrap();
        }
        q.on_published(0);
        assert_eq!(q.strike_oldest_in_flight(1), None);
        assert_eq!(q.requeue_in_flight(), 2);
        let s = q.stats()[0];
        assert_eq!((s.delivered, s.poisoned, s.queued, s.in_flight), (1, 0, 2, 0));
        assert_identity(s);
    }
}
