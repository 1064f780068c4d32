//! One shard: its registry, store and mesh endpoints, and the loop that serves its inbox
//! and mesh.

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::fmt::{self, Write as _};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_lite::future;
use smallvec::SmallVec;
use tracing::{debug, warn};

use super::{
    Delivery, MeshBatch, MeshMsg, Request, ShardConfig, ShardId, ShardJob, ShardReceivers,
    ShardedSending, owner_of_channel, owner_of_device,
};
use crate::broker::DeliveryStats;
use crate::broker::local::{LocalBroker, LocalSession};
use crate::broker::{Broker, BrokerError, SessionTracker};
use crate::logging::target;
use crate::protocol::{ConnectMsg, Notification};
use crate::store::{InternalChannelId, NotifyVerdict, PendingStore, UnicastRequest, apply_notify};

/// What one shard's broker has counted (the API's `/metrics` and `/stats` show it, with
/// what the API and the listeners count themselves): a plain value that can leave the
/// shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardMetrics {
    /// The shard.
    pub shard: usize,
    /// Sessions registered now.
    pub sessions: usize,
    /// Deliveries to sessions.
    pub delivery: DeliveryStats,
    /// Broadcast notifications sequenced here (this shard's channels).
    pub broadcasts: u64,
    /// Notifies applied here (this shard's devices).
    pub unicasts: u64,
    /// What the shard's store's log has done.
    pub store: crate::store::StoreStats,
}

/// Counters a shard keeps beside its broker's delivery stats.
#[derive(Default)]
struct Counters {
    broadcasts: Cell<u64>,
    unicasts: Cell<u64>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

/// What a shard is started with.
pub(crate) struct ShardContext {
    pub(crate) id: ShardId,
    pub(crate) config: ShardConfig,
    pub(crate) sending: ShardedSending,
    pub(crate) meshes: Arc<[flume::Sender<MeshBatch>]>,
}

/// The most inbox and mesh messages a shard takes in one go before delivering what they
/// changed and letting other tasks run.
const MAX_MESSAGES_PER_TURN: usize = 256;

/// Mesh messages waiting to go to each peer until the end of the current task turn.
struct Outbox {
    /// Per destination shard. Borrowed only inside a method, never across `.await`.
    pending: RefCell<Vec<MeshBatch>>,
    /// Whether a flush task is already spawned for this turn.
    scheduled: Cell<bool>,
    /// Every shard's mesh sender (unbounded: sending never waits).
    meshes: Arc<[flume::Sender<MeshBatch>]>,
}

impl Outbox {
    fn push(self: &Rc<Self>, dest: ShardId, msg: MeshMsg) {
        if let Some(batch) = self.pending.borrow_mut().get_mut(dest.0) {
            batch.push(msg);
        }
        if !self.scheduled.replace(true) {
            let outbox = Rc::clone(self);
            // Runs once the current task yields: everything pushed meanwhile goes as one
            // message per peer.
            glommio::spawn_local(async move { outbox.flush() }).detach();
        }
    }

    fn flush(&self) {
        self.scheduled.set(false);
        let batches: Vec<MeshBatch> = self
            .pending
            .borrow_mut()
            .iter_mut()
            .map(std::mem::take)
            .collect();
        for (dest, batch) in batches.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            if let Some(mesh) = self.meshes.get(dest) {
                // Unbounded: fails only when the peer's receiver is gone (stopping).
                if mesh.send(batch).is_err() {
                    debug!(target: target::BROKER, "shard {dest} is gone; dropped a mesh batch");
                }
            }
        }
    }
}

/// A shard's state, owned by its thread.
struct ShardCore {
    id: ShardId,
    config: ShardConfig,
    /// This shard's registry and store.
    local: Rc<LocalBroker>,
    outbox: Rc<Outbox>,
    sending: ShardedSending,
    /// Message ids: this prefix (process start, shard) plus a counter.
    msg_prefix: String,
    next_msg: Cell<u64>,
    counters: Counters,
    /// With Redis: this shard's part of the service of many nodes.
    cluster: Option<Rc<crate::cluster::ClusterShard>>,
    /// The services installed on this shard, one per type ([`Shard::service`]).
    /// Borrowed only inside a method, never across `.await`.
    services: RefCell<Vec<(TypeId, Rc<dyn Any>)>>,
}

