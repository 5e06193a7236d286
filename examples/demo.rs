//! `cargo run --example demo [-- --seconds N]`: the gateway's whole job on a fresh machine with
//! only the Rust toolchain. No serial hardware, no broker to install: an in-process MQTT broker
//! (rumqttd), three simulated sensors on pseudo-terminals (JSON lines, `key=value` lines, COBS +
//! postcard) and a simulated Modbus RTU energy meter on a fourth, the real gateway
//! (`sensorgate::app::run`) reading the sensors and polling the meter, and a subscriber printing
//! every message the gateway publishes under `sensorgate/#`. Stops on Ctrl-C or after N seconds.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS};
use sensorgate::config::Config;
use sensorgate::decode::Format;
use sensorgate::framing::Framing;
use sensorgate::simulate::modbus;
use sensorgate::simulate::{self, PtyLink, SimSpec};
use tokio::task::JoinHandle;

/// Readings per second per simulated sensor: enough to see flow, few enough to read along.
const RATE: u32 = 5;
/// Payloads longer than this are cut when printed (the metrics message is long).
const MAX_SHOWN: usize = 300;

/// One simulated sensor: its device name in the gateway config and what it sends.
const SENSORS: [(&str, SimSpec); 3] = [
    ("greenhouse-json", SimSpec { framing: Framing::Lines, format: Format::Json }),
    ("shed-kv", SimSpec { framing: Framing::Lines, format: Format::Kv }),
    ("soil-cobs", SimSpec { framing: Framing::Cobs, format: Format::Postcard }),
];

/// The polled meter's Modbus unit id (its device is `modbus::meter_name(METER_UNIT)`, "meter-1"),
/// the name of its bus (and of that bus's pseudo-terminal), and how often the gateway asks it.
const METER_UNIT: u8 = 1;
const METER_BUS: &str = "rs485";
const METER_POLL: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    init_logging();
    let seconds = match parse_args() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}\nusage: cargo run --example demo [-- --seconds N]");
            return ExitCode::from(2);
        }
    };
    let result = (|| {
        let port = free_port()?;
        start_broker(port)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        rt.block_on(demo(port, seconds))
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "Demo failed.");
            ExitCode::FAILURE
        }
    }
    // The broker's threads are not joined: rumqttd has no shutdown, and returning from main
    // ends them with the process.
}

/// `--seconds N` (or `--seconds=N`); nothing else. Hand-parsed: one flag does not need clap.
fn parse_args() -> anyhow::Result<Option<u64>> {
    let mut seconds = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "--seconds" => args.next().context("--seconds needs a number")?,
            a if a.starts_with("--seconds=") => a["--seconds=".len()..].to_string(),
            "-h" | "--help" => anyhow::bail!("runs the gateway against an in-process broker and simulated sensors"),
            a => anyhow::bail!("unknown argument {a:?}"),
        };
        seconds = Some(value.parse().with_context(|| format!("--seconds {value:?} is not a whole number"))?);
    }
    Ok(seconds)
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    // rumqttd logs ordinary client disconnects at ERROR; keep it quiet unless RUST_LOG asks.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// A port nobody listens on right now. The listener is closed again before the broker binds
/// the port, a tiny race that a demo can live with.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Starts rumqttd with one MQTT 3.1.1 listener on 127.0.0.1:`port`, on its own threads
/// (`Broker::start` blocks for the broker's lifetime).
fn start_broker(port: u16) -> anyhow::Result<()> {
    use rumqttd::{Broker, ConnectionSettings, RouterConfig, ServerSettings};
    let server = ServerSettings {
        name: "demo-v4".into(),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 5_000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 200,
            auth: None,
            external_auth: None,
            // Lets a client publish to a topic before anyone has subscribed to it.
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: RouterConfig {
            max_connections: 16,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..rumqttd::Config::default()
    };
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "The in-process MQTT broker stopped.");
            }
        })
        .context("cannot start the broker thread")?;
    tracing::info!(broker = %format!("127.0.0.1:{port}"), "In-process MQTT broker (rumqttd) starting.");
    Ok(())
}

