//! The Ubuntu Push wire protocol, version 0: message types, the framing codec and the
//! splitting of large messages. Sans-IO: nothing here reads or writes a socket or knows
//! about brokers.

pub mod codec;
mod device_id;
pub mod messages;
pub mod split;

pub use codec::{
    DecodeError, EncodeError, MAX_FRAME_BODY, VersionError, WIRE_VERSION, decode_frame,
    decode_message, decode_version, encode_frame,
};
pub use device_id::DeviceId;
pub use messages::{
    BroadcastMsg, ConnAckMsg, ConnAckParams, ConnectMsg, Message, Notification, NotificationsMsg,
    Payload, SYSTEM_CHANNEL_HEX,
};
pub use split::{MAX_PAYLOAD_SIZE, split_notifications, split_payloads};
