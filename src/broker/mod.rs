//! The broker: registers device sessions and delivers notifications through them.
//!
//! This is the original server's `server/broker` package in Rust. A session registers
//! with a [`Broker`], which feeds it [`Exchange`]s (deliveries) on its [`ExchangeQueue`];
//! the session performs them one at a time against the device, ACK by ACK. Application
//! servers reach the broker through its sending facet, [`BrokerSending`], which any thread
//! may hold.
//!
//! Sessions live on one shard, so the session-side traits are not `Send`; exchanges are
//! shared within a shard by `Rc` and keep their encoded frames for every session that
//! needs the same bytes.
//!
//! # The original package, item by item
//!
//! | original (`server/broker`) | here |
//! |---|---|
//! | `Broker` (`Register`, `Unregister`) | [`Broker`] (`register` is async, returns `Result`) |
//! | `BrokerSending` (`Broadcast`, `Unicast`) | [`BrokerSending`] (`Send + Sync + Clone`, errors when the broker's queue is full) |
//! | `BrokerSession` | [`BrokerSession`] |
//! | `BrokerSession.SessionChannel()` | [`BrokerSession::session_channel`], an [`ExchangeQueue`] |
//! | `BrokerConfig` | [`BrokerConfig`] |
//! | `SessionTracker` | [`SessionTracker`] |
//! | `Exchange` (`Prepare`, `Acked`) | [`Exchange`] (`prepare` fills the scratch area with encoded parts) |
//! | `BroadcastExchange` (`Init`) | [`BroadcastExchange`] ([`BroadcastExchange::new`] does `Init`) |
//! | `UnicastExchange` | [`UnicastExchange`] |
//! | `ConnMetaExchange` | [`ConnMetaExchange`] |
//! | `ExchangesScratchArea` | [`ExchangesScratchArea`] |
//! | `LevelsMap` | [`LevelsMap`] |
//! | `FeedPending` | [`feed_pending`] |
//! | `GetInfoInt`, `GetInfoString` | [`get_info_int`], [`get_info_string`] |
//! | `ErrAbort` | [`ErrAbort`] (inside [`BrokerError::Abort`]) |
//! | `ErrNop` ("nothing to send") | [`Prepared::Nop`] |
//! | `ErrUnexpectedValue` | [`ErrAbort::unexpected_value`] |
//! | a `nil` exchange (kick) | [`Next::Terminated`] |
//! | `simple.SimpleBroker` | [`simple::SimpleBroker`] |
//! | `testing` (`TestBrokerSession`, `TestBrokerConfig`) | `testing` (with the `testing` feature) |
//! | `testsuite.CommonBrokerSuite` | `testsuite` and the `broker_conformance!` macro (with the `testing` feature) |

mod exchange;
mod local;
mod queue;
pub mod sharded;
pub mod simple;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(any(test, feature = "testing"))]
pub mod testsuite;

use std::borrow::Cow;
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

use thiserror::Error;

pub use exchange::{
    BroadcastExchange, ConnMeta, ConnMetaExchange, ExchangesScratchArea, JsonObject,
    UnicastExchange, feed_pending,
};
pub use local::{DeliveryStats, LocalSession};
pub use queue::{ExchangeQueue, MIN_SESSION_QUEUE, Next};

use crate::protocol::{ConnectMsg, Notification};
use crate::store::{InternalChannelId, StoreError};

/// A session's level per channel: the last level the device acknowledged.
///
/// A device names one channel or two, so the levels are a small vector kept inline (a
/// hash map would allocate a table per session); a lookup is a scan, and a device that
/// sends many levels only slows its own session.
#[derive(Debug, Clone, Default)]
pub struct LevelsMap(smallvec::SmallVec<[(InternalChannelId, i64); 1]>);

