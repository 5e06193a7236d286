//! The `sensorgate` binary: CLI, config, logging, signals, exit codes. `anyhow` lives here only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use sensorgate::capture;
use sensorgate::config::{Config, ConfigError};
use sensorgate::decode::Format;
use sensorgate::framing::Framing;
use sensorgate::scan;
use sensorgate::simulate::{self, PtyLink, SimSpec};

/// Exit status for a configuration that cannot be used (sysexits EX_CONFIG); the systemd unit
/// does not restart on it.
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(name = "sensorgate", version, about = "Serial sensors to MQTT: small, fast, bounded and supervised.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file, print every problem, exit 78 if there are any.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show a running gateway's health from what it publishes on MQTT (retained states,
    /// metrics): a table, or JSON. Exit 0: online and every device up; 1: anything else
    /// (offline, a device not up, no metrics); 2: the broker cannot be reached.
    Status {
        /// The gateway's config: broker, TLS, credentials, topic prefix, gateway id.
        #[arg(long, short, required_unless_present = "broker", conflicts_with_all = ["broker", "gateway", "prefix"])]
        config: Option<PathBuf>,
        /// HOST[:PORT] of the broker (plain TCP; port 1883 if not given), instead of --config.
        #[arg(long, value_name = "HOST[:PORT]", value_parser = parse_broker, requires = "gateway")]
        broker: Option<(String, u16)>,
        /// The gateway's id (with --broker).
        #[arg(long, value_name = "ID", value_parser = parse_gateway_id)]
        gateway: Option<String>,
        /// The topic prefix (with --broker; default "sensorgate").
        #[arg(long, value_parser = parse_prefix)]
        prefix: Option<String>,
        /// Bounds the whole run. Default: 15s, or the config's metrics_interval + 5s if longer
        /// (a metrics message must have time to arrive).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Redraw the table in place on every metrics message until Ctrl-C.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Simulate a sensor: write readings to a serial port, or to a pseudo-terminal linked at a
    /// path; or, with --modbus, answer as Modbus RTU energy meters there.
    Simulate {
        /// Create a pseudo-terminal and link its device at this path (give this path to the gateway).
        #[arg(long, conflicts_with = "port")]
        link: Option<PathBuf>,
        /// Use this existing serial port instead.
        #[arg(long, required_unless_present = "link")]
        port: Option<PathBuf>,
        #[arg(long, default_value_t = 115_200)]
        baud: u32,
        /// Serve simulated Modbus RTU meters with these unit ids (1..=247, e.g. 1,2,3) instead of
        /// sending readings, until stopped; prints the [[bus]] config that polls them. A real
        /// --port is opened 8E1 (Modbus's default).
        #[arg(
            long,
            value_name = "UNITS",
            value_delimiter = ',',
            num_args = 1..,
            value_parser = clap::value_parser!(u8).range(1..=247),
            conflicts_with_all = ["framing", "format", "rate", "count", "start"],
        )]
        modbus: Option<Vec<u8>>,
        /// lines or cobs.
        #[arg(long, value_parser = parse_framing, default_value = "lines")]
        framing: Framing,
        /// For lines: json (the default) or kv. Binary (cobs) frames are always postcard: a
        /// format the framing does not carry is replaced by the framing's default.
        #[arg(long, value_parser = parse_format)]
        format: Option<Format>,
        /// Readings per second; 0 = as fast as the port takes them.
        #[arg(long, default_value_t = 10)]
        rate: u32,
        /// Readings to send; 0 = until stopped.
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Number of the first reading.
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Play back a capture made by `sensorgate record` (its bytes, with their timing)
        /// instead of simulated readings.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["modbus", "framing", "format", "rate", "count", "start"])]
        replay: Option<PathBuf>,
        /// With --replay: play faster (2 = twice as fast) or slower (0.5).
        #[arg(long, default_value_t = 1.0, requires = "replay", value_parser = parse_speed)]
        speed: f64,
    },
    /// Find sensors on serial ports: listen at each line speed, say what each port sends, and
    /// print the config that reads them (see README "sensorgate scan").
    Scan {
        /// Ports to scan (default: every /dev/serial/by-id link, then /dev/ttyUSB*, /dev/ttyACM*,
        /// /dev/ttyAMA*, /dev/serial0, /dev/serial1 not already covered).
        paths: Vec<PathBuf>,
        /// Line speeds to listen at, in this order; a port's scan stops at the first that is readable.
        #[arg(long, value_delimiter = ',', default_value = "115200,57600,38400,19200,9600")]
        bauds: Vec<u32>,
        /// How long to listen at each speed.
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        listen: Duration,
        /// Print the results as JSON instead of a config.
        #[arg(long)]
        json: bool,
        /// Also probe ports that stayed silent for Modbus RTU slaves (this transmits: a read of
        /// holding register 0 to every unit, over each line setting).
        #[arg(long)]
        modbus: bool,
        /// With --modbus: the line speeds to probe (each 8E1, 8N1, 8N2).
        #[arg(long, value_delimiter = ',', default_value = "9600,19200,38400,115200", requires = "modbus")]
        modbus_bauds: Vec<u32>,
        /// With --modbus: the unit ids to ask, e.g. 1-10 or 5.
        #[arg(long, default_value = "1-247", value_parser = parse_units, requires = "modbus")]
        units: std::ops::RangeInclusive<u8>,
        /// With --modbus: how long a unit gets to answer.
        #[arg(long, default_value = "100ms", value_parser = parse_duration, requires = "modbus")]
        modbus_timeout: Duration,
    },
    /// Record what a serial port sends, with arrival times, into a capture file (see README
    /// "Captures") that `simulate --replay` plays back.
    Record {
        #[arg(long)]
        port: PathBuf,
        #[arg(long, default_value_t = 115_200)]
        baud: u32,
        /// The capture file to write (replaced if it exists).
        #[arg(long)]
        out: PathBuf,
        /// Stop after this many seconds (default: at Ctrl-C or SIGTERM).
        #[arg(long)]
        seconds: Option<f64>,
        /// Stop when the capture reaches this size.
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        max_bytes: u64,
    },
}

