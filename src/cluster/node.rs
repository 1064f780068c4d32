//! One shard's part of the service: its Redis client and subscriber, the epochs of its
//! live sessions, and the messages held while a device's list loads.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;
use std::time::SystemTime;

use ahash::AHashMap;
use tracing::{debug, info, warn};

use super::{
    BROADCAST_CHANNEL, ClusterConfig, ClusterStore, Entry, EntryHead, HEARTBEAT, NODE_TTL,
    NODES_KEY, Scripts, ShardMessage, broadcast_keys, millis, parse_broadcast, pending_key,
    route_key, shard_channel,
};
use crate::broker::BrokerError;
use crate::broker::sharded::{Shard, ShardId};
use crate::logging::target;
use crate::protocol::{Payload, SYSTEM_CHANNEL_HEX};
use crate::store::durable::record::Record;
use crate::store::redis::{Push, RedisClient, RedisError, RedisSubscriber, Value};
use crate::store::{
    ChannelState, InMemoryPendingStore, InternalChannelId, NotifyVerdict, PendingStore,
    ScrubCriteria, StoreError, StoreFault, UnicastRequest,
};

/// Messages held for one device while its list loads, at most; past it the device's
/// list is loaded again afterwards.
const MAX_HELD: usize = 1024;

/// A registered session's place in the service.
#[derive(Debug, Clone, Copy)]
struct Live {
    /// The local registration id.
    session: u64,
    /// The connection's epoch in the route record.
    epoch: u64,
    /// The last notify applied to the cache.
    seq: u64,
}

/// Messages for a device whose list is loading.
#[derive(Default)]
struct Held {
    /// Loads in flight for the device.
    loads: u32,
    messages: Vec<(u64, u64, u8, Entry)>,
    /// More came than were held, or another load was asked for: load again after.
    overflowed: bool,
    /// The newest epoch a takeover asked to close while the load was in flight (a kick
    /// can overtake the claim's own reply).
    kicked: u64,
}

/// What a registration got from Redis.
#[derive(Debug)]
pub(crate) struct Claimed {
    epoch: u64,
    /// The previous route: node, shard, epoch.
    previous: Option<(String, usize, u64)>,
    seq: u64,
    items: Vec<Entry>,
}

/// Where a notify must be delivered: the device's node and shard, and what to tell it.
#[derive(Debug)]
pub(crate) struct RouteTo {
    node: String,
    shard: usize,
    message: ShardMessage,
}

/// One shard's part of a service of many nodes.
pub(crate) struct ClusterShard {
    config: ClusterConfig,
    shard: ShardId,
    nr_shards: usize,
    client: RedisClient,
    scripts: Rc<Scripts>,
    store: Rc<ClusterStore>,
    subscriber: RefCell<Option<RedisSubscriber>>,
    /// Device → its session here. Borrowed only inside a method, never across `.await`.
    live: RefCell<AHashMap<Arc<str>, Live>>,
    /// Device → messages held while its list loads. Same borrowing rule.
    held: RefCell<AHashMap<Arc<str>, Held>>,
    /// Whether the subscriber has been subscribed before (a later subscription means
    /// messages may have been missed).
    subscribed_before: Cell<bool>,
    /// Whether the broadcast replica has been loaded from Redis once.
    ready: Cell<bool>,
    /// The device addresses this node advertises (`/delivery-hosts`).
    hosts: RefCell<Vec<String>>,
    closed: Cell<bool>,
}

impl fmt::Debug for ClusterShard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterShard")
            .field("node", &self.config.node_id)
            .field("shard", &self.shard)
            .field("live", &self.live.borrow().len())
            .finish_non_exhaustive()
    }
}

