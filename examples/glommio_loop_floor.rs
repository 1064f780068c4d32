#![allow(clippy::print_stderr)] // it logs its ports and its failures to stderr
//! [`glommio_floor`](glommio_floor.rs) without a task per device connection: the same
//! server, seen from outside, whose executors each drive all their device connections from
//! one loop, as the floor server `perf/run.sh` builds does. A measuring tool, not a server
//! to deploy.
//!
//! ```sh
//! cargo build --release --example glommio_loop_floor
//! target/release/pushload --server target/release/examples/glommio_loop_floor --scenario broadcast
//! target/release/examples/glommio_loop_floor [-threads N] CONFIG.json
//! ```
//!
//! Everything glommio_floor does outside the device connections it does alike: the same
//! configuration keys, port log lines, wire frames and HTTP answers, executors (io_uring,
//! pinned, the shards' settings), SO_REUSEPORT listeners, device placement
//! ([`owner_of_device`]) and flume hand-offs (a broadcast as one `Arc<[u8]>` per other
//! executor, a notify to the device's owner and its answer back, a connection to its
//! owner after CONNECT as a descriptor), and a task per HTTP connection. What differs:
//!
//! - an accepted device connection leaves glommio at once: the executor keeps a duplicate
//!   of its descriptor, in an edge-triggered epoll set of its own;
//! - **one task per executor** drives all of its device connections: it waits (through
//!   glommio, [`Readiness`]: one multishot poll on the epoll descriptor) until the epoll
//!   set has something, takes the ready connections with `epoll_wait(…, 0)`, reads the
//!   CONNECTs and ACKs with `recv`, and flushes what a short write left behind;
//! - a frame is written with `send(MSG_NOSIGNAL | MSG_DONTWAIT)` straight from the
//!   broadcast fan-out loop (or the notify's delivery), one per connection; a
//!   connection keeps an output buffer only after a short write, written on `EPOLLOUT`.
//!
//! So the two servers differ only by the task and wake per delivery (and a connection's
//! glommio stream with its armed poll): what that costs is glommio_floor against this,
//! and what the runtime costs otherwise (io_uring executors, flume, two executors) is this
//! against the floor server.

mod floor_common;

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

use ahash::AHashMap;
use pushbroker::broker::sharded::owner_of_device;
use pushbroker::glommio;
use pushbroker::glommio::net::{Readiness, TcpListener};

use floor_common::{
    CONNACK, Endpoints, Executor, Msg, R200, R400, R404, Skipper, broadcast_frame, detach,
    json_str, notification_frame,
};

/// Bytes read from a device at once, through one buffer per executor.
const RBUF: usize = 64 << 10;

/// Ready connections taken from the epoll set at once.
const EVENTS: usize = 512;

/// A device connection, as its executor sees it.
struct Conn {
    fd: OwnedFd,
    /// What it sent so far, until its CONNECT is whole; `None` once registered.
    hello: Option<Vec<u8>>,
    /// Its device, once registered.
    device: Option<Box<str>>,
    skipper: Skipper,
    /// What a short write left unsent: written when the socket takes more (`EPOLLOUT`),
    /// and before anything newer.
    out: Vec<u8>,
    /// Its place in [`Devices::live`], once registered.
    live: usize,
}

impl Conn {
    /// Writes `d` at once, or keeps what the socket did not take.
    fn send(&mut self, mut d: &[u8]) {
        if self.out.is_empty() {
            let k = send(self.fd.as_raw_fd(), d);
            if k == d.len() {
                return;
            }
            d = &d[k..];
        }
        // A short write: the kernel reports EPOLLOUT once the socket takes more. (An error
        // is left for the read side to notice.)
        self.out.extend_from_slice(d);
    }

    /// Writes what was left unsent, as far as the socket takes it.
    fn flush(&mut self) {
        while !self.out.is_empty() {
            let k = send(self.fd.as_raw_fd(), &self.out);
            if k == 0 {
                return;
            }
            self.out.drain(..k);
        }
    }
}

/// Writes what the socket takes of `d` without blocking: how much (0 on any error).
#[allow(unsafe_code)]
fn send(fd: RawFd, d: &[u8]) -> usize {
    // SAFETY: `d` is valid for reads of `d.len()` bytes; `fd` is open (its owner is alive).
    let k = unsafe {
        libc::send(
            fd,
            d.as_ptr().cast(),
            d.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(k).unwrap_or(0)
}

/// What a read from a device gave.
enum Read {
    Data(usize),
    WouldBlock,
    /// End of stream or an error: the connection is done.
    Closed,
}

/// Reads from `fd` without blocking.
#[allow(unsafe_code)]
fn recv(fd: RawFd, buf: &mut [u8]) -> Read {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; `fd` is open.
        let k = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        match usize::try_from(k) {
            Ok(0) => return Read::Closed,
            Ok(n) => return Read::Data(n),
            Err(_) => match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) => return Read::WouldBlock,
                _ => return Read::Closed,
            },
        }
    }
}

