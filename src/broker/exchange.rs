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
use crate::protocol::{
    BroadcastMsg, Message, Notification, NotificationsMsg, Payload, encode_frame, split_payloads,
};
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
    /// Payload index → the payload decoded as a JSON object (`None` when it is not one),
    /// for the system channel's filter. Filled on first need: devices are usually one
    /// level behind, so only the newest payloads are ever decoded. Borrowed only inside a
    /// method.
    decoded: RefCell<AHashMap<usize, Option<JsonObject>>>,
    /// Device tag → first payload index → the encoded frames. Borrowed only inside
    /// `prepare`.
    encoded: RefCell<EncodingCache>,
}

/// A payload decoded as a JSON object.
pub type JsonObject = serde_json::Map<String, serde_json::Value>;

/// Device tag → first payload index → the frames encoded for that window and tag.
type EncodingCache = AHashMap<Box<str>, AHashMap<usize, Rc<Encoded>>>;

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
    }
}

impl BroadcastExchange {
    /// An exchange for `chan_id` at `top_level` with its live `notifications` (the
    /// original's literal plus `Init`; payloads are decoded when a filter first needs
    /// them, once).
    pub fn new(
        chan_id: InternalChannelId,
        top_level: i64,
        notifications: impl Into<Arc<[Notification]>>,
    ) -> Self {
        Self {
            chan_id,
            top_level,
            notifications: notifications.into(),
            decoded: RefCell::new(AHashMap::new()),
            encoded: RefCell::new(AHashMap::new()),
        }
    }

    /// Every payload decoded as a JSON object (`None` for one that is not), oldest first:
    /// the original's `Decoded`.
    pub fn decoded(&self) -> Vec<Option<JsonObject>> {
        (0..self.notifications.len())
            .map(|i| self.with_decoded(i, Option::clone))
            .collect()
    }

    /// Runs `f` on payload `i` decoded, decoding it on first use.
    fn with_decoded<R>(&self, i: usize, f: impl FnOnce(&Option<JsonObject>) -> R) -> R {
        let mut decoded = self.decoded.borrow_mut();
        let entry = decoded.entry(i).or_insert_with(|| {
            self.notifications
                .get(i)
                .and_then(|n| serde_json::from_str(n.payload.get()).ok())
        });
        f(entry)
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
        // The level each live notification brings the device to: the last is at the top.
        let count = self.notifications.len();
        let level_of = |i: usize| {
            let back = i64::try_from(count - 1 - i).unwrap_or(i64::MAX);
            self.top_level.saturating_sub(back)
        };
        // The payloads for this device and, index for index, the level of each.
        let mut levels = Vec::new();
        let payloads: Option<Vec<Payload>> = if self.notifications.is_empty() {
            None
        } else {
            let filter = self.chan_id == InternalChannelId::System;
            let mut filtered = Vec::new();
            for (i, n) in self.notifications.iter().enumerate().skip(start) {
                if !filter
                    || self.with_decoded(i, |d| d.as_ref().is_some_and(|m| m.contains_key(tag)))
                {
                    filtered.push(n.payload.clone());
                    levels.push(level_of(i));
                }
            }
            Some(filtered)
        };
        let payload_count = payloads.as_ref().map_or(0, Vec::len);
        let chan_id = self.chan_id.to_hex().unwrap_or_default();
        // Each part but the last brings the device to the level of its last payload, so a
        // device that drops in between resumes right after it, even when the channel
        // filter left out payloads in between; the last part brings it to the top level.
        // (Counting only the payloads sent, as `BroadcastMsg::split` does, would claim a
        // level beyond filtered-out payloads and lose the next part's on resume.)
        // No payloads at all (`null`) is one part, as an empty list is.
        let ranges = split_payloads(payloads.as_deref().unwrap_or_default());
        let last = ranges.len() - 1;
        let mut buf = Vec::new();
        let mut parts = Vec::with_capacity(ranges.len());
        for (k, range) in ranges.into_iter().enumerate() {
            let top = if k == last {
                self.top_level
            } else {
                range
                    .end
                    .checked_sub(1)
                    .and_then(|i| levels.get(i).copied())
                    .unwrap_or(self.top_level)
            };
            let part = BroadcastMsg {
                app_id: Cow::Borrowed(""),
                chan_id: Cow::Borrowed(chan_id),
                top_level: top,
                payloads: payloads.as_deref().map(|p| Cow::Borrowed(&p[range])),
            };
            buf.clear();
            encode_frame(&mut buf, &Message::Broadcast(part))
                .map_err(|e| ErrAbort::caused_by("cannot encode broadcast", e))?;
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
        scratch.reset();
        let encoded = match encoded {
            Ok(encoded) => encoded,
            Err(e) => {
                scratch.tag = tag;
                return Err(e);
            }
        };
        if encoded.payload_count == 0 && self.top_level >= client_level {
            // Nothing new and no need to resync a device that is ahead. The tag's buffer
            // is not kept: a session that was sent nothing (every idle session after its
            // catch-up at registration) holds no heap block for it.
            return Ok(Prepared::Nop);
        }
        // Kept for the next delivery, which then writes the tag without allocating.
        scratch.tag = tag;
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
                .map_err(|e| ErrAbort::caused_by("cannot encode notifications", e))?;
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
            .map_err(|e| ErrAbort::caused_by(format!("cannot encode {}", msg.type_name()), e))?;
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
        let Ok(exchange) = sess.broadcast_exchange(&chan) else {
            continue;
        };
        let client_level = sess.levels().get(&chan).copied().unwrap_or(0);
        if client_level != exchange.top_level {
            sess.feed(exchange);
        }
    }
    let own = sess.internal_channel_id();
    sess.feed(Rc::new(UnicastExchange {
        chan_id: own,
        cached_ok: true,
    }));
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::broker::testing::{Performed, TestBrokerSession, perform_acking, perform_with};
    use crate::broker::{ExchangeRef, Next};
    use crate::protocol::{Message, decode_message};
    use crate::store::{InMemoryPendingStore, ManualClock, Metadata, PendingStore, StoreError};

    const HEX: &str = "0123456789abcdef0123456789abcdef";

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn much_later() -> SystemTime {
        t0() + Duration::from_secs(3600)
    }

    fn new_store() -> (Rc<InMemoryPendingStore>, Rc<ManualClock>) {
        let clock = Rc::new(ManualClock::new(t0()));
        let store = Rc::new(InMemoryPendingStore::with_clock(
            Rc::clone(&clock) as Rc<dyn crate::store::Clock>
        ));
        (store, clock)
    }

    /// A session of `device` on `store` whose tag is `daily/mako`.
    fn session(device: &str, store: &Rc<InMemoryPendingStore>) -> TestBrokerSession {
        let mut sess = TestBrokerSession::new(device, Rc::clone(store) as Rc<dyn PendingStore>);
        sess.model = "mako".to_owned();
        sess.image_channel = "daily".to_owned();
        sess
    }

    fn at_level(
        mut sess: TestBrokerSession,
        chan: &InternalChannelId,
        level: i64,
    ) -> TestBrokerSession {
        sess.levels.insert(chan.clone(), level);
        sess
    }

    fn payload(json: &str) -> Payload {
        Payload::from_json(json).expect("test payloads are JSON")
    }

    fn append(
        store: &InMemoryPendingStore,
        chan: &InternalChannelId,
        json: &str,
        expiration: SystemTime,
    ) {
        store
            .append_to_channel(chan, payload(json), expiration)
            .expect("append to broadcast channel");
    }

    fn append_unicast(
        store: &InMemoryPendingStore,
        chan: &InternalChannelId,
        app: &str,
        msg: &str,
        json: &str,
    ) {
        store
            .append_to_unicast_channel(
                chan,
                Notification::unicast(app, msg, payload(json)),
                Metadata::expiring(much_later()),
            )
            .expect("append to unicast channel");
    }

    /// The broadcast exchange for the current state of `chan` in `store`.
    fn exchange_of(store: &InMemoryPendingStore, chan: &InternalChannelId) -> BroadcastExchange {
        let (top, ns) = store.get_channel_snapshot(chan).expect("snapshot");
        BroadcastExchange::new(chan.clone(), top, ns)
    }

    fn pending_ids(store: &InMemoryPendingStore, chan: &InternalChannelId) -> Vec<String> {
        let (_, ns) = store.get_channel_snapshot(chan).expect("snapshot");
        ns.iter().map(|n| n.msg_id.to_string()).collect()
    }

    /// The JSON body of a frame, after checking its length prefix.
    fn body(frame: &[u8]) -> &str {
        assert!(frame.len() >= 2, "a frame has a length prefix");
        let len = usize::from(u16::from_be_bytes([frame[0], frame[1]]));
        assert_eq!(len, frame.len() - 2, "length prefix matches the body");
        std::str::from_utf8(&frame[2..]).expect("frame bodies are UTF-8")
    }

    fn decode(frame: &[u8]) -> Message<'static> {
        let (msg, used) = decode_message(frame, 65535).expect("frame decodes");
        assert_eq!(used, frame.len());
        msg
    }

