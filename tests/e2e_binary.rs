//! The real `pushbroker` binary end to end: its log lines (docs/protocol.md §4.3), the
//! HTTP API's answers over real connections (§3), the configuration file and the command
//! line, and an orderly stop on SIGTERM.
//!
//! Every server listens on loopback port 0; the addresses come from its log. Tests assert
//! outcomes, never speed: every wait is bounded by [`PATIENCE`].

mod support;
use support::*;

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// An expiry far in the future.
const LATER: &str = "2099-01-01T00:00:00Z";

/// The binary under test.
const BINARY: &str = env!("CARGO_BIN_EXE_pushbroker");

/// A configuration on loopback port 0 for both listeners, with `extra` keys added.
fn config(extra: Value) -> Value {
    let mut c = json!({"addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0"});
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

// ---------------------------------------------------------------------------------------
// Log lines
// ---------------------------------------------------------------------------------------

/// The level words of the log format.
const LEVELS: [&str; 4] = ["DEBUG", "INFO", "WARN", "ERROR"];

/// Splits a log line of the shape
/// `^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}\.\d{6} (DEBUG|INFO|WARN|ERROR) ` into its level
/// and message; `None` when it has another shape.
fn parse_log_line(line: &str) -> Option<(&str, &str)> {
    // `#` stands for one ASCII digit; everything else must be there as written.
    const STAMP: &[u8] = b"####/##/## ##:##:##.###### ";
    let bytes = line.as_bytes();
    if bytes.len() < STAMP.len() {
        return None;
    }
    for (&want, &got) in STAMP.iter().zip(bytes) {
        let ok = if want == b'#' {
            got.is_ascii_digit()
        } else {
            got == want
        };
        if !ok {
            return None;
        }
    }
    let rest = &line[STAMP.len()..];
    LEVELS.iter().find_map(|level| {
        rest.strip_prefix(level)
            .and_then(|r| r.strip_prefix(' '))
            .map(|message| (*level, message))
    })
}

/// Asserts that `line` has the log shape and no module path between level and message.
fn assert_log_shape(line: &str) {
    let Some((_, message)) = parse_log_line(line) else {
        panic!("log line of the wrong shape: {line:?}");
    };
    let first = message.split(' ').next().unwrap_or("");
    assert!(
        !(first.ends_with(':') && first.contains("::")),
        "module path before the message: {line:?}"
    );
}

/// The level of a well-shaped log line.
fn level_of(line: &str) -> Option<&str> {
    parse_log_line(line).map(|(level, _)| level)
}

/// Whether `line` is at INFO or above.
fn is_info_or_above(line: &str) -> bool {
    matches!(level_of(line), Some("INFO" | "WARN" | "ERROR"))
}

/// The message of a well-shaped log line at `level`.
fn message_at<'a>(line: &'a str, level: &str) -> Option<&'a str> {
    parse_log_line(line)
        .filter(|(l, _)| *l == level)
        .map(|(_, message)| message)
}

/// Asserts the first two INFO lines of `log` are the listening lines, http first, with
/// the addresses the server bound.
fn assert_listening_lines_first(log: &[String], http_addr: SocketAddr, device_addr: SocketAddr) {
    let info: Vec<&str> = log
        .iter()
        .filter_map(|l| message_at(l, "INFO"))
        .take(2)
        .collect();
    assert_eq!(
        info,
        [
            format!("listening for http on {http_addr}"),
            format!("listening for devices on {device_addr}"),
        ],
        "log: {log:#?}"
    );
    for addr in [http_addr, device_addr] {
        assert_eq!(addr.ip().to_string(), "127.0.0.1");
        assert_ne!(addr.port(), 0, "the bound port, not the configured 0");
    }
}

/// Waits for `INFO session(ID) registered DEVICE_ID` and returns ID.
fn wait_registered(server: &mut ServerProcess, device_id: &str) -> String {
    let suffix = format!(") registered {device_id}");
    let line = server
        .wait_log(|l| {
            message_at(l, "INFO").is_some_and(|m| m.starts_with("session(") && m.ends_with(&suffix))
        })
        .unwrap_or_else(|| panic!("no registered line for {device_id}: {:#?}", server.log));
    let message = message_at(&line, "INFO").unwrap_or_default();
    let id = &message["session(".len()..message.len() - suffix.len()];
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
        "session id {id:?} in {line:?}"
    );
    id.to_owned()
}

/// The peer address of `DEBUG session(ID) connected PEER` (already logged before the
/// session registered).
fn connected_peer(server: &mut ServerProcess, id: &str) -> SocketAddr {
    let prefix = format!("session({id}) connected ");
    let line = server
        .wait_log(|l| message_at(l, "DEBUG").is_some_and(|m| m.starts_with(&prefix)))
        .unwrap_or_else(|| panic!("no connected line for session {id}: {:#?}", server.log));
    let message = message_at(&line, "DEBUG").unwrap_or_default();
    message[prefix.len()..]
        .parse()
        .unwrap_or_else(|e| panic!("peer address in {line:?}: {e}"))
}

/// The reason of `DEBUG session(ID) ended with: REASON`, waiting for it.
fn wait_ended(server: &mut ServerProcess, id: &str) -> String {
    let prefix = format!("session({id}) ended with: ");
    let line = server
        .wait_log(|l| message_at(l, "DEBUG").is_some_and(|m| m.starts_with(&prefix)))
        .unwrap_or_else(|| panic!("no ended line for session {id}: {:#?}", server.log));
    message_at(&line, "DEBUG").unwrap_or_default()[prefix.len()..].to_owned()
}

// The device helpers below read through [`recv`], which reads again when a signal
// interrupts a read: `Device::recv_within` reports EINTR (which a socket read with a
// timeout gets when the process is stopped and continued, or frozen) as an error.

