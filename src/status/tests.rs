use super::*;

const T0: u64 = 1_795_795_000;

fn topics() -> StatusTopics {
    StatusTopics::new("sensorgate", "gw")
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(T0)
}

/// An RFC 3339 time `ago` seconds before [`now`].
fn since(ago: u64) -> String {
    humantime::format_rfc3339_millis(now() - Duration::from_secs(ago)).to_string()
}

fn state(s: &str, ago: u64, restarts: u64, error: Option<&str>) -> Vec<u8> {
    serde_json::json!({"state": s, "since": since(ago), "restarts": restarts, "last_error": error})
        .to_string()
        .into_bytes()
}

/// A metrics payload as the gateway writes it (fields `status` ignores included).
fn metrics(uptime_s: u64, devices: serde_json::Value) -> Vec<u8> {
    serde_json::json!({
        "uptime_s": uptime_s,
        "process": {"rss_bytes": 6_291_456, "cpu_seconds": 0.04},
        "queue": {"readings": 3, "bytes": 420, "max_readings": 10000, "max_bytes": 8_388_608, "poisoned_control": 0, "ledger_errors": 0},
        "mqtt": {"connected": true, "reconnects": 0, "last_error": null},
        "commands": {"executed": 0, "refused": {}, "responses_dropped": 0},
        "devices": devices,
    })
    .to_string()
    .into_bytes()
}

fn device(readings: u64, age_ms: Option<u64>, rejected: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "state": "up", "bytes_in": 0, "frames_in": readings, "readings": readings, "rejected": rejected,
        "sequence_gaps": 0, "delivered": readings.saturating_sub(4), "dropped_oldest": 2, "expired": 1, "poisoned": 1,
        "queued": 0, "in_flight": 0, "spooled": 0, "restored": 0, "republished": 0, "restarts": 0,
        "last_reading_age_ms": age_ms,
    })
}