fn parse_speed(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err("give a speed above 0, e.g. 1, 2 or 0.5".into()),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (e.g. 300ms, 3s)"))
}

fn parse_units(text: &str) -> Result<std::ops::RangeInclusive<u8>, String> {
    let unit = |s: &str| s.trim().parse::<u8>().ok().filter(|u| (1..=247).contains(u));
    let range = match text.split_once('-') {
        Some((a, b)) => unit(a).zip(unit(b)).map(|(a, b)| a..=b),
        None => unit(text).map(|u| u..=u),
    };
    range.filter(|r| !r.is_empty()).ok_or_else(|| "give unit ids 1..=247 as a range, e.g. 1-10, or one id".into())
}

fn parse_size(text: &str) -> Result<u64, String> {
    text.parse::<bytesize::ByteSize>().map(|b| b.as_u64()).map_err(|e| format!("{e} (e.g. 64MiB)"))
}

/// `units` as given, or a usage error (exit 2, like every other) naming a unit given twice:
/// two meters answering as one unit would both reply to every request.
fn distinct_units(units: Vec<u8>) -> Vec<u8> {
    if let Some(unit) = units.iter().enumerate().find_map(|(i, u)| units[..i].contains(u).then_some(*u)) {
        let mut cli = Cli::command();
        cli.build();
        let simulate = cli.find_subcommand_mut("simulate").expect("the simulate subcommand exists");
        simulate
            .error(
                clap::error::ErrorKind::ValueValidation,
                format!("--modbus names unit {unit} twice: give each unit id once (e.g. --modbus 1,2,3)"),
            )
            .exit();
    }
    units
}

fn parse_broker(s: &str) -> Result<(String, u16), String> {
    sensorgate::status::parse_broker(s)
}

fn parse_gateway_id(s: &str) -> Result<String, String> {
    sensorgate::status::check_topic_name("gateway id", s, false).map(|()| s.to_string())
}

fn parse_prefix(s: &str) -> Result<String, String> {
    sensorgate::status::check_topic_name("topic prefix", s, true).map(|()| s.to_string())
}

fn parse_framing(name: &str) -> Result<Framing, String> {
    Framing::from_name(name).ok_or_else(|| format!("use one of: {}", Framing::ALL.map(Framing::as_str).join(", ")))
}

