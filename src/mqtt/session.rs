//! One connection's reading and writing: batches out, acknowledgements and commands in,
//! pings. Every wait has a deadline: a write that makes no progress, a flush, a PINGRESP.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, MissedTickBehavior};

use super::codec::{self, ConnAck, EncodeError, Incoming, PublishMeta, Read, Reader, Version};
use super::connect::Stream;
use super::pace::Pacer;
use super::{deliver_incoming, ConnectOptions, ConnectionError, Finished, MqttShared, Publish, Stops, MAX_INCOMING};
use crate::liveness::{self, Beat};
use crate::queue::{Outbound, Poisoned};

/// One batch written with one syscall, at most.
const BATCH_BYTES: usize = 64 * 1024;
/// Packet id of our SUBSCRIBE; readings use 1..=inflight, which never reaches it.
const SUBSCRIBE_PKID: u16 = u16::MAX;
/// How often a profile looks at the devices' states (its births and deaths follow them).
const PROFILE_TICK: Duration = Duration::from_millis(100);
/// A reading the broker hung up on this many times in a row is dropped as poisoned.
pub const STRIKES_TO_POISON: u32 = 3;

pub(super) struct Session<'a> {
    shared: &'a MqttShared,
    beat: &'a Beat,
    stops: &'a Stops,
    version: Version,
    keep_alive: Duration,
    /// How long a PINGRESP, a write that makes no progress, or a flush may take.
    reply_timeout: Duration,
    /// The largest packet we may send on this connection.
    limit: usize,
    expiry_s: Option<u32>,
    /// Packet ids 1..=window in use, and how many.
    in_use: Vec<bool>,
    used: usize,
    next_pkid: usize,
    /// Bytes of the batch being written, how far, and by when the next progress is due.
    wbuf: BytesMut,
    wpos: usize,
    write_deadline: Option<Instant>,
    /// QoS 0 publishes in `wbuf`: delivered once it is written.
    qos0_in_batch: usize,
    rbuf: BytesMut,
    reader: Reader,
    /// The queue may have something for us.
    want_fill: bool,
    /// Shutdown began (noticed once: a cancelled token stays ready forever).
    drain_noticed: bool,
    final_sent: bool,
    disconnecting: bool,
    ping_deadline: Option<Instant>,
    pacer: &'a mut Pacer,
    /// Readings wait for the pacer's next token (see [`super::pace`]).
    pace_wait: Option<Instant>,
    /// A profile's publishes, reused.
    profile_out: Vec<Publish>,
}

impl<'a> Session<'a> {
    pub(super) fn new(
        opts: &ConnectOptions,
        connack: &ConnAck,
        shared: &'a MqttShared,
        beat: &'a Beat,
        stops: &'a Stops,
        pacer: &'a mut Pacer,
    ) -> Self {
        // MQTT 5: the broker's Receive Maximum and Maximum Packet Size bound ours.
        let window = connack.receive_max.map_or(opts.inflight, |r| r.min(opts.inflight)).max(1);
        let limit = connack.max_packet_size.map_or(opts.max_packet_size, |m| (m as usize).min(opts.max_packet_size));
        Self {
            shared,
            beat,
            stops,
            version: opts.version,
            keep_alive: opts.keep_alive,
            reply_timeout: opts.connect_timeout.min(opts.keep_alive),
            limit,
            expiry_s: opts.expiry_s,
            in_use: vec![false; usize::from(window) + 1],
            used: 0,
            next_pkid: 0,
            wbuf: BytesMut::with_capacity(BATCH_BYTES + 1024),
            wpos: 0,
            write_deadline: None,
            qos0_in_batch: 0,
            rbuf: BytesMut::with_capacity(8 * 1024),
            reader: Reader::new(opts.version, MAX_INCOMING),
            want_fill: true,
            drain_noticed: false,
            final_sent: false,
            disconnecting: false,
            ping_deadline: None,
            pacer,
            pace_wait: None,
            profile_out: Vec::new(),
        }
    }