    /// (ChanId, TopLevel, payloads as text) of a BROADCAST frame.
    fn decode_broadcast(frame: &[u8]) -> (String, i64, Option<Vec<String>>) {
        match decode(frame) {
            Message::Broadcast(b) => (
                b.chan_id.into_owned(),
                b.top_level,
                b.payloads
                    .map(|ps| ps.iter().map(|p| p.get().to_owned()).collect()),
            ),
            other => panic!("expected BROADCAST, got {other:?}"),
        }
    }

    /// The message ids of a NOTIFICATIONS frame.
    fn decode_notification_ids(frame: &[u8]) -> Vec<String> {
        match decode(frame) {
            Message::Notifications(n) => n
                .notifications
                .iter()
                .map(|n| n.msg_id.to_string())
                .collect(),
            other => panic!("expected NOTIFICATIONS, got {other:?}"),
        }
    }

    fn acked_frames(performed: Performed) -> Vec<Vec<u8>> {
        match performed {
            Performed::Acked(frames) => frames,
            other => panic!("expected an ACKed exchange, got {other:?}"),
        }
    }

    fn one_way(performed: Performed) -> (Vec<Vec<u8>>, bool) {
        match performed {
            Performed::OneWay {
                frames,
                close_after,
            } => (frames, close_after),
            other => panic!("expected a one-way exchange, got {other:?}"),
        }
    }

    fn level(sess: &TestBrokerSession, chan: &InternalChannelId) -> Option<i64> {
        sess.levels.get(chan).copied()
    }

