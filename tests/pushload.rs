//! `pushload`, the load generator, end to end: the counts in its `--json` result and its
//! exit code.
//!
//! Most tests let pushload start the real `pushbroker` binary (`--server`) and run each
//! scenario with a few tens of sessions, over plain TCP and TLS, in one process and in
//! two worker processes; every notification must arrive exactly once. The last tests run
//! pushload against a tiny stand-in server written here that gets one `/notify` wrong:
//! drops it, delivers it twice, delivers it to another device, or never answers it.
//! pushload must report each as missing, duplicate, wrong or a problem, and exit with 1.
//!
//! Runs are small, every pushload phase has a deadline (`--timeout-secs`) and every run
//! is killed after [`RUN_LIMIT`]. Tests assert counts, never speed.
#![cfg(feature = "pushload")] // the binary exists only with this (default) feature

mod support;
use support::*;

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Bound;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// The binary under test.
const PUSHLOAD: &str = env!("CARGO_BIN_EXE_pushload");

/// The server it drives.
const PUSHBROKER: &str = env!("CARGO_BIN_EXE_pushbroker");

/// The deadline of each pushload phase against pushbroker (`--timeout-secs`).
const PHASE_DEADLINE_S: u32 = 60;

/// How long one pushload run may take in all before it is killed: far more than its
/// phases' deadlines need on a busy machine.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// What a pushload run gave.
struct Run {
    /// The exit code; `None` when it was killed.
    code: Option<i32>,
    /// The object it wrote with `--json` (`Null` when there was none).
    result: Value,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The count `key` of the result.
    fn count(&self, key: &str) -> u64 {
        self.result[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} is not a count\n{self}"))
    }

    /// Asserts the run completed and is ok: exit code 0, `ok`, nothing missing,
    /// duplicated, wrong or failed.
    fn assert_ok(&self) {
        assert_eq!(self.code, Some(0), "exit code\n{self}");
        assert_eq!(self.result["ok"], true, "ok\n{self}");
        for key in ["missing", "duplicates", "wrong", "errors"] {
            assert_eq!(self.count(key), 0, "{key}\n{self}");
        }
    }

    /// Asserts the measured phase ended because its work was done, not at its deadline
    /// ([`PHASE_DEADLINE_S`]): the runs here need far less (churn paces its notifies over
    /// 10 s), and figures per second are wrong when pushload waits out the deadline.
    fn assert_done_before_deadline(&self) {
        let phase = self.result["phase_s"]
            .as_f64()
            .unwrap_or_else(|| panic!("phase_s is not a number\n{self}"));
        assert!(
            phase < 0.9 * PHASE_DEADLINE_S as f64,
            "the phase ran to its deadline: pushload did not notice it was done\n{self}"
        );
    }

    /// Asserts `key` holds the percentiles p50 ≤ p90 ≤ p99 ≤ max, all numbers ≥ 0.
    fn assert_percentiles(&self, key: &str) {
        let values: Vec<f64> = ["p50", "p90", "p99", "max"]
            .iter()
            .map(|p| {
                self.result[key][p]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{key}.{p} is not a number\n{self}"))
            })
            .collect();
        assert!(values[0] >= 0.0, "{key}\n{self}");
        assert!(values.windows(2).all(|w| w[0] <= w[1]), "{key}\n{self}");
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let result = serde_json::to_string_pretty(&self.result).unwrap_or_default();
        writeln!(f, "pushload exit code: {:?}", self.code)?;
        writeln!(f, "result: {result}")?;
        writeln!(f, "stdout:\n{}", tail(&self.stdout))?;
        write!(f, "stderr:\n{}", tail(&self.stderr))
    }
}

/// The last lines of `text`.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Reads all of `pipe` on a thread; the text comes on the returned channel.
fn drain(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
    });
    rx
}

/// Runs pushload with `args` and `--json FILE`, waits for it (killing it after
/// [`RUN_LIMIT`]) and reads the result.
fn pushload(args: &[&str]) -> Run {
    pushload_with(args, &[])
}