fn parse_format(name: &str) -> Result<Format, String> {
    Format::from_name(name).ok_or_else(|| format!("use one of: {}", Format::ALL.map(Format::as_str).join(", ")))
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    ignore_file_size_signal();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                // Warnings go to stderr and do not fail the check: the config works as it is.
                for w in c.warnings() {
                    eprintln!("warning: {}", w.to_string_in(&config));
                }
                println!("{}: ok ({} device(s), gateway {:?})", config.display(), c.all_devices().len(), c.gateway.id);
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(&e),
        },
        Command::Run { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => return config_failure(&e),
            };
            init_logging(cli.log_format, &config.log.filter);
            for w in config.warnings() {
                tracing::warn!(key = %w.key, problem = %w.message, fix = %w.fix, "The configuration works but is unsafe.");
            }
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => return exit_from(Err(e)),
            };
            let deadline = HardDeadline::new(config.gateway.shutdown_timeout);
            let result = rt.block_on(run(config, path, deadline.clone()));
            // The runtime's drop waits for blocking tasks (a DNS lookup in getaddrinfo cannot be
            // cancelled): not past the hard deadline, and ending before the watchdog fires.
            let budget = deadline.remaining().saturating_sub(RUNTIME_MARGIN);
            sensorgate::telemetry::shutdown_stage("blocking tasks of the runtime (a DNS lookup, a port being opened)");
            let began = Instant::now();
            rt.shutdown_timeout(budget);
            if began.elapsed() >= budget {
                tracing::error!(
                    waited_ms = budget.as_millis() as u64,
                    "Blocking tasks still running at the shutdown deadline (a DNS lookup, a port being opened); exiting without them."
                );
            }
            exit_from(result)
        }
        Command::Status { config, broker, gateway, prefix, timeout, json, watch } => {
            let target = match (config, broker) {
                (Some(path), _) => {
                    let config = match Config::load(&path) {
                        Ok(c) => c,
                        Err(e) => return config_failure(&e),
                    };
                    match sensorgate::status::Target::from_config(&config) {
                        Ok(t) => t,
                        Err(e) => {
                            eprintln!("{}: {e}", path.display());
                            return ExitCode::from(EXIT_CONFIG);
                        }
                    }
                }
                (None, Some((host, port))) => {
                    // clap: --broker requires --gateway.
                    let gateway = gateway.unwrap_or_default();
                    sensorgate::status::Target::plain(host, port, prefix.as_deref().unwrap_or("sensorgate"), &gateway)
                }
                (None, None) => unreachable!("clap requires --config or --broker"),
            };
            // Without a metrics message the answer is "no metrics": wait long enough for one.
            let timeout = timeout.unwrap_or_else(|| {
                STATUS_TIMEOUT.max(target.metrics_interval.map_or(Duration::ZERO, |i| i + Duration::from_secs(5)))
            });
            let options =
                sensorgate::status::Options { timeout, json, colour: sensorgate::status::Colour::for_stdout(), watch };
            status_cmd(&target, options)
        }
        Command::Scan { paths, bauds, listen, json, modbus, modbus_bauds, units, modbus_timeout } => {
            // Quiet: stderr is the progress display; only problems are logged.
            init_logging(cli.log_format, "warn");
            let ports = if paths.is_empty() { scan::default_ports() } else { scan::given_ports(paths) };
            let probe = modbus.then(|| scan::modbus::Probe {
                settings: scan::modbus::LineSetting::all(&modbus_bauds),
                units,
                timeout: modbus_timeout,
            });
            let opts = scan::Options { bauds, listen, modbus: probe };
            exit_from(runtime().and_then(|rt| rt.block_on(scan_cmd(ports, opts, json))))
        }
        Command::Record { port, baud, out, seconds, max_bytes } => {
            init_logging(cli.log_format, "info");
            let limit = seconds.map(Duration::from_secs_f64);
            exit_from(runtime().and_then(|rt| rt.block_on(record_cmd(&port, baud, &out, limit, max_bytes))))
        }
        Command::Simulate { link, port, baud, modbus, framing, format, rate, count, start, replay, speed } => {
            let job = match (modbus, replay) {
                (_, Some(file)) => SimJob::Replay { file, speed },
                (Some(units), None) => SimJob::Modbus { units: distinct_units(units) },
                (None, None) => {
                    let format = format.filter(|f| framing.carries(*f)).unwrap_or(framing.default_format());
                    SimJob::Readings { spec: SimSpec { framing, format }, rate, count, start }
                }
            };
            // clap makes one of the two present and conflicts_with keeps the other out.
            let port = match (link, port) {
                (Some(link), _) => SimPort::Link(link),
                (None, Some(path)) => SimPort::Serial(path),
                (None, None) => unreachable!("clap requires --port unless --link is given"),
            };
            init_logging(cli.log_format, "info");
            exit_from(runtime().and_then(|rt| rt.block_on(simulate_cmd(port, job, baud))))
        }
    }
}

