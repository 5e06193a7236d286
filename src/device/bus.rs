//! One Modbus RTU bus: a task owns the port and polls its slaves in turn, one transaction at
//! a time. A slave that does not answer costs the others its `request_timeout × (retries+1)`
//! per poll and goes `stale` after [`STALE_AFTER`] failed polls; it never closes the port.
//! The port failing (unplugged, I/O error) ends the session: every slave goes `backoff` and
//! the port is reopened like a listening device's.
//!
//! A poll's decoding (a few registers into JSON) runs here, on the bus task: it is bounded by
//! the register map (≤ 125 registers a request), unlike a stream's frames, so it cannot hold
//! a worker thread for long.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{DeviceRuntime, PortOpener, SerialPort, SessionEnd, State};
use crate::backoff::Backoff;
use crate::config::{BusConfig, Input, SlaveConfig};
use crate::decode::Decoded;
use crate::input::ReadingSink;
use crate::liveness::{self, Beat};
use crate::modbus::rtu::{self, exception_name};
use crate::modbus::{plan, Fault, Request, Schedule, Transaction};
use crate::queue::ReadingQueue;
use crate::telemetry::now_us;

/// Failed polls in a row after which a slave is published as `stale`.
pub const STALE_AFTER: u32 = 3;
/// Waiting for the line to fall silent, at most this many silences: a line that never stops
/// talking (a second master, a babbling slave) is then used anyway and its bytes show up as
/// faults, instead of stopping the bus.
const SETTLE_MAX_SILENCES: u32 = 20;

/// A write of one point, from the `write` command.
#[derive(Debug)]
pub struct WriteJob {
    /// The slave's device name and the point's name.
    pub device: String,
    pub point: String,
    pub value: serde_json::Value,
    /// Not started after this: a write must not happen long after it was asked for (the bus
    /// was down meanwhile); it is answered as failed instead.
    pub start_by: Instant,
    /// The result: `Ok` once the slave confirmed it, or why not.
    pub done: oneshot::Sender<Result<(), String>>,
}

/// What a bus task needs; cheap to clone.
#[derive(Clone)]
pub struct BusContext {
    pub bus: BusConfig,
    /// The slaves' runtimes, in `bus.slaves` order; a reload that only adds, removes or
    /// changes slaves sends the new list here and the running session takes it between
    /// transactions (the port stays open, the other slaves go on).
    pub slaves: tokio::sync::watch::Receiver<Vec<Arc<DeviceRuntime>>>,
    pub queue: Arc<ReadingQueue>,
    pub opener: Arc<dyn PortOpener>,
    pub restart_min: Duration,
    pub restart_max: Duration,
    pub jitter: bool,
    pub beat: Beat,
    /// Writes waiting for the bus (the `write` command), taken between transactions.
    pub writes: Arc<tokio::sync::Mutex<mpsc::Receiver<WriteJob>>>,
}

impl BusContext {
    fn set_all(&self, state: State, error: Option<&str>) {
        for s in self.slaves.borrow().iter() {
            s.set_state(&self.queue, state, error.map(str::to_string));
        }
    }
}

/// Keeps the bus running until `cancel`: open, poll, back off, reopen.
pub async fn supervise_bus(ctx: BusContext, cancel: CancellationToken) {
    let mut backoff = Backoff::new(ctx.restart_min, ctx.restart_max, ctx.jitter);
    let mut tick = liveness::ticker();
    let name = ctx.bus.name.as_str();
    loop {
        ctx.set_all(State::Opening, None);
        let open = tokio::time::timeout(ctx.bus.port.open_timeout, ctx.opener.open(&ctx.bus.port));
        let opened = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = liveness::beating(&ctx.beat, &mut tick, open) => r,
        };
        let path = ctx.bus.port.path.display();
        let (error, state) = match opened {
            Ok(Ok(port)) => {
                ctx.set_all(State::Up, None);
                let began = Instant::now();
                let end = run(port, &ctx, &cancel).await;
                if began.elapsed() >= Duration::from_secs(30) {
                    backoff.reset();
                }
                match end {
                    SessionEnd::Cancelled => break,
                    SessionEnd::Requested => {
                        tracing::info!(bus = name, "Restart requested; reopening the bus's port.");
                        for s in ctx.slaves.borrow().iter() {
                            s.counters.restarts.fetch_add(1, Relaxed);
                        }
                        continue;
                    }
                    other => (format!("bus {name}: {other}"), State::Backoff),
                }
            }
            Ok(Err(e)) => (format!("bus {name}: cannot open {path}: {e}"), State::Failed),
            Err(_) => (format!("bus {name}: opening {path} timed out"), State::Failed),
        };
        let delay = backoff.next_delay();
        tracing::warn!(
            bus = name,
            error,
            backoff_ms = delay.as_millis() as u64,
            "Bus session ended; reopening after backoff."
        );
        for s in ctx.slaves.borrow().iter() {
            s.counters.restarts.fetch_add(1, Relaxed);
        }
        ctx.set_all(state, Some(&error));
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = liveness::beating(&ctx.beat, &mut tick, tokio::time::sleep(delay)) => {}
        }
    }
    ctx.set_all(State::Stopped, None);
}

