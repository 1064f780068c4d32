//! The steady loop on an io_uring ring: the kernel reads each socket into buffers the
//! loop hands it, and the loop's answers go back as submissions, one system call per
//! turn for all of them.
//!
//! - Each socket has one multishot receive armed: the kernel reads whatever arrives
//!   into the next free buffer of the loop's provided-buffer ring and posts a
//!   completion, with no system call per read and no readiness event to turn into one.
//! - The sockets are registered with the ring, so no operation looks its descriptor up.
//! - A connection's answers go out as one send at a time, in order: what is produced
//!   while a send is in flight waits, and the rest of a short send goes first.
//! - One `io_uring_enter` per turn submits the turn's sends and waits for the next
//!   completions, or for [`COMMAND_CHECK`] to pass so that the commands are looked at.
//! - The ring runs its completion work only inside that call (`DEFER_TASKRUN`): a
//!   device thread is not interrupted to run it.

// The ring shares memory with the kernel: the provided buffers and the bytes of each
// send in flight. Every unsafe block below says why that memory outlives its use.
#![allow(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};

use anyhow::{Context, Result};
use io_uring::types::BufRingEntry;
use io_uring::{IoUring, Submitter, cqueue, opcode, squeue, types};

use super::{COMMAND_CHECK, Handed, between_turns};
use crate::link::{Command, Event, Receipt};
use crate::procfs::now_ns;
use crate::wire::{self, Markers};
use crate::worker::{Answers, Buffer, Out, answer, frame_len};

/// Submission queue entries: more than one turn's sends usually need; a turn that has
/// more submits the full queue and goes on.
const SQ_ENTRIES: u32 = 4096;
/// The size of one provided buffer. A frame larger than one arrives in several.
const CHUNK: usize = 2048;
/// The most provided buffers. The kernel fills buffers only while the loop is inside
/// its wait (`DEFER_TASKRUN`), and the loop gives each back as soon as it has read it.
const MAX_CHUNKS: u16 = 4096;
/// Completions a wait asks for, up to [`BATCH_WAIT_US`] after it began; then the first
/// one is enough. One turn answers a batch of a broadcast's frames at once: fewer turns,
/// fewer receipt batches for the worker's output thread. (The kernel also runs the
/// ring's deferred completion work in steps of this many, at least 20.)
const BATCH: usize = 256;
/// How long a wait holds out for [`BATCH`] completions, in µs: a delay a delivery's
/// latency does not notice.
const BATCH_WAIT_US: u32 = 200;
/// The buffer group of the provided buffers.
const GROUP: u16 = 0;
/// A page: the provided-buffer ring must start on one.
const PAGE: usize = 4096;

/// The operation a completion is for, in the low bit of its user data.
const RECV: u64 = 0;
const SEND: u64 = 1;

/// A ring ready for the steady loop, with its provided buffers registered.
pub(crate) struct Ring {
    ring: IoUring,
    pool: Pool,
}

impl Ring {
    /// A ring for `devices` sockets, or the reason there is none: io_uring disabled, or
    /// a kernel without `DEFER_TASKRUN` (6.1), which also has multishot receive (6.0).
    pub(crate) fn new(devices: usize) -> io::Result<Ring> {
        let cq = (2 * devices).next_power_of_two().clamp(4096, 65536) as u32;
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_submit_all()
            .setup_cqsize(cq)
            .setup_clamp()
            .build(SQ_ENTRIES)?;
        let chunks = (devices.max(1).next_power_of_two()).clamp(64, usize::from(MAX_CHUNKS));
        let pool = Pool::new(&ring.submitter(), chunks as u16)?;
        Ok(Ring { ring, pool })
    }
}

/// The provided buffers: `count` buffers of [`CHUNK`] bytes and the ring through which
/// the loop hands them to the kernel. Both allocations are never freed once registered:
/// the kernel may write into a buffer until the ring is torn down, which can finish
/// after the loop's thread let go of it. (One pair per device thread, for the life of
/// the process.)
struct Pool {
    entries: *mut BufRingEntry,
    data: *mut u8,
    count: u16,
    /// The next entry to fill, published to the kernel by [`Pool::publish`].
    tail: u16,
}

