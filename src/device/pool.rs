//! The input threads: a few threads (one per core at most), each with a single-threaded
//! runtime of its own, on which the stream devices' supervisors run — their port reads and
//! their decoding included.
//!
//! Why not a thread per device any more: at one reading per write, each reading woke its
//! device's thread (and, before that, a shared worker to read the port and hand the chunk
//! over), and those wake-ups were most of the gateway's CPU: ~3.5–4x a single-threaded
//! forwarder at 16 x 1000/s. One thread watching many ports takes every port that is ready
//! in one wake-up, as the forwarder does; at that rate it wakes about a fifth as often.
//! Decoding still never runs on the runtime that owns the MQTT connection, buses, commands
//! and health. A decoder that turns out slow is moved to a thread of its own (see
//! `session.rs`), so it delays the devices sharing its input thread once, not for good.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Readiness events taken per reactor turn: enough for every port of a large gateway, far
/// below tokio's default of 1024 (only memory).
const EVENTS_PER_TICK: usize = 256;
/// How long a thread that opened a port (open(2) and the termios ioctls block, so they run on
/// a runtime's blocking pool) is kept. Short: ports are reopened only after a failure.
const OPENER_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(1);

struct InputThread {
    handle: Handle,
    /// Supervisors running on it now: a new one goes to the least loaded thread.
    load: Arc<AtomicUsize>,
    /// Dropped with the pool: the thread's runtime then stops, in the background.
    _stop: oneshot::Sender<()>,
}

/// The input threads; dropping the pool stops them.
pub struct InputPool {
    threads: Vec<InputThread>,
}

impl InputPool {
    /// Starts `threads` input threads (at least one).
    ///
    /// # Errors
    /// A thread or its runtime could not be created.
    pub fn new(threads: usize) -> io::Result<Self> {
        let threads = (0..threads.max(1)).map(start_thread).collect::<io::Result<_>>()?;
        Ok(Self { threads })
    }

    /// As many threads as `devices` need on this machine: one per core, fewer for fewer devices.
    pub fn size_for(devices: usize) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        devices.clamp(1, cores)
    }

    /// Runs `task` on the least loaded input thread. The handle can be awaited from any
    /// runtime and carries the task's panic, like `tokio::spawn`'s.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let t = self.threads.iter().min_by_key(|t| t.load.load(Relaxed)).expect("at least one input thread");
        let load = Arc::clone(&t.load);
        load.fetch_add(1, Relaxed);
        t.handle.spawn(async move {
            // Decremented however the task ends (a panic drops this future too).
            let _load = Leaving(load);
            task.await;
        })
    }
}

struct Leaving(Arc<AtomicUsize>);

impl Drop for Leaving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn start_thread(i: usize) -> io::Result<InputThread> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_io_events_per_tick(EVENTS_PER_TICK)
        .thread_name(format!("open-{i}"))
        .thread_keep_alive(OPENER_KEEP_ALIVE)
        .build()?;
    let handle = rt.handle().clone();
    let (stop_tx, stop) = oneshot::channel::<()>();
    std::thread::Builder::new().name(format!("input-{i}")).spawn(move || {
        let _ = rt.block_on(stop);
        // Not `drop(rt)`: that would wait for an open(2) stuck in the kernel.
        rt.shutdown_background();
    })?;
    Ok(InputThread { handle, load: Arc::new(AtomicUsize::new(0)), _stop: stop_tx })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each new task goes to the least loaded thread; a task that ends (or panics) frees its
    /// place; tasks run on the input threads, named `input-<n>`; the handle carries a panic.
    #[tokio::test]
    async fn spreads_tasks_over_the_least_loaded_thread_and_frees_their_place() {
        let pool = InputPool::new(2).unwrap();
        let loads = || pool.threads.iter().map(|t| t.load.load(Relaxed)).collect::<Vec<_>>();
        let (release, wait) = tokio::sync::watch::channel(false);
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut wait = wait.clone();
            held.push(pool.spawn(async move {
                let _ = wait.wait_for(|go| *go).await;
            }));
        }
        assert_eq!(loads(), [2, 1]);
        let (tx, rx) = oneshot::channel();
        pool.spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_string));
        })
        .await
        .unwrap();
        assert_eq!(rx.await.unwrap().as_deref(), Some("input-1"), "the least loaded thread");
        let panicked = pool.spawn(async { panic!("boom") }).await;
        assert!(panicked.unwrap_err().is_panic());
        assert_eq!(loads(), [2, 1], "ended and panicked tasks gave their place back");
        release.send(true).unwrap();
        for h in held {
            h.await.unwrap();
        }
        assert_eq!(loads(), [0, 0]);
    }
}
