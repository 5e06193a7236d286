//! spool-compare: the segmented log we plan for the spool against SQLite (WAL) and redb, on the
//! gateway's workload (issue 11, "Choosing the storage"). Standalone: not part of the workspace.
//!
//! Subcommands (the store is one of `log`, `log-1file`, `sqlite-normal`, `sqlite-full`, `redb`,
//! `redb-4mib-cache`):
//! - `report [--n N] [--data DIR] [--kill-trials K]`: runs everything below, each in its own
//!   process, and prints the Markdown table;
//! - `bench STORE DIR N`: spool N readings in batches of 1000, replay and ack them; prints key=value;
//! - `fill STORE DIR N [--clean]`: write N readings, then exit without closing (a crash after the
//!   last barrier) or, with `--clean`, close the store properly;
//! - `verify STORE DIR`: reopen, read everything, check every payload byte for byte, append a batch;
//! - `writer-loop STORE DIR`: append batches forever, printing each batch number once it is durable.

mod log;
mod measure;
mod report;
mod store;
mod workload;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use store::{Res, Store};
use workload::{BATCH, Batch, DEVICES};

pub const STORES: [&str; 6] = ["log", "log-1file", "sqlite-normal", "sqlite-full", "redb", "redb-4mib-cache"];

pub fn open_store(name: &str, dir: &Path) -> Res<Box<dyn Store>> {
    std::fs::create_dir_all(dir)?;
    Ok(match name {
        "log" => Box::new(log::Log::open(dir, DEVICES as usize)?),
        "log-1file" => Box::new(log::Log::open(dir, 1)?),
        "sqlite-normal" => Box::new(store::Sqlite::open(&dir.join("spool.db"), "NORMAL")?),
        "sqlite-full" => Box::new(store::Sqlite::open(&dir.join("spool.db"), "FULL")?),
        "redb" => Box::new(store::Redb::open(&dir.join("spool.redb"), None)?),
        "redb-4mib-cache" => Box::new(store::Redb::open(&dir.join("spool.redb"), Some(4 << 20))?),
        other => return Err(format!("unknown store {other:?}; one of {STORES:?}").into()),
    })
}

/// A syscall nothing else in this program makes: marks a phase boundary in an strace log.
fn strace_marker() {
    // SAFETY: getppid has no preconditions and cannot fail.
    unsafe { libc::getppid() };
}

