//! The gateway's workload: readings of 16 devices, round-robin, in batches, rebuilt from their index.
//!
//! Every reading is a pure function of its global index `i`, so a reader can check each record it
//! gets back byte for byte without keeping a copy of what was written.

use std::io::Write;

pub const DEVICES: u64 = 16;
/// One `sync_interval` worth of readings at 1000/s: one durability barrier per batch.
pub const BATCH: usize = 1000;
/// 2025-12-02 08:00 UTC, the `received_at_us` of reading 0.
pub const BASE_US: u64 = 1_764_662_400_000_000;
/// 16 devices × 1000 readings/s: one reading every 62.5 µs; 62 keeps `at_us` an exact integer map.
pub const STEP_US: u64 = 62;

pub const DEVICE_NAMES: [&str; DEVICES as usize] = [
    "dev-00", "dev-01", "dev-02", "dev-03", "dev-04", "dev-05", "dev-06", "dev-07", "dev-08", "dev-09", "dev-10",
    "dev-11", "dev-12", "dev-13", "dev-14", "dev-15",
];

pub fn device_of(i: u64) -> usize {
    (i % DEVICES) as usize
}

pub fn at_us(i: u64) -> u64 {
    BASE_US + i * STEP_US
}

/// The index of the reading received at `at_us`, if `at_us` is one of ours.
pub fn index_of_at(at: u64) -> Option<u64> {
    let d = at.checked_sub(BASE_US)?;
    (d % STEP_US == 0).then_some(d / STEP_US)
}

/// Appends the JSON payload of reading `i` (about 150 bytes, like a JSON-lines sensor's reading
/// with the gateway's `_gw` metadata) to `out`.
pub fn payload(i: u64, out: &mut Vec<u8>) {
    let dev = device_of(i);
    let seq = i / DEVICES;
    let x = i.wrapping_mul(2_654_435_761) >> 7;
    write!(
        out,
        r#"{{"t":{}.{:02},"h":{}.{},"p":{}.{:02},"co2":{},"bat":3.{:02},"rssi":-{},"seq":{},"_gw":{{"device":"{}","seq":{},"received_at_us":{}}}}}"#,
        15 + x % 15,
        x % 100,
        30 + (x >> 5) % 40,
        (x >> 3) % 10,
        990 + (x >> 9) % 40,
        (x >> 11) % 100,
        400 + (x >> 13) % 900,
        (x >> 17) % 100,
        40 + (x >> 19) % 50,
        seq,
        DEVICE_NAMES[dev],
        seq,
        at_us(i),
    )
    .expect("writing to a Vec cannot fail");
}

/// One record as a store hands it over: its index and where its payload sits in `Batch::bytes`.
#[derive(Clone, Copy, Debug)]
pub struct Rec {
    pub i: u64,
    pub start: usize,
    pub end: usize,
}

/// Records with their payloads in one buffer, reused batch after batch (no allocation per reading).
#[derive(Default)]
pub struct Batch {
    pub recs: Vec<Rec>,
    pub bytes: Vec<u8>,
}

impl Batch {
    pub fn clear(&mut self) {
        self.recs.clear();
        self.bytes.clear();
    }

    pub fn push(&mut self, i: u64, payload: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(payload);
        self.recs.push(Rec { i, start, end: self.bytes.len() });
    }

    /// Fills the batch with readings `first..first + n`.
    pub fn generate(&mut self, first: u64, n: usize) {
        self.clear();
        for i in first..first + n as u64 {
            let start = self.bytes.len();
            payload(i, &mut self.bytes);
            self.recs.push(Rec { i, start, end: self.bytes.len() });
        }
    }

    pub fn payload(&self, r: &Rec) -> &[u8] {
        &self.bytes[r.start..r.end]
    }

    pub fn len(&self) -> usize {
        self.recs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }
}
