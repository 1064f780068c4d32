//! The exchanges: BROADCAST, NOTIFICATIONS and the one-way CONNBROKEN / CONNWARN /
//! SETPARAMS, and feeding a new session what is pending.

use std::any::Any;
use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;

use ahash::AHashMap;

use super::{BrokerError, BrokerSession, ErrAbort, Exchange, Prepared};
use crate::protocol::{BroadcastMsg, Message, Notification, NotificationsMsg, Payload, encode_frame};
use crate::store::InternalChannelId;

/// Where a part's frame bytes are.
#[derive(Clone, Debug)]
enum Frame {
    /// Encoded once for every session that needs the same bytes.
    Shared(Rc<[u8]>),
    /// Encoded for this session into the scratch area's buffer.
    Local(Range<usize>),
}

/// One part of an exchange's message.
#[derive(Clone, Debug)]
struct Part {
    frame: Frame,
    /// BROADCAST: the level this part brings the device to.
    top_level: i64,
    /// NOTIFICATIONS: which of the scratch area's notifications this part carries.
    notifications: Range<usize>,
}

/// Per-session working memory for exchanges, reused from one exchange to the next so that
/// preparing allocates as little as it can.
#[derive(Default)]
pub struct ExchangesScratchArea {
    /// The parts of the exchange under way, in sending order.
    parts: Vec<Part>,
    /// The part being sent.
    current: usize,
    /// The notifications of the unicast exchange under way.
    notifications: Vec<Notification>,
    /// Frames encoded for this session alone.
    buf: Vec<u8>,
    /// The device's `"<channel>/<model>"` tag, rebuilt in place.
    tag: String,
}

impl fmt::Debug for ExchangesScratchArea {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExchangesScratchArea")
            .field("parts", &self.parts.len())
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl ExchangesScratchArea {
    fn reset(&mut self) {
        self.parts.clear();
        self.current = 0;
        self.notifications.clear();
        self.buf.clear();
    }

    /// The frame (length prefix included) of the part to send now; `None` when every
    /// part was sent.
    pub fn current_frame(&self) -> Option<&[u8]> {
        self.parts.get(self.current).map(|p| match &p.frame {
            Frame::Shared(bytes) => &bytes[..],
            Frame::Local(r) => &self.buf[r.clone()],
        })
    }

    /// Whether the current part is the last.
    pub fn is_last_part(&self) -> bool {
        self.current + 1 >= self.parts.len()
    }

    /// Moves on to the next part; `false` when there is none.
    pub fn advance(&mut self) -> bool {
        self.current += 1;
        self.current < self.parts.len()
    }

    /// How many parts the exchange under way has.
    pub fn part_count(&self) -> usize {
        self.parts.len()
    }

    fn current_part(&self) -> Option<&Part> {
        self.parts.get(self.current)
    }
}

/// The frames of one BROADCAST as a group of devices needs it.
#[derive(Debug)]
struct Encoded {
    /// How many payloads survived the filters (0: nothing to send unless the device is
    /// ahead).
    payload_count: usize,
    /// Frame and top level of each part.
    parts: Vec<(Rc<[u8]>, i64)>,
}

/// Delivers the state of a broadcast channel: its top level and its live notifications.
///
/// One exchange serves every session of a shard. The frames are encoded once per distinct
/// (level window, device tag) and the same bytes are handed to every session that needs
/// them.
pub struct BroadcastExchange {
    /// The channel.
    pub chan_id: InternalChannelId,
    /// The channel's top level.
    pub top_level: i64,
    /// The channel's live notifications, oldest first; the last is at `top_level`.
    pub notifications: Arc<[Notification]>,
    /// Each payload decoded as a JSON object (`None` when it is not one), for the system
    /// channel's filter.
    pub decoded: Vec<Option<serde_json::Map<String, serde_json::Value>>>,
    /// Device tag → first payload index → the encoded frames. Borrowed only inside
    /// `prepare`.
    encoded: RefCell<AHashMap<Box<str>, AHashMap<usize, Rc<Encoded>>>>,
}

impl fmt::Debug for BroadcastExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BroadcastExchange")
            .field("chan_id", &self.chan_id)
            .field("top_level", &self.top_level)
            .field("notifications", &self.notifications)
            .finish_non_exhaustive()
    }
}

impl PartialEq for BroadcastExchange {
    fn eq(&self, other: &Self) -> bool {
        self.chan_id == other.chan_id
            && self.top_level == other.top_level
            && self.notifications == other.notifications
            && self.decoded == other.decoded
    }
}

