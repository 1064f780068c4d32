//! Faults against the real binary, on loopback, bounded in count and time: a descriptor
//! flood past the server's own open-files limit, and clients that vanish.
//!
//! The server runs with a lowered open-files limit so that a flood past it takes hundreds
//! of connections, not twenty thousand.

mod support;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// `/stats` totals, or `None` while the API does not answer.
fn totals(addr: std::net::SocketAddr) -> Option<serde_json::Value> {
    let resp = try_http(addr, "/stats")?;
    (resp.status == 200).then(|| resp.json()["totals"].clone())
}

/// A GET on a fresh connection; `None` when the connection is closed unanswered.
fn try_http(addr: std::net::SocketAddr, path: &str) -> Option<HttpAnswer> {
    std::panic::catch_unwind(|| http(addr, "GET", path, &[], b"")).ok()
}

/// Waits up to [`PATIENCE`] for `cond` on the `/stats` totals.
fn wait_totals(addr: std::net::SocketAddr, what: &str, cond: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if totals(addr).is_some_and(|t| cond(&t)) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {:?}", totals(addr));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_descriptor_flood_past_the_process_limit_leaves_health_answering() {
    // 700 descriptors: 32 for HTTP, 64 reserved, so 604 device connections at most.
    let mut server = ServerProcess::start_with_open_files(
        &json!({
            "addr": "127.0.0.1:0",
            "http_addr": "127.0.0.1:0",
            "shards": 2,
            "max_http_connections": 32,
            "reserved_descriptors": 64,
        }),
        700,
    );
    // Silent connections (no hello), more than the process could hold.
    let flood: Vec<_> = (0..900).map(|_| connect_tcp(server.device_addr)).collect();
    // The server keeps answering its API while the flood holds every device slot.
    for path in ["/health", "/stats", "/delivery-hosts"] {
        let resp = try_http(server.http_addr, path)
            .unwrap_or_else(|| panic!("{path} unanswered during the flood"));
        assert_eq!(resp.status, 200, "{path}");
    }
    let t = totals(server.http_addr).expect("stats");
    assert!(
        t["rejected_device_connections"].as_u64() >= Some(900 - 604),
        "{t}"
    );
    assert_eq!(
        t["device_accept_errors"], 0,
        "it never ran out of descriptors: {t}"
    );
    assert!(
        server
            .wait_log(|l| l.contains("WARN device connections at the limit"))
            .is_some()
    );
    assert!(!server.log.iter().any(|l| l.contains("Too many open files")));
    // Once the flood is gone, devices connect again.
    drop(flood);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut d = Device::connect(server.device_addr);
        let connect = br#"{"T":"connect","DeviceId":"after-flood","Levels":{}}"#;
        let mut hello = vec![0];
        hello.extend_from_slice(&(connect.len() as u16).to_be_bytes());
        hello.extend_from_slice(connect);
        d.send_raw(&hello);
        if d.recv_within(PATIENCE).is_ok_and(|m| m["T"] == "connack") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no device connects after the flood"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.terminate().map(|s| s.success()), Some(true));
}

