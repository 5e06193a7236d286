//! The segmented log, modelled on the spool we plan: per device a directory of 4 MiB segment
//! files of length- and CRC-framed records, a 20-byte cursor file, whole segments deleted once acked.
//!
//! Segment: `SGSPOOL1` then records `len u32 LE | crc32 u32 LE | body`, body = `at_us u64 LE |
//! payload`, CRC-32/ISO-HDLC over the body. A writer never appends to a segment it did not create
//! (a restart opens a new one), so a torn tail left by a power cut is only ever read, never extended.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crc::{CRC_32_ISO_HDLC, Crc};

use crate::store::{Res, Store};
use crate::workload::{self, Batch};

pub const MAGIC: &[u8; 8] = b"SGSPOOL1";
pub const SEGMENT_BYTES: u64 = 4 << 20;
/// A body longer than this is taken as a corrupt length, not a record.
const MAX_BODY: u32 = 64 << 10;
const CRC: Crc<u32> = Crc::<u32>::new(&CRC_32_ISO_HDLC);

/// Where a device's reader stands: the segment and the offset of the next record in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pos {
    seg: u64,
    off: u64,
}

struct Reader {
    seg: u64,
    file: BufReader<File>,
    path: PathBuf,
    off: u64,
    len: u64,
}

struct Device {
    dir: PathBuf,
    /// Segment numbers present on disk, oldest first.
    segs: BTreeSet<u64>,
    // Writer side.
    wfile: Option<File>,
    wseg: u64,
    wlen: u64,
    buf: Vec<u8>,
    created: bool,
    // Reader side.
    reader: Option<Reader>,
    read: Option<Pos>,
    acked: Option<Pos>,
    cursor: File,
    body: Vec<u8>,
    exhausted: bool,
}

pub struct Log {
    devs: Vec<Device>,
    fsyncs: u64,
    corrupt: u64,
    next_dev: usize,
}

fn seg_path(dir: &Path, seg: u64) -> PathBuf {
    dir.join(format!("{seg:016}.seg"))
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Log {
    /// Opens (or creates) the log under `root` with `lanes` directories: 16 is one per device
    /// (the plan), 1 puts all devices in one stream (one fdatasync per batch instead of 16).
    pub fn open(root: &Path, lanes: usize) -> Res<Self> {
        let mut devs = Vec::new();
        for lane in 0..lanes {
            let dir = match lanes {
                16 => root.join(workload::DEVICE_NAMES[lane]),
                _ => root.join(format!("lane-{lane:02}")),
            };
            fs::create_dir_all(&dir)?;
            let mut segs = BTreeSet::new();
            for e in fs::read_dir(&dir)? {
                let name = e?.file_name();
                let name = name.to_string_lossy();
                // A stray file in the directory is not ours: it is never opened, never deleted.
                if let Some(n) = name.strip_suffix(".seg").and_then(|s| s.parse().ok()) {
                    segs.insert(n);
                }
            }
            let cursor =
                OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join("cursor"))?;
            let acked = read_cursor(&cursor);
            let wseg = segs.last().copied().unwrap_or(0);
            devs.push(Device {
                dir,
                segs,
                wfile: None,
                wseg,
                wlen: 0,
                buf: Vec::with_capacity(64 << 10),
                created: false,
                reader: None,
                read: acked,
                acked,
                cursor,
                body: Vec::with_capacity(1024),
                exhausted: false,
            });
        }
        Ok(Log { devs, fsyncs: 0, corrupt: 0, next_dev: 0 })
    }
}

/// The acked position, or `None` when the cursor file is empty or fails its CRC (read from the start).
fn read_cursor(f: &File) -> Option<Pos> {
    let mut b = [0u8; 20];
    f.read_exact_at(&mut b, 0).ok()?;
    let crc = u32::from_le_bytes(b[16..20].try_into().ok()?);
    (CRC.checksum(&b[..16]) == crc).then(|| Pos {
        seg: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
        off: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
    })
}

impl Device {
    /// Writes what is buffered for the current segment with one write() and fdatasyncs it.
    fn flush(&mut self, fsyncs: &mut u64) -> io::Result<()> {
        if let Some(f) = &mut self.wfile
            && !self.buf.is_empty()
        {
            f.write_all(&self.buf)?;
            self.buf.clear();
            f.sync_data()?;
            *fsyncs += 1;
        }
        Ok(())
    }

