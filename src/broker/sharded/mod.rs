//! The sharded thread-per-core broker: N glommio executors ("shards"), each owning
//! outright the sessions of the devices hashed to it, their unicast channels, and a replica
//! of the broadcast channels. Shards talk only by flume messages.
//!
//! # Who owns what
//!
//! - A device belongs to shard [`owner_of_device`]`(device_id)`: a fixed-seed hash, so every
//!   part of the process computes the same owner. Its session runs there (the listener
//!   migrates a connection to its owner before registering), and its unicast channel lives
//!   in that shard's store.
//! - A broadcast channel's **sequencer** is shard [`owner_of_channel`]`(channel)`. It assigns
//!   the next top level and appends, then sends the notification to every other shard, in
//!   order, over the mesh; each shard appends to its replica and feeds **one** shared
//!   exchange to all its sessions (frames encoded once per level window and device tag).
//! - A notify goes to the device's owner, which applies the store rules
//!   ([`apply_notify`](crate::store::apply_notify)), answers, and delivers if the device is
//!   connected there.
//!
//! # Messages
//!
//! Each shard has two receivers. Its **inbox** (bounded by `broker_queue_size`) takes
//! requests from any thread through [`ShardedSending`]; a full inbox is an error to the
//! caller ([`BrokerError::QueueFull`], the API's 503), never a blocked executor. Its
//! **mesh** receiver takes shard-to-shard traffic (replication, work to run on the shard):
//! unbounded, since everything on it was admitted through some inbox already, and batched:
//! a shard collects what it sends to each peer during a task turn and sends it as one
//! message.
//!
//! No lock sits on the delivery path. The only lock is [`ShardedBroker`]'s lifecycle state
//! (threads to join, receivers to hand to a restart), taken by start and stop alone.

mod shard;

use std::fmt;
use std::future::Future;
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use tracing::{debug, warn};

pub use shard::{Listener, ListenerCounts, Shard, ShardMetrics};

use super::{BrokerConfig, BrokerError, BrokerSending};
use crate::config;
use crate::protocol::{Notification, Payload};
use crate::store::{
    InMemoryPendingStore, InternalChannelId, NotifyVerdict, PendingStore, UnicastRequest,
};

/// A shard's index, `0..nr_shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub usize);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard-{}", self.0)
    }
}

/// The hasher behind ownership: fixed seeds, so the owner of a key is the same in every
/// thread and every run of the same build.
const OWNER_HASHER: ahash::RandomState = ahash::RandomState::with_seeds(
    0x7075_7368_6272_6f6b,
    0x6572_2d6f_776e_6572,
    0x0d15_ea5e_dead_beef,
    0x5eed_5eed_5eed_5eed,
);

/// The shard that owns device `device_id` among `nr_shards` (at least 1).
pub fn owner_of_device(device_id: &str, nr_shards: usize) -> ShardId {
    shard_of(OWNER_HASHER.hash_one(device_id), nr_shards)
}

/// The shard that owns channel `chan` among `nr_shards`: for a unicast channel, its
/// device's owner; for a broadcast channel, its sequencer.
pub fn owner_of_channel(chan: &InternalChannelId, nr_shards: usize) -> ShardId {
    match chan {
        InternalChannelId::Unicast { device, .. } => owner_of_device(device, nr_shards),
        other => shard_of(OWNER_HASHER.hash_one(other), nr_shards),
    }
}

fn shard_of(hash: u64, nr_shards: usize) -> ShardId {
    let n = nr_shards.max(1) as u64;
    // `hash % n < n <= usize::MAX`: the conversion cannot fail.
    ShardId(usize::try_from(hash % n).unwrap_or(0))
}

/// Makes each shard's store, on the shard's own thread.
pub type StoreFactory = Arc<dyn Fn(ShardId) -> Rc<dyn PendingStore> + Send + Sync>;

/// Work sent to run on a shard.
pub(crate) type ShardJob = Box<dyn FnOnce(&Shard) + Send>;