/// One slave during a session.
struct Slave {
    runtime: Arc<DeviceRuntime>,
    config: SlaveConfig,
    sink: ReadingSink,
    requests: Vec<Request>,
    /// For each point (config order): its request and its offset in that request.
    slots: Vec<(usize, usize)>,
    failed_in_a_row: u32,
    /// (request, exception code) pairs already logged: each is logged once per session.
    logged: HashSet<(usize, u8)>,
    warned_overrun: bool,
}

impl Slave {
    fn new(runtime: &Arc<DeviceRuntime>, queue: &Arc<ReadingQueue>) -> Option<Self> {
        let Input::Modbus(config) = &runtime.config.input else { return None };
        let requests = plan(&config.points);
        let mut slots = vec![(0, 0); config.points.len()];
        for (r, req) in requests.iter().enumerate() {
            for &p in &req.points {
                slots[p] = (r, usize::from(config.points[p].address - req.start));
            }
        }
        Some(Self {
            runtime: Arc::clone(runtime),
            config: config.clone(),
            sink: runtime.sink(queue),
            requests,
            slots,
            failed_in_a_row: 0,
            logged: HashSet::new(),
            warned_overrun: false,
        })
    }

    /// Wire time of one poll: every request and its reply, with the silences between.
    fn poll_time(&self, bus: &BusConfig) -> Duration {
        let baud = bus.port.baud;
        self.requests
            .iter()
            .map(|r| rtu::wire_time(8 + r.reply_len(), baud) + 2 * rtu::silence(baud) + bus.turnaround)
            .sum()
    }
}

/// The port and the line's timing.
struct Line {
    port: SerialPort,
    rx: BytesMut,
    baud: u32,
    request_timeout: Duration,
    retries: u32,
    turnaround: Duration,
    /// When the line was last seen silent for a whole inter-frame gap (a reply just checked).
    quiet_at: Option<Instant>,
}