/// [`pushload`] with environment variables `env` set.
fn pushload_with(args: &[&str], env: &[(&str, &str)]) -> Run {
    let json_path = temp_dir("pushload").join("result.json");
    let mut child = Command::new(PUSHLOAD)
        .args(args)
        .envs(env.iter().copied())
        .arg("--json")
        .arg(&json_path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the pushload binary starts");
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + RUN_LIMIT;
    let code = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // A server left behind could hold the pipes open: wait for them only so long.
    let text = |rx: mpsc::Receiver<String>| {
        rx.recv_timeout(PATIENCE)
            .unwrap_or_else(|_| "(pipe still open)".to_owned())
    };
    let result = std::fs::read(&json_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(Value::Null);
    let run = Run {
        code,
        result,
        stdout: text(stdout),
        stderr: text(stderr),
    };
    assert!(code.is_some(), "pushload killed after {RUN_LIMIT:?}\n{run}");
    run
}

/// Runs pushload against the pushbroker binary it starts, with `args` and a phase
/// deadline of [`PHASE_DEADLINE_S`].
fn against_pushbroker(args: &[&str]) -> Run {
    let deadline = PHASE_DEADLINE_S.to_string();
    let mut all = vec!["--server", PUSHBROKER, "--timeout-secs", &deadline];
    all.extend_from_slice(args);
    pushload(&all)
}

/// A server that exits before saying where it listens is reported as having ended, with
/// its exit status and its last words, not waited for.
#[test]
fn a_server_that_exits_before_listening_is_reported_as_ended() {
    let script = temp_dir("pushload-exits").join("server.sh");
    std::fs::write(&script, "echo cannot-start >&2\nexit 3\n").expect("write the script");
    // Run by `sh`, not executed itself: a file just written may not be executable yet
    // while another test's child still holds it open.
    let server = format!("sh {}", script.display());
    let run = pushload(&[
        "--server",
        &server,
        "--scenario",
        "connect",
        "--sessions",
        "1",
    ]);
    assert_ne!(run.code, Some(0), "{run}");
    assert!(
        run.stderr
            .contains("ended before saying where it listens (exit status: 3)"),
        "{run}"
    );
    assert!(run.stderr.contains("cannot-start"), "{run}");
}

// ---------------------------------------------------------------------------------------
// Against pushbroker
// ---------------------------------------------------------------------------------------

/// 40 sessions, 3 broadcasts: each session gets each broadcast once.
fn assert_broadcast_reaches_every_session(extra: &[&str], tls: bool, workers: u64) {
    let mut args = vec![
        "--scenario",
        "broadcast",
        "--sessions",
        "40",
        "--broadcasts",
        "3",
    ];
    args.extend_from_slice(extra);
    let run = against_pushbroker(&args);
    run.assert_ok();
    assert_eq!(run.result["scenario"], "broadcast", "{run}");
    assert_eq!(run.result["tls"], tls, "{run}");
    assert_eq!(run.count("workers"), workers, "{run}");
    assert_eq!(run.count("sessions"), 40, "{run}");
    assert_eq!(run.count("expected"), 120, "{run}");
    assert_eq!(run.count("deliveries"), 120, "{run}");
    run.assert_percentiles("latency_ms");
    run.assert_percentiles("round_ms");
    run.assert_done_before_deadline();
}

/// 40 sessions, 100 notifies from 4 clients: each notify arrives once.
fn assert_unicast_delivers_each_notify(extra: &[&str], tls: bool) {
    let mut args = vec![
        "--scenario",
        "unicast",
        "--sessions",
        "40",
        "--notifies",
        "100",
        "--concurrency",
        "4",
    ];
    args.extend_from_slice(extra);
    let run = against_pushbroker(&args);
    run.assert_ok();
    assert_eq!(run.result["scenario"], "unicast", "{run}");
    assert_eq!(run.result["tls"], tls, "{run}");
    assert_eq!(run.count("sessions"), 40, "{run}");
    assert_eq!(run.count("expected"), 100, "{run}");
    assert_eq!(run.count("deliveries"), 100, "{run}");
    run.assert_percentiles("latency_ms");
    run.assert_done_before_deadline();
}

#[test]
fn broadcast_reaches_every_session_once_per_broadcast() {
    assert_broadcast_reaches_every_session(&[], false, 1);
}

#[test]
fn unicast_delivers_each_notify_once() {
    assert_unicast_delivers_each_notify(&[], false);
}

#[test]
fn connect_registers_every_session() {
    let run = against_pushbroker(&["--scenario", "connect", "--sessions", "40"]);
    run.assert_ok();
    assert_eq!(run.result["scenario"], "connect", "{run}");
    assert_eq!(run.count("sessions"), 40, "{run}");
    let rate = run.result["connects_per_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("connects_per_s is not a number\n{run}"));
    assert!(rate > 0.0, "connects_per_s\n{run}");
    run.assert_percentiles("latency_ms");
    run.assert_done_before_deadline();
}

#[test]
fn churn_loses_and_repeats_nothing() {
    let run = against_pushbroker(&[
        "--scenario",
        "churn",
        "--sessions",
        "40",
        "--notifies",
        "200",
        "--churn-rate",
        "50",
    ]);
    run.assert_ok();
    assert_eq!(run.result["scenario"], "churn", "{run}");
    assert_eq!(run.count("expected"), 200, "{run}");
    assert_eq!(run.count("deliveries"), 200, "{run}");
    run.assert_done_before_deadline();
    // 40 devices at 50 reconnects/s over the 10 s the notifies are paced across: some
    // hundreds; how many depends on speed, so only that there were some.
    assert!(run.count("reconnects") > 0, "no device reconnected\n{run}");
}

#[test]
fn broadcast_over_tls_reaches_every_session_once_per_broadcast() {
    assert_broadcast_reaches_every_session(&["--tls"], true, 1);
}

#[test]
fn unicast_over_tls_delivers_each_notify_once() {
    assert_unicast_delivers_each_notify(&["--tls"], true);
}

#[test]
fn the_poll_loop_serves_broadcasts_as_the_ring_does() {
    // The steady loop's fallback where io_uring cannot be had.
    let deadline = PHASE_DEADLINE_S.to_string();
    let run = pushload_with(
        &[
            "--server",
            PUSHBROKER,
            "--timeout-secs",
            &deadline,
            "--scenario",
            "broadcast",
            "--sessions",
            "40",
            "--broadcasts",
            "3",
        ],
        &[("PUSHLOAD_STEADY", "mio")],
    );
    run.assert_ok();
    assert_eq!(run.count("deliveries"), 120, "{run}");
    assert_eq!(run.count("duplicates"), 0, "{run}");
}

#[test]
fn two_workers_merge_into_the_counts_of_one() {
    assert_broadcast_reaches_every_session(&["--workers", "2"], false, 2);
}

// ---------------------------------------------------------------------------------------
// Against a server that gets one notification wrong
// ---------------------------------------------------------------------------------------

/// The devices' newest connections by device id, to write NOTIFICATIONS to; sorted, so
/// "the next device" is well defined.
type Devices = Arc<Mutex<BTreeMap<String, TcpStream>>>;

/// What the stand-in server does wrong with one notify.
#[derive(Clone, Copy)]
enum Fault {
    /// Answers 200 but delivers nothing.
    Drop,
    /// Delivers it twice, in two NOTIFICATIONS frames.
    Twice,
    /// Delivers it to another device, the next connected one by id, not the addressed
    /// one.
    Misroute,
    /// Never answers it, nor delivers it: holds the request until the client goes.
    Hold,
}

/// A stand-in push server on loopback, speaking just enough of the protocol for
/// pushload's unicast scenario: devices send the version byte and CONNECT, get CONNACK,
/// and are sent a NOTIFICATIONS frame per `POST /notify` for them, in the exact shape
/// servers write; their ACKs are read and skipped. It answers 200 to every notify and
/// delivers it, except the `nth` (counting from 1 as they arrive), which gets its
/// [`Fault`].
struct FaultyServer {
    device_addr: SocketAddr,
    http_addr: SocketAddr,
    /// How many notifies came so far.
    notifies: Arc<AtomicUsize>,
}

impl FaultyServer {
    /// Starts listening on two loopback ports; its threads run until the test process
    /// ends.
    fn start(nth: usize, fault: Fault) -> Self {
        let devices = Devices::default();
        let notifies = Arc::new(AtomicUsize::new(0));
        let device_listener = TcpListener::bind("127.0.0.1:0").expect("bind devices");
        let http_listener = TcpListener::bind("127.0.0.1:0").expect("bind http");
        let server = Self {
            device_addr: device_listener.local_addr().expect("device addr"),
            http_addr: http_listener.local_addr().expect("http addr"),
            notifies: notifies.clone(),
        };
        let known = devices.clone();
        accept_each(device_listener, move |stream| {
            let _ = serve_device(stream, &known);
        });
        accept_each(http_listener, move |stream| {
            let _ = serve_http(stream, &devices, &notifies, (nth, fault));
        });
        server
    }

    /// Runs pushload's unicast scenario against this server: 5 sessions, 20 notifies
    /// one at a time, phases of `timeout_secs`; asserts the server got all 20.
    fn unicast(&self, timeout_secs: &str) -> Run {
        let devices = self.device_addr.to_string();
        let api = format!("http://{}", self.http_addr);
        let run = pushload(&[
            "--devices",
            &devices,
            "--api",
            &api,
            "--scenario",
            "unicast",
            "--sessions",
            "5",
            "--notifies",
            "20",
            "--concurrency",
            "1",
            "--timeout-secs",
            timeout_secs,
        ]);
        assert_eq!(
            self.notifies.load(Ordering::SeqCst),
            20,
            "notifies the server got\n{run}"
        );
        run
    }
}

/// Accepts connections on a thread and serves each on a thread of its own.
fn accept_each(listener: TcpListener, serve: impl Fn(TcpStream) + Clone + Send + 'static) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let serve = serve.clone();
            std::thread::spawn(move || serve(stream));
        }
    });
}

