//! What the two floor examples (`glommio_floor`, `glommio_loop_floor`) share: the canned
//! frames and answers, the ACK skipper, the HTTP request splitter and the JSON subset
//! they read, the configuration's addresses and TLS files, and the log line of a
//! listener.

use std::future::Future;
use std::io::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use pushbroker::broker::sharded::{DEFAULT_IO_MEMORY, DEFAULT_PREEMPT_TIMER, DEFAULT_RING_DEPTH};
use pushbroker::glommio::net::{TcpListener, TcpStream};
use pushbroker::glommio::{self, CpuSet, LocalExecutorBuilder, Placement};

/// A frame as written to devices: length prefix and body. One allocation per broadcast,
/// shared by every connection of every executor.
pub(crate) type Frame = Arc<[u8]>;

pub(crate) const CONNACK: &[u8] =
    b"\x00\x2f{\"T\":\"connack\",\"Params\":{\"PingInterval\":\"60s\"}}";

pub(crate) const R200: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";

pub(crate) const R400: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
Content-Length: 34\r\n\r\n{\"ok\":false,\"error\":\"bad-request\"}";

pub(crate) const R404: &[u8] = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\
Content-Length: 37\r\n\r\n{\"ok\":false,\"error\":\"unknown-device\"}";

/// A frame from `f`: its body after two bytes kept for the length, written here.
pub(crate) fn finish(mut f: Vec<u8>) -> Frame {
    let len = (f.len() - 2) as u16;
    f[..2].copy_from_slice(&len.to_be_bytes());
    f.into()
}

/// Skips whole frames (ACKs, PONGs) by their length prefix, across reads.
#[derive(Default)]
pub(crate) struct Skipper {
    /// Body bytes still to skip.
    skip: usize,
    /// The first byte of a length prefix whose second has not come yet.
    half: Option<u8>,
}

impl Skipper {
    pub(crate) fn feed(&mut self, mut p: &[u8]) {
        while !p.is_empty() {
            if self.skip > 0 {
                let k = p.len().min(self.skip);
                self.skip -= k;
                p = &p[k..];
            } else if let Some(h0) = self.half.take() {
                self.skip = usize::from(u16::from_be_bytes([h0, p[0]]));
                p = &p[1..];
            } else if let [a, b, rest @ ..] = p {
                self.skip = usize::from(u16::from_be_bytes([*a, *b]));
                p = rest;
            } else {
                self.half = Some(p[0]);
                p = &[];
            }
        }
    }
}

/// Takes the socket out of `stream`: a duplicate descriptor that owns the connection
/// once `stream` is dropped (glommio cannot give its descriptor up).
#[allow(unsafe_code)]
pub(crate) fn detach(stream: TcpStream) -> std::io::Result<OwnedFd> {
    // SAFETY: `stream` is alive for the whole borrow, so its descriptor is open; the
    // borrow ends before `stream` is dropped.
    let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    borrowed.try_clone_to_owned()
}

/// The first request in `p`: its path, its body and its length; `None` until it is whole,
/// an error when it has no path.
#[allow(clippy::type_complexity)]
pub(crate) fn request(p: &[u8]) -> Result<Option<(&[u8], &[u8], usize)>, ()> {
    let Some(he) = p.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = &p[..he];
    let mut words = head.splitn(3, |&c| c == b' ');
    let (_, Some(path), Some(_)) = (words.next(), words.next(), words.next()) else {
        return Err(());
    };
    let mut cl = 0;
    for line in head.split(|&c| c == b'\n').skip(1) {
        if line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"content-length:") {
            let v = line[15..].trim_ascii_start();
            let digits = v.iter().take_while(|c| c.is_ascii_digit()).count();
            cl = std::str::from_utf8(&v[..digits])
                .ok()
                .and_then(|d| d.parse().ok())
                .unwrap_or(0);
        }
    }
    let hl = he + 4;
    if p.len() < hl + cl {
        return Ok(None);
    }
    Ok(Some((path, &p[hl..hl + cl], hl + cl)))
}

pub(crate) fn ws(p: &[u8]) -> &[u8] {
    p.trim_ascii_start()
}

/// The length of the JSON value `p` starts with (after whitespace), and where it starts.
pub(crate) fn skip_value(p: &[u8]) -> Option<(usize, usize)> {
    let start = p.len() - ws(p).len();
    let v = &p[start..];
    let end = match v.first()? {
        b'"' => {
            let mut i = 1;
            loop {
                match v.get(i)? {
                    b'\\' => i += 2,
                    b'"' => break i + 1,
                    _ => i += 1,
                }
            }
        }
        b'{' | b'[' => {
            let (mut depth, mut i) = (0usize, 0);
            loop {
                match v.get(i)? {
                    b'"' => i += skip_value(&v[i..])?.1,
                    b'{' | b'[' => (depth, i) = (depth + 1, i + 1),
                    b'}' | b']' if depth == 1 => break i + 1,
                    b'}' | b']' => (depth, i) = (depth - 1, i + 1),
                    _ => i += 1,
                }
            }
        }
        _ => v
            .iter()
            .position(|c| b",}] \t\r\n".contains(c))
            .unwrap_or(v.len()),
    };
    Some((start, start + end))
}

/// The raw value of top-level key `key` in the object `p` (keys compared raw).
pub(crate) fn json_get<'a>(p: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let mut p = ws(p).strip_prefix(b"{")?;
    loop {
        let (ks, ke) = skip_value(p)?;
        let k = p.get(ks..ke)?.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
        p = ws(&p[ke..]).strip_prefix(b":")?;
        let (vs, ve) = skip_value(p)?;
        if k == key {
            return Some(&p[vs..ve]);
        }
        p = ws(&p[ve..]).strip_prefix(b",")?;
    }
}

