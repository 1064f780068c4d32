#![allow(clippy::print_stderr)] // it logs its ports and its failures to stderr
//! The floor of pushbroker's runtime: the least a push server built the way pushbroker is
//! built can cost per delivery. A measuring tool, not a server to deploy.
//!
//! ```sh
//! cargo build --release --example glommio_floor
//! target/release/pushload --server target/release/examples/glommio_floor --scenario broadcast
//! target/release/examples/glommio_floor [-threads N] CONFIG.json
//! ```
//!
//! It speaks the least of the wire protocol and of the HTTP API a load generator needs,
//! with no pings, store, timeouts or exchange bookkeeping, exactly as a minimal epoll
//! server in C would (so that the two can be driven alike and compared), but its shape is
//! pushbroker's:
//!
//! - one glommio executor (io_uring) per CPU (or `-threads N`), pinned as pushbroker's
//!   shards are, with the same executor settings;
//! - a device listener and an HTTP listener on every executor (SO_REUSEPORT);
//! - a device belongs to executor [`owner_of_device`]: after its CONNECT, a connection
//!   accepted elsewhere moves to its owner, as a descriptor sent over flume;
//! - **one task per device connection**, which waits on its connection's queue of frames,
//!   writes them, and reads (and skips) the ACKs;
//! - a broadcast is encoded once, by the executor that took the POST, and handed to every
//!   other executor as one `Arc<[u8]>` over flume; each executor pushes it into its own
//!   connections' queues and wakes their tasks;
//! - a notify is encoded by the executor that took the POST; a device owned elsewhere is
//!   handed to its owner over flume, which answers over flume whether it holds the device.
//!
//! With `key_pem_file` and `cert_pem_file` in its configuration (pushload's `--tls`),
//! devices speak TLS through rustls' own buffered connection (`read_tls`,
//! `process_new_packets`, `write_tls`), on pushbroker's TLS configuration: the least TLS
//! costs this shape, to hold pushbroker's TLS driver against. A connection moves to its
//! owner with its TLS state.
//!
//! The configuration is a JSON object of which only `addr`, `http_addr` and the two TLS
//! files are read (port 0: any free port). Once both are bound on every executor it logs
//! `… INFO listening for http on HOST:PORT`, then `… INFO listening for devices on
//! HOST:PORT`, as pushbroker does.
//!
//! Protocol subset: version byte 0, CONNECT (only `DeviceId` is read) → a fixed CONNACK
//! (`PingInterval` "60s"); whole frames from the device afterwards (ACK, PONG) are
//! skipped by their length, unread. `POST /broadcast {"data":D,…}` → `{"T":"broadcast",
//! "ChanId":"0","TopLevel":K,"Payloads":[D]}` to every connection (K counts broadcasts);
//! `POST /notify {"deviceid":X,"appid":A,"data":D,…}` →
//! `{"T":"notifications","Notifications":[{"A":A,"M":"m<n>","P":D}]}` to the newest
//! connection of X, 404 when there is none. JSON values are taken raw, never decoded.

mod floor_common;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use ahash::AHashMap;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite};
use pushbroker::broker::sharded::owner_of_device;
use pushbroker::glommio;
use pushbroker::glommio::net::{TcpListener, TcpStream};

use floor_common::{
    CONNACK, Endpoints, Executor, Frame, Msg, R200, R400, R404, Skipper, TLS, broadcast_frame,
    detach, json_str, notification_frame,
};

/// Bytes read from a device at once, through one buffer per executor.
const RBUF: usize = 64 << 10;

thread_local! {
    /// The executor's device read buffer: ACKs are skipped in it, never kept.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; RBUF]);
}

/// A device connection, as its executor sees it: the frames its task is to write.
struct Conn {
    queue: RefCell<VecDeque<Frame>>,
    /// The task's waker, kept from its first wait on: a task's waker does not change.
    waker: RefCell<Option<Waker>>,
    /// Its place in [`Shard::conns`].
    idx: Cell<usize>,
}

impl Conn {
    fn push(&self, frame: Frame) {
        self.queue.borrow_mut().push_back(frame);
        if let Some(w) = &*self.waker.borrow() {
            w.wake_by_ref();
        }
    }
}

/// One executor's state.
struct Shard {
    id: usize,
    /// Every executor's inbox, this one's included.
    peers: Vec<flume::Sender<Msg>>,
    conns: RefCell<Vec<Rc<Conn>>>,
    /// The newest connection of each device this executor owns.
    devices: RefCell<AHashMap<Box<str>, Rc<Conn>>>,
    /// Notifications encoded here so far.
    notified: Cell<u64>,
}

impl Shard {
    fn fanout(&self, frame: &Frame) {
        for c in self.conns.borrow().iter() {
            c.push(Arc::clone(frame));
        }
    }

    /// Queues `frame` to the newest connection of `device`; whether there is one.
    fn deliver(&self, device: &str, frame: Frame) -> bool {
        let conn = self.devices.borrow().get(device).cloned();
        conn.map(|c| c.push(frame)).is_some()
    }

