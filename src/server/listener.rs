//! Device listeners: every shard accepts on the same address, and each connection ends up
//! on the shard that owns its device.
//!
//! # Choice: SO_REUSEPORT on every shard
//!
//! Every shard binds the device port with SO_REUSEPORT (glommio sets it) and accepts what
//! the kernel hands it; there is no acceptor thread to become a bottleneck. The kernel
//! spreads connections by their address, not by device, so the accepting shard does the
//! TLS handshake, reads the version byte and CONNECT, computes the device's owner, and,
//! when that is another shard, **migrates** the connection there (see
//! [`migrate`](super::migrate)): the socket, the bytes already read past CONNECT, the
//! rustls session and the parsed CONNECT travel over the mesh, and the owner runs the
//! session on its own reactor. From then on the session's reads, writes, timers and
//! exchanges all run on its owner.
//!
//! # The connection limit
//!
//! `max_sessions` is a limit for the whole server, kept by the shards' [`slots`](super::slots)
//! without anything shared: a connection takes a slot on the shard that accepts it; one
//! that moves to its owner takes its slot along; a shard at its cap borrows slots from its
//! peers by message while the connection waits (in a task of its own, never in the accept
//! loop), and refuses it only when every peer is full. A connection that gets no slot within
//! its hello's time (a peer slow to answer), or before the server stops accepting, is closed
//! without counting as refused: the server was not found full.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Semaphore;
use tracing::{debug, warn};

use super::ServerShard;
use super::limits::{Backoff, Throttle};
use super::migrate;
use super::slots::{Changed, Out, Slots};
use super::tally::Tally;
use super::tls::{TlsSession, TlsStream};
use crate::api::{ConnectionCounters, Listener};
use crate::broker::SessionTracker;
use crate::broker::sharded::{Shard, ShardId, owner_of_device};
use crate::logging::target;
use crate::protocol::ConnectMsg;
use crate::session::{self, GlommioClock, SessionConfig};

/// A device's connection: plain TCP, or TLS over TCP.
#[derive(Debug)]
pub(crate) enum DeviceStream {
    /// Plain TCP (behind a TLS-terminating balancer, or in tests).
    Plain(TcpStream),
    /// TLS; boxed so the plain case stays small.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for DeviceStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            DeviceStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            DeviceStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for DeviceStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            DeviceStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            DeviceStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DeviceStream::Plain(s) => Pin::new(s).poll_flush(cx),
            DeviceStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            DeviceStream::Plain(s) => Pin::new(s).poll_close(cx),
            DeviceStream::Tls(s) => Pin::new(&mut **s).poll_close(cx),
        }
    }
}

/// What the device listeners of every shard share (`Send`: built once, cloned in).
#[derive(Clone)]
pub(crate) struct DeviceConfig {
    pub(crate) session: SessionConfig,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// Device connections the whole server may hold (`max_sessions`): the shards' slots
    /// add up to it.
    pub(crate) max_sessions: usize,
}

/// How long a shard waits for a peer's answer to an ask for slots before it counts the
/// peer as full (a peer stopping, or stalled).
const ASK_PATIENCE: Duration = Duration::from_secs(2);

/// The most connections that may wait for a slot on a shard. Each holds a descriptor past
/// the limit (out of `reserved_descriptors`' margin), so beyond this the shard accepts no
/// more until some are settled; they wait in the listen backlog meanwhile. An answer takes
/// one message each way and brings at least [`BATCH`](super::slots::BATCH) slots when a
/// peer has them, so a few suffice.
const MAX_WAITING: usize = 8;