/// Runs one session on an open port until it fails or `cancel`.
async fn run(port: SerialPort, ctx: &BusContext, cancel: &CancellationToken) -> SessionEnd {
    let bus = &ctx.bus;
    let mut line = Line {
        port,
        rx: BytesMut::with_capacity(512),
        baud: bus.port.baud,
        request_timeout: bus.request_timeout,
        retries: bus.retries,
        turnaround: bus.turnaround,
        quiet_at: None,
    };
    let mut changes = ctx.slaves.clone();
    let mut runtimes = changes.borrow_and_update().clone();
    let mut slaves: Vec<Slave> = runtimes.iter().filter_map(|r| Slave::new(r, &ctx.queue)).collect();
    let mut schedule = Schedule::new(slaves.iter().map(|s| s.config.poll_interval), Instant::now());
    let mut tick = liveness::ticker();
    let mut writes = ctx.writes.lock().await;
    let (mut writes_open, mut changes_open) = (true, true);
    let end = 'session: loop {
        // `restart_device` on any slave reopens the bus's port (it is theirs together).
        let mut restarts: Vec<_> = runtimes.iter().map(|s| Box::pin(s.restart.notified())).collect();
        let mut restart = std::future::poll_fn(|cx| {
            for r in &mut restarts {
                if std::future::Future::poll(r.as_mut(), cx).is_ready() {
                    return std::task::Poll::Ready(());
                }
            }
            std::task::Poll::Pending
        });
        loop {
            let Some((i, due)) = schedule.next() else { break 'session SessionEnd::Cancelled };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break 'session SessionEnd::Cancelled,
                _ = &mut restart => break 'session SessionEnd::Requested,
                changed = changes.changed(), if changes_open => {
                    match changed {
                        Ok(()) => break,
                        Err(_) => changes_open = false,
                    }
                }
                job = writes.recv(), if writes_open => {
                    // Every sender gone (no slave runtime left to write through): stop asking.
                    let Some(job) = job else {
                        writes_open = false;
                        continue;
                    };
                    if let Err(end) = write(&mut line, &slaves, job).await {
                        break 'session end;
                    }
                }
                _ = liveness::beating(&ctx.beat, &mut tick, tokio::time::sleep_until(due)) => {
                    if let Err(end) = poll(&mut line, ctx, &mut slaves[i]).await {
                        break 'session end;
                    }
                    let skipped = schedule.polled(i, Instant::now());
                    if skipped > 0 {
                        overran(bus, &mut slaves, i, skipped);
                    }
                }
            }
        }
        // A reload changed the slaves: the ones kept keep their state and their ticks.
        drop(restart);
        drop(restarts);
        runtimes = changes.borrow_and_update().clone();
        (slaves, schedule) = reconcile(std::mem::take(&mut slaves), &schedule, &runtimes, &ctx.queue);
        tracing::info!(bus = bus.name, slaves = slaves.len(), "Slaves changed by a reload; polling the new set.");
    };
    for s in &slaves {
        s.sink.end();
    }
    end
}

/// The session's slaves for the runtimes `next`: a slave whose runtime is unchanged (the
/// same one) keeps its state and schedule; a new or changed one starts now.
fn reconcile(
    old: Vec<Slave>,
    schedule: &Schedule,
    next: &[Arc<DeviceRuntime>],
    queue: &Arc<ReadingQueue>,
) -> (Vec<Slave>, Schedule) {
    let mut old: Vec<(Option<Slave>, (Duration, Instant))> =
        old.into_iter().enumerate().map(|(i, s)| (Some(s), schedule.slot(i))).collect();
    let mut slaves = Vec::with_capacity(next.len());
    let mut slots = Vec::with_capacity(next.len());
    for r in next {
        let kept = old.iter_mut().find(|(s, _)| s.as_ref().is_some_and(|s| Arc::ptr_eq(&s.runtime, r)));
        match kept.and_then(|(s, slot)| Some((s.take()?, *slot))) {
            Some((s, slot)) => {
                slaves.push(s);
                slots.push(slot);
            }
            None => {
                if let Some(s) = Slave::new(r, queue) {
                    slots.push((s.config.poll_interval, Instant::now()));
                    slaves.push(s);
                }
            }
        }
    }
    for (gone, _) in old {
        if let Some(s) = gone {
            s.sink.end();
        }
    }
    (slaves, Schedule::from_slots(slots))
}

