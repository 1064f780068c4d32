//! A worker process: runs a slice of the devices on a few threads, one tokio
//! current-thread executor each, and reports every delivery to the coordinator.
//!
//! Each device is one task that connects, says hello, and then reads. Its reads go into
//! its own buffer (grown only for a frame larger than any before), frames are classified
//! by their prefix, the answers (ACK, PONG) are fixed bytes written at once, and this
//! run's payloads are found by a byte search. Receipts collect per thread and leave in
//! one batch per I/O turn.

use std::cell::{Cell, RefCell};
use std::io::{BufRead, BufWriter, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;

use crate::link::{self, Command, Event, Receipt, ReceiptKind, WorkerSpec};
use crate::procfs::{self, now_ns};
use crate::steady::{self, Handed};
use crate::target::{TLS_SERVER_NAME, device_addr};
use crate::wire::{self, Kind, Markers};

/// Devices per loopback source address (each address has its own ephemeral ports).
const DEVICES_PER_SOURCE: u32 = 1000;
/// A device's first read buffer; a larger frame grows it.
const FIRST_BUFFER: usize = 2048;
/// Longest frame body the protocol allows.
const MAX_FRAME: usize = u16::MAX as usize;

/// What goes to the process's stdout writer.
pub(crate) enum Out {
    Receipts(Vec<Receipt>),
    Event(Event),
    /// Flush everything, then acknowledge.
    Sync(flume::Sender<()>),
}

/// Runs a worker process to its end: commands from stdin, frames to stdout.
pub(crate) fn main(spec: WorkerSpec) -> Result<()> {
    let spec = Arc::new(spec);
    let (out_tx, out_rx) = flume::unbounded::<Out>();
    let writer = std::thread::Builder::new()
        .name("worker-out".into())
        .spawn(move || write_out(out_rx))
        .context("cannot start the writer thread")?;

    let tls = match &spec.tls_ca {
        Some(ca) => Some(tls_connector(ca)?),
        None => None,
    };
    let threads = spec.threads.max(1);
    let mut commands = Vec::new();
    for t in 0..threads {
        let (tx, rx) = flume::unbounded();
        commands.push(tx);
        let ctx = ThreadSpec {
            spec: Arc::clone(&spec),
            thread: t,
            threads,
            tls: tls.clone(),
            out: out_tx.clone(),
        };
        std::thread::Builder::new()
            .name(format!("devices-{t}"))
            .spawn(move || run_thread(ctx, rx))
            .context("cannot start a device thread")?;
    }
    let _ = out_tx.send(Out::Event(Event::Ready { threads }));

    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let command: Command =
            serde_json::from_str(&line).with_context(|| format!("bad command {line:?}"))?;
        match command {
            Command::Mark => {
                let cpu_us = procfs::cpu_us(std::process::id()).unwrap_or(0);
                let _ = out_tx.send(Out::Event(Event::Mark { cpu_us }));
            }
            Command::Finish => {
                let cpu_us = procfs::cpu_us(std::process::id()).unwrap_or(0);
                let _ = out_tx.send(Out::Event(Event::Final { cpu_us }));
                let (done_tx, done_rx) = flume::bounded(1);
                let _ = out_tx.send(Out::Sync(done_tx));
                let _ = done_rx.recv_timeout(Duration::from_secs(5));
                // The device sockets close with the process.
                std::process::exit(0);
            }
            other => {
                for c in &commands {
                    let _ = c.send(other);
                }
            }
        }
    }
    // The coordinator is gone: nothing is left to report to, and the device threads
    // would run on forever.
    drop(out_tx);
    drop(writer);
    std::process::exit(0);
}

/// Writes frames to stdout, flushing whenever the queue runs dry.
fn write_out(rx: flume::Receiver<Out>) {
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next {
            let written = match msg {
                Out::Receipts(r) => link::write_receipts(&mut out, &r),
                Out::Event(e) => link::write_event(&mut out, &e),
                Out::Sync(done) => {
                    let r = out.flush();
                    let _ = done.send(());
                    r
                }
            };
            if written.is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        if out.flush().is_err() {
            return;
        }
    }
}

