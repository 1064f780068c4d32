//! The session loop against a real [`SimpleBroker`] over an in-memory store, driven
//! through an in-memory pipe with virtual time: every timing is exact and no test
//! sleeps. Real time appears only as a patience bound that fails a stuck test.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use futures_lite::future;
use glommio::Task;

use super::testing::{DeviceEnd, ServerEnd, VirtualClock, pipe, pipe_with_capacity};
use super::wire::MAX_PENDING;
use super::*;
use crate::broker::simple::{SimpleBroker, SimpleBrokerSession};
use crate::broker::testing::{FaultyStore, LogCapture, TestBrokerConfig, run_local};
use crate::broker::{
    BrokerSending, ConnMeta, ConnMetaExchange, ExchangeQueue, SessionId, UnicastExchange,
};
use crate::protocol::{Notification, Payload};
use crate::store::{InMemoryPendingStore, InternalChannelId, Metadata, PendingStore};

const INTERVAL: Duration = Duration::from_secs(10);
const TIMEOUT: Duration = Duration::from_secs(2);
const MS: Duration = Duration::from_millis(1);
/// Real time a test waits for what should happen at once before failing; never spent
/// when the session works.
const PATIENCE: Duration = Duration::from_secs(10);

const PING: &str = r#"{"T":"ping"}"#;
const PONG: &str = r#"{"T":"pong"}"#;
const ACK: &str = r#"{"T":"ack"}"#;

fn config() -> SessionConfig {
    SessionConfig {
        ping_interval: INTERVAL,
        exchange_timeout: TIMEOUT,
    }
}

/// CONNECT of `device`, a `mako` on the `daily` image channel, at system level 0.
fn connect_json(device: &str) -> String {
    let device = serde_json::to_string(device).expect("a string");
    format!(
        r#"{{"T":"connect","DeviceId":{device},"Info":{{"device":"mako","channel":"daily"}},"Levels":{{"0":0}}}}"#
    )
}

fn own_channel(device: &str) -> InternalChannelId {
    InternalChannelId::unicast(device, device)
}

fn payload(json: &str) -> Payload {
    Payload::from_json(json).expect("test payloads are JSON")
}

fn much_later() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

/// Lets every task that can run do so.
async fn settle() {
    for _ in 0..64 {
        future::yield_now().await;
    }
}

/// `fut`'s output, or `None` when it takes longer than [`PATIENCE`] of real time.
async fn within<T>(fut: impl Future<Output = T>) -> Option<T> {
    future::or(async { Some(fut.await) }, async {
        glommio::timer::sleep(PATIENCE).await;
        None
    })
    .await
}

/// A [`SimpleBroker`] that also hands the tests the queue of each session it registers,
/// so they can feed any exchange.
struct TapBroker {
    inner: SimpleBroker,
    queues: RefCell<Vec<Rc<ExchangeQueue>>>,
}

impl Broker for TapBroker {
    type Session = SimpleBrokerSession;

    async fn register(
        &self,
        connect: &ConnectMsg,
        track: &dyn SessionTracker,
    ) -> Result<SimpleBrokerSession, BrokerError> {
        let sess = self.inner.register(connect, track).await?;
        self.queues.borrow_mut().push(sess.queue());
        Ok(sess)
    }

    fn unregister(&self, sess: &SimpleBrokerSession) {
        self.inner.unregister(sess);
    }
}

impl TapBroker {
    /// The queue of the `index`th registered session.
    fn queue(&self, index: usize) -> Rc<ExchangeQueue> {
        let queues = self.queues.borrow();
        match queues.get(index) {
            Some(q) => Rc::clone(q),
            None => panic!("no session {index} registered"),
        }
    }
}

/// A running broker over an in-memory store, and the clock of its sessions.
struct Env {
    store: Rc<InMemoryPendingStore>,
    broker: Rc<TapBroker>,
    clock: VirtualClock,
}

impl Env {
    /// Must run on a glommio executor: starts the broker's task.
    fn new() -> Self {
        Self::over(|store| store as Rc<dyn PendingStore>)
    }

    /// [`Env::new`] with the broker's store made by `wrap` over the in-memory one.
    fn over(wrap: impl FnOnce(Rc<InMemoryPendingStore>) -> Rc<dyn PendingStore>) -> Self {
        let store = Rc::new(InMemoryPendingStore::new());
        let inner = SimpleBroker::new(wrap(Rc::clone(&store)), &TestBrokerConfig::default());
        inner.start();
        Self {
            store,
            broker: Rc::new(TapBroker {
                inner,
                queues: RefCell::new(Vec::new()),
            }),
            clock: VirtualClock::new(),
        }
    }

    /// A session task (hello, then `run`) on a new pipe, its device end untouched.
    fn spawn(&self, sid: &str) -> Conn {
        self.spawn_on(sid, pipe())
    }

    fn spawn_on(&self, sid: &str, (server, device): (ServerEnd, DeviceEnd)) -> Conn {
        let (stop, stopped) = flume::bounded::<()>(1);
        let broker = Rc::clone(&self.broker);
        let clock = self.clock.clone();
        let sid = SessionId(sid.to_owned());
        let task = glommio::spawn_local(async move {
            let mut io = server;
            let mut buf = Vec::new();
            let config = config();
            match read_hello(&mut io, &mut buf, &config, &clock).await {
                Ok(connect) => {
                    let shutdown = async move {
                        let _ = stopped.recv_async().await;
                    };
                    run(
                        &mut io,
                        Box::new(connect),
                        buf,
                        &*broker,
                        &config,
                        &clock,
                        &sid,
                        shutdown,
                    )
                    .await
                }
                Err(end) => end,
            }
            // `io` drops here: the device reads EOF.
        });
        Conn { device, task, stop }
    }

