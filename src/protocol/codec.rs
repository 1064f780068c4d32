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
pub fn decode_message(buf: &[u8], max_body: usize) -> Result<(Message<'static>, usize), DecodeError> {
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
