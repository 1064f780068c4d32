//! End to end over real loopback sockets: devices speaking the wire protocol to an
//! in-process [`Server`] with two shards, driven by HTTP API calls (docs/protocol.md §1–3).
//!
//! Every test starts its own server on port 0 and shuts it down at the end. Tests assert
//! outcomes and orderings, never speed: waits are bounded by [`PATIENCE`], and "nothing
//! came" is shown by a later message that must come first in line (a notify "marker"
//! queued after whatever the server might wrongly have sent). A reconnecting device is
//! shown a notification it left unacknowledged, never relies on timing to know an
//! earlier ACK arrived. The one look inside is [`wait_replicated`], which asks the
//! shards whether a broadcast reached their replicas.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime};

use futures_lite::future::block_on;
use pushbroker::broker::sharded::ShardId;
use pushbroker::config::ServerConfig;
use pushbroker::server::Server;
use pushbroker::store::InternalChannelId;
use serde_json::{Value, json};
use support::*;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// An `expire_on` far in the future.
const FAR: &str = "2099-01-01T00:00:00Z";

/// The application id the tests notify for.
const APP: &str = "com.example.app";

/// A ping interval long enough never to interfere with a test that is not about pings.
const QUIET_PING: Duration = Duration::from_secs(60);

/// The largest payload a BROADCAST or NOTIFICATIONS part carries (docs/protocol.md §1.5).
const MAX_PART_PAYLOAD: usize = 62 * 1024;

/// How long a test watches a device to see that nothing comes (a positive check that
/// something else comes first always follows).
const SHORT_WAIT: Duration = Duration::from_millis(300);

/// Starts a two-shard server on loopback port 0 with these timings; `adjust` changes
/// the rest of the configuration.
fn start_with(
    ping: Duration,
    exchange: Duration,
    adjust: impl FnOnce(&mut ServerConfig),
) -> Server {
    let mut config = ServerConfig {
        addr: "127.0.0.1:0".into(),
        http_addr: "127.0.0.1:0".into(),
        shards: 2,
        ping_interval: ping,
        exchange_timeout: exchange,
        ..ServerConfig::default()
    };
    adjust(&mut config);
    Server::start(&config).expect("the server starts (ulimit -l?)")
}

/// A server whose pings and timeouts stay out of the way.
fn start() -> Server {
    start_with(QUIET_PING, PATIENCE, |_| {})
}

/// The Info of the devices the system channel's payloads are tagged for.
fn mako() -> Value {
    json!({"device": "mako", "channel": "daily"})
}

/// A plain-TCP device that said hello (CONNACK received; not necessarily registered yet).
fn connect(server: &Server, device_id: &str, levels: Value, info: Value) -> Device {
    let mut dev = Device::connect(server.device_addr());
    dev.hello(device_id, levels, info);
    dev
}

/// POSTs a system broadcast, then waits until every shard has it.
fn broadcast_until(server: &Server, data: &Value, expire_on: &str) {
    let resp = post_json(
        server.http_addr(),
        "/broadcast",
        &json!({"channel": "system", "expire_on": expire_on, "data": data}),
    );
    assert_eq!(
        (resp.status, resp.json()),
        (200, json!({"ok": true})),
        "broadcast {data}"
    );
    wait_replicated(server);
}