    /// A session of `device` past its hello, its CONNACK read.
    async fn connected(&self, sid: &str, device: &str) -> Conn {
        let conn = self.spawn(sid);
        conn.hello(device).await;
        conn
    }

    /// The registration id of `device`'s live session.
    fn session_of(&self, device: &str) -> Option<u64> {
        self.broker.inner.session_of(device)
    }

    fn assert_unregistered(&self, device: &str) {
        assert_eq!(
            self.session_of(device),
            None,
            "{device} is still registered"
        );
    }

    fn pending(&self, device: &str) -> Vec<String> {
        let (_, notifications) = self
            .store
            .get_channel_snapshot(&own_channel(device))
            .expect("the in-memory store does not fail");
        notifications.iter().map(|n| n.msg_id.to_string()).collect()
    }

    fn notify(&self, device: &str, msg_id: &str, json: &str) {
        self.store
            .append_to_unicast_channel(
                &own_channel(device),
                Notification::unicast("app", msg_id, payload(json)),
                Metadata::expiring(much_later()),
            )
            .expect("the in-memory store does not fail");
    }

    fn sending(&self) -> impl BrokerSending {
        self.broker.inner.sending()
    }
}

/// A session under test: the device's end of its pipe and its task.
struct Conn {
    device: DeviceEnd,
    task: Task<SessionEnd>,
    /// Sending (or dropping) it shuts the session down.
    stop: flume::Sender<()>,
}

impl Conn {
    /// Sends the hello of `device` and reads CONNACK.
    async fn hello(&self, device: &str) {
        assert!(self.device.hello(&connect_json(device)));
        let connack = self.frame().await;
        assert!(connack.starts_with(r#"{"T":"connack""#), "{connack}");
        settle().await;
    }

    /// The next frame the session writes.
    async fn frame(&self) -> String {
        match within(self.device.read_frame()).await {
            Some(Some(frame)) => frame,
            Some(None) => panic!("the session closed instead of writing"),
            None => panic!("the session wrote nothing"),
        }
    }

    /// Checks the session wrote nothing and is still running.
    async fn quiet(&mut self) {
        settle().await;
        let written = self.device.read_available();
        assert!(
            written.is_empty(),
            "unexpected write: {}",
            String::from_utf8_lossy(&written)
        );
        self.assert_running().await;
    }

    async fn assert_running(&mut self) {
        settle().await;
        if let Some(end) = future::poll_once(&mut self.task).await {
            panic!("the session ended: {end}");
        }
    }

    /// How the session ended; it must end without the clock moving.
    async fn end(&mut self) -> SessionEnd {
        match within(&mut self.task).await {
            Some(end) => end,
            None => panic!("the session did not end"),
        }
    }

    /// The session ended and the device saw the connection close.
    async fn closed(&mut self) -> SessionEnd {
        let end = self.end().await;
        assert!(self.device.is_server_closed(), "the stream is still open");
        end
    }
}

// --- The hello --------------------------------------------------------------------------

#[test]
fn a_wrong_version_byte_ends_the_session_before_connack() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.spawn("s1");
        c.device.write(&[1]);
        let end = c.closed().await;
        assert!(matches!(end, SessionEnd::UnexpectedVersion(1)), "{end:?}");
        assert_eq!(end.to_string(), "unexpected wire format version");
        assert!(c.device.read_available().is_empty(), "nothing is written");
        env.assert_unregistered("dev-1");
    });
}

#[test]
fn a_first_message_other_than_connect_ends_the_session() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.spawn("s1");
        c.device.write(&[0]);
        c.device.write_frame(ACK);
        let end = c.closed().await;
        assert!(matches!(end, SessionEnd::ExpectedConnect), "{end:?}");
        assert_eq!(end.to_string(), "expected CONNECT message");
        assert!(c.device.read_available().is_empty());
    });
}

#[test]
fn garbage_json_in_the_hello_ends_the_session() {
    run_local(|| async {
        let env = Env::new();
        for garbage in [
            r#"{"T":"#,
            "not json",
            "[1,2]",
            r#"{"T":"connect","Levels":"x"}"#,
        ] {
            let mut c = env.spawn("s1");
            c.device.write(&[0]);
            c.device.write_frame(garbage);
            let end = c.closed().await;
            assert!(
                matches!(end, SessionEnd::Malformed(_)),
                "{garbage}: {end:?}"
            );
            assert_eq!(end.to_string(), "malformed message");
        }
        env.assert_unregistered("dev-1");
    });
}

#[test]
fn a_truncated_frame_then_close_is_eof() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.spawn("s1");
        c.device.write(&[0, 0x00, 0x40, b'{', b'"']);
        c.device.close();
        let end = c.closed().await;
        assert!(end.is_eof(), "{end:?}");
        assert_eq!(end.to_string(), "EOF");
        assert_eq!(env.clock.elapsed(), Duration::ZERO);
    });
}