impl LevelsMap {
    /// The level of `chan`, if the device has one.
    pub fn get(&self, chan: &InternalChannelId) -> Option<&i64> {
        self.0
            .iter()
            .find(|(c, _)| c == chan)
            .map(|(_, level)| level)
    }

    /// Sets the level of `chan`; the one it replaces, if any.
    pub fn insert(&mut self, chan: InternalChannelId, level: i64) -> Option<i64> {
        match self.0.iter_mut().find(|(c, _)| *c == chan) {
            Some((_, old)) => Some(std::mem::replace(old, level)),
            None => {
                self.0.push((chan, level));
                None
            }
        }
    }

    /// The channels and their levels, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&InternalChannelId, &i64)> {
        self.0.iter().map(|(c, level)| (c, level))
    }

    /// How many channels have a level.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no channel has a level.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(InternalChannelId, i64)> for LevelsMap {
    fn from_iter<I: IntoIterator<Item = (InternalChannelId, i64)>>(iter: I) -> Self {
        let mut levels = LevelsMap::default();
        for (chan, level) in iter {
            levels.insert(chan, level);
        }
        levels
    }
}

/// The same channels at the same levels, in any order.
impl PartialEq for LevelsMap {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(c, level)| other.get(c) == Some(level))
    }
}

impl Eq for LevelsMap {}

/// A delivery asked for through a broker's sending facet ([`BrokerSending`]).
#[derive(Debug, Clone)]
pub(crate) enum Delivery {
    /// Deliver the broadcast channel's current state to every session.
    Broadcast(InternalChannelId),
    /// Deliver the unicast channel's pending notifications to its device's session.
    Unicast(InternalChannelId),
}

/// An exchange as queued for a session: shared, on the session's shard.
pub type ExchangeRef = Rc<dyn Exchange>;

/// The session must end, and why (the original's `ErrAbort`). Its text names the cause
/// too, when there is one, since a session's end is logged by its text alone.
#[derive(Debug, Error, Clone)]
#[error("session aborted ({reason}{})", cause.as_ref().map(|c| format!(": {c}")).unwrap_or_default())]
pub struct ErrAbort {
    /// Why, as the session's end is logged.
    pub reason: Cow<'static, str>,
    /// What caused it, when another error did (kept, not flattened into the reason).
    #[source]
    cause: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

/// Aborts are equal when their reasons are: the reason is what a session's end says.
impl PartialEq for ErrAbort {
    fn eq(&self, other: &Self) -> bool {
        self.reason == other.reason
    }
}

impl Eq for ErrAbort {}

impl ErrAbort {
    /// An abort for `reason`.
    pub fn new(reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            reason: reason.into(),
            cause: None,
        }
    }

    /// An abort for `reason`, caused by `cause` (its [`source`](std::error::Error::source)).
    pub fn caused_by(
        reason: impl Into<Cow<'static, str>>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            reason: reason.into(),
            cause: Some(Arc::new(cause)),
        }
    }

    /// A CONNECT field had the wrong type (the original's `ErrUnexpectedValue`).
    pub fn unexpected_value() -> Self {
        Self::new("unexpected value in message")
    }

    /// The device answered an exchange with something other than ACK.
    pub fn expected_ack() -> Self {
        Self::new("expected ACK message")
    }
}

/// Why a broker operation failed.
#[derive(Debug, Error)]
pub enum BrokerError {
    /// The session must end.
    #[error(transparent)]
    Abort(#[from] ErrAbort),
    /// The store failed; what was asked did not happen and may be retried.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker is not running.
    #[error("broker is not running")]
    NotRunning,
    /// The broker's queue is full: the caller should back off (the API answers 503).
    #[error("broker queue is full")]
    QueueFull,
    /// The device belongs to another shard: its connection must move there first.
    #[error("device belongs to {owner}")]
    WrongShard {
        /// The owner shard.
        owner: sharded::ShardId,
    },
}

impl BrokerError {
    /// Whether the session must end.
    pub fn is_abort(&self) -> bool {
        matches!(self, BrokerError::Abort(_))
    }

