//! A Redis client for one shard: one pipelined connection per [`RedisClient`], made and
//! remade by a task on the shard's glommio executor, with no runtime of its own.
//!
//! # The codec
//!
//! RESP is framed by [`redis_protocol`] (its RESP2 `decode` and `encode_borrowed`), and
//! the bytes move over glommio's own [`TcpStream`](glommio::net::TcpStream). That crate
//! is the codec under `fred`, kept by its author, with RESP2 and RESP3, and it is
//! sans-IO: plain functions over byte slices, so nothing in it needs tokio, spawns a task
//! or blocks (its tokio codec is a feature left off). The full clients were set aside:
//! `redis` (redis-rs) runs its async connections on tokio, async-std or smol only, and
//! `fred` on tokio; either would put a second runtime on a shard. A codec crate rather
//! than a parser written here, because RESP's corner cases (nulls, nested arrays, lengths
//! split across reads) are where hand-written parsers go wrong, and this one is fuzzed
//! and used in production.
//!
//! # Pipelining
//!
//! [`RedisClient::request`] encodes its command into the connection's outgoing buffer,
//! queues a reply slot and wakes the connection task; the task runs after the tasks
//! already runnable, so every command queued in the meantime goes out in the same write.
//! Redis answers in order, so replies are matched to slots first in, first out.
//! [`RedisClient::stats`] counts requests and writes.
//!
//! # Failures
//!
//! No failure panics or hangs. A request made while no connection is up fails at once
//! with [`RedisError::Unavailable`]; so do the requests in flight when the connection is
//! lost (end of stream, an I/O error, a reply that is not RESP, a reply with no request
//! waiting for it). A request not answered within
//! [`RedisConfig::request_timeout`] fails with [`Unavailable::Timeout`] and the
//! connection is dropped and remade: every reply queued behind a stalled one is stuck
//! too, and a connection that stopped answering must not collect requests without bound.
//! The connection task reconnects with exponential backoff
//! ([`RedisConfig::backoff_min`] doubling up to [`RedisConfig::backoff_max`]), from the
//! moment the client is made, so a Redis that is down at start-up is no error either.
//! [`RedisError::Reply`] is Redis's own error reply (`-ERR …`): the connection is fine.
//! The codec decodes nested arrays by recursion, so a reply nested more than 64 arrays
//! deep is refused (a protocol error) before it is decoded, and one longer than
//! [`RedisConfig::max_reply_bytes`] too: a broken server costs a reconnection, not the
//! shard's stack or memory.
//!
//! The host name in the URL is resolved on glommio's blocking thread pool (an IP address
//! needs no resolution), so no lookup blocks the shard.

mod conn;
mod subscriber;
mod url;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::rc::Rc;
use std::task::Waker;
use std::time::{Duration, Instant};

use redis_protocol::resp2::types::BorrowedFrame;
use smallvec::SmallVec;
use thiserror::Error;

pub use subscriber::{Push, RedisSubscriber};
pub use url::{DEFAULT_PORT, RedisUrl};

/// A reply from Redis, other than an error reply (see [`RedisError::Reply`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// A null bulk string or null array (`GET` of a missing key).
    Nil,
    /// An integer reply.
    Int(i64),
    /// A simple string (`+OK`), as text.
    Status(String),
    /// A bulk string.
    Bulk(Vec<u8>),
    /// An array of replies.
    Array(Vec<Value>),
    /// An error nested in an array (`EXEC`'s failed commands); an error reply at the top
    /// is [`RedisError::Reply`].
    Error(String),
}