/// Polls one slave: its requests in turn, stopping at the first that fails. One reading, or
/// one rejection by the reason of the failure.
async fn poll(line: &mut Line, ctx: &BusContext, s: &mut Slave) -> Result<(), SessionEnd> {
    let unit = s.config.unit_id();
    let mut data: Vec<Vec<u8>> = Vec::with_capacity(s.requests.len());
    let mut failure = None;
    for (r, req) in s.requests.iter().enumerate() {
        let tx = Transaction::read(unit, req);
        match line.transact(&tx, &s.runtime).await? {
            Ok(d) => data.push(d),
            Err(fault) => {
                failure = Some((r, fault));
                break;
            }
        }
    }
    let device = s.runtime.name();
    let Some((r, fault)) = failure else {
        let len = data.iter().map(Vec::len).sum();
        let (points, slots, requests) = (&s.config.points, &s.slots, &s.requests);
        let offered = s.sink.offer(len, now_us(), |out: &mut BytesMut| {
            for (i, p) in points.iter().enumerate() {
                if i > 0 {
                    out.put_u8(b',');
                }
                let (r, at) = slots[i];
                let d = &data[r];
                if requests[r].table.is_bits() {
                    p.write_field(&[], rtu::bit(d, at), out);
                } else {
                    let words: Vec<u16> = rtu::words(&d[2 * at..]).take(usize::from(p.kind.words())).collect();
                    p.write_field(&words, false, out);
                }
            }
            Ok(Decoded::default())
        });
        // A reading refused here (too large for the broker) was counted and logged by the
        // sink; the slave did answer, so it is not a failed poll.
        let _ = offered;
        if s.failed_in_a_row >= STALE_AFTER {
            tracing::info!(device, "Slave answers again.");
            s.runtime.set_state(&ctx.queue, State::Up, None);
        }
        s.failed_in_a_row = 0;
        s.sink.flush_due();
        return Ok(());
    };
    s.sink.reject(fault.reject());
    if let Fault::Exception(code) = fault {
        let c = &s.runtime.counters.exceptions;
        c[if (1..=11).contains(&code) { usize::from(code) } else { 0 }].fetch_add(1, Relaxed);
        if s.logged.insert((r, code)) {
            log_exception(device, &s.config, &s.requests[r], code);
        }
    }
    s.failed_in_a_row += 1;
    if s.failed_in_a_row == STALE_AFTER {
        tracing::warn!(device, unit, error = %fault, polls = STALE_AFTER, "Slave failed its last polls; marking it stale.");
        let why = format!("{STALE_AFTER} polls in a row failed, the last with: {fault}");
        s.runtime.set_state(&ctx.queue, State::Stale, Some(why));
    }
    s.sink.flush_due();
    Ok(())
}

fn log_exception(device: &str, slave: &SlaveConfig, req: &Request, code: u8) {
    let names: Vec<&str> = req.points.iter().map(|&p| slave.points[p].name.as_str()).collect();
    let range = format!("{} {}..{}", req.table.as_str(), req.start, u32::from(req.start) + u32::from(req.count));
    let hint = match code {
        2 => "the slave does not have these addresses: check each point's table and address (0-based) against its register map",
        1 => "the slave does not support reading this table: check each point's table",
        3 => "the slave refuses this many at once or this range: check the points' addresses",
        _ => "the slave reported a failure",
    };
    tracing::warn!(
        device,
        unit = slave.unit,
        code,
        exception = exception_name(code),
        registers = %range,
        points = ?names,
        "Exception response to a poll: {hint}. Logged once per session; every one is counted."
    );
}

/// Counts skipped ticks and says once, with the arithmetic, why the bus cannot keep up.
fn overran(bus: &BusConfig, slaves: &mut [Slave], i: usize, skipped: u64) {
    slaves[i].runtime.counters.poll_overruns.fetch_add(skipped, Relaxed);
    if std::mem::replace(&mut slaves[i].warned_overrun, true) {
        return;
    }
    let load: f64 = slaves.iter().map(|s| s.poll_time(bus).as_secs_f64() / s.config.poll_interval.as_secs_f64()).sum();
    let worst: Duration = slaves.iter().map(|s| bus.request_timeout * (bus.retries + 1) + s.poll_time(bus)).sum();
    let s = &slaves[i];
    tracing::warn!(
        device = s.runtime.name(),
        bus = bus.name,
        skipped,
        poll_ms = s.poll_time(bus).as_secs_f64() * 1e3,
        interval_ms = s.config.poll_interval.as_millis() as u64,
        bus_load_pct = (load * 100.0).round(),
        worst_cycle_ms = worst.as_millis() as u64,
        baud = bus.port.baud,
        "Poll ticks skipped: the bus cannot fit every slave's polls. On the wire the polls need \
         {:.0}% of the bus's time (each request + reply at 11 bits a byte, plus 2 × 3.5 characters of \
         silence and the turnaround), and a slave that does not answer costs request_timeout × (retries+1) \
         more per poll. Raise poll_interval, read fewer points, or raise the baud rate. Logged once; \
         every skipped tick is counted in poll_overruns.",
        load * 100.0
    );
}