/// A shard as the tasks running on it see it: register sessions of the devices it owns,
/// look at its store, reach other shards. Cheap to clone; not `Send` (it is the shard's).
#[derive(Clone)]
pub struct Shard {
    core: Rc<ShardCore>,
}

impl fmt::Debug for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shard")
            .field("id", &self.core.id)
            .field("sessions", &self.core.local.session_count())
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// This shard's id.
    pub fn id(&self) -> ShardId {
        self.core.id
    }

    /// How many shards there are.
    pub fn nr_shards(&self) -> usize {
        self.core.config.nr_shards
    }

    /// Whether this shard owns device `device_id`.
    pub fn owns_device(&self, device_id: &str) -> bool {
        owner_of_device(device_id, self.nr_shards()) == self.core.id
    }

    /// The broker's sending facet.
    pub fn sending(&self) -> &ShardedSending {
        &self.core.sending
    }

    /// With Redis: this shard's part of the service of many nodes.
    pub(crate) fn cluster(&self) -> Option<&Rc<crate::cluster::ClusterShard>> {
        self.core.cluster.as_ref()
    }

    /// Delivers what `chan` (a unicast channel) holds to its device's session here.
    pub(crate) fn deliver_unicast(&self, chan: InternalChannelId) {
        self.core.local.deliver_unicast(chan);
    }

    /// Delivers the state of broadcast channel `chan` to every session here.
    pub(crate) async fn deliver_broadcast(&self, chan: InternalChannelId) {
        self.core.local.deliver_broadcast(chan).await;
    }

    /// Ends session `session` of `device` if it is still the device's live one.
    pub(crate) fn terminate_session(&self, device: &str, session: u64) {
        self.core.local.terminate(device, session);
    }

    /// This shard's store: the unicast channels of its devices and its replica of the
    /// broadcast channels.
    pub fn store(&self) -> &Rc<dyn PendingStore> {
        self.core.local.store()
    }

    /// The registration id of the live session of `device_id` here, if any.
    pub fn session_of(&self, device_id: &str) -> Option<u64> {
        self.core.local.session_of(device_id)
    }

    /// How many sessions are registered here.
    pub fn session_count(&self) -> usize {
        self.core.local.session_count()
    }

    /// What this shard has delivered since it started.
    pub fn stats(&self) -> DeliveryStats {
        self.core.local.stats()
    }

    /// What this shard's broker has counted.
    pub fn metrics(&self) -> ShardMetrics {
        let c = &self.core.counters;
        ShardMetrics {
            shard: self.core.id.0,
            sessions: self.session_count(),
            delivery: self.stats(),
            broadcasts: c.broadcasts.get(),
            unicasts: c.unicasts.get(),
            store: self.store().stats(),
        }
    }

    /// This shard's service of type `T`, if one is installed: the state a layer above the
    /// broker keeps per shard (the server's listeners, the API's counters), found by
    /// type instead of through thread-locals. See [`Sharded`](super::Sharded).
    pub fn service<T: 'static>(&self) -> Option<Rc<T>> {
        let services = self.core.services.borrow();
        let (_, any) = services.iter().find(|(t, _)| *t == TypeId::of::<T>())?;
        Rc::clone(any).downcast::<T>().ok()
    }

    /// This shard's service of type `T`, installing `T::default()` first if there is none.
    pub fn service_or_default<T: Default + 'static>(&self) -> Rc<T> {
        if let Some(service) = self.service::<T>() {
            return service;
        }
        let service = Rc::new(T::default());
        self.install_service(Rc::clone(&service));
        service
    }

    /// Installs `service` as this shard's service of type `T`; the one it replaces, if
    /// any.
    pub fn install_service<T: 'static>(&self, service: Rc<T>) -> Option<Rc<T>> {
        let old = self.remove_service::<T>();
        self.core
            .services
            .borrow_mut()
            .push((TypeId::of::<T>(), service as Rc<dyn Any>));
        old
    }

    /// Removes this shard's service of type `T` and returns it.
    pub fn remove_service<T: 'static>(&self) -> Option<Rc<T>> {
        let mut services = self.core.services.borrow_mut();
        let at = services.iter().position(|(t, _)| *t == TypeId::of::<T>())?;
        let (_, any) = services.swap_remove(at);
        any.downcast::<T>().ok()
    }

    /// Posts `job` to run on shard `dest` (here too, after the current task turn), in
    /// order with everything else this shard sends there, without waiting for it (for an
    /// awaited answer from any thread, see [`ShardedSending::run_on`]).
    pub fn post(&self, dest: ShardId, job: impl FnOnce(&Shard) + Send + 'static) {
        self.core.outbox.push(dest, MeshMsg::Run(Box::new(job)));
    }

    fn next_msg_id(&self) -> String {
        let n = self.core.next_msg.get() + 1;
        self.core.next_msg.set(n);
        // Sized at once: `format!` would grow it twice.
        let mut id = String::with_capacity(self.core.msg_prefix.len() + 16);
        id.push_str(&self.core.msg_prefix);
        let _ = write!(id, "{n:x}");
        id
    }

    /// Applies a notify to this shard's store and delivers it if the device is here.
    fn notify(&self, req: &UnicastRequest) -> Result<NotifyVerdict, BrokerError> {
        bump(&self.core.counters.unicasts);
        let verdict = apply_notify(
            &**self.store(),
            req,
            self.core.config.max_notifications_per_app,
            self.next_msg_id(),
        )?;
        if matches!(verdict, NotifyVerdict::Accepted { .. }) {
            self.core.local.deliver_unicast(req.chan_id.clone());
        }
        Ok(verdict)
    }

    /// Applies a notify and answers as [`ShardedSending::notify`] does: at once on this
    /// shard when it owns the device (no inbox message, no reply channel, no wake-up),
    /// else on the owner through its inbox.
    ///
    /// # Errors
    /// As [`ShardedSending::notify`].
    pub async fn notify_from_here(
        &self,
        req: UnicastRequest,
    ) -> Result<NotifyVerdict, BrokerError> {
        if self.cluster().is_some() || owner_of_channel(&req.chan_id, self.nr_shards()) != self.id()
        {
            return self.sending().notify(req).await;
        }
        let verdict = self.notify(&req)?;
        match self.store().durable() {
            None => Ok(verdict),
            Some(durable) => once_durable(durable, verdict).await,
        }
    }

    /// Appends a broadcast notification as its sequencer and replicates it.
    fn publish(
        &self,
        chan: InternalChannelId,
        payload: crate::protocol::Payload,
        expiration: SystemTime,
        deliver: bool,
        reply: flume::Sender<Result<i64, BrokerError>>,
    ) -> Option<InternalChannelId> {
        let top_level = match self
            .store()
            .append_to_channel(&chan, payload.clone(), expiration)
        {
            Ok(top) => top,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return None;
            }
        };
        bump(&self.core.counters.broadcasts);
        // The answer waits for the append to be durable (with a durable store).
        let durable = self.store().durable();
        let peers = self.nr_shards() - 1;
        let applied = if deliver || peers == 0 {
            answer_when_durable(durable, reply, top_level);
            None
        } else {
            let (applied_tx, applied_rx) = flume::bounded(peers);
            glommio::spawn_local(async move {
                for _ in 0..peers {
                    if applied_rx.recv_async().await.is_err() {
                        let _ = reply.send(Err(BrokerError::NotRunning));
                        return;
                    }
                }
                answer_when_durable(durable, reply, top_level);
            })
            .detach();
            Some(applied_tx)
        };
        let notification = Notification::broadcast(payload);
        for peer in (0..self.nr_shards())
            .map(ShardId)
            .filter(|&p| p != self.id())
        {
            self.core.outbox.push(
                peer,
                MeshMsg::Replicate {
                    chan: chan.clone(),
                    top_level,
                    notification: notification.clone(),
                    expiration,
                    deliver,
                    applied: applied.clone(),
                },
            );
        }
        deliver.then_some(chan)
    }

    /// Appends a replicated broadcast notification to this shard's replica.
    fn replicate(
        &self,
        chan: &InternalChannelId,
        top_level: i64,
        notification: Notification,
        expiration: SystemTime,
    ) {
        match self
            .store()
            .append_to_channel(chan, notification.payload, expiration)
        {
            Ok(top) if top != top_level => {
                warn!(
                    target: target::BROKER,
                    "replica of {chan} on {} at level {top}, sequencer at {top_level}",
                    self.id()
                );
            }
            Ok(_) => {}
            Err(e) => {
                warn!(target: target::BROKER, "replica of {chan} on {} not updated: {e}", self.id())
            }
        }
    }
}

