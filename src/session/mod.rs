//! The per-device session loop: the hello (version byte and CONNECT), CONNACK,
//! registration, then pings and exchanges until the session ends (docs/protocol.md §1.4).
//!
//! Everything here is generic over the device stream (any futures-io
//! `AsyncRead + AsyncWrite`: a glommio `TcpStream`, a TLS stream, the in-memory pipe of
//! `testing`, with the `testing` feature) and over a [`SessionClock`], so tests drive
//! sessions with virtual time (`testing::VirtualClock`) and never sleep.
//!
//! # Memory
//!
//! A session's future lives as long as its connection, and a shard holds hundreds of
//! thousands of them, so the future holds no buffer of its own beyond a small `Vec` of
//! the bytes that arrived and were not consumed yet. Reads go through one per-thread
//! 64 KiB scratch buffer, borrowed only inside a `poll` (the notes' scratch-buffer
//! pattern), and only what arrived is appended to the session's `Vec`. Timers are made
//! only while something waits on them.
//!
//! # Ends
//!
//! A session always ends with a [`SessionEnd`], whose `Display` is the `REASON` of the
//! log line `session(ID) ended with: REASON`. [`read_hello`] and [`run`] do not log that
//! line nor close the stream: the caller (the listener) does both, since it also ends
//! sessions that never got this far (a failed TLS handshake).

#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod wire;

#[cfg(test)]
mod tests;

use std::fmt;
use std::future::{Future, poll_fn};
use std::io as stdio;
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncWrite};
use thiserror::Error;

use crate::broker::{
    Broker, BrokerError, BrokerSession, ErrAbort, Exchange, Next, Prepared, SessionTracker,
};
use crate::config::format_go_duration;
use crate::protocol::{
    ConnAckMsg, ConnAckParams, ConnectMsg, DecodeError, Message, VersionError, decode_version,
    encode_frame,
};

use self::wire::{
    Alarm, MAX_PENDING, consume, deadline_after, poll_read_into, read_message, read_more,
    write_frame,
};

/// The PING frame, exactly `{"T":"ping"}` after its length prefix: deployed clients
/// compare it byte for byte, and it never changes, so it is never encoded at run time.
const PING_FRAME: &[u8] = b"\x00\x0c{\"T\":\"ping\"}";

/// How long a session whose device reconnected (a newer registration took over) still
/// waits for the ACK of the message it wrote, at most: an ACK sent just before the
/// reconnection is then taken in, and the newer session, which waits for this one,
/// does not send that message again. Bounded by the exchange's own deadline.
const TAKEOVER_ACK_WAIT: Duration = Duration::from_millis(100);

/// The timing of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// How long the server stays silent towards an idle device before it sends PING;
    /// also what CONNACK tells the device (`PingInterval`).
    pub ping_interval: Duration,
    /// How long the device has to send the hello (version byte and CONNECT together),
    /// to answer a PING or a part of an exchange, and how long one write may take.
    pub exchange_timeout: Duration,
}

/// Time as a session sees it: real ([`GlommioClock`]) or virtual in tests
/// (`testing::VirtualClock`, with the `testing` feature).
pub trait SessionClock {
    /// What [`SessionClock::sleep_until`] returns.
    type Sleep: Future<Output = ()> + Unpin;

    /// Now.
    fn now(&self) -> Instant;

    /// A future that completes once the clock reads `deadline` or later.
    fn sleep_until(&self, deadline: Instant) -> Self::Sleep;
}

/// The real clock: `Instant::now()` and glommio's reactor timers.
///
/// # Panics
/// [`SessionClock::sleep_until`] panics outside a glommio executor (glommio's `Timer`
/// needs its reactor).
#[derive(Debug, Clone, Copy, Default)]
pub struct GlommioClock;

impl SessionClock for GlommioClock {
    type Sleep = GlommioSleep;

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep_until(&self, deadline: Instant) -> GlommioSleep {
        GlommioSleep(glommio::timer::Timer::new(
            deadline.saturating_duration_since(Instant::now()),
        ))
    }
}

