//! Many nodes as one service on a real Redis: pushbroker binaries sharing a
//! `redis-server` that each test starts on a free loopback port. A notify through one node
//! reaches a device on another; a broadcast through any node reaches every node's devices
//! with one level; a device that moves takes its pending notifications along and closes
//! its older connection; a node killed with SIGKILL loses nothing answered 200; Redis
//! restarted mid-run means 503 meanwhile and recovery after.
//!
//! Every wait is bounded and generous (a loaded two-core machine); nothing is timed.
//! Without `redis-server` the tests say so and pass, unless `PUSHBROKER_REQUIRE_REDIS` is
//! set (CI sets it).

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Device, PATIENCE, RecvError, RedisServer, ServerProcess, post_json};

const FAR: &str = "2099-01-01T00:00:00Z";
const APP: &str = "com.example.app";

/// The Info of devices the system channel's payloads are tagged for
/// (`{"daily/mako": …}`).
fn mako() -> Value {
    json!({"device": "mako", "channel": "daily"})
}

/// A node of the service on `redis` with `shards` shards.
fn node(redis: &RedisServer, shards: usize) -> ServerProcess {
    ServerProcess::start(&json!({
        "addr": "127.0.0.1:0",
        "http_addr": "127.0.0.1:0",
        "redis_url": redis.url(),
        "shards": shards,
        "ping_interval": "1s",
        "exchange_timeout": "5s",
    }))
}

fn notify_body(device: &str, data: &Value) -> Value {
    json!({
        "appid": APP, "userid": device, "deviceid": device,
        "expire_on": FAR, "data": data,
    })
}

/// Posts a notify through `api`; its HTTP status.
fn notify(api: SocketAddr, device: &str, data: &Value) -> u16 {
    post_json(api, "/notify", &notify_body(device, data)).status
}

/// A device connected to `addr` as `id`, its CONNACK read.
fn device(addr: SocketAddr, id: &str) -> Device {
    let mut d = Device::connect(addr);
    d.hello(id, json!({}), json!({}));
    d
}

/// The payloads of the next NOTIFICATIONS frame (PINGs answered).
fn next_notifications(d: &mut Device) -> Vec<Value> {
    let frame = d.next_non_ping();
    assert_eq!(frame["T"], "notifications", "{frame}");
    frame["Notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["P"].clone())
        .collect()
}

#[test]
fn a_notify_through_one_node_reaches_a_device_on_another() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = node(&redis, 2);
    let b = node(&redis, 2);
    let mut dev = device(b.device_addr, "dev-on-b");
    assert_eq!(notify(a.http_addr, "dev-on-b", &json!({"n": 1})), 200);
    assert_eq!(next_notifications(&mut dev), [json!({"n": 1})]);
    dev.ack();
    // Acknowledged: the next one comes alone, from either node.
    assert_eq!(notify(a.http_addr, "dev-on-b", &json!({"n": 2})), 200);
    assert_eq!(next_notifications(&mut dev), [json!({"n": 2})]);
    dev.ack();
    assert_eq!(notify(b.http_addr, "dev-on-b", &json!({"n": 3})), 200);
    assert_eq!(next_notifications(&mut dev), [json!({"n": 3})]);
    dev.ack();
    dev.assert_quiet(Duration::from_millis(500), "nothing after the ACKs");

    // A device on the other node is reached the other way round, and the message ids
    // the two nodes give are distinct.
    let mut other = device(a.device_addr, "dev-on-a");
    assert_eq!(notify(b.http_addr, "dev-on-a", &json!({"n": 4})), 200);
    let frame = other.next_non_ping();
    assert_eq!(frame["Notifications"][0]["P"], json!({"n": 4}), "{frame}");
    let id_a = frame["Notifications"][0]["M"].as_str().unwrap().to_owned();
    other.ack();
    assert_eq!(notify(a.http_addr, "dev-on-a", &json!({"n": 5})), 200);
    let frame = other.next_non_ping();
    let id_b = frame["Notifications"][0]["M"].as_str().unwrap().to_owned();
    assert_ne!(id_a, id_b);
}

