//! The durable store end to end, against the real binary on loopback: what `/notify` and
//! `/broadcast` answered 200 for survives a SIGKILL, a change of the shard count, a torn
//! log tail and a full disk; an ACK the server confirmed (by writing anything after it)
//! is never undone.
//!
//! Tests assert outcomes, never speed: every wait is bounded by [`PATIENCE`], and the
//! points where a server is killed are picked at random (the seed is printed).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use support::*;

/// An expiry far in the future.
const FAR: &str = "2099-01-01T00:00:00Z";

/// The application id the tests notify for.
const APP: &str = "com.example.app";

/// A configuration on loopback port 0 with `data_dir` and `shards`, and a pending limit
/// no test reaches; `extra` keys are added.
fn config(data_dir: &Path, shards: usize, extra: Value) -> Value {
    let mut c = json!({
        "addr": "127.0.0.1:0",
        "http_addr": "127.0.0.1:0",
        "data_dir": path_json(data_dir),
        "shards": shards,
        "max_notifications_per_app": 1_000_000,
    });
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

/// POSTs `body` on a new connection; `None` when the server cannot be reached or does
/// not answer within [`PATIENCE`] (never a panic: servers get killed under load here).
fn try_post(addr: SocketAddr, path: &str, body: &Value) -> Option<HttpAnswer> {
    let bytes = serde_json::to_vec(body).expect("json");
    let mut s = TcpStream::connect_timeout(&addr, PATIENCE).ok()?;
    s.set_read_timeout(Some(PATIENCE)).ok()?;
    s.set_write_timeout(Some(PATIENCE)).ok()?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        bytes.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(&bytes).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    HttpAnswer::parse(&raw)
}

/// The body of a notify of `data` for device `device` (its own channel).
fn notify_body(device: &str, data: &Value) -> Value {
    json!({"appid": APP, "userid": device, "deviceid": device, "expire_on": FAR, "data": data})
}

/// Notifies `device` with `data`; asserts the answer is 200.
fn notify(addr: SocketAddr, device: &str, data: &Value) {
    let resp = post_json(addr, "/notify", &notify_body(device, data));
    assert_eq!(
        (resp.status, resp.json()),
        (200, json!({"ok": true})),
        "notify {device} {data}"
    );
}

/// A device that said hello with no levels and no info.
fn connect(addr: SocketAddr, device: &str) -> Device {
    let mut dev = Device::connect(addr);
    dev.hello(device, json!({}), json!({}));
    dev
}

/// The payloads of a NOTIFICATIONS message, asserting each is for [`APP`].
fn payloads(msg: &Value) -> Vec<Value> {
    msg["Notifications"]
        .as_array()
        .unwrap_or_else(|| panic!("a Notifications array in {msg}"))
        .iter()
        .map(|n| {
            assert_eq!(n["A"], APP, "{n}");
            n["P"].clone()
        })
        .collect()
}

/// Connects `device`, takes the one NOTIFICATIONS it gets, and returns its payloads.
/// With `ack`, ACKs it and waits for a marker notified after that (its arrival confirms
/// the ACK's drop is durable), which is left pending; without, closes the connection
/// with the NOTIFICATIONS unacknowledged (it stays pending).
fn take_pending(addr: SocketAddr, http: SocketAddr, device: &str, ack: bool) -> Vec<Value> {
    let mut dev = connect(addr, device);
    let msg = dev.next_non_ping();
    assert_eq!(msg["T"], "notifications", "{device}: {msg}");
    let got = payloads(&msg);
    if ack {
        dev.ack();
        let marker = json!({"marker": device});
        notify(http, device, &marker);
        let msg = dev.next_non_ping();
        assert_eq!(payloads(&msg), vec![marker], "{device}: only the marker");
    }
    dev.close();
    got
}

/// The recovery line of a server's log (`data in DIR: N records replayed ...`).
fn recovery_line(server: &mut ServerProcess) -> String {
    server
        .wait_log(|l| l.contains(" INFO data in ") && l.contains("records replayed"))
        .expect("a recovery line")
}

/// A small deterministic generator (xorshift64*), seeded from the clock or from
/// `PUSHBROKER_TEST_SEED`; a failing test names its seed so that the run can be replayed.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("PUSHBROKER_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            })
            | 1;
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

// ---------------------------------------------------------------------------------------
// SIGKILL under load
// ---------------------------------------------------------------------------------------

/// One NOTIFICATIONS frame a device got.
#[derive(Debug)]
struct Frame {
    /// Which start of the server it came from.
    run: usize,
    /// The `n` of each payload.
    ns: Vec<u64>,
    /// Whether the device sent its ACK and then got another frame on the same connection:
    /// the server makes the ACK's drop durable before it writes anything more, so
    /// nothing in this frame may come again.
    confirmed: bool,
}

/// Serves a device on one connection until it is gone: ACKs every NOTIFICATIONS (noting
/// its payloads' `n` in `frames`), answers PINGs. With `until_marker`, returns instead
/// once a marker came and a PING after its ACK confirmed the ACK.
fn serve(
    dev: &mut Device,
    run: usize,
    frames: &mut Vec<Frame>,
    until_marker: bool,
) -> Result<(), RecvError> {
    let mut acked: Option<usize> = None;
    let mut marker_seen = false;
    loop {
        let msg = dev.recv()?;
        // Anything on the connection after an ACK confirms it.
        let confirmed = acked.take().is_some_and(|i| {
            frames[i].confirmed = true;
            true
        });
        match msg["T"].as_str() {
            Some("ping") => {
                if dev.try_send(&json!({"T": "pong"})).is_err() {
                    return Err(RecvError::Eof);
                }
                if until_marker && marker_seen && confirmed {
                    return Ok(());
                }
            }
            Some("notifications") => {
                let mut ns = Vec::new();
                for p in payloads(&msg) {
                    if p.get("marker").is_some() {
                        marker_seen = true;
                    } else {
                        ns.push(p["n"].as_u64().unwrap_or_else(|| panic!("a payload {p}")));
                    }
                }
                frames.push(Frame {
                    run,
                    ns,
                    confirmed: false,
                });
                if dev.try_send(&json!({"T": "ack"})).is_err() {
                    return Err(RecvError::Eof);
                }
                acked = Some(frames.len() - 1);
            }
            _ => panic!("unexpected {msg}"),
        }
    }
}

/// What a run under load left: the notifies answered 200 (`n` → device index) and every
/// frame each device got.
#[derive(Default)]
struct Ledger {
    /// Every `n` posted, to the index of the device it was for.
    posted: BTreeMap<u64, usize>,
    /// The `n` answered 200.
    accepted: BTreeSet<u64>,
    /// Per device, its frames in the order it got them.
    frames: Vec<Vec<Frame>>,
}

/// Devices 0..ONLINE are connected during the runs under load, the rest only at the end.
const ONLINE: usize = 20;
const OFFLINE: usize = 10;
/// Online devices 0..HOT get half of all notifies: they always have one pending when
/// their ACK is read, so the next NOTIFICATIONS follows the ACK at once and a kill
/// often falls between an ACK and the sync of its drop.
const HOT: usize = 3;
const POSTERS: usize = 6;

/// The device notify `n` is for: a quarter offline, half hot, a quarter online.
fn target(n: u64) -> usize {
    let spread = (n / 4) as usize;
    match n % 4 {
        0 => ONLINE + spread % OFFLINE,
        1 | 2 => spread % HOT,
        _ => spread % ONLINE,
    }
}

fn load_device_id(i: usize) -> String {
    format!("load-{i}")
}

/// Starts the server on `data_dir`, connects the online devices, posts notifies from
/// [`POSTERS`] threads and SIGKILLs the server after `kill_after`; adds what happened
/// to `ledger`.
fn run_under_load(data_dir: &Path, run: usize, kill_after: Duration, ledger: &mut Ledger) {
    let mut server = ServerProcess::start(&config(data_dir, 2, json!({})));
    recovery_line(&mut server);
    let (http, devices) = (server.http_addr, server.device_addr);
    let ready = Arc::new(Barrier::new(ONLINE + 1));
    let device_threads: Vec<_> = (0..ONLINE)
        .map(|i| {
            let ready = Arc::clone(&ready);
            thread::spawn(move || {
                let mut dev = connect(devices, &load_device_id(i));
                ready.wait();
                let mut frames = Vec::new();
                // Ends when the server is killed (or, never expected, stays silent).
                let _ = serve(&mut dev, run, &mut frames, false);
                frames
            })
        })
        .collect();
    ready.wait();
    let stop = Arc::new(AtomicBool::new(false));
    let base = ledger.posted.keys().next_back().map_or(0, |n| n + 1);
    let posters: Vec<_> = (0..POSTERS)
        .map(|t| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut posted = Vec::new();
                let mut k = 0;
                // Bounded, in case the kill never comes.
                while !stop.load(Ordering::Relaxed) && k < 100_000 {
                    let n = base + (k * POSTERS + t) as u64;
                    k += 1;
                    let device = target(n);
                    let body = notify_body(&load_device_id(device), &json!({"n": n}));
                    match try_post(http, "/notify", &body) {
                        Some(resp) => {
                            posted.push((n, device, resp.status == 200));
                        }
                        None => {
                            posted.push((n, device, false));
                            break;
                        }
                    }
                }
                posted
            })
        })
        .collect();
    thread::sleep(kill_after);
    server.kill();
    stop.store(true, Ordering::Relaxed);
    for p in posters {
        for (n, device, ok) in p.join().expect("a poster") {
            ledger.posted.insert(n, device);
            if ok {
                ledger.accepted.insert(n);
            }
        }
    }
    for (i, d) in device_threads.into_iter().enumerate() {
        ledger.frames[i].extend(d.join().expect("a device"));
    }
}