/// One shard's device side: its settings, its shutdown signal, its session ids.
pub(crate) struct DeviceContext {
    pub(crate) shard: Shard,
    pub(crate) settings: DeviceConfig,
    /// Closed when the server ends its sessions (after it stopped accepting).
    pub(crate) shutdown: Rc<glommio::sync::Semaphore>,
    next_session: Cell<u64>,
    /// Sessions running on this shard.
    pub(crate) live: Tally,
    /// What the shard's listeners count (in the shard's service slot, shown by /metrics).
    pub(crate) counters: Rc<ConnectionCounters>,
    /// This shard's part of the device connection limit: connections held here, from
    /// accept (or arrival) to close, and the slots for them. Borrowed only inside a
    /// method, never across `.await`.
    slots: RefCell<Slots>,
    /// Wakes the connections waiting for a slot, and the listener when they are too many.
    slots_changed: Changed,
    /// The timer of the ask under way, with the ask's id: it counts the peer as full when
    /// no answer comes within [`ASK_PATIENCE`]. Dropped, and so cancelled, as soon as the
    /// answer comes, so a shard keeps one such timer at most, not one for every ask of the
    /// last [`ASK_PATIENCE`].
    ask_timer: RefCell<Option<(u64, glommio::Task<()>)>>,
    /// Set once the shard's device side stops: slots are no longer sent to peers (they
    /// may be gone, and so may this shard's executor).
    stopped: Cell<bool>,
    limit_warning: Throttle,
    accept_warning: Throttle,
    backoff: Backoff,
}

impl DeviceContext {
    pub(crate) fn new(
        shard: Shard,
        settings: DeviceConfig,
        shutdown: Rc<glommio::sync::Semaphore>,
    ) -> Self {
        let slots = Slots::new(shard.id().0, shard.nr_shards(), settings.max_sessions);
        Self {
            counters: shard.service_or_default::<ConnectionCounters>(),
            shard,
            settings,
            shutdown,
            next_session: Cell::new(0),
            live: Tally::default(),
            slots: RefCell::new(slots),
            slots_changed: Changed::default(),
            ask_timer: RefCell::new(None),
            stopped: Cell::new(false),
            limit_warning: Throttle::default(),
            accept_warning: Throttle::default(),
            backoff: Backoff::default(),
        }
    }

    /// Takes one of this shard's free slots for a connection, if it has one.
    fn hold(self: &Rc<Self>) -> Option<Held> {
        let taken = self.slots.borrow_mut().take();
        taken.then(|| Held(Some(Rc::clone(self))))
    }

    /// Holds a connection that arrived from shard `from` with its slot.
    fn immigrate(self: &Rc<Self>, from: ShardId) -> Held {
        self.slots.borrow_mut().immigrate(from.0);
        Held(Some(Rc::clone(self)))
    }

    /// Counts and (at most every few seconds) logs a connection refused because the
    /// server holds as many as it may.
    fn refuse(&self) {
        self.counters.count_rejected(Listener::Devices);
        if let Some(more) = self.limit_warning.pass() {
            warn!(
                target: target::SERVER,
                "device connections at the limit ({} on the server); closing new ones \
                 ({more} more since the last warning)",
                self.settings.max_sessions,
            );
        }
    }

    /// Whether a connection this shard has no free slot for must be refused: every peer
    /// said it is full (the server holds `max_sessions`).
    fn server_full(&self) -> bool {
        self.slots.borrow().all_full()
    }

    /// A connection starts waiting for a slot here: it counts as waiting from now on (so the
    /// listener's [`MAX_WAITING`] check sees it before its task runs), until the guard is
    /// dropped.
    fn begin_wait(self: &Rc<Self>) -> Waiting {
        self.slots.borrow_mut().begin_wait();
        Waiting(Rc::clone(self))
    }

