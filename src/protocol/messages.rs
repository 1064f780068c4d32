//! The messages of wire format version 0, as typed values whose JSON is byte for byte what
//! deployed devices send and expect.
//!
//! Field names are the original server's Go struct field names (`DeviceId`, `TopLevel`, …)
//! and fields are written in the same order, so an encoded message is the same bytes the
//! original server wrote. Unknown fields are ignored on decoding; a missing or `null` string
//! field decodes as empty, as it did for the original server.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::Deserializer;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

/// The hex id of the system channel in `ChanId` and `Levels` keys.
pub const SYSTEM_CHANNEL_HEX: &str = "0";

/// A notification payload: one JSON value exactly as the application sent it.
///
/// The bytes are kept as received (never re-ordered or re-encoded) and shared, so cloning a
/// payload for many sessions costs a reference count.
#[derive(Clone)]
pub struct Payload(Arc<RawValue>);

impl Payload {
    /// Checks that `json` is one JSON value and keeps it as received (surrounding
    /// whitespace trimmed).
    ///
    /// # Errors
    /// When `json` is not exactly one JSON value.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        // Only JSON's own whitespace may surround the value (`str::trim` would also accept
        // Unicode spaces such as U+00A0, which make the text invalid JSON).
        let raw = RawValue::from_string(json.trim_matches([' ', '\t', '\n', '\r']).to_owned())?;
        Ok(Self(Arc::from(raw)))
    }

    /// Keeps an already validated raw JSON value.
    pub fn from_raw(raw: Box<RawValue>) -> Self {
        Self(Arc::from(raw))
    }

    /// The JSON text of the payload.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The payload's size in bytes, as sent on the wire.
    pub fn len(&self) -> usize {
        self.0.get().len()
    }

    /// Whether the payload is empty (never true for a valid payload).
    pub fn is_empty(&self) -> bool {
        self.0.get().is_empty()
    }

    /// The `null` payload: what the original server wrote for a notification without one.
    pub fn null() -> Self {
        // `null` is valid JSON: this cannot fail.
        Self::from_json("null").unwrap_or_else(|_| unreachable!("null is valid JSON"))
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for Payload {}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({})", self.get())
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(Self::from_raw)
    }
}

/// One unicast notification as carried in NOTIFICATIONS (`{"A":…,"M":…,"P":…}`).
///
/// Broadcast notifications use the same type with empty app and message ids, as the
/// original server did. All fields are shared, so clones are cheap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// The application id (`A`).
    #[serde(rename = "A", default, deserialize_with = "null_as_default")]
    pub app_id: Arc<str>,
    /// The message id (`M`), unique within the unicast channel.
    #[serde(rename = "M", default, deserialize_with = "null_as_default")]
    pub msg_id: Arc<str>,
    /// The payload (`P`), raw JSON.
    #[serde(rename = "P")]
    pub payload: Payload,
}

impl Notification {
    /// A broadcast notification: just a payload.
    pub fn broadcast(payload: Payload) -> Self {
        Self {
            app_id: Arc::from(""),
            msg_id: Arc::from(""),
            payload,
        }
    }

    /// A unicast notification of `app_id` with message id `msg_id`.
    pub fn unicast(app_id: &str, msg_id: &str, payload: Payload) -> Self {
        Self {
            app_id: Arc::from(app_id),
            msg_id: Arc::from(msg_id),
            payload,
        }
    }
}

/// Decodes `null` (and, with `#[serde(default)]`, absence) as the type's default, as Go's
/// `encoding/json` leaves a field untouched on `null`.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// CONNECT, device → server: who the device is and what it has seen.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConnectMsg {
    /// `ClientVer`: the client's version string.
    pub client_ver: String,
    /// `DeviceId`: the device's identity, the registry key.
    pub device_id: String,
    /// `Authorization`: opaque credentials.
    pub authorization: String,
    /// `Cookie`: opaque value the server set earlier with SETPARAMS.
    pub cookie: String,
    /// `Info`: free-form device details (`device` = model, `channel` = image channel, …);
    /// `None` when absent, empty or `null`.
    pub info: Option<serde_json::Map<String, serde_json::Value>>,
    /// `Levels`: channel hex id → the last level the device saw; `None` encodes as `null`.
    pub levels: Option<BTreeMap<String, i64>>,
}