    /// Whether the store failed.
    pub fn is_store(&self) -> bool {
        matches!(self, BrokerError::Store(_))
    }

    /// Whether the caller should retry later (store fault, full queue, not running).
    pub fn is_unavailable(&self) -> bool {
        match self {
            BrokerError::Abort(_) | BrokerError::WrongShard { .. } => false,
            BrokerError::Store(e) => e.is_unavailable(),
            BrokerError::NotRunning | BrokerError::QueueFull => true,
        }
    }
}

/// What a prepared exchange asks the session to do with the parts in its scratch area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    /// Nothing to send (the original's `ErrNop`): resume the ping timer.
    Nop,
    /// Write each part and read an ACK for it within the exchange timeout, calling
    /// [`Exchange::acked`] after each.
    ExpectAck,
    /// Write the parts and expect no answer.
    OneWay {
        /// Whether the session ends after the message (CONNBROKEN).
        close_after: bool,
    },
}

/// Leads a session through one exchange with the device, typically a delivery.
pub trait Exchange: fmt::Debug {
    /// Prepares the exchange for `sess`: puts the encoded parts in its scratch area.
    ///
    /// # Errors
    /// A store failure, or an abort when the session cannot go on.
    fn prepare(&self, sess: &mut dyn BrokerSession) -> Result<Prepared, BrokerError>;

    /// Takes the device's ACK of the scratch area's current part; `done` when it was the
    /// last part.
    ///
    /// # Errors
    /// A store failure, or an abort when the exchange expects no ACK.
    fn acked(&self, sess: &mut dyn BrokerSession, done: bool) -> Result<(), BrokerError>;

    /// Exchanges with the same key supersede each other in a session's queue (the newer
    /// covers what the older would deliver). `None`: never coalesced.
    fn coalesce_key(&self) -> Option<&InternalChannelId> {
        None
    }

    /// For tests and tools that look inside an exchange (the suite's reveal hooks).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A registered session as the exchanges see it: the device's details, its levels, its
/// scratch area, and the store access the broker gives it.
pub trait BrokerSession {
    /// The queue on which the session gets the exchanges to perform.
    fn session_channel(&self) -> &ExchangeQueue;
    /// The device id.
    fn device_identifier(&self) -> &str;
    /// The device model (`Info.device`, `"?"` when not given).
    fn device_image_model(&self) -> &str;
    /// The device's system image channel (`Info.channel`, `"?"` when not given).
    fn device_image_channel(&self) -> &str;
    /// The session's channel levels.
    fn levels(&self) -> &LevelsMap;
    /// The session's channel levels, to update after an ACK.
    fn levels_mut(&mut self) -> &mut LevelsMap;
    /// The scratch area exchanges prepare into.
    fn exchange_scratch_area(&mut self) -> &mut ExchangesScratchArea;
    /// The top level and deliverable notifications of `chan`; `cached_ok` allows a cached
    /// answer where the broker keeps one.
    ///
    /// # Errors
    /// A store failure (already logged by the broker).
    fn get(
        &self,
        chan: &InternalChannelId,
        cached_ok: bool,
    ) -> Result<(i64, Vec<Notification>), BrokerError>;
    /// Drops exactly the notifications with the message ids of `targets` from `chan`.
    ///
    /// # Errors
    /// A store failure (already logged by the broker).
    fn drop_by_msg_id(
        &self,
        chan: &InternalChannelId,
        targets: &[Notification],
    ) -> Result<(), BrokerError>;
    /// A wait until what this session's exchanges changed in the store (the drops of its
    /// ACKs) is durable; the session awaits it before it writes anything else, so a
    /// device that reads another frame after its ACK knows the ACK will not be undone
    /// by a crash. `None` when nothing needs waiting for (the default).
    fn durable(&self) -> Option<crate::store::DurableWait> {
        None
    }
    /// The exchange that delivers broadcast channel `chan` as it is now: [`get`] and
    /// [`BroadcastExchange::new`] in one step. A broker that keeps the latest exchange of
    /// each channel hands the same one to every session, so sessions catching up on the
    /// same window share its encoded frames instead of each encoding its own copy.
    ///
    /// # Errors
    /// A store failure (already logged by the broker).
    ///
    /// [`get`]: BrokerSession::get
    fn broadcast_exchange(
        &self,
        chan: &InternalChannelId,
    ) -> Result<Rc<BroadcastExchange>, BrokerError> {
        let (top_level, notifications) = self.get(chan, true)?;
        Ok(Rc::new(BroadcastExchange::new(
            chan.clone(),
            top_level,
            notifications,
        )))
    }
    /// Queues `exchange` on this session.
    fn feed(&self, exchange: ExchangeRef);
    /// The session's own unicast channel: (device, device).
    fn internal_channel_id(&self) -> InternalChannelId;
}

/// Registers sessions and keeps the registry: the last registration of a device wins.
#[allow(async_fn_in_trait)] // a broker and its sessions live on one shard: no `Send` bound
pub trait Broker {
    /// The session type the broker hands out.
    type Session: BrokerSession;

