//! Delivery through whole brokers: one broadcast fanned out to 1k and 10k in-process
//! sessions, and a round of unicasts to 1k sessions, on the one-executor broker and on
//! the sharded broker with 1 and 2 shards, in the same run.
//!
//! Sessions are tasks on their executor that perform every exchange at once, as a device
//! that ACKs immediately would (no sockets: this measures the broker). A round ends when
//! every session has ACKed what the round sent it; throughput is reported per delivery.

#![allow(missing_docs)] // criterion_group! generates an undocumented function

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_lite::future::block_on;
use pushbroker::broker::sharded::{
    ShardId, ShardPlacement, ShardedBroker, ShardedBrokerBuilder, owner_of_device,
};
use pushbroker::broker::simple::SimpleBroker;
use pushbroker::broker::testing::{Performed, TestBrokerConfig, perform_acking};
use pushbroker::broker::{Broker, BrokerSending, LocalSession, Next, SessionId};
use pushbroker::protocol::{ConnectMsg, Payload};
use pushbroker::store::{
    InMemoryPendingStore, InternalChannelId, NotifyVerdict, PendingStore, UnicastRequest,
    apply_notify,
};

/// Counts ACKed exchanges on one executor and says when a round is complete there.
struct Progress {
    /// ACKs that complete a round on this executor.
    per_round: Cell<u64>,
    acked: Cell<u64>,
    done: flume::Sender<()>,
}

thread_local! {
    static PROGRESS: RefCell<Option<Rc<Progress>>> = const { RefCell::new(None) };
}

fn progress() -> Rc<Progress> {
    PROGRESS
        .with(|p| p.borrow().clone())
        .expect("progress installed on this executor")
}

fn install_progress(done: flume::Sender<()>) {
    PROGRESS.with(|p| {
        *p.borrow_mut() = Some(Rc::new(Progress {
            per_round: Cell::new(u64::MAX),
            acked: Cell::new(0),
            done,
        }))
    });
}

fn set_round(per_round: u64) {
    let p = progress();
    p.per_round.set(per_round.max(1));
    p.acked.set(0);
}

/// A device that ACKs every part at once.
async fn ack_loop(mut sess: LocalSession) {
    let queue = sess.queue();
    let progress = progress();
    loop {
        let Next::Exchange(e) = queue.next().await else {
            return;
        };
        match perform_acking(&*e, &mut sess) {
            Ok(Performed::Acked(_)) => {
                let acked = progress.acked.get() + 1;
                progress.acked.set(acked);
                if acked == progress.per_round.get() {
                    progress.acked.set(0);
                    let _ = progress.done.send(());
                }
            }
            Ok(_) => {}
            Err(e) => panic!("exchange failed: {e}"),
        }
    }
}

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

fn payload(round: u64) -> Payload {
    Payload::from_json(&format!(
        r#"{{"daily/mako":{{"build":{round},"note":"{}"}}}}"#,
        "x".repeat(64)
    ))
    .expect("JSON")
}

fn soon() -> SystemTime {
    // Old rounds expire and are pruned, so the channel stays bounded however long
    // criterion runs (yet no round's notification expires before it is delivered).
    SystemTime::now() + Duration::from_secs(2)
}

fn config() -> TestBrokerConfig {
    TestBrokerConfig {
        session_queue_size: 16,
        broker_queue_size: 4096,
    }
}

/// A broker under measurement.
trait Rig {
    /// Sends one broadcast and waits until every session ACKed it.
    fn broadcast_round(&mut self);
    /// Notifies every session once and waits until every one ACKed.
    fn unicast_round(&mut self);
}

/// The sharded broker with acking sessions spread over their owner shards.
struct ShardedRig {
    broker: ShardedBroker,
    devices: Vec<String>,
    per_shard: Vec<u64>,
    done: flume::Receiver<()>,
    round: u64,
}