/// Changes `fd`'s membership of the epoll set `ep` (`token`: its slot).
#[allow(unsafe_code)]
fn epoll_ctl(ep: &OwnedFd, op: i32, fd: RawFd, token: usize) -> std::io::Result<()> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
        u64: token as u64,
    };
    // SAFETY: `ep` and `fd` are open descriptors and `ev` lives across the call.
    if unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd, &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The device connections of one executor, all driven by its device task.
struct Devices {
    /// The edge-triggered epoll set of every connection here.
    epoll: OwnedFd,
    /// Connections by slot (their epoll token); `None`: a free slot.
    slots: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// The slots of the registered connections, in fan-out order.
    live: Vec<usize>,
    /// The newest connection of each device this executor owns.
    by_device: AHashMap<Box<str>, usize>,
    /// The read buffer: ACKs are skipped in it, never kept.
    rbuf: Vec<u8>,
}

impl Devices {
    #[allow(unsafe_code)]
    fn new() -> std::io::Result<Self> {
        // SAFETY: plain system call; a descriptor it returns is new and owned here.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: `ep` is open and nothing else owns it.
            epoll: unsafe { OwnedFd::from_raw_fd(ep) },
            slots: Vec::new(),
            free: Vec::new(),
            live: Vec::new(),
            by_device: AHashMap::new(),
            rbuf: vec![0; RBUF],
        })
    }

    /// Takes a connection into the epoll set: its slot (`None` if epoll refused it, and
    /// the connection is closed).
    fn add(&mut self, fd: OwnedFd, hello: Option<Vec<u8>>) -> Option<usize> {
        let slot = self.free.pop().unwrap_or(self.slots.len());
        epoll_ctl(&self.epoll, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), slot).ok()?;
        let conn = Conn {
            fd,
            hello,
            device: None,
            skipper: Skipper::default(),
            out: Vec::new(),
            live: 0,
        };
        if slot == self.slots.len() {
            self.slots.push(Some(conn));
        } else {
            self.slots[slot] = Some(conn);
        }
        Some(slot)
    }

    /// Takes a connection out of the epoll set and of every list.
    fn remove(&mut self, slot: usize) -> Option<Conn> {
        let conn = self.slots.get_mut(slot)?.take()?;
        let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, conn.fd.as_raw_fd(), slot);
        self.free.push(slot);
        if let Some(device) = &conn.device {
            self.live.swap_remove(conn.live);
            if let Some(m) = self
                .live
                .get(conn.live)
                .and_then(|&moved| self.slots[moved].as_mut())
            {
                m.live = conn.live;
            }
            if self.by_device.get(device) == Some(&slot) {
                self.by_device.remove(device);
            }
        }
        Some(conn)
    }

    /// Registers the connection in `slot` for `device` (the newest wins), writes its
    /// CONNACK and skips `rest`, what it sent after its CONNECT.
    fn register(&mut self, slot: usize, device: Box<str>, rest: &[u8]) {
        let Some(conn) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        conn.hello = None;
        conn.live = self.live.len();
        conn.device = Some(device.clone());
        conn.skipper.feed(rest);
        conn.send(CONNACK);
        self.live.push(slot);
        self.by_device.insert(device, slot);
    }

    fn fanout(&mut self, frame: &[u8]) {
        for &s in &self.live {
            if let Some(c) = self.slots[s].as_mut() {
                c.send(frame);
            }
        }
    }

    /// Writes `frame` to the newest connection of `device`; whether there is one.
    fn deliver(&mut self, device: &str, frame: &[u8]) -> bool {
        let Some(&slot) = self.by_device.get(device) else {
            return false;
        };
        if let Some(c) = self.slots[slot].as_mut() {
            c.send(frame);
        }
        true
    }
}

/// One executor's state.
struct Shard {
    id: usize,
    /// Every executor's inbox, this one's included.
    peers: Vec<flume::Sender<Msg>>,
    devices: RefCell<Devices>,
    /// Notifications encoded here so far.
    notified: Cell<u64>,
}

