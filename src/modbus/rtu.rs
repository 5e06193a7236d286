//! One RTU transaction's bytes: the request (built by rmodbus, CRC included), how long the
//! reply will be once its first bytes are in, and what the reply says. Timing (the
//! inter-frame silence, the wire time of a frame) is computed here too; waiting is the bus
//! task's job.

use std::time::Duration;

use rmodbus::client::ModbusRequest;
use rmodbus::{ErrorKind, ModbusProto};

use super::plan::Request;
use super::point::Encoded;
use crate::reject::Reject;

/// Why a transaction gave no usable reply. Each is a metric reason (see [`Fault::reject`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("no response within the request timeout")]
    NoResponse,
    #[error("reply with a bad CRC")]
    BadCrc,
    #[error("reply from unit {0} instead")]
    WrongUnit(u8),
    #[error("reply cut short")]
    Short,
    #[error("reply longer than the request asks for")]
    Overlong,
    #[error("exception {0:02}: {name}", name = exception_name(*.0))]
    Exception(u8),
    #[error("reply that does not answer the request")]
    Malformed,
}

impl Fault {
    /// The rejection a poll that failed this way is counted as.
    pub fn reject(self) -> Reject {
        match self {
            Fault::NoResponse => Reject::NoResponse,
            Fault::BadCrc => Reject::BadCrc,
            Fault::WrongUnit(_) => Reject::WrongUnit,
            Fault::Short => Reject::ShortReply,
            Fault::Overlong => Reject::OverlongReply,
            Fault::Exception(_) => Reject::Exception,
            Fault::Malformed => Reject::BadReply,
        }
    }

    /// Worth asking again: the slave may answer cleanly next time (the contract:
    /// retries follow a timeout or a bad CRC; a cut-off reply is a timeout too).
    pub fn is_retried(self) -> bool {
        matches!(self, Fault::NoResponse | Fault::BadCrc | Fault::Short)
    }
}

/// The standard exception names (Modbus application protocol 1.1b3, 7).
pub fn exception_name(code: u8) -> &'static str {
    match code {
        1 => "illegal function",
        2 => "illegal data address",
        3 => "illegal data value",
        4 => "server device failure",
        5 => "acknowledge",
        6 => "server device busy",
        8 => "memory parity error",
        10 => "gateway path unavailable",
        11 => "gateway target device failed to respond",
        _ => "unknown exception",
    }
}

/// One request to one slave and what its reply must look like.
#[derive(Debug)]
pub struct Transaction {
    req: ModbusRequest,
    bytes: Vec<u8>,
    /// Length of a normal (not exception) reply.
    reply_len: usize,
}

impl Transaction {
    /// Reads `r` from `unit`.
    pub fn read(unit: u8, r: &Request) -> Self {
        let mut req = ModbusRequest::new(unit, ModbusProto::Rtu);
        let mut bytes = Vec::with_capacity(8);
        let built = match r.table {
            super::Table::Coil => req.generate_get_coils(r.start, r.count, &mut bytes),
            super::Table::Discrete => req.generate_get_discretes(r.start, r.count, &mut bytes),
            super::Table::Holding => req.generate_get_holdings(r.start, r.count, &mut bytes),
            super::Table::Input => req.generate_get_inputs(r.start, r.count, &mut bytes),
        };
        built.expect("a planned read fits a frame");
        Self { req, bytes, reply_len: r.reply_len() }
    }

    /// Writes `value` at `address` of `unit` (05 for a coil, 06 for one register, 16 for more).
    pub fn write(unit: u8, address: u16, value: &Encoded) -> Self {
        let mut req = ModbusRequest::new(unit, ModbusProto::Rtu);
        let mut bytes = Vec::with_capacity(16);
        let built = match value {
            Encoded::Bit(b) => req.generate_set_coil(address, u8::from(*b), &mut bytes),
            Encoded::Words(w) if w.len() == 1 => req.generate_set_holding(address, w[0], &mut bytes),
            Encoded::Words(w) => req.generate_set_holdings_bulk(address, w, &mut bytes),
        };
        built.expect("a point's words fit a frame");
        Self { req, bytes, reply_len: 8 }
    }

    /// The request frame.
    pub fn request(&self) -> &[u8] {
        &self.bytes
    }

    /// The unit asked.
    pub fn unit(&self) -> u8 {
        self.req.unit_id
    }

    /// The length of the whole reply, once `head` (the bytes received so far) tells it: an
    /// exception reply is 5 bytes, any other is as long as this request's answer (a reply of
    /// another length is short or overlong, whatever its byte count claims).
    pub fn reply_len(&self, head: &[u8]) -> Option<usize> {
        match head.get(1) {
            None => None,
            Some(f) if f & 0x80 != 0 => Some(5),
            Some(_) => Some(self.reply_len),
        }
    }

    /// The data of a complete `reply` (exactly [`reply_len`](Self::reply_len) bytes): the
    /// register or bit bytes of a read, the echo of a write.
    ///
    /// # Errors
    /// What is wrong with it. A bad CRC is reported before anything the corrupted bytes say.
    pub fn check<'a>(&self, reply: &'a [u8]) -> Result<&'a [u8], Fault> {
        let read = self.req.func.is_read();
        match self.req.parse_ok(reply) {
            Ok(()) if reply.len() != self.reply_len || (read && usize::from(reply[2]) + 5 != self.reply_len) => {
                Err(Fault::Malformed)
            }
            Ok(()) => Ok(&reply[if read { 3 } else { 2 }..reply.len() - 2]),
            Err(ErrorKind::FrameCRCError) => Err(Fault::BadCrc),
            Err(_) if reply.len() < 5 => Err(Fault::Short),
            Err(_) if reply[0] != self.req.unit_id => Err(Fault::WrongUnit(reply[0])),
            Err(_) if reply[1] == self.req.func.byte() | 0x80 => Err(Fault::Exception(reply[2])),
            Err(_) => Err(Fault::Malformed),
        }
    }
}

