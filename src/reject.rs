//! Why a frame was skipped. One counter per reason; the names are metric keys and stay stable.

/// A frame that was counted and skipped. The session goes on: nothing here ends a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Reject {
    /// Longer than the device's `max_frame`; discarded up to the next delimiter.
    #[error("frame longer than max_frame")]
    Oversize,
    /// Not valid COBS.
    #[error("invalid COBS encoding")]
    BadCobs,
    /// Text that is not UTF-8.
    #[error("invalid UTF-8")]
    BadUtf8,
    /// Not parseable as JSON.
    #[error("invalid JSON")]
    BadJson,
    /// JSON nested deeper than the gateway forwards (see `decode::json::MAX_DEPTH`).
    #[error("JSON nested too deeply")]
    TooDeep,
    /// Valid JSON, but not an object.
    #[error("JSON value is not an object")]
    NotObject,
    /// The sensor sent the key the gateway reserves for its metadata.
    #[error("sensor field uses the reserved key \"_gw\"")]
    ReservedKey,
    /// A `key=value` line that does not parse.
    #[error("malformed key=value pair")]
    BadKv,
    /// NaN or infinity, which JSON cannot carry.
    #[error("value is NaN or infinite")]
    NonFinite,
    /// The same field twice in one reading.
    #[error("duplicate field")]
    DuplicateKey,
    /// A binary frame too short for a version and a CRC.
    #[error("binary frame too short")]
    TooShort,
    /// CRC mismatch: corrupted on the wire.
    #[error("CRC mismatch")]
    BadCrc,
    /// A wire version this build does not know.
    #[error("unsupported wire version")]
    BadVersion,
    /// CRC fine, body not a valid reading.
    #[error("malformed binary payload")]
    BadPayload,
    /// The session ended (unplug, error, shutdown) in the middle of this frame.
    #[error("frame cut off by the end of the session")]
    Truncated,
    /// The decoder panicked on this frame; the session was restarted.
    #[error("decoder panicked")]
    DecoderPanic,
    /// The reading's PUBLISH would exceed `mqtt.max_packet_size` (the broker would close the
    /// connection on it).
    #[error("reading larger than mqtt.max_packet_size")]
    OversizePacket,
    /// Modbus: the slave did not answer within `request_timeout`, after every retry.
    #[error("no response from the slave")]
    NoResponse,
    /// Modbus: a well-formed reply from another unit.
    #[error("reply from the wrong unit")]
    WrongUnit,
    /// Modbus: fewer bytes than the reply needs before the timeout.
    #[error("reply cut short")]
    ShortReply,
    /// Modbus: bytes after the end of the reply, before the line fell silent.
    #[error("reply longer than asked for")]
    OverlongReply,
    /// Modbus: an exception response (counted by code in the device's `modbus` metrics).
    #[error("exception response")]
    Exception,
    /// Modbus: CRC fine, but not an answer to the request (another function or length).
    #[error("reply does not answer the request")]
    BadReply,
}

impl Reject {
    /// Every reason, in metric order.
    pub const ALL: [Reject; 23] = [
        Reject::Oversize,
        Reject::BadCobs,
        Reject::BadUtf8,
        Reject::BadJson,
        Reject::TooDeep,
        Reject::NotObject,
        Reject::ReservedKey,
        Reject::BadKv,
        Reject::NonFinite,
        Reject::DuplicateKey,
        Reject::TooShort,
        Reject::BadCrc,
        Reject::BadVersion,
        Reject::BadPayload,
        Reject::Truncated,
        Reject::DecoderPanic,
        Reject::OversizePacket,
        Reject::NoResponse,
        Reject::WrongUnit,
        Reject::ShortReply,
        Reject::OverlongReply,
        Reject::Exception,
        Reject::BadReply,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// The metric key.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Oversize => "oversize",
            Reject::BadCobs => "bad_cobs",
            Reject::BadUtf8 => "bad_utf8",
            Reject::BadJson => "bad_json",
            Reject::TooDeep => "too_deep",
            Reject::NotObject => "not_object",
            Reject::ReservedKey => "reserved_key",
            Reject::BadKv => "bad_kv",
            Reject::NonFinite => "non_finite",
            Reject::DuplicateKey => "duplicate_key",
            Reject::TooShort => "too_short",
            Reject::BadCrc => "bad_crc",
            Reject::BadVersion => "bad_version",
            Reject::BadPayload => "bad_payload",
            Reject::Truncated => "truncated",
            Reject::DecoderPanic => "decoder_panic",
            Reject::OversizePacket => "oversize_packet",
            Reject::NoResponse => "no_response",
            Reject::WrongUnit => "wrong_unit",
            Reject::ShortReply => "short_reply",
            Reject::OverlongReply => "overlong_reply",
            Reject::Exception => "exception",
            Reject::BadReply => "bad_reply",
        }
    }

    /// A Modbus poll's failure rather than a bad frame.
    pub fn is_poll_failure(self) -> bool {
        matches!(
            self,
            Reject::NoResponse
                | Reject::WrongUnit
                | Reject::ShortReply
                | Reject::OverlongReply
                | Reject::Exception
                | Reject::BadReply
        )
    }

    /// Index into per-reason counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl From<sensorgate_wire::DecodeError> for Reject {
    fn from(e: sensorgate_wire::DecodeError) -> Self {
        use sensorgate_wire::DecodeError as E;
        match e {
            E::TooShort => Reject::TooShort,
            E::BadCrc => Reject::BadCrc,
            E::UnsupportedVersion(_) => Reject::BadVersion,
            E::BadPayload => Reject::BadPayload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_position_in_all() {
        for (i, r) in Reject::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
    }
}