/// Writes one frame: a big-endian u16 length, then `body`, a JSON object.
fn write_frame(out: &mut impl Write, body: &str) -> io::Result<()> {
    let len = u16::try_from(body.len()).map_err(io::Error::other)?;
    let mut frame = len.to_be_bytes().to_vec();
    frame.extend_from_slice(body.as_bytes());
    out.write_all(&frame)
}

/// Reads one frame.
fn read_frame(input: &mut impl Read) -> io::Result<Value> {
    let mut len = [0u8; 2];
    input.read_exact(&mut len)?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    input.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// The CONNACK every device gets.
const CONNACK: &str = r#"{"T":"connack","Params":{"PingInterval":"60s"}}"#;

/// One device connection: version byte, CONNECT, CONNACK, then frames skipped until
/// the device goes.
fn serve_device(stream: TcpStream, devices: &Devices) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut input = BufReader::new(stream.try_clone()?);
    let mut version = [0u8];
    input.read_exact(&mut version)?;
    if version[0] != 0 {
        return Ok(());
    }
    let connect = read_frame(&mut input)?;
    let Some(id) = connect["DeviceId"].as_str() else {
        return Ok(());
    };
    {
        // Known before CONNACK arrives, so a notify right after it finds the device.
        let mut devices = devices.lock().expect("devices");
        let mut out = stream.try_clone()?;
        write_frame(&mut out, CONNACK)?;
        devices.insert(id.to_owned(), out);
    }
    while read_frame(&mut input).is_ok() {}
    Ok(())
}