impl Broker for Shard {
    type Session = LocalSession;

    /// Registers a session of a device this shard owns.
    ///
    /// # Errors
    /// Besides the registration errors, an abort when the device belongs to another
    /// shard: its connection must be moved there first.
    async fn register(
        &self,
        connect: &ConnectMsg,
        track: &dyn SessionTracker,
    ) -> Result<LocalSession, BrokerError> {
        let owner = owner_of_device(&connect.device_id, self.nr_shards());
        if owner != self.id() {
            return Err(BrokerError::WrongShard { owner });
        }
        let Some(cluster) = self.core.cluster.clone() else {
            return self.core.local.register(connect, track);
        };
        // The route first, so that a notify accepted from now on is routed here; its
        // message is held until the session is in.
        // A CONNECT the registration would refuse must not take the route from the
        // device's live connection.
        self.core.local.check_connect(connect)?;
        let device: Arc<str> = Arc::from(&*connect.device_id);
        // Boxed: the claim's Redis request would otherwise size every registration's
        // future, the single-node ones included.
        let claimed = Box::pin(cluster.claim(self, &device)).await?;
        cluster.load(&device, &claimed);
        match self.core.local.register(connect, track) {
            Ok(sess) => {
                cluster.registered(self, &device, sess.id(), claimed);
                Ok(sess)
            }
            Err(e) => {
                cluster.claim_failed(self, &device, &claimed);
                Err(e)
            }
        }
    }

