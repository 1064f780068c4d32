//! The one-process broker: one registry and one store, on one glommio executor.
//!
//! The reference implementation of the broker API, as the original's `simple` package:
//! sessions register directly on the executor that runs them; deliveries requested through
//! the sending facet (from any thread) go over a bounded flume channel to the broker's
//! task, which reads the store and feeds the sessions.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;

use futures_lite::future;

use super::local::LocalBroker;
use super::{Broker, BrokerConfig, BrokerError, BrokerSending, Delivery, SessionTracker};
use crate::protocol::ConnectMsg;
use crate::store::{InternalChannelId, PendingStore};

pub use super::local::LocalSession as SimpleBrokerSession;

/// The broker's state, shared by the broker handle and its task on one executor.
struct Inner {
    /// The registry and store access.
    local: Rc<LocalBroker>,
    running: Cell<bool>,
    /// The sending facet's end of the delivery queue; cloned into every facet.
    deliveries_tx: flume::Sender<Delivery>,
    /// The broker task's end of the delivery queue.
    deliveries_rx: flume::Receiver<Delivery>,
    /// Stops the broker task, and the task itself, while running.
    task: RefCell<Option<(flume::Sender<()>, glommio::Task<()>)>>,
}

async fn run(inner: Rc<Inner>, stop: flume::Receiver<()>) {
    loop {
        let next = future::or(
            async {
                // Stop asked for, or the handle is gone: either way, end.
                let _ = stop.recv_async().await;
                None
            },
            async { inner.deliveries_rx.recv_async().await.ok() },
        )
        .await;
        match next {
            Some(Delivery::Broadcast(chan)) => inner.local.deliver_broadcast(chan).await,
            Some(Delivery::Unicast(chan)) => {
                inner.local.deliver_unicast(chan);
            }
            None => break,
        }
    }
}

/// The one-executor broker. Create it, [`start`](SimpleBroker::start) it on the executor
/// that runs its sessions, hand [`sending`](SimpleBroker::sending) facets to whoever
/// requests deliveries, and [`stop`](SimpleBroker::stop) it.
///
/// # Example
///
/// A device registers, a broadcast is appended and delivered, and the device ACKs it
/// ([`perform`](super::perform)); `examples/broker_without_sockets.rs` adds a unicast.
///
/// ```
/// use std::rc::Rc;
/// use std::time::{Duration, SystemTime};
/// use pushbroker::broker::{perform, Broker, BrokerSending, BrokerSession, Next, SessionId};
/// use pushbroker::glommio::LocalExecutorBuilder;
/// use pushbroker::{ConnectMsg, InMemoryPendingStore, InternalChannelId, Payload};
/// use pushbroker::{PendingStore, ServerConfig, SimpleBroker};
///
/// let level = LocalExecutorBuilder::default().spawn(|| async {
///     let store = Rc::new(InMemoryPendingStore::new());
///     let broker = SimpleBroker::new(store.clone(), &ServerConfig::default());
///     broker.start();
///     let connect = ConnectMsg { device_id: "dev-1".into(), ..ConnectMsg::default() };
///     let mut sess = broker.register(&connect, &SessionId("s-1".into())).await.unwrap();
///
///     let expiration = SystemTime::now() + Duration::from_secs(60);
///     let payload = Payload::from_json(r#"{"?/?":[1]}"#).unwrap();
///     store.append_to_channel(&InternalChannelId::System, payload, expiration).unwrap();
///     broker.sending().broadcast(InternalChannelId::System).unwrap();
///     // The catch-up queued at registration (nothing then), then the broadcast.
///     while sess.levels().get(&InternalChannelId::System) != Some(&1) {
///         let Next::Exchange(exchange) = sess.session_channel().next().await else { break };
///         perform(exchange.as_ref(), &mut sess, |_frame| true).unwrap();
///     }
///     broker.stop().await;
///     sess.levels().get(&InternalChannelId::System).copied()
/// })?.join()?;
/// assert_eq!(level, Some(1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SimpleBroker {
    inner: Rc<Inner>,
}

impl fmt::Debug for SimpleBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimpleBroker")
            .field("sessions", &self.inner.local.session_count())
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
                local: LocalBroker::new(store, config.session_queue_size()),
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
        self.inner.local.session_of(device_id)
    }

    /// How many sessions are registered.
    pub fn session_count(&self) -> usize {
        self.inner.local.session_count()
    }

    /// What the broker has delivered since it was made.
    pub fn stats(&self) -> super::DeliveryStats {
        self.inner.local.stats()
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
        self.inner.local.register(connect, track)
    }

    fn unregister(&self, sess: &SimpleBrokerSession) {
        self.inner.local.unregister(sess);
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
