//! Queries to sensors that answer only when asked, end to end: the real binary, a real
//! mosquitto, a pseudo-terminal whose master plays the sensor. Counted at both ends.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{assert_identities, n, write_all, Gateway, Mosquitto, Msg, Subscriber};
use sensorgate::simulate::PtyLink;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

/// The query every test sensor here answers: a command and its terminator.
const QUERY_END: u8 = b'\r';

fn config(port: u16, probe: &Path, probe_extra: &str, listener: Option<&Path>) -> String {
    let mut c = format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"100ms\"\nshutdown_timeout = \"3s\"\n[mqtt]\nport = {port}\n\
         [[device]]\nname = \"probe\"\npath = \"{}\"\nframing = \"lines\"\n{probe_extra}\n",
        probe.display()
    );
    if let Some(path) = listener {
        c += &format!("[[device]]\nname = \"listener\"\npath = \"{}\"\nframing = \"lines\"\n", path.display());
    }
    c
}

/// What the test sensor saw and did.
#[derive(Debug, Default)]
struct Tally {
    /// Queries read (each ends with [`QUERY_END`]).
    seen: u64,
    /// Queries answered with one JSON line `{"n": <answer index>}`.
    answered: u64,
    /// When the reads that held queries returned (for the figures printed, not asserted).
    read_at: Vec<std::time::Instant>,
}

/// A sensor on the pty master: reads queries and answers each of the first `answer` with one
/// reading, the rest not at all. Once `stop` fires it reads what is left until the port is
/// quiet, then returns the pty and its tally.
fn sensor(mut pty: PtyLink, answer: u64, mut stop: oneshot::Receiver<()>) -> tokio::task::JoinHandle<(PtyLink, Tally)> {
    tokio::spawn(async move {
        let mut tally = Tally::default();
        let mut stopping = false;
        let mut buf = [0u8; 4096];
        loop {
            let read = if stopping {
                match tokio::time::timeout(Duration::from_millis(300), pty.master.read(&mut buf)).await {
                    Ok(r) => r,
                    Err(_) => return (pty, tally),
                }
            } else {
                tokio::select! {
                    _ = &mut stop, if !stopping => {
                        stopping = true;
                        continue;
                    }
                    r = pty.master.read(&mut buf) => r,
                }
            };
            let got = read.expect("the pty master reads");
            if !stopping && buf[..got].contains(&QUERY_END) {
                tally.read_at.push(std::time::Instant::now());
            }
            for _ in buf[..got].iter().filter(|b| **b == QUERY_END) {
                tally.seen += 1;
                if tally.answered < answer {
                    write_all(&mut pty.master, format!("{{\"n\":{}}}\n", tally.answered).as_bytes()).await;
                    tally.answered += 1;
                }
            }
        }
    })
}

/// Device keys for a 256-byte query every 10 ms: a pty nobody reads is full within a second.
fn flooding_query(write_timeout: &str) -> String {
    let query = format!("R{}\\r", ".".repeat(254));
    format!("query = \"{query}\"\nquery_interval = \"10ms\"\nwrite_timeout = \"{write_timeout}\"\n")
}

async fn metrics_where(sub: &mut Subscriber, pred: impl Fn(&Value) -> bool) -> (Value, Vec<Msg>) {
    let (m, skipped) =
        sub.wait_for(Duration::from_secs(20), |m| m.topic == "sensorgate/it/metrics" && pred(&m.json())).await;
    (m.json(), skipped)
}

fn probe_state(m: &Msg) -> Option<Value> {
    (m.topic == "sensorgate/it/devices/probe/state").then(|| m.json())
}

/// Every query answered is one reading, in order; `queries_sent` in the final metrics is the
/// number of queries the sensor read. A device without a query has no `queries_sent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_that_answers_when_asked_gets_one_reading_per_query_answered() {
    const ANSWERED: u64 = 20;
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let (probe, listener) = (dir.path().join("probe"), dir.path().join("listener"));
    let (stop, stopped) = oneshot::channel();
    let probe_sensor = sensor(PtyLink::create(&probe).unwrap(), ANSWERED, stopped);
    let _listener_pty = PtyLink::create(&listener).unwrap();
    let extra = "query = \"R\\r\"\nquery_interval = \"50ms\"\n";
    let mut gw = Gateway::start(dir.path(), &config(broker.port, &probe, extra, Some(&listener)));

    // The 20 answers arrive as 20 readings, in the order they were given.
    let mut numbers = Vec::new();
    while numbers.len() < ANSWERED as usize {
        let (m, _) = sub.wait_for(Duration::from_secs(20), |m| m.topic == "sensorgate/it/devices/probe/readings").await;
        numbers.push(m.json()["n"].as_u64().unwrap());
    }
    assert_eq!(numbers, (0..ANSWERED).collect::<Vec<_>>());
    // The sensor stops answering; the gateway keeps asking on schedule.
    let (m, _) = metrics_where(&mut sub, |m| n(&m["devices"]["probe"], "queries_sent") >= ANSWERED + 10).await;
    assert!(m["devices"]["listener"].get("queries_sent").is_none(), "only devices with a query have it: {m}");

    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(10)).success());
    let _ = stop.send(());
    let (_pty, tally) = probe_sensor.await.unwrap();
    // The final metrics snapshot is published after the devices stopped, just before `offline`.
    let (_, before_offline) =
        sub.wait_for(Duration::from_secs(5), |m| m.topic == "sensorgate/it/state" && m.text() == "offline").await;
    let last = before_offline.iter().rev().find(|m| m.topic == "sensorgate/it/metrics").expect("final metrics");
    let last = last.json();
    let dev = &last["devices"]["probe"];
    assert_eq!(tally.answered, ANSWERED);
    assert_eq!(n(dev, "queries_sent"), tally.seen, "every query sent was read by the sensor, and no more: {dev}");
    assert_eq!((n(dev, "frames_in"), n(dev, "readings"), n(dev, "delivered")), (ANSWERED, ANSWERED, ANSWERED));
    assert_eq!(n(dev, "restarts"), 0);
    assert_identities(dev);
    let gaps: Vec<f64> = tally.read_at.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).collect();
    let span: f64 = gaps.iter().sum();
    eprintln!(
        "queries: {} sent and read, {} answered → {} readings delivered; query_interval 50 ms: {} reads \
         with queries over {span:.1} ms ({:.2} ms apart on average, {:.2}..{:.2} ms)",
        tally.seen,
        tally.answered,
        n(dev, "delivered"),
        tally.read_at.len(),
        span / gaps.len() as f64,
        gaps.iter().copied().fold(f64::INFINITY, f64::min),
        gaps.iter().copied().fold(0.0, f64::max),
    );
}

