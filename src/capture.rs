//! Captures of what a serial port sent, with arrival times: `sensorgate record` writes them and
//! `sensorgate simulate --replay` plays them back with their timing, so a field problem becomes
//! a reproducible test. Sans-IO: the file format only.
//!
//! Format, version 1 (little-endian):
//! ```text
//! SGCAP 1\n                                   magic and version
//! {"port":…,"baud":…,…}\n                    header: one line of JSON (see Header)
//! then chunks, each: u64 µs since the start | u32 length | that many bytes (one read)
//! ```
//! A file cut short (a recorder killed mid-write) keeps every whole chunk before the cut.

use std::io::{self, BufRead, Read, Write};

use serde::{Deserialize, Serialize};

/// The first line of every capture.
pub const MAGIC: &[u8] = b"SGCAP 1\n";
/// The longest chunk a reader accepts (a read is at most a few KiB; this bounds memory on a
/// damaged length).
pub const MAX_CHUNK: usize = 1 << 20;

/// What the port was, as the recorder opened it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub port: String,
    pub baud: u32,
    pub data_bits: u8,
    /// "none", "even" or "odd".
    pub parity: String,
    pub stop_bits: u8,
    /// When recording began, µs since the Unix epoch.
    pub started_at_us: u64,
    /// The program that wrote it.
    pub recorder: String,
}

/// Writes the magic and the header.
///
/// # Errors
/// The writer's.
pub fn write_header(w: &mut impl Write, header: &Header) -> io::Result<()> {
    w.write_all(MAGIC)?;
    serde_json::to_writer(&mut *w, header)?;
    w.write_all(b"\n")
}

/// Writes one chunk: `bytes` arrived `at_us` after the start.
///
/// # Errors
/// The writer's.
pub fn write_chunk(w: &mut impl Write, at_us: u64, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| io::Error::other("chunk over 4 GiB"))?;
    w.write_all(&at_us.to_le_bytes())?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(bytes)
}

/// One chunk of a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub at_us: u64,
    pub bytes: Vec<u8>,
}

/// Reads a capture: the header, then chunks in order.
pub struct CaptureReader<R> {
    inner: R,
    pub header: Header,
    /// The file ended inside a chunk (it was cut short): the chunks before are whole.
    pub truncated: bool,
}

impl<R: BufRead> CaptureReader<R> {
    /// Reads the magic and the header.
    ///
    /// # Errors
    /// Not a capture (the magic), another version, or a damaged header.
    pub fn new(mut inner: R) -> io::Result<Self> {
        let mut magic = [0u8; MAGIC.len()];
        inner.read_exact(&mut magic).map_err(|_| invalid("not a sensorgate capture (too short)"))?;
        if magic[..6] != MAGIC[..6] {
            return Err(invalid("not a sensorgate capture (no SGCAP header)"));
        }
        if magic != MAGIC {
            return Err(invalid("a capture of another format version; this sensorgate reads version 1"));
        }
        let mut line = String::new();
        inner.read_line(&mut line)?;
        let header = serde_json::from_str(&line).map_err(|e| invalid(&format!("damaged capture header: {e}")))?;
        Ok(Self { inner, header, truncated: false })
    }

    /// The next chunk; `None` at the end (or at a cut, see `truncated`).
    ///
    /// # Errors
    /// A read error, or a chunk length over [`MAX_CHUNK`] (a damaged file).
    pub fn next_chunk(&mut self) -> io::Result<Option<Chunk>> {
        let mut head = [0u8; 12];
        match read_full(&mut self.inner, &mut head)? {
            0 => return Ok(None),
            12 => {}
            _ => {
                self.truncated = true;
                return Ok(None);
            }
        }
        let at_us = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
        if len > MAX_CHUNK {
            return Err(invalid(&format!("damaged capture: a chunk of {len} bytes")));
        }
        let mut bytes = vec![0u8; len];
        if read_full(&mut self.inner, &mut bytes)? < len {
            self.truncated = true;
            return Ok(None);
        }
        Ok(Some(Chunk { at_us, bytes }))
    }
}

/// Reads until `buf` is full or the end; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            port: "/dev/ttyUSB0".into(),
            baud: 9600,
            data_bits: 8,
            parity: "none".into(),
            stop_bits: 1,
            started_at_us: 1,
            recorder: "test".into(),
        }
    }

    #[test]
    fn chunks_come_back_in_order_and_a_cut_keeps_the_whole_ones() {
        let mut file = Vec::new();
        write_header(&mut file, &header()).unwrap();
        write_chunk(&mut file, 0, b"{\"a\":1}\n").unwrap();
        write_chunk(&mut file, 1500, b"{\"a\":2").unwrap();
        write_chunk(&mut file, 2000, b"}\n").unwrap();
        let mut r = CaptureReader::new(io::Cursor::new(file.clone())).unwrap();
        assert_eq!(r.header, header());
        let mut got = Vec::new();
        while let Some(c) = r.next_chunk().unwrap() {
            got.push((c.at_us, c.bytes));
        }
        assert_eq!(got, [(0, b"{\"a\":1}\n".to_vec()), (1500, b"{\"a\":2".to_vec()), (2000, b"}\n".to_vec())]);
        assert!(!r.truncated);
        // Cut in the middle of the last chunk.
        let mut r = CaptureReader::new(io::Cursor::new(file[..file.len() - 1].to_vec())).unwrap();
        assert!(r.next_chunk().unwrap().is_some() && r.next_chunk().unwrap().is_some());
        assert_eq!(r.next_chunk().unwrap(), None);
        assert!(r.truncated);
    }

    #[test]
    fn other_files_are_refused_with_a_reason() {
        let err = |bytes: &[u8]| CaptureReader::new(io::Cursor::new(bytes.to_vec())).err().unwrap().to_string();
        assert!(err(b"{\"temp\":1}\n").contains("not a sensorgate capture"));
        assert!(err(b"SGCAP 2\n{}\n").contains("another format version"));
        assert!(err(b"SGCAP 1\n{oops\n").contains("damaged capture header"));
        let mut file = Vec::new();
        write_header(&mut file, &header()).unwrap();
        file.extend_from_slice(&0u64.to_le_bytes());
        file.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut r = CaptureReader::new(io::Cursor::new(file)).unwrap();
        assert!(r.next_chunk().unwrap_err().to_string().contains("damaged capture"));
    }
}
