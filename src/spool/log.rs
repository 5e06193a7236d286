//! One device's spool: a directory of segment files, appended at the tail, read from the head,
//! deleted whole once delivered. A small cursor file says how far delivery got (and how far
//! loading got: what lies between was possibly sent, so a restart counts it as possibly
//! republished).
//!
//! Files: `<dir>/<20-digit segment id>.seg` (format in [`super::record`]) and `<dir>/cursor`.
//! Writes are plain `write`s of whole batches; durability comes from [`DeviceLog::sync`],
//! called at most once per `sync_interval` (group commit).

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sensorgate_wire::CRC;

use super::record::{self, Scan, MAGIC};

const CURSOR: &str = "cursor";
/// acked (seg, off), loaded (seg, off), crc.
const CURSOR_LEN: usize = 36;
/// The write buffer kept between batches, at most.
const STAGE_KEPT: usize = 16 * 1024;
/// Bytes read from a segment at a time while replaying.
const READ_CHUNK: usize = 32 * 1024;

impl Segment {
    /// A damaged stretch met while replaying: 1 if the scan at open did not already count it.
    fn new_damage(&mut self) -> u64 {
        if self.known_damage > 0 {
            self.known_damage -= 1;
            0
        } else {
            1
        }
    }
}

/// A place in the log: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub seg: u64,
    pub off: u64,
}

impl Pos {
    fn start(seg: u64) -> Self {
        Self { seg, off: MAGIC.len() as u64 }
    }
}

#[derive(Debug)]
struct Segment {
    id: u64,
    bytes: u64,
    /// Valid records in it, and how many of them were loaded for replay.
    records: u64,
    loaded: u64,
    /// Damaged stretches the scan at open found (and counted): not counted again on replay.
    known_damage: u64,
}

/// What opening an existing log found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Readings waiting for delivery.
    pub readings: u64,
    /// Of those, readings loaded for sending before the restart: possibly delivered already.
    pub maybe_sent: u64,
    /// Corrupt stretches skipped (each a torn or damaged record, a bad file).
    pub corrupt: u64,
}

/// A loaded record, for the queue.
#[derive(Debug)]
pub struct Loaded {
    pub end: Pos,
    pub at_us: u64,
    pub payload: Vec<u8>,
}

/// An open segment being read for replay.
struct Reader {
    seg: u64,
    records: Records,
}

/// Reads a segment's records in order from an offset, skipping damage: the one scanner that
/// both the check at open and the replay use.
struct Records {
    file: File,
    buf: Vec<u8>,
    /// File offset of `buf[0]`, and of the next record.
    buf_off: u64,
    off: u64,
    /// Inside a damaged stretch (reported once, however many tries resynchronising takes).
    damaged: bool,
}

/// What [`Records::next`] found.
enum Next<'a> {
    /// A valid record ending at file offset `end`.
    Record { at_us: u64, payload: &'a [u8], end: u64 },
    /// A damaged stretch begins (a torn or corrupted record, garbage); it is being skipped.
    Damage,
    /// The end of what the file holds now.
    End,
}

impl Records {
    fn new(mut file: File, from: u64) -> io::Result<Self> {
        file.seek(SeekFrom::Start(from))?;
        Ok(Self { file, buf: Vec::new(), buf_off: from, off: from, damaged: false })
    }

    fn next(&mut self) -> io::Result<Next<'_>> {
        loop {
            let at = (self.off - self.buf_off) as usize;
            match record::scan(&self.buf[at..]) {
                Scan::Record { at_us, payload, len } => {
                    // The payload ends the record; borrowed again once `off` has moved.
                    let start = at + len - payload.len();
                    self.damaged = false;
                    self.off += len as u64;
                    let payload = &self.buf[start..at + len];
                    return Ok(Next::Record { at_us, payload, end: self.off });
                }
                Scan::Incomplete => {
                    if read_more(&mut self.file, &mut self.buf, &mut self.buf_off, self.off)? > 0 {
                        continue;
                    }
                    let at = (self.off - self.buf_off) as usize;
                    if at == self.buf.len() {
                        return Ok(Next::End);
                    }
                    // Part of a record at the end of the file: a torn tail (the power went
                    // while it was being written), or a damaged length. What follows may
                    // still be good.
                    self.off += resync(&self.buf[at..], true) as u64;
                }
                Scan::Bad => self.off += resync(&self.buf[at..], false) as u64,
            }
            if !std::mem::replace(&mut self.damaged, true) {
                return Ok(Next::Damage);
            }
        }
    }
}

