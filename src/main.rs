//! The `sensorgate` binary: CLI, config, logging, signals, exit codes. `anyhow` lives here only.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use sensorgate::config::{Config, ConfigError, Format, Framing};
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
    /// Simulate a sensor: write readings to a serial port, or to a pseudo-terminal linked at a path.
    Simulate {
        /// Create a pseudo-terminal and link its device at this path (give this path to the gateway).
        #[arg(long, conflicts_with = "port")]
        link: Option<PathBuf>,
        /// Write to this existing serial port instead.
        #[arg(long, required_unless_present = "link")]
        port: Option<PathBuf>,
        #[arg(long, default_value_t = 115_200)]
        baud: u32,
        #[arg(long, value_enum, default_value_t = SimFraming::Lines)]
        framing: SimFraming,
        /// For lines: json or kv. Binary (cobs) frames are always postcard.
        #[arg(long, value_enum, default_value_t = SimFormat::Json)]
        format: SimFormat,
        /// Readings per second; 0 = as fast as the port takes them.
        #[arg(long, default_value_t = 10)]
        rate: u32,
        /// Readings to send; 0 = until stopped.
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Number of the first reading.
        #[arg(long, default_value_t = 0)]
        start: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum SimFraming {
    Lines,
    Cobs,
}

#[derive(Clone, Copy, ValueEnum)]
enum SimFormat {
    Json,
    Kv,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!("{}: ok ({} device(s), gateway {:?})", config.display(), c.devices.len(), c.gateway.id);
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(&e),
        },
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_failure(&e),
            };
            exit_from(runtime().and_then(|rt| rt.block_on(run(config))))
        }
        Command::Simulate { link, port, baud, framing, format, rate, count, start } => {
            let spec = match framing {
                SimFraming::Cobs => SimSpec { framing: Framing::Cobs, format: Format::Postcard },
                SimFraming::Lines => SimSpec {
                    framing: Framing::Lines,
                    format: if matches!(format, SimFormat::Kv) { Format::Kv } else { Format::Json },
                },
            };
            exit_from(runtime().and_then(|rt| rt.block_on(simulate_cmd(spec, link, port, baud, rate, count, start))))
        }
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let report = sensorgate::app::run(config, shutdown_signal()).await?;
    if report.lost() > 0 {
        tracing::warn!(lost = report.lost(), "Stopped with undelivered readings (see the lines above).");
    }
    Ok(())
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

async fn simulate_cmd(
    spec: SimSpec,
    link: Option<PathBuf>,
    port: Option<PathBuf>,
    baud: u32,
    rate: u32,
    count: u64,
    start: u64,
) -> anyhow::Result<()> {
    if let Some(link) = link {
        let pty =
            PtyLink::create(&link).with_context(|| format!("cannot create a pseudo-terminal at {}", link.display()))?;
        tracing::info!(link = %link.display(), rate, count, "Simulating a sensor on a pseudo-terminal.");
        let sent = drive(spec, pty, rate, count, start).await?;
        tracing::info!(sent, "Simulation finished.");
    } else if let Some(port) = port {
        let stream = tokio_serial::SerialStream::open(&tokio_serial::new(port.to_string_lossy(), baud))
            .with_context(|| format!("cannot open {}", port.display()))?;
        let sent = tokio::select! {
            r = simulate::run(spec, stream, rate, count, start) => r.context("writing to the port")?,
            _ = shutdown_signal() => 0,
        };
        tracing::info!(sent, "Simulation finished.");
    }
    Ok(())
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