    /// Waits for a slot for a connection this shard has none free for, which `waiting`
    /// counts: one freed here or lent by a peer, for at most the hello's time
    /// (`exchange_timeout`), and only until `accepting` closes (the server stops
    /// accepting: no session starts after that).
    async fn wait_for_slot(self: &Rc<Self>, waiting: Waiting, accepting: &Semaphore) -> Waited {
        let _waiting = waiting;
        let wait = async {
            loop {
                let seen = self.slots_changed.seen();
                if let Some(held) = self.hold() {
                    return Waited::Slot(held);
                }
                if self.server_full() {
                    return Waited::Full;
                }
                self.slots.borrow_mut().ask();
                self.flush();
                self.slots_changed.after(seen).await;
            }
        };
        let patience = self.settings.session.exchange_timeout;
        futures_lite::future::or(
            async {
                glommio::timer::timeout(patience, async { Ok(wait.await) })
                    .await
                    .unwrap_or(Waited::TimedOut)
            },
            async {
                futures_lite::future::or(shutdown(accepting), shutdown(&self.shutdown)).await;
                Waited::Stopped
            },
        )
        .await
    }

    /// Resolves once fewer than [`MAX_WAITING`] connections wait for a slot here.
    async fn room_to_wait(&self) {
        loop {
            let seen = self.slots_changed.seen();
            if self.slots.borrow().waiting() < MAX_WAITING {
                return;
            }
            self.slots_changed.after(seen).await;
        }
    }

    /// The slots changed: sends what they queued and wakes whoever waits on them.
    fn changed(self: &Rc<Self>) {
        self.flush();
        if !self.stopped.get() {
            self.slots_changed.notify();
        }
    }

    /// Sends the messages the slots queued for peers (none once stopped).
    fn flush(self: &Rc<Self>) {
        let outgoing = self.slots.borrow_mut().outgoing();
        if self.stopped.get() {
            return;
        }
        for out in outgoing {
            self.send(out);
        }
    }

    fn send(self: &Rc<Self>, out: Out) {
        let me = self.shard.id();
        let to = match out {
            Out::Ask { to, .. } | Out::Give { to, .. } | Out::Room { to } => ShardId(to),
        };
        match out {
            Out::Give { n, .. } => self.shard.post(to, move |peer| {
                if let Some(ctx) = devices_of(peer) {
                    ctx.slots.borrow_mut().received(me.0, n);
                    ctx.changed();
                }
            }),
            Out::Room { .. } => self.shard.post(to, move |peer| {
                if let Some(ctx) = devices_of(peer) {
                    ctx.slots.borrow_mut().room(me.0);
                    ctx.changed();
                }
            }),
            Out::Ask { id, want, .. } => {
                self.shard.post(to, move |peer| {
                    let Some(ctx) = devices_of(peer) else {
                        // The asker's patience ends the ask.
                        return;
                    };
                    let lent = if ctx.stopped.get() {
                        0
                    } else {
                        ctx.slots.borrow_mut().lend(me.0, want)
                    };
                    peer.post(me, move |asker| {
                        if let Some(ctx) = devices_of(asker) {
                            ctx.ask_answered(id);
                            ctx.slots.borrow_mut().answered(to.0, id, lent);
                            ctx.changed();
                        }
                    });
                });
                self.time_ask(id);
            }
        }
    }

    /// Starts the timer of ask `id` (see `ask_timer`). It holds no strong reference to
    /// the device side: a stopped shard's is not kept alive by it.
    fn time_ask(self: &Rc<Self>, id: u64) {
        let ctx = Rc::downgrade(self);
        let timer = glommio::spawn_local(async move {
            glommio::timer::sleep(ASK_PATIENCE).await;
            if let Some(ctx) = ctx.upgrade() {
                ctx.ask_unanswered(id);
            }
        });
        // One ask is under way at a time: a timer left from an earlier one is cancelled.
        let earlier = self.ask_timer.replace(Some((id, timer)));
        drop(earlier);
    }

    /// Ask `id` was answered: its timer is cancelled (a late answer, after the timer
    /// fired, finds none).
    fn ask_answered(&self, id: u64) {
        let timer = self
            .ask_timer
            .borrow_mut()
            .take_if(|(timed, _)| *timed == id);
        drop(timer);
    }