/// One device's log. Not thread-safe by design: the spool thread owns it.
pub struct DeviceLog {
    dir: PathBuf,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    next_id: u64,
    writer: Option<File>,
    /// Files written since their last sync: (the open tail, sealed ones), and the directory.
    dirty: bool,
    sealed_unsynced: Vec<File>,
    dir_dirty: bool,
    /// Segments deleted since the directory's last sync: only their duplicates are at stake.
    dir_deleted: bool,
    /// Everything before `acked` is delivered; records from `acked` to `read` are loaded.
    acked: Pos,
    read: Pos,
    reader: Option<Reader>,
    /// Ends of loaded records in order, and whether each is resolved (delivered, expired...).
    loaded: VecDeque<(Pos, bool)>,
    cursor: Option<File>,
    cursor_dirty: bool,
    cursor_unsynced: bool,
    /// Records appended and not yet loaded.
    unread: u64,
    stage: Vec<u8>,
}

impl DeviceLog {
    /// Opens (or creates) the log in `dir`, checking every record after the delivery cursor.
    /// Damage is skipped and counted; only I/O errors on the directory itself fail.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<(Self, Recovered)> {
        fs::create_dir_all(dir)?;
        let mut rec = Recovered::default();
        let (acked, loaded_to) = match read_cursor(&dir.join(CURSOR)) {
            Ok(c) => c,
            Err(Some(())) => {
                rec.corrupt += 1;
                (Pos::default(), Pos::default())
            }
            Err(None) => (Pos::default(), Pos::default()),
        };
        let mut ids = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            match name.strip_suffix(".seg").and_then(|n| n.parse::<u64>().ok()) {
                Some(id) => ids.push(id),
                None if name == CURSOR => {}
                // Not ours: left alone, but said once.
                None => {
                    rec.corrupt += 1;
                    tracing::warn!(file = %e.path().display(), "Stray file in the spool directory; ignored.");
                }
            }
        }
        ids.sort_unstable();
        let mut log = Self {
            dir: dir.to_path_buf(),
            segment_bytes,
            segments: VecDeque::new(),
            next_id: ids.last().map_or(acked.seg, |l| l + 1).max(acked.seg),
            writer: None,
            dirty: false,
            sealed_unsynced: Vec::new(),
            dir_dirty: false,
            dir_deleted: false,
            acked,
            read: acked,
            reader: None,
            loaded: VecDeque::new(),
            cursor: None,
            cursor_dirty: false,
            cursor_unsynced: false,
            unread: 0,
            stage: Vec::new(),
        };
        let last = ids.last().copied();
        for id in ids {
            let path = log.segment_path(id);
            if id < acked.seg {
                // Delivered before the restart; its deletion did not happen or was not synced.
                fs::remove_file(&path)?;
                log.dir_deleted = true;
                continue;
            }
            let from = if id == acked.seg { acked.off } else { MAGIC.len() as u64 };
            match scan_segment(&path, from, loaded_to, Some(id) == last)? {
                Some(s) => {
                    rec.readings += s.records;
                    rec.maybe_sent += s.maybe_sent;
                    rec.corrupt += s.corrupt;
                    log.segments.push_back(Segment {
                        id,
                        bytes: s.bytes,
                        records: s.records,
                        loaded: 0,
                        known_damage: s.corrupt,
                    });
                }
                None => {
                    rec.corrupt += 1;
                    tracing::warn!(file = %path.display(), "Spool segment without a valid header; removed.");
                    fs::remove_file(&path)?;
                    log.dir_deleted = true;
                }
            }
        }
        log.acked.off = log.acked.off.max(MAGIC.len() as u64);
        log.read = log.acked;
        match log.segments.front() {
            Some(f) if f.id != acked.seg => {
                log.acked = Pos::start(f.id);
                log.read = log.acked;
            }
            None => {
                log.acked = Pos::start(log.next_id);
                log.read = log.acked;
            }
            _ => {}
        }
        log.unread = rec.readings;
        log.cursor_dirty = true;
        Ok((log, rec))
    }

    fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.seg"))
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Records appended and not yet loaded for replay.
    pub fn unread(&self) -> u64 {
        self.unread
    }

    /// Appends records, one `write` per segment touched. Returns how many were written: on an
    /// error the rest were not (the segment is cut back to its last whole record) and the
    /// caller keeps them.
    ///
    /// # Errors
    /// The I/O error that stopped it, with the count of records written before it.
    pub fn append<'a>(
        &mut self,
        records: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(u64, u64), (u64, u64, io::Error)> {
        let (mut done, mut written) = (0u64, 0u64);
        let mut staged = 0u64;
        for (at_us, payload) in records {
            let len = record::encoded_len(payload.len()) as u64;
            let need_new = match self.segments.back() {
                Some(tail) if self.writer.is_some() => {
                    tail.bytes + self.stage.len() as u64 + len > self.segment_bytes && tail.records + staged > 0
                }
                // None open (a fresh log, or one reopened after a restart: its tail stays sealed).
                _ => true,
            };
            if need_new {
                match self.flush_stage(staged).and_then(|n| self.new_segment().map(|()| n)) {
                    Ok(n) => {
                        done += staged;
                        written += n;
                        staged = 0;
                    }
                    Err(e) => return Err((done, written, e)),
                }
            }
            record::encode(&mut self.stage, at_us, payload);
            staged += 1;
        }
        match self.flush_stage(staged) {
            Ok(n) => Ok((done + staged, written + n)),
            Err(e) => Err((done, written, e)),
        }
    }

    /// Writes the staged records to the tail segment.
    fn flush_stage(&mut self, records: u64) -> io::Result<u64> {
        if self.stage.is_empty() {
            return Ok(0);
        }
        let (Some(w), Some(tail)) = (self.writer.as_mut(), self.segments.back_mut()) else {
            self.stage.clear();
            return Err(io::Error::other("spool segment not open"));
        };
        let n = self.stage.len() as u64;
        let r = w.write_all(&self.stage);
        self.stage.clear();
        if self.stage.capacity() > STAGE_KEPT {
            // An outage's batch per device is ~150 KiB at 1000 readings/s: not kept per device.
            self.stage = Vec::new();
        }
        if let Err(e) = r {
            // Whatever part was written is a torn record: cut it off, or the next write
            // would follow garbage (recovery would skip it, but would count it corrupt).
            let _ = w.set_len(tail.bytes);
            let _ = w.seek(SeekFrom::Start(tail.bytes));
            return Err(e);
        }
        tail.bytes += n;
        tail.records += records;
        self.unread += records;
        self.dirty = true;
        Ok(n)
    }

    fn new_segment(&mut self) -> io::Result<()> {
        let id = self.next_id;
        let path = self.segment_path(id);
        let mut f = OpenOptions::new().create(true).truncate(true).write(true).open(&path)?;
        if let Err(e) = f.write_all(MAGIC) {
            drop(f);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        if let Some(old) = self.writer.replace(f) {
            if std::mem::take(&mut self.dirty) {
                self.sealed_unsynced.push(old);
            }
        }
        self.dirty = true;
        self.dir_dirty = true;
        self.next_id += 1;
        self.segments.push_back(Segment { id, bytes: MAGIC.len() as u64, records: 0, loaded: 0, known_damage: 0 });
        if self.segments.len() == 1 {
            self.acked = Pos::start(id);
            self.read = self.acked;
            self.cursor_dirty = true;
        }
        Ok(())
    }

    /// Makes every record written so far durable (and new segments' directory entries). With
    /// `progress`, delivery progress too: the cursor and deleted segments. Losing progress to
    /// a power cut costs duplicates, never readings, so it is synced less often than data
    /// (each cursor sync rewrites a page and a journal block for 36 bytes).
    /// Returns the number of fsync-class calls.
    ///
    /// # Errors
    /// The first failing sync; what it covered may not be durable.
    pub fn sync(&mut self, progress: bool) -> io::Result<u64> {
        let mut calls = 0;
        for f in self.sealed_unsynced.drain(..) {
            f.sync_data()?;
            calls += 1;
        }
        if std::mem::take(&mut self.dirty) {
            if let Some(w) = &self.writer {
                w.sync_data()?;
                calls += 1;
            }
        }
        if progress && std::mem::take(&mut self.cursor_unsynced) {
            if let Some(c) = &self.cursor {
                c.sync_data()?;
                calls += 1;
            }
        }
        let deleted = progress && std::mem::take(&mut self.dir_deleted);
        if std::mem::take(&mut self.dir_dirty) | deleted {
            File::open(&self.dir)?.sync_all()?;
            calls += 1;
        }
        Ok(calls)
    }

    /// Loads up to `max` records for replay, oldest first; damaged records are skipped and
    /// counted in the second value.
    ///
    /// # Errors
    /// A segment cannot be opened or read.
    pub fn load(&mut self, max: usize, out: &mut Vec<Loaded>) -> io::Result<u64> {
        let mut corrupt = 0;
        while out.len() < max && self.unread > 0 {
            let Some(seg_idx) = self.segments.iter().position(|s| s.id == self.read.seg) else {
                // The segment being read was dropped (spool full): go on with the next one.
                match self.segments.iter().find(|s| s.id > self.read.seg) {
                    Some(s) => {
                        self.read = Pos::start(s.id);
                        self.reader = None;
                        continue;
                    }
                    None => break,
                }
            };
            if self.reader.as_ref().is_none_or(|r| r.seg != self.read.seg) {
                let file = File::open(self.segment_path(self.read.seg))?;
                self.reader = Some(Reader { seg: self.read.seg, records: Records::new(file, self.read.off)? });
            }
            let reader = self.reader.as_mut().expect("opened above");
            match reader.records.next()? {
                Next::Record { at_us, payload, end } => {
                    self.read.off = end;
                    out.push(Loaded { end: self.read, at_us, payload: payload.to_vec() });
                    self.loaded.push_back((self.read, false));
                    self.segments[seg_idx].loaded += 1;
                    self.unread -= 1;
                    self.cursor_dirty = true;
                }
                Next::Damage => corrupt += self.segments[seg_idx].new_damage(),
                // The tail, read as far as it is written.
                Next::End if seg_idx + 1 == self.segments.len() => break,
                Next::End => {
                    // The end of a sealed segment: on to the next.
                    let seg = &mut self.segments[seg_idx];
                    if seg.loaded < seg.records {
                        // Fewer records than the scan at open found: damaged since.
                        corrupt += 1;
                        self.unread -= seg.records - seg.loaded;
                        seg.records = seg.loaded;
                    }
                    self.read = Pos::start(self.segments[seg_idx + 1].id);
                    self.reader = None;
                }
            }
        }
        Ok(corrupt)
    }

    /// A loaded record was resolved (delivered, expired or poisoned): delivery advances over
    /// every resolved record, and segments wholly behind it are deleted.
    ///
    /// # Errors
    /// A delivered segment cannot be deleted.
    pub fn resolve(&mut self, end: Pos) -> io::Result<()> {
        if let Some(slot) = self.loaded.iter_mut().find(|(p, _)| *p == end) {
            slot.1 = true;
        }
        while let Some(&(p, true)) = self.loaded.front() {
            self.loaded.pop_front();
            if p > self.acked {
                self.acked = p;
                self.cursor_dirty = true;
            }
        }
        self.delete_delivered()
    }

    fn delete_delivered(&mut self) -> io::Result<()> {
        while let Some(front) = self.segments.front() {
            let done = self.acked.seg > front.id || (self.acked.seg == front.id && self.acked.off >= front.bytes);
            let is_tail = self.segments.len() == 1;
            if !done || (is_tail && self.unread > 0) {
                return Ok(());
            }
            let id = front.id;
            self.segments.pop_front();
            if is_tail {
                self.writer = None;
                self.dirty = false;
            }
            if self.reader.as_ref().is_some_and(|r| r.seg == id) {
                self.reader = None;
            }
            fs::remove_file(self.segment_path(id))?;
            self.dir_deleted = true;
            let next = self.segments.front().map_or(self.next_id, |s| s.id);
            if self.acked.seg <= id {
                self.acked = Pos::start(next);
            }
            if self.read.seg <= id {
                self.read = Pos::start(next);
            }
            self.cursor_dirty = true;
        }
        Ok(())
    }

    /// Drops the oldest segment to make room (the spool is full). Returns how many readings
    /// went with it that were never loaded (those loaded are still delivered from memory).
    ///
    /// # Errors
    /// The segment cannot be deleted.
    pub fn drop_oldest(&mut self) -> io::Result<u64> {
        let Some(front) = self.segments.pop_front() else { return Ok(0) };
        let lost = front.records - front.loaded;
        self.unread -= lost;
        if self.segments.is_empty() {
            self.writer = None;
            self.dirty = false;
        }
        if self.reader.as_ref().is_some_and(|r| r.seg == front.id) {
            self.reader = None;
        }
        fs::remove_file(self.segment_path(front.id))?;
        self.dir_deleted = true;
        let next = self.segments.front().map_or(self.next_id, |s| s.id);
        if self.acked.seg <= front.id {
            self.acked = Pos::start(next);
        }
        if self.read.seg <= front.id {
            self.read = Pos::start(next);
        }
        self.cursor_dirty = true;
        Ok(lost)
    }

    /// Records the delivery and load positions in the cursor file (a `pwrite`; made durable
    /// by the next [`sync`](Self::sync)). Returns whether it wrote.
    ///
    /// # Errors
    /// The cursor file cannot be opened or written.
    pub fn write_cursor(&mut self) -> io::Result<bool> {
        if !self.cursor_dirty {
            return Ok(false);
        }
        if self.cursor.is_none() {
            let f =
                OpenOptions::new().create(true).truncate(false).read(true).write(true).open(self.dir.join(CURSOR))?;
            self.cursor = Some(f);
        }
        let mut b = [0u8; CURSOR_LEN];
        b[0..8].copy_from_slice(&self.acked.seg.to_le_bytes());
        b[8..16].copy_from_slice(&self.acked.off.to_le_bytes());
        b[16..24].copy_from_slice(&self.read.seg.to_le_bytes());
        b[24..32].copy_from_slice(&self.read.off.to_le_bytes());
        let crc = CRC.checksum(&b[..32]);
        b[32..].copy_from_slice(&crc.to_le_bytes());
        self.cursor.as_ref().expect("opened above").write_all_at(&b, 0)?;
        self.cursor_dirty = false;
        self.cursor_unsynced = true;
        Ok(true)
    }

    /// Forgets what was loaded and not resolved (shutdown: it is still on disk, and is
    /// loaded again at the next start).
    pub fn unload(&mut self) {
        for (end, _) in self.loaded.drain(..) {
            if let Some(s) = self.segments.iter_mut().find(|s| s.id == end.seg) {
                s.loaded -= 1;
                self.unread += 1;
            }
        }
        self.read = self.acked;
        self.reader = None;
        self.cursor_dirty = true;
    }

    /// Nothing on disk and nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }
}

