//! The API core ([`respond`]) against a real sharded broker: every answer of
//! docs/protocol.md §3, run on shard 0 as the server runs it, without sockets.

use std::rc::Rc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::testing::HttpAnswer;
use super::*;
use crate::broker::BrokerSending;
use crate::broker::sharded::{
    ShardId, ShardPlacement, ShardedBroker, ShardedBrokerBuilder, owner_of_device,
};
use crate::broker::testing::{FaultyStore, LogCapture, StoreOp, TestBrokerConfig};
use crate::protocol::Notification;
use crate::store::{InternalChannelId, PendingStore};

/// A request as a test writes it: `Send`, so it can travel to the shard.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    path: String,
    content_type: Option<String>,
    content_length: Option<u64>,
    body: Result<Vec<u8>, BodyReadError>,
    authorization: Option<String>,
}

impl Call {
    /// A well-formed `POST` of `body` to `path`.
    fn post(path: &str, body: &str) -> Self {
        Self {
            method: Method::POST,
            path: path.to_owned(),
            content_type: Some("application/json".to_owned()),
            content_length: Some(body.len() as u64),
            body: Ok(body.as_bytes().to_vec()),
            authorization: None,
        }
    }

    /// A `GET` of `path` (no body).
    fn get(path: &str) -> Self {
        Self {
            method: Method::GET,
            content_type: None,
            content_length: Some(0),
            body: Ok(Vec::new()),
            ..Self::post(path, "")
        }
    }

    fn method(self, method: Method) -> Self {
        Self { method, ..self }
    }

    fn content_type(self, content_type: Option<&str>) -> Self {
        Self {
            content_type: content_type.map(str::to_owned),
            ..self
        }
    }

    fn content_length(self, content_length: Option<u64>) -> Self {
        Self {
            content_length,
            ..self
        }
    }

    fn failing_body(self) -> Self {
        Self {
            body: Err(BodyReadError),
            ..self
        }
    }

    fn authorization(self, value: &str) -> Self {
        Self {
            authorization: Some(value.to_owned()),
            ..self
        }
    }
}

/// An answer, and whether the core awaited the body.
#[derive(Debug, Clone)]
struct Answer {
    http: HttpAnswer,
    read_body: bool,
}

impl std::ops::Deref for Answer {
    type Target = HttpAnswer;

    fn deref(&self) -> &HttpAnswer {
        &self.http
    }
}

/// Answers `call` with `ctx`, on the current shard.
async fn answer(ctx: &ApiContext, call: Call) -> Answer {
    let head = RequestHead {
        method: &call.method,
        path: &call.path,
        content_type: call.content_type.as_deref().map(str::as_bytes),
        content_length: call.content_length,
        authorization: call.authorization.as_deref().map(str::as_bytes),
    };
    let read = std::cell::Cell::new(false);
    let body = async {
        read.set(true);
        call.body.clone().map(Bytes::from)
    };
    let resp = respond(ctx, &head, body).await;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("?").to_owned()))
        .collect();
    let body = match resp.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    Answer {
        http: HttpAnswer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        },
        read_body: read.get(),
    }
}

fn builder() -> ShardedBrokerBuilder {
    ShardedBrokerBuilder::new(2)
        .placement(ShardPlacement::Unbound)
        .name("api-test")
}

fn started(builder: ShardedBrokerBuilder) -> ShardedBroker {
    let b = builder.build();
    b.start().expect("shards start (ulimit -l?)");
    b
}

/// Answers `calls` in order on shard 0 with one context made of `settings`.
fn call_all_with(b: &ShardedBroker, settings: ApiConfig, calls: Vec<Call>) -> Vec<Answer> {
    futures_lite::future::block_on(
        b.sending()
            .run_task_on(ShardId(0), move |shard| async move {
                let ctx = ApiContext::new(shard, settings);
                let mut answers = Vec::with_capacity(calls.len());
                for call in calls {
                    answers.push(answer(&ctx, call).await);
                }
                answers
            }),
    )
    .expect("shard 0 answers")
}

fn call_all(b: &ShardedBroker, calls: Vec<Call>) -> Vec<Answer> {
    call_all_with(b, ApiConfig::default(), calls)
}

fn call(b: &ShardedBroker, call: Call) -> Answer {
    call_all(b, vec![call]).remove(0)
}