#[test]
fn a_broadcast_through_any_node_reaches_every_node_with_one_level() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let nodes = [node(&redis, 2), node(&redis, 1), node(&redis, 2)];
    let mut devices: Vec<Device> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| (0..2).map(move |k| (i, k, n.device_addr)))
        .map(|(i, k, addr)| {
            let mut d = Device::connect(addr);
            d.hello(&format!("b-{i}-{k}"), json!({"0": 0}), mako());
            d
        })
        .collect();
    for (round, through) in [2usize, 0, 1].into_iter().enumerate() {
        let body = json!({"channel": "system", "expire_on": FAR, "data": {"daily/mako": [round]}});
        assert_eq!(
            post_json(nodes[through].http_addr, "/broadcast", &body).status,
            200
        );
        for d in &mut devices {
            let frame = d.next_non_ping();
            assert_eq!(frame["T"], "broadcast", "{frame}");
            assert_eq!(frame["TopLevel"], round + 1, "{frame}");
            assert_eq!(
                frame["Payloads"],
                json!([{"daily/mako": [round]}]),
                "{frame}"
            );
            d.ack();
        }
    }
    // A device that connects later catches up at the service's level, on any node.
    let mut late = Device::connect(nodes[1].device_addr);
    late.hello("late", json!({"0": 1}), mako());
    let frame = late.next_non_ping();
    assert_eq!(frame["T"], "broadcast", "{frame}");
    assert_eq!(frame["TopLevel"], 3, "{frame}");
    assert_eq!(
        frame["Payloads"],
        json!([{"daily/mako": [1]}, {"daily/mako": [2]}]),
        "{frame}"
    );
}

#[test]
fn a_device_that_moves_gets_its_pending_there_and_its_older_connection_closes() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = node(&redis, 2);
    let b = node(&redis, 2);
    let mut on_a = device(a.device_addr, "mover");
    assert_eq!(notify(a.http_addr, "mover", &json!({"n": 1})), 200);
    assert_eq!(next_notifications(&mut on_a), [json!({"n": 1})]);
    // Not acknowledged: still pending when the device turns up on B.
    let mut on_b = device(b.device_addr, "mover");
    assert_eq!(next_notifications(&mut on_b), [json!({"n": 1})]);
    // The connection on A is closed by the takeover.
    let deadline = Instant::now() + PATIENCE;
    loop {
        match on_a.recv_within(Duration::from_millis(200)) {
            Err(RecvError::Eof) | Err(RecvError::Io(_)) => break,
            Err(RecvError::Timeout) | Ok(_) => {
                assert!(Instant::now() < deadline, "A's session still open");
            }
        }
    }
    on_b.ack();
    // Routed to B from now on, whichever node takes the notify.
    assert_eq!(notify(a.http_addr, "mover", &json!({"n": 2})), 200);
    assert_eq!(next_notifications(&mut on_b), [json!({"n": 2})]);
    on_b.ack();
    on_b.assert_quiet(
        Duration::from_millis(500),
        "acknowledged notifications again",
    );
}

/// A device's view of one connection: what it got, in order, and whether the server sent
/// anything after each ACK (then the ACK's drop was confirmed).
#[derive(Default)]
struct Seen {
    /// (message id, payload, connection number) per notification received.
    got: Vec<(String, Value, usize)>,
    /// Message id → how many notifications had been received when the server confirmed
    /// its ACK (by sending a later frame on the connection that acknowledged it).
    confirmed: HashMap<String, usize>,
}

