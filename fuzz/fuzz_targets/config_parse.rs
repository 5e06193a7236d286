//! `Config::from_toml` on arbitrary text (invalid UTF-8 replaced). It must never panic; a
//! config it accepts must pass validation again and build every device's framer, decoder and
//! payload builder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::config::Config;
use sensorgate_fuzz::TestDevice;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Config::from_toml(&text) {
        Ok(c) => {
            assert!(c.validate().is_empty());
            assert!(!c.devices.is_empty());
            let _ = c.client_id();
            for d in &c.devices {
                let stream = d.stream().expect("every [[device]] is a stream input");
                assert!((16..=65536).contains(&stream.max_frame()));
                let _ = stream.framer();
                let _ = stream.decoder();
                let _ = TestDevice::new(d).sink();
            }
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "rejected without a problem");
            let lines = text.matches('\n').count() + 1;
            for p in &problems {
                assert!(!p.key.is_empty() && !p.fix.is_empty(), "{p:?}");
                // Known gap: toml 0.8 reports some syntax errors (e.g. a stray '\r') with an
                // empty message, which from_toml passes on. Only syntax errors (which come alone,
                // with a line) may have one; every validation problem must say what is wrong.
                assert!(!p.message.is_empty() || (problems.len() == 1 && p.line.is_some()), "{p:?}");
                if let Some(l) = p.line {
                    assert!((1..=lines).contains(&l), "line {l} of {lines}: {p:?}");
                }
            }
        }
    }
});