/// A sleep of the [`GlommioClock`]: a glommio `Timer` (one `Rc`; it is inserted in the
/// reactor's timer tree only when first polled).
#[derive(Debug)]
pub struct GlommioSleep(glommio::timer::Timer);

impl Future for GlommioSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

/// What the session was waiting for when its time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The version byte and CONNECT.
    Hello,
    /// The PONG answering a PING.
    Pong,
    /// The ACK answering a part of an exchange.
    Ack,
    /// A write to complete (the device stopped reading).
    Write,
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Waiting::Hello => "hello",
            Waiting::Pong => "pong",
            Waiting::Ack => "ack",
            Waiting::Write => "write",
        })
    }
}

/// Why a session ended. `Display` is exactly the `REASON` logged in
/// `session(ID) ended with: REASON`; branch on the variants or the `is_*` predicates,
/// never on the text.
#[derive(Debug, Error)]
pub enum SessionEnd {
    /// The device closed its side of the connection.
    #[error("EOF")]
    Eof,
    /// The device did not send what was awaited in time (`"pong timeout"`, …).
    #[error("{0} timeout")]
    Timeout(Waiting),
    /// The first byte was not wire format version 0.
    #[error("unexpected wire format version")]
    UnexpectedVersion(u8),
    /// The first message was not CONNECT.
    #[error("expected CONNECT message")]
    ExpectedConnect,
    /// A PING was answered with something other than PONG.
    #[error("expected PONG message")]
    ExpectedPong,
    /// The broker or an exchange aborted the session (a bad CONNECT value, a part
    /// answered with something other than ACK, …).
    #[error(transparent)]
    Abort(ErrAbort),
    /// The broker failed otherwise (a store fault during an exchange, the broker not
    /// running at registration, …).
    #[error(transparent)]
    Broker(BrokerError),
    /// A newer registration of the same device took over.
    #[error("terminated")]
    Terminated,
    /// The server sent CONNBROKEN.
    #[error("connbroken")]
    ConnBroken,
    /// The server is shutting down; unacknowledged notifications stay pending.
    #[error("shutdown")]
    Shutdown,
    /// While nothing was asked of it, the device sent more than one frame of the largest
    /// size.
    #[error("too much unsolicited data")]
    Unsolicited,
    /// A frame's body was not a message.
    #[error("malformed message")]
    Malformed(#[source] serde_json::Error),
    /// A frame announced a body over the limit.
    #[error("frame of {len} bytes is over the limit")]
    FrameTooLarge {
        /// The announced body length.
        len: usize,
    },
    /// Reading from or writing to the device failed.
    #[error(transparent)]
    Io(stdio::Error),
}

impl SessionEnd {
    /// Whether the device closed its side.
    pub fn is_eof(&self) -> bool {
        matches!(self, SessionEnd::Eof)
    }

    /// Whether something awaited (hello, PONG, ACK, a write) did not come in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, SessionEnd::Timeout(_))
    }

    /// Whether the broker or an exchange aborted the session.
    pub fn is_abort(&self) -> bool {
        matches!(self, SessionEnd::Abort(_))
    }

    /// Whether a newer registration of the device took over.
    pub fn is_terminated(&self) -> bool {
        matches!(self, SessionEnd::Terminated)
    }

    /// Whether the server's shutdown ended the session.
    pub fn is_shutdown(&self) -> bool {
        matches!(self, SessionEnd::Shutdown)
    }

    /// What was awaited when time ran out, for a timeout.
    pub fn timed_out_waiting(&self) -> Option<Waiting> {
        match self {
            SessionEnd::Timeout(w) => Some(*w),
            _ => None,
        }
    }
}

impl From<BrokerError> for SessionEnd {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::Abort(a) => SessionEnd::Abort(a),
            other => SessionEnd::Broker(other),
        }
    }
}

impl From<ErrAbort> for SessionEnd {
    fn from(a: ErrAbort) -> Self {
        SessionEnd::Abort(a)
    }
}