#[test]
fn a_node_killed_mid_run_loses_nothing_answered_200_and_repeats_nothing_acknowledged() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut nodes: Vec<Option<ServerProcess>> = vec![
        Some(node(&redis, 2)),
        Some(node(&redis, 2)),
        Some(node(&redis, 1)),
    ];
    let device_addrs: Vec<SocketAddr> = nodes
        .iter()
        .map(|n| n.as_ref().unwrap().device_addr)
        .collect();
    let apis: Vec<SocketAddr> = nodes
        .iter()
        .map(|n| n.as_ref().unwrap().http_addr)
        .collect();
    let killed = Arc::new(Mutex::new(HashSet::<usize>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    const DEVICES: usize = 12;
    let seen: Vec<Arc<Mutex<Seen>>> = (0..DEVICES).map(|_| Arc::default()).collect();
    let threads: Vec<_> = (0..DEVICES)
        .map(|i| {
            let seen = Arc::clone(&seen[i]);
            let killed = Arc::clone(&killed);
            let stop = Arc::clone(&stop);
            let addrs = device_addrs.clone();
            std::thread::spawn(move || {
                let id = format!("k-{i}");
                let mut conn = 0usize;
                let mut at = i % addrs.len();
                'reconnect: while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    while killed.lock().unwrap().contains(&at) {
                        at = (at + 1) % addrs.len();
                    }
                    conn += 1;
                    let Ok(stream) = std::net::TcpStream::connect(addrs[at]) else {
                        at += 1;
                        at %= addrs.len();
                        continue;
                    };
                    drop(stream);
                    // The node may be killed between the probe and this connection.
                    let connected = std::panic::catch_unwind(|| Device::connect(addrs[at]));
                    let Ok(mut d) = connected else {
                        continue;
                    };
                    d.send_raw(&[0]);
                    d.send(&json!({"T": "connect", "DeviceId": id, "ClientVer": "t", "Levels": {}, "Info": {}}));
                    // The ids acknowledged on this connection and not yet confirmed.
                    let mut unconfirmed: Vec<String> = Vec::new();
                    loop {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            break 'reconnect;
                        }
                        let msg = match d.recv_within(Duration::from_millis(300)) {
                            Ok(m) => m,
                            Err(RecvError::Timeout) => continue,
                            Err(_) => continue 'reconnect,
                        };
                        {
                            let mut s = seen.lock().unwrap();
                            let at = s.got.len();
                            for id in unconfirmed.drain(..) {
                                s.confirmed.entry(id).or_insert(at);
                            }
                        }
                        match msg["T"].as_str() {
                            Some("ping") if d.try_send(&json!({"T": "pong"})).is_err() => {
                                continue 'reconnect;
                            }
                            Some("notifications") => {
                                let mut s = seen.lock().unwrap();
                                for n in msg["Notifications"].as_array().unwrap() {
                                    let mid = n["M"].as_str().unwrap().to_owned();
                                    s.got.push((mid.clone(), n["P"].clone(), conn));
                                    unconfirmed.push(mid);
                                }
                                drop(s);
                                if d.try_send(&json!({"T": "ack"})).is_err() {
                                    continue 'reconnect;
                                }
                            }
                            _ => {}
                        }
                    }
                }
            })
        })
        .collect();

    // Notifies through the live nodes in turn; the third node is killed a third of the
    // way through.
    let mut accepted: HashMap<usize, Vec<u64>> = HashMap::new();
    const NOTIFIES: u64 = 240;
    for k in 0..NOTIFIES {
        if k == NOTIFIES / 3 {
            killed.lock().unwrap().insert(2);
            nodes[2].take().unwrap().kill();
        }
        let dev = usize::try_from(k).unwrap() % DEVICES;
        let live: Vec<usize> = (0..apis.len())
            .filter(|i| !killed.lock().unwrap().contains(i))
            .collect();
        let api = apis[live[usize::try_from(k).unwrap() % live.len()]];
        let answer = post_json(
            api,
            "/notify",
            &notify_body(&format!("k-{dev}"), &json!({"k": k})),
        );
        if answer.status == 200 {
            accepted.entry(dev).or_default().push(k);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let total: usize = accepted.values().map(Vec::len).sum();
    assert!(
        total > usize::try_from(NOTIFIES).unwrap() / 2,
        "only {total} notifies answered 200"
    );

    // Every one answered 200 arrives.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let missing: usize = (0..DEVICES)
            .map(|dev| {
                let s = seen[dev].lock().unwrap();
                let got: HashSet<u64> = s
                    .got
                    .iter()
                    .filter_map(|(_, p, _)| p["k"].as_u64())
                    .collect();
                accepted
                    .get(&dev)
                    .map_or(0, |ks| ks.iter().filter(|k| !got.contains(k)).count())
            })
            .sum();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} notifications answered 200 never arrived"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let every ACK be confirmed or not, then stop the devices.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    // Nothing came again after its ACK was confirmed.
    for (dev, s) in seen.iter().enumerate() {
        let s = s.lock().unwrap();
        for (i, (mid, _, _)) in s.got.iter().enumerate() {
            if let Some(&at) = s.confirmed.get(mid) {
                assert!(
                    i < at,
                    "device {dev}: {mid} came again after its ACK was confirmed"
                );
            }
        }
    }
}

