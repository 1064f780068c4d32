//! The connection task: connects (`AUTH`, `SELECT`), drives one connection (writes the
//! queued commands, reads and matches the replies) until it is lost, then reconnects
//! with backoff, until the last client handle is dropped.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use futures_lite::future::{self, poll_fn};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use redis_protocol::resp2::decode::decode;
use tracing::{debug, info, warn};

use super::{RedisError, ReplySender, Shared, Unavailable, Value, encode_command, reply_of};
use crate::logging::target;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 << 10;

/// Arrays nested in one reply at most. The codec decodes nested arrays by recursion, so
/// a reply nested deeper is refused before it is decoded: a hostile or broken server must
/// not overflow the shard's stack. Redis's own replies nest a few levels at most.
pub(super) const MAX_NESTING: usize = 64;

/// Reads at most per poll of the connection, before it lets the shard's other tasks run.
const READS_PER_POLL: usize = 16;

/// Connects and reconnects until the client is gone.
pub(super) async fn run(shared: Rc<Shared>) {
    let config = shared.config.clone();
    let mut backoff = config.backoff_min;
    // Whether the last attempt failed too: a streak of failures is logged once.
    let mut failing = false;
    let mut rbuf = Vec::new();
    loop {
        if shared.is_closed() {
            return;
        }
        rbuf.clear();
        let attempt = future::or(establish(&shared.url, &config, &mut rbuf), async {
            glommio::timer::sleep(config.connect_timeout).await;
            Err(format!("not connected within {:?}", config.connect_timeout))
        })
        .await;
        match attempt {
            Ok(mut stream) => {
                failing = false;
                backoff = config.backoff_min;
                shared.connects.set(shared.connects.get() + 1);
                {
                    let mut st = shared.state.borrow_mut();
                    st.connected = true;
                    st.reset = None;
                }
                info!(target: target::BROKER, "redis: connected to {}", shared.url);
                let lost = drive(&shared, &mut stream, &mut rbuf).await;
                fail_pending(&shared, &lost);
                if shared.is_closed() {
                    return;
                }
                warn!(target: target::BROKER, "redis: connection to {} lost ({lost}); reconnecting", shared.url);
                // `stream` is dropped here, closing the socket.
            }
            Err(why) => {
                if failing {
                    debug!(target: target::BROKER, "redis: cannot connect to {}: {why}", shared.url);
                } else {
                    warn!(target: target::BROKER, "redis: cannot connect to {}: {why}; retrying with backoff", shared.url);
                }
                failing = true;
            }
        }
        sleep_unless_closed(&shared, backoff).await;
        if failing {
            backoff = (backoff * 2).min(config.backoff_max);
        }
    }
}

/// Sleeps for `wait`, or less if the client is dropped meanwhile.
async fn sleep_unless_closed(shared: &Shared, wait: Duration) {
    let closed = poll_fn(|cx| {
        let mut st = shared.state.borrow_mut();
        if st.closed {
            Poll::Ready(())
        } else {
            st.driver = Some(cx.waker().clone());
            Poll::Pending
        }
    });
    future::or(closed, glommio::timer::sleep(wait)).await;
    shared.state.borrow_mut().driver = None;
}

/// Marks the connection down and fails every request in flight with `why`.
fn fail_pending(shared: &Shared, why: &Unavailable) {
    let pending: VecDeque<ReplySender> = {
        let mut st = shared.state.borrow_mut();
        st.connected = false;
        st.reset = None;
        st.out.clear();
        st.driver = None;
        std::mem::take(&mut st.pending)
    };
    for slot in pending {
        let _ = slot.try_send(Err(RedisError::Unavailable(why.clone())));
    }
}

/// One attempt: TCP, then `AUTH` and `SELECT` as the URL asks.
pub(super) async fn establish(
    url: &super::RedisUrl,
    config: &super::RedisConfig,
    rbuf: &mut Vec<u8>,
) -> Result<TcpStream, String> {
    let addrs = resolve(&url.host, url.port).await?;
    let mut last = format!("{} resolves to no address", url.host);
    let mut connected = None;
    for addr in addrs {
        match TcpStream::connect_timeout(addr, config.connect_timeout).await {
            Ok(s) => {
                connected = Some(s);
                break;
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    let mut stream = connected.ok_or(last)?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    if let Some(password) = &url.password {
        let mut auth: Vec<&[u8]> = vec![b"AUTH"];
        if let Some(user) = &url.username {
            auth.push(user.as_bytes());
        }
        auth.push(password.as_bytes());
        handshake(&mut stream, rbuf, &auth)
            .await
            .map_err(|e| format!("AUTH: {e}"))?;
    }
    if url.db != 0 {
        let db = url.db.to_string();
        handshake(&mut stream, rbuf, &[b"SELECT", db.as_bytes()])
            .await
            .map_err(|e| format!("SELECT {db}: {e}"))?;
    }
    Ok(stream)
}

/// The addresses of `host`: an IP address as it is, a name looked up on glommio's
/// blocking thread pool (`getaddrinfo` blocks).
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let name = host.to_owned();
    glommio::executor()
        .spawn_blocking(move || {
            (name.as_str(), port)
                .to_socket_addrs()
                .map(|a| a.collect::<Vec<_>>())
        })
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))
}