    /// Ask `id` got no answer within [`ASK_PATIENCE`]: its peer counts as full.
    fn ask_unanswered(self: &Rc<Self>, id: u64) {
        // Called from the timer's own task, which ends here: let it, rather than cancel it.
        let timer = self
            .ask_timer
            .borrow_mut()
            .take_if(|(timed, _)| *timed == id);
        if let Some((_, timer)) = timer {
            timer.detach();
        }
        self.slots.borrow_mut().silent(id);
        self.changed();
    }

    /// The device side stops: no more slots go to peers, and no ask is timed.
    pub(crate) fn stop(&self) {
        self.stopped.set(true);
        let timer = self.ask_timer.take();
        drop(timer);
    }

    /// A session id unique across shards: a per-shard counter interleaved by shard.
    fn session_id(&self) -> u64 {
        let n = self.next_session.get();
        self.next_session.set(n + 1);
        n * self.shard.nr_shards() as u64 + self.shard.id().0 as u64
    }
}

/// This shard's device side, on `shard`, if it has one (not when it stops).
fn devices_of(shard: &Shard) -> Option<Rc<DeviceContext>> {
    shard.service::<ServerShard>().map(|s| s.devices())
}

/// A device connection's slot on a shard, given back when dropped.
struct Held(Option<Rc<DeviceContext>>);

impl Held {
    /// The connection leaves for shard `to` and takes its slot along.
    fn emigrate(mut self, to: ShardId) {
        if let Some(ctx) = self.0.take() {
            ctx.slots.borrow_mut().emigrate(to.0);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(ctx) = self.0.take() {
            ctx.slots.borrow_mut().release();
            ctx.changed();
        }
    }
}

/// How a connection's wait for a slot ended.
enum Waited {
    /// It holds a slot: one freed on its shard, or lent by a peer.
    Slot(Held),
    /// Every peer is full: the server holds `max_sessions`. Refused.
    Full,
    /// No slot came within the hello's time: a peer was slow to answer. The server was not
    /// found full.
    TimedOut,
    /// The server stops accepting.
    Stopped,
}

/// A connection waiting for a slot, counted as one until dropped.
struct Waiting(Rc<DeviceContext>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.slots.borrow_mut().end_wait();
        self.0.changed();
    }
}

/// Resolves when the server shuts down.
pub(crate) async fn shutdown(signal: &glommio::sync::Semaphore) {
    // Nobody releases units: acquiring fails exactly when the semaphore is closed.
    let _ = signal.acquire(1).await;
}

/// Names the session in log lines: its id in decimal, kept inline (a `String` would be
/// one more heap block for every session, idle or not).
struct Tracker {
    digits: [u8; 20],
    len: u8,
}

impl Tracker {
    fn new(id: u64) -> Self {
        let mut digits = [0u8; 20];
        let mut n = id;
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        digits.copy_within(start.., 0);
        Tracker {
            digits,
            len: (20 - start) as u8,
        }
    }
}

impl SessionTracker for Tracker {
    fn session_id(&self) -> &str {
        // Only ASCII digits were written.
        std::str::from_utf8(&self.digits[..usize::from(self.len)]).unwrap_or("?")
    }
}

/// Accepts device connections on this shard until `accepting` closes (sessions run on
/// until the context's shutdown signal).
pub(crate) async fn serve_devices(
    listener: TcpListener,
    ctx: Rc<DeviceContext>,
    accepting: Rc<glommio::sync::Semaphore>,
) {
    loop {
        let accepted = futures_lite::future::or(
            async {
                ctx.room_to_wait().await;
                Some(listener.accept().await)
            },
            async {
                shutdown(&accepting).await;
                None
            },
        )
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok(s)) => {
                ctx.backoff.succeeded();
                s
            }
            Some(Err(e)) => {
                // Out of descriptors or a connection reset before accept: back off
                // rather than spin.
                ctx.counters.count_accept_error(Listener::Devices);
                if let Some(more) = ctx.accept_warning.pass() {
                    warn!(
                        target: target::SERVER,
                        "device accept failed: {e} ({more} more since the last warning)"
                    );
                }
                glommio::timer::sleep(ctx.backoff.failed()).await;
                continue;
            }
        };
        match ctx.hold() {
            Some(held) => start_session(&ctx, stream, held),
            // The server holds as many as it may: closed at once, the descriptor freed
            // now.
            None if ctx.server_full() => {
                ctx.refuse();
                drop(stream);
            }
            // A peer may have room.
            None => wait_in_task(&ctx, stream, &accepting),
        }
    }
    debug!(target: target::SERVER, shard = %ctx.shard.id(), "device listener stopped");
}