/// `status --timeout` when not given (at least; see there).
const STATUS_TIMEOUT: Duration = Duration::from_secs(15);

/// A runtime of its own on this thread; errors go to stderr as text (no logging is set up: the
/// output is the table).
fn status_cmd(target: &sensorgate::status::Target, options: sensorgate::status::Options) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sensorgate status: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let mut stdout = std::io::stdout().lock();
    let verdict = rt.block_on(sensorgate::status::run(target, options, shutdown_signal(), &mut stdout));
    // A DNS lookup still running on a blocking thread (the timeout gave up on it) is left
    // behind, not waited for.
    rt.shutdown_background();
    ExitCode::from(verdict.exit_code())
}

/// glibc gives every thread that allocates its own malloc arena; with several input threads
/// (and a slow decoder's own thread) that multiplies heap overhead (RSS) for nothing: two
/// arenas carry no contention worth avoiding.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called first thing in main, before any other thread exists; integer arguments.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// A write past the file-size limit (`ulimit -f`, systemd's `LimitFSIZE=`) kills the process
/// with SIGXFSZ by default; ignored, it fails with EFBIG, which the spool handles like a full disk.
fn ignore_file_size_signal() {
    // SAFETY: called first thing in main, before any other thread exists; SIG_IGN is a valid
    // disposition for SIGXFSZ.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn config_failure(e: &ConfigError) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(EXIT_CONFIG)
}

fn exit_from(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "Exiting with failure.");
            ExitCode::FAILURE
        }
    }
}

/// The runtime of the MQTT connection, the buses, commands and health. One worker: the stream
/// devices read and decode on input threads of their own (`device::InputPool`), so what runs
/// here is light, and a second worker only added wake-ups (two workers waking each other
/// cost more CPU per reading than the work they shared).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `RUST_LOG` wins over the config's `log.filter`. Under systemd (stderr is the journal
/// stream) text lines carry no timestamp (journald adds one) and start with a syslog priority
/// prefix (`<3>` for ERROR … `<7>` for DEBUG), so `journalctl -p err` works.
fn init_logging(format: LogFormat, config_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(config_filter));
    // Colour only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text if stderr_is_journal() => {
            let plain = tracing_subscriber::fmt::format().without_time().with_ansi(false);
            builder.with_ansi(false).event_format(journal::PriorityPrefix(plain)).init();
        }
        LogFormat::Text => builder.init(),
    }
}

/// systemd sets `JOURNAL_STREAM=<dev>:<inode>` for the journal stream it connects to stderr.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsRawFd;
    let Some(expected) = std::env::var_os("JOURNAL_STREAM") else { return false };
    // SAFETY: fstat writes into the struct we pass; zeroed is a valid initial value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: stderr's descriptor is valid for the whole process.
    if unsafe { libc::fstat(std::io::stderr().as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    expected.to_string_lossy() == format!("{}:{}", st.st_dev, st.st_ino)
}

mod journal {
    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
    use tracing_subscriber::registry::LookupSpan;

    /// Prefixes each line with its syslog priority, which journald turns into the entry's.
    pub struct PriorityPrefix<F>(pub F);

    impl<S, N, F> FormatEvent<S, N> for PriorityPrefix<F>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
        F: FormatEvent<S, N>,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            event: &Event<'_>,
        ) -> std::fmt::Result {
            let priority = match *event.metadata().level() {
                Level::ERROR => 3,
                Level::WARN => 4,
                Level::INFO => 6,
                Level::DEBUG | Level::TRACE => 7,
            };
            write!(writer, "<{priority}>")?;
            self.0.format_event(ctx, writer, event)
        }
    }
}

async fn run(config: Config, path: PathBuf, deadline: HardDeadline) -> anyhow::Result<()> {
    let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
    let hup =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    tokio::spawn(reload_on_sighup(hup, path, reload_tx, deadline.clone()));
    let hooks = sensorgate::app::Hooks { decoders: test_hooks::decoders(), ..sensorgate::app::Hooks::default() };
    let shutdown = async move {
        shutdown_signal().await;
        deadline.arm();
    };
    let report = sensorgate::app::run_reloadable(config, shutdown, reloads, hooks).await?;
    if report.lost() > 0 {
        tracing::warn!(lost = report.lost(), "Stopped with undelivered readings (see the lines above).");
    }
    Ok(())
}