impl From<stdio::Error> for SessionEnd {
    /// An early end of stream (as a TLS stream reports a close without close_notify) is
    /// the device closing: EOF.
    fn from(e: stdio::Error) -> Self {
        if e.kind() == stdio::ErrorKind::UnexpectedEof {
            SessionEnd::Eof
        } else {
            SessionEnd::Io(e)
        }
    }
}

impl From<DecodeError> for SessionEnd {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Malformed(json) => SessionEnd::Malformed(json),
            DecodeError::TooLarge { len, .. } => SessionEnd::FrameTooLarge { len },
            // Callers read more on Incomplete and never convert it; were one to, the
            // device cut a frame short: the stream ended early.
            DecodeError::Incomplete { .. } => SessionEnd::Eof,
        }
    }
}

/// Reads the hello: the version byte, which must be 0, then CONNECT, both within one
/// `exchange_timeout` from the call.
///
/// `buf` holds the bytes already read from `io` (possibly none); on success it holds the
/// bytes that arrived past CONNECT, to hand to [`run`].
///
/// # Errors
/// [`SessionEnd::UnexpectedVersion`], [`SessionEnd::ExpectedConnect`] when the first
/// message is another, [`SessionEnd::Malformed`] for a frame that is no message,
/// [`SessionEnd::Eof`] when the device closes first, `"hello timeout"` when the hello is
/// not whole in time, or an I/O error.
pub async fn read_hello<S: AsyncRead + Unpin, C: SessionClock>(
    io: &mut S,
    buf: &mut Vec<u8>,
    config: &SessionConfig,
    clock: &C,
) -> Result<ConnectMsg, SessionEnd> {
    let deadline = deadline_after(clock, config.exchange_timeout);
    let mut alarm = Alarm::new();
    loop {
        match decode_version(buf) {
            Ok(()) => break,
            Err(VersionError::Unsupported(v)) => return Err(SessionEnd::UnexpectedVersion(v)),
            Err(VersionError::Incomplete) => {
                read_more(io, buf, &mut alarm, clock, deadline, Waiting::Hello).await?;
            }
        }
    }
    consume(buf, 1);
    match read_message(io, buf, &mut alarm, clock, deadline, Waiting::Hello).await? {
        Message::Connect(connect) => Ok(*connect),
        _ => Err(SessionEnd::ExpectedConnect),
    }
}

/// Runs a session after its hello: writes CONNACK, registers with `broker`, logs
/// `session(ID) registered DEVICEID` at INFO, then pings and performs exchanges until
/// the session ends (docs/protocol.md §1.4, step 4). `buf` holds the bytes read past CONNECT.
///
/// - The first PING goes out one `ping_interval` after registration, and then one
///   interval after the previous PING went out or the last part of an exchange was
///   ACKed; PONG must come within
///   `exchange_timeout`.
/// - While waiting for the ping timer or an exchange the session also reads, so a device
///   that closes is noticed at once; bytes that arrive are kept (up to one frame of the
///   largest size) and answer the next PING or exchange.
/// - An exchange stops the ping timer. One with nothing to send resumes it with what was
///   left of the interval (pinging at once if that is spent); one that sent something
///   restarts it in full. Each part of an ACKed exchange must be answered by ACK within
///   `exchange_timeout`.
/// - Every write must complete within `exchange_timeout`.
/// - `shutdown` completing ends the session at whatever point it is.
///
/// The CONNECT comes boxed and `shutdown` should be small (a boxed future, say): the
/// arguments stay in the session's future for its whole life.
///
/// After a successful registration the session always unregisters, before returning or
/// when its future is dropped (the broker ignores that for a session a newer one
/// superseded). The caller logs the end and closes `io`.
///
/// # Returns
/// Why the session ended; see [`SessionEnd`].
// The session's whole context, passed by the listener; an `async` block rather than an
// `async fn`, which would keep a second copy of every argument in the session's future.
#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
pub fn run<'a, S, B, C, F>(
    io: &'a mut S,
    connect: Box<ConnectMsg>,
    buf: Vec<u8>,
    broker: &'a B,
    config: &'a SessionConfig,
    clock: &'a C,
    track: &'a dyn SessionTracker,
    shutdown: F,
) -> impl Future<Output = SessionEnd> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: Broker,
    C: SessionClock,
    F: Future<Output = ()> + 'a,
{
    async move {
        let mut shutdown = pin!(shutdown);
        // Boxed, as both run once: their futures would otherwise size the task for its
        // whole life.
        {
            let mut connack = Box::pin(write_connack(io, config, clock));
            if let Err(end) = until_shutdown(shutdown.as_mut(), connack.as_mut()).await {
                return end;
            }
        }
        let mut registered = match Box::pin(broker.register(&connect, track)).await {
            Ok(sess) => Registration { broker, sess },
            Err(e) => return e.into(),
        };
        tracing::info!(
            target: crate::logging::target::SESSION,
            "session({}) registered {}",
            track.session_id(),
            crate::logging::Untrusted(&connect.device_id)
        );
        // The broker has taken what it needs: an idle session does not keep the CONNECT
        // (its Info and Levels) for its whole life.
        drop(connect);
        let end = {
            let serve = pin!(serve(io, &mut registered.sess, buf, config, clock));
            match until_shutdown(shutdown, serve).await {
                Ok(never) => match never {},
                Err(end) => end,
            }
        };
        drop(registered);
        end
    }
}

