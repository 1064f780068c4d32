//! The log's records: one store operation each, framed with its length and a CRC-32 so
//! that a torn or damaged tail is detected and dropped, never mis-read.
//!
//! Frame: `len: u32 LE` `crc32(body): u32 LE` `body` (`len` bytes). Body: an op byte, then
//! its fields; a string is `u32 LE` length + UTF-8 bytes, an instant is `u64` seconds +
//! `u32` nanoseconds since the Unix epoch (LE), a level an `i64` LE.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::protocol::{Notification, Payload};
use crate::store::{InternalChannelId, Metadata};

/// Bytes before a record's body.
pub(crate) const HEADER: usize = 8;

const OP_BROADCAST: u8 = 1;
const OP_UNICAST: u8 = 2;
const OP_DROP: u8 = 3;
const OP_SCRUB: u8 = 4;
const OP_BROADCAST_STATE: u8 = 5;

const CHAN_SYSTEM: u8 = 0;
const CHAN_BROADCAST: u8 = 1;
const CHAN_UNICAST: u8 = 2;

/// One store operation as the log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    /// A broadcast notification appended at `level`.
    Broadcast {
        chan: InternalChannelId,
        level: i64,
        payload: Payload,
        expiration: SystemTime,
    },
    /// A unicast notification appended.
    Unicast {
        chan: InternalChannelId,
        notification: Notification,
        meta: Metadata,
    },
    /// Notifications dropped by message id (an ACK).
    Drop {
        chan: InternalChannelId,
        msg_ids: Vec<Arc<str>>,
    },
    /// A broadcast channel's whole state: its top level and its live notifications,
    /// oldest first (what a snapshot keeps, and what a log behind the recovered replica
    /// is brought up to). Replay puts it in place of an older state.
    BroadcastState {
        chan: InternalChannelId,
        top_level: i64,
        notifications: Vec<(Payload, SystemTime)>,
    },
    /// An app's notifications removed (clear pending), or only those with a replace tag.
    Scrub {
        chan: InternalChannelId,
        app_id: Arc<str>,
        replace_tag: Option<Arc<str>>,
    },
}

