//! The JSON bodies of the `POST` endpoints, decoded the way the original server's Go
//! `encoding/json` decoded them, so application servers written against it keep working:
//!
//! - the body must be one JSON object (anything else, or trailing text, is malformed);
//! - member names match fields ignoring ASCII case (Go also folds a few non-ASCII
//!   letters, such as `ſ` and `K`, which nobody sends);
//! - members are assigned in order, so when a name repeats the last one wins; unknown
//!   members are ignored;
//! - `null` leaves a string or boolean field as it was (at first its zero value, `""` or
//!   `false`), while a value of another type makes the whole body malformed;
//! - `data` is kept as the raw JSON text received, `null` included (`"data": null` is
//!   present; only a missing `data` is missing).

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use smallvec::SmallVec;

use crate::protocol::Payload;

/// The body is not a JSON object, or a field has the wrong type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// A JSON object's members as received, in order: names decoded (borrowed from the body
/// unless they hold an escape), values raw. Room for the members of a usual body inline:
/// a request's parse allocates nothing for them.
struct Members<'a>(SmallVec<[(Name<'a>, &'a RawValue); 10]>);

/// A member name: the body's own text when it has no escape, else decoded.
struct Name<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Name<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor<'a>(std::marker::PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for NameVisitor<'a> {
            type Value = Name<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }

        deserializer.deserialize_str(NameVisitor(std::marker::PhantomData))
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Members<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<'a>(std::marker::PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for ObjectVisitor<'a> {
            type Value = Members<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = SmallVec::new();
                while let Some((name, value)) = map.next_entry::<Name<'a>, &'de RawValue>()? {
                    members.push((name, value));
                }
                Ok(Members(members))
            }
        }

        deserializer.deserialize_map(ObjectVisitor(std::marker::PhantomData))
    }
}

impl<'a> Members<'a> {
    fn parse(body: &'a [u8]) -> Result<Self, Malformed> {
        serde_json::from_slice(body).map_err(|_| Malformed)
    }

    /// The values of the members whose name is `field` ignoring ASCII case, in order.
    fn all(&self, field: &'a str) -> impl Iterator<Item = &'a RawValue> + '_ {
        self.0
            .iter()
            .filter(move |(name, _)| name.0.eq_ignore_ascii_case(field))
            .map(|&(_, value)| value)
    }

    /// A string field: `""` when absent. Members are assigned in order, as Go does: a
    /// `null` leaves the value as it was, a later string overwrites it. Borrowed from
    /// the body unless the string holds an escape.
    fn string(&self, field: &'a str) -> Result<Cow<'a, str>, Malformed> {
        let mut value = Cow::Borrowed("");
        for raw in self.all(field) {
            let text = raw.get();
            if text != "null" {
                value = json_string(text)?;
            }
        }
        Ok(value)
    }

    /// A boolean field: `false` when absent; assigned in order like a string.
    fn boolean(&self, field: &'a str) -> Result<bool, Malformed> {
        let mut value = false;
        for raw in self.all(field) {
            match raw.get() {
                "null" => {}
                "true" => value = true,
                "false" => value = false,
                _ => return Err(Malformed),
            }
        }
        Ok(value)
    }

    /// A raw JSON field, exactly as received (`null` included).
    fn raw(&self, field: &'a str) -> Option<Payload> {
        self.all(field)
            .last()
            .map(|raw| Payload::from_raw(raw.to_owned()))
    }
}

/// The string a raw JSON value (valid JSON, as parsed) holds: its text between the
/// quotes when it has no escape, else decoded; anything but a string is malformed.
fn json_string(text: &str) -> Result<Cow<'_, str>, Malformed> {
    match text
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
    {
        // Valid JSON: a string without a backslash is its own text.
        Some(inner) if !inner.contains('\\') => Ok(Cow::Borrowed(inner)),
        Some(_) => serde_json::from_str::<String>(text)
            .map(Cow::Owned)
            .map_err(|_| Malformed),
        None => Err(Malformed),
    }
}