/// A registered session that unregisters when dropped: when [`run`] returns, and also
/// when its future is dropped before (a cancelled task), so the registry never keeps a
/// session that is gone.
struct Registration<'a, B: Broker> {
    broker: &'a B,
    sess: B::Session,
}

impl<B: Broker> Drop for Registration<'_, B> {
    fn drop(&mut self) {
        self.broker.unregister(&self.sess);
    }
}

/// Writes CONNACK with the configured ping interval.
async fn write_connack<S: AsyncWrite + Unpin, C: SessionClock>(
    io: &mut S,
    config: &SessionConfig,
    clock: &C,
) -> Result<(), SessionEnd> {
    let msg = Message::ConnAck(ConnAckMsg {
        params: ConnAckParams {
            ping_interval: format_go_duration(config.ping_interval),
        },
    });
    let mut frame = Vec::new();
    encode_frame(&mut frame, &msg).map_err(|e| ErrAbort::caused_by("cannot encode CONNACK", e))?;
    write_frame(
        io,
        &frame,
        &mut Alarm::new(),
        clock,
        config.exchange_timeout,
    )
    .await
}

/// Runs `fut` until it completes or `shutdown` does ([`SessionEnd::Shutdown`]).
///
/// Both come pinned by the caller: a future taken by value would be stored twice in
/// the caller's state (the argument, then the pinned local), and `serve`'s future is the
/// bulk of a session's memory.
fn until_shutdown<F, Fut, T>(
    mut shutdown: Pin<&mut F>,
    mut fut: Pin<&mut Fut>,
) -> impl Future<Output = Result<T, SessionEnd>>
where
    F: Future<Output = ()>,
    Fut: Future<Output = Result<T, SessionEnd>>,
{
    poll_fn(move |cx| {
        if shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(SessionEnd::Shutdown));
        }
        fut.as_mut().poll(cx)
    })
}

/// What ended an idle wait.
enum Idle {
    /// The ping timer fired.
    Ping,
    /// The session's queue has something.
    Next(Next),
}

/// How an exchange went.
enum Outcome {
    /// Nothing was sent: the ping timer resumes.
    Nop,
    /// Everything was sent (and ACKed where asked): the interval restarts in full.
    Sent,
    /// CONNBROKEN was sent: the session ends.
    Close,
}