/// The registers in a read reply's data.
pub fn words(data: &[u8]) -> impl Iterator<Item = u16> + '_ {
    data.chunks_exact(2).map(|w| u16::from_be_bytes([w[0], w[1]]))
}

/// Bit `i` of a coil or discrete reply's data (LSB of the first byte is the first bit).
pub fn bit(data: &[u8], i: usize) -> bool {
    data.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1)
}

/// One character on the wire: start bit, 8 data bits, parity or a second stop bit, stop bit.
pub fn char_time(baud: u32) -> Duration {
    Duration::from_nanos(11_000_000_000 / u64::from(baud.max(1)))
}

/// Time `bytes` take on the wire.
pub fn wire_time(bytes: usize, baud: u32) -> Duration {
    char_time(baud) * bytes as u32
}

/// The silence that ends a frame: 3.5 characters, and 1.75 ms above 19200 baud (Modbus over
/// serial line 1.02, 2.5.1.1).
pub fn silence(baud: u32) -> Duration {
    if baud > 19_200 {
        Duration::from_micros(1750)
    } else {
        char_time(baud) * 7 / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modbus::Table;

    fn read(unit: u8, table: Table, start: u16, count: u16) -> Transaction {
        Transaction::read(unit, &Request { table, start, count, points: vec![] })
    }

    /// A reply as a slave would build it (rmodbus's server side), for unit `unit`.
    fn reply(unit: u8, request: &[u8], holdings: &[u16]) -> Vec<u8> {
        let mut ctx = rmodbus::server::storage::ModbusStorageSmall::new();
        for (i, v) in holdings.iter().enumerate() {
            ctx.holdings[i] = *v;
        }
        let mut out = Vec::new();
        let mut frame = rmodbus::server::ModbusFrame::new(unit, request, ModbusProto::Rtu, &mut out);
        frame.parse().unwrap();
        frame.process_read(&ctx).unwrap();
        frame.finalize_response().unwrap();
        out
    }

    #[test]
    fn a_read_and_its_reply() {
        let t = read(7, Table::Holding, 0, 2);
        assert_eq!(&t.request()[..6], &[7, 3, 0, 0, 0, 2]);
        let r = reply(7, t.request(), &[0x1234, 0xABCD]);
        assert_eq!(t.reply_len(&r[..1]), None);
        assert_eq!(t.reply_len(&r[..2]), Some(9));
        assert_eq!(r.len(), 9);
        let data = t.check(&r).unwrap();
        assert_eq!(words(data).collect::<Vec<_>>(), [0x1234, 0xABCD]);
    }

    #[test]
    fn every_fault_is_told_apart() {
        let t = read(7, Table::Holding, 0, 2);
        let good = reply(7, t.request(), &[1, 2]);
        let mut crc = good.clone();
        crc[4] ^= 0x40;
        assert_eq!(t.check(&crc), Err(Fault::BadCrc));
        // A well-formed reply from unit 9 (its own CRC is right).
        let other = reply(9, read(9, Table::Holding, 0, 2).request(), &[1, 2]);
        assert_eq!(t.check(&other), Err(Fault::WrongUnit(9)));
        // An exception reply: unit, function | 0x80, code, CRC.
        let mut ctx = rmodbus::server::storage::ModbusStorageSmall::new();
        ctx.holdings[0] = 0;
        let far = read(7, Table::Holding, 60_000, 2);
        let mut out = Vec::new();
        let mut frame = rmodbus::server::ModbusFrame::new(7, far.request(), ModbusProto::Rtu, &mut out);
        frame.parse().unwrap();
        // rmodbus turns an address outside its storage into exception 02 itself.
        frame.process_read(&ctx).unwrap();
        frame.finalize_response().unwrap();
        assert_eq!(far.reply_len(&out), Some(5));
        assert_eq!(far.check(&out), Err(Fault::Exception(2)));
        assert_eq!(Fault::Exception(2).to_string(), "exception 02: illegal data address");
        // The answer to a different read (one register, not two): CRC fine, wrong shape.
        let short = reply(7, read(7, Table::Holding, 0, 1).request(), &[1]);
        assert_eq!(t.check(&short), Err(Fault::Malformed));
    }

    #[test]
    fn writes_and_coils() {
        let w = Transaction::write(3, 10, &Encoded::Words(vec![1, 2]));
        assert_eq!(&w.request()[..7], &[3, 0x10, 0, 10, 0, 2, 4]);
        let c = Transaction::write(3, 5, &Encoded::Bit(true));
        assert_eq!(&c.request()[..6], &[3, 5, 0, 5, 0xFF, 0]);
        // A write's reply echoes the request's first six bytes.
        assert_eq!(c.check(c.request()), Ok(&[0, 5, 0xFF, 0][..]));
        assert!(bit(&[0b0000_0100, 1], 2) && bit(&[0, 1], 8) && !bit(&[0, 1], 9) && !bit(&[], 0));
    }

    #[test]
    fn timing() {
        assert_eq!(char_time(9600), Duration::from_nanos(1_145_833));
        assert_eq!(silence(9600), Duration::from_nanos(4_010_415));
        assert_eq!(silence(115_200), Duration::from_micros(1750));
        assert_eq!(wire_time(8, 9600), Duration::from_nanos(9_166_664));
    }
}
