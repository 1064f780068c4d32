//! Behaviour only the sharded broker has: ownership across shards, replication of
//! broadcasts, routing of unicasts, backpressure and the shard threads' life.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use futures_lite::future::block_on;
use pushbroker::broker::sharded::{
    Shard, ShardId, ShardPlacement, ShardedBroker, ShardedBrokerBuilder, owner_of_channel,
    owner_of_device,
};
use pushbroker::broker::testing::{FaultyStore, Performed, perform_acking};
use pushbroker::broker::testsuite::Revealed;
use pushbroker::broker::{
    Broker, BrokerError, BrokerSending, BrokerSession, LocalSession, Next, SessionId,
};
use pushbroker::protocol::{ConnectMsg, MAX_FRAME_BODY, Message, Payload, decode_message};
use pushbroker::store::{InternalChannelId, NotifyVerdict, PendingStore, UnicastRequest};

/// How long a test waits for something that should happen at once.
const PATIENCE: Duration = Duration::from_secs(10);

thread_local! {
    /// Sessions registered by these tests on this shard's thread, as a listener's session
    /// tasks would hold them.
    static HELD: RefCell<Vec<LocalSession>> = const { RefCell::new(Vec::new()) };
}

fn broker(nr_shards: usize, name: &str) -> ShardedBroker {
    let b = ShardedBrokerBuilder::new(nr_shards)
        .placement(ShardPlacement::Unbound)
        .name(name)
        .build();
    b.start().expect("shards start");
    b
}

fn connect(device: &str) -> ConnectMsg {
    ConnectMsg {
        device_id: device.to_owned(),
        info: serde_json::json!({"device": "mako", "channel": "daily"})
            .as_object()
            .cloned(),
        ..ConnectMsg::default()
    }
}

fn payload(json: &str) -> Payload {
    Payload::from_json(json).expect("test payload is JSON")
}

fn later() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

/// Registers `device` on shard `shard` (which must own it) and keeps the session there.
async fn register_on(b: &ShardedBroker, shard: ShardId, device: &str) -> Result<u64, BrokerError> {
    let msg = connect(device);
    b.sending()
        .run_task_on(shard, move |s| async move {
            let sess = s.register(&msg, &SessionId(msg.device_id.clone())).await?;
            let id = sess.id();
            HELD.with(|h| h.borrow_mut().push(sess));
            Ok(id)
        })
        .await?
}

/// Runs `f` on every session held on every shard; the results, shard by shard.
async fn on_held<R: Send + 'static>(
    b: &ShardedBroker,
    f: impl Fn(&Shard, &mut LocalSession) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let mut all = Vec::new();
    for i in 0..b.nr_shards() {
        let f = f.clone();
        let rs = b
            .sending()
            .run_on(ShardId(i), move |s| {
                HELD.with(|h| {
                    h.borrow_mut()
                        .iter_mut()
                        .map(|sess| f(s, sess))
                        .collect::<Vec<_>>()
                })
            })
            .await
            .expect("shard answers");
        all.extend(rs);
    }
    all
}

/// Drains a session's queue: what it held, revealed.
fn drain(sess: &mut LocalSession) -> Vec<Revealed> {
    let mut got = Vec::new();
    while let Some(next) = sess.session_channel().try_next() {
        let terminated = matches!(next, Next::Terminated);
        got.push(Revealed::of(&next));
        if terminated {
            break;
        }
    }
    got
}

/// Polls `check` until it holds or [`PATIENCE`] runs out.
fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    check()
}

fn body(frame: &[u8]) -> serde_json::Value {
    serde_json::from_slice(&frame[2..]).expect("frame body is JSON")
}

