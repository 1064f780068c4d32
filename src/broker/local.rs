//! The part of a broker that lives on one executor: the registry of its sessions, their
//! access to the store, and delivery to them. The one-executor broker is one of these;
//! the sharded broker has one per shard.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;

use ahash::AHashMap;
use tracing::{debug, error};

use super::{
    BroadcastExchange, BrokerError, BrokerSession, ExchangeQueue, ExchangeRef,
    ExchangesScratchArea, LevelsMap, SessionTracker, UnicastExchange, feed_pending,
    get_info_string, levels_from_connect,
};
use crate::logging::target;
use crate::protocol::{ConnectMsg, DeviceId, Notification};
use crate::store::{InternalChannelId, PendingStore};

/// What one executor's broker has done since it started: for tests, benchmarks and
/// metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryStats {
    /// Sessions registered.
    pub registrations: u64,
    /// Broadcast deliveries made (one snapshot fanned out to every session).
    pub broadcast_fanouts: u64,
    /// Broadcast exchanges fed to sessions.
    pub broadcast_feeds: u64,
    /// Unicast exchanges fed to sessions.
    pub unicast_feeds: u64,
    /// Exchanges a full session queue refused.
    pub refused_feeds: u64,
}

/// One executor's registry and store access. Owned by that executor alone (`Rc`).
pub(crate) struct LocalBroker {
    /// The store this executor's sessions read and drop from.
    store: Rc<dyn PendingStore>,
    /// Device id → its live session. Borrowed only inside a method, never across
    /// `.await`.
    registry: RefCell<AHashMap<DeviceId, Rc<ExchangeQueue>>>,
    /// Capacity of each session's exchange queue.
    session_queue_size: usize,
    /// The last registration id handed out.
    next_session: Cell<u64>,
    /// What it has done.
    stats: Cell<DeliveryStats>,
    /// The latest exchange of each broadcast channel, handed to every session that needs
    /// the channel's current state (fan-out and catch-up alike), so that its frames are
    /// encoded once per window and device tag on this executor. Borrowed only inside a
    /// method.
    broadcasts: RefCell<AHashMap<InternalChannelId, Rc<BroadcastExchange>>>,
    /// Device models and image channels, one copy each: thousands of sessions share a
    /// handful. Bounded by [`MAX_INTERNED`]; past it a session keeps its own copy.
    /// Borrowed only inside a method.
    interned: RefCell<ahash::AHashSet<Rc<str>>>,
}

/// The most distinct device models and image channels an executor shares.
const MAX_INTERNED: usize = 4096;

