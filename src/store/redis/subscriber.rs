//! A Redis pub/sub subscriber for one shard: its own connection (a subscribed connection
//! takes no other commands), subscribed to a fixed set of channels and sharded channels,
//! remade with backoff when lost, its messages handed to the shard through a bounded
//! channel.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;
use std::task::{Poll, Waker};

use futures_lite::future::{self, poll_fn};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;
use tracing::{debug, info, warn};

use super::conn::{MAX_NESTING, establish, nests_deeper_than};
use super::{RedisConfig, RedisError, RedisUrl, encode_command};
use crate::logging::target;

/// What a subscriber hands on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// A connection is up and every subscription confirmed (after each reconnection too):
    /// messages published while no connection was up are lost, so whoever relies on them
    /// resynchronises now.
    Subscribed,
    /// A message published on `channel` (a plain or a sharded channel).
    Message {
        /// The channel it was published on.
        channel: Vec<u8>,
        /// What was published.
        payload: Vec<u8>,
    },
}

/// Messages a subscriber holds for its consumer at most before it stops reading the
/// socket (Redis then buffers, up to its `client-output-buffer-limit` for pub/sub, and
/// drops the connection past it: the resubscription is then a [`Push::Subscribed`]).
const QUEUE: usize = 65_536;

/// How long a subscribed connection may stay silent before it is sent a PING, and how
/// long the PING may go unanswered before the connection is dropped and remade.
const IDLE_PING: std::time::Duration = std::time::Duration::from_secs(5);

/// A subscriber's connection, ended when the handle is dropped.
pub struct RedisSubscriber {
    shared: Rc<SubShared>,
}

struct SubShared {
    url: RedisUrl,
    config: RedisConfig,
    closed: Cell<bool>,
    /// The connection task while it waits; woken to end.
    waker: RefCell<Option<Waker>>,
    connects: Cell<u64>,
}

impl fmt::Debug for RedisSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSubscriber")
            .field("url", &self.shared.url)
            .field("connects", &self.shared.connects.get())
            .finish()
    }
}