#[test]
fn sessions_online_go_back_to_zero_when_every_client_vanishes() {
    let server = ServerProcess::start(&json!({
        "addr": "127.0.0.1:0",
        "http_addr": "127.0.0.1:0",
        "shards": 2,
    }));
    let mut devices = Vec::new();
    for i in 0..40 {
        let mut d = Device::connect(server.device_addr);
        let connect = format!(r#"{{"T":"connect","DeviceId":"gone-{i}","Levels":{{}}}}"#);
        let mut hello = vec![0];
        hello.extend_from_slice(&(connect.len() as u16).to_be_bytes());
        hello.extend_from_slice(connect.as_bytes());
        d.send_raw(&hello);
        let connack = d.recv_within(PATIENCE).expect("CONNACK");
        assert_eq!(connack["T"], "connack");
        devices.push(d);
    }
    wait_totals(server.http_addr, "40 sessions", |t| t["sessions"] == 40);
    // Half end with a reset (a killed process with unread data), half with a close.
    for (i, d) in devices.into_iter().enumerate() {
        if i % 2 == 0 {
            d.reset();
        }
    }
    wait_totals(server.http_addr, "no session left", |t| t["sessions"] == 0);
    let metrics = try_http(server.http_addr, "/metrics").expect("metrics");
    let online: u64 = metrics
        .body
        .as_str()
        .lines()
        .filter_map(|l| l.strip_prefix("pushbroker_sessions{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(online, 0);
}

/// The server's resident memory (KB), from /proc.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

const LATER: &str = "2099-01-01T00:00:00Z";

fn register(addr: std::net::SocketAddr, device: &str) -> String {
    let resp = post_json(
        addr,
        "/register",
        &json!({"deviceid": device, "appid": "app"}),
    );
    assert_eq!(resp.status, 200);
    resp.json()["token"].as_str().expect("token").to_owned()
}

fn notify(addr: std::net::SocketAddr, token: &str, data: serde_json::Value) {
    let resp = post_json(
        addr,
        "/notify",
        &json!({"appid": "app", "token": token, "expire_on": LATER, "data": data}),
    );
    assert_eq!(resp.status, 200, "{:?}", resp.body.as_str());
}

#[test]
fn a_device_that_stops_reading_during_broadcasts_ends_alone_and_keeps_its_notifications() {
    let server = ServerProcess::start(&json!({
        "addr": "127.0.0.1:0",
        "http_addr": "127.0.0.1:0",
        "shards": 2,
        "exchange_timeout": "3s",
    }));
    let info = json!({"device": "mako", "channel": "daily"});
    let token = register(server.http_addr, "stalled");
    notify(server.http_addr, &token, json!("kept"));
    // The stalled device reads its CONNACK, then nothing more.
    let mut stalled = Device::connect(server.device_addr);
    stalled.hello("stalled", json!({}), info.clone());
    let mut reader = Device::connect(server.device_addr);
    reader.hello("reader", json!({}), info.clone());
    // The reader answers on its own thread, so that its ACKs never wait for the POSTs.
    let reader = std::thread::spawn(move || {
        let mut top = 0;
        while top < 300 {
            let msg = reader.expect("broadcast");
            top = msg["TopLevel"].as_i64().expect("level");
            reader.ack();
        }
        reader
    });
    let before = rss_kb(server.pid());
    let big = "x".repeat(1500);
    for i in 0..300 {
        let resp = post_json(
            server.http_addr,
            "/broadcast",
            &json!({"channel": "system", "expire_on": LATER, "data": {"daily/mako": [i, big]}}),
        );
        assert_eq!(resp.status, 200);
    }
    // The reader gets everything up to the last level.
    let mut reader = reader.join().expect("the reader got every broadcast");
    // The stalled one is ended (its ACK never came) and only it.
    assert!(stalled.closed(), "the stalled device is still connected");
    let after = rss_kb(server.pid());
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KB to {after} KB"
    );
    let resp = post_json(
        server.http_addr,
        "/broadcast",
        &json!({"channel": "system", "expire_on": LATER, "data": {"daily/mako": ["last"]}}),
    );
    assert_eq!(resp.status, 200);
    assert_eq!(reader.expect("broadcast")["TopLevel"], 301);
    reader.ack();
    // Its notification stayed pending: it comes on the next connection.
    let mut again = Device::connect(server.device_addr);
    again.hello("stalled", json!({"0": 301}), info);
    let msg = again.expect("notifications");
    assert_eq!(msg["Notifications"][0]["P"], "kept", "{msg}");
}

#[test]
fn slowloris_on_either_port_is_cut_off_at_its_deadline() {
    let server = ServerProcess::start(&json!({
        "addr": "127.0.0.1:0",
        "http_addr": "127.0.0.1:0",
        "exchange_timeout": "1s",
        "http_read_timeout": "1s",
    }));
    let connect = br#"{"T":"connect","DeviceId":"slow","Levels":{}}"#;
    let mut hello = vec![0];
    hello.extend_from_slice(&(connect.len() as u16).to_be_bytes());
    hello.extend_from_slice(connect);
    let http_head = b"POST /register HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    for (port, bytes) in [
        (server.device_addr, &hello[..]),
        (server.http_addr, &http_head[..]),
    ] {
        // A byte every 100 ms: the whole would take longer than the 1 s allowed.
        let mut s = connect_tcp(port);
        let started = Instant::now();
        let mut cut = false;
        for b in bytes.iter().take(40) {
            if std::io::Write::write_all(&mut s, &[*b]).is_err() {
                cut = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !cut {
            // Writes may still be taken after the close; the read sees it.
            s.set_read_timeout(Some(PATIENCE)).expect("timeout");
            let mut rest = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut rest);
            assert!(
                !String::from_utf8_lossy(&rest).contains("connack")
                    && !String::from_utf8_lossy(&rest).contains("200 OK"),
                "{port}: answered a trickle: {:?}",
                String::from_utf8_lossy(&rest)
            );
        }
        let took = started.elapsed();
        assert!(cut, "{port}: still open after the trickle");
        assert!(
            took < Duration::from_secs(4),
            "{port}: cut only after {took:?}"
        );
    }
    assert_eq!(
        http(server.http_addr, "GET", "/health", &[], b"").status,
        200
    );
}

/// A request whose head came whole but whose declared body stops short is answered 400
/// (not held open) once `http_read_timeout` has passed, and the server goes on.
#[test]
fn a_body_that_stops_short_is_cut_off_at_the_read_timeout() {
    let server = ServerProcess::start(&json!({
        "addr": "127.0.0.1:0",
        "http_addr": "127.0.0.1:0",
        "http_read_timeout": "1s",
    }));
    let mut s = connect_tcp(server.http_addr);
    let started = Instant::now();
    std::io::Write::write_all(
        &mut s,
        b"POST /register HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{\"deviceid\"",
    )
    .expect("write");
    s.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut answer);
    let took = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        took >= Duration::from_millis(900),
        "answered after {took:?}"
    );
    assert!(took < Duration::from_secs(4), "answered after {took:?}");
    assert_eq!(
        http(server.http_addr, "GET", "/health", &[], b"").status,
        200
    );
}

