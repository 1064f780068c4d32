//! The sans-IO codec of wire format version 0: the version byte, then frames of a
//! big-endian `u16` length followed by that many bytes of one JSON object.
//!
//! Decoding works on whatever bytes have arrived so far and tells "need more bytes" apart
//! from malformed input and from a frame over the limit; encoding appends whole frames to a
//! caller-owned buffer that is reused from message to message.

use serde::Serialize;
use thiserror::Error;

use super::messages::Message;

/// The only wire format version: the first byte a device sends.
pub const WIRE_VERSION: u8 = 0;

/// Bytes of the length prefix of every frame.
pub const FRAME_HEADER_LEN: usize = 2;

/// The largest frame body the format can carry: the `u16` length's range.
pub const MAX_FRAME_BODY: usize = u16::MAX as usize;

/// Why a frame could not be decoded.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// Not a whole frame yet: read more bytes and try again. This is normal operation.
    #[error("need {needed} more bytes")]
    Incomplete {
        /// At least this many more bytes are needed.
        needed: usize,
    },
    /// The frame announced a body over the decoder's limit.
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// The announced body length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The body is not a message (not a JSON object with a string `T`, or wrongly shaped).
    #[error("malformed message")]
    Malformed(#[source] serde_json::Error),
}

impl DecodeError {
    /// Whether more bytes may complete the frame.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, DecodeError::Incomplete { .. })
    }

    /// Whether the frame was over the limit.
    pub fn is_too_large(&self) -> bool {
        matches!(self, DecodeError::TooLarge { .. })
    }

    /// Whether the bytes were not a message.
    pub fn is_malformed(&self) -> bool {
        matches!(self, DecodeError::Malformed(_))
    }
}

/// Why a message could not be encoded.
#[derive(Debug, Error)]
pub enum EncodeError {
    /// The message's JSON is longer than a frame can carry.
    #[error("message of {len} bytes does not fit in a frame")]
    TooLarge {
        /// The JSON's length.
        len: usize,
    },
    /// The message could not be serialized (a bug in a `Serialize` impl).
    #[error("message could not be serialized")]
    Json(#[source] serde_json::Error),
}

/// Why the version byte was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VersionError {
    /// No byte yet.
    #[error("need the version byte")]
    Incomplete,
    /// A version other than [`WIRE_VERSION`].
    #[error("unexpected wire format version")]
    Unsupported(u8),
}

/// Checks the version byte at the start of `buf`.
///
/// # Errors
/// [`VersionError::Incomplete`] on an empty buffer, [`VersionError::Unsupported`] on any
/// byte but [`WIRE_VERSION`].
pub fn decode_version(buf: &[u8]) -> Result<(), VersionError> {
    match buf.first() {
        None => Err(VersionError::Incomplete),
        Some(&WIRE_VERSION) => Ok(()),
        Some(&v) => Err(VersionError::Unsupported(v)),
    }
}

/// Splits the first frame off `buf`.
///
/// # Returns
/// The frame's JSON body and how many bytes of `buf` the frame took (header included).
///
/// # Errors
/// [`DecodeError::Incomplete`] when `buf` does not hold the whole frame yet,
/// [`DecodeError::TooLarge`] when the announced body is over `max_body`.
pub fn decode_frame(buf: &[u8], max_body: usize) -> Result<(&[u8], usize), DecodeError> {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
        return Err(DecodeError::Incomplete {
            needed: FRAME_HEADER_LEN - buf.len(),
        });
    };
    let len = usize::from(u16::from_be_bytes([header[0], header[1]]));
    if len > max_body {
        return Err(DecodeError::TooLarge { len, max: max_body });
    }
    let total = FRAME_HEADER_LEN + len;
    match buf.get(FRAME_HEADER_LEN..total) {
        Some(body) => Ok((body, total)),
        None => Err(DecodeError::Incomplete {
            needed: total - buf.len(),
        }),
    }
}