/// What the sharded broker's inboxes take: requests from any thread.
pub(crate) enum Request {
    /// Deliver the current state of a broadcast channel (to each shard) or of a unicast
    /// channel (to its owner): the original's `BrokerSending`.
    Deliver(Delivery),
    /// Append to a broadcast channel, on its sequencer.
    Publish {
        chan: InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
        /// Deliver to sessions (`/broadcast`), or only append everywhere and answer once
        /// every replica has it (test harnesses).
        deliver: bool,
        reply: flume::Sender<Result<i64, BrokerError>>,
    },
    /// Apply a notify, on the device's owner.
    Notify {
        req: UnicastRequest,
        reply: flume::Sender<Result<NotifyVerdict, BrokerError>>,
    },
    /// Run a job on the shard.
    Run(ShardJob),
    /// Stop the shard.
    Stop,
}

/// A delivery asked for through the original's sending facet.
#[derive(Debug, Clone)]
pub(crate) enum Delivery {
    Broadcast(InternalChannelId),
    Unicast(InternalChannelId),
}

/// Shard-to-shard traffic.
pub(crate) enum MeshMsg {
    /// A broadcast notification the sequencer appended at `top_level`.
    Replicate {
        chan: InternalChannelId,
        top_level: i64,
        notification: Notification,
        expiration: SystemTime,
        deliver: bool,
        /// Told once this replica has it.
        applied: Option<flume::Sender<()>>,
    },
    /// Run a job on the shard.
    Run(ShardJob),
}

/// A batch of mesh messages: what one shard sent another during one task turn.
pub(crate) type MeshBatch = Vec<MeshMsg>;

/// How shards are placed on CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardPlacement {
    /// Pin shard `i` to the `i`-th online CPU when there are at least as many CPUs as
    /// shards; otherwise leave them to the kernel.
    Auto,
    /// Leave every shard to the kernel's scheduler.
    Unbound,
}

/// What every shard is configured with.
#[derive(Clone)]
pub(crate) struct ShardConfig {
    pub(crate) nr_shards: usize,
    pub(crate) session_queue_size: usize,
    pub(crate) broker_queue_size: usize,
    pub(crate) max_notifications_per_app: usize,
    pub(crate) store: StoreFactory,
}

/// Builds a [`ShardedBroker`].
pub struct ShardedBrokerBuilder {
    config: ShardConfig,
    placement: ShardPlacement,
    preempt_timer: Duration,
    io_memory: usize,
    ring_depth: usize,
    spin_before_park: Option<Duration>,
    name: String,
}

impl fmt::Debug for ShardedBrokerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardedBrokerBuilder")
            .field("nr_shards", &self.config.nr_shards)
            .field("session_queue_size", &self.config.session_queue_size)
            .field("broker_queue_size", &self.config.broker_queue_size)
            .field("placement", &self.placement)
            .field("preempt_timer", &self.preempt_timer)
            .field("io_memory", &self.io_memory)
            .field("ring_depth", &self.ring_depth)
            .finish_non_exhaustive()
    }
}

/// How long [`ShardedBroker::stop_blocking`] waits for the shards to stop.
const SHARD_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`ShardedBroker::start`] waits for a shard's executor to come up.
const SHARD_START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a shard may run tasks before it checks for latency-sensitive work: short, so
/// one broadcast fan-out to many sessions never stalls pings and accepts.
pub const DEFAULT_PREEMPT_TIMER: Duration = Duration::from_millis(5);

/// glommio's DMA area per executor. A network broker does no file I/O, and the default
/// (10 MiB) would be resident in every shard.
pub const DEFAULT_IO_MEMORY: usize = 64 << 10;

/// Entries of each executor's io_uring submission queue. Every idle session keeps one
/// poll request armed, and the kernel files armed polls in a table of
/// `clamp(log2(completion entries) - 5, 1, 8)` hash bits that every cancellation walks
/// one bucket of; glommio cancels its preemption timers on each turn of its loop. With
/// glommio's 128 entries that table has 8 buckets (2,400 polls per walk at 19,000
/// sessions); 4,096 entries give it the full 256.
pub const DEFAULT_RING_DEPTH: usize = 4096;