/// SIGHUP (systemctl reload): re-read and validate the file; a valid config goes to the
/// gateway, an invalid one is refused with every problem logged and the old one kept.
async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    path: PathBuf,
    reloads: tokio::sync::mpsc::Sender<Config>,
    deadline: HardDeadline,
) {
    while hup.recv().await.is_some() {
        tracing::info!(config = %path.display(), "SIGHUP received: reloading the configuration.");
        match Config::load(&path) {
            Ok(config) => {
                deadline.set_timeout(config.gateway.shutdown_timeout);
                if reloads.send(config).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                for line in e.to_string().lines().skip(1) {
                    tracing::error!(problem = %line, "Invalid configuration.");
                }
                tracing::error!(error = %e.to_string().lines().next().unwrap_or_default(), "Reload refused; still running on the previous configuration.");
            }
        }
    }
}

/// Exit status when the watchdog ends a shutdown that overran its deadline (sysexits
/// EX_SOFTWARE): something inside did not stop, and readings may be lost.
const EXIT_FORCED: i32 = 70;
/// How long past `gateway.shutdown_timeout` (counted from the signal) the process may live.
/// The gateway's own deadline bounds its shutdown phases; this bounds what that cannot: a
/// decode thread that never returns, a blocking DNS lookup the runtime's drop would wait for.
/// Under a second, so systemd (and the operator) see the process gone within timeout + 1 s.
const HARD_GRACE: Duration = Duration::from_millis(800);
/// The runtime's own shutdown ends this much before the watchdog would, so the process
/// exits normally (with its own status) whenever it can.
const RUNTIME_MARGIN: Duration = Duration::from_millis(200);

/// The process-level shutdown deadline. Armed at SIGTERM/SIGINT, it starts a plain thread
/// (outside the runtime, so a wedged runtime cannot hold it) that ends the process
/// `shutdown_timeout` + [`HARD_GRACE`] later with an ERROR naming what was still awaited.
#[derive(Clone)]
struct HardDeadline {
    /// The current `gateway.shutdown_timeout` in ms (a reload may change it).
    timeout_ms: Arc<AtomicU64>,
    /// When the process must be gone, once armed.
    at: Arc<OnceLock<Instant>>,
}

impl HardDeadline {
    fn new(timeout: Duration) -> Self {
        let d = Self { timeout_ms: Arc::default(), at: Arc::default() };
        d.set_timeout(timeout);
        d
    }

    fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms.store(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX), Relaxed);
    }

    fn limit(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Relaxed)) + HARD_GRACE
    }

    /// Starts the watchdog (once).
    fn arm(&self) {
        let limit = self.limit();
        if self.at.set(Instant::now() + limit).is_err() {
            return;
        }
        let watchdog = std::thread::Builder::new().name("shutdown-watchdog".into()).spawn(move || {
            #[allow(clippy::disallowed_methods)] // A plain thread of its own, not a tokio worker.
            std::thread::sleep(limit);
            tracing::error!(
                limit_ms = limit.as_millis() as u64,
                waiting_for = %sensorgate::telemetry::shutdown_waiting_for(),
                "Shutdown overran gateway.shutdown_timeout; ending the process now (what was not delivered is lost)."
            );
            std::process::exit(EXIT_FORCED);
        });
        if let Err(e) = watchdog {
            tracing::error!(error = %e, "Cannot start the shutdown watchdog; the shutdown deadline is not enforced.");
        }
    }

    /// Time left until the watchdog fires (the whole limit if no signal armed it: the gateway
    /// stopped on its own, e.g. a critical task died).
    fn remaining(&self) -> Duration {
        self.at.get().map_or_else(|| self.limit(), |at| at.saturating_duration_since(Instant::now()))
    }
}

/// SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "Cannot listen for SIGTERM; stop with Ctrl-C.");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received."),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received."),
    }
}

/// Where the simulator's end of the serial line is.
enum SimPort {
    /// A pseudo-terminal it creates, linked at this path.
    Link(PathBuf),
    /// An existing serial port (at `--baud`).
    Serial(PathBuf),
}