/// Why a request got no reply from Redis: each means the service cannot be used now
/// (the API answers 503), and none means the request was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Unavailable {
    /// No connection is up: the client is between attempts to connect.
    #[error("not connected")]
    NotConnected,
    /// No reply within the request timeout; the connection is remade.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The connection ended or failed while the request was in flight.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// Redis sent something that is not a RESP reply (or a reply nobody asked for);
    /// the connection is dropped and remade.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// Why a request, or making a client, failed.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RedisError {
    /// Redis could not be reached or did not answer: map to 503.
    #[error("redis unavailable: {0}")]
    Unavailable(#[from] Unavailable),
    /// Redis answered with an error reply (`-ERR …`, `-WRONGTYPE …`).
    #[error("redis error reply: {0}")]
    Reply(String),
    /// The command cannot be sent (an empty command would get no reply).
    #[error("invalid redis command: {0}")]
    InvalidCommand(&'static str),
    /// The URL is not one this client can use.
    #[error("invalid redis url: {0}")]
    InvalidUrl(String),
}

impl RedisError {
    /// Whether Redis could not be used now (connection down, timeout, garbage): what the
    /// API answers with 503, the request not having been refused.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Timeouts, backoff and limits of a [`RedisClient`].
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// How long a request waits for its reply before it fails with
    /// [`Unavailable::Timeout`] (and the connection is remade).
    pub request_timeout: Duration,
    /// How long one attempt to connect (TCP, `AUTH`, `SELECT`) may take.
    pub connect_timeout: Duration,
    /// The wait before the first attempt to reconnect; it doubles with each failure.
    pub backoff_min: Duration,
    /// The longest wait between attempts to reconnect.
    pub backoff_max: Duration,
    /// Bytes of one reply at most; a longer one drops the connection as a protocol error
    /// (it bounds what a broken or hostile server can make the shard buffer).
    pub max_reply_bytes: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            max_reply_bytes: 64 << 20,
        }
    }
}

/// Counters of a [`RedisClient`] since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedisStats {
    /// Requests sent (those failed at once for want of a connection are not counted).
    pub requests: u64,
    /// Writes to the socket: with pipelining, far fewer than requests under load.
    pub writes: u64,
    /// Connections made (the first one included).
    pub connects: u64,
}

/// A per-shard Redis client: one pipelined connection, remade when lost.
///
/// Made on a glommio executor, it is used by any task of that executor (it is neither
/// `Send` nor `Sync`; clones share the connection). The connection task ends when the
/// last clone is dropped.
#[derive(Clone)]
pub struct RedisClient {
    handle: Rc<Handle>,
}