impl Shard {
    fn handle(&self, msg: Msg) {
        match msg {
            Msg::Broadcast(frame) => self.devices.borrow_mut().fanout(&frame),
            Msg::Notify {
                device,
                frame,
                reply,
            } => {
                let _ = reply.send(self.devices.borrow_mut().deliver(&device, &frame));
            }
            Msg::Adopt {
                fd, device, rest, ..
            } => {
                let mut devices = self.devices.borrow_mut();
                if let Some(slot) = devices.add(fd, None) {
                    devices.register(slot, device, &rest);
                }
            }
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
        self.devices.borrow_mut().fanout(&frame);
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
            self.devices.borrow_mut().deliver(device, &frame)
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

    /// Takes in what the epoll set reported for the connection in `slot`.
    fn event(&self, slot: usize, events: u32) {
        if events & libc::EPOLLOUT as u32 != 0 {
            let mut devices = self.devices.borrow_mut();
            if let Some(c) = devices.slots.get_mut(slot).and_then(Option::as_mut) {
                c.flush();
            }
        }
        let readable = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        if events & readable != 0 {
            self.input(slot);
        }
    }

    /// Reads until the connection in `slot` would block: skips ACKs, takes its CONNECT
    /// (registers it here or moves it to its owner), closes it at its end.
    fn input(&self, slot: usize) {
        let mut devices = self.devices.borrow_mut();
        loop {
            let Devices { slots, rbuf, .. } = &mut *devices;
            let Some(conn) = slots.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            let n = match recv(conn.fd.as_raw_fd(), rbuf) {
                Read::Data(n) => n,
                Read::WouldBlock => return,
                Read::Closed => {
                    devices.remove(slot);
                    return;
                }
            };
            let Some(hello) = conn.hello.as_mut() else {
                conn.skipper.feed(&rbuf[..n]);
                if n < RBUF {
                    // A short read took everything: what arrives later is reported.
                    return;
                }
                continue;
            };
            hello.extend_from_slice(&rbuf[..n]);
            match parse_hello(hello) {
                Err(()) => {
                    devices.remove(slot);
                    return;
                }
                Ok(None) => {}
                Ok(Some((device, len))) => {
                    let rest = hello.split_off(len);
                    let owner = owner_of_device(&device, self.peers.len()).0;
                    if owner == self.id {
                        devices.register(slot, device, &rest);
                    } else {
                        if let Some(conn) = devices.remove(slot) {
                            let msg = Msg::Adopt {
                                fd: conn.fd,
                                device,
                                rest,
                                tls: None,
                            };
                            let _ = self.peers[owner].send(msg);
                        }
                        return;
                    }
                }
            }
            if n < RBUF {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------- devices

/// The version byte and CONNECT at the start of `p`: its device and their length; `None`
/// until they are whole, an error for another version or a CONNECT without a device.
fn parse_hello(p: &[u8]) -> Result<Option<(Box<str>, usize)>, ()> {
    let [version, h0, h1, ..] = *p else {
        return Ok(None);
    };
    if version != 0 {
        return Err(());
    }
    let len = 3 + usize::from(u16::from_be_bytes([h0, h1]));
    if p.len() < len {
        return Ok(None);
    }
    json_str(&p[3..len], b"DeviceId")
        .and_then(|d| std::str::from_utf8(d).ok())
        .map(|d| Some((d.into(), len)))
        .ok_or(())
}

async fn accept_devices(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                if let Ok(fd) = detach(stream) {
                    shard.devices.borrow_mut().add(fd, Some(Vec::new()));
                }
            }
            // Out of descriptors, say: back off rather than spin.
            Err(_) => glommio::timer::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

/// The executor's device task: every time the epoll set has something, takes all of it.
#[allow(unsafe_code)]
async fn drive(shard: Rc<Shard>) {
    let ep = shard.devices.borrow().epoll.as_raw_fd();
    let mut readiness = Readiness::new(ep);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    loop {
        readiness.ready().await;
        // Edge-triggered: the set is emptied before waiting again.
        loop {
            // SAFETY: `events` is valid for writes of `EVENTS` entries; `ep` stays open
            // (`shard` owns it).
            let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), EVENTS as i32, 0) };
            let Ok(n) = usize::try_from(n) else {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                break;
            };
            for ev in &events[..n] {
                let (token, flags) = (ev.u64, ev.events);
                shard.event(token as usize, flags);
            }
            if n < EVENTS {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------- HTTP

// ---------------------------------------------------------------- tiny JSON

// ---------------------------------------------------------------- start

fn main() {
    if let Err(e) = floor_common::run::<Shard>("glommio_loop_floor") {
        eprintln!("glommio_loop_floor: {e}");
        std::process::exit(1);
    }
}

impl Executor for Shard {
    type Msg = Msg;

    const TLS: bool = false;

    fn new(id: usize, peers: Vec<flume::Sender<Msg>>) -> std::io::Result<Self> {
        Ok(Shard {
            id,
            peers,
            devices: RefCell::new(Devices::new()?),
            notified: Cell::new(0),
        })
    }

    fn start(self: &Rc<Self>, devices: TcpListener) {
        glommio::spawn_local(drive(Rc::clone(self))).detach();
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_is_taken_whole_with_its_device() {
        let connect = b"\x00\x00\x14{\"DeviceId\":\"dev-1\"}\x00\x0b";
        assert_eq!(parse_hello(&connect[..2]), Ok(None));
        assert_eq!(parse_hello(&connect[..20]), Ok(None));
        assert_eq!(parse_hello(connect), Ok(Some(("dev-1".into(), 23))));
        assert_eq!(parse_hello(b"\x01\x00\x02{}"), Err(()));
        assert_eq!(parse_hello(b"\x00\x00\x02{}"), Err(()));
    }
}