impl ShardedBrokerBuilder {
    /// `nr_shards` shards (at least 1; may exceed the CPUs) with in-memory stores and the
    /// configuration's default queue sizes and limits
    /// ([`config`](crate::config#reference)).
    pub fn new(nr_shards: usize) -> Self {
        Self {
            config: ShardConfig {
                nr_shards: nr_shards.max(1),
                session_queue_size: config::DEFAULT_SESSION_QUEUE_SIZE,
                broker_queue_size: config::DEFAULT_BROKER_QUEUE_SIZE,
                max_notifications_per_app: config::DEFAULT_MAX_NOTIFICATIONS_PER_APP,
                store: Arc::new(|_| Rc::new(InMemoryPendingStore::new())),
            },
            placement: ShardPlacement::Auto,
            preempt_timer: DEFAULT_PREEMPT_TIMER,
            io_memory: DEFAULT_IO_MEMORY,
            ring_depth: DEFAULT_RING_DEPTH,
            spin_before_park: None,
            name: "shard".to_owned(),
        }
    }

    /// One shard per available CPU.
    pub fn per_cpu() -> Self {
        Self::new(std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// Takes the queue sizes of `config`.
    pub fn config(mut self, config: &dyn BrokerConfig) -> Self {
        self.config.session_queue_size = config.session_queue_size();
        self.config.broker_queue_size = config.broker_queue_size();
        self
    }

    /// The limit of live notifications one app may have pending for one device.
    pub fn max_notifications_per_app(mut self, max: usize) -> Self {
        self.config.max_notifications_per_app = max;
        self
    }

    /// How each shard makes its store (called on the shard's thread).
    pub fn store(
        mut self,
        factory: impl Fn(ShardId) -> Rc<dyn PendingStore> + Send + Sync + 'static,
    ) -> Self {
        self.config.store = Arc::new(factory);
        self
    }

    /// How shards are placed on CPUs.
    pub fn placement(mut self, placement: ShardPlacement) -> Self {
        self.placement = placement;
        self
    }

    /// The executors' preemption timer.
    pub fn preempt_timer(mut self, timer: Duration) -> Self {
        self.preempt_timer = timer;
        self
    }

    /// The executors' DMA memory.
    pub fn io_memory(mut self, bytes: usize) -> Self {
        self.io_memory = bytes;
        self
    }

    /// Entries of each executor's io_uring submission queue (at least 1).
    pub fn ring_depth(mut self, entries: usize) -> Self {
        self.ring_depth = entries.max(1);
        self
    }

    /// Spin this long before parking an idle shard (lower cross-shard latency, more CPU;
    /// ignored by glommio for unpinned shards).
    pub fn spin_before_park(mut self, spin: Duration) -> Self {
        self.spin_before_park = Some(spin);
        self
    }

    /// The shard threads' name prefix (`<name>-<i>`).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// The broker, stopped.
    pub fn build(self) -> ShardedBroker {
        let n = self.config.nr_shards;
        let mut inboxes = Vec::with_capacity(n);
        let mut meshes = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        for _ in 0..n {
            let (itx, irx) = flume::bounded(self.config.broker_queue_size.max(1));
            let (mtx, mrx) = flume::unbounded();
            inboxes.push(itx);
            meshes.push(mtx);
            receivers.push(ShardReceivers {
                inbox: irx,
                mesh: mrx,
            });
        }
        ShardedBroker {
            sending: ShardedSending {
                inboxes: inboxes.into(),
            },
            meshes: meshes.into(),
            builder: self,
            lifecycle: Mutex::new(Lifecycle {
                receivers: Some(receivers),
                threads: Vec::new(),
                stopped: None,
            }),
        }
    }
}

/// A shard's ends of its channels; handed back when the shard stops, for a restart.
pub(crate) struct ShardReceivers {
    pub(crate) inbox: flume::Receiver<Request>,
    pub(crate) mesh: flume::Receiver<MeshBatch>,
}

struct Lifecycle {
    /// While stopped: the receivers to start the shards with.
    receivers: Option<Vec<ShardReceivers>>,
    /// While running: the shard threads.
    threads: Vec<ExecutorJoinHandle<ShardReceivers>>,
    /// While running: where each shard says it stopped.
    stopped: Option<flume::Receiver<()>>,
}

/// The sharded broker: owns the shard threads. [`start`](ShardedBroker::start) them,
/// hand out [`sending`](ShardedBroker::sending) facets, [`stop`](ShardedBroker::stop)
/// them. Sessions register on their owner shard through [`Shard`].
///
/// # Example
///
/// Two shards; a broadcast sequenced and replicated to both, a notify applied on the
/// device's owner (kept pending: the device is not connected), then an orderly stop.
/// Any thread may use the sending facet; its calls are futures, awaited here with
/// `block_on`.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use futures_lite::future::block_on;
/// use pushbroker::store::{NotifyVerdict, UnicastRequest};
/// use pushbroker::{InternalChannelId, Payload, ShardedBrokerBuilder};
///
/// let broker = ShardedBrokerBuilder::new(2).build();
/// broker.start()?;
/// let sending = broker.sending();
/// let expiration = SystemTime::now() + Duration::from_secs(60);
///
/// let payload = Payload::from_json(r#"{"daily/mako":[42]}"#)?;
/// let level = block_on(sending.publish(InternalChannelId::System, payload, expiration))?;
/// assert_eq!(level, 1);
///
/// let verdict = block_on(sending.notify(UnicastRequest {
///     chan_id: InternalChannelId::unicast("dev-1", "dev-1"),
///     app_id: "com.example.app_app".into(),
///     payload: Payload::from_json(r#"{"message":"hello"}"#)?,
///     expiration,
///     replace_tag: None,
///     clear_pending: false,
/// }))?;
/// assert!(matches!(verdict, NotifyVerdict::Accepted { .. }));
///
/// broker.stop_blocking();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ShardedBroker {
    builder: ShardedBrokerBuilder,
    sending: ShardedSending,
    /// Every shard's mesh sender, wired once and cloned into each shard.
    meshes: Arc<[flume::Sender<MeshBatch>]>,
    /// Start/stop state. A lock only here: lifecycle, never delivery.
    lifecycle: Mutex<Lifecycle>,
}

impl fmt::Debug for ShardedBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardedBroker")
            .field("nr_shards", &self.nr_shards())
            .field("running", &self.running())
            .finish_non_exhaustive()
    }
}