    fn handle(self: &Rc<Self>, msg: Msg) {
        match msg {
            Msg::Broadcast(frame) => self.fanout(&frame),
            Msg::Notify {
                device,
                frame,
                reply,
            } => {
                let _ = reply.send(self.deliver(&device, frame));
            }
            Msg::Adopt {
                fd,
                device,
                rest,
                tls,
            } => {
                let tcp = attach(fd);
                let stream = match tls {
                    Some(tls) => Stream::Tls(Box::new(TlsConn { tcp, tls })),
                    None => Stream::Plain(tcp),
                };
                glommio::spawn_local(session(Rc::clone(self), stream, device, rest)).detach();
            }
        }
    }

    /// Registers a connection of `device` (the newest wins) and queues its CONNACK.
    fn register(&self, device: Box<str>) -> Rc<Conn> {
        let mut conns = self.conns.borrow_mut();
        let conn = Rc::new(Conn {
            queue: RefCell::new(VecDeque::from([Frame::from(CONNACK)])),
            waker: RefCell::new(None),
            idx: Cell::new(conns.len()),
        });
        conns.push(Rc::clone(&conn));
        self.devices.borrow_mut().insert(device, Rc::clone(&conn));
        conn
    }

    fn unregister(&self, device: &str, conn: &Rc<Conn>) {
        let mut conns = self.conns.borrow_mut();
        let idx = conn.idx.get();
        conns.swap_remove(idx);
        if let Some(moved) = conns.get(idx) {
            moved.idx.set(idx);
        }
        let mut devices = self.devices.borrow_mut();
        if devices.get(device).is_some_and(|c| Rc::ptr_eq(c, conn)) {
            devices.remove(device);
        }
    }

    /// Answers `POST /broadcast`.
    fn broadcast_(&self, body: &[u8], out: &mut Vec<u8>) {
        let Some(frame) = broadcast_frame(body) else {
            return out.extend_from_slice(R400);
        };
        for (i, peer) in self.peers.iter().enumerate() {
            if i != self.id {
                let _ = peer.send(Msg::Broadcast(Arc::clone(&frame)));
            }
        }
        self.fanout(&frame);
        out.extend_from_slice(R200);
    }

    /// Answers `POST /notify`.
    async fn notify_(&self, body: &[u8], out: &mut Vec<u8>) {
        let next_id = || {
            let n = self.notified.get();
            self.notified.set(n + 1);
            // Unique over the executors without sharing a counter.
            n * self.peers.len() as u64 + self.id as u64 + 1
        };
        let Some((device, frame)) = notification_frame(body, next_id) else {
            return out.extend_from_slice(R400);
        };
        let owner = owner_of_device(device, self.peers.len()).0;
        let found = if owner == self.id {
            self.deliver(device, frame)
        } else {
            let (reply, answer) = flume::bounded(1);
            let msg = Msg::Notify {
                device: device.into(),
                frame,
                reply,
            };
            self.peers[owner].send(msg).is_ok() && answer.recv_async().await.unwrap_or(false)
        };
        out.extend_from_slice(if found { R200 } else { R404 });
    }
}

// ---------------------------------------------------------------- devices

async fn accept_devices(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                let stream = match TLS.get() {
                    Some(config) => match rustls::ServerConnection::new(Arc::clone(config)) {
                        Ok(tls) => Stream::Tls(Box::new(TlsConn {
                            tcp,
                            tls: Box::new(tls),
                        })),
                        Err(_) => continue,
                    },
                    None => Stream::Plain(tcp),
                };
                glommio::spawn_local(hello(Rc::clone(&shard), stream)).detach();
            }
            // Out of descriptors, say: back off rather than spin.
            Err(_) => glommio::timer::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