/// An RFC 3339 time `d` from now.
fn in_(d: Duration) -> String {
    (OffsetDateTime::now_utc() + d)
        .format(&Rfc3339)
        .expect("formattable")
}

fn later() -> String {
    in_(Duration::from_secs(3600))
}

/// The original's token of (device, app).
fn token(device: &str, app: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{app}::{device}"))
}

fn notify_body(token: &str, data: &str) -> String {
    format!(
        r#"{{"appid":"app","token":"{token}","expire_on":"{}","data":{data}}}"#,
        later()
    )
}

/// The live notifications of `chan` in its owner's store.
fn pending(b: &ShardedBroker, chan: InternalChannelId) -> (i64, Vec<Notification>) {
    let owner = crate::broker::sharded::owner_of_channel(&chan, b.nr_shards());
    futures_lite::future::block_on(
        b.sending()
            .run_on(owner, move |s| s.store().get_channel_snapshot(&chan)),
    )
    .expect("owner answers")
    .expect("in-memory store")
}

/// A device owned by `shard` among 2.
fn device_on(shard: usize) -> String {
    (0..)
        .map(|i| format!("dev-{i}"))
        .find(|d| owner_of_device(d, 2) == ShardId(shard))
        .expect("some device")
}

#[test]
fn register_answers_the_originals_token_the_same_every_time() {
    let b = started(builder());
    let body = r#"{"deviceid":"dev1","appid":"com.example.app_app"}"#;
    let answers = call_all(
        &b,
        vec![Call::post("/register", body), Call::post("/register", body)],
    );
    let want = format!(
        r#"{{"ok":true,"token":"{}"}}"#,
        token("dev1", "com.example.app_app")
    );
    for a in &answers {
        assert_eq!((a.status, a.body.as_str()), (200, want.as_str()));
        assert_eq!(a.header("content-type"), Some("application/json"));
    }
    call(&b, Call::post("/unregister", body)).assert_ok();
}

#[test]
fn register_and_unregister_need_both_ids() {
    let b = started(builder());
    for path in ["/register", "/unregister"] {
        for body in [
            r#"{"appid":"app"}"#,
            r#"{"deviceid":"dev"}"#,
            r#"{"deviceid":"","appid":"app"}"#,
            r#"{"deviceid":null,"appid":"app"}"#,
            "{}",
        ] {
            call(&b, Call::post(path, body)).assert_error(
                400,
                "invalid-request",
                "Missing id field",
            );
        }
    }
}

#[test]
fn notify_by_token_appends_the_payload_as_received_to_the_devices_channel() {
    let b = started(builder());
    let tok = token("dev1", "app");
    let data = r#"{"m": [1,  2], "z":"\u00e9"}"#;
    call(&b, Call::post("/notify", &notify_body(&tok, data))).assert_ok();
    let (_, ns) = pending(&b, InternalChannelId::unicast("dev1", "dev1"));
    assert_eq!(ns.len(), 1);
    assert_eq!(&*ns[0].app_id, "app");
    assert_eq!(ns[0].payload.get(), data);
}

#[test]
fn notify_by_user_and_device_and_with_null_data_is_accepted() {
    let b = started(builder());
    let body = format!(
        r#"{{"appid":"app","userid":"user1","deviceid":"dev2","expire_on":"{}","data":null}}"#,
        later()
    );
    call(&b, Call::post("/notify", &body)).assert_ok();
    let (_, ns) = pending(&b, InternalChannelId::unicast("user1", "dev2"));
    assert_eq!(ns.len(), 1);
    assert_eq!(ns[0].payload.get(), "null");
}