impl Serialize for ConnectMsg {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let info = self.info.as_ref().filter(|m| !m.is_empty());
        let mut s = serializer.serialize_struct("ConnectMsg", 6 + usize::from(info.is_some()))?;
        s.serialize_field("T", "connect")?;
        s.serialize_field("ClientVer", &self.client_ver)?;
        s.serialize_field("DeviceId", &self.device_id)?;
        s.serialize_field("Authorization", &self.authorization)?;
        s.serialize_field("Cookie", &self.cookie)?;
        if let Some(info) = info {
            s.serialize_field("Info", info)?;
        }
        s.serialize_field("Levels", &self.levels)?;
        s.end()
    }
}

impl<'de> Deserialize<'de> for ConnectMsg {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(rename = "ClientVer", default, deserialize_with = "null_as_default")]
            client_ver: String,
            #[serde(rename = "DeviceId", default, deserialize_with = "null_as_default")]
            device_id: String,
            #[serde(
                rename = "Authorization",
                default,
                deserialize_with = "null_as_default"
            )]
            authorization: String,
            #[serde(rename = "Cookie", default, deserialize_with = "null_as_default")]
            cookie: String,
            #[serde(rename = "Info", default)]
            info: Option<serde_json::Map<String, serde_json::Value>>,
            #[serde(rename = "Levels", default)]
            levels: Option<BTreeMap<String, i64>>,
        }
        let w = Wire::deserialize(deserializer)?;
        Ok(Self {
            client_ver: w.client_ver,
            device_id: w.device_id,
            authorization: w.authorization,
            cookie: w.cookie,
            info: w.info.filter(|m| !m.is_empty()),
            levels: w.levels,
        })
    }
}

/// The `Params` of CONNACK.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnAckParams {
    /// `PingInterval`: a Go duration string such as `"10s"`.
    #[serde(rename = "PingInterval", default, deserialize_with = "null_as_default")]
    pub ping_interval: String,
}

/// CONNACK, server → device: `{"T":"connack","Params":{"PingInterval":"10s"}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnAckMsg {
    /// `Params`: the connection parameters.
    pub params: ConnAckParams,
}

/// BROADCAST, server → device: notifications of a broadcast channel up to `TopLevel`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BroadcastMsg<'a> {
    /// `AppId`, written only when not empty.
    pub app_id: Cow<'a, str>,
    /// `ChanId`: the channel's hex id (`"0"` for the system channel).
    pub chan_id: Cow<'a, str>,
    /// `TopLevel`: the channel level this message brings the device to.
    pub top_level: i64,
    /// `Payloads`: `None` is written as `null` (nothing live at all), `Some([])` as `[]`.
    pub payloads: Option<Cow<'a, [Payload]>>,
}

/// NOTIFICATIONS, server → device: unicast notifications to be ACKed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotificationsMsg<'a> {
    /// `Notifications`.
    pub notifications: Cow<'a, [Notification]>,
}

/// CONNBROKEN reason: the device connected to the wrong host.
pub const BROKEN_HOST_MISMATCH: &str = "host-mismatch";
/// CONNWARN reason: the device's credentials were refused; the session goes on.
pub const WARN_UNAUTHORIZED: &str = "unauthorized";