    fn unregister(&self, sess: &LocalSession) {
        self.core.local.unregister(sess);
        if let Some(cluster) = &self.core.cluster {
            cluster.unregistered(sess.device_id(), sess.id());
        }
    }
}

/// Channels whose replica changed in this turn and must be delivered.
type Dirty = SmallVec<[InternalChannelId; 2]>;

/// What the shard loop got.
enum Got {
    Request(Request),
    Mesh(MeshBatch),
    /// Stop asked for, or every sender gone.
    Stop,
}

/// Serves the shard until it is asked to stop; hands back its receivers for a restart.
pub(crate) async fn run(context: ShardContext, rx: ShardReceivers) -> ShardReceivers {
    let nr_shards = context.config.nr_shards;
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let mut msg_prefix = format!("{started:x}-{:x}-", context.id.0);
    let (store, cluster) = match context.config.cluster.clone() {
        None => ((context.config.store)(context.id), None),
        Some(config) => {
            // Message ids must be unique across the nodes and their restarts (a node may
            // keep its configured id): the start time and the node's id go in them.
            let node_tag = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                config.node_id.hash(&mut h);
                h.finish()
            };
            msg_prefix = format!("{started:x}-{node_tag:x}-{:x}-", context.id.0);
            match crate::cluster::ClusterShard::start(config, context.id, nr_shards) {
                Ok((cluster, pushes)) => (cluster.store(), Some((cluster, pushes))),
                Err(e) => {
                    // Checked when the configuration was read: not reached in practice.
                    warn!(target: target::BROKER, shard = %context.id, "redis: {e}; this shard keeps its store in memory");
                    ((context.config.store)(context.id), None)
                }
            }
        }
    };
    let shard = Shard {
        core: Rc::new(ShardCore {
            id: context.id,
            local: LocalBroker::new(store, context.config.session_queue_size),
            outbox: Rc::new(Outbox {
                pending: RefCell::new((0..nr_shards).map(|_| Vec::new()).collect()),
                scheduled: Cell::new(false),
                meshes: context.meshes,
            }),
            sending: context.sending,
            msg_prefix,
            cluster: cluster.as_ref().map(|(c, _)| Rc::clone(c)),
            next_msg: Cell::new(0),
            counters: Counters::default(),
            services: RefCell::new(Vec::new()),
            config: context.config,
        }),
    };
    if let Some((cluster, pushes)) = cluster {
        glommio::spawn_local(crate::cluster::serve(cluster, shard.clone(), pushes)).detach();
    }
    debug!(target: target::BROKER, shard = %shard.id(), "shard running");
    let mut dirty = Dirty::new();
    'serve: loop {
        let first = future::or(
            async { rx.mesh.recv_async().await.map_or(Got::Stop, Got::Mesh) },
            async { rx.inbox.recv_async().await.map_or(Got::Stop, Got::Request) },
        )
        .await;
        let mut got = Some(first);
        let mut taken = 0;
        while let Some(g) = got.take() {
            taken += 1;
            match g {
                Got::Stop => break 'serve,
                Got::Mesh(batch) => {
                    for msg in batch {
                        handle_mesh(&shard, msg, &mut dirty);
                    }
                }
                Got::Request(req) => {
                    if !handle_request(&shard, req, &mut dirty) {
                        break 'serve;
                    }
                }
            }
            if taken < MAX_MESSAGES_PER_TURN {
                got = rx
                    .mesh
                    .try_recv()
                    .map(Got::Mesh)
                    .or_else(|_| rx.inbox.try_recv().map(Got::Request))
                    .ok();
            }
        }
        // Deliver each changed channel once, however many appends this turn brought.
        for chan in dirty.drain(..) {
            shard.core.local.deliver_broadcast(chan).await;
        }
        glommio::yield_if_needed().await;
    }
    // Whatever this shard still had to send goes now.
    shard.core.outbox.flush();
    if let Some(cluster) = shard.cluster() {
        cluster.close().await;
    }
    // And whatever its store still had to write.
    if let Some(flushed) = shard.store().flush()
        && let Err(e) = flushed.await
    {
        warn!(target: target::BROKER, shard = %shard.id(), "the store's last flush failed: {e}");
    }
    // The services hold the shard (a reference cycle through its core): dropped here, on
    // the shard's thread, whether or not their owner stopped them, so a stopped shard
    // frees its store and closes whatever its services hold (listeners among them).
    let services = std::mem::take(&mut *shard.core.services.borrow_mut());
    drop(services);
    debug!(target: target::BROKER, shard = %shard.id(), "shard stopped");
    rx
}