/// A TLS client trusting the CA certificates in `ca`.
fn tls_connector(ca: &std::path::Path) -> Result<TlsConnector> {
    let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.with_context(|| format!("bad certificate in {}", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("unusable certificate in {}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// What a device thread is given.
struct ThreadSpec {
    spec: Arc<WorkerSpec>,
    thread: u32,
    threads: u32,
    tls: Option<TlsConnector>,
    out: flume::Sender<Out>,
}

/// Where churn is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Churn {
    /// Not started: connections keep their deadlines but do not act on them.
    Waiting,
    /// Connections close at their deadlines and reconnect.
    Active,
    /// Over: connections stay.
    Done,
}

/// One thread's devices and what they share.
struct Thread {
    spec: ThreadSpec,
    markers: Markers,
    devices: Vec<u32>,
    receipts: RefCell<Vec<Receipt>>,
    /// Wakes [`flush_receipts`].
    receipts_ready: Notify,
    churn: Cell<Churn>,
    /// Devices connected now.
    connected: Cell<u32>,
    /// Devices that gave up (lost when not churning, or never connected).
    gone: Cell<u32>,
    /// First connections resolved (connected or failed).
    resolved: Cell<u32>,
    failed: Cell<u32>,
    first_error: RefCell<Option<String>>,
    connect_us: RefCell<Vec<u64>>,
    reconnects: Cell<u64>,
    changed: Notify,
    connect_slots: Semaphore,
    /// Whether connected devices leave the executor for [`steady::run`]: plain sockets
    /// and no churn.
    steady: bool,
    /// Devices connected and waiting for the steady loop.
    handed: RefCell<Vec<Handed>>,
}

/// Runs one device thread: its executor, its devices and its share of the commands.
fn run_thread(spec: ThreadSpec, commands: flume::Receiver<Command>) {
    // Timers bound connecting and time churn; none is armed while devices just read.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = spec.out.send(Out::Event(Event::Lost {
                device: u32::MAX,
                reason: format!("cannot start an executor: {e}"),
            }));
            return;
        }
    };
    let w = &spec.spec;
    let devices: Vec<u32> = (w.first..w.first + w.count)
        .filter(|d| (d - w.first) % spec.threads == spec.thread)
        .collect();
    let slots = (w.connect_concurrency / spec.threads).max(1) as usize;
    let thread = Rc::new(Thread {
        markers: Markers::new(&w.nonce),
        devices,
        receipts: RefCell::new(Vec::with_capacity(4096)),
        receipts_ready: Notify::new(),
        churn: Cell::new(Churn::Waiting),
        connected: Cell::new(0),
        gone: Cell::new(0),
        resolved: Cell::new(0),
        failed: Cell::new(0),
        first_error: RefCell::new(None),
        connect_us: RefCell::new(Vec::new()),
        reconnects: Cell::new(0),
        changed: Notify::new(),
        connect_slots: Semaphore::new(slots),
        steady: spec.tls.is_none() && w.churn_lifetime_s.is_none(),
        handed: RefCell::new(Vec::new()),
        spec,
    });
    let local = tokio::task::LocalSet::new();
    local.spawn_local(flush_receipts(Rc::clone(&thread)));
    local.block_on(&runtime, control(Rc::clone(&thread), &commands));
    if !thread.steady {
        return;
    }
    drop(local);
    drop(runtime);
    let handed = std::mem::take(&mut *thread.handed.borrow_mut());
    let receipts = std::mem::take(&mut *thread.receipts.borrow_mut());
    let out = &thread.spec.out;
    if let Err(e) = steady::run(&thread.markers, out, &commands, handed, receipts) {
        let _ = out.send(Out::Event(Event::Lost {
            device: u32::MAX,
            reason: format!("{e:#}"),
        }));
    }
}