/// How far to skip from a bad record at the start of `buf`: to the next offset where a record
/// may start (a valid one, or, unless `buf` runs to the end of the file, one it ends inside),
/// or past the buffer.
fn resync(buf: &[u8], at_eof: bool) -> usize {
    (1..buf.len())
        .find(|&i| match record::scan(&buf[i..]) {
            Scan::Record { .. } => true,
            Scan::Incomplete => !at_eof,
            Scan::Bad => false,
        })
        .unwrap_or(buf.len().max(1))
}

/// Reads the next chunk of `file` after what `buf` holds, dropping what lies before `keep_from`
/// (a file offset). Returns the bytes read: 0 at the end of the file.
fn read_more(file: &mut File, buf: &mut Vec<u8>, buf_off: &mut u64, keep_from: u64) -> io::Result<usize> {
    let drop = (keep_from - *buf_off) as usize;
    buf.drain(..drop.min(buf.len()));
    *buf_off = keep_from;
    let old = buf.len();
    buf.resize(old + READ_CHUNK, 0);
    let n = file.read(&mut buf[old..])?;
    buf.truncate(old + n);
    Ok(n)
}

/// The cursor, or `Err(None)` when there is none and `Err(Some(()))` when it is damaged.
fn read_cursor(path: &Path) -> Result<(Pos, Pos), Option<()>> {
    let b = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(None),
        Err(_) => return Err(Some(())),
    };
    if b.len() != CURSOR_LEN || CRC.checksum(&b[..32]).to_le_bytes() != b[32..36] {
        tracing::warn!(file = %path.display(), "Spool cursor damaged; replaying the whole spool of this device.");
        return Err(Some(()));
    }
    let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    Ok((Pos { seg: u(0), off: u(8) }, Pos { seg: u(16), off: u(24) }))
}