#[test]
fn a_reconnect_storm_with_last_wins_kicks_delivers_every_pending_notification_once() {
    const DEVICES: usize = 2000;
    // Long enough that a connection closed within PATIENCE was kicked, not timed out.
    let server = ServerProcess::start(&json!({
        "addr": "127.0.0.1:0",
        "http_addr": "127.0.0.1:0",
        "shards": 2,
        "exchange_timeout": "60s",
        "ping_interval": "10m",
    }));
    for i in 0..DEVICES {
        let token = register(server.http_addr, &format!("storm-{i}"));
        notify(server.http_addr, &token, json!(i));
    }
    let hello = |id: &str| {
        let connect = format!(r#"{{"T":"connect","DeviceId":"{id}","Levels":{{}}}}"#);
        let mut bytes = vec![0];
        bytes.extend_from_slice(&(connect.len() as u16).to_be_bytes());
        bytes.extend_from_slice(connect.as_bytes());
        let mut d = Device::connect(server.device_addr);
        d.send_raw(&bytes);
        d
    };
    let payloads = |msg: &serde_json::Value| -> Vec<serde_json::Value> {
        msg["Notifications"]
            .as_array()
            .map(|a| a.iter().map(|n| n["P"].clone()).collect())
            .unwrap_or_default()
    };
    // Every device connects and is handed its notification, which it never acknowledges.
    let mut olders: Vec<_> = (0..DEVICES).map(|i| hello(&format!("storm-{i}"))).collect();
    for (i, d) in olders.iter_mut().enumerate() {
        assert_eq!(d.expect("connack")["T"], "connack");
        assert_eq!(
            payloads(&d.expect("notifications")),
            [json!(i)],
            "device {i}"
        );
    }
    // Then all of them reconnect at once, on whichever shard accepts: each newer
    // connection wins, the older one is closed, and the unacknowledged notification
    // comes again on the newer one, once.
    let mut newers: Vec<_> = (0..DEVICES).map(|i| hello(&format!("storm-{i}"))).collect();
    for (i, d) in newers.iter_mut().enumerate() {
        assert_eq!(d.expect("connack")["T"], "connack");
        assert_eq!(
            payloads(&d.expect("notifications")),
            [json!(i)],
            "device {i}"
        );
        d.ack();
    }
    for (i, d) in olders.iter_mut().enumerate() {
        assert!(d.closed(), "device {i}: the older connection is still open");
    }
    std::thread::sleep(Duration::from_millis(300));
    for (i, d) in newers.iter_mut().enumerate() {
        match d.recv_within(Duration::from_millis(1)) {
            Err(RecvError::Timeout) => {}
            other => panic!("device {i}: {other:?} after its ACK"),
        }
    }
    // Acknowledged means gone: a third connection of every device gets nothing.
    let mut thirds: Vec<_> = (0..DEVICES).map(|i| hello(&format!("storm-{i}"))).collect();
    for (i, d) in thirds.iter_mut().enumerate() {
        assert_eq!(d.expect("connack")["T"], "connack", "device {i}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut again = Vec::new();
    for (i, d) in thirds.iter_mut().enumerate() {
        match d.recv_within(Duration::from_millis(1)) {
            Err(RecvError::Timeout) => {}
            other => again.push((i, format!("{other:?}"))),
        }
    }
    assert!(
        again.is_empty(),
        "{} came again after their ACK, e.g. {:?}",
        again.len(),
        again.first()
    );
}