impl ShardedRig {
    fn new(nr_shards: usize, sessions: usize) -> Self {
        let broker = ShardedBrokerBuilder::new(nr_shards)
            .config(&config())
            .placement(ShardPlacement::Auto)
            .name("bench")
            .build();
        broker.start().expect("shards start");
        let (done_tx, done) = flume::unbounded();
        let sending = broker.sending();
        for i in 0..nr_shards {
            let tx = done_tx.clone();
            block_on(sending.run_on(ShardId(i), move |_| install_progress(tx))).expect("shard");
        }
        let devices: Vec<String> = (0..sessions).map(|i| format!("device-{i:06}")).collect();
        let mut per_shard = vec![0u64; nr_shards];
        for d in &devices {
            let owner = owner_of_device(d, nr_shards);
            per_shard[owner.0] += 1;
            let msg = connect(d);
            block_on(sending.run_task_on(owner, move |s| async move {
                let sess = s
                    .register(&msg, &SessionId(msg.device_id.clone()))
                    .await
                    .expect("registers");
                glommio::spawn_local(ack_loop(sess)).detach();
            }))
            .expect("shard");
        }
        // A round, broadcast or unicast, completes on a shard when each of its sessions
        // ACKed once.
        for (i, n) in per_shard.iter().copied().enumerate() {
            block_on(sending.run_on(ShardId(i), move |_| set_round(n))).expect("shard");
        }
        Self {
            broker,
            devices,
            per_shard,
            done,
            round: 0,
        }
    }

    fn wait(&self, signals: usize) {
        for _ in 0..signals {
            self.done
                .recv_timeout(Duration::from_secs(30))
                .expect("round completes");
        }
    }
}

impl Rig for ShardedRig {
    fn broadcast_round(&mut self) {
        self.round += 1;
        let p = payload(self.round);
        block_on(
            self.broker
                .sending()
                .publish(InternalChannelId::System, p, soon()),
        )
        .expect("published");
        self.wait(self.per_shard.iter().filter(|&&n| n > 0).count());
    }

    fn unicast_round(&mut self) {
        self.round += 1;
        let sending = self.broker.sending();
        let futures: Vec<_> = self
            .devices
            .iter()
            .map(|d| {
                sending.notify(UnicastRequest {
                    chan_id: InternalChannelId::unicast(d, d),
                    app_id: "com.example.app_app".into(),
                    payload: payload(self.round),
                    expiration: SystemTime::now() + Duration::from_secs(60),
                    replace_tag: None,
                    clear_pending: false,
                })
            })
            .collect();
        // Poll every notify once before waiting for any, so all are in flight at once
        // (as concurrent API requests would be).
        for verdict in block_on(join_all(futures)) {
            match verdict {
                Ok(NotifyVerdict::Accepted { .. }) => {}
                other => panic!("notify failed: {other:?}"),
            }
        }
        self.wait(self.per_shard.iter().filter(|&&n| n > 0).count());
    }
}

/// Awaits all `futures` concurrently; their outputs in order.
async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future completed"))
        .collect()
}

/// What the one-executor broker's thread is asked to do.
enum SimpleCmd {
    Broadcast(u64),
    Unicast(u64),
    Stop,
}

/// The one-executor broker on its own thread, with its sessions.
struct SimpleRig {
    cmds: flume::Sender<SimpleCmd>,
    done: flume::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
    round: u64,
}

