//! The per-shard Redis client against a real `redis-server` that each test starts on a
//! free loopback port (and kills when done), and against fake servers that send junk:
//! round trips, pipelining many tasks' requests, Redis killed and restarted, timeouts,
//! replies that are not RESP.
//!
//! Tests assert outcomes, never speed: every wait is bounded, generously for a loaded
//! two-core machine. Without `redis-server` (Debian's `redis-server` package; CI
//! installs it) the tests that need it say so and pass.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::rc::Rc;
use std::thread;
use std::time::{Duration, Instant};

use pushbroker::broker::testing::run_local;
use pushbroker::glommio;
use pushbroker::store::redis::{RedisClient, RedisConfig, RedisError, Unavailable, Value};
use support::{PATIENCE, RedisServer};

fn bulk(s: &str) -> Value {
    Value::Bulk(s.as_bytes().to_vec())
}

/// A client connected to `url`, waited for.
async fn connected(url: &str, config: RedisConfig) -> RedisClient {
    let client = RedisClient::with_config(url, config).unwrap();
    assert!(
        client.wait_connected(PATIENCE).await,
        "no connection to {url}"
    );
    client
}

#[test]
fn set_get_round_trip_error_replies_and_db_selection() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let base = server.url();
    run_local(|| async move {
        let client = connected(&base, RedisConfig::default()).await;
        let ok = client.request(&[b"SET", b"greeting", b"hello"]).await;
        assert_eq!(ok, Ok(Value::Status("OK".into())));
        assert_eq!(
            client.request(&[b"GET", b"greeting"]).await,
            Ok(bulk("hello"))
        );
        assert_eq!(client.request(&[b"GET", b"missing"]).await, Ok(Value::Nil));
        // Binary-safe values.
        let odd: &[u8] = b"\r\n\0\xff*$";
        client.request(&[b"SET", b"odd", odd]).await.unwrap();
        assert_eq!(
            client.request(&[b"GET", b"odd"]).await,
            Ok(Value::Bulk(odd.to_vec()))
        );
        // An error reply is Redis's answer, not unavailability; the connection goes on.
        match client.request(&[b"INCR", b"greeting"]).await {
            Err(RedisError::Reply(msg)) => assert!(msg.starts_with("ERR"), "{msg}"),
            other => panic!("INCR of a string: {other:?}"),
        }
        assert_eq!(client.request(&[b"INCR", b"n"]).await, Ok(Value::Int(1)));
        assert_eq!(
            client.request(&[]).await,
            Err(RedisError::InvalidCommand("empty command"))
        );
        assert_eq!(client.stats().connects, 1);

        // /3 selects database 3: what is set there is not in database 0.
        let db3 = connected(&format!("{base}/3"), RedisConfig::default()).await;
        db3.request(&[b"SET", b"where", b"three"]).await.unwrap();
        assert_eq!(db3.request(&[b"GET", b"where"]).await, Ok(bulk("three")));
        assert_eq!(client.request(&[b"GET", b"where"]).await, Ok(Value::Nil));
        // A password Redis does not expect: AUTH fails, so no connection, no panic.
        let bad = RedisClient::connect(&format!("redis://:nope@127.0.0.1:{}", server_port(&base)))
            .unwrap();
        assert!(!bad.wait_connected(Duration::from_millis(300)).await);
        assert!(matches!(
            bad.request(&[b"PING"]).await,
            Err(RedisError::Unavailable(Unavailable::NotConnected))
        ));
    });
}

fn server_port(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn a_thousand_concurrent_requests_are_pipelined_and_answered_in_order() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    run_local(|| async move {
        let config = RedisConfig {
            request_timeout: PATIENCE,
            ..RedisConfig::default()
        };
        let client = connected(&url, config).await;
        let before = client.stats();
        const N: usize = 1000;
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let client = client.clone();
                glommio::spawn_local(async move {
                    let me = i.to_string();
                    // Spawned in order, so queued in order: RPUSH sees 0, 1, 2, …
                    let pushed = client.request(&[b"RPUSH", b"order", me.as_bytes()]).await;
                    let echoed = client.request(&[b"ECHO", me.as_bytes()]).await;
                    (i, pushed, echoed)
                })
            })
            .collect();
        for task in tasks {
            let (i, pushed, echoed) = task.await;
            assert!(
                matches!(pushed, Ok(Value::Int(n)) if n >= 1),
                "{i}: {pushed:?}"
            );
            assert_eq!(
                echoed,
                Ok(bulk(&i.to_string())),
                "task {i} got another's reply"
            );
        }
        let listed = client
            .request(&[b"LRANGE", b"order", b"0", b"-1"])
            .await
            .unwrap();
        let want: Vec<Value> = (0..N).map(|i| bulk(&i.to_string())).collect();
        assert_eq!(listed, Value::Array(want));

        let after = client.stats();
        let requests = after.requests - before.requests;
        let writes = after.writes - before.writes;
        assert_eq!(requests, 2 * N as u64 + 1);
        assert!(
            writes * 10 < requests,
            "{requests} requests took {writes} writes: not pipelined"
        );
        assert_eq!(after.connects, 1);
    });
}

