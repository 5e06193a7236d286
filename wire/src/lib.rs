//! The sensorgate serial wire format, shared by the gateway and sensor firmware.
//!
//! `no_std`, no allocation: everything fits in fixed buffers sized by the constants below.
//!
//! # Byte format (version 1)
//!
//! ```text
//! on the line:  COBS( body ) 0x00
//! body:         postcard(ReadingV1) ++ crc32_le(postcard bytes)
//! ReadingV1:    version: u8 (= 1, one raw byte, always the first byte of the body)
//!               seq:     u32 (postcard varint), incremented by the sensor per frame
//!               channels: varint length (≤ 16), then per channel:
//!                   id: u8 (raw byte), value: enum tag (varint) + payload
//!                       0 = F32 (4 bytes little-endian), 1 = I32 (zigzag varint), 2 = Bool (1 byte)
//! crc:          CRC-32/ISO-HDLC (the zlib / Ethernet CRC-32), little-endian, over the postcard bytes
//! ```
//!
//! The version byte comes first so a receiver can refuse a frame from newer firmware before it
//! tries to interpret the rest. Test vectors live in `tests/vectors.rs` and in README.md.
#![no_std]
#![forbid(unsafe_code)]

#[cfg(feature = "std")]
extern crate std;

use serde::{Deserialize, Serialize};

/// The only version this crate encodes and accepts.
pub const VERSION: u8 = 1;
/// Channels a single frame may carry.
pub const MAX_CHANNELS: usize = 16;
/// Largest postcard body plus CRC: version 1 + seq 5 + len 1 + 16 × (id 1 + tag 1 + value 5) + crc 4.
pub const MAX_BODY_LEN: usize = 1 + 5 + 1 + MAX_CHANNELS * 7 + 4;
/// Largest frame on the line: COBS adds one byte per 254 (plus one), then the 0x00 delimiter.
pub const MAX_FRAME_LEN: usize = MAX_BODY_LEN + MAX_BODY_LEN / 254 + 2;

/// The CRC used in the frame trailer.
pub const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// One reading frame as the sensor sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadingV1 {
    /// Always [`VERSION`]; kept in the struct so postcard writes it as the first byte.
    pub version: u8,
    /// Sensor-side frame counter; the gateway uses gaps to count frames lost on the wire.
    pub seq: u32,
    /// Measured values; names and units come from the gateway's configuration.
    pub channels: heapless::Vec<Channel, MAX_CHANNELS>,
}

/// One numbered channel of a reading.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Channel {
    /// Channel number, mapped to a name and unit by the gateway's config.
    pub id: u8,
    /// The measured value.
    pub value: Value,
}

/// A channel value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// A measurement, e.g. a temperature.
    F32(f32),
    /// A count or a raw integer reading.
    I32(i32),
    /// A switch or alarm state.
    Bool(bool),
}

impl ReadingV1 {
    /// A reading with the current version and no channels yet.
    pub fn new(seq: u32) -> Self {
        Self { version: VERSION, seq, channels: heapless::Vec::new() }
    }
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// `out` is shorter than the encoded frame; [`MAX_FRAME_LEN`] always suffices.
    BufferTooSmall,
}

/// Why a received body was refused. Each maps to one rejection counter in the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than a version byte plus a CRC.
    TooShort,
    /// The CRC trailer does not match: bytes were corrupted on the wire.
    BadCrc,
    /// The CRC is fine but the version byte is one this build does not know.
    UnsupportedVersion(u8),
    /// The CRC is fine but the body is not a valid `ReadingV1` (or has trailing bytes).
    BadPayload,
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooShort => f.write_str("frame too short for version and CRC"),
            Self::BadCrc => f.write_str("CRC mismatch"),
            Self::UnsupportedVersion(v) => write!(f, "unsupported wire version {v}"),
            Self::BadPayload => f.write_str("malformed postcard payload"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DecodeError {}

/// Encodes `reading` as a complete frame (COBS, including the trailing 0x00) into `out`.
///
/// Returns the number of bytes written.
///
/// # Errors
/// [`EncodeError::BufferTooSmall`] when `out` cannot hold the frame.
pub fn encode_frame(reading: &ReadingV1, out: &mut [u8]) -> Result<usize, EncodeError> {
    let mut body = [0u8; MAX_BODY_LEN];
    let body = postcard::to_slice_crc32(reading, &mut body, CRC.digest()).map_err(|_| EncodeError::BufferTooSmall)?;
    let n = cobs::try_encode(body, out).map_err(|_| EncodeError::BufferTooSmall)?;
    let delim = out.get_mut(n).ok_or(EncodeError::BufferTooSmall)?;
    *delim = 0;
    Ok(n + 1)
}

/// Decodes a body (the COBS-decoded bytes of one frame, without the delimiter).
///
/// The checks run in the order a receiver needs: length, CRC, version, payload.
///
/// # Errors
/// See [`DecodeError`]; every error means "skip this frame", none means the stream is lost.
pub fn decode_body(body: &[u8]) -> Result<ReadingV1, DecodeError> {
    if body.len() < 1 + 4 {
        return Err(DecodeError::TooShort);
    }
    let (data, trailer) = body.split_at(body.len() - 4);
    let expected = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    if CRC.checksum(data) != expected {
        return Err(DecodeError::BadCrc);
    }
    if data[0] != VERSION {
        return Err(DecodeError::UnsupportedVersion(data[0]));
    }
    match postcard::take_from_bytes::<ReadingV1>(data) {
        Ok((reading, [])) => Ok(reading),
        _ => Err(DecodeError::BadPayload),
    }
}