#[test]
fn redis_restarted_mid_run_means_503_meanwhile_and_recovery_after() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let a = node(&redis, 2);
    let b = node(&redis, 1);
    let mut dev = device(b.device_addr, "survivor");
    assert_eq!(notify(a.http_addr, "survivor", &json!({"n": 1})), 200);
    assert_eq!(next_notifications(&mut dev), [json!({"n": 1})]);
    dev.ack();
    // The next ping says the ACK's drop is in Redis (the session goes on only then).
    let frame = dev.recv_within(Duration::from_secs(5)).unwrap();
    assert_eq!(frame["T"], "ping", "{frame}");
    dev.pong();

    redis.kill();
    // Refused, not lost silently and not hanging: 503 from both nodes.
    for api in [a.http_addr, b.http_addr] {
        assert_eq!(notify(api, "survivor", &json!({"n": 2})), 503);
        let body = json!({"channel": "system", "expire_on": FAR, "data": {}});
        assert_eq!(post_json(api, "/broadcast", &body).status, 503);
    }
    // The session is kept meanwhile: it still gets pings.
    let frame = dev.recv_within(Duration::from_secs(5)).unwrap();
    assert_eq!(frame["T"], "ping", "{frame}");
    dev.pong();

    // Redis back, empty (no persistence here): the nodes reconnect, the device's route
    // is written again, and notifies flow.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = notify(a.http_addr, "survivor", &json!({"n": 3}));
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "the API never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = next_notifications(&mut dev);
    assert_eq!(got, [json!({"n": 3})]);
    dev.ack();
    // And the delivery hosts list both nodes again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = support::http(a.http_addr, "GET", "/delivery-hosts", &[], b"");
        if answer.status == 200 {
            let hosts: Value = serde_json::from_str(&answer.body).unwrap();
            if hosts["hosts"].as_array().map_or(0, Vec::len) == 2 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "delivery hosts never listed both nodes"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn delivery_hosts_lists_every_live_node() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = node(&redis, 1);
    let b = node(&redis, 2);
    let expected: HashSet<String> = [a.device_addr, b.device_addr]
        .iter()
        .map(ToString::to_string)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = support::http(b.http_addr, "GET", "/delivery-hosts", &[], b"");
        assert_eq!(answer.status, 200);
        let hosts: Value = serde_json::from_str(&answer.body).unwrap();
        let listed: HashSet<String> = hosts["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_owned())
            .collect();
        if listed == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "listed {listed:?}, expected {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A node that stops cleanly leaves the list at once.
    assert!(a.terminate().is_some());
    let answer = support::http(b.http_addr, "GET", "/delivery-hosts", &[], b"");
    let hosts: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(hosts["hosts"], json!([b.device_addr.to_string()]));
}

#[test]
fn a_refused_second_connect_leaves_the_device_reachable_where_it_is() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = node(&redis, 2);
    let b = node(&redis, 2);
    let mut dev = device(a.device_addr, "steady");
    assert_eq!(notify(b.http_addr, "steady", &json!({"n": 1})), 200);
    assert_eq!(next_notifications(&mut dev), [json!({"n": 1})]);
    dev.ack();
    // A second connection of the device, on the other node, with an Info the
    // registration refuses: it is closed, and must not take the device's route.
    let mut bad = Device::connect(b.device_addr);
    bad.hello("steady", json!({}), json!({"device": 1}));
    assert!(bad.closed(), "the refused connection stays open");
    assert_eq!(notify(b.http_addr, "steady", &json!({"n": 2})), 200);
    assert_eq!(next_notifications(&mut dev), [json!({"n": 2})]);
}

