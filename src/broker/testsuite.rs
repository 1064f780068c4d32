//! The conformance suite every broker must pass (the original's `broker/testsuite`).
//!
//! Each behaviour is written once, as an async function generic over a [`SuiteBroker`]:
//! a broker under test wrapped with the hooks the suite needs to look inside it (the
//! original's `MakeBroker`, `RevealSession`, `RevealBroadcastExchange` …). The
//! [`broker_conformance!`](crate::broker_conformance) macro stamps every behaviour into a
//! `#[test]` of one module per implementation, so a failure names the broker that broke:
//!
//! ```text
//! pushbroker::broker_conformance!(simple, SimpleSuite::new, pushbroker::broker::testing::run_local);
//! ```

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use futures_lite::future;

use super::sharded::{
    ShardId, ShardPlacement, ShardedBroker, ShardedBrokerBuilder, ShardedSending, owner_of_channel,
    owner_of_device,
};
use super::simple::{SimpleBroker, SimpleBrokerSession};
use super::testing::{FaultyStore, LogCapture, TestBrokerConfig};
use super::{
    BroadcastExchange, Broker, BrokerError, BrokerSending, BrokerSession, ExchangeQueue,
    ExchangeRef, LevelsMap, LocalSession, Next, SessionId, UnicastExchange,
};
use crate::protocol::{ConnectMsg, Notification, Payload};
use crate::store::{InMemoryPendingStore, InternalChannelId, Metadata, PendingStore, StoreError};

/// How long the suite waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// Which store a broker under test is made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreSpec {
    /// An [`InMemoryPendingStore`].
    InMemory,
    /// A [`FaultyStore::original`] whose snapshots fail after `countdown_to_fail`
    /// successes.
    Failing {
        /// Successful snapshots before the failures start.
        countdown_to_fail: usize,
    },
}

impl StoreSpec {
    /// Builds the store on the calling thread.
    pub fn build(self) -> Rc<dyn PendingStore> {
        match self {
            StoreSpec::InMemory => Rc::new(InMemoryPendingStore::new()),
            StoreSpec::Failing { countdown_to_fail } => {
                Rc::new(FaultyStore::original(countdown_to_fail))
            }
        }
    }
}

/// An exchange as the suite sees it: what it would deliver, without its cached frames.
#[derive(Debug, Clone, PartialEq)]
pub enum Revealed {
    /// A [`BroadcastExchange`].
    Broadcast {
        /// Its channel.
        chan_id: InternalChannelId,
        /// Its top level.
        top_level: i64,
        /// Its notifications.
        notifications: Vec<Notification>,
        /// Its decoded payloads.
        decoded: Vec<Option<serde_json::Map<String, serde_json::Value>>>,
    },
    /// A [`UnicastExchange`].
    Unicast(UnicastExchange),
    /// Another kind of exchange, by its debug form.
    Other(String),
    /// The session was terminated by a newer registration.
    Terminated,
}

impl Revealed {
    /// Reveals what the session got.
    pub fn of(next: &Next) -> Self {
        match next {
            Next::Terminated => Revealed::Terminated,
            Next::Exchange(e) => Self::of_exchange(e),
        }
    }

    /// Reveals an exchange.
    pub fn of_exchange(e: &ExchangeRef) -> Self {
        if let Some(b) = e.as_any().downcast_ref::<BroadcastExchange>() {
            return Revealed::Broadcast {
                chan_id: b.chan_id.clone(),
                top_level: b.top_level,
                notifications: b.notifications.to_vec(),
                decoded: b.decoded(),
            };
        }
        if let Some(u) = e.as_any().downcast_ref::<UnicastExchange>() {
            return Revealed::Unicast(u.clone());
        }
        Revealed::Other(format!("{e:?}"))
    }

    /// The exchange this describes, to feed a session (`None` for what is not one).
    pub fn to_exchange(&self) -> Option<ExchangeRef> {
        match self {
            Revealed::Broadcast {
                chan_id,
                top_level,
                notifications,
                ..
            } => Some(Rc::new(BroadcastExchange::new(
                chan_id.clone(),
                *top_level,
                notifications.clone(),
            ))),
            Revealed::Unicast(u) => Some(Rc::new(u.clone())),
            Revealed::Other(_) | Revealed::Terminated => None,
        }
    }
}