/// Checks the frames of `ledger` against what was posted: each device got only its own
/// notifications, and nothing came again after its ACK was confirmed.
fn assert_no_repeat_after_confirmed_ack(ledger: &Ledger, story: &str) {
    for (i, frames) in ledger.frames.iter().enumerate() {
        let mut confirmed = BTreeSet::new();
        for f in frames {
            for n in &f.ns {
                assert_eq!(
                    ledger.posted.get(n),
                    Some(&i),
                    "device {i} got n={n}, not posted for it; {story}"
                );
                assert!(
                    !confirmed.contains(n),
                    "device {i} got n={n} again in run {} after its ACK was confirmed; {story}",
                    f.run
                );
            }
            if f.confirmed {
                confirmed.extend(f.ns.iter().copied());
            }
        }
    }
}

#[test]
fn sigkill_under_load_loses_no_accepted_notify_and_undoes_no_confirmed_ack() {
    let data_dir = temp_dir("durable-kill");
    let mut rng = Rng::new();
    // Named by every assertion: how to replay this run and what it went through.
    let mut story = format!("PUSHBROKER_TEST_SEED={}", rng.0);
    let mut ledger = Ledger {
        frames: (0..ONLINE + OFFLINE).map(|_| Vec::new()).collect(),
        ..Ledger::default()
    };
    const KILLS: usize = 5;
    for run in 0..KILLS {
        let kill_after = Duration::from_millis(100 + rng.below(500));
        run_under_load(&data_dir, run, kill_after, &mut ledger);
        story.push_str(&format!(
            "; run {run} killed after {kill_after:?} ({} posted, {} accepted so far)",
            ledger.posted.len(),
            ledger.accepted.len()
        ));
    }
    assert!(
        ledger
            .frames
            .iter()
            .flatten()
            .any(|f| f.confirmed && !f.ns.is_empty()),
        "no ACK was confirmed before the kills: {story}"
    );
    assert!(
        !ledger.accepted.is_empty(),
        "no notify was accepted before the kills: {story}"
    );

    // Every device connects and takes everything, up to a marker notified after it
    // connected, whose ACK a PING confirms.
    let mut server = ServerProcess::start(&config(&data_dir, 2, json!({"ping_interval": "300ms"})));
    recovery_line(&mut server);
    let (http, devices) = (server.http_addr, server.device_addr);
    let drains: Vec<_> = (0..ONLINE + OFFLINE)
        .map(|i| {
            thread::spawn(move || {
                let id = load_device_id(i);
                let mut dev = connect(devices, &id);
                notify(http, &id, &json!({"marker": i}));
                let mut frames = Vec::new();
                serve(&mut dev, KILLS, &mut frames, true)
                    .unwrap_or_else(|e| panic!("{id} drains: {e:?}"));
                dev.close();
                frames
            })
        })
        .collect();
    for (i, d) in drains.into_iter().enumerate() {
        ledger.frames[i].extend(d.join().expect("a draining device"));
    }

    let delivered: BTreeSet<u64> = ledger
        .frames
        .iter()
        .flatten()
        .flat_map(|f| f.ns.iter().copied())
        .collect();
    let lost: Vec<u64> = ledger.accepted.difference(&delivered).copied().collect();
    assert!(
        lost.is_empty(),
        "{} notifies answered 200 were never delivered: {lost:?}; {story}",
        lost.len()
    );
    assert_no_repeat_after_confirmed_ack(&ledger, &story);

    // Everything was acknowledged: after a clean stop nothing is pending.
    assert!(
        server.terminate().is_some_and(|s| s.success()),
        "a clean stop"
    );
    let mut server = ServerProcess::start(&config(&data_dir, 2, json!({"ping_interval": "300ms"})));
    let line = recovery_line(&mut server);
    assert!(line.contains(" 0 notifications pending"), "{line}");
    let devices = server.device_addr;
    let quiet: Vec<_> = (0..ONLINE + OFFLINE)
        .map(|i| {
            thread::spawn(move || {
                let id = load_device_id(i);
                let mut dev = connect(devices, &id);
                dev.assert_quiet(Duration::from_secs(1), &id);
            })
        })
        .collect();
    for q in quiet {
        q.join().expect("nothing pending");
    }
}

