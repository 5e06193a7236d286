//! Runs every measurement in its own process (so peak RSS is per store) and prints the table.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::store::Res;
use crate::{STORES, log, one_line, workload};

type Kv = HashMap<String, String>;

const FILL: u64 = 10_000;
const VERIFY_TIMEOUT: Duration = Duration::from_secs(120);

struct Opts {
    n: u64,
    data: PathBuf,
    kill_trials: u32,
    stores: Vec<String>,
}

fn parse(args: &[String]) -> Res<Opts> {
    let mut o = Opts {
        n: 1_000_000,
        data: PathBuf::from("data"),
        kill_trials: 5,
        stores: STORES.iter().map(|s| s.to_string()).collect(),
    };
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--n" => o.n = v.parse()?,
            "--data" => o.data = PathBuf::from(v),
            "--kill-trials" => o.kill_trials = v.parse()?,
            "--stores" => o.stores = v.split(',').map(str::to_string).collect(),
            _ => return Err(format!("unknown option {k}").into()),
        }
    }
    Ok(o)
}

fn exe() -> PathBuf {
    std::env::current_exe().expect("the running program has a path")
}

fn kv(text: &str) -> Kv {
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn get(m: &Kv, k: &str) -> f64 {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

/// Runs a child with a deadline; returns stdout and a description of how it ended when not 0.
fn run_child(mut cmd: Command, timeout: Duration) -> Res<(String, Option<String>)> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    // The child is waited for on its own thread, so the deadline is a channel timeout.
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(timeout) {
        Ok(st) => Some(st?),
        Err(_) => {
            // SAFETY: the child is not reaped until the waiter thread's wait() returns, so the
            // pid still names our child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            None
        }
    };
    let _ = waiter.join();
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    let last_err = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").to_string();
    let how = match status {
        None => Some(format!("did not finish within {} s (hangs)", timeout.as_secs())),
        Some(st) if st.success() => None,
        Some(st) if st.code() == Some(101) => Some(format!("panicked: {}", one_line(&last_err))),
        Some(st) => Some(format!("exited {st}: {}", one_line(&last_err))),
    };
    Ok((stdout, how))
}

fn bench_once(store: &str, dir: &Path, n: u64) -> Res<Kv> {
    let mut c = Command::new(exe());
    c.args(["bench", store]).arg(dir).arg(n.to_string());
    let (out, how) = run_child(c, Duration::from_secs(3600))?;
    if let Some(h) = how {
        return Err(format!("bench {store}: {h}").into());
    }
    Ok(kv(&out))
}

/// Counts fsync-class calls per phase (open / spool / replay) under strace, split at the markers.
fn strace_counts(store: &str, dir: &Path, n: u64) -> Res<[u64; 3]> {
    let log = dir.with_extension("strace");
    let mut c = Command::new("strace");
    c.args(["-f", "-qq", "-o"]).arg(&log);
    c.args(["-e", "trace=fsync,fdatasync,sync_file_range,msync,syncfs,sync,getppid"]);
    c.arg(exe()).args(["bench", store]).arg(dir).arg(n.to_string());
    let (_, how) = run_child(c, Duration::from_secs(3600))?;
    if let Some(h) = how {
        return Err(format!("strace bench {store}: {h}").into());
    }
    let text = fs::read_to_string(&log)?;
    fs::remove_file(&log)?;
    let mut counts = [0u64; 3];
    let mut phase = 0;
    for line in text.lines() {
        if line.contains("resumed>") {
            continue;
        }
        if line.contains("getppid(") {
            phase = (phase + 1).min(2);
        } else if ["fsync(", "fdatasync(", "sync_file_range(", "msync(", "syncfs(", "sync("]
            .iter()
            .any(|s| line.contains(s))
        {
            counts[phase] += 1;
        }
    }
    Ok(counts)
}

/// The file a damage scenario hits, by store.
fn target(store: &str, dir: &Path, which: Target) -> Res<PathBuf> {
    Ok(match store {
        "log" | "log-1file" => log::last_segment(dir, which == Target::Tail)?,
        "redb" | "redb-4mib-cache" => dir.join("spool.redb"),
        _ => {
            let wal = dir.join("spool.db-wal");
            let db = dir.join("spool.db");
            match which {
                Target::DbFile => db,
                _ if fs::metadata(&wal).map(|m| m.len() > 0).unwrap_or(false) => wal,
                _ => db,
            }
        }
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Tail,
    Data,
    DbFile,
}

#[derive(Clone, Copy)]
enum Damage {
    /// A power cut in the middle of the last write: the log loses half its last record; the
    /// embedded stores the second half of the last 4 KiB page of the file they wrote last.
    TornTail,
    /// A torn write that kept the file's length: the same bytes as `TornTail` read back as zeros
    /// (blocks allocated and sized, data never written).
    ZeroTail,
    /// The last 8 KiB of the file are gone.
    Truncate8k,
    /// One byte of a stored payload, the one nearest the middle of the file, is inverted (a
    /// bit rot in the data, not in free space).
    Flip,
}

fn damage(store: &str, dir: &Path, d: Damage, which: Target) -> Res<String> {
    let path = target(store, dir, which)?;
    let f = OpenOptions::new().read(true).write(true).open(&path)?;
    let len = f.metadata()?.len();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let torn_from = || -> Res<u64> {
        Ok(if store.starts_with("log") {
            let (off, l) = *log::record_offsets(&path)?.last().ok_or("empty segment")?;
            off + l / 2
        } else {
            len - 2048
        })
    };
    Ok(match d {
        Damage::TornTail => {
            let cut = torn_from()?;
            f.set_len(cut)?;
            format!("{name} {len} -> {cut} bytes")
        }
        Damage::ZeroTail => {
            let from = torn_from()?;
            f.write_all_at(&vec![0u8; (len - from) as usize], from)?;
            format!("{name} bytes {from}..{len} zeroed")
        }
        Damage::Truncate8k => {
            let cut = len.saturating_sub(8192);
            f.set_len(cut)?;
            format!("{name} {len} -> {cut} bytes")
        }
        Damage::Flip => {
            let data = fs::read(&path)?;
            let needle = b"\"_gw\":{";
            let at = data
                .windows(needle.len())
                .enumerate()
                .filter(|(_, w)| *w == needle)
                .map(|(p, _)| p as u64 + 2)
                .min_by_key(|p| p.abs_diff(len / 2))
                .unwrap_or(len / 2);
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at)?;
            f.write_all_at(&[!b[0]], at)?;
            format!("{name} byte {at} of {len} inverted")
        }
    })
}

fn verify(store: &str, dir: &Path) -> Res<(Kv, Option<String>)> {
    let mut c = Command::new(exe());
    c.args(["verify", store]).arg(dir);
    let (out, how) = run_child(c, VERIFY_TIMEOUT)?;
    Ok((kv(&out), how))
}

/// One table cell from a verify run, `expected` the readings known durable before the damage.
fn describe(m: &Kv, how: &Option<String>, expected: u64) -> String {
    if let Some(h) = how {
        let got = m.get("readable").map(|r| format!(" after {r} read")).unwrap_or_default();
        return format!("**{h}**{got}");
    }
    if m.get("opened").map(String::as_str) != Some("yes") {
        return format!("**does not open**: {}", m.get("error").map(String::as_str).unwrap_or("?"));
    }
    let intact = get(m, "intact") as u64;
    let mut s = format!("opens; {intact}/{expected} intact");
    let bad = get(m, "bad_payloads") as u64;
    if bad > 0 {
        s += &format!(", **{bad} corrupt payloads delivered**");
    }
    let dis = get(m, "disorder") as u64;
    if dis > 0 {
        s += &format!(", **{dis} out of order**");
    }
    let c = get(m, "corrupt_counted") as u64;
    if c > 0 {
        s += &format!(", {c} corrupt counted");
    }
    if let Some(e) = m.get("read_error") {
        s += &format!(", **read error**: {e}");
    }
    match m.get("writable").map(String::as_str) {
        Some("yes") => s += "; writable",
        _ => s += &format!("; **not writable**: {}", m.get("write_error").map(String::as_str).unwrap_or("?")),
    }
    s
}

fn scenario(store: &str, root: &Path, d: Damage, which: Target, clean: bool) -> Res<String> {
    let dir = root.join(format!("recover-{store}"));
    let mut c = Command::new(exe());
    c.args(["fill", store]).arg(&dir).arg(FILL.to_string());
    if clean {
        c.arg("--clean");
    }
    if let (_, Some(h)) = run_child(c, VERIFY_TIMEOUT)? {
        return Err(format!("fill {store}: {h}").into());
    }
    let what = damage(store, &dir, d, which)?;
    let (m, how) = verify(store, &dir)?;
    let _ = fs::remove_dir_all(&dir);
    Ok(format!("{} ({what})", describe(&m, &how, FILL)))
}

/// kill -9 of a writer looping over batches after `delay`; returns (acked readings, verify result).
fn kill_trial(store: &str, root: &Path, delay: Duration) -> Res<(u64, Kv, Option<String>)> {
    let dir = root.join(format!("kill-{store}"));
    let mut child = Command::new(exe())
        .args(["writer-loop", store])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let last = Arc::new(AtomicI64::new(-1));
    let out = child.stdout.take().expect("piped");
    let seen = Arc::clone(&last);
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(b) = line.trim().parse() {
                seen.store(b, Ordering::SeqCst);
            }
        }
    });
    // The delay is the point of the trial: the kill lands wherever the writer happens to be.
    #[allow(clippy::disallowed_methods)] // no async runtime in this program
    std::thread::sleep(delay);
    child.kill()?; // SIGKILL
    child.wait()?;
    let _ = reader.join();
    let acked = (last.load(Ordering::SeqCst) + 1) as u64 * workload::BATCH as u64;
    let (m, how) = verify(store, &dir)?;
    let _ = fs::remove_dir_all(&dir);
    Ok((acked, m, how))
}

