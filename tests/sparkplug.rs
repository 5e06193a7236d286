//! The Sparkplug B output end to end: the real binary, real mosquitto brokers, real
//! pseudo-terminals, and every message decoded by pysparkplug (tests/sparkplug/decode.py), an
//! implementation we did not write. scripts/test.sh installs it; without it (outside CI) the
//! tests say so and pass.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{json_lines, n, write_all, Gateway, Mosquitto, Msg, Subscriber};
use sensorgate::simulate::PtyLink;
use serde_json::Value;

fn python() -> Option<PathBuf> {
    let p = common::interop_dir().join("sparkplug-venv/bin/python");
    if p.exists() {
        return Some(p);
    }
    assert!(std::env::var_os("CI").is_none(), "pysparkplug is not installed in {}: run ./scripts/test.sh", p.display());
    eprintln!("SKIPPED: pysparkplug is not installed ({}); ./scripts/test.sh installs it", p.display());
    None
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sparkplug/decode.py")
}

/// Every message decoded by pysparkplug, in arrival order.
fn decode(python: &Path, msgs: &[Msg]) -> Vec<Value> {
    let mut child = Command::new(python)
        .arg(script())
        .arg("decode")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the decoder");
    let mut input = String::new();
    for m in msgs {
        let hex: String = m.payload.iter().map(|b| format!("{b:02x}")).collect();
        input += &serde_json::json!({"topic": m.topic, "hex": hex}).to_string();
        input.push('\n');
    }
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the decoder failed on what the gateway published");
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A payload pysparkplug encodes: `decode.py <args>` prints it in hex.
fn encoded(python: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new(python).arg(script()).args(args).output().unwrap();
    assert!(out.status.success(), "decode.py {args:?}");
    let hex = String::from_utf8(out.stdout).unwrap();
    (0..hex.trim().len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

fn ncmd_rebirth(python: &Path) -> Vec<u8> {
    encoded(python, &["ncmd-rebirth"])
}

fn config(dir: &Path, port: u16, sparkplug_extra: &str, devices: &[&str]) -> String {
    let mut c = format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"200ms\"\nshutdown_timeout = \"3s\"\nstate_dir = \"{}\"\n\
         [mqtt]\nport = {port}\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n\
         [sparkplug]\nenabled = true\ngroup_id = \"plant-1\"\nedge_node_id = \"gh\"\n{sparkplug_extra}\n",
        dir.join("state").display()
    );
    for d in devices {
        c += &format!(
            "[[device]]\nname = \"{d}\"\npath = \"{}\"\nframing = \"lines\"\nopen_timeout = \"200ms\"\n",
            dir.join(d).display()
        );
    }
    c
}

fn kind(m: &Msg) -> &str {
    m.topic.split('/').nth(2).unwrap_or("")
}

/// The device a D* message is about.
fn device(v: &Value) -> &str {
    v["topic"].as_str().unwrap().split('/').nth(4).unwrap_or("")
}

fn metric<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v["metrics"].as_array()?.iter().find(|m| m["name"] == name)
}

/// The sensor counter `n` of every DDATA, in order.
fn ddata_ns(decoded: &[Value]) -> Vec<i64> {
    let n = |v: &Value| metric(v, "n").expect("n in every DDATA")["value"].as_i64().unwrap();
    decoded.iter().filter(|v| v["type"] == "DDATA").map(n).collect()
}

/// A Sparkplug message the edge node published (not a host's command or STATE).
fn from_node(m: &Msg) -> bool {
    m.topic.starts_with("spBv1.0/plant-1/") && !matches!(kind(m), "NCMD" | "DCMD")
}

/// Collects the edge node's messages until one satisfies `until`.
async fn collect(sub: &mut Subscriber, into: &mut Vec<Msg>, secs: u64, until: impl Fn(&Msg) -> bool) {
    let (m, skipped) = sub.wait_for(Duration::from_secs(secs), |m| from_node(m) && until(m)).await;
    into.extend(skipped.into_iter().filter(from_node));
    into.push(m);
}

/// Scenario: two JSON sensors, 160 readings each (320 DDATA: `seq` wraps), a new field and
/// type, an unplug and replug, a rebirth NCMD, SIGKILL, a restart. Every message is decoded
/// by pysparkplug and checked: birth before data, `seq` continuity, aliases resolving to the
/// right names and values, DDEATH/DBIRTH, the will's bdSeq, bdSeq after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn births_data_deaths_and_rebirth_as_pysparkplug_decodes_them() {
    let Some(python) = python() else { return };
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "spBv1.0/#").await;
    let mut pty_a = PtyLink::create(&dir.path().join("a")).unwrap();
    let mut pty_b = PtyLink::create(&dir.path().join("b")).unwrap();
    let text = config(dir.path(), broker.port, "", &["a", "b"]);
    let mut gw = Gateway::start(dir.path(), &text);
    let mut got = Vec::new();
    collect(&mut sub, &mut got, 10, |m| kind(m) == "NBIRTH").await;

    for chunk in (0..160).collect::<Vec<u64>>().chunks(20) {
        write_all(&mut pty_a.master, &json_lines(chunk[0]..chunk[0] + 20)).await;
        write_all(&mut pty_b.master, &json_lines(chunk[0]..chunk[0] + 20)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // b gains two fields of new types: a new DBIRTH before its DDATA.
    write_all(&mut pty_b.master, b"{\"n\":160,\"on\":true,\"mode\":\"auto\",\"big\":18446744073709551615}\n").await;
    let ddata = |got: &Vec<Msg>| got.iter().filter(|m| kind(m) == "DDATA").count();
    while ddata(&got) < 321 {
        collect(&mut sub, &mut got, 10, |_| true).await;
    }

    // Unplug a: DDEATH; replug: DBIRTH, then its data.
    drop(pty_a);
    collect(&mut sub, &mut got, 10, |m| kind(m) == "DDEATH").await;
    let mut pty_a = PtyLink::create(&dir.path().join("a")).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    write_all(&mut pty_a.master, &json_lines(1000..1003)).await;
    collect(&mut sub, &mut got, 10, |m| kind(m) == "DDATA" && m.topic.ends_with("/a")).await;

    // A host asks for a rebirth.
    common::publish(broker.port, "spBv1.0/plant-1/NCMD/gh", &ncmd_rebirth(&python), false).await;
    collect(&mut sub, &mut got, 10, |m| kind(m) == "NBIRTH").await;
    write_all(&mut pty_b.master, &json_lines(2000..2001)).await;
    collect(&mut sub, &mut got, 10, |m| kind(m) == "DDATA" && m.topic.ends_with("/b")).await;

    // SIGKILL: the broker publishes the will.
    gw.signal(libc::SIGKILL);
    gw.wait(Duration::from_secs(5));
    collect(&mut sub, &mut got, 10, |m| kind(m) == "NDEATH").await;
    let mut gw = Gateway::start(dir.path(), &text);
    collect(&mut sub, &mut got, 10, |m| kind(m) == "NBIRTH").await;
    // A clean stop: the gateway publishes NDEATH itself before DISCONNECT (which cancels the will).
    gw.signal(libc::SIGTERM);
    collect(&mut sub, &mut got, 10, |m| kind(m) == "NDEATH").await;
    assert!(gw.wait(Duration::from_secs(10)).success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after: Vec<String> = std::iter::from_fn(|| sub.rx.try_recv().ok()).map(|m| m.topic).collect();
    assert!(after.is_empty(), "nothing after the NDEATH: {after:?}");

    let decoded = decode(&python, &got);
    for v in &decoded {
        assert!(v.get("error").is_none(), "{v}");
    }
    let first = &decoded[0];
    assert_eq!((first["type"].as_str(), first["seq"].as_u64()), (Some("NBIRTH"), Some(0)), "{first}");
    let bd_seq = first["bdSeq"].as_u64().unwrap();
    assert!(metric(first, "Node Control/Rebirth").is_some_and(|m| m["value"] == false), "{first}");
    for name in ["Gateway/Queue Depth", "Gateway/Dropped", "Gateway/Devices Up"] {
        assert!(metric(first, name).is_some(), "{name} in the NBIRTH: {first}");
    }

    // The first connection: everything until the will.
    let death = decoded.iter().position(|v| v["type"] == "NDEATH").expect("the will");
    assert_eq!(decoded[death]["bdSeq"].as_u64(), Some(bd_seq), "the will carries the NBIRTH's bdSeq");
    let mut expected_seq = 0u64;
    let mut born: BTreeSet<String> = BTreeSet::new();
    let mut values: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut rebirths = 0;
    for (i, v) in decoded[..death].iter().enumerate() {
        let t = v["type"].as_str().unwrap();
        let seq = v["seq"].as_u64().unwrap_or_else(|| panic!("seq in {v}"));
        if t == "NBIRTH" {
            assert_eq!(seq, 0, "an NBIRTH starts seq at 0: {v}");
            assert_eq!(v["bdSeq"].as_u64(), Some(bd_seq), "a rebirth keeps bdSeq");
            rebirths += usize::from(i > 0);
            born.clear();
        } else {
            assert_eq!(seq, expected_seq, "message {i} ({t}) continues seq");
        }
        expected_seq = (seq + 1) % 256;
        match t {
            "DBIRTH" => {
                born.insert(device(v).to_string());
            }
            "DDEATH" => {
                born.remove(device(v));
            }
            "DDATA" => {
                assert!(born.contains(device(v)), "DDATA of {} before its DBIRTH: {v}", device(v));
                let m = metric(v, "n").expect("n, resolved from its alias through the DBIRTH");
                assert_eq!(m["datatype"], "INT64");
                if let Some(t) = metric(v, "temp") {
                    assert_eq!(t["datatype"], "DOUBLE", "{v}");
                }
                values.entry(device(v).to_string()).or_default().push(m["value"].as_i64().unwrap());
            }
            _ => {}
        }
    }
    assert_eq!(rebirths, 1, "the NCMD's rebirth");
    assert!(death > 330, "{death} messages: seq wrapped");
    let mut a_expected: Vec<i64> = (0..160).collect();
    a_expected.extend(1000..1003);
    assert_eq!(values["a"], a_expected, "a's readings, each once, in order");
    assert_eq!(values["b"].len(), 162, "b's readings");

    // b's new fields and types came with a new DBIRTH.
    let b_births: Vec<&Value> = decoded[..death].iter().filter(|v| v["type"] == "DBIRTH" && device(v) == "b").collect();
    let grown = b_births.iter().find(|v| metric(v, "on").is_some()).expect("a DBIRTH with b's new fields");
    assert_eq!(metric(grown, "on").unwrap()["datatype"], "BOOLEAN");
    assert_eq!(metric(grown, "mode").unwrap()["datatype"], "STRING");
    assert_eq!(metric(grown, "big").unwrap()["datatype"], "UINT64");
    assert_eq!(metric(grown, "big").unwrap()["value"].as_u64(), Some(u64::MAX));
    // Aliases are unique across the node and the same in every birth.
    let mut aliases: BTreeMap<u64, String> = BTreeMap::new();
    for v in decoded[..death].iter().filter(|v| v["type"] == "DBIRTH" || v["type"] == "NBIRTH") {
        for m in v["metrics"].as_array().unwrap() {
            if let Some(alias) = m["alias"].as_u64() {
                let name = format!("{}:{}", device(v), m["name"].as_str().unwrap());
                assert_eq!(aliases.entry(alias).or_insert_with(|| name.clone()), &name, "alias {alias}");
            }
        }
    }

    // a: DDEATH on unplug, DBIRTH on replug.
    let a_events: Vec<&str> = decoded[..death]
        .iter()
        .filter(|v| device(v) == "a" && v["type"] != "DDATA")
        .map(|v| v["type"].as_str().unwrap())
        .collect();
    assert_eq!(&a_events[..3], ["DBIRTH", "DDEATH", "DBIRTH"], "{a_events:?}");

    // The restart: the next bdSeq, from the state directory; then the clean stop's NDEATH.
    let (reborn, farewell) = (&decoded[decoded.len() - 2], &decoded[decoded.len() - 1]);
    assert_eq!(reborn["type"], "NBIRTH");
    assert_eq!(reborn["bdSeq"].as_u64(), Some((bd_seq + 1) % 256), "bdSeq survives the restart");
    assert_eq!((farewell["type"].as_str(), farewell["bdSeq"].as_u64()), (Some("NDEATH"), reborn["bdSeq"].as_u64()));

    for t in ["NBIRTH", "DBIRTH", "DDATA", "NDATA", "DDEATH", "NDEATH"] {
        if let Some(v) = decoded.iter().find(|v| v["type"] == t) {
            eprintln!("decoded {t}: {v}");
        }
    }
}

/// Scenario: a primary host is configured and offline: nothing is born and no data is sent,
/// readings wait; when its STATE says online, births and the waiting readings follow. The
/// JSON side delivers all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_while_the_primary_host_is_offline_births_when_it_is_online() {
    let Some(python) = python() else { return };
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let state = "spBv1.0/STATE/scada";
    common::publish(broker.port, state, br#"{"online":false,"timestamp":1}"#, true).await;
    let mut sub = Subscriber::connect(broker.port, "#").await;
    let mut pty = PtyLink::create(&dir.path().join("a")).unwrap();
    let text = config(dir.path(), broker.port, "primary_host_id = \"scada\"", &["a"]);
    let gw = Gateway::start(dir.path(), &text);
    sub.wait_for(Duration::from_secs(10), |m| m.topic == "sensorgate/it/state" && m.text() == "online").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    write_all(&mut pty.master, &json_lines(0..20)).await;
    // The JSON side delivers the 20; the Sparkplug side holds them.
    let (_, before) = sub
        .wait_for(Duration::from_secs(10), |m| {
            m.topic == "sensorgate/it/metrics" && m.json()["devices"]["a"]["delivered"] == 20
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (metrics, more) = sub.wait_for(Duration::from_secs(5), |m| m.topic == "sensorgate/it/metrics").await;
    let sent: Vec<&Msg> = before.iter().chain(&more).filter(|m| m.topic.starts_with("spBv1.0/plant-1/")).collect();
    assert!(
        sent.is_empty(),
        "published while the host is offline: {:?}",
        sent.iter().map(|m| &m.topic).collect::<Vec<_>>()
    );
    let sp = &metrics.json()["sparkplug"];
    assert_eq!(n(&sp["devices"]["a"], "queued"), 20, "{sp}");

    common::publish(broker.port, state, br#"{"online":true,"timestamp":2}"#, true).await;
    let mut got = Vec::new();
    while got.iter().filter(|m: &&Msg| kind(m) == "DDATA").count() < 20 {
        collect(&mut sub, &mut got, 10, |m| m.topic.starts_with("spBv1.0/plant-1/")).await;
    }
    let decoded = decode(&python, &got);
    let types: Vec<&str> = decoded.iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert_eq!(&types[..3], ["NBIRTH", "DBIRTH", "DDATA"], "{types:?}");
    let ns = ddata_ns(&decoded);
    assert_eq!(ns, (0..20).collect::<Vec<_>>(), "the readings that waited, in order");
    let historical =
        decoded.iter().filter(|v| v["type"] == "DDATA").all(|v| metric(v, "n").unwrap()["is_historical"] == true);
    assert!(historical, "readings that waited for the host are historical");
    drop(gw);
}

/// Scenario: each output on its own broker. The Sparkplug broker is down: the JSON side
/// delivers every reading meanwhile and the Sparkplug queue holds them; it comes up: they
/// follow. Then the JSON broker goes down: Sparkplug keeps delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_output_delivers_while_the_other_broker_is_down() {
    let Some(python) = python() else { return };
    let dir = common::tempdir();
    let mut json_broker = Mosquitto::start();
    // The subscriber's session outlives the broker's restart, QoS 0 messages included: it
    // misses nothing the gateway publishes before it is back.
    let mut spb_broker = Mosquitto::start_custom(true, "queue_qos0_messages true".into());
    let mut json_sub = Subscriber::connect(json_broker.port, "sensorgate/it/#").await;
    let mut spb_sub = Subscriber::connect_with(spb_broker.port, "spBv1.0/#", Some("spb-sub")).await;
    spb_broker.stop_gracefully();
    let mut pty = PtyLink::create(&dir.path().join("a")).unwrap();
    let extra = format!("[sparkplug.mqtt]\nport = {}", spb_broker.port);
    let gw = Gateway::start(dir.path(), &config(dir.path(), json_broker.port, &extra, &["a"]));
    json_sub.wait_for(Duration::from_secs(10), |m| m.topic == "sensorgate/it/state" && m.text() == "online").await;
    write_all(&mut pty.master, &json_lines(0..50)).await;
    let (m, _) = json_sub
        .wait_for(Duration::from_secs(10), |m| {
            m.topic == "sensorgate/it/metrics" && m.json()["devices"]["a"]["delivered"] == 50
        })
        .await;
    let sp = &m.json()["sparkplug"];
    assert_eq!(sp["connected"], false, "{sp}");
    assert_eq!(n(&sp["devices"]["a"], "queued"), 50, "the Sparkplug queue holds them: {sp}");

    spb_broker.restart();
    let mut got = Vec::new();
    while got.iter().filter(|m: &&Msg| kind(m) == "DDATA").count() < 50 {
        collect(&mut spb_sub, &mut got, 15, |_| true).await;
    }
    json_broker.stop();
    write_all(&mut pty.master, &json_lines(50..80)).await;
    while got.iter().filter(|m: &&Msg| kind(m) == "DDATA").count() < 80 {
        collect(&mut spb_sub, &mut got, 15, |_| true).await;
    }
    let decoded = decode(&python, &got);
    let ns = ddata_ns(&decoded);
    assert_eq!(ns, (0..80).collect::<Vec<_>>(), "every reading on the Sparkplug side, in order");
    let birth = decoded.iter().find(|v| v["type"] == "NBIRTH").unwrap();
    assert_eq!(birth["bdSeq"], 0, "refused connection attempts (nothing listened) do not use up bdSeq");
    // And the JSON side gets the 30 it missed once its broker is back.
    json_broker.restart();
    json_sub
        .wait_for(Duration::from_secs(15), |m| {
            m.topic == "sensorgate/it/metrics" && m.json()["devices"]["a"]["delivered"] == 80
        })
        .await;
    drop(gw);
}

fn dcmd(python: &Path, name: &str, datatype: &str, value: &str) -> Vec<u8> {
    encoded(python, &["dcmd", name, datatype, value])
}

/// Scenario: a simulated Modbus meter (`sensorgate simulate --modbus`) polled by the gateway;
/// a host sends DCMDs: to its writable `setpoint` (done: the next DDATA carries the new value)
/// and to its read-only `voltage` (refused, counted, nothing written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dcmd_writes_a_writable_modbus_point_with_the_write_commands_checks() {
    let Some(python) = python() else { return };
    let dir = common::tempdir();
    let broker = Mosquitto::start();
    let mut sub = Subscriber::connect(broker.port, "#").await;
    let link = dir.path().join("bus");
    let (_sim, printed) =
        common::Simulator::start(dir.path(), &["--modbus", "5", "--link", link.to_str().unwrap()]).await;
    let text = format!(
        "[gateway]\nid = \"it\"\nmetrics_interval = \"200ms\"\nstate_dir = \"{}\"\n[mqtt]\nport = {}\n\
         [sparkplug]\nenabled = true\ngroup_id = \"plant-1\"\nedge_node_id = \"gh\"\n{printed}",
        dir.path().join("state").display(),
        broker.port
    );
    let gw = Gateway::start(dir.path(), &text);
    let ddata = "spBv1.0/plant-1/DDATA/gh/meter-5";
    let mut got = Vec::new();
    collect(&mut sub, &mut got, 20, |m| m.topic == ddata).await;
    let topic = "spBv1.0/plant-1/DCMD/gh/meter-5";
    common::publish(broker.port, topic, &dcmd(&python, "voltage", "DOUBLE", "1.0"), false).await;
    common::publish(broker.port, topic, &dcmd(&python, "setpoint", "DOUBLE", "23.5"), false).await;
    // The write is made between polls; a later DDATA carries it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(std::time::Instant::now() < deadline, "no DDATA with setpoint 23.5");
        collect(&mut sub, &mut got, 20, |m| m.topic == ddata).await;
        let decoded = decode(&python, &got);
        let last = decoded.last().unwrap();
        if metric(last, "setpoint").is_some_and(|m| m["value"] == 23.5) {
            break;
        }
    }
    // The meter's points are declared: born once, with all of them, their types right (a wrong
    // guess would bring a second birth at the first reading).
    let decoded = decode(&python, &got);
    let births: Vec<&Value> = decoded.iter().filter(|v| v["type"] == "DBIRTH").collect();
    assert_eq!(births.len(), 1, "{births:?}");
    for point in ["voltage", "current", "temperature", "setpoint", "relay", "door_closed", "energy"] {
        assert!(metric(births[0], point).is_some(), "{point} in {}", births[0]);
    }
    assert_eq!(metric(births[0], "relay").unwrap()["datatype"], "BOOLEAN");
    assert_eq!(metric(births[0], "energy").unwrap()["datatype"], "INT64");
    let (m, _) = sub
        .wait_for(Duration::from_secs(10), |m| {
            m.topic == "sensorgate/it/metrics" && m.json()["sparkplug"]["writes"] == 1
        })
        .await;
    let sp = &m.json()["sparkplug"];
    assert_eq!(n(sp, "writes_refused"), 1, "voltage is not writable: {sp}");
    let log = gw.log_text();
    assert!(log.contains("Sparkplug: DCMD refused.") && log.contains("is not writable"), "{log}");
    drop(gw);
}

/// Scenario: `[spool]` configured and the Sparkplug broker away, with a 20-reading memory
/// queue: its readings go to the Sparkplug output's own spool (the JSON side delivers them all
/// meanwhile); SIGTERM keeps them on disk; after a restart with the broker back they arrive
/// once each, in order, marked historical, and live readings after them are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_readings_wait_in_its_own_spool_and_come_back_historical() {
    let Some(python) = python() else { return };
    let dir = common::tempdir();
    let json_broker = Mosquitto::start();
    let mut spb_broker = Mosquitto::start_custom(true, "queue_qos0_messages true".into());
    let mut spb_sub = Subscriber::connect_with(spb_broker.port, "spBv1.0/#", Some("spool-sub")).await;
    spb_broker.stop_gracefully();
    let mut json_sub = Subscriber::connect(json_broker.port, "sensorgate/it/metrics").await;
    let mut pty = PtyLink::create(&dir.path().join("a")).unwrap();
    let extra = format!(
        "[sparkplug.mqtt]\nport = {}\n[queue]\nmax_readings = 20\n[spool]\ndir = \"spool\"\nsync_interval = \"100ms\"",
        spb_broker.port
    );
    let text = config(dir.path(), json_broker.port, &extra, &["a"]);
    let mut gw = Gateway::start(dir.path(), &text);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in (0..200).step_by(20) {
        write_all(&mut pty.master, &json_lines(i..i + 20)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (m, _) = json_sub
        .wait_for(Duration::from_secs(10), |m| {
            let v = m.json();
            v["devices"]["a"]["delivered"] == 200 && v["sparkplug"]["devices"]["a"]["spooled"] == 200
        })
        .await;
    let sp = &m.json()["sparkplug"];
    assert_eq!(n(&sp["devices"]["a"], "dropped_oldest"), 0, "spooled, not dropped: {sp}");
    assert!(n(&sp["spool"], "bytes") > 0, "{sp}");
    gw.signal(libc::SIGTERM);
    assert!(gw.wait(Duration::from_secs(10)).success(), "{}", gw.log_text());
    assert!(dir.path().join("state/spool-sparkplug/a").is_dir(), "its own spool, beside the main one");

    spb_broker.restart();
    let gw = Gateway::start(dir.path(), &text);
    let mut got = Vec::new();
    while got.iter().filter(|m: &&Msg| kind(m) == "DDATA").count() < 200 {
        collect(&mut spb_sub, &mut got, 15, |_| true).await;
    }
    write_all(&mut pty.master, &json_lines(200..205)).await;
    while got.iter().filter(|m: &&Msg| kind(m) == "DDATA").count() < 205 {
        collect(&mut spb_sub, &mut got, 15, |_| true).await;
    }
    let decoded = decode(&python, &got);
    assert_eq!(ddata_ns(&decoded), (0..205).collect::<Vec<_>>(), "once each, in order");
    let historical: Vec<bool> = decoded
        .iter()
        .filter(|v| v["type"] == "DDATA")
        .map(|v| metric(v, "n").unwrap()["is_historical"] == true)
        .collect();
    assert!(historical[..200].iter().all(|h| *h), "the spooled readings are historical");
    assert!(historical[200..].iter().all(|h| !*h), "live readings are not");
    drop(gw);
}
