//! The command trust model end to end (README "Commands: the trust model"): the real binary,
//! mosquitto on loopback, a pseudo-terminal as the port. A publisher on `cmd/#` cannot replay
//! retained requests, cycle a port, make the gateway echo large values, run commands the
//! config leaves out, or make it publish on topics of its choosing. Absence of a response is
//! proven by a later request's response arriving first (responses keep request order).

mod common;

use std::time::Duration;

use common::{json_lines as lines, publish, write_all, Gateway, Mosquitto, Msg, Subscriber};
use sensorgate::simulate::PtyLink;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// A gateway `it` with commands on (plus `commands`), device `a` on a pseudo-terminal, and a
/// subscriber to everything under `sensorgate/it/` that has seen the gateway subscribed.
struct Setup {
    broker: Mosquitto,
    sub: Subscriber,
    pty: PtyLink,
    _gw: Gateway,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// `before` runs once the broker is up and before the gateway starts.
    async fn start(commands: &str, before: impl AsyncFnOnce(u16)) -> Self {
        Self::start_with(Mosquitto::start(), "", commands, before).await
    }

    /// With this broker and more `[mqtt]` settings.
    async fn start_with(broker: Mosquitto, mqtt: &str, commands: &str, before: impl AsyncFnOnce(u16)) -> Self {
        let dir = common::tempdir();
        before(broker.port).await;
        let a = dir.path().join("a");
        let pty = PtyLink::create(&a).unwrap();
        let mut sub = Subscriber::connect(broker.port, "sensorgate/it/#").await;
        let config = format!(
            "[gateway]\nid = \"it\"\nmetrics_interval = \"200ms\"\n[mqtt]\nport = {}\n{mqtt}\n\
             [commands]\nenabled = true\n{commands}\n\
             [[device]]\nname = \"a\"\npath = \"{}\"\nframing = \"lines\"\n",
            broker.port,
            a.display()
        );
        let gw = Gateway::start(dir.path(), &config);
        sub.wait_for(WAIT, |m| m.topic == "sensorgate/it/devices/a/state" && m.json()["state"] == "up").await;
        // The subscription goes out right after CONNECT, before the first metrics.
        sub.wait_for(WAIT, |m| m.topic == "sensorgate/it/metrics").await;
        Self { broker, sub, pty, _gw: gw, _dir: dir }
    }

    async fn ask(&self, name: &str, body: impl AsRef<[u8]>) {
        publish(self.broker.port, &format!("sensorgate/it/cmd/{name}"), body.as_ref(), false).await;
    }

    /// The next response to `name`, and every response that came before it.
    async fn response(&mut self, name: &str) -> (Msg, Vec<Msg>) {
        let topic = format!("sensorgate/it/cmd/{name}/response");
        let (m, skipped) = self.sub.wait_for(WAIT, |m| m.topic == topic).await;
        (m, skipped.into_iter().filter(|m| m.topic.ends_with("/response")).collect())
    }

    /// The next metrics message for which `pred` holds.
    async fn metrics(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        self.sub.wait_for(WAIT, |m| m.topic == "sensorgate/it/metrics" && pred(&m.json())).await.0.json()
    }
}