/// The loop of a registered session; returns only to end it.
///
/// An `async` block: see [`run`].
#[allow(clippy::manual_async_fn)]
fn serve<'a, S, C>(
    io: &'a mut S,
    sess: &'a mut dyn BrokerSession,
    mut buf: Vec<u8>,
    config: &'a SessionConfig,
    clock: &'a C,
) -> impl Future<Output = Result<std::convert::Infallible, SessionEnd>> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: SessionClock,
{
    async move {
        let mut ping_at = deadline_after(clock, config.ping_interval);
        // Every wait of the session, on one lazily moved timer.
        let mut alarm = Alarm::new();
        // The PING and exchange futures (their reads, writes and deadlines) are boxed for as
        // long as they run: an idle session's task then holds only the small idle wait, which
        // is most of every session's life (an allocation per exchange is noise beside its
        // two system calls).
        loop {
            let woke = idle(io, &mut buf, &*sess, ping_at, &mut alarm, clock).await;
            // What `idle` returned is consumed before the step's wait, and the step is one
            // boxed future: nothing else of a step is held across an await, so none of it
            // takes room in the idle wait's state.
            let step: Pin<Box<dyn Future<Output = Result<Option<Instant>, SessionEnd>> + '_>> =
                match woke? {
                    Idle::Ping => Box::pin(async {
                        write_frame(io, PING_FRAME, &mut alarm, clock, config.exchange_timeout)
                            .await?;
                        // The next PING is due one interval after this one went out, not
                        // after the PONG came: the server is never silent longer than the
                        // interval.
                        let next_ping = deadline_after(clock, config.ping_interval);
                        let deadline = deadline_after(clock, config.exchange_timeout);
                        match read_message(io, &mut buf, &mut alarm, clock, deadline, Waiting::Pong)
                            .await?
                        {
                            Message::Pong => Ok(Some(next_ping)),
                            _ => Err(SessionEnd::ExpectedPong),
                        }
                    }),
                    Idle::Next(Next::Terminated) => return Err(SessionEnd::Terminated),
                    Idle::Next(Next::Exchange(exchange)) => Box::pin(async {
                        let exchange = exchange;
                        match perform(
                            io, &mut buf, &mut *sess, &*exchange, &mut alarm, config, clock,
                        )
                        .await?
                        {
                            // The ping timer resumes where it was; a spent interval pings at
                            // once.
                            Outcome::Nop => Ok(None),
                            Outcome::Sent => Ok(Some(deadline_after(clock, config.ping_interval))),
                            Outcome::Close => Err(SessionEnd::ConnBroken),
                        }
                    }),
                };
            if let Some(next_ping) = step.await? {
                ping_at = next_ping;
            }
        }
    }
}

/// Waits until what the session's last ACK dropped is durable, for one exchange timeout
/// at most (a disk that hangs ends the session, so the device reconnects and gets what
/// is still pending). At once for a store that keeps nothing on disk.
async fn until_durable<C: SessionClock>(
    sess: &dyn BrokerSession,
    alarm: &mut Alarm<C::Sleep>,
    clock: &C,
    config: &SessionConfig,
) -> Result<(), SessionEnd> {
    let Some(mut durable) = sess.durable() else {
        return Ok(());
    };
    let deadline = deadline_after(clock, config.exchange_timeout);
    poll_fn(|cx| {
        if let Poll::Ready(done) = durable.as_mut().poll(cx) {
            return Poll::Ready(
                done.map_err(|e| SessionEnd::from(ErrAbort::caused_by("the store", e))),
            );
        }
        if alarm.poll_until(clock, deadline, cx).is_ready() {
            return Poll::Ready(Err(SessionEnd::from(ErrAbort::new(
                "the store did not make the ACK durable in time",
            ))));
        }
        Poll::Pending
    })
    .await
}

