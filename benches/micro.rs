//! Micro-benchmarks for the per-reading work on our side of the pipeline: framing, decoding
//! (with payload assembly) and the queue. `cargo bench --bench micro`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sensorgate::config::{Config, DeviceConfig};
use sensorgate::decode::Format;
use sensorgate::framing::Framing;
use sensorgate::queue::ReadingQueue;
use sensorgate::reading::PayloadBuilder;
use sensorgate::simulate::SimSpec;

const READINGS: u64 = 1000;

fn device(framing: &str, format: &str) -> DeviceConfig {
    let text = format!(
        "[gateway]\nid = \"b\"\n[[device]]\nname = \"d\"\npath = \"/dev/x\"\nframing = \"{framing}\"\nformat = \"{format}\"\n\
         [[device.channel]]\nid = 0\nname = \"temp\"\nunit = \"C\"\n"
    );
    let text = if format == "postcard" { text } else { text.split("[[device.channel]]").next().unwrap().to_string() };
    Config::from_toml(&text).unwrap().devices.remove(0)
}

fn stream(spec: SimSpec) -> Vec<u8> {
    let mut out = Vec::new();
    for n in 0..READINGS {
        spec.render(n, 1_795_000_000_000_000 + n, &mut out);
    }
    out
}

fn pipeline(c: &mut Criterion) {
    let cases = [
        ("lines_json", "lines", "json", SimSpec { framing: Framing::Lines, format: Format::Json }),
        ("lines_kv", "lines", "kv", SimSpec { framing: Framing::Lines, format: Format::Kv }),
        ("cobs_postcard", "cobs", "postcard", SimSpec { framing: Framing::Cobs, format: Format::Postcard }),
    ];
    let mut g = c.benchmark_group("frame+decode");
    g.throughput(Throughput::Elements(READINGS));
    for (name, framing, format, spec) in cases {
        let dev = device(framing, format);
        let settings = dev.stream().expect("a stream device");
        let bytes = stream(spec);
        // As the session delivers them: chunks of up to 4 KiB.
        let chunks: Vec<&[u8]> = bytes.chunks(4096).collect();
        g.bench_function(format!("framing_only/{name}"), |b| {
            let mut framer = settings.framer();
            b.iter(|| {
                let mut frames = 0;
                for ch in &chunks {
                    framer.push(ch, |f| frames += usize::from(f.is_ok()));
                }
                assert_eq!(frames as u64, READINGS);
            })
        });
        g.bench_function(format!("framing+decoding+payload/{name}"), |b| {
            let mut framer = settings.framer();
            let mut decoder = settings.decoder();
            let mut builder = PayloadBuilder::new(&dev.name, dev.channels());
            let mut seq = 0;
            b.iter(|| {
                let mut ok = 0;
                for ch in &chunks {
                    framer.push(ch, |f| {
                        seq += 1;
                        if let Ok(frame) = f {
                            ok += usize::from(
                                builder.build(frame.len(), seq, 1, |out| decoder.decode(frame, out)).is_ok(),
                            );
                        }
                    });
                }
                assert_eq!(ok as u64, READINGS);
            })
        });
    }
    g.finish();
}

fn queue(c: &mut Criterion) {
    let mut g = c.benchmark_group("queue");
    g.throughput(Throughput::Elements(READINGS));
    let payload =
        Bytes::from_static(br#"{"n":1,"temp":21.5,"hum":40.0,"_gw":{"device":"d","seq":1,"received_at_us":1}}"#);
    g.bench_function("push+pop+ack (QoS 1, 16 devices)", |b| {
        let q = ReadingQueue::new(16, 10_000, 8 << 20, None, 100);
        b.iter(|| {
            for i in 0..READINGS {
                q.push((i % 16) as usize, payload.clone());
                q.pop_next().unwrap();
                let pkid = (i % 100 + 1) as u16;
                q.on_published(pkid);
                q.on_acked(pkid);
            }
        })
    });
    g.bench_function("push into a full queue (drop oldest, 16 devices)", |b| {
        b.iter_batched(
            || {
                let q = ReadingQueue::new(16, 1000, 8 << 20, None, 100);
                for i in 0..1000 {
                    q.push(i % 16, payload.clone());
                }
                q
            },
            |q| {
                for i in 0..READINGS {
                    q.push((i % 16) as usize, payload.clone());
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, pipeline, queue);
criterion_main!(benches);