/// The next message within `wait`, reading again after EINTR.
fn recv(device: &mut Device, wait: Duration) -> Result<Value, RecvError> {
    let deadline = Instant::now() + wait;
    loop {
        match device.recv_within(deadline.saturating_duration_since(Instant::now())) {
            Err(RecvError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Reads messages until one of type `t` comes, answering PINGs on the way; panics on
/// anything else.
fn expect(device: &mut Device, t: &str) -> Value {
    loop {
        let msg = recv(device, PATIENCE).unwrap_or_else(|e| panic!("expected {t}, got {e:?}"));
        if msg["T"] == t {
            return msg;
        }
        assert_eq!(msg["T"], "ping", "expected {t}, got {msg}");
        device.pong();
    }
}

/// Whether the server closes the connection within [`PATIENCE`] (PINGs are answered and
/// other messages skipped meanwhile).
fn closed(device: &mut Device) -> bool {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match recv(device, deadline.saturating_duration_since(Instant::now())) {
            Ok(msg) if msg["T"] == "ping" => device.pong(),
            Ok(_) => {}
            Err(RecvError::Timeout) => return false,
            Err(e) => return e.is_closed(),
        }
    }
}

/// Sends the version byte and CONNECT for `device_id` in one write and reads the answer:
/// the CONNACK, or how the connection ended (a hello that missed its timeout is closed).
fn hello(device: &mut Device, device_id: &str, info: Value) -> Result<Value, RecvError> {
    let connect = serde_json::to_vec(&json!({
        "T": "connect", "DeviceId": device_id, "ClientVer": "test", "Levels": {}, "Info": info
    }))
    .expect("json");
    let mut bytes = vec![0];
    bytes.extend_from_slice(&u16::try_from(connect.len()).expect("small").to_be_bytes());
    bytes.extend_from_slice(&connect);
    device.send_raw(&bytes);
    let connack = recv(device, PATIENCE)?;
    assert_eq!(connack["T"], "connack", "{connack}");
    Ok(connack)
}

/// A device that says hello with `device_id` and waits until the server logged its
/// registration; returns it and its session id.
fn registered_device(server: &mut ServerProcess, device_id: &str) -> (Device, String) {
    let mut device = Device::connect(server.device_addr);
    hello(&mut device, device_id, json!({})).expect("CONNACK");
    let id = wait_registered(server, device_id);
    (device, id)
}

#[test]
fn startup_logs_listening_for_http_then_devices_before_any_other_info_line() {
    let mut server = ServerProcess::start(&config(json!({})));
    assert_listening_lines_first(&server.log, server.http_addr, server.device_addr);
    // A session's lines come after both.
    let (device, id) = registered_device(&mut server, "startup-dev");
    device.close();
    assert_eq!(wait_ended(&mut server, &id), "EOF");
    for line in &server.log {
        assert_log_shape(line);
    }
}

#[test]
fn a_session_logs_connected_registered_and_eof_with_one_id() {
    // A long ping interval: nothing but the close ends the session.
    let mut server = ServerProcess::start(&config(json!({"ping_interval": "1m"})));
    let (device, id) = registered_device(&mut server, "eof-dev");
    let peer = connected_peer(&mut server, &id);
    assert!(peer.ip().is_loopback(), "{peer}");
    assert_ne!(peer.port(), 0);
    device.close();
    assert_eq!(wait_ended(&mut server, &id), "EOF");
    // The three lines in order.
    let at = |needle: &str| {
        server
            .log
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not logged"))
    };
    let connected = at(&format!(" DEBUG session({id}) connected "));
    let registered = at(&format!(" INFO session({id}) registered eof-dev"));
    let ended = at(&format!(" DEBUG session({id}) ended with: EOF"));
    assert!(
        connected < registered && registered < ended,
        "{:#?}",
        server.log
    );
    for line in &server.log {
        assert_log_shape(line);
    }
}

#[test]
fn a_device_that_does_not_answer_a_ping_ends_with_a_timeout() {
    let mut server = ServerProcess::start(&config(
        json!({"ping_interval": "200ms", "exchange_timeout": "300ms"}),
    ));
    // A hello must be whole within 300 ms of the accept: on a busy box a test thread may
    // be late, so a hello that timed out is tried again (bounded); that is not what this
    // test is about.
    let mut attempts = 0;
    let mut device = loop {
        attempts += 1;
        let mut device = Device::connect(server.device_addr);
        match hello(&mut device, "silent-dev", json!({})) {
            Ok(_) => break device,
            Err(e) => assert!(e.is_closed(), "{e:?}"),
        }
        assert!(attempts < 5, "no hello got through: {:#?}", server.log);
    };
    let id = wait_registered(&mut server, "silent-dev");
    let ping = recv(&mut device, PATIENCE).expect("a PING after the ping interval");
    assert_eq!(ping, json!({"T": "ping"}));
    // No PONG.
    let reason = wait_ended(&mut server, &id);
    assert!(reason.ends_with("timeout"), "{reason:?}");
    assert!(closed(&mut device), "the server closes the connection");
    connected_peer(&mut server, &id);
    for line in &server.log {
        assert_log_shape(line);
    }
}

#[test]
fn normal_operation_writes_nothing_at_info_or_above() {
    // Pings every 300 ms; the device has all the time it needs to answer.
    let mut server = ServerProcess::start(&config(json!({
        "ping_interval": "300ms", "exchange_timeout": "5s", "delivery_domain": "push.example.com"
    })));
    let mut device = Device::connect(server.device_addr);
    hello(
        &mut device,
        "quiet-dev",
        json!({"device": "mako", "channel": "daily"}),
    )
    .expect("CONNACK");
    wait_registered(&mut server, "quiet-dev");
    let from = server.log.len();

    let api = server.http_addr;
    let token = post_json(
        api,
        "/register",
        &json!({"deviceid": "quiet-dev", "appid": "app1"}),
    );
    assert_eq!(token.status, 200);
    let token = token.json()["token"].as_str().expect("token").to_owned();
    let notify = json!({"appid": "app1", "token": token, "expire_on": LATER, "data": {"n": 1}});
    assert_eq!(post_json(api, "/notify", &notify).status, 200);
    let notifications = expect(&mut device, "notifications");
    assert_eq!(notifications["Notifications"][0]["P"], json!({"n": 1}));
    device.ack();
    let broadcast = json!({"channel": "system", "expire_on": LATER, "data": {"daily/mako": 7}});
    assert_eq!(post_json(api, "/broadcast", &broadcast).status, 200);
    let got = expect(&mut device, "broadcast");
    assert_eq!(got["Payloads"], json!([{"daily/mako": 7}]));
    device.ack();
    assert_eq!(http_get(api, "/delivery-hosts").status, 200);
    let unregister = json!({"deviceid": "quiet-dev", "appid": "app1"});
    assert_eq!(post_json(api, "/unregister", &unregister).status, 200);
    // A failed request is normal operation too.
    assert_eq!(post_json(api, "/notify", &json!({})).status, 400);
    for _ in 0..2 {
        expect(&mut device, "ping");
        device.pong();
    }
    assert_eq!(http_get(api, "/health").status, 200);
    assert_eq!(http_get(api, "/metrics").status, 200);

    // A second device's registration marks the end: whatever the calls and pings logged
    // is before its line.
    let (marker, _) = registered_device(&mut server, "marker-dev");
    let to = server.log.len() - 1;
    let loud: Vec<&String> = server.log[from..to]
        .iter()
        .filter(|l| is_info_or_above(l))
        .collect();
    assert!(
        loud.is_empty(),
        "INFO or above in normal operation: {loud:#?}"
    );
    for line in &server.log {
        assert_log_shape(line);
    }
    // Still alive: the device answered every ping in time.
    assert_eq!(post_json(api, "/notify", &notify).status, 200);
    expect(&mut device, "notifications");
    device.ack();
    marker.close();
}

/// A log line written with `--log-format json`, checked for the keys every line has.
fn json_line(line: &str) -> Value {
    let value: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
    let stamp = value["timestamp"].as_str().unwrap_or_default();
    assert_eq!(
        stamp.replace(|c: char| c.is_ascii_digit(), "#"),
        "####-##-##T##:##:##.######Z",
        "{line}"
    );
    assert!(
        time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).is_ok(),
        "{line}"
    );
    assert!(
        LEVELS.contains(&value["level"].as_str().unwrap_or_default()),
        "{line}"
    );
    for key in ["target", "message"] {
        assert!(value[key].is_string(), "no {key}: {line}");
    }
    value
}

#[test]
fn log_format_json_writes_a_json_object_per_line() {
    let path = temp_dir("json-log").join("config.json");
    std::fs::write(&path, config(json!({"ping_interval": "1m"})).to_string()).expect("config");
    let path = path.to_string_lossy().into_owned();
    let mut server = ServerProcess::start_with(&["--log-format", "json", &path]);
    let listening: Vec<Value> = server.log.iter().map(|l| json_line(l)).collect();
    let messages: Vec<&str> = listening
        .iter()
        .filter(|l| l["level"] == "INFO")
        .filter_map(|l| l["message"].as_str())
        .collect();
    assert_eq!(
        messages,
        [
            format!("listening for http on {}", server.http_addr),
            format!("listening for devices on {}", server.device_addr),
        ]
    );
    assert!(
        listening
            .iter()
            .filter(|l| l["level"] == "INFO")
            .all(|l| l["target"] == "pushbroker::server"),
        "{listening:#?}"
    );

    let mut device = Device::connect(server.device_addr);
    hello(&mut device, "json-dev", json!({})).expect("CONNACK");
    let registered = server
        .wait_log(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.ends_with(") registered json-dev"))
            })
        })
        .unwrap_or_else(|| panic!("no registered line: {:#?}", server.log));
    let registered = json_line(&registered);
    assert_eq!(registered["level"], "INFO");
    assert_eq!(registered["target"], "pushbroker::session");
    device.close();
    let ended = server
        .wait_log(|l| l.contains("ended with: EOF"))
        .unwrap_or_else(|| panic!("no ended line: {:#?}", server.log));
    let ended = json_line(&ended);
    assert_eq!(ended["level"], "DEBUG");
    assert_eq!(ended["target"], "pushbroker::session");
    for line in &server.log {
        json_line(line);
    }
}

