//! What the process costs, read from the kernel: CPU (getrusage), disk writes (/proc/self/io),
//! peak RSS (VmHWM) and the space a directory takes on disk.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// User + system CPU seconds of the whole process so far.
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we hand it, which is plain old data.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer cannot fail.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// `write_bytes` and `cancelled_write_bytes` of /proc/self/io. The kernel counts `write_bytes`
/// when a page cache page becomes dirty (so a page rewritten after an fsync cleaned it counts
/// again, as the disk writes it again); file system journal and metadata writes done by kernel
/// threads are not counted.
pub fn io_write_bytes() -> (u64, u64) {
    let text = fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field =
        |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    (field("write_bytes:"), field("cancelled_write_bytes:"))
}

/// Peak resident set size in KiB (VmHWM).
pub fn vm_hwm_kib() -> u64 {
    let text = fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes allocated on disk under `dir` (what `du` reports), walking it recursively.
pub fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for e in entries.flatten() {
        let Ok(m) = e.metadata() else { continue };
        total += m.blocks() * 512;
        if m.is_dir() {
            total += disk_usage(&e.path());
        }
    }
    total
}
