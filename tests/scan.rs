//! `sensorgate scan`, the real binary, against sensors on pseudo-terminals. A pseudo-terminal
//! ignores line speed, so each decoy reads the speed the scanner set on the terminal and sends
//! its readings only at its own speed, and noise (high bytes, as a UART at the wrong speed
//! gives) at any other: the scan has to find the right speed as it would on a real line.

mod common;

use std::io::BufRead;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{write_all, Rng, Simulator};
use sensorgate::decode::Format;
use sensorgate::framing::Framing;
use sensorgate::simulate::{PtyLink, SimSpec};

/// What a decoy sends.
#[derive(Clone, Copy)]
enum Speaks {
    /// Readings in `format` at `baud`, noise at any other speed.
    Readings { format: Format, baud: u32 },
    /// Noise at every speed.
    Noise,
    /// Nothing.
    Nothing,
}

/// A sensor on a pseudo-terminal's master side, linked at `link`; stops when dropped.
struct Decoy {
    link: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Decoy {
    fn start(dir: &Path, name: &str, speaks: Speaks) -> Self {
        let link = dir.join(name);
        let mut pty = PtyLink::create(&link).unwrap();
        let task = tokio::spawn(async move {
            let mut rng = Rng(0x5ca9 + name_seed(&pty.link));
            let mut n = 0u64;
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let at = line_speed(&pty.master);
                let bytes = match speaks {
                    Speaks::Nothing => continue,
                    Speaks::Readings { format, baud } if at == baud => {
                        n += 1;
                        common::render(SimSpec { framing: Framing::for_format(format), format }, n..n + 1)
                    }
                    Speaks::Readings { .. } | Speaks::Noise => (0..24).map(|_| 0x80 | rng.below(128) as u8).collect(),
                };
                write_all(&mut pty.master, &bytes).await;
            }
        });
        Self { link, task }
    }
}

impl Drop for Decoy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn name_seed(p: &Path) -> u64 {
    p.as_os_str().len() as u64
}

/// The line speed set on the terminal, read on the master side (Linux applies termios ioctls
/// on a pty master to its slave). TCGETS2 rather than tcgetattr/cfgetospeed: serialport sets the
/// speed with BOTHER and `c_ospeed`, which classic termios cannot show.
fn line_speed(master: &tokio_serial::SerialStream) -> u32 {
    // SAFETY: termios2 is plain integers; all zeroes is a valid value.
    let mut t: libc::termios2 = unsafe { std::mem::zeroed() };
    // SAFETY: TCGETS2 writes a termios2 into the struct we pass, on a descriptor we own.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TCGETS2, &mut t) };
    assert_eq!(r, 0, "TCGETS2 on the master: {}", std::io::Error::last_os_error());
    t.c_ospeed
}

/// Whether the terminal is in exclusive mode (TIOCEXCL), asked with TIOCGEXCL.
fn exclusive(port: &impl AsRawFd) -> bool {
    let mut on: libc::c_int = 0;
    // SAFETY: TIOCGEXCL writes an int into the one we pass, on a descriptor we own.
    let r = unsafe { libc::ioctl(port.as_raw_fd(), libc::TIOCGEXCL, &mut on) };
    assert_eq!(r, 0, "TIOCGEXCL: {}", std::io::Error::last_os_error());
    on != 0
}

/// Runs `sensorgate scan ARGS` to its end.
async fn scan(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_sensorgate")).arg("scan").args(args).stdin(Stdio::null()).output().unwrap()
    })
    .await
    .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `sensorgate check` on `body` after a gateway and broker header: (exit code, stdout + stderr).
fn check(dir: &Path, body: &str) -> (Option<i32>, String) {
    let path = dir.join("pasted.toml");
    std::fs::write(&path, format!("[gateway]\nid = \"scanned\"\n[mqtt]\nhost = \"127.0.0.1\"\n{body}")).unwrap();
    let (code, out, err) = common::sensorgate("check", &path);
    (code, out + &err)
}