struct SegmentScan {
    bytes: u64,
    records: u64,
    maybe_sent: u64,
    corrupt: u64,
}

/// Checks one segment from `from`: counts valid records and damage; a torn tail of the last
/// segment is cut off so appends continue after the last whole record. `None`: not a segment.
fn scan_segment(path: &Path, from: u64, loaded_to: Pos, is_last: bool) -> io::Result<Option<SegmentScan>> {
    let id = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    let mut file = OpenOptions::new().read(true).write(is_last).open(path)?;
    let mut head = [0u8; 8];
    if file.read_exact(&mut head).is_err() || &head != MAGIC {
        return Ok(None);
    }
    let len = file.metadata()?.len();
    let mut s = SegmentScan { bytes: len, records: 0, maybe_sent: 0, corrupt: 0 };
    let from = from.max(MAGIC.len() as u64);
    let mut last_good_end = from;
    let mut records = Records::new(file, from)?;
    loop {
        match records.next()? {
            Next::Record { end, .. } => {
                last_good_end = end;
                s.records += 1;
                if (Pos { seg: id, off: end }) <= loaded_to {
                    s.maybe_sent += 1;
                }
            }
            Next::Damage => s.corrupt += 1,
            Next::End => break,
        }
    }
    if is_last && last_good_end < len {
        // Appends continue after the last whole record.
        records.file.set_len(last_good_end)?;
        s.bytes = last_good_end;
    }
    Ok(Some(s))
}