/// Waits for the ping timer or the session's queue, reading from the device meanwhile:
/// what arrives is kept in `buf`, and a close ends the wait at once.
///
/// A plain function over a `poll_fn` rather than an `async fn`: an idle session's task
/// holds this wait for most of its life, and an `async fn` would keep a second copy of
/// its arguments and the queue's own wait beside the closure.
fn idle<'a, S, C>(
    io: &'a mut S,
    buf: &'a mut Vec<u8>,
    sess: &'a dyn BrokerSession,
    ping_at: Instant,
    alarm: &'a mut Alarm<C::Sleep>,
    clock: &'a C,
) -> impl Future<Output = Result<Idle, SessionEnd>> + 'a
where
    S: AsyncRead + Unpin,
    C: SessionClock,
{
    poll_fn(move |cx| {
        // The queue first: a termination or an exchange wins over a due ping.
        if let Poll::Ready(next) = sess.session_channel().poll_next(cx) {
            return Poll::Ready(Ok(Idle::Next(next)));
        }
        if alarm.poll_until(clock, ping_at, cx).is_ready() {
            return Poll::Ready(Ok(Idle::Ping));
        }
        loop {
            match poll_read_into(io, buf, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(SessionEnd::Eof)),
                Poll::Ready(Ok(_)) if buf.len() > MAX_PENDING => {
                    return Poll::Ready(Err(SessionEnd::Unsolicited));
                }
                // Kept for the next answer; read on until the device has nothing more.
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            }
        }
    })
}

/// Performs one exchange: prepares it, writes its parts, and for an ACKed exchange reads
/// the ACK of each part before the next.
async fn perform<S, C>(
    io: &mut S,
    buf: &mut Vec<u8>,
    sess: &mut dyn BrokerSession,
    exchange: &dyn Exchange,
    alarm: &mut Alarm<C::Sleep>,
    config: &SessionConfig,
    clock: &C,
) -> Result<Outcome, SessionEnd>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: SessionClock,
{
    let prepared = exchange.prepare(sess)?;
    let expect_ack = match prepared {
        Prepared::Nop => return Ok(Outcome::Nop),
        Prepared::ExpectAck => true,
        Prepared::OneWay { .. } => false,
    };
    loop {
        let scratch = sess.exchange_scratch_area();
        let done = scratch.is_last_part();
        let Some(frame) = scratch.current_frame() else {
            break;
        };
        write_frame(io, frame, alarm, clock, config.exchange_timeout).await?;
        if expect_ack {
            let deadline = deadline_after(clock, config.exchange_timeout);
            sess.session_channel().set_awaiting_ack(true);
            let answer = {
                // A newer registration of the device ends the wait: the newer connection
                // is served now.
                let queue = sess.session_channel();
                let mut read = pin!(read_message(io, buf, alarm, clock, deadline, Waiting::Ack));
                poll_fn(|cx| {
                    if queue.poll_terminated(cx).is_ready() {
                        return Poll::Ready(Err(SessionEnd::Terminated));
                    }
                    read.as_mut().poll(cx)
                })
                .await
            };
            let answer = match answer {
                Err(SessionEnd::Terminated) => {
                    // The device may have ACKed and then reconnected: its ACK is then on
                    // this connection, already arrived or about to. The newer session
                    // reads what is pending only once this one ended, so the ACK has a
                    // short while to come in before the message would go out again.
                    let grace = deadline.min(deadline_after(clock, TAKEOVER_ACK_WAIT));
                    let late = read_message(io, buf, alarm, clock, grace, Waiting::Ack).await;
                    sess.session_channel().set_awaiting_ack(false);
                    if let Ok(Message::Ack) = late {
                        exchange.acked(sess, done)?;
                        // The newer session goes on once this one ended: not before
                        // what the ACK dropped is durable.
                        until_durable(&*sess, alarm, clock, config).await?;
                    }
                    return Err(SessionEnd::Terminated);
                }
                answer => {
                    sess.session_channel().set_awaiting_ack(false);
                    answer?
                }
            };
            match answer {
                Message::Ack => exchange.acked(sess, done)?,
                _ => return Err(ErrAbort::expected_ack().into()),
            }
            // Nothing more goes to the device until what its ACK dropped is durable.
            until_durable(&*sess, alarm, clock, config).await?;
        }
        if !sess.exchange_scratch_area().advance() {
            break;
        }
    }
    Ok(match prepared {
        Prepared::OneWay { close_after: true } => Outcome::Close,
        _ => Outcome::Sent,
    })
}