impl fmt::Debug for LocalBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalBroker")
            .field("sessions", &self.session_count())
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl LocalBroker {
    pub(crate) fn new(store: Rc<dyn PendingStore>, session_queue_size: usize) -> Rc<Self> {
        Rc::new(Self {
            store,
            registry: RefCell::new(AHashMap::new()),
            session_queue_size,
            next_session: Cell::new(0),
            stats: Cell::new(DeliveryStats::default()),
            broadcasts: RefCell::new(AHashMap::new()),
            interned: RefCell::new(ahash::AHashSet::new()),
        })
    }

    /// The shared copy of `text` (a device model or image channel).
    fn intern(&self, text: &str) -> Rc<str> {
        let mut interned = self.interned.borrow_mut();
        if let Some(shared) = interned.get(text) {
            return Rc::clone(shared);
        }
        let fresh: Rc<str> = Rc::from(text);
        if interned.len() < MAX_INTERNED {
            interned.insert(Rc::clone(&fresh));
        }
        fresh
    }

    pub(crate) fn stats(&self) -> DeliveryStats {
        self.stats.get()
    }

    fn count(&self, f: impl FnOnce(&mut DeliveryStats)) {
        let mut stats = self.stats.get();
        f(&mut stats);
        self.stats.set(stats);
    }

    /// Queues `exchange` on `queue`, counting it (or its refusal).
    fn feed(&self, queue: &ExchangeQueue, exchange: ExchangeRef) {
        let unicast = exchange.as_any().is::<UnicastExchange>();
        match queue.feed(exchange) {
            Ok(()) if unicast => self.count(|s| s.unicast_feeds += 1),
            Ok(()) => self.count(|s| s.broadcast_feeds += 1),
            Err(refused) => {
                self.count(|s| s.refused_feeds += 1);
                debug!(target: target::BROKER, "session queue full, dropping {refused:?}");
            }
        }
    }

    pub(crate) fn store(&self) -> &Rc<dyn PendingStore> {
        &self.store
    }

    /// Checks `connect` as [`register`](Self::register) does, registering nothing.
    pub(crate) fn check_connect(&self, connect: &ConnectMsg) -> Result<(), BrokerError> {
        get_info_string(connect, "device", "?")?;
        get_info_string(connect, "channel", "?")?;
        levels_from_connect(connect)?;
        Ok(())
    }

    /// Registers a session for the device of `connect`: validates it, terminates an
    /// older session of the device, and feeds the new one what is pending.
    pub(crate) fn register(
        self: &Rc<Self>,
        connect: &ConnectMsg,
        track: &dyn SessionTracker,
    ) -> Result<LocalSession, BrokerError> {
        let model = self.intern(get_info_string(connect, "device", "?")?);
        let image_channel = self.intern(get_info_string(connect, "channel", "?")?);
        let levels = levels_from_connect(connect)?;
        let id = self.next_session.get() + 1;
        self.next_session.set(id);
        // The queue carries the registration id: the registry keeps one pointer per device.
        let queue = Rc::new(ExchangeQueue::for_session(self.session_queue_size, id));
        let device_id = DeviceId::new(&connect.device_id);
        let previous = self
            .registry
            .borrow_mut()
            .insert(device_id.clone(), Rc::clone(&queue));
        if let Some(previous) = previous {
            previous.terminate();
            // A device that ACKs and at once reconnects (or whose ACK crossed the
            // reconnection) has its ACK on the older connection: the older session takes
            // it in before this one reads what is pending, so nothing acknowledged is
            // sent again.
            if previous.is_awaiting_ack() {
                queue.wait_behind(previous);
            } else if let Some(older) = previous.take_behind() {
                // The previous one was itself waiting behind an older session: so does
                // this one.
                queue.wait_behind(older);
            }
        }
        let mut sess = LocalSession {
            broker: Rc::clone(self),
            id,
            device_id,
            model,
            image_channel,
            levels,
            queue,
            scratch: ExchangesScratchArea::default(),
        };
        self.count(|s| s.registrations += 1);
        debug!(
            target: target::BROKER,
            session = %track.session_id(),
            device = %crate::logging::Untrusted(&sess.device_id),
            "registered with broker"
        );
        feed_pending(&mut sess);
        track.registered(&sess);
        Ok(sess)
    }

    /// Unregisters `sess` unless a newer session of the device replaced it.
    pub(crate) fn unregister(&self, sess: &LocalSession) {
        let mut registry = self.registry.borrow_mut();
        if registry
            .get(&sess.device_id)
            .is_some_and(|q| q.session() == sess.id)
        {
            registry.remove(&sess.device_id);
        }
    }

    /// Ends session `session` of `device_id` if it is still the device's live one (it was
    /// taken over elsewhere).
    pub(crate) fn terminate(&self, device_id: &str, session: u64) {
        if let Some(q) = self.registry.borrow().get(device_id)
            && q.session() == session
        {
            q.terminate();
        }
    }

    pub(crate) fn session_of(&self, device_id: &str) -> Option<u64> {
        self.registry.borrow().get(device_id).map(|q| q.session())
    }

    pub(crate) fn session_count(&self) -> usize {
        self.registry.borrow().len()
    }

    pub(crate) fn get(
        &self,
        chan: &InternalChannelId,
        cached_ok: bool,
    ) -> Result<(i64, Vec<Notification>), BrokerError> {
        self.store.get_channel_snapshot(chan).map_err(|e| {
            error!(
                target: target::BROKER,
                "unsuccessful, get channel snapshot for {chan} (cachedOk={cached_ok}): {e}"
            );
            e.into()
        })
    }

    pub(crate) fn drop_by_msg_id(
        &self,
        chan: &InternalChannelId,
        targets: &[Notification],
    ) -> Result<(), BrokerError> {
        self.store.drop_by_msg_id(chan, targets).map_err(|e| {
            error!(target: target::BROKER, "unsuccessful, drop from channel {chan}: {e}");
            e.into()
        })
    }

    /// Feeds every session the current state of broadcast channel `chan` as one shared
    /// exchange. A store failure is logged and skips the delivery (the next broadcast
    /// tries again).
    pub(crate) async fn deliver_broadcast(&self, chan: InternalChannelId) {
        let Ok(exchange) = self.broadcast_exchange(&chan, false) else {
            return;
        };
        self.fan_out(exchange).await;
    }

    /// The exchange for broadcast channel `chan` as the store has it now: the kept one
    /// while the channel has not changed, else a new one, kept from then on.
    ///
    /// The snapshot is read every time, since notifications expire: at one top level the
    /// live notifications only ever shrink, so the kept exchange still holds when the
    /// snapshot has its top level, its length and its first and last notification.
    pub(crate) fn broadcast_exchange(
        &self,
        chan: &InternalChannelId,
        cached_ok: bool,
    ) -> Result<Rc<BroadcastExchange>, BrokerError> {
        let (top_level, notifications) = self.get(chan, cached_ok)?;
        if let Some(kept) = self.broadcasts.borrow().get(chan) {
            let same = kept.top_level == top_level
                && kept.notifications.len() == notifications.len()
                && kept.notifications.first() == notifications.first()
                && kept.notifications.last() == notifications.last();
            if same {
                return Ok(Rc::clone(kept));
            }
        }
        let exchange = Rc::new(BroadcastExchange::new(
            chan.clone(),
            top_level,
            notifications,
        ));
        self.broadcasts
            .borrow_mut()
            .insert(chan.clone(), Rc::clone(&exchange));
        Ok(exchange)
    }

    /// Feeds `exchange` to every session, yielding to the executor as needed so a large
    /// fan-out never stalls pings and accepts.
    pub(crate) async fn fan_out(&self, exchange: ExchangeRef) {
        let queues: Vec<Rc<ExchangeQueue>> =
            self.registry.borrow().values().map(Rc::clone).collect();
        self.count(|s| s.broadcast_fanouts += 1);
        for queue in queues {
            self.feed(&queue, Rc::clone(&exchange));
            glommio::yield_if_needed().await;
        }
    }

    /// Feeds the device of unicast channel `chan` a unicast exchange if it is connected
    /// here; whether it was.
    pub(crate) fn deliver_unicast(&self, chan: InternalChannelId) -> bool {
        let Some((_, device)) = chan.unicast_user_and_device() else {
            debug!(target: target::BROKER, "unicast asked for broadcast channel {chan}");
            return false;
        };
        let queue = self.registry.borrow().get(device).map(Rc::clone);
        match queue {
            Some(queue) => {
                let exchange = Rc::new(UnicastExchange {
                    chan_id: chan,
                    cached_ok: false,
                });
                self.feed(&queue, exchange);
                true
            }
            None => false,
        }
    }
}

