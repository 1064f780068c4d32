//! The in-memory [`PendingStore`]: one per shard, nothing persisted.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;
use std::time::SystemTime;

use ahash::AHashMap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::{
    Clock, DropPlan, InternalChannelId, Metadata, PendingStore, ScrubCriteria, StoreError,
    SystemClock, filter_out_obsolete, plan_drop_by_msg_id,
};
use crate::protocol::{Notification, Payload};

/// One channel's state.
#[derive(Default)]
struct Channel {
    /// Appends to a broadcast channel so far (expired ones included).
    top_level: i64,
    /// What the channel holds, oldest first.
    notifications: Vec<Notification>,
    /// Metadata of `notifications`, index for index.
    meta: Vec<Metadata>,
}

impl Channel {
    fn remove_where(&mut self, mut gone: impl FnMut(&Notification, &Metadata) -> bool) {
        let keep: Vec<bool> = self
            .notifications
            .iter()
            .zip(&self.meta)
            .map(|(n, m)| !gone(n, m))
            .collect();
        self.retain(&keep);
    }

    fn retain(&mut self, keep: &[bool]) {
        let mut flags = keep.iter();
        self.notifications
            .retain(|_| flags.next().copied().unwrap_or(true));
        let mut flags = keep.iter();
        self.meta.retain(|_| flags.next().copied().unwrap_or(true));
    }
}

/// A [`PendingStore`] held in memory by the thread that uses it.
///
/// Tokens are the original server's: standard base64 of `appid::deviceid`, so tokens it
/// issued keep working. Broadcast channels drop their expired notifications whenever they
/// are appended to, so memory stays bounded by what is live.
pub struct InMemoryPendingStore {
    /// Channel id → its notifications. A `RefCell`: the store serves one thread, and no
    /// borrow outlives a method call.
    channels: RefCell<AHashMap<InternalChannelId, Channel>>,
    /// What "now" is for expiry.
    clock: Rc<dyn Clock>,
}

impl fmt::Debug for InMemoryPendingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryPendingStore")
            .field("channels", &self.channels.borrow().len())
            .finish_non_exhaustive()
    }
}

impl Default for InMemoryPendingStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryPendingStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        Self::with_clock(Rc::new(SystemClock))
    }

    /// An empty store on `clock`.
    pub fn with_clock(clock: Rc<dyn Clock>) -> Self {
        Self {
            channels: RefCell::new(AHashMap::new()),
            clock,
        }
    }

    fn append(&self, chan: &InternalChannelId, n: Notification, meta: Metadata, inc: i64) {
        let now = self.clock.now();
        let mut channels = self.channels.borrow_mut();
        let channel = channels.entry(chan.clone()).or_default();
        if inc != 0 {
            channel.remove_where(|_, m| m.is_expired(now));
        }
        channel.top_level += inc;
        channel.notifications.push(n);
        channel.meta.push(meta);
    }
}

impl PendingStore for InMemoryPendingStore {
    fn register(&self, device_id: &str, app_id: &str) -> Result<String, StoreError> {
        Ok(BASE64.encode(format!("{app_id}::{device_id}")))
    }

    fn unregister(&self, _device_id: &str, _app_id: &str) -> Result<(), StoreError> {
        Ok(())
    }

    fn get_internal_channel_id_from_token(
        &self,
        token: &str,
        app_id: &str,
        user_id: &str,
        device_id: &str,
    ) -> Result<InternalChannelId, StoreError> {
        if !token.is_empty() && !app_id.is_empty() {
            let decoded = BASE64
                .decode(token)
                .map_err(|_| StoreError::UnknownToken)?;
            let decoded = String::from_utf8(decoded).map_err(|_| StoreError::UnknownToken)?;
            let (token_app, token_device) = decoded
                .split_once("::")
                .ok_or(StoreError::UnknownToken)?;
            if token_app != app_id {
                return Err(StoreError::Unauthorized);
            }
            return Ok(InternalChannelId::unicast(token_device, token_device));
        }
        if !user_id.is_empty() && !device_id.is_empty() {
            return Ok(InternalChannelId::unicast(user_id, device_id));
        }
        Err(StoreError::UnknownToken)
    }

    fn get_internal_channel_id(&self, name: &str) -> Result<InternalChannelId, StoreError> {
        if name == "system" {
            Ok(InternalChannelId::System)
        } else {
            Err(StoreError::UnknownChannel)
        }
    }

    fn append_to_channel(
        &self,
        chan: &InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
    ) -> Result<(), StoreError> {
        self.append(
            chan,
            Notification::broadcast(payload),
            Metadata::expiring(expiration),
            1,
        );
        Ok(())
    }

    fn append_to_unicast_channel(
        &self,
        chan: &InternalChannelId,
        notification: Notification,
        meta: Metadata,
    ) -> Result<(), StoreError> {
        self.append(chan, notification, meta, 0);
        Ok(())
    }

    fn get_channel_snapshot(
        &self,
        chan: &InternalChannelId,
    ) -> Result<(i64, Vec<Notification>), StoreError> {
        let channels = self.channels.borrow();
        let Some(channel) = channels.get(chan) else {
            return Ok((0, Vec::new()));
        };
        let live = filter_out_obsolete(
            channel.notifications.iter().zip(&channel.meta),
            self.clock.now(),
        );
        Ok((channel.top_level, live))
    }

    fn get_channel_unfiltered(
        &self,
        chan: &InternalChannelId,
    ) -> Result<(i64, Vec<Notification>, Vec<Metadata>), StoreError> {
        let channels = self.channels.borrow();
        Ok(channels.get(chan).map_or_else(
            || (0, Vec::new(), Vec::new()),
            |c| (c.top_level, c.notifications.clone(), c.meta.clone()),
        ))
    }

    fn scrub(&self, chan: &InternalChannelId, criteria: ScrubCriteria<'_>) -> Result<(), StoreError> {
        let now = self.clock.now();
        let mut channels = self.channels.borrow_mut();
        let Some(channel) = channels.get_mut(chan) else {
            return Ok(());
        };
        channel.remove_where(|n, m| {
            if m.is_expired(now) {
                return true;
            }
            match criteria.app_id {
                Some(app) if *n.app_id == *app => match criteria.replace_tag {
                    Some(tag) => m.replace_tag.as_deref() == Some(tag),
                    None => true,
                },
                _ => false,
            }
        });
        Ok(())
    }

    fn drop_by_msg_id(
        &self,
        chan: &InternalChannelId,
        targets: &[Notification],
    ) -> Result<(), StoreError> {
        let mut channels = self.channels.borrow_mut();
        let Some(channel) = channels.get_mut(chan) else {
            return Ok(());
        };
        match plan_drop_by_msg_id(channel.notifications.iter().map(|n| &*n.msg_id), targets) {
            DropPlan::Head(n) => {
                channel.notifications.drain(..n);
                channel.meta.drain(..n);
            }
            DropPlan::Keep(keep) => channel.retain(&keep),
        }
        Ok(())
    }
}