/// A `/broadcast` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Broadcast<'a> {
    /// The channel's name (`system`).
    pub(crate) channel: Cow<'a, str>,
    /// RFC 3339, checked later.
    pub(crate) expire_on: Cow<'a, str>,
    /// The payload as received; `None` when absent.
    pub(crate) data: Option<Payload>,
}

impl<'a> Broadcast<'a> {
    pub(crate) fn parse(body: &'a [u8]) -> Result<Self, Malformed> {
        let m = Members::parse(body)?;
        Ok(Self {
            channel: m.string("channel")?,
            expire_on: m.string("expire_on")?,
            data: m.raw("data"),
        })
    }
}

/// A `/notify` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unicast<'a> {
    /// The token `/register` returned, or `""`.
    pub(crate) token: Cow<'a, str>,
    /// With `device_id`, the channel when there is no token (not in the official API).
    pub(crate) user_id: Cow<'a, str>,
    /// With `user_id`, the channel when there is no token (not in the official API).
    pub(crate) device_id: Cow<'a, str>,
    /// The sending application.
    pub(crate) app_id: Cow<'a, str>,
    /// RFC 3339, checked later.
    pub(crate) expire_on: Cow<'a, str>,
    /// The payload as received; `None` when absent.
    pub(crate) data: Option<Payload>,
    /// First remove every pending notification of the app for the device.
    pub(crate) clear_pending: bool,
    /// `""` means none.
    pub(crate) replace_tag: Cow<'a, str>,
}

impl<'a> Unicast<'a> {
    pub(crate) fn parse(body: &'a [u8]) -> Result<Self, Malformed> {
        let m = Members::parse(body)?;
        Ok(Self {
            token: m.string("token")?,
            user_id: m.string("userid")?,
            device_id: m.string("deviceid")?,
            app_id: m.string("appid")?,
            expire_on: m.string("expire_on")?,
            data: m.raw("data"),
            clear_pending: m.boolean("clear_pending")?,
            replace_tag: m.string("replace_tag")?,
        })
    }
}

/// A `/register` or `/unregister` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Registration<'a> {
    /// The device.
    pub(crate) device_id: Cow<'a, str>,
    /// The application.
    pub(crate) app_id: Cow<'a, str>,
}