/// What the simulator does on its port.
enum SimJob {
    /// Writes readings (a listening sensor).
    Readings { spec: SimSpec, rate: u32, count: u64, start: u64 },
    /// Answers as Modbus RTU meters with these units (a polled bus).
    Modbus { units: Vec<u8> },
    /// Plays back a capture (`sensorgate record`) at `speed` times its pace.
    Replay { file: PathBuf, speed: f64 },
}

async fn simulate_cmd(port: SimPort, job: SimJob, baud: u32) -> anyhow::Result<()> {
    match (port, job) {
        (port, SimJob::Modbus { units }) => serve_meters(port, &units, baud).await,
        (SimPort::Link(link), SimJob::Replay { file, speed }) => {
            let mut pty = create_pty(&link)?;
            tracing::info!(link = %link.display(), file = %file.display(), speed, "Replaying a capture on a pseudo-terminal.");
            replay(&file, &mut pty.master, speed).await
        }
        (SimPort::Serial(path), SimJob::Replay { file, speed }) => {
            let mut stream = tokio_serial::SerialStream::open(&tokio_serial::new(path.to_string_lossy(), baud))
                .with_context(|| format!("cannot open {}", path.display()))?;
            replay(&file, &mut stream, speed).await
        }
        (SimPort::Link(link), SimJob::Readings { spec, rate, count, start }) => {
            let pty = create_pty(&link)?;
            tracing::info!(link = %link.display(), rate, count, "Simulating a sensor on a pseudo-terminal.");
            let sent = drive(spec, pty, rate, count, start).await?;
            tracing::info!(sent, "Simulation finished.");
            Ok(())
        }
        (SimPort::Serial(path), SimJob::Readings { spec, rate, count, start }) => {
            let stream = tokio_serial::SerialStream::open(&tokio_serial::new(path.to_string_lossy(), baud))
                .with_context(|| format!("cannot open {}", path.display()))?;
            let sent = tokio::select! {
                r = simulate::run(spec, stream, rate, count, start) => r.context("writing to the port")?,
                _ = shutdown_signal() => 0,
            };
            tracing::info!(sent, "Simulation finished.");
            Ok(())
        }
    }
}

/// Scans `ports` until done or a signal, showing progress on stderr, then prints what was
/// found (a config, or JSON) on stdout.
async fn scan_cmd(ports: Vec<scan::Port>, opts: scan::Options, json: bool) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    let cancel = tokio_util::sync::CancellationToken::new();
    let stop = cancel.clone();
    let signals = tokio::spawn(async move {
        shutdown_signal().await;
        stop.cancel();
    });
    let terminal = std::io::stderr().is_terminal();
    let mut stderr = std::io::stderr();
    if ports.is_empty() {
        let _ = writeln!(stderr, "No serial ports found (give their paths, e.g. sensorgate scan /dev/ttyUSB0).");
    }
    let mut progress = |p: scan::Progress| {
        // A terminal gets one status line, rewritten in place; a log gets a line per step.
        let _ = match (&p, terminal) {
            (scan::Progress::Trying(t) | scan::Progress::Detail(t), true) => write!(stderr, "\r\x1b[K{t}"),
            (scan::Progress::Result(t), true) => writeln!(stderr, "\r\x1b[K{t}"),
            (scan::Progress::Trying(t) | scan::Progress::Result(t), false) => writeln!(stderr, "{t}"),
            (scan::Progress::Detail(_), false) => Ok(()),
        };
    };
    let reports = scan::scan(&ports, &opts, &cancel, &mut progress).await;
    if cancel.is_cancelled() {
        // On a terminal, over the status line the signal cut short.
        let _ = writeln!(stderr, "{}Stopped; printing what was found so far.", if terminal { "\r\x1b[K" } else { "" });
    }
    signals.abort();
    let text = if json { scan::report::json(&reports) } else { scan::report::toml(&reports) };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}").context("writing the results")?;
    stdout.flush().context("writing the results")?;
    Ok(())
}