#[test]
fn redis_killed_means_unavailable_and_a_restart_reconnects() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    let timeout = Duration::from_secs(3);
    let (server_tx, server_rx) = flume::unbounded::<&'static str>();
    let (done_tx, done_rx) = flume::unbounded::<()>();
    // The server is killed and restarted from another thread when the client asks.
    let killer = thread::spawn(move || {
        for order in server_rx.iter() {
            match order {
                "kill" => server.kill(),
                "restart" => server.restart(),
                _ => break,
            }
            done_tx.send(()).unwrap();
        }
    });
    let order = |what: &'static str| {
        let (server_tx, done_rx) = (server_tx.clone(), done_rx.clone());
        async move {
            server_tx.send(what).unwrap();
            done_rx.recv_async().await.unwrap();
        }
    };
    run_local(|| async move {
        let config = RedisConfig {
            request_timeout: timeout,
            backoff_max: Duration::from_millis(200),
            ..RedisConfig::default()
        };
        let client = Rc::new(connected(&url, config).await);
        client.request(&[b"SET", b"k", b"before"]).await.unwrap();

        // In flight when Redis dies: BLPOP on an empty list waits until then.
        let blocked = {
            let client = Rc::clone(&client);
            glommio::spawn_local(async move {
                let started = Instant::now();
                let got = client.request(&[b"BLPOP", b"empty", b"0"]).await;
                (got, started.elapsed())
            })
        };
        glommio::timer::sleep(Duration::from_millis(200)).await;
        order("kill").await;
        let (got, took) = blocked.await;
        assert!(
            matches!(
                got,
                Err(RedisError::Unavailable(Unavailable::ConnectionLost(_)))
            ),
            "{got:?}"
        );
        assert!(
            took < timeout,
            "the lost connection was noticed only after {took:?}"
        );

        // While Redis is down, requests fail at once, and keep failing, without panic.
        for _ in 0..20 {
            let started = Instant::now();
            let got = client.request(&[b"GET", b"k"]).await;
            assert!(
                got.as_ref().is_err_and(RedisError::is_unavailable),
                "{got:?}"
            );
            assert!(started.elapsed() <= timeout + Duration::from_secs(1));
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        assert!(!client.is_connected());

        // Back on the same port (empty: nothing is saved): the client reconnects.
        order("restart").await;
        assert!(client.wait_connected(PATIENCE).await, "no reconnection");
        assert_eq!(client.request(&[b"GET", b"k"]).await, Ok(Value::Nil));
        client.request(&[b"SET", b"k", b"after"]).await.unwrap();
        assert_eq!(client.request(&[b"GET", b"k"]).await, Ok(bulk("after")));
        assert_eq!(client.stats().connects, 2);
    });
    server_tx.send("stop").unwrap();
    killer.join().unwrap();
}

#[test]
fn a_request_unanswered_in_time_fails_and_the_connection_is_remade() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    run_local(|| async move {
        let timeout = Duration::from_millis(300);
        let config = RedisConfig {
            request_timeout: timeout,
            ..RedisConfig::default()
        };
        let client = connected(&url, config).await;
        let started = Instant::now();
        let got = client.request(&[b"BLPOP", b"empty", b"0"]).await;
        assert_eq!(got, Err(Unavailable::Timeout(timeout).into()));
        assert!(started.elapsed() >= timeout);
        // The stalled connection is dropped and a new one made; it serves again.
        let deadline = Instant::now() + PATIENCE;
        while client.stats().connects < 2 && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        assert!(client.wait_connected(PATIENCE).await);
        assert_eq!(client.stats().connects, 2);
        assert_eq!(
            client.request(&[b"PING"]).await,
            Ok(Value::Status("PONG".into()))
        );
    });
}

#[test]
fn redis_down_from_the_start_is_no_error_until_it_comes_up() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    server.kill();
    let url = server.url();
    let (up_tx, up_rx) = flume::bounded::<()>(1);
    let (ready_tx, ready_rx) = flume::bounded::<()>(1);
    let starter = thread::spawn(move || {
        up_rx.recv().unwrap();
        assert!(server.spawn(), "redis-server did not start again");
        ready_tx.send(()).unwrap();
        server
    });
    run_local(|| async move {
        let client = RedisClient::connect(&url).unwrap();
        glommio::timer::sleep(Duration::from_millis(300)).await;
        assert!(matches!(
            client.request(&[b"PING"]).await,
            Err(RedisError::Unavailable(Unavailable::NotConnected))
        ));
        up_tx.send_async(()).await.unwrap();
        ready_rx.recv_async().await.unwrap();
        assert!(client.wait_connected(PATIENCE).await);
        assert_eq!(
            client.request(&[b"PING"]).await,
            Ok(Value::Status("PONG".into()))
        );
    });
    drop(starter.join().unwrap());
}

/// A fake server on its own thread: accepts one connection, reads a little, sends
/// `junk`, then holds the connection until the client closes it (or 5 s pass).
fn fake_server(junk: Vec<u8>) -> (String, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let handle = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let _ = conn.read(&mut buf);
        let _ = conn.write_all(&junk);
        while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
    });
    (url, handle)
}

#[test]
fn replies_that_are_not_resp_are_errors_not_panics() {
    let mut nested = Vec::new();
    for _ in 0..100_000 {
        nested.extend_from_slice(b"*1\r\n");
    }
    let cases: Vec<(&str, Vec<u8>, RedisConfig)> = vec![
        (
            "an HTTP answer",
            b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
            RedisConfig::default(),
        ),
        (
            "a bad length",
            b"$-7\r\nxx\r\n".to_vec(),
            RedisConfig::default(),
        ),
        (
            "a reply over the limit",
            [b"$100000\r\n".as_slice(), &[b'x'; 4096]].concat(),
            RedisConfig {
                max_reply_bytes: 1024,
                ..RedisConfig::default()
            },
        ),
        ("arrays nested 100,000 deep", nested, RedisConfig::default()),
    ];
    for (what, junk, config) in cases {
        let (url, server) = fake_server(junk);
        run_local(|| async move {
            let client = connected(&url, config).await;
            let got = client.request(&[b"PING"]).await;
            assert!(
                matches!(got, Err(RedisError::Unavailable(Unavailable::Protocol(_)))),
                "{what}: {got:?}"
            );
        });
        server.join().unwrap();
    }
}