impl SimpleRig {
    fn new(sessions: usize) -> Self {
        let (cmds, cmd_rx) = flume::unbounded::<SimpleCmd>();
        let (done_tx, done) = flume::unbounded();
        let (ready_tx, ready) = flume::bounded(1);
        let thread = std::thread::spawn(move || {
            let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .io_memory(64 << 10)
                .preempt_timer(Duration::from_millis(5))
                .make()
                .expect("executor");
            ex.run(async move {
                install_progress(done_tx);
                set_round(sessions as u64);
                let store: Rc<dyn PendingStore> = Rc::new(InMemoryPendingStore::new());
                let broker = SimpleBroker::new(Rc::clone(&store), &config());
                broker.start();
                let devices: Vec<String> =
                    (0..sessions).map(|i| format!("device-{i:06}")).collect();
                for d in &devices {
                    let sess = broker
                        .register(&connect(d), &SessionId(d.clone()))
                        .await
                        .expect("registers");
                    glommio::spawn_local(ack_loop(sess)).detach();
                }
                let sending = broker.sending();
                let _ = ready_tx.send(());
                while let Ok(cmd) = cmd_rx.recv_async().await {
                    match cmd {
                        SimpleCmd::Broadcast(round) => {
                            store
                                .append_to_channel(
                                    &InternalChannelId::System,
                                    payload(round),
                                    soon(),
                                )
                                .expect("appends");
                            sending
                                .broadcast(InternalChannelId::System)
                                .expect("queued");
                        }
                        SimpleCmd::Unicast(round) => {
                            let mut chans = Vec::with_capacity(devices.len());
                            for (i, d) in devices.iter().enumerate() {
                                let chan = InternalChannelId::unicast(d, d);
                                let req = UnicastRequest {
                                    chan_id: chan.clone(),
                                    app_id: "com.example.app_app".into(),
                                    payload: payload(round),
                                    expiration: SystemTime::now() + Duration::from_secs(60),
                                    replace_tag: None,
                                    clear_pending: false,
                                };
                                apply_notify(&*store, &req, 100, format!("{round}-{i}"))
                                    .expect("applies");
                                chans.push(chan);
                            }
                            for chunk in chans.chunks(1024) {
                                sending.unicast(chunk).expect("queued");
                                glommio::yield_if_needed().await;
                            }
                        }
                        SimpleCmd::Stop => break,
                    }
                }
                broker.stop().await;
            });
        });
        ready.recv().expect("simple broker ready");
        Self {
            cmds,
            done,
            thread: Some(thread),
            round: 0,
        }
    }
}

impl Rig for SimpleRig {
    fn broadcast_round(&mut self) {
        self.round += 1;
        self.cmds
            .send(SimpleCmd::Broadcast(self.round))
            .expect("thread alive");
        self.done
            .recv_timeout(Duration::from_secs(30))
            .expect("round completes");
    }

    fn unicast_round(&mut self) {
        self.round += 1;
        self.cmds
            .send(SimpleCmd::Unicast(self.round))
            .expect("thread alive");
        self.done
            .recv_timeout(Duration::from_secs(30))
            .expect("round completes");
    }
}

impl Drop for SimpleRig {
    fn drop(&mut self) {
        let _ = self.cmds.send(SimpleCmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn measure(rig: &mut dyn Rig, iters: u64, unicast: bool) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        if unicast {
            rig.unicast_round();
        } else {
            rig.broadcast_round();
        }
    }
    start.elapsed()
}

fn make(kind: &str, sessions: usize) -> Box<dyn Rig> {
    match kind {
        "simple" => Box::new(SimpleRig::new(sessions)),
        "sharded-1" => Box::new(ShardedRig::new(1, sessions)),
        "sharded-2" => Box::new(ShardedRig::new(2, sessions)),
        other => unreachable!("no rig {other}"),
    }
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("broadcast_fanout");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    for sessions in [1_000usize, 10_000] {
        group.throughput(Throughput::Elements(sessions as u64));
        for kind in ["simple", "sharded-1", "sharded-2"] {
            let mut rig = make(kind, sessions);
            group.bench_function(BenchmarkId::new(kind, sessions), |b| {
                b.iter_custom(|iters| measure(rig.as_mut(), iters, false))
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("unicast_round");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    let sessions = 1_000usize;
    group.throughput(Throughput::Elements(sessions as u64));
    for kind in ["simple", "sharded-1", "sharded-2"] {
        let mut rig = make(kind, sessions);
        group.bench_function(BenchmarkId::new(kind, sessions), |b| {
            b.iter_custom(|iters| measure(rig.as_mut(), iters, true))
        });
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