fn no_rejects() -> serde_json::Value {
    serde_json::json!({"bad_json": 0, "oversize": 0, "total": 0})
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// An online gateway with one healthy device, two metrics messages 2 s apart.
fn healthy() -> Observation {
    healthy_configured(&[])
}

/// The same, from a status run that read a config naming `configured`.
fn healthy_configured(configured: &[&str]) -> Observation {
    let mut o = Observation::new(topics(), configured.iter().map(|d| d.to_string()).collect());
    assert_eq!(o.take("sensorgate/gw/state", b"online", ms(10)), Update::Gateway);
    assert_eq!(o.take("sensorgate/gw/devices/a/state", &state("up", 90, 0, None), ms(11)), Update::Device);
    let m1 = metrics(100, serde_json::json!({"a": device(1000, Some(50), no_rejects())}));
    let m2 = metrics(102, serde_json::json!({"a": device(1040, Some(70), no_rejects())}));
    assert_eq!(o.take("sensorgate/gw/metrics", &m1, ms(500)), Update::Metrics);
    assert_eq!(o.take("sensorgate/gw/metrics", &m2, ms(2500)), Update::Metrics);
    o
}

#[test]
fn a_healthy_gateway_exits_0_with_rates_from_two_metrics_messages() {
    let r = healthy().report(now(), ms(2500));
    assert_eq!((r.verdict, r.exit), (Verdict::Healthy, 0));
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    let a = &r.devices["a"];
    assert_eq!(a.readings_per_s, Some(20.0), "40 readings in 2 s");
    assert_eq!(a.state.as_deref(), Some("up"));
    assert_eq!(a.since_s, Some(90));
    assert_eq!(a.delivered, Some(1036));
    assert_eq!(a.dropped, Some(4), "dropped_oldest 2 + expired 1 + poisoned 1");
    assert_eq!((a.rejected, a.top_rejected.clone()), (Some(0), None));
    assert_eq!(a.last_reading_age_ms, Some(70));
    assert_eq!(r.gateway.uptime_s, Some(102));
    assert_eq!(
        (r.gateway.queue_readings, r.gateway.queue_bytes, r.gateway.mqtt_connected),
        (Some(3), Some(420), Some(true))
    );
}

#[test]
fn the_rate_uses_arrival_times_unless_they_disagree_with_uptime() {
    let sample = |at_ms, uptime_s| Sample { at: ms(at_ms), metrics: MetricsIn { uptime_s, ..Default::default() } };
    // 200 ms apart: uptime_s did not move (whole seconds), the arrivals tell.
    assert_eq!(elapsed(&sample(1000, 4), &sample(1200, 4)), Some(ms(200)));
    assert_eq!(elapsed(&sample(1000, 4), &sample(1200, 5)), Some(ms(200)));
    // A burst that waited in the gateway's queue: 10 s of uptime arrived 5 ms apart.
    assert_eq!(elapsed(&sample(1000, 4), &sample(1005, 14)), Some(Duration::from_secs(10)));
    // The gateway restarted: its counters started over.
    assert_eq!(elapsed(&sample(1000, 40), &sample(3000, 1)), None);
    // Same arrival, same uptime: nothing to divide by.
    assert_eq!(elapsed(&sample(1000, 4), &sample(1000, 4)), None);
}

#[test]
fn dropped_is_the_sum_and_the_top_rejected_reason_is_the_most_frequent() {
    let mut o = Observation::new(topics(), Vec::new());
    o.take("sensorgate/gw/state", b"online", ms(1));
    o.take("sensorgate/gw/devices/a/state", &state("up", 5, 0, None), ms(1));
    let rejected = serde_json::json!({"bad_json": 7, "oversize": 2, "bad_utf8": 7, "total": 16});
    let d = serde_json::json!({"state": "up", "readings": 10, "rejected": rejected, "dropped_oldest": 5, "expired": 3, "poisoned": 2});
    o.take("sensorgate/gw/metrics", &metrics(9, serde_json::json!({"a": d})), ms(2));
    let r = o.report(now(), ms(3000));
    let a = &r.devices["a"];
    assert_eq!(a.dropped, Some(10));
    assert_eq!(a.rejected, Some(16));
    // A tie between bad_json and bad_utf8 (7 each) goes to the first by name.
    assert_eq!(a.top_rejected, Some(Rejected { reason: "bad_json".into(), count: 7 }));
    assert_eq!(a.readings_per_s, None);
    assert!(r.notes.iter().any(|n| n.starts_with("rate: n/a (one metrics message")), "{:?}", r.notes);
    // One metrics message is enough for the verdict.
    assert_eq!(r.verdict, Verdict::Healthy);
}

#[test]
fn a_device_not_up_an_offline_gateway_or_no_metrics_exit_1() {
    let mut o = healthy();
    o.take("sensorgate/gw/devices/a/state", &state("stale", 3, 0, Some("no data for 1s")), ms(3000));
    let r = o.report(now(), ms(3000));
    assert_eq!((r.verdict, r.exit), (Verdict::Unhealthy, 1));
    assert_eq!(r.problems, ["a is stale"]);
    assert_eq!(r.devices["a"].last_error.as_deref(), Some("no data for 1s"));

    let mut o = healthy();
    o.take("sensorgate/gw/state", b"offline", ms(3000));
    assert_eq!(o.report(now(), ms(3000)).problems, ["gateway is offline"]);

    let mut o = Observation::new(topics(), Vec::new());
    o.take("sensorgate/gw/state", b"online", ms(1));
    o.take("sensorgate/gw/devices/a/state", &state("up", 5, 0, None), ms(1));
    let r = o.report(now(), ms(15_000));
    assert_eq!(r.problems, ["no metrics"]);
    assert_eq!(r.devices["a"].state.as_deref(), Some("up"), "the retained state is shown without metrics");
    assert_eq!(r.devices["a"].readings_per_s, None);

    let r = Observation::new(topics(), Vec::new()).report(now(), ms(1));
    assert_eq!(r.exit, 1);
    assert_eq!(r.problems, ["nothing retained on sensorgate/gw/state (wrong gateway id or prefix?)"]);
}

#[test]
fn configured_devices_the_gateway_says_nothing_about_are_problems() {
    let r = healthy_configured(&["a", "b"]).report(now(), ms(1));
    assert_eq!(r.problems, ["b: no state"]);
    assert_eq!(r.devices["b"].delivered, None);
}

#[test]
fn retained_states_of_devices_no_longer_reported_are_noted_not_shown() {
    let mut o = healthy();
    o.take("sensorgate/gw/devices/old/state", &state("stopped", 900, 0, None), ms(1));
    // A cleared retained message removes a device; other topics are not ours.
    o.take("sensorgate/gw/devices/gone/state", &state("up", 1, 0, None), ms(1));
    assert_eq!(o.take("sensorgate/gw/devices/gone/state", b"", ms(2)), Update::Device);
    assert_eq!(o.take("sensorgate/other/state", b"offline", ms(2)), Update::Ignored);
    let r = o.report(now(), ms(1));
    assert_eq!(r.devices.keys().collect::<Vec<_>>(), ["a"]);
    assert_eq!(r.verdict, Verdict::Healthy);
    assert!(r.notes.iter().any(|n| n.ends_with("not shown: old")), "{:?}", r.notes);
}

#[test]
fn an_unreadable_message_is_noted_and_skipped() {
    let mut o = healthy();
    assert_eq!(o.take("sensorgate/gw/metrics", b"{not json", ms(3000)), Update::Ignored);
    let r = o.report(now(), ms(1));
    assert_eq!(r.devices["a"].readings_per_s, Some(20.0), "the last good pair still counts");
    assert!(r.notes.iter().any(|n| n.starts_with("unreadable message on sensorgate/gw/metrics")), "{:?}", r.notes);
}

#[test]
fn complete_waits_for_the_retained_states_and_enough_metrics() {
    let mut o = Observation::new(topics(), Vec::new());
    let secs = Duration::from_secs;
    assert!(o.complete(true, secs(10), None), "nothing retained: nothing is coming");
    assert!(!o.complete(false, secs(10), None), "before the PINGRESP the retained messages may still come");
    o.take("sensorgate/gw/state", b"online", ms(1));
    assert!(!o.complete(true, secs(10), None), "online: metrics are coming");
    o.take("sensorgate/gw/metrics", &metrics(1, serde_json::json!({})), ms(2));
    assert!(!o.complete(true, secs(10), None), "interval unknown: wait for a second one");
    assert!(!o.complete(true, secs(10), Some(secs(2))), "a second one can come in time");
    assert!(o.complete(true, secs(10), Some(secs(30))), "a second one cannot come in time");
    o.take("sensorgate/gw/metrics", &metrics(2, serde_json::json!({})), ms(3));
    assert!(o.complete(true, secs(10), None));
    let mut offline = Observation::new(topics(), Vec::new());
    offline.take("sensorgate/gw/state", b"offline", ms(1));
    assert!(offline.complete(true, secs(10), None), "an offline gateway sends no metrics");
}

/// A broker may send the PINGRESP before retained messages its in-flight window held back.
#[test]
fn complete_waits_for_the_state_of_every_configured_device() {
    let mut o = Observation::new(topics(), vec!["a".into(), "b".into()]);
    o.take("sensorgate/gw/state", b"offline", ms(1));
    o.take("sensorgate/gw/devices/a/state", &state("stopped", 5, 0, None), ms(1));
    assert!(!o.complete(true, Duration::from_secs(10), None));
    o.take("sensorgate/gw/devices/b/state", &state("stopped", 5, 0, None), ms(2));
    assert!(o.complete(true, Duration::from_secs(10), None));
}

#[test]
fn the_table_shows_every_column_and_colours_only_when_asked() {
    let mut o = healthy_configured(&["b"]);
    o.take("sensorgate/gw/devices/b/state", &state("backoff", 125, 3, Some("unplugged\nport gone")), ms(1));
    let r = o.report(now(), ms(1));
    let plain = r.table(Colour::Off);
    assert!(!plain.contains('\x1b'), "{plain}");
    let lines: Vec<&str> = plain.lines().collect();
    assert_eq!(lines[0], "gateway gw  online  up 1m42s  mqtt connected  queue 3 readings (420B)");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        [
            "DEVICE",
            "STATE",
            "FOR",
            "READ/S",
            "DELIVERED",
            "DROPPED",
            "REJECTED",
            "LAST",
            "READING",
            "RESTARTS",
            "LAST",
            "ERROR"
        ]
    );
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["a", "up", "1m30s", "20.0", "1036", "4", "0", "70ms", "ago", "0", "-"]
    );
    assert_eq!(
        lines[3].split_whitespace().collect::<Vec<_>>(),
        ["b", "backoff", "2m05s", "n/a", "-", "-", "-", "-", "3", "unplugged", "port", "gone"]
    );
    // Columns line up: every row's STATE starts where the header's does.
    let col = lines[1].find("STATE").unwrap();
    assert_eq!(&lines[2][col..col + 2], "up");
    assert_eq!(&lines[3][col..col + 7], "backoff");
    assert_eq!(lines[4], "1 problem(s): b is backoff");
    // The gateway's version is not in the metrics: not shown, and not noted each time (README).
    assert!(!plain.contains("version"), "{plain}");
    let coloured = r.table(Colour::On);
    assert!(coloured.contains("\x1b[32mup"), "{coloured:?}");
    assert!(coloured.contains("\x1b[33mbackoff"), "{coloured:?}");
}