/// A connection this shard has no free slot for, when a peer may have one: it counts as
/// waiting at once, and waits in a task of its own while the listener goes on; then its
/// session starts, or it is closed.
fn wait_in_task(ctx: &Rc<DeviceContext>, stream: TcpStream, accepting: &Rc<Semaphore>) {
    let waiting = ctx.begin_wait();
    let ctx = Rc::clone(ctx);
    let accepting = Rc::clone(accepting);
    glommio::spawn_local(async move {
        match ctx.wait_for_slot(waiting, &accepting).await {
            Waited::Slot(held) => start_session(&ctx, stream, held),
            Waited::Full => {
                ctx.refuse();
                drop(stream);
            }
            Waited::TimedOut => give_up(stream, "no slot came within exchange_timeout"),
            Waited::Stopped => give_up(stream, "the server stops accepting"),
        }
    })
    .detach();
}

/// Closes a connection that gave up waiting for a slot before the server was found full:
/// logged at DEBUG, and not counted as refused (the server may hold fewer than
/// `max_sessions`).
fn give_up(stream: TcpStream, why: &str) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    debug!(
        target: target::SERVER,
        "device connection from {peer} gave up waiting for a slot ({why}); closed"
    );
    drop(stream);
}

/// Starts the session of an accepted connection that holds its slot.
fn start_session(ctx: &Rc<DeviceContext>, stream: TcpStream, held: Held) {
    let id = ctx.session_id();
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    debug!(target: target::SESSION, "session({id}) connected {peer}");
    let _ = stream.set_nodelay(true);
    glommio::spawn_local(accept_session(Rc::clone(ctx), stream, id, held)).detach();
}

/// The state of a connection that leaves its shard for the owner's.
struct Migrant {
    fd: OwnedFd,
    tls: Option<Box<TlsSession>>,
    connect: Box<ConnectMsg>,
    buf: Vec<u8>,
    id: u64,
}