/// Appends `record`, framed, to `out`.
pub(crate) fn encode(record: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    match record {
        Record::Broadcast {
            chan,
            level,
            payload,
            expiration,
        } => {
            out.push(OP_BROADCAST);
            put_chan(out, chan);
            out.extend_from_slice(&level.to_le_bytes());
            put_str(out, payload.get());
            put_time(out, *expiration);
        }
        Record::Unicast {
            chan,
            notification,
            meta,
        } => {
            out.push(OP_UNICAST);
            put_chan(out, chan);
            put_str(out, &notification.app_id);
            put_str(out, &notification.msg_id);
            put_str(out, notification.payload.get());
            put_time(out, meta.expiration);
            put_opt(out, meta.replace_tag.as_deref());
        }
        Record::Drop { chan, msg_ids } => {
            out.push(OP_DROP);
            put_chan(out, chan);
            put_len(out, msg_ids.len());
            for id in msg_ids {
                put_str(out, id);
            }
        }
        Record::BroadcastState {
            chan,
            top_level,
            notifications,
        } => {
            out.push(OP_BROADCAST_STATE);
            put_chan(out, chan);
            out.extend_from_slice(&top_level.to_le_bytes());
            put_len(out, notifications.len());
            for (payload, expiration) in notifications {
                put_str(out, payload.get());
                put_time(out, *expiration);
            }
        }
        Record::Scrub {
            chan,
            app_id,
            replace_tag,
        } => {
            out.push(OP_SCRUB);
            put_chan(out, chan);
            put_str(out, app_id);
            put_opt(out, replace_tag.as_deref());
        }
    }
    let body_len = out.len() - start - HEADER;
    let crc = crc32fast::hash(&out[start + HEADER..]);
    // A body is bounded by what the API accepts (far below 4 GiB).
    let len = u32::try_from(body_len).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// What [`decode_next`] found at the front of a byte string.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// A whole, intact record and the bytes it took.
    Record(Record, usize),
    /// Nothing more: the bytes end exactly here.
    End,
    /// A record that is cut short, fails its checksum or does not parse: the log's valid
    /// part ends before it.
    Torn(&'static str),
}

/// Decodes the record at the front of `bytes`.
pub(crate) fn decode_next(bytes: &[u8]) -> Decoded {
    if bytes.is_empty() {
        return Decoded::End;
    }
    let Some(header) = bytes.get(..HEADER) else {
        return Decoded::Torn("a record header is cut short");
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    // No bound on `len` beyond the bytes there are: the body is read in place, and
    // parsing allocates at most in proportion to it. A broadcast channel's state record
    // holds its whole backlog, which `broadcast_backlog` does not bound.
    let Some(body) = bytes.get(HEADER..HEADER + len) else {
        return Decoded::Torn("a record body is cut short");
    };
    if crc32fast::hash(body) != crc {
        return Decoded::Torn("a record fails its checksum");
    }
    match parse_body(body) {
        Some(record) => Decoded::Record(record, HEADER + len),
        None => Decoded::Torn("a record with a valid checksum does not parse"),
    }
}

fn parse_body(body: &[u8]) -> Option<Record> {
    let mut r = Reader(body);
    let record = match r.u8()? {
        OP_BROADCAST => Record::Broadcast {
            chan: r.chan()?,
            level: r.i64()?,
            payload: r.payload()?,
            expiration: r.time()?,
        },
        OP_UNICAST => {
            let chan = r.chan()?;
            let app_id = r.arc_str()?;
            let msg_id = r.arc_str()?;
            let payload = r.payload()?;
            let expiration = r.time()?;
            let replace_tag = r.opt()?;
            Record::Unicast {
                chan,
                notification: Notification {
                    app_id,
                    msg_id,
                    payload,
                },
                meta: Metadata {
                    expiration,
                    replace_tag,
                },
            }
        }
        OP_DROP => {
            let chan = r.chan()?;
            let n = r.u32()? as usize;
            // Each id takes at least its 4-byte length: a count beyond that is damage.
            if n > r.0.len() / 4 {
                return None;
            }
            let mut msg_ids = Vec::with_capacity(n);
            for _ in 0..n {
                msg_ids.push(r.arc_str()?);
            }
            Record::Drop { chan, msg_ids }
        }
        OP_BROADCAST_STATE => {
            let chan = r.chan()?;
            let top_level = r.i64()?;
            let n = r.u32()? as usize;
            // Each entry takes at least its 4-byte length and 12-byte instant.
            if n > r.0.len() / 16 {
                return None;
            }
            let mut notifications = Vec::with_capacity(n);
            for _ in 0..n {
                let payload = r.payload()?;
                notifications.push((payload, r.time()?));
            }
            Record::BroadcastState {
                chan,
                top_level,
                notifications,
            }
        }
        OP_SCRUB => Record::Scrub {
            chan: r.chan()?,
            app_id: r.arc_str()?,
            replace_tag: r.opt()?,
        },
        _ => return None,
    };
    r.0.is_empty().then_some(record)
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

fn put_time(out: &mut Vec<u8>, t: SystemTime) {
    // An instant before the epoch (never made by the API) is kept as the epoch.
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    out.extend_from_slice(&d.as_secs().to_le_bytes());
    out.extend_from_slice(&d.subsec_nanos().to_le_bytes());
}

fn put_chan(out: &mut Vec<u8>, chan: &InternalChannelId) {
    match chan {
        InternalChannelId::System => out.push(CHAN_SYSTEM),
        InternalChannelId::Broadcast(hex) => {
            out.push(CHAN_BROADCAST);
            put_str(out, hex);
        }
        InternalChannelId::Unicast { user, device } => {
            out.push(CHAN_UNICAST);
            put_str(out, user);
            put_str(out, device);
        }
    }
}

/// A cursor over a record body; every read checks its bounds.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn str(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }

    fn arc_str(&mut self) -> Option<Arc<str>> {
        self.str().map(Arc::from)
    }

    fn opt(&mut self) -> Option<Option<Arc<str>>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.arc_str()?)),
            _ => None,
        }
    }

    fn payload(&mut self) -> Option<Payload> {
        Payload::from_json(self.str()?).ok()
    }

    fn time(&mut self) -> Option<SystemTime> {
        let secs = self.u64()?;
        let nanos = self.u32()?;
        if nanos >= 1_000_000_000 {
            return None;
        }
        UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
    }

    fn chan(&mut self) -> Option<InternalChannelId> {
        Some(match self.u8()? {
            CHAN_SYSTEM => InternalChannelId::System,
            CHAN_BROADCAST => InternalChannelId::Broadcast(self.arc_str()?),
            CHAN_UNICAST => InternalChannelId::Unicast {
                user: self.arc_str()?,
                device: self.arc_str()?,
            },
            _ => return None,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    fn samples() -> Vec<Record> {
        let payload = Payload::from_json(r#"{"a":[1,"é"]}"#).unwrap();
        vec![
            Record::Broadcast {
                chan: InternalChannelId::System,
                level: 42,
                payload: payload.clone(),
                expiration: t(1_900_000_000, 123_456_789),
            },
            Record::Unicast {
                chan: InternalChannelId::unicast("user", "dev-1"),
                notification: Notification::unicast("app", "m-1", payload),
                meta: Metadata {
                    expiration: t(1_900_000_001, 0),
                    replace_tag: Some(Arc::from("tag")),
                },
            },
            Record::Drop {
                chan: InternalChannelId::unicast("u", "d"),
                msg_ids: vec![Arc::from("m-1"), Arc::from("m-2")],
            },
            Record::BroadcastState {
                chan: InternalChannelId::System,
                top_level: 9,
                notifications: vec![
                    (Payload::from_json("[1]").unwrap(), t(1_900_000_002, 5)),
                    (Payload::from_json("{}").unwrap(), t(1_900_000_003, 0)),
                ],
            },
            Record::Scrub {
                chan: InternalChannelId::Broadcast(Arc::from("0123456789abcdef0123456789abcdef")),
                app_id: Arc::from("app"),
                replace_tag: None,
            },
        ]
    }

    fn decode_all(mut bytes: &[u8]) -> (Vec<Record>, Option<&'static str>) {
        let mut out = Vec::new();
        loop {
            match decode_next(bytes) {
                Decoded::Record(r, used) => {
                    out.push(r);
                    bytes = &bytes[used..];
                }
                Decoded::End => return (out, None),
                Decoded::Torn(why) => return (out, Some(why)),
            }
        }
    }

    #[test]
    fn every_record_kind_reads_back_as_written() {
        let mut bytes = Vec::new();
        for r in samples() {
            encode(&r, &mut bytes);
        }
        assert_eq!(decode_all(&bytes), (samples(), None));
    }

    #[test]
    fn a_log_cut_anywhere_reads_back_the_whole_records_before_the_cut() {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for r in samples() {
            encode(&r, &mut bytes);
            ends.push(bytes.len());
        }
        for cut in 0..bytes.len() {
            let (records, torn) = decode_all(&bytes[..cut]);
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(records, samples()[..whole], "cut at {cut}");
            assert_eq!(
                torn.is_some(),
                !ends.contains(&cut) && cut != 0,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_flipped_bit_is_caught_by_the_checksum() {
        let mut bytes = Vec::new();
        encode(&samples()[1], &mut bytes);
        for at in HEADER..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            assert!(
                matches!(decode_next(&damaged), Decoded::Torn(_)),
                "byte {at} flipped"
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_never_read_past_the_input(
            bytes in proptest::collection::vec(any::<u8>(), 0..256)
        ) {
            if let Decoded::Record(_, used) = decode_next(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }
    }
}
