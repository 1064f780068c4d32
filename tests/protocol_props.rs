//! Property tests of the wire protocol: decoding never panics, encoding round-trips and
//! splitting keeps every payload, in order, at the right levels.

use std::borrow::Cow;

use proptest::prelude::*;
use pushbroker::protocol::{
    BroadcastMsg, ConnectMsg, MAX_FRAME_BODY, MAX_PAYLOAD_SIZE, Message, Notification,
    NotificationsMsg, Payload, decode_frame, decode_message, decode_version, encode_frame,
    split_payloads,
};

/// A JSON value to use as a payload: numbers, strings and small objects.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    json_value_with(true)
}

/// A JSON value, with or without arbitrary floats. Values parsed into a
/// `serde_json::Value` (CONNECT's `Info`) leave floats out: serde_json's default float
/// parsing is not exact for every `f64`, which is no concern of the protocol.
fn json_value_with(floats: bool) -> impl Strategy<Value = serde_json::Value> {
    let float = any::<f64>()
        .prop_filter("finite", |f| f.is_finite())
        .prop_map(move |f| {
            if floats {
                f
            } else {
                f.trunc().clamp(-1e15, 1e15)
            }
        })
        .prop_map(serde_json::Value::from);
    let leaf = prop_oneof![
        any::<i64>().prop_map(serde_json::Value::from),
        float,
        ".{0,20}".prop_map(serde_json::Value::from),
        any::<bool>().prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn payload() -> impl Strategy<Value = Payload> {
    json_value().prop_map(|v| {
        let text = serde_json::to_string(&v).expect("values serialize");
        Payload::from_json(&text).expect("serialized values are JSON")
    })
}

fn notification() -> impl Strategy<Value = Notification> {
    (".{0,12}", ".{0,12}", payload()).prop_map(|(app, msg, p)| Notification::unicast(&app, &msg, p))
}

fn connect() -> impl Strategy<Value = ConnectMsg> {
    let info = prop::option::of(
        prop::collection::btree_map(".{1,8}", json_value_with(false), 1..4)
            .prop_map(|m| m.into_iter().collect::<serde_json::Map<_, _>>()),
    );
    let levels = prop::option::of(prop::collection::btree_map(
        prop_oneof![Just("0".to_owned()), "[0-9a-f]{32}", ".{0,6}"],
        any::<i64>(),
        0..5,
    ));
    (".{0,10}", ".{0,40}", ".{0,20}", ".{0,20}", info, levels).prop_map(
        |(client_ver, device_id, authorization, cookie, info, levels)| ConnectMsg {
            client_ver,
            device_id,
            authorization,
            cookie,
            info,
            levels,
        },
    )
}

/// Encodes `msg` into a buffer with something before it, decodes it back and checks both.
fn round_trip(msg: &Message<'_>) -> Result<(), TestCaseError> {
    let mut buf = vec![0xAB];
    let range = encode_frame(&mut buf, msg).expect("generated messages fit a frame");
    prop_assert_eq!(range.start, 1);
    prop_assert_eq!(range.end, buf.len());
    let body_len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
    prop_assert_eq!(body_len + 2, range.len());
    let (back, used) = decode_message(&buf[1..], MAX_FRAME_BODY).expect("own frames decode");
    prop_assert_eq!(used, range.len());
    prop_assert_eq!(&back, msg);
    prop_assert_eq!(back.type_name(), msg.type_name());
    Ok(())
}

/// A payload of exactly `n ≥ 1` bytes.
fn sized(n: usize, tag: usize) -> Payload {
    let text = if n == 1 {
        (tag % 10).to_string()
    } else {
        let body: String = format!("{tag}.")
            .chars()
            .chain(std::iter::repeat('x'))
            .take(n - 2)
            .collect();
        format!("\"{body}\"")
    };
    Payload::from_json(&text).expect("valid JSON")
}

/// Payload sizes, mostly small, some near or over the part limit.
fn payload_size() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 1usize..2_000,
        3 => 2_000usize..40_000,
        1 => 60_000usize..72_000,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        max_body in prop_oneof![Just(MAX_FRAME_BODY), 0usize..300],
    ) {
        let _ = decode_version(&bytes);
        let _ = decode_frame(&bytes, max_body);
        let _ = decode_message(&bytes, max_body);
    }

    #[test]
    fn decoding_arbitrary_bodies_never_panics(body in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut buf = u16::try_from(body.len()).expect("small").to_be_bytes().to_vec();
        buf.extend_from_slice(&body);
        let (got, used) = decode_frame(&buf, MAX_FRAME_BODY).expect("whole frame");
        prop_assert_eq!(got, &body[..]);
        prop_assert_eq!(used, buf.len());
        match decode_message(&buf, MAX_FRAME_BODY) {
            Ok((_, used)) => prop_assert_eq!(used, buf.len()),
            Err(e) => prop_assert!(e.is_malformed()),
        }
    }

    #[test]
    fn decoding_json_like_bodies_never_panics(
        t in prop_oneof![
            Just("connect"), Just("broadcast"), Just("notifications"), Just("connack"),
            Just("ack"), Just("connbroken"), Just("setparams"), Just("other"),
        ],
        field in prop_oneof![
            Just("Levels"), Just("Info"), Just("DeviceId"), Just("Payloads"), Just("TopLevel"),
            Just("Notifications"), Just("Params"), Just("Reason"), Just("ChanId"),
        ],
        value in json_value(),
    ) {
        let body = serde_json::json!({ "T": t, field: value }).to_string();
        let mut buf = u16::try_from(body.len()).expect("small").to_be_bytes().to_vec();
        buf.extend_from_slice(body.as_bytes());
        match decode_message(&buf, MAX_FRAME_BODY) {
            Ok((msg, _)) => prop_assert_eq!(msg.type_name(), t),
            Err(e) => prop_assert!(e.is_malformed()),
        }
    }

    #[test]
    fn version_byte_decides(bytes in prop::collection::vec(any::<u8>(), 1..4)) {
        prop_assert_eq!(decode_version(&bytes).is_ok(), bytes[0] == 0);
    }

    #[test]
    fn split_input_is_incomplete(cut in 0usize..40) {
        let mut buf = Vec::new();
        let range = encode_frame(&mut buf, &Message::Ack).expect("ack");
        let cut = cut % range.len();
        let e = decode_message(&buf[..cut], MAX_FRAME_BODY).expect_err("partial");
        prop_assert!(e.is_incomplete());
    }

    #[test]
    fn broadcast_round_trips(
        app_id in ".{0,12}",
        chan_id in prop_oneof![Just("0".to_owned()), "[0-9a-f]{32}", ".{0,16}"],
        top_level in any::<i64>(),
        payloads in prop::option::of(prop::collection::vec(payload(), 0..8)),
    ) {
        round_trip(&Message::Broadcast(BroadcastMsg {
            app_id: Cow::Owned(app_id),
            chan_id: Cow::Owned(chan_id),
            top_level,
            payloads: payloads.map(Cow::Owned),
        }))?;
    }

    #[test]
    fn notifications_round_trip(notifications in prop::collection::vec(notification(), 0..8)) {
        round_trip(&Message::Notifications(NotificationsMsg {
            notifications: Cow::Owned(notifications),
        }))?;
    }

    #[test]
    fn connect_round_trips(c in connect()) {
        round_trip(&Message::Connect(Box::new(c)))?;
    }

    #[test]
    fn one_way_messages_round_trip(text in ".{0,30}", which in 0u8..3) {
        let msg = match which {
            0 => Message::ConnBroken { reason: Cow::Owned(text) },
            1 => Message::ConnWarn { reason: Cow::Owned(text) },
            _ => Message::SetParams { set_cookie: Cow::Owned(text) },
        };
        round_trip(&msg)?;
    }
}