// ---------------------------------------------------------------------------------------
// Broadcast levels
// ---------------------------------------------------------------------------------------

/// The Info of the devices the system channel's payloads are tagged for.
fn mako() -> Value {
    json!({"device": "mako", "channel": "daily"})
}

fn broadcast(addr: SocketAddr, k: i64) {
    let resp = post_json(
        addr,
        "/broadcast",
        &json!({"channel": "system", "expire_on": FAR, "data": {"daily/mako": [k]}}),
    );
    assert_eq!(
        (resp.status, resp.json()),
        (200, json!({"ok": true})),
        "broadcast {k}"
    );
}

/// The next BROADCAST of `dev` (ACKed) as (top level, the `k` of each payload).
fn take_broadcast(dev: &mut Device) -> (i64, Vec<i64>) {
    let msg = dev.next_non_ping();
    assert_eq!(msg["T"], "broadcast", "{msg}");
    assert_eq!(msg["ChanId"], "0", "{msg}");
    dev.ack();
    let top = msg["TopLevel"].as_i64().expect("a TopLevel");
    let ks = msg["Payloads"]
        .as_array()
        .expect("Payloads")
        .iter()
        .map(|p| p["daily/mako"][0].as_i64().expect("a payload k"))
        .collect();
    (top, ks)
}

