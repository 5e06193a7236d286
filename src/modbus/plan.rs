//! Which read requests cover a slave's points: adjacent points of a table share a request, up
//! to the protocol's limit per request; a gap wider than [`MAX_GAP_WORDS`] registers (or
//! [`MAX_GAP_BITS`] bits) starts a new request, so unmapped addresses are rarely asked for
//! (many slaves answer those with exception 02).

use super::point::{Point, Table};

/// Registers of gap read rather than sending another request: a request costs ~8 bytes out,
/// 5 back and two inter-frame silences, about as much as 8 registers on the wire.
pub const MAX_GAP_WORDS: u32 = 8;
/// Bits of gap read rather than another request (a byte of bits costs one byte).
pub const MAX_GAP_BITS: u32 = 64;

/// One read request: `count` registers or bits of `table` from `start`, for `points`
/// (indices into the slave's point list, in address order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub table: Table,
    pub start: u16,
    pub count: u16,
    pub points: Vec<usize>,
}

impl Request {
    /// Bytes of the reply (unit, function, byte count, data, CRC).
    pub fn reply_len(&self) -> usize {
        5 + self.data_len()
    }

    /// Data bytes of the reply.
    pub fn data_len(&self) -> usize {
        if self.table.is_bits() {
            usize::from(self.count).div_ceil(8)
        } else {
            2 * usize::from(self.count)
        }
    }
}

/// The requests that read `points`, by table (coils, discrete, holding, input) then address.
/// Points must fit in the address space (`Point::end` ≤ 65536) and be no wider than a request;
/// validation makes sure of both.
pub fn plan(points: &[Point]) -> Vec<Request> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by_key(|&i| (points[i].table, points[i].address));
    let mut requests: Vec<Request> = Vec::new();
    for i in order {
        let p = &points[i];
        let gap = if p.table.is_bits() { MAX_GAP_BITS } else { MAX_GAP_WORDS };
        let joins = requests.last_mut().filter(|r| {
            let end = u32::from(r.start) + u32::from(r.count);
            r.table == p.table
                && u32::from(p.address) <= end + gap
                && p.end().max(end) - u32::from(r.start) <= u32::from(p.table.max_per_request())
        });
        match joins {
            Some(r) => {
                let end = (u32::from(r.start) + u32::from(r.count)).max(p.end());
                r.count = (end - u32::from(r.start)) as u16;
                r.points.push(i);
            }
            None => requests.push(Request { table: p.table, start: p.address, count: p.width(), points: vec![i] }),
        }
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modbus::point::PointType;

    fn p(table: Table, address: u16, kind: PointType) -> Point {
        Point {
            name: format!("{}{address}", table.as_str()),
            table,
            address,
            kind,
            word_order: None,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            writable: false,
        }
    }

    #[test]
    fn adjacent_points_share_a_request_and_large_gaps_split() {
        use PointType::*;
        let points = [
            p(Table::Holding, 10, F32), // 10..12
            p(Table::Input, 0, U16),
            p(Table::Holding, 0, U16),  // 0..1, gap of 9 to 10: too wide
            p(Table::Holding, 12, U64), // 12..16, adjacent
            p(Table::Holding, 20, U16), // gap of 4: joins
            p(Table::Coil, 5, Bool),
            p(Table::Coil, 3000, Bool), // far: own request
        ];
        let r = plan(&points);
        let summary: Vec<_> = r.iter().map(|r| (r.table, r.start, r.count, r.points.clone())).collect();
        assert_eq!(
            summary,
            [
                (Table::Coil, 5, 1, vec![5]),
                (Table::Coil, 3000, 1, vec![6]),
                (Table::Holding, 0, 1, vec![2]),
                (Table::Holding, 10, 11, vec![0, 3, 4]),
                (Table::Input, 0, 1, vec![1]),
            ]
        );
        assert_eq!(r[3].reply_len(), 5 + 22);
        assert_eq!(r[0].reply_len(), 6);
    }

    #[test]
    fn a_request_never_exceeds_the_protocol_limit() {
        let points: Vec<Point> = (0..300).map(|a| p(Table::Input, a, PointType::U16)).collect();
        let r = plan(&points);
        assert_eq!(r.iter().map(|r| r.count).collect::<Vec<_>>(), [125, 125, 50]);
        let bits: Vec<Point> = (0..4100).map(|a| p(Table::Discrete, a, PointType::Bool)).collect();
        assert_eq!(plan(&bits).iter().map(|r| r.count).collect::<Vec<_>>(), [2000, 2000, 100]);
        // The last register of the address space.
        let top = plan(&[p(Table::Holding, 65534, PointType::U32)]);
        assert_eq!((top[0].start, top[0].count), (65534, 2));
    }
}