impl BroadcastExchange {
    /// An exchange for `chan_id` at `top_level` with its live `notifications` (the
    /// original's literal plus `Init`: payloads are decoded here, once).
    pub fn new(
        chan_id: InternalChannelId,
        top_level: i64,
        notifications: impl Into<Arc<[Notification]>>,
    ) -> Self {
        let notifications = notifications.into();
        let decoded = notifications
            .iter()
            .map(|n| serde_json::from_str(n.payload.get()).ok())
            .collect();
        Self {
            chan_id,
            top_level,
            notifications,
            decoded,
            encoded: RefCell::new(AHashMap::new()),
        }
    }

    /// The index of the first notification a device at `client_level` gets: the last
    /// `top − level` ones, or the last one when the device is ahead.
    fn level_window_start(&self, client_level: i64) -> usize {
        let count = self.notifications.len();
        let delta = self.top_level.saturating_sub(client_level);
        let delta = if delta < 0 { 1 } else { delta };
        count.saturating_sub(usize::try_from(delta).unwrap_or(usize::MAX))
    }

    fn encode(&self, start: usize, tag: &str) -> Result<Encoded, BrokerError> {
        let payloads: Option<Vec<Payload>> = if self.notifications.is_empty() {
            None
        } else {
            let window = &self.notifications[start..];
            let filtered = if self.chan_id == InternalChannelId::System {
                window
                    .iter()
                    .zip(&self.decoded[start..])
                    .filter(|(_, d)| d.as_ref().is_some_and(|m| m.contains_key(tag)))
                    .map(|(n, _)| n.payload.clone())
                    .collect()
            } else {
                window.iter().map(|n| n.payload.clone()).collect()
            };
            Some(filtered)
        };
        let payload_count = payloads.as_ref().map_or(0, Vec::len);
        let msg = BroadcastMsg {
            app_id: Cow::Borrowed(""),
            chan_id: Cow::Borrowed(self.chan_id.to_hex().unwrap_or_default()),
            top_level: self.top_level,
            payloads: payloads.map(Cow::Owned),
        };
        let mut buf = Vec::new();
        let mut parts = Vec::new();
        for part in msg.split() {
            buf.clear();
            let top = part.top_level;
            encode_frame(&mut buf, &Message::Broadcast(part))
                .map_err(|e| ErrAbort::new(format!("cannot encode broadcast: {e}")))?;
            parts.push((Rc::from(&buf[..]), top));
        }
        Ok(Encoded {
            payload_count,
            parts,
        })
    }

    fn encoded_for(&self, start: usize, tag: &str) -> Result<Rc<Encoded>, BrokerError> {
        if let Some(e) = self.encoded.borrow().get(tag).and_then(|m| m.get(&start)) {
            return Ok(Rc::clone(e));
        }
        let e = Rc::new(self.encode(start, tag)?);
        self.encoded
            .borrow_mut()
            .entry(Box::from(tag))
            .or_default()
            .insert(start, Rc::clone(&e));
        Ok(e)
    }
}

impl Exchange for BroadcastExchange {
    fn prepare(&self, sess: &mut dyn BrokerSession) -> Result<Prepared, BrokerError> {
        let client_level = sess.levels().get(&self.chan_id).copied().unwrap_or(0);
        let start = self.level_window_start(client_level);
        let mut tag = std::mem::take(&mut sess.exchange_scratch_area().tag);
        tag.clear();
        if self.chan_id == InternalChannelId::System {
            // Writing to a String cannot fail.
            let _ = write!(
                tag,
                "{}/{}",
                sess.device_image_channel(),
                sess.device_image_model()
            );
        }
        let encoded = self.encoded_for(start, &tag);
        let scratch = sess.exchange_scratch_area();
        scratch.tag = tag;
        let encoded = encoded?;
        scratch.reset();
        if encoded.payload_count == 0 && self.top_level >= client_level {
            // Nothing new and no need to resync a device that is ahead.
            return Ok(Prepared::Nop);
        }
        scratch
            .parts
            .extend(encoded.parts.iter().map(|(frame, top)| Part {
                frame: Frame::Shared(Rc::clone(frame)),
                top_level: *top,
                notifications: 0..0,
            }));
        Ok(Prepared::ExpectAck)
    }

    fn acked(&self, sess: &mut dyn BrokerSession, _done: bool) -> Result<(), BrokerError> {
        let Some(top) = sess
            .exchange_scratch_area()
            .current_part()
            .map(|p| p.top_level)
        else {
            return Err(ErrAbort::new("ACK without a broadcast part").into());
        };
        sess.levels_mut().insert(self.chan_id.clone(), top);
        Ok(())
    }