/// Writes a point for the `write` command, between polls.
async fn write(line: &mut Line, slaves: &[Slave], job: WriteJob) -> Result<(), SessionEnd> {
    if Instant::now() > job.start_by {
        let _ =
            job.done.send(Err("the bus could not take the write in time (was it down?); nothing was written".into()));
        return Ok(());
    }
    let Some(s) = slaves.iter().find(|s| s.runtime.name() == job.device) else {
        let _ = job.done.send(Err(format!("device {:?} is not a Modbus slave on a running bus", job.device)));
        return Ok(());
    };
    let (point, value) = match s.config.write_of(&job.point, &job.value) {
        Ok(write) => write,
        Err(e) => {
            let _ = job.done.send(Err(e));
            return Ok(());
        }
    };
    let tx = Transaction::write(s.config.unit_id(), point.address, &value);
    let result = line.transact(&tx, &s.runtime).await?;
    tracing::info!(device = s.runtime.name(), point = point.name, value = %job.value, ok = result.is_ok(), "Point written.");
    let _ = job.done.send(result.map(drop).map_err(|f| f.to_string()));
    Ok(())
}

impl Line {
    /// One request and its reply, asked again after a timeout, a bad CRC or a cut-off reply
    /// (`retries` times). The inner error is the slave's fault; the outer ends the session.
    async fn transact(&mut self, tx: &Transaction, dev: &DeviceRuntime) -> Result<Result<Vec<u8>, Fault>, SessionEnd> {
        let mut attempt = 0;
        loop {
            let outcome = self.once(tx, dev).await?;
            match outcome {
                Err(f) if f.is_retried() && attempt < self.retries => {
                    attempt += 1;
                    tracing::debug!(device = dev.name(), error = %f, attempt, "Asking the slave again.");
                }
                other => return Ok(other),
            }
        }
    }

