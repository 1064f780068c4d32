//! The device side of the wire protocol, as cheaply as a load generator can speak it:
//! pre-built ACK and PONG frames, frames classified by their `"T"` prefix, and the run's
//! payload markers found by a byte search instead of a JSON decode.

use memchr::memmem::Finder;
use serde::Deserialize;

/// `{"T":"ack"}` as a frame.
pub(crate) const ACK: &[u8] = b"\x00\x0b{\"T\":\"ack\"}";
/// `{"T":"pong"}` as a frame.
pub(crate) const PONG: &[u8] = b"\x00\x0c{\"T\":\"pong\"}";

/// The device model and image channel every load device reports; broadcasts on the system
/// channel carry a payload keyed `"pushload/load"` so the server's filter keeps it.
pub(crate) const INFO_DEVICE: &str = "load";
/// See [`INFO_DEVICE`].
pub(crate) const INFO_CHANNEL: &str = "pushload";

/// The device id of session `index` in run `nonce`.
pub(crate) fn device_id(nonce: &str, index: u32) -> String {
    format!("pl{nonce}-{index}")
}

/// The version byte and CONNECT frame that open a session.
pub(crate) fn hello(device_id: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "T": "connect",
        "ClientVer": "pushload",
        "DeviceId": device_id,
        "Info": {"device": INFO_DEVICE, "channel": INFO_CHANNEL},
        "Levels": {},
    })
    .to_string();
    let mut out = Vec::with_capacity(3 + body.len());
    out.push(0);
    // A device id is ours and short; the frame always fits a u16.
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body.as_bytes());
    out
}

/// The `data` of broadcast `k` of run `nonce`.
pub(crate) fn broadcast_data(nonce: &str, k: u32) -> String {
    format!(r#"{{"{INFO_CHANNEL}/{INFO_DEVICE}":{{"r":"{nonce}","k":{k}}}}}"#)
}

/// The `data` of notify `n` (for device `device`) of run `nonce`.
pub(crate) fn notify_data(nonce: &str, n: u32, device: u32) -> String {
    format!(r#"{{"r":"{nonce}","n":{n},"d":{device}}}"#)
}

/// What a frame from the server asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `connack`.
    Connack,
    /// `ping`: answer PONG.
    Ping,
    /// `broadcast`: answer ACK.
    Broadcast,
    /// `notifications`: answer ACK.
    Notifications,
    /// `connbroken`: the server closes.
    ConnBroken,
    /// `connwarn`, `setparams` or a type this client does not know: no answer.
    OneWay,
}

/// Only the `"T"` field, for frames that do not start with it.
#[derive(Deserialize)]
struct TypeOnly<'a> {
    #[serde(rename = "T", borrow)]
    t: std::borrow::Cow<'a, str>,
}

/// Classifies a frame body by its type, or `None` when it is not a JSON object with `"T"`.
pub(crate) fn classify(frame: &[u8]) -> Option<Kind> {
    const PREFIX: &[u8] = b"{\"T\":\"";
    let name: std::borrow::Cow<'_, str> = match frame.strip_prefix(PREFIX) {
        Some(rest) => {
            let end = memchr::memchr(b'"', rest)?;
            std::borrow::Cow::Borrowed(std::str::from_utf8(&rest[..end]).ok()?)
        }
        None => serde_json::from_slice::<TypeOnly<'_>>(frame).ok()?.t,
    };
    Some(match &*name {
        "connack" => Kind::Connack,
        "ping" => Kind::Ping,
        "broadcast" => Kind::Broadcast,
        "notifications" => Kind::Notifications,
        "connbroken" => Kind::ConnBroken,
        _ => Kind::OneWay,
    })
}

/// Finds this run's markers in frames: `"r":"NONCE","k":K` in broadcast payloads and
/// `"r":"NONCE","n":N,"d":D` in notification payloads.
#[derive(Debug)]
pub(crate) struct Markers {
    broadcast: Finder<'static>,
    notify: Finder<'static>,
}