/// A broker under test, with the hooks the suite needs.
#[allow(async_fn_in_trait)] // test harnesses run on one executor
pub trait SuiteBroker {
    /// A registered session under test.
    type Session: SuiteSession;
    /// Starts the broker.
    async fn start(&self);
    /// Stops the broker.
    async fn stop(&self);
    /// Whether it runs.
    fn running(&self) -> bool;
    /// Registers a session.
    async fn register(
        &self,
        connect: &ConnectMsg,
        session_id: &str,
    ) -> Result<Self::Session, BrokerError>;
    /// Unregisters a session; returns once the broker has processed it.
    async fn unregister(&self, sess: &Self::Session);
    /// The registration key of the live session of `device_id` (compare with
    /// [`SuiteSession::key`]).
    async fn reveal_session(&self, device_id: &str) -> Option<u64>;
    /// Asks for a broadcast delivery.
    fn broadcast(&self, chan: InternalChannelId) -> Result<(), BrokerError>;
    /// Asks for unicast deliveries.
    fn unicast(&self, chans: &[InternalChannelId]) -> Result<(), BrokerError>;
    /// Appends to a broadcast channel of the broker's store.
    async fn append_to_channel(
        &self,
        chan: &InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
    ) -> Result<(), StoreError>;
    /// Appends to a unicast channel of the broker's store.
    async fn append_to_unicast_channel(
        &self,
        chan: &InternalChannelId,
        notification: Notification,
        meta: Metadata,
    ) -> Result<(), StoreError>;
    /// A snapshot of a channel of the broker's store.
    async fn get_channel_snapshot(
        &self,
        chan: &InternalChannelId,
    ) -> Result<(i64, Vec<Notification>), StoreError>;
}

/// A registered session under test.
#[allow(async_fn_in_trait)] // test harnesses run on one executor
pub trait SuiteSession: std::fmt::Debug {
    /// Its registration key.
    fn key(&self) -> u64;
    /// [`BrokerSession::device_identifier`].
    fn device_identifier(&self) -> String;
    /// [`BrokerSession::device_image_model`].
    fn device_image_model(&self) -> String;
    /// [`BrokerSession::device_image_channel`].
    fn device_image_channel(&self) -> String;
    /// [`BrokerSession::levels`].
    fn levels(&self) -> LevelsMap;
    /// How many exchanges wait in its queue.
    async fn queued(&self) -> usize;
    /// The next thing from its queue, waiting up to [`PATIENCE`]; `None` when nothing came.
    async fn next_exchange(&self) -> Option<Revealed>;
    /// [`BrokerSession::get`].
    async fn get(
        &self,
        chan: &InternalChannelId,
        cached_ok: bool,
    ) -> Result<(i64, Vec<Notification>), BrokerError>;
    /// [`BrokerSession::drop_by_msg_id`].
    async fn drop_by_msg_id(
        &self,
        chan: &InternalChannelId,
        targets: &[Notification],
    ) -> Result<(), BrokerError>;
    /// [`BrokerSession::feed`].
    async fn feed(&self, exchange: &Revealed);
}

