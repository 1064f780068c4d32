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
//! caller ([`BrokerError::QueueFull`](crate::broker::BrokerError::QueueFull), the API's 503), never a blocked executor. Its
//! **mesh** receiver takes shard-to-shard traffic (replication, work to run on the shard):
//! unbounded, since everything on it was admitted through some inbox already, and batched:
//! a shard collects what it sends to each peer during a task turn and sends it as one
//! message.
//!
//! No lock sits on the delivery path. The only lock is [`ShardedBroker`]'s lifecycle state
//! (threads to join, receivers to hand to a restart), taken by start and stop alone.

mod builder;
mod messages;
mod ownership;
mod sending;
mod service;
mod shard;

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};
use tracing::{debug, warn};

pub(crate) use builder::ShardConfig;
pub use builder::{
    DEFAULT_IO_MEMORY, DEFAULT_PREEMPT_TIMER, DEFAULT_RING_DEPTH, ShardPlacement,
    ShardedBrokerBuilder, StoreFactory,
};
pub(crate) use messages::{MeshBatch, MeshMsg, Request, ShardJob};
pub use ownership::{ShardId, owner_of_channel, owner_of_device};
pub use sending::ShardedSending;
pub use service::{ShardService, Sharded};
pub use shard::{Shard, ShardMetrics};

use super::Delivery;
use crate::logging::target;

/// How long [`ShardedBroker::stop_blocking`] waits for the shards to stop.
const SHARD_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`ShardedBroker::start`] waits for a shard's executor to come up.
const SHARD_START_TIMEOUT: Duration = Duration::from_secs(20);

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
                    warn!(target: target::BROKER, "cannot start shard {i}: {e}");
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
            warn!(target: target::BROKER, "cannot start shard {i}: {failure}");
            state.threads = threads;
            state.stopped = Some(stopped_rx);
            drop(state);
            self.stop_blocking();
            return Err(failure);
        }
        state.threads = threads;
        state.stopped = Some(stopped_rx);
        debug!(target: target::BROKER, shards = n, "sharded broker started");
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
                    warn!(
                        target: target::BROKER,
                        "a shard did not stop within {SHARD_STOP_TIMEOUT:?}; leaving it"
                    );
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
                Err(e) => warn!(target: target::BROKER, "shard ended abnormally: {e}"),
            }
        }
        if receivers.len() != self.nr_shards() {
            // A shard died: its receivers are gone. Build fresh ones so a restart works;
            // the senders held elsewhere are then disconnected (callers see NotRunning).
            warn!(target: target::BROKER, "restarting with fresh channels after a shard failure");
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