impl Markers {
    /// Markers of run `nonce`.
    pub(crate) fn new(nonce: &str) -> Self {
        Markers {
            broadcast: Finder::new(format!(r#""r":"{nonce}","k":"#).as_bytes()).into_owned(),
            notify: Finder::new(format!(r#""r":"{nonce}","n":"#).as_bytes()).into_owned(),
        }
    }

    /// Calls `found(k)` for every broadcast of this run in `frame`.
    pub(crate) fn broadcasts(&self, frame: &[u8], mut found: impl FnMut(u32)) {
        for at in self.broadcast.find_iter(frame) {
            if let Some((k, _)) = number(&frame[at + self.broadcast.needle().len()..]) {
                found(k);
            }
        }
    }

    /// Calls `found(n, d)` for every notification of this run in `frame`; `d` is the
    /// device index the payload was addressed to.
    pub(crate) fn notifies(&self, frame: &[u8], mut found: impl FnMut(u32, u32)) {
        for at in self.notify.find_iter(frame) {
            let rest = &frame[at + self.notify.needle().len()..];
            let Some((n, used)) = number(rest) else {
                continue;
            };
            let d = rest[used..]
                .strip_prefix(b",\"d\":")
                .and_then(number)
                .map_or(u32::MAX, |(d, _)| d);
            found(n, d);
        }
    }
}

/// A decimal `u32` at the start of `bytes`, and how many bytes it took.
fn number(bytes: &[u8]) -> Option<(u32, usize)> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 9 {
        return None;
    }
    let mut v = 0u32;
    for b in &bytes[..digits] {
        v = v * 10 + u32::from(b - b'0');
    }
    Some((v, digits))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fixed_frames_are_length_prefixed_json() {
        for frame in [ACK, PONG] {
            let len = u16::from_be_bytes([frame[0], frame[1]]) as usize;
            assert_eq!(len, frame.len() - 2);
            let v: serde_json::Value = serde_json::from_slice(&frame[2..]).unwrap();
            assert!(v["T"].is_string());
        }
    }

    #[test]
    fn hello_is_version_zero_then_connect() {
        let h = hello("pl1-7");
        assert_eq!(h[0], 0);
        let len = u16::from_be_bytes([h[1], h[2]]) as usize;
        let v: serde_json::Value = serde_json::from_slice(&h[3..3 + len]).unwrap();
        assert_eq!(v["T"], "connect");
        assert_eq!(v["DeviceId"], "pl1-7");
        assert_eq!(v["Info"]["channel"], "pushload");
    }

    #[test]
    fn classifies_by_prefix_and_by_decoding() {
        assert_eq!(classify(br#"{"T":"ping"}"#), Some(Kind::Ping));
        assert_eq!(
            classify(br#"{"T":"broadcast","ChanId":"0"}"#),
            Some(Kind::Broadcast)
        );
        assert_eq!(
            classify(br#"{ "Notifications":[], "T" : "notifications"}"#),
            Some(Kind::Notifications)
        );
        assert_eq!(classify(br#"{"T":"setparams"}"#), Some(Kind::OneWay));
        assert_eq!(classify(b"junk"), None);
    }

    #[test]
    fn finds_every_marker_of_the_run_only() {
        let m = Markers::new("abc");
        let frame = format!(
            r#"{{"T":"broadcast","Payloads":[{},{},{}]}}"#,
            broadcast_data("abc", 3),
            broadcast_data("other", 4),
            broadcast_data("abc", 12)
        );
        let mut ks = vec![];
        m.broadcasts(frame.as_bytes(), |k| ks.push(k));
        assert_eq!(ks, [3, 12]);

        let frame = format!(
            r#"{{"T":"notifications","Notifications":[{{"A":"a","M":"1","P":{}}},{{"P":{}}}]}}"#,
            notify_data("abc", 5, 9),
            notify_data("abc", 6, 10)
        );
        let mut ns = vec![];
        m.notifies(frame.as_bytes(), |n, d| ns.push((n, d)));
        assert_eq!(ns, [(5, 9), (6, 10)]);
    }
}
