//! A running gateway recording what one device's port sends (the `record` command), into a
//! capture file (see [`crate::capture`]) that `sensorgate simulate --replay` plays back.
//! Bounded in time and size; nothing is done per read while no recording runs but one atomic
//! load.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::capture;
use crate::config::PortConfig;

/// A device's recording slot, shared by its sessions (a recording spans reconnects).
#[derive(Debug, Default)]
pub struct Recorder {
    active: AtomicBool,
    slot: Mutex<Option<Recording>>,
}

#[derive(Debug)]
struct Recording {
    w: BufWriter<File>,
    path: PathBuf,
    started: Instant,
    until: Instant,
    bytes: u64,
    max_bytes: u64,
}

impl Recorder {
    /// Starts recording `port`'s bytes into a new file in `dir` for `duration` or `max_bytes`,
    /// whichever comes first. Returns the file's path.
    ///
    /// # Errors
    /// A recording of this device runs already, or the file cannot be created.
    pub fn start(
        &self,
        dir: &Path,
        device: &str,
        port: &PortConfig,
        duration: Duration,
        max_bytes: u64,
    ) -> Result<PathBuf, String> {
        let mut slot = self.slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(r) = slot.as_ref() {
            if Instant::now() < r.until {
                return Err(format!("a recording of {device:?} runs already, into {}", r.path.display()));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let path = dir.join(format!("{device}-{}.sgcap", now.as_secs()));
        let file = File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let mut w = BufWriter::new(file);
        let header = capture::Header {
            port: port.path.display().to_string(),
            baud: port.baud,
            data_bits: port.data_bits,
            parity: format!("{:?}", port.parity).to_lowercase(),
            stop_bits: port.stop_bits,
            started_at_us: now.as_micros() as u64,
            recorder: format!("sensorgate {} (record command)", env!("CARGO_PKG_VERSION")),
        };
        capture::write_header(&mut w, &header)
            .and_then(|()| w.flush())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let started = Instant::now();
        *slot = Some(Recording { w, path: path.clone(), started, until: started + duration, bytes: 0, max_bytes });
        self.active.store(true, Relaxed);
        tracing::info!(device, file = %path.display(), seconds = duration.as_secs_f64(), max_bytes, "Recording the port.");
        Ok(path)
    }

    /// Bytes just read from the device's port. Each chunk is written through (a recording is
    /// whole up to its last read whenever it is looked at).
    pub fn tap(&self, device: &str, bytes: &[u8]) {
        if !self.active.load(Relaxed) {
            return;
        }
        let mut slot = self.slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(r) = slot.as_mut() else { return };
        let now = Instant::now();
        let result = if now >= r.until {
            Err("time is up")
        } else {
            let at_us = now.duration_since(r.started).as_micros() as u64;
            match capture::write_chunk(&mut r.w, at_us, bytes).and_then(|()| r.w.flush()) {
                Ok(()) => {
                    r.bytes += bytes.len() as u64;
                    if r.bytes >= r.max_bytes {
                        Err("it reached max_bytes")
                    } else {
                        Ok(())
                    }
                }
                Err(e) => {
                    tracing::error!(device, file = %r.path.display(), error = %e, "Recording: cannot write; stopped.");
                    Err("a write failed")
                }
            }
        };
        if let Err(why) = result {
            let r = slot.take().expect("checked above");
            self.active.store(false, Relaxed);
            tracing::info!(device, file = %r.path.display(), bytes = r.bytes, why, "Recording finished.");
        }
    }
}