impl ShardedBroker {
    /// How many shards there are.
    pub fn nr_shards(&self) -> usize {
        self.builder.config.nr_shards
    }

    /// The sending facet, for any thread.
    pub fn sending(&self) -> ShardedSending {
        self.sending.clone()
    }

    /// Whether the shards run.
    pub fn running(&self) -> bool {
        self.lock().receivers.is_none()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lifecycle> {
        self.lifecycle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts every shard, each on its own thread named `<name>-<i>`; does nothing when
    /// running. Each shard logs through the subscriber current here.
    ///
    /// # Errors
    /// When an executor cannot start (e.g. too little locked memory for io_uring); the
    /// shards already started are stopped again.
    pub fn start(&self) -> Result<(), glommio::GlommioError<()>> {
        let mut state = self.lock();
        let Some(receivers) = state.receivers.take() else {
            return Ok(());
        };
        let n = self.nr_shards();
        let cpus = match self.builder.placement {
            ShardPlacement::Auto => online_cpus().filter(|cpus| cpus.len() >= n),
            ShardPlacement::Unbound => None,
        };
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let (stopped_tx, stopped_rx) = flume::unbounded();
        let mut threads = Vec::with_capacity(n);
        let mut ready = Vec::with_capacity(n);
        let mut receivers = receivers.into_iter();
        for i in 0..n {
            let Some(rx) = receivers.next() else { break };
            let placement = match &cpus {
                Some(cpus) => Placement::Fixed(cpus[i]),
                None => Placement::Unbound,
            };
            let mut builder = LocalExecutorBuilder::new(placement)
                .name(&format!("{}-{i}", self.builder.name))
                .io_memory(self.builder.io_memory)
                .ring_depth(self.builder.ring_depth)
                .preempt_timer(self.builder.preempt_timer);
            if let Some(spin) = self.builder.spin_before_park {
                builder = builder.spin_before_park(spin);
            }
            let context = shard::ShardContext {
                id: ShardId(i),
                config: self.builder.config.clone(),
                sending: self.sending.clone(),
                meshes: Arc::clone(&self.meshes),
            };
            let dispatch = dispatch.clone();
            let stopped = stopped_tx.clone();
            let (ready_tx, ready_rx) = flume::bounded::<()>(1);
            ready.push(ready_rx);
            let spawned = builder.spawn(move || async move {
                // The executor is up. If it cannot be made (io_uring refused, too little
                // locked memory), this closure is dropped unrun and `ready_tx` with it.
                let _ = ready_tx.send(());
                let _log = tracing::dispatcher::set_default(&dispatch);
                let rx = shard::run(context, rx).await;
                // The broker may be gone already; nobody to tell then.
                let _ = stopped.send(());
                rx
            });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    warn!("cannot start shard {i}: {e}");
                    state.threads = threads;
                    state.stopped = Some(stopped_rx);
                    drop(state);
                    drop(stopped_tx);
                    // The receivers of the shards not started are lost with `receivers`.
                    self.stop_blocking();
                    return Err(e);
                }
            }
        }
        // Every shard holds its own; stopping counts on them alone.
        drop(stopped_tx);
        // A thread starts even when its executor then fails inside it: wait for each
        // executor to be up, so that a failure is an error now and not a broker whose
        // requests are never answered.
        for (i, ready) in ready.into_iter().enumerate() {
            let failure = match ready.recv_timeout(SHARD_START_TIMEOUT) {
                Ok(()) => continue,
                // The executor was never made: its thread returns why.
                Err(flume::RecvTimeoutError::Disconnected) => match threads.remove(i).join() {
                    Err(e) => e,
                    Ok(_) => glommio::GlommioError::IoError(std::io::Error::other(
                        "the shard ended before it started",
                    )),
                },
                Err(flume::RecvTimeoutError::Timeout) => {
                    glommio::GlommioError::IoError(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("shard {i} did not start within {SHARD_START_TIMEOUT:?}"),
                    ))
                }
            };
            warn!("cannot start shard {i}: {failure}");
            state.threads = threads;
            state.stopped = Some(stopped_rx);
            drop(state);
            self.stop_blocking();
            return Err(failure);
        }
        state.threads = threads;
        state.stopped = Some(stopped_rx);
        debug!(shards = n, "sharded broker started");
        Ok(())
    }

    /// Stops every shard and waits for their threads to end, without blocking the
    /// calling executor while they wind down. Sessions on the shards end with them.
    pub async fn stop(&self) {
        let Some(stopped) = self.take_stopped() else {
            return;
        };
        for inbox in self.sending.inboxes.iter() {
            // A running shard drains its inbox; a dead one has dropped it (error: fine).
            let _ = inbox.send_async(Request::Stop).await;
        }
        for _ in 0..self.nr_shards() {
            if stopped.recv_async().await.is_err() {
                break;
            }
        }
        self.join();
    }

    /// Stops every shard and waits for their threads, blocking the calling thread (not
    /// for use on an executor), for at most 10 s: a shard that does not stop by then is
    /// left running (logged), so a process's shutdown always ends.
    pub fn stop_blocking(&self) {
        let Some(stopped) = self.take_stopped() else {
            return;
        };
        let deadline = std::time::Instant::now() + SHARD_STOP_TIMEOUT;
        for inbox in self.sending.inboxes.iter() {
            // A running shard drains its inbox; a wedged one may not.
            let _ = inbox.send_deadline(Request::Stop, deadline);
        }
        for _ in 0..self.nr_shards() {
            match stopped.recv_deadline(deadline) {
                Ok(()) => {}
                Err(flume::RecvTimeoutError::Disconnected) => break,
                Err(flume::RecvTimeoutError::Timeout) => {
                    // Joining would wait for ever: leave the wedged threads to the
                    // process's end.
                    warn!("a shard did not stop within {SHARD_STOP_TIMEOUT:?}; leaving it");
                    drop(std::mem::take(&mut self.lock().threads));
                    return;
                }
            }
        }
        self.join();
    }

    fn take_stopped(&self) -> Option<flume::Receiver<()>> {
        self.lock().stopped.take()
    }

    fn join(&self) {
        let mut state = self.lock();
        let threads = std::mem::take(&mut state.threads);
        let mut receivers = Vec::with_capacity(threads.len());
        for t in threads {
            match t.join() {
                Ok(rx) => receivers.push(rx),
                Err(e) => warn!("shard ended abnormally: {e}"),
            }
        }
        if receivers.len() != self.nr_shards() {
            // A shard died: its receivers are gone. Build fresh ones so a restart works;
            // the senders held elsewhere are then disconnected (callers see NotRunning).
            warn!("restarting with fresh channels after a shard failure");
            receivers = (0..self.nr_shards())
                .map(|_| ShardReceivers {
                    inbox: flume::bounded(1).1,
                    mesh: flume::unbounded().1,
                })
                .collect();
        }
        state.receivers = Some(receivers);
    }
}