/// Handshake, hello, then run here or move to the owner. `held` is the connection's slot
/// on this shard; it moves to the owner with the connection.
async fn accept_session(ctx: Rc<DeviceContext>, stream: TcpStream, id: u64, held: Held) {
    let settings = &ctx.settings;
    let clock = GlommioClock;
    let mut io = match &settings.tls {
        None => DeviceStream::Plain(stream),
        Some(config) => match TlsSession::new(Arc::clone(config)) {
            Ok(tls) => DeviceStream::Tls(Box::new(TlsStream::new(stream, tls))),
            Err(e) => {
                debug!(target: target::SESSION, "session({id}) ended with: tls: {e}");
                return;
            }
        },
    };
    if let DeviceStream::Tls(tls) = &mut io {
        let handshake = glommio::timer::timeout(settings.session.exchange_timeout, async {
            Ok(tls.handshake().await)
        });
        match handshake.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(target: target::SESSION, "session({id}) ended with: tls handshake: {e}");
                return;
            }
            Err(_) => {
                debug!(target: target::SESSION, "session({id}) ended with: tls handshake timeout");
                return;
            }
        }
    }
    let mut buf = Vec::new();
    let connect = match session::read_hello(&mut io, &mut buf, &settings.session, &clock).await {
        Ok(c) => Box::new(c),
        Err(end) => {
            debug!(target: target::SESSION, "session({id}) ended with: {end}");
            return;
        }
    };
    let owner = owner_of_device(&connect.device_id, ctx.shard.nr_shards());
    if owner == ctx.shard.id() {
        // A task of its own: the long-lived session does not carry this task's hello
        // and handshake state.
        glommio::spawn_local(run_session(ctx, io, connect, buf, id, held)).detach();
        return;
    }
    let (stream, tls) = match io {
        DeviceStream::Plain(s) => (s, None),
        DeviceStream::Tls(t) => {
            let (s, conn) = t.into_parts();
            (s, Some(conn))
        }
    };
    let fd = match migrate::detach(stream) {
        Ok(fd) => fd,
        Err(e) => {
            debug!(
                target: target::SESSION,
                "session({id}) ended with: cannot move to {owner}: {e}"
            );
            return;
        }
    };
    // The slot goes along and is the owner's on arrival: a connection that said hello is
    // never refused for its move.
    held.emigrate(owner);
    ctx.counters.count_migration_out();
    let from = ctx.shard.id();
    let migrant = Migrant {
        fd,
        tls,
        connect,
        buf,
        id,
    };
    ctx.shard.post(owner, move |owner_shard| {
        let Some(ctx) = owner_shard.service::<ServerShard>().map(|s| s.devices()) else {
            debug!(
                target: target::SESSION,
                "session({}) ended with: shard has no device listener",
                migrant.id
            );
            return;
        };
        ctx.counters.count_migration_in();
        let held = ctx.immigrate(from);
        glommio::spawn_local(resume(ctx, migrant, held)).detach();
    });
}

/// Rebuilds a migrated connection on its owner, holding the slot it came with: its
/// session.
fn resume(ctx: Rc<DeviceContext>, m: Migrant, held: Held) -> impl Future<Output = ()> {
    let stream = migrate::attach(m.fd);
    let io = match m.tls {
        None => DeviceStream::Plain(stream),
        Some(conn) => DeviceStream::Tls(Box::new(TlsStream::new(stream, conn))),
    };
    run_session(ctx, io, m.connect, m.buf, m.id, held)
}

/// A registered session's task, until it ends and its connection is closed.
///
/// An `async` block rather than an `async fn`: the latter keeps a second copy of every
/// argument (the stream among them) in its future for the session's whole life.
#[allow(clippy::manual_async_fn)]
fn run_session(
    ctx: Rc<DeviceContext>,
    mut io: DeviceStream,
    connect: Box<ConnectMsg>,
    buf: Vec<u8>,
    id: u64,
    held: Held,
) -> impl Future<Output = ()> {
    async move {
        ctx.live.up();
        // In a block of its own: what the session ended with is not kept across the close
        // below, and so takes no room in the task while the session runs.
        {
            let tracker = Tracker::new(id);
            let end = session::run(
                &mut io,
                connect,
                buf,
                &ctx.shard,
                &ctx.settings.session,
                &GlommioClock,
                &tracker,
                Box::pin(shutdown(&ctx.shutdown)),
            )
            .await;
            ctx.live.down();
            debug!(target: target::SESSION, "session({id}) ended with: {end}");
        }
        // Best effort, bounded: the device may be gone, or no longer reading.
        let timeout = ctx.settings.session.exchange_timeout;
        let _ = glommio::timer::timeout(timeout, async {
            Ok(futures_lite::io::AsyncWriteExt::close(&mut io).await)
        })
        .await;
        // The slot is free once the descriptor is.
        drop(io);
        drop(held);
    }
}

