//! The steady loop: how a device thread reads once its plain-socket devices are all
//! connected and none will churn (every scenario but churn and TLS).
//!
//! Connecting needs timeouts, a bounded number of attempts in flight and reconnection, and
//! stays on the thread's tokio executor. Once connected, a device only reads frames and
//! writes fixed answers, and a task per device costs more than the work itself: a wake-up,
//! a run-queue push and a readiness poll per frame, about a tenth of the thread's CPU in a
//! broadcast. Here the sockets leave the executor, and each frame is served in place:
//! read, answer, record.
//!
//! The sockets are served from an io_uring ring ([`uring`]) where the kernel has one
//! (6.1 or later, io_uring not disabled), else from one edge-triggered `mio` poll
//! ([`run_poll`]; `PUSHLOAD_STEADY=mio` picks it). With the poll, a worker's profile
//! still had about a tenth of its CPU in the readiness machinery and the system calls
//! around the socket work (epoll bookkeeping, syscall entry, fd lookups, libc's
//! `recv`/`send` wrappers); on the ring the kernel reads into buffers the loop hands it
//! and the answers go in with the one call per turn that also waits.
//!
//! pushload / floor server CPU per broadcast delivery, the poll (9b68c5d) and the ring
//! alternated, medians of 3, two runs (machine: 2 cores, shared):
//!
//! | sessions, workers | poll | ring |
//! |---|---|---|
//! | 19,000, 2 | 1.12× / 1.20× | 0.97× / 1.04× |
//! | 5,000, 1 | 0.99× / 1.03× | 0.75× / 0.92× |
//!
//! (`pushload --server FLOOR --scenario broadcast --sessions 19000 --workers 2
//! --broadcasts 20`, and `--sessions 5000 --workers 1`; `perf/README.md` has the runs.)

use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::link::{Command, Event, Receipt};
use crate::procfs::now_ns;
use crate::wire::Markers;
use crate::worker::{Answers, Buffer, Out, answer};

mod uring;

/// How long a poll waits before looking at the thread's commands.
const COMMAND_CHECK: Duration = Duration::from_millis(50);

/// A connected device handed over by the executor.
pub(crate) struct Handed {
    pub(crate) index: u32,
    pub(crate) stream: std::net::TcpStream,
    /// Whatever was read after CONNACK.
    pub(crate) buf: Buffer,
}

/// One device's connection in the loop.
struct Conn {
    index: u32,
    stream: TcpStream,
    buf: Buffer,
    /// Answers the socket did not take yet (written when it is writable again).
    unsent: Vec<u8>,
    open: bool,
}

/// Serves `handed` until the process ends, answering the thread's commands: on an
/// io_uring ring ([`uring`]) where one can be set up, else from a `mio` poll. Setting
/// `PUSHLOAD_STEADY=mio` picks the poll.
pub(crate) fn run(
    markers: &Markers,
    out: &flume::Sender<Out>,
    commands: &flume::Receiver<Command>,
    handed: Vec<Handed>,
    receipts: Vec<Receipt>,
) -> Result<()> {
    if std::env::var_os("PUSHLOAD_STEADY").is_none_or(|v| v != "mio") {
        // A kernel without io_uring (or with it disabled) serves from the poll.
        if let Ok(ring) = uring::Ring::new(handed.len()) {
            return uring::run(ring, markers, out, commands, handed, receipts);
        }
    }
    run_poll(markers, out, commands, handed, receipts)
}