async fn demo(port: u16, seconds: Option<u64>) -> anyhow::Result<()> {
    // The subscriber goes first (and waits for the broker), so it sees the gateway's first
    // messages too.
    let (subscriber, printer) = subscribe(port).await?;

    let dir = tempfile::Builder::new().prefix("sensorgate-demo-").tempdir().context("cannot create a temp dir")?;
    let mut sims = Vec::new();
    for (name, spec) in SENSORS {
        let pty = PtyLink::create(&dir.path().join(name))
            .with_context(|| format!("cannot create a pseudo-terminal for {name}"))?;
        sims.push(tokio::spawn(sensor(name, spec, pty)));
    }
    let bus = PtyLink::create(&dir.path().join(METER_BUS)).context("cannot create a pseudo-terminal for the meter")?;
    sims.push(tokio::spawn(meter(bus)));

    let config = Config::from_toml(&config_toml(port, dir.path())).map_err(|problems| {
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("the generated config is invalid:\n{}", text.join("\n"))
    })?;
    tracing::info!(
        devices = config.all_devices().len(),
        seconds = %seconds.map_or_else(|| "until Ctrl-C".to_string(), |s| s.to_string()),
        "Starting the gateway.",
    );
    let report = sensorgate::app::run(config, shutdown(seconds)).await?;

    // The gateway has stopped reading: now the sensors may go (dropping a PtyLink closes its
    // terminal and removes its link). Then give the subscriber a moment for the last messages.
    for sim in &sims {
        sim.abort();
    }
    for sim in sims {
        let _ = sim.await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = subscriber.disconnect().await;
    let printed = tokio::time::timeout(Duration::from_secs(2), printer).await.ok().and_then(Result::ok).unwrap_or(0);

    for (name, s) in &report.devices {
        tracing::info!(
            device = %name,
            readings = s.readings,
            delivered = s.delivered,
            dropped_oldest = s.dropped_oldest,
            lost = s.queued + s.in_flight,
            "Device summary."
        );
    }
    tracing::info!(messages_printed = printed, lost = report.lost(), "Demo finished.");
    Ok(())
}

/// Connects (retrying while the broker thread starts listening), subscribes to `sensorgate/#`
/// and waits for the SUBACK. The returned task prints every message as `topic  payload` and
/// returns how many it printed once the client disconnects.
async fn subscribe(port: u16) -> anyhow::Result<(AsyncClient, JoinHandle<u64>)> {
    let mut opts = MqttOptions::new("sensorgate-demo-subscriber", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let mut printed = 0;
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match poll(&mut eventloop).await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    client.subscribe("sensorgate/#", QoS::AtMostOnce).await?;
                }
                Ok(Event::Incoming(Incoming::SubAck(_))) => return anyhow::Ok(()),
                Ok(Event::Incoming(Incoming::Publish(p))) => print_message(&p.topic, &p.payload, &mut printed),
                Ok(_) => {}
                // Not listening yet: the next poll reconnects.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .with_context(|| format!("could not subscribe at the in-process broker (127.0.0.1:{port}) within 5s"))??;
    tracing::info!(filter = "sensorgate/#", "Subscriber ready; every message the gateway publishes is printed below.");
    let printer = tokio::spawn(async move {
        loop {
            match poll(&mut eventloop).await {
                Ok(Event::Incoming(Incoming::Publish(p))) => print_message(&p.topic, &p.payload, &mut printed),
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "Subscriber lost the broker.");
                    break;
                }
            }
        }
        printed
    });
    Ok((client, printer))
}

/// The subscriber's event loop. clippy.toml reserves `EventLoop::poll` for the gateway's
/// connection task; this is a separate client, owned by this example alone.
#[allow(clippy::disallowed_methods)]
async fn poll(eventloop: &mut EventLoop) -> Result<Event, rumqttc::ConnectionError> {
    eventloop.poll().await
}

fn print_message(topic: &str, payload: &[u8], printed: &mut u64) {
    let text = String::from_utf8_lossy(payload);
    match text.char_indices().nth(MAX_SHOWN) {
        Some((cut, _)) => println!("{topic}  {}… ({} bytes)", &text[..cut], payload.len()),
        None => println!("{topic}  {text}"),
    }
    if topic.ends_with("/metrics") {
        // The gateway measures its own process, which here also holds the broker, the
        // simulated sensors and this printer.
        println!(
            "  (process.rss_bytes and process.cpu_seconds above are this demo's whole process: the in-process \
             broker, the simulated sensors and the meter, and the gateway; `sensorgate run` measures the gateway alone)"
        );
    }
    *printed += 1;
}

/// Writes readings into the pseudo-terminal until aborted. Owns the `PtyLink`, so the
/// terminal stays open (no "unplug") for as long as the task runs.
async fn sensor(name: &'static str, spec: SimSpec, mut pty: PtyLink) {
    tracing::info!(sensor = name, link = %pty.link.display(), rate = RATE, "Simulated sensor started.");
    if let Err(e) = simulate::run(spec, &mut pty.master, RATE, 0, 0).await {
        tracing::warn!(sensor = name, error = %e, "Simulated sensor stopped.");
    }
}

/// Answers the gateway's polls as the meter until aborted. Owns the `PtyLink`, as
/// [`sensor`] does.
async fn meter(mut pty: PtyLink) {
    tracing::info!(meter = %modbus::meter_name(METER_UNIT), link = %pty.link.display(), "Simulated Modbus meter started.");
    if let Err(e) = modbus::serve(&mut pty.master, modbus::meters(&[METER_UNIT])).await {
        tracing::warn!(error = %e, "Simulated Modbus meter stopped.");
    }
}

/// The gateway's config: the broker above, one device per simulated sensor, and a bus with
/// the meter on it.
fn config_toml(port: u16, dir: &Path) -> String {
    // toml renders a properly quoted and escaped string, whatever the temp dir's name.
    let path = |name: &str| toml::Value::String(dir.join(name).display().to_string()).to_string();
    let bus = modbus::bus_toml(METER_BUS, &dir.join(METER_BUS), 115_200, &[METER_UNIT], METER_POLL);
    format!(
        r#"
[gateway]
id = "demo"
metrics_interval = "5s"
shutdown_timeout = "5s"

[mqtt]
host = "127.0.0.1"
port = {port}

[[device]]
name = "{json}"
path = {json_path}
framing = "lines"
format = "json"

[[device]]
name = "{kv}"
path = {kv_path}
framing = "lines"
format = "kv"

[[device]]
name = "{cobs}"
path = {cobs_path}
framing = "cobs"
format = "postcard"

[[device.channel]]
id = 0
name = "temp"
unit = "°C"

[[device.channel]]
id = 1
name = "hum"
unit = "%"

[[device.channel]]
id = 2
name = "n"

{bus}"#,
        json = SENSORS[0].0,
        json_path = path(SENSORS[0].0),
        kv = SENSORS[1].0,
        kv_path = path(SENSORS[1].0),
        cobs = SENSORS[2].0,
        cobs_path = path(SENSORS[2].0),
    )
}

/// Ctrl-C, or `--seconds N` elapsed, whichever comes first.
async fn shutdown(seconds: Option<u64>) {
    let timer = async {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received."),
        _ = timer => tracing::info!(seconds = seconds.unwrap_or(0), "Demo time is up."),
    }
}
