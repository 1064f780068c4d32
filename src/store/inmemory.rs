//! The in-memory [`PendingStore`]: one per shard, nothing persisted.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;
use std::time::SystemTime;

use ahash::AHashMap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::durable::record::{self, Record};
use super::{
    AppPending, Clock, DropPlan, InternalChannelId, Metadata, PendingStore, ScrubCriteria,
    StoreError, SystemClock, filter_out_obsolete, plan_drop_by_msg_id,
};
use crate::protocol::{Notification, Payload};

/// The longest decoded token read on the stack (`app::device` of a usual app and device).
const TOKEN_ON_STACK: usize = 256;

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
    /// Live notifications a broadcast channel keeps; the oldest go beyond it.
    broadcast_backlog: usize,
}

impl fmt::Debug for InMemoryPendingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryPendingStore")
            .field("channels", &self.channels.borrow().len())
            .finish_non_exhaustive()
    }
}

/// Live notifications a broadcast channel keeps by default (`broadcast_backlog`): what
/// catch-up can hold stays bounded.
pub const DEFAULT_BROADCAST_BACKLOG: usize = 1000;

impl Default for InMemoryPendingStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryPendingStore {
    /// An empty store on the system clock, keeping [`DEFAULT_BROADCAST_BACKLOG`]
    /// notifications per broadcast channel.
    pub fn new() -> Self {
        Self::with_clock(Rc::new(SystemClock))
    }

    /// An empty store on `clock`, keeping [`DEFAULT_BROADCAST_BACKLOG`] notifications
    /// per broadcast channel.
    pub fn with_clock(clock: Rc<dyn Clock>) -> Self {
        Self {
            channels: RefCell::new(AHashMap::new()),
            clock,
            broadcast_backlog: DEFAULT_BROADCAST_BACKLOG,
        }
    }

    /// Keeps at most `max` notifications in each broadcast channel: an append beyond it
    /// drops the oldest. The levels keep counting, so a device further behind than the
    /// backlog gets its newest `max` notifications. At least 1.
    #[must_use]
    pub fn with_broadcast_backlog(mut self, max: usize) -> Self {
        self.broadcast_backlog = max.max(1);
        self
    }

    /// Appends to `chan`, raising its level by `inc`; the new level.
    fn append(&self, chan: &InternalChannelId, n: Notification, meta: Metadata, inc: i64) -> i64 {
        let now = self.clock.now();
        let mut channels = self.channels.borrow_mut();
        let channel = channels.entry(chan.clone()).or_default();
        if inc != 0 {
            channel.remove_where(|_, m| m.is_expired(now));
        }
        channel.top_level += inc;
        channel.notifications.push(n);
        channel.meta.push(meta);
        if inc != 0 && channel.notifications.len() > self.broadcast_backlog {
            let over = channel.notifications.len() - self.broadcast_backlog;
            channel.notifications.drain(..over);
            channel.meta.drain(..over);
        }
        channel.top_level
    }
}

/// One channel's state as recovery and snapshots move it between stores and threads.
#[derive(Debug, Clone)]
pub(crate) struct ChannelState {
    pub(crate) chan: InternalChannelId,
    pub(crate) top_level: i64,
    pub(crate) notifications: Vec<Notification>,
    pub(crate) meta: Vec<Metadata>,
}

impl InMemoryPendingStore {
    /// Applies one log record, as recovery replays a shard's log.
    ///
    /// A broadcast record at or below the channel's level is one this store already has
    /// (each shard logs its own replica) and is skipped.
    pub(crate) fn replay(&self, record: Record) {
        let mut channels = self.channels.borrow_mut();
        match record {
            Record::Broadcast {
                chan,
                level,
                payload,
                expiration,
            } => {
                let channel = channels.entry(chan).or_default();
                if level <= channel.top_level {
                    return;
                }
                channel.top_level = level;
                channel.notifications.push(Notification::broadcast(payload));
                channel.meta.push(Metadata::expiring(expiration));
                if channel.notifications.len() > self.broadcast_backlog {
                    // As the append did: the expired go before the backlog is counted, or
                    // a newer one that expired first would push out an older live one.
                    let now = self.clock.now();
                    channel.remove_where(|_, m| m.is_expired(now));
                }
                if channel.notifications.len() > self.broadcast_backlog {
                    let over = channel.notifications.len() - self.broadcast_backlog;
                    channel.notifications.drain(..over);
                    channel.meta.drain(..over);
                }
            }
            Record::BroadcastState {
                chan,
                top_level,
                notifications,
            } => {
                let channel = channels.entry(chan).or_default();
                if top_level < channel.top_level {
                    return;
                }
                channel.top_level = top_level;
                channel.notifications.clear();
                channel.meta.clear();
                let keep = notifications.len().saturating_sub(self.broadcast_backlog);
                for (payload, expiration) in notifications.into_iter().skip(keep) {
                    channel.notifications.push(Notification::broadcast(payload));
                    channel.meta.push(Metadata::expiring(expiration));
                }
            }
            Record::Unicast {
                chan,
                notification,
                meta,
            } => {
                let channel = channels.entry(chan).or_default();
                channel.notifications.push(notification);
                channel.meta.push(meta);
            }
            Record::Drop { chan, msg_ids } => {
                if let Some(channel) = channels.get_mut(&chan) {
                    channel.remove_where(|n, _| msg_ids.contains(&n.msg_id));
                }
                forget_if_empty(&mut channels, &chan);
            }
            Record::Scrub {
                chan,
                app_id,
                replace_tag,
            } => {
                if let Some(channel) = channels.get_mut(&chan) {
                    channel.remove_where(|n, m| {
                        n.app_id == app_id
                            && (replace_tag.is_none() || m.replace_tag == replace_tag)
                    });
                }
                forget_if_empty(&mut channels, &chan);
            }
        }
    }

