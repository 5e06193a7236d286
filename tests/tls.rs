//! TLS to the broker (rustls, ring): a mosquitto TLS listener with certificates made here.
//! A good chain works, with a client certificate where the broker demands one; a wrong CA, an
//! expired certificate and a wrong host name each give a clear error, backoff, and no crash.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{free_port, write_all, Gateway, Mosquitto, Subscriber};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use sensorgate::decode::Format;
use sensorgate::framing::Framing;
use sensorgate::simulate::{PtyLink, SimSpec};

/// A CA that can sign leaf certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: PathBuf,
}

fn readable(path: &Path, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap();
    // mosquitto drops root and must read its certificate and key.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn ca(dir: &Path, name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    let pem = dir.join(format!("{name}-ca.pem"));
    readable(&pem, &cert.pem());
    Ca { issuer: Issuer::new(params, key), pem }
}

/// A leaf certificate and key for `names`, valid now unless `expired`.
fn leaf(dir: &Path, ca: &Ca, file: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    if expired {
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
        params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    }
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let (c, k) = (dir.join(format!("{file}.pem")), dir.join(format!("{file}.key")));
    readable(&c, &cert.pem());
    readable(&k, &key.serialize_pem());
    (c, k)
}

/// A broker with a plain listener (for the test's subscriber) and a TLS one.
fn tls_broker(ca: &Ca, cert: &Path, key: &Path, require_client_cert: bool) -> (Mosquitto, u16) {
    let tls_port = free_port();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_client_cert}\n",
        ca.pem.display(),
        cert.display(),
        key.display()
    );
    (Mosquitto::start_custom(false, extra), tls_port)
}

fn pki_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = common::tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn config(tls_port: u16, device: &Path, tls: &str) -> String {
    format!(
        "[gateway]\nid = \"it\"\nshutdown_timeout = \"1s\"\n[mqtt]\nhost = \"localhost\"\nport = {tls_port}\nreconnect_min = \"100ms\"\nreconnect_max = \"400ms\"\n\
         [mqtt.tls]\n{tls}\n[[device]]\nname = \"a\"\npath = \"{}\"\nframing = \"lines\"\n",
        device.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_flow_over_tls_with_a_client_certificate() {
    let dir = pki_dir();
    let ca = ca(dir.path(), "good");
    let (cert, key) = leaf(dir.path(), &ca, "broker", &["localhost", "127.0.0.1"], false);
    let (client_cert, client_key) = leaf(dir.path(), &ca, "gateway", &["sensorgate-it"], false);
    let (broker, tls_port) = tls_broker(&ca, &cert, &key, true);
    let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
    let a = dir.path().join("a");
    let mut pty = PtyLink::create(&a).unwrap();
    let tls = format!(
        "ca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
        ca.pem.display(),
        client_cert.display(),
        client_key.display()
    );
    // Metrics often enough for `status` below not to wait long.
    let toml = config(tls_port, &a, &tls).replace("[gateway]\n", "[gateway]\nmetrics_interval = \"200ms\"\n");
    let gw = Gateway::start(dir.path(), &toml);
    sub.wait_for(Duration::from_secs(10), |m| m.topic == "sensorgate/it/state" && m.text() == "online").await;
    let mut lines = Vec::new();
    SimSpec { framing: Framing::Lines, format: Format::Json }.render(7, common::now_us(), &mut lines);
    write_all(&mut pty.master, &lines).await;
    let (m, _) = sub.wait_for(Duration::from_secs(10), |m| m.topic.ends_with("/readings")).await;
    assert_eq!(m.json()["n"], 7);

    // `sensorgate status` reaches the broker as the gateway does: TLS with its client certificate.
    let config_path = gw.config.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || status_json(&config_path)).await.unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["gateway"]["state"].as_str(), v["devices"]["a"]["delivered"].as_u64()), (Some("online"), Some(1)));
    // Trusting another CA: the broker cannot be reached (exit 2), and stderr says why.
    let other = self::ca(dir.path(), "other");
    let wrong = dir.path().join("wrong-ca.toml");
    std::fs::write(&wrong, toml.replace(&ca.pem.display().to_string(), &other.pem.display().to_string())).unwrap();
    let (code, out, err) = tokio::task::spawn_blocking(move || status_json(&wrong)).await.unwrap();
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
}