    /// A system channel holding `{"daily/mako":1}` … `{"daily/mako":3}` at top level 3.
    fn three_tagged() -> Rc<InMemoryPendingStore> {
        let (store, _) = new_store();
        for i in 1..=3 {
            append(
                &store,
                &InternalChannelId::System,
                &format!(r#"{{"daily/mako":{i}}}"#),
                much_later(),
            );
        }
        store
    }

    // BroadcastExchange.

    #[test]
    fn broadcast_behind_by_one_gets_only_the_last_payload() {
        let store = three_tagged();
        let sys = InternalChannelId::System;
        let ex = exchange_of(&store, &sys);
        assert_eq!(ex.top_level, 3);
        let mut sess = at_level(session("dev1", &store), &sys, 2);
        let frames = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        assert_eq!(frames.len(), 1);
        assert_eq!(
            body(&frames[0]),
            r#"{"T":"broadcast","ChanId":"0","TopLevel":3,"Payloads":[{"daily/mako":3}]}"#
        );
        assert_eq!(level(&sess, &sys), Some(3));
    }

    #[test]
    fn broadcast_way_behind_gets_every_live_payload() {
        let (store, clock) = new_store();
        let sys = InternalChannelId::System;
        for i in 1..=7 {
            append(
                &store,
                &sys,
                &format!(r#"{{"daily/mako":{i}}}"#),
                t0() + Duration::from_secs(10),
            );
        }
        clock.advance(Duration::from_secs(20));
        for i in 8..=10 {
            append(
                &store,
                &sys,
                &format!(r#"{{"daily/mako":{i}}}"#),
                much_later(),
            );
        }
        let ex = exchange_of(&store, &sys);
        assert_eq!((ex.top_level, ex.notifications.len()), (10, 3));
        let want = r#"{"T":"broadcast","ChanId":"0","TopLevel":10,"Payloads":[{"daily/mako":8},{"daily/mako":9},{"daily/mako":10}]}"#;

        let mut sess = at_level(session("dev1", &store), &sys, 0);
        let frames = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        assert_eq!(frames.len(), 1);
        assert_eq!(body(&frames[0]), want);
        assert_eq!(level(&sess, &sys), Some(10));

        // A device that gave no level for the channel is at level 0.
        let mut fresh = session("dev2", &store);
        assert_eq!(level(&fresh, &sys), None);
        let frames = acked_frames(perform_acking(&ex, &mut fresh).expect("performed"));
        assert_eq!(body(&frames[0]), want);
        assert_eq!(level(&fresh, &sys), Some(10));

        // Behind by 2 of 10: the last two.
        let mut near = at_level(session("dev3", &store), &sys, 8);
        let frames = acked_frames(perform_acking(&ex, &mut near).expect("performed"));
        assert_eq!(
            decode_broadcast(&frames[0]),
            (
                "0".to_owned(),
                10,
                Some(vec![
                    r#"{"daily/mako":9}"#.to_owned(),
                    r#"{"daily/mako":10}"#.to_owned()
                ])
            )
        );
    }

    #[test]
    fn broadcast_at_the_top_level_is_nop() {
        let store = three_tagged();
        let sys = InternalChannelId::System;
        let ex = exchange_of(&store, &sys);
        let mut sess = at_level(session("dev1", &store), &sys, 3);
        assert_eq!(ex.prepare(&mut sess).expect("prepared"), Prepared::Nop);
        assert_eq!(sess.scratch.part_count(), 0);
        assert_eq!(sess.scratch.current_frame(), None);
        assert_eq!(
            perform_acking(&ex, &mut sess).expect("performed"),
            Performed::Nop
        );
        assert_eq!(level(&sess, &sys), Some(3));
    }

    #[test]
    fn broadcast_too_ahead_gets_the_last_payload_and_the_top_level() {
        let store = three_tagged();
        let sys = InternalChannelId::System;
        let ex = exchange_of(&store, &sys);
        let mut sess = at_level(session("dev1", &store), &sys, 20);
        let frames = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        assert_eq!(frames.len(), 1);
        assert_eq!(
            body(&frames[0]),
            r#"{"T":"broadcast","ChanId":"0","TopLevel":3,"Payloads":[{"daily/mako":3}]}"#
        );
        // The device is brought back to the server's level.
        assert_eq!(level(&sess, &sys), Some(3));
    }

    #[test]
    fn broadcast_too_ahead_on_an_empty_channel_resyncs_with_null_payloads() {
        let (store, clock) = new_store();
        let sys = InternalChannelId::System;
        for i in 1..=3 {
            append(
                &store,
                &sys,
                &format!(r#"{{"daily/mako":{i}}}"#),
                t0() + Duration::from_secs(10),
            );
        }
        clock.advance(Duration::from_secs(20));
        let ex = exchange_of(&store, &sys);
        assert_eq!((ex.top_level, ex.notifications.len()), (3, 0));
        let mut sess = at_level(session("dev1", &store), &sys, 5);
        let frames = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        assert_eq!(frames.len(), 1);
        assert_eq!(
            body(&frames[0]),
            r#"{"T":"broadcast","ChanId":"0","TopLevel":3,"Payloads":null}"#
        );
        assert_eq!(level(&sess, &sys), Some(3));

        // Behind on that empty channel there is nothing to say.
        let mut behind = at_level(session("dev2", &store), &sys, 1);
        assert_eq!(
            perform_acking(&ex, &mut behind).expect("performed"),
            Performed::Nop
        );
        assert_eq!(level(&behind, &sys), Some(1));
    }

    /// A system channel at top level 6 none of whose payloads is for `daily/mako`.
    fn none_for_daily_mako() -> Rc<InMemoryPendingStore> {
        let (store, _) = new_store();
        for json in [
            r#"{"weekly/mako":1}"#,
            r#"{"daily/hammerhead":2}"#,
            r#""daily/mako""#,
            r#"["daily/mako"]"#,
            r#"{"x":{"daily/mako":5}}"#,
            "6",
        ] {
            append(&store, &InternalChannelId::System, json, much_later());
        }
        store
    }

    #[test]
    fn broadcast_behind_with_every_payload_filtered_out_is_nop() {
        let store = none_for_daily_mako();
        let sys = InternalChannelId::System;
        let ex = exchange_of(&store, &sys);
        assert_eq!((ex.top_level, ex.notifications.len()), (6, 6));
        for start in [0, 3, 5] {
            let mut sess = at_level(session("dev1", &store), &sys, start);
            assert_eq!(
                perform_acking(&ex, &mut sess).expect("performed"),
                Performed::Nop,
                "level {start}"
            );
            assert_eq!(level(&sess, &sys), Some(start));
        }
    }

    #[test]
    fn broadcast_too_ahead_with_the_window_filtered_out_gets_empty_payloads() {
        let store = none_for_daily_mako();
        let sys = InternalChannelId::System;
        let ex = exchange_of(&store, &sys);
        let mut sess = at_level(session("dev1", &store), &sys, 9);
        let frames = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        assert_eq!(frames.len(), 1);
        assert_eq!(
            body(&frames[0]),
            r#"{"T":"broadcast","ChanId":"0","TopLevel":6,"Payloads":[]}"#
        );
        assert_eq!(level(&sess, &sys), Some(6));
    }

    #[test]
    fn system_channel_filter_keeps_only_objects_with_the_device_tag_in_order() {
        let (store, _) = new_store();
        let sys = InternalChannelId::System;
        for json in [
            r#"{"daily/mako":1}"#,
            r#"{"weekly/mako":2}"#,
            r#"{"b":0, "daily/mako":{"x":[3]}}"#,
            "4",
            r#"{"daily/mako":null}"#,
        ] {
            append(&store, &sys, json, much_later());
        }
        let ex = exchange_of(&store, &sys);
        let mut sess = session("dev1", &store);
        let frames = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        assert_eq!(
            body(&frames[0]),
            r#"{"T":"broadcast","ChanId":"0","TopLevel":5,"Payloads":[{"daily/mako":1},{"b":0, "daily/mako":{"x":[3]}},{"daily/mako":null}]}"#
        );

        // The tag is built from what the session says; unknown model and channel are "?".
        let (store, _) = new_store();
        append(&store, &sys, r#"{"?/?":1}"#, much_later());
        append(&store, &sys, r#"{"daily/mako":2}"#, much_later());
        let ex = exchange_of(&store, &sys);
        let mut anon = TestBrokerSession::new("dev2", Rc::clone(&store) as Rc<dyn PendingStore>);
        let frames = acked_frames(perform_acking(&ex, &mut anon).expect("performed"));
        assert_eq!(
            decode_broadcast(&frames[0]),
            ("0".to_owned(), 2, Some(vec![r#"{"?/?":1}"#.to_owned()]))
        );
        let mut weekly = session("dev3", &store);
        weekly.image_channel = "weekly".to_owned();
        assert_eq!(
            perform_acking(&ex, &mut weekly).expect("performed"),
            Performed::Nop
        );
    }

    /// A tagged payload of about 40 KiB whose value starts with `n`.
    fn big_tagged(n: usize) -> String {
        format!(r#"{{"daily/mako":"{n}{}"}}"#, "x".repeat(40 * 1024))
    }

    /// A system channel at top level 5: two small payloads, then three of ~40 KiB.
    fn split_store() -> Rc<InMemoryPendingStore> {
        let (store, _) = new_store();
        let sys = InternalChannelId::System;
        append(&store, &sys, r#"{"daily/mako":"small1"}"#, much_later());
        append(&store, &sys, r#"{"daily/mako":"small2"}"#, much_later());
        for n in 3..=5 {
            append(&store, &sys, &big_tagged(n), much_later());
        }
        store
    }

    #[test]
    fn large_broadcast_is_split_and_each_part_carries_its_level() {
        let store = split_store();
        let sys = InternalChannelId::System;
        let ex = exchange_of(&store, &sys);
        let mut sess = at_level(session("dev1", &store), &sys, 2);
        assert_eq!(
            ex.prepare(&mut sess).expect("prepared"),
            Prepared::ExpectAck
        );
        assert_eq!(sess.scratch.part_count(), 3);

        let frames = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        assert_eq!(frames.len(), 3);
        for (i, frame) in frames.iter().enumerate() {
            let (chan, top, payloads) = decode_broadcast(frame);
            assert_eq!(chan, "0");
            assert_eq!(top, 3 + i as i64, "part {i}");
            assert_eq!(payloads, Some(vec![big_tagged(3 + i)]), "part {i}");
            assert!(frame.len() - 2 <= 65535);
        }
        assert_eq!(level(&sess, &sys), Some(5));
    }

    #[test]
    fn each_acked_part_of_a_split_broadcast_sets_the_level_to_its_top_level() {
        let store = split_store();
        let sys = InternalChannelId::System;
        let ex = exchange_of(&store, &sys);
        for (acked_parts, want_level) in [(0usize, 2i64), (1, 3), (2, 4)] {
            let mut sess = at_level(session("dev1", &store), &sys, 2);
            let mut offered = Vec::new();
            let err = perform_with(&ex, &mut sess, |i| {
                offered.push(i);
                i < acked_parts
            })
            .expect_err("the missing ACK ends the exchange");
            assert!(err.is_abort(), "{err:?}");
            assert_eq!(offered, (0..=acked_parts).collect::<Vec<_>>());
            assert_eq!(
                level(&sess, &sys),
                Some(want_level),
                "after {acked_parts} ACKed parts"
            );
        }
        // Resuming from the first part's level sends the rest, from where it stopped.
        let mut sess = at_level(session("dev1", &store), &sys, 3);
        let frames = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        let tops: Vec<i64> = frames.iter().map(|f| decode_broadcast(f).1).collect();
        assert_eq!(tops, [4, 5]);
        assert_eq!(level(&sess, &sys), Some(5));
    }

    /// docs/protocol.md §1.5: a part's TopLevel is the level reached by its last payload,
    /// so a device that drops in between resumes correctly, also when the system
    /// channel's filter left payloads out of the window.
    #[test]
    fn split_filtered_broadcast_resumes_after_the_last_payload_sent() {
        let (store, _) = new_store();
        let sys = InternalChannelId::System;
        append(&store, &sys, r#"{"daily/mako":1}"#, much_later());
        append(&store, &sys, &big_tagged(2), much_later());
        append(&store, &sys, r#"{"weekly/mako":3}"#, much_later());
        append(&store, &sys, &big_tagged(4), much_later());
        append(&store, &sys, r#"{"weekly/mako":5}"#, much_later());
        let ex = exchange_of(&store, &sys);
        assert_eq!(ex.top_level, 5);

        // All ACKed: two parts, the first at the level of payload 2, the last at the top.
        let mut sess = at_level(session("dev1", &store), &sys, 1);
        let frames = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        let parts: Vec<(i64, Option<Vec<String>>)> = frames
            .iter()
            .map(|f| {
                let (_, top, payloads) = decode_broadcast(f);
                (top, payloads)
            })
            .collect();
        assert_eq!(
            parts,
            [
                (2, Some(vec![big_tagged(2)])),
                (5, Some(vec![big_tagged(4)]))
            ]
        );
        assert_eq!(level(&sess, &sys), Some(5));

        // Dropped after the first part: resuming delivers payload 4, nothing is lost.
        let mut sess = at_level(session("dev2", &store), &sys, 1);
        let err = perform_with(&ex, &mut sess, |i| i == 0).expect_err("second ACK missing");
        assert!(err.is_abort(), "{err:?}");
        assert_eq!(level(&sess, &sys), Some(2));
        let frames = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        assert_eq!(frames.len(), 1);
        assert_eq!(
            decode_broadcast(&frames[0]),
            ("0".to_owned(), 5, Some(vec![big_tagged(4)]))
        );
        assert_eq!(level(&sess, &sys), Some(5));
    }

    #[test]
    fn broadcast_frames_are_encoded_once_per_tag_and_window() {
        let (store, _) = new_store();
        let sys = InternalChannelId::System;
        append(&store, &sys, r#"{"daily/mako":1}"#, much_later());
        append(&store, &sys, r#"{"weekly/mako":2}"#, much_later());
        append(
            &store,
            &sys,
            r#"{"daily/mako":3,"weekly/mako":3}"#,
            much_later(),
        );
        let ex = exchange_of(&store, &sys);

        let mut a = at_level(session("devA", &store), &sys, 0);
        let mut b = at_level(session("devB", &store), &sys, 0);
        assert_eq!(ex.prepare(&mut a).expect("prepared"), Prepared::ExpectAck);
        assert_eq!(ex.prepare(&mut b).expect("prepared"), Prepared::ExpectAck);
        let fa = a.scratch.current_frame().expect("a frame for A");
        let fb = b.scratch.current_frame().expect("a frame for B");
        assert_eq!(fa, fb);
        assert!(
            std::ptr::eq(fa.as_ptr(), fb.as_ptr()),
            "B got A's encoded frame"
        );
        assert_eq!(
            body(fa),
            r#"{"T":"broadcast","ChanId":"0","TopLevel":3,"Payloads":[{"daily/mako":1},{"daily/mako":3,"weekly/mako":3}]}"#
        );
        assert_eq!(ex.encoded.borrow().len(), 1, "one tag encoded");

        // Another level with the same window (all 3 live) shares the frames too.
        let mut c = at_level(session("devC", &store), &sys, -4);
        assert_eq!(ex.prepare(&mut c).expect("prepared"), Prepared::ExpectAck);
        let fc = c.scratch.current_frame().expect("a frame for C");
        assert!(std::ptr::eq(fa.as_ptr(), fc.as_ptr()));

        // Another tag gets other bytes.
        let mut w = at_level(session("devW", &store), &sys, 0);
        w.image_channel = "weekly".to_owned();
        assert_eq!(ex.prepare(&mut w).expect("prepared"), Prepared::ExpectAck);
        let fw = w.scratch.current_frame().expect("a frame for W");
        assert_ne!(fa, fw);
        assert_eq!(
            body(fw),
            r#"{"T":"broadcast","ChanId":"0","TopLevel":3,"Payloads":[{"weekly/mako":2},{"daily/mako":3,"weekly/mako":3}]}"#
        );
        assert_eq!(ex.encoded.borrow().len(), 2, "two tags encoded");

        // Another window for the same tag gets other bytes, cached beside the first.
        let mut d = at_level(session("devD", &store), &sys, 2);
        assert_eq!(ex.prepare(&mut d).expect("prepared"), Prepared::ExpectAck);
        let fd = d.scratch.current_frame().expect("a frame for D");
        assert_eq!(
            body(fd),
            r#"{"T":"broadcast","ChanId":"0","TopLevel":3,"Payloads":[{"daily/mako":3,"weekly/mako":3}]}"#
        );
        let cached_windows = ex
            .encoded
            .borrow()
            .get("daily/mako")
            .map(|windows| windows.len());
        assert_eq!(cached_windows, Some(2));

        // Preparing again reuses the cache: the very same bytes as the first time.
        let first = fa.as_ptr();
        assert_eq!(ex.prepare(&mut a).expect("prepared"), Prepared::ExpectAck);
        let again = a.scratch.current_frame().expect("a frame for A");
        assert!(std::ptr::eq(first, again.as_ptr()));
    }

    #[test]
    fn split_broadcast_parts_are_shared_between_sessions() {
        let store = split_store();
        let sys = InternalChannelId::System;
        let ex = exchange_of(&store, &sys);
        let mut a = at_level(session("devA", &store), &sys, 2);
        let mut b = at_level(session("devB", &store), &sys, 2);
        ex.prepare(&mut a).expect("prepared");
        ex.prepare(&mut b).expect("prepared");
        assert_eq!(a.scratch.part_count(), 3);
        assert_eq!(b.scratch.part_count(), 3);
        for part in 0..3 {
            let fa = a.scratch.current_frame().expect("part for A");
            let fb = b.scratch.current_frame().expect("part for B");
            assert!(std::ptr::eq(fa.as_ptr(), fb.as_ptr()), "part {part}");
            assert_eq!(a.scratch.is_last_part(), part == 2);
            assert_eq!(a.scratch.advance(), part < 2);
            assert_eq!(b.scratch.advance(), part < 2);
        }
        assert_eq!(a.scratch.current_frame(), None);
    }

    #[test]
    fn non_system_broadcast_channel_is_not_filtered_and_names_its_hex_id() {
        let (store, _) = new_store();
        let chan = InternalChannelId::from_hex(HEX).expect("hex id");
        append(&store, &chan, "42", much_later());
        append(&store, &chan, r#"{"other/thing":1}"#, much_later());
        // The system channel's level does not count for this channel.
        append(
            &store,
            &InternalChannelId::System,
            r#"{"daily/mako":1}"#,
            much_later(),
        );
        let ex = exchange_of(&store, &chan);
        assert_eq!(ex.coalesce_key(), Some(&chan));
        let mut sess = at_level(session("dev1", &store), &InternalChannelId::System, 1);
        let frames = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        assert_eq!(frames.len(), 1);
        assert_eq!(
            body(&frames[0]),
            format!(
                r#"{{"T":"broadcast","ChanId":"{HEX}","TopLevel":2,"Payloads":[42,{{"other/thing":1}}]}}"#
            )
        );
        assert_eq!(level(&sess, &chan), Some(2));
        assert_eq!(level(&sess, &InternalChannelId::System), Some(1));
        // Sessions of any tag share the frame of a non-system channel.
        let mut other = session("dev2", &store);
        other.model = "hammerhead".to_owned();
        ex.prepare(&mut other).expect("prepared");
        assert_eq!(other.scratch.current_frame(), Some(&frames[0][..]));
        assert_eq!(ex.encoded.borrow().len(), 1);
    }

    #[test]
    fn broadcast_ack_without_a_part_is_an_error() {
        let store = three_tagged();
        let ex = exchange_of(&store, &InternalChannelId::System);
        let mut sess = session("dev1", &store);
        let err = ex.acked(&mut sess, true).expect_err("nothing was sent");
        assert!(err.is_abort(), "{err:?}");
        assert!(sess.levels.is_empty());
    }

    #[test]
    fn broadcast_exchange_decodes_payloads_lazily_as_json_objects() {
        let (store, _) = new_store();
        let ex = BroadcastExchange::new(
            InternalChannelId::System,
            3,
            vec![
                Notification::broadcast(payload(r#"{"daily/mako":1}"#)),
                Notification::broadcast(payload("[1]")),
                Notification::broadcast(payload(r#"{"daily/mako":3}"#)),
            ],
        );
        assert!(ex.decoded.borrow().is_empty(), "nothing decoded before use");
        // A device one level behind needs only the newest payload decoded.
        let mut sess = at_level(session("dev1", &store), &InternalChannelId::System, 2);
        assert_eq!(
            ex.prepare(&mut sess).expect("prepared"),
            Prepared::ExpectAck
        );
        let mut keys: Vec<usize> = ex.decoded.borrow().keys().copied().collect();
        keys.sort_unstable();
        assert_eq!(keys, [2]);

        let decoded = ex.decoded();
        assert_eq!(decoded.len(), 3);
        assert!(
            decoded[0]
                .as_ref()
                .is_some_and(|m| m.contains_key("daily/mako"))
        );
        assert_eq!(decoded[1], None, "an array is not an object");
        let same = BroadcastExchange::new(InternalChannelId::System, 3, ex.notifications.clone());
        assert_eq!(ex, same);
        assert_ne!(
            ex,
            BroadcastExchange::new(InternalChannelId::System, 4, ex.notifications.clone())
        );
    }

    // UnicastExchange.

    fn own(sess: &TestBrokerSession) -> InternalChannelId {
        sess.internal_channel_id()
    }

    fn unicast(chan: &InternalChannelId) -> UnicastExchange {
        UnicastExchange {
            chan_id: chan.clone(),
            cached_ok: false,
        }
    }

    #[test]
    fn unicast_sends_every_live_notification_in_one_message() {
        let (store, _) = new_store();
        let mut sess = session("dev1", &store);
        let chan = own(&sess);
        append_unicast(&store, &chan, "app1", "m1", r#"{"a":1}"#);
        let ex = unicast(&chan);
        let frames = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        assert_eq!(frames.len(), 1);
        assert_eq!(
            body(&frames[0]),
            r#"{"T":"notifications","Notifications":[{"A":"app1","M":"m1","P":{"a":1}}]}"#
        );
        assert!(pending_ids(&store, &chan).is_empty());
    }

    #[test]
    fn unicast_leaves_out_expired_and_superseded_notifications() {
        let (store, clock) = new_store();
        let mut sess = session("dev1", &store);
        let chan = own(&sess);
        let add = |app: &str, msg: &str, json: &str, exp: SystemTime, tag: Option<&str>| {
            store
                .append_to_unicast_channel(
                    &chan,
                    Notification::unicast(app, msg, payload(json)),
                    Metadata {
                        expiration: exp,
                        replace_tag: tag.map(Arc::from),
                    },
                )
                .expect("append");
        };
        add("app1", "m1", "1", t0() + Duration::from_secs(5), None);
        add("app1", "m2", r#""two""#, much_later(), Some("t"));
        add("app2", "m3", "[3]", much_later(), None);
        add("app1", "m4", r#"{"four":4}"#, much_later(), Some("t"));
        clock.advance(Duration::from_secs(10));
        let frames = acked_frames(perform_acking(&unicast(&chan), &mut sess).expect("performed"));
        assert_eq!(frames.len(), 1);
        assert_eq!(
            body(&frames[0]),
            r#"{"T":"notifications","Notifications":[{"A":"app2","M":"m3","P":[3]},{"A":"app1","M":"m4","P":{"four":4}}]}"#
        );
    }

    #[test]
    fn unicast_with_nothing_pending_is_nop() {
        let (store, _) = new_store();
        let mut sess = session("dev1", &store);
        let chan = own(&sess);
        let ex = unicast(&chan);
        assert_eq!(ex.prepare(&mut sess).expect("prepared"), Prepared::Nop);
        assert_eq!(sess.scratch.part_count(), 0);
        assert_eq!(
            perform_acking(&ex, &mut sess).expect("performed"),
            Performed::Nop
        );
        // Another device's notifications are not this channel's.
        append_unicast(
            &store,
            &InternalChannelId::unicast("dev2", "dev2"),
            "app1",
            "m1",
            "1",
        );
        assert_eq!(
            perform_acking(&ex, &mut sess).expect("performed"),
            Performed::Nop
        );
    }

    #[test]
    fn unicast_ack_drops_exactly_what_was_sent() {
        let (store, _) = new_store();
        let mut sess = session("dev1", &store);
        let chan = own(&sess);
        append_unicast(&store, &chan, "app1", "m1", "1");
        append_unicast(&store, &chan, "app2", "m2", "2");
        let ex = unicast(&chan);
        let late = Rc::clone(&store);
        let late_chan = chan.clone();
        let frames = acked_frames(
            perform_with(&ex, &mut sess, |_| {
                // Arrives while the device holds the message, before its ACK.
                append_unicast(&late, &late_chan, "app1", "m3", "3");
                true
            })
            .expect("performed"),
        );
        assert_eq!(frames.len(), 1);
        assert_eq!(decode_notification_ids(&frames[0]), ["m1", "m2"]);
        assert_eq!(pending_ids(&store, &chan), ["m3"]);

        // The next exchange delivers the late one, and nothing twice.
        let frames = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        assert_eq!(decode_notification_ids(&frames[0]), ["m3"]);
        assert!(pending_ids(&store, &chan).is_empty());
    }

    #[test]
    fn unicast_without_ack_leaves_everything_pending() {
        let (store, _) = new_store();
        let mut sess = session("dev1", &store);
        let chan = own(&sess);
        append_unicast(&store, &chan, "app1", "m1", "1");
        append_unicast(&store, &chan, "app1", "m2", "2");
        let ex = unicast(&chan);
        let err = perform_with(&ex, &mut sess, |_| false).expect_err("no ACK");
        assert!(err.is_abort(), "{err:?}");
        assert_eq!(pending_ids(&store, &chan), ["m1", "m2"]);
        // And they go out again next time.
        let frames = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        assert_eq!(decode_notification_ids(&frames[0]), ["m1", "m2"]);
        assert!(pending_ids(&store, &chan).is_empty());
    }

    fn big_json(n: usize) -> String {
        format!(r#""{n}{}""#, "y".repeat(40 * 1024))
    }

    #[test]
    fn split_unicast_ack_of_the_first_part_drops_only_its_notifications() {
        let (store, _) = new_store();
        let mut sess = session("dev1", &store);
        let chan = own(&sess);
        append_unicast(&store, &chan, "app1", "m1", &big_json(1));
        append_unicast(&store, &chan, "app1", "m2", &big_json(2));
        append_unicast(&store, &chan, "app1", "m3", "3");
        let ex = unicast(&chan);
        assert_eq!(
            ex.prepare(&mut sess).expect("prepared"),
            Prepared::ExpectAck
        );
        assert_eq!(sess.scratch.part_count(), 2);

        let mut frames = Vec::new();
        let err = perform_with(&ex, &mut sess, |i| i == 0).expect_err("second ACK missing");
        assert!(err.is_abort(), "{err:?}");
        assert_eq!(pending_ids(&store, &chan), ["m2", "m3"]);

        // The rest goes out next time, as one part.
        let performed = acked_frames(perform_acking(&ex, &mut sess).expect("performed"));
        frames.extend(performed);
        assert_eq!(frames.len(), 1);
        assert_eq!(decode_notification_ids(&frames[0]), ["m2", "m3"]);
        assert!(pending_ids(&store, &chan).is_empty());
    }

    #[test]
    fn split_unicast_parts_carry_consecutive_notifications() {
        let (store, _) = new_store();
        let mut sess = session("dev1", &store);
        let chan = own(&sess);
        append_unicast(&store, &chan, "app1", "m1", &big_json(1));
        append_unicast(&store, &chan, "app1", "m2", &big_json(2));
        append_unicast(&store, &chan, "app1", "m3", "3");
        let acked = Rc::new(Cell::new(0));
        let seen = Rc::clone(&acked);
        let frames = acked_frames(
            perform_with(&unicast(&chan), &mut sess, |_| {
                seen.set(seen.get() + 1);
                true
            })
            .expect("performed"),
        );
        assert_eq!(acked.get(), 2);
        let ids: Vec<Vec<String>> = frames.iter().map(|f| decode_notification_ids(f)).collect();
        assert_eq!(
            ids,
            [
                vec!["m1".to_owned()],
                vec!["m2".to_owned(), "m3".to_owned()]
            ]
        );
        assert!(pending_ids(&store, &chan).is_empty());
    }

    #[test]
    fn unicast_get_failure_surfaces_from_prepare() {
        let (store, _) = new_store();
        let mut sess = session("dev1", &store);
        let chan = own(&sess);
        append_unicast(&store, &chan, "app1", "m1", "1");
        let asked = Rc::new(Cell::new(None));
        let asked_in = Rc::clone(&asked);
        sess.do_get = Box::new(move |_, cached_ok| {
            asked_in.set(Some(cached_ok));
            Err(StoreError::Unavailable("get fail".into()).into())
        });
        let ex = UnicastExchange {
            chan_id: chan.clone(),
            cached_ok: true,
        };
        let err = ex.prepare(&mut sess).expect_err("get fails");
        assert!(err.is_store(), "{err:?}");
        assert_eq!(err.to_string(), "get fail");
        assert_eq!(
            asked.get(),
            Some(true),
            "the exchange's cached_ok is passed on"
        );
        assert_eq!(pending_ids(&store, &chan), ["m1"]);
    }

    #[test]
    fn unicast_drop_failure_surfaces_from_acked() {
        let (store, _) = new_store();
        let mut sess = session("dev1", &store);
        let chan = own(&sess);
        append_unicast(&store, &chan, "app1", "m1", "1");
        sess.do_drop_by_msg_id =
            Box::new(|_, _| Err(StoreError::Unavailable("drop fail".into()).into()));
        let ex = unicast(&chan);
        let err = perform_acking(&ex, &mut sess).expect_err("drop fails");
        assert!(err.is_store(), "{err:?}");
        assert_eq!(err.to_string(), "drop fail");
        assert_eq!(pending_ids(&store, &chan), ["m1"]);
        // The scratch area still knows what the part carried: a retry of the ACK works.
        let dropped: Rc<RefCell<Vec<String>>> = Rc::default();
        let into = Rc::clone(&dropped);
        sess.do_drop_by_msg_id = Box::new(move |_, targets| {
            into.borrow_mut()
                .extend(targets.iter().map(|n| n.msg_id.to_string()));
            Ok(())
        });
        ex.acked(&mut sess, true).expect("acked");
        assert_eq!(*dropped.borrow(), ["m1"]);
    }

    #[test]
    fn unicast_ack_without_a_part_is_an_error() {
        let (store, _) = new_store();
        let mut sess = session("dev1", &store);
        let ex = unicast(&own(&sess));
        let err = ex.acked(&mut sess, true).expect_err("nothing was sent");
        assert!(err.is_abort(), "{err:?}");
    }

    #[test]
    fn the_scratch_area_is_reused_across_exchanges() {
        let store = three_tagged();
        let mut sess = session("dev1", &store);
        let chan = own(&sess);
        append_unicast(&store, &chan, "app1", "m1", &big_json(1));
        append_unicast(&store, &chan, "app1", "m2", &big_json(2));
        let u = unicast(&chan);
        u.prepare(&mut sess).expect("prepared");
        assert_eq!(sess.scratch.part_count(), 2);
        // A broadcast prepared next replaces the unicast parts entirely.
        let b = exchange_of(&store, &InternalChannelId::System);
        let frames = acked_frames(perform_acking(&b, &mut sess).expect("performed"));
        assert_eq!(frames.len(), 1);
        assert_eq!(decode_broadcast(&frames[0]).1, 3);
        // And a Nop broadcast leaves nothing to send.
        assert_eq!(b.prepare(&mut sess).expect("prepared"), Prepared::Nop);
        assert_eq!(sess.scratch.current_frame(), None);
        // The unicast still works after it.
        let frames = acked_frames(perform_acking(&u, &mut sess).expect("performed"));
        assert_eq!(frames.len(), 2);
        assert!(pending_ids(&store, &chan).is_empty());
    }

    // ConnMetaExchange.

    fn conn_meta(msg: ConnMeta) -> ConnMetaExchange {
        ConnMetaExchange { msg }
    }

    #[test]
    fn connbroken_is_one_way_and_closes() {
        let (store, _) = new_store();
        let mut sess = session("dev1", &store);
        let ex = conn_meta(ConnMeta::Broken("host-mismatch".to_owned()));
        assert_eq!(
            ex.prepare(&mut sess).expect("prepared"),
            Prepared::OneWay { close_after: true }
        );
        let (frames, close_after) = one_way(perform_acking(&ex, &mut sess).expect("performed"));
        assert!(close_after);
        assert_eq!(frames.len(), 1);
        assert_eq!(
            body(&frames[0]),
            r#"{"T":"connbroken","Reason":"host-mismatch"}"#
        );
    }

    #[test]
    fn connwarn_is_one_way_and_the_session_goes_on() {
        let (store, _) = new_store();
        let mut sess = session("dev1", &store);
        let ex = conn_meta(ConnMeta::Warn("unauthorized".to_owned()));
        assert_eq!(
            ex.prepare(&mut sess).expect("prepared"),
            Prepared::OneWay { close_after: false }
        );
        let (frames, close_after) = one_way(perform_acking(&ex, &mut sess).expect("performed"));
        assert!(!close_after);
        assert_eq!(
            body(&frames[0]),
            r#"{"T":"connwarn","Reason":"unauthorized"}"#
        );
    }

    #[test]
    fn setparams_is_one_way_with_the_cookie() {
        let (store, _) = new_store();
        let mut sess = session("dev1", &store);
        let ex = conn_meta(ConnMeta::SetParams("COOKIE \"1\"".to_owned()));
        let (frames, close_after) = one_way(perform_acking(&ex, &mut sess).expect("performed"));
        assert!(!close_after);
        assert_eq!(frames.len(), 1);
        assert_eq!(
            body(&frames[0]),
            r#"{"T":"setparams","SetCookie":"COOKIE \"1\""}"#
        );
        assert!(matches!(
            decode(&frames[0]),
            Message::SetParams { set_cookie } if set_cookie == "COOKIE \"1\""
        ));
    }

    #[test]
    fn conn_meta_ack_is_an_error_not_a_panic_and_it_never_coalesces() {
        let (store, _) = new_store();
        let mut sess = session("dev1", &store);
        for msg in [
            ConnMeta::Broken("x".to_owned()),
            ConnMeta::Warn("y".to_owned()),
            ConnMeta::SetParams("z".to_owned()),
        ] {
            let ex = conn_meta(msg);
            assert_eq!(ex.coalesce_key(), None);
            let err = ex
                .acked(&mut sess, true)
                .expect_err("no ACK expected, before prepare");
            assert!(err.is_abort(), "{err:?}");
            ex.prepare(&mut sess).expect("prepared");
            let err = ex
                .acked(&mut sess, true)
                .expect_err("no ACK expected, after prepare");
            assert!(err.is_abort(), "{err:?}");
        }
    }

    // feed_pending.

    /// What the session's queue holds, in order, taken out.
    fn drain(sess: &TestBrokerSession) -> Vec<ExchangeRef> {
        let mut out = Vec::new();
        while let Some(next) = sess.exchanges.try_next() {
            match next {
                Next::Exchange(e) => out.push(e),
                Next::Terminated => panic!("not terminated"),
            }
        }
        out
    }

    fn assert_own_unicast(e: &ExchangeRef, sess: &TestBrokerSession) {
        let u = e
            .as_any()
            .downcast_ref::<UnicastExchange>()
            .unwrap_or_else(|| panic!("expected a unicast exchange, got {e:?}"));
        assert_eq!(
            u,
            &UnicastExchange {
                chan_id: InternalChannelId::unicast(&sess.device_id, &sess.device_id),
                cached_ok: true,
            }
        );
    }

    #[test]
    fn feed_pending_at_the_top_level_feeds_only_the_unicast_exchange() {
        let store = three_tagged();
        let mut sess = at_level(session("dev1", &store), &InternalChannelId::System, 3);
        feed_pending(&mut sess);
        let fed = drain(&sess);
        assert_eq!(fed.len(), 1);
        assert_own_unicast(&fed[0], &sess);

        // An empty channel at level 0 and a device without levels: also in step.
        let (empty, _) = new_store();
        let mut sess = session("dev2", &empty);
        feed_pending(&mut sess);
        let fed = drain(&sess);
        assert_eq!(fed.len(), 1);
        assert_own_unicast(&fed[0], &sess);
    }

    #[test]
    fn feed_pending_behind_or_ahead_feeds_broadcast_then_unicast() {
        let store = three_tagged();
        let (top, notifications) = store
            .get_channel_snapshot(&InternalChannelId::System)
            .expect("snapshot");
        for client_level in [None, Some(0), Some(2), Some(4), Some(-1)] {
            let mut sess = session("dev1", &store);
            if let Some(l) = client_level {
                sess.levels.insert(InternalChannelId::System, l);
            }
            feed_pending(&mut sess);
            let fed = drain(&sess);
            assert_eq!(fed.len(), 2, "level {client_level:?}");
            let b = fed[0]
                .as_any()
                .downcast_ref::<BroadcastExchange>()
                .unwrap_or_else(|| panic!("expected the broadcast first, got {:?}", fed[0]));
            assert_eq!(b.chan_id, InternalChannelId::System);
            assert_eq!(b.top_level, top);
            assert_eq!(&b.notifications[..], &notifications[..]);
            assert_own_unicast(&fed[1], &sess);
        }
    }

    #[test]
    fn feed_pending_asks_for_the_system_channel_allowing_a_cached_answer() {
        let store = three_tagged();
        let mut sess = session("dev1", &store);
        let asked: Rc<RefCell<Vec<(InternalChannelId, bool)>>> = Rc::default();
        let log = Rc::clone(&asked);
        let inner = Rc::clone(&store);
        sess.do_get = Box::new(move |chan, cached_ok| {
            log.borrow_mut().push((chan.clone(), cached_ok));
            Ok(inner.get_channel_snapshot(chan)?)
        });
        feed_pending(&mut sess);
        assert_eq!(*asked.borrow(), [(InternalChannelId::System, true)]);
        assert_eq!(drain(&sess).len(), 2);
    }

    #[test]
    fn feed_pending_still_feeds_the_unicast_exchange_when_get_fails() {
        let store = three_tagged();
        let mut sess = session("dev1", &store);
        sess.do_get = Box::new(|_, _| Err(StoreError::Unavailable("get fail".into()).into()));
        feed_pending(&mut sess);
        let fed = drain(&sess);
        assert_eq!(fed.len(), 1);
        assert_own_unicast(&fed[0], &sess);
    }
}