/// Waits until every shard's replica of the system channel is at the same top level.
///
/// `/broadcast` answers once the channel's sequencer has appended; the other shards'
/// replicas catch up a moment later. A device registering on one of them in between
/// would see the older top level first (and get the new one by fan-out right after):
/// correct for the device, but not the one message a test expects.
fn wait_replicated(server: &Server) {
    let deadline = Instant::now() + PATIENCE;
    let sending = server.broker().sending();
    loop {
        let tops: Vec<i64> = (0..server.broker().nr_shards())
            .map(|i| {
                let top = sending.run_on(ShardId(i), |shard| {
                    shard
                        .store()
                        .get_channel_snapshot(&InternalChannelId::System)
                        .map_or(-1, |(top, _)| top)
                });
                block_on(top).expect("the shard answers")
            })
            .collect();
        if tops.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(Instant::now() < deadline, "replicas stay apart: {tops:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Broadcasts `data` on the system channel, expiring far in the future.
fn broadcast(server: &Server, data: &Value) {
    broadcast_until(server, data, FAR);
}

/// The token of (`device_id`, `app`).
fn register(server: &Server, device_id: &str, app: &str) -> String {
    let resp = post_json(
        server.http_addr(),
        "/register",
        &json!({"deviceid": device_id, "appid": app}),
    );
    let body = resp.json();
    assert_eq!((resp.status, &body["ok"]), (200, &json!(true)), "{body}");
    body["token"].as_str().expect("a token").to_owned()
}

/// POSTs `/notify` with `token`, `app` and `data`, plus the `extra` fields.
fn notify_with(server: &Server, token: &str, app: &str, data: &Value, extra: Value) -> HttpAnswer {
    let mut body = json!({"appid": app, "token": token, "expire_on": FAR, "data": data});
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    post_json(server.http_addr(), "/notify", &body)
}

/// Notifies `token`'s device for `app` with `data`; asserts it is accepted.
fn notify(server: &Server, token: &str, app: &str, data: &Value) {
    let resp = notify_with(server, token, app, data, json!({}));
    assert_eq!(
        (resp.status, resp.json()),
        (200, json!({"ok": true})),
        "notify {data}"
    );
}

/// Receives NOTIFICATIONS, ACKs it, and returns its notifications.
fn take_notifications(dev: &mut Device) -> Vec<Value> {
    let msg = dev.next_non_ping();
    assert_eq!(msg["T"], "notifications", "{msg}");
    dev.ack();
    msg["Notifications"]
        .as_array()
        .expect("a Notifications array")
        .clone()
}

/// The payloads (`P`) of notifications, asserting each is for `app`.
fn payloads_of(notifications: &[Value], app: &str) -> Vec<Value> {
    notifications
        .iter()
        .map(|n| {
            assert_eq!(n["A"], app, "{n}");
            assert!(
                n["M"].as_str().is_some_and(|m| !m.is_empty()),
                "a message id in {n}"
            );
            n["P"].clone()
        })
        .collect()
}

/// Receives BROADCAST, ACKs it, and returns it.
fn take_broadcast(dev: &mut Device) -> Value {
    let msg = dev.next_non_ping();
    assert_eq!(msg["T"], "broadcast", "{msg}");
    dev.ack();
    msg
}

/// Notifies `token`'s device with a marker payload and asserts that the very next
/// message (PINGs aside) is that one NOTIFICATIONS, which it ACKs: nothing the server
/// had queued for the device before the marker is left.
fn assert_next_is_marker(server: &Server, dev: &mut Device, token: &str, label: &str) {
    let marker = json!({"marker": label});
    notify(server, token, APP, &marker);
    let got = take_notifications(dev);
    assert_eq!(payloads_of(&got, APP), vec![marker], "only the marker came");
}

/// Notifies `token`'s device with a marker payload, asserts that the very next message
/// (PINGs aside) is that one NOTIFICATIONS, and leaves it unacknowledged: its arrival
/// proves every earlier ACK of the session was processed, and it stays pending.
///
/// # Returns
/// The notifications as delivered, to compare with their redelivery.
fn unacked_marker(server: &Server, dev: &mut Device, token: &str, label: &str) -> Value {
    let marker = json!({"marker": label});
    notify(server, token, APP, &marker);
    let msg = dev.next_non_ping();
    assert_eq!(msg["T"], "notifications", "{msg}");
    let notifications = msg["Notifications"].clone();
    let list = notifications.as_array().expect("a Notifications array");
    assert_eq!(payloads_of(list, APP), vec![marker], "only the marker came");
    notifications
}

/// A connected, registered device that must keep working while other sessions fail.
struct Healthy {
    dev: Device,
    token: String,
    checks: usize,
}

impl Healthy {
    fn connect(server: &Server, device_id: &str) -> Self {
        let token = register(server, device_id, APP);
        let mut dev = connect(server, device_id, json!({}), json!({}));
        // Receiving a notification proves the session is registered.
        assert_next_is_marker(server, &mut dev, &token, "registered");
        Self {
            dev,
            token,
            checks: 0,
        }
    }

    /// Asserts the device still gets its notifications.
    fn assert_works(&mut self, server: &Server) {
        self.checks += 1;
        let label = format!("still working {}", self.checks);
        assert_next_is_marker(server, &mut self.dev, &self.token, &label);
    }
}

/// A device answering PINGs on its own thread while the test watches another one.
struct KeptAlive {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<Healthy>,
}

impl KeptAlive {
    fn start(mut healthy: Healthy) -> Self {
        let (stop, stopped) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // Bounded: the test stops it long before this many rounds.
            for _ in 0..100_000 {
                if stopped.try_recv().is_ok() {
                    break;
                }
                match healthy.dev.recv_within(Duration::from_millis(10)) {
                    Ok(msg) if msg["T"] == "ping" => healthy.dev.pong(),
                    Ok(msg) => panic!("the idle device got {msg}"),
                    Err(RecvError::Timeout) => {}
                    Err(e) => panic!("the idle device lost its session: {e:?}"),
                }
            }
            healthy
        });
        Self { stop, thread }
    }

    fn stop(self) -> Healthy {
        let _ = self.stop.send(());
        self.thread
            .join()
            .expect("the idle device kept its session")
    }
}

/// A plain TCP connection for bytes that are not a well-behaved device.
fn raw(server: &Server) -> TcpStream {
    connect_tcp(server.device_addr())
}

/// Writes `bytes`, ignoring failures (the server may close before reading them all).
fn write_raw(s: &mut TcpStream, bytes: &[u8]) {
    let _ = s.write_all(bytes);
    let _ = s.flush();
}

/// A frame: the big-endian length, then `body`.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = u16::try_from(body.len())
        .expect("a frame body fits u16")
        .to_be_bytes()
        .to_vec();
    f.extend_from_slice(body);
    f
}

/// Reads until the server closes `s` (EOF or reset), up to [`PATIENCE`].
///
/// # Returns
/// What was read before the close, or `None` when the connection stayed open.
fn read_until_closed(s: &mut TcpStream) -> Option<Vec<u8>> {
    let deadline = Instant::now() + PATIENCE;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).expect("read timeout");
        match s.read(&mut chunk) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Some(got),
        }
    }
}

