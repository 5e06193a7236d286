use std::fs;
use std::sync::Arc;

use bytes::Bytes;

use super::log::{DeviceLog, Loaded};
use super::*;
use crate::queue::{LaneStats, Outbound, ReadingQueue};

fn payload(n: u32) -> String {
    format!("{{\"n\":{n},\"_gw\":{{\"device\":\"d\"}}}}")
}

fn append(log: &mut DeviceLog, from: u32, to: u32) {
    let ps: Vec<String> = (from..to).map(payload).collect();
    log.append(ps.iter().enumerate().map(|(i, p)| (i as u64, p.as_bytes()))).expect("append");
}

fn load_all(log: &mut DeviceLog) -> (Vec<Loaded>, u64) {
    let mut out = Vec::new();
    let corrupt = log.load(usize::MAX, &mut out).expect("load");
    (out, corrupt)
}

fn numbers(loaded: &[Loaded]) -> Vec<u32> {
    loaded
        .iter()
        .map(|l| {
            let s = std::str::from_utf8(&l.payload).unwrap();
            s[5..s.find(',').unwrap()].parse().unwrap()
        })
        .collect()
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

#[test]
fn records_come_back_in_order_across_segments_and_delivered_segments_are_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, rec) = DeviceLog::open(tmp.path(), 16 * 1024).unwrap();
    assert_eq!(rec, log::Recovered::default());
    append(&mut log, 0, 1000);
    assert!(segments(tmp.path()).len() >= 3, "{:?}", segments(tmp.path()));
    let (loaded, corrupt) = load_all(&mut log);
    assert_eq!(corrupt, 0);
    assert_eq!(numbers(&loaded), (0..1000).collect::<Vec<_>>());
    // Resolved out of order: nothing is deleted until the oldest is.
    for l in loaded.iter().skip(1) {
        log.resolve(l.end).unwrap();
    }
    assert!(!log.is_empty());
    log.resolve(loaded[0].end).unwrap();
    assert!(log.is_empty());
    assert_eq!(segments(tmp.path()), Vec::<PathBuf>::new());
    assert_eq!(log.bytes(), 0);
}

#[test]
fn a_restart_resumes_after_the_delivered_and_counts_the_loaded_as_possibly_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = DeviceLog::open(tmp.path(), 1 << 20).unwrap();
    append(&mut log, 0, 100);
    let mut out = Vec::new();
    log.load(60, &mut out).unwrap();
    for l in &out[..50] {
        log.resolve(l.end).unwrap();
    }
    assert!(log.write_cursor().unwrap());
    drop(log);
    let (mut log, rec) = DeviceLog::open(tmp.path(), 1 << 20).unwrap();
    assert_eq!(rec, log::Recovered { readings: 50, maybe_sent: 10, corrupt: 0 });
    let (loaded, _) = load_all(&mut log);
    assert_eq!(numbers(&loaded), (50..100).collect::<Vec<_>>());
}

#[test]
fn a_torn_tail_is_cut_off_counted_and_appending_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = DeviceLog::open(tmp.path(), 1 << 20).unwrap();
    append(&mut log, 0, 10);
    drop(log);
    let seg = segments(tmp.path()).pop().unwrap();
    let len = fs::metadata(&seg).unwrap().len();
    fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 5).unwrap();
    let (mut log, rec) = DeviceLog::open(tmp.path(), 1 << 20).unwrap();
    assert_eq!((rec.readings, rec.corrupt), (9, 1));
    append(&mut log, 10, 20);
    let (loaded, corrupt) = load_all(&mut log);
    assert_eq!(corrupt, 0);
    assert_eq!(numbers(&loaded), (0..9).chain(10..20).collect::<Vec<_>>());
}

#[test]
fn a_flipped_byte_costs_its_record_only() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = DeviceLog::open(tmp.path(), 1 << 20).unwrap();
    append(&mut log, 0, 100);
    drop(log);
    let seg = segments(tmp.path()).pop().unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    let rec_len = record::encoded_len(payload(50).len());
    // Record 50's payload (records 0..9 and 10..99 differ in length by one digit).
    let at = 8 + 10 * record::encoded_len(payload(0).len()) + 40 * rec_len + rec_len / 2;
    bytes[at] ^= 0x20;
    fs::write(&seg, &bytes).unwrap();
    let (mut log, rec) = DeviceLog::open(tmp.path(), 1 << 20).unwrap();
    assert_eq!((rec.readings, rec.corrupt), (99, 1));
    let (loaded, corrupt) = load_all(&mut log);
    assert_eq!(corrupt, 0, "counted once, when the log was opened");
    assert_eq!(numbers(&loaded), (0..50).chain(51..100).collect::<Vec<_>>());
}