    /// Registers a session for the device of `connect`, terminating an older session of
    /// the same device, and feeds it what is pending.
    ///
    /// # Errors
    /// [`BrokerError::Abort`] for a bad `Levels` key or a wrongly typed `Info` value;
    /// [`BrokerError::NotRunning`] when the broker is stopped.
    async fn register(
        &self,
        connect: &ConnectMsg,
        track: &dyn SessionTracker,
    ) -> Result<Self::Session, BrokerError>;

    /// Unregisters `sess`, unless a newer session of the device replaced it.
    fn unregister(&self, sess: &Self::Session);
}

/// The sending facet of a broker: asks for deliveries. Any thread may hold one.
pub trait BrokerSending: Send + Sync + Clone {
    /// Delivers the current state of broadcast channel `chan` to every session.
    ///
    /// # Errors
    /// [`BrokerError::QueueFull`] when the broker cannot take more now.
    fn broadcast(&self, chan: InternalChannelId) -> Result<(), BrokerError>;

    /// Delivers what is pending on each unicast channel to its device, if connected.
    ///
    /// # Errors
    /// [`BrokerError::QueueFull`] when the broker cannot take more now.
    fn unicast(&self, chans: &[InternalChannelId]) -> Result<(), BrokerError>;
}

/// The broker's configuration.
pub trait BrokerConfig {
    /// How many exchanges (with distinct coalescing keys) may wait for one session.
    fn session_queue_size(&self) -> usize;
    /// How many requests may wait in the broker's own queue.
    fn broker_queue_size(&self) -> usize;
}

/// Follows one session for logging: who it is and when it registered.
pub trait SessionTracker {
    /// The session's id, as log lines show it.
    fn session_id(&self) -> &str;
    /// Called once the session is registered.
    fn registered(&self, _sess: &dyn BrokerSession) {}
}

/// A [`SessionTracker`] that only names the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionId(pub String);

impl SessionTracker for SessionId {
    fn session_id(&self) -> &str {
        &self.0
    }
}

/// Performs `exchange` on `sess` without a socket, the sequence a session runs against a
/// device: [`Exchange::prepare`] puts the encoded frames in the session's scratch area;
/// each frame goes to `device`, which writes it wherever the device is and says whether
/// the device answered with ACK; each ACK goes to [`Exchange::acked`] (which updates the
/// session's levels or drops the acknowledged notifications from the store); then the
/// scratch area advances to the next frame. What was prepared is returned: with
/// [`Prepared::Nop`] nothing was sent, with [`Prepared::OneWay`] the frames expected no
/// answer.
///
/// Each frame is what goes on the wire: a big-endian `u16` length, then the JSON.
///
/// # Errors
/// What `prepare` or `acked` returned, or an abort (`expected ACK message`) when `device`
/// answers a frame that expects an ACK with `false`: a session ends then, and what was not
/// acknowledged stays pending.
///
/// # Example
/// ```
/// # use pushbroker::broker::{perform, Prepared};
/// # use pushbroker::broker::{BrokerSession, ExchangeRef};
/// // With `sess` a registered session and `exchange` taken from its queue:
/// fn deliver(exchange: &ExchangeRef, sess: &mut dyn BrokerSession) -> Vec<Vec<u8>> {
///     let mut written = Vec::new();
///     let _ = perform(exchange.as_ref(), sess, |frame| {
///         written.push(frame.to_vec());
///         true // the device sent {"T":"ack"}
///     });
///     written
/// }
/// ```
pub fn perform(
    exchange: &dyn Exchange,
    sess: &mut dyn BrokerSession,
    mut device: impl FnMut(&[u8]) -> bool,
) -> Result<Prepared, BrokerError> {
    let prepared = exchange.prepare(sess)?;
    if prepared == Prepared::Nop {
        return Ok(prepared);
    }
    loop {
        let scratch = sess.exchange_scratch_area();
        let Some(frame) = scratch.current_frame() else {
            break;
        };
        let done = scratch.is_last_part();
        let acked = device(frame);
        if prepared == Prepared::ExpectAck {
            if !acked {
                return Err(ErrAbort::expected_ack().into());
            }
            exchange.acked(sess, done)?;
        }
        if !sess.exchange_scratch_area().advance() {
            break;
        }
    }
    Ok(prepared)
}

/// A string value of CONNECT's `Info`, or `default` when absent.
///
/// # Errors
/// [`ErrAbort::unexpected_value`] when the value is not a string.
pub fn get_info_string<'a>(
    connect: &'a ConnectMsg,
    name: &str,
    default: &'a str,
) -> Result<&'a str, ErrAbort> {
    match connect.info.as_ref().and_then(|info| info.get(name)) {
        None => Ok(default),
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(_) => Err(ErrAbort::unexpected_value()),
    }
}