#[test]
fn registering_on_a_shard_that_does_not_own_the_device_names_the_owner() {
    let b = broker(2, "own-test");
    let device = "dev-wrong-shard";
    let owner = owner_of_device(device, 2);
    let other = ShardId(1 - owner.0);
    let err = block_on(register_on(&b, other, device)).expect_err("not the owner");
    match err {
        BrokerError::WrongShard { owner: o } => assert_eq!(o, owner),
        e => panic!("expected WrongShard, got {e:?}"),
    }
    block_on(b.stop());
}

#[test]
fn sessions_of_one_device_arriving_on_different_shards_last_wins() {
    let b = broker(2, "last-wins");
    let device = "dev-last-wins";
    let owner = owner_of_device(device, 2);
    let other = ShardId(1 - owner.0);
    // A connection accepted on the other shard moves to the owner and registers there.
    let (tx, rx) = flume::bounded(2);
    let msg = connect(device);
    block_on(b.sending().run_on(other, move |s| {
        s.post(owner, move |o| {
            let o = o.clone();
            glommio::spawn_local(async move {
                let r = o.register(&msg, &SessionId("s1".into())).await.map(|sess| {
                    let id = sess.id();
                    HELD.with(|h| h.borrow_mut().push(sess));
                    id
                });
                let _ = tx.send(r);
            })
            .detach();
        });
    }))
    .expect("shard answers");
    let first = rx
        .recv_timeout(PATIENCE)
        .expect("first registered")
        .expect("ok");
    // A second connection of the same device, accepted on the owner itself.
    let second = block_on(register_on(&b, owner, device)).expect("second registered");
    assert_ne!(first, second);

    let states = block_on(on_held(&b, |_, sess| {
        (sess.id(), sess.session_channel().is_terminated())
    }));
    assert_eq!(states, vec![(first, true), (second, false)]);
    let live =
        block_on(b.sending().run_on(owner, move |s| s.session_of(device))).expect("owner answers");
    assert_eq!(live, Some(second));
    // The older session ending does not unregister the newer one.
    block_on(b.sending().run_on(owner, |s| {
        HELD.with(|h| {
            let held = h.borrow();
            s.unregister(&held[0]);
        });
    }))
    .expect("owner answers");
    let live =
        block_on(b.sending().run_on(owner, move |s| s.session_of(device))).expect("owner answers");
    assert_eq!(live, Some(second));
    block_on(b.stop());
}

#[test]
fn one_broadcast_reaches_every_session_on_every_shard_exactly_once() {
    const DEVICES: usize = 200;
    let b = broker(4, "bcast-once");
    for i in 0..DEVICES {
        let device = format!("dev-{i}");
        block_on(register_on(&b, owner_of_device(&device, 4), &device)).expect("registered");
    }
    // Take what feeding pending queued (one unicast exchange each).
    let pending = block_on(on_held(&b, |_, sess| drain(sess)));
    assert!(pending.iter().all(|got| got.len() == 1));

    let top = block_on(b.sending().publish(
        InternalChannelId::System,
        payload(r#"{"daily/mako":{"build":7}}"#),
        later(),
    ))
    .expect("published");
    assert_eq!(top, 1);

    assert!(
        eventually(|| {
            let stats = block_on(on_shards(&b, |s| s.stats()));
            stats.iter().all(|st| st.broadcast_fanouts == 1)
        }),
        "every shard delivers the broadcast"
    );
    let stats = block_on(on_shards(&b, |s| (s.session_count(), s.stats())));
    for (i, (sessions, st)) in stats.iter().enumerate() {
        assert_eq!(st.broadcast_fanouts, 1, "shard {i}");
        assert_eq!(st.broadcast_feeds as usize, *sessions, "shard {i}");
        assert_eq!(st.refused_feeds, 0, "shard {i}");
    }
    assert_eq!(stats.iter().map(|(n, _)| n).sum::<usize>(), DEVICES);

    // Each device gets one BROADCAST with the payload, and nothing more.
    let frames = block_on(on_held(&b, |_, sess| {
        let mut frames = Vec::new();
        while let Some(Next::Exchange(e)) = sess.session_channel().try_next() {
            match perform_acking(&*e, sess).expect("performed") {
                Performed::Acked(fs) => frames.extend(fs),
                other => panic!("unexpected {other:?}"),
            }
        }
        frames
    }));
    assert_eq!(frames.len(), DEVICES);
    for per_device in &frames {
        assert_eq!(per_device.len(), 1);
        let msg = body(&per_device[0]);
        assert_eq!(msg["T"], "broadcast");
        assert_eq!(msg["TopLevel"], 1);
        assert_eq!(
            msg["Payloads"],
            serde_json::json!([{"daily/mako": {"build": 7}}])
        );
    }
    block_on(b.stop());
}

/// Runs `f` on every shard; the results in shard order.
async fn on_shards<R: Send + 'static>(
    b: &ShardedBroker,
    f: impl Fn(&Shard) -> R + Send + Clone + 'static,
) -> Vec<R> {
    let mut out = Vec::new();
    for i in 0..b.nr_shards() {
        let f = f.clone();
        out.push(
            b.sending()
                .run_on(ShardId(i), f)
                .await
                .expect("shard answers"),
        );
    }
    out
}