fn unavailable(e: &RedisError) -> BrokerError {
    BrokerError::Store(match e {
        RedisError::Unavailable(_) => StoreError::Unavailable(StoreFault::from(format!("{e}"))),
        other => StoreError::Unavailable(StoreFault::from(format!("{other}"))),
    })
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::Bulk(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Bulk(b) => String::from_utf8(b.clone()).ok(),
        Value::Status(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn malformed(what: &str) -> BrokerError {
    BrokerError::Store(StoreError::Unavailable(StoreFault::from(format!(
        "redis: unexpected reply to {what}"
    ))))
}

/// The entries of a pending list, those that no longer parse or have expired left out.
fn entries(items: &Value) -> Vec<Entry> {
    let now = millis(SystemTime::now());
    match items {
        Value::Array(items) => items
            .iter()
            .filter_map(|v| match v {
                Value::Bulk(raw) => Entry::decode(raw),
                _ => None,
            })
            .filter(|e| e.head.exp >= now)
            .collect(),
        _ => Vec::new(),
    }
}

impl ClusterShard {
    /// The shard's part and its store, on the shard's thread; the receiver of its
    /// subscriber's messages, for [`serve`].
    pub(crate) fn start(
        config: ClusterConfig,
        shard: ShardId,
        nr_shards: usize,
    ) -> Result<(Rc<Self>, flume::Receiver<Push>), RedisError> {
        let client = RedisClient::with_config(&config.redis_url, config.redis.clone())?;
        let scripts = Rc::new(Scripts::new());
        let local = InMemoryPendingStore::new().with_broadcast_backlog(config.broadcast_backlog);
        let store = Rc::new(ClusterStore::new(
            local,
            client.clone(),
            Rc::clone(&scripts),
        ));
        let (subscriber, pushes) = RedisSubscriber::start(
            &config.redis_url,
            config.redis.clone(),
            vec![BROADCAST_CHANNEL.to_vec()],
            vec![shard_channel(&config.node_id, shard.0)],
        )?;
        let this = Rc::new(Self {
            config,
            shard,
            nr_shards,
            client,
            scripts,
            store,
            subscriber: RefCell::new(Some(subscriber)),
            live: RefCell::new(AHashMap::new()),
            held: RefCell::new(AHashMap::new()),
            subscribed_before: Cell::new(false),
            ready: Cell::new(false),
            hosts: RefCell::new(Vec::new()),
            closed: Cell::new(false),
        });
        if shard.0 == 0 {
            glommio::spawn_local(heartbeat(Rc::clone(&this))).detach();
        }
        Ok((this, pushes))
    }

    /// The shard's store.
    pub(crate) fn store(&self) -> Rc<dyn PendingStore> {
        Rc::clone(&self.store) as Rc<dyn PendingStore>
    }

    fn local(&self) -> &InMemoryPendingStore {
        &self.store.local
    }

    /// This node's id.
    pub(crate) fn node_id(&self) -> &str {
        &self.config.node_id
    }

    /// Whether the broadcast replica has been loaded from Redis.
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.get()
    }

    /// Sets the device addresses this node advertises.
    pub(crate) fn advertise(&self, hosts: Vec<String>) {
        *self.hosts.borrow_mut() = hosts;
    }

    /// Ends the subscription and the heartbeat (the node's entry is removed).
    pub(crate) async fn close(&self) {
        self.closed.set(true);
        drop(self.subscriber.borrow_mut().take());
        if self.shard.0 == 0 {
            let _ = self
                .client
                .request(&[b"HDEL", NODES_KEY, self.config.node_id.as_bytes()])
                .await;
        }
    }

    /// Every live node's advertised device addresses, nodes in id order.
    pub(crate) async fn delivery_hosts(&self) -> Result<Vec<String>, BrokerError> {
        let reply = self
            .client
            .request(&[b"HGETALL", NODES_KEY])
            .await
            .map_err(|e| unavailable(&e))?;
        let Value::Array(items) = reply else {
            return Err(malformed("HGETALL"));
        };
        let now = millis(SystemTime::now());
        let ttl = u64::try_from(NODE_TTL.as_millis()).unwrap_or(u64::MAX);
        // Nodes silent for an hour (killed, never stopped cleanly) leave the hash.
        let gone: Vec<Vec<u8>> = items
            .chunks(2)
            .filter_map(|pair| {
                let at: u64 = text(pair.get(1)?)?.split_once(' ')?.0.parse().ok()?;
                (now.saturating_sub(at) > 3_600_000).then(|| text(pair.first()?))?
            })
            .map(String::into_bytes)
            .collect();
        if !gone.is_empty() {
            let client = self.client.clone();
            glommio::spawn_local(async move {
                let mut cmd: Vec<&[u8]> = vec![b"HDEL", NODES_KEY];
                cmd.extend(gone.iter().map(Vec::as_slice));
                let _ = client.request(&cmd).await;
            })
            .detach();
        }
        let mut nodes: Vec<(String, Vec<String>)> = items
            .chunks(2)
            .filter_map(|pair| {
                let node = text(pair.first()?)?;
                let value = text(pair.get(1)?)?;
                let (at, hosts) = value.split_once(' ')?;
                let at: u64 = at.parse().ok()?;
                (now.saturating_sub(at) <= ttl)
                    .then(|| serde_json::from_str::<Vec<String>>(hosts).ok())
                    .flatten()
                    .map(|hosts| (node, hosts))
            })
            .collect();
        nodes.sort();
        Ok(nodes.into_iter().flat_map(|(_, hosts)| hosts).collect())
    }

    /// Applies a notify in Redis: the verdict, and where to deliver it when accepted and
    /// the device is connected somewhere.
    pub(crate) async fn notify(
        &self,
        req: &UnicastRequest,
        msg_id: String,
        max_per_app: usize,
    ) -> Result<(NotifyVerdict, Option<RouteTo>), BrokerError> {
        let Some((user, device)) = req.chan_id.unicast_user_and_device() else {
            return Err(BrokerError::Store(StoreError::UnknownToken));
        };
        let now = millis(SystemTime::now());
        let entry = Entry {
            head: EntryHead {
                id: msg_id.clone(),
                app: req.app_id.clone(),
                exp: millis(req.expiration),
                tag: req.replace_tag.clone().unwrap_or_default(),
            },
            payload: req.payload.clone(),
        };
        let raw = entry.encode();
        let (pkey, rkey) = (pending_key(user, device), route_key(device));
        let now_s = now.to_string();
        let max = max_per_app.to_string();
        let exp = entry.head.exp.to_string();
        let clear: &[u8] = if req.clear_pending { b"1" } else { b"0" };
        let own: &[u8] = if user == device { b"1" } else { b"0" };
        let reply = self
            .client
            .eval(
                &self.scripts.notify,
                &[&pkey, &rkey],
                &[
                    now_s.as_bytes(),
                    &raw,
                    req.app_id.as_bytes(),
                    entry.head.tag.as_bytes(),
                    clear,
                    max.as_bytes(),
                    exp.as_bytes(),
                    own,
                ],
            )
            .await
            .map_err(|e| unavailable(&e))?;
        let Value::Array(parts) = reply else {
            return Err(malformed("notify"));
        };
        match parts.first().and_then(int) {
            Some(0) => {
                let newest = match parts.get(1) {
                    Some(Value::Bulk(raw)) => Entry::decode(raw).map(|e| e.payload),
                    _ => None,
                };
                Ok((
                    NotifyVerdict::TooManyPending {
                        newest: newest.unwrap_or_else(Payload::null),
                    },
                    None,
                ))
            }
            Some(1) => {
                let seq = parts
                    .get(1)
                    .and_then(int)
                    .ok_or_else(|| malformed("notify"))?;
                let node = parts.get(2).and_then(text).unwrap_or_default();
                let shard = parts.get(3).and_then(int);
                let epoch = parts.get(4).and_then(int);
                let mode = parts.get(5).and_then(int).unwrap_or(0);
                let route = match (node.is_empty(), shard, epoch) {
                    // Only a device's own channel is delivered to its sessions.
                    (false, Some(shard), Some(epoch)) if user == device => Some(RouteTo {
                        node,
                        shard: usize::try_from(shard).unwrap_or(usize::MAX),
                        message: ShardMessage::Deliver {
                            epoch: epoch.unsigned_abs(),
                            seq: seq.unsigned_abs(),
                            mode: u8::try_from(mode).unwrap_or(0),
                            user: user.to_owned(),
                            device: device.to_owned(),
                            entry: raw,
                        },
                    }),
                    _ => None,
                };
                Ok((NotifyVerdict::Accepted { msg_id }, route))
            }
            _ => Err(malformed("notify")),
        }
    }

    /// Sends `to` its message: directly on this node, over sharded pub/sub to another.
    pub(crate) fn route(self: &Rc<Self>, shard: &Shard, to: RouteTo) {
        if to.node == self.config.node_id {
            if to.shard == self.shard.0 {
                self.on_message(shard, to.message);
            } else if to.shard < self.nr_shards {
                let message = to.message;
                shard.post(ShardId(to.shard), move |s| {
                    if let Some(c) = s.cluster() {
                        c.on_message(s, message);
                    }
                });
            }
            return;
        }
        let channel = shard_channel(&to.node, to.shard);
        let payload = to.message.encode();
        let client = self.client.clone();
        glommio::spawn_local(async move {
            if let Err(e) = client.request(&[b"SPUBLISH", &channel, &payload]).await {
                // The notification is stored: the device gets it when it reconnects.
                debug!(target: target::BROKER, "redis: cannot tell a node of a notify: {e}");
            }
        })
        .detach();
    }

    /// Appends a broadcast in Redis (one level sequence for the service); every shard of
    /// every node delivers it when it hears it. The new level.
    pub(crate) async fn publish(
        &self,
        chan: &InternalChannelId,
        payload: &Payload,
        expiration: SystemTime,
    ) -> Result<i64, BrokerError> {
        let hex = chan.to_hex().unwrap_or(SYSTEM_CHANNEL_HEX);
        let (level_key, log_key) = broadcast_keys(hex);
        let backlog = self.config.broadcast_backlog.to_string();
        let exp = millis(expiration).to_string();
        let top = self.local().top_level(chan).to_string();
        let reply = self
            .client
            .eval(
                &self.scripts.broadcast,
                &[&level_key, &log_key],
                &[
                    backlog.as_bytes(),
                    exp.as_bytes(),
                    payload.get().as_bytes(),
                    BROADCAST_CHANNEL,
                    top.as_bytes(),
                ],
            )
            .await
            .map_err(|e| unavailable(&e))?;
        int(&reply).ok_or_else(|| malformed("broadcast"))
    }

    /// Loads the broadcast replica from Redis (at start, after a gap, after a lost
    /// subscription): whether it changed, `Err` when Redis did not answer.
    async fn reload_broadcast(&self) -> Result<bool, ()> {
        let chan = InternalChannelId::System;
        let (level_key, log_key) = broadcast_keys(SYSTEM_CHANNEL_HEX);
        let top = self.local().top_level(&chan).to_string();
        let reply = self
            .client
            .eval(
                &self.scripts.broadcast_state,
                &[&level_key, &log_key],
                &[top.as_bytes()],
            )
            .await;
        let parts = match reply {
            Ok(Value::Array(parts)) => parts,
            Ok(other) => {
                warn!(target: target::BROKER, "redis: broadcast state answered {other:?}");
                return Err(());
            }
            Err(e) => {
                debug!(target: target::BROKER, "redis: cannot load the broadcast channel: {e}");
                return Err(());
            }
        };
        let level = parts.first().and_then(int).ok_or(())?;
        let now = SystemTime::now();
        let notifications: Vec<(Payload, SystemTime)> = match parts.get(1) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| match v {
                    Value::Bulk(raw) => parse_broadcast(raw),
                    _ => None,
                })
                .filter(|(_, exp, _)| *exp >= now)
                .map(|(_, exp, payload)| (payload, exp))
                .collect(),
            _ => Vec::new(),
        };
        let before = self.local().top_level(&chan);
        self.local().replay(Record::BroadcastState {
            chan: chan.clone(),
            top_level: level,
            notifications,
        });
        self.ready.set(true);
        Ok(self.local().top_level(&chan) != before)
    }

    /// [`reload_broadcast`](Self::reload_broadcast), tried until Redis answers (backoff
    /// up to 2 s) or the shard closes: whether the replica changed.
    async fn reload_broadcast_until_done(&self) -> bool {
        let mut wait = std::time::Duration::from_millis(50);
        loop {
            if let Ok(changed) = self.reload_broadcast().await {
                return changed;
            }
            if self.closed.get() {
                return false;
            }
            glommio::timer::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(2));
        }
    }

    /// Applies a broadcast heard on pub/sub: `Ok(Some(chan))` to deliver, `Err(())` when a
    /// level was missed and the channel must be reloaded.
    fn on_broadcast(&self, raw: &[u8]) -> Result<Option<InternalChannelId>, ()> {
        let Some((level, expiration, payload)) = parse_broadcast(raw) else {
            warn!(target: target::BROKER, "redis: a broadcast message that does not parse");
            return Ok(None);
        };
        let chan = InternalChannelId::System;
        let top = self.local().top_level(&chan);
        if level <= top {
            return Ok(None);
        }
        if level > top + 1 {
            return Err(());
        }
        self.local().replay(Record::Broadcast {
            chan: chan.clone(),
            level,
            payload,
            expiration,
        });
        Ok(Some(chan))
    }

    /// Registers `device`'s connection in Redis. Messages for it that arrive meanwhile are
    /// held; [`registered`](Self::registered) or [`claim_failed`](Self::claim_failed)
    /// must follow.
    pub(crate) async fn claim(
        self: &Rc<Self>,
        shard: &Shard,
        device: &Arc<str>,
    ) -> Result<Claimed, BrokerError> {
        self.held
            .borrow_mut()
            .entry(Arc::clone(device))
            .or_default()
            .loads += 1;
        self.store.watch(device);
        let shard_no = self.shard.0.to_string();
        let reply = self
            .client
            .eval(
                &self.scripts.claim,
                &[&pending_key(device, device), &route_key(device)],
                &[self.config.node_id.as_bytes(), shard_no.as_bytes()],
            )
            .await;
        let parsed = match reply {
            Ok(Value::Array(parts)) => (|| {
                let epoch = parts.first().and_then(int)?.unsigned_abs();
                let node = parts.get(1).and_then(text).unwrap_or_default();
                let old_shard = parts.get(2).and_then(int);
                let old_epoch = parts.get(3).and_then(int);
                let seq = parts.get(4).and_then(int)?.unsigned_abs();
                let items = entries(parts.get(5)?);
                let previous = match (node.is_empty(), old_shard, old_epoch) {
                    (false, Some(s), Some(e)) => Some((
                        node,
                        usize::try_from(s).unwrap_or(usize::MAX),
                        e.unsigned_abs(),
                    )),
                    _ => None,
                };
                Some(Claimed {
                    epoch,
                    previous,
                    seq,
                    items,
                })
            })()
            .ok_or_else(|| malformed("claim")),
            Ok(_) => Err(malformed("claim")),
            Err(e) => Err(unavailable(&e)),
        };
        if parsed.is_err() {
            self.store.unwatch(device);
            // Whatever was held is for a session of the device that is still live here.
            let held = self.end_load(device);
            self.apply_held(shard, device, held);
        }
        parsed
    }

    /// Ends one load of `device`; what was held for it when it was the last.
    fn end_load(&self, device: &Arc<str>) -> Option<Held> {
        let mut held = self.held.borrow_mut();
        let h = held.get_mut(device)?;
        h.loads = h.loads.saturating_sub(1);
        if h.loads == 0 {
            held.remove(device)
        } else {
            None
        }
    }

    /// A claim whose registration failed after all (the CONNECT is checked before the
    /// claim, so this is not expected): the route is given back, what was held goes to
    /// a session of the device still live here.
    pub(crate) fn claim_failed(
        self: &Rc<Self>,
        shard: &Shard,
        device: &Arc<str>,
        claimed: &Claimed,
    ) {
        let held = self.end_load(device);
        self.apply_held(shard, device, held);
        self.release(device, claimed.epoch);
    }

    /// Puts a claimed device's list in the cache, before its session registers (less
    /// what was dropped while the claim was in flight).
    pub(crate) fn load(&self, device: &Arc<str>, claimed: &Claimed) {
        let dropped = self.store.unwatch(device);
        if dropped.is_empty() {
            self.put_list(device, &claimed.items);
        } else {
            let items: Vec<Entry> = claimed
                .items
                .iter()
                .filter(|e| !dropped.iter().any(|d| **d == *e.head.id))
                .cloned()
                .collect();
            self.put_list(device, &items);
        }
    }

    fn put_list(&self, device: &str, items: &[Entry]) {
        let chan = InternalChannelId::unicast(device, device);
        let (notifications, meta) = items.iter().map(Entry::to_notification).unzip();
        self.local().put_channel(ChannelState {
            chan,
            top_level: 0,
            notifications,
            meta,
        });
    }

    /// The session `session` of `device` registered with `claimed`: applies what was held,
    /// and takes over the previous connection wherever it is.
    pub(crate) fn registered(
        self: &Rc<Self>,
        shard: &Shard,
        device: &Arc<str>,
        session: u64,
        claimed: Claimed,
    ) {
        self.live.borrow_mut().insert(
            Arc::clone(device),
            Live {
                session,
                epoch: claimed.epoch,
                seq: claimed.seq,
            },
        );
        let held = self.end_load(device);
        if held.as_ref().is_some_and(|h| h.kicked >= claimed.epoch) {
            // Taken over elsewhere before this registration was done.
            shard.terminate_session(device, session);
        }
        self.apply_held(shard, device, held);
        if let Some((node, old_shard, epoch)) = claimed.previous
            && (node != self.config.node_id || old_shard != self.shard.0)
        {
            self.route(
                shard,
                RouteTo {
                    node,
                    shard: old_shard,
                    message: ShardMessage::Kick {
                        epoch,
                        device: device.to_string(),
                    },
                },
            );
        }
    }

    /// Applies held messages in `seq` order; loads the list again if one is missing.
    fn apply_held(self: &Rc<Self>, shard: &Shard, device: &Arc<str>, held: Option<Held>) {
        let Some(mut held) = held else { return };
        held.messages.sort_by_key(|m| m.1);
        let mut changed = false;
        let mut gap = held.overflowed;
        for (epoch, seq, mode, entry) in held.messages {
            match self.accept(device, epoch, seq) {
                Accept::Apply => {
                    self.apply_entry(device, mode, &entry);
                    changed = true;
                }
                Accept::Gap => gap = true,
                Accept::Ignore => {}
            }
        }
        if changed {
            shard.deliver_unicast(InternalChannelId::unicast(device, device));
        }
        if gap {
            self.resync(shard, device);
        }
    }

    /// Whether a deliver message for `device` applies now: `seq` must follow the cache's.
    fn accept(&self, device: &str, epoch: u64, seq: u64) -> Accept {
        let mut live = self.live.borrow_mut();
        let Some(l) = live.get_mut(device) else {
            return Accept::Ignore;
        };
        if l.epoch != epoch || seq <= l.seq {
            Accept::Ignore
        } else if seq == l.seq + 1 {
            l.seq = seq;
            Accept::Apply
        } else {
            Accept::Gap
        }
    }

    /// Mirrors in the cache what the notify script did to the list.
    fn apply_entry(&self, device: &str, mode: u8, entry: &Entry) {
        let chan = InternalChannelId::unicast(device, device);
        let local = self.local();
        let (notification, meta) = entry.to_notification();
        let _ = local.scrub(&chan, ScrubCriteria::default());
        let app = &*entry.head.app;
        match mode {
            1 => {
                let _ = local.scrub(
                    &chan,
                    ScrubCriteria {
                        app_id: Some(app),
                        replace_tag: None,
                    },
                );
            }
            2 => {
                let _ = local.scrub(
                    &chan,
                    ScrubCriteria {
                        app_id: Some(app),
                        replace_tag: Some(&entry.head.tag),
                    },
                );
            }
            _ => {}
        }
        let _ = local.append_to_unicast_channel(&chan, notification, meta);
    }

    /// Handles a message for this shard (from pub/sub or from this node).
    pub(crate) fn on_message(self: &Rc<Self>, shard: &Shard, message: ShardMessage) {
        match message {
            ShardMessage::Deliver {
                epoch,
                seq,
                mode,
                user,
                device,
                entry,
            } => {
                if user != device {
                    return;
                }
                let Some(entry) = Entry::decode(&entry) else {
                    warn!(target: target::BROKER, "redis: a deliver message that does not parse");
                    return;
                };
                {
                    let mut held = self.held.borrow_mut();
                    if let Some(h) = held.get_mut(&*device) {
                        if h.messages.len() < MAX_HELD {
                            h.messages.push((epoch, seq, mode, entry));
                        } else {
                            h.overflowed = true;
                        }
                        return;
                    }
                }
                let device: Arc<str> = Arc::from(device);
                match self.accept(&device, epoch, seq) {
                    Accept::Apply => {
                        self.apply_entry(&device, mode, &entry);
                        shard.deliver_unicast(InternalChannelId::unicast(&device, &device));
                    }
                    Accept::Gap => self.resync(shard, &device),
                    Accept::Ignore => {}
                }
            }
            ShardMessage::Kick { epoch, device } => {
                if let Some(h) = self.held.borrow_mut().get_mut(&*device) {
                    h.kicked = h.kicked.max(epoch);
                }
                let live = self.live.borrow().get(&*device).copied();
                if let Some(l) = live
                    && l.epoch <= epoch
                {
                    debug!(target: target::BROKER, "device taken over on another node; closing its session here");
                    shard.terminate_session(&device, l.session);
                }
            }
        }
    }

    /// Loads `device`'s list again (a missed message), holding what arrives meanwhile.
    fn resync(self: &Rc<Self>, shard: &Shard, device: &Arc<str>) {
        {
            let mut held = self.held.borrow_mut();
            let h = held.entry(Arc::clone(device)).or_default();
            if h.loads > 0 {
                // A load is in flight, but it may have been answered before what made
                // this one necessary: load again after it.
                h.overflowed = true;
                return;
            }
            h.loads = 1;
        }
        if !self.live.borrow().contains_key(device) {
            self.end_load(device);
            return;
        }
        self.store.watch(device);
        let this = Rc::clone(self);
        let shard = shard.clone();
        let device = Arc::clone(device);
        glommio::spawn_local(async move {
            let loaded = this.load_list(&device).await;
            let dropped = this.store.unwatch(&device);
            let live = this.live.borrow().contains_key(&device);
            if let (Some((seq, items)), true) = (loaded, live) {
                let items: Vec<Entry> = items
                    .into_iter()
                    .filter(|e| !dropped.iter().any(|d| **d == *e.head.id))
                    .collect();
                this.put_list(&device, &items);
                if let Some(l) = this.live.borrow_mut().get_mut(&device) {
                    l.seq = seq;
                }
                shard.deliver_unicast(InternalChannelId::unicast(&device, &device));
            }
            let held = this.end_load(&device);
            if held.is_some() && !this.live.borrow().contains_key(&device) {
                // The session ended meanwhile: nothing of it stays in the cache.
                this.local()
                    .remove_channel(&InternalChannelId::unicast(&device, &device));
                return;
            }
            if let Some(held) = held
                && (!held.messages.is_empty() || held.overflowed)
            {
                this.apply_held(&shard, &device, Some(held));
            }
        })
        .detach();
    }

    /// The device's `seq` and list from Redis (its route written again if it is gone),
    /// retried with backoff while Redis does not answer and the session lives: `None`
    /// when it gave up or the session ended.
    async fn load_list(&self, device: &Arc<str>) -> Option<(u64, Vec<Entry>)> {
        let mut wait = std::time::Duration::from_millis(50);
        for _ in 0..10 {
            let epoch = self.live.borrow().get(device).map(|l| l.epoch)?;
            let (shard_no, epoch) = (self.shard.0.to_string(), epoch.to_string());
            let reply = self
                .client
                .eval(
                    &self.scripts.load,
                    &[&pending_key(device, device), &route_key(device)],
                    &[
                        self.config.node_id.as_bytes(),
                        shard_no.as_bytes(),
                        epoch.as_bytes(),
                    ],
                )
                .await;
            match reply {
                Ok(Value::Array(parts)) => {
                    let seq = parts.first().and_then(int).map(i64::unsigned_abs)?;
                    return Some((seq, entries(parts.get(1)?)));
                }
                Ok(other) => {
                    warn!(target: target::BROKER, "redis: load answered {other:?}");
                    return None;
                }
                Err(e) => {
                    debug!(target: target::BROKER, "redis: cannot reload a device's list: {e}");
                }
            }
            if self.closed.get() {
                return None;
            }
            glommio::timer::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(2));
        }
        warn!(target: target::BROKER, "redis: gave up reloading a device's list; it gets what it missed when it reconnects");
        None
    }

    /// The session `session` of `device` ended: forgets it, evicts the device's list
    /// from the cache and gives its route back.
    pub(crate) fn unregistered(&self, device: &str, session: u64) {
        let epoch = {
            let mut live = self.live.borrow_mut();
            match live.get(device) {
                Some(l) if l.session == session => {
                    let epoch = l.epoch;
                    live.remove(device);
                    epoch
                }
                _ => return,
            }
        };
        if !self.held.borrow().contains_key(device) {
            self.local()
                .remove_channel(&InternalChannelId::unicast(device, device));
        }
        self.release(device, epoch);
    }

    /// Removes `device`'s route if it is still connection `epoch`'s, in the background.
    fn release(&self, device: &str, epoch: u64) {
        if self.closed.get() {
            return;
        }
        let client = self.client.clone();
        let key = route_key(device);
        let epoch = epoch.to_string();
        // The script is loaded by then (a claim ran it... or not: eval loads it).
        let scripts = Rc::clone(&self.scripts);
        glommio::spawn_local(async move {
            if let Err(e) = client
                .eval(&scripts.release, &[&key], &[epoch.as_bytes()])
                .await
            {
                // A stale route only makes a notify miss: it stays pending.
                debug!(target: target::BROKER, "redis: cannot release a route: {e}");
            }
        })
        .detach();
    }

    /// Loads every live device's list again (after a lost subscription).
    fn resync_all(self: &Rc<Self>, shard: &Shard) {
        let devices: Vec<Arc<str>> = self.live.borrow().keys().cloned().collect();
        for device in devices {
            self.resync(shard, &device);
        }
    }
}

