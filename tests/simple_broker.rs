//! The simple broker through its public API: registration while stopped, the sending
//! facet across threads, the broker's own bounded queue, unicast to absent devices, a
//! large broadcast fan-out, and catch-up sharing one exchange per backlog.

use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use futures_lite::future;
use pushbroker::broker::simple::{SimpleBroker, SimpleBrokerSending, SimpleBrokerSession};
use pushbroker::broker::testing::{Performed, TestBrokerConfig, perform_acking, run_local};
use pushbroker::broker::{
    BroadcastExchange, Broker, BrokerError, BrokerSending, BrokerSession, ExchangeQueue,
    ExchangeRef, Next, SessionId, UnicastExchange,
};
use pushbroker::protocol::{ConnectMsg, Notification, Payload};
use pushbroker::store::{
    Clock, InMemoryPendingStore, InternalChannelId, ManualClock, Metadata, PendingStore,
};

/// How long a test waits for something that should happen at once.
const PATIENCE: Duration = Duration::from_secs(10);

fn much_later() -> SystemTime {
    SystemTime::now() + Duration::from_secs(600)
}

fn payload(json: &str) -> Payload {
    Payload::from_json(json).expect("test payloads are JSON")
}

/// CONNECT of `device`, a `mako` on the `daily` image channel, at system level 0.
fn connect(device: &str) -> ConnectMsg {
    ConnectMsg {
        device_id: device.to_owned(),
        info: serde_json::json!({"device": "mako", "channel": "daily"})
            .as_object()
            .cloned(),
        levels: Some([("0".to_owned(), 0)].into_iter().collect()),
        ..ConnectMsg::default()
    }
}

fn broker(store: &Rc<InMemoryPendingStore>, config: TestBrokerConfig) -> SimpleBroker {
    SimpleBroker::new(Rc::clone(store) as Rc<dyn PendingStore>, &config)
}

async fn register(b: &SimpleBroker, device: &str) -> SimpleBrokerSession {
    b.register(&connect(device), &SessionId(format!("s-{device}")))
        .await
        .unwrap_or_else(|e| panic!("registration of {device} failed: {e}"))
}

/// Takes what waits in `queue` without waiting.
fn drain(queue: &ExchangeQueue) -> Vec<ExchangeRef> {
    let mut out = Vec::new();
    while let Some(next) = queue.try_next() {
        match next {
            Next::Exchange(e) => out.push(e),
            Next::Terminated => panic!("unexpectedly terminated"),
        }
    }
    out
}

/// Waits for the next thing on `queue`, up to [`PATIENCE`].
async fn next_within_patience(queue: &ExchangeQueue) -> Option<Next> {
    future::or(async { Some(queue.next().await) }, async {
        glommio::timer::sleep(PATIENCE).await;
        None
    })
    .await
}

/// Polls `cond` every millisecond until it holds, up to [`PATIENCE`].
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    cond()
}

fn as_broadcast(e: &ExchangeRef) -> &BroadcastExchange {
    e.as_any()
        .downcast_ref::<BroadcastExchange>()
        .unwrap_or_else(|| panic!("expected a broadcast exchange, got {e:?}"))
}

fn as_unicast(e: &ExchangeRef) -> &UnicastExchange {
    e.as_any()
        .downcast_ref::<UnicastExchange>()
        .unwrap_or_else(|| panic!("expected a unicast exchange, got {e:?}"))
}

fn frame_body(frame: &[u8]) -> &str {
    let len = usize::from(u16::from_be_bytes([frame[0], frame[1]]));
    assert_eq!(len, frame.len() - 2);
    std::str::from_utf8(&frame[2..]).expect("frames are UTF-8")
}

/// Compiles only for a type any thread may hold and clone.
fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}

#[test]
fn the_sending_facet_is_send_and_clone() {
    assert_send_sync_clone::<SimpleBrokerSending>();
    fn assert_sending<T: BrokerSending>() {}
    assert_sending::<SimpleBrokerSending>();
}