    /// Takes every channel out, expired notifications left behind.
    pub(crate) fn take_channels(&self) -> Vec<ChannelState> {
        let now = self.clock.now();
        let channels = std::mem::take(&mut *self.channels.borrow_mut());
        channels
            .into_iter()
            .filter_map(|(chan, mut c)| {
                c.remove_where(|_, m| m.is_expired(now));
                (c.top_level != 0 || !c.notifications.is_empty()).then_some(ChannelState {
                    chan,
                    top_level: c.top_level,
                    notifications: c.notifications,
                    meta: c.meta,
                })
            })
            .collect()
    }

    /// Forgets one channel (a cache evicting a device that left).
    pub(crate) fn remove_channel(&self, chan: &InternalChannelId) {
        self.channels.borrow_mut().remove(chan);
    }

    /// A channel's top level (0 for an unknown one), without copying what it holds.
    pub(crate) fn top_level(&self, chan: &InternalChannelId) -> i64 {
        self.channels.borrow().get(chan).map_or(0, |c| c.top_level)
    }

    /// Puts `state` in as one channel's whole state.
    pub(crate) fn put_channel(&self, state: ChannelState) {
        self.channels.borrow_mut().insert(
            state.chan,
            Channel {
                top_level: state.top_level,
                notifications: state.notifications,
                meta: state.meta,
            },
        );
    }