impl Drop for RedisSubscriber {
    fn drop(&mut self) {
        self.shared.closed.set(true);
        if let Some(w) = self.shared.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

impl RedisSubscriber {
    /// Subscribes to `channels` (`SUBSCRIBE`) and `sharded` (`SSUBSCRIBE`, Redis 7) at the
    /// Redis of `url`, connecting in the background with the backoff of `config`; the
    /// receiver gets a [`Push::Subscribed`] per connection, then its messages.
    ///
    /// # Errors
    /// [`RedisError::InvalidUrl`] for a URL the client cannot use.
    ///
    /// # Panics
    /// Outside a glommio executor (the connection task runs on the caller's).
    pub fn start(
        url: &str,
        config: RedisConfig,
        channels: Vec<Vec<u8>>,
        sharded: Vec<Vec<u8>>,
    ) -> Result<(Self, flume::Receiver<Push>), RedisError> {
        let shared = Rc::new(SubShared {
            url: RedisUrl::parse(url)?,
            config,
            closed: Cell::new(false),
            waker: RefCell::new(None),
            connects: Cell::new(0),
        });
        let (tx, rx) = flume::bounded(QUEUE);
        glommio::spawn_local(run(Rc::clone(&shared), channels, sharded, tx)).detach();
        Ok((Self { shared }, rx))
    }

    /// Connections made so far.
    pub fn connects(&self) -> u64 {
        self.shared.connects.get()
    }
}

/// Resolves once the handle is dropped.
async fn closed(shared: &SubShared) {
    poll_fn(|cx| {
        if shared.closed.get() {
            Poll::Ready(())
        } else {
            *shared.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await;
}

async fn run(
    shared: Rc<SubShared>,
    channels: Vec<Vec<u8>>,
    sharded: Vec<Vec<u8>>,
    tx: flume::Sender<Push>,
) {
    let mut backoff = shared.config.backoff_min;
    let mut failing = false;
    let mut rbuf = Vec::new();
    while !shared.closed.get() {
        rbuf.clear();
        let outcome = future::or(
            async { Some(session(&shared, &channels, &sharded, &tx, &mut rbuf).await) },
            async {
                closed(&shared).await;
                None
            },
        )
        .await;
        let Some(outcome) = outcome else { return };
        match outcome {
            Ok(why) => {
                failing = false;
                backoff = shared.config.backoff_min;
                if tx.is_disconnected() {
                    return;
                }
                warn!(target: target::BROKER, "redis: subscription to {} lost ({why}); resubscribing", shared.url);
            }
            Err(why) => {
                if failing {
                    debug!(target: target::BROKER, "redis: cannot subscribe at {}: {why}", shared.url);
                } else {
                    warn!(target: target::BROKER, "redis: cannot subscribe at {}: {why}; retrying with backoff", shared.url);
                }
                failing = true;
            }
        }
        future::or(glommio::timer::sleep(backoff), closed(&shared)).await;
        if failing {
            backoff = (backoff * 2).min(shared.config.backoff_max);
        }
    }
}

/// One connection: subscribes, then forwards messages until it is lost. `Err` when it
/// never got subscribed, `Ok(why)` when an established subscription ended.
async fn session(
    shared: &SubShared,
    channels: &[Vec<u8>],
    sharded: &[Vec<u8>],
    tx: &flume::Sender<Push>,
    rbuf: &mut Vec<u8>,
) -> Result<String, String> {
    let config = &shared.config;
    let mut stream = future::or(establish(&shared.url, config, rbuf), async {
        glommio::timer::sleep(config.connect_timeout).await;
        Err(format!("not connected within {:?}", config.connect_timeout))
    })
    .await?;
    let mut out = Vec::new();
    for (verb, names) in [(&b"SUBSCRIBE"[..], channels), (b"SSUBSCRIBE", sharded)] {
        if names.is_empty() {
            continue;
        }
        let mut cmd: Vec<&[u8]> = vec![verb];
        cmd.extend(names.iter().map(Vec::as_slice));
        encode_command(&mut out, &cmd).map_err(|e| e.to_string())?;
    }
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut unconfirmed = channels.len() + sharded.len();
    let mut subscribed = false;
    if unconfirmed == 0 {
        subscribed = true;
        let _ = tx.send_async(Push::Subscribed).await;
    }
    let mut chunk = vec![0u8; 16 << 10];
    let mut ping_sent = false;
    loop {
        // Every whole frame in the buffer.
        loop {
            if nests_deeper_than(rbuf, MAX_NESTING) {
                return fail(subscribed, "a reply nested too deep".into());
            }
            let (frame, n) = match decode(rbuf) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => {
                    if rbuf.len() > config.max_reply_bytes {
                        return fail(subscribed, "a message over the reply limit".into());
                    }
                    break;
                }
                Err(e) => return fail(subscribed, format!("not RESP: {}", e.details())),
            };
            rbuf.drain(..n);
            match classify(frame) {
                Frame::Confirmed => {
                    unconfirmed = unconfirmed.saturating_sub(1);
                    if unconfirmed == 0 && !subscribed {
                        subscribed = true;
                        shared.connects.set(shared.connects.get() + 1);
                        info!(target: target::BROKER, "redis: subscribed at {}", shared.url);
                        if tx.send_async(Push::Subscribed).await.is_err() {
                            return Ok("nobody reads the messages".into());
                        }
                    }
                }
                Frame::Message(push) => {
                    if tx.send_async(push).await.is_err() {
                        return Ok("nobody reads the messages".into());
                    }
                }
                Frame::Refused(e) => return fail(subscribed, format!("refused: {e}")),
                Frame::Other => {}
            }
        }
        // A connection that stays silent is asked for a PING (allowed while subscribed);
        // one that does not answer it is dead (a half-open TCP connection would
        // otherwise keep the shard deaf for good).
        let read = future::or(async { Some(stream.read(&mut chunk).await) }, async {
            glommio::timer::sleep(IDLE_PING).await;
            None
        })
        .await;
        let Some(read) = read else {
            if ping_sent {
                return fail(
                    subscribed,
                    format!("no answer to PING within {IDLE_PING:?}"),
                );
            }
            let mut ping = Vec::new();
            encode_command(&mut ping, &[b"PING"]).map_err(|e| e.to_string())?;
            if let Err(e) = stream.write_all(&ping).await {
                return fail(subscribed, e.to_string());
            }
            ping_sent = true;
            continue;
        };
        ping_sent = false;
        let n = read
            .map_err(|e| e.to_string())
            .or_else(|e| fail(subscribed, e).map(|_| 0))?;
        if n == 0 {
            return fail(subscribed, "closed by the server".into());
        }
        rbuf.extend_from_slice(&chunk[..n]);
    }
}

fn fail(subscribed: bool, why: String) -> Result<String, String> {
    if subscribed { Ok(why) } else { Err(why) }
}

enum Frame {
    Confirmed,
    Message(Push),
    Refused(String),
    Other,
}

fn classify(frame: OwnedFrame) -> Frame {
    let OwnedFrame::Array(items) = frame else {
        return match frame {
            OwnedFrame::Error(e) => Frame::Refused(e),
            _ => Frame::Other,
        };
    };
    let mut items = items.into_iter();
    let kind = match items.next() {
        Some(OwnedFrame::BulkString(k)) | Some(OwnedFrame::SimpleString(k)) => k,
        _ => return Frame::Other,
    };
    match &kind[..] {
        b"subscribe" | b"ssubscribe" => Frame::Confirmed,
        b"message" | b"smessage" => match (items.next(), items.next()) {
            (Some(OwnedFrame::BulkString(channel)), Some(OwnedFrame::BulkString(payload))) => {
                Frame::Message(Push::Message { channel, payload })
            }
            _ => Frame::Other,
        },
        _ => Frame::Other,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> OwnedFrame {
        OwnedFrame::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn frames_are_told_apart() {
        assert!(matches!(
            classify(OwnedFrame::Array(vec![
                bulk("ssubscribe"),
                bulk("c"),
                OwnedFrame::Integer(1)
            ])),
            Frame::Confirmed
        ));
        match classify(OwnedFrame::Array(vec![
            bulk("smessage"),
            bulk("c"),
            bulk("hi"),
        ])) {
            Frame::Message(Push::Message { channel, payload }) => {
                assert_eq!(channel, b"c");
                assert_eq!(payload, b"hi");
            }
            _ => panic!("not a message"),
        }
        assert!(matches!(
            classify(OwnedFrame::Error("ERR unknown command".into())),
            Frame::Refused(_)
        ));
        // Malformed messages are skipped, not fatal.
        assert!(matches!(
            classify(OwnedFrame::Array(vec![
                bulk("message"),
                OwnedFrame::Integer(3)
            ])),
            Frame::Other
        ));
        assert!(matches!(classify(OwnedFrame::Integer(1)), Frame::Other));
    }
}