impl Pool {
    fn new(submitter: &Submitter<'_>, count: u16) -> io::Result<Pool> {
        let ring_layout = Layout::from_size_align(
            usize::from(count) * std::mem::size_of::<BufRingEntry>(),
            PAGE,
        )
        .map_err(io::Error::other)?;
        // SAFETY: the layout's size is not zero (count ≥ 64).
        let entries = unsafe { alloc_zeroed(ring_layout) }.cast::<BufRingEntry>();
        if entries.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let data_len = usize::from(count) * CHUNK;
        let data = Box::into_raw(vec![0u8; data_len].into_boxed_slice()).cast::<u8>();
        // SAFETY: `entries` is a page-aligned, zeroed ring of `count` entries, and it and
        // the buffers it will point to are never freed once this succeeds (see Pool).
        let registered =
            unsafe { submitter.register_buf_ring_with_flags(entries as u64, count, GROUP, 0) };
        if let Err(e) = registered {
            // SAFETY: the kernel refused the ring, so nothing but this function knows
            // either allocation; each is freed with the layout it was made with.
            unsafe {
                dealloc(entries.cast::<u8>(), ring_layout);
                drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                    data, data_len,
                )));
            }
            return Err(e);
        }
        let mut pool = Pool {
            entries,
            data,
            count,
            tail: 0,
        };
        for bid in 0..count {
            pool.give_back(bid);
        }
        pool.publish();
        Ok(pool)
    }

    /// Bytes `len` of buffer `bid`, which a completion said the kernel wrote.
    fn chunk(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if bid >= self.count {
            return None;
        }
        // SAFETY: buffer `bid` lies within the never-freed data allocation; the kernel
        // finished writing it when it posted the completion, and does not get it back
        // before [`Pool::give_back`], which the borrow of `self` orders after this slice.
        Some(unsafe {
            std::slice::from_raw_parts(self.data.add(usize::from(bid) * CHUNK), len.min(CHUNK))
        })
    }

    /// Hands buffer `bid` back to the kernel (seen by it after [`Pool::publish`]).
    fn give_back(&mut self, bid: u16) {
        if bid >= self.count {
            return;
        }
        let at = usize::from(self.tail & (self.count - 1));
        // SAFETY: `at` is within the ring's `count` entries (count is a power of two),
        // and the kernel reads no entry at or past the published tail.
        let entry = unsafe { &mut *self.entries.add(at) };
        entry.set_addr(self.data as u64 + u64::from(bid) * CHUNK as u64);
        entry.set_len(CHUNK as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Lets the kernel see the buffers given back.
    fn publish(&self) {
        // SAFETY: the tail is a u16 within the never-freed, page-aligned ring, which the
        // kernel only reads.
        let tail = unsafe { AtomicU16::from_ptr(BufRingEntry::tail(self.entries).cast_mut()) };
        tail.store(self.tail, Ordering::Release);
    }
}

/// One device's connection in the loop.
struct Conn {
    index: u32,
    stream: std::net::TcpStream,
    buf: Buffer,
    /// The bytes of the send in flight, unless they are [`Conn::constant`]: the kernel
    /// reads them until its completion.
    sending: Vec<u8>,
    /// The send in flight when its bytes are one of the fixed answers (most are).
    constant: Option<&'static [u8]>,
    /// Answers waiting for the send in flight.
    unsent: Vec<u8>,
    /// Whether a send is in flight (its completion not seen yet).
    in_flight: bool,
    /// Whether the multishot receive is armed.
    reading: bool,
    open: bool,
}

impl Conn {
    /// The bytes the send in flight (or about to be) takes.
    fn flight(&self) -> &[u8] {
        self.constant.unwrap_or(&self.sending)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The kernel may still read a send in flight (the ring can outlive the loop's
        // return): its bytes are left to it.
        if self.in_flight {
            std::mem::forget(std::mem::take(&mut self.sending));
        }
    }
}

/// The submission side: the queue, and the call that submits it when it is full.
struct Queue<'r> {
    submitter: Submitter<'r>,
    sq: io_uring::SubmissionQueue<'r>,
    /// Whether the sockets are registered (indexed by connection), else used by number.
    fixed: bool,
}

impl Queue<'_> {
    /// Queues `entry`, first submitting the queue if it is full.
    ///
    /// # Safety
    ///
    /// The memory `entry` names must stay valid until its completion is seen.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: passed on from the caller.
            if unsafe { self.sq.push(entry) }.is_ok() {
                return Ok(());
            }
            self.sq.sync();
            match self.submitter.submit() {
                Ok(_) => {}
                Err(e) if retry(&e) => {}
                Err(e) => return Err(e),
            }
            self.sq.sync();
        }
    }

    /// Arms connection `i`'s multishot receive.
    fn recv(&mut self, i: usize, c: &mut Conn) -> io::Result<()> {
        let entry = if self.fixed {
            opcode::RecvMulti::new(types::Fixed(i as u32), GROUP).build()
        } else {
            opcode::RecvMulti::new(types::Fd(c.stream.as_raw_fd()), GROUP).build()
        }
        .user_data(tag(i, RECV));
        // SAFETY: the receive names no memory but the provided buffers, never freed.
        unsafe { self.push(&entry) }?;
        c.reading = true;
        Ok(())
    }

    /// Sends connection `i`'s [`Conn::flight`].
    fn send(&mut self, i: usize, c: &mut Conn) -> io::Result<()> {
        let bytes = c.flight();
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let ptr = bytes.as_ptr();
        // All of it or an error: the kernel sends the rest of a short send itself.
        let flags = libc::MSG_NOSIGNAL | libc::MSG_WAITALL;
        let entry = if self.fixed {
            opcode::Send::new(types::Fixed(i as u32), ptr, len)
                .flags(flags)
                .build()
        } else {
            let fd: RawFd = c.stream.as_raw_fd();
            opcode::Send::new(types::Fd(fd), ptr, len)
                .flags(flags)
                .build()
        }
        .user_data(tag(i, SEND));
        // SAFETY: the bytes are a constant, or `c.sending`, which is not touched while
        // `in_flight` is set (its completion clears it); a connection dropped before
        // then leaks it (`Drop for Conn`).
        unsafe { self.push(&entry) }?;
        c.in_flight = true;
        Ok(())
    }
}