#[test]
fn register_fails_with_not_running_until_started() {
    run_local(|| async {
        let store = Rc::new(InMemoryPendingStore::new());
        let b = broker(&store, TestBrokerConfig::default());
        assert!(!b.running());
        let err = b
            .register(&connect("dev1"), &SessionId("s1".to_owned()))
            .await
            .expect_err("not running");
        assert!(matches!(err, BrokerError::NotRunning), "{err:?}");
        assert_eq!(b.session_of("dev1"), None);
        assert_eq!(b.session_count(), 0);

        b.start();
        let sess = register(&b, "dev1").await;
        assert_eq!(b.session_of("dev1"), Some(sess.id()));
        assert_eq!(b.session_count(), 1);

        b.stop().await;
        let err = b
            .register(&connect("dev2"), &SessionId("s2".to_owned()))
            .await
            .expect_err("stopped again");
        assert!(matches!(err, BrokerError::NotRunning), "{err:?}");
        assert_eq!(b.session_of("dev2"), None);
    });
}

#[test]
fn a_broadcast_asked_for_from_another_thread_is_delivered() {
    run_local(|| async {
        let store = Rc::new(InMemoryPendingStore::new());
        let b = broker(&store, TestBrokerConfig::default());
        b.start();
        let mut sess = register(&b, "dev1").await;
        let queue = sess.queue();
        // In step with the empty system channel: only the unicast exchange is pending.
        let pending = drain(&queue);
        assert_eq!(pending.len(), 1);
        as_unicast(&pending[0]);

        store
            .append_to_channel(
                &InternalChannelId::System,
                payload(r#"{"daily/mako":"hello"}"#),
                much_later(),
            )
            .expect("append");
        let sending = b.sending();
        let asked = std::thread::spawn(move || {
            let other = sending.clone();
            other.broadcast(InternalChannelId::System)
        })
        .join()
        .expect("the sending thread ran");
        assert!(asked.is_ok(), "{asked:?}");

        let next = next_within_patience(&queue).await.expect("delivered");
        let exchange = next.exchange().expect("an exchange").clone();
        let bcast = as_broadcast(&exchange);
        assert_eq!(bcast.chan_id, InternalChannelId::System);
        assert_eq!(bcast.top_level, 1);
        assert_eq!(bcast.notifications.len(), 1);

        // Performed on the session, it is the BROADCAST the device expects.
        match perform_acking(exchange.as_ref(), &mut sess).expect("performed") {
            Performed::Acked(frames) => {
                assert_eq!(frames.len(), 1);
                assert_eq!(
                    frame_body(&frames[0]),
                    r#"{"T":"broadcast","ChanId":"0","TopLevel":1,"Payloads":[{"daily/mako":"hello"}]}"#
                );
            }
            other => panic!("expected an ACKed broadcast, got {other:?}"),
        }
        assert_eq!(sess.levels().get(&InternalChannelId::System), Some(&1));
        assert!(queue.is_empty());
        b.stop().await;
    });
}

#[test]
fn a_full_broker_queue_refuses_with_queue_full() {
    run_local(|| async {
        let store = Rc::new(InMemoryPendingStore::new());
        let config = TestBrokerConfig {
            broker_queue_size: 1,
            ..TestBrokerConfig::default()
        };
        let b = broker(&store, config);
        let sending = b.sending();
        sending
            .broadcast(InternalChannelId::System)
            .expect("room for one");
        let err = sending
            .broadcast(InternalChannelId::System)
            .expect_err("full");
        assert!(matches!(err, BrokerError::QueueFull), "{err:?}");
        assert!(err.is_unavailable());
        let dev = InternalChannelId::unicast("dev1", "dev1");
        let err = sending
            .unicast(std::slice::from_ref(&dev))
            .expect_err("full");
        assert!(matches!(err, BrokerError::QueueFull), "{err:?}");
        // Another facet shares the same queue.
        let err = b
            .sending()
            .broadcast(InternalChannelId::System)
            .expect_err("full for every facet");
        assert!(matches!(err, BrokerError::QueueFull), "{err:?}");

        // Once started, the broker takes what waits and there is room again.
        b.start();
        assert!(
            eventually(|| sending.unicast(std::slice::from_ref(&dev)).is_ok()).await,
            "the started broker never drained its queue"
        );
        b.stop().await;
    });
}

#[test]
fn unicast_to_a_device_that_is_not_connected_feeds_nobody() {
    run_local(|| async {
        let store = Rc::new(InMemoryPendingStore::new());
        let b = broker(&store, TestBrokerConfig::default());
        b.start();
        let sess = register(&b, "dev1").await;
        let queue = sess.queue();
        drain(&queue);

        let absent = InternalChannelId::unicast("dev2", "dev2");
        store
            .append_to_unicast_channel(
                &absent,
                Notification::unicast("app1", "m1", payload(r#"{"a":1}"#)),
                Metadata::expiring(much_later()),
            )
            .expect("append");
        let sending = b.sending();
        sending
            .unicast(std::slice::from_ref(&absent))
            .expect("asking for an absent device is fine");
        // Not a unicast channel at all: also fine, also nobody fed.
        sending
            .unicast(&[InternalChannelId::System])
            .expect("asking for a broadcast channel is fine");
        // The broker handles requests in order: once dev1 gets its own, the others are done.
        let own = InternalChannelId::unicast("dev1", "dev1");
        sending
            .unicast(std::slice::from_ref(&own))
            .expect("unicast to dev1");
        let next = next_within_patience(&queue).await.expect("dev1 fed");
        let exchange = next.exchange().expect("an exchange").clone();
        assert_eq!(as_unicast(&exchange).chan_id, own);
        assert!(queue.is_empty(), "dev1 got only its own delivery");
        assert!(b.running());
        assert_eq!(b.session_of("dev2"), None);
        // The absent device's notification waits for it.
        let (_, left) = store.get_channel_snapshot(&absent).expect("snapshot");
        assert_eq!(left.len(), 1);
        b.stop().await;
    });
}

#[test]
fn one_broadcast_reaches_two_thousand_sessions_exactly_once() {
    const SESSIONS: usize = 2_000;
    run_local(|| async {
        let store = Rc::new(InMemoryPendingStore::new());
        let b = broker(&store, TestBrokerConfig::default());
        b.start();
        let mut sessions = Vec::with_capacity(SESSIONS);
        for i in 0..SESSIONS {
            let sess = register(&b, &format!("dev{i}")).await;
            let pending = drain(&sess.queue());
            assert_eq!(pending.len(), 1, "dev{i} pending");
            sessions.push(sess);
        }
        assert_eq!(b.session_count(), SESSIONS);

        store
            .append_to_channel(
                &InternalChannelId::System,
                payload(r#"{"daily/mako":1}"#),
                much_later(),
            )
            .expect("append");
        let sending = b.sending();
        sending
            .broadcast(InternalChannelId::System)
            .expect("broadcast");
        // Requests are handled in order: once dev0's unicast arrives the fan-out is over.
        let dev0 = InternalChannelId::unicast("dev0", "dev0");
        sending
            .unicast(std::slice::from_ref(&dev0))
            .expect("unicast");
        let first = sessions[0].queue();
        assert!(
            eventually(|| first.len() == 2).await,
            "the fan-out did not finish"
        );

        let mut shared: Option<ExchangeRef> = None;
        for (i, sess) in sessions.iter_mut().enumerate() {
            let queue = sess.queue();
            let got = drain(&queue);
            let want = if i == 0 { 2 } else { 1 };
            assert_eq!(got.len(), want, "dev{i} got {got:?}");
            let bcast = as_broadcast(&got[0]);
            assert_eq!(bcast.top_level, 1, "dev{i}");
            if i == 0 {
                assert_eq!(as_unicast(&got[1]).chan_id, dev0);
            }
            // One exchange, shared by every session of the executor.
            match &shared {
                None => shared = Some(Rc::clone(&got[0])),
                Some(s) => assert!(Rc::ptr_eq(s, &got[0]), "dev{i} got another exchange"),
            }
            match perform_acking(got[0].as_ref(), sess).expect("performed") {
                Performed::Acked(frames) => assert_eq!(frames.len(), 1, "dev{i}"),
                other => panic!("dev{i}: expected an ACKed broadcast, got {other:?}"),
            }
            assert_eq!(sess.levels().get(&InternalChannelId::System), Some(&1));
        }
        // Nothing more comes for anyone.
        assert!(sessions.iter().all(|s| s.session_channel().is_empty()));
        b.stop().await;
    });
}

/// The broadcast exchange and the unicast one that registering at level 0 behind `chan`'s
/// backlog feeds `sess`; the broadcast one is returned.
fn catch_up_exchange(sess: &SimpleBrokerSession) -> ExchangeRef {
    let fed = drain(&sess.queue());
    assert_eq!(fed.len(), 2, "broadcast then unicast, got {fed:?}");
    as_unicast(&fed[1]);
    Rc::clone(&fed[0])
}

#[test]
fn sessions_catching_up_on_one_backlog_share_one_exchange() {
    run_local(|| async {
        let store = Rc::new(InMemoryPendingStore::new());
        let big = "x".repeat(2000);
        for i in 0..50 {
            store
                .append_to_channel(
                    &InternalChannelId::System,
                    payload(&format!(r#"{{"daily/mako":{i},"pad":"{big}"}}"#)),
                    much_later(),
                )
                .expect("append");
        }
        let b = broker(&store, TestBrokerConfig::default());
        b.start();
        let mut sessions = Vec::new();
        let mut shared: Option<ExchangeRef> = None;
        for i in 0..100 {
            let mut sess = register(&b, &format!("dev{i}")).await;
            let got = catch_up_exchange(&sess);
            assert_eq!(as_broadcast(&got).top_level, 50, "dev{i}");
            // One exchange, and so one encoded copy of the window, for every device
            // behind the same backlog.
            match &shared {
                None => shared = Some(Rc::clone(&got)),
                Some(s) => assert!(Rc::ptr_eq(s, &got), "dev{i} got its own exchange"),
            }
            match perform_acking(got.as_ref(), &mut sess).expect("performed") {
                Performed::Acked(frames) => {
                    let bodies: Vec<&str> = frames.iter().map(|f| frame_body(f)).collect();
                    let payloads: usize =
                        bodies.iter().map(|b| b.matches("daily/mako").count()).sum();
                    assert_eq!(payloads, 50, "dev{i} got every payload");
                }
                other => panic!("dev{i}: expected an ACKed broadcast, got {other:?}"),
            }
            assert_eq!(sess.levels().get(&InternalChannelId::System), Some(&50));
            sessions.push(sess);
        }

        // Once the channel moves on, a device arriving later gets the new state.
        store
            .append_to_channel(
                &InternalChannelId::System,
                payload(r#"{"daily/mako":"new"}"#),
                much_later(),
            )
            .expect("append");
        let late = register(&b, "late").await;
        let got = catch_up_exchange(&late);
        assert_eq!(as_broadcast(&got).top_level, 51);
        assert!(!Rc::ptr_eq(shared.as_ref().expect("shared"), &got));
        b.stop().await;
    });
}

#[test]
fn a_kept_exchange_is_not_handed_out_after_one_of_its_notifications_expired() {
    run_local(|| async {
        let clock = Rc::new(ManualClock::new(SystemTime::now()));
        let store = Rc::new(InMemoryPendingStore::with_clock(
            Rc::clone(&clock) as Rc<dyn Clock>
        ));
        let soon = clock.now() + Duration::from_secs(60);
        for (i, expiry) in [much_later(), soon, much_later()].into_iter().enumerate() {
            store
                .append_to_channel(
                    &InternalChannelId::System,
                    payload(&format!(r#"{{"daily/mako":{i}}}"#)),
                    expiry,
                )
                .expect("append");
        }
        let b = broker(&store, TestBrokerConfig::default());
        b.start();
        let first = register(&b, "dev1").await;
        let before = catch_up_exchange(&first);
        assert_eq!(as_broadcast(&before).notifications.len(), 3);

        clock.advance(Duration::from_secs(120));
        let second = register(&b, "dev2").await;
        let after = catch_up_exchange(&second);
        assert!(
            !Rc::ptr_eq(&before, &after),
            "the expired state was handed out"
        );
        let after = as_broadcast(&after);
        assert_eq!(after.top_level, 3);
        assert_eq!(
            after.notifications.len(),
            2,
            "the expired notification is left out"
        );
        b.stop().await;
    });
}

#[test]
fn sessions_share_one_copy_of_a_device_model_and_image_channel() {
    run_local(|| async {
        let store = Rc::new(InMemoryPendingStore::new());
        let b = broker(&store, TestBrokerConfig::default());
        b.start();
        let one = register(&b, "share-1").await;
        let two = register(&b, "share-2").await;
        assert_eq!(one.device_image_model(), "mako");
        assert_eq!(
            one.device_image_model().as_ptr(),
            two.device_image_model().as_ptr(),
            "two copies of the model"
        );
        assert_eq!(
            one.device_image_channel().as_ptr(),
            two.device_image_channel().as_ptr(),
            "two copies of the image channel"
        );
        b.stop().await;
    });
}