enum Accept {
    Apply,
    Gap,
    Ignore,
}

/// Serves the subscriber's messages on the shard until it is closed.
pub(crate) async fn serve(cluster: Rc<ClusterShard>, shard: Shard, pushes: flume::Receiver<Push>) {
    let mine = shard_channel(cluster.node_id(), cluster.shard.0);
    while let Ok(first) = pushes.recv_async().await {
        let mut next = Some(first);
        let mut deliver = false;
        let mut reload = false;
        let mut subscribed = false;
        let mut taken = 0;
        while let Some(push) = next.take() {
            taken += 1;
            tracing::trace!(target: target::BROKER, "redis push: {push:?}");
            match push {
                Push::Subscribed => {
                    if cluster.subscribed_before.replace(true) {
                        info!(target: target::BROKER, "redis: resubscribed; reloading what may have been missed");
                    }
                    subscribed = true;
                    reload = true;
                }
                Push::Message { channel, payload } => {
                    if channel == BROADCAST_CHANNEL {
                        // With a reload coming, it brings this one too.
                        if !reload {
                            match cluster.on_broadcast(&payload) {
                                Ok(Some(_)) => deliver = true,
                                Ok(None) => {}
                                Err(()) => reload = true,
                            }
                        }
                    } else if channel == mine {
                        match ShardMessage::decode(&payload) {
                            Some(m) => cluster.on_message(&shard, m),
                            None => {
                                warn!(target: target::BROKER, "redis: a shard message that does not parse")
                            }
                        }
                    }
                }
            }
            if taken < 256 {
                next = pushes.try_recv().ok();
            }
        }
        if subscribed {
            // Messages published while no subscription was up are lost (and sessions
            // may have registered before the first one): every live device's list is
            // loaded again, once requests can be made.
            cluster
                .client
                .wait_connected(std::time::Duration::from_secs(5))
                .await;
            cluster.resync_all(&shard);
        }
        if reload && cluster.reload_broadcast_until_done().await {
            deliver = true;
        }
        if deliver {
            shard.deliver_broadcast(InternalChannelId::System).await;
        }
        glommio::yield_if_needed().await;
    }
}

/// Refreshes the node's entry in the list of live nodes until the shard closes.
async fn heartbeat(cluster: Rc<ClusterShard>) {
    while !cluster.closed.get() {
        let hosts = cluster.hosts.borrow().clone();
        if !hosts.is_empty() {
            let value = format!(
                "{} {}",
                millis(SystemTime::now()),
                serde_json::to_string(&hosts).unwrap_or_default()
            );
            if let Err(e) = cluster
                .client
                .request(&[
                    b"HSET",
                    NODES_KEY,
                    cluster.config.node_id.as_bytes(),
                    value.as_bytes(),
                ])
                .await
            {
                debug!(target: target::BROKER, "redis: heartbeat not written: {e}");
            }
        }
        glommio::timer::sleep(HEARTBEAT).await;
    }
}
