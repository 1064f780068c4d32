//! Test doubles for driving sessions without sockets or real time: a [`VirtualClock`]
//! whose time moves only when told, and an in-memory duplex stream, [`pipe`], whose
//! device end writes and reads frames by hand.
//!
//! Both wake the session's task properly (no polling loops, no sleeps), so a test
//! advances the clock or writes bytes and then awaits what the session does.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncWrite};

use super::SessionClock;

/// A clock standing still until [`VirtualClock::advance`] moves it; moving it wakes the
/// sleeps whose deadline passed. Clones share the same time (`Rc` inside).
#[derive(Clone)]
pub struct VirtualClock {
    inner: Rc<ClockInner>,
}

struct ClockInner {
    /// What [`VirtualClock::now`] read when the clock was made.
    start: Instant,
    /// How far the clock moved since.
    elapsed: Cell<Duration>,
    /// The armed sleeps: id, deadline, the waker of the task awaiting it. Borrowed only
    /// inside a method.
    sleepers: RefCell<Vec<(u64, Instant, Waker)>>,
    /// The id of the next sleep.
    next_id: Cell<u64>,
}

impl fmt::Debug for VirtualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtualClock")
            .field("elapsed", &self.elapsed())
            .field("sleepers", &self.sleepers())
            .finish()
    }
}

impl Default for VirtualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtualClock {
    /// A clock reading the real `Instant::now()` until it is moved.
    pub fn new() -> Self {
        Self {
            inner: Rc::new(ClockInner {
                start: Instant::now(),
                elapsed: Cell::new(Duration::ZERO),
                sleepers: RefCell::new(Vec::new()),
                next_id: Cell::new(0),
            }),
        }
    }

    /// Moves the clock forward by `by` and wakes every sleep whose deadline is now
    /// reached.
    pub fn advance(&self, by: Duration) {
        self.inner.elapsed.set(self.inner.elapsed.get() + by);
        let now = self.now();
        let due: Vec<Waker> = {
            let mut sleepers = self.inner.sleepers.borrow_mut();
            let mut due = Vec::new();
            sleepers.retain(|(_, deadline, waker)| {
                let keep = *deadline > now;
                if !keep {
                    due.push(waker.clone());
                }
                keep
            });
            due
        };
        for waker in due {
            waker.wake();
        }
    }

    /// How far the clock moved since it was made.
    pub fn elapsed(&self) -> Duration {
        self.inner.elapsed.get()
    }

    /// How many sleeps are armed (polled, not yet due, not dropped).
    pub fn sleepers(&self) -> usize {
        self.inner.sleepers.borrow().len()
    }

    /// How many sleeps were made since the clock was.
    pub fn sleeps_made(&self) -> u64 {
        self.inner.next_id.get()
    }

    /// The earliest deadline of an armed sleep.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.inner.sleepers.borrow().iter().map(|s| s.1).min()
    }
}

impl SessionClock for VirtualClock {
    type Sleep = VirtualSleep;

    fn now(&self) -> Instant {
        self.inner.start + self.inner.elapsed.get()
    }

    fn sleep_until(&self, deadline: Instant) -> VirtualSleep {
        let id = self.inner.next_id.get();
        self.inner.next_id.set(id + 1);
        VirtualSleep {
            clock: Rc::clone(&self.inner),
            id,
            deadline,
        }
    }
}

/// A sleep of a [`VirtualClock`]: completes once the clock reads its deadline.
pub struct VirtualSleep {
    clock: Rc<ClockInner>,
    id: u64,
    deadline: Instant,
}

impl fmt::Debug for VirtualSleep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtualSleep")
            .field("id", &self.id)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl VirtualSleep {
    fn disarm(&self) {
        self.clock.sleepers.borrow_mut().retain(|s| s.0 != self.id);
    }
}