impl Drop for ShardedBroker {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

fn online_cpus() -> Option<Vec<usize>> {
    let mut cpus: Vec<usize> = glommio::CpuSet::online()
        .ok()?
        .iter()
        .map(|l| l.cpu)
        .collect();
    cpus.sort_unstable();
    Some(cpus)
}

/// The sending facet of a [`ShardedBroker`]: `Send`, cheap to clone; requests go to the
/// inbox of the shard that owns them and never block (a full inbox is
/// [`BrokerError::QueueFull`]).
#[derive(Clone)]
pub struct ShardedSending {
    inboxes: Arc<[flume::Sender<Request>]>,
}

impl fmt::Debug for ShardedSending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardedSending")
            .field("nr_shards", &self.inboxes.len())
            .finish()
    }
}

fn try_send(inbox: &flume::Sender<Request>, req: Request) -> Result<(), BrokerError> {
    inbox.try_send(req).map_err(|e| match e {
        flume::TrySendError::Full(_) => BrokerError::QueueFull,
        flume::TrySendError::Disconnected(_) => BrokerError::NotRunning,
    })
}

impl ShardedSending {
    /// How many shards there are.
    pub fn nr_shards(&self) -> usize {
        self.inboxes.len()
    }

    fn inbox(&self, shard: ShardId) -> &flume::Sender<Request> {
        &self.inboxes[shard.0 % self.inboxes.len()]
    }