    fn append(&mut self, at: u64, payload: &[u8], fsyncs: &mut u64) -> io::Result<()> {
        let body_len = 8 + payload.len() as u64;
        if self.wfile.is_none() || self.wlen + 8 + body_len > SEGMENT_BYTES {
            self.flush(fsyncs)?;
            self.wseg += 1;
            let f = OpenOptions::new().create_new(true).append(true).open(seg_path(&self.dir, self.wseg))?;
            self.wfile = Some(f);
            self.segs.insert(self.wseg);
            self.buf.extend_from_slice(MAGIC);
            self.wlen = MAGIC.len() as u64;
            self.created = true;
        }
        let start = self.buf.len();
        self.buf.extend_from_slice(&(body_len as u32).to_le_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(&at.to_le_bytes());
        self.buf.extend_from_slice(payload);
        let crc = CRC.checksum(&self.buf[start + 8..]);
        self.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        self.wlen += 8 + body_len;
        Ok(())
    }

    /// Opens the next segment to read after `after` (or the acked one), skipping foreign files.
    fn open_next(&mut self, corrupt: &mut u64) -> io::Result<bool> {
        loop {
            let (seg, off) = match (&self.reader, self.read) {
                (Some(r), _) => match self.segs.range(r.seg + 1..).next() {
                    Some(&s) => (s, MAGIC.len() as u64),
                    None => return Ok(false),
                },
                (None, Some(p)) if self.segs.contains(&p.seg) => (p.seg, p.off),
                (None, Some(p)) => match self.segs.range(p.seg..).next() {
                    Some(&s) => (s, MAGIC.len() as u64),
                    None => return Ok(false),
                },
                (None, None) => match self.segs.first() {
                    Some(&s) => (s, MAGIC.len() as u64),
                    None => return Ok(false),
                },
            };
            let path = seg_path(&self.dir, seg);
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.segs.remove(&seg);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let len = file.metadata()?.len();
            let mut magic = [0u8; 8];
            let ok = file.read_exact(&mut magic).is_ok() && &magic == MAGIC;
            file.seek(SeekFrom::Start(off))?;
            self.reader = Some(Reader { seg, file: BufReader::with_capacity(64 << 10, file), path, off, len });
            if ok {
                return Ok(true);
            }
            // A segment without our header (a foreign or zeroed file): counted, skipped whole.
            *corrupt += 1;
        }
    }

    /// The next good record of this device into `out`, or `false` when none is left.
    fn next(&mut self, out: &mut Batch, corrupt: &mut u64) -> io::Result<bool> {
        loop {
            if self.reader.is_none() && !self.open_next(corrupt)? {
                return Ok(false);
            }
            let r = self.reader.as_mut().expect("opened above");
            if r.off == r.len {
                if !self.open_next(corrupt)? {
                    return Ok(false);
                }
                continue;
            }
            let mut head = [0u8; 8];
            let whole = r.off + 8 <= r.len && r.file.read_exact(&mut head).is_ok();
            let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
            let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
            let fits = whole && (8..=MAX_BODY).contains(&len) && r.off + 8 + u64::from(len) <= r.len;
            if fits {
                self.body.resize(len as usize, 0);
                r.file.read_exact(&mut self.body)?;
                if CRC.checksum(&self.body) == crc {
                    let at = u64::from_le_bytes(self.body[0..8].try_into().expect("8 bytes"));
                    r.off += 8 + u64::from(len);
                    self.read = Some(Pos { seg: r.seg, off: r.off });
                    // A record whose time is not one of the workload's has a valid CRC but is not
                    // ours: only possible if the file is foreign; it is counted and skipped.
                    match workload::index_of_at(at) {
                        Some(i) => {
                            out.push(i, &self.body[8..]);
                            return Ok(true);
                        }
                        None => {
                            *corrupt += 1;
                            continue;
                        }
                    }
                }
            }
            // Torn tail, bad length or bad CRC: counted once, then resynchronise on the next
            // offset where a whole record with a matching CRC starts (none: the segment is done).
            *corrupt += 1;
            let bad = r.off;
            match resync(&r.path, bad + 1, r.len)? {
                Some(next) => {
                    r.file.seek(SeekFrom::Start(next))?;
                    r.off = next;
                }
                None => {
                    r.file.seek(SeekFrom::Start(r.len))?;
                    r.off = r.len;
                }
            }
        }
    }
}

/// The first offset at or after `from` where a whole record with a matching CRC starts. Rare
/// path (after corruption only), so it reads the rest of the segment at once (≤ 4 MiB).
fn resync(path: &Path, from: u64, len: u64) -> io::Result<Option<u64>> {
    if from >= len {
        return Ok(None);
    }
    let mut rest = vec![0u8; (len - from) as usize];
    File::open(path)?.read_exact_at(&mut rest, from)?;
    let n = rest.len();
    for p in 0..n.saturating_sub(8) {
        let l = u32::from_le_bytes(rest[p..p + 4].try_into().expect("4 bytes"));
        if !(8..=MAX_BODY).contains(&l) || p + 8 + l as usize > n {
            continue;
        }
        let crc = u32::from_le_bytes(rest[p + 4..p + 8].try_into().expect("4 bytes"));
        if CRC.checksum(&rest[p + 8..p + 8 + l as usize]) == crc {
            return Ok(Some(from + p as u64));
        }
    }
    Ok(None)
}

impl Store for Log {
    fn append(&mut self, batch: &Batch) -> Res<()> {
        for r in &batch.recs {
            let d = workload::device_of(r.i) % self.devs.len();
            self.devs[d].append(workload::at_us(r.i), batch.payload(r), &mut self.fsyncs)?;
        }
        for d in &mut self.devs {
            d.flush(&mut self.fsyncs)?;
            if d.created {
                fsync_dir(&d.dir)?;
                self.fsyncs += 1;
                d.created = false;
            }
        }
        Ok(())
    }