#[test]
fn silence_during_the_hello_times_out_one_exchange_timeout_after_it_began() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.spawn("s1");
        settle().await;
        // The version byte comes in time but does not restart the timeout.
        env.clock.advance(TIMEOUT / 2);
        c.device.write(&[0]);
        c.quiet().await;
        env.clock.advance(TIMEOUT / 2 - MS);
        c.quiet().await;
        env.clock.advance(MS);
        let end = c.closed().await;
        assert!(end.is_timeout() && !end.is_eof(), "{end:?}");
        assert_eq!(end.timed_out_waiting(), Some(Waiting::Hello));
        assert_eq!(end.to_string(), "hello timeout");
    });
}

#[test]
fn a_hello_trickling_in_byte_by_byte_is_read() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.spawn("s1");
        let mut bytes = vec![0];
        let json = connect_json("dev-1");
        bytes.extend_from_slice(&u16::try_from(json.len()).expect("small").to_be_bytes());
        bytes.extend_from_slice(json.as_bytes());
        for b in bytes {
            c.device.write(&[b]);
            settle().await;
        }
        let connack = c.frame().await;
        assert!(connack.starts_with(r#"{"T":"connack""#));
        c.assert_running().await;
        assert!(env.session_of("dev-1").is_some());
    });
}

#[test]
fn read_hello_starts_from_bytes_already_read_and_keeps_what_follows_connect() {
    run_local(|| async {
        let clock = VirtualClock::new();
        let (mut server, device) = pipe();
        let json = connect_json("dev-1");
        let mut frame = u16::try_from(json.len())
            .expect("small")
            .to_be_bytes()
            .to_vec();
        frame.extend_from_slice(json.as_bytes());
        // The listener already read the version byte and the start of CONNECT.
        let mut buf = vec![0];
        buf.extend_from_slice(&frame[..5]);
        device.write(&frame[5..]);
        device.write(b"\x00\x0b{\"T\":\"pong\"}\x00");
        let connect = read_hello(&mut server, &mut buf, &config(), &clock)
            .await
            .expect("a good hello");
        assert_eq!(connect.device_id, "dev-1");
        assert_eq!(
            connect.levels,
            Some([("0".to_owned(), 0)].into_iter().collect())
        );
        assert_eq!(buf, b"\x00\x0b{\"T\":\"pong\"}\x00");
    });
}

// --- CONNACK, registration, the log line ------------------------------------------------

#[test]
fn connack_is_exact_and_registration_is_logged() {
    let capture = LogCapture::new();
    let _guard = capture.set_default();
    run_local(|| async {
        let env = Env::new();
        let mut c = env.spawn("s1");
        // Tests on other threads, without a subscriber, may have cached "never" for the
        // log's callsite while this capture was being installed: recompute it.
        tracing::callsite::rebuild_interest_cache();
        c.device.hello(&connect_json("dev-1"));
        let raw = within(c.device.read_raw_frame())
            .await
            .flatten()
            .expect("CONNACK");
        let json = r#"{"T":"connack","Params":{"PingInterval":"10s"}}"#;
        let mut want = u16::try_from(json.len())
            .expect("small")
            .to_be_bytes()
            .to_vec();
        want.extend_from_slice(json.as_bytes());
        assert_eq!(raw, want);
        c.assert_running().await;
        assert_eq!(env.session_of("dev-1"), Some(1));
    });
    assert!(
        capture.has_line("INFO", "session(s1) registered dev-1"),
        "{}",
        capture.captured()
    );
}