/// The raw contents of a string value (still escaped, without its quotes).
pub(crate) fn json_str<'a>(p: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    json_get(p, key)?.strip_prefix(b"\"")?.strip_suffix(b"\"")
}

pub(crate) fn config_addr(config: &[u8], key: &str) -> Result<SocketAddr, String> {
    json_str(config, key.as_bytes())
        .and_then(|a| std::str::from_utf8(a).ok())
        .and_then(|a| a.to_socket_addrs().ok()?.next())
        .ok_or_else(|| format!("config: bad or missing {key}"))
}

pub(crate) fn log_listening(what: &str, addr: SocketAddr) {
    let format = time::macros::format_description!(
        "[year]/[month]/[day] [hour]:[minute]:[second].[subsecond digits:6]"
    );
    let now = time::OffsetDateTime::now_utc();
    let ts = now.format(&format).unwrap_or_default();
    eprintln!("{ts} INFO listening for {what} on {addr}");
}

/// What executors send each other.
pub(crate) enum Msg {
    /// A broadcast frame, for every connection of the receiver.
    Broadcast(Frame),
    /// A notification frame for `device`, owned by the receiver; it answers whether it
    /// holds a connection of that device.
    Notify {
        device: Box<str>,
        frame: Frame,
        reply: flume::Sender<bool>,
    },
    /// A connection that said CONNECT for `device`, owned by the receiver; `rest` is what
    /// it sent after its CONNECT.
    Adopt {
        fd: OwnedFd,
        device: Box<str>,
        rest: Vec<u8>,
        /// The connection's TLS state, when devices speak TLS.
        #[allow(dead_code)] // glommio_loop_floor speaks no TLS
        tls: Option<Box<rustls::ServerConnection>>,
    },
}

/// The TLS configuration devices are served with, when the configuration names a key and
/// a certificate (`key_pem_file`, `cert_pem_file`): pushbroker's own
/// ([`server_config`](pushbroker::server::tls::server_config)). Set once, before the
/// executors start.
pub(crate) static TLS: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();

/// Reads the TLS files the configuration names, if it names both.
fn tls_config(config: &[u8]) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    let path = |key: &str| {
        json_str(config, key.as_bytes())
            .map(|p| std::str::from_utf8(p).map_err(|_| format!("config: bad {key}")))
            .transpose()
    };
    match (path("cert_pem_file")?, path("key_pem_file")?) {
        (Some(cert), Some(key)) => {
            pushbroker::server::tls::server_config(Path::new(cert), Path::new(key))
                .map(Some)
                .map_err(|e| format!("config: {e}"))
        }
        (None, None) => Ok(None),
        _ => Err("config: key_pem_file and cert_pem_file go together".to_owned()),
    }
}

/// Broadcasts so far, process-wide: the `TopLevel` of the next one.
static TOP_LEVEL: AtomicU64 = AtomicU64::new(0);

/// The BROADCAST frame a `POST /broadcast` body asks for (its `data`, raw), with the next
/// `TopLevel`; `None` for a body without `data` or with too much of it.
pub(crate) fn broadcast_frame(body: &[u8]) -> Option<Frame> {
    let data = json_get(body, b"data").filter(|d| d.len() <= 60_000)?;
    let k = TOP_LEVEL.fetch_add(1, Ordering::Relaxed) + 1;
    let mut f = Vec::with_capacity(data.len() + 80);
    f.extend_from_slice(b"\0\0{\"T\":\"broadcast\",\"ChanId\":\"0\",\"TopLevel\":");
    let _ = write!(f, "{k}");
    f.extend_from_slice(b",\"Payloads\":[");
    f.extend_from_slice(data);
    f.extend_from_slice(b"]}");
    Some(finish(f))
}