fn kill_summary(store: &str, root: &Path, trials: u32) -> Res<String> {
    let (mut ok, mut lost, mut extra, mut bad, mut notes) = (0, 0u64, 0u64, 0u64, Vec::new());
    let mut trials_seen = Vec::new();
    for t in 0..trials {
        let delay = Duration::from_millis(300 + 150 * u64::from(t));
        let (acked, m, how) = kill_trial(store, root, delay)?;
        let intact = get(&m, "intact") as u64;
        trials_seen.push(format!("{acked}/{intact}"));
        if how.is_some() || m.get("opened").map(String::as_str) != Some("yes") || m.contains_key("read_error") {
            notes.push(describe(&m, &how, acked));
            continue;
        }
        ok += 1;
        lost += acked.saturating_sub(intact);
        extra = extra.max(intact.saturating_sub(acked));
        bad += get(&m, "bad_payloads") as u64 + get(&m, "disorder") as u64;
    }
    let mut s = format!(
        "{ok}/{trials} open; acked readings lost: {lost}; readings of the unacked batch found: ≤ {extra}; corrupt/out of order: {bad} (acked/intact per trial: {})",
        trials_seen.join(", ")
    );
    for n in notes {
        s += &format!("; {n}");
    }
    Ok(s)
}

pub fn run(args: &[String]) -> Res<()> {
    let o = parse(args)?;
    fs::create_dir_all(&o.data)?;
    let mut rows = Vec::new();
    let mut raw = Vec::new();
    let mut recovery = Vec::new();
    for store in &o.stores {
        eprintln!("{store}: bench");
        let dir = o.data.join(format!("bench-{store}"));
        let m = bench_once(store, &dir, o.n)?;
        eprintln!("{store}: bench under strace");
        let sc = strace_counts(store, &dir, o.n)?;
        let payload = get(&m, "payload_bytes");
        let wbs = get(&m, "write_bytes_spool");
        let wbr = get(&m, "write_bytes_replay");
        let per100k = 100_000.0 / o.n as f64;
        let batches = get(&m, "batches");
        let chunks = get(&m, "chunks");
        rows.push(format!(
            "| {store} | {:.2} | {:.2} | {:.2} ({}) | {:.2} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} / {:.1} |",
            wbs / payload,
            (wbs + wbr) / payload,
            sc[1] as f64 / batches,
            m.get("own_fsyncs_spool").map(String::as_str).unwrap_or("-"),
            sc[2] as f64 / chunks,
            get(&m, "cpu_spool_s") * per100k,
            get(&m, "cpu_replay_s") * per100k,
            get(&m, "hwm_kib") / 1024.0,
            get(&m, "disk_peak_bytes") / 1048576.0,
            get(&m, "wall_spool_s"),
            get(&m, "wall_replay_s"),
        ));
        let mut keys: Vec<_> = m.iter().collect();
        keys.sort();
        raw.push(format!(
            "{store}: {} strace_fsyncs_open={} strace_fsyncs_spool={} strace_fsyncs_replay={}",
            keys.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "),
            sc[0],
            sc[1],
            sc[2]
        ));
        eprintln!("{store}: recovery");
        let mut cells = vec![
            scenario(store, &o.data, Damage::TornTail, Target::Tail, false)?,
            scenario(store, &o.data, Damage::ZeroTail, Target::Tail, false)?,
            scenario(store, &o.data, Damage::Flip, Target::Data, false)?,
            scenario(store, &o.data, Damage::Truncate8k, Target::Data, false)?,
        ];
        if !store.starts_with("log") {
            // After a clean close SQLite's data lives in the main file, and redb skips its repair
            // pass (the one that checks every checksum): damage that state too.
            cells[2] +=
                &format!("; after a clean close: {}", scenario(store, &o.data, Damage::Flip, Target::DbFile, true)?);
            cells[3] += &format!(
                "; after a clean close: {}",
                scenario(store, &o.data, Damage::Truncate8k, Target::DbFile, true)?
            );
        }
        eprintln!("{store}: kill -9");
        cells.push(kill_summary(store, &o.data, o.kill_trials)?);
        recovery.push(format!("| {store} | {} |", cells.join(" | ")));
    }
    println!("### Costs (N = {} readings, batches of {})\n", o.n, workload::BATCH);
    println!(
        "| store | write amp. spool | write amp. spool+ack | fsyncs per batch (own count) | fsyncs per ack chunk | CPU s / 100k spooled | CPU s / 100k replayed | peak RSS MiB | disk MiB at peak | wall s spool / replay |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    println!("\n### Recovery ({FILL} readings written, then damaged; kill -9: {} trials)\n", o.kill_trials);
    println!(
        "| store | torn tail (truncated mid-write) | torn tail (zeros) | flipped byte in a payload | truncated file (8 KiB) | kill -9 during writes |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &recovery {
        println!("{r}");
    }
    println!("\n### Raw figures\n\n```");
    for r in &raw {
        println!("{r}");
    }
    println!("```");
    Ok(())
}