/// Broadcasters at once: the replicas' logs are then often behind the sequencer's when
/// the server is killed.
const BROADCASTERS: usize = 3;
/// Broadcasts per run at most: all of them fit in one BROADCAST frame.
const BROADCASTS_PER_RUN: usize = 400;

/// Broadcasts `[k]` from [`BROADCASTERS`] threads, each k unique (from `base` on), until
/// the server is killed; returns the k answered 200.
fn broadcast_until_killed(addr: SocketAddr, base: i64) -> Vec<thread::JoinHandle<Vec<i64>>> {
    (0..BROADCASTERS)
        .map(|t| {
            thread::spawn(move || {
                let mut accepted = Vec::new();
                for j in 0..BROADCASTS_PER_RUN / BROADCASTERS {
                    let k = base + (j * BROADCASTERS + t) as i64;
                    let body =
                        json!({"channel": "system", "expire_on": FAR, "data": {"daily/mako": [k]}});
                    match try_post(addr, "/broadcast", &body) {
                        Some(resp) if resp.status == 200 => accepted.push(k),
                        _ => break,
                    }
                }
                accepted
            })
        })
        .collect()
}

/// Connects a device at level 0 of the system channel and returns its BROADCAST.
fn from_level_zero(server: &ServerProcess, id: &str) -> (i64, Vec<i64>) {
    let mut dev = Device::connect(server.device_addr);
    dev.hello(id, json!({"0": 0}), mako());
    let got = take_broadcast(&mut dev);
    dev.close();
    got
}