fn args(list: &[&str], ports: &[&Path]) -> Vec<String> {
    list.iter().map(ToString::to_string).chain(ports.iter().map(|p| p.display().to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_finds_each_sensor_at_its_speed_skips_the_busy_port_and_prints_a_config_check_accepts() {
    let dir = common::tempdir();
    let json = Decoy::start(dir.path(), "json", Speaks::Readings { format: Format::Json, baud: 9600 });
    let kv = Decoy::start(dir.path(), "kv", Speaks::Readings { format: Format::Kv, baud: 115_200 });
    let binary = Decoy::start(dir.path(), "binary", Speaks::Readings { format: Format::Postcard, baud: 57_600 });
    let silent = Decoy::start(dir.path(), "silent", Speaks::Nothing);
    let noise = Decoy::start(dir.path(), "noise", Speaks::Noise);
    let busy = Decoy::start(dir.path(), "busy", Speaks::Readings { format: Format::Json, baud: 115_200 });
    // Another program holds this one, as the gateway does: serialport's exclusive open.
    let holder = tokio_serial::new(busy.link.to_string_lossy(), 115_200).open_native().unwrap();
    assert!(exclusive(&holder));

    let ports = [&json.link, &kv.link, &binary.link, &silent.link, &noise.link, &busy.link].map(PathBuf::as_path);
    let out = scan(args(&["--listen", "300ms"], &ports)).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let table = |link: &Path, name: &str, baud: u32, framing: &str, format: &str| {
        format!(
            "[[device]]\nname = \"{name}\"\npath = \"{}\"\nbaud = {baud}\nframing = \"{framing}\"\nformat = \"{format}\"\n",
            link.display()
        )
    };
    let expect = [
        format!("# {}: JSON lines at 9600 baud (", json.link.display()),
        table(&json.link, "json", 9600, "lines", "json"),
        "# fields seen: hum (e.g. ".into(),
        format!("# {}: key=value lines at 115200 baud (", kv.link.display()),
        table(&kv.link, "kv", 115_200, "lines", "kv"),
        format!("# {}: COBS + postcard frames (CRC valid) at 57600 baud (", binary.link.display()),
        table(&binary.link, "binary", 57_600, "cobs", "postcard"),
        "# channels seen (id, type): 0 f32 (e.g. ".into(),
        format!("# {}: silent at 115200, 57600, 38400, 19200, 9600 baud (nothing received)", silent.link.display()),
        format!("# {}: noise: probably the wrong baud rate (", noise.link.display()),
        format!("# {}: busy: another program holds it (the gateway?); skipped", busy.link.display()),
    ];
    let mut from = 0;
    for e in &expect {
        let at = stdout[from..].find(e.as_str()).unwrap_or_else(|| panic!("missing, in order: {e:?}\n{stdout}"));
        from += at + e.len();
    }
    assert_eq!(stdout.matches("[[device]]").count(), 3, "{stdout}");
    assert!(stdout.contains(", 1 i32 (e.g. ") || stdout.contains(", 2 i32 (e.g. "), "{stdout}");

    // Not a terminal: a plain line per step, on stderr.
    for step in [
        format!("{}: listening at 19200 baud for 300ms", json.link.display()),
        format!("{}: listening at 9600 baud for 300ms", json.link.display()),
        format!("{}: JSON lines at 9600 baud", json.link.display()),
        format!("{}: busy: another program holds it", busy.link.display()),
    ] {
        assert!(stderr.contains(&step), "no {step:?} in:\n{stderr}");
    }
    assert!(!stderr.contains('\r'), "{stderr:?}");

    // Pasted unchanged after a header, it is a valid config.
    let (code, said) = check(dir.path(), &stdout);
    assert_eq!(code, Some(0), "{said}\n{stdout}");
    assert!(said.contains("ok (3 device(s)"), "{said}");

    // The holder was never disturbed: its TIOCEXCL is still set (as root an open passes
    // TIOCEXCL, and serialport's failed open would clear it on close) and its flock holds.
    assert!(exclusive(&holder), "the scan cleared the holder's TIOCEXCL");
    assert!(tokio_serial::new(busy.link.to_string_lossy(), 9600).open_native().is_err());
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_json_is_machine_readable() {
    let dir = common::tempdir();
    let json = Decoy::start(dir.path(), "th", Speaks::Readings { format: Format::Json, baud: 38_400 });
    let silent = Decoy::start(dir.path(), "quiet", Speaks::Nothing);
    let out =
        scan(args(&["--json", "--listen", "300ms", "--bauds", "115200,38400"], &[&json.link, &silent.link])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
    let ports = doc["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 2, "{doc:#}");
    let port = |link: &Path| {
        let path = link.display().to_string();
        ports.iter().find(|p| p["path"] == path.as_str()).unwrap_or_else(|| panic!("no {path} in {doc:#}"))
    };
    let th = port(&json.link);
    assert_eq!(th["name"], "th");
    assert_eq!(th["status"], "found", "{th:#}");
    assert_eq!(th["baud"], 38_400);
    assert_eq!(th["verdict"]["kind"], "recognised");
    assert_eq!(th["verdict"]["framing"], "lines");
    assert_eq!(th["verdict"]["format"], "json");
    let fields: Vec<&str> =
        th["verdict"]["fields"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(fields, ["hum", "n", "sent_us", "temp"]);
    let listened: Vec<(u64, &str)> = th["listened"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["baud"].as_u64().unwrap(), h["verdict"]["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(listened, [(115_200, "noise"), (38_400, "recognised")]);
    assert_eq!(th["interrupted"], false);
    let quiet = port(&silent.link);
    assert_eq!(quiet["status"], "silent", "{quiet:#}");
    assert_eq!(quiet["listened"].as_array().unwrap().len(), 2);
    assert_eq!(quiet["modbus"], serde_json::Value::Null);
}

/// SIGTERM in the middle of a scan: it stops at once and still prints what it found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_scan_prints_what_it_found_so_far() {
    let dir = common::tempdir();
    let kv = Decoy::start(dir.path(), "kv", Speaks::Readings { format: Format::Kv, baud: 115_200 });
    let silent = Decoy::start(dir.path(), "silent", Speaks::Nothing);
    let waiting_for = format!("{}: listening at 115200 baud", silent.link.display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args(args(&["scan", "--listen", "1s"], &[&kv.link, &silent.link]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let pid = child.id() as i32;
    let progress = tokio::task::spawn_blocking(move || {
        let mut seen = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            seen += &line;
            seen += "\n";
            if line.starts_with(&waiting_for) {
                // SAFETY: kill(2) on our own child.
                assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
            }
        }
        seen
    });
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    let seen = progress.await.unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{seen}");
    assert!(seen.contains("Stopped; printing what was found so far."), "{seen}");
    assert!(stdout.contains(&format!("path = \"{}\"\nbaud = 115200\n", kv.link.display())), "{stdout}");
    assert!(
        stdout.contains(&format!("# {}: not scanned [scan stopped before this port was done]", silent.link.display())),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_modbus_finds_the_one_simulated_unit_in_range() {
    let dir = common::tempdir();
    let link = dir.path().join("bus");
    let (_sim, _) = Simulator::start(dir.path(), &["--modbus", "5", "--link", link.to_str().unwrap()]).await;
    let out = scan(args(
        &["--listen", "300ms", "--bauds", "9600", "--modbus", "--units", "4-6", "--modbus-bauds", "9600"],
        &[&link],
    ))
    .await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("# {}: silent; Modbus RTU unit(s) 5 answer at 9600 baud 8E1\n", link.display())),
        "{stdout}"
    );
    let bus = format!(
        "[[bus]]\nname = \"bus\"\npath = \"{}\"\nbaud = 9600\nparity = \"even\"\ndata_bits = 8\nstop_bits = 1\n",
        link.display()
    );
    assert!(stdout.contains(&bus), "{stdout}");
    assert!(stdout.contains("# Unit 5 answered: "), "{stdout}");
    assert_eq!(stdout.matches("[[bus.device]]").count(), 1, "{stdout}");
    assert!(stdout.contains("[[bus.device]]\nname = \"bus-unit5\"\nunit = 5\n"), "{stdout}");
    assert!(stderr.contains(&format!("{}: asking Modbus units 4-6 at 9600 baud 8E1", link.display())), "{stderr}");

    // As printed, check refuses the slave for its missing points (the output says so)...
    let (code, said) = check(dir.path(), &stdout);
    assert_eq!(code, Some(78), "{said}");
    assert!(said.contains("the slave has no points"), "{said}");
    // ...and accepts it once the template point is uncommented.
    let mut filled = String::new();
    let mut in_template = false;
    for line in stdout.lines() {
        in_template |= line == "# [[bus.device.point]]";
        filled += if in_template { line.trim_start_matches("# ") } else { line };
        filled += "\n";
    }
    let (code, said) = check(dir.path(), &filled);
    assert_eq!(code, Some(0), "{said}\n{filled}");
}