/// Every message, by its `T`.
///
/// Encoding writes the fields in the original server's order; decoding takes what
/// [`Message::decode`] finds. Payload-carrying variants borrow, so a message can be encoded
/// from a channel snapshot without copying it.
#[derive(Clone, Debug, PartialEq)]
pub enum Message<'a> {
    /// `connect`, device → server.
    Connect(Box<ConnectMsg>),
    /// `connack`, server → device.
    ConnAck(ConnAckMsg),
    /// `ping`, server → device: exactly `{"T":"ping"}`.
    Ping,
    /// `pong`, device → server.
    Pong,
    /// `broadcast`, server → device.
    Broadcast(BroadcastMsg<'a>),
    /// `notifications`, server → device.
    Notifications(NotificationsMsg<'a>),
    /// `ack`, device → server.
    Ack,
    /// `connbroken`, server → device; the server closes after it.
    ConnBroken {
        /// `Reason`, e.g. [`BROKEN_HOST_MISMATCH`].
        reason: Cow<'a, str>,
    },
    /// `connwarn`, server → device; the session goes on.
    ConnWarn {
        /// `Reason`, e.g. [`WARN_UNAUTHORIZED`].
        reason: Cow<'a, str>,
    },
    /// `setparams`, server → device; the session goes on.
    SetParams {
        /// `SetCookie`: the cookie the device sends back in its next CONNECT.
        set_cookie: Cow<'a, str>,
    },
    /// A message whose `T` is none of the above (kept so the caller can say what came).
    Unknown {
        /// The `T` that came.
        t: String,
    },
}

impl Message<'_> {
    /// The message's `T`.
    pub fn type_name(&self) -> &str {
        match self {
            Message::Connect(_) => "connect",
            Message::ConnAck(_) => "connack",
            Message::Ping => "ping",
            Message::Pong => "pong",
            Message::Broadcast(_) => "broadcast",
            Message::Notifications(_) => "notifications",
            Message::Ack => "ack",
            Message::ConnBroken { .. } => "connbroken",
            Message::ConnWarn { .. } => "connwarn",
            Message::SetParams { .. } => "setparams",
            Message::Unknown { t } => t,
        }
    }

    /// Decodes one message from the JSON body of a frame.
    ///
    /// # Errors
    /// When `json` is not a JSON object, has no string `T`, or a field of the named type has
    /// the wrong shape. An unknown `T` is not an error: it decodes as [`Message::Unknown`].
    pub fn decode(json: &[u8]) -> Result<Message<'static>, serde_json::Error> {
        #[derive(Deserialize)]
        struct Tag<'a> {
            #[serde(rename = "T", borrow)]
            t: Cow<'a, str>,
        }
        #[derive(Deserialize)]
        struct BroadcastWire {
            #[serde(rename = "AppId", default, deserialize_with = "null_as_default")]
            app_id: String,
            #[serde(rename = "ChanId", default, deserialize_with = "null_as_default")]
            chan_id: String,
            #[serde(rename = "TopLevel", default)]
            top_level: i64,
            #[serde(rename = "Payloads", default)]
            payloads: Option<Vec<Payload>>,
        }
        #[derive(Deserialize)]
        struct NotificationsWire {
            #[serde(
                rename = "Notifications",
                default,
                deserialize_with = "null_as_default"
            )]
            notifications: Vec<Notification>,
        }
        #[derive(Deserialize)]
        struct ConnAckWire {
            #[serde(rename = "Params")]
            params: ConnAckParams,
        }
        #[derive(Deserialize)]
        struct ReasonWire {
            #[serde(rename = "Reason", default, deserialize_with = "null_as_default")]
            reason: String,
        }
        #[derive(Deserialize)]
        struct SetParamsWire {
            #[serde(rename = "SetCookie", default, deserialize_with = "null_as_default")]
            set_cookie: String,
        }

        // What a device sends after every delivery and every PING, in the one form clients
        // write it: no JSON parse needed (any other form is parsed below).
        match json {
            br#"{"T":"ack"}"# => return Ok(Message::Ack),
            br#"{"T":"pong"}"# => return Ok(Message::Pong),
            _ => {}
        }
        let tag: Tag<'_> = serde_json::from_slice(json)?;
        Ok(match &*tag.t {
            "connect" => Message::Connect(Box::new(serde_json::from_slice(json)?)),
            "connack" => {
                let w: ConnAckWire = serde_json::from_slice(json)?;
                Message::ConnAck(ConnAckMsg { params: w.params })
            }
            "ping" => Message::Ping,
            "pong" => Message::Pong,
            "ack" => Message::Ack,
            "broadcast" => {
                let w: BroadcastWire = serde_json::from_slice(json)?;
                Message::Broadcast(BroadcastMsg {
                    app_id: Cow::Owned(w.app_id),
                    chan_id: Cow::Owned(w.chan_id),
                    top_level: w.top_level,
                    payloads: w.payloads.map(Cow::Owned),
                })
            }
            "notifications" => {
                let w: NotificationsWire = serde_json::from_slice(json)?;
                Message::Notifications(NotificationsMsg {
                    notifications: Cow::Owned(w.notifications),
                })
            }
            "connbroken" => {
                let w: ReasonWire = serde_json::from_slice(json)?;
                Message::ConnBroken {
                    reason: Cow::Owned(w.reason),
                }
            }
            "connwarn" => {
                let w: ReasonWire = serde_json::from_slice(json)?;
                Message::ConnWarn {
                    reason: Cow::Owned(w.reason),
                }
            }
            "setparams" => {
                let w: SetParamsWire = serde_json::from_slice(json)?;
                Message::SetParams {
                    set_cookie: Cow::Owned(w.set_cookie),
                }
            }
            other => Message::Unknown {
                t: other.to_owned(),
            },
        })
    }
}