/// An integer value of CONNECT's `Info` (a JSON number, truncated), or `default` when
/// absent.
///
/// # Errors
/// [`ErrAbort::unexpected_value`] when the value is not a number.
pub fn get_info_int(connect: &ConnectMsg, name: &str, default: i64) -> Result<i64, ErrAbort> {
    match connect.info.as_ref().and_then(|info| info.get(name)) {
        None => Ok(default),
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .ok_or_else(ErrAbort::unexpected_value),
        Some(_) => Err(ErrAbort::unexpected_value()),
    }
}

/// The levels of CONNECT as a [`LevelsMap`].
///
/// # Errors
/// An abort naming the problem when a key is neither `"0"` nor 32 hex digits.
pub fn levels_from_connect(connect: &ConnectMsg) -> Result<LevelsMap, ErrAbort> {
    let mut levels = LevelsMap::default();
    for (hex, level) in connect.levels.iter().flatten() {
        let chan = InternalChannelId::from_hex(hex).map_err(|e| ErrAbort::new(e.to_string()))?;
        levels.insert(chan, *level);
    }
    Ok(levels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abort_caused_by_an_error_keeps_it_as_its_source() {
        let json = serde_json::from_str::<u8>("x").expect_err("not JSON");
        let abort = ErrAbort::caused_by("cannot encode CONNACK", json);
        let text = abort.to_string();
        assert!(
            text.starts_with("session aborted (cannot encode CONNACK: expected value"),
            "{text}"
        );
        let source = std::error::Error::source(&abort).expect("the JSON error");
        assert!(source.to_string().contains("expected value"), "{source}");
        assert_eq!(abort, ErrAbort::new("cannot encode CONNACK"));
    }

    #[test]
    fn levels_replace_by_channel_and_compare_in_any_order() {
        let other = InternalChannelId::Broadcast("ab".repeat(16).into());
        let mut levels = LevelsMap::default();
        assert!(levels.is_empty());
        assert_eq!(levels.insert(InternalChannelId::System, 3), None);
        assert_eq!(levels.insert(other.clone(), 1), None);
        assert_eq!(levels.insert(InternalChannelId::System, 5), Some(3));
        assert_eq!(levels.len(), 2);
        assert_eq!(levels.get(&InternalChannelId::System), Some(&5));
        assert_eq!(levels.get(&other), Some(&1));
        let reversed: LevelsMap = [(other, 1), (InternalChannelId::System, 5)]
            .into_iter()
            .collect();
        assert_eq!(levels, reversed);
        let fewer: LevelsMap = [(InternalChannelId::System, 5)].into_iter().collect();
        assert_ne!(levels, fewer);
        assert_ne!(fewer, levels);
    }

    fn connect_with(info: Option<serde_json::Value>) -> ConnectMsg {
        ConnectMsg {
            device_id: "dev1".to_owned(),
            info: info.map(|v| match v {
                serde_json::Value::Object(m) => m,
                other => panic!("Info must be an object, not {other}"),
            }),
            ..ConnectMsg::default()
        }
    }

    fn connect_with_levels(levels: &[(&str, i64)]) -> ConnectMsg {
        ConnectMsg {
            device_id: "dev1".to_owned(),
            levels: Some(levels.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()),
            ..ConnectMsg::default()
        }
    }

    #[test]
    fn info_string_defaults_when_absent_or_without_info() {
        let none = connect_with(None);
        assert_eq!(get_info_string(&none, "device", "?"), Ok("?"));
        let other = connect_with(Some(serde_json::json!({"channel": "daily"})));
        assert_eq!(get_info_string(&other, "device", "?"), Ok("?"));
        assert_eq!(get_info_string(&other, "device", "dflt"), Ok("dflt"));
    }

    #[test]
    fn info_string_gives_the_string_value() {
        let msg = connect_with(Some(
            serde_json::json!({"device": "mako", "channel": "daily", "empty": ""}),
        ));
        assert_eq!(get_info_string(&msg, "device", "?"), Ok("mako"));
        assert_eq!(get_info_string(&msg, "channel", "?"), Ok("daily"));
        // Present but empty is present: no default.
        assert_eq!(get_info_string(&msg, "empty", "?"), Ok(""));
    }

    #[test]
    fn info_string_of_another_type_is_unexpected_value() {
        for value in [
            serde_json::json!(-1),
            serde_json::json!(1.5),
            serde_json::json!(true),
            serde_json::json!(null),
            serde_json::json!(["mako"]),
            serde_json::json!({"name": "mako"}),
        ] {
            let msg = connect_with(Some(serde_json::json!({ "device": value.clone() })));
            assert_eq!(
                get_info_string(&msg, "device", "?"),
                Err(ErrAbort::unexpected_value()),
                "{value}"
            );
        }
        assert_eq!(
            ErrAbort::unexpected_value().reason,
            "unexpected value in message"
        );
    }

    #[test]
    fn info_int_defaults_when_absent_or_without_info() {
        assert_eq!(
            get_info_int(&connect_with(None), "build_number", -1),
            Ok(-1)
        );
        let other = connect_with(Some(serde_json::json!({"device": "mako"})));
        assert_eq!(get_info_int(&other, "build_number", 7), Ok(7));
    }

    #[test]
    fn info_int_takes_numbers_truncating_fractions() {
        let msg = connect_with(Some(serde_json::json!({
            "int": 42,
            "neg": -5,
            "frac": 3.7,
            "negfrac": -3.7,
            "zero": 0.0,
            "big": 9_007_199_254_740_993_i64,
        })));
        assert_eq!(get_info_int(&msg, "int", 0), Ok(42));
        assert_eq!(get_info_int(&msg, "neg", 0), Ok(-5));
        assert_eq!(get_info_int(&msg, "frac", 0), Ok(3));
        assert_eq!(get_info_int(&msg, "negfrac", 0), Ok(-3));
        assert_eq!(get_info_int(&msg, "zero", 9), Ok(0));
        assert_eq!(get_info_int(&msg, "big", 0), Ok(9_007_199_254_740_993));
    }

    #[test]
    fn info_int_of_another_type_is_unexpected_value() {
        for value in [
            serde_json::json!("42"),
            serde_json::json!(true),
            serde_json::json!(null),
            serde_json::json!([1]),
            serde_json::json!({"n": 1}),
        ] {
            let msg = connect_with(Some(serde_json::json!({ "build_number": value.clone() })));
            assert_eq!(
                get_info_int(&msg, "build_number", 0),
                Err(ErrAbort::unexpected_value()),
                "{value}"
            );
        }
    }

    #[test]
    fn levels_name_the_system_channel_by_zero_or_all_zero_hex() {
        let levels = levels_from_connect(&connect_with_levels(&[("0", 5)])).expect("levels");
        assert_eq!(levels.len(), 1);
        assert_eq!(levels.get(&InternalChannelId::System), Some(&5));

        let zeros = "0".repeat(32);
        let levels = levels_from_connect(&connect_with_levels(&[(&zeros, 7)])).expect("levels");
        assert_eq!(levels.len(), 1);
        assert_eq!(levels.get(&InternalChannelId::System), Some(&7));
    }

    #[test]
    fn levels_keep_other_broadcast_channels_and_every_level() {
        let hex = "0123456789abcdef0123456789abcdef";
        let levels =
            levels_from_connect(&connect_with_levels(&[("0", -3), (hex, 12)])).expect("levels");
        let want: LevelsMap = [
            (InternalChannelId::System, -3),
            (InternalChannelId::from_hex(hex).expect("hex id"), 12),
        ]
        .into_iter()
        .collect();
        assert_eq!(levels, want);
    }

    #[test]
    fn no_levels_is_an_empty_map() {
        assert!(
            levels_from_connect(&connect_with(None))
                .expect("levels")
                .is_empty()
        );
        assert!(
            levels_from_connect(&connect_with_levels(&[]))
                .expect("levels")
                .is_empty()
        );
    }

    #[test]
    fn a_bad_levels_key_aborts_naming_the_problem() {
        for bad in ["", "00", "z", "0x0", &"a".repeat(31), &"g".repeat(32)] {
            let err = levels_from_connect(&connect_with_levels(&[("0", 1), (bad, 1)]))
                .expect_err("bad key");
            assert_eq!(err.reason, "expected 128 bits hex repr", "{bad:?}");
            assert_eq!(
                err.to_string(),
                "session aborted (expected 128 bits hex repr)"
            );
        }
    }

    #[test]
    fn broker_errors_say_what_kind_they_are() {
        let abort = BrokerError::from(ErrAbort::expected_ack());
        assert!(abort.is_abort() && !abort.is_store() && !abort.is_unavailable());
        assert_eq!(abort.to_string(), "session aborted (expected ACK message)");

        let store = BrokerError::from(StoreError::Unavailable("down".into()));
        assert!(store.is_store() && !store.is_abort() && store.is_unavailable());
        assert_eq!(store.to_string(), "down");

        let unknown = BrokerError::from(StoreError::UnknownToken);
        assert!(unknown.is_store() && !unknown.is_unavailable());

        for e in [BrokerError::NotRunning, BrokerError::QueueFull] {
            assert!(e.is_unavailable() && !e.is_abort() && !e.is_store(), "{e}");
        }
        assert_eq!(BrokerError::QueueFull.to_string(), "broker queue is full");
    }
}