    /// The records that rebuild this store's live state, appended to `out` (a snapshot:
    /// what compaction writes in place of a log): each unicast notification, and each
    /// broadcast channel's whole state in one record.
    pub(crate) fn snapshot_into(&self, out: &mut Vec<u8>) {
        let now = self.clock.now();
        let channels = self.channels.borrow();
        for (chan, c) in channels.iter() {
            let live = c
                .notifications
                .iter()
                .zip(&c.meta)
                .filter(|(_, m)| !m.is_expired(now));
            if chan.is_unicast() {
                for (n, m) in live {
                    record::encode(
                        &Record::Unicast {
                            chan: chan.clone(),
                            notification: n.clone(),
                            meta: m.clone(),
                        },
                        out,
                    );
                }
                continue;
            }
            // A broadcast channel as one record: its level, and its live notifications
            // in order (their own levels are not kept: a device gets the newest ones
            // its level is behind by).
            record::encode(
                &Record::BroadcastState {
                    chan: chan.clone(),
                    top_level: c.top_level,
                    notifications: live
                        .map(|(n, m)| (n.payload.clone(), m.expiration))
                        .collect(),
                },
                out,
            );
        }
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
            // A usual token decodes on the stack; a longer one into the heap.
            let mut stack = [0u8; TOKEN_ON_STACK];
            let heap;
            let decoded = if base64::decoded_len_estimate(token.len()) <= TOKEN_ON_STACK {
                let n = BASE64
                    .decode_slice(token, &mut stack)
                    .map_err(|_| StoreError::UnknownToken)?;
                &stack[..n]
            } else {
                heap = BASE64.decode(token).map_err(|_| StoreError::UnknownToken)?;
                &heap[..]
            };
            let decoded = std::str::from_utf8(decoded).map_err(|_| StoreError::UnknownToken)?;
            // Strip the request's app id as a prefix instead of splitting at the first
            // `::`, so app ids containing `::` work too (device ids already did). Given
            // the app id the device is unambiguous, but one token can belong to two
            // pairs: `a::b::d` is the token of ("b::d", "a") and of ("d", "a::b").
            let Some(token_device) = decoded
                .strip_prefix(app_id)
                .and_then(|rest| rest.strip_prefix("::"))
            else {
                return Err(if decoded.contains("::") {
                    StoreError::Unauthorized
                } else {
                    StoreError::UnknownToken
                });
            };
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
    ) -> Result<i64, StoreError> {
        Ok(self.append(
            chan,
            Notification::broadcast(payload),
            Metadata::expiring(expiration),
            1,
        ))
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

    fn app_pending(
        &self,
        chan: &InternalChannelId,
        app_id: &str,
        replace_tag: Option<&str>,
    ) -> Result<AppPending, StoreError> {
        // Counted in place: a notify does not copy the channel it is checked against.
        let channels = self.channels.borrow();
        Ok(channels.get(chan).map_or_else(AppPending::default, |c| {
            AppPending::count(c.notifications.iter().zip(&c.meta), app_id, replace_tag)
        }))
    }

    fn scrub(
        &self,
        chan: &InternalChannelId,
        criteria: ScrubCriteria<'_>,
    ) -> Result<(), StoreError> {
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
        forget_if_empty(&mut channels, chan);
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
        forget_if_empty(&mut channels, chan);
        Ok(())
    }
}

/// Forgets a channel that holds nothing and has no level to remember (an emptied
/// unicast channel), so channels of devices that come and go do not accumulate.
fn forget_if_empty(channels: &mut AHashMap<InternalChannelId, Channel>, chan: &InternalChannelId) {
    if channels
        .get(chan)
        .is_some_and(|c| c.notifications.is_empty() && c.top_level == 0)
    {
        channels.remove(chan);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::store::ManualClock;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    /// A store whose clock reads `t(0)` until the test moves it.
    fn store() -> (InMemoryPendingStore, Rc<ManualClock>) {
        let clock = Rc::new(ManualClock::new(t(0)));
        (InMemoryPendingStore::with_clock(clock.clone()), clock)
    }

    fn payload(i: usize) -> Payload {
        Payload::from_json(&format!(r#"{{"a":{i}}}"#)).expect("valid JSON")
    }

    fn n(app: &str, msg: &str) -> Notification {
        let payload = Payload::from_json(&format!(r#"{{"m":"{msg}"}}"#)).expect("valid JSON");
        Notification::unicast(app, msg, payload)
    }

    fn msg_ids(ns: &[Notification]) -> Vec<&str> {
        ns.iter().map(|n| &*n.msg_id).collect()
    }

    fn dev() -> InternalChannelId {
        InternalChannelId::unicast("user1", "dev1")
    }

    fn snapshot(s: &InMemoryPendingStore, chan: &InternalChannelId) -> (i64, Vec<Notification>) {
        s.get_channel_snapshot(chan)
            .expect("in-memory store never fails")
    }

    fn unfiltered(
        s: &InMemoryPendingStore,
        chan: &InternalChannelId,
    ) -> (i64, Vec<Notification>, Vec<Metadata>) {
        s.get_channel_unfiltered(chan)
            .expect("in-memory store never fails")
    }

    fn resolve(
        s: &InMemoryPendingStore,
        token: &str,
        app: &str,
        user: &str,
        device: &str,
    ) -> Result<InternalChannelId, StoreError> {
        s.get_internal_channel_id_from_token(token, app, user, device)
    }

    /// Appends `(app, msg id, expiry, tag)` entries to `chan`.
    fn fill(
        s: &InMemoryPendingStore,
        chan: &InternalChannelId,
        entries: &[(&str, &str, u64, Option<&str>)],
    ) {
        for &(app, msg, exp, tag) in entries {
            let meta = Metadata {
                expiration: t(exp),
                replace_tag: tag.map(Arc::from),
            };
            s.append_to_unicast_channel(chan, n(app, msg), meta)
                .expect("in-memory store never fails");
        }
    }

    /// Every notification of the channel sits beside its own metadata.
    fn assert_aligned(
        s: &InMemoryPendingStore,
        chan: &InternalChannelId,
        expected: &[(&str, u64, Option<&str>)],
    ) {
        let (_, ns, metas) = unfiltered(s, chan);
        assert_eq!(ns.len(), metas.len());
        let got: Vec<(&str, SystemTime, Option<&str>)> = ns
            .iter()
            .zip(&metas)
            .map(|(n, m)| (&*n.msg_id, m.expiration, m.replace_tag.as_deref()))
            .collect();
        let want: Vec<(&str, SystemTime, Option<&str>)> = expected
            .iter()
            .map(|&(msg, exp, tag)| (msg, t(exp), tag))
            .collect();
        assert_eq!(got, want);
    }

    // Tokens.

    #[test]
    fn a_broadcast_channel_keeps_its_newest_backlog_and_counts_on() {
        let (s, _) = store();
        let s = s.with_broadcast_backlog(3);
        let chan = InternalChannelId::System;
        for i in 0..5 {
            s.append_to_channel(&chan, payload(i), t(3600))
                .expect("append");
        }
        let (top, live) = s.get_channel_snapshot(&chan).expect("snapshot");
        assert_eq!(top, 5, "levels count every append");
        let payloads: Vec<&str> = live.iter().map(|n| n.payload.get()).collect();
        assert_eq!(payloads, [r#"{"a":2}"#, r#"{"a":3}"#, r#"{"a":4}"#]);

        // Unicast channels are bounded per app by the notify rules, not by this.
        let own = InternalChannelId::unicast("u", "d");
        for i in 0..5 {
            let n = Notification {
                app_id: "app".into(),
                msg_id: format!("m{i}").into(),
                payload: payload(i),
            };
            s.append_to_unicast_channel(&own, n, Metadata::expiring(t(3600)))
                .expect("append");
        }
        assert_eq!(s.get_channel_snapshot(&own).expect("snapshot").1.len(), 5);
    }

    #[test]
    fn token_is_standard_base64_of_app_and_device() {
        let (s, _) = store();
        let token = s.register("dev1", "app1").expect("register");
        assert_eq!(token, "YXBwMTo6ZGV2MQ==");
        assert_eq!(s.register("dev1", "app1").expect("register"), token);
        assert_ne!(s.register("dev2", "app1").expect("register"), token);
        assert_ne!(s.register("dev1", "app2").expect("register"), token);
        assert_eq!(s.unregister("dev1", "app1"), Ok(()));
    }

    #[test]
    fn token_resolves_to_the_devices_own_unicast_channel() {
        let (s, _) = store();
        let token = s.register("dev1", "app1").expect("register");
        assert_eq!(
            resolve(&s, &token, "app1", "", ""),
            Ok(InternalChannelId::unicast("dev1", "dev1"))
        );
        // The token wins over user and device ids.
        assert_eq!(
            resolve(&s, &token, "app1", "user9", "dev9"),
            Ok(InternalChannelId::unicast("dev1", "dev1"))
        );
        // A token issued by the original server, built by hand.
        assert_eq!(
            resolve(&s, "YXBwMTo6ZGV2MQ==", "app1", "", ""),
            Ok(InternalChannelId::unicast("dev1", "dev1"))
        );
    }

    #[test]
    fn tokens_of_any_length_resolve() {
        let (s, _) = store();
        // Around the length decoded on the stack, and far beyond it.
        for len in [
            1,
            TOKEN_ON_STACK - 8,
            TOKEN_ON_STACK - 7,
            TOKEN_ON_STACK,
            4 * TOKEN_ON_STACK,
        ] {
            let device = "d".repeat(len);
            let token = s.register(&device, "app1").expect("register");
            assert_eq!(
                resolve(&s, &token, "app1", "", ""),
                Ok(InternalChannelId::unicast(&device, &device)),
                "{len}"
            );
        }
    }

    #[test]
    fn token_of_another_app_is_unauthorized() {
        let (s, _) = store();
        let token = s.register("dev1", "app1").expect("register");
        assert_eq!(
            resolve(&s, &token, "app2", "", ""),
            Err(StoreError::Unauthorized)
        );
        // A prefix of the token's app id is another app.
        assert_eq!(
            resolve(&s, &token, "app", "", ""),
            Err(StoreError::Unauthorized)
        );
        assert_eq!(
            resolve(&s, &token, "app1:", "", ""),
            Err(StoreError::Unauthorized)
        );
    }

    #[test]
    fn malformed_tokens_are_unknown() {
        let (s, _) = store();
        for token in [
            "not base64!",
            "YXBwMTo6ZGV2MQ", // unpadded
            &BASE64.encode("app1dev1"),
            &BASE64.encode("app1:dev1"),
            &BASE64.encode([0xff, 0xfe, b':', b':', b'd']),
        ] {
            assert_eq!(
                resolve(&s, token, "app1", "user1", "dev1"),
                Err(StoreError::UnknownToken),
                "{token:?}"
            );
        }
    }

    #[test]
    fn without_token_user_and_device_name_the_channel() {
        let (s, _) = store();
        assert_eq!(
            resolve(&s, "", "app1", "user1", "dev1"),
            Ok(InternalChannelId::unicast("user1", "dev1"))
        );
        // A token without an app id is not looked at.
        assert_eq!(
            resolve(&s, "garbage", "", "user1", "dev1"),
            Ok(InternalChannelId::unicast("user1", "dev1"))
        );
        for (token, app, user, device) in [
            ("", "", "", ""),
            ("", "app1", "", ""),
            ("", "app1", "user1", ""),
            ("", "app1", "", "dev1"),
        ] {
            assert_eq!(
                resolve(&s, token, app, user, device),
                Err(StoreError::UnknownToken),
                "{user:?} {device:?}"
            );
        }
    }

    #[test]
    fn ids_containing_the_separator_round_trip() {
        let (s, _) = store();
        let token = s.register("dev::1", "app1").expect("register");
        assert_eq!(
            resolve(&s, &token, "app1", "", ""),
            Ok(InternalChannelId::unicast("dev::1", "dev::1"))
        );
        let token = s.register("dev1", "com::app").expect("register");
        assert_eq!(token, BASE64.encode("com::app::dev1"));
        assert_eq!(
            resolve(&s, &token, "com::app", "", ""),
            Ok(InternalChannelId::unicast("dev1", "dev1"))
        );
        assert_eq!(
            resolve(&s, &token, "com", "", ""),
            Ok(InternalChannelId::unicast("app::dev1", "app::dev1")),
            "the same bytes are also the token of (\"app::dev1\", \"com\")"
        );
        assert_eq!(
            resolve(&s, &token, "app", "", ""),
            Err(StoreError::Unauthorized)
        );
    }

    #[test]
    fn only_the_system_channel_has_a_name() {
        let (s, _) = store();
        assert_eq!(
            s.get_internal_channel_id("system"),
            Ok(InternalChannelId::System)
        );
        for name in ["", "System", "0", "other", "system "] {
            assert_eq!(
                s.get_internal_channel_id(name),
                Err(StoreError::UnknownChannel),
                "{name:?}"
            );
        }
    }

    // Broadcast channels.

    #[test]
    fn broadcast_appends_raise_the_top_level_by_one() {
        let (s, _) = store();
        let chan = InternalChannelId::System;
        for i in 1..=3 {
            s.append_to_channel(&chan, payload(i), t(100))
                .expect("append");
            let (top, ns) = snapshot(&s, &chan);
            assert_eq!(top, i64::try_from(i).expect("small"));
            assert_eq!(ns.len(), i);
        }
        let (_, ns) = snapshot(&s, &chan);
        let payloads: Vec<&str> = ns.iter().map(|n| n.payload.get()).collect();
        assert_eq!(payloads, [r#"{"a":1}"#, r#"{"a":2}"#, r#"{"a":3}"#]);
        assert!(
            ns.iter()
                .all(|n| n.app_id.is_empty() && n.msg_id.is_empty())
        );
    }

    #[test]
    fn broadcast_channels_count_levels_apart() {
        let (s, _) = store();
        let other = InternalChannelId::from_hex(&"f".repeat(32)).expect("hex id");
        s.append_to_channel(&InternalChannelId::System, payload(1), t(100))
            .expect("append");
        s.append_to_channel(&other, payload(2), t(100))
            .expect("append");
        s.append_to_channel(&other, payload(3), t(100))
            .expect("append");
        assert_eq!(snapshot(&s, &InternalChannelId::System).0, 1);
        assert_eq!(snapshot(&s, &other).0, 2);
    }

    #[test]
    fn expired_broadcasts_keep_levels_counting() {
        let (s, clock) = store();
        let chan = InternalChannelId::System;
        s.append_to_channel(&chan, payload(1), t(10))
            .expect("append");
        s.append_to_channel(&chan, payload(2), t(20))
            .expect("append");
        s.append_to_channel(&chan, payload(3), t(30))
            .expect("append");
        assert_eq!(snapshot(&s, &chan).1.len(), 3);
        clock.set(t(25));
        let (top, ns) = snapshot(&s, &chan);
        assert_eq!(top, 3);
        assert_eq!(ns.len(), 1);
        assert_eq!(ns[0].payload.get(), r#"{"a":3}"#);
        clock.set(t(31));
        assert_eq!(snapshot(&s, &chan), (3, Vec::new()));
    }

    #[test]
    fn broadcast_append_prunes_expired_notifications() {
        let (s, clock) = store();
        let chan = InternalChannelId::System;
        s.append_to_channel(&chan, payload(1), t(10))
            .expect("append");
        s.append_to_channel(&chan, payload(2), t(20))
            .expect("append");
        s.append_to_channel(&chan, payload(3), t(30))
            .expect("append");
        clock.set(t(25));
        // A snapshot only reads: the expired ones are still held.
        assert_eq!(unfiltered(&s, &chan).1.len(), 3);
        s.append_to_channel(&chan, payload(4), t(40))
            .expect("append");
        let (top, ns, metas) = unfiltered(&s, &chan);
        assert_eq!(top, 4);
        let payloads: Vec<&str> = ns.iter().map(|n| n.payload.get()).collect();
        assert_eq!(payloads, [r#"{"a":3}"#, r#"{"a":4}"#]);
        assert_eq!(
            metas,
            [Metadata::expiring(t(30)), Metadata::expiring(t(40))]
        );
        assert_eq!(snapshot(&s, &chan).0, 4);
    }

    #[test]
    fn unknown_channel_is_empty_at_level_zero() {
        let (s, _) = store();
        assert_eq!(snapshot(&s, &InternalChannelId::System), (0, Vec::new()));
        assert_eq!(snapshot(&s, &dev()), (0, Vec::new()));
        assert_eq!(
            unfiltered(&s, &InternalChannelId::System),
            (0, Vec::new(), Vec::new())
        );
    }

    // Unicast channels.

    #[test]
    fn unicast_appends_keep_level_zero_and_come_back_oldest_first() {
        let (s, _) = store();
        fill(
            &s,
            &dev(),
            &[
                ("app1", "m1", 100, None),
                ("app2", "m2", 100, None),
                ("app1", "m3", 100, None),
            ],
        );
        let (top, ns) = snapshot(&s, &dev());
        assert_eq!(top, 0);
        assert_eq!(msg_ids(&ns), ["m1", "m2", "m3"]);
        assert_eq!(ns[1], n("app2", "m2"));
        // Other devices' channels are untouched.
        assert_eq!(
            snapshot(&s, &InternalChannelId::unicast("user1", "dev2")),
            (0, Vec::new())
        );
    }

    #[test]
    fn unicast_snapshot_leaves_out_expired_without_removing_them() {
        let (s, clock) = store();
        fill(
            &s,
            &dev(),
            &[
                ("app1", "m1", 10, None),
                ("app1", "m2", 30, None),
                ("app1", "m3", 20, None),
            ],
        );
        clock.set(t(25));
        assert_eq!(msg_ids(&snapshot(&s, &dev()).1), ["m2"]);
        // A unicast append does not prune.
        fill(&s, &dev(), &[("app1", "m4", 40, None)]);
        assert_eq!(unfiltered(&s, &dev()).1.len(), 4);
        assert_eq!(msg_ids(&snapshot(&s, &dev()).1), ["m2", "m4"]);
    }

    #[test]
    fn replace_tag_keeps_only_the_newest_live_one_per_app() {
        let (s, _) = store();
        fill(
            &s,
            &dev(),
            &[
                ("app1", "m1", 100, Some("score")),
                ("app2", "m2", 100, Some("score")),
                ("app1", "m3", 100, None),
                ("app1", "m4", 100, Some("score")),
                ("app1", "m5", 100, Some("other")),
            ],
        );
        assert_eq!(msg_ids(&snapshot(&s, &dev()).1), ["m2", "m3", "m4", "m5"]);
        // Superseded ones are still held until dropped or scrubbed.
        assert_eq!(unfiltered(&s, &dev()).1.len(), 5);
    }

    #[test]
    fn newer_expired_tagged_notification_does_not_hide_an_older_live_one() {
        let (s, clock) = store();
        fill(
            &s,
            &dev(),
            &[
                ("app1", "old", 100, Some("x")),
                ("app1", "new", 10, Some("x")),
            ],
        );
        assert_eq!(msg_ids(&snapshot(&s, &dev()).1), ["new"]);
        clock.set(t(50));
        assert_eq!(msg_ids(&snapshot(&s, &dev()).1), ["old"]);
    }

    #[test]
    fn clear_pending_scrub_removes_the_apps_and_the_expired() {
        let (s, clock) = store();
        fill(
            &s,
            &dev(),
            &[
                ("app1", "m1", 100, None),
                ("app2", "m2", 10, None),
                ("app2", "m3", 100, Some("x")),
                ("app1", "m4", 100, Some("x")),
                ("app2", "m5", 100, None),
            ],
        );
        clock.set(t(50));
        let criteria = ScrubCriteria {
            app_id: Some("app1"),
            replace_tag: None,
        };
        s.scrub(&dev(), criteria).expect("scrub");
        assert_aligned(&s, &dev(), &[("m3", 100, Some("x")), ("m5", 100, None)]);
        assert_eq!(unfiltered(&s, &dev()).0, 0);
    }

    #[test]
    fn emptied_unicast_channels_are_forgotten_and_broadcast_levels_kept() {
        let (s, _clock) = store();
        let chan = dev();
        fill(&s, &chan, &[("app1", "m1", 100, None)]);
        let (_, notifs) = s.get_channel_snapshot(&chan).expect("snapshot");
        s.drop_by_msg_id(&chan, &notifs).expect("drop");
        assert_eq!(s.channels.borrow().len(), 0, "the emptied channel is gone");
        fill(&s, &chan, &[("app1", "m2", 100, None)]);
        s.scrub(
            &chan,
            ScrubCriteria {
                app_id: Some("app1"),
                replace_tag: None,
            },
        )
        .expect("scrub");
        assert_eq!(s.channels.borrow().len(), 0, "the cleared channel is gone");
        s.append_to_channel(&InternalChannelId::System, payload(1), t(10))
            .expect("append");
        s.scrub(&InternalChannelId::System, ScrubCriteria::default())
            .expect("scrub");
        let (top, _) = s
            .get_channel_snapshot(&InternalChannelId::System)
            .expect("snapshot");
        assert_eq!(top, 1, "a broadcast channel keeps its level when emptied");
    }

    #[test]
    fn scrub_by_replace_tag_removes_only_that_apps_tag() {
        let (s, clock) = store();
        fill(
            &s,
            &dev(),
            &[
                ("app1", "m1", 100, Some("x")),
                ("app1", "m2", 100, Some("y")),
                ("app2", "m3", 100, Some("x")),
                ("app1", "m4", 100, None),
                ("app1", "m5", 100, Some("x")),
                ("app1", "m6", 10, Some("y")),
            ],
        );
        clock.set(t(50));
        let criteria = ScrubCriteria {
            app_id: Some("app1"),
            replace_tag: Some("x"),
        };
        s.scrub(&dev(), criteria).expect("scrub");
        assert_aligned(
            &s,
            &dev(),
            &[
                ("m2", 100, Some("y")),
                ("m3", 100, Some("x")),
                ("m4", 100, None),
            ],
        );
    }

    #[test]
    fn default_scrub_removes_only_the_expired() {
        let (s, clock) = store();
        fill(
            &s,
            &dev(),
            &[
                ("app1", "m1", 10, None),
                ("app1", "m2", 100, Some("x")),
                ("app2", "m3", 20, Some("x")),
                ("app2", "m4", 30, None),
            ],
        );
        clock.set(t(30));
        s.scrub(&dev(), ScrubCriteria::default()).expect("scrub");
        assert_aligned(&s, &dev(), &[("m2", 100, Some("x")), ("m4", 30, None)]);
        // A tag without an app names nothing more.
        let criteria = ScrubCriteria {
            app_id: None,
            replace_tag: Some("x"),
        };
        s.scrub(&dev(), criteria).expect("scrub");
        assert_aligned(&s, &dev(), &[("m2", 100, Some("x")), ("m4", 30, None)]);
        // Scrubbing a channel that holds nothing is fine.
        assert_eq!(
            s.scrub(
                &InternalChannelId::unicast("u", "d"),
                ScrubCriteria::default()
            ),
            Ok(())
        );
    }

    #[test]
    fn scrub_keeps_broadcast_levels() {
        let (s, clock) = store();
        let chan = InternalChannelId::System;
        s.append_to_channel(&chan, payload(1), t(10))
            .expect("append");
        s.append_to_channel(&chan, payload(2), t(20))
            .expect("append");
        clock.set(t(15));
        s.scrub(&chan, ScrubCriteria::default()).expect("scrub");
        let (top, ns, _) = unfiltered(&s, &chan);
        assert_eq!(top, 2);
        assert_eq!(ns.len(), 1);
    }

    // Dropping by message id.

    fn five(s: &InMemoryPendingStore) {
        fill(
            s,
            &dev(),
            &[
                ("app1", "m1", 101, None),
                ("app1", "m2", 102, Some("a")),
                ("app2", "m3", 103, None),
                ("app1", "m4", 104, Some("b")),
                ("app2", "m5", 105, Some("c")),
            ],
        );
    }

    #[test]
    fn dropping_the_delivered_head_leaves_the_rest() {
        let (s, _) = store();
        five(&s);
        s.drop_by_msg_id(&dev(), &[n("app1", "m1"), n("app1", "m2")])
            .expect("drop");
        assert_aligned(
            &s,
            &dev(),
            &[
                ("m3", 103, None),
                ("m4", 104, Some("b")),
                ("m5", 105, Some("c")),
            ],
        );
        assert_eq!(msg_ids(&snapshot(&s, &dev()).1), ["m3", "m4", "m5"]);
    }

    #[test]
    fn dropping_scattered_ids_keeps_metadata_aligned() {
        let (s, _) = store();
        five(&s);
        s.drop_by_msg_id(&dev(), &[n("app1", "m4"), n("app1", "m2"), n("x", "zz")])
            .expect("drop");
        assert_aligned(
            &s,
            &dev(),
            &[("m1", 101, None), ("m3", 103, None), ("m5", 105, Some("c"))],
        );
        // Only the message id counts, not the app or payload of the target.
        s.drop_by_msg_id(&dev(), &[n("other", "m5")]).expect("drop");
        assert_aligned(&s, &dev(), &[("m1", 101, None), ("m3", 103, None)]);
    }

    #[test]
    fn dropping_ids_not_held_changes_nothing() {
        let (s, _) = store();
        five(&s);
        let before = unfiltered(&s, &dev());
        s.drop_by_msg_id(&dev(), &[n("app1", "m9"), n("app1", "m0")])
            .expect("drop");
        assert_eq!(unfiltered(&s, &dev()), before);
        s.drop_by_msg_id(&dev(), &[]).expect("drop");
        assert_eq!(unfiltered(&s, &dev()), before);
        // More targets than held, all but one held: only the held go.
        let all: Vec<Notification> = ["m1", "m2", "m3", "m4", "m5", "m6"]
            .iter()
            .map(|id| n("app1", id))
            .collect();
        s.drop_by_msg_id(&dev(), &all).expect("drop");
        assert_eq!(unfiltered(&s, &dev()), (0, Vec::new(), Vec::new()));
    }

    #[test]
    fn dropping_from_an_unknown_channel_is_ok() {
        let (s, _) = store();
        assert_eq!(s.drop_by_msg_id(&dev(), &[n("app1", "m1")]), Ok(()));
        assert_eq!(unfiltered(&s, &dev()), (0, Vec::new(), Vec::new()));
    }

    #[test]
    fn delivered_then_acked_is_never_seen_again_and_unacked_stays() {
        let (s, _) = store();
        fill(
            &s,
            &dev(),
            &[("app1", "m1", 100, None), ("app1", "m2", 100, None)],
        );
        let (_, delivered) = snapshot(&s, &dev());
        fill(&s, &dev(), &[("app1", "m3", 100, None)]);
        s.drop_by_msg_id(&dev(), &delivered).expect("drop");
        assert_eq!(msg_ids(&snapshot(&s, &dev()).1), ["m3"]);
    }

    #[test]
    fn default_store_uses_the_system_clock() {
        let s = InMemoryPendingStore::default();
        let far = SystemTime::now() + Duration::from_secs(3600);
        s.append_to_channel(&InternalChannelId::System, payload(1), far)
            .expect("append");
        s.append_to_channel(
            &InternalChannelId::System,
            payload(2),
            SystemTime::UNIX_EPOCH,
        )
        .expect("append");
        let (top, ns) = snapshot(&s, &InternalChannelId::System);
        assert_eq!(top, 2);
        assert_eq!(ns.len(), 1);
        assert!(format!("{s:?}").contains("InMemoryPendingStore"));
    }

    proptest::proptest! {
        #[test]
        fn app_pending_counts_what_the_channel_holds(
            entries in proptest::collection::vec((0..3usize, proptest::option::of(0..3usize)), 0..20),
            app in 0..3usize,
            tag in proptest::option::of(0..3usize),
        ) {
            let (s, _) = store();
            for (i, (a, tg)) in entries.iter().enumerate() {
                s.append_to_unicast_channel(
                    &dev(),
                    n(&format!("app{a}"), &format!("m{i}")),
                    Metadata {
                        expiration: t(3600),
                        replace_tag: tg.map(|tg| Arc::from(format!("tag{tg}"))),
                    },
                )
                .expect("appended");
            }
            let app = format!("app{app}");
            let tag = tag.map(|t| format!("tag{t}"));
            let (_, ns, meta) = s.get_channel_unfiltered(&dev()).expect("read");
            let expected = AppPending::count(ns.iter().zip(&meta), &app, tag.as_deref());
            let counted = s.app_pending(&dev(), &app, tag.as_deref()).expect("counted");
            proptest::prop_assert_eq!(&counted, &expected);
            // And by hand: the app's entries, those with the tag, the newest payload.
            let mine: Vec<usize> = (0..entries.len()).filter(|&i| format!("app{}", entries[i].0) == app).collect();
            proptest::prop_assert_eq!(counted.for_app, mine.len());
            let tagged = mine
                .iter()
                .filter(|&&i| tag.is_some() && entries[i].1.map(|t| format!("tag{t}")) == tag)
                .count();
            proptest::prop_assert_eq!(counted.replaceable, tagged);
            proptest::prop_assert_eq!(
                counted.newest.as_ref().map(|p| p.get().to_owned()),
                mine.last().map(|i| format!(r#"{{"m":"m{i}"}}"#))
            );
        }
    }
}
