//! Channel ids: the system channel, other broadcast channels, and per-device unicast
//! channels.

use std::fmt;
use std::sync::Arc;

use thiserror::Error;

use crate::protocol::SYSTEM_CHANNEL_HEX;

/// The id under which the store and the broker know a channel.
///
/// Its [`Display`](fmt::Display) form is the original server's internal id (`0`,
/// `B<32 hex>`, `U<user>:<device>`), which log lines show.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InternalChannelId {
    /// The system channel, hex id `"0"` (also 32 zero hex digits), named `system` in the API.
    System,
    /// Another broadcast channel, by its 32 hex digits as given.
    Broadcast(Arc<str>),
    /// The unicast channel of one (user, device) pair.
    Unicast {
        /// The user id.
        user: Arc<str>,
        /// The device id.
        device: Arc<str>,
    },
}

/// Why a hex channel id was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ChannelIdError {
    /// Neither `"0"` nor 32 hex digits.
    #[error("expected 128 bits hex repr")]
    Expected128BitsHex,
}

impl InternalChannelId {
    /// The unicast channel of `user` on `device`.
    pub fn unicast(user: &str, device: &str) -> Self {
        InternalChannelId::Unicast {
            user: Arc::from(user),
            device: Arc::from(device),
        }
    }

    /// Parses a channel's hex id as a device gives it in `Levels`: `"0"` or 32 hex digits
    /// (all zero meaning the system channel).
    ///
    /// # Errors
    /// [`ChannelIdError::Expected128BitsHex`] for anything else.
    pub fn from_hex(hex: &str) -> Result<Self, ChannelIdError> {
        if hex == SYSTEM_CHANNEL_HEX {
            return Ok(InternalChannelId::System);
        }
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ChannelIdError::Expected128BitsHex);
        }
        if hex.bytes().all(|b| b == b'0') {
            return Ok(InternalChannelId::System);
        }
        Ok(InternalChannelId::Broadcast(Arc::from(hex)))
    }

    /// The hex id of a broadcast channel as sent in BROADCAST's `ChanId` (`"0"` for the
    /// system channel); `None` for a unicast channel.
    pub fn to_hex(&self) -> Option<&str> {
        match self {
            InternalChannelId::System => Some(SYSTEM_CHANNEL_HEX),
            InternalChannelId::Broadcast(hex) => Some(hex),
            InternalChannelId::Unicast { .. } => None,
        }
    }

    /// Whether this is a broadcast channel (the system channel included).
    pub fn is_broadcast(&self) -> bool {
        !self.is_unicast()
    }

    /// Whether this is a unicast channel.
    pub fn is_unicast(&self) -> bool {
        matches!(self, InternalChannelId::Unicast { .. })
    }

    /// The user and device of a unicast channel.
    pub fn unicast_user_and_device(&self) -> Option<(&str, &str)> {
        match self {
            InternalChannelId::Unicast { user, device } => Some((user, device)),
            _ => None,
        }
    }
}

impl fmt::Display for InternalChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InternalChannelId::System => f.write_str("0"),
            InternalChannelId::Broadcast(hex) => write!(f, "B{hex}"),
            InternalChannelId::Unicast { user, device } => write!(f, "U{user}:{device}"),
        }
    }
}
