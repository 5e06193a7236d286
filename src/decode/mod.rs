//! Turning one frame into the sensor fields of a JSON reading. Plain sync code: no async, no
//! tokio types, no I/O. Where it runs (a dedicated thread per device) is decided in `device`.

mod binary;
mod json;
mod kv;

pub use self::binary::PostcardDecoder;
pub use self::json::JsonDecoder;
pub use self::kv::KvDecoder;

use bytes::BytesMut;
use serde::Deserialize;

use crate::reject::Reject;

/// How a frame's bytes encode a reading (`format` in a device's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line, passed through unchanged.
    Json,
    /// `key=value` pairs separated by spaces.
    Kv,
    /// sensorgate-wire `ReadingV1` (binary, for `cobs`).
    Postcard,
}

impl Format {
    pub const ALL: [Self; 3] = [Self::Json, Self::Kv, Self::Postcard];

    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Kv => "kv",
            Format::Postcard => "postcard",
        }
    }

    /// The format called `name` in the config file.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// Binary rather than text.
    pub fn is_binary(self) -> bool {
        matches!(self, Format::Postcard)
    }
}

/// The name and unit of one numbered channel of binary (postcard) frames
/// (`[[device.channel]]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    pub id: u8,
    pub name: String,
    pub unit: Option<String>,
}

/// What a decoder learned besides the fields.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// The sensor's own frame counter, where the format has one.
    pub sensor_seq: Option<u32>,
}

/// A frame decoder.
pub trait Decode: Send {
    /// Appends the reading's sensor fields to `out` as JSON members (`"a":1,"b":2`), without
    /// braces. Writes nothing for a reading without fields.
    ///
    /// # Errors
    /// A [`Reject`] when the frame must be skipped; `out` may then hold partial output, which
    /// the caller discards.
    fn decode(&mut self, frame: &[u8], out: &mut BytesMut) -> Result<Decoded, Reject>;
}

/// The decoder for `format`; `channels` name the channels of binary frames.
pub fn for_format(format: Format, channels: &[Channel]) -> Box<dyn Decode> {
    match format {
        Format::Json => Box::new(JsonDecoder),
        Format::Kv => Box::new(KvDecoder),
        Format::Postcard => Box::new(PostcardDecoder::new(channels)),
    }
}