/// Closes the connection when the last [`RedisClient`] clone goes.
struct Handle {
    shared: Rc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// What the client's clones and its connection task share.
struct Shared {
    url: RedisUrl,
    config: RedisConfig,
    state: RefCell<State>,
    requests: Cell<u64>,
    writes: Cell<u64>,
    connects: Cell<u64>,
}

/// A request's reply slot: the connection task sends the reply, the request waits on it.
type ReplySender = flume::Sender<Result<Value, RedisError>>;

/// The connection's state. Borrowed only for short, synchronous steps, never across an
/// `.await`.
#[derive(Default)]
struct State {
    /// A connection is up and past `AUTH`/`SELECT`: requests may be queued.
    connected: bool,
    /// The last client handle is gone: the connection task ends.
    closed: bool,
    /// A request timed out: the connection task drops the connection.
    reset: Option<Unavailable>,
    /// Encoded commands not yet handed to the socket.
    out: Vec<u8>,
    /// One reply slot per command sent or queued, in order.
    pending: VecDeque<ReplySender>,
    /// The connection task, when it waits for work, a reset or the end.
    driver: Option<Waker>,
}

impl Shared {
    fn close(&self) {
        let waker = {
            let mut st = self.state.borrow_mut();
            st.closed = true;
            st.driver.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn wake_driver(&self) {
        let waker = self.state.borrow_mut().driver.take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn is_closed(&self) -> bool {
        self.state.borrow().closed
    }
}

impl RedisClient {
    /// A client of the Redis at `url` (`redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`),
    /// with the default [`RedisConfig`]. See [`RedisClient::with_config`].
    pub fn connect(url: &str) -> Result<Self, RedisError> {
        Self::with_config(url, RedisConfig::default())
    }

    /// A client of the Redis at `url`, connecting in the background: the only error is
    /// a URL it cannot use. Requests fail with [`Unavailable::NotConnected`] until the
    /// first connection is up ([`RedisClient::wait_connected`] waits for it).
    ///
    /// # Panics
    ///
    /// Outside a glommio executor, as `glommio::spawn_local` does: the connection task
    /// runs on the executor that makes the client.
    pub fn with_config(url: &str, config: RedisConfig) -> Result<Self, RedisError> {
        let url = RedisUrl::parse(url)?;
        let shared = Rc::new(Shared {
            url,
            config,
            state: RefCell::new(State::default()),
            requests: Cell::new(0),
            writes: Cell::new(0),
            connects: Cell::new(0),
        });
        glommio::spawn_local(conn::run(Rc::clone(&shared))).detach();
        Ok(Self {
            handle: Rc::new(Handle { shared }),
        })
    }

    /// Sends one command (`&[b"SET", b"k", b"v"]`) and waits for its reply, pipelined
    /// with every other request of this client.
    ///
    /// Fails at once with [`Unavailable::NotConnected`] while no connection is up, with
    /// [`Unavailable::Timeout`] after [`RedisConfig::request_timeout`], with another
    /// [`Unavailable`] if the connection is lost first, and with [`RedisError::Reply`] if
    /// Redis answers with an error.
    pub async fn request(&self, cmd: &[&[u8]]) -> Result<Value, RedisError> {
        if cmd.is_empty() {
            return Err(RedisError::InvalidCommand("empty command"));
        }
        let shared = &self.handle.shared;
        let reply = {
            let mut st = shared.state.borrow_mut();
            if !st.connected {
                return Err(Unavailable::NotConnected.into());
            }
            let was_idle = st.out.is_empty();
            encode_command(&mut st.out, cmd)?;
            let (tx, rx) = flume::bounded(1);
            st.pending.push_back(tx);
            if was_idle && let Some(w) = st.driver.take() {
                w.wake();
            }
            rx
        };
        shared.requests.set(shared.requests.get() + 1);
        let timeout = shared.config.request_timeout;
        let answered = futures_lite::future::or(async { Some(reply.recv_async().await) }, async {
            glommio::timer::sleep(timeout).await;
            None
        })
        .await;
        match answered {
            Some(Ok(result)) => result,
            // The slot was dropped unanswered: the connection went first.
            Some(Err(_)) => Err(Unavailable::ConnectionLost("reply dropped".into()).into()),
            None => {
                {
                    let mut st = shared.state.borrow_mut();
                    if st.connected && st.reset.is_none() {
                        st.reset = Some(Unavailable::Timeout(timeout));
                    }
                }
                shared.wake_driver();
                Err(Unavailable::Timeout(timeout).into())
            }
        }
    }

    /// Whether a connection is up (past `AUTH` and `SELECT`) now.
    pub fn is_connected(&self) -> bool {
        self.handle.shared.state.borrow().connected
    }

    /// Waits until a connection is up, for `within` at most; whether one is.
    pub async fn wait_connected(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.is_connected() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            glommio::timer::sleep((deadline - now).min(Duration::from_millis(5))).await;
        }
    }

    /// The counters since the client was made.
    pub fn stats(&self) -> RedisStats {
        let s = &self.handle.shared;
        RedisStats {
            requests: s.requests.get(),
            writes: s.writes.get(),
            connects: s.connects.get(),
        }
    }

    /// The URL the client connects to (its password hidden when shown).
    pub fn url(&self) -> &RedisUrl {
        &self.handle.shared.url
    }
}

/// A Lua script run with `EVALSHA` by its SHA-1, computed here; when Redis does not know
/// it (`NOSCRIPT`: a restarted or flushed Redis, or its first use) it is sent once with
/// `EVAL`, which also makes Redis keep it.
#[derive(Debug, Clone)]
pub struct Script {
    body: &'static str,
    /// Its SHA-1, in lowercase hex as Redis names scripts.
    sha: String,
}

impl Script {
    /// The script with this Lua text.
    pub fn new(body: &'static str) -> Self {
        Self {
            body,
            sha: sha1_smol::Sha1::from(body).digest().to_string(),
        }
    }

    /// Its SHA-1 as Redis names it.
    pub fn sha(&self) -> &str {
        &self.sha
    }
}

impl RedisClient {
    /// Runs `script` with `keys` and `args`, pipelined like any request.
    ///
    /// # Errors
    /// As [`RedisClient::request`]; the script's own errors are [`RedisError::Reply`].
    pub async fn eval(
        &self,
        script: &Script,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> Result<Value, RedisError> {
        let nkeys = keys.len().to_string();
        let mut cmd: SmallVec<[&[u8]; 12]> = SmallVec::new();
        cmd.extend_from_slice(&[b"EVALSHA", script.sha.as_bytes(), nkeys.as_bytes()]);
        cmd.extend_from_slice(keys);
        cmd.extend_from_slice(args);
        match self.request(&cmd).await {
            Err(RedisError::Reply(e)) if e.starts_with("NOSCRIPT") => {
                cmd[0] = b"EVAL";
                cmd[1] = script.body.as_bytes();
                self.request(&cmd).await
            }
            other => other,
        }
    }
}

impl fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisClient")
            .field("url", &self.handle.shared.url)
            .field("connected", &self.is_connected())
            .field("stats", &self.stats())
            .finish()
    }
}

/// Appends `cmd` as a RESP array of bulk strings to `out`.
fn encode_command(out: &mut Vec<u8>, cmd: &[&[u8]]) -> Result<(), RedisError> {
    let args: SmallVec<[BorrowedFrame<'_>; 8]> =
        cmd.iter().map(|a| BorrowedFrame::BulkString(a)).collect();
    let frame = BorrowedFrame::Array(&args);
    let start = out.len();
    out.resize(start + frame.encode_len(false), 0);
    match redis_protocol::resp2::encode::encode_borrowed(&mut out[start..], &frame, false) {
        Ok(n) => {
            out.truncate(start + n);
            Ok(())
        }
        Err(_) => {
            out.truncate(start);
            Err(RedisError::InvalidCommand("cannot encode"))
        }
    }
}

/// A decoded reply as a [`Value`], or Redis's error reply.
fn reply_of(frame: redis_protocol::resp2::types::OwnedFrame) -> Result<Value, RedisError> {
    use redis_protocol::resp2::types::OwnedFrame;
    match frame {
        OwnedFrame::Error(e) => Err(RedisError::Reply(e)),
        other => Ok(value_of(other)),
    }
}

fn value_of(frame: redis_protocol::resp2::types::OwnedFrame) -> Value {
    use redis_protocol::resp2::types::OwnedFrame;
    match frame {
        OwnedFrame::Null => Value::Nil,
        OwnedFrame::Integer(i) => Value::Int(i),
        OwnedFrame::SimpleString(s) => Value::Status(String::from_utf8_lossy(&s).into_owned()),
        OwnedFrame::BulkString(b) => Value::Bulk(b),
        OwnedFrame::Array(items) => Value::Array(items.into_iter().map(value_of).collect()),
        OwnedFrame::Error(e) => Value::Error(e),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode_command(&mut out, &[b"SET", b"k", b""]).unwrap();
        encode_command(&mut out, &[b"GET", b"k"]).unwrap();
        assert_eq!(
            out,
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        );
    }

    #[test]
    fn replies_become_values() {
        let wire = b"*4\r\n+OK\r\n:-7\r\n$-1\r\n-ERR x\r\n+partial";
        let (frame, n) = redis_protocol::resp2::decode::decode(wire)
            .unwrap()
            .unwrap();
        assert_eq!(n, wire.len() - b"+partial".len());
        assert_eq!(
            reply_of(frame),
            Ok(Value::Array(vec![
                Value::Status("OK".into()),
                Value::Int(-7),
                Value::Nil,
                Value::Error("ERR x".into()),
            ]))
        );
        let (frame, _) = redis_protocol::resp2::decode::decode(b"-WRONGTYPE no\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            reply_of(frame),
            Err(RedisError::Reply("WRONGTYPE no".into()))
        );
    }
}
