//! Building a [`ShardedBroker`]: the shard count, queue sizes, stores, placement and
//! executor settings, with their defaults.

use std::fmt;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Lifecycle, ShardId, ShardReceivers, ShardedBroker, ShardedSending};
use crate::broker::BrokerConfig;
use crate::config;
use crate::store::{InMemoryPendingStore, PendingStore};

/// Makes each shard's store, on the shard's own thread.
pub type StoreFactory = Arc<dyn Fn(ShardId) -> Rc<dyn PendingStore> + Send + Sync>;

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
    /// With Redis: the service this node is part of (its stores are then Redis's).
    pub(crate) cluster: Option<crate::cluster::ClusterConfig>,
}

/// Builds a [`ShardedBroker`].
pub struct ShardedBrokerBuilder {
    pub(super) config: ShardConfig,
    pub(super) placement: ShardPlacement,
    pub(super) preempt_timer: Duration,
    pub(super) io_memory: usize,
    pub(super) ring_depth: usize,
    pub(super) spin_before_park: Option<Duration>,
    pub(super) name: String,
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
                cluster: None,
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

    /// Makes the broker one node of a service of many sharing the Redis of `config`:
    /// notifies, broadcasts and registrations go through Redis, and each shard's store is
    /// a cache of what its sessions need (the store factory is not used then).
    pub fn cluster(mut self, config: crate::cluster::ClusterConfig) -> Self {
        self.config.cluster = Some(config);
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