    /// Appends a notification to broadcast channel `chan` on its sequencer and delivers
    /// it to every session on every shard.
    ///
    /// # Returns
    /// The channel's new top level.
    ///
    /// # Errors
    /// [`BrokerError::QueueFull`] when the sequencer's inbox is full,
    /// [`BrokerError::NotRunning`] when the broker is stopped, a store error.
    pub async fn publish(
        &self,
        chan: InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
    ) -> Result<i64, BrokerError> {
        self.publish_with(chan, payload, expiration, true).await
    }

    /// Appends a notification to broadcast channel `chan` on every replica without
    /// delivering it, answering once every shard has it (for tests that then ask for a
    /// delivery with [`BrokerSending::broadcast`]).
    ///
    /// # Errors
    /// As [`ShardedSending::publish`].
    #[cfg(any(test, feature = "testing"))]
    pub async fn append_everywhere(
        &self,
        chan: InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
    ) -> Result<i64, BrokerError> {
        self.publish_with(chan, payload, expiration, false).await
    }

    async fn publish_with(
        &self,
        chan: InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
        deliver: bool,
    ) -> Result<i64, BrokerError> {
        let sequencer = owner_of_channel(&chan, self.nr_shards());
        let (reply, answer) = flume::bounded(1);
        try_send(
            self.inbox(sequencer),
            Request::Publish {
                chan,
                payload,
                expiration,
                deliver,
                reply,
            },
        )?;
        answer
            .recv_async()
            .await
            .unwrap_or(Err(BrokerError::NotRunning))
    }

    /// Applies a notify on the owner of the device's channel, which delivers it if the
    /// device is connected.
    ///
    /// # Errors
    /// [`BrokerError::QueueFull`] when the owner's inbox is full,
    /// [`BrokerError::NotRunning`] when the broker is stopped, a store error.
    pub async fn notify(&self, req: UnicastRequest) -> Result<NotifyVerdict, BrokerError> {
        let owner = owner_of_channel(&req.chan_id, self.nr_shards());
        let (reply, answer) = flume::bounded(1);
        try_send(self.inbox(owner), Request::Notify { req, reply })?;
        answer
            .recv_async()
            .await
            .unwrap_or(Err(BrokerError::NotRunning))
    }

