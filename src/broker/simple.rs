//! The one-process broker: one registry and one store, on one glommio executor.
//!
//! The reference implementation of the broker API, as the original's `simple` package:
//! sessions register directly on the executor that runs them; deliveries requested through
//! the sending facet (from any thread) go over a bounded flume channel to the broker's
//! task, which reads the store and feeds the sessions.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

use ahash::AHashMap;
use futures_lite::future;
use tracing::{debug, error};

use super::{
    Broker, BrokerConfig, BrokerError, BrokerSending, BrokerSession, ExchangeQueue, ExchangeRef,
    ExchangesScratchArea, LevelsMap, SessionTracker, UnicastExchange, BroadcastExchange,
    feed_pending, get_info_string, levels_from_connect,
};
use crate::protocol::{ConnectMsg, Notification};
use crate::store::{InternalChannelId, PendingStore};

/// A delivery asked for through the sending facet.
#[derive(Debug, Clone)]
enum Delivery {
    Broadcast(InternalChannelId),
    Unicast(InternalChannelId),
}

/// A registered session as the registry holds it.
struct Registered {
    /// Which registration this is, so an older session cannot unregister a newer one.
    id: u64,
    /// Where the broker feeds the session.
    queue: Rc<ExchangeQueue>,
}

/// The broker's state, shared by the broker handle, its task and its sessions, all on one
/// executor.
struct Inner {
    store: Rc<dyn PendingStore>,
    /// Device id → its live session. Borrowed only inside a method, never across
    /// `.await`.
    registry: RefCell<AHashMap<Arc<str>, Registered>>,
    session_queue_size: usize,
    next_session: Cell<u64>,
    running: Cell<bool>,
    /// The sending facet's end of the delivery queue; cloned into every facet.
    deliveries_tx: flume::Sender<Delivery>,
    /// The broker task's end of the delivery queue.
    deliveries_rx: flume::Receiver<Delivery>,
    /// Stops the broker task, and the task itself, while running.
    task: RefCell<Option<(flume::Sender<()>, glommio::Task<()>)>>,
}

impl Inner {
    fn get(
        &self,
        chan: &InternalChannelId,
        cached_ok: bool,
    ) -> Result<(i64, Vec<Notification>), BrokerError> {
        self.store.get_channel_snapshot(chan).map_err(|e| {
            error!("unsuccessful, get channel snapshot for {chan} (cachedOk={cached_ok}): {e}");
            e.into()
        })
    }

    fn drop_by_msg_id(
        &self,
        chan: &InternalChannelId,
        targets: &[Notification],
    ) -> Result<(), BrokerError> {
        self.store.drop_by_msg_id(chan, targets).map_err(|e| {
            error!("unsuccessful, drop from channel {chan}: {e}");
            e.into()
        })
    }

    fn queues(&self) -> Vec<Rc<ExchangeQueue>> {
        self.registry
            .borrow()
            .values()
            .map(|r| Rc::clone(&r.queue))
            .collect()
    }

    async fn deliver(&self, delivery: Delivery) {
        match delivery {
            Delivery::Broadcast(chan) => {
                let Ok((top_level, notifications)) = self.get(&chan, false) else {
                    // Logged by `get`; the next broadcast tries again.
                    return;
                };
                let exchange: ExchangeRef =
                    Rc::new(BroadcastExchange::new(chan, top_level, notifications));
                for queue in self.queues() {
                    feed_queue(&queue, Rc::clone(&exchange));
                    glommio::yield_if_needed().await;
                }
            }
            Delivery::Unicast(chan) => {
                let Some((_, device)) = chan.unicast_user_and_device() else {
                    debug!("unicast asked for broadcast channel {chan}");
                    return;
                };
                let queue = self
                    .registry
                    .borrow()
                    .get(device)
                    .map(|r| Rc::clone(&r.queue));
                if let Some(queue) = queue {
                    feed_queue(
                        &queue,
                        Rc::new(UnicastExchange {
                            chan_id: chan,
                            cached_ok: false,
                        }),
                    );
                }
            }
        }
    }
}

fn feed_queue(queue: &ExchangeQueue, exchange: ExchangeRef) {
    if let Err(refused) = queue.feed(exchange) {
        debug!("session queue full, dropping {refused:?}");
    }
}

async fn run(inner: Rc<Inner>, stop: flume::Receiver<()>) {
    loop {
        let next = future::or(async { stop.recv_async().await.ok().and(None) }, async {
            inner.deliveries_rx.recv_async().await.ok()
        })
        .await;
        match next {
            Some(delivery) => inner.deliver(delivery).await,
            None => break,
        }
    }
}

/// The one-executor broker. Create it, [`start`](SimpleBroker::start) it on the executor
/// that runs its sessions, hand [`sending`](SimpleBroker::sending) facets to whoever
/// requests deliveries, and [`stop`](SimpleBroker::stop) it.
pub struct SimpleBroker {
    inner: Rc<Inner>,
}

impl fmt::Debug for SimpleBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimpleBroker")
            .field("sessions", &self.inner.registry.borrow().len())
            .field("running", &self.inner.running.get())
            .finish()
    }
}

impl SimpleBroker {
    /// A stopped broker over `store`.
    pub fn new(store: Rc<dyn PendingStore>, config: &dyn BrokerConfig) -> Self {
        let (deliveries_tx, deliveries_rx) = flume::bounded(config.broker_queue_size().max(1));
        Self {
            inner: Rc::new(Inner {
                store,
                registry: RefCell::new(AHashMap::new()),
                session_queue_size: config.session_queue_size(),
                next_session: Cell::new(0),
                running: Cell::new(false),
                deliveries_tx,
                deliveries_rx,
                task: RefCell::new(None),
            }),
        }
    }