/// One HTTP/1.1 connection: requests with Content-Length bodies, kept alive until the
/// client closes it or asks to. A held request is never answered: the connection then
/// only waits for the client to close it.
fn serve_http(
    stream: TcpStream,
    devices: &Devices,
    notifies: &AtomicUsize,
    fault: (usize, Fault),
) -> io::Result<()> {
    let mut input = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if input.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let path = request_line.split(' ').nth(1).unwrap_or("").to_owned();
        let mut length = 0;
        let mut close = false;
        loop {
            let mut line = String::new();
            if input.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.parse().map_err(io::Error::other)?,
                    "connection" => close = value.eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; length];
        input.read_exact(&mut body)?;
        let answer = if path == "/notify" {
            notify(&body, devices, notifies, fault)
        } else {
            Some(("404 Not Found", r#"{"ok":false,"error":"not-found"}"#))
        };
        let Some((status, answer)) = answer else {
            io::copy(&mut input, &mut io::sink())?;
            return Ok(());
        };
        write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        )?;
        if close {
            return Ok(());
        }
    }
}

/// What the stand-in reads of a `/notify` body; `data` stays the bytes the client sent
/// (payloads are forwarded as sent, never re-encoded).
#[derive(Deserialize)]
struct NotifyRequest {
    appid: String,
    deviceid: String,
    data: Box<RawValue>,
}