#[test]
fn replicas_agree_after_concurrent_publishes() {
    let b = broker(4, "replicas");
    let sending = b.sending();
    let publishers: Vec<_> = (0..4)
        .map(|t| {
            let sending = sending.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let p = payload(&format!(r#"{{"t":{t},"i":{i}}}"#));
                    loop {
                        match block_on(sending.publish(
                            InternalChannelId::System,
                            p.clone(),
                            later(),
                        )) {
                            Ok(_) => break,
                            Err(BrokerError::QueueFull) => std::thread::yield_now(),
                            Err(e) => panic!("publish failed: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().expect("publisher thread");
    }
    let snapshots = || {
        block_on(on_shards(&b, |s| {
            s.store()
                .get_channel_snapshot(&InternalChannelId::System)
                .expect("snapshot")
        }))
    };
    assert!(eventually(|| snapshots()
        .iter()
        .all(|(top, _)| *top == 100)));
    let snaps = snapshots();
    for (top, notifs) in &snaps {
        assert_eq!(*top, 100);
        assert_eq!(
            notifs, &snaps[0].1,
            "every replica holds the same notifications in order"
        );
    }
    block_on(b.stop());
}

#[test]
fn unicasts_are_applied_and_delivered_on_the_owner_wherever_they_come_from() {
    const DEVICES: usize = 20;
    let b = broker(4, "ucast-route");
    for i in 0..DEVICES {
        let device = format!("udev-{i}");
        block_on(register_on(&b, owner_of_device(&device, 4), &device)).expect("registered");
    }
    block_on(on_held(&b, |_, sess| drain(sess)));
    for i in 0..DEVICES {
        let device = format!("udev-{i}");
        let req = UnicastRequest {
            chan_id: InternalChannelId::unicast(&device, &device),
            app_id: "app".into(),
            payload: payload(&format!(r#"{{"n":{i}}}"#)),
            expiration: later(),
            replace_tag: None,
            clear_pending: false,
        };
        let verdict = match i % 3 {
            0 => block_on(b.sending().notify(req)),
            // From a task on shard 0, through the inbox of the owner.
            1 => block_on(b.sending().run_task_on(ShardId(0), move |s| async move {
                s.sending().notify(req).await
            }))
            .expect("shard 0 answers"),
            // From a task on shard 0 as an API handler does: applied there when shard 0
            // owns the device, else on the owner.
            _ => block_on(b.sending().run_task_on(ShardId(0), move |s| async move {
                s.notify_from_here(req).await
            }))
            .expect("shard 0 answers"),
        };
        assert!(
            matches!(verdict, Ok(NotifyVerdict::Accepted { .. })),
            "{verdict:?}"
        );
    }
    // Each device's channel is in its owner's store only.
    let held = block_on(on_shards(&b, |s| {
        (0..DEVICES)
            .filter(|i| {
                let device = format!("udev-{i}");
                let chan = InternalChannelId::unicast(&device, &device);
                !s.store()
                    .get_channel_snapshot(&chan)
                    .expect("snapshot")
                    .1
                    .is_empty()
            })
            .collect::<Vec<_>>()
    }));
    for (shard, devices) in held.iter().enumerate() {
        for i in devices {
            let device = format!("udev-{i}");
            assert_eq!(owner_of_device(&device, 4), ShardId(shard));
        }
    }
    assert_eq!(held.iter().map(Vec::len).sum::<usize>(), DEVICES);

    // Each session got a unicast exchange; performing it delivers the payload, and the
    // ACK empties the channel.
    let delivered = block_on(on_held(&b, |s, sess| {
        let mut payloads = Vec::new();
        while let Some(Next::Exchange(e)) = sess.session_channel().try_next() {
            if let Performed::Acked(frames) = perform_acking(&*e, sess).expect("performed") {
                for f in frames {
                    let (msg, _) = decode_message(&f, MAX_FRAME_BODY).expect("decodes");
                    if let Message::Notifications(n) = msg {
                        payloads.extend(n.notifications.iter().map(|n| n.payload.get().to_owned()));
                    }
                }
            }
        }
        let chan = sess.internal_channel_id();
        let left = s
            .store()
            .get_channel_snapshot(&chan)
            .expect("snapshot")
            .1
            .len();
        (sess.device_identifier().to_owned(), payloads, left)
    }));
    assert_eq!(delivered.len(), DEVICES);
    for (device, payloads, left) in delivered {
        let i: usize = device.trim_start_matches("udev-").parse().expect("index");
        assert_eq!(payloads, vec![format!(r#"{{"n":{i}}}"#)], "{device}");
        assert_eq!(left, 0, "{device}: ACK drops what was delivered");
    }
    block_on(b.stop());
}

#[test]
fn a_notify_whose_commit_never_comes_is_answered_unavailable_not_left_hanging() {
    let b = ShardedBrokerBuilder::new(1)
        .placement(ShardPlacement::Unbound)
        .store(|_| Rc::new(FaultyStore::new().with_hanging_commits()) as Rc<dyn PendingStore>)
        .name("hung-disk")
        .build();
    b.start().expect("shards start");
    let req = UnicastRequest {
        chan_id: InternalChannelId::unicast("offline", "offline"),
        app_id: "app".into(),
        payload: payload(r#"{"n":1}"#),
        expiration: later(),
        replace_tag: None,
        clear_pending: false,
    };
    // The answer waits for the commit for a few seconds at most, then says the store
    // is unavailable (a 503 from the API) instead of waiting for ever.
    match block_on(b.sending().notify(req.clone())) {
        Err(BrokerError::Store(e)) => assert!(e.is_unavailable(), "{e:?}"),
        other => panic!("expected the store unavailable, got {other:?}"),
    }
    // The same when the notify is applied on the shard that asks.
    let here = block_on(b.sending().run_task_on(ShardId(0), move |s| async move {
        s.notify_from_here(req).await
    }))
    .expect("shard 0 answers");
    match here {
        Err(BrokerError::Store(e)) => assert!(e.is_unavailable(), "{e:?}"),
        other => panic!("expected the store unavailable, got {other:?}"),
    }
    b.stop_blocking();
}

#[test]
fn notify_past_the_limit_answers_too_many_pending_with_the_newest_payload() {
    let b = ShardedBrokerBuilder::new(2)
        .placement(ShardPlacement::Unbound)
        .max_notifications_per_app(2)
        .name("too-many")
        .build();
    b.start().expect("shards start");
    let chan = InternalChannelId::unicast("offline", "offline");
    let req = |n: u32| UnicastRequest {
        chan_id: chan.clone(),
        app_id: "app".into(),
        payload: payload(&format!(r#"{{"n":{n}}}"#)),
        expiration: later(),
        replace_tag: None,
        clear_pending: false,
    };
    for n in 0..2 {
        let v = block_on(b.sending().notify(req(n))).expect("applied");
        assert!(matches!(v, NotifyVerdict::Accepted { .. }));
    }
    let v = block_on(b.sending().notify(req(2))).expect("applied");
    assert_eq!(
        v,
        NotifyVerdict::TooManyPending {
            newest: payload(r#"{"n":1}"#)
        }
    );
    let owner = owner_of_channel(&chan, 2);
    let c = chan.clone();
    let pending = block_on(b.sending().run_on(owner, move |s| {
        s.store()
            .get_channel_snapshot(&c)
            .expect("snapshot")
            .1
            .len()
    }))
    .expect("owner answers");
    assert_eq!(pending, 2);
    block_on(b.stop());
}

#[test]
fn a_full_inbox_is_an_error_to_the_caller_not_a_wait() {
    // Not started: nothing drains the inboxes (one request each).
    let b = ShardedBrokerBuilder::new(2)
        .config(&pushbroker::broker::testing::TestBrokerConfig {
            session_queue_size: 10,
            broker_queue_size: 1,
        })
        .placement(ShardPlacement::Unbound)
        .build();
    let sending = b.sending();
    sending
        .broadcast(InternalChannelId::System)
        .expect("room for one");
    match sending.broadcast(InternalChannelId::System) {
        Err(e @ BrokerError::QueueFull) => assert!(e.is_unavailable()),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    let req = UnicastRequest {
        chan_id: InternalChannelId::unicast("d", "d"),
        app_id: "app".into(),
        payload: payload("1"),
        expiration: later(),
        replace_tag: None,
        clear_pending: false,
    };
    match block_on(sending.notify(req)) {
        Err(BrokerError::QueueFull) => {}
        other => panic!("expected QueueFull, got {other:?}"),
    }
}

#[test]
fn a_session_that_never_reads_gets_broadcasts_coalesced() {
    let b = ShardedBrokerBuilder::new(1)
        .config(&pushbroker::broker::testing::TestBrokerConfig {
            session_queue_size: 2,
            broker_queue_size: 64,
        })
        .placement(ShardPlacement::Unbound)
        .name("coalesce")
        .build();
    b.start().expect("shards start");
    block_on(register_on(&b, ShardId(0), "slow")).expect("registered");
    for i in 0..50 {
        block_on(b.sending().publish(
            InternalChannelId::System,
            payload(&format!(r#"{{"daily/mako":{i}}}"#)),
            later(),
        ))
        .expect("published");
    }
    assert!(eventually(|| {
        block_on(on_shards(&b, |s| {
            s.store()
                .get_channel_snapshot(&InternalChannelId::System)
                .map(|(top, _)| top)
        }))[0]
            == Ok(50)
            && block_on(on_shards(&b, |s| s.stats().broadcast_fanouts))[0] >= 1
    }));
    // Let the last fan-out land, then look at the queue: the unicast exchange from
    // feeding pending and one broadcast exchange at the newest level.
    assert!(eventually(|| {
        let got = block_on(on_held(&b, |_, sess| sess.session_channel().len()));
        got == vec![2]
    }));
    assert!(eventually(|| {
        let last = block_on(on_held(&b, |_, sess| {
            // Peek: take and put back.
            let got = drain(sess);
            for r in &got {
                if let Some(e) = r.to_exchange() {
                    sess.feed(e);
                }
            }
            got
        }));
        matches!(
            &last[0][..],
            [
                Revealed::Unicast(_),
                Revealed::Broadcast { top_level: 50, .. }
            ]
        )
    }));
    let stats = block_on(on_shards(&b, |s| s.stats()));
    assert_eq!(stats[0].refused_feeds, 0);
    block_on(b.stop());
}

fn threads_named(prefix: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|comm| comm.starts_with(prefix))
        .count()
}

#[test]
fn stop_releases_every_executor_thread() {
    let b = ShardedBrokerBuilder::new(4)
        .placement(ShardPlacement::Unbound)
        .name("stoptst")
        .build();
    assert_eq!(threads_named("stoptst"), 0);
    b.start().expect("shards start");
    // Each thread names itself once running.
    assert!(
        eventually(|| threads_named("stoptst") >= 4),
        "one thread per shard"
    );
    block_on(b.stop());
    assert!(!b.running());
    assert!(
        eventually(|| threads_named("stoptst") == 0),
        "{} shard threads left",
        threads_named("stoptst")
    );
    // And they come back on a restart.
    b.start().expect("shards restart");
    assert!(eventually(|| threads_named("stoptst") >= 4));
    let top = block_on(
        b.sending()
            .publish(InternalChannelId::System, payload("1"), later()),
    )
    .expect("a restarted broker serves");
    assert_eq!(top, 1);
    b.stop_blocking();
    assert!(eventually(|| threads_named("stoptst") == 0));
}

/// A per-shard service that records where it ran, its stop, and its drop.
struct Probe {
    shard: pushbroker::broker::sharded::Shard,
    stopped: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.dropped
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl pushbroker::broker::sharded::ShardService for Probe {
    fn stop(self: std::rc::Rc<Self>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> {
        Box::pin(async move {
            glommio::timer::sleep(Duration::from_millis(5)).await;
            self.stopped
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
    }
}

type Counter = std::sync::Arc<std::sync::atomic::AtomicUsize>;

fn start_probes(
    b: &ShardedBroker,
) -> (
    pushbroker::broker::sharded::Sharded<Probe>,
    Counter,
    Counter,
) {
    let services = pushbroker::broker::sharded::Sharded::<Probe>::new(b.sending());
    let stopped = Counter::default();
    let dropped = Counter::default();
    for i in 0..b.nr_shards() {
        let (stopped, dropped) = (stopped.clone(), dropped.clone());
        let started = block_on(services.start_on(ShardId(i), move |s| {
            let probe = Probe {
                shard: s.clone(),
                stopped,
                dropped,
            };
            Ok::<_, ()>((probe, s.id()))
        }));
        assert_eq!(started.ok().and_then(Result::ok), Some(ShardId(i)));
    }
    (services, stopped, dropped)
}

#[test]
fn sharded_services_run_on_their_shard_and_stop_awaited() {
    let b = broker(2, "svc");
    let (services, stopped, dropped) = start_probes(&b);
    let ids = block_on(services.invoke_on_all(|p| async move { p.shard.id() }));
    assert_eq!(ids, vec![Some(ShardId(0)), Some(ShardId(1))]);
    let one = block_on(services.invoke_on(ShardId(1), |p| p.shard.id()));
    assert_eq!(one.ok().flatten(), Some(ShardId(1)));
    // stop() returns once every shard's stop has run (each sleeps first).
    block_on(services.stop());
    assert_eq!(stopped.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(dropped.load(std::sync::atomic::Ordering::SeqCst), 2);
    // Stopped: no service to call any more.
    let gone = block_on(services.invoke_on(ShardId(0), |p| p.shard.id()));
    assert_eq!(gone.ok().flatten(), None);
    b.stop_blocking();
}

#[test]
fn a_service_left_installed_is_dropped_when_its_shard_stops() {
    // Each probe holds its shard: a reference cycle the shard must break as it stops.
    let b = broker(2, "svc-left");
    let (_services, stopped, dropped) = start_probes(&b);
    assert_eq!(dropped.load(std::sync::atomic::Ordering::SeqCst), 0);
    b.stop_blocking();
    assert_eq!(dropped.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(stopped.load(std::sync::atomic::Ordering::SeqCst), 0);
}
