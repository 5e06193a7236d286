//! Log floods, end to end (real binary, real mosquitto, a pseudo-terminal): a sensor sending
//! nothing but garbage (e.g. at the wrong baud rate) costs a handful of log lines per reason,
//! the last saying how many were not written, while the metrics count every frame exactly.

mod common;

use std::time::Duration;

use common::{json_lines, n, write_all, Gateway, Mosquitto, Rng, Subscriber};
use sensorgate::simulate::PtyLink;

/// Garbage lines per reason.
const EACH: u64 = 10_000;

/// Line `i`: invalid UTF-8 when even, printable ASCII that is not JSON when odd; never a blank
/// line (no `\r`, no `\n` inside).
fn garbage(rng: &mut Rng, i: u64) -> Vec<u8> {
    let mut line = if i % 2 == 0 { vec![0xff] } else { vec![b'~'] };
    for _ in 0..rng.below(30) {
        let b = if i % 2 == 0 { (rng.next() >> 56) as u8 } else { b' ' + rng.below(95) as u8 };
        line.push(if b == b'\n' || b == b'\r' { b'?' } else { b });
    }
    line.push(b'\n');
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_bad_frames_make_a_handful_of_log_lines_and_exact_counts() {
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let g = dir.path().join("g");
    let mut pty = PtyLink::create(&g).unwrap();
    let text = format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"100ms\"\n[mqtt]\nport = {}\n\
         [[device]]\nname = \"g\"\npath = \"{}\"\nframing = \"lines\"\n",
        broker.port,
        g.display()
    );
    let mut gw = Gateway::start_with_args(dir.path(), &text, &["--log-format", "json"]);
    sub.wait_for(Duration::from_secs(5), |m| m.topic == "sensorgate/it/devices/g/state" && m.json()["state"] == "up")
        .await;

    let mut rng = Rng(0x5eed);
    let bytes: Vec<u8> = (0..2 * EACH).flat_map(|i| garbage(&mut rng, i)).collect();
    write_all(&mut pty.master, &bytes).await;
    // A good reading after the flood still goes through.
    write_all(&mut pty.master, &json_lines(7..8)).await;
    let (m, _) = sub
        .wait_for(Duration::from_secs(20), |m| {
            m.topic == "sensorgate/it/metrics" && n(&m.json()["devices"]["g"], "delivered") == 1
        })
        .await;
    let d = &m.json()["devices"]["g"];
    common::assert_identities(d);
    assert_eq!(n(&d["rejected"], "total"), 2 * EACH, "{d}");
    assert_eq!((n(&d["rejected"], "bad_utf8"), n(&d["rejected"], "bad_json")), (EACH, EACH), "{d}");

    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(10)).success());
    let lines: Vec<serde_json::Value> = gw
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["fields"].clone())
        .filter(|f| f["reason"].is_string())
        .collect();
    for reason in ["bad_utf8", "bad_json"] {
        let of: Vec<_> = lines.iter().filter(|f| f["reason"] == reason).collect();
        // A burst of 3, then one line per 10 s (the flood takes a few seconds at most), then
        // the summary when the session ends.
        assert!((4..=6).contains(&of.len()), "{reason}: {} lines; the last: {:?}", of.len(), of.last());
        let frames = of.iter().filter(|f| f["message"].as_str().unwrap().starts_with("Discarding frame:")).count();
        let suppressed: u64 = of.iter().map(|f| f["suppressed"].as_u64().unwrap()).sum();
        assert_eq!(frames as u64 + suppressed, EACH, "{reason}: every frame has a line or is counted in one: {of:?}");
        let last = of.last().unwrap();
        assert!(last["message"].as_str().unwrap().starts_with("Frames discarded since the last line"), "{last}");
        assert!(n(last, "suppressed") > 0, "{reason}: the last line sums up: {of:?}");
    }
    assert_eq!(lines.len(), lines.iter().filter(|f| f["reason"] == "bad_utf8" || f["reason"] == "bad_json").count());
    eprintln!("{} reject lines for {} rejected frames", lines.len(), 2 * EACH);
    drop(pty);
}