/// Handles a `/notify` body: writes NOTIFICATIONS to the device, or, for the notify
/// numbered `fault.0`, does `fault.1` wrong; returns the status and body of the answer,
/// `None` to hold the request.
fn notify(
    body: &[u8],
    devices: &Devices,
    notifies: &AtomicUsize,
    (nth, fault): (usize, Fault),
) -> Option<(&'static str, &'static str)> {
    const OK: (&str, &str) = ("200 OK", r#"{"ok":true}"#);
    const UNKNOWN: (&str, &str) = ("404 Not Found", r#"{"ok":false,"error":"unknown-device"}"#);
    let Ok(request) = serde_json::from_slice::<NotifyRequest>(body) else {
        return Some(("400 Bad Request", r#"{"ok":false,"error":"bad-request"}"#));
    };
    let n = notifies.fetch_add(1, Ordering::SeqCst) + 1;
    let fault = (n == nth).then_some(fault);
    let mut devices = devices.lock().expect("devices");
    let to = match fault {
        Some(Fault::Drop) => return Some(OK),
        Some(Fault::Hold) => return None,
        Some(Fault::Misroute) => next_device(&devices, &request.deviceid)?,
        Some(Fault::Twice) | None => request.deviceid,
    };
    let Some(out) = devices.get_mut(&to) else {
        return Some(UNKNOWN);
    };
    let frame = format!(
        r#"{{"T":"notifications","Notifications":[{{"A":{},"M":"m{n}","P":{}}}]}}"#,
        Value::String(request.appid),
        request.data.get()
    );
    // A device gone meanwhile is pushload's to notice.
    let _ = write_frame(out, &frame);
    if matches!(fault, Some(Fault::Twice)) {
        let _ = write_frame(out, &frame);
    }
    Some(OK)
}

/// The connected device after `id` in sorted order, wrapping round; `None` when there
/// is no other.
fn next_device(devices: &BTreeMap<String, TcpStream>, id: &str) -> Option<String> {
    let after = devices.range::<str, _>((Bound::Excluded(id), Bound::Unbounded));
    after
        .chain(devices.iter())
        .map(|(other, _)| other)
        .find(|other| *other != id)
        .cloned()
}

#[test]
fn a_notification_the_server_drops_is_reported_missing() {
    let server = FaultyServer::start(5, Fault::Drop);
    let run = server.unicast("5");
    assert_eq!(run.code, Some(1), "exit code\n{run}");
    assert_eq!(run.result["ok"], false, "ok\n{run}");
    assert_eq!(run.count("expected"), 20, "{run}");
    assert_eq!(run.count("missing"), 1, "{run}");
    assert_eq!(run.count("deliveries"), 19, "{run}");
    for key in ["duplicates", "wrong", "errors"] {
        assert_eq!(run.count(key), 0, "{key}\n{run}");
    }
}

#[test]
fn a_notification_delivered_twice_is_reported_duplicate() {
    let server = FaultyServer::start(5, Fault::Twice);
    let run = server.unicast("5");
    assert_eq!(run.code, Some(1), "exit code\n{run}");
    assert_eq!(run.result["ok"], false, "ok\n{run}");
    assert_eq!(run.count("expected"), 20, "{run}");
    assert_eq!(run.count("duplicates"), 1, "{run}");
    assert_eq!(run.count("deliveries"), 20, "{run}");
    for key in ["missing", "wrong", "errors"] {
        assert_eq!(run.count(key), 0, "{key}\n{run}");
    }
}

#[test]
fn a_notification_delivered_to_another_device_is_reported_wrong() {
    let server = FaultyServer::start(5, Fault::Misroute);
    let run = server.unicast("5");
    assert_eq!(run.code, Some(1), "exit code\n{run}");
    assert_eq!(run.result["ok"], false, "ok\n{run}");
    assert_eq!(run.count("expected"), 20, "{run}");
    assert_eq!(run.count("wrong"), 1, "{run}");
    assert_eq!(run.count("missing"), 1, "{run}");
    assert_eq!(run.count("deliveries"), 19, "{run}");
    for key in ["duplicates", "errors"] {
        assert_eq!(run.count(key), 0, "{key}\n{run}");
    }
}

/// The last notify is held: the 19 before it are answered and delivered, so the counts
/// do not depend on how far pushload got past the held one. The phase's deadline and the
/// held call's timeout pass within moments of each other: whichever pushload notices
/// first is among its problems, perhaps both, so `errors` may be 0 or 1.
#[test]
fn a_notify_the_server_never_answers_is_reported() {
    let server = FaultyServer::start(20, Fault::Hold);
    let run = server.unicast("3");
    assert_eq!(run.code, Some(1), "exit code\n{run}");
    assert_eq!(run.result["ok"], false, "ok\n{run}");
    assert_eq!(run.count("expected"), 19, "{run}");
    assert_eq!(run.count("deliveries"), 19, "{run}");
    let problems = run.result["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("problems is not a list\n{run}"));
    assert!(
        problems.iter().filter_map(Value::as_str).any(|p| {
            p.contains("the notifies did not finish in time") || p.contains("no answer within")
        }),
        "problems\n{run}"
    );
    for key in ["missing", "duplicates", "wrong"] {
        assert_eq!(run.count(key), 0, "{key}\n{run}");
    }
}

// ---------------------------------------------------------------------------------------
// Against several nodes
// ---------------------------------------------------------------------------------------

/// A pushbroker of its own, with no shared store: a standalone node, which knows only
/// the devices connected to it.
fn standalone_node() -> ServerProcess {
    ServerProcess::start(&serde_json::json!({
        "addr": "127.0.0.1:0",
        "http_addr": "127.0.0.1:0",
    }))
}

/// The sessions `node` holds now, as its `/stats` counts them.
fn sessions_on(node: &ServerProcess) -> u64 {
    let stats = http(node.http_addr, "GET", "/stats", &[], b"");
    stats.json()["totals"]["sessions"].as_u64().unwrap_or(0)
}

/// Runs pushload with `args` on a thread of its own, and meanwhile the most sessions
/// each of `nodes` held at once.
fn pushload_watching(args: Vec<String>, nodes: &[&ServerProcess]) -> (Run, Vec<u64>) {
    let run = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        pushload(&args)
    });
    let mut most = vec![0; nodes.len()];
    while !run.is_finished() {
        for (most, node) in most.iter_mut().zip(nodes) {
            *most = (*most).max(sessions_on(node));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (run.join().expect("the pushload thread"), most)
}

/// Two standalone nodes, given as comma-separated lists: `idle` from two worker
/// processes puts session i on node i mod 2, so each node holds half, and the server
/// CPU is the two processes' together.
#[test]
fn sessions_spread_evenly_over_two_nodes() {
    let (a, b) = (standalone_node(), standalone_node());
    let args = [
        "--devices".to_owned(),
        format!("{},{}", a.device_addr, b.device_addr),
        "--api".to_owned(),
        format!("http://{},http://{}", a.http_addr, b.http_addr),
        "--pid".to_owned(),
        format!("{},{}", a.pid(), b.pid()),
        "--scenario".to_owned(),
        "idle".to_owned(),
        "--idle-secs".to_owned(),
        "3".to_owned(),
        "--sessions".to_owned(),
        "100".to_owned(),
        "--workers".to_owned(),
        "2".to_owned(),
        "--timeout-secs".to_owned(),
        "20".to_owned(),
    ];
    let (run, most) = pushload_watching(args.to_vec(), &[&a, &b]);
    run.assert_ok();
    assert_eq!(run.count("sessions"), 100, "{run}");
    assert_eq!(most, [50, 50], "sessions each node held\n{run}");
    let devices = [a.device_addr.to_string(), b.device_addr.to_string()];
    assert_eq!(run.result["devices"], serde_json::json!(devices), "{run}");
    assert_eq!(
        run.result["pids"],
        serde_json::json!([a.pid(), b.pid()]),
        "{run}"
    );
    let per_pid: Vec<f64> = run.result["server_cpu_s_per_pid"]
        .as_array()
        .unwrap_or_else(|| panic!("server_cpu_s_per_pid is not a list\n{run}"))
        .iter()
        .map(|v| v.as_f64().unwrap_or_else(|| panic!("not a number\n{run}")))
        .collect();
    assert_eq!(per_pid.len(), 2, "{run}");
    let total = run.result["server_cpu_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("server_cpu_s is not a number\n{run}"));
    assert!(
        (total - per_pid.iter().sum::<f64>()).abs() < 1e-3,
        "server_cpu_s is not the sum per pid\n{run}"
    );
}

/// Two standalone nodes, given as repeated options: churn with `--api-spread
/// same-node` sends each notify to the node its device is on, and a standalone node
/// delivers only to its own devices, so every notify arrives only if each device
/// reconnects to its own node, from either worker process.
#[test]
fn churned_devices_come_back_to_their_own_node() {
    let (a, b) = (standalone_node(), standalone_node());
    let (devices_a, devices_b) = (a.device_addr.to_string(), b.device_addr.to_string());
    let (api_a, api_b) = (
        format!("http://{}", a.http_addr),
        format!("http://{}", b.http_addr),
    );
    let run = pushload(&[
        "--devices",
        &devices_a,
        "--devices",
        &devices_b,
        "--api",
        &api_a,
        "--api",
        &api_b,
        "--api-spread",
        "same-node",
        "--scenario",
        "churn",
        "--sessions",
        "40",
        "--notifies",
        "200",
        "--churn-rate",
        "50",
        "--workers",
        "2",
        "--timeout-secs",
        "20",
    ]);
    run.assert_ok();
    assert_eq!(run.count("expected"), 200, "{run}");
    assert_eq!(run.count("deliveries"), 200, "{run}");
    assert!(run.count("reconnects") > 0, "no device reconnected\n{run}");
    assert_eq!(run.result["api_spread"], "same-node", "{run}");
    let calls: Vec<u64> = run.result["api_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("api_calls is not a list\n{run}"))
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(calls.len(), 2, "{run}");
    assert_eq!(calls.iter().sum::<u64>(), 200, "{run}");
    assert!(calls.iter().all(|&c| c > 0), "a node got no notify\n{run}");
}