#[test]
fn foreign_files_and_a_damaged_cursor_are_counted_never_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = DeviceLog::open(tmp.path(), 1 << 20).unwrap();
    append(&mut log, 0, 5);
    log.write_cursor().unwrap();
    drop(log);
    fs::write(tmp.path().join("notes.txt"), "hello").unwrap();
    fs::write(tmp.path().join("00000000000000000099.seg"), "not a segment").unwrap();
    fs::write(tmp.path().join("cursor"), "garbage").unwrap();
    let (mut log, rec) = DeviceLog::open(tmp.path(), 1 << 20).unwrap();
    // The stray file, the segment without a header (removed), the cursor.
    assert_eq!((rec.readings, rec.corrupt), (5, 3));
    assert!(!tmp.path().join("00000000000000000099.seg").exists());
    assert!(tmp.path().join("notes.txt").exists());
    assert_eq!(numbers(&load_all(&mut log).0), vec![0, 1, 2, 3, 4]);
}

#[test]
fn dropping_the_oldest_segment_counts_only_what_was_never_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = DeviceLog::open(tmp.path(), 16 * 1024).unwrap();
    append(&mut log, 0, 1000);
    let mut out = Vec::new();
    log.load(10, &mut out).unwrap();
    let before = log.unread();
    let dropped = log.drop_oldest().unwrap();
    assert!(dropped > 0);
    assert_eq!(log.unread(), before - dropped);
    // The loaded ten are still resolvable; the rest continues with the next segment.
    for l in &out {
        log.resolve(l.end).unwrap();
    }
    let (rest, _) = load_all(&mut log);
    assert_eq!(rest.len() as u64, before - dropped);
    let first = numbers(&rest)[0];
    assert_eq!(first as u64, 10 + dropped);
}

fn spool_for(dir: &Path, queue: &Arc<ReadingQueue>, max_bytes: u64) -> Arc<Spool> {
    let settings = Settings {
        dir: dir.to_path_buf(),
        max_bytes,
        // Every round commits (and sweeps while the broker is away).
        sync_interval: Duration::ZERO,
        one_stream: false,
        devices: 1,
    };
    let spool = Spool::new(settings, Arc::clone(queue));
    spool.recover();
    spool
}

fn identity(s: LaneStats) {
    assert_eq!(
        s.readings + s.restored,
        s.delivered + s.dropped_oldest + s.expired + s.poisoned + s.queued + s.in_flight + s.spooled,
        "{s:?}"
    );
}

/// Pops and acknowledges (QoS 0) everything the queue hands out.
fn deliver_all(q: &ReadingQueue) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    while let Some(o) = q.pop_next() {
        let Outbound::Reading { payload, replayed, .. } = o else { continue };
        q.on_published(0);
        out.push((replayed, String::from_utf8(payload.to_vec()).unwrap()));
    }
    out
}

#[test]
fn what_the_memory_bound_would_drop_is_spooled_and_replayed_marked_after_live_readings() {
    let tmp = tempfile::tempdir().unwrap();
    let q = Arc::new(ReadingQueue::new(1, 10, 1 << 20, None, 10));
    let spool = spool_for(tmp.path(), &q, 1 << 20);
    q.set_link_up(true);
    for n in 0..30 {
        q.push(0, Bytes::from(payload(n)));
    }
    let s = q.stats()[0];
    assert_eq!((s.queued, s.spooled, s.dropped_oldest), (10, 20, 0));
    identity(s);
    spool.step(false);
    // Live first (20..30), then the spooled 0..20 marked as replayed.
    let out = deliver_all(&q);
    assert_eq!(out.len(), 30);
    assert!(out[..10].iter().all(|(r, _)| !r));
    assert_eq!(out[10].1, "{\"n\":0,\"_gw\":{\"device\":\"d\",\"replayed\":true}}");
    assert!(out[10..].iter().all(|(r, _)| *r));
    let s = q.stats()[0];
    assert_eq!((s.delivered, s.spooled), (30, 0));
    identity(s);
    spool.step(false);
    assert_eq!(spool.stats.bytes.load(Relaxed), 0, "delivered segments are deleted");
    assert!(spool.stats.fsyncs.load(Relaxed) > 0);
}

#[test]
fn while_the_broker_is_away_everything_goes_to_disk_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let q = Arc::new(ReadingQueue::new(1, 1000, 1 << 20, None, 10));
    let spool = spool_for(tmp.path(), &q, 1 << 20);
    for n in 0..50 {
        q.push(0, Bytes::from(payload(n)));
    }
    spool.step(false);
    let s = q.stats()[0];
    assert_eq!((s.queued, s.spooled), (0, 50));
    // A restart: a new queue and spool find the fifty.
    drop(spool);
    let q2 = Arc::new(ReadingQueue::new(0, 1000, 1 << 20, None, 10));
    let spool2 = spool_for(tmp.path(), &q2, 1 << 20);
    let s = q2.stats()[0];
    assert_eq!((s.restored, s.spooled), (50, 50));
    q2.set_link_up(true);
    let out = deliver_all(&q2);
    assert_eq!(out.len(), 50);
    identity(q2.stats()[0]);
    spool2.step(false);
    assert_eq!(q2.stats()[0].spooled, 0, "readings in the spool are the lanes' spooled");
}