/// A session registered with a broker on its executor, owned by the session's task.
pub struct LocalSession {
    /// The executor's registry and store access.
    broker: Rc<LocalBroker>,
    /// The registration id.
    id: u64,
    device_id: DeviceId,
    model: Rc<str>,
    image_channel: Rc<str>,
    levels: LevelsMap,
    /// Shared with the registry, which feeds and terminates it.
    queue: Rc<ExchangeQueue>,
    scratch: ExchangesScratchArea,
}

impl fmt::Debug for LocalSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalSession")
            .field("id", &self.id)
            .field("device_id", &self.device_id)
            .field("model", &self.model)
            .field("image_channel", &self.image_channel)
            .field("levels", &self.levels)
            .finish_non_exhaustive()
    }
}

impl LocalSession {
    /// The device this session is of.
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// The registration id: the broker's `session_of` reports the id of a device's live
    /// session.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The session's exchange queue, shared (for harnesses that wait on it while the
    /// session itself is borrowed elsewhere).
    pub fn queue(&self) -> Rc<ExchangeQueue> {
        Rc::clone(&self.queue)
    }
}

impl Drop for LocalSession {
    fn drop(&mut self) {
        self.queue.end();
        // A newer session of the device may be waiting for this one to end.
        if self.queue.is_terminated()
            && let Ok(registry) = self.broker.registry.try_borrow()
            && let Some(newer) = registry.get(&self.device_id)
        {
            newer.wake();
        }
    }
}

impl BrokerSession for LocalSession {
    fn session_channel(&self) -> &ExchangeQueue {
        &self.queue
    }

    fn device_identifier(&self) -> &str {
        &self.device_id
    }

    fn device_image_model(&self) -> &str {
        &self.model
    }

    fn device_image_channel(&self) -> &str {
        &self.image_channel
    }

    fn levels(&self) -> &LevelsMap {
        &self.levels
    }

    fn levels_mut(&mut self) -> &mut LevelsMap {
        &mut self.levels
    }

    fn exchange_scratch_area(&mut self) -> &mut ExchangesScratchArea {
        &mut self.scratch
    }

    fn get(
        &self,
        chan: &InternalChannelId,
        cached_ok: bool,
    ) -> Result<(i64, Vec<Notification>), BrokerError> {
        self.broker.get(chan, cached_ok)
    }

    fn drop_by_msg_id(
        &self,
        chan: &InternalChannelId,
        targets: &[Notification],
    ) -> Result<(), BrokerError> {
        self.broker.drop_by_msg_id(chan, targets)
    }

    fn broadcast_exchange(
        &self,
        chan: &InternalChannelId,
    ) -> Result<Rc<BroadcastExchange>, BrokerError> {
        self.broker.broadcast_exchange(chan, true)
    }

    fn durable(&self) -> Option<crate::store::DurableWait> {
        self.broker.store().durable()
    }

    fn feed(&self, exchange: ExchangeRef) {
        self.broker.feed(&self.queue, exchange);
    }

    fn internal_channel_id(&self) -> InternalChannelId {
        InternalChannelId::unicast(&self.device_id, &self.device_id)
    }
}