#[test]
fn message_ids_stay_unique_across_a_restart_with_the_same_node_id() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let fixed = |redis: &RedisServer| {
        ServerProcess::start(&json!({
            "addr": "127.0.0.1:0", "http_addr": "127.0.0.1:0", "shards": 1,
            "redis_url": redis.url(), "node_id": "fixed-node", "ping_interval": "1s",
        }))
    };
    let first = fixed(&redis);
    assert_eq!(notify(first.http_addr, "keeper", &json!({"n": 1})), 200);
    assert!(first.terminate().is_some());
    let second = fixed(&redis);
    assert_eq!(notify(second.http_addr, "keeper", &json!({"n": 2})), 200);
    let mut dev = device(second.device_addr, "keeper");
    let frame = dev.next_non_ping();
    let ids: HashSet<&str> = frame["Notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["M"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{frame}");
    dev.ack();
    // The next ping confirms the ACK: both were dropped, nothing comes back.
    let frame = dev.recv_within(Duration::from_secs(5)).unwrap();
    assert_eq!(frame["T"], "ping", "{frame}");
    drop(dev);
    let mut again = device(second.device_addr, "keeper");
    again.assert_quiet(
        Duration::from_millis(700),
        "acknowledged notifications again",
    );
}

#[test]
fn a_redis_outage_does_not_end_later_sessions_on_their_acks() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let a = node(&redis, 1);
    let mut dev = Device::connect(a.device_addr);
    dev.hello("blip", json!({"0": 0}), mako());
    assert_eq!(notify(a.http_addr, "blip", &json!({"n": 1})), 200);
    assert_eq!(next_notifications(&mut dev), [json!({"n": 1})]);
    // The ACK's drop cannot reach Redis: the session ends, the notification stays.
    redis.kill();
    dev.ack();
    assert!(dev.closed(), "the session outlived a failed drop");
    redis.restart();
    // Back (empty: no persistence here): the device reconnects, and its ACKs, of a
    // unicast and of a broadcast, keep the session going.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut dev = loop {
        let mut d = Device::connect(a.device_addr);
        d.hello("blip", json!({"0": 0}), mako());
        if notify(a.http_addr, "blip", &json!({"n": 2})) == 200 {
            match d.recv_within(Duration::from_secs(5)) {
                Ok(frame) if frame["T"] == "notifications" => {
                    assert_eq!(frame["Notifications"][0]["P"], json!({"n": 2}), "{frame}");
                    break d;
                }
                _ => {}
            }
        }
        assert!(
            Instant::now() < deadline,
            "no delivery after Redis came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    dev.ack();
    let frame = dev.recv_within(Duration::from_secs(5)).unwrap();
    assert_eq!(frame["T"], "ping", "{frame}");
    dev.pong();
    let body = json!({"channel": "system", "expire_on": FAR, "data": {"daily/mako": [1]}});
    let deadline = Instant::now() + Duration::from_secs(30);
    while post_json(a.http_addr, "/broadcast", &body).status != 200 {
        assert!(Instant::now() < deadline, "broadcasts never accepted again");
        std::thread::sleep(Duration::from_millis(100));
    }
    let frame = dev.next_non_ping();
    assert_eq!(frame["T"], "broadcast", "{frame}");
    dev.ack();
    let frame = dev.recv_within(Duration::from_secs(5)).unwrap();
    assert_eq!(frame["T"], "ping", "{frame}");
}
