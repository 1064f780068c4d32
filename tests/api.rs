//! The HTTP API over real loopback connections: raw HTTP/1.1 written by a plain
//! `std::net::TcpStream` on the test thread, served by `api::serve_connection` on shard 0
//! of a real sharded broker.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::rc::Rc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_lite::future::block_on;
use pushbroker::api::testing::HttpAnswer;
use pushbroker::api::{ApiConfig, ApiContext, serve_connection};
use pushbroker::broker::sharded::{
    ShardId, ShardPlacement, ShardedBroker, ShardedBrokerBuilder, owner_of_channel,
};
use pushbroker::store::InternalChannelId;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// How long the client waits for any answer before the test fails (never reached when
/// the server works).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A broker and the API listening on shard 0.
struct Server {
    broker: ShardedBroker,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.broker.stop_blocking();
    }
}

fn serve(settings: ApiConfig) -> Server {
    let broker = ShardedBrokerBuilder::new(2)
        .placement(ShardPlacement::Unbound)
        .name("api-http")
        .build();
    broker.start().expect("shards start (ulimit -l?)");
    let bound = block_on(
        broker
            .sending()
            .run_task_on(ShardId(0), move |shard| async move {
                let listener =
                    glommio::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
                let addr = listener.local_addr().map_err(|e| e.to_string())?;
                let ctx = Rc::new(ApiContext::new(shard, settings));
                glommio::spawn_local(async move {
                    while let Ok(stream) = listener.accept().await {
                        glommio::spawn_local(serve_connection(stream, Rc::clone(&ctx))).detach();
                    }
                })
                .detach();
                Ok::<_, String>(addr)
            }),
    )
    .expect("shard 0 answers");
    let addr = bound.expect("bound on loopback");
    Server { broker, addr }
}

fn settings() -> ApiConfig {
    ApiConfig {
        delivery_hosts: vec!["127.0.0.1:9443".into()],
        delivery_domain: "push.example.com".into(),
        ..ApiConfig::default()
    }
}

/// A client connection.
struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(server: &Server) -> Self {
        let stream = TcpStream::connect(server.addr).expect("connect");
        stream
            .set_read_timeout(Some(CLIENT_TIMEOUT))
            .expect("read timeout");
        Self {
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, raw: &[u8]) {
        self.reader.get_mut().write_all(raw).expect("write");
    }

    /// Sends a `POST` of a JSON body with its `Content-Length`.
    fn post(&mut self, path: &str, body: &str) -> HttpAnswer {
        self.send(
            format!(
                "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        self.answer()
    }

    fn get(&mut self, path: &str) -> HttpAnswer {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
        self.answer()
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read a line");
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    /// Reads one answer (its body by `Content-Length`).
    fn answer(&mut self) -> HttpAnswer {
        let status_line = self.line();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("a header");
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().expect("a length"))
            .expect("answers have a Content-Length");
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).expect("the body");
        HttpAnswer {
            status,
            headers,
            body: String::from_utf8(body).expect("UTF-8"),
        }
    }

    /// Reads until the server closes; how long that took.
    fn wait_closed(&mut self) -> Duration {
        let start = Instant::now();
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("the server never closed: {e}"),
        }
        start.elapsed()
    }
}

fn later() -> String {
    (OffsetDateTime::now_utc() + Duration::from_secs(3600))
        .format(&Rfc3339)
        .expect("formattable")
}

fn token(device: &str, app: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{app}::{device}"))
}