/// Splits the first frame off `buf` and decodes its message.
///
/// # Returns
/// The message and how many bytes of `buf` the frame took.
///
/// # Errors
/// As [`decode_frame`], plus [`DecodeError::Malformed`] when the body is not a message.
pub fn decode_message(
    buf: &[u8],
    max_body: usize,
) -> Result<(Message<'static>, usize), DecodeError> {
    let (body, used) = decode_frame(buf, max_body)?;
    let msg = Message::decode(body).map_err(DecodeError::Malformed)?;
    Ok((msg, used))
}

/// Appends `msg` to `buf` as one frame.
///
/// # Returns
/// The range of `buf` the frame occupies.
///
/// # Errors
/// [`EncodeError::TooLarge`] when the JSON is over [`MAX_FRAME_BODY`]; `buf` is then left
/// as it was.
pub fn encode_frame<M: Serialize + ?Sized>(
    buf: &mut Vec<u8>,
    msg: &M,
) -> Result<std::ops::Range<usize>, EncodeError> {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0]);
    if let Err(e) = serde_json::to_writer(&mut *buf, msg) {
        buf.truncate(start);
        return Err(EncodeError::Json(e));
    }
    let len = buf.len() - start - FRAME_HEADER_LEN;
    let Ok(len16) = u16::try_from(len) else {
        buf.truncate(start);
        return Err(EncodeError::TooLarge { len });
    };
    buf[start..start + FRAME_HEADER_LEN].copy_from_slice(&len16.to_be_bytes());
    Ok(start..buf.len())
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::protocol::messages::{BroadcastMsg, Payload};

    /// A frame holding `body` as written by hand: big-endian length, then the bytes.
    fn frame(body: &[u8]) -> Vec<u8> {
        let len = u16::try_from(body.len()).expect("test bodies fit a frame");
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn version_byte() {
        assert_eq!(decode_version(&[0]), Ok(()));
        assert_eq!(decode_version(&[0, 1, 2]), Ok(()));
        assert_eq!(decode_version(&[1]), Err(VersionError::Unsupported(1)));
        assert_eq!(
            decode_version(&[255, 0]),
            Err(VersionError::Unsupported(255))
        );
        assert_eq!(decode_version(&[]), Err(VersionError::Incomplete));
    }

    #[test]
    fn partial_frames_are_incomplete_at_every_cut() {
        let body = br#"{"T":"ack"}"#;
        let buf = frame(body);
        let total = buf.len();
        for cut in 0..total {
            match decode_frame(&buf[..cut], MAX_FRAME_BODY) {
                Err(e @ DecodeError::Incomplete { needed }) => {
                    assert!(e.is_incomplete() && !e.is_too_large() && !e.is_malformed());
                    // Before the header is whole only the header's missing bytes are known.
                    let expected = if cut < FRAME_HEADER_LEN {
                        FRAME_HEADER_LEN - cut
                    } else {
                        total - cut
                    };
                    assert_eq!(needed, expected, "cut at {cut}");
                    assert!(needed > 0);
                }
                other => panic!("cut at {cut}: expected Incomplete, got {other:?}"),
            }
            let e = decode_message(&buf[..cut], MAX_FRAME_BODY).expect_err("partial frame");
            assert!(e.is_incomplete(), "cut at {cut}: {e:?}");
        }
    }

    #[test]
    fn whole_frame_gives_body_and_length() {
        let body = br#"{"T":"ping"}"#;
        let buf = frame(body);
        let (got, used) = decode_frame(&buf, MAX_FRAME_BODY).expect("whole frame");
        assert_eq!(got, body);
        assert_eq!(used, body.len() + 2);
        let (msg, used) = decode_message(&buf, MAX_FRAME_BODY).expect("whole frame");
        assert_eq!(msg, Message::Ping);
        assert_eq!(used, buf.len());
    }

    #[test]
    fn empty_body_frame() {
        let (body, used) = decode_frame(&[0, 0, 9], MAX_FRAME_BODY).expect("empty frame");
        assert!(body.is_empty());
        assert_eq!(used, 2);
        let e = decode_message(&[0, 0], MAX_FRAME_BODY).expect_err("empty body is no message");
        assert!(e.is_malformed());
    }

    #[test]
    fn concatenated_frames_decode_in_turn() {
        let mut buf = frame(br#"{"T":"ack"}"#);
        buf.extend(frame(br#"{"T":"pong","x":[1]}"#));
        buf.extend_from_slice(&[0]); // the start of a third frame
        let (first, used1) = decode_message(&buf, MAX_FRAME_BODY).expect("first");
        assert_eq!(first, Message::Ack);
        assert_eq!(used1, 2 + 11);
        let (second, used2) = decode_message(&buf[used1..], MAX_FRAME_BODY).expect("second");
        assert_eq!(second, Message::Pong);
        assert_eq!(used2, 2 + 20);
        let rest = &buf[used1 + used2..];
        match decode_frame(rest, MAX_FRAME_BODY) {
            Err(DecodeError::Incomplete { needed: 1 }) => {}
            other => panic!("expected Incomplete {{ needed: 1 }}, got {other:?}"),
        }
    }

    #[test]
    fn declared_length_over_limit_is_too_large() {
        // Refused on the header alone, before the body arrives.
        let e = decode_frame(&[0x01, 0x00], 255).expect_err("over the limit");
        assert!(e.is_too_large() && !e.is_incomplete() && !e.is_malformed());
        match e {
            DecodeError::TooLarge { len, max } => assert_eq!((len, max), (256, 255)),
            other => panic!("expected TooLarge, got {other:?}"),
        }
        let e = decode_message(&[0xff, 0xff, b'{'], 1024).expect_err("over the limit");
        assert!(e.is_too_large());
        // Exactly at the limit is fine.
        let buf = frame(br#"{"T":"ack"}"#);
        let (msg, _) = decode_message(&buf, 11).expect("at the limit");
        assert_eq!(msg, Message::Ack);
        assert!(decode_message(&buf, 10).expect_err("limit").is_too_large());
    }

    #[test]
    fn garbage_in_a_whole_frame_is_malformed() {
        for body in [
            &b"not json"[..],
            b"{\"T\":",
            b"[1,2]",
            b"{}",
            b"{\"T\":5}",
            b"\xff\xfe",
            b"{\"T\":\"ack\"}}",
        ] {
            let buf = frame(body);
            let e = decode_message(&buf, MAX_FRAME_BODY).expect_err("garbage");
            assert!(
                e.is_malformed() && !e.is_incomplete() && !e.is_too_large(),
                "{body:?}: {e:?}"
            );
            // The framing itself is fine.
            assert!(decode_frame(&buf, MAX_FRAME_BODY).is_ok());
        }
    }

    /// `n` nested arrays around nothing: `[[[…]]]`.
    fn nested(n: usize) -> Vec<u8> {
        let mut out = vec![b'['; n];
        out.extend(std::iter::repeat_n(b']', n));
        out
    }

    #[test]
    fn deep_nesting_does_not_crash() {
        // Unbalanced: malformed.
        let mut body = br#"{"T":"broadcast","ChanId":"0","TopLevel":1,"Payloads":["#.to_vec();
        body.resize(60_000, b'[');
        let e = decode_message(&frame(&body), MAX_FRAME_BODY).expect_err("unbalanced");
        assert!(e.is_malformed());
        // Deep but balanced in an ignored field: ignored, as any unknown field.
        let mut body = br#"{"T":"ack","x":"#.to_vec();
        body.extend(nested(20_000));
        body.push(b'}');
        let (msg, _) = decode_message(&frame(&body), MAX_FRAME_BODY).expect("ignored field");
        assert_eq!(msg, Message::Ack);
        // Deep in a CONNECT's Info, which is parsed into values: refused, not a stack overflow.
        let mut body = br#"{"T":"connect","Info":{"x":"#.to_vec();
        body.extend(nested(20_000));
        body.extend_from_slice(b"}}");
        let e = decode_message(&frame(&body), MAX_FRAME_BODY).expect_err("too deep");
        assert!(e.is_malformed());
    }

    #[test]
    fn encode_appends_to_a_reused_buffer() {
        let mut buf = b"keep".to_vec();
        let first = encode_frame(&mut buf, &Message::Ping).expect("ping encodes");
        assert_eq!(first, 4..4 + 2 + 12);
        assert_eq!(&buf[..4], b"keep");
        assert_eq!(&buf[first.clone()], b"\x00\x0c{\"T\":\"ping\"}");
        let second = encode_frame(&mut buf, &Message::Ack).expect("ack encodes");
        assert_eq!(second, first.end..first.end + 2 + 11);
        assert_eq!(buf.len(), second.end);
        assert_eq!(&buf[second.clone()], b"\x00\x0b{\"T\":\"ack\"}");
        // Both decode back in turn.
        let (m1, used) = decode_message(&buf[4..], MAX_FRAME_BODY).expect("first");
        let (m2, _) = decode_message(&buf[4 + used..], MAX_FRAME_BODY).expect("second");
        assert_eq!((m1, m2), (Message::Ping, Message::Ack));
        // Clearing and reusing starts again at 0.
        buf.clear();
        assert_eq!(encode_frame(&mut buf, &Message::Pong).expect("pong"), 0..14);
    }

    #[test]
    fn length_prefix_is_big_endian() {
        // A body over 255 bytes so both prefix bytes matter.
        let payload = Payload::from_json(&format!("\"{}\"", "x".repeat(1000))).expect("valid");
        let payloads = [payload];
        let msg = Message::Broadcast(BroadcastMsg {
            app_id: Cow::Borrowed(""),
            chan_id: Cow::Borrowed("0"),
            top_level: 1,
            payloads: Some(Cow::Borrowed(&payloads)),
        });
        let mut buf = Vec::new();
        let range = encode_frame(&mut buf, &msg).expect("encodes");
        let json = serde_json::to_vec(&msg).expect("serializes");
        let len = json.len();
        assert!(len > 256);
        assert_eq!(buf[0], (len >> 8) as u8);
        assert_eq!(buf[1], (len & 0xff) as u8);
        assert_eq!(&buf[2..], &json[..]);
        assert_eq!(range, 0..len + 2);
        let (back, used) = decode_message(&buf, MAX_FRAME_BODY).expect("decodes");
        assert_eq!(back, msg);
        assert_eq!(used, buf.len());
    }

    /// A BROADCAST whose JSON is exactly `json_len` bytes.
    fn broadcast_of_len(json_len: usize) -> (Vec<Payload>, usize) {
        let overhead = r#"{"T":"broadcast","ChanId":"0","TopLevel":1,"Payloads":[""]}"#.len();
        let text = format!("\"{}\"", "x".repeat(json_len - overhead));
        (vec![Payload::from_json(&text).expect("valid")], json_len)
    }

    #[test]
    fn largest_frame_encodes_and_one_more_byte_is_too_large() {
        for (json_len, fits) in [(MAX_FRAME_BODY, true), (MAX_FRAME_BODY + 1, false)] {
            let (payloads, _) = broadcast_of_len(json_len);
            let msg = Message::Broadcast(BroadcastMsg {
                app_id: Cow::Borrowed(""),
                chan_id: Cow::Borrowed("0"),
                top_level: 1,
                payloads: Some(Cow::Borrowed(&payloads)),
            });
            assert_eq!(
                serde_json::to_vec(&msg).expect("serializes").len(),
                json_len
            );
            let mut buf = b"prefix".to_vec();
            let before = buf.clone();
            match encode_frame(&mut buf, &msg) {
                Ok(range) => {
                    assert!(fits, "{json_len} bytes encoded");
                    assert_eq!(range, 6..6 + 2 + json_len);
                    assert_eq!(&buf[6..8], &[0xff, 0xff]);
                    let (back, _) = decode_message(&buf[6..], MAX_FRAME_BODY).expect("decodes");
                    assert_eq!(back, msg);
                }
                Err(EncodeError::TooLarge { len }) => {
                    assert!(!fits, "{json_len} bytes refused");
                    assert_eq!(len, json_len);
                    assert_eq!(buf, before, "buffer changed on error");
                }
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
    }
}