/// Reads the version byte and CONNECT, then runs the session here or moves the
/// connection to its owner.
async fn hello(shard: Rc<Shard>, mut stream: Stream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let len = loop {
        if buf.len() >= 3 {
            let len = 3 + usize::from(u16::from_be_bytes([buf[1], buf[2]]));
            if buf[0] != 0 {
                return;
            }
            if buf.len() >= len {
                break len;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let Some(device) = json_str(&buf[3..len], b"DeviceId")
        .and_then(|d| std::str::from_utf8(d).ok())
        .map(Box::<str>::from)
    else {
        return;
    };
    let rest = buf.split_off(len);
    let owner = owner_of_device(&device, shard.peers.len()).0;
    if owner == shard.id {
        return session(shard, stream, device, rest).await;
    }
    let (tcp, tls) = match stream {
        Stream::Plain(tcp) => (tcp, None),
        Stream::Tls(conn) => (conn.tcp, Some(conn.tls)),
    };
    if let Ok(fd) = detach(tcp) {
        let msg = Msg::Adopt {
            fd,
            device,
            rest,
            tls,
        };
        let _ = shard.peers[owner].send(msg);
    }
}

/// A stream on this executor's reactor over a descriptor made by [`detach`].
#[allow(unsafe_code)]
fn attach(fd: OwnedFd) -> TcpStream {
    // SAFETY: `fd` owns an open, connected TCP socket; `into_raw_fd` gives that ownership
    // up and the stream takes it over, once.
    unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }
}

/// A registered connection's task: writes what its queue gets, reads and skips what the
/// device sends, until the device closes.
async fn session(shard: Rc<Shard>, mut stream: Stream, device: Box<str>, rest: Vec<u8>) {
    let conn = shard.register(device.clone());
    let mut skipper = Skipper::default();
    skipper.feed(&rest);
    drop(rest);
    // The frame being written and how much of it is out.
    let mut writing: Option<(Frame, usize)> = None;
    poll_fn(|cx| {
        // Writes first: a wake-up is most often a frame to write.
        loop {
            if writing.is_none() {
                writing = conn.queue.borrow_mut().pop_front().map(|f| (f, 0));
            }
            let Some((frame, done)) = &mut writing else {
                break;
            };
            match Pin::new(&mut stream).poll_write(cx, &frame[*done..]) {
                Poll::Ready(Ok(n)) => {
                    *done += n;
                    if *done == frame.len() {
                        writing = None;
                    }
                }
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                // Woken when the socket takes more.
                Poll::Pending => break,
            }
        }
        // What TLS holds back of the frames written (nothing for plain TCP).
        if let Poll::Ready(Err(_)) = Pin::new(&mut stream).poll_flush(cx) {
            return Poll::Ready(());
        }
        if poll_skip(&mut stream, &mut skipper, cx).is_ready() {
            return Poll::Ready(());
        }
        let mut waker = conn.waker.borrow_mut();
        if waker.is_none() {
            *waker = Some(cx.waker().clone());
        }
        Poll::Pending
    })
    .await;
    shard.unregister(&device, &conn);
}

/// Reads and skips until a read would block (pending) or the stream ends (ready).
fn poll_skip(stream: &mut Stream, skipper: &mut Skipper, cx: &mut Context<'_>) -> Poll<()> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        loop {
            match Pin::new(&mut *stream).poll_read(cx, &mut scratch) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(n)) => skipper.feed(&scratch[..n]),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
}

// ---------------------------------------------------------------- TLS

/// A device connection: plain TCP, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsConn>),
}

/// rustls' buffered server connection over a socket, driven as its documentation shows:
/// records read into it with `read_tls` and processed, its output written with
/// `write_tls`, through adapters that turn the socket's `Pending` into `WouldBlock`.
struct TlsConn {
    tcp: TcpStream,
    /// Boxed on its own, to move to another executor as it is.
    tls: Box<rustls::ServerConnection>,
}

/// The socket as `std::io`, within one poll.
struct Io<'a, 'b> {
    tcp: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl io::Read for Io<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_read(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl io::Write for Io<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsConn {
    /// Writes out what rustls has to send; pending while the socket is full.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tls.wants_write() {
            let mut io = Io {
                tcp: &mut self.tcp,
                cx,
            };
            match self.tls.write_tls(&mut io) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            match self.tls.reader().read(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            // The handshake's flights, and anything else processing asked to send.
            if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            let mut io = Io {
                tcp: &mut self.tcp,
                cx,
            };
            match self.tls.read_tls(&mut io) {
                Ok(0) => return Poll::Ready(Ok(0)),
                Ok(_) => {
                    if let Err(e) = self.tls.process_new_packets() {
                        // The alert rustls queued goes out if it can.
                        let _ = self.poll_send(cx);
                        return Poll::Ready(Err(io::Error::other(e)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // Nothing more is taken while earlier records wait for the socket.
        match self.poll_send(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        let n = self.tls.writer().write(buf)?;
        // Out now if the socket takes it; otherwise at the next flush.
        if let Poll::Ready(Err(e)) = self.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => s.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => s.poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(_) => Poll::Ready(Ok(())),
            Stream::Tls(s) => s.poll_send(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_close(cx),
            Stream::Tls(s) => {
                s.tls.send_close_notify();
                s.poll_send(cx)
            }
        }
    }
}

// ---------------------------------------------------------------- HTTP

// ---------------------------------------------------------------- tiny JSON

// ---------------------------------------------------------------- start

fn main() {
    if let Err(e) = floor_common::run::<Shard>("glommio_floor") {
        eprintln!("glommio_floor: {e}");
        std::process::exit(1);
    }
}

impl Executor for Shard {
    type Msg = Msg;

    const TLS: bool = true;

    fn new(id: usize, peers: Vec<flume::Sender<Msg>>) -> std::io::Result<Self> {
        Ok(Shard {
            id,
            peers,
            conns: RefCell::default(),
            devices: RefCell::default(),
            notified: Cell::new(0),
        })
    }

    fn start(self: &Rc<Self>, devices: TcpListener) {
        glommio::spawn_local(accept_devices(Rc::clone(self), devices)).detach();
    }

    fn handle(self: &Rc<Self>, msg: Msg) {
        Shard::handle(self, msg);
    }
}

impl Endpoints for Shard {
    fn broadcast(&self, body: &[u8], out: &mut Vec<u8>) {
        self.broadcast_(body, out);
    }

    async fn notify(&self, body: &[u8], out: &mut Vec<u8>) {
        self.notify_(body, out).await;
    }
}
