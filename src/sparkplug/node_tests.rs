use prost::Message as _;

use super::*;

fn decode(p: &Publish) -> Payload {
    Payload::decode(p.payload.as_slice()).expect("our own payload decodes")
}

fn reading(n: i64, extra: &str) -> Vec<u8> {
    format!(r#"{{"n":{n},"t":1.5{extra},"_gw":{{"device":"d","received_at_us":7000}}}}"#).into_bytes()
}

fn kinds(out: &[Publish]) -> Vec<&str> {
    out.iter().map(|p| p.topic.split('/').nth(2).unwrap()).collect()
}

fn connected_node() -> EdgeNode {
    let mut node = EdgeNode::new("g", "n", None, 255);
    let (_, _, bd) = node.next_will();
    assert_eq!(bd, 0, "a first start connects with bdSeq 0");
    node.connected();
    node
}

#[test]
fn birth_then_data_with_one_seq_across_node_and_devices() {
    let mut node = connected_node();
    let mut out = Vec::new();
    node.set_device_up("d", true);
    node.due(Health::default(), &mut out);
    assert_eq!(kinds(&out), ["NBIRTH"], "a device without known metrics is born at its first reading");
    node.reading("d", &reading(1, ""), &mut out).unwrap();
    node.reading("d", &reading(2, ""), &mut out).unwrap();
    assert_eq!(kinds(&out), ["NBIRTH", "DBIRTH", "DDATA", "DDATA"]);
    let seqs: Vec<u64> = out.iter().map(|p| decode(p).seq.unwrap()).collect();
    assert_eq!(seqs, [0, 1, 2, 3]);
    let birth = decode(&out[1]);
    let names: Vec<_> = birth.metrics.iter().map(|m| (m.name.clone().unwrap(), m.datatype.unwrap())).collect();
    assert_eq!(names, [("n".to_string(), DataType::Int64 as u32), ("t".to_string(), DataType::Double as u32)]);
    let data = decode(&out[3]);
    assert_eq!(data.timestamp, Some(7), "from _gw.received_at_us, in ms");
    assert!(data.metrics.iter().all(|m| m.name.is_none() && m.alias.is_some()), "data by alias only");
    assert_eq!(data.metrics[0].value, Some(Value::Long(2)));
}

#[test]
fn seq_wraps_and_a_new_field_or_type_births_the_device_again_with_the_same_aliases() {
    let mut node = connected_node();
    let mut out = Vec::new();
    node.due(Health::default(), &mut out);
    for i in 0..300 {
        node.reading("d", &reading(i, ""), &mut out).unwrap();
    }
    let seqs: Vec<u64> = out.iter().map(|p| decode(p).seq.unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == (w[0] + 1) % 256), "continuous modulo 256");
    let first_birth = decode(&out[1]);
    out.clear();
    node.reading("d", &reading(1, r#","on":true"#), &mut out).unwrap();
    node.reading("d", br#"{"n":1.25,"t":1.5,"on":false}"#, &mut out).unwrap();
    assert_eq!(kinds(&out), ["DBIRTH", "DDATA", "DBIRTH", "DDATA"], "new field, then n's type changed");
    let again = decode(&out[2]);
    let alias = |p: &Payload, name: &str| p.metrics.iter().find(|m| m.name.as_deref() == Some(name)).unwrap().alias;
    assert_eq!(alias(&again, "n"), alias(&first_birth, "n"), "stable alias across births and a type change");
    let n = again.metrics.iter().find(|m| m.name.as_deref() == Some("n")).unwrap();
    assert_eq!(n.datatype, Some(DataType::Double as u32));
}

#[test]
fn death_when_the_device_leaves_up_and_birth_when_it_returns() {
    let mut node = connected_node();
    let mut out = Vec::new();
    node.due(Health::default(), &mut out);
    node.reading("d", &reading(1, ""), &mut out).unwrap();
    out.clear();
    node.set_device_up("d", false);
    node.due(Health::default(), &mut out);
    node.due(Health::default(), &mut out);
    assert_eq!(kinds(&out), ["DDEATH"], "once");
    out.clear();
    node.set_device_up("d", true);
    node.due(Health::default(), &mut out);
    assert_eq!(kinds(&out), ["DBIRTH"], "its known metrics, at once");
    out.clear();
    node.set_devices(&[("other".to_string(), true)]);
    node.due(Health::default(), &mut out);
    assert_eq!(kinds(&out), ["DDEATH"], "a device a reload removed dies");
}

#[test]
fn rebirth_command_and_primary_host_state() {
    let mut node = EdgeNode::new("g", "n", Some("host"), 4);
    let (topic, will, bd) = node.next_will();
    assert_eq!((topic.as_str(), bd), ("spBv1.0/g/NDEATH/n", 5));
    assert_eq!(decode(&Publish { topic, payload: will }).metrics[0].value, Some(Value::Long(5)));
    node.connected();
    let mut out = Vec::new();
    node.due(Health::default(), &mut out);
    assert!(out.is_empty() && !node.may_publish(), "nothing until the host says online");
    node.incoming("spBv1.0/STATE/host", br#"{"online":true,"timestamp":1}"#);
    node.due(Health::default(), &mut out);
    assert_eq!(kinds(&out), ["NBIRTH"]);
    out.clear();
    let cmd =
        Payload { metrics: vec![metric_named(REBIRTH, DataType::Boolean, Value::Boolean(true))], ..Default::default() };
    node.incoming("spBv1.0/g/NCMD/n", &cmd.encode_to_vec());
    node.due(Health { queue_depth: 3, ..Default::default() }, &mut out);
    let birth = decode(&out[0]);
    assert_eq!((kinds(&out)[0], birth.seq), ("NBIRTH", Some(0)));
    assert_eq!(birth.metrics[0].value, Some(Value::Long(5)), "the same bdSeq");
    node.incoming("spBv1.0/STATE/host", br#"{"online":false,"timestamp":2}"#);
    assert!(!node.may_publish());
    assert!(node.incoming("spBv1.0/g/DCMD/n/d", b"anything").is_empty());
    assert_eq!(node.commands_ignored, 1);
}

#[test]
fn readings_without_metrics_are_refused() {
    let mut node = connected_node();
    let mut out = Vec::new();
    assert!(matches!(node.reading("d", b"[1,2]", &mut out), Err(Skip::NotAnObject(_))));
    assert_eq!(node.reading("d", br#"{"_gw":{},"x":null}"#, &mut out), Err(Skip::NoMetrics));
    assert!(out.is_empty());
}

#[test]
fn a_dcmd_becomes_writes_by_name_or_by_the_birth_alias() {
    let mut node = connected_node();
    let mut out = Vec::new();
    node.due(Health::default(), &mut out);
    node.reading("d", br#"{"setpoint":21.5,"relay":false,"count":3}"#, &mut out).unwrap();
    let birth = decode(&out[1]);
    let alias = |name: &str| birth.metrics.iter().find(|m| m.name.as_deref() == Some(name)).unwrap().alias;
    let cmd = Payload {
        metrics: vec![
            metric_named("setpoint", DataType::Double, Value::Double(23.5)),
            Metric { alias: alias("relay"), value: Some(Value::Boolean(true)), ..Default::default() },
            Metric { alias: alias("count"), value: Some(Value::Long(-2i64 as u64)), ..Default::default() },
        ],
        ..Default::default()
    };
    let writes = node.incoming("spBv1.0/g/DCMD/n/d", &cmd.encode_to_vec());
    let got: Vec<(String, serde_json::Value)> = writes.into_iter().map(|w| (w.metric, w.value)).collect();
    assert_eq!(
        got,
        [
            ("setpoint".to_string(), serde_json::json!(23.5)),
            ("relay".to_string(), serde_json::json!(true)),
            ("count".to_string(), serde_json::json!(-2)),
        ]
    );
    assert!(node.incoming("spBv1.0/g/DCMD/n/unknown", &cmd.encode_to_vec()).is_empty());
    assert_eq!(node.commands_ignored, 1);
}

#[test]
fn a_declared_device_is_born_when_up_before_its_first_reading() {
    let mut node = connected_node();
    let mut out = Vec::new();
    node.declare("m", [("voltage".to_string(), DataType::Double), ("relay".to_string(), DataType::Boolean)]);
    node.due(Health::default(), &mut out);
    assert_eq!(kinds(&out), ["NBIRTH"], "not up yet");
    node.set_device_up("m", true);
    node.due(Health::default(), &mut out);
    assert_eq!(kinds(&out), ["NBIRTH", "DBIRTH"]);
    let birth = decode(&out[1]);
    assert!(birth.metrics.iter().all(|m| m.is_null == Some(true) && m.value.is_none()), "no values yet");
    out.clear();
    node.reading("m", br#"{"voltage":230.5,"relay":false}"#, &mut out).unwrap();
    assert_eq!(kinds(&out), ["DDATA"], "the types were right: no second birth");
}

#[test]
fn after_the_farewell_nothing_is_born_again() {
    let mut node = connected_node();
    let mut out = Vec::new();
    node.due(Health::default(), &mut out);
    assert!(node.farewell().is_some());
    out.clear();
    node.due(Health::default(), &mut out);
    assert!(out.is_empty() && !node.may_publish(), "{:?}", kinds(&out));
    assert!(node.farewell().is_none(), "said once");
}