#[test]
fn bare_messages_round_trip() {
    for msg in [Message::Ping, Message::Pong, Message::Ack] {
        round_trip(&msg).expect("round trip");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn splitting_keeps_payloads_levels_and_limits(
        sizes in prop::collection::vec(payload_size(), 0..12),
        top_level in -1_000_000_000_000i64..1_000_000_000_000,
    ) {
        let payloads: Vec<Payload> =
            sizes.iter().enumerate().map(|(i, &n)| sized(n, i)).collect();
        let msg = BroadcastMsg {
            app_id: Cow::Borrowed(""),
            chan_id: Cow::Borrowed("0"),
            top_level,
            payloads: Some(Cow::Borrowed(&payloads)),
        };
        let parts = msg.split();
        let ranges = split_payloads(&payloads);
        prop_assert_eq!(parts.len(), ranges.len());
        prop_assert!(!parts.is_empty());

        let total = i64::try_from(payloads.len()).expect("few payloads");
        let mut all = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let these = part.payloads.as_deref().expect("parts keep payloads");
            prop_assert_eq!(these, &payloads[ranges[i].clone()]);
            prop_assert!(!these.is_empty() || payloads.is_empty());
            all.extend_from_slice(these);
            let end = i64::try_from(all.len()).expect("few payloads");
            prop_assert_eq!(part.top_level, top_level - total + end);
            let size: usize = these.iter().map(Payload::len).sum();
            if these.len() > 1 {
                prop_assert!(size <= MAX_PAYLOAD_SIZE, "part {} holds {} bytes", i, size);
            }
            // Greedy: a part ends only where the next payload would not fit.
            if let Some(next) = payloads.get(ranges[i].end) {
                prop_assert!(size + next.len() > MAX_PAYLOAD_SIZE);
            }
            prop_assert_eq!(&part.chan_id, "0");
        }
        prop_assert_eq!(&all, &payloads);
        prop_assert_eq!(parts.last().map(|p| p.top_level), Some(top_level));
        if sizes.iter().sum::<usize>() <= MAX_PAYLOAD_SIZE {
            prop_assert_eq!(parts.len(), 1);
        }
    }
}
