//! Where notifications wait: channel ids, notification metadata, the [`PendingStore`]
//! trait the broker and the API use, the in-memory and durable stores, and [`redis`], the
//! per-shard Redis client a store shared by many nodes is to be built on.
//!
//! The store knows nothing of sessions. Its rules are docs/protocol.md §2–3: broadcast
//! channels count levels (expired notifications are dropped from what is returned, but
//! levels keep counting); unicast channels hold notifications with app id, message id,
//! expiry and replace tag until they are dropped by message id after an ACK.

/// The [`PendingStore`] methods that read (and the token ones, which keep no state), as a
/// store wrapping an in-memory one forwards them to `self.$inner`: the durable store and
/// the cluster's cache write through to their backend only on changes.
macro_rules! forward_reads_to {
    ($inner:ident) => {
        fn register(&self, device_id: &str, app_id: &str) -> Result<String, StoreError> {
            self.$inner.register(device_id, app_id)
        }

        fn unregister(&self, device_id: &str, app_id: &str) -> Result<(), StoreError> {
            self.$inner.unregister(device_id, app_id)
        }

        fn get_internal_channel_id_from_token(
            &self,
            token: &str,
            app_id: &str,
            user_id: &str,
            device_id: &str,
        ) -> Result<InternalChannelId, StoreError> {
            self.$inner
                .get_internal_channel_id_from_token(token, app_id, user_id, device_id)
        }

        fn get_internal_channel_id(&self, name: &str) -> Result<InternalChannelId, StoreError> {
            self.$inner.get_internal_channel_id(name)
        }

        fn get_channel_snapshot(
            &self,
            chan: &InternalChannelId,
        ) -> Result<(i64, Vec<Notification>), StoreError> {
            self.$inner.get_channel_snapshot(chan)
        }

        fn get_channel_unfiltered(
            &self,
            chan: &InternalChannelId,
        ) -> Result<(i64, Vec<Notification>, Vec<Metadata>), StoreError> {
            self.$inner.get_channel_unfiltered(chan)
        }

        fn app_pending(
            &self,
            chan: &InternalChannelId,
            app_id: &str,
            replace_tag: Option<&str>,
        ) -> Result<$crate::store::AppPending, StoreError> {
            self.$inner.app_pending(chan, app_id, replace_tag)
        }
    };
}
pub(crate) use forward_reads_to;

mod channel_id;
mod clock;
pub mod durable;
mod inmemory;
mod notify;
pub mod redis;

use std::sync::Arc;
use std::time::SystemTime;

use thiserror::Error;

pub use channel_id::{ChannelIdError, InternalChannelId};
pub use clock::{Clock, ManualClock, SystemClock};

pub use durable::{DataDir, DataDirError, Durability, DurableStore, DurableWait, RecoveryReport};
pub(crate) use inmemory::ChannelState;
pub use inmemory::{DEFAULT_BROADCAST_BACKLOG, InMemoryPendingStore};
pub use notify::{AppPending, NotifyVerdict, UnicastRequest, apply_notify};

use crate::protocol::Notification;

/// What the store keeps beside a notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// After this instant the notification is expired: never delivered again.
    pub expiration: SystemTime,
    /// Among live notifications of one app with the same tag, only the newest is delivered.
    pub replace_tag: Option<Arc<str>>,
}

impl Metadata {
    /// Metadata with an expiry and no replace tag.
    pub fn expiring(expiration: SystemTime) -> Self {
        Self {
            expiration,
            replace_tag: None,
        }
    }

    /// Whether the notification has expired at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expiration < now
    }
}

/// Why a store operation failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// No channel has that name.
    #[error("unknown channel name")]
    UnknownChannel,
    /// The token does not resolve to a channel.
    #[error("unknown token")]
    UnknownToken,
    /// The token belongs to another application.
    #[error("unauthorized")]
    Unauthorized,
    /// The channel cannot take more notifications.
    #[error("channel is full")]
    Full,
    /// The store could not do it now (a backend fault); the caller may retry later.
    #[error(transparent)]
    Unavailable(StoreFault),
}

