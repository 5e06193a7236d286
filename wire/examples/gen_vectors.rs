fn main() {
    use sensorgate_wire::*;
    let mut cases = vec![];
    let r = ReadingV1::new(0);
    cases.push(("empty reading, seq 0", r));
    let mut r = ReadingV1::new(1);
    r.channels.push(Channel { id: 0, value: Value::F32(21.5) }).unwrap();
    cases.push(("one f32 channel", r));
    let mut r = ReadingV1::new(300);
    r.channels.push(Channel { id: 0, value: Value::F32(21.5) }).unwrap();
    r.channels.push(Channel { id: 1, value: Value::I32(-2) }).unwrap();
    r.channels.push(Channel { id: 7, value: Value::Bool(true) }).unwrap();
    cases.push(("three channels, seq 300", r));
    for (name, r) in cases {
        let mut b = [0u8; MAX_FRAME_LEN];
        let n = encode_frame(&r, &mut b).unwrap();
        println!("{name}: {:02x?}", &b[..n]);
    }
}
