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
fn try_http(addr: std::net::SocketAddr, path: &str) -> Option<HttpResponse> {
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
    let online: u64 = String::from_utf8_lossy(&metrics.body)
        .lines()
        .filter_map(|l| l.strip_prefix("pushbroker_sessions{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(online, 0);
}