#[test]
fn a_spool_that_cannot_write_falls_back_to_memory_and_counts_drops() {
    let tmp = tempfile::tempdir().unwrap();
    let q = Arc::new(ReadingQueue::new(0, 5, 1 << 20, None, 10));
    let lane = q.add_lane("dev");
    // A file where the device's directory would go.
    fs::write(tmp.path().join("dev"), "in the way").unwrap();
    let spool = spool_for(tmp.path(), &q, 1 << 20);
    q.set_link_up(true);
    for n in 0..20 {
        q.push(lane, Bytes::from(payload(n)));
    }
    spool.step(false);
    assert_eq!(spool.stats.write_errors.load(Relaxed), 1);
    assert!(spool.stats.error().is_some());
    for n in 20..30 {
        q.push(lane, Bytes::from(payload(n)));
    }
    let s = q.stats()[lane];
    assert_eq!((s.queued, s.spooled), (5, 0));
    assert_eq!(s.dropped_oldest, 25);
    identity(s);
}

#[test]
fn the_disk_bound_drops_the_oldest_of_the_device_holding_the_most() {
    let tmp = tempfile::tempdir().unwrap();
    let q = Arc::new(ReadingQueue::new(0, 100_000, 64 << 20, None, 10));
    let (a, b) = (q.add_lane("a"), q.add_lane("b"));
    let spool = spool_for(tmp.path(), &q, 64 * 1024);
    for n in 0..3000 {
        q.push(a, Bytes::from(payload(n)));
        if n % 15 == 0 {
            q.push(b, Bytes::from(payload(n)));
        }
        if n % 500 == 0 {
            spool.step(false);
        }
    }
    spool.step(false);
    let (sa, sb) = (q.stats()[a], q.stats()[b]);
    assert!(sa.dropped_oldest > 1000, "{sa:?}");
    assert_eq!(sb.dropped_oldest, 0, "{sb:?}");
    assert_eq!(sb.spooled, 200);
    identity(sa);
    identity(sb);
    assert!(spool.stats.bytes.load(Relaxed) <= 64 * 1024, "{}", spool.stats.bytes.load(Relaxed));
    // What is left of the flooding device is its newest readings, in order; all of the other's.
    q.set_link_up(true);
    let mut got: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..100 {
        spool.step(false);
        while let Some(o) = q.pop_next() {
            let Outbound::Reading { device, payload, .. } = o else { continue };
            q.on_published(0);
            let s = std::str::from_utf8(&payload).unwrap();
            got[device].push(s[5..s.find(',').unwrap()].parse().unwrap());
        }
        if q.stats().iter().all(|s| s.spooled == 0) {
            break;
        }
    }
    assert_eq!(got[b].len(), 200);
    assert_eq!(got[a].len() as u64, sa.spooled);
    assert!(got[a].windows(2).all(|w| w[0] < w[1]) && got[a].last() == Some(&2999), "{:?}", got[a]);
    identity(q.stats()[a]);
}

#[test]
fn spooled_readings_older_than_max_age_expire_counted_and_leave_the_spool() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = DeviceLog::open(&tmp.path().join("old"), 1 << 20).unwrap();
    let old_us = crate::telemetry::now_us() - 10_000_000;
    let ps: Vec<String> = (0..20).map(payload).collect();
    log.append(ps.iter().map(|p| (old_us, p.as_bytes()))).unwrap();
    drop(log);
    let q = Arc::new(ReadingQueue::new(0, 1000, 1 << 20, Some(Duration::from_secs(1)), 10));
    let spool = spool_for(tmp.path(), &q, 1 << 20);
    q.set_link_up(true);
    assert!(q.pop_next().is_none(), "ten seconds old, max_age one second");
    let s = q.stats()[0];
    assert_eq!((s.restored, s.expired, s.spooled, s.delivered), (20, 20, 0, 0));
    identity(s);
    spool.step(false);
    assert_eq!(spool.stats.bytes.load(Relaxed), 0, "expired readings leave the spool too");
}

#[test]
fn one_stream_holds_live_readings_until_the_spool_has_counted_what_it_holds() {
    let q = ReadingQueue::new(1, 100, 1 << 20, None, 10);
    q.enable_spool(1 << 20, true, Arc::default());
    q.push(0, Bytes::from(payload(600)));
    // A restored reading not yet counted could otherwise be overtaken by this live one.
    assert!(q.pop_next().is_none());
    q.spool_recovered();
    assert!(matches!(q.pop_next(), Some(Outbound::Reading { replayed: false, .. })));
}