#[test]
fn broadcast_levels_survive_sigkill_and_keep_counting() {
    let data_dir = temp_dir("durable-broadcast");
    let cfg = config(&data_dir, 2, json!({"broadcast_backlog": 100_000}));
    let mut rng = Rng::new();
    let seed = format!("PUSHBROKER_TEST_SEED={}", rng.0);
    let mut accepted: BTreeSet<i64> = BTreeSet::new();
    let mut next_k = 1;
    for run in 0..=4 {
        let server = ServerProcess::start(&cfg);
        if run > 0 {
            // Several devices, so that (with two shards) every replica is likely used:
            // each gets one payload per level, every accepted one among them.
            for id in ["bc-a", "bc-b", "bc-c"] {
                let (top, ks) = from_level_zero(&server, id);
                assert_eq!(
                    ks.len() as i64,
                    top,
                    "{id} after kill {run}: one payload per level, {ks:?}; {seed}"
                );
                let got: BTreeSet<i64> = ks.iter().copied().collect();
                assert_eq!(got.len(), ks.len(), "{id}: no payload twice; {seed}");
                let lost: Vec<_> = accepted.difference(&got).collect();
                assert!(
                    lost.is_empty(),
                    "{id} after kill {run}: lost {lost:?}; {seed}"
                );
            }
        }
        if run == 4 {
            // The level keeps counting: the next broadcast is one above the top.
            let (top, _) = from_level_zero(&server, "bc-d");
            let mut dev = Device::connect(server.device_addr);
            dev.hello("bc-a", json!({"0": top}), mako());
            broadcast(server.http_addr, next_k);
            assert_eq!(take_broadcast(&mut dev), (top + 1, vec![next_k]), "{seed}");
            break;
        }
        let posters = broadcast_until_killed(server.http_addr, next_k);
        thread::sleep(Duration::from_millis(50 + rng.below(250)));
        server.kill();
        for p in posters {
            accepted.extend(p.join().expect("a broadcaster"));
        }
        next_k += BROADCASTS_PER_RUN as i64;
    }
    assert!(!accepted.is_empty(), "broadcasts were accepted; {seed}");
}

// ---------------------------------------------------------------------------------------
// Re-partitioning
// ---------------------------------------------------------------------------------------

const MANY: usize = 200;

fn rp_device_id(i: usize) -> String {
    format!("rp-{i}")
}

