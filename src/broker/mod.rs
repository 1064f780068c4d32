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
//! | `testing` (`TestBrokerSession`, `TestBrokerConfig`) | [`testing`] |
//! | `testsuite.CommonBrokerSuite` | [`testsuite`] and the [`broker_conformance!`](crate::broker_conformance) macro |

mod exchange;
mod queue;
pub mod simple;
pub mod testing;
pub mod testsuite;

use std::borrow::Cow;
use std::fmt;
use std::rc::Rc;

use thiserror::Error;

pub use exchange::{
    BroadcastExchange, ConnMeta, ConnMetaExchange, ExchangesScratchArea, UnicastExchange,
    feed_pending,
};
pub use queue::{ExchangeQueue, Next};

use crate::protocol::{ConnectMsg, Notification};
use crate::store::{InternalChannelId, StoreError};

/// A session's level per channel: the last level the device acknowledged.
pub type LevelsMap = ahash::AHashMap<InternalChannelId, i64>;

/// An exchange as queued for a session: shared, on the session's shard.
pub type ExchangeRef = Rc<dyn Exchange>;

/// The session must end, and why (the original's `ErrAbort`).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("session aborted ({reason})")]
pub struct ErrAbort {
    /// Why, as the session's end is logged.
    pub reason: Cow<'static, str>,
}

impl ErrAbort {
    /// An abort for `reason`.
    pub fn new(reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            reason: reason.into(),
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
            BrokerError::Abort(_) => false,
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