#[test]
fn json_carries_the_same_data() {
    let r = healthy().report(now(), ms(1));
    let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
    assert_eq!(v["verdict"], "healthy");
    assert_eq!(v["exit"], 0);
    assert_eq!(v["gateway"]["id"], "gw");
    assert_eq!(v["gateway"]["state"], "online");
    assert_eq!(v["devices"]["a"]["readings_per_s"], 20.0);
    assert_eq!(v["devices"]["a"]["dropped"], 4);
    assert_eq!(v["devices"]["a"]["top_rejected"], serde_json::Value::Null);
}

#[test]
fn broker_addresses() {
    assert_eq!(parse_broker("localhost"), Ok(("localhost".into(), 1883)));
    assert_eq!(parse_broker("10.0.0.2:8883"), Ok(("10.0.0.2".into(), 8883)));
    assert_eq!(parse_broker("[::1]:1884"), Ok(("::1".into(), 1884)));
    assert_eq!(parse_broker("[::1]"), Ok(("::1".into(), 1883)));
    assert_eq!(parse_broker("::1"), Ok(("::1".into(), 1883)));
    assert!(parse_broker("host:0").is_err());
    assert!(parse_broker("host:http").is_err());
    assert!(parse_broker(":1883").is_err());
    assert!(check_topic_name("gateway id", "gw/1", false).is_err());
    assert!(check_topic_name("gateway id", "gw+", false).is_err());
    assert!(check_topic_name("topic prefix", "site/sensorgate", true).is_ok());
    assert!(check_topic_name("topic prefix", "site/", true).is_err());
}