/// The device and the NOTIFICATIONS frame a `POST /notify` body asks for (`deviceid`,
/// `appid`, raw `data`; the message id `m<next_id()>`); `None` for a body without them or
/// with too much.
pub(crate) fn notification_frame(
    body: &[u8],
    next_id: impl FnOnce() -> u64,
) -> Option<(&str, Frame)> {
    let device = json_str(body, b"deviceid").and_then(|d| std::str::from_utf8(d).ok())?;
    let app = json_str(body, b"appid")?;
    let data = json_get(body, b"data")?;
    if app.len() + data.len() > 60_000 {
        return None;
    }
    let m = next_id();
    let mut f = Vec::with_capacity(app.len() + data.len() + 80);
    f.extend_from_slice(b"\0\0{\"T\":\"notifications\",\"Notifications\":[{\"A\":\"");
    f.extend_from_slice(app);
    f.extend_from_slice(b"\",\"M\":\"m");
    let _ = write!(f, "{m}");
    f.extend_from_slice(b"\",\"P\":");
    f.extend_from_slice(data);
    f.extend_from_slice(b"}]}");
    Some((device, finish(f)))
}

/// What an executor of a floor server answers over HTTP: a broadcast and a notify, each
/// appending its answer to `out`.
pub(crate) trait Endpoints: 'static {
    fn broadcast(&self, body: &[u8], out: &mut Vec<u8>);

    fn notify(&self, body: &[u8], out: &mut Vec<u8>) -> impl Future<Output = ()>;
}

/// Accepts HTTP connections for ever, serving each in a task of its own.
pub(crate) async fn accept_http<S: Endpoints>(shard: Rc<S>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                glommio::spawn_local(serve_http(Rc::clone(&shard), stream)).detach();
            }
            Err(_) => glommio::timer::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