/// Sends the thread's receipts to the coordinator. Woken by the first receipt after a
/// flush, it runs after the tasks the same I/O turn woke, so one batch takes all of them
/// without a timer.
async fn flush_receipts(t: Rc<Thread>) {
    loop {
        t.receipts_ready.notified().await;
        let batch = std::mem::replace(&mut *t.receipts.borrow_mut(), Vec::with_capacity(4096));
        if !batch.is_empty() && t.spec.out.send(Out::Receipts(batch)).is_err() {
            return;
        }
    }
}

/// Carries out the coordinator's commands for this thread. Returns once every device
/// is connected when they go on in the steady loop, else when the commands end.
async fn control(t: Rc<Thread>, commands: &flume::Receiver<Command>) {
    while let Ok(command) = commands.recv_async().await {
        match command {
            Command::Connect => {
                for &d in &t.devices {
                    tokio::task::spawn_local(device(Rc::clone(&t), d));
                }
                let all = t.devices.len() as u32;
                while t.resolved.get() < all {
                    t.changed.notified().await;
                }
                let event = Event::Connected {
                    ok: all - t.failed.get(),
                    failed: t.failed.get(),
                    first_error: t.first_error.borrow_mut().take(),
                    connect_us: std::mem::take(&mut *t.connect_us.borrow_mut()),
                };
                let _ = t.spec.out.send(Out::Event(event));
                if t.steady {
                    return;
                }
            }
            Command::Churn => t.churn.set(Churn::Active),
            Command::Settle => {
                t.churn.set(Churn::Done);
                let all = t.devices.len() as u32;
                while t.connected.get() + t.gone.get() < all {
                    t.changed.notified().await;
                }
                let reconnects = t.reconnects.get();
                let _ = t.spec.out.send(Out::Event(Event::Settled { reconnects }));
            }
            // Handled by the process's main thread.
            Command::Mark | Command::Finish => {}
        }
    }
}

/// Ports each device has on its source address, used in turn by its connections.
const PORTS_PER_DEVICE: u32 = 50;
/// The first port of the source port range.
const FIRST_PORT: u32 = 10_000;

/// The address and port connection `generation` of device `index` comes from: 1,000
/// devices per loopback address, spread over 127.0.0.0/8, each with its own ports.
/// Choosing the port spares the kernel's search for a free one, which grows with the
/// ports already bound to an address; ports come round again only after
/// [`PORTS_PER_DEVICE`] connections (loopback may reuse a port in TIME_WAIT).
fn source_addr(index: u32, generation: u32) -> SocketAddr {
    let n = index / DEVICES_PER_SOURCE + 1;
    let ip = Ipv4Addr::new(127, 2 + (n >> 16) as u8, (n >> 8) as u8, n as u8);
    let port = FIRST_PORT
        + (index % DEVICES_PER_SOURCE) * PORTS_PER_DEVICE
        + generation % PORTS_PER_DEVICE;
    SocketAddr::new(IpAddr::V4(ip), port as u16)
}

/// How a connection ended.
enum End {
    /// Closed on purpose to reconnect (churn).
    Churned,
    /// Lost: the server closed or failed.
    Lost(String),
}