impl<'a> Registration<'a> {
    pub(crate) fn parse(body: &'a [u8]) -> Result<Self, Malformed> {
        let m = Members::parse(body)?;
        Ok(Self {
            device_id: m.string("deviceid")?,
            app_id: m.string("appid")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unicast(json: &str) -> Result<Unicast<'_>, Malformed> {
        Unicast::parse(json.as_bytes())
    }

    #[test]
    fn fields_decode_and_data_stays_as_received() {
        let u = unicast(
            r#"{"token":"dG9r","appid":"app","userid":"u","deviceid":"d",
                "expire_on":"2030-01-01T00:00:00Z","data": {"b": [1,  2],"a":"\u00e9"},
                "clear_pending":true,"replace_tag":"t","extra":[1]}"#,
        )
        .expect("well formed");
        assert_eq!(u.token, "dG9r");
        assert_eq!(u.app_id, "app");
        assert_eq!((&*u.user_id, &*u.device_id), ("u", "d"));
        assert_eq!(u.expire_on, "2030-01-01T00:00:00Z");
        assert_eq!(
            u.data.as_ref().map(Payload::get),
            Some(r#"{"b": [1,  2],"a":"\u00e9"}"#)
        );
        assert!(u.clear_pending);
        assert_eq!(u.replace_tag, "t");
    }

    #[test]
    fn absent_and_null_fields_take_their_zero_values_but_null_data_is_present() {
        let u = unicast(r#"{"appid":null,"clear_pending":null,"data":null}"#).expect("ok");
        assert_eq!(u.app_id, "");
        assert!(!u.clear_pending);
        assert_eq!(u.data.as_ref().map(Payload::get), Some("null"));
        let u = unicast("{}").expect("ok");
        assert_eq!(u.data, None);
        assert_eq!(u.token, "");
    }

    #[test]
    fn anything_but_an_object_or_a_field_of_the_wrong_type_is_malformed() {
        for body in [
            "",
            "null",
            "[]",
            "[{}]",
            "\"x\"",
            "1",
            "{",
            "{}x",
            "{} {}",
            r#"{"appid":1}"#,
            r#"{"appid":["a"]}"#,
            r#"{"token":{}}"#,
            r#"{"clear_pending":"true"}"#,
            r#"{"clear_pending":1}"#,
            r#"{"replace_tag":false}"#,
        ] {
            assert_eq!(unicast(body), Err(Malformed), "{body:?}");
        }
        assert_eq!(Broadcast::parse(br#"{"channel":5}"#), Err(Malformed));
        assert_eq!(Registration::parse(br#"{"deviceid":true}"#), Err(Malformed));
        assert_eq!(Registration::parse(b"\xff"), Err(Malformed));
    }

    #[test]
    fn names_match_ignoring_ascii_case_and_the_last_match_wins() {
        let r = Registration::parse(br#"{"DeviceId":"x","appid":"a1","AppID":"a2"}"#).expect("ok");
        assert_eq!(r.device_id, "x");
        assert_eq!(r.app_id, "a2", "a later member overwrites, exact or not");
        let r = Registration::parse(br#"{"deviceid":"x","deviceid":"y","APPID":"a"}"#).expect("ok");
        assert_eq!(r.device_id, "y");
        assert_eq!(r.app_id, "a");
        let b = Broadcast::parse(br#"{"data":1,"Data":2,"data":3}"#).expect("ok");
        assert_eq!(b.data.as_ref().map(Payload::get), Some("3"));
        // A later null leaves a string as it was, but is a value for `data`.
        let b = Broadcast::parse(br#"{"channel":"system","channel":null,"data":1,"data":null}"#)
            .expect("ok");
        assert_eq!(b.channel, "system");
        assert_eq!(b.data.as_ref().map(Payload::get), Some("null"));
        let u = unicast(r#"{"clear_pending":true,"clear_pending":null}"#).expect("ok");
        assert!(u.clear_pending);
        assert_eq!(
            unicast(r#"{"appid":1,"appid":"a"}"#),
            Err(Malformed),
            "a wrong type anywhere is malformed"
        );
    }

    #[test]
    fn escaped_names_and_strings_are_decoded() {
        let r = Registration::parse(br#"{"device\u0069d":"a\"b","appid":"\u263a"}"#).expect("ok");
        assert_eq!(r.device_id, "a\"b");
        assert_eq!(r.app_id, "\u{263a}");
    }

    #[test]
    fn strings_and_names_without_escapes_are_borrowed_from_the_body() {
        let body = br#"{"token":"dG9r","appid":"a\u0062c","expire_on":"2030-01-01T00:00:00Z"}"#;
        let u = Unicast::parse(body).expect("ok");
        assert!(matches!(u.token, Cow::Borrowed("dG9r")));
        assert!(matches!(u.expire_on, Cow::Borrowed(_)));
        assert!(
            matches!(u.app_id, Cow::Owned(ref s) if s == "abc"),
            "an escape is decoded"
        );
        let m = Members::parse(br#"{"a":1,"\u0062":2}"#).expect("ok");
        assert!(matches!(m.0[0].0.0, Cow::Borrowed("a")));
        assert!(matches!(m.0[1].0.0, Cow::Owned(ref s) if s == "b"));
    }

    proptest::proptest! {
        #[test]
        fn a_string_field_decodes_as_serde_json_decodes_it(s in ".*", escape in proptest::bool::ANY) {
            let text = if escape {
                // Every character escaped the long way, as some encoders do.
                let mut t = String::from("\"");
                for unit in s.encode_utf16() {
                    t.push_str(&format!("\\u{unit:04x}"));
                }
                t.push('"');
                t
            } else {
                serde_json::to_string(&s).expect("a string encodes")
            };
            proptest::prop_assert_eq!(json_string(&text).map(Cow::into_owned), Ok(s));
        }

        #[test]
        fn a_value_that_is_not_a_string_is_malformed(v in proptest::prelude::any::<i64>()) {
            for text in [v.to_string(), format!("[\"{v}\"]"), format!("{{\"a\":\"{v}\"}}"), "true".into()] {
                proptest::prop_assert_eq!(json_string(&text), Err(Malformed));
            }
        }
    }
}