/// Sends `answer` once `durable` resolves (at once without a wait); a store that could
/// not make it durable answers unavailable instead.
fn answer_when_durable<T: 'static>(
    durable: Option<crate::store::DurableWait>,
    reply: flume::Sender<Result<T, BrokerError>>,
    answer: T,
) {
    let Some(durable) = durable else {
        let _ = reply.send(Ok(answer));
        return;
    };
    glommio::spawn_local(async move {
        let _ = reply.send(once_durable(durable, answer).await);
    })
    .detach();
}

/// `answer` once what it answers for is durable, or unavailable past [`COMMIT_DEADLINE`].
async fn once_durable<T>(durable: crate::store::DurableWait, answer: T) -> Result<T, BrokerError> {
    futures_lite::future::or(
        async { durable.await.map(|()| answer).map_err(BrokerError::from) },
        async {
            glommio::timer::sleep(COMMIT_DEADLINE).await;
            Err(BrokerError::from(crate::store::StoreError::Unavailable(
                "the store did not commit in time".into(),
            )))
        },
    )
    .await
}

/// How long an answer waits for its commit before it says unavailable (a disk that
/// hangs rather than fails): the operation may still be kept, as with any 503.
const COMMIT_DEADLINE: Duration = Duration::from_secs(5);

fn mark(dirty: &mut Dirty, chan: InternalChannelId) {
    if !dirty.contains(&chan) {
        dirty.push(chan);
    }
}