fn refused(m: &Value, why: &str) -> u64 {
    m["commands"]["refused"][why].as_u64().unwrap_or_else(|| panic!("commands.refused.{why} missing: {m}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_request_is_not_executed_on_connect() {
    let retained = async |port| {
        publish(port, "sensorgate/it/cmd/restart_device", br#"{"id":"old","device":"a"}"#, true).await;
    };
    let mut s = Setup::start("", retained).await;
    s.ask("help", r#"{"id":"later"}"#).await;
    let (help, earlier) = s.response("help").await;
    assert_eq!(help.json()["id"], "later");
    assert!(earlier.is_empty(), "the retained request was answered: {:?}", earlier[0].text());
    let m = s.metrics(|m| m["commands"]["executed"] == 1).await;
    assert_eq!(refused(&m, "retained"), 1, "{m}");
    assert_eq!(m["devices"]["a"]["restarts"], 0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_device_in_a_loop_restarts_the_port_once() {
    let mut s = Setup::start("", async |_| {}).await;
    for id in 0..5 {
        s.ask("restart_device", format!(r#"{{"id":{id},"device":"a"}}"#)).await;
    }
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(s.response("restart_device").await.0.json());
    }
    let ids: Vec<_> = answers.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [0, 1, 2, 3, 4]);
    assert_eq!(answers[0]["ok"], true, "{}", answers[0]);
    for r in &answers[1..] {
        assert_eq!(r["ok"], false, "{r}");
        assert!(r["error"].as_str().unwrap().contains("was restarted less than 10s ago"), "{r}");
    }
    let m = s.metrics(|m| m["devices"]["a"]["restarts"] == 1 && m["devices"]["a"]["state"] == "up").await;
    assert_eq!(refused(&m, "restart_too_soon"), 4, "{m}");
    // The port stays open and reads on.
    write_all(&mut s.pty.master, &lines(0..3)).await;
    let m = s.metrics(|m| m["devices"]["a"]["delivered"] == 3).await;
    assert_eq!(m["devices"]["a"]["restarts"], 1, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_without_echoing_it() {
    let mut s = Setup::start("", async |_| {}).await;
    let huge_id = "x".repeat(200 * 1024);
    s.ask("help", format!(r#"{{"id":"{huge_id}"}}"#)).await;
    let (r, _) = s.response("help").await;
    assert!(r.payload.len() < 300, "a response of {} bytes", r.payload.len());
    let v = r.json();
    assert_eq!((v["ok"].as_bool(), v["id"].is_null()), (Some(false), true), "{v}");
    assert!(v["error"].as_str().unwrap().contains("longer than 4096 bytes"), "{v}");
    // A small request with an id that is too long: refused the same way.
    s.ask("help", format!(r#"{{"id":"{}"}}"#, "y".repeat(129))).await;
    let v = s.response("help").await.0.json();
    assert_eq!((v["ok"].as_bool(), v["id"].is_null()), (Some(false), true), "{v}");
    let m = s.metrics(|m| m["commands"]["refused"]["bad_request"] == 1).await;
    assert_eq!((refused(&m, "too_large"), m["commands"]["executed"].as_u64()), (1, Some(0)), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_commands_run() {
    let mut s = Setup::start("allow = [\"help\", \"metrics\"]", async |_| {}).await;
    s.ask("restart_device", r#"{"id":"r","device":"a"}"#).await;
    let v = s.response("restart_device").await.0.json();
    assert_eq!((v["id"].as_str(), v["ok"].as_bool()), (Some("r"), Some(false)), "{v}");
    assert!(v["error"].as_str().unwrap().contains("not allowed"), "{v}");
    s.ask("help", "").await;
    assert_eq!(s.response("help").await.0.json()["result"]["commands"], serde_json::json!(["metrics", "help"]));
    let m = s.metrics(|m| m["commands"]["executed"] == 1).await;
    assert_eq!((refused(&m, "not_allowed"), m["devices"]["a"]["restarts"].as_u64()), (1, Some(0)), "{m}");
}

/// Unknown names used to be answered on `cmd/<name>/response`: any publisher could make the
/// gateway publish on topics of its choosing, and a name near 65,535 bytes made a response
/// topic too long for MQTT, whose wrapped length corrupted the packet stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_commands_get_no_response_at_all() {
    let mut s = Setup::start("", async |_| {}).await;
    s.ask("self_destruct", r#"{"id":"x"}"#).await;
    s.ask(&"n".repeat(65_000), "").await;
    s.ask("help", r#"{"id":"after"}"#).await;
    let (help, earlier) = s.response("help").await;
    assert_eq!(help.json()["id"], "after");
    let topics: Vec<_> = earlier.iter().map(|m| &m.topic[..m.topic.len().min(40)]).collect();
    assert!(earlier.is_empty(), "unknown commands were answered: {topics:?}");
    let m = s.metrics(|m| m["commands"]["executed"] == 1).await;
    assert_eq!(refused(&m, "unknown"), 2, "{m}");
    // The connection is intact: readings still flow.
    write_all(&mut s.pty.master, &lines(0..5)).await;
    s.metrics(|m| m["devices"]["a"]["delivered"] == 5).await;
}

/// The mosquitto ACL in README "Commands: the trust model", used as it is written (for gateway
/// `it` instead of `greenhouse`): the gateway publishes, reads commands and answers; an
/// operator's command runs; a client without write access to `cmd/+` cannot command it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_acl_lets_operators_command_and_nobody_else() {
    let files = common::tempdir();
    // mosquitto started as root reads its files as its own user.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("### Commands: the trust model").unwrap()..];
    let acl = section.split("```text\n").nth(1).unwrap().split("```").next().unwrap();
    assert!(acl.contains("user greenhouse-gw"), "{acl}");
    // Anonymous clients (the test's observer and a stranger) may only read.
    let acl = format!("topic read sensorgate/#\n{}", acl.replace("greenhouse", "it"));
    let (acl_file, passwd) = (files.path().join("acl"), files.path().join("passwd"));
    std::fs::write(&acl_file, acl).unwrap();
    for (i, (user, pass)) in [("it-gw", "gw-pass"), ("operator", "op-pass")].into_iter().enumerate() {
        let create: &[&str] = if i == 0 { &["-c"] } else { &[] };
        let status = std::process::Command::new("mosquitto_passwd")
            .args(create)
            .arg("-b")
            .arg(&passwd)
            .args([user, pass])
            .status()
            .unwrap();
        assert!(status.success());
    }
    for f in [&acl_file, &passwd] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let broker = Mosquitto::start_custom(
        false,
        format!("password_file {}\nacl_file {}\n", passwd.display(), acl_file.display()),
    );
    let secret = files.path().join("gw-password");
    std::fs::write(&secret, "gw-pass\n").unwrap();
    let mqtt = format!("username = \"it-gw\"\npassword_file = {:?}", secret.display().to_string());
    // Started means: the gateway published its device state and metrics under the ACL.
    let mut s = Setup::start_with(broker, &mqtt, "", async |_| {}).await;

    // A stranger (anonymous: read only) asks for a restart; the broker drops it.
    s.ask("restart_device", r#"{"id":"stranger","device":"a"}"#).await;
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &s.broker.port.to_string(), "-u", "operator", "-P", "op-pass", "-q", "1"])
        .args(["-t", "sensorgate/it/cmd/help", "-m", r#"{"id":"operator"}"#])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (help, earlier) = s.response("help").await;
    assert_eq!(help.json()["id"], "operator");
    assert!(earlier.is_empty(), "the stranger's request ran: {:?}", earlier[0].text());
    let m = s.metrics(|m| m["commands"]["executed"] == 1).await;
    assert_eq!(m["devices"]["a"]["restarts"], 0, "{m}");
}