#[test]
fn register_notify_and_broadcast_over_http() {
    let server = serve(settings());
    let mut client = Client::connect(&server);
    let reg = client.post("/register", r#"{"deviceid":"dev1","appid":"app"}"#);
    assert_eq!(reg.status, 200, "{reg:?}");
    assert_eq!(reg.header("content-type"), Some("application/json"));
    assert_eq!(reg.json()["token"], token("dev1", "app"));
    assert_eq!(reg.json()["ok"], true);

    let mut client = Client::connect(&server);
    let notify = client.post(
        "/notify",
        &format!(
            r#"{{"appid":"app","token":"{}","expire_on":"{}","data":{{"m":1}}}}"#,
            token("dev1", "app"),
            later()
        ),
    );
    assert_eq!(
        (notify.status, notify.body.as_str()),
        (200, r#"{"ok":true}"#)
    );

    let bcast = client.post(
        "/broadcast",
        &format!(
            r#"{{"channel":"system","expire_on":"{}","data":{{"daily/mako":[1]}}}}"#,
            later()
        ),
    );
    assert_eq!((bcast.status, bcast.body.as_str()), (200, r#"{"ok":true}"#));
}

#[test]
fn one_keep_alive_connection_serves_several_requests() {
    let server = serve(settings());
    let mut client = Client::connect(&server);
    let first = client.post("/register", r#"{"deviceid":"a","appid":"app"}"#);
    let second = client.get("/delivery-hosts");
    let third = client.post("/register", r#"{"deviceid":"b","appid":"app"}"#);
    assert_eq!(first.json()["token"], token("a", "app"));
    assert_eq!(second.status, 200);
    assert_eq!(third.json()["token"], token("b", "app"));
    // Pipelined: both written before either is read.
    client.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\nGET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(client.answer().status, 200);
    assert_eq!(client.answer().status, 200);
}

#[test]
fn post_head_errors_over_http() {
    let server = serve(settings());
    let mut client = Client::connect(&server);
    // Chunked: no declared length.
    client.send(
        b"POST /notify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    );
    client
        .answer()
        .assert_error(411, "invalid-request", "A Content-Length must be provided");

    // Neither Content-Length nor Transfer-Encoding: an empty body, by HTTP framing (the
    // original's Go server saw a length of 0 too).
    let mut client = Client::connect(&server);
    client.send(b"POST /notify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\r\n");
    client
        .answer()
        .assert_error(400, "invalid-request", "Request body empty");

    // The method is checked first.
    let mut client = Client::connect(&server);
    client.get("/notify").assert_error(
        405,
        "invalid-request",
        "Wrong request method, should be POST",
    );
    client.send(b"GET /notify HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    client.answer().assert_error(
        405,
        "invalid-request",
        "Wrong request method, should be POST",
    );

    let mut client = Client::connect(&server);
    client.send(
        b"POST /register HTTP/1.1\r\nHost: t\r\nContent-Type: application/jsonp; charset=utf-8\r\nContent-Length: 2\r\n\r\n{}",
    );
    client.answer().assert_error(
        415,
        "invalid-request",
        "Wrong content type, should be application/json",
    );

    let mut client = Client::connect(&server);
    client.send(
        b"POST /register HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n",
    );
    client
        .answer()
        .assert_error(413, "invalid-request", "Request body too large");

    let mut client = Client::connect(&server);
    client
        .post("/register", "[1]")
        .assert_error(400, "invalid-request", "Malformed JSON Object");
    client
        .get("/nope")
        .assert_error(404, "not-found", "Not found");
}

#[test]
fn a_body_written_in_pieces_is_read_whole() {
    let server = serve(settings());
    let mut client = Client::connect(&server);
    let body = r#"{"deviceid":"piecemeal","appid":"app"}"#;
    client.send(
        format!(
            "POST /register HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    // Three writes, each after the server has had time to read the one before: the
    // body reaches the server in several pieces.
    for piece in [&body[..5], &body[5..20], &body[20..]] {
        std::thread::sleep(Duration::from_millis(30));
        client.send(piece.as_bytes());
    }
    let reg = client.answer();
    assert_eq!(reg.status, 200, "{reg:?}");
    assert_eq!(reg.json()["token"], token("piecemeal", "app"));
}

#[test]
fn a_client_that_closes_its_side_after_a_request_still_gets_the_answer() {
    let server = serve(settings());
    // A device of the other shard: the answer waits for that shard.
    let device = (0..)
        .map(|i| format!("half-{i}"))
        .find(|d| owner_of_channel(&InternalChannelId::unicast(d, d), 2) == ShardId(1))
        .expect("some device is shard 1's");
    let mut client = Client::connect(&server);
    let body = format!(
        r#"{{"appid":"app","token":"{}","expire_on":"{}","data":{{"m":1}}}}"#,
        token(&device, "app"),
        later()
    );
    client.send(
        format!(
            "POST /notify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    client
        .reader
        .get_ref()
        .shutdown(Shutdown::Write)
        .expect("half close");
    let answer = client.answer();
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (200, r#"{"ok":true}"#)
    );
}

#[test]
fn a_body_cut_short_is_an_io_error() {
    let server = serve(settings());
    let mut client = Client::connect(&server);
    client.send(
        b"POST /register HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{\"deviceid\":",
    );
    client
        .reader
        .get_ref()
        .shutdown(Shutdown::Write)
        .expect("half close");
    client
        .answer()
        .assert_error(400, "io-error", "Could not read request body");
}

#[test]
fn delivery_hosts_health_and_metrics_over_http() {
    let server = serve(settings());
    let mut client = Client::connect(&server);
    let hosts = client.get("/delivery-hosts");
    assert_eq!(hosts.status, 200);
    assert_eq!(
        hosts.body,
        r#"{"hosts":["127.0.0.1:9443"],"domain":"push.example.com"}"#
    );
    client.post("/delivery-hosts", "{}").assert_error(
        405,
        "invalid-request",
        "Wrong request method, should be GET",
    );

    let health = client.get("/health");
    assert_eq!(
        (health.status, health.body.as_str()),
        (200, r#"{"ok":true,"shards":2}"#)
    );

    let metrics = client.get("/metrics");
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    for line in [
        "# TYPE pushbroker_sessions gauge",
        "pushbroker_sessions{shard=\"0\"} 0",
        "pushbroker_sessions{shard=\"1\"} 0",
        "pushbroker_api_requests_total{shard=\"0\"} 4",
        "pushbroker_api_errors_total{label=\"invalid-request\"} 1",
    ] {
        assert!(
            metrics.body.lines().any(|l| l == line),
            "missing {line:?} in\n{}",
            metrics.body
        );
    }
}

#[test]
fn a_slowloris_connection_is_closed_after_the_header_read_timeout() {
    let timeout = Duration::from_millis(200);
    let server = serve(ApiConfig {
        http_read_timeout: timeout,
        ..settings()
    });
    let mut client = Client::connect(&server);
    let start = Instant::now();
    client.send(b"POST /notify HTTP/1.1\r\nHost: t\r\nContent-");
    std::thread::sleep(Duration::from_millis(50));
    client.send(b"Type: appl");
    client.wait_closed();
    let waited = start.elapsed();
    assert!(
        waited >= timeout - Duration::from_millis(20) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );

    // An idle keep-alive connection is closed the same way, after its answer.
    let mut client = Client::connect(&server);
    assert_eq!(client.get("/health").status, 200);
    let waited = client.wait_closed();
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");

    // A prompt client is not affected.
    let mut client = Client::connect(&server);
    assert_eq!(client.get("/delivery-hosts").status, 200);
}