#[test]
fn api_lines_name_the_request_and_the_peer_as_plain_values_when_asked_for() {
    let mut server =
        ServerProcess::start_filtered(&config(json!({})), "info,pushbroker::api=debug");
    assert_eq!(http_get(server.http_addr, "/health").status, 200);
    let request = server
        .wait_log(|l| message_at(l, "DEBUG").is_some_and(|m| m.starts_with("api request ")))
        .unwrap_or_else(|| panic!("no api request line: {:#?}", server.log));
    assert_eq!(
        message_at(&request, "DEBUG"),
        Some("api request method=GET path=/health status=200")
    );
    let closed = server
        .wait_log(|l| message_at(l, "DEBUG").is_some_and(|m| m.starts_with("http connection ")))
        .unwrap_or_else(|| panic!("no http connection line: {:#?}", server.log));
    let message = message_at(&closed, "DEBUG").unwrap_or_default();
    let peer = message
        .split_once(" peer=")
        .and_then(|(_, peer)| peer.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no peer address in {message:?}"));
    assert!(peer.ip().is_loopback(), "{peer}");
    for line in &server.log {
        assert_log_shape(line);
    }
}

// ---------------------------------------------------------------------------------------
// HTTP API
// ---------------------------------------------------------------------------------------

/// `GET path`.
fn http_get(addr: SocketAddr, path: &str) -> HttpAnswer {
    http(addr, "GET", path, &[], b"")
}

/// POSTs raw `body` as JSON with its Content-Length.
fn post_raw(addr: SocketAddr, path: &str, body: &[u8]) -> HttpAnswer {
    let len = body.len().to_string();
    http(
        addr,
        "POST",
        path,
        &[
            ("Content-Type", "application/json"),
            ("Content-Length", &len),
        ],
        body,
    )
}

/// Asserts the answer is exactly `{"error":label,"message":message}` with `status`.
#[track_caller]
fn assert_error(resp: &HttpAnswer, status: u16, label: &str, message: &str) {
    assert_eq!(
        (resp.status, resp.json()),
        (status, json!({"error": label, "message": message})),
        "body {:?}",
        resp.body.as_str()
    );
    assert_eq!(resp.header("content-type"), Some("application/json"));
}

/// The `/register` token of a pair: standard base64 of `appid::deviceid`.
fn register(addr: SocketAddr, device_id: &str, app_id: &str) -> String {
    let resp = post_json(
        addr,
        "/register",
        &json!({"deviceid": device_id, "appid": app_id}),
    );
    assert_eq!(resp.status, 200, "{:?}", resp.body.as_str());
    resp.json()["token"].as_str().expect("a token").to_owned()
}

#[test]
fn delivery_hosts_names_the_logged_device_address_and_the_configured_domain() {
    let mut server = ServerProcess::start(&config(json!({"delivery_domain": "push.example.com"})));
    let line = server
        .wait_log(|l| l.contains(" INFO listening for devices on "))
        .expect("listening line");
    let logged = line
        .split(" INFO listening for devices on ")
        .nth(1)
        .expect("address");
    let resp = http_get(server.http_addr, "/delivery-hosts");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(
        resp.json(),
        json!({"hosts": [logged], "domain": "push.example.com"})
    );
    // Not a POST endpoint.
    assert_error(
        &post_json(server.http_addr, "/delivery-hosts", &json!({})),
        405,
        "invalid-request",
        "Wrong request method, should be GET",
    );
}

#[test]
fn successful_calls_answer_ok_and_register_answers_the_original_token() {
    let server = ServerProcess::start(&config(json!({})));
    let api = server.http_addr;
    let resp = post_json(
        api,
        "/register",
        &json!({"deviceid": "dev1", "appid": "app1"}),
    );
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(
        resp.json(),
        json!({"ok": true, "token": "YXBwMTo6ZGV2MQ=="})
    );
    // The same pair always gets the same token.
    assert_eq!(register(api, "dev1", "app1"), "YXBwMTo6ZGV2MQ==");

    let ok = |resp: HttpAnswer| {
        assert_eq!(
            (resp.status, resp.body.clone()),
            (200, r#"{"ok":true}"#.to_owned())
        );
        assert_eq!(resp.header("content-type"), Some("application/json"));
    };
    ok(post_json(
        api,
        "/notify",
        &json!({"appid": "app1", "token": "YXBwMTo6ZGV2MQ==", "expire_on": LATER, "data": [1]}),
    ));
    // By user and device instead of a token.
    ok(post_json(
        api,
        "/notify",
        &json!({"appid": "app1", "userid": "dev1", "deviceid": "dev1", "expire_on": LATER,
                "data": "x", "replace_tag": "t", "clear_pending": true}),
    ));
    ok(post_json(
        api,
        "/broadcast",
        &json!({"channel": "system", "expire_on": "2099-01-01T01:00:00+01:00", "data": {"a": 1}}),
    ));
    // RFC 3339 with fractional seconds, a minute from now.
    let soon = (time::OffsetDateTime::now_utc() + time::Duration::minutes(1))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("formats");
    assert!(soon.contains('.'), "{soon}");
    ok(post_json(
        api,
        "/notify",
        &json!({"appid": "app1", "token": "YXBwMTo6ZGV2MQ==", "expire_on": soon, "data": 2}),
    ));
    ok(post_json(
        api,
        "/unregister",
        &json!({"deviceid": "dev1", "appid": "app1"}),
    ));
}

#[test]
fn post_head_errors_come_in_the_original_order() {
    let server = ServerProcess::start(&config(json!({})));
    let api = server.http_addr;
    let json_type = ("Content-Type", "application/json");

    // 405 before anything else.
    assert_error(
        &http_get(api, "/notify"),
        405,
        "invalid-request",
        "Wrong request method, should be POST",
    );
    for path in ["/broadcast", "/register", "/unregister"] {
        assert_error(
            &http(api, "PUT", path, &[("Content-Type", "text/plain")], b""),
            405,
            "invalid-request",
            "Wrong request method, should be POST",
        );
    }
    assert_error(
        &http(
            api,
            "GET",
            "/register",
            &[json_type, ("Transfer-Encoding", "chunked")],
            b"2\r\n{}\r\n0\r\n\r\n",
        ),
        405,
        "invalid-request",
        "Wrong request method, should be POST",
    );

    // 411: a chunked body declares no length (checked before the content type).
    for content_type in ["application/json", "text/plain"] {
        assert_error(
            &http(
                api,
                "POST",
                "/notify",
                &[
                    ("Content-Type", content_type),
                    ("Transfer-Encoding", "chunked"),
                ],
                b"2\r\n{}\r\n0\r\n\r\n",
            ),
            411,
            "invalid-request",
            "A Content-Length must be provided",
        );
    }

    // 400: an empty body, declared or not (also before the content type).
    assert_error(
        &http(
            api,
            "POST",
            "/register",
            &[json_type, ("Content-Length", "0")],
            b"",
        ),
        400,
        "invalid-request",
        "Request body empty",
    );
    assert_error(
        &http(
            api,
            "POST",
            "/register",
            &[("Content-Type", "text/plain")],
            b"",
        ),
        400,
        "invalid-request",
        "Request body empty",
    );

    // 413: over 4096 bytes, declared (the body is never read); 4096 is fine.
    for content_type in ["application/json", "text/plain"] {
        assert_error(
            &http(
                api,
                "POST",
                "/register",
                &[("Content-Type", content_type), ("Content-Length", "4097")],
                b"",
            ),
            413,
            "invalid-request",
            "Request body too large",
        );
    }
    let mut body = br#"{"deviceid":"dev1","appid":"app1""#.to_vec();
    body.resize(4095, b' ');
    body.push(b'}');
    let resp = post_raw(api, "/register", &body);
    assert_eq!(resp.status, 200, "{:?}", resp.body.as_str());
    assert_eq!(resp.json()["token"], "YXBwMTo6ZGV2MQ==");

    // 415: any media type but application/json.
    for content_type in [
        "text/plain",
        "application/jsonp; charset=utf-8",
        "application/x-www-form-urlencoded",
    ] {
        let body = br#"{"deviceid":"dev1","appid":"app1"}"#;
        let len = body.len().to_string();
        assert_error(
            &http(
                api,
                "POST",
                "/register",
                &[("Content-Type", content_type), ("Content-Length", &len)],
                body,
            ),
            415,
            "invalid-request",
            "Wrong content type, should be application/json",
        );
    }
    assert_error(
        &http(api, "POST", "/register", &[("Content-Length", "2")], b"{}"),
        415,
        "invalid-request",
        "Wrong content type, should be application/json",
    );
}

#[test]
fn a_body_shorter_than_declared_is_an_io_error() {
    let server = ServerProcess::start(&config(json!({})));
    let mut s = connect_tcp(server.http_addr);
    s.set_read_timeout(Some(PATIENCE)).expect("timeout");
    s.write_all(
        b"POST /register HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
          Content-Length: 50\r\n\r\n{\"deviceid\":",
    )
    .expect("write");
    s.shutdown(Shutdown::Write).expect("half close");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    let body: Value = serde_json::from_str(body.trim()).expect("JSON body");
    assert_eq!(
        body,
        json!({"error": "io-error", "message": "Could not read request body"})
    );
}

#[test]
fn body_errors_name_what_is_wrong() {
    let server = ServerProcess::start(&config(json!({})));
    let api = server.http_addr;
    let token = register(api, "dev1", "app1");

    for (path, body) in [
        ("/register", &b"[1]"[..]),
        ("/register", b"{\"deviceid\":"),
        ("/register", br#"{"deviceid":"dev1","appid":1}"#),
        ("/unregister", b"null"),
        (
            "/notify",
            br#"{"appid":"app1","token":"t","clear_pending":"yes"}"#,
        ),
        ("/broadcast", br#"{"channel":"system"} {}"#),
    ] {
        assert_error(
            &post_raw(api, path, body),
            400,
            "invalid-request",
            "Malformed JSON Object",
        );
    }

    for (path, body) in [
        ("/register", json!({"appid": "app1"})),
        ("/register", json!({"deviceid": "dev1"})),
        ("/unregister", json!({"deviceid": "", "appid": "app1"})),
        (
            "/notify",
            json!({"token": token, "expire_on": LATER, "data": 1}),
        ),
        (
            "/notify",
            json!({"appid": "app1", "userid": "dev1", "expire_on": LATER, "data": 1}),
        ),
        (
            "/notify",
            json!({"appid": "app1", "expire_on": LATER, "data": 1}),
        ),
    ] {
        assert_error(
            &post_json(api, path, &body),
            400,
            "invalid-request",
            "Missing id field",
        );
    }

    for (path, body) in [
        (
            "/notify",
            json!({"appid": "app1", "token": token, "expire_on": LATER}),
        ),
        (
            "/broadcast",
            json!({"channel": "system", "expire_on": LATER}),
        ),
    ] {
        assert_error(
            &post_json(api, path, &body),
            400,
            "invalid-request",
            "Missing data field",
        );
    }

    // `/notify`'s `data` counts its bytes as received: 2048 pass, 2049 do not;
    // `/broadcast` data is bounded by the body alone.
    let data_of = |len: usize| format!("\"{}\"", "x".repeat(len - 2));
    for path in ["/notify", "/broadcast"] {
        let body = |data: &str| {
            format!(
                r#"{{"appid":"app1","token":"{token}","channel":"system","expire_on":"{LATER}","data":{data}}}"#
            )
        };
        let resp = post_raw(api, path, body(&data_of(2048)).as_bytes());
        assert_eq!(resp.status, 200, "{path}: {:?}", resp.body.as_str());
        let resp = post_raw(api, path, body(&data_of(2049)).as_bytes());
        if path == "/notify" {
            assert_error(&resp, 400, "invalid-request", "Data too large");
        } else {
            assert_eq!(resp.status, 200, "{:?}", resp.body.as_str());
        }
    }

    for expire_on in [
        "tomorrow",
        "2099-01-01",
        "2099-01-01T00:00:00",
        "",
        "2099-13-01T00:00:00Z",
    ] {
        for (path, mut body) in [
            (
                "/notify",
                json!({"appid": "app1", "token": token, "data": 1}),
            ),
            ("/broadcast", json!({"channel": "system", "data": 1})),
        ] {
            body["expire_on"] = json!(expire_on);
            assert_error(
                &post_json(api, path, &body),
                400,
                "invalid-request",
                "Invalid expiration date",
            );
        }
    }
    for (path, body) in [
        (
            "/notify",
            json!({"appid": "app1", "token": token, "data": 1, "expire_on": "2000-01-01T00:00:00Z"}),
        ),
        (
            "/broadcast",
            json!({"channel": "system", "data": 1, "expire_on": "2000-01-01T00:00:00+02:00"}),
        ),
    ] {
        assert_error(
            &post_json(api, path, &body),
            400,
            "invalid-request",
            "Past expiration date",
        );
    }
}

#[test]
fn lookup_errors_unknown_channel_unknown_token_and_unauthorized() {
    let server = ServerProcess::start(&config(json!({})));
    let api = server.http_addr;
    assert_error(
        &post_json(
            api,
            "/broadcast",
            &json!({"channel": "nope", "expire_on": LATER, "data": 1}),
        ),
        400,
        "unknown-channel",
        "Unknown channel",
    );
    for token in ["not base64!", "Z2FyYmFnZQ==" /* "garbage" */] {
        assert_error(
            &post_json(
                api,
                "/notify",
                &json!({"appid": "app1", "token": token, "expire_on": LATER, "data": 1}),
            ),
            400,
            "unknown-token",
            "Unknown token",
        );
    }
    let token = register(api, "dev1", "app1");
    assert_error(
        &post_json(
            api,
            "/notify",
            &json!({"appid": "app2", "token": token, "expire_on": LATER, "data": 1}),
        ),
        401,
        "unauthorized",
        "Unauthorized",
    );
}

#[test]
fn too_many_pending_answers_413_with_the_newest_payload_as_extra() {
    let server = ServerProcess::start(&config(json!({"max_notifications_per_app": 2})));
    let api = server.http_addr;
    let token = register(api, "offline-dev", "app1");
    let notify = |data: Value, extra: Value| {
        let mut body = json!({"appid": "app1", "token": token, "expire_on": LATER, "data": data});
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        post_json(api, "/notify", &body)
    };
    assert_eq!(
        notify(json!({"n": 1}), json!({"replace_tag": "a"})).status,
        200
    );
    // The payload as sent, not re-ordered.
    let resp = post_raw(
        api,
        "/notify",
        format!(
            r#"{{"appid":"app1","token":"{token}","expire_on":"{LATER}","data":{{"z":2,"a":1}}}}"#
        )
        .as_bytes(),
    );
    assert_eq!(resp.status, 200);
    let resp = notify(json!({"n": 3}), json!({}));
    assert_eq!(
        (resp.status, resp.json()),
        (
            413,
            json!({
                "error": "too-many-pending",
                "message": "Too many pending notifications for this application",
                "extra": {"z": 2, "a": 1}
            })
        ),
    );
    assert!(
        resp.body.as_str().contains(r#""extra":{"z":2,"a":1}"#),
        "{:?}",
        resp.body.as_str()
    );
    assert_eq!(resp.header("content-type"), Some("application/json"));
    // A tag that matches nothing pending does not make room either.
    assert_eq!(
        notify(json!({"n": 4}), json!({"replace_tag": "b"})).status,
        413
    );
    // A tag that matches a pending one replaces it, at the limit too; it is the newest now.
    assert_eq!(
        notify(json!({"n": 5}), json!({"replace_tag": "a"})).status,
        200
    );
    let resp = notify(json!({"n": 6}), json!({}));
    assert_eq!(resp.status, 413);
    assert_eq!(resp.json()["extra"], json!({"n": 5}));
    // Another application has its own allowance.
    let other = register(api, "offline-dev", "app2");
    let resp = post_json(
        api,
        "/notify",
        &json!({"appid": "app2", "token": other, "expire_on": LATER, "data": 1}),
    );
    assert_eq!(resp.status, 200);
    // Clearing pending makes room.
    assert_eq!(
        notify(json!({"n": 7}), json!({"clear_pending": true})).status,
        200
    );
    assert_eq!(notify(json!({"n": 8}), json!({})).status, 200);
    assert_eq!(notify(json!({"n": 9}), json!({})).status, 413);
}

#[test]
fn health_and_metrics_answer() {
    let mut server = ServerProcess::start(&config(json!({})));
    let (device, _) = registered_device(&mut server, "metrics-dev");
    let health = http_get(server.http_addr, "/health");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["ok"], json!(true));
    let metrics = http_get(server.http_addr, "/metrics");
    assert_eq!(metrics.status, 200);
    let text = metrics.body.as_str();
    let sessions: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("pushbroker_sessions"))
        .collect();
    assert!(!sessions.is_empty(), "{text}");
    // One registered device over all shards.
    let total: u64 = sessions
        .iter()
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("sample {l:?}"))
        })
        .sum();
    assert_eq!(total, 1, "{text}");
    device.close();
}

// ---------------------------------------------------------------------------------------
// Configuration and command line
// ---------------------------------------------------------------------------------------

/// What a run of the binary that must end by itself gave.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `args` and waits, up to [`PATIENCE`], for it to exit on its own
/// (killing it and failing otherwise).
fn run_binary<I: AsRef<OsStr>>(args: &[I]) -> Run {
    run_binary_logging(args, None)
}

/// [`run_binary`] with `RUST_LOG` set to `filter` (or unset).
fn run_binary_logging<I: AsRef<OsStr>>(args: &[I], filter: Option<&str>) -> Run {
    let mut command = Command::new(BINARY);
    match filter {
        Some(filter) => command.env("RUST_LOG", filter),
        None => command.env_remove("RUST_LOG"),
    };
    let mut child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let deadline = Instant::now() + PATIENCE;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the binary did not exit by itself");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Writes `text` as `config.json` in a new folder and returns its path.
fn write_config(text: &str) -> std::path::PathBuf {
    let path = temp_dir("binary-config").join("config.json");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn an_unknown_key_fails_naming_the_key() {
    let path =
        write_config(r#"{"addr":"127.0.0.1:0","http_addr":"127.0.0.1:0","ping_intervall":"10s"}"#);
    let run = run_binary(&[&path]);
    assert!(!run.status.success(), "{:?}", run.status);
    assert!(run.stderr.contains("\"ping_intervall\""), "{}", run.stderr);
    assert!(run.stderr.contains("unknown"), "{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
}

#[test]
fn a_malformed_duration_fails_naming_its_key() {
    for (key, value) in [
        ("exchange_timeout", "5 seconds"),
        ("ping_interval", "10x"),
        ("http_read_timeout", "0s"),
    ] {
        let path = write_config(&format!(
            r#"{{"addr":"127.0.0.1:0","http_addr":"127.0.0.1:0","{key}":"{value}"}}"#
        ));
        let run = run_binary(&[&path]);
        assert!(!run.status.success(), "{key}: {:?}", run.status);
        assert!(run.stderr.contains(&format!("\"{key}\"")), "{}", run.stderr);
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    }
}

#[test]
fn a_second_instance_on_the_same_ports_fails_and_the_first_keeps_serving() {
    let first = ServerProcess::start(&config(json!({})));
    for (key, taken) in [("addr", first.device_addr), ("http_addr", first.http_addr)] {
        let mut c = config(json!({}));
        c[key] = json!(taken.to_string());
        let run = run_binary(&[&write_config(&c.to_string())]);
        assert!(!run.status.success(), "{key}: {:?}", run.status);
        assert!(
            run.stderr.contains(&format!("{taken}")) && run.stderr.contains("in use"),
            "{key}: {}",
            run.stderr
        );
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    }
    assert_eq!(http_get(first.http_addr, "/health").status, 200);
}

/// A restarted server binds its ports again at once, although the connections the
/// previous one closed at shutdown still hold them (TIME_WAIT, for a minute): only a
/// listening server makes a port in use.
#[test]
fn a_server_restarted_on_its_ports_right_after_a_shutdown_starts() {
    let first = ServerProcess::start(&config(json!({})));
    let (device_addr, http_addr) = (first.device_addr, first.http_addr);
    let mut devices: Vec<Device> = (0..3)
        .map(|i| {
            let mut d = Device::connect(device_addr);
            d.hello(&format!("restart-{i}"), json!({}), json!({}));
            d
        })
        .collect();
    // The server closes the sessions first, so the closed connections wait on its side.
    assert!(first.terminate().is_some_and(|s| s.success()));
    for d in &mut devices {
        assert!(d.closed(), "the shutdown closed the session");
    }
    let second = ServerProcess::start(&config(json!({
        "addr": device_addr.to_string(),
        "http_addr": http_addr.to_string(),
    })));
    assert_eq!(second.device_addr, device_addr);
    assert_eq!(http_get(second.http_addr, "/health").status, 200);
    let mut d = Device::connect(device_addr);
    d.hello("restart-0", json!({}), json!({}));
}

#[test]
fn addr_equal_to_http_addr_is_a_configuration_error() {
    for (addr, http_addr) in [
        ("127.0.0.1:47999", "127.0.0.1:47999"),
        ("0.0.0.0:47999", "127.0.0.1:47999"),
    ] {
        let path = write_config(&format!(r#"{{"addr":"{addr}","http_addr":"{http_addr}"}}"#));
        let run = run_binary(&[&path]);
        assert!(!run.status.success(), "{addr}: {:?}", run.status);
        assert!(
            run.stderr.contains("must be different ports"),
            "{addr}: {}",
            run.stderr
        );
    }
}

#[test]
fn too_little_locked_memory_fails_at_once_naming_the_limit() {
    let path = write_config(r#"{"addr":"127.0.0.1:0","http_addr":"127.0.0.1:0"}"#);
    let started = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -l 64 && exec "$0" "$1""#)
        .arg(BINARY)
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("sh runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{:?}: {stderr}", out.status);
    assert!(started.elapsed() < PATIENCE, "took {:?}", started.elapsed());
    assert!(stderr.contains("locked memory"), "{stderr}");
    assert!(stderr.contains("ulimit -l"), "{stderr}");
    assert!(!stderr.contains("listening for"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn devices_past_max_sessions_are_closed_counted_and_http_still_answers() {
    let mut server = ServerProcess::start(&config(json!({"max_sessions": 4, "shards": 2})));
    // Each shard holds 2. Connections held open: the first hold their slots.
    let mut devices = Vec::new();
    let mut connacked = 0;
    for i in 0..10 {
        let mut d = Device::connect(server.device_addr);
        if hello(&mut d, &format!("cap-{i}"), json!({})).is_ok() {
            connacked += 1;
        }
        devices.push(d);
    }
    assert!(
        (1..=4).contains(&connacked),
        "{connacked} sessions past a limit of 4"
    );
    assert_eq!(http_get(server.http_addr, "/health").status, 200);
    let stats = http_get(server.http_addr, "/stats");
    let rejected = stats.json()["totals"]["rejected_device_connections"]
        .as_u64()
        .unwrap_or(0);
    assert!(rejected >= 6, "{}", stats.body.as_str());
    assert!(
        server
            .wait_log(|l| l.contains("WARN device connections at the limit"))
            .is_some(),
        "no warning: {:#?}",
        server.log
    );
    // Slots come back when devices leave.
    drop(devices);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut d = Device::connect(server.device_addr);
        if hello(&mut d, "cap-after", json!({})).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "no slot came back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `max_sessions` is a limit for the whole server: devices that all hash to one shard get
/// every slot of it (the other shard lends its own), and only the one past the limit is
/// refused.
#[test]
fn max_sessions_holds_for_the_whole_server_whichever_shard_owns_the_devices() {
    use pushbroker::broker::sharded::{ShardId, owner_of_device};
    let mut server = ServerProcess::start(&config(json!({"max_sessions": 40, "shards": 2})));
    let ids: Vec<String> = (0..)
        .map(|i| format!("lend-{i}"))
        .filter(|id| owner_of_device(id, 2) == ShardId(0))
        .take(41)
        .collect();
    // Each held open: 40 sessions on shard 0, twice its even part.
    let mut devices = Vec::new();
    for id in &ids[..40] {
        let mut d = Device::connect(server.device_addr);
        if let Err(e) = hello(&mut d, id, json!({})) {
            panic!(
                "{id} refused with {} sessions held of 40: {e:?}\n{:#?}",
                devices.len(),
                server.log
            );
        }
        devices.push(d);
    }
    let mut extra = Device::connect(server.device_addr);
    assert!(
        hello(&mut extra, &ids[40], json!({})).is_err(),
        "a 41st session past a limit of 40"
    );
    let stats = http_get(server.http_addr, "/stats");
    let rejected = stats.json()["totals"]["rejected_device_connections"].as_u64();
    assert_eq!(rejected, Some(1), "{}", stats.body.as_str());
    assert!(
        server
            .wait_log(|l| l.contains("WARN device connections at the limit (40 on the server)"))
            .is_some(),
        "no warning: {:#?}",
        server.log
    );
    // One leaves: its slot is the next one's, whichever shard accepts it.
    drop(devices.pop());
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut d = Device::connect(server.device_addr);
        if hello(&mut d, &ids[40], json!({})).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "no slot came back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A connection holds a slot from its accept, through its hello; one whose hello times out
/// gives its slot back. With every slot taken by connections that send nothing, devices
/// connect again once those time out.
#[test]
fn slots_held_by_hellos_that_time_out_come_back() {
    let mut server = ServerProcess::start(&config(json!({
        "max_sessions": 2,
        "shards": 2,
        "exchange_timeout": "300ms",
        // No PING (and so no PONG timeout freeing a slot) while the test runs.
        "ping_interval": "60s",
    })));
    // Connections that send nothing: those that get a slot hold it until their hello
    // times out; the rest are closed at once.
    let silent: Vec<Device> = (0..6)
        .map(|_| Device::connect(server.device_addr))
        .collect();
    for (i, mut d) in silent.into_iter().enumerate() {
        assert!(closed(&mut d), "silent connection {i} still open");
    }
    // At least the whole limit's worth of them held a slot until their hello timed out.
    let timeouts = std::cell::Cell::new(0);
    let two_timed_out = server.wait_log(|l| {
        let timed_out = message_at(l, "DEBUG").is_some_and(|m| {
            m.starts_with("session(") && m.ends_with(") ended with: hello timeout")
        });
        timeouts.set(timeouts.get() + usize::from(timed_out));
        timeouts.get() >= 2
    });
    assert!(
        two_timed_out.is_some(),
        "fewer than 2 hellos timed out: {:#?}",
        server.log
    );
    // Both slots are free again: two devices connect and hold them. A shard may not have
    // heard yet that its peer has room again (word goes by message), so each device tries
    // again until a bounded deadline.
    let mut devices = Vec::new();
    for i in 0..2 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut d = Device::connect(server.device_addr);
            if hello(&mut d, &format!("after-timeouts-{i}"), json!({})).is_ok() {
                devices.push(d);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "slot {i} did not come back: {:#?}",
                server.log
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn http_connections_past_their_limit_are_closed_and_counted() {
    let server = ServerProcess::start(&config(json!({"max_http_connections": 2, "shards": 2})));
    let mut idle = Vec::new();
    for _ in 0..8 {
        let s = std::net::TcpStream::connect(server.http_addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        idle.push(s);
    }
    // The listeners closed those past their shard's share: their reads end at once.
    let mut closed = 0;
    for s in &mut idle {
        // End of stream is the close; a timeout is a connection the server holds.
        let mut byte = [0u8; 1];
        if let Ok(0) = s.read(&mut byte) {
            closed += 1;
        }
    }
    assert!(closed >= 6, "{closed} of 8 closed with room for 2");
    drop(idle);
    // Once the server has seen the held connections close, a request answers again.
    let deadline = Instant::now() + PATIENCE;
    let stats = loop {
        if let Some(body) = try_get(server.http_addr, "/stats") {
            break body;
        }
        assert!(Instant::now() < deadline, "/stats never answered");
        std::thread::sleep(Duration::from_millis(50));
    };
    let rejected =
        serde_json::from_str::<Value>(&stats).expect("json")["totals"]["rejected_http_connections"]
            .as_u64()
            .unwrap_or(0);
    assert!(rejected >= 6, "{stats}");
}

/// The body of a 200 answer to `GET path` on a fresh connection; `None` when the
/// connection is closed unanswered.
fn try_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(PATIENCE)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

#[test]
fn a_closed_stderr_breaks_nothing() {
    let path = write_config(r#"{"addr":"127.0.0.1:0","http_addr":"127.0.0.1:0"}"#);
    let mut child = Command::new(BINARY)
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    // Read the two listening lines, then close the pipe: a log shipper that died.
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        child.stderr.take().expect("stderr"),
    ));
    let mut addr_of = |what: &str| -> SocketAddr {
        let line = lines.next().expect("a line").expect("text");
        let at = line
            .find(&format!("listening for {what} on "))
            .unwrap_or_else(|| panic!("{line}"));
        line[at + format!("listening for {what} on ").len()..]
            .parse()
            .expect("an address")
    };
    let http_addr = addr_of("http");
    let device_addr = addr_of("devices");
    drop(lines);
    // Sessions log on every shard now, into the closed pipe.
    for i in 0..8 {
        let mut d = Device::connect(device_addr);
        hello(&mut d, &format!("quiet-{i}"), json!({})).expect("CONNACK");
    }
    assert_eq!(http_get(http_addr, "/health").status, 200);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("no exit within {PATIENCE:?} after SIGTERM with stderr closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_bad_rust_log_fails_naming_the_directive() {
    let path = write_config(r#"{"addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0"}"#);
    let run = run_binary_logging(&[&path], Some("info,pushbroker=notalevel"));
    assert!(!run.status.success(), "{:?}", run.status);
    assert!(
        run.stderr
            .starts_with("pushbroker: cannot set up logging: bad RUST_LOG: "),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("\"pushbroker=notalevel\""),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(!run.stderr.contains("listening for"), "{}", run.stderr);
}

#[test]
fn an_empty_rust_log_is_the_default_filter() {
    let mut server = ServerProcess::start_filtered(&config(json!({})), "");
    let (device, id) = registered_device(&mut server, "empty-filter-dev");
    connected_peer(&mut server, &id);
    device.close();
    assert_eq!(wait_ended(&mut server, &id), "EOF");
}

#[test]
fn a_missing_config_file_fails_naming_the_file() {
    let path = temp_dir("binary-config").join("nope.json");
    let run = run_binary(&[&path]);
    assert!(!run.status.success(), "{:?}", run.status);
    assert!(run.stderr.contains("nope.json"), "{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

#[test]
fn print_default_config_prints_the_default_json_and_exits() {
    let run = run_binary(&["--print-default-config"]);
    assert!(run.status.success(), "{:?} {}", run.status, run.stderr);
    let printed: Value = serde_json::from_str(&run.stdout).expect("stdout is JSON");
    assert_eq!(printed["addr"], "127.0.0.1:9090");
    assert_eq!(printed["http_addr"], "127.0.0.1:8080");
    assert!(run.stderr.is_empty(), "{}", run.stderr);
    // It is a configuration the binary accepts (on port 0 here).
    let mut printed = printed;
    printed["addr"] = json!("127.0.0.1:0");
    printed["http_addr"] = json!("127.0.0.1:0");
    let server = ServerProcess::start(&printed);
    assert_eq!(http_get(server.http_addr, "/health").status, 200);
}

#[test]
fn relative_pem_paths_resolve_against_the_config_folder() {
    let ca = TestCa::new();
    let dir = temp_dir("binary-tls");
    std::fs::create_dir_all(dir.join("tls")).expect("tls folder");
    for file in ["cert.pem", "key.pem"] {
        std::fs::copy(ca.dir.join(file), dir.join("tls").join(file)).expect("copy pem");
    }
    let path = dir.join("config.json");
    let c = config(json!({"cert_pem_file": "tls/cert.pem", "key_pem_file": "tls/key.pem"}));
    std::fs::write(&path, serde_json::to_vec(&c).expect("json")).expect("write config");
    // The binary runs in the test's folder, not the config's.
    assert_ne!(std::env::current_dir().expect("cwd"), dir);
    let mut server = ServerProcess::start_with(&[path.to_string_lossy().as_ref()]);
    let mut device = Device::connect_tls(server.device_addr, &ca);
    let connack = hello(&mut device, "tls-dev", json!({})).expect("CONNACK");
    assert_eq!(connack["Params"]["PingInterval"], "10s");
    wait_registered(&mut server, "tls-dev");
    device.close();
}

// ---------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------

/// The pid of the `pushbroker` child of this process running `config_path` (its one
/// argument), found in `/proc`: `ServerProcess` does not tell it, and the stop tests must
/// signal it while still reading its log.
fn pid_running(config_path: &Path) -> u32 {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.get(1) != Some(&config_path.as_os_str().as_bytes())
            || !args[0].ends_with(b"pushbroker")
        {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let parent = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .map(str::trim);
        if parent == Some(me.as_str()) {
            found.push(pid);
        }
    }
    assert_eq!(found.len(), 1, "the server's pid: {found:?}");
    found[0]
}

/// Starts the binary on `config` and returns it with its pid.
fn start_with_pid(config: &Value) -> (ServerProcess, u32) {
    let path = temp_dir("binary-stop").join("config.json");
    std::fs::write(&path, serde_json::to_vec(config).expect("json")).expect("config");
    let server = ServerProcess::start_with(&[path.to_string_lossy().as_ref()]);
    let pid = pid_running(&path);
    (server, pid)
}

/// Sends SIGTERM to `pid` (a child of this process that has not been waited for, so the
/// pid is still its own), then reads the log until the process closes stderr (or
/// [`PATIENCE`] passes), and returns the exit status.
fn sigterm_and_collect(mut server: ServerProcess, pid: u32) -> (ExitStatus, Vec<String>) {
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    // Nothing matches: this reads until stderr closes, at exit (or PATIENCE passes).
    let sent_at = Instant::now();
    assert_eq!(server.wait_log(|_| false), None);
    let log = server.log.clone();
    assert!(
        sent_at.elapsed() < PATIENCE,
        "still running {PATIENCE:?} after SIGTERM: {log:#?}"
    );
    let status = server
        .terminate()
        .unwrap_or_else(|| panic!("no exit within {PATIENCE:?} after SIGTERM: {log:#?}"));
    (status, log)
}

#[test]
fn sigterm_ends_sessions_and_exits_zero() {
    let (mut server, pid) = start_with_pid(&config(json!({})));
    let addrs = (server.http_addr, server.device_addr);
    let (mut idle, idle_id) = registered_device(&mut server, "idle-dev");
    // The other device has a notification it has not acknowledged yet.
    let (mut busy, busy_id) = registered_device(&mut server, "busy-dev");
    let token = register(server.http_addr, "busy-dev", "app1");
    let resp = post_json(
        server.http_addr,
        "/notify",
        &json!({"appid": "app1", "token": token, "expire_on": LATER, "data": 1}),
    );
    assert_eq!(resp.status, 200);
    expect(&mut busy, "notifications");

    let (status, log) = sigterm_and_collect(server, pid);
    assert!(status.success(), "{status:?}: {log:#?}");
    assert_listening_lines_first(&log, addrs.0, addrs.1);
    for id in [&idle_id, &busy_id] {
        let ended = format!(" DEBUG session({id}) ended with: shutdown");
        assert!(
            log.iter().any(|l| l.ends_with(&ended)),
            "{ended:?} in {log:#?}"
        );
    }
    assert!(!log.iter().any(|l| l.contains("panicked")), "{log:#?}");
    for line in &log {
        assert_log_shape(line);
    }
    assert!(closed(&mut idle), "the idle device's connection is closed");
    assert!(closed(&mut busy), "the busy device's connection is closed");
}

#[test]
fn a_request_in_flight_at_sigterm_is_answered_before_the_server_exits() {
    let (server, pid) = start_with_pid(&config(json!({})));
    let body = br#"{"deviceid":"dev1","appid":"app1"}"#;
    let mut http = std::net::TcpStream::connect(server.http_addr).expect("connect");
    http.set_read_timeout(Some(PATIENCE)).expect("timeout");
    // The head and half the body: the request is being read when SIGTERM comes.
    let head = format!(
        "POST /register HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    http.write_all(head.as_bytes()).expect("head");
    http.write_all(&body[..10]).expect("half the body");
    std::thread::sleep(Duration::from_millis(200));
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    std::thread::sleep(Duration::from_millis(200));
    http.write_all(&body[10..]).expect("the rest of the body");
    let mut answer = Vec::new();
    // The answer, then the close: the connection ends once its request is answered.
    let read = http.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "{read:?}: {answer}");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""token":"#), "{answer}");
    let status = server.terminate();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[test]
fn sigterm_after_a_notify_to_an_offline_device_exits_zero() {
    let (server, pid) = start_with_pid(&config(json!({})));
    let addrs = (server.http_addr, server.device_addr);
    let token = register(server.http_addr, "offline-dev", "app1");
    let resp = post_json(
        server.http_addr,
        "/notify",
        &json!({"appid": "app1", "token": token, "expire_on": LATER, "data": {"x": 1}}),
    );
    assert_eq!(resp.status, 200);
    let (status, log) = sigterm_and_collect(server, pid);
    assert!(status.success(), "{status:?}: {log:#?}");
    assert!(!log.iter().any(|l| l.contains("panicked")), "{log:#?}");
    assert_listening_lines_first(&log, addrs.0, addrs.1);
    for line in &log {
        assert_log_shape(line);
    }
    // Nothing at INFO or above but the listening lines, stopping included.
    assert!(
        !log.iter()
            .any(|l| is_info_or_above(l) && !l.contains(" INFO listening for ")),
        "{log:#?}"
    );
}

#[test]
fn the_log_line_parser_accepts_the_shape_and_nothing_else() {
    let good = "2024/01/02 03:04:05.123456 INFO listening for http on 127.0.0.1:1";
    assert_eq!(
        parse_log_line(good),
        Some(("INFO", "listening for http on 127.0.0.1:1"))
    );
    for bad in [
        "2024/01/02 03:04:05.12345 INFO x",
        "2024-01-02 03:04:05.123456 INFO x",
        "2024/01/02 03:04:05.123456  INFO x",
        "2024/01/02 03:04:05.123456 INFO",
        "2024/01/02 03:04:05.123456 TRACE x",
        "2024/01/02T03:04:05.123456 INFO x",
        "  2024/01/02 03:04:05.123456 INFO x",
    ] {
        assert_eq!(parse_log_line(bad), None, "{bad:?}");
    }
}