#[test]
fn a_device_id_cannot_forge_or_flood_log_lines() {
    let capture = LogCapture::new();
    let _guard = capture.set_default();
    let forged = "x\n2026/01/01 00:00:00.000000 INFO listening for devices on 6.6.6.6:1";
    let long = "L".repeat(65_000);
    run_local(|| async {
        let env = Env::new();
        tracing::callsite::rebuild_interest_cache();
        let forger = env.spawn("s1");
        forger.device.hello(&connect_json(forged));
        assert!(forger.frame().await.starts_with(r#"{"T":"connack""#));
        let flooder = env.spawn("s2");
        flooder.device.hello(&connect_json(&long));
        assert!(flooder.frame().await.starts_with(r#"{"T":"connack""#));
        settle().await;
    });
    let log = capture.captured();
    assert!(
        capture.has_line(
            "INFO",
            r#"session(s1) registered "x\n2026/01/01 00:00:00.000000 INFO listening for devices on 6.6.6.6:1""#
        ),
        "no escaped registration line"
    );
    for line in log.lines().filter(|l| l.contains("listening for devices")) {
        assert!(line.contains(r#""x\n2026/"#), "a forged line: {line}");
    }
    assert!(log.contains("... (65000 bytes)"), "the long id is not cut");
    assert!(
        log.len() < 2_000,
        "the long id was logged in full: {} bytes",
        log.len()
    );
}

#[test]
fn an_empty_or_missing_device_id_is_the_shared_empty_identity_as_in_the_original() {
    let capture = LogCapture::new();
    let _guard = capture.set_default();
    run_local(|| async {
        let env = Env::new();
        tracing::callsite::rebuild_interest_cache();
        let mut first = env.connected("s1", "").await;
        assert_eq!(env.session_of(""), Some(1));
        // A CONNECT without the field at all is the same identity: the last one wins.
        let second = env.spawn("s2");
        second.device.hello(r#"{"T":"connect","Levels":{"0":0}}"#);
        assert!(second.frame().await.starts_with(r#"{"T":"connack""#));
        let end = first.closed().await;
        assert!(end.is_terminated(), "{end:?}");
        assert_eq!(env.session_of(""), Some(2));
    });
    assert!(
        capture.has_line("INFO", r#"session(s1) registered """#),
        "{}",
        capture.captured()
    );
}

#[test]
fn a_registration_error_ends_the_session_with_its_abort_reason() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.spawn("s1");
        c.device
            .hello(r#"{"T":"connect","DeviceId":"dev-1","Info":{"device":5}}"#);
        let connack = c.frame().await;
        assert!(connack.starts_with(r#"{"T":"connack""#));
        let end = c.closed().await;
        assert!(end.is_abort(), "{end:?}");
        assert_eq!(
            end.to_string(),
            "session aborted (unexpected value in message)"
        );
        assert!(
            c.device.read_available().is_empty(),
            "nothing after CONNACK"
        );
        env.assert_unregistered("dev-1");
    });
}

// --- Pings ------------------------------------------------------------------------------

#[test]
fn the_first_ping_goes_out_exactly_one_interval_after_registration() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.connected("s1", "dev-1").await;
        env.clock.advance(INTERVAL - MS);
        c.quiet().await;
        env.clock.advance(MS);
        assert_eq!(c.frame().await, PING);
    });
}

#[test]
fn a_pong_keeps_the_session_and_the_next_ping_comes_one_interval_after_the_last() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.connected("s1", "dev-1").await;
        for _ in 0..3 {
            env.clock.advance(INTERVAL);
            assert_eq!(c.frame().await, PING);
            // A late PONG does not push the next PING back: the server is never silent
            // longer than the interval.
            env.clock.advance(TIMEOUT - MS);
            c.device.write_frame(PONG);
            c.quiet().await;
            env.clock.advance(INTERVAL - TIMEOUT);
            c.quiet().await;
            env.clock.advance(MS);
            assert_eq!(c.frame().await, PING);
            c.device.write_frame(PONG);
            c.quiet().await;
        }
        assert!(env.session_of("dev-1").is_some());
    });
}

#[test]
fn no_pong_ends_the_session_with_a_timeout() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.connected("s1", "dev-1").await;
        env.clock.advance(INTERVAL);
        assert_eq!(c.frame().await, PING);
        env.clock.advance(TIMEOUT - MS);
        c.quiet().await;
        env.clock.advance(MS);
        let end = c.closed().await;
        assert!(end.is_timeout(), "{end:?}");
        assert_eq!(end.to_string(), "pong timeout");
        env.assert_unregistered("dev-1");
    });
}

#[test]
fn a_wrong_answer_to_a_ping_ends_the_session() {
    run_local(|| async {
        let env = Env::new();
        for answer in [ACK, r#"{"T":"connect"}"#, r#"{"T":"whatever"}"#] {
            let mut c = env.connected("s1", "dev-1").await;
            env.clock.advance(INTERVAL);
            assert_eq!(c.frame().await, PING);
            c.device.write_frame(answer);
            let end = c.closed().await;
            assert!(matches!(end, SessionEnd::ExpectedPong), "{answer}: {end:?}");
            assert_eq!(end.to_string(), "expected PONG message");
            env.assert_unregistered("dev-1");
        }
        let mut c = env.connected("s1", "dev-1").await;
        env.clock.advance(INTERVAL);
        assert_eq!(c.frame().await, PING);
        c.device.write_frame("pong");
        let end = c.closed().await;
        assert_eq!(end.to_string(), "malformed message");
        env.assert_unregistered("dev-1");
    });
}

#[test]
fn bytes_sent_while_idle_answer_the_next_ping() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.connected("s1", "dev-1").await;
        // An early PONG, in two pieces: kept, not an error.
        c.device.write(b"\x00\x0c{\"T\":");
        c.quiet().await;
        c.device.write(b"\"pong\"}");
        c.quiet().await;
        env.clock.advance(INTERVAL);
        assert_eq!(c.frame().await, PING);
        // Answered already: nothing ends after the timeout.
        env.clock.advance(TIMEOUT);
        c.quiet().await;
        env.clock.advance(INTERVAL - TIMEOUT);
        assert_eq!(c.frame().await, PING);
    });
}

#[test]
fn more_than_one_frame_of_unsolicited_bytes_ends_the_session() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.connected("s1", "dev-1").await;
        // One frame of the largest size is kept …
        c.device.write(&vec![0xff; MAX_PENDING]);
        c.quiet().await;
        // … one byte more is a flood.
        c.device.write(&[0xff]);
        let end = c.closed().await;
        assert!(matches!(end, SessionEnd::Unsolicited), "{end:?}");
        assert_eq!(end.to_string(), "too much unsolicited data");
        env.assert_unregistered("dev-1");
    });
}

#[test]
fn a_device_closing_while_idle_ends_the_session_at_once() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.connected("s1", "dev-1").await;
        c.device.write(b"\x00\x0c{\"T\"");
        c.device.close();
        let end = c.closed().await;
        assert!(end.is_eof(), "{end:?}");
        assert_eq!(end.to_string(), "EOF");
        assert_eq!(
            env.clock.elapsed(),
            Duration::ZERO,
            "noticed without a ping"
        );
        env.assert_unregistered("dev-1");
    });
}

// --- Exchanges --------------------------------------------------------------------------

