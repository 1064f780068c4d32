//! A shard's store when the nodes share Redis: the in-memory store as a cache of what the
//! shard's sessions need (their devices' pending notifications, its replica of the
//! broadcast channels), whose ACK drops are written through to Redis.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

use ahash::AHashMap;
use std::time::SystemTime;

use super::{Scripts, millis, pending_key};
use crate::protocol::{Notification, Payload};
use crate::store::redis::RedisClient;
use crate::store::{
    DurableWait, InMemoryPendingStore, InternalChannelId, Metadata, PendingStore, ScrubCriteria,
    StoreError, StoreFault,
};

/// Loads in flight for one device, and the message ids dropped meanwhile.
type Watch = (u32, Vec<Arc<str>>);

/// A shard's store on a service of many nodes (see the [module](super) documentation).
pub struct ClusterStore {
    pub(crate) local: InMemoryPendingStore,
    client: RedisClient,
    scripts: Rc<Scripts>,
    /// The last drop written through and not yet waited for: an ACK takes its wait at
    /// once after its own drop ([`durable`](PendingStore::durable) takes it), so a
    /// session waits for its own drop (and, Redis answering in order, every earlier
    /// one), and one whose ACK dropped nothing waits for nobody else's.
    last_drop: RefCell<Option<flume::Receiver<Result<(), StoreError>>>>,
    /// Devices whose list is loading from Redis → the message ids dropped meanwhile
    /// (and how many loads are in flight): a load answered before a drop reached Redis
    /// must not bring the dropped notifications back into the cache.
    watched: RefCell<AHashMap<Arc<str>, Watch>>,
}

impl fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterStore")
            .field("local", &self.local)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl ClusterStore {
    pub(crate) fn new(
        local: InMemoryPendingStore,
        client: RedisClient,
        scripts: Rc<Scripts>,
    ) -> Self {
        Self {
            local,
            client,
            scripts,
            last_drop: RefCell::new(None),
            watched: RefCell::new(AHashMap::new()),
        }
    }

    /// A load of `device`'s list begins: drops are recorded until
    /// [`unwatch`](Self::unwatch).
    pub(crate) fn watch(&self, device: &Arc<str>) {
        self.watched
            .borrow_mut()
            .entry(Arc::clone(device))
            .or_default()
            .0 += 1;
    }

    /// A load of `device`'s list ends: the message ids dropped while it was in flight.
    pub(crate) fn unwatch(&self, device: &str) -> Vec<Arc<str>> {
        let mut watched = self.watched.borrow_mut();
        let Some((loads, ids)) = watched.get_mut(device) else {
            return Vec::new();
        };
        *loads = loads.saturating_sub(1);
        let ids = if *loads == 0 {
            std::mem::take(ids)
        } else {
            ids.clone()
        };
        if *loads == 0 {
            watched.remove(device);
        }
        ids
    }
}

fn unavailable(e: impl fmt::Display) -> StoreError {
    StoreError::Unavailable(StoreFault::from(format!("redis: {e}")))
}

impl PendingStore for ClusterStore {
    crate::store::forward_reads_to!(local);

    fn append_to_channel(
        &self,
        chan: &InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
    ) -> Result<i64, StoreError> {
        self.local.append_to_channel(chan, payload, expiration)
    }

    fn append_to_unicast_channel(
        &self,
        chan: &InternalChannelId,
        notification: Notification,
        meta: Metadata,
    ) -> Result<(), StoreError> {
        self.local
            .append_to_unicast_channel(chan, notification, meta)
    }

    fn scrub(
        &self,
        chan: &InternalChannelId,
        criteria: ScrubCriteria<'_>,
    ) -> Result<(), StoreError> {
        self.local.scrub(chan, criteria)
    }

    /// Drops from the cache at once and from Redis in the background;
    /// [`durable`](PendingStore::durable) waits for Redis.
    fn drop_by_msg_id(
        &self,
        chan: &InternalChannelId,
        targets: &[Notification],
    ) -> Result<(), StoreError> {
        self.local.drop_by_msg_id(chan, targets)?;
        let Some((user, device)) = chan.unicast_user_and_device() else {
            return Ok(());
        };
        if targets.is_empty() {
            return Ok(());
        }
        if user == device
            && let Some((_, ids)) = self.watched.borrow_mut().get_mut(device)
        {
            ids.extend(targets.iter().map(|n| Arc::clone(&n.msg_id)));
        }
        let key = pending_key(user, device);
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(targets.len() + 1);
        args.push(millis(SystemTime::now()).to_string().into_bytes());
        args.extend(targets.iter().map(|n| n.msg_id.as_bytes().to_vec()));
        let (done, wait) = flume::bounded(1);
        *self.last_drop.borrow_mut() = Some(wait);
        let client = self.client.clone();
        let scripts = Rc::clone(&self.scripts);
        glommio::spawn_local(async move {
            let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let result = client
                .eval(&scripts.drop, &[&key], &args)
                .await
                .map(drop)
                .map_err(unavailable);
            // Nobody waits when the ACK's session ended first.
            let _ = done.send(result);
        })
        .detach();
        Ok(())
    }

    fn durable(&self) -> Option<DurableWait> {
        let wait = self.last_drop.borrow_mut().take()?;
        Some(Box::pin(async move {
            wait.recv_async()
                .await
                .unwrap_or_else(|_| Err(unavailable("the drop was not written")))
        }))
    }
}