/// Writes a capture's chunks to `to` at their recorded times (divided by `speed`), until its
/// end or a signal.
async fn replay(
    file: &std::path::Path,
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    speed: f64,
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut capture = capture::CaptureReader::new(std::io::BufReader::new(f))
        .with_context(|| format!("cannot replay {}", file.display()))?;
    let h = &capture.header;
    tracing::info!(port = %h.port, baud = h.baud, "Capture header.");
    let start = tokio::time::Instant::now();
    let (mut chunks, mut bytes) = (0u64, 0u64);
    let played = async {
        while let Some(c) = capture.next_chunk().context("reading the capture")? {
            tokio::time::sleep_until(start + Duration::from_secs_f64(c.at_us as f64 / 1e6 / speed)).await;
            to.write_all(&c.bytes).await.context("writing to the port")?;
            chunks += 1;
            bytes += c.bytes.len() as u64;
        }
        to.flush().await.context("writing to the port")?;
        anyhow::Ok(())
    };
    tokio::select! {
        r = played => r?,
        _ = shutdown_signal() => {}
    }
    if capture.truncated {
        tracing::warn!("The capture was cut short; its whole chunks were played.");
    }
    tracing::info!(chunks, bytes, "Replay finished.");
    // Let the reader take the last bytes before the pseudo-terminal goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Records what `path` sends into `out` until `limit`, a signal, or `max_bytes`.
async fn record_cmd(
    path: &std::path::Path,
    baud: u32,
    out: &std::path::Path,
    limit: Option<Duration>,
    max_bytes: u64,
) -> anyhow::Result<()> {
    use std::io::Write;
    use tokio::io::AsyncReadExt;
    let mut port = tokio_serial::SerialStream::open(&tokio_serial::new(path.to_string_lossy(), baud))
        .with_context(|| format!("cannot open {} (another program may hold it)", path.display()))?;
    let file = std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    let started_at_us =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    let header = capture::Header {
        port: path.display().to_string(),
        baud,
        data_bits: 8,
        parity: "none".into(),
        stop_bits: 1,
        started_at_us,
        recorder: format!("sensorgate {}", env!("CARGO_PKG_VERSION")),
    };
    capture::write_header(&mut w, &header)?;
    tracing::info!(port = %path.display(), baud, out = %out.display(), "Recording; Ctrl-C stops.");
    let start = tokio::time::Instant::now();
    let until = limit.map(|l| start + l);
    let (mut chunks, mut bytes) = (0u64, 0u64);
    let mut buf = vec![0u8; 4096];
    let ended = loop {
        let deadline = until.unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 86_400));
        let n = tokio::select! {
            r = port.read(&mut buf) => match r {
                Ok(0) => break "the port closed",
                Ok(n) => n,
                // A pseudo-terminal whose other side closed reads EIO: the device is gone.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => break "the port went away",
                Err(e) => return Err(e).context("reading the port"),
            },
            _ = tokio::time::sleep_until(deadline) => break "time is up",
            _ = shutdown_signal() => break "stopped",
        };
        let at_us = start.elapsed().as_micros() as u64;
        capture::write_chunk(&mut w, at_us, &buf[..n])?;
        chunks += 1;
        bytes += n as u64;
        if bytes >= max_bytes {
            break "the capture reached --max-bytes";
        }
    };
    w.flush().context("writing the capture")?;
    w.get_ref().sync_all().context("writing the capture")?;
    tracing::info!(chunks, bytes, why = ended, out = %out.display(), "Recording finished.");
    Ok(())
}

fn create_pty(link: &std::path::Path) -> anyhow::Result<PtyLink> {
    PtyLink::create(link).with_context(|| format!("cannot create a pseudo-terminal at {}", link.display()))
}

/// Answers as meters `units` on `port` until a signal, after printing (on stdout, as TOML a
/// user can paste) the `[[bus]]` config that polls them. A real port is opened at `baud`, 8E1
/// (Modbus's default), as that config says; a pseudo-terminal ignores line speed and parity.
async fn serve_meters(port: SimPort, units: &[u8], baud: u32) -> anyhow::Result<()> {
    use simulate::modbus;
    let bus = modbus::meters(units);
    let units_text = units.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    let served = match port {
        SimPort::Link(link) => {
            let mut pty = create_pty(&link)?;
            let device = tokio_serial::SerialPort::name(&pty.slave).unwrap_or_default();
            println!("# Simulated Modbus RTU meters (units {units_text}) on {} -> {device}.", link.display());
            print_bus_config(&link, baud, units);
            serve_until_stopped(&mut pty.master, &bus).await
        }
        SimPort::Serial(path) => {
            let settings = tokio_serial::new(path.to_string_lossy(), baud)
                .parity(tokio_serial::Parity::Even)
                .data_bits(tokio_serial::DataBits::Eight)
                .stop_bits(tokio_serial::StopBits::One);
            let stream = tokio_serial::SerialStream::open(&settings)
                .with_context(|| format!("cannot open {}", path.display()))?;
            println!("# Simulated Modbus RTU meters (units {units_text}) on {} at {baud} baud, 8E1.", path.display());
            print_bus_config(&path, baud, units);
            serve_until_stopped(stream, &bus).await
        }
    };
    let answered: u64 = bus.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().map(|s| s.answered).sum();
    tracing::info!(answered, "Simulated meters stopped.");
    served
}