/// A system-channel payload for devices `mako` on `daily`.
fn system_payload(n: u32) -> String {
    format!(r#"{{"daily/mako":{n}}}"#)
}

fn broadcast_system(env: &Env, n: u32) {
    env.store
        .append_to_channel(
            &InternalChannelId::System,
            payload(&system_payload(n)),
            much_later(),
        )
        .expect("the in-memory store does not fail");
    env.sending()
        .broadcast(InternalChannelId::System)
        .expect("the broker takes it");
}

#[test]
fn a_broadcast_fed_while_idle_is_written_and_its_ack_sets_the_level() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.connected("s1", "dev-1").await;
        broadcast_system(&env, 1);
        assert_eq!(
            c.frame().await,
            r#"{"T":"broadcast","ChanId":"0","TopLevel":1,"Payloads":[{"daily/mako":1}]}"#
        );
        c.device.write_frame(ACK);
        c.quiet().await;
        // The session is at level 1: the next broadcast carries only what is new.
        broadcast_system(&env, 2);
        assert_eq!(
            c.frame().await,
            r#"{"T":"broadcast","ChanId":"0","TopLevel":2,"Payloads":[{"daily/mako":2}]}"#
        );
        c.device.write_frame(ACK);
        c.quiet().await;
        // And a delivery of the level it has is nothing to send.
        env.sending()
            .broadcast(InternalChannelId::System)
            .expect("the broker takes it");
        c.quiet().await;
    });
}

#[test]
fn an_answer_other_than_ack_aborts_the_exchange() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.connected("s1", "dev-1").await;
        broadcast_system(&env, 1);
        assert!(c.frame().await.starts_with(r#"{"T":"broadcast""#));
        c.device.write_frame(PONG);
        let end = c.closed().await;
        assert!(end.is_abort(), "{end:?}");
        assert_eq!(end.to_string(), "session aborted (expected ACK message)");
        env.assert_unregistered("dev-1");
    });
}

#[test]
fn no_ack_ends_the_session_with_a_timeout_and_keeps_the_notification() {
    run_local(|| async {
        let env = Env::new();
        env.notify("dev-1", "m1", r#""hello""#);
        let mut c = env.connected("s1", "dev-1").await;
        assert_eq!(
            c.frame().await,
            r#"{"T":"notifications","Notifications":[{"A":"app","M":"m1","P":"hello"}]}"#
        );
        env.clock.advance(TIMEOUT - MS);
        c.quiet().await;
        env.clock.advance(MS);
        let end = c.closed().await;
        assert!(end.is_timeout(), "{end:?}");
        assert_eq!(end.to_string(), "ack timeout");
        assert_eq!(env.pending("dev-1"), ["m1"]);
        env.assert_unregistered("dev-1");
    });
}

#[test]
fn an_ack_whose_drop_never_becomes_durable_ends_the_session_after_one_exchange_timeout() {
    run_local(|| async {
        let env = Env::over(|store| {
            Rc::new(FaultyStore::sharing(store).with_hanging_commits()) as Rc<dyn PendingStore>
        });
        env.notify("dev-1", "m1", r#""hello""#);
        env.notify("dev-1", "m2", r#""again""#);
        let mut c = env.connected("s1", "dev-1").await;
        assert_eq!(
            c.frame().await,
            r#"{"T":"notifications","Notifications":[{"A":"app","M":"m1","P":"hello"},{"A":"app","M":"m2","P":"again"}]}"#
        );
        c.device.write_frame(ACK);
        c.quiet().await;
        // Nothing more goes to the device while the drop waits for its commit.
        env.clock.advance(TIMEOUT - MS);
        c.quiet().await;
        env.clock.advance(MS);
        let end = c.closed().await;
        assert!(end.is_abort(), "{end:?}");
        assert_eq!(
            end.to_string(),
            "session aborted (the store did not make the ACK durable in time)"
        );
        env.assert_unregistered("dev-1");
    });
}

#[test]
fn an_exchange_with_nothing_to_send_resumes_the_ping_timer_where_it_was() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.connected("s1", "dev-1").await;
        let feeds = env.broker.inner.stats().unicast_feeds;
        env.clock.advance(INTERVAL * 6 / 10);
        c.quiet().await;
        // A delivery of an empty channel: prepared, nothing to send.
        env.sending()
            .unicast(&[own_channel("dev-1")])
            .expect("the broker takes it");
        c.quiet().await;
        assert_eq!(env.broker.inner.stats().unicast_feeds, feeds + 1);
        assert!(env.broker.queue(0).is_empty(), "the exchange was taken");
        env.clock.advance(INTERVAL * 4 / 10 - MS);
        c.quiet().await;
        env.clock.advance(MS);
        assert_eq!(c.frame().await, PING);
        c.device.write_frame(PONG);
        c.quiet().await;
        // A Nop taken once the interval is already spent: ping at once.
        env.clock.advance(INTERVAL + MS);
        env.broker
            .queue(0)
            .feed(Rc::new(UnicastExchange {
                chan_id: own_channel("dev-1"),
                cached_ok: false,
            }))
            .expect("room");
        assert_eq!(c.frame().await, PING);
    });
}

#[test]
fn after_an_exchange_the_ping_interval_restarts_in_full() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.connected("s1", "dev-1").await;
        env.clock.advance(INTERVAL * 6 / 10);
        env.notify("dev-1", "m1", "1");
        env.sending()
            .unicast(&[own_channel("dev-1")])
            .expect("the broker takes it");
        assert!(c.frame().await.starts_with(r#"{"T":"notifications""#));
        c.device.write_frame(ACK);
        c.quiet().await;
        assert!(env.pending("dev-1").is_empty(), "the ACK dropped it");
        env.clock.advance(INTERVAL - MS);
        c.quiet().await;
        env.clock.advance(MS);
        assert_eq!(c.frame().await, PING);
    });
}