/// The cause of a backend fault, kept as the error it is (its own
/// [`source`](std::error::Error::source) chain included); shared, so a [`StoreError`]
/// stays `Clone`. Made from any error, or from a message.
#[derive(Clone)]
pub struct StoreFault(std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl StoreFault {
    /// A fault caused by `cause`.
    pub fn new(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(std::sync::Arc::from(cause.into()))
    }
}

impl std::fmt::Display for StoreFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Debug for StoreFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for StoreFault {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Faults are equal when they read the same (tests compare them).
impl PartialEq for StoreFault {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || self.to_string() == other.to_string()
    }
}

impl Eq for StoreFault {}

impl From<&str> for StoreFault {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

impl From<String> for StoreFault {
    fn from(message: String) -> Self {
        Self::new(message)
    }
}

impl StoreError {
    /// Whether the failure is the store's, not the request's (the API answers 503).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Which notifications [`PendingStore::scrub`] removes besides the expired ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrubCriteria<'a> {
    /// Remove the notifications of this app (all of them, unless `replace_tag` narrows it).
    pub app_id: Option<&'a str>,
    /// With `app_id`: remove only that app's notifications with this replace tag.
    pub replace_tag: Option<&'a str>,
}

/// The storage of pending notifications, as the broker and the API use it.
///
/// Methods take `&self`: a store serves one shard (sessions, broker and API handlers on
/// the same thread), and an implementation keeps its state behind its own cell. No method
/// blocks: a mutation takes effect at once and is submitted for durability, which the
/// caller awaits with [`durable`](Self::durable) before it answers (batch submission:
/// many operations share one commit). A backend fault is [`StoreError::Unavailable`].
pub trait PendingStore: std::fmt::Debug {
    /// The token for the (device, app) pair; the same pair always gets the same token.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on a backend fault.
    fn register(&self, device_id: &str, app_id: &str) -> Result<String, StoreError>;

    /// Forgets the token of the (device, app) pair.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on a backend fault.
    fn unregister(&self, device_id: &str, app_id: &str) -> Result<(), StoreError>;

    /// The unicast channel a notify addresses: by `token` (which must belong to `app_id`)
    /// when both are given, else by `user_id` and `device_id`.
    ///
    /// # Errors
    /// [`StoreError::UnknownToken`] when neither resolves, [`StoreError::Unauthorized`]
    /// when the token belongs to another app.
    fn get_internal_channel_id_from_token(
        &self,
        token: &str,
        app_id: &str,
        user_id: &str,
        device_id: &str,
    ) -> Result<InternalChannelId, StoreError>;

    /// The broadcast channel named `name` in the API (`system`).
    ///
    /// # Errors
    /// [`StoreError::UnknownChannel`] for any other name.
    fn get_internal_channel_id(&self, name: &str) -> Result<InternalChannelId, StoreError>;

    /// Appends a notification to a broadcast channel, raising its top level by one.
    ///
    /// # Returns
    /// The channel's new top level.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on a backend fault.
    fn append_to_channel(
        &self,
        chan: &InternalChannelId,
        payload: crate::protocol::Payload,
        expiration: SystemTime,
    ) -> Result<i64, StoreError>;

    /// Appends a notification to a unicast channel (whose level does not move).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on a backend fault.
    fn append_to_unicast_channel(
        &self,
        chan: &InternalChannelId,
        notification: Notification,
        meta: Metadata,
    ) -> Result<(), StoreError>;

    /// The channel's top level and its deliverable notifications, oldest first: expired
    /// ones and ones superseded by a newer one of the same app and replace tag left out.
    /// An unknown channel is empty at level 0.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on a backend fault.
    fn get_channel_snapshot(
        &self,
        chan: &InternalChannelId,
    ) -> Result<(i64, Vec<Notification>), StoreError>;

    /// The channel's top level and everything it holds, with metadata, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on a backend fault.
    fn get_channel_unfiltered(
        &self,
        chan: &InternalChannelId,
    ) -> Result<(i64, Vec<Notification>, Vec<Metadata>), StoreError>;

    /// What unicast channel `chan` holds of app `app_id` (expired entries included): a
    /// notify's limit and replacement are decided on it. The default reads
    /// [`get_channel_unfiltered`](Self::get_channel_unfiltered); a store that can count
    /// in place need not copy the channel.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on a backend fault.
    fn app_pending(
        &self,
        chan: &InternalChannelId,
        app_id: &str,
        replace_tag: Option<&str>,
    ) -> Result<AppPending, StoreError> {
        let (_, notifications, meta) = self.get_channel_unfiltered(chan)?;
        Ok(AppPending::count(
            notifications.iter().zip(&meta),
            app_id,
            replace_tag,
        ))
    }

    /// Removes the expired notifications of the channel and those matching `criteria`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on a backend fault.
    fn scrub(
        &self,
        chan: &InternalChannelId,
        criteria: ScrubCriteria<'_>,
    ) -> Result<(), StoreError>;

    /// Removes from a unicast channel exactly the notifications whose message ids are
    /// those of `targets`.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] on a backend fault.
    fn drop_by_msg_id(
        &self,
        chan: &InternalChannelId,
        targets: &[Notification],
    ) -> Result<(), StoreError>;

    /// A wait until every operation this store accepted so far is durable: what the API
    /// awaits before it answers a notify or a broadcast, and a session before it goes on
    /// after an ACK. `None` when nothing needs waiting for (a store that keeps nothing
    /// on disk, or a relaxed durability mode), so the in-memory path costs nothing.
    ///
    /// Operations submit their effect and return at once; a durable store commits them
    /// in groups, and every wait taken before a commit resolves with it (an error is
    /// [`StoreError::Unavailable`]: the operation may or may not have been kept).
    fn durable(&self) -> Option<DurableWait> {
        None
    }

    /// A wait until everything accepted so far is written and synced, whatever the
    /// durability mode: a stopping shard's last flush. `None` when there is nothing to
    /// write.
    fn flush(&self) -> Option<DurableWait> {
        None
    }

    /// What the store's log has done, for `/metrics` (zeros for a store without one).
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
}

/// What a store's log has done since the shard started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Group commits (writes followed by a sync).
    pub commits: u64,
    /// Records committed.
    pub records: u64,
    /// Bytes in the log file now.
    pub log_bytes: u64,
    /// Snapshots the log was compacted into.
    pub compactions: u64,
    /// Whether the log cannot write now (changes are refused until it can).
    pub unavailable: bool,
}

/// The entries of `orig` to keep when the notifications with the message ids of `targets`
/// go: `None` when `targets` is exactly the head of `orig` (the common case after an
/// ACK, kept cheap), else a keep-flag per entry.
pub(crate) enum DropPlan {
    /// Drop the first `n` entries.
    Head(usize),
    /// Keep the entries whose flag is set.
    Keep(Vec<bool>),
}

/// Plans dropping by message id (see [`DropPlan`]).
pub(crate) fn plan_drop_by_msg_id<'a>(
    orig: impl ExactSizeIterator<Item = &'a str> + Clone,
    targets: &[Notification],
) -> DropPlan {
    let t = targets.len();
    if t <= orig.len()
        && orig
            .clone()
            .zip(targets)
            .all(|(id, target)| id == &*target.msg_id)
    {
        return DropPlan::Head(t);
    }
    let ids: ahash::AHashSet<&str> = targets.iter().map(|n| &*n.msg_id).collect();
    DropPlan::Keep(orig.map(|id| !ids.contains(id)).collect())
}