/// Sends one command on a connection not yet handed to requests, and reads its reply.
async fn handshake(
    stream: &mut TcpStream,
    rbuf: &mut Vec<u8>,
    cmd: &[&[u8]],
) -> Result<Value, String> {
    let mut out = Vec::new();
    encode_command(&mut out, cmd).map_err(|e| e.to_string())?;
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut chunk = [0u8; 512];
    loop {
        if nests_deeper_than(rbuf, MAX_NESTING) {
            return Err(format!("a reply nested over {MAX_NESTING} arrays deep"));
        }
        match decode(rbuf) {
            Ok(Some((frame, n))) => {
                rbuf.drain(..n);
                return reply_of(frame).map_err(|e| e.to_string());
            }
            Ok(None) => {}
            Err(e) => return Err(format!("not a RESP reply: {}", e.details())),
        }
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        rbuf.extend_from_slice(&chunk[..n]);
    }
}

/// Drives a connection until it is lost, a request times out or the client goes: writes
/// what requests queue (all that is queued in one write), reads replies and hands each
/// to the oldest request waiting. Returns why it stopped.
async fn drive(shared: &Shared, stream: &mut TcpStream, rbuf: &mut Vec<u8>) -> Unavailable {
    let lost = |what: &str| Unavailable::ConnectionLost(what.to_owned());
    let mut wbuf: Vec<u8> = Vec::new();
    let mut wpos = 0;
    poll_fn(|cx| {
        {
            let mut st = shared.state.borrow_mut();
            if st.closed {
                return Poll::Ready(lost("client dropped"));
            }
            if let Some(why) = st.reset.take() {
                return Poll::Ready(why);
            }
            // Registered before looking at `out`: a request queued after this poll wakes it.
            st.driver = Some(cx.waker().clone());
        }

        // Write everything queued, as one buffer.
        loop {
            if wpos == wbuf.len() {
                wbuf.clear();
                wpos = 0;
                let mut st = shared.state.borrow_mut();
                if st.out.is_empty() {
                    break;
                }
                std::mem::swap(&mut wbuf, &mut st.out);
            }
            match Pin::new(&mut *stream).poll_write(cx, &wbuf[wpos..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(lost("the socket takes no more bytes")),
                Poll::Ready(Ok(n)) => {
                    wpos += n;
                    shared.writes.set(shared.writes.get() + 1);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(lost(&e.to_string())),
                Poll::Pending => break,
            }
        }

        // Read and hand out replies.
        for _ in 0..READS_PER_POLL {
            let len = rbuf.len();
            rbuf.resize(len + READ_CHUNK, 0);
            match Pin::new(&mut *stream).poll_read(cx, &mut rbuf[len..]) {
                Poll::Ready(Ok(0)) => {
                    rbuf.truncate(len);
                    return Poll::Ready(lost("closed by the server"));
                }
                Poll::Ready(Ok(n)) => {
                    rbuf.truncate(len + n);
                    if let Err(why) = dispatch(shared, rbuf) {
                        return Poll::Ready(why);
                    }
                }
                Poll::Ready(Err(e)) => {
                    rbuf.truncate(len);
                    return Poll::Ready(lost(&e.to_string()));
                }
                Poll::Pending => {
                    rbuf.truncate(len);
                    return Poll::Pending;
                }
            }
        }
        // More to read: let the shard's other tasks run first.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Decodes every whole reply in `rbuf` and hands each to the oldest request waiting;
/// keeps a partial reply for the next read.
fn dispatch(shared: &Shared, rbuf: &mut Vec<u8>) -> Result<(), Unavailable> {
    let mut used = 0;
    let outcome = loop {
        if nests_deeper_than(&rbuf[used..], MAX_NESTING) {
            break Err(Unavailable::Protocol(format!(
                "a reply nested over {MAX_NESTING} arrays deep"
            )));
        }
        match decode(&rbuf[used..]) {
            Ok(Some((frame, n))) => {
                used += n;
                let slot = shared.state.borrow_mut().pending.pop_front();
                match slot {
                    // A request that timed out has dropped its end: nothing to do.
                    Some(slot) => {
                        let _ = slot.try_send(reply_of(frame));
                    }
                    None => {
                        break Err(Unavailable::Protocol("a reply no request asked for".into()));
                    }
                }
            }
            Ok(None) => {
                let partial = rbuf.len() - used;
                if partial > shared.config.max_reply_bytes {
                    break Err(Unavailable::Protocol(format!(
                        "a reply over {} bytes",
                        shared.config.max_reply_bytes
                    )));
                }
                break Ok(());
            }
            Err(e) => {
                break Err(Unavailable::Protocol(format!(
                    "not a RESP reply: {}",
                    e.details()
                )));
            }
        }
    };
    rbuf.drain(..used);
    outcome
}

/// Whether the first reply in `buf` opens more than `max` arrays inside one another, as
/// far as `buf` goes. A guard, not a decoder: it follows only the headers (`*N` opens an
/// array of N elements, `$N` skips N bytes, any other line is one element) and leaves
/// every malformed header to the codec, which refuses it without recursing.
pub(super) fn nests_deeper_than(buf: &[u8], max: usize) -> bool {
    if buf.first() != Some(&b'*') {
        return false;
    }
    // The elements still to come in each open array, outermost first.
    let mut open: Vec<u64> = Vec::new();
    let mut at = 0usize;
    loop {
        if open.len() > max {
            return true;
        }
        let Some(rest) = buf.get(at..) else {
            return false;
        };
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return false;
        };
        let (kind, header) = (rest[0], &rest[1..eol]);
        at += eol + 2;
        let len = || std::str::from_utf8(header).ok()?.parse::<i64>().ok();
        match kind {
            b'*' => match len() {
                Some(n) if n > 0 => {
                    open.push(n.unsigned_abs());
                    continue;
                }
                Some(_) => {} // empty or null: one element
                None => return false,
            },
            b'$' => match len() {
                Some(n) if n >= 0 => {
                    at = at
                        .saturating_add(n.unsigned_abs() as usize)
                        .saturating_add(2)
                }
                Some(_) => {}
                None => return false,
            },
            _ => {}
        }
        // One element is complete: close the arrays it completes.
        loop {
            let Some(left) = open.last_mut() else {
                return false; // the whole reply
            };
            *left -= 1;
            if *left > 0 {
                break;
            }
            open.pop();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn nested(depth: usize, tail: &[u8]) -> Vec<u8> {
        let mut v = b"*1\r\n".repeat(depth);
        v.extend_from_slice(tail);
        v
    }

    #[test]
    fn nesting_is_bounded_before_decoding() {
        assert!(!nests_deeper_than(
            &nested(MAX_NESTING, b":1\r\n"),
            MAX_NESTING
        ));
        assert!(nests_deeper_than(
            &nested(MAX_NESTING + 1, b":1\r\n"),
            MAX_NESTING
        ));
        // Deep but cut short: known to be too deep already.
        assert!(nests_deeper_than(&nested(100_000, b""), MAX_NESTING));
        // Many shallow arrays side by side are fine, and bulk strings are skipped whole
        // (a `*` inside one is data).
        let mut wide = b"*100\r\n".to_vec();
        for _ in 0..100 {
            wide.extend_from_slice(b"*2\r\n$3\r\n*1\r\n$-1\r\n");
        }
        wide.extend_from_slice(&nested(100, b""));
        assert!(!nests_deeper_than(&wide, 3));
        assert!(!nests_deeper_than(b"+OK\r\n", 0));
        assert!(!nests_deeper_than(b"*0\r\n*-1\r\n", 0));
        assert!(!nests_deeper_than(b"*x\r\n", 0));
        // What passes the guard decodes.
        let ok = nested(MAX_NESTING, b":1\r\n");
        assert_eq!(decode(&ok).unwrap().unwrap().1, ok.len());
    }

    #[test]
    fn names_are_resolved_off_the_shard_and_addresses_as_they_are() {
        crate::broker::testing::run_local(|| async {
            let local = resolve("localhost", 7).await.unwrap();
            assert!(
                local.iter().all(|a| a.ip().is_loopback() && a.port() == 7),
                "{local:?}"
            );
            assert_eq!(
                resolve("127.0.0.1", 7).await.unwrap(),
                vec!["127.0.0.1:7".parse::<SocketAddr>().unwrap()]
            );
        });
    }
}