    async fn once(&mut self, tx: &Transaction, dev: &DeviceRuntime) -> Result<Result<Vec<u8>, Fault>, SessionEnd> {
        let silence = rtu::silence(self.baud);
        // The line must be quiet for a whole inter-frame gap before a request (late replies to
        // an earlier request are cleared here), plus the turnaround slow slaves need.
        match self.quiet_at.take() {
            Some(t) if t.elapsed() < silence => {}
            _ => {
                let stray = self.settle(silence).await?;
                if stray > 0 {
                    tracing::debug!(device = dev.name(), bytes = stray, "Cleared bytes nobody asked for off the bus.");
                }
            }
        }
        if !self.turnaround.is_zero() {
            tokio::time::sleep(self.turnaround).await;
        }
        let request = tx.request();
        let wire = rtu::wire_time(request.len(), self.baud);
        match tokio::time::timeout(self.request_timeout + wire, self.port.write_all(request)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(SessionEnd::Io(e)),
            Err(_) => {
                return Err(SessionEnd::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "writing a request timed out",
                )))
            }
        }
        // The request is still on its way out when write returns: count its wire time.
        let deadline = Instant::now() + wire + self.request_timeout;
        self.rx.clear();
        let complete = loop {
            if let Some(n) = tx.reply_len(&self.rx) {
                if self.rx.len() >= n {
                    break n;
                }
            }
            match tokio::time::timeout_at(deadline, self.port.read_buf(&mut self.rx)).await {
                Err(_) if self.rx.is_empty() => return Ok(Err(Fault::NoResponse)),
                Err(_) => return Ok(Err(Fault::Short)),
                Ok(Ok(0)) => return Err(SessionEnd::Eof),
                Ok(Ok(n)) => dev.counters.bytes_in.fetch_add(n as u64, Relaxed),
                Ok(Err(e)) => return Err(SessionEnd::Io(e)),
            };
        };
        // Bytes after the reply, before the line falls silent, belong to no valid frame.
        let extra = self.rx.len() - complete + self.settle(silence).await?;
        self.quiet_at = Some(Instant::now());
        if extra > 0 {
            return Ok(Err(Fault::Overlong));
        }
        Ok(tx.check(&self.rx[..complete]).map(<[u8]>::to_vec))
    }

    /// Reads until the line has been silent for `silence` (at most [`SETTLE_MAX_SILENCES`]
    /// of them); returns the bytes read meanwhile.
    async fn settle(&mut self, silence: Duration) -> Result<usize, SessionEnd> {
        let mut buf = [0u8; 256];
        let mut got = 0;
        for _ in 0..SETTLE_MAX_SILENCES {
            match tokio::time::timeout(silence, self.port.read(&mut buf)).await {
                Err(_) => break,
                Ok(Ok(0)) => return Err(SessionEnd::Eof),
                Ok(Ok(n)) => got += n,
                Ok(Err(e)) => return Err(SessionEnd::Io(e)),
            }
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    //! The bus task against simulated slaves (rmodbus's server side) on an in-memory stream,
    //! under paused time: exact counts, no waiting on the wall clock.

    use std::sync::Mutex;

    use super::*;
    use crate::config::Config;
    use crate::reading::PacketLimit;
    use crate::reject::Reject;
    use crate::simulate::modbus::{self as sim, SimBus, SimSlave};

    /// Hands out one end of an in-memory stream, once; later opens fail (an unplugged port).
    struct Once(Mutex<Option<tokio::io::DuplexStream>>);

    impl PortOpener for Once {
        fn open<'a>(
            &'a self,
            _: &'a crate::config::PortConfig,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<SerialPort>> + Send + 'a>> {
            let port = self.0.lock().unwrap().take();
            Box::pin(async move {
                port.map(|p| Box::new(p) as SerialPort).ok_or_else(|| std::io::ErrorKind::NotFound.into())
            })
        }
    }

    struct Rig {
        sim: SimBus,
        slaves: Vec<Arc<DeviceRuntime>>,
        queue: Arc<ReadingQueue>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        server: tokio::task::JoinHandle<std::io::Result<()>>,
        slaves_tx: tokio::sync::watch::Sender<Vec<Arc<DeviceRuntime>>>,
        writes: mpsc::Sender<WriteJob>,
    }

    /// A bus (`bus` holds its extra keys) with a meter per `(unit, interval)`; the bus task
    /// running, the simulated meters answering.
    fn rig(bus: &str, meters: &[(u8, &str)], extra_points: &str) -> Rig {
        let mut text = format!("[gateway]\nid = \"gw\"\n[[bus]]\nname = \"b\"\npath = \"/dev/b\"\n{bus}\n");
        for (unit, interval) in meters {
            text += &format!("[[bus.device]]\nname = \"m{unit}\"\nunit = {unit}\npoll_interval = \"{interval}\"\n");
            text += sim::METER_POINTS;
            text += extra_points;
        }
        let config = Config::from_toml(&text).unwrap();
        let queue = Arc::new(ReadingQueue::new(meters.len(), 100_000, 1 << 26, None, 10));
        let slaves: Vec<_> = config.buses[0]
            .devices()
            .enumerate()
            .map(|(i, d)| Arc::new(DeviceRuntime::new(i, d, format!("state/{i}"), PacketLimit::new(1 << 20))))
            .collect();
        let (ours, theirs) = tokio::io::duplex(4096);
        let sim: SimBus = Arc::new(Mutex::new(meters.iter().map(|(u, _)| SimSlave::meter(*u)).collect()));
        let server = tokio::spawn(sim::serve(theirs, Arc::clone(&sim)));
        let (writes, rx) = mpsc::channel(4);
        let (slaves_tx, slaves_rx) = tokio::sync::watch::channel(slaves.clone());
        let ctx = BusContext {
            bus: config.buses[0].clone(),
            slaves: slaves_rx,
            queue: Arc::clone(&queue),
            opener: Arc::new(Once(Mutex::new(Some(ours)))),
            restart_min: Duration::from_secs(1),
            restart_max: Duration::from_secs(1),
            jitter: false,
            beat: crate::liveness::Liveness::new([]).beat_for("bus"),
            writes: Arc::new(tokio::sync::Mutex::new(rx)),
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(supervise_bus(ctx, cancel.clone()));
        Rig { sim, slaves, queue, cancel, task, server, slaves_tx, writes }
    }

    impl Rig {
        async fn stop(mut self) -> Self {
            self.cancel.cancel();
            (&mut self.task).await.unwrap();
            self
        }

        fn counter(&self, i: usize, reason: Reject) -> u64 {
            self.slaves[i].counters.rejected[reason.index()].load(Relaxed)
        }

        fn readings(&self, i: usize) -> u64 {
            self.queue.stats()[i].readings
        }

        /// Writes `value` to `point` of `device`, if the bus can start it by `start_by`.
        async fn write(
            &self,
            device: &str,
            point: &str,
            value: serde_json::Value,
            start_by: Instant,
        ) -> Result<(), String> {
            let (done, result) = oneshot::channel();
            let job = WriteJob { device: device.into(), point: point.into(), value, start_by, done };
            self.writes.send(job).await.unwrap();
            result.await.unwrap()
        }

        fn polls(&self, i: usize) -> u64 {
            self.slaves[i].counters.frames_in.load(Relaxed)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_slave_costs_the_others_only_its_timeout_and_goes_stale() {
        let rig = rig("baud = 9600\nrequest_timeout = \"100ms\"\nretries = 1", &[(1, "1s"), (2, "1s"), (3, "1s")], "");
        rig.sim.lock().unwrap()[1].faults.silent = true;
        // Ticks at 0, 1, …, 9 s: ten polls each.
        tokio::time::sleep(Duration::from_millis(9_500)).await;
        let rig = rig.stop().await;
        for i in [0, 2] {
            assert_eq!((rig.polls(i), rig.readings(i)), (10, 10), "slave {i} kept its interval");
            assert_eq!(rig.slaves[i].counters.poll_overruns.load(Relaxed), 0);
        }
        assert_eq!((rig.polls(1), rig.readings(1), rig.counter(1, Reject::NoResponse)), (10, 0, 10));
        let status = rig.slaves[1].status();
        assert_eq!(status.state, State::Stopped);
        assert!(status.last_error.unwrap().contains("3 polls in a row failed"), "it went stale on the way");
    }

    #[tokio::test(start_paused = true)]
    async fn a_bus_too_slow_for_its_intervals_skips_ticks_and_counts_them() {
        let meters = [(1, "20ms"), (2, "20ms"), (3, "20ms"), (4, "20ms")];
        let rig = rig("baud = 9600", &meters, "");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rig = rig.stop().await;
        for i in 0..4 {
            let (polls, overruns) = (rig.polls(i), rig.slaves[i].counters.poll_overruns.load(Relaxed));
            assert_eq!(rig.readings(i), polls, "every poll answered");
            // A slave gets a tick every 20 ms: each one is polled or skipped.
            assert!(
                overruns > 0 && (polls + overruns).abs_diff(50) <= 2,
                "slave {i}: {polls} polls, {overruns} skipped"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bad_crc_is_retried_wrong_unit_is_not_and_neither_becomes_a_reading() {
        let rig = rig("retries = 1", &[(1, "1s"), (2, "1s")], "");
        {
            let mut sim = rig.sim.lock().unwrap();
            sim[0].faults.bad_crc = true;
            sim[1].faults.reply_as = Some(9);
        }
        tokio::time::sleep(Duration::from_millis(4_500)).await;
        let rig = rig.stop().await;
        assert_eq!((rig.polls(0), rig.readings(0), rig.counter(0, Reject::BadCrc)), (5, 0, 5));
        assert_eq!((rig.polls(1), rig.readings(1), rig.counter(1, Reject::WrongUnit)), (5, 0, 5));
        let sim = rig.sim.lock().unwrap();
        // A poll stops at its first failed request: one request, asked twice after a bad CRC.
        assert_eq!(sim[0].answered, 10, "asked again after each bad CRC");
        assert_eq!(sim[1].answered, 5, "a wrong unit is not asked again");
    }

    #[tokio::test(start_paused = true)]
    async fn exceptions_are_counted_by_code_and_fail_the_poll() {
        let missing = "[[bus.device.point]]\nname = \"far\"\ntable = \"holding\"\naddress = 5000\ntype = \"u16\"\n";
        let rig = rig("", &[(1, "1s")], missing);
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let rig = rig.stop().await;
        let c = &rig.slaves[0].counters;
        assert_eq!((rig.polls(0), rig.readings(0), rig.counter(0, Reject::Exception)), (3, 0, 3));
        assert_eq!(c.exceptions[2].load(Relaxed), 3, "exception 02, illegal data address");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_adds_and_removes_slaves_without_closing_the_port() {
        let rig = rig("", &[(1, "1s"), (2, "1s")], "");
        rig.sim.lock().unwrap().push(SimSlave::meter(3));
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        // The new set: meter 1 as it was, meter 2 gone, meter 3 new.
        let text = format!(
            "[gateway]\nid = \"gw\"\n[[bus]]\nname = \"b\"\npath = \"/dev/b\"\n[[bus.device]]\nname = \"m3\"\nunit = 3\n{}",
            sim::METER_POINTS
        );
        let m3 = Config::from_toml(&text).unwrap().buses[0].devices().next().unwrap();
        let lane = rig.queue.add_lane("m3");
        let m3 = Arc::new(DeviceRuntime::new(lane, m3, "state/m3".into(), PacketLimit::new(1 << 20)));
        rig.slaves_tx.send_replace(vec![Arc::clone(&rig.slaves[0]), Arc::clone(&m3)]);
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        let rig = rig.stop().await;
        // Meter 1 kept its ticks (0, 1, 2, 3, 4 s) and was never reopened; meter 2 was polled
        // twice; meter 3 from the reload on (1.5, 2.5, 3.5 s).
        assert_eq!((rig.polls(0), rig.readings(0)), (5, 5));
        assert_eq!(rig.slaves[0].counters.restarts.load(Relaxed), 0);
        assert_eq!(rig.polls(1), 2);
        assert_eq!((m3.counters.frames_in.load(Relaxed), rig.queue.stats()[lane].readings), (3, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn writes_are_made_between_polls_and_refused_or_expired_with_a_reason() {
        let far = "[[bus.device.point]]\nname = \"far\"\ntable = \"holding\"\naddress = 5000\ntype = \"u16\"\nwritable = true\n";
        let rig = rig("", &[(1, "100ms")], far);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let soon = Instant::now() + Duration::from_secs(1);
        assert_eq!(rig.write("m1", "setpoint", serde_json::json!(-2.5), soon).await, Ok(()));
        assert_eq!(rig.sim.lock().unwrap()[0].storage.holdings[10], (-25i16) as u16);
        let refused = rig.write("m1", "far", serde_json::json!(1), soon).await;
        assert_eq!(refused, Err("exception 02: illegal data address".into()));
        let not_writable = rig.write("m1", "voltage", serde_json::json!(1), soon).await;
        assert!(not_writable.unwrap_err().contains("is not writable"));
        // A write that could not start in time (its bus was down) is answered, never made.
        let past = Instant::now() - Duration::from_millis(1);
        let late = rig.write("m1", "setpoint", serde_json::json!(30), past).await;
        assert!(late.unwrap_err().contains("nothing was written"));
        assert_eq!(rig.sim.lock().unwrap()[0].storage.holdings[10], (-25i16) as u16);
        let rig = rig.stop().await;
        // Polls went on around the writes (the exception of "far" fails each of them).
        assert!(rig.polls(0) >= 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_port_gone_puts_every_slave_in_backoff_and_it_is_reopened() {
        let rig = rig("", &[(1, "100ms"), (2, "100ms")], "");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!((rig.readings(0), rig.readings(1)), (3, 3));
        // The simulator's end closes: the gateway sees EOF; reopening fails (Once).
        rig.server.abort();
        // Seen at the next poll (300 ms): the bus is only read when a slave is asked.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for s in &rig.slaves {
            let status = s.status();
            assert_eq!(status.state, State::Backoff);
            assert!(status.last_error.unwrap().contains("bus b: end of file"));
        }
        let rig = rig.stop().await;
        for s in &rig.slaves {
            assert!(s.counters.restarts.load(Relaxed) >= 1);
            let e = s.status().last_error.unwrap();
            assert!(e.contains("cannot open") || e.contains("bus b"), "{e}");
        }
    }
}