/// An RFC 3339 time `after` from now, and that instant.
fn expire_in(after: Duration) -> (String, SystemTime) {
    let at = OffsetDateTime::now_utc() + after;
    (at.format(&Rfc3339).expect("RFC 3339"), SystemTime::from(at))
}

/// A system-channel payload for daily/mako of about 2000 bytes (the API takes 2048),
/// numbered `i`.
fn big_payload(i: usize) -> Value {
    json!({"daily/mako": format!("{i:05}{}", "x".repeat(1980))})
}

// ---------------------------------------------------------------------------------------
// Broadcasts: levels, the channel filter, expiry, splitting (docs/protocol.md §1.5, §2.1)
// ---------------------------------------------------------------------------------------

#[test]
fn broadcast_behind_by_one_gets_only_the_last_payload_then_follows_new_ones() {
    let server = start();
    let (p1, p2, p3) = (
        json!({"daily/mako": 1}),
        json!({"daily/mako": 2}),
        json!({"daily/mako": 3}),
    );
    broadcast(&server, &p1);
    broadcast(&server, &p2);
    let mut dev = connect(&server, "behind-one", json!({"0": 1}), mako());
    assert_eq!(
        take_broadcast(&mut dev),
        json!({"T": "broadcast", "ChanId": "0", "TopLevel": 2, "Payloads": [p2]})
    );
    // After the ACK the session is at level 2: a new broadcast brings only itself.
    broadcast(&server, &p3);
    assert_eq!(
        take_broadcast(&mut dev),
        json!({"T": "broadcast", "ChanId": "0", "TopLevel": 3, "Payloads": [p3]})
    );
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn broadcast_way_behind_gets_every_live_payload_in_order() {
    let server = start();
    let payloads: Vec<Value> = (1..=4)
        .map(|i| json!({"daily/mako": i, "n": [i, "x"]}))
        .collect();
    for p in &payloads {
        broadcast(&server, p);
    }
    // No level at all counts as level 0.
    let mut dev = connect(&server, "way-behind", json!({}), mako());
    assert_eq!(
        take_broadcast(&mut dev),
        json!({"T": "broadcast", "ChanId": "0", "TopLevel": 4, "Payloads": payloads})
    );
    let mut dev0 = connect(&server, "way-behind-0", json!({"0": 0}), mako());
    assert_eq!(take_broadcast(&mut dev0)["Payloads"], json!(payloads));
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn broadcast_too_ahead_gets_the_last_payload_and_the_top_level() {
    let server = start();
    let (p1, p2) = (json!({"daily/mako": 1}), json!({"daily/mako": 2}));
    broadcast(&server, &p1);
    broadcast(&server, &p2);
    let mut dev = connect(&server, "too-ahead", json!({"0": 100}), mako());
    assert_eq!(
        take_broadcast(&mut dev),
        json!({"T": "broadcast", "ChanId": "0", "TopLevel": 2, "Payloads": [p2]})
    );
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn broadcast_too_ahead_on_an_empty_channel_resyncs_with_null_payloads() {
    let server = start();
    let mut dev = connect(&server, "ahead-empty", json!({"0": 5}), mako());
    assert_eq!(
        take_broadcast(&mut dev),
        json!({"T": "broadcast", "ChanId": "0", "TopLevel": 0, "Payloads": null})
    );
    // Resynced to level 0: the first broadcast is delivered.
    let p1 = json!({"daily/mako": "first"});
    broadcast(&server, &p1);
    assert_eq!(
        take_broadcast(&mut dev),
        json!({"T": "broadcast", "ChanId": "0", "TopLevel": 1, "Payloads": [p1]})
    );
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn broadcast_at_the_top_level_sends_nothing() {
    let server = start_with(Duration::from_millis(500), PATIENCE, |_| {});
    broadcast(&server, &json!({"daily/mako": 1}));
    broadcast(&server, &json!({"daily/mako": 2}));
    // The system channel by its name "0" and by 32 zero hex digits.
    for (id, levels) in [
        ("at-top", json!({"0": 2})),
        ("at-top-hex", json!({"00000000000000000000000000000000": 2})),
    ] {
        let token = register(&server, id, APP);
        let mut dev = connect(&server, id, levels, mako());
        dev.assert_quiet(SHORT_WAIT, "a device with nothing pending");
        // A broadcast would have been queued before the marker's delivery.
        assert_next_is_marker(&server, &mut dev, &token, id);
        // Idle now: PINGs are all it gets.
        assert_eq!(dev.recv().expect("a PING"), json!({"T": "ping"}));
        dev.pong();
    }
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn system_broadcasts_reach_only_devices_of_their_channel_and_model() {
    let server = start();
    let d1 = json!({"daily/mako": 1});
    let w1 = json!({"weekly/mako": 1});
    let other_model = json!({"daily/hammerhead": 1});
    let not_an_object = json!(["daily/mako"]);
    let d2 = json!({"weekly/mako": 2, "daily/mako": 2});
    for p in [&d1, &w1, &other_model, &not_an_object, &d2] {
        broadcast(&server, p);
    }
    let mut daily = connect(&server, "filter-daily", json!({"0": 0}), mako());
    assert_eq!(
        take_broadcast(&mut daily),
        json!({"T": "broadcast", "ChanId": "0", "TopLevel": 5, "Payloads": [d1, d2]})
    );
    let mut weekly = connect(
        &server,
        "filter-weekly",
        json!({"0": 0}),
        json!({"device": "mako", "channel": "weekly"}),
    );
    assert_eq!(
        take_broadcast(&mut weekly),
        json!({"T": "broadcast", "ChanId": "0", "TopLevel": 5, "Payloads": [w1, d2]})
    );
    // Info defaults to "?/?": no payload is for it, and it is behind: nothing.
    let token = register(&server, "filter-unknown", APP);
    let mut unknown = connect(&server, "filter-unknown", json!({"0": 0}), json!({}));
    assert_next_is_marker(&server, &mut unknown, &token, "unknown model");
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn broadcast_with_every_payload_filtered_out_is_empty_when_ahead_and_nothing_when_behind() {
    let server = start();
    broadcast(&server, &json!({"weekly/mako": 1}));
    broadcast(&server, &json!({"weekly/mako": 2}));
    let mut ahead = connect(&server, "filtered-ahead", json!({"0": 10}), mako());
    assert_eq!(
        take_broadcast(&mut ahead),
        json!({"T": "broadcast", "ChanId": "0", "TopLevel": 2, "Payloads": []})
    );
    let token = register(&server, "filtered-behind", APP);
    let mut behind = connect(&server, "filtered-behind", json!({"0": 0}), mako());
    assert_next_is_marker(&server, &mut behind, &token, "behind, all filtered");
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn expired_broadcasts_are_not_sent_but_still_count_in_the_top_level() {
    let server = start();
    let l1 = json!({"daily/mako": "live 1"});
    let e2 = json!({"daily/mako": "expires"});
    let l3 = json!({"daily/mako": "live 3"});
    broadcast(&server, &l1);
    let (expire_on, expires_at) = expire_in(Duration::from_secs(2));
    broadcast_until(&server, &e2, &expire_on);
    broadcast(&server, &l3);
    // Before it expires, a device behind gets all three (checked only when the answer
    // provably came before the expiry: a slow machine may take longer).
    let mut early = connect(&server, "expiry-early", json!({"0": 0}), mako());
    let got = take_broadcast(&mut early)["Payloads"].clone();
    if SystemTime::now() < expires_at {
        assert_eq!(got, json!([l1, e2, l3]));
    }
    let mut waits = 0;
    while SystemTime::now() < expires_at + Duration::from_millis(100) {
        waits += 1;
        assert!(waits < 100, "the clock does not advance");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut late = connect(&server, "expiry-late", json!({"0": 0}), mako());
    assert_eq!(
        take_broadcast(&mut late),
        json!({"T": "broadcast", "ChanId": "0", "TopLevel": 3, "Payloads": [l1, l3]})
    );
    // The window is the last `top - level` *live* payloads (the original's arithmetic):
    // behind by one gets the last live one, behind by two the last two live ones.
    let mut one = connect(&server, "expiry-one", json!({"0": 2}), mako());
    assert_eq!(
        take_broadcast(&mut one),
        json!({"T": "broadcast", "ChanId": "0", "TopLevel": 3, "Payloads": [l3]})
    );
    let mut two = connect(&server, "expiry-two", json!({"0": 1}), mako());
    assert_eq!(take_broadcast(&mut two)["Payloads"], json!([l1, l3]));
    server.shutdown(Duration::from_secs(1));
}

/// Receives the parts of a split BROADCAST up to `top`, ACKing each; asserts each part's
/// size and that the levels rise; returns the parts' (TopLevel, payloads).
fn take_broadcast_parts(dev: &mut Device, top: i64) -> Vec<(i64, Vec<Value>)> {
    let mut parts: Vec<(i64, Vec<Value>)> = Vec::new();
    while parts.last().is_none_or(|(t, _)| *t < top) {
        assert!(parts.len() < 100, "too many parts");
        let msg = take_broadcast(dev);
        assert_eq!(msg["ChanId"], "0");
        let level = msg["TopLevel"].as_i64().expect("a TopLevel");
        let payloads = msg["Payloads"].as_array().expect("payloads").clone();
        let bytes: usize = payloads.iter().map(|p| p.to_string().len()).sum();
        assert!(bytes <= MAX_PART_PAYLOAD, "part of {bytes} payload bytes");
        if let Some((prev, _)) = parts.last() {
            assert!(level > *prev, "levels rise: {prev} then {level}");
        }
        parts.push((level, payloads));
    }
    parts
}

#[test]
fn large_broadcast_is_split_into_acked_parts_with_rising_levels() {
    let server = start();
    let all: Vec<Value> = (0..70).map(big_payload).collect();
    for p in &all {
        broadcast(&server, p);
    }
    let mut dev = connect(&server, "split-broadcast", json!({"0": 0}), mako());
    let parts = take_broadcast_parts(&mut dev, 70);
    assert!(parts.len() >= 3, "{} parts", parts.len());
    assert_eq!(parts.last().map(|(t, _)| *t), Some(70));
    let mut sent = 0;
    for (level, payloads) in &parts {
        sent += payloads.len();
        assert_eq!(
            *level, sent as i64,
            "each part's level is that of its last payload"
        );
    }
    let got: Vec<Value> = parts.into_iter().flat_map(|(_, p)| p).collect();
    assert_eq!(got, all, "every payload once, in order");

    // A device that drops after the first part resumes right after it.
    let mut first = connect(&server, "split-drop", json!({"0": 0}), mako());
    let part = take_broadcast(&mut first);
    let level = part["TopLevel"].as_i64().expect("a TopLevel");
    let seen = part["Payloads"].as_array().expect("payloads").len();
    first.close();
    let mut resumed = connect(&server, "split-resume", json!({"0": level}), mako());
    let rest: Vec<Value> = take_broadcast_parts(&mut resumed, 70)
        .into_iter()
        .flat_map(|(_, p)| p)
        .collect();
    assert_eq!(rest, all[seen..].to_vec());
    server.shutdown(Duration::from_secs(1));
}

// ---------------------------------------------------------------------------------------
// Unicast (docs/protocol.md §2.3, §3.4)
// ---------------------------------------------------------------------------------------

#[test]
fn notify_delivers_to_a_connected_device_and_an_acked_one_is_never_sent_again() {
    let server = start();
    let token = register(&server, "uni-ack", APP);
    assert_eq!(
        token,
        register(&server, "uni-ack", APP),
        "the same pair, the same token"
    );
    let mut dev = connect(&server, "uni-ack", json!({}), json!({}));
    let data = json!({"message": "hello", "n": [1, 2.5, null]});
    notify(&server, &token, APP, &data);
    let got = take_notifications(&mut dev);
    assert_eq!(payloads_of(&got, APP), vec![data]);
    let pending = unacked_marker(&server, &mut dev, &token, "left pending");
    dev.close();
    // Only what was not acknowledged comes again.
    let mut again = connect(&server, "uni-ack", json!({}), json!({}));
    assert_eq!(json!(take_notifications(&mut again)), pending);
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn unacknowledged_notification_is_delivered_again_on_the_next_connection() {
    let server = start();
    let token = register(&server, "uni-noack", APP);
    let mut dev = connect(&server, "uni-noack", json!({}), json!({}));
    let data = json!({"important": true});
    notify(&server, &token, APP, &data);
    let first = dev.next_non_ping();
    assert_eq!(first["T"], "notifications", "{first}");
    dev.close();
    let mut again = connect(&server, "uni-noack", json!({}), json!({}));
    let second = take_notifications(&mut again);
    assert_eq!(
        json!(second),
        first["Notifications"],
        "the same message, same id"
    );
    let pending = unacked_marker(&server, &mut again, &token, "left pending");
    again.close();
    // Acknowledged on the second connection: the third gets only the marker.
    let mut third = connect(&server, "uni-noack", json!({}), json!({}));
    assert_eq!(json!(take_notifications(&mut third)), pending);
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn replace_tag_delivers_only_the_newest_of_an_apps_tagged_notifications() {
    let server = start();
    let other_app = "com.example.other";
    let token = register(&server, "uni-tag", APP);
    let other = register(&server, "uni-tag", other_app);
    let tagged = |server: &Server, token: &str, app: &str, data: Value| {
        let resp = notify_with(server, token, app, &data, json!({"replace_tag": "weather"}));
        assert_eq!(resp.status, 200, "{}", resp.json());
    };
    tagged(&server, &token, APP, json!({"weather": "rain"}));
    tagged(&server, &other, other_app, json!({"weather": "other app"}));
    tagged(&server, &token, APP, json!({"weather": "sun"}));
    notify(&server, &token, APP, &json!({"untagged": 1}));
    let mut dev = connect(&server, "uni-tag", json!({}), json!({}));
    let got = take_notifications(&mut dev);
    let seen: Vec<(Value, Value)> = got
        .iter()
        .map(|n| (n["A"].clone(), n["P"].clone()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (json!(other_app), json!({"weather": "other app"})),
            (json!(APP), json!({"weather": "sun"})),
            (json!(APP), json!({"untagged": 1})),
        ]
    );
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn clear_pending_drops_the_apps_earlier_notifications_only() {
    let server = start();
    let other_app = "com.example.other";
    let token = register(&server, "uni-clear", APP);
    let other = register(&server, "uni-clear", other_app);
    notify(&server, &token, APP, &json!(1));
    notify(&server, &other, other_app, &json!("kept"));
    notify(&server, &token, APP, &json!(2));
    let resp = notify_with(
        &server,
        &token,
        APP,
        &json!(3),
        json!({"clear_pending": true}),
    );
    assert_eq!(resp.status, 200, "{}", resp.json());
    let mut dev = connect(&server, "uni-clear", json!({}), json!({}));
    let got = take_notifications(&mut dev);
    let seen: Vec<(Value, Value)> = got
        .iter()
        .map(|n| (n["A"].clone(), n["P"].clone()))
        .collect();
    assert_eq!(
        seen,
        vec![(json!(other_app), json!("kept")), (json!(APP), json!(3))]
    );
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn too_many_pending_is_refused_with_the_newest_payload() {
    let server = start_with(QUIET_PING, PATIENCE, |c| c.max_notifications_per_app = 3);
    let token = register(&server, "uni-full", APP);
    for i in 1..=3 {
        notify(&server, &token, APP, &json!({"n": i}));
    }
    let resp = notify_with(&server, &token, APP, &json!({"n": 4}), json!({}));
    assert_eq!(
        (resp.status, resp.json()),
        (
            413,
            json!({
                "error": "too-many-pending",
                "message": "Too many pending notifications for this application",
                "extra": {"n": 3},
            })
        )
    );
    // Another application of the device has its own allowance.
    let other = register(&server, "uni-full", "com.example.other");
    notify(&server, &other, "com.example.other", &json!("other"));
    // Clearing makes room.
    let resp = notify_with(
        &server,
        &token,
        APP,
        &json!({"n": 5}),
        json!({"clear_pending": true}),
    );
    assert_eq!(resp.status, 200, "{}", resp.json());
    let mut dev = connect(&server, "uni-full", json!({}), json!({}));
    let got: Vec<Value> = take_notifications(&mut dev)
        .iter()
        .map(|n| n["P"].clone())
        .collect();
    assert_eq!(got, vec![json!("other"), json!({"n": 5})]);
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn a_token_of_another_app_is_unauthorized() {
    let server = start();
    let token = register(&server, "uni-auth", APP);
    let mut dev = connect(&server, "uni-auth", json!({}), json!({}));
    let resp = notify_with(
        &server,
        &token,
        "com.example.intruder",
        &json!("no"),
        json!({}),
    );
    assert_eq!(
        (resp.status, resp.json()),
        (
            401,
            json!({"error": "unauthorized", "message": "Unauthorized"})
        )
    );
    assert_next_is_marker(&server, &mut dev, &token, "nothing refused came");
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn large_pending_notifications_are_split_into_acked_parts() {
    let server = start_with(QUIET_PING, PATIENCE, |c| c.max_notifications_per_app = 1000);
    let token = register(&server, "uni-split", APP);
    let all: Vec<Value> = (0..70)
        .map(|i| json!({"n": i, "pad": "y".repeat(1990)}))
        .collect();
    for p in &all {
        notify(&server, &token, APP, p);
    }
    let mut dev = connect(&server, "uni-split", json!({}), json!({}));
    let mut got = Vec::new();
    let mut parts = 0;
    while got.len() < all.len() {
        assert!(parts < 100, "too many parts");
        parts += 1;
        let part = take_notifications(&mut dev);
        assert!(!part.is_empty());
        let bytes: usize = part.iter().map(|n| n.to_string().len()).sum();
        assert!(bytes <= MAX_PART_PAYLOAD, "part of {bytes} bytes");
        got.extend(part);
    }
    assert!(parts >= 2, "{parts} parts");
    assert_eq!(
        payloads_of(&got, APP),
        all,
        "every notification once, in order"
    );
    let mut ids: Vec<&str> = got.iter().filter_map(|n| n["M"].as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), all.len(), "distinct message ids");
    assert_next_is_marker(&server, &mut dev, &token, "all acked");
    server.shutdown(Duration::from_secs(1));
}

// ---------------------------------------------------------------------------------------
// Registration (docs/protocol.md §1.4, step 4)
// ---------------------------------------------------------------------------------------

#[test]
fn the_last_registration_of_a_device_wins_on_any_shard() {
    // Pings prove a session registered: CONNACK goes out before the registration.
    let server = start_with(Duration::from_millis(300), PATIENCE, |_| {});
    // The kernel spreads connections over the shards by address, so with several pairs
    // some newer connections are accepted on another shard than the older one.
    for pair in 0..4 {
        let id = format!("twice-{pair}");
        let token = register(&server, &id, APP);
        let mut older = connect(&server, &id, json!({}), json!({}));
        assert_eq!(older.recv().expect("a PING"), json!({"T": "ping"}));
        older.pong();
        let mut newer = connect(&server, &id, json!({}), json!({}));
        assert!(older.closed(), "pair {pair}: the older session is closed");
        assert_next_is_marker(&server, &mut newer, &token, "newer works");
        assert_next_is_marker(&server, &mut newer, &token, "newer still works");
    }
    server.shutdown(Duration::from_secs(1));
}

// ---------------------------------------------------------------------------------------
// Pings and timeouts (docs/protocol.md §1.4, step 4)
// ---------------------------------------------------------------------------------------

#[test]
fn ping_comes_after_the_interval_and_pong_keeps_the_session() {
    let ping = Duration::from_millis(200);
    // A generous exchange timeout: answering PONG in time is not what is tested here.
    let server = start_with(ping, Duration::from_secs(2), |_| {});
    let token = register(&server, "pinged", APP);
    let mut dev = Device::connect(server.device_addr());
    let hello = Instant::now();
    let connack = dev.hello("pinged", json!({}), json!({}));
    assert_eq!(
        connack,
        json!({"T": "connack", "Params": {"PingInterval": "200ms"}})
    );
    let first = dev.recv().expect("a PING");
    assert!(hello.elapsed() >= ping, "no PING before the interval");
    assert_eq!(first, json!({"T": "ping"}));
    for k in 2..5 {
        // Each PING goes out at least one interval after the previous one, so the k-th
        // comes no earlier than k intervals after the hello began.
        dev.pong();
        assert_eq!(dev.recv().expect("another PING"), json!({"T": "ping"}));
        assert!(hello.elapsed() >= ping * k, "no PING before the interval");
    }
    dev.pong();
    assert_next_is_marker(&server, &mut dev, &token, "alive after pings");
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn a_missing_pong_ends_the_session() {
    let server = start_with(
        Duration::from_millis(200),
        Duration::from_millis(300),
        |_| {},
    );
    let healthy = KeptAlive::start(Healthy::connect(&server, "pong-healthy"));
    let mut dev = connect(&server, "no-pong", json!({}), json!({}));
    assert_eq!(dev.recv().expect("a PING"), json!({"T": "ping"}));
    // Not answered: the server gives up and closes.
    match dev.recv() {
        Ok(msg) => panic!("nothing more before the close, got {msg}"),
        Err(e) => assert!(e.is_closed(), "closed, not {e:?}"),
    }
    let mut healthy = healthy.stop();
    healthy.assert_works(&server);
    server.shutdown(Duration::from_secs(1));
}

#[test]
fn a_missing_ack_ends_the_session_and_the_notification_stays_pending() {
    let server = start_with(
        Duration::from_millis(200),
        Duration::from_millis(300),
        |_| {},
    );
    let token = register(&server, "no-ack", APP);
    let mut dev = connect(&server, "no-ack", json!({}), json!({}));
    let data = json!({"ack": "me"});
    notify(&server, &token, APP, &data);
    let msg = dev.next_non_ping();
    assert_eq!(msg["T"], "notifications", "{msg}");
    match dev.recv() {
        Ok(msg) => panic!("nothing more before the close, got {msg}"),
        Err(e) => assert!(e.is_closed(), "closed, not {e:?}"),
    }
    let mut again = connect(&server, "no-ack", json!({}), json!({}));
    let got = take_notifications(&mut again);
    assert_eq!(json!(got), msg["Notifications"], "delivered again");
    server.shutdown(Duration::from_secs(1));
}

// ---------------------------------------------------------------------------------------
// Bad device input ends only that session (docs/protocol.md §1.2–1.4, §1.6)
// ---------------------------------------------------------------------------------------

/// The exchange timeout of the bad-input tests: short, since some wait it out.
const BAD_INPUT_TIMEOUT: Duration = Duration::from_secs(1);

/// Starts a server with a healthy device, runs `bad` against it, asserts the healthy
/// device still works, and that a new device can still connect and get notifications.
fn only_the_bad_session_ends(name: &str, bad: impl FnOnce(&Server)) {
    let server = start_with(QUIET_PING, BAD_INPUT_TIMEOUT, |_| {});
    let mut healthy = Healthy::connect(&server, &format!("{name}-healthy"));
    bad(&server);
    healthy.assert_works(&server);
    let mut later = Healthy::connect(&server, &format!("{name}-later"));
    later.assert_works(&server);
    server.shutdown(Duration::from_secs(1));
}

/// Sends `bytes` on a raw connection and asserts the server closes it without a reply.
fn assert_closed_after(server: &Server, bytes: &[u8]) {
    let mut s = raw(server);
    write_raw(&mut s, bytes);
    let got = read_until_closed(&mut s).expect("the server closes the connection");
    assert!(
        got.is_empty(),
        "no reply, got {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// A CONNECT frame for `device_id`.
fn connect_frame(device_id: &str) -> Vec<u8> {
    frame(
        json!({"T": "connect", "DeviceId": device_id, "ClientVer": "test", "Levels": {}})
            .to_string()
            .as_bytes(),
    )
}

#[test]
fn a_wrong_version_byte_ends_only_that_session() {
    only_the_bad_session_ends("version", |server| {
        let mut bytes = vec![1];
        bytes.extend(connect_frame("bad-version"));
        assert_closed_after(server, &bytes);
    });
}

#[test]
fn a_first_message_other_than_connect_ends_only_that_session() {
    only_the_bad_session_ends("not-connect", |server| {
        let mut bytes = vec![0];
        bytes.extend(frame(br#"{"T":"pong"}"#));
        assert_closed_after(server, &bytes);
    });
}

#[test]
fn garbage_json_in_a_frame_ends_only_that_session() {
    only_the_bad_session_ends("garbage", |server| {
        let mut bytes = vec![0];
        bytes.extend(frame(b"{\"T\":\"connect\", this is not JSON"));
        assert_closed_after(server, &bytes);
    });
}

#[test]
fn garbage_instead_of_an_ack_ends_only_that_session() {
    only_the_bad_session_ends("garbage-ack", |server| {
        let token = register(server, "garbage-ack", APP);
        let mut dev = connect(server, "garbage-ack", json!({}), json!({}));
        notify(server, &token, APP, &json!("answer me"));
        assert_eq!(dev.next_non_ping()["T"], "notifications");
        dev.send_raw(&frame(b"\x00\xffnot json"));
        assert!(dev.closed(), "the server closes the session");
    });
}

#[test]
fn a_non_string_device_in_info_ends_only_that_session() {
    only_the_bad_session_ends("info", |server| {
        let mut dev = Device::connect(server.device_addr());
        dev.hello(
            "bad-info",
            json!({}),
            json!({"device": 42, "channel": "daily"}),
        );
        assert!(dev.closed(), "the server closes the session");
    });
}

#[test]
fn a_bad_levels_key_ends_only_that_session() {
    only_the_bad_session_ends("levels", |server| {
        let mut dev = Device::connect(server.device_addr());
        dev.hello("bad-levels", json!({"z": 1}), mako());
        assert!(dev.closed(), "the server closes the session");
    });
}

#[test]
fn a_truncated_frame_then_silence_is_closed_after_the_exchange_timeout() {
    only_the_bad_session_ends("truncated", |server| {
        let started = Instant::now();
        let mut s = raw(server);
        let whole = connect_frame("truncated");
        let mut bytes = vec![0];
        bytes.extend_from_slice(&whole[..whole.len() / 2]);
        write_raw(&mut s, &bytes);
        let got = read_until_closed(&mut s).expect("the server closes the connection");
        assert!(got.is_empty(), "no reply");
        assert!(
            started.elapsed() >= BAD_INPUT_TIMEOUT,
            "not before the exchange timeout"
        );
    });
}

#[test]
fn silence_after_connecting_is_closed_after_the_exchange_timeout() {
    only_the_bad_session_ends("silent", |server| {
        let started = Instant::now();
        let mut s = raw(server);
        let got = read_until_closed(&mut s).expect("the server closes the connection");
        assert!(got.is_empty(), "no reply");
        assert!(
            started.elapsed() >= BAD_INPUT_TIMEOUT,
            "not before the exchange timeout"
        );
    });
}

#[test]
fn a_huge_declared_frame_length_ends_only_that_session() {
    only_the_bad_session_ends("huge", |server| {
        // The largest length there is, followed by a body that is not a message.
        let mut bytes = vec![0, 0xff, 0xff];
        bytes.extend(std::iter::repeat_n(b'[', 0xffff));
        assert_closed_after(server, &bytes);
        // The same length announced, then silence.
        assert_closed_after(server, &[0, 0xff, 0xff, b'{']);
    });
}

// ---------------------------------------------------------------------------------------
// TLS (docs/protocol.md §1.1)
// ---------------------------------------------------------------------------------------

#[test]
fn tls_devices_register_get_notifications_and_pings_on_every_shard() {
    let ca = TestCa::new();
    let server = start_with(Duration::from_millis(300), PATIENCE, |c| {
        c.cert_pem_file = Some(ca.dir.join("cert.pem"));
        c.key_pem_file = Some(ca.dir.join("key.pem"));
    });
    // Several devices: some are accepted by the shard that does not own them and move.
    let mut devices: Vec<(String, String, Device)> = (0..6)
        .map(|i| {
            let id = format!("tls-{i}");
            let token = register(&server, &id, APP);
            let mut dev = Device::connect_tls(server.device_addr(), &ca);
            dev.hello(&id, json!({}), json!({}));
            (id, token, dev)
        })
        .collect();
    for (id, token, dev) in &mut devices {
        let data = json!({"to": id.as_str()});
        notify(&server, token, APP, &data);
        assert_eq!(payloads_of(&take_notifications(dev), APP), vec![data]);
    }
    for (_, _, dev) in &mut devices {
        for _ in 0..2 {
            assert_eq!(dev.recv().expect("a PING"), json!({"T": "ping"}));
            dev.pong();
        }
    }
    // A plain-TCP device on the TLS port is closed, and nothing else suffers.
    let mut plain = raw(&server);
    let mut bytes = vec![0];
    bytes.extend(connect_frame("plain-on-tls"));
    write_raw(&mut plain, &bytes);
    assert!(
        read_until_closed(&mut plain).is_some(),
        "the plain client is closed"
    );
    for (id, token, dev) in &mut devices {
        assert_next_is_marker(&server, dev, token, id);
    }
    let mut later = Device::connect_tls(server.device_addr(), &ca);
    later.hello("tls-later", json!({}), json!({}));
    let token = register(&server, "tls-later", APP);
    assert_next_is_marker(&server, &mut later, &token, "after the plain client");
    server.shutdown(Duration::from_secs(1));
}

// ---------------------------------------------------------------------------------------
// Migration between shards
// ---------------------------------------------------------------------------------------

/// The sum over shards of `pushbroker_migrations_total` samples in `direction`.
fn migrations(metrics: &str, direction: &str) -> u64 {
    let label = format!("direction=\"{direction}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("pushbroker_migrations_total{") && l.contains(&label))
        .map(|l| {
            l.rsplit_once(' ')
                .and_then(|(_, v)| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("a sample value in {l:?}"))
        })
        .sum()
}

#[test]
fn every_device_gets_its_own_notifications_whichever_shard_accepted_it() {
    let server = start();
    let mut devices: Vec<(String, String, Device)> = (0..20)
        .map(|i| {
            let id = format!("migrant-{i}");
            let token = register(&server, &id, APP);
            let dev = connect(&server, &id, json!({}), json!({}));
            (id, token, dev)
        })
        .collect();
    for (id, token, _) in &devices {
        notify(&server, token, APP, &json!({"to": id.as_str()}));
    }
    for (id, _, dev) in &mut devices {
        let got = take_notifications(dev);
        assert_eq!(payloads_of(&got, APP), vec![json!({"to": id.as_str()})]);
    }
    let resp = http(server.http_addr(), "GET", "/metrics", &[], b"");
    assert_eq!(resp.status, 200);
    let text = resp.body.clone();
    let (moved_in, moved_out) = (migrations(&text, "in"), migrations(&text, "out"));
    assert!(moved_in > 0, "some connections moved:\n{text}");
    assert_eq!(
        moved_in, moved_out,
        "each move counted at both ends:\n{text}"
    );
    server.shutdown(Duration::from_secs(1));
}