/// Notifies every device 0..MANY with `{"rp": [i, round]}` from a few threads.
fn notify_all(addr: SocketAddr, round: usize) {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            thread::spawn(move || {
                for i in (t..MANY).step_by(4) {
                    notify(addr, &rp_device_id(i), &json!({"rp": [i, round]}));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("notifies");
    }
}

/// Connects every device 0..MANY and asserts it gets exactly its notifications of rounds
/// `0..rounds`, in order; ACKs them when `ack`.
fn assert_every_device_gets(server: &ServerProcess, rounds: usize, ack: bool) {
    let (addr, http) = (server.device_addr, server.http_addr);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            thread::spawn(move || {
                for i in (t..MANY).step_by(4) {
                    let want: Vec<Value> = (0..rounds).map(|r| json!({"rp": [i, r]})).collect();
                    assert_eq!(
                        take_pending(addr, http, &rp_device_id(i), ack),
                        want,
                        "device {i}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("every device gets its own");
    }
}

/// The generation folders of `data_dir`.
fn generations(data_dir: &Path) -> Vec<String> {
    let mut gens: Vec<String> = std::fs::read_dir(data_dir)
        .expect("data dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("gen-"))
        .collect();
    gens.sort();
    gens
}

#[test]
fn pending_notifications_survive_a_change_from_one_to_two_shards_and_back() {
    let data_dir = temp_dir("durable-repartition");
    let server = ServerProcess::start(&config(&data_dir, 1, json!({})));
    notify_all(server.http_addr, 0);
    notify_all(server.http_addr, 1);
    assert!(
        server.terminate().is_some_and(|s| s.success()),
        "clean stop"
    );

    let mut server = ServerProcess::start(&config(&data_dir, 2, json!({})));
    let line = recovery_line(&mut server);
    assert!(line.contains("re-partitioned from 1 to 2 shards"), "{line}");
    assert!(
        line.contains(&format!(" {} notifications pending", 2 * MANY)),
        "{line}"
    );
    assert_eq!(generations(&data_dir), ["gen-1"]);
    // One more round, appended to the new generation's logs.
    notify_all(server.http_addr, 2);
    // Seen, not acknowledged: still pending.
    assert_every_device_gets(&server, 3, false);
    assert!(
        server.terminate().is_some_and(|s| s.success()),
        "clean stop"
    );

    let mut server = ServerProcess::start(&config(&data_dir, 1, json!({})));
    let line = recovery_line(&mut server);
    assert!(line.contains("re-partitioned from 2 to 1 shards"), "{line}");
    assert!(
        line.contains(&format!(" {} notifications pending", 3 * MANY)),
        "{line}"
    );
    assert_eq!(generations(&data_dir), ["gen-2"]);
    assert_every_device_gets(&server, 3, true);
    assert!(
        server.terminate().is_some_and(|s| s.success()),
        "clean stop"
    );

    // Acknowledged on one shard: gone for good (only the markers, left unacknowledged,
    // are pending).
    let mut server = ServerProcess::start(&config(&data_dir, 1, json!({})));
    let line = recovery_line(&mut server);
    assert!(
        line.contains(&format!(" {MANY} notifications pending")),
        "{line}"
    );
}

// ---------------------------------------------------------------------------------------
// Torn tails
// ---------------------------------------------------------------------------------------

const TORN_DEVICES: usize = 10;
const TORN_PER_DEVICE: usize = 3;

fn torn_device_id(i: usize) -> String {
    format!("torn-{i}")
}

/// Starts a two-shard server on `data_dir`, notifies every torn test device
/// [`TORN_PER_DEVICE`] times with `{"t": k}` (k unique) and SIGKILLs it; returns the
/// payloads per device, in the order they were accepted.
fn write_and_kill(data_dir: &Path) -> Vec<Vec<Value>> {
    let server = ServerProcess::start(&config(data_dir, 2, json!({})));
    let mut sent = vec![Vec::new(); TORN_DEVICES];
    for k in 0..TORN_DEVICES * TORN_PER_DEVICE {
        let i = k % TORN_DEVICES;
        let data = json!({"t": k});
        notify(server.http_addr, &torn_device_id(i), &data);
        sent[i].push(data);
    }
    server.kill();
    sent
}

/// The shard logs of generation 0.
fn shard_logs(data_dir: &Path) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(data_dir.join("gen-0"))
        .expect("gen-0")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    assert_eq!(logs.len(), 2, "two shard logs: {logs:?}");
    logs
}

/// Connects every torn test device and asserts it gets exactly `want[i]`, which it ACKs.
fn assert_torn_devices_get(server: &ServerProcess, want: &[Vec<Value>]) {
    for (i, want) in want.iter().enumerate() {
        let id = torn_device_id(i);
        if want.is_empty() {
            let mut dev = connect(server.device_addr, &id);
            let marker = json!({"marker": i});
            notify(server.http_addr, &id, &marker);
            assert_eq!(
                payloads(&dev.next_non_ping()),
                vec![marker],
                "{id}: nothing else"
            );
            dev.ack();
            continue;
        }
        assert_eq!(
            &take_pending(server.device_addr, server.http_addr, &id, true),
            want,
            "{id}"
        );
    }
}

/// Waits for the torn-tail warning and the recovery line saying a tail was dropped.
fn assert_torn_tail_reported(server: &mut ServerProcess) {
    let warn = server
        .wait_log(|l| l.contains(" WARN ") && l.contains("the log is cut there"))
        .expect("a WARN about the torn tail");
    assert!(warn.contains("shard-"), "{warn}");
    let line = recovery_line(server);
    assert!(line.contains("a torn tail dropped"), "{line}");
}

#[test]
fn garbage_after_the_last_record_is_cut_off_and_every_accepted_notify_survives() {
    let data_dir = temp_dir("durable-garbage");
    let mut want = write_and_kill(&data_dir);
    for log in shard_logs(&data_dir) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("open the log");
        // A plausible header (a short length) whose checksum does not match, then junk.
        let mut garbage = vec![0x20, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef];
        garbage.extend_from_slice(b"not a record, what a crash left behind");
        f.write_all(&garbage).expect("append garbage");
    }

    let mut server = ServerProcess::start(&config(&data_dir, 2, json!({})));
    assert_torn_tail_reported(&mut server);
    // Appends after the cut must land where the valid log ends: after another kill they
    // are read back, and no torn tail is found.
    for (i, want) in want.iter_mut().enumerate() {
        let data = json!({"after": i});
        notify(server.http_addr, &torn_device_id(i), &data);
        want.push(data);
    }
    server.kill();

    let mut server = ServerProcess::start(&config(&data_dir, 2, json!({})));
    let line = recovery_line(&mut server);
    assert!(!line.contains("torn"), "{line}");
    assert!(
        !server.log.iter().any(|l| l.contains(" WARN ")),
        "no warning: {:?}",
        server.log
    );
    assert_torn_devices_get(&server, &want);
}

#[test]
fn a_last_record_cut_in_half_is_dropped_and_every_record_before_it_survives() {
    let data_dir = temp_dir("durable-cut");
    let mut want = write_and_kill(&data_dir);
    for log in shard_logs(&data_dir) {
        let bytes = std::fs::read(&log).expect("read the log");
        // Walk the frames (`len: u32 LE`, `crc: u32 LE`, body) to the last one.
        let mut at = 0;
        let mut last = None;
        while at < bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
            last = Some((at, 8 + len));
            at += 8 + len;
        }
        assert_eq!(
            at,
            bytes.len(),
            "{} ends with a whole record",
            log.display()
        );
        let (start, size) = last.expect("a record");
        // The cut record is the notification whose payload it holds: it is lost.
        let record = &bytes[start..start + size];
        let mut found = false;
        for sent in &mut want {
            sent.retain(|data| {
                let text = serde_json::to_vec(data).expect("json");
                let inside = record.windows(text.len()).any(|w| w == text.as_slice());
                found |= inside;
                !inside
            });
        }
        assert!(found, "the last record of {} is a notify", log.display());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .and_then(|f| f.set_len((start + size / 2) as u64))
            .expect("cut the last record");
    }

    let mut server = ServerProcess::start(&config(&data_dir, 2, json!({})));
    assert_torn_tail_reported(&mut server);
    assert_torn_devices_get(&server, &want);
}

// ---------------------------------------------------------------------------------------
// Full disk
// ---------------------------------------------------------------------------------------

/// The devices the full-disk tests notify.
const FULL_DEVICES: usize = 4;

fn full_device_id(i: usize) -> String {
    format!("full-{i}")
}

/// A notify of the full-disk tests for device `k % FULL_DEVICES`, padded so that a few
/// dozen fill the limit; its answer (`None`: no answer within [`PATIENCE`]).
fn full_notify(addr: SocketAddr, k: usize) -> (usize, Value, Option<HttpAnswer>) {
    let i = k % FULL_DEVICES;
    let data = json!({"full": k, "padding": "x".repeat(64)});
    let resp = try_post(addr, "/notify", &notify_body(&full_device_id(i), &data));
    (i, data, resp)
}

/// Starts a one-shard server on `cfg` whose files may not grow past 8 KiB, notifies
/// until a notify is refused with 503 (adding the accepted ones to `accepted`), and
/// checks that the server stays up and goes on refusing at once rather than hanging.
/// Returns the server and the `k` of the first refused notify.
fn fill_the_disk(cfg: &Value, accepted: &mut [Vec<Value>]) -> (ServerProcess, usize) {
    // 16 blocks of 512 bytes (POSIX `ulimit -f`): a few dozen notifies.
    let mut server = ServerProcess::start_with_file_size_limit(cfg, 16);
    let mut refused_at = None;
    for k in 0..10_000 {
        let (i, data, resp) = full_notify(server.http_addr, k);
        let resp = resp.unwrap_or_else(|| panic!("notify {k} is answered"));
        match resp.status {
            200 => accepted[i].push(data),
            503 => {
                refused_at = Some(k);
                break;
            }
            s => panic!("notify {k}: {s} {}", resp.body),
        }
    }
    let refused_at = refused_at.expect("a notify is refused with 503 once the file is full");
    assert!(refused_at > 0, "the first notify fits");
    server
        .wait_log(|l| l.contains(" WARN ") && l.contains("cannot write"))
        .expect("a WARN about the failed write");
    // Still there, and still answering (refusing) at once rather than hanging.
    for k in 0..5 {
        let resp = try_post(
            server.http_addr,
            "/notify",
            &notify_body(&full_device_id(0), &json!({"refused": k})),
        )
        .expect("a notify on a full disk is answered");
        assert_eq!(resp.status, 503, "{}", resp.body);
        thread::sleep(Duration::from_millis(50));
    }
    assert!(server.running(), "the server survives a full disk");
    (server, refused_at)
}

/// Connects every full-disk test device on `server` and asserts it gets exactly its
/// `accepted` notifications, in order. Refused ones may be there too: the first one,
/// `refused_at`, was refused because its write failed, and that write may land later.
fn assert_full_devices_get(server: &ServerProcess, accepted: &[Vec<Value>], refused_at: usize) {
    for (i, want) in accepted.iter().enumerate() {
        if want.is_empty() {
            continue;
        }
        let id = full_device_id(i);
        let got: Vec<Value> = take_pending(server.device_addr, server.http_addr, &id, true)
            .into_iter()
            .filter(|p| p.get("refused").is_none() && p["full"] != json!(refused_at))
            .collect();
        assert_eq!(&got, want, "{id}");
    }
}

#[test]
fn a_full_disk_answers_503_without_hanging_and_loses_nothing_accepted() {
    let data_dir = temp_dir("durable-full");
    let cfg = config(&data_dir, 1, json!({}));
    let mut accepted = vec![Vec::new(); FULL_DEVICES];
    let (server, refused_at) = fill_the_disk(&cfg, &mut accepted);
    server.kill();

    let server = ServerProcess::start(&cfg);
    assert_full_devices_get(&server, &accepted, refused_at);
}

#[test]
fn after_a_full_disk_the_log_is_written_again_once_there_is_room() {
    let data_dir = temp_dir("durable-room");
    let cfg = config(&data_dir, 1, json!({}));
    let mut accepted = vec![Vec::new(); FULL_DEVICES];
    let (mut server, refused_at) = fill_the_disk(&cfg, &mut accepted);
    // Room again: the failed write is retried from where it started, and succeeds.
    let raised = std::process::Command::new("prlimit")
        .args(["--pid", &server.pid().to_string(), "--fsize=unlimited"])
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(raised.success(), "prlimit raised the file-size limit");
    server
        .wait_log(|l| l.contains(" INFO ") && l.contains("is written again"))
        .expect("an INFO that the log is written again");
    for k in refused_at + 1..refused_at + 1 + 2 * FULL_DEVICES {
        let (i, data, resp) = full_notify(server.http_addr, k);
        let resp = resp.unwrap_or_else(|| panic!("notify {k} is answered"));
        assert_eq!(
            resp.status, 200,
            "notify {k} once there is room: {}",
            resp.body
        );
        accepted[i].push(data);
    }
    server.kill();

    // The retry overwrote what the failed write had left: the log has no torn tail.
    let mut server = ServerProcess::start(&cfg);
    let line = recovery_line(&mut server);
    assert!(!line.contains("torn"), "{line}");
    assert_full_devices_get(&server, &accepted, refused_at);
}

// ---------------------------------------------------------------------------------------
// Replace tags and clear_pending
// ---------------------------------------------------------------------------------------

#[test]
fn replace_tags_and_clear_pending_survive_sigkill() {
    let data_dir = temp_dir("durable-scrub");
    let cfg = config(&data_dir, 2, json!({}));
    let server = ServerProcess::start(&cfg);
    let http = server.http_addr;
    let post = |device: &str, data: Value, extra: Value| {
        let mut body = notify_body(device, &data);
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        let resp = post_json(http, "/notify", &body);
        assert_eq!(resp.status, 200, "{device} {data}: {}", resp.body);
    };
    // Tagged: only the newest of the tag is left, untagged ones stay.
    post("scrub-a", json!("first"), json!({"replace_tag": "weather"}));
    post("scrub-a", json!("untagged"), json!({}));
    post(
        "scrub-a",
        json!("second"),
        json!({"replace_tag": "weather"}),
    );
    // Cleared: only what came after the clear is left.
    post("scrub-b", json!("old"), json!({}));
    post("scrub-b", json!("new"), json!({"clear_pending": true}));
    server.kill();

    let server = ServerProcess::start(&cfg);
    assert_eq!(
        take_pending(server.device_addr, server.http_addr, "scrub-a", true),
        [json!("untagged"), json!("second")]
    );
    assert_eq!(
        take_pending(server.device_addr, server.http_addr, "scrub-b", true),
        [json!("new")]
    );
}