/// The notifications still to deliver, oldest first: those expired at `now` and those
/// superseded by a newer one with the same app and replace tag are left out.
pub fn filter_out_obsolete<'a>(
    entries: impl DoubleEndedIterator<Item = (&'a Notification, &'a Metadata)>,
    now: SystemTime,
) -> Vec<Notification> {
    let mut seen: ahash::AHashSet<(&str, &str)> = ahash::AHashSet::new();
    let mut acc: Vec<Notification> = entries
        .rev()
        .filter(|(n, meta)| {
            if meta.is_expired(now) {
                return false;
            }
            match &meta.replace_tag {
                Some(tag) => seen.insert((&n.app_id, tag)),
                None => true,
            }
        })
        .map(|(n, _)| n.clone())
        .collect();
    acc.reverse();
    acc
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::protocol::Payload;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn n(app: &str, msg: &str) -> Notification {
        let payload = Payload::from_json(&format!(r#"{{"m":"{msg}"}}"#)).expect("valid JSON");
        Notification::unicast(app, msg, payload)
    }

    fn tagged(expiration: SystemTime, tag: &str) -> Metadata {
        Metadata {
            expiration,
            replace_tag: Some(Arc::from(tag)),
        }
    }

    fn msg_ids(ns: &[Notification]) -> Vec<&str> {
        ns.iter().map(|n| &*n.msg_id).collect()
    }

    /// `Ok(n)` for [`DropPlan::Head`], `Err(flags)` for [`DropPlan::Keep`].
    fn plan(orig: &[&str], targets: &[&str]) -> Result<usize, Vec<bool>> {
        let targets: Vec<Notification> = targets.iter().map(|id| n("app", id)).collect();
        match plan_drop_by_msg_id(orig.iter().copied(), &targets) {
            DropPlan::Head(k) => Ok(k),
            DropPlan::Keep(keep) => Err(keep),
        }
    }

    #[test]
    fn metadata_expires_strictly_after_its_expiration() {
        let meta = Metadata::expiring(t(10));
        assert_eq!(meta.replace_tag, None);
        assert!(!meta.is_expired(t(9)));
        assert!(!meta.is_expired(t(10)));
        assert!(meta.is_expired(t(10) + Duration::from_nanos(1)));
    }

    #[test]
    fn a_backend_fault_keeps_its_cause_as_the_error_it_is() {
        #[derive(Debug, thiserror::Error)]
        #[error("connection refused by 10.0.0.7")]
        struct Refused(#[source] std::io::Error);

        let cause = Refused(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let e = StoreError::Unavailable(StoreFault::new(cause));
        assert!(e.is_unavailable());
        assert_eq!(e.to_string(), "connection refused by 10.0.0.7");
        // The cause's own cause is still there, typed.
        let source = std::error::Error::source(&e).expect("the io error");
        assert!(
            source.downcast_ref::<std::io::Error>().is_some(),
            "{source:?}"
        );
    }

    #[test]
    fn only_unavailable_is_the_stores_fault() {
        assert!(StoreError::Unavailable("down".into()).is_unavailable());
        for e in [
            StoreError::UnknownChannel,
            StoreError::UnknownToken,
            StoreError::Unauthorized,
            StoreError::Full,
        ] {
            assert!(!e.is_unavailable(), "{e:?}");
        }
    }

    #[test]
    fn scrub_criteria_default_names_no_app() {
        let c = ScrubCriteria::default();
        assert_eq!(c.app_id, None);
        assert_eq!(c.replace_tag, None);
    }

    #[test]
    fn dropping_the_head_is_planned_as_a_head_drop() {
        assert_eq!(plan(&["a", "b", "c"], &["a", "b"]), Ok(2));
        assert_eq!(plan(&["a", "b", "c"], &["a", "b", "c"]), Ok(3));
        assert_eq!(plan(&["a", "b", "c"], &[]), Ok(0));
        assert_eq!(plan(&[], &[]), Ok(0));
    }

    #[test]
    fn dropping_anything_but_the_head_is_planned_per_entry() {
        assert_eq!(
            plan(&["a", "b", "c", "d"], &["b", "d"]),
            Err(vec![true, false, true, false])
        );
        // The head, but out of order.
        assert_eq!(
            plan(&["a", "b", "c"], &["b", "a"]),
            Err(vec![false, false, true])
        );
        // More targets than entries: only the present ones go.
        assert_eq!(plan(&["a", "b"], &["a", "b", "c"]), Err(vec![false, false]));
        // Ids that are not there drop nothing.
        assert_eq!(plan(&["a", "b"], &["x", "y"]), Err(vec![true, true]));
        assert_eq!(plan(&[], &["x"]), Err(vec![]));
    }

    #[test]
    fn obsolete_filter_leaves_out_expired_and_keeps_order() {
        let ns = [
            n("app", "m1"),
            n("app", "m2"),
            n("app", "m3"),
            n("app", "m4"),
        ];
        let metas = [
            Metadata::expiring(t(5)),
            Metadata::expiring(t(20)),
            Metadata::expiring(t(9)),
            Metadata::expiring(t(10)),
        ];
        let live = filter_out_obsolete(ns.iter().zip(&metas), t(10));
        assert_eq!(msg_ids(&live), ["m2", "m4"]);
        assert_eq!(live[0], ns[1]);
        let all = filter_out_obsolete(ns.iter().zip(&metas), t(0));
        assert_eq!(msg_ids(&all), ["m1", "m2", "m3", "m4"]);
        assert!(filter_out_obsolete(ns.iter().zip(&metas), t(21)).is_empty());
    }

    #[test]
    fn obsolete_filter_keeps_only_the_newest_per_app_and_tag() {
        let ns = [
            n("app1", "m1"),
            n("app1", "m2"),
            n("app2", "m3"),
            n("app1", "m4"),
            n("app1", "m5"),
            n("app1", "m6"),
            n("app2", "m7"),
        ];
        let metas = [
            tagged(t(100), "x"),
            tagged(t(100), "y"),
            tagged(t(100), "x"),
            Metadata::expiring(t(100)),
            tagged(t(100), "x"),
            Metadata::expiring(t(100)),
            Metadata::expiring(t(100)),
        ];
        let live = filter_out_obsolete(ns.iter().zip(&metas), t(0));
        // m1 is superseded by m5 (app1, "x"); app2's "x" (m3) is independent; untagged
        // ones are never superseded; the survivors stay in their places.
        assert_eq!(msg_ids(&live), ["m2", "m3", "m4", "m5", "m6", "m7"]);
    }

    #[test]
    fn newer_expired_notification_does_not_hide_an_older_live_one() {
        let ns = [n("app", "old"), n("app", "new")];
        let metas = [tagged(t(100), "x"), tagged(t(10), "x")];
        assert_eq!(
            msg_ids(&filter_out_obsolete(ns.iter().zip(&metas), t(50))),
            ["old"]
        );
        assert_eq!(
            msg_ids(&filter_out_obsolete(ns.iter().zip(&metas), t(5))),
            ["new"]
        );
    }
}