/// Handles one inbox request; `false` when the shard must stop.
fn handle_request(shard: &Shard, req: Request, dirty: &mut Dirty) -> bool {
    match req {
        Request::Deliver(Delivery::Broadcast(chan)) => mark(dirty, chan),
        Request::Deliver(Delivery::Unicast(chan)) => {
            shard.core.local.deliver_unicast(chan);
        }
        Request::Publish {
            chan,
            payload,
            expiration,
            reply,
            ..
        } if shard.cluster().is_some() => cluster_publish(shard, chan, payload, expiration, reply),
        Request::Notify { req, reply } if shard.cluster().is_some() => {
            cluster_notify(shard, req, reply);
        }
        Request::Publish {
            chan,
            payload,
            expiration,
            deliver,
            reply,
        } => {
            if let Some(chan) = shard.publish(chan, payload, expiration, deliver, reply) {
                mark(dirty, chan);
            }
        }
        Request::Notify { req, reply } => {
            // The asker may have given up waiting; the notify stands either way.
            match shard.notify(&req) {
                Ok(verdict) => answer_when_durable(shard.store().durable(), reply, verdict),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        Request::Run(job) => run_job(shard, job),
        Request::Stop => return false,
    }
    true
}

/// A broadcast through Redis: the level comes from there, and every shard of every node
/// delivers it when it hears it.
fn cluster_publish(
    shard: &Shard,
    chan: InternalChannelId,
    payload: crate::protocol::Payload,
    expiration: SystemTime,
    reply: flume::Sender<Result<i64, BrokerError>>,
) {
    let Some(cluster) = shard.cluster().cloned() else {
        return;
    };
    bump(&shard.core.counters.broadcasts);
    glommio::spawn_local(async move {
        let _ = reply.send(cluster.publish(&chan, &payload, expiration).await);
    })
    .detach();
}

/// A notify through Redis: stored there, then the device's node is told.
fn cluster_notify(
    shard: &Shard,
    req: UnicastRequest,
    reply: flume::Sender<Result<NotifyVerdict, BrokerError>>,
) {
    let Some(cluster) = shard.cluster().cloned() else {
        return;
    };
    bump(&shard.core.counters.unicasts);
    let msg_id = shard.next_msg_id();
    let max = shard.core.config.max_notifications_per_app;
    let shard = shard.clone();
    glommio::spawn_local(async move {
        let answer = match cluster.notify(&req, msg_id, max).await {
            Ok((verdict, route)) => {
                if let Some(route) = route {
                    cluster.route(&shard, route);
                }
                Ok(verdict)
            }
            Err(e) => Err(e),
        };
        let _ = reply.send(answer);
    })
    .detach();
}

fn handle_mesh(shard: &Shard, msg: MeshMsg, dirty: &mut Dirty) {
    match msg {
        MeshMsg::Replicate {
            chan,
            top_level,
            notification,
            expiration,
            deliver,
            applied,
        } => {
            shard.replicate(&chan, top_level, notification, expiration);
            if let Some(applied) = applied {
                let _ = applied.send(());
            }
            if deliver {
                mark(dirty, chan);
            }
        }
        MeshMsg::Run(job) => run_job(shard, job),
    }
}

fn run_job(shard: &Shard, job: ShardJob) {
    job(shard);
}