impl Serialize for Message<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Message::Connect(c) => c.serialize(serializer),
            Message::ConnAck(c) => {
                let mut s = serializer.serialize_struct("ConnAckMsg", 2)?;
                s.serialize_field("T", "connack")?;
                s.serialize_field("Params", &c.params)?;
                s.end()
            }
            Message::Ping | Message::Pong | Message::Ack => {
                let mut s = serializer.serialize_struct("PingPongMsg", 1)?;
                s.serialize_field("T", self.type_name())?;
                s.end()
            }
            Message::Broadcast(b) => {
                let with_app = !b.app_id.is_empty();
                let mut s =
                    serializer.serialize_struct("BroadcastMsg", 4 + usize::from(with_app))?;
                s.serialize_field("T", "broadcast")?;
                if with_app {
                    s.serialize_field("AppId", &b.app_id)?;
                }
                s.serialize_field("ChanId", &b.chan_id)?;
                s.serialize_field("TopLevel", &b.top_level)?;
                s.serialize_field("Payloads", &b.payloads)?;
                s.end()
            }
            Message::Notifications(n) => {
                let mut s = serializer.serialize_struct("NotificationsMsg", 2)?;
                s.serialize_field("T", "notifications")?;
                s.serialize_field("Notifications", &n.notifications)?;
                s.end()
            }
            Message::ConnBroken { reason } | Message::ConnWarn { reason } => {
                let mut s = serializer.serialize_struct("ConnMetaMsg", 2)?;
                s.serialize_field("T", self.type_name())?;
                s.serialize_field("Reason", reason)?;
                s.end()
            }
            Message::SetParams { set_cookie } => {
                let mut s = serializer.serialize_struct("SetParamsMsg", 2)?;
                s.serialize_field("T", "setparams")?;
                s.serialize_field("SetCookie", set_cookie)?;
                s.end()
            }
            Message::Unknown { t } => {
                let mut s = serializer.serialize_struct("Unknown", 1)?;
                s.serialize_field("T", t)?;
                s.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::collections::BTreeMap;

    use super::*;
    use crate::protocol::codec::encode_frame;

    fn json(msg: &Message<'_>) -> String {
        serde_json::to_string(msg).expect("messages always serialize")
    }

    fn payload(text: &str) -> Payload {
        Payload::from_json(text).expect("test payloads are valid JSON")
    }

    fn decode(text: &str) -> Message<'static> {
        Message::decode(text.as_bytes()).expect("test message decodes")
    }

    fn connect(text: &str) -> ConnectMsg {
        match decode(text) {
            Message::Connect(c) => *c,
            other => panic!("expected CONNECT, got {other:?}"),
        }
    }

    #[test]
    fn connack_is_exact_and_fits_a_small_frame() {
        let msg = Message::ConnAck(ConnAckMsg {
            params: ConnAckParams {
                ping_interval: "10s".to_owned(),
            },
        });
        assert_eq!(
            json(&msg),
            r#"{"T":"connack","Params":{"PingInterval":"10s"}}"#
        );
        let mut buf = Vec::new();
        let range = encode_frame(&mut buf, &msg).expect("connack encodes");
        assert!(range.len() < 53, "CONNACK frame is {} bytes", range.len());
        assert_eq!(decode(&json(&msg)), msg);
    }

    #[test]
    fn ping_pong_ack_are_bare_types() {
        assert_eq!(json(&Message::Ping), r#"{"T":"ping"}"#);
        assert_eq!(json(&Message::Pong), r#"{"T":"pong"}"#);
        assert_eq!(json(&Message::Ack), r#"{"T":"ack"}"#);
    }

    #[test]
    fn acks_and_pongs_decode_alike_in_any_spelling() {
        // The exact forms take a shortcut; others go through the parser to the same answer.
        for (text, want) in [
            (r#"{"T":"ack"}"#, Message::Ack),
            (r#"{ "T": "ack" }"#, Message::Ack),
            (r#"{"T":"ack","Extra":1}"#, Message::Ack),
            (r#"{"T":"pong"}"#, Message::Pong),
            ("{\"T\":\"pong\"}\n", Message::Pong),
        ] {
            assert_eq!(Message::decode(text.as_bytes()).ok(), Some(want), "{text}");
        }
        for bad in [r#"{"T":"ack"}}"#, r#"{"T":"ack""#, r#"{"T":"ACK"}"#] {
            assert!(
                !matches!(Message::decode(bad.as_bytes()), Ok(Message::Ack)),
                "{bad} taken for an ACK"
            );
        }
    }

    #[test]
    fn broadcast_without_payloads_is_null() {
        let msg = Message::Broadcast(BroadcastMsg {
            app_id: Cow::Borrowed(""),
            chan_id: Cow::Borrowed(SYSTEM_CHANNEL_HEX),
            top_level: 5,
            payloads: None,
        });
        assert_eq!(
            json(&msg),
            r#"{"T":"broadcast","ChanId":"0","TopLevel":5,"Payloads":null}"#
        );
    }

    #[test]
    fn broadcast_with_filtered_out_payloads_is_empty_array() {
        let msg = Message::Broadcast(BroadcastMsg {
            app_id: Cow::Borrowed(""),
            chan_id: Cow::Borrowed("0"),
            top_level: 5,
            payloads: Some(Cow::Owned(Vec::new())),
        });
        assert_eq!(
            json(&msg),
            r#"{"T":"broadcast","ChanId":"0","TopLevel":5,"Payloads":[]}"#
        );
    }

    #[test]
    fn broadcast_app_id_only_when_not_empty() {
        let payloads = [payload(r#"{"a":1}"#)];
        let with_app = Message::Broadcast(BroadcastMsg {
            app_id: Cow::Borrowed("x"),
            chan_id: Cow::Borrowed("0"),
            top_level: 3,
            payloads: Some(Cow::Borrowed(&payloads)),
        });
        assert_eq!(
            json(&with_app),
            r#"{"T":"broadcast","AppId":"x","ChanId":"0","TopLevel":3,"Payloads":[{"a":1}]}"#
        );
        let without_app = Message::Broadcast(BroadcastMsg {
            app_id: Cow::Borrowed(""),
            chan_id: Cow::Borrowed("0"),
            top_level: 3,
            payloads: Some(Cow::Borrowed(&payloads)),
        });
        assert_eq!(
            json(&without_app),
            r#"{"T":"broadcast","ChanId":"0","TopLevel":3,"Payloads":[{"a":1}]}"#
        );
    }

    #[test]
    fn payload_bytes_are_kept_as_received() {
        let p = payload(" \n\t{\"b\":1, \"a\":[1,2]}\r\n ");
        assert_eq!(p.get(), r#"{"b":1, "a":[1,2]}"#);
        assert_eq!(p.len(), r#"{"b":1, "a":[1,2]}"#.len());
        assert!(!p.is_empty());
        let payloads = [p, payload("\"caf\\u00e9\""), payload("1.50")];
        let msg = Message::Broadcast(BroadcastMsg {
            app_id: Cow::Borrowed(""),
            chan_id: Cow::Borrowed("0"),
            top_level: 1,
            payloads: Some(Cow::Borrowed(&payloads)),
        });
        let text = json(&msg);
        assert_eq!(
            text,
            r#"{"T":"broadcast","ChanId":"0","TopLevel":1,"Payloads":[{"b":1, "a":[1,2]},"caf\u00e9",1.50]}"#
        );
        // Decoding keeps the bytes too.
        assert_eq!(decode(&text), msg);
    }

    #[test]
    fn payload_must_be_one_json_value() {
        for bad in ["", "  ", "{", "1 2", "{\"a\":1}x", "nul", "'a'"] {
            assert!(Payload::from_json(bad).is_err(), "{bad:?} accepted");
        }
        // Only JSON whitespace may surround the value: other Unicode spaces are not JSON.
        for bad in ["\u{a0}1", "1\u{a0}", "\u{2028}{}", "\u{feff}null"] {
            assert!(Payload::from_json(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Payload::null().get(), "null");
    }

    #[test]
    fn connect_encodes_null_levels_and_omits_empty_info() {
        let mut msg = ConnectMsg {
            device_id: "dev".to_owned(),
            ..ConnectMsg::default()
        };
        let expected = r#"{"T":"connect","ClientVer":"","DeviceId":"dev","Authorization":"","Cookie":"","Levels":null}"#;
        assert_eq!(json(&Message::Connect(Box::new(msg.clone()))), expected);
        msg.info = Some(serde_json::Map::new());
        assert_eq!(json(&Message::Connect(Box::new(msg.clone()))), expected);
    }

    #[test]
    fn connect_encodes_info_and_levels_in_go_order() {
        let mut info = serde_json::Map::new();
        info.insert("device".to_owned(), "mako".into());
        let msg = ConnectMsg {
            client_ver: "1".to_owned(),
            device_id: "dev".to_owned(),
            authorization: "auth".to_owned(),
            cookie: "c".to_owned(),
            info: Some(info),
            levels: Some(BTreeMap::from([("0".to_owned(), 5), ("ab".to_owned(), -1)])),
        };
        let text = json(&Message::Connect(Box::new(msg.clone())));
        assert_eq!(
            text,
            r#"{"T":"connect","ClientVer":"1","DeviceId":"dev","Authorization":"auth","Cookie":"c","Info":{"device":"mako"},"Levels":{"0":5,"ab":-1}}"#
        );
        assert_eq!(connect(&text), msg);
    }

    #[test]
    fn notifications_shape() {
        let notifs = [Notification::unicast("app", "m1", payload(r#"{"x":1}"#))];
        let msg = Message::Notifications(NotificationsMsg {
            notifications: Cow::Borrowed(&notifs),
        });
        let text = json(&msg);
        assert_eq!(
            text,
            r#"{"T":"notifications","Notifications":[{"A":"app","M":"m1","P":{"x":1}}]}"#
        );
        assert_eq!(decode(&text), msg);
        let b = Notification::broadcast(payload("2"));
        assert_eq!(
            serde_json::to_string(&b).expect("serializes"),
            r#"{"A":"","M":"","P":2}"#
        );
    }

    #[test]
    fn one_way_message_shapes() {
        let broken = Message::ConnBroken {
            reason: Cow::Borrowed(BROKEN_HOST_MISMATCH),
        };
        assert_eq!(
            json(&broken),
            r#"{"T":"connbroken","Reason":"host-mismatch"}"#
        );
        let warn = Message::ConnWarn {
            reason: Cow::Borrowed(WARN_UNAUTHORIZED),
        };
        assert_eq!(json(&warn), r#"{"T":"connwarn","Reason":"unauthorized"}"#);
        let set = Message::SetParams {
            set_cookie: Cow::Borrowed("c"),
        };
        assert_eq!(json(&set), r#"{"T":"setparams","SetCookie":"c"}"#);
        for msg in [broken, warn, set] {
            assert_eq!(decode(&json(&msg)), msg);
        }
    }

    #[test]
    fn decode_connect_ignores_unknown_fields_and_defaults_nulls() {
        let c = connect(
            r#"{"T":"connect","Extra":{"deep":[1,2]},"ClientVer":null,"DeviceId":"dev","Cookie":null,"Levels":{"0":7},"More":1}"#,
        );
        assert_eq!(
            c,
            ConnectMsg {
                device_id: "dev".to_owned(),
                levels: Some(BTreeMap::from([("0".to_owned(), 7)])),
                ..ConnectMsg::default()
            }
        );
    }

    #[test]
    fn decode_connect_with_missing_fields() {
        assert_eq!(connect(r#"{"T":"connect"}"#), ConnectMsg::default());
        let c = connect(r#"{"T":"connect","DeviceId":"d","Levels":null,"Info":null}"#);
        assert_eq!(c.device_id, "d");
        assert_eq!(c.levels, None);
        assert_eq!(c.info, None);
        // An empty Info is the same as none.
        assert_eq!(connect(r#"{"T":"connect","Info":{}}"#).info, None);
    }

    #[test]
    fn decode_connect_info() {
        let c = connect(
            r#"{"T":"connect","DeviceId":"d","Info":{"device":"mako","channel":"daily","build_number":102}}"#,
        );
        let info = c.info.expect("info present");
        assert_eq!(info.get("device").and_then(|v| v.as_str()), Some("mako"));
        assert_eq!(info.get("channel").and_then(|v| v.as_str()), Some("daily"));
        assert_eq!(info.get("build_number").and_then(|v| v.as_i64()), Some(102));
    }

    #[test]
    fn decode_connect_rejects_non_integer_levels() {
        for bad in [
            r#"{"T":"connect","Levels":{"0":"5"}}"#,
            r#"{"T":"connect","Levels":{"0":1.5}}"#,
            r#"{"T":"connect","Levels":{"0":true}}"#,
            r#"{"T":"connect","Levels":{"0":18446744073709551615}}"#,
            r#"{"T":"connect","Levels":[1]}"#,
            r#"{"T":"connect","Levels":"0"}"#,
        ] {
            assert!(Message::decode(bad.as_bytes()).is_err(), "{bad} accepted");
        }
        let c = connect(r#"{"T":"connect","Levels":{"0":-9223372036854775808}}"#);
        assert_eq!(c.levels, Some(BTreeMap::from([("0".to_owned(), i64::MIN)])));
    }

    #[test]
    fn decode_simple_types() {
        assert_eq!(decode(r#"{"T":"ack"}"#), Message::Ack);
        assert_eq!(decode(r#"{"T":"pong","x":1}"#), Message::Pong);
        assert_eq!(decode(r#" {"x":[{}],"T":"ping"} "#), Message::Ping);
        assert_eq!(
            decode(r#"{"T":"connack","Params":{"PingInterval":"500ms"}}"#),
            Message::ConnAck(ConnAckMsg {
                params: ConnAckParams {
                    ping_interval: "500ms".to_owned()
                }
            })
        );
    }

    #[test]
    fn decode_unknown_type() {
        let msg = decode(r#"{"T":"levels","Levels":{}}"#);
        assert_eq!(
            msg,
            Message::Unknown {
                t: "levels".to_owned()
            }
        );
        assert_eq!(msg.type_name(), "levels");
        // `T` is matched exactly.
        assert_eq!(
            decode(r#"{"T":"ACK"}"#),
            Message::Unknown {
                t: "ACK".to_owned()
            }
        );
        // An escaped `T` is the string it stands for.
        assert_eq!(decode(r#"{"T":"\u0061ck"}"#), Message::Ack);
    }

    #[test]
    fn decode_rejects_non_messages() {
        for bad in [
            "",
            "{}",
            r#"{"t":"ack"}"#,
            r#"{"T":null}"#,
            r#"{"T":1}"#,
            r#"["T","ack"]"#,
            r#""ack""#,
            "null",
            "42",
            r#"{"T":"ack""#,
            r#"{"T":"ack"} {}"#,
            r#"{"T":"connect","DeviceId":5}"#,
            r#"{"T":"connect","Info":"x"}"#,
            r#"{"T":"connack"}"#,
        ] {
            assert!(Message::decode(bad.as_bytes()).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn type_names_match_encoded_t() {
        let msgs = [
            Message::Connect(Box::default()),
            Message::ConnAck(ConnAckMsg {
                params: ConnAckParams {
                    ping_interval: "1s".to_owned(),
                },
            }),
            Message::Ping,
            Message::Pong,
            Message::Broadcast(BroadcastMsg {
                app_id: Cow::Borrowed(""),
                chan_id: Cow::Borrowed("0"),
                top_level: 0,
                payloads: None,
            }),
            Message::Notifications(NotificationsMsg {
                notifications: Cow::Owned(Vec::new()),
            }),
            Message::Ack,
            Message::ConnBroken {
                reason: Cow::Borrowed("r"),
            },
            Message::ConnWarn {
                reason: Cow::Borrowed("r"),
            },
            Message::SetParams {
                set_cookie: Cow::Borrowed("c"),
            },
        ];
        for msg in msgs {
            let value: serde_json::Value = serde_json::from_str(&json(&msg)).expect("valid JSON");
            assert_eq!(value["T"], msg.type_name());
            assert_eq!(decode(&json(&msg)).type_name(), msg.type_name());
        }
    }
}
