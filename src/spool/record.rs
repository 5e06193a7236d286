//! The spool's on-disk format, sans-IO: segment files of checksummed records.
//!
//! ```text
//! segment:  b"SGSPOOL1" record*
//! record:   len u32 LE (of body) | crc u32 LE (CRC-32/ISO-HDLC of body) | body
//! body:     received_at_us u64 LE | payload (the reading's JSON, exactly as built)
//! ```
//! A record is valid when its length is plausible and its CRC matches. Anything else is
//! corruption (a torn tail after a power cut, a flipped byte, a foreign file): the scanner skips
//! to the next valid record and reports how many bytes it skipped, so one bad byte costs the
//! records it touches, never the segment or the spool.

use sensorgate_wire::CRC;

/// The first bytes of every segment file.
pub const MAGIC: &[u8; 8] = b"SGSPOOL1";
/// Bytes of a record before its body.
pub const HEADER: usize = 8;
/// Bytes of a body before its payload.
const BODY_HEAD: usize = 8;
/// The largest body the scanner believes: readings are at most an MQTT packet, and a length
/// beyond this is a corrupted length field, not a record.
pub const MAX_BODY: usize = 1024 * 1024;

/// Appends one record.
pub fn encode(out: &mut Vec<u8>, at_us: u64, payload: &[u8]) {
    let body_len = BODY_HEAD + payload.len();
    let mut digest = CRC.digest();
    let at = at_us.to_le_bytes();
    digest.update(&at);
    digest.update(payload);
    out.reserve(HEADER + body_len);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&digest.finalize().to_le_bytes());
    out.extend_from_slice(&at);
    out.extend_from_slice(payload);
}

/// Bytes one record of `payload_len` takes on disk.
pub fn encoded_len(payload_len: usize) -> usize {
    HEADER + BODY_HEAD + payload_len
}

/// What [`scan`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan<'a> {
    /// A valid record of `len` bytes in all.
    Record { at_us: u64, payload: &'a [u8], len: usize },
    /// The buffer ends inside what may be a record: read more, or at end of file it is a torn tail.
    Incomplete,
    /// Not a record here; the next one may start at the next byte.
    Bad,
}

/// Looks for a record at the start of `buf`.
pub fn scan(buf: &[u8]) -> Scan<'_> {
    if buf.len() < HEADER {
        return Scan::Incomplete;
    }
    let body_len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if !(BODY_HEAD..=MAX_BODY).contains(&body_len) {
        return Scan::Bad;
    }
    let Some(body) = buf.get(HEADER..HEADER + body_len) else { return Scan::Incomplete };
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if CRC.checksum(body) != crc {
        return Scan::Bad;
    }
    let at_us = u64::from_le_bytes(body[..BODY_HEAD].try_into().expect("8 bytes"));
    Scan::Record { at_us, payload: &body[BODY_HEAD..], len: HEADER + body_len }
}

/// The payload as replayed: `"replayed":true` added to the gateway's metadata object, which
/// is the payload's last member (`...}}`). A payload of another shape is left as it was.
pub fn mark_replayed(payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    match payload.strip_suffix(b"}}") {
        Some(head) => {
            out.extend_from_slice(head);
            out.extend_from_slice(b",\"replayed\":true}}");
        }
        None => out.extend_from_slice(payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(at: u64, p: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode(&mut v, at, p);
        v
    }

    #[test]
    fn a_record_reads_back_and_every_prefix_is_incomplete() {
        let r = one(42, b"{\"t\":1}");
        assert_eq!(r.len(), encoded_len(7));
        assert_eq!(scan(&r), Scan::Record { at_us: 42, payload: b"{\"t\":1}", len: r.len() });
        for cut in 0..r.len() {
            assert_eq!(scan(&r[..cut]), Scan::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn any_flipped_bit_makes_the_record_bad_or_incomplete() {
        let r = one(7, b"{\"a\":true,\"_gw\":{\"device\":\"d\"}}");
        for i in 0..r.len() {
            for bit in 0..8 {
                let mut c = r.clone();
                c[i] ^= 1 << bit;
                assert!(!matches!(scan(&c), Scan::Record { .. }), "byte {i} bit {bit} went unnoticed");
            }
        }
    }

    #[test]
    fn replayed_readings_say_so_in_their_metadata() {
        let mut out = Vec::new();
        mark_replayed(b"{\"t\":1,\"_gw\":{\"device\":\"d\"}}", &mut out);
        assert_eq!(out, b"{\"t\":1,\"_gw\":{\"device\":\"d\",\"replayed\":true}}");
        mark_replayed(b"not json", &mut out);
        assert_eq!(out, b"not json");
    }
}