impl Future for VirtualSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let now = self.clock.start + self.clock.elapsed.get();
        if now >= self.deadline {
            self.disarm();
            return Poll::Ready(());
        }
        let mut sleepers = self.clock.sleepers.borrow_mut();
        match sleepers.iter_mut().find(|s| s.0 == self.id) {
            Some(s) => s.2.clone_from(cx.waker()),
            None => sleepers.push((self.id, self.deadline, cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl Drop for VirtualSleep {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// How many bytes the server end may write before the device end reads: enough for any
/// frame, so only a test that asks for less sees a write block.
pub const DEFAULT_PIPE_CAPACITY: usize = 256 << 10;

/// A duplex in-memory stream with the default capacity; see [`pipe_with_capacity`].
pub fn pipe() -> (ServerEnd, DeviceEnd) {
    pipe_with_capacity(DEFAULT_PIPE_CAPACITY)
}

/// A duplex in-memory stream: the server end is an `AsyncRead + AsyncWrite` for the
/// session, the device end has helpers to write bytes and frames, read what the server
/// wrote, and close.
///
/// The server end's writes block (wake later) once `capacity` bytes wait unread by the
/// device; the device's writes never block. Dropping an end closes both of its
/// directions: the other end reads EOF, and a server writing to a dropped device end
/// gets `BrokenPipe`.
pub fn pipe_with_capacity(capacity: usize) -> (ServerEnd, DeviceEnd) {
    let shared = Rc::new(RefCell::new(Pipe {
        to_server: Direction::new(usize::MAX),
        to_device: Direction::new(capacity.max(1)),
    }));
    (
        ServerEnd {
            pipe: Rc::clone(&shared),
        },
        DeviceEnd {
            pipe: shared,
            inbox: RefCell::new(Vec::new()),
        },
    )
}

/// One direction of a [`pipe`].
struct Direction {
    data: VecDeque<u8>,
    capacity: usize,
    /// The writer closed (or dropped) its end: the reader gets EOF once `data` is read.
    closed: bool,
    /// The reader dropped its end: writes fail.
    reader_gone: bool,
    /// The task waiting to read.
    reader: Option<Waker>,
    /// The task waiting for room to write.
    writer: Option<Waker>,
}

impl Direction {
    fn new(capacity: usize) -> Self {
        Self {
            data: VecDeque::new(),
            capacity,
            closed: false,
            reader_gone: false,
            reader: None,
            writer: None,
        }
    }

    fn wake_reader(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }

    fn wake_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
}

struct Pipe {
    to_server: Direction,
    to_device: Direction,
}

/// The session's end of a [`pipe`]. Borrows the shared state only inside a `poll`.
pub struct ServerEnd {
    pipe: Rc<RefCell<Pipe>>,
}

impl fmt::Debug for ServerEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerEnd").finish_non_exhaustive()
    }
}

impl AsyncRead for ServerEnd {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut pipe = self.pipe.borrow_mut();
        let dir = &mut pipe.to_server;
        if dir.data.is_empty() {
            if dir.closed || out.is_empty() {
                return Poll::Ready(Ok(0));
            }
            dir.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = out.len().min(dir.data.len());
        for (o, b) in out.iter_mut().zip(dir.data.drain(..n)) {
            *o = b;
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for ServerEnd {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut pipe = self.pipe.borrow_mut();
        let dir = &mut pipe.to_device;
        if dir.reader_gone {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if dir.closed {
            return Poll::Ready(Err(io::Error::other("write after close")));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = dir.capacity.saturating_sub(dir.data.len());
        if room == 0 {
            dir.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(data.len());
        dir.data.extend(&data[..n]);
        dir.wake_reader();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut pipe = self.pipe.borrow_mut();
        pipe.to_device.closed = true;
        pipe.to_device.wake_reader();
        Poll::Ready(Ok(()))
    }
}

impl Drop for ServerEnd {
    fn drop(&mut self) {
        // No borrow can be live: both ends borrow only inside their own methods.
        let Ok(mut pipe) = self.pipe.try_borrow_mut() else {
            return;
        };
        pipe.to_device.closed = true;
        pipe.to_device.wake_reader();
        pipe.to_server.reader_gone = true;
        pipe.to_server.wake_writer();
    }
}

/// The device's end of a [`pipe`], driven by hand from a test.
pub struct DeviceEnd {
    pipe: Rc<RefCell<Pipe>>,
    /// What the device took from the pipe and has not handed to the test yet (part of a
    /// frame). Borrowed only inside a method.
    inbox: RefCell<Vec<u8>>,
}

impl fmt::Debug for DeviceEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceEnd")
            .field("unread", &self.unread())
            .field("server_closed", &self.is_server_closed())
            .finish()
    }
}

impl DeviceEnd {
    /// Sends `bytes` to the server end; `false` (and nothing sent) when the server end is
    /// gone or the device closed its side.
    pub fn write(&self, bytes: &[u8]) -> bool {
        let mut pipe = self.pipe.borrow_mut();
        let dir = &mut pipe.to_server;
        if dir.reader_gone || dir.closed {
            return false;
        }
        dir.data.extend(bytes);
        dir.wake_reader();
        true
    }

    /// Sends one frame holding `json` (a big-endian `u16` length, then the bytes).
    ///
    /// # Panics
    /// When `json` is longer than a frame can carry (a bug in the test).
    pub fn write_frame(&self, json: &str) -> bool {
        let Ok(len) = u16::try_from(json.len()) else {
            panic!("a frame carries at most 65535 bytes, not {}", json.len());
        };
        let mut bytes = Vec::with_capacity(2 + json.len());
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(json.as_bytes());
        self.write(&bytes)
    }

    /// Sends the version byte and a CONNECT frame holding `connect_json`.
    pub fn hello(&self, connect_json: &str) -> bool {
        self.write(&[crate::protocol::WIRE_VERSION]) && self.write_frame(connect_json)
    }

    /// Closes the device's sending side: the server end reads EOF once it has read what
    /// was sent. The device can still read.
    pub fn close(&self) {
        let mut pipe = self.pipe.borrow_mut();
        pipe.to_server.closed = true;
        pipe.to_server.wake_reader();
    }

    /// Moves what the server wrote into the inbox, making room for the server.
    fn pull(&self) {
        let mut pipe = self.pipe.borrow_mut();
        let dir = &mut pipe.to_device;
        if dir.data.is_empty() {
            return;
        }
        self.inbox.borrow_mut().extend(dir.data.drain(..));
        dir.wake_writer();
    }

    /// Takes every byte the server wrote that was not handed out yet.
    pub fn read_available(&self) -> Vec<u8> {
        self.pull();
        std::mem::take(&mut *self.inbox.borrow_mut())
    }

    /// How many bytes the server wrote that were not handed out yet.
    pub fn unread(&self) -> usize {
        self.pipe.borrow().to_device.data.len() + self.inbox.borrow().len()
    }

    /// Takes the next whole frame the server wrote, length prefix included, if one is
    /// there.
    pub fn try_read_raw_frame(&self) -> Option<Vec<u8>> {
        self.pull();
        let mut inbox = self.inbox.borrow_mut();
        let header = inbox.get(..2)?;
        let total = 2 + usize::from(u16::from_be_bytes([header[0], header[1]]));
        if inbox.len() < total {
            return None;
        }
        let rest = inbox.split_off(total);
        Some(std::mem::replace(&mut *inbox, rest))
    }

    /// Takes the body of the next whole frame the server wrote, if one is there.
    pub fn try_read_frame(&self) -> Option<Vec<u8>> {
        self.try_read_raw_frame().map(|mut f| f.split_off(2))
    }

    /// Waits for the next whole frame the server writes, length prefix included;
    /// `None` once the server end is closed without one.
    pub async fn read_raw_frame(&self) -> Option<Vec<u8>> {
        poll_fn(|cx| {
            if let Some(frame) = self.try_read_raw_frame() {
                return Poll::Ready(Some(frame));
            }
            let mut pipe = self.pipe.borrow_mut();
            let dir = &mut pipe.to_device;
            if dir.closed {
                return Poll::Ready(None);
            }
            dir.reader = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Waits for the body of the next whole frame the server writes, as text (lossy for
    /// bytes that are not UTF-8); `None` once the server end is closed without one.
    pub async fn read_frame(&self) -> Option<String> {
        let frame = self.read_raw_frame().await?;
        Some(String::from_utf8_lossy(&frame[2..]).into_owned())
    }

    /// Whether the server end closed (or dropped) its side: it will write no more.
    pub fn is_server_closed(&self) -> bool {
        self.pipe.borrow().to_device.closed
    }

    /// Waits until the server end closed (or dropped) its side, discarding what it wrote
    /// meanwhile.
    pub async fn server_closed(&self) {
        poll_fn(|cx| {
            self.read_available();
            let mut pipe = self.pipe.borrow_mut();
            let dir = &mut pipe.to_device;
            if dir.closed {
                return Poll::Ready(());
            }
            dir.reader = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl Drop for DeviceEnd {
    fn drop(&mut self) {
        let Ok(mut pipe) = self.pipe.try_borrow_mut() else {
            return;
        };
        pipe.to_server.closed = true;
        pipe.to_server.wake_reader();
        pipe.to_device.reader_gone = true;
        pipe.to_device.wake_writer();
    }
}
