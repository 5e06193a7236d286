//! Committed test vectors: the byte format, pinned. Firmware authors can check their encoder
//! against these (README.md "Wire format" explains each byte). Regenerate the table with
//! `cargo run -p sensorgate-wire --example gen_vectors` only for a new version.

use sensorgate_wire::{decode_body, encode_frame, Channel, DecodeError, ReadingV1, Value, MAX_FRAME_LEN};

fn reading(seq: u32, channels: &[(u8, Value)]) -> ReadingV1 {
    let mut r = ReadingV1::new(seq);
    for &(id, value) in channels {
        r.channels.push(Channel { id, value }).unwrap();
    }
    r
}

fn vectors() -> Vec<(ReadingV1, &'static [u8])> {
    vec![
        // body 01 00 00 | crc 25 b3 83 fe
        (reading(0, &[]), &[0x02, 0x01, 0x01, 0x05, 0x25, 0xb3, 0x83, 0xfe, 0x00]),
        // body 01 01 01 | 00 00 0000ac41 (id 0, F32 21.5) | crc 2489c698
        (
            reading(1, &[(0, Value::F32(21.5))]),
            &[0x04, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x07, 0xac, 0x41, 0x24, 0x89, 0xc6, 0x98, 0x00],
        ),
        // body 01 ac02 (seq 300 varint) 03 | 00 00 0000ac41 | 01 01 03 (id 1, I32 -2 zigzag) | 07 02 01 (id 7, Bool true) | crc 88a926
        (
            reading(300, &[(0, Value::F32(21.5)), (1, Value::I32(-2)), (7, Value::Bool(true))]),
            &[
                0x05, 0x01, 0xac, 0x02, 0x03, 0x01, 0x01, 0x01, 0x0d, 0xac, 0x41, 0x01, 0x01, 0x03, 0x07, 0x02, 0x01,
                0x02, 0x88, 0xa9, 0x26, 0x00,
            ],
        ),
    ]
}

#[test]
fn encoding_matches_the_committed_bytes() {
    for (r, bytes) in vectors() {
        let mut buf = [0u8; MAX_FRAME_LEN];
        let n = encode_frame(&r, &mut buf).unwrap();
        assert_eq!(&buf[..n], bytes, "{r:?}");
    }
}

#[test]
fn committed_bytes_decode_to_the_reading() {
    for (r, bytes) in vectors() {
        let mut body = vec![0u8; bytes.len()];
        let n = cobs::decode(&bytes[..bytes.len() - 1], &mut body).unwrap();
        assert_eq!(decode_body(&body[..n]), Ok(r));
    }
}

#[test]
fn every_single_bit_flip_is_caught() {
    let (r, bytes) = vectors().remove(2);
    let mut body = vec![0u8; bytes.len()];
    let n = cobs::decode(&bytes[..bytes.len() - 1], &mut body).unwrap();
    body.truncate(n);
    assert_eq!(decode_body(&body), Ok(r));
    for i in 0..body.len() * 8 {
        let mut b = body.clone();
        b[i / 8] ^= 1 << (i % 8);
        assert_eq!(decode_body(&b), Err(DecodeError::BadCrc), "bit {i}");
    }
}

#[test]
fn largest_reading_fits_max_frame_len() {
    let all: Vec<(u8, Value)> = (0..16).map(|i| (i, Value::I32(i32::MIN))).collect();
    let mut buf = [0u8; MAX_FRAME_LEN];
    let n = encode_frame(&reading(u32::MAX, &all), &mut buf).unwrap();
    assert!(n <= MAX_FRAME_LEN);
}