/// Whether a ring call that failed with `e` should just be made again.
fn retry(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

fn tag(i: usize, op: u64) -> u64 {
    (i as u64) << 1 | op
}

/// Serves `handed` on `ring` until the process ends, answering the thread's commands
/// between waits. Receipts go out in one batch per turn.
pub(crate) fn run(
    ring: Ring,
    markers: &Markers,
    out: &flume::Sender<Out>,
    commands: &flume::Receiver<Command>,
    handed: Vec<Handed>,
    mut receipts: Vec<Receipt>,
) -> Result<()> {
    let Ring { mut ring, mut pool } = ring;
    let batch_wait = ring.params().is_feature_min_timeout();
    let (mut submitter, sq, mut cq) = ring.split();
    // Saves looking the ring's own descriptor up on every wait; optional.
    let _ = submitter.register_ring_fd();
    let fds: Vec<RawFd> = handed.iter().map(|h| h.stream.as_raw_fd()).collect();
    let fixed = submitter.register_files(&fds).is_ok();
    let mut q = Queue {
        submitter,
        sq,
        fixed,
    };
    let mut conns: Vec<Conn> = handed
        .into_iter()
        .map(|h| Conn {
            index: h.index,
            stream: h.stream,
            buf: h.buf,
            sending: Vec::new(),
            constant: None,
            unsent: Vec::new(),
            in_flight: false,
            reading: false,
            open: true,
        })
        .collect();
    // Frames read with CONNACK are answered before anything else.
    let at_ns = now_ns();
    for (i, c) in conns.iter_mut().enumerate() {
        serve_buffered(markers, out, &mut q, i, c, at_ns, &mut receipts)?;
        if c.open {
            q.recv(i, c).context("arming a receive")?;
        }
    }
    let wait = types::Timespec::from(COMMAND_CHECK);
    // A kernel without the batch wait (6.12) returns at the first completion.
    let (want, args) = if batch_wait {
        let args = types::SubmitArgs::new().timespec(&wait);
        (BATCH, args.min_wait_usec(BATCH_WAIT_US))
    } else {
        (1, types::SubmitArgs::new().timespec(&wait))
    };
    let mut rearm: Vec<usize> = Vec::new();
    loop {
        if !between_turns(out, commands, &mut receipts) {
            return Ok(());
        }
        q.sq.sync();
        match q.submitter.submit_with_args(want, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) || retry(&e) => {}
            Err(e) => return Err(e).context("waiting on the ring"),
        }
        q.sq.sync();
        cq.sync();
        let at_ns = now_ns();
        for cqe in &mut cq {
            let i = (cqe.user_data() >> 1) as usize;
            let Some(c) = conns.get_mut(i) else {
                continue;
            };
            let (res, flags) = (cqe.result(), cqe.flags());
            if cqe.user_data() & 1 == SEND {
                c.in_flight = false;
                if c.open {
                    sent(out, &mut q, i, c, res).context("sending")?;
                }
                continue;
            }
            if !cqueue::more(flags) {
                c.reading = false;
            }
            let bid = cqueue::buffer_select(flags);
            if let (Some(bid), true) = (bid, res > 0 && c.open) {
                match pool.chunk(bid, res as usize) {
                    Some(data) => read(markers, out, &mut q, i, c, data, at_ns, &mut receipts)?,
                    None => close(out, c, format!("reading: buffer {bid} unknown")),
                }
            }
            if let Some(bid) = bid {
                pool.give_back(bid);
            }
            if !c.open || c.reading {
                continue;
            }
            match res {
                0 => close(out, c, "EOF".into()),
                r if r > 0 || -r == libc::ENOBUFS || -r == libc::EINTR => rearm.push(i),
                r => close(
                    out,
                    c,
                    format!("reading: {}", io::Error::from_raw_os_error(-r)),
                ),
            }
        }
        cq.sync();
        pool.publish();
        for i in rearm.drain(..) {
            if let Some(c) = conns.get_mut(i)
                && c.open
                && !c.reading
            {
                q.recv(i, c).context("arming a receive")?;
            }
        }
    }
}