    fn read_chunk(&mut self, max: usize, out: &mut Batch) -> Res<()> {
        out.clear();
        // Round-robin over the lanes, one record each, as the gateway interleaves devices.
        let lanes = self.devs.len();
        let mut idle = 0;
        while out.len() < max && idle < lanes {
            let d = &mut self.devs[self.next_dev];
            self.next_dev = (self.next_dev + 1) % lanes;
            if d.exhausted || !d.next(out, &mut self.corrupt)? {
                d.exhausted = true;
                idle += 1;
            } else {
                idle = 0;
            }
        }
        Ok(())
    }

    fn ack(&mut self) -> Res<()> {
        for d in &mut self.devs {
            if d.read == d.acked {
                continue;
            }
            let p = d.read.expect("read moved, so it is set");
            let mut b = [0u8; 20];
            b[0..8].copy_from_slice(&p.seg.to_le_bytes());
            b[8..16].copy_from_slice(&p.off.to_le_bytes());
            let crc = CRC.checksum(&b[..16]);
            b[16..20].copy_from_slice(&crc.to_le_bytes());
            d.cursor.write_all_at(&b, 0)?;
            d.acked = Some(p);
            // Segments before the acked one are delivered whole: delete them.
            let done: Vec<u64> = d.segs.range(..p.seg).copied().collect();
            for s in &done {
                fs::remove_file(seg_path(&d.dir, *s))?;
                d.segs.remove(s);
            }
            if !done.is_empty() {
                fsync_dir(&d.dir)?;
                self.fsyncs += 1;
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Res<()> {
        // The cursors are rewritten in place without a sync per ack chunk (a power cut then
        // re-delivers at most what was acked since the last sync: counted duplicates, no loss);
        // they are synced once at the end, as the gateway would at its next sync_interval.
        for d in &mut self.devs {
            d.cursor.sync_data()?;
            self.fsyncs += 1;
        }
        Ok(())
    }

    fn fsyncs(&self) -> Option<u64> {
        Some(self.fsyncs)
    }

    fn corrupt(&self) -> u64 {
        self.corrupt
    }
}

/// Offsets of the records in a segment written by us (for the damage scenarios).
pub fn record_offsets(path: &Path) -> io::Result<Vec<(u64, u64)>> {
    let data = fs::read(path)?;
    let mut out = Vec::new();
    let mut off = MAGIC.len();
    while off + 8 <= data.len() {
        let l = u32::from_le_bytes(data[off..off + 4].try_into().expect("4 bytes")) as usize;
        if off + 8 + l > data.len() {
            break;
        }
        out.push((off as u64, (8 + l) as u64));
        off += 8 + l;
    }
    Ok(out)
}

/// The newest segment of the lane directory under `root` that sorts first (`last == false`) or
/// last (`last == true`: with one lane per device, device 15's, which holds the newest reading).
pub fn last_segment(root: &Path, last: bool) -> io::Result<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        fs::read_dir(root)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
    dirs.sort();
    let dir = if last { dirs.pop() } else { dirs.into_iter().next() };
    let dir = dir.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no lane directory"))?;
    let mut segs: Vec<PathBuf> = fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    segs.pop().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no segment"))
}