    fn coalesce_key(&self) -> Option<&InternalChannelId> {
        Some(&self.chan_id)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Delivers what is pending on a unicast channel in NOTIFICATIONS; each ACK drops exactly
/// the notifications of the part it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnicastExchange {
    /// The unicast channel.
    pub chan_id: InternalChannelId,
    /// Whether a cached view of the channel is good enough.
    pub cached_ok: bool,
}

impl Exchange for UnicastExchange {
    fn prepare(&self, sess: &mut dyn BrokerSession) -> Result<Prepared, BrokerError> {
        let (_, notifications) = sess.get(&self.chan_id, self.cached_ok)?;
        let scratch = sess.exchange_scratch_area();
        scratch.reset();
        if notifications.is_empty() {
            return Ok(Prepared::Nop);
        }
        scratch.notifications = notifications;
        for range in crate::protocol::split_notifications(&scratch.notifications) {
            let msg = Message::Notifications(NotificationsMsg {
                notifications: Cow::Borrowed(&scratch.notifications[range.clone()]),
            });
            let frame = encode_frame(&mut scratch.buf, &msg)
                .map_err(|e| ErrAbort::new(format!("cannot encode notifications: {e}")))?;
            scratch.parts.push(Part {
                frame: Frame::Local(frame),
                top_level: 0,
                notifications: range,
            });
        }
        Ok(Prepared::ExpectAck)
    }

    fn acked(&self, sess: &mut dyn BrokerSession, _done: bool) -> Result<(), BrokerError> {
        let scratch = sess.exchange_scratch_area();
        let Some(range) = scratch.current_part().map(|p| p.notifications.clone()) else {
            return Err(ErrAbort::new("ACK without a notifications part").into());
        };
        let delivered = std::mem::take(&mut scratch.notifications);
        let dropped = sess.drop_by_msg_id(&self.chan_id, &delivered[range]);
        sess.exchange_scratch_area().notifications = delivered;
        dropped
    }

    fn coalesce_key(&self) -> Option<&InternalChannelId> {
        Some(&self.chan_id)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A one-way message about the connection itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnMeta {
    /// CONNBROKEN with a reason: the session ends after it.
    Broken(String),
    /// CONNWARN with a reason: the session goes on.
    Warn(String),
    /// SETPARAMS with a cookie: the session goes on.
    SetParams(String),
}

/// Sends a CONNBROKEN, CONNWARN or SETPARAMS; expects no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnMetaExchange {
    /// The message.
    pub msg: ConnMeta,
}

impl Exchange for ConnMetaExchange {
    fn prepare(&self, sess: &mut dyn BrokerSession) -> Result<Prepared, BrokerError> {
        let (msg, close_after) = match &self.msg {
            ConnMeta::Broken(reason) => (
                Message::ConnBroken {
                    reason: Cow::Borrowed(reason),
                },
                true,
            ),
            ConnMeta::Warn(reason) => (
                Message::ConnWarn {
                    reason: Cow::Borrowed(reason),
                },
                false,
            ),
            ConnMeta::SetParams(cookie) => (
                Message::SetParams {
                    set_cookie: Cow::Borrowed(cookie),
                },
                false,
            ),
        };
        let scratch = sess.exchange_scratch_area();
        scratch.reset();
        let frame = encode_frame(&mut scratch.buf, &msg)
            .map_err(|e| ErrAbort::new(format!("cannot encode {}: {e}", msg.type_name())))?;
        scratch.parts.push(Part {
            frame: Frame::Local(frame),
            top_level: 0,
            notifications: 0..0,
        });
        Ok(Prepared::OneWay { close_after })
    }

    fn acked(&self, _sess: &mut dyn BrokerSession, _done: bool) -> Result<(), BrokerError> {
        Err(ErrAbort::new("no ACK is expected for a one-way message").into())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Feeds a newly registered session what is pending: a broadcast exchange for the system
/// channel when the device's level differs from the top level, then always a unicast
/// exchange for the device's own channel. A store failure on a broadcast channel skips it
/// (the broker logged it; the next broadcast tries again).
pub fn feed_pending(sess: &mut dyn BrokerSession) {
    for chan in [InternalChannelId::System] {
        let Ok((top_level, notifications)) = sess.get(&chan, true) else {
            continue;
        };
        let client_level = sess.levels().get(&chan).copied().unwrap_or(0);
        if client_level != top_level {
            sess.feed(Rc::new(BroadcastExchange::new(chan, top_level, notifications)));
        }
    }
    let own = sess.internal_channel_id();
    sess.feed(Rc::new(UnicastExchange {
        chan_id: own,
        cached_ok: true,
    }));
}