/// Handles the completion (`res`) of connection `i`'s send.
fn sent(
    out: &flume::Sender<Out>,
    q: &mut Queue<'_>,
    i: usize,
    c: &mut Conn,
    res: i32,
) -> io::Result<()> {
    if res < 0 {
        if -res == libc::EINTR || -res == libc::EAGAIN {
            return q.send(i, c);
        }
        let e = io::Error::from_raw_os_error(-res);
        close(out, c, format!("writing: {e}"));
        return Ok(());
    }
    let n = res as usize;
    let flight = c.flight().len();
    if n == 0 && flight > 0 {
        close(
            out,
            c,
            format!("writing: {}", io::Error::from(io::ErrorKind::WriteZero)),
        );
        return Ok(());
    }
    if n < flight {
        // The rest goes first, then what waited.
        if let Some(constant) = c.constant.take() {
            c.sending.clear();
            c.sending.extend_from_slice(constant);
        }
        c.sending.drain(..n);
        c.sending.append(&mut c.unsent);
    } else {
        c.constant = None;
        c.sending.clear();
        std::mem::swap(&mut c.sending, &mut c.unsent);
    }
    if c.sending.is_empty() {
        return Ok(());
    }
    q.send(i, c)
}

/// Takes `data` read from connection `i` and answers the frames it completes. While no
/// part of a frame waits in the connection's buffer, whole frames are answered where
/// the kernel put them and only a trailing part is kept.
#[allow(clippy::too_many_arguments)]
fn read(
    markers: &Markers,
    out: &flume::Sender<Out>,
    q: &mut Queue<'_>,
    i: usize,
    c: &mut Conn,
    mut data: &[u8],
    at_ns: u64,
    receipts: &mut Vec<Receipt>,
) -> Result<()> {
    let mut answers = Answers::default();
    if c.buf.is_empty() {
        while let Some(len) = frame_len(data) {
            answer(markers, c.index, &data[2..len], at_ns, &mut answers);
            data = &data[len..];
        }
    }
    while !data.is_empty() {
        let room = c.buf.room();
        if room.is_empty() {
            close(out, c, "reading: a frame larger than the buffer".into());
            return Ok(());
        }
        let n = room.len().min(data.len());
        room[..n].copy_from_slice(&data[..n]);
        c.buf.filled(n);
        data = &data[n..];
        while let Some(frame) = c.buf.frame() {
            answer(markers, c.index, c.buf.body(frame), at_ns, &mut answers);
            c.buf.consume(frame);
        }
    }
    answered(out, q, i, c, answers, receipts)
}

/// Answers the complete frames in connection `i`'s buffer.
fn serve_buffered(
    markers: &Markers,
    out: &flume::Sender<Out>,
    q: &mut Queue<'_>,
    i: usize,
    c: &mut Conn,
    at_ns: u64,
    receipts: &mut Vec<Receipt>,
) -> Result<()> {
    let mut answers = Answers::default();
    while let Some(frame) = c.buf.frame() {
        answer(markers, c.index, c.buf.body(frame), at_ns, &mut answers);
        c.buf.consume(frame);
    }
    answered(out, q, i, c, answers, receipts)
}

/// Sends connection `i`'s `answers` (after what is in flight) and records what they
/// acknowledge.
fn answered(
    out: &flume::Sender<Out>,
    q: &mut Queue<'_>,
    i: usize,
    c: &mut Conn,
    answers: Answers,
    receipts: &mut Vec<Receipt>,
) -> Result<()> {
    if !answers.bytes.is_empty() {
        if c.in_flight {
            c.unsent.extend_from_slice(&answers.bytes);
        } else {
            c.constant = [wire::ACK, wire::PONG]
                .into_iter()
                .find(|k| *k == answers.bytes.as_slice());
            if c.constant.is_none() {
                c.sending.clear();
                c.sending.extend_from_slice(&answers.bytes);
            }
            q.send(i, c).context("sending")?;
        }
        receipts.extend(answers.receipts);
    }
    if answers.broken {
        close(out, c, "the server sent CONNBROKEN".into());
    }
    Ok(())
}

/// Ends a connection the server closed or broke, and reports it lost. Its operations
/// still in flight end with the socket's shutdown; their completions are only counted.
fn close(out: &flume::Sender<Out>, c: &mut Conn, reason: String) {
    c.open = false;
    let _ = c.stream.shutdown(std::net::Shutdown::Both);
    let _ = out.send(Out::Event(Event::Lost {
        device: c.index,
        reason,
    }));
}