/// One device: connect, serve, and reconnect while churning.
async fn device(t: Rc<Thread>, index: u32) {
    let spec = &t.spec.spec;
    let hello = wire::hello(&wire::device_id(&spec.nonce, index));
    let mut rng = SmallRng::seed_from_u64(u64::from(index));
    let mut first = true;
    let mut generation = 0u32;
    loop {
        let slot = if first {
            t.connect_slots.acquire().await.ok()
        } else {
            None
        };
        let started = now_ns();
        let deadline = Duration::from_secs(spec.timeout_s);
        let connected =
            match tokio::time::timeout(deadline, connect(&t, index, generation, &hello)).await {
                Ok(c) => c,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no CONNACK within {deadline:?}"),
                )),
            };
        generation = generation.wrapping_add(1);
        drop(slot);
        let (stream, buf) = match connected {
            Ok(c) => c,
            Err(e) => {
                if first {
                    t.failed.set(t.failed.get() + 1);
                    t.first_error
                        .borrow_mut()
                        .get_or_insert_with(|| format!("device {index}: {e}"));
                    t.resolved.set(t.resolved.get() + 1);
                } else {
                    lost(&t, index, format!("reconnecting: {e}"));
                }
                t.gone.set(t.gone.get() + 1);
                t.changed.notify_one();
                return;
            }
        };
        t.connected.set(t.connected.get() + 1);
        if first {
            t.connect_us.borrow_mut().push((now_ns() - started) / 1000);
            t.resolved.set(t.resolved.get() + 1);
            first = false;
        } else {
            t.reconnects.set(t.reconnects.get() + 1);
        }
        t.changed.notify_one();
        let stream = match stream {
            Stream::Plain(s) if t.steady => {
                match s.into_std() {
                    Ok(stream) => t.handed.borrow_mut().push(Handed { index, stream, buf }),
                    Err(e) => lost(&t, index, format!("leaving the executor: {e}")),
                }
                return;
            }
            other => other,
        };
        let end = match stream {
            Stream::Plain(s) => serve(&t, index, s, buf, &mut rng).await,
            Stream::Tls(s) => serve(&t, index, *s, buf, &mut rng).await,
        };
        t.connected.set(t.connected.get() - 1);
        t.changed.notify_one();
        match end {
            End::Churned => continue,
            End::Lost(reason) => {
                lost(&t, index, reason);
                t.gone.set(t.gone.get() + 1);
                t.changed.notify_one();
                return;
            }
        }
    }
}

/// Reports a device that lost its connection when it should not have.
fn lost(t: &Thread, device: u32, reason: String) {
    let _ = t.spec.out.send(Out::Event(Event::Lost { device, reason }));
}

/// A device connection.
enum Stream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

/// Makes a device socket cheaper for the client's kernel: the simplest congestion
/// control (per received TCP ack, `bbr` costs more than the device's data needs) and a
/// fixed receive buffer, which turns off per-read receive-window autotuning. Both are
/// the client's own side of the connection; the server's sockets keep their settings.
/// A kernel that refuses either keeps its defaults.
fn lighten(socket: &TcpSocket) {
    let s = socket2::SockRef::from(socket);
    let _ = s.set_tcp_congestion(b"reno");
    let _ = s.set_recv_buffer_size(RECV_BUFFER);
}

/// The fixed receive buffer of a device socket: far more than a device is ever sent
/// between two reads.
const RECV_BUFFER: usize = 128 * 1024;

/// Connects device `index`, says hello and reads CONNACK. Returns the stream and its
/// read buffer holding whatever came after CONNACK.
async fn connect(
    t: &Thread,
    index: u32,
    generation: u32,
    hello: &[u8],
) -> std::io::Result<(Stream, Buffer)> {
    let spec = &t.spec.spec;
    // The same address on every reconnection: the device stays on its node.
    let addr = device_addr(&spec.devices, index)
        .ok_or_else(|| std::io::Error::other("no device address to connect to"))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    lighten(&socket);
    // Spread over loopback addresses when the server is on loopback; elsewhere the
    // kernel picks the source.
    if addr.is_ipv4() && addr.ip().is_loopback() {
        let source = source_addr(index, generation);
        if socket.bind(source).is_err() {
            // The port is taken (something else listens on it): let the kernel pick one.
            socket.bind(SocketAddr::new(source.ip(), 0))?;
        }
    }
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut buf = Buffer::new();
    match &t.spec.tls {
        None => {
            let mut s = tcp;
            s.write_all(hello).await?;
            read_connack(&mut s, &mut buf).await?;
            Ok((Stream::Plain(s), buf))
        }
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(TLS_SERVER_NAME)
                .map_err(std::io::Error::other)?;
            let mut s = tls.connect(name, tcp).await?;
            s.write_all(hello).await?;
            s.flush().await?;
            read_connack(&mut s, &mut buf).await?;
            Ok((Stream::Tls(Box::new(s)), buf))
        }
    }
}