/// Defines the suite's tests once, as public `async fn`s, and stamps the same list into
/// [`broker_conformance!`](crate::broker_conformance): every test written here runs
/// against every broker the macro is invoked for, with no second list to keep in step.
///
/// `$d` is a literal `$`, for the metavariables of the macro defined inside.
macro_rules! suite {
    ($d:tt; $(
        $(#[$meta:meta])*
        pub async fn $test:ident<H: SuiteBroker>(
            $make:ident: impl Fn(StoreSpec, TestBrokerConfig) -> H $(,)?
        ) $body:block
    )*) => {
        $(
            $(#[$meta])*
            pub async fn $test<H: SuiteBroker>(
                $make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
            ) $body
        )*

        /// Stamps the conformance suite into a module of `#[test]`s, one per test of
        /// [`testsuite`](crate::broker::testsuite).
        ///
        /// `$make` is a `Fn(StoreSpec, TestBrokerConfig) -> impl SuiteBroker`, called
        /// inside the executor; `$run` runs a future-making closure to completion (e.g.
        /// [`run_local`](crate::broker::testing::run_local)).
        #[macro_export]
        macro_rules! broker_conformance {
            ($d name:ident, $d make:expr, $d run:path) => {
                mod $d name {
                    #[allow(unused_imports)]
                    use super::*;
                    $(
                        #[test]
                        fn $test() {
                            $d run(|| $crate::broker::testsuite::$test($d make));
                        }
                    )*
                }
            };
        }
    };
}

fn connect(device_id: &str) -> ConnectMsg {
    ConnectMsg {
        device_id: device_id.to_owned(),
        ..ConnectMsg::default()
    }
}

fn much_later() -> SystemTime {
    SystemTime::now() + Duration::from_secs(600)
}

fn payload(json: &str) -> Payload {
    match Payload::from_json(json) {
        Ok(p) => p,
        Err(e) => panic!("test payload {json} is not JSON: {e}"),
    }
}

/// Takes what feeding pending queued on a new session (at least one exchange).
async fn clear_of_pending<S: SuiteSession>(sess: &S) {
    assert!(sess.queued().await >= 1, "feeding pending queued nothing");
    assert!(sess.next_exchange().await.is_some());
}

/// Waits until `logs` has the line, up to [`PATIENCE`].
async fn logged(logs: &LogCapture, level: &str, message: &str) -> bool {
    let deadline = std::time::Instant::now() + PATIENCE;
    while std::time::Instant::now() < deadline {
        if logs.has_line(level, message) {
            return true;
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    logs.has_line(level, message)
}

suite! {$;
    /// An unknown device has no session.
    pub async fn unknown_device_has_no_session<H: SuiteBroker>(
        make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
    ) {
        let b = make(StoreSpec::InMemory, TestBrokerConfig::default());
        assert_eq!(b.reveal_session("FOO").await, None);
    }

    /// Start and stop may be repeated.
    pub async fn start_and_stop_are_idempotent<H: SuiteBroker>(
        make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
    ) {
        let b = make(StoreSpec::InMemory, TestBrokerConfig::default());
        assert!(!b.running());
        b.start().await;
        assert!(b.running());
        b.start().await;
        assert!(b.running());
        b.stop().await;
        assert!(!b.running());
        b.stop().await;
        assert!(!b.running());
    }

    /// Registration keeps the device id, model, image channel and levels; after
    /// unregistering the device has no session.
    pub async fn registration_keeps_device_model_channel_and_levels<H: SuiteBroker>(
        make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
    ) {
        let b = make(StoreSpec::InMemory, TestBrokerConfig::default());
        b.start().await;
        let mut msg = connect("dev-1");
        msg.levels = Some([("0".to_owned(), 5)].into_iter().collect());
        msg.info = Some(
            serde_json::json!({"device": "model", "channel": "daily"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
        let sess = b.register(&msg, "s1").await.expect("registration");
        assert_eq!(b.reveal_session("dev-1").await, Some(sess.key()));
        assert_eq!(sess.device_identifier(), "dev-1");
        assert_eq!(sess.device_image_model(), "model");
        assert_eq!(sess.device_image_channel(), "daily");
        let expected: LevelsMap = [(InternalChannelId::System, 5)].into_iter().collect();
        assert_eq!(sess.levels(), expected);
        b.unregister(&sess).await;
        assert_eq!(b.reveal_session("dev-1").await, None);
        b.stop().await;
    }

    /// A `Levels` key that is neither `"0"` nor 32 hex digits aborts registration.
    pub async fn bad_levels_key_aborts_registration<H: SuiteBroker>(
        make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
    ) {
        let b = make(StoreSpec::InMemory, TestBrokerConfig::default());
        b.start().await;
        let mut msg = connect("dev-1");
        msg.levels = Some([("z".to_owned(), 5)].into_iter().collect());
        let err = b
            .register(&msg, "s1")
            .await
            .expect_err("registration must fail");
        assert!(err.is_abort(), "{err:?}");
        assert_eq!(b.reveal_session("dev-1").await, None);
        b.stop().await;
    }

    /// A non-string `Info.device` or `Info.channel` aborts registration with "unexpected
    /// value in message".
    pub async fn wrongly_typed_info_value_aborts_registration<H: SuiteBroker>(
        make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
    ) {
        let b = make(StoreSpec::InMemory, TestBrokerConfig::default());
        b.start().await;
        for info in [
            serde_json::json!({"device": -1}),
            serde_json::json!({"device": "m", "channel": -1}),
        ] {
            let mut msg = connect("dev-1");
            msg.info = info.as_object().cloned();
            match b.register(&msg, "s1").await {
                Err(BrokerError::Abort(a)) => assert_eq!(a, super::ErrAbort::unexpected_value()),
                other => panic!("expected an abort for {info}, got {other:?}"),
            }
        }
        b.stop().await;
    }

    /// With a broadcast pending, registration queues a broadcast and a unicast exchange.
    pub async fn registering_with_pending_broadcast_queues_two_exchanges<H: SuiteBroker>(
        make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
    ) {
        let b = make(StoreSpec::InMemory, TestBrokerConfig::default());
        b.append_to_channel(
            &InternalChannelId::System,
            payload(r#"{"m": "M"}"#),
            much_later(),
        )
        .await
        .expect("append");
        b.start().await;
        let sess = b
            .register(&connect("dev-1"), "s1")
            .await
            .expect("registration");
        assert_eq!(sess.queued().await, 2);
        match sess.next_exchange().await {
            Some(Revealed::Broadcast { top_level, .. }) => assert_eq!(top_level, 1),
            other => panic!("expected the broadcast first, got {other:?}"),
        }
        match sess.next_exchange().await {
            Some(Revealed::Unicast(u)) => {
                assert_eq!(u.chan_id, InternalChannelId::unicast("dev-1", "dev-1"));
            }
            other => panic!("expected the unicast second, got {other:?}"),
        }
        b.stop().await;
    }

    /// A store failure while feeding pending is logged, and registration still succeeds.
    pub async fn store_failure_while_feeding_pending_is_logged_and_registration_succeeds<H: SuiteBroker>(
        make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
    ) {
        let logs = LogCapture::new();
        let _guard = logs.set_default();
        let b = make(
            StoreSpec::Failing {
                countdown_to_fail: 0,
            },
            TestBrokerConfig::default(),
        );
        b.start().await;
        let sess = b.register(&connect("dev-1"), "s1").await;
        assert!(sess.is_ok(), "{sess:?}");
        assert!(
            logged(
                &logs,
                "ERROR",
                "unsuccessful, get channel snapshot for 0 (cachedOk=true): get channel snapshot fail"
            )
            .await,
            "captured: {}",
            logs.captured()
        );
        b.stop().await;
    }

    /// A newer registration of the same device terminates the older session; unregistering
    /// the older one leaves the newer.
    pub async fn last_registration_wins<H: SuiteBroker>(
        make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
    ) {
        let b = make(StoreSpec::InMemory, TestBrokerConfig::default());
        b.start().await;
        let sess1 = b.register(&connect("dev-1"), "s1").await.expect("first");
        clear_of_pending(&sess1).await;
        let sess2 = b.register(&connect("dev-1"), "s2").await.expect("second");
        assert_eq!(sess1.next_exchange().await, Some(Revealed::Terminated));
        assert_eq!(b.reveal_session("dev-1").await, Some(sess2.key()));
        b.unregister(&sess1).await;
        assert_eq!(b.reveal_session("dev-1").await, Some(sess2.key()));
        b.stop().await;
    }

    /// A broadcast reaches every session with the channel, top level, notifications and
    /// decoded payloads.
    pub async fn broadcast_reaches_every_session<H: SuiteBroker>(
        make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
    ) {
        let b = make(StoreSpec::InMemory, TestBrokerConfig::default());
        b.start().await;
        let sess1 = b.register(&connect("dev-1"), "s1").await.expect("dev-1");
        clear_of_pending(&sess1).await;
        let sess2 = b.register(&connect("dev-2"), "s2").await.expect("dev-2");
        clear_of_pending(&sess2).await;
        let p = payload(r#"{"m": "M"}"#);
        b.append_to_channel(&InternalChannelId::System, p.clone(), much_later())
            .await
            .expect("append");
        b.broadcast(InternalChannelId::System).expect("broadcast");
        let expected = Revealed::Broadcast {
            chan_id: InternalChannelId::System,
            top_level: 1,
            notifications: vec![Notification::broadcast(p)],
            decoded: vec![serde_json::json!({"m": "M"}).as_object().cloned()],
        };
        assert_eq!(sess1.next_exchange().await, Some(expected.clone()));
        assert_eq!(sess2.next_exchange().await, Some(expected));
        b.stop().await;
    }

    /// A store failure during a broadcast is logged.
    pub async fn store_failure_during_broadcast_is_logged<H: SuiteBroker>(
        make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
    ) {
        let logs = LogCapture::new();
        let _guard = logs.set_default();
        let b = make(
            StoreSpec::Failing {
                countdown_to_fail: 1,
            },
            TestBrokerConfig::default(),
        );
        b.start().await;
        let sess = b
            .register(&connect("dev-1"), "s1")
            .await
            .expect("registration");
        clear_of_pending(&sess).await;
        b.broadcast(InternalChannelId::System).expect("broadcast");
        assert!(
            logged(
                &logs,
                "ERROR",
                "unsuccessful, get channel snapshot for 0 (cachedOk=false): get channel snapshot fail"
            )
            .await,
            "captured: {}",
            logs.captured()
        );
        b.stop().await;
    }

    /// Unicast deliveries reach exactly the addressed sessions.
    pub async fn unicast_reaches_exactly_the_addressed_sessions<H: SuiteBroker>(
        make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
    ) {
        let b = make(StoreSpec::InMemory, TestBrokerConfig::default());
        b.start().await;
        let chan1 = InternalChannelId::unicast("dev1", "dev1");
        let chan2 = InternalChannelId::unicast("dev2", "dev2");
        let mut sessions = Vec::new();
        for dev in ["dev1", "dev2", "dev3"] {
            let sess = b.register(&connect(dev), dev).await.expect("registration");
            clear_of_pending(&sess).await;
            sessions.push(sess);
        }
        for (chan, app, msg) in [(&chan1, "app1", "msg1"), (&chan2, "app2", "msg2")] {
            b.append_to_unicast_channel(
                chan,
                Notification::unicast(app, msg, payload(r#"{"m": "M"}"#)),
                Metadata::expiring(much_later()),
            )
            .await
            .expect("append");
        }
        b.unicast(&[chan2.clone(), chan1.clone()]).expect("unicast");
        for (sess, chan) in sessions.iter().zip([&chan1, &chan2]) {
            match sess.next_exchange().await {
                Some(Revealed::Unicast(u)) => assert_eq!(&u.chan_id, chan),
                other => panic!("expected a unicast exchange on {chan}, got {other:?}"),
            }
        }
        assert_eq!(sessions[2].queued().await, 0, "dev3 was not addressed");
        b.stop().await;
    }

    /// A session gets and drops its notifications through the broker's store.
    pub async fn get_and_drop_through_a_session<H: SuiteBroker>(
        make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
    ) {
        let b = make(StoreSpec::InMemory, TestBrokerConfig::default());
        b.start().await;
        let chan = InternalChannelId::unicast("dev3", "dev3");
        let sess = b
            .register(&connect("dev3"), "s1")
            .await
            .expect("registration");
        b.append_to_unicast_channel(
            &chan,
            Notification::unicast("app1", "msg1", payload(r#"{"m": "M1"}"#)),
            Metadata::expiring(much_later()),
        )
        .await
        .expect("append");
        let (_, expected) = b.get_channel_snapshot(&chan).await.expect("snapshot");
        let (_, notifs) = sess.get(&chan, false).await.expect("get");
        assert_eq!(notifs.len(), 1);
        assert_eq!(notifs, expected);
        sess.drop_by_msg_id(&chan, &notifs).await.expect("drop");
        let (_, notifs) = sess.get(&chan, true).await.expect("get again");
        assert!(notifs.is_empty());
        let (_, left) = b.get_channel_snapshot(&chan).await.expect("snapshot");
        assert!(left.is_empty());
        b.stop().await;
    }

    /// Store errors surface from a session's get and drop, and are logged.
    pub async fn store_errors_surface_from_get_and_drop<H: SuiteBroker>(
        make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
    ) {
        let logs = LogCapture::new();
        let _guard = logs.set_default();
        let b = make(
            StoreSpec::Failing {
                countdown_to_fail: 1,
            },
            TestBrokerConfig::default(),
        );
        b.start().await;
        let chan = InternalChannelId::unicast("dev3", "dev3");
        let sess = b
            .register(&connect("dev3"), "s1")
            .await
            .expect("registration");
        let err = sess.get(&chan, false).await.expect_err("get must fail");
        assert!(err.is_store(), "{err:?}");
        assert_eq!(err.to_string(), "get channel snapshot fail");
        assert!(
            logged(
                &logs,
                "ERROR",
                "unsuccessful, get channel snapshot for Udev3:dev3 (cachedOk=false): get channel snapshot fail"
            )
            .await,
            "captured: {}",
            logs.captured()
        );
        logs.reset();
        let err = sess
            .drop_by_msg_id(&chan, &[])
            .await
            .expect_err("drop must fail");
        assert!(err.is_store(), "{err:?}");
        assert!(
            logged(
                &logs,
                "ERROR",
                "unsuccessful, drop from channel Udev3:dev3: drop fail"
            )
            .await,
            "captured: {}",
            logs.captured()
        );
        b.stop().await;
    }

    /// Feeding a session queues exactly what was fed.
    pub async fn feeding_a_session_queues_exactly_what_was_fed<H: SuiteBroker>(
        make: impl Fn(StoreSpec, TestBrokerConfig) -> H,
    ) {
        let b = make(StoreSpec::InMemory, TestBrokerConfig::default());
        b.start().await;
        let sess = b
            .register(&connect("dev3"), "s1")
            .await
            .expect("registration");
        clear_of_pending(&sess).await;
        let bcast = Revealed::Broadcast {
            chan_id: InternalChannelId::System,
            top_level: 99,
            notifications: Vec::new(),
            decoded: Vec::new(),
        };
        sess.feed(&bcast).await;
        assert_eq!(sess.next_exchange().await, Some(bcast));
        let ucast = Revealed::Unicast(UnicastExchange {
            chan_id: InternalChannelId::unicast("dev21", "dev21"),
            cached_ok: true,
        });
        sess.feed(&ucast).await;
        assert_eq!(sess.next_exchange().await, Some(ucast));
        assert_eq!(sess.queued().await, 0);
        b.stop().await;
    }
}

/// Waits for the next thing on `queue`, up to [`PATIENCE`].
pub async fn next_within_patience(queue: &ExchangeQueue) -> Option<Revealed> {
    future::or(async { Some(Revealed::of(&queue.next().await)) }, async {
        glommio::timer::sleep(PATIENCE).await;
        None
    })
    .await
}

/// The [`SimpleBroker`] under test.
#[derive(Debug)]
pub struct SimpleSuite {
    broker: SimpleBroker,
    store: Rc<dyn PendingStore>,
}

impl SimpleSuite {
    /// A stopped simple broker over a store built from `store`.
    pub fn new(store: StoreSpec, config: TestBrokerConfig) -> Self {
        let store = store.build();
        Self {
            broker: SimpleBroker::new(Rc::clone(&store), &config),
            store,
        }
    }
}

/// A [`SimpleBrokerSession`] under test.
#[derive(Debug)]
pub struct SimpleSuiteSession {
    /// Borrowed only inside a method, never across `.await`.
    sess: RefCell<SimpleBrokerSession>,
    queue: Rc<ExchangeQueue>,
}

impl SuiteBroker for SimpleSuite {
    type Session = SimpleSuiteSession;

    async fn start(&self) {
        self.broker.start();
    }

    async fn stop(&self) {
        self.broker.stop().await;
    }

    fn running(&self) -> bool {
        self.broker.running()
    }

    async fn register(
        &self,
        connect: &ConnectMsg,
        session_id: &str,
    ) -> Result<SimpleSuiteSession, BrokerError> {
        let sess = self
            .broker
            .register(connect, &SessionId(session_id.to_owned()))
            .await?;
        Ok(SimpleSuiteSession {
            queue: sess.queue(),
            sess: RefCell::new(sess),
        })
    }

    async fn unregister(&self, sess: &SimpleSuiteSession) {
        self.broker.unregister(&sess.sess.borrow());
    }

    async fn reveal_session(&self, device_id: &str) -> Option<u64> {
        self.broker.session_of(device_id)
    }

    fn broadcast(&self, chan: InternalChannelId) -> Result<(), BrokerError> {
        self.broker.sending().broadcast(chan)
    }

    fn unicast(&self, chans: &[InternalChannelId]) -> Result<(), BrokerError> {
        self.broker.sending().unicast(chans)
    }

    async fn append_to_channel(
        &self,
        chan: &InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
    ) -> Result<(), StoreError> {
        self.store
            .append_to_channel(chan, payload, expiration)
            .map(|_| ())
    }

    async fn append_to_unicast_channel(
        &self,
        chan: &InternalChannelId,
        notification: Notification,
        meta: Metadata,
    ) -> Result<(), StoreError> {
        self.store
            .append_to_unicast_channel(chan, notification, meta)
    }

    async fn get_channel_snapshot(
        &self,
        chan: &InternalChannelId,
    ) -> Result<(i64, Vec<Notification>), StoreError> {
        self.store.get_channel_snapshot(chan)
    }
}

impl SuiteSession for SimpleSuiteSession {
    fn key(&self) -> u64 {
        self.sess.borrow().id()
    }

    fn device_identifier(&self) -> String {
        self.sess.borrow().device_identifier().to_owned()
    }

    fn device_image_model(&self) -> String {
        self.sess.borrow().device_image_model().to_owned()
    }

    fn device_image_channel(&self) -> String {
        self.sess.borrow().device_image_channel().to_owned()
    }

    fn levels(&self) -> LevelsMap {
        self.sess.borrow().levels().clone()
    }

    async fn queued(&self) -> usize {
        self.queue.len()
    }

    async fn next_exchange(&self) -> Option<Revealed> {
        next_within_patience(&self.queue).await
    }

    async fn get(
        &self,
        chan: &InternalChannelId,
        cached_ok: bool,
    ) -> Result<(i64, Vec<Notification>), BrokerError> {
        self.sess.borrow().get(chan, cached_ok)
    }

    async fn drop_by_msg_id(
        &self,
        chan: &InternalChannelId,
        targets: &[Notification],
    ) -> Result<(), BrokerError> {
        self.sess.borrow().drop_by_msg_id(chan, targets)
    }

    async fn feed(&self, exchange: &Revealed) {
        if let Some(e) = exchange.to_exchange() {
            self.sess.borrow().feed(e);
        }
    }
}

thread_local! {
    /// The sessions a [`ShardedSuite`] registered on this shard's thread, by registration
    /// key. Test harness state only: each shard thread has its own, and it dies with the
    /// shard.
    static SUITE_SESSIONS: RefCell<ahash::AHashMap<u64, Rc<RefCell<LocalSession>>>> =
        RefCell::new(ahash::AHashMap::new());
}

fn suite_session(key: u64) -> Option<Rc<RefCell<LocalSession>>> {
    SUITE_SESSIONS.with(|m| m.borrow().get(&key).cloned())
}

/// The [`ShardedBroker`] under test: every session is registered on, and kept by, its
/// owner shard; the suite reaches it there by message.
#[derive(Debug)]
pub struct ShardedSuite {
    broker: ShardedBroker,
    sending: ShardedSending,
}

impl ShardedSuite {
    /// A stopped sharded broker of `nr_shards` shards, each with a store built from
    /// `store`.
    pub fn new(store: StoreSpec, config: TestBrokerConfig, nr_shards: usize) -> Self {
        let broker = ShardedBrokerBuilder::new(nr_shards)
            .config(&config)
            .placement(ShardPlacement::Unbound)
            .store(move |_| store.build())
            .build();
        Self {
            sending: broker.sending(),
            broker,
        }
    }

    /// The broker under test.
    pub fn broker(&self) -> &ShardedBroker {
        &self.broker
    }

    fn owner(&self, device_id: &str) -> ShardId {
        owner_of_device(device_id, self.broker.nr_shards())
    }
}

/// A session registered on a [`ShardedSuite`]'s shard, reached by message.
#[derive(Debug)]
pub struct ShardedSuiteSession {
    sending: ShardedSending,
    shard: ShardId,
    key: u64,
    device_id: String,
    model: String,
    image_channel: String,
    /// The levels at registration.
    levels: LevelsMap,
}

impl ShardedSuiteSession {
    async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut LocalSession) -> R + Send + 'static,
    ) -> R {
        let key = self.key;
        let r = self
            .sending
            .run_on(self.shard, move |_| {
                suite_session(key).map(|sess| f(&mut sess.borrow_mut()))
            })
            .await;
        match r {
            Ok(Some(r)) => r,
            Ok(None) => panic!("session {key} is gone from {}", self.shard),
            Err(e) => panic!("{} did not answer: {e}", self.shard),
        }
    }
}

fn store_error(e: BrokerError) -> StoreError {
    match e {
        BrokerError::Store(e) => e,
        other => StoreError::Unavailable(crate::store::StoreFault::new(other)),
    }
}

impl SuiteBroker for ShardedSuite {
    type Session = ShardedSuiteSession;

    async fn start(&self) {
        if let Err(e) = self.broker.start() {
            panic!("cannot start the sharded broker: {e}");
        }
    }

    async fn stop(&self) {
        self.broker.stop().await;
    }

    fn running(&self) -> bool {
        self.broker.running()
    }

    async fn register(
        &self,
        connect: &ConnectMsg,
        session_id: &str,
    ) -> Result<ShardedSuiteSession, BrokerError> {
        let shard = self.owner(&connect.device_id);
        let device_id = connect.device_id.clone();
        let connect = connect.clone();
        let track = SessionId(session_id.to_owned());
        let registered = self
            .sending
            .run_task_on(shard, move |s| async move {
                let sess = s.register(&connect, &track).await?;
                let key = sess.id();
                let info = (
                    key,
                    sess.device_image_model().to_owned(),
                    sess.device_image_channel().to_owned(),
                    sess.levels().clone(),
                );
                SUITE_SESSIONS.with(|m| m.borrow_mut().insert(key, Rc::new(RefCell::new(sess))));
                Ok::<_, BrokerError>(info)
            })
            .await??;
        let (key, model, image_channel, levels) = registered;
        Ok(ShardedSuiteSession {
            sending: self.sending.clone(),
            shard,
            key,
            device_id,
            model,
            image_channel,
            levels,
        })
    }

    async fn unregister(&self, sess: &ShardedSuiteSession) {
        let key = sess.key;
        let done = self
            .sending
            .run_on(sess.shard, move |s| {
                if let Some(local) = suite_session(key) {
                    s.unregister(&local.borrow());
                }
            })
            .await;
        if let Err(e) = done {
            panic!("{} did not answer: {e}", sess.shard);
        }
    }

    async fn reveal_session(&self, device_id: &str) -> Option<u64> {
        if !self.broker.running() {
            // Stopped shards keep no sessions (and would not answer until started).
            return None;
        }
        let device = device_id.to_owned();
        match self
            .sending
            .run_on(self.owner(device_id), move |s| s.session_of(&device))
            .await
        {
            Ok(key) => key,
            Err(e) => panic!("no answer about {device_id}: {e}"),
        }
    }

    fn broadcast(&self, chan: InternalChannelId) -> Result<(), BrokerError> {
        self.sending.broadcast(chan)
    }

    fn unicast(&self, chans: &[InternalChannelId]) -> Result<(), BrokerError> {
        self.sending.unicast(chans)
    }

    async fn append_to_channel(
        &self,
        chan: &InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
    ) -> Result<(), StoreError> {
        // Replicas live in the shards: appending before the suite starts the broker starts
        // it now (starting again is a no-op).
        self.start().await;
        self.sending
            .append_everywhere(chan.clone(), payload, expiration)
            .await
            .map(|_| ())
            .map_err(store_error)
    }

    async fn append_to_unicast_channel(
        &self,
        chan: &InternalChannelId,
        notification: Notification,
        meta: Metadata,
    ) -> Result<(), StoreError> {
        let owner = owner_of_channel(chan, self.broker.nr_shards());
        let chan = chan.clone();
        self.sending
            .run_on(owner, move |s| {
                s.store()
                    .append_to_unicast_channel(&chan, notification, meta)
            })
            .await
            .map_err(store_error)?
    }

    async fn get_channel_snapshot(
        &self,
        chan: &InternalChannelId,
    ) -> Result<(i64, Vec<Notification>), StoreError> {
        let owner = owner_of_channel(chan, self.broker.nr_shards());
        let chan = chan.clone();
        self.sending
            .run_on(owner, move |s| s.store().get_channel_snapshot(&chan))
            .await
            .map_err(store_error)?
    }
}

impl SuiteSession for ShardedSuiteSession {
    fn key(&self) -> u64 {
        self.key
    }

    fn device_identifier(&self) -> String {
        self.device_id.clone()
    }

    fn device_image_model(&self) -> String {
        self.model.clone()
    }

    fn device_image_channel(&self) -> String {
        self.image_channel.clone()
    }

    fn levels(&self) -> LevelsMap {
        self.levels.clone()
    }

    async fn queued(&self) -> usize {
        self.with(|sess| sess.session_channel().len()).await
    }

    async fn next_exchange(&self) -> Option<Revealed> {
        let key = self.key;
        let r = self
            .sending
            .run_task_on(self.shard, move |_| async move {
                let queue = suite_session(key).map(|s| s.borrow().queue())?;
                next_within_patience(&queue).await
            })
            .await;
        match r {
            Ok(r) => r,
            Err(e) => panic!("{} did not answer: {e}", self.shard),
        }
    }

    async fn get(
        &self,
        chan: &InternalChannelId,
        cached_ok: bool,
    ) -> Result<(i64, Vec<Notification>), BrokerError> {
        let chan = chan.clone();
        self.with(move |sess| sess.get(&chan, cached_ok)).await
    }

    async fn drop_by_msg_id(
        &self,
        chan: &InternalChannelId,
        targets: &[Notification],
    ) -> Result<(), BrokerError> {
        let chan = chan.clone();
        let targets = targets.to_vec();
        self.with(move |sess| sess.drop_by_msg_id(&chan, &targets))
            .await
    }

    async fn feed(&self, exchange: &Revealed) {
        let exchange = exchange.clone();
        self.with(move |sess| {
            if let Some(e) = exchange.to_exchange() {
                sess.feed(e);
            }
        })
        .await;
    }
}