/// Serves one HTTP/1.1 connection: every whole request in what arrived, answered in one
/// write.
async fn serve_http<S: Endpoints>(shard: Rc<S>, mut stream: TcpStream) {
    let mut inb = vec![0u8; 16 << 10];
    let (mut len, mut out) = (0, Vec::new());
    loop {
        if inb.len() - len < 4096 {
            if inb.len() >= 1 << 24 {
                return;
            }
            inb.resize(inb.len() * 2, 0);
        }
        match stream.read(&mut inb[len..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        let mut off = 0;
        loop {
            let Ok(parsed) = request(&inb[off..len]) else {
                return;
            };
            let Some((path, body, used)) = parsed else {
                break;
            };
            match path {
                b"/broadcast" => shard.broadcast(body, &mut out),
                b"/notify" => shard.notify(body, &mut out).await,
                _ => out.extend_from_slice(R404),
            }
            off += used;
        }
        inb.copy_within(off..len, 0);
        len -= off;
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
}

/// An executor of a floor server: its state, made on its thread.
pub(crate) trait Executor: Endpoints + Sized {
    /// What executors send each other.
    type Msg: Send + 'static;

    /// Whether it serves devices over TLS when the configuration asks for it.
    const TLS: bool;

    /// The state of executor `id`, whose peers' inboxes (its own included) are `peers`.
    fn new(id: usize, peers: Vec<flume::Sender<Self::Msg>>) -> std::io::Result<Self>;

    /// Spawns the executor's device side on `devices`.
    fn start(self: &Rc<Self>, devices: TcpListener);

    /// Takes a message from another executor (or itself).
    fn handle(self: &Rc<Self>, msg: Self::Msg);
}

/// Starts one executor per CPU (or `-threads N`), each with `S`'s state, a device and an
/// HTTP listener, and its inbox; logs the ports as pushbroker does; runs until killed.
pub(crate) fn run<S: Executor>(name: &str) -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut threads, mut path) = (0, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-threads" => threads = args.next().and_then(|n| n.parse().ok()).unwrap_or(0),
            _ => path = Some(a),
        }
    }
    let n = match threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let Some(path) = path else {
        return Err(format!("usage: {name} [-threads N] CONFIG.json"));
    };
    let config = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
    let mut devices = config_addr(&config, "addr")?;
    let mut http = config_addr(&config, "http_addr")?;
    if let Some(tls) = tls_config(&config)? {
        if !S::TLS {
            return Err(format!("{name} does not speak TLS"));
        }
        let _ = TLS.set(tls);
    }

    // Pinned to one CPU each when there are as many CPUs as executors, as pushbroker's
    // shards are.
    let cpus = CpuSet::online()
        .ok()
        .map(|s| {
            let mut c: Vec<usize> = s.iter().map(|l| l.cpu).collect();
            c.sort_unstable();
            c
        })
        .filter(|c| c.len() >= n);
    let (inboxes, mut receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| flume::unbounded()).unzip();
    let mut threads = Vec::new();
    // One executor after the other: the first picks the ports (port 0), the others join
    // them (SO_REUSEPORT).
    for (id, rx) in receivers.drain(..).enumerate() {
        let placement = cpus
            .as_ref()
            .map_or(Placement::Unbound, |c| Placement::Fixed(c[id]));
        let peers = inboxes.clone();
        let (bound_tx, bound_rx) = flume::bounded(1);
        let spawned = LocalExecutorBuilder::new(placement)
            .name(&format!("{name}-{id}"))
            .io_memory(DEFAULT_IO_MEMORY)
            .ring_depth(DEFAULT_RING_DEPTH)
            .preempt_timer(DEFAULT_PREEMPT_TIMER)
            .spawn(move || async move {
                let bound = TcpListener::bind(devices).and_then(|d| {
                    let h = TcpListener::bind(http)?;
                    Ok((d, h, S::new(id, peers)?))
                });
                let (dl, hl, shard) = match bound {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = bound_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let addrs = (dl.local_addr(), hl.local_addr());
                let _ = bound_tx.send(match addrs {
                    (Ok(d), Ok(h)) => Ok((d, h)),
                    _ => Err("cannot read a bound address".to_owned()),
                });
                let shard = Rc::new(shard);
                shard.start(dl);
                glommio::spawn_local(accept_http(Rc::clone(&shard), hl)).detach();
                while let Ok(msg) = rx.recv_async().await {
                    shard.handle(msg);
                }
            })
            .map_err(|e| format!("cannot start executor {id}: {e}"))?;
        threads.push(spawned);
        (devices, http) = bound_rx
            .recv()
            .map_err(|_| format!("executor {id} did not start"))??;
    }
    log_listening("http", http);
    log_listening("devices", devices);
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn json_values_are_found_raw_at_the_top_level() {
        let body = br#" {"appid":"a\"b", "x":{"data":1,"s":"}"}, "data" : [1,{"k":"v"}] ,"n":12}"#;
        assert_eq!(json_str(body, b"appid"), Some(&br#"a\"b"#[..]));
        assert_eq!(json_get(body, b"data"), Some(&br#"[1,{"k":"v"}]"#[..]));
        assert_eq!(json_get(body, b"n"), Some(&b"12"[..]));
        assert_eq!(json_get(body, b"none"), None);
        assert_eq!(json_str(body, b"n"), None);
        assert_eq!(json_get(b"[1]", b"data"), None);
        assert_eq!(json_get(br#"{"data":"#, b"data"), None);
    }

    #[test]
    fn requests_are_split_by_content_length() {
        let two = b"POST /notify HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}POST /x HTTP/1.1\r\n\r\n";
        let (path, body, used) = request(two).unwrap().unwrap();
        assert_eq!((path, body), (&b"/notify"[..], &b"{}"[..]));
        let (path, body, _) = request(&two[used..]).unwrap().unwrap();
        assert_eq!((path, body), (&b"/x"[..], &b""[..]));
        assert_eq!(request(&two[..45]).unwrap(), None, "the body is not whole");
        assert!(request(b"GARBAGE\r\n\r\n").is_err());
    }

    #[test]
    fn frames_are_skipped_across_reads() {
        let mut s = Skipper::default();
        let acks = b"\x00\x0b{\"T\":\"ack\"}\x00\x0b{\"T\":\"ack\"}";
        s.feed(&acks[..1]);
        s.feed(&acks[1..14]);
        s.feed(&acks[14..]);
        assert_eq!((s.skip, s.half), (0, None));
    }

    #[test]
    fn canned_frames_and_answers_carry_their_lengths() {
        assert_eq!(usize::from(CONNACK[1]), CONNACK.len() - 2);
        for r in [R200, R400, R404] {
            let text = std::str::from_utf8(r).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.ends_with(&format!("Content-Length: {}", body.len())));
        }
        let frame = finish(b"\0\0{}".to_vec());
        assert_eq!(&frame[..], b"\x00\x02{}");
    }
}