/// Serves `handed` from one edge-triggered poll until the process ends, answering the
/// thread's commands between polls. Receipts go out in one batch per poll.
fn run_poll(
    markers: &Markers,
    out: &flume::Sender<Out>,
    commands: &flume::Receiver<Command>,
    handed: Vec<Handed>,
    mut receipts: Vec<Receipt>,
) -> Result<()> {
    let mut poll = Poll::new().context("cannot create a poll")?;
    let mut conns = Vec::with_capacity(handed.len());
    for (i, h) in handed.into_iter().enumerate() {
        let mut stream = TcpStream::from_std(h.stream);
        poll.registry()
            .register(
                &mut stream,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )
            .context("cannot register a device socket")?;
        conns.push(Conn {
            index: h.index,
            stream,
            buf: h.buf,
            unsent: Vec::new(),
            open: true,
        });
    }
    // Frames read with CONNACK are answered before anything else.
    let at_ns = now_ns();
    for c in &mut conns {
        serve_buffered(markers, out, &poll, c, at_ns, &mut receipts);
    }
    let mut events = Events::with_capacity(1024);
    loop {
        if !between_turns(out, commands, &mut receipts) {
            return Ok(());
        }
        match poll.poll(&mut events, Some(COMMAND_CHECK)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("polling the device sockets"),
        }
        let at_ns = now_ns();
        for ev in &events {
            let Some(c) = conns.get_mut(ev.token().0) else {
                continue;
            };
            if !c.open {
                continue;
            }
            if ev.is_writable() && !c.unsent.is_empty() {
                let unsent = std::mem::take(&mut c.unsent);
                if let Err(e) = send(c, &unsent) {
                    close(out, &poll, c, format!("writing: {e}"));
                    continue;
                }
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                serve_readable(markers, out, &poll, c, at_ns, &mut receipts);
            }
        }
    }
}

/// What both loops do between two turns: hand the receipts over in one batch and answer
/// the thread's commands. `false` once the thread is to stop.
fn between_turns(
    out: &flume::Sender<Out>,
    commands: &flume::Receiver<Command>,
    receipts: &mut Vec<Receipt>,
) -> bool {
    if !receipts.is_empty() {
        let batch = std::mem::replace(receipts, Vec::with_capacity(4096));
        if out.send(Out::Receipts(batch)).is_err() {
            return false;
        }
    }
    loop {
        match commands.try_recv() {
            // Nothing churns here: every device is connected and stays so.
            Ok(Command::Settle) => {
                let _ = out.send(Out::Event(Event::Settled { reconnects: 0 }));
            }
            Ok(_) => {}
            Err(flume::TryRecvError::Empty) => return true,
            Err(flume::TryRecvError::Disconnected) => return false,
        }
    }
}

/// Reads what the socket has and answers it. A read that leaves room in the buffer has
/// taken everything (the next edge comes with new data), which saves the read that
/// would only say "would block".
fn serve_readable(
    markers: &Markers,
    out: &flume::Sender<Out>,
    poll: &Poll,
    c: &mut Conn,
    at_ns: u64,
    receipts: &mut Vec<Receipt>,
) {
    loop {
        let room = c.buf.room();
        let asked = room.len();
        match c.stream.read(room) {
            Ok(0) => return close(out, poll, c, "EOF".into()),
            Ok(n) => {
                c.buf.filled(n);
                if !serve_buffered(markers, out, poll, c, at_ns, receipts) || n < asked {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return close(out, poll, c, format!("reading: {e}")),
        }
    }
}

/// Answers the complete frames in the buffer. Returns whether the connection is open.
fn serve_buffered(
    markers: &Markers,
    out: &flume::Sender<Out>,
    poll: &Poll,
    c: &mut Conn,
    at_ns: u64,
    receipts: &mut Vec<Receipt>,
) -> bool {
    let mut answers = Answers::default();
    while let Some(frame) = c.buf.frame() {
        answer(markers, c.index, c.buf.body(frame), at_ns, &mut answers);
        c.buf.consume(frame);
    }
    if !answers.bytes.is_empty() {
        if let Err(e) = send(c, &answers.bytes) {
            close(out, poll, c, format!("writing: {e}"));
            return false;
        }
        receipts.extend(answers.receipts);
    }
    if answers.broken {
        close(out, poll, c, "the server sent CONNBROKEN".into());
        return false;
    }
    true
}

/// Writes `bytes` after anything unsent; what the socket does not take waits for its
/// next writable edge.
fn send(c: &mut Conn, bytes: &[u8]) -> std::io::Result<()> {
    if !c.unsent.is_empty() {
        c.unsent.extend_from_slice(bytes);
        return Ok(());
    }
    let mut at = 0;
    while at < bytes.len() {
        match c.stream.write(&bytes[at..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    c.unsent.extend_from_slice(&bytes[at..]);
    Ok(())
}

/// Ends a connection the server closed or broke, and reports it lost.
fn close(out: &flume::Sender<Out>, poll: &Poll, c: &mut Conn, reason: String) {
    c.open = false;
    let _ = poll.registry().deregister(&mut c.stream);
    let _ = c.stream.shutdown(std::net::Shutdown::Both);
    let _ = out.send(Out::Event(Event::Lost {
        device: c.index,
        reason,
    }));
}