    /// Starts the broker's task on the current glommio executor; does nothing when
    /// running.
    ///
    /// # Panics
    /// Outside a glommio executor.
    pub fn start(&self) {
        if self.inner.running.replace(true) {
            return;
        }
        let (stop_tx, stop_rx) = flume::bounded(1);
        let task = glommio::spawn_local(run(Rc::clone(&self.inner), stop_rx));
        *self.inner.task.borrow_mut() = Some((stop_tx, task));
    }

    /// Stops the broker's task and waits for it; does nothing when stopped. Requested
    /// deliveries that the task has not taken stay queued for the next start.
    pub async fn stop(&self) {
        let task = self.inner.task.borrow_mut().take();
        if let Some((stop, task)) = task {
            // The task holds the receiver until it ends: the send cannot fail before that.
            let _ = stop.send(());
            task.await;
        }
        self.inner.running.set(false);
    }

    /// Whether the broker is running.
    pub fn running(&self) -> bool {
        self.inner.running.get()
    }

    /// The sending facet, for any thread.
    pub fn sending(&self) -> SimpleBrokerSending {
        SimpleBrokerSending {
            deliveries: self.inner.deliveries_tx.clone(),
        }
    }

    /// The registration id of the live session of `device_id`, if any (the suite's
    /// reveal hook).
    pub fn session_of(&self, device_id: &str) -> Option<u64> {
        self.inner.registry.borrow().get(device_id).map(|r| r.id)
    }

    /// How many sessions are registered.
    pub fn session_count(&self) -> usize {
        self.inner.registry.borrow().len()
    }
}

impl Broker for SimpleBroker {
    type Session = SimpleBrokerSession;

    async fn register(
        &self,
        connect: &ConnectMsg,
        track: &dyn SessionTracker,
    ) -> Result<SimpleBrokerSession, BrokerError> {
        if !self.inner.running.get() {
            return Err(BrokerError::NotRunning);
        }
        let model = get_info_string(connect, "device", "?")?.to_owned();
        let image_channel = get_info_string(connect, "channel", "?")?.to_owned();
        let levels = levels_from_connect(connect)?;
        let id = self.inner.next_session.get() + 1;
        self.inner.next_session.set(id);
        let queue = Rc::new(ExchangeQueue::new(self.inner.session_queue_size));
        let device_id: Arc<str> = Arc::from(connect.device_id.as_str());
        let previous = self.inner.registry.borrow_mut().insert(
            Arc::clone(&device_id),
            Registered {
                id,
                queue: Rc::clone(&queue),
            },
        );
        if let Some(previous) = previous {
            previous.queue.terminate();
        }
        let mut sess = SimpleBrokerSession {
            broker: Rc::clone(&self.inner),
            id,
            device_id,
            model,
            image_channel,
            levels,
            queue,
            scratch: ExchangesScratchArea::default(),
        };
        debug!(session = track.session_id(), device = %sess.device_id, "registered with broker");
        feed_pending(&mut sess);
        track.registered(&sess);
        Ok(sess)
    }

    fn unregister(&self, sess: &SimpleBrokerSession) {
        let mut registry = self.inner.registry.borrow_mut();
        if registry.get(&sess.device_id).is_some_and(|r| r.id == sess.id) {
            registry.remove(&sess.device_id);
        }
    }
}

/// The sending facet of a [`SimpleBroker`]: `Send`, cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct SimpleBrokerSending {
    deliveries: flume::Sender<Delivery>,
}

impl SimpleBrokerSending {
    fn send(&self, delivery: Delivery) -> Result<(), BrokerError> {
        self.deliveries.try_send(delivery).map_err(|e| match e {
            flume::TrySendError::Full(_) => BrokerError::QueueFull,
            flume::TrySendError::Disconnected(_) => BrokerError::NotRunning,
        })
    }
}

impl BrokerSending for SimpleBrokerSending {
    fn broadcast(&self, chan: InternalChannelId) -> Result<(), BrokerError> {
        self.send(Delivery::Broadcast(chan))
    }

    fn unicast(&self, chans: &[InternalChannelId]) -> Result<(), BrokerError> {
        chans
            .iter()
            .try_for_each(|chan| self.send(Delivery::Unicast(chan.clone())))
    }
}

/// A session registered with a [`SimpleBroker`], owned by the session's task.
pub struct SimpleBrokerSession {
    broker: Rc<Inner>,
    /// The registration id (see [`SimpleBroker::session_of`]).
    id: u64,
    device_id: Arc<str>,
    model: String,
    image_channel: String,
    levels: LevelsMap,
    queue: Rc<ExchangeQueue>,
    scratch: ExchangesScratchArea,
}

impl fmt::Debug for SimpleBrokerSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimpleBrokerSession")
            .field("id", &self.id)
            .field("device_id", &self.device_id)
            .field("model", &self.model)
            .field("image_channel", &self.image_channel)
            .field("levels", &self.levels)
            .finish_non_exhaustive()
    }
}

impl SimpleBrokerSession {
    /// The registration id, as [`SimpleBroker::session_of`] reports it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The session's exchange queue, shared (for harnesses that wait on it while the
    /// session itself is borrowed elsewhere).
    pub fn queue(&self) -> Rc<ExchangeQueue> {
        Rc::clone(&self.queue)
    }
}

impl BrokerSession for SimpleBrokerSession {
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

    fn feed(&self, exchange: ExchangeRef) {
        feed_queue(&self.queue, exchange);
    }

    fn internal_channel_id(&self) -> InternalChannelId {
        InternalChannelId::unicast(&self.device_id, &self.device_id)
    }
}