#[test]
fn broadcast_appends_to_the_system_channel_on_every_shard() {
    let b = started(builder());
    let body = format!(
        r#"{{"channel":"system","expire_on":"{}","data":{{"daily/mako":[4]}}}}"#,
        later()
    );
    call(&b, Call::post("/broadcast", &body)).assert_ok();
    // The sequencer answers once it appended; replicas follow over the mesh.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for shard in 0..2 {
        loop {
            let (top, ns) =
                futures_lite::future::block_on(b.sending().run_on(ShardId(shard), |s| {
                    s.store().get_channel_snapshot(&InternalChannelId::System)
                }))
                .expect("answers")
                .expect("in-memory");
            if top == 1 {
                assert_eq!(ns.len(), 1);
                assert_eq!(ns[0].payload.get(), r#"{"daily/mako":[4]}"#);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "shard {shard} never got it"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn post_checks_come_in_the_originals_order() {
    let b = started(builder());
    let good = notify_body(&token("dev1", "app"), "1");
    let answers = call_all(
        &b,
        vec![
            // The method first: a GET with no body is refused for its method.
            Call::get("/notify"),
            Call::post("/notify", &good)
                .method(Method::PUT)
                .content_length(None),
            // Then the declared length: unknown (chunked), zero, over the limit.
            Call::post("/notify", &good)
                .content_length(None)
                .content_type(None),
            Call::post("/notify", "").content_type(None),
            Call::post("/notify", &good)
                .content_length(Some(4097))
                .content_type(None),
            // Then the content type's media type.
            Call::post("/notify", &good).content_type(None),
            Call::post("/notify", &good).content_type(Some("text/plain")),
            Call::post("/notify", &good).content_type(Some("application/jsonp")),
            // Then the body.
            Call::post("/notify", &good).failing_body(),
            Call::post("/notify", &good).content_length(Some(good.len() as u64 + 1)),
        ],
    );
    let want = [
        (
            405,
            "invalid-request",
            "Wrong request method, should be POST",
        ),
        (
            405,
            "invalid-request",
            "Wrong request method, should be POST",
        ),
        (411, "invalid-request", "A Content-Length must be provided"),
        (400, "invalid-request", "Request body empty"),
        (413, "invalid-request", "Request body too large"),
        (
            415,
            "invalid-request",
            "Wrong content type, should be application/json",
        ),
        (
            415,
            "invalid-request",
            "Wrong content type, should be application/json",
        ),
        (
            415,
            "invalid-request",
            "Wrong content type, should be application/json",
        ),
        (400, "io-error", "Could not read request body"),
        (400, "io-error", "Could not read request body"),
    ];
    for (i, (a, (status, label, message))) in answers.iter().zip(want).enumerate() {
        a.assert_error(status, label, message);
        // The body is read only when the head passed.
        assert_eq!(a.read_body, i >= 8, "{i}: {a:?}");
    }
}

#[test]
fn every_post_endpoint_checks_its_head() {
    let b = started(builder());
    for path in ["/broadcast", "/notify", "/register", "/unregister"] {
        let answers = call_all(
            &b,
            vec![
                Call::get(path),
                Call::post(path, "").content_length(None),
                Call::post(path, ""),
                Call::post(path, "{}").content_type(Some("application/xml")),
                Call::post(path, "[]"),
                Call::post(path, "{}").failing_body(),
            ],
        );
        answers[0].assert_error(
            405,
            "invalid-request",
            "Wrong request method, should be POST",
        );
        answers[1].assert_error(411, "invalid-request", "A Content-Length must be provided");
        answers[2].assert_error(400, "invalid-request", "Request body empty");
        answers[3].assert_error(
            415,
            "invalid-request",
            "Wrong content type, should be application/json",
        );
        answers[4].assert_error(400, "invalid-request", "Malformed JSON Object");
        answers[5].assert_error(400, "io-error", "Could not read request body");
    }
}

#[test]
fn a_body_of_exactly_the_limit_is_read() {
    let b = started(builder());
    let mut body = notify_body(&token("dev1", "app"), "1");
    body.insert_str(
        1,
        &format!(r#""pad":"{}","#, "x".repeat(4096 - body.len() - 9)),
    );
    assert_eq!(body.len(), 4096);
    call(&b, Call::post("/notify", &body)).assert_ok();
    let over = format!("{body} ");
    call(&b, Call::post("/notify", &over)).assert_error(
        413,
        "invalid-request",
        "Request body too large",
    );
}

#[test]
fn malformed_bodies_are_refused() {
    let b = started(builder());
    for body in [
        "[]",
        "null",
        "\"x\"",
        "{",
        "{}{}",
        r#"{"appid":1}"#,
        r#"{"token":["t"]}"#,
        r#"{"clear_pending":"yes"}"#,
        r#"{"replace_tag":1}"#,
        "\u{feff}{}",
    ] {
        call(&b, Call::post("/notify", body)).assert_error(
            400,
            "invalid-request",
            "Malformed JSON Object",
        );
    }
    call(&b, Call::post("/broadcast", r#"{"channel":0}"#)).assert_error(
        400,
        "invalid-request",
        "Malformed JSON Object",
    );
}

#[test]
fn notify_field_checks_come_in_the_originals_order() {
    let b = started(builder());
    let tok = token("dev1", "app");
    let t = later();
    let big = format!("\"{}\"", "x".repeat(2047));
    let cases: Vec<(String, &str)> = vec![
        (
            format!(r#"{{"token":"{tok}","expire_on":"{t}","data":1}}"#),
            "Missing id field",
        ),
        (
            format!(r#"{{"appid":"app","expire_on":"{t}","data":1}}"#),
            "Missing id field",
        ),
        (
            format!(r#"{{"appid":"app","userid":"u","expire_on":"{t}","data":1}}"#),
            "Missing id field",
        ),
        (
            format!(r#"{{"appid":"app","deviceid":"d","expire_on":"{t}","data":1}}"#),
            "Missing id field",
        ),
        (
            format!(r#"{{"appid":"app","token":"{tok}","expire_on":"{t}"}}"#),
            "Missing data field",
        ),
        (
            format!(r#"{{"appid":"app","token":"{tok}","expire_on":"bad","data":{big}}}"#),
            "Data too large",
        ),
        (
            format!(r#"{{"appid":"app","token":"{tok}","data":1}}"#),
            "Invalid expiration date",
        ),
        (
            format!(
                r#"{{"appid":"app","token":"{tok}","expire_on":"2030-01-01T00:00:00","data":1}}"#
            ),
            "Invalid expiration date",
        ),
        (
            format!(r#"{{"appid":"app","token":"{tok}","expire_on":"2030-01-01","data":1}}"#),
            "Invalid expiration date",
        ),
        (
            format!(r#"{{"appid":"app","token":"{tok}","expire_on":"tomorrow","data":1}}"#),
            "Invalid expiration date",
        ),
        (
            format!(
                r#"{{"appid":"app","token":"{tok}","expire_on":"2001-01-01T00:00:00Z","data":1}}"#
            ),
            "Past expiration date",
        ),
        (
            format!(
                r#"{{"appid":"app","token":"{tok}","expire_on":"{}","data":1}}"#,
                in_(Duration::ZERO)
            ),
            "Past expiration date",
        ),
    ];
    let answers = call_all(
        &b,
        cases
            .iter()
            .map(|(body, _)| Call::post("/notify", body))
            .collect(),
    );
    for (a, (body, message)) in answers.iter().zip(&cases) {
        assert_eq!(a.status, 400, "{body}: {a:?}");
        a.assert_error(400, "invalid-request", message);
    }
}

#[test]
fn data_of_2048_bytes_as_received_and_an_expiry_just_ahead_are_accepted() {
    let b = started(builder());
    let tok = token("dev1", "app");
    let exact = format!("\"{}\"", "x".repeat(2046));
    let spaced = format!("[{}1]", " ".repeat(2045));
    let answers = call_all(
        &b,
        vec![
            Call::post("/notify", &notify_body(&tok, &exact)),
            Call::post("/notify", &notify_body(&tok, &spaced)),
            Call::post(
                "/notify",
                &notify_body(&tok, &format!("[{}1]", " ".repeat(2046))),
            ),
            Call::post(
                "/notify",
                &format!(
                    r#"{{"appid":"app","token":"{tok}","expire_on":"{}","data":2}}"#,
                    in_(Duration::from_millis(500))
                ),
            ),
            Call::post(
                "/notify",
                &format!(
                    r#"{{"appid":"app","token":"{tok}","expire_on":"2100-01-01T12:00:00.5+02:00","data":3}}"#
                ),
            ),
        ],
    );
    answers[0].assert_ok();
    answers[1].assert_ok();
    answers[2].assert_error(400, "invalid-request", "Data too large");
    answers[3].assert_ok();
    answers[4].assert_ok();
}

#[test]
fn broadcast_data_is_bounded_by_the_body_alone() {
    let b = started(builder());
    let t = later();
    // Over /notify's 2048 bytes, within the 4096-byte body: accepted, as in the original.
    let big = format!("\"{}\"", "x".repeat(4000));
    let fits = format!(r#"{{"channel":"system","expire_on":"{t}","data":{big}}}"#);
    assert!(fits.len() <= 4096);
    let huge = format!("\"{}\"", "x".repeat(4096));
    let answers = call_all(
        &b,
        vec![
            Call::post("/broadcast", &fits),
            Call::post(
                "/broadcast",
                &format!(r#"{{"channel":"system","expire_on":"{t}","data":{huge}}}"#),
            ),
        ],
    );
    answers[0].assert_ok();
    answers[1].assert_error(413, "invalid-request", "Request body too large");
}

#[test]
fn the_content_type_is_checked_on_its_media_type() {
    let b = started(builder());
    let body = r#"{"deviceid":"dev1","appid":"app1"}"#;
    let accepted = [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        " application/json ; charset=utf-8",
    ];
    let refused = ["application/jsonp", "text/json", "application/json-seq", ""];
    let calls = accepted
        .iter()
        .chain(&refused)
        .map(|ct| Call::post("/register", body).content_type(Some(ct)))
        .collect();
    let answers = call_all(&b, calls);
    for (a, ct) in answers.iter().zip(accepted.iter().chain(&refused)) {
        if accepted.contains(ct) {
            assert_eq!(a.status, 200, "{ct:?}: {a:?}");
        } else {
            a.assert_error(
                415,
                "invalid-request",
                "Wrong content type, should be application/json",
            );
        }
    }
}

#[test]
fn broadcast_checks_data_expiry_and_channel() {
    let b = started(builder());
    let t = later();
    let cases: Vec<(String, u16, &str, &str)> = vec![
        (
            format!(r#"{{"channel":"system","expire_on":"{t}"}}"#),
            400,
            "invalid-request",
            "Missing data field",
        ),
        (
            r#"{"channel":"system","expire_on":"2030-13-01T00:00:00Z","data":1}"#.to_owned(),
            400,
            "invalid-request",
            "Invalid expiration date",
        ),
        (
            r#"{"channel":"system","expire_on":"1999-01-01T00:00:00+01:00","data":1}"#.to_owned(),
            400,
            "invalid-request",
            "Past expiration date",
        ),
        (
            format!(r#"{{"channel":"other","expire_on":"{t}","data":1}}"#),
            400,
            "unknown-channel",
            "Unknown channel",
        ),
        (
            format!(r#"{{"expire_on":"{t}","data":1}}"#),
            400,
            "unknown-channel",
            "Unknown channel",
        ),
    ];
    let answers = call_all(
        &b,
        cases
            .iter()
            .map(|(body, ..)| Call::post("/broadcast", body))
            .collect(),
    );
    for (a, (_, status, label, message)) in answers.iter().zip(&cases) {
        a.assert_error(*status, label, message);
    }
}

#[test]
fn tokens_that_do_not_resolve_or_belong_to_another_app_are_refused() {
    let b = started(builder());
    let answers = call_all(
        &b,
        vec![
            Call::post("/notify", &notify_body("not base64!", "1")),
            Call::post(
                "/notify",
                &notify_body(
                    &base64::engine::general_purpose::STANDARD.encode("nocolons"),
                    "1",
                ),
            ),
            Call::post("/notify", &notify_body(&token("dev1", "other-app"), "1")),
        ],
    );
    answers[0].assert_error(400, "unknown-token", "Unknown token");
    answers[1].assert_error(400, "unknown-token", "Unknown token");
    answers[2].assert_error(401, "unauthorized", "Unauthorized");
}

#[test]
fn too_many_pending_answers_with_the_newest_payload_unless_clearing_or_replacing() {
    let b = started(builder().max_notifications_per_app(2));
    let tok = token("dev1", "app");
    let t = later();
    let n = |extra: &str, data: &str| {
        Call::post(
            "/notify",
            &format!(r#"{{"appid":"app","token":"{tok}","expire_on":"{t}","data":{data}{extra}}}"#),
        )
    };
    let answers = call_all(
        &b,
        vec![
            n(r#","replace_tag":"a""#, r#"{"n": 1}"#),
            n("", r#"{"n":  2}"#),
            n("", r#"{"n": 3}"#),
            n(r#","replace_tag":"""#, r#"{"n": 4}"#),
            n(r#","replace_tag":"a""#, r#"{"n": 5}"#),
            n(r#","clear_pending":true"#, r#"{"n": 6}"#),
        ],
    );
    answers[0].assert_ok();
    answers[1].assert_ok();
    for refused in &answers[2..4] {
        assert_eq!(refused.status, 413);
        assert_eq!(
            refused.body,
            r#"{"error":"too-many-pending","message":"Too many pending notifications for this application","extra":{"n":  2}}"#
        );
    }
    answers[4].assert_ok();
    answers[5].assert_ok();
    let (_, ns) = pending(&b, InternalChannelId::unicast("dev1", "dev1"));
    let payloads: Vec<&str> = ns.iter().map(|n| n.payload.get()).collect();
    assert_eq!(payloads, [r#"{"n": 6}"#]);
}

#[test]
fn delivery_hosts_answers_get_only() {
    let b = started(builder());
    let settings = ApiConfig {
        delivery_hosts: vec!["127.0.0.1:4443".into(), "[::1]:4443".into()],
        delivery_domain: "push.example.com".into(),
        ..ApiConfig::default()
    };
    let answers = call_all_with(
        &b,
        settings,
        vec![
            Call::get("/delivery-hosts"),
            Call::post("/delivery-hosts", "{}"),
            Call::get("/health").method(Method::DELETE),
        ],
    );
    assert_eq!(answers[0].status, 200);
    assert_eq!(
        answers[0].body,
        r#"{"hosts":["127.0.0.1:4443","[::1]:4443"],"domain":"push.example.com"}"#
    );
    assert_eq!(answers[0].header("content-type"), Some("application/json"));
    answers[1].assert_error(
        405,
        "invalid-request",
        "Wrong request method, should be GET",
    );
    answers[2].assert_error(
        405,
        "invalid-request",
        "Wrong request method, should be GET",
    );
}

#[test]
fn unknown_paths_are_404_with_a_json_error() {
    let b = started(builder());
    for path in ["/", "/notify/", "/Notify", "/unknown", "//broadcast"] {
        call(&b, Call::post(path, "{}")).assert_error(404, "not-found", "Not found");
    }
}

#[test]
fn health_answers_when_every_shard_does_and_503_when_one_is_stuck() {
    let b = started(builder());
    let a = call(&b, Call::get("/health"));
    assert_eq!(
        (a.status, a.body.as_str()),
        (200, r#"{"ok":true,"shards":2}"#)
    );

    let answers =
        futures_lite::future::block_on(b.sending().run_task_on(ShardId(0), |shard| async move {
            let (started_tx, started_rx) = flume::bounded(1);
            shard.post(ShardId(1), move |_| {
                let _ = started_tx.send(());
                // Deliberately wedges shard 1 past the deadlines of the two calls below.
                std::thread::sleep(SHARD_ANSWER_TIMEOUT * 2 + Duration::from_millis(500));
            });
            let _ = started_rx.recv_async().await;
            let ctx = ApiContext::new(shard, ApiConfig::default());
            let start = std::time::Instant::now();
            let stuck = answer(&ctx, Call::get("/health")).await;
            let waited = start.elapsed();
            let metrics = answer(&ctx, Call::get("/metrics")).await;
            (stuck, waited, metrics)
        }))
        .expect("shard 0 answers");
    let (stuck, waited, metrics) = answers;
    stuck.assert_error(503, "unavailable", "Not every shard answered");
    assert!(
        waited >= SHARD_ANSWER_TIMEOUT && waited < SHARD_ANSWER_TIMEOUT * 3,
        "{waited:?}"
    );
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .body
            .contains("pushbroker_shard_up{shard=\"1\"} 0\n"),
        "{}",
        metrics.body
    );
    // Once shard 1 is back, health is too.
    std::thread::sleep(Duration::from_millis(800));
    let a = call(&b, Call::get("/health"));
    assert_eq!(a.status, 200, "{a:?}");
}

#[test]
fn metrics_count_requests_and_errors_by_label_over_shards() {
    let b = started(builder());
    let tok = token("dev1", "app");
    let answers = call_all(
        &b,
        vec![
            Call::post("/notify", &notify_body(&tok, "1")),
            Call::post("/notify", "[]"),
            Call::get("/notify"),
            Call::post("/notify", &notify_body(&token("d", "x"), "1")),
            Call::get("/nowhere"),
            Call::get("/metrics"),
        ],
    );
    let m = &answers[5];
    assert_eq!(m.status, 200);
    assert_eq!(
        m.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    for line in [
        "pushbroker_shards 2",
        "pushbroker_shard_up{shard=\"0\"} 1",
        "pushbroker_shard_up{shard=\"1\"} 1",
        "pushbroker_sessions{shard=\"0\"} 0",
        "pushbroker_api_requests_total{shard=\"0\"} 6",
        "pushbroker_api_requests_total{shard=\"1\"} 0",
        "pushbroker_api_errors_total{label=\"invalid-request\"} 2",
        "pushbroker_api_errors_total{label=\"unauthorized\"} 1",
        "pushbroker_api_errors_total{label=\"not-found\"} 1",
        "pushbroker_deliveries_total{shard=\"1\",feed=\"unicast\"} 0",
        "pushbroker_migrations_total{shard=\"0\",direction=\"in\"} 0",
    ] {
        assert!(
            m.body.lines().any(|l| l == line),
            "missing {line:?} in\n{}",
            m.body
        );
    }
    let owner = owner_of_device("dev1", 2).0;
    assert!(
        m.body
            .lines()
            .any(|l| l == format!("pushbroker_unicasts_total{{shard=\"{owner}\"}} 1")),
        "{}",
        m.body
    );
}

#[test]
fn broadcasts_are_counted_on_their_sequencer() {
    let b = started(builder());
    let t = later();
    let body = format!(r#"{{"channel":"system","expire_on":"{t}","data":1}}"#);
    let answers = call_all(
        &b,
        vec![
            Call::post("/broadcast", &body),
            Call::post("/broadcast", &body),
            Call::post("/broadcast", "{}"),
            Call::get("/stats"),
            Call::get("/metrics"),
        ],
    );
    answers[0].assert_ok();
    answers[1].assert_ok();
    assert_eq!(
        answers[3].json()["totals"]["broadcasts"],
        2,
        "{:?}",
        answers[3]
    );
    let total: u64 = answers[4]
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("pushbroker_broadcasts_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(total, 2, "{}", answers[4].body);
}

#[test]
fn metrics_require_the_same_credentials_as_stats() {
    let b = started(builder());
    let settings = ApiConfig {
        statistics_auth: Some(("admin".into(), "s3cret".into())),
        ..ApiConfig::default()
    };
    let good = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("admin:s3cret")
    );
    let answers = call_all_with(
        &b,
        settings,
        vec![
            Call::get("/metrics"),
            Call::get("/metrics").authorization("Basic YWRtaW46d3Jvbmc="),
            Call::get("/metrics").authorization(&good),
        ],
    );
    answers[0].assert_error(401, "unauthorized", "Unauthorized");
    answers[1].assert_error(401, "unauthorized", "Unauthorized");
    assert_eq!(answers[2].status, 200, "{:?}", answers[2]);
    assert!(answers[2].body.contains("pushbroker_shards 2"));
}

#[test]
fn stats_require_the_configured_basic_credentials() {
    let b = started(builder());
    let open = call(&b, Call::get("/stats"));
    assert_eq!(open.status, 200, "{open:?}");
    let json = open.json();
    assert_eq!(json["shards"].as_array().map(Vec::len), Some(2));
    assert_eq!(json["shards"][1]["up"], true);
    assert_eq!(json["totals"]["api_requests"], 1);

    let settings = ApiConfig {
        statistics_auth: Some(("admin".into(), "pa:ss".into())),
        ..ApiConfig::default()
    };
    let basic = |pair: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    };
    let answers = call_all_with(
        &b,
        settings,
        vec![
            Call::get("/stats"),
            Call::get("/stats").authorization(&basic("admin:wrong")),
            Call::get("/stats").authorization(&basic("admin")),
            Call::get("/stats").authorization("Bearer x"),
            Call::get("/stats").authorization(&basic("admin:pa:ss")),
            Call::get("/stats").authorization(&basic("admin:pa:ss").replace("Basic", "basic")),
        ],
    );
    for refused in &answers[..4] {
        refused.assert_error(401, "unauthorized", "Unauthorized");
        assert_eq!(
            refused.header("www-authenticate"),
            Some("Basic realm=\"pushbroker\"")
        );
    }
    for accepted in &answers[4..] {
        assert_eq!(accepted.status, 200, "{accepted:?}");
        assert!(accepted.json()["totals"]["api_errors"]["unauthorized"].as_u64() >= Some(4));
    }
}

#[test]
fn a_full_owner_inbox_is_503_not_a_wait() {
    let b = started(builder().config(&TestBrokerConfig {
        session_queue_size: 10,
        broker_queue_size: 1,
    }));
    let dev = device_on(1);
    let a = futures_lite::future::block_on(b.sending().run_task_on(ShardId(0), move |shard| async move {
        let (started_tx, started_rx) = flume::bounded(1);
        shard.post(ShardId(1), move |_| {
            let _ = started_tx.send(());
            // Deliberately wedges shard 1 so that its inbox stays full.
            std::thread::sleep(Duration::from_millis(300));
        });
        let _ = started_rx.recv_async().await;
        let chan = InternalChannelId::unicast(&dev, &dev);
        let mut filled = 0;
        while shard.sending().unicast(std::slice::from_ref(&chan)).is_ok() {
            filled += 1;
            assert!(filled < 100, "the inbox never filled");
        }
        let ctx = ApiContext::new(shard, ApiConfig::default());
        let body = format!(
            r#"{{"appid":"app","userid":"{dev}","deviceid":"{dev}","expire_on":"{}","data":1}}"#,
            later()
        );
        answer(&ctx, Call::post("/notify", &body)).await
    }))
    .expect("shard 0 answers");
    a.assert_error(503, "unavailable", "Server busy, try again later");
}

#[test]
fn store_faults_are_503_and_never_show_the_cause() {
    for lookups_fail in [true, false] {
        let b = started(builder().store(move |_| {
            // Writes fail; lookups (tokens, channel names) too, or succeed.
            let failing: Vec<StoreOp> = StoreOp::ALL
                .into_iter()
                .filter(|op| {
                    lookups_fail || !matches!(op, StoreOp::TokenLookup | StoreOp::ChannelLookup)
                })
                .filter(|op| *op != StoreOp::Snapshot)
                .collect();
            Rc::new(FaultyStore::new().failing_all(&failing, "backend 10.1.2.3 down"))
                as Rc<dyn PendingStore>
        }));
        let reg = r#"{"deviceid":"dev1","appid":"app"}"#;
        let bcast = format!(
            r#"{{"channel":"system","expire_on":"{}","data":1}}"#,
            later()
        );
        let answers = call_all(
            &b,
            vec![
                Call::post("/register", reg),
                Call::post("/unregister", reg),
                Call::post("/notify", &notify_body(&token("dev1", "app"), "1")),
                Call::post("/broadcast", &bcast),
            ],
        );
        answers[0].assert_error(503, "unavailable", "Could not make token");
        answers[1].assert_error(503, "unavailable", "Could not remove token");
        if lookups_fail {
            answers[2].assert_error(503, "unavailable", "Could not resolve token");
            answers[3].assert_error(503, "unavailable", "Message store unavailable");
        } else {
            answers[2].assert_error(503, "unavailable", "Could not store notification");
            answers[3].assert_error(503, "unavailable", "Could not store notification");
        }
        assert!(answers.iter().all(|a| !a.body.contains("10.1.2.3")));
    }
}

#[test]
fn requests_log_nothing_at_info_or_above() {
    let capture = LogCapture::new();
    let _guard = capture.set_default();
    let b = started(builder());
    let tok = token("dev1", "app");
    let calls = vec![
        Call::post("/notify", &notify_body(&tok, "1")),
        Call::post("/notify", "[]"),
        Call::get("/notify"),
        Call::post("/notify", "").content_length(None),
        Call::post("/notify", &notify_body(&token("d", "x"), "1")),
        Call::post("/register", "{}"),
        Call::get("/nowhere"),
        Call::get("/metrics"),
        Call::get("/stats"),
        Call::get("/health"),
        Call::get("/delivery-hosts"),
    ];
    let n = calls.len();
    call_all(&b, calls);
    futures_lite::future::block_on(b.stop());
    let log = capture.captured();
    let loud: Vec<&str> = log
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("INFO") || l.starts_with("WARN") || l.starts_with("ERROR")
        })
        .collect();
    assert!(loud.is_empty(), "{loud:?}");
    let requests = log.lines().filter(|l| l.contains("api request")).count();
    assert_eq!(requests, n, "one debug line per request:\n{log}");
    // Fields read as values, not as Rust literals.
    assert!(
        log.lines()
            .any(|l| l.contains("method=GET path=/nowhere status=404 label=")),
        "{log}"
    );
    assert!(!log.contains("path=\""), "{log}");
    assert!(!log.contains("label=\""), "{log}");
}

fn assert_send_clone<T: Send + Clone>() {}

#[test]
fn settings_are_send_and_never_show_the_password() {
    assert_send_clone::<ApiConfig>();
    let settings = ApiConfig {
        statistics_auth: Some(("admin".into(), "s3cret".into())),
        ..ApiConfig::default()
    };
    let shown = format!("{settings:?}");
    assert!(shown.contains("admin"));
    assert!(!shown.contains("s3cret"));
    assert_eq!(settings.max_body, 4096);
}