/// Binds the device listener on this shard.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).map_err(Into::into)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;
    use crate::server::Server;

    /// A two-shard server in this process holding `max_sessions: 2` (one slot on each
    /// shard at start), with hellos given `exchange_timeout`.
    fn two_shards(exchange_timeout: Duration) -> Server {
        let config = ServerConfig {
            addr: "127.0.0.1:0".into(),
            http_addr: "127.0.0.1:0".into(),
            shards: 2,
            max_sessions: 2,
            exchange_timeout,
            ..ServerConfig::default()
        };
        Server::start(&config).unwrap()
    }

    /// Runs the future `job` makes with shard `shard`'s device side, as a task on that
    /// shard, and returns its output.
    fn on_shard<R, F, Fut>(server: &Server, shard: usize, job: F) -> R
    where
        R: Send + 'static,
        F: FnOnce(Rc<DeviceContext>) -> Fut + Send + 'static,
        Fut: Future<Output = R> + 'static,
    {
        let sending = server.broker().sending();
        let run = sending.run_task_on(ShardId(shard), move |s| async move {
            job(devices_of(&s).unwrap()).await
        });
        futures_lite::future::block_on(run).unwrap()
    }

    /// A connection to a listener on this shard: the accepted end, and the connecting one.
    async fn connection() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (listener.accept().await.unwrap(), client)
    }

    /// A shard's server part set aside: messages to its device side find none, so asks to
    /// it go unanswered, as a stalled shard's would.
    struct SetAside(Rc<ServerShard>);

    /// Sets shard `shard`'s server part aside (see [`SetAside`]).
    fn silence(server: &Server, shard: usize) {
        let sending = server.broker().sending();
        let run = sending.run_on(ShardId(shard), |s| {
            let part = s.remove_service::<ServerShard>().unwrap();
            s.install_service(Rc::new(SetAside(part)));
        });
        futures_lite::future::block_on(run).unwrap();
    }

    /// Puts shard `shard`'s server part back.
    fn restore(server: &Server, shard: usize) {
        let sending = server.broker().sending();
        let run = sending.run_on(ShardId(shard), |s| {
            let aside = s.remove_service::<SetAside>().unwrap();
            s.install_service(Rc::clone(&aside.0));
        });
        futures_lite::future::block_on(run).unwrap();
    }

    /// Reads from `client` until the server closes it, for at most `within`: whether it
    /// did.
    async fn closed_by_server(client: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        let read = glommio::timer::timeout(within, async {
            loop {
                match futures_lite::io::AsyncReadExt::read(client, &mut buf).await {
                    Ok(0) | Err(_) => return Ok(true),
                    Ok(_) => {}
                }
            }
        });
        read.await.unwrap_or(false)
    }

    /// A connection that waits for a slot while its peer does not answer (the server is
    /// not full: the peer has a slot free) is closed at the hello's timeout, but neither
    /// counted nor logged as refused at the limit.
    #[test]
    fn a_connection_that_gives_up_waiting_is_not_counted_as_refused() {
        let server = two_shards(Duration::from_millis(300));
        silence(&server, 1);
        let (closed, rejected) = on_shard(&server, 0, |ctx| async move {
            let own = ctx.hold().unwrap();
            let (accepted, mut client) = connection().await;
            wait_in_task(&ctx, accepted, &Rc::new(Semaphore::new(0)));
            // Closed at the hello's timeout, long before ASK_PATIENCE would count the
            // silent peer as full.
            let closed = closed_by_server(&mut client, Duration::from_secs(10)).await;
            drop(own);
            (closed, ctx.counters.counts().rejected_devices)
        });
        restore(&server, 1);
        assert!(closed, "the connection is closed at the hello's timeout");
        assert_eq!(rejected, 0, "counted as refused");
        server.shutdown(Duration::from_secs(1));
    }

    /// An ask answered at once leaves nothing behind: its timer is cancelled with the
    /// answer, not left to sleep out [`ASK_PATIENCE`] holding on to the device side.
    #[test]
    fn an_answered_ask_leaves_no_timer_behind() {
        let server = two_shards(Duration::from_secs(5));
        let (before, after, lent) = on_shard(&server, 0, |ctx| async move {
            let refs = |ctx: &Rc<DeviceContext>| (Rc::strong_count(ctx), Rc::weak_count(ctx));
            let before = refs(&ctx);
            let own = ctx.hold().unwrap();
            let waited = ctx
                .wait_for_slot(ctx.begin_wait(), &Semaphore::new(0))
                .await;
            let lent = matches!(waited, Waited::Slot(_));
            drop(waited);
            drop(own);
            // A cancelled task's future is dropped at its next turn: give it turns, all
            // well within ASK_PATIENCE.
            for _ in 0..50 {
                if refs(&ctx) == before {
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            (before, refs(&ctx), lent)
        });
        assert!(lent, "shard 1 lends its free slot");
        assert_eq!(
            after, before,
            "(strong, weak) references to the device side"
        );
        server.shutdown(Duration::from_secs(1));
    }

    /// A connection waiting for a slot stops waiting once the server stops accepting (the
    /// first step of its stop), not only once it ends the sessions: no session starts
    /// after accepting stopped.
    #[test]
    fn a_waiting_connection_stops_when_the_server_stops_accepting() {
        let server = two_shards(Duration::from_secs(5));
        // The wait would end only at ASK_PATIENCE, the silent peer then counting as full.
        silence(&server, 1);
        let stopped = on_shard(&server, 0, |ctx| async move {
            let own = ctx.hold().unwrap();
            let accepting = Rc::new(Semaphore::new(0));
            let stop = glommio::spawn_local({
                let accepting = Rc::clone(&accepting);
                async move {
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                    accepting.close();
                }
            });
            let waited = ctx.wait_for_slot(ctx.begin_wait(), &accepting).await;
            stop.await;
            drop(own);
            matches!(waited, Waited::Stopped)
        });
        restore(&server, 1);
        assert!(stopped, "the wait went on after accepting stopped");
        server.shutdown(Duration::from_secs(1));
    }

    /// The listener hands on connections that must wait for a slot without yielding in
    /// between: each counts as waiting at once, whenever its task first runs (glommio 0.9
    /// happens to run a task it spawns up to its first await at once; the count does not
    /// rely on that), so the listener's check against [`MAX_WAITING`] sees all of them.
    #[test]
    fn a_connection_counts_as_waiting_as_soon_as_the_listener_hands_it_on() {
        let server = two_shards(Duration::from_secs(5));
        let counted = on_shard(&server, 0, |ctx| async move {
            let own = ctx.hold().unwrap();
            let mut pairs = Vec::new();
            for _ in 0..3 {
                pairs.push(connection().await);
            }
            let accepting = Rc::new(Semaphore::new(0));
            let mut clients = Vec::new();
            let mut counted = Vec::new();
            for (accepted, client) in pairs {
                wait_in_task(&ctx, accepted, &accepting);
                counted.push(ctx.slots.borrow().waiting());
                clients.push(client);
            }
            drop(own);
            counted
        });
        assert_eq!(counted, [1, 2, 3]);
        server.shutdown(Duration::from_secs(1));
    }

    fn future_size4<A, B, C, D, F: std::future::Future>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    fn future_size6<A, B, C, D, E, G, F: std::future::Future>(
        _: fn(A, B, C, D, E, G) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn the_tracker_names_a_session_by_its_decimal_id() {
        for id in [0, 7, 10, 12_345, u64::MAX] {
            assert_eq!(Tracker::new(id).session_id(), id.to_string());
        }
    }

    /// The session task lives as long as the connection: its future is what an idle
    /// device costs besides the socket. Keep it small (measured: see the message).
    #[test]
    fn an_idle_session_task_stays_small() {
        let session = future_size6(run_session);
        let accept = future_size4(accept_session);
        assert!(session <= 800, "session task future is {session} B");
        assert!(accept <= 2048, "accept task future is {accept} B");
    }
}