/// Reads up to the first frame, which must be CONNACK.
async fn read_connack<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Buffer) -> std::io::Result<()> {
    loop {
        if let Some(frame) = buf.frame() {
            let kind = wire::classify(buf.body(frame));
            buf.consume(frame);
            return match kind {
                Some(Kind::Connack) => Ok(()),
                other => Err(std::io::Error::other(format!(
                    "expected CONNACK, got {other:?}"
                ))),
            };
        }
        if buf.fill(s).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// A device's read buffer: frames are handled in place.
pub(crate) struct Buffer {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

/// A complete frame in a [`Buffer`]: its body's range.
#[derive(Clone, Copy)]
pub(crate) struct Frame {
    body: usize,
    end: usize,
}

impl Buffer {
    /// An empty buffer of the first size.
    fn new() -> Self {
        Buffer {
            data: vec![0; FIRST_BUFFER],
            start: 0,
            end: 0,
        }
    }

    /// The next complete frame, if one is buffered.
    pub(crate) fn frame(&self) -> Option<Frame> {
        let len = frame_len(&self.data[self.start..self.end])?;
        Some(Frame {
            body: self.start + 2,
            end: self.start + len,
        })
    }

    /// Whether nothing is buffered (no part of a frame waits for the rest).
    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The body of frame `f`.
    pub(crate) fn body(&self, f: Frame) -> &[u8] {
        &self.data[f.body..f.end]
    }

    /// Moves past frame `f`.
    pub(crate) fn consume(&mut self, f: Frame) {
        self.start = f.end;
    }

    /// Reads more into [`Buffer::room`]. Returns the bytes read (0: closed).
    async fn fill<S: AsyncRead + Unpin>(&mut self, s: &mut S) -> std::io::Result<usize> {
        let n = s.read(self.room()).await?;
        self.filled(n);
        Ok(n)
    }

    /// Space to read into, made first: a partial frame moves to the front, and the buffer
    /// grows if that frame is larger than it.
    pub(crate) fn room(&mut self) -> &mut [u8] {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.end >= 2 {
            let need = 2 + usize::from(u16::from_be_bytes([self.data[0], self.data[1]]));
            if need > self.data.len() {
                self.data.resize(need.min(MAX_FRAME + 2), 0);
            }
        }
        &mut self.data[self.end..]
    }

    /// Counts `n` bytes read into [`Buffer::room`].
    pub(crate) fn filled(&mut self, n: usize) {
        self.end += n;
    }
}

/// The length, header included, of the complete frame at the start of `data`, if
/// `data` holds one.
pub(crate) fn frame_len(data: &[u8]) -> Option<usize> {
    let header = data.get(..2)?;
    let len = 2 + usize::from(u16::from_be_bytes([header[0], header[1]]));
    (data.len() >= len).then_some(len)
}

/// The answers a read's frames need, written at once.
#[derive(Default)]
pub(crate) struct Answers {
    pub(crate) bytes: smallvec::SmallVec<[u8; 32]>,
    pub(crate) receipts: smallvec::SmallVec<[Receipt; 4]>,
    pub(crate) broken: bool,
}

/// A connection's lifetime while churning: exponential with the given mean, so that
/// `sessions / mean` connections close each second from the start (memoryless: the
/// rate holds whenever churn begins).
fn lifetime(t: &Thread, rng: &mut SmallRng) -> Option<Duration> {
    let mean = t.spec.spec.churn_lifetime_s?;
    // 1 - U lies in (0, 1]: its logarithm is finite.
    let u: f64 = 1.0 - rng.random::<f64>();
    Some(Duration::from_secs_f64(-mean * u.ln()))
}

/// Serves one connection: answers PINGs, ACKs deliveries and records them, until the
/// server closes or, while churning, the connection's lifetime runs out.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    t: &Thread,
    index: u32,
    mut s: S,
    mut buf: Buffer,
    rng: &mut SmallRng,
) -> End {
    let mut deadline = lifetime(t, rng).map(|l| tokio::time::Instant::now() + l);
    let mut answers = Answers::default();
    loop {
        let at_ns = now_ns();
        while let Some(frame) = buf.frame() {
            answer(&t.markers, index, buf.body(frame), at_ns, &mut answers);
            buf.consume(frame);
        }
        if !answers.bytes.is_empty() {
            if let Err(e) = write_answers(&mut s, &answers.bytes).await {
                return End::Lost(format!("writing: {e}"));
            }
            answers.bytes.clear();
            if !answers.receipts.is_empty() {
                let mut receipts = t.receipts.borrow_mut();
                if receipts.is_empty() {
                    t.receipts_ready.notify_one();
                }
                receipts.extend(answers.receipts.drain(..));
            }
        }
        if answers.broken {
            return End::Lost("the server sent CONNBROKEN".into());
        }
        let read = match deadline {
            None => buf.fill(&mut s).await,
            Some(at) => match tokio::time::timeout_at(at, buf.fill(&mut s)).await {
                Ok(r) => r,
                Err(_) => match t.churn.get() {
                    Churn::Active => return End::Churned,
                    Churn::Waiting => {
                        deadline = lifetime(t, rng).map(|l| at + l);
                        continue;
                    }
                    Churn::Done => {
                        deadline = None;
                        continue;
                    }
                },
            },
        };
        match read {
            Ok(0) => return End::Lost("EOF".into()),
            Ok(_) => {}
            Err(e) => return End::Lost(format!("reading: {e}")),
        }
    }
}

/// Writes the answers of one read.
async fn write_answers<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(bytes).await?;
    s.flush().await
}

/// Works out what one frame needs: its answer and what it delivered.
pub(crate) fn answer(markers: &Markers, index: u32, frame: &[u8], at_ns: u64, a: &mut Answers) {
    match wire::classify(frame) {
        Some(Kind::Ping) => a.bytes.extend_from_slice(wire::PONG),
        Some(Kind::Broadcast) => {
            a.bytes.extend_from_slice(wire::ACK);
            markers.broadcasts(frame, |k| {
                a.receipts.push(Receipt {
                    kind: ReceiptKind::Broadcast,
                    device: index,
                    item: k,
                    addressed: index,
                    at_ns,
                })
            });
        }
        Some(Kind::Notifications) => {
            a.bytes.extend_from_slice(wire::ACK);
            markers.notifies(frame, |n, d| {
                a.receipts.push(Receipt {
                    kind: ReceiptKind::Notify,
                    device: index,
                    item: n,
                    addressed: d,
                    at_ns,
                })
            });
        }
        Some(Kind::ConnBroken) => a.broken = true,
        // A second CONNACK, CONNWARN, SETPARAMS, or something unknown: no answer.
        Some(Kind::Connack | Kind::OneWay) | None => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sources_spread_over_loopback() {
        assert_eq!(source_addr(0, 0).ip(), source_addr(999, 0).ip());
        assert_ne!(source_addr(999, 0).ip(), source_addr(1000, 0).ip());
        for i in [0, 18_999, 70_000_000] {
            match source_addr(i, 0).ip() {
                IpAddr::V4(a) => assert_eq!(a.octets()[0], 127),
                IpAddr::V6(_) => panic!("not v4"),
            }
        }
    }

    #[test]
    fn each_connection_of_an_address_has_its_own_port() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..DEVICES_PER_SOURCE {
            for g in 0..PORTS_PER_DEVICE {
                let a = source_addr(i, g);
                assert!(a.port() >= FIRST_PORT as u16);
                assert!(seen.insert(a), "{a} twice");
            }
        }
        assert_eq!(source_addr(5, 0), source_addr(5, PORTS_PER_DEVICE));
    }
}
