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
    /// The unicast channel of `user` on `device` (one shared string when they are the
    /// same, as for every channel a token names).
    pub fn unicast(user: &str, device: &str) -> Self {
        let user: Arc<str> = Arc::from(user);
        let device = if *device == *user {
            Arc::clone(&user)
        } else {
            Arc::from(device)
        };
        InternalChannelId::Unicast { user, device }
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

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789ABCDEF";

    #[test]
    fn zero_and_all_zero_hex_are_the_system_channel() {
        assert_eq!(
            InternalChannelId::from_hex("0"),
            Ok(InternalChannelId::System)
        );
        assert_eq!(
            InternalChannelId::from_hex(&"0".repeat(32)),
            Ok(InternalChannelId::System)
        );
    }

    #[test]
    fn thirty_two_hex_digits_are_a_broadcast_channel_kept_as_given() {
        let id = InternalChannelId::from_hex(HEX).expect("valid hex id");
        assert_eq!(id, InternalChannelId::Broadcast(Arc::from(HEX)));
        assert_eq!(id.to_hex(), Some(HEX));
        assert!(id.is_broadcast());
        assert!(!id.is_unicast());
    }

    #[test]
    fn malformed_hex_ids_are_refused() {
        for bad in [
            "",
            "00",
            "1",
            &"0".repeat(31),
            &"0".repeat(33),
            &"a".repeat(31),
            &"a".repeat(33),
            "0123456789abcdef0123456789abcdeg",
            "0123456789abcdef 123456789abcdef",
            "+123456789abcdef0123456789abcdef",
            // 32 bytes, but not 32 hex digits.
            "é123456789abcdef0123456789abcde",
        ] {
            assert_eq!(
                InternalChannelId::from_hex(bad),
                Err(ChannelIdError::Expected128BitsHex),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn to_hex_gives_zero_for_system_and_nothing_for_unicast() {
        assert_eq!(InternalChannelId::System.to_hex(), Some("0"));
        assert_eq!(InternalChannelId::unicast("u", "d").to_hex(), None);
    }

    #[test]
    fn display_is_the_original_servers_internal_id() {
        assert_eq!(InternalChannelId::System.to_string(), "0");
        assert_eq!(
            InternalChannelId::from_hex(HEX)
                .expect("valid hex id")
                .to_string(),
            format!("B{HEX}")
        );
        assert_eq!(
            InternalChannelId::unicast("user1", "dev1").to_string(),
            "Uuser1:dev1"
        );
    }

    #[test]
    fn unicast_channels_know_their_user_and_device() {
        let id = InternalChannelId::unicast("user1", "dev1");
        assert!(id.is_unicast());
        assert!(!id.is_broadcast());
        assert_eq!(id.unicast_user_and_device(), Some(("user1", "dev1")));
        assert_ne!(id, InternalChannelId::unicast("dev1", "user1"));
        assert_eq!(InternalChannelId::System.unicast_user_and_device(), None);
        assert!(InternalChannelId::System.is_broadcast());
        assert_eq!(
            InternalChannelId::from_hex(HEX)
                .expect("valid hex id")
                .unicast_user_and_device(),
            None
        );
    }
}