fn print_bus_config(path: &std::path::Path, baud: u32, units: &[u8]) {
    use simulate::modbus;
    println!("# To poll them, add this to a sensorgate config:\n");
    println!("{}", modbus::bus_toml("sim", path, baud, units, Duration::from_secs(1)));
    // Also the line a script waits for: everything above is printed.
    println!("# Serving until Ctrl-C or SIGTERM.");
}

async fn serve_until_stopped<P>(port: P, bus: &simulate::modbus::SimBus) -> anyhow::Result<()>
where
    P: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tracing::info!("Simulated meters answering.");
    tokio::select! {
        biased;
        _ = shutdown_signal() => Ok(()),
        r = simulate::modbus::serve(port, Arc::clone(bus)) => r.context("serving Modbus requests"),
    }
}

/// Writes through the pseudo-terminal, then keeps it open until a signal so the gateway can
/// read everything (closing it would look like an unplug).
async fn drive(spec: SimSpec, mut pty: PtyLink, rate: u32, count: u64, start: u64) -> anyhow::Result<u64> {
    let sent = tokio::select! {
        r = simulate::run(spec, &mut pty.master, rate, count, start) => r.context("writing to the pseudo-terminal")?,
        _ = shutdown_signal() => return Ok(0),
    };
    tracing::info!(sent, "All readings written; holding the port open until stopped.");
    shutdown_signal().await;
    Ok(sent)
}

/// Fault injection for the end-to-end tests, which run this binary and have no other way in.
/// `SENSORGATE_TEST_SLOW_DECODER=<device>:<duration>` makes that device's decoder take that
/// long on every frame; `<device>:forever` makes it hang on its first frame (a decoder stuck
/// in a loop). Unset, the production decoders run untouched.
mod test_hooks {
    use std::time::Duration;

    use bytes::BytesMut;
    use sensorgate::config::StreamConfig;
    use sensorgate::decode::{Decode, Decoded};
    use sensorgate::device::DecoderFactory;
    use sensorgate::reject::Reject;

    pub const VAR: &str = "SENSORGATE_TEST_SLOW_DECODER";

    pub fn decoders() -> DecoderFactory {
        let production = sensorgate::device::default_decoders();
        let Some(spec) = std::env::var(VAR).ok() else { return production };
        let Some((device, delay)) = spec.rsplit_once(':') else {
            tracing::error!(value = %spec, "Ignoring {VAR}: expected <device>:<duration|forever>.");
            return production;
        };
        let delay = match delay {
            "forever" => None,
            d => match humantime::parse_duration(d) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::error!(value = %spec, error = %e, "Ignoring {VAR}: bad duration.");
                    return production;
                }
            },
        };
        tracing::warn!(device, ?delay, "{VAR} is set: this device's decoder is slowed down on purpose (tests only).");
        let device = device.to_string();
        std::sync::Arc::new(move |name: &str, stream: &StreamConfig| -> Box<dyn Decode> {
            let inner = production(name, stream);
            if name == device {
                Box::new(Slow { inner, delay })
            } else {
                inner
            }
        })
    }

    struct Slow {
        inner: Box<dyn Decode>,
        /// `None`: never returns.
        delay: Option<Duration>,
    }

    impl Decode for Slow {
        fn decode(&mut self, frame: &[u8], out: &mut BytesMut) -> Result<Decoded, Reject> {
            match self.delay {
                // Decoders run on the input threads (device/pool.rs), never on the MQTT runtime.
                #[allow(clippy::disallowed_methods)]
                Some(d) => std::thread::sleep(d),
                None => loop {
                    std::thread::park();
                },
            }
            self.inner.decode(frame, out)
        }
    }
}