#[test]
fn steady_deliveries_do_not_make_a_timer_each() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.connected("s1", "dev-1").await;
        let before = env.clock.sleeps_made();
        for n in 1..=20 {
            broadcast_system(&env, n);
            assert!(c.frame().await.starts_with(r#"{"T":"broadcast""#));
            c.device.write_frame(ACK);
            c.quiet().await;
            env.clock.advance(MS);
        }
        // The first ACK wait moves the timer before the ping deadline; the later waits
        // and pings are all after it, so it stays where it is.
        assert!(
            env.clock.sleeps_made() - before <= 2,
            "{}",
            env.clock.sleeps_made() - before
        );
        // And it still pings, and times out an ACK, on time: the last ACK came MS ago.
        env.clock.advance(INTERVAL - 2 * MS);
        c.quiet().await;
        env.clock.advance(MS);
        assert_eq!(c.frame().await, PING);
        c.device.write_frame(PONG);
        broadcast_system(&env, 21);
        assert!(c.frame().await.starts_with(r#"{"T":"broadcast""#));
        env.clock.advance(TIMEOUT - MS);
        c.quiet().await;
        env.clock.advance(MS);
        assert_eq!(c.closed().await.to_string(), "ack timeout");
    });
}

fn msg_ids(frame: &str) -> Vec<String> {
    match Message::decode(frame.as_bytes()) {
        Ok(Message::Notifications(n)) => n
            .notifications
            .iter()
            .map(|n| n.msg_id.to_string())
            .collect(),
        other => panic!("expected NOTIFICATIONS, got {other:?}"),
    }
}

#[test]
fn a_split_unicast_writes_part_two_only_after_the_ack_of_part_one() {
    run_local(|| async {
        let env = Env::new();
        let big = format!("\"{}\"", "x".repeat(40_000));
        env.notify("dev-1", "m1", &big);
        env.notify("dev-1", "m2", &big);
        // Fed on registration.
        let mut c = env.connected("s1", "dev-1").await;
        assert_eq!(msg_ids(&c.frame().await), ["m1"]);
        c.quiet().await;
        assert_eq!(env.pending("dev-1"), ["m1", "m2"]);
        env.clock.advance(INTERVAL / 2);
        c.device.write_frame(ACK);
        assert_eq!(msg_ids(&c.frame().await), ["m2"]);
        assert_eq!(env.pending("dev-1"), ["m2"], "exactly part one was dropped");
        c.device.write_frame(ACK);
        c.quiet().await;
        assert!(env.pending("dev-1").is_empty());
        // The interval restarts after the last part.
        env.clock.advance(INTERVAL - MS);
        c.quiet().await;
        env.clock.advance(MS);
        assert_eq!(c.frame().await, PING);
    });
}

#[test]
fn a_device_that_stops_reading_ends_the_session_with_a_write_timeout() {
    run_local(|| async {
        let env = Env::new();
        env.notify("dev-1", "m1", &format!("\"{}\"", "x".repeat(40_000)));
        let mut c = env.spawn_on("s1", pipe_with_capacity(1024));
        c.hello("dev-1").await;
        // The device reads no more; the NOTIFICATIONS frame does not fit.
        env.clock.advance(TIMEOUT - MS);
        settle().await;
        assert!(future::poll_once(&mut c.task).await.is_none());
        env.clock.advance(MS);
        let end = c.end().await;
        assert!(end.is_timeout(), "{end:?}");
        assert_eq!(end.to_string(), "write timeout");
        assert_eq!(env.pending("dev-1"), ["m1"]);
        env.assert_unregistered("dev-1");
    });
}

// --- Conn meta, termination, shutdown ---------------------------------------------------

#[test]
fn connwarn_goes_on_and_connbroken_ends_the_session() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.connected("s1", "dev-1").await;
        env.clock.advance(INTERVAL / 2);
        let queue = env.broker.queue(0);
        queue
            .feed(Rc::new(ConnMetaExchange {
                msg: ConnMeta::Warn("unauthorized".to_owned()),
            }))
            .expect("room");
        assert_eq!(
            c.frame().await,
            r#"{"T":"connwarn","Reason":"unauthorized"}"#
        );
        // No answer is expected, and the interval restarts in full.
        env.clock.advance(INTERVAL - MS);
        c.quiet().await;
        env.clock.advance(MS);
        assert_eq!(c.frame().await, PING);
        c.device.write_frame(PONG);
        c.quiet().await;
        queue
            .feed(Rc::new(ConnMetaExchange {
                msg: ConnMeta::Broken("host-mismatch".to_owned()),
            }))
            .expect("room");
        assert_eq!(
            c.frame().await,
            r#"{"T":"connbroken","Reason":"host-mismatch"}"#
        );
        let end = c.closed().await;
        assert!(matches!(end, SessionEnd::ConnBroken), "{end:?}");
        assert_eq!(end.to_string(), "connbroken");
        env.assert_unregistered("dev-1");
    });
}