    /// Runs `job` on shard `shard` and returns its result. Waits for room in the
    /// shard's inbox rather than failing: this is for control work, not for traffic.
    ///
    /// # Errors
    /// [`BrokerError::NotRunning`] when the broker is stopped.
    pub async fn run_on<R: Send + 'static>(
        &self,
        shard: ShardId,
        job: impl FnOnce(&Shard) -> R + Send + 'static,
    ) -> Result<R, BrokerError> {
        let (reply, answer) = flume::bounded(1);
        let job: ShardJob = Box::new(move |s: &Shard| {
            // The asker may have given up waiting; nothing to do then.
            let _ = reply.send(job(s));
        });
        self.inbox(shard)
            .send_async(Request::Run(job))
            .await
            .map_err(|_| BrokerError::NotRunning)?;
        answer
            .recv_async()
            .await
            .map_err(|_| BrokerError::NotRunning)
    }

    /// Runs the future `job` makes as a task on shard `shard` and returns its output.
    ///
    /// # Errors
    /// [`BrokerError::NotRunning`] when the broker is stopped, or stops before the task
    /// finishes.
    pub async fn run_task_on<R, F, Fut>(&self, shard: ShardId, job: F) -> Result<R, BrokerError>
    where
        R: Send + 'static,
        F: FnOnce(Shard) -> Fut + Send + 'static,
        Fut: Future<Output = R> + 'static,
    {
        let (reply, answer) = flume::bounded(1);
        self.run_on(shard, move |s: &Shard| {
            let fut = job(s.clone());
            glommio::spawn_local(async move {
                let _ = reply.send(fut.await);
            })
            .detach();
        })
        .await?;
        answer
            .recv_async()
            .await
            .map_err(|_| BrokerError::NotRunning)
    }
}

impl BrokerSending for ShardedSending {
    fn broadcast(&self, chan: InternalChannelId) -> Result<(), BrokerError> {
        self.inboxes.iter().try_for_each(|inbox| {
            try_send(inbox, Request::Deliver(Delivery::Broadcast(chan.clone())))
        })
    }

    fn unicast(&self, chans: &[InternalChannelId]) -> Result<(), BrokerError> {
        chans.iter().try_for_each(|chan| {
            let owner = owner_of_channel(chan, self.nr_shards());
            try_send(
                self.inbox(owner),
                Request::Deliver(Delivery::Unicast(chan.clone())),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn owner_is_the_same_on_every_thread_and_every_call() {
        let here: Vec<ShardId> = (0..100)
            .map(|i| owner_of_device(&format!("dev-{i}"), 4))
            .collect();
        let there = std::thread::spawn(|| {
            (0..100)
                .map(|i| owner_of_device(&format!("dev-{i}"), 4))
                .collect::<Vec<_>>()
        })
        .join()
        .expect("thread");
        assert_eq!(here, there);
    }

    #[test]
    fn devices_spread_evenly_over_shards() {
        let mut counts = [0usize; 4];
        for i in 0..20_000 {
            counts[owner_of_device(&format!("device-{i:08}"), 4).0] += 1;
        }
        for c in counts {
            assert!((4_000..6_000).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn a_unicast_channel_lives_with_its_device() {
        for n in 1..=8 {
            for d in ["x", "dev-2", "phone-77"] {
                assert_eq!(
                    owner_of_channel(&InternalChannelId::unicast("user", d), n),
                    owner_of_device(d, n)
                );
            }
        }
    }

    #[test]
    fn zero_shards_count_as_one() {
        assert_eq!(owner_of_device("dev", 0), ShardId(0));
        assert_eq!(owner_of_channel(&InternalChannelId::System, 0), ShardId(0));
    }

    proptest! {
        #[test]
        fn owner_stays_in_range(device in ".*", n in 1usize..64) {
            prop_assert!(owner_of_device(&device, n).0 < n);
            prop_assert!(owner_of_channel(&InternalChannelId::unicast("u", &device), n).0 < n);
        }

        #[test]
        fn sequencer_stays_in_range(hex in "[0-9a-f]{32}", n in 1usize..64) {
            let chan = InternalChannelId::from_hex(&hex).expect("32 hex digits");
            prop_assert!(owner_of_channel(&chan, n).0 < n);
        }
    }
}