    pub(super) async fn run(
        &mut self,
        stream: Box<dyn Stream>,
        leftover: BytesMut,
    ) -> Result<Finished, ConnectionError> {
        let (mut rd, mut wr) = tokio::io::split(stream);
        if !self.shared.subscriptions.is_empty() {
            // A clean session: every connection needs its subscriptions again.
            codec::put_subscribe(&mut self.wbuf, self.version, SUBSCRIBE_PKID, &self.shared.subscriptions)
                .map_err(|e| ConnectionError::Protocol(e.to_string()))?;
        }
        // What came with the CONNACK (retained messages, say) is the start of the stream.
        self.rbuf.extend_from_slice(&leftover);
        self.read_packets()?;
        let mut beats = liveness::ticker();
        // A profile's births and deaths follow the devices' states, which it looks at this often.
        let mut profile_tick = tokio::time::interval(PROFILE_TICK);
        profile_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let has_profile = self.shared.has_profile();
        let mut ping = tokio::time::interval_at(Instant::now() + self.keep_alive, self.keep_alive);
        // After a stall, one ping, not a burst of the missed ones.
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if self.wpos == self.wbuf.len() {
                self.fill();
            }
            let writing = self.wpos < self.wbuf.len();
            if writing && self.write_deadline.is_none() {
                self.write_deadline = Some(Instant::now() + self.reply_timeout);
            }
            let write_deadline = self.write_deadline.unwrap_or_else(Instant::now);
            let pace_wait = self.pace_wait.unwrap_or_else(Instant::now);
            let ping_deadline = self.ping_deadline.unwrap_or_else(Instant::now);
            tokio::select! {
                biased;
                _ = self.stops.hard_stop.cancelled() => return Ok(Finished::Stopped),
                _ = self.stops.switching.cancelled(), if !self.disconnecting => {
                    // A reload replaces this connection: leave cleanly (no last will); the
                    // ledger puts what is in flight back for the next one.
                    self.put_farewell();
                    codec::put_disconnect(&mut self.wbuf);
                    self.disconnecting = true;
                }
                r = wr.write(&self.wbuf[self.wpos..]), if writing => {
                    let n = r?;
                    if n == 0 {
                        return Err(ConnectionError::Closed);
                    }
                    self.wpos += n;
                    self.write_deadline = Some(Instant::now() + self.reply_timeout);
                    if self.wpos == self.wbuf.len() {
                        // TLS keeps the tail of a batch in its own buffer until flushed.
                        flush(&mut wr, self.reply_timeout).await?;
                        self.batch_written();
                        if self.disconnecting {
                            return Ok(Finished::Disconnected);
                        }
                    }
                }
                r = rd.read_buf(&mut self.rbuf) => {
                    if r? == 0 {
                        return Err(ConnectionError::Closed);
                    }
                    self.read_packets()?;
                }
                _ = self.shared.queue.notified(), if !self.want_fill => self.want_fill = true,
                _ = self.stops.draining.cancelled(), if !self.drain_noticed => {
                    self.drain_noticed = true;
                    self.want_fill = true;
                }
                _ = ping.tick() => {
                    if self.ping_deadline.is_none() {
                        codec::put_pingreq(&mut self.wbuf);
                        self.ping_deadline = Some(Instant::now() + self.reply_timeout);
                    }
                }
                _ = tokio::time::sleep_until(ping_deadline), if self.ping_deadline.is_some() => {
                    return Err(ConnectionError::Timeout("waiting for PINGRESP"));
                }
                _ = tokio::time::sleep_until(write_deadline), if writing => {
                    return Err(ConnectionError::Timeout("writing to the broker"));
                }
                _ = tokio::time::sleep_until(pace_wait), if self.pace_wait.is_some() => {
                    self.pace_wait = None;
                    self.want_fill = true;
                }
                _ = beats.tick() => self.beat.beat(),
                _ = profile_tick.tick(), if has_profile => self.want_fill = true,
            }
        }
    }

    /// Encodes everything that is ready into one batch: control messages first, then the
    /// oldest readings, up to the in-flight window and BATCH_BYTES.
    fn fill(&mut self) {
        loop {
            if !self.want_fill || self.disconnecting {
                return;
            }
            self.fill_batch();
            if !(self.stops.draining.is_cancelled()
                && self.wbuf.is_empty()
                && self.used == 0
                && self.shared.queue.is_idle())
            {
                return;
            }
            if self.final_sent {
                // Everything delivered, `offline` included.
                codec::put_disconnect(&mut self.wbuf);
                self.disconnecting = true;
                return;
            }
            if self.shared.has_profile() {
                self.put_farewell();
            } else {
                for c in (self.shared.on_drained)() {
                    self.shared.queue.push_control(c);
                }
                self.shared.queue.push_control(self.shared.availability(false));
            }
            self.final_sent = true;
            // Take them at once: nothing else would wake us for them.
            self.want_fill = true;
        }
    }

    /// A profile's last words (Sparkplug's NDEATH) before DISCONNECT.
    fn put_farewell(&mut self) {
        self.profile_out.clear();
        self.profile_out.extend(self.shared.profile().and_then(|mut p| p.farewell()));
        let _ = self.put_profile_out();
    }

    /// Writes the profile's publishes in `profile_out` (QoS 0) into the batch; one that cannot
    /// be sent is dropped and counted as a refused control message. Returns whether all were
    /// written.
    fn put_profile_out(&mut self) -> bool {
        let mut all = true;
        for p in &self.profile_out {
            let meta = PublishMeta { pkid: 0, retain: false, expiry_s: None, correlation: None };
            let r = codec::put_publish(&mut self.wbuf, self.version, meta, &p.payload, self.limit, |b| {
                codec::put_str(b, &p.topic)
            });
            if let Err(e) = r {
                all = false;
                self.shared.controls_refused.fetch_add(1, Relaxed);
                tracing::error!(
                    topic = %p.topic, bytes = p.payload.len(), limit = self.limit, error = %e,
                    "Message cannot be sent to this broker; dropped."
                );
            }
        }
        all
    }

    fn fill_batch(&mut self) {
        let shared = self.shared;
        let qos1 = shared.qos != QoS::AtMostOnce;
        if let Some(mut profile) = shared.profile() {
            self.profile_out.clear();
            profile.due(&mut self.profile_out);
            let may_publish = profile.may_publish();
            drop(profile);
            let _ = self.put_profile_out();
            if !may_publish {
                // Readings wait in the queue (bounded, drop-oldest) until the profile may
                // publish again: the primary host's return, a connection.
                self.want_fill = false;
                return;
            }
        }
        self.pacer.observe(shared.queue.pushed());
        while self.wbuf.len() < BATCH_BYTES && (!qos1 || self.used + 1 < self.in_use.len()) {
            // The shutdown drain is not a catch-up: it has a deadline.
            let paced = !self.drain_noticed && !self.pacer.ready();
            let Some(out) = shared.queue.pop_next_paced(!paced) else {
                self.want_fill = false;
                if paced {
                    self.pace_wait = Some(self.pacer.next_batch());
                }
                return;
            };
            if matches!(out, Outbound::Reading { .. }) && !self.drain_noticed {
                self.pacer.spend();
            }
            let pkid = if qos1 { self.take_pkid() } else { 0 };
            let written = match &out {
                Outbound::Reading { device, payload, .. } if shared.has_profile() => {
                    self.profile_out.clear();
                    let ok = shared.profile().is_some_and(|mut p| p.reading(*device, payload, &mut self.profile_out));
                    // A reading whose publish does not fit the broker's limit is not delivered.
                    if ok && self.put_profile_out() {
                        Ok(())
                    } else {
                        Err(EncodeError::Codec("the profile cannot publish this reading".into()))
                    }
                }
                Outbound::Reading { device, payload, replayed } => {
                    let meta = PublishMeta { pkid, retain: false, expiry_s: self.expiry_s, correlation: None };
                    codec::put_publish(&mut self.wbuf, self.version, meta, payload, self.limit, |b| {
                        shared.put_reading_topic(*device, *replayed, b)
                    })
                }
                Outbound::Control(c) => {
                    let meta =
                        PublishMeta { pkid, retain: c.retain, expiry_s: None, correlation: c.correlation.as_deref() };
                    codec::put_publish(&mut self.wbuf, self.version, meta, &c.payload, self.limit, |b| {
                        codec::put_str(b, &c.topic)
                    })
                }
            };
            match written {
                Ok(()) if qos1 => shared.queue.on_published(pkid),
                Ok(()) => self.qos0_in_batch += 1,
                Err(e) => {
                    if qos1 {
                        self.release_pkid(pkid);
                    }
                    self.refuse(&out, &e);
                }
            }
        }
    }

    /// A publish that cannot be sent (over the packet-size limit, a topic MQTT cannot carry):
    /// sending it would only make the broker hang up on us, again and again.
    fn refuse(&mut self, out: &Outbound, e: &EncodeError) {
        match out {
            Outbound::Reading { device, payload, .. } => {
                let topic_len = self.shared.reading_topic_len(*device);
                tracing::error!(
                    device = %self.shared.queue.lane_name(*device), bytes = payload.len(), topic_len,
                    limit = self.limit, error = %e, "Reading cannot be sent to this broker; dropped."
                );
            }
            Outbound::Control(c) => {
                self.shared.controls_refused.fetch_add(1, Relaxed);
                tracing::error!(
                    topic_len = c.topic.len(), bytes = c.payload.len(), limit = self.limit, error = %e,
                    "Message cannot be sent to this broker; dropped."
                );
            }
        }
        self.shared.queue.refuse_popped();
    }

    fn take_pkid(&mut self) -> u16 {
        let slots = self.in_use.len() - 1;
        loop {
            self.next_pkid = self.next_pkid % slots + 1;
            if !self.in_use[self.next_pkid] {
                self.in_use[self.next_pkid] = true;
                self.used += 1;
                return self.next_pkid as u16;
            }
        }
    }

    fn release_pkid(&mut self, pkid: u16) {
        if let Some(slot) = self.in_use.get_mut(usize::from(pkid)) {
            if std::mem::replace(slot, false) {
                self.used -= 1;
            }
        }
    }

    fn batch_written(&mut self) {
        self.wbuf.clear();
        self.wpos = 0;
        self.write_deadline = None;
        for _ in 0..std::mem::take(&mut self.qos0_in_batch) {
            // Written is delivered at QoS 0.
            self.shared.queue.on_published(0);
        }
        self.want_fill = true;
    }

    /// The broker hung up on us with publishes in flight: the oldest of them is what it read
    /// last before closing, so it may be what the broker refuses (over its packet size, a
    /// topic its ACL forbids — MQTT 3.1.1 can only say so by disconnecting). Returns whether
    /// that publish has now been dropped as poisoned.
    pub(super) fn strike_suspect(&mut self) -> bool {
        if self.used == 0 {
            return false;
        }
        let Some(p) = self.shared.queue.strike_oldest_in_flight(STRIKES_TO_POISON) else { return false };
        let (topic, bytes) = match &p {
            Poisoned::Reading { device, payload, .. } => {
                (self.shared.topics.readings(&self.shared.queue.lane_name(*device)), payload.len())
            }
            Poisoned::Control { topic, payload } => (topic.clone(), payload.len()),
        };
        tracing::error!(
            topic = %topic, bytes, strikes = STRIKES_TO_POISON,
            "The broker closed the connection each time right after this message; dropped as poisoned (check the broker's max_packet_size and ACLs)."
        );
        true
    }

    fn read_packets(&mut self) -> Result<(), ConnectionError> {
        loop {
            let read = self.reader.next(&mut self.rbuf).map_err(|e| ConnectionError::Protocol(e.to_string()))?;
            match read {
                None => return Ok(()),
                Some(Read::Skipped(s)) => {
                    let n = self.shared.incoming_oversize.fetch_add(1, Relaxed) + 1;
                    if let Some(pkid) = s.puback {
                        codec::put_puback(&mut self.wbuf, pkid);
                    }
                    if n.is_power_of_two() {
                        tracing::warn!(
                            bytes = s.size,
                            limit = MAX_INCOMING,
                            skipped = n,
                            "Skipped an oversized message from the broker."
                        );
                    }
                }
                Some(Read::Packet(p)) => self.on_packet(p)?,
            }
        }
    }

    fn on_packet(&mut self, p: Incoming) -> Result<(), ConnectionError> {
        match p {
            Incoming::PubAck { pkid, reason } => {
                let slot = usize::from(pkid);
                if !self.in_use.get(slot).copied().unwrap_or(false) {
                    // A broker bug; one line per doubling, so it cannot flood the journal.
                    let n = self.shared.stray_acks.fetch_add(1, Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(pkid, stray_acks = n, "PUBACK for a packet id not in flight; ignored.");
                    }
                    return Ok(());
                }
                self.release_pkid(pkid);
                self.want_fill = true;
                if reason < 0x80 {
                    self.shared.queue.on_acked(pkid);
                } else {
                    // MQTT 5: the broker took the packet and said no. Sending it again would
                    // get the same answer: drop it, counted by reason.
                    let name = codec::puback_reason_name(reason);
                    let n = self.shared.count_puback_refusal(name);
                    if n.is_power_of_two() {
                        tracing::error!(pkid, reason = name, refused = n, "The broker refused a message; dropped.");
                    }
                    self.shared.queue.on_refused(pkid);
                }
            }
            Incoming::PingResp => self.ping_deadline = None,
            Incoming::SubAck { refused, .. } => {
                self.shared.subscriptions_refused.store(refused.len() as u64, Relaxed);
                for (i, code) in refused {
                    let filter = self.shared.subscriptions.get(i).map_or("?", String::as_str);
                    tracing::error!(filter, code = %code, "The broker refused a subscription; check its ACL for this user.");
                }
            }
            Incoming::Publish { pkid, qos1, message } => {
                if qos1 {
                    codec::put_puback(&mut self.wbuf, pkid);
                }
                match self.shared.profile() {
                    Some(mut p) => {
                        p.incoming(&message);
                        self.want_fill = true;
                    }
                    None => deliver_incoming(self.shared, message),
                }
            }
            Incoming::Disconnect { reason } => return Err(ConnectionError::ClosedWithReason(reason)),
            Incoming::ConnAck(_) => return Err(ConnectionError::Protocol("unexpected CONNACK".into())),
            Incoming::Unexpected(what) => return Err(ConnectionError::Protocol(format!("unexpected {what}"))),
        }
        Ok(())
    }
}

async fn flush(wr: &mut (impl AsyncWrite + Unpin), timeout: Duration) -> Result<(), ConnectionError> {
    match tokio::time::timeout(timeout, wr.flush()).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ConnectionError::Timeout("flushing to the broker")),
    }
}