/// `dev-1`'s older session, written a notification and waiting for its ACK, and the
/// newer session that took over meanwhile.
async fn taken_over_waiting_for_an_ack(env: &Env) -> (Conn, Conn) {
    env.notify("dev-1", "m1", r#""hello""#);
    let older = env.connected("s1", "dev-1").await;
    assert!(older.frame().await.starts_with(r#"{"T":"notifications""#));
    let newer = env.connected("s2", "dev-1").await;
    (older, newer)
}

#[test]
fn a_newer_registration_ends_an_older_session_waiting_for_an_ack_after_the_takeover_wait() {
    run_local(|| async {
        let env = Env::new();
        let (mut older, mut newer) = taken_over_waiting_for_an_ack(&env).await;
        // No ACK: the older session gives it the takeover wait, not its exchange timeout,
        // and the newer one sends nothing meanwhile.
        older.assert_running().await;
        newer.quiet().await;
        env.clock.advance(TAKEOVER_ACK_WAIT - MS);
        older.assert_running().await;
        newer.quiet().await;
        env.clock.advance(MS);
        let end = older.closed().await;
        assert!(end.is_terminated(), "{end:?}");
        // The newer connection gets what the older never acknowledged.
        assert!(newer.frame().await.starts_with(r#"{"T":"notifications""#));
        newer.device.write_frame(ACK);
        newer.quiet().await;
        assert!(env.pending("dev-1").is_empty(), "the ACK dropped it");
    });
}

#[test]
fn an_ack_on_the_older_connection_after_a_reconnection_is_taken_and_not_sent_again() {
    run_local(|| async {
        let env = Env::new();
        // The device ACKed and reconnected at once: the newer registration is taken
        // before the ACK is read.
        let (mut older, mut newer) = taken_over_waiting_for_an_ack(&env).await;
        older.device.write_frame(ACK);
        let end = older.closed().await;
        assert!(end.is_terminated(), "{end:?}");
        assert!(env.pending("dev-1").is_empty(), "the older ACK dropped it");
        newer.quiet().await;
        assert_eq!(env.session_of("dev-1"), Some(2));
    });
}

#[test]
fn a_third_registration_also_waits_for_the_first_sessions_ack() {
    run_local(|| async {
        let env = Env::new();
        let (mut older, mut second) = taken_over_waiting_for_an_ack(&env).await;
        // The device reconnects once more before the first connection's ACK is read.
        let mut third = env.connected("s3", "dev-1").await;
        let end = second.closed().await;
        assert!(end.is_terminated(), "{end:?}");
        third.quiet().await;
        older.device.write_frame(ACK);
        let end = older.closed().await;
        assert!(end.is_terminated(), "{end:?}");
        assert!(env.pending("dev-1").is_empty(), "the first ACK dropped it");
        third.quiet().await;
        assert_eq!(env.session_of("dev-1"), Some(3));
    });
}

#[test]
fn a_newer_registration_terminates_the_older_session_and_stays_registered() {
    run_local(|| async {
        let env = Env::new();
        let mut older = env.connected("s1", "dev-1").await;
        assert_eq!(env.session_of("dev-1"), Some(1));
        let mut newer = env.connected("s2", "dev-1").await;
        let end = older.closed().await;
        assert!(end.is_terminated(), "{end:?}");
        assert_eq!(end.to_string(), "terminated");
        assert_eq!(env.session_of("dev-1"), Some(2), "the newer one stays");
        newer.assert_running().await;
        env.clock.advance(INTERVAL);
        assert_eq!(newer.frame().await, PING);
        newer.stop.send(()).expect("the session listens");
        let end = newer.closed().await;
        assert!(end.is_shutdown(), "{end:?}");
        env.assert_unregistered("dev-1");
    });
}

#[test]
fn shutdown_ends_the_session_and_unacknowledged_notifications_stay_pending() {
    run_local(|| async {
        let env = Env::new();
        env.notify("dev-1", "m1", "1");
        let mut c = env.connected("s1", "dev-1").await;
        assert!(c.frame().await.starts_with(r#"{"T":"notifications""#));
        c.stop.send(()).expect("the session listens");
        let end = c.closed().await;
        assert!(end.is_shutdown(), "{end:?}");
        assert_eq!(end.to_string(), "shutdown");
        assert_eq!(env.pending("dev-1"), ["m1"]);
        env.assert_unregistered("dev-1");
    });
}

#[test]
fn shutdown_while_idle_ends_the_session() {
    run_local(|| async {
        let env = Env::new();
        let mut c = env.connected("s1", "dev-1").await;
        env.clock.advance(INTERVAL / 2);
        c.quiet().await;
        c.stop.send(()).expect("the session listens");
        assert!(c.closed().await.is_shutdown());
        env.assert_unregistered("dev-1");
    });
}

#[test]
fn a_cancelled_session_unregisters_too() {
    run_local(|| async {
        let env = Env::new();
        let c = env.connected("s1", "dev-1").await;
        assert_eq!(env.session_of("dev-1"), Some(1));
        let Conn { device, task, stop } = c;
        assert!(task.cancel().await.is_none(), "it was still running");
        env.assert_unregistered("dev-1");
        drop((device, stop));
    });
}

// --- Memory -----------------------------------------------------------------------------

/// What one idle session's future may take: it lives as long as its connection.
const MAX_RUN_FUTURE: usize = 1536;

#[test]
#[allow(clippy::print_stderr)] // the measured size is what the test reports
fn the_session_future_is_small() {
    run_local(|| async {
        let store: Rc<dyn PendingStore> = Rc::new(InMemoryPendingStore::new());
        let broker = SimpleBroker::new(store, &TestBrokerConfig::default());
        let connect = ConnectMsg::default();
        let sid = SessionId("1".to_owned());
        let config = config();
        let clock = VirtualClock::new();
        let (_stop, stopped) = flume::bounded::<()>(1);
        let shutdown = async move {
            let _ = stopped.recv_async().await;
        };

        let listener =
            glommio::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound");
        let mut tcp = glommio::net::TcpStream::connect(addr)
            .await
            .expect("connect");
        let fut = run(
            &mut tcp,
            Box::new(connect.clone()),
            Vec::new(),
            &broker,
            &config,
            &GlommioClock,
            &sid,
            shutdown,
        );
        let tcp_size = std::mem::size_of_val(&fut);
        drop(fut);

        let (mut server, _device) = pipe();
        let fut = run(
            &mut server,
            Box::new(connect.clone()),
            Vec::new(),
            &broker,
            &config,
            &clock,
            &sid,
            future::pending::<()>(),
        );
        let pipe_size = std::mem::size_of_val(&fut);
        drop(fut);

        eprintln!(
            "session::run future: {tcp_size} B (glommio TcpStream, GlommioClock, SimpleBroker), \
             {pipe_size} B (pipe, VirtualClock)"
        );
        assert!(tcp_size <= MAX_RUN_FUTURE, "{tcp_size} B");
        assert!(pipe_size <= MAX_RUN_FUTURE, "{pipe_size} B");
    });
}

// --- The wire and the test doubles ------------------------------------------------------

#[test]
fn the_ping_frame_is_the_encoded_ping() {
    let mut buf = Vec::new();
    encode_frame(&mut buf, &Message::Ping).expect("PING encodes");
    assert_eq!(buf, PING_FRAME);
    assert_eq!(&PING_FRAME[2..], PING.as_bytes());
}

#[test]
fn session_ends_say_what_they_are() {
    let eof = SessionEnd::from(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    assert!(eof.is_eof());
    let reset = SessionEnd::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    assert!(matches!(reset, SessionEnd::Io(_)) && !reset.is_eof());
    let store = SessionEnd::from(BrokerError::from(crate::store::StoreError::Unavailable(
        "down".into(),
    )));
    assert!(matches!(store, SessionEnd::Broker(_)) && !store.is_abort());
    assert_eq!(store.to_string(), "down");
    for (w, text) in [
        (Waiting::Hello, "hello timeout"),
        (Waiting::Pong, "pong timeout"),
        (Waiting::Ack, "ack timeout"),
        (Waiting::Write, "write timeout"),
    ] {
        let end = SessionEnd::Timeout(w);
        assert!(end.is_timeout() && end.to_string().ends_with("timeout"));
        assert_eq!(end.to_string(), text);
    }
}

#[test]
fn manual_sleeps_complete_only_once_the_clock_reaches_their_deadline() {
    run_local(|| async {
        let clock = VirtualClock::new();
        let start = clock.now();
        let mut early = Box::pin(clock.sleep_until(start + Duration::from_secs(1)));
        let mut late = Box::pin(clock.sleep_until(start + Duration::from_secs(2)));
        assert!(future::poll_once(early.as_mut()).await.is_none());
        assert!(future::poll_once(late.as_mut()).await.is_none());
        assert_eq!(clock.sleepers(), 2);
        assert_eq!(clock.next_deadline(), Some(start + Duration::from_secs(1)));
        clock.advance(Duration::from_millis(999));
        assert!(future::poll_once(early.as_mut()).await.is_none());
        clock.advance(MS);
        assert!(future::poll_once(early.as_mut()).await.is_some());
        assert_eq!(clock.sleepers(), 1);
        drop(late);
        assert_eq!(clock.sleepers(), 0, "a dropped sleep is disarmed");
        // A task awaiting a sleep is woken by the advance.
        let waiter = clock.clone();
        let task = glommio::spawn_local(async move {
            waiter
                .sleep_until(waiter.now() + Duration::from_secs(5))
                .await;
        });
        settle().await;
        clock.advance(Duration::from_secs(5));
        assert!(within(task).await.is_some());
        assert_eq!(clock.elapsed(), Duration::from_secs(6));
    });
}

#[test]
fn the_pipe_blocks_the_server_at_capacity_and_reports_closes() {
    use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
    run_local(|| async {
        let (mut server, device) = pipe_with_capacity(4);
        let writer = glommio::spawn_local(async move {
            server.write_all(b"abcdefgh").await.expect("device reads");
            server
        });
        settle().await;
        assert_eq!(device.unread(), 4, "the writer waits for room");
        assert_eq!(device.read_available(), b"abcd");
        let mut server = within(writer).await.expect("the writer finished");
        assert_eq!(device.read_available(), b"efgh");
        // Device → server, then the device closes: EOF after the data.
        device.write(b"xy");
        device.close();
        assert!(!device.write(b"z"), "closed");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("reads");
        assert_eq!(got, b"xy");
        // A dropped device end breaks the server's writes.
        drop(device);
        let err = server.write_all(b"late").await.expect_err("broken");
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    });
}

#[test]
fn the_device_reads_frames_across_small_writes_and_sees_the_server_close() {
    use futures_lite::io::AsyncWriteExt;
    run_local(|| async {
        let (mut server, device) = pipe_with_capacity(3);
        let frame = b"\x00\x0c{\"T\":\"ping\"}".to_vec();
        let writer = glommio::spawn_local(async move {
            server.write_all(&frame).await.expect("device reads");
            drop(server);
        });
        assert_eq!(
            within(device.read_frame()).await.flatten().as_deref(),
            Some(PING)
        );
        within(writer).await.expect("the writer finished");
        assert_eq!(device.read_frame().await, None);
        assert!(device.is_server_closed());
    });
}