fn bench(name: &str, dir: &Path, n: u64) -> Res<()> {
    let _ = std::fs::remove_dir_all(dir);
    let mut s = open_store(name, dir)?;
    strace_marker();
    let hwm_open = measure::vm_hwm_kib();
    let (wb0, cw0) = measure::io_write_bytes();
    let mut batch = Batch::default();
    let (mut cpu_w, mut payload_bytes, mut disk_peak) = (0.0, 0u64, 0u64);
    let wall = Instant::now();
    let batches = n.div_ceil(BATCH as u64);
    for b in 0..batches {
        let first = b * BATCH as u64;
        batch.generate(first, (n - first).min(BATCH as u64) as usize);
        payload_bytes += batch.bytes.len() as u64;
        // Only the store's work is timed: building the JSON readings is the same for all.
        let t = measure::cpu_seconds();
        s.append(&batch)?;
        cpu_w += measure::cpu_seconds() - t;
        if b % 50 == 49 {
            disk_peak = disk_peak.max(measure::disk_usage(dir));
        }
    }
    let wall_w = wall.elapsed().as_secs_f64();
    let fsyncs_w = s.fsyncs();
    disk_peak = disk_peak.max(measure::disk_usage(dir));
    let (wb1, cw1) = measure::io_write_bytes();
    strace_marker();
    let (mut cpu_r, mut replayed, mut chunks, mut order_errors) = (0.0, 0u64, 0u64, 0u64);
    let mut last = [None::<u64>; DEVICES as usize];
    let wall = Instant::now();
    loop {
        let t = measure::cpu_seconds();
        s.read_chunk(BATCH, &mut batch)?;
        if batch.is_empty() {
            s.finish()?;
            cpu_r += measure::cpu_seconds() - t;
            break;
        }
        s.ack()?;
        cpu_r += measure::cpu_seconds() - t;
        for r in &batch.recs {
            let d = workload::device_of(r.i);
            if last[d].is_some_and(|l| l >= r.i) {
                order_errors += 1;
            }
            last[d] = Some(r.i);
        }
        replayed += batch.len() as u64;
        chunks += 1;
        if chunks % 50 == 0 {
            disk_peak = disk_peak.max(measure::disk_usage(dir));
        }
    }
    let wall_r = wall.elapsed().as_secs_f64();
    let (wb2, cw2) = measure::io_write_bytes();
    let disk_end = measure::disk_usage(dir);
    let out = [
        ("n", n.to_string()),
        ("batches", batches.to_string()),
        ("chunks", chunks.to_string()),
        ("payload_bytes", payload_bytes.to_string()),
        ("write_bytes_spool", (wb1 - wb0).to_string()),
        ("write_bytes_replay", (wb2 - wb1).to_string()),
        ("cancelled_write_bytes", (cw2 - cw0).to_string()),
        ("cancelled_spool", (cw1 - cw0).to_string()),
        ("cpu_spool_s", format!("{cpu_w:.4}")),
        ("cpu_replay_s", format!("{cpu_r:.4}")),
        ("wall_spool_s", format!("{wall_w:.3}")),
        ("wall_replay_s", format!("{wall_r:.3}")),
        ("hwm_open_kib", hwm_open.to_string()),
        ("hwm_kib", measure::vm_hwm_kib().to_string()),
        ("disk_peak_bytes", disk_peak.to_string()),
        ("disk_end_bytes", disk_end.to_string()),
        ("own_fsyncs_spool", fsyncs_w.map_or("-".into(), |f| f.to_string())),
        ("own_fsyncs_total", s.fsyncs().map_or("-".into(), |f| f.to_string())),
        ("replayed", replayed.to_string()),
        ("order_errors", order_errors.to_string()),
        ("corrupt", s.corrupt().to_string()),
    ];
    let mut o = std::io::stdout().lock();
    for (k, v) in out {
        writeln!(o, "{k}={v}")?;
    }
    drop(s);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

fn fill(name: &str, dir: &Path, n: u64, clean: bool) -> Res<()> {
    let _ = std::fs::remove_dir_all(dir);
    let mut s = open_store(name, dir)?;
    let mut batch = Batch::default();
    for first in (0..n).step_by(BATCH) {
        batch.generate(first, (n - first).min(BATCH as u64) as usize);
        s.append(&batch)?;
    }
    if clean {
        drop(s);
    } else {
        // Exit without closing: what the process leaves on disk when it dies after the last
        // barrier (for SQLite the WAL is not checkpointed; for redb the file is not marked clean).
        std::process::exit(0);
    }
    Ok(())
}

fn verify(name: &str, dir: &Path) -> Res<()> {
    let mut o = std::io::stdout().lock();
    let mut s = match open_store(name, dir) {
        Ok(s) => s,
        Err(e) => {
            writeln!(o, "opened=no\nerror={}", one_line(&e.to_string()))?;
            return Ok(());
        }
    };
    writeln!(o, "opened=yes")?;
    let (mut readable, mut intact, mut bad, mut disorder) = (0u64, 0u64, 0u64, 0u64);
    let mut last = [None::<u64>; DEVICES as usize];
    let mut batch = Batch::default();
    let mut expected = Vec::new();
    let read_error = loop {
        match s.read_chunk(BATCH, &mut batch) {
            Err(e) => break Some(e.to_string()),
            Ok(()) if batch.is_empty() => break None,
            Ok(()) => {}
        }
        for r in &batch.recs {
            readable += 1;
            expected.clear();
            workload::payload(r.i, &mut expected);
            if batch.payload(r) == expected.as_slice() {
                intact += 1;
            } else {
                bad += 1;
            }
            let d = workload::device_of(r.i);
            if last[d].is_some_and(|l| l >= r.i) {
                disorder += 1;
            }
            last[d] = Some(r.i);
        }
    };
    writeln!(o, "readable={readable}\nintact={intact}\nbad_payloads={bad}\ndisorder={disorder}")?;
    writeln!(o, "corrupt_counted={}", s.corrupt())?;
    if let Some(e) = read_error {
        writeln!(o, "read_error={}", one_line(&e))?;
    }
    // Can the store take new readings after the damage? (ids far above the filled ones)
    batch.generate(1 << 40, BATCH);
    match s.append(&batch) {
        Ok(()) => writeln!(o, "writable=yes")?,
        Err(e) => writeln!(o, "writable=no\nwrite_error={}", one_line(&e.to_string()))?,
    }
    Ok(())
}

fn writer_loop(name: &str, dir: &Path) -> Res<()> {
    let _ = std::fs::remove_dir_all(dir);
    let mut s = open_store(name, dir)?;
    let mut batch = Batch::default();
    let mut o = std::io::stdout().lock();
    for b in 0u64.. {
        batch.generate(b * BATCH as u64, BATCH);
        s.append(&batch)?;
        writeln!(o, "{b}")?;
        o.flush()?;
    }
    Ok(())
}

pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |k: usize| args.get(k).map(String::as_str).unwrap_or("");
    let num = |k: usize| -> u64 { a(k).parse().unwrap_or_else(|_| usage()) };
    let result = match a(0) {
        "bench" => bench(a(1), &PathBuf::from(a(2)), num(3)),
        "fill" => fill(a(1), &PathBuf::from(a(2)), num(3), a(4) == "--clean"),
        "verify" => verify(a(1), &PathBuf::from(a(2))),
        "writer-loop" => writer_loop(a(1), &PathBuf::from(a(2))),
        "report" => report::run(&args[1..]),
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("spool-compare: {e}");
        std::process::exit(1);
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: spool-compare report [--n N] [--data DIR] [--kill-trials K] [--stores a,b]\n\
         \x20      spool-compare bench STORE DIR N | fill STORE DIR N [--clean] | verify STORE DIR | writer-loop STORE DIR\n\
         stores: {STORES:?}"
    );
    std::process::exit(2);
}