/// A port that takes no more bytes (a pty whose master is never read fills up at about 20 KiB
/// on Linux 6.x): the query write times out, the session ends like a read error (`backoff`,
/// the timeout in `last_error`), and once the sensor reads again the device comes back and
/// its answers arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_the_port_cannot_take_times_out_ends_the_session_and_the_device_recovers() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let probe = dir.path().join("probe");
    let pty = PtyLink::create(&probe).unwrap();
    let extra = flooding_query("200ms");
    let mut gw = Gateway::start(dir.path(), &config(broker.port, &probe, &extra, None));

    let (m, skipped) =
        sub.wait_for(Duration::from_secs(20), |m| probe_state(m).is_some_and(|s| s["state"] == "backoff")).await;
    assert_eq!(m.json()["last_error"], "writing the query timed out after 200ms", "{}", m.text());
    assert!(!skipped.iter().any(|m| m.topic.ends_with("/probe/readings")), "nobody answered yet");
    let (stalled, _) = metrics_where(&mut sub, |m| n(&m["devices"]["probe"], "restarts") >= 1).await;
    let sent_before = n(&stalled["devices"]["probe"], "queries_sent");
    assert!(sent_before > 0, "queries went out until the buffer was full: {stalled}");

    // The sensor reads again, answering every query: the backlog, then the queries of the
    // reopened session.
    let (stop, stopped) = oneshot::channel();
    let answering = sensor(pty, u64::MAX, stopped);
    let (m, _) = metrics_where(&mut sub, |m| {
        let d = &m["devices"]["probe"];
        d["state"] == "up" && n(d, "queries_sent") > sent_before && n(d, "delivered") > 0
    })
    .await;
    let restarts = n(&m["devices"]["probe"], "restarts");
    // Up for good: a second of queries later, no further restart.
    let (later, skipped) = metrics_where(&mut sub, |l| {
        n(&l["devices"]["probe"], "queries_sent") >= n(&m["devices"]["probe"], "queries_sent") + 50
    })
    .await;
    let dev = &later["devices"]["probe"];
    assert_eq!(n(dev, "restarts"), restarts, "{dev}");
    assert_eq!(dev["state"], "up");
    assert!(!skipped.iter().any(|m| probe_state(m).is_some()), "no state change once it recovered");
    assert_eq!(n(&dev["rejected"], "total"), 0, "{dev}");
    eprintln!(
        "write timeout: {sent_before} queries ({} KiB) filled the pty; {restarts} restart(s) until it was read again",
        sent_before * 256 / 1024
    );

    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(10)).success());
    let _ = stop.send(());
    let (_pty, tally) = answering.await.unwrap();
    assert!(tally.answered > 0);
}

/// While a query waits for room on the port (the sensor does not read), the port is still
/// read: a reading the sensor sends meanwhile is delivered at once, in the same session,
/// not after the write timed out and the port was reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_is_read_while_a_query_waits_to_be_written() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let probe = dir.path().join("probe");
    let mut pty = PtyLink::create(&probe).unwrap();
    let extra = flooding_query("10s");
    let mut gw = Gateway::start(dir.path(), &config(broker.port, &probe, &extra, None));

    // Blocked: queries_sent has not moved for a second (a hundred ticks).
    let mut last = None;
    let stalled = loop {
        let (m, _) = metrics_where(&mut sub, |m| n(&m["devices"]["probe"], "queries_sent") > 0).await;
        let sent = n(&m["devices"]["probe"], "queries_sent");
        match last {
            Some((at, s)) if s == sent && std::time::Instant::now() - at >= Duration::from_secs(1) => break sent,
            Some((_, s)) if s == sent => {}
            _ => last = Some((std::time::Instant::now(), sent)),
        }
    };
    write_all(&mut pty.master, b"{\"n\":1}\n").await;
    let (reading, _) = sub.wait_for(Duration::from_secs(5), |m| m.topic.ends_with("/probe/readings")).await;
    assert_eq!(reading.json()["n"], 1);
    let (m, skipped) = metrics_where(&mut sub, |m| n(&m["devices"]["probe"], "delivered") == 1).await;
    let dev = &m["devices"]["probe"];
    assert_eq!(
        (n(dev, "queries_sent"), n(dev, "restarts")),
        (stalled, 0),
        "still the same session, write still waiting: {dev}"
    );
    assert_eq!(dev["state"], "up");
    assert!(!skipped.iter().any(|m| probe_state(m).is_some()), "no state change");
    eprintln!("read while blocked: {stalled} queries filled the pty; the reading was delivered in the same session");

    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(10)).success(), "a waiting write does not hold up the shutdown");
}