/// `sensorgate status --json --config <path> --timeout 10s`: (exit status, stdout, stderr).
fn status_json(config: &Path) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sensorgate"))
        .args(["status", "--json", "--timeout", "10s", "--config"])
        .arg(config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Starts a gateway that cannot complete the handshake and returns the TLS errors it logged.
async fn failing(broker_cert: (&Ca, &[&str], bool), trust: &Path, dir: &Path) -> Vec<serde_json::Value> {
    let (ca, names, expired) = broker_cert;
    let (cert, key) = leaf(dir, ca, "broker", names, expired);
    let (broker, tls_port) = tls_broker(ca, &cert, &key, false);
    let a = dir.join("a");
    let _pty = PtyLink::create(&a).unwrap();
    let mut gw = Gateway::start_with_args(
        dir,
        &config(tls_port, &a, &format!("ca_file = \"{}\"", trust.display())),
        &["--log-format", "json"],
    );
    let message = "TLS handshake with the broker failed; check mqtt.tls.ca_file, the broker certificate's name (mqtt.host) and dates.";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gw.log_records(message).len() < 3 {
        assert!(std::time::Instant::now() < deadline, "no repeated TLS error:\n{}", gw.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu = common::cpu_seconds(gw.pid());
    assert!(cpu < 1.0, "retrying a failing handshake must not spin: {cpu:.2} CPU-s");
    let records = gw.log_records(message);
    // Backoff between attempts: growing delays, never a hot loop.
    let delays: Vec<u64> = records.iter().map(|r| r["retry_ms"].as_u64().unwrap()).collect();
    assert!(delays.iter().all(|d| *d >= 50), "{delays:?}");
    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(15)).success(), "clean exit even though the broker was never reached");
    drop(broker);
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_signed_by_another_ca_is_refused_clearly() {
    let dir = pki_dir();
    let (real, other) = (ca(dir.path(), "real"), ca(dir.path(), "other"));
    let records = failing((&real, &["localhost"], false), &other.pem, dir.path()).await;
    let error = records[0]["error"].as_str().unwrap();
    assert!(error.contains("UnknownIssuer"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_broker_certificate_is_refused_clearly() {
    let dir = pki_dir();
    let ca = ca(dir.path(), "ca");
    let records = failing((&ca, &["localhost"], true), &ca.pem, dir.path()).await;
    let error = records[0]["error"].as_str().unwrap();
    assert!(error.contains("certificate expired"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_host_is_refused_clearly() {
    let dir = pki_dir();
    let ca = ca(dir.path(), "ca");
    let records = failing((&ca, &["broker.example.net"], false), &ca.pem, dir.path()).await;
    let error = records[0]["error"].as_str().unwrap();
    assert!(error.contains("not valid for name \"localhost\""), "{error}");
}

#[test]
fn unreadable_or_half_given_tls_files_are_config_errors() {
    let dir = common::tempdir();
    let path = dir.path().join("bad.toml");
    let a = dir.path().join("a");
    std::fs::write(&path, config(8883, &a, "ca_file = \"/nonexistent/ca.pem\"\nclient_cert = \"/x.pem\"")).unwrap();
    let (status, _, err) = common::sensorgate("check", &path);
    assert_eq!(status, Some(78));
    assert!(err.contains("mqtt.tls.client_cert") && err.contains("client_key go together"), "{err}");
    std::fs::write(&path, config(8883, &a, "ca_file = \"/nonexistent/ca.pem\"")).unwrap();
    let (status, _, err) = common::sensorgate("check", &path);
    assert_eq!(status, Some(78));
    assert!(err.contains("mqtt.tls") && err.contains("/nonexistent/ca.pem"), "{err}");
}
