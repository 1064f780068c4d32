//! Shared helpers for end-to-end tests: a device client speaking the wire protocol over
//! plain TCP or TLS, a raw HTTP/1.1 client, test certificates, and the server run either
//! in this process or as the real binary.
#![allow(dead_code)] // each test file uses part of this
#![allow(unreachable_pub)] // a module of each test crate, not a public API

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use pushbroker::api::testing::HttpAnswer;
use serde_json::{Value, json};

/// How long a test waits for something that should happen promptly. Generous: tests
/// assert outcomes, never speed, and the CI box is small and busy.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// What reading a frame gave instead of a message.
#[derive(Debug)]
pub enum RecvError {
    /// Nothing came in time.
    Timeout,
    /// The server closed the connection.
    Eof,
    /// Another I/O error (a reset counts as closed for most tests).
    Io(io::Error),
}

impl RecvError {
    /// Whether the connection is gone (EOF or reset).
    pub fn is_closed(&self) -> bool {
        match self {
            RecvError::Eof => true,
            RecvError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ),
            RecvError::Timeout => false,
        }
    }
}

/// A device's transport.
pub enum Transport {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Transport {
    fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(s) => &s.sock,
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            Transport::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.flush(),
            Transport::Tls(s) => s.flush(),
        }
    }
}

/// A device client: frames of a big-endian u16 length and one JSON object.
pub struct Device {
    io: Transport,
    buf: Vec<u8>,
}

static NEXT_SOURCE: AtomicUsize = AtomicUsize::new(2);

/// Connects from a distinct loopback source address (127.0.0.x), so many tests and
/// connections never run out of ephemeral ports.
pub fn connect_tcp(addr: SocketAddr) -> TcpStream {
    let n = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed);
    let source = SocketAddr::from(([127, 0, (n / 250 % 250) as u8, (n % 250 + 2) as u8], 0));
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    // Falls back to the default source if that address cannot be used.
    let _ = socket.bind(&source.into());
    socket
        .connect_timeout(&addr.into(), PATIENCE)
        .expect("connects to the server");
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true).expect("nodelay");
    stream
}

impl Device {
    /// Ends the connection with a reset (what a killed process with unread data sends).
    pub fn reset(self) {
        let tcp = match &self.io {
            Transport::Plain(s) => s,
            Transport::Tls(t) => t.get_ref(),
        };
        let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
    }

    /// Connects over plain TCP.
    pub fn connect(addr: SocketAddr) -> Self {
        Self {
            io: Transport::Plain(connect_tcp(addr)),
            buf: Vec::new(),
        }
    }

    /// Connects over TLS, trusting `ca`.
    pub fn connect_tls(addr: SocketAddr, ca: &TestCa) -> Self {
        let tcp = connect_tcp(addr);
        let conn = rustls::ClientConnection::new(
            ca.client_config(),
            "localhost".try_into().expect("name"),
        )
        .expect("client connection");
        Self {
            io: Transport::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))),
            buf: Vec::new(),
        }
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).expect("write");
        self.io.flush().expect("flush");
    }

    /// Writes one frame holding `msg`; an error instead of a panic when the connection is
    /// gone (a server killed under load).
    pub fn try_send(&mut self, msg: &Value) -> io::Result<()> {
        let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
        let mut frame = (body.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        self.io.write_all(&frame)?;
        self.io.flush()
    }

    /// Writes one frame holding `msg`.
    pub fn send(&mut self, msg: &Value) {
        let body = serde_json::to_vec(msg).expect("json");
        let mut frame = (body.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        self.send_raw(&frame);
    }

    /// Version byte and CONNECT for `device_id` with `levels` and `info`; returns the
    /// CONNACK.
    pub fn hello(&mut self, device_id: &str, levels: Value, info: Value) -> Value {
        self.send_raw(&[0]);
        self.send(&json!({
            "T": "connect", "DeviceId": device_id, "ClientVer": "test", "Levels": levels, "Info": info
        }));
        let connack = self.recv().expect("CONNACK");
        assert_eq!(connack["T"], "connack", "{connack}");
        connack
    }

    /// The next message, waiting up to [`PATIENCE`].
    pub fn recv(&mut self) -> Result<Value, RecvError> {
        self.recv_within(PATIENCE)
    }

    /// The next message that is not a PING (PINGs are answered on the way).
    pub fn next_non_ping(&mut self) -> Value {
        loop {
            let msg = self
                .recv()
                .unwrap_or_else(|e| panic!("expected a message, got {e:?}"));
            if msg["T"] != "ping" {
                return msg;
            }
            self.pong();
        }
    }

    /// Watches the connection for `wait` and panics (naming `what`) on anything but
    /// PINGs, which it answers.
    pub fn assert_quiet(&mut self, wait: Duration, what: &str) {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.recv_within(left) {
                Ok(msg) if msg["T"] == "ping" => self.pong(),
                Ok(msg) => panic!("{what}: expected nothing, got {msg}"),
                Err(RecvError::Timeout) => return,
                Err(e) => panic!("{what}: expected nothing, got {e:?}"),
            }
        }
    }

    /// The next message, waiting up to `wait`.
    pub fn recv_within(&mut self, wait: Duration) -> Result<Value, RecvError> {
        let deadline = Instant::now() + wait;
        loop {
            if self.buf.len() >= 2 {
                let len = usize::from(u16::from_be_bytes([self.buf[0], self.buf[1]]));
                if self.buf.len() >= 2 + len {
                    let body: Vec<u8> = self.buf.drain(..2 + len).skip(2).collect();
                    return serde_json::from_slice(&body)
                        .map_err(|e| RecvError::Io(io::Error::other(e)));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RecvError::Timeout);
            }
            self.io
                .tcp()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(RecvError::Io)?;
            let mut chunk = [0u8; 16 << 10];
            match self.io.read(&mut chunk) {
                Ok(0) => return Err(RecvError::Eof),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                // A signal interrupted the read: read again.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(RecvError::Timeout);
                }
                Err(e) => return Err(RecvError::Io(e)),
            }
        }
    }

    /// Reads messages until one of type `t` comes (PINGs are answered on the way);
    /// panics on anything else.
    pub fn expect(&mut self, t: &str) -> Value {
        loop {
            let msg = self
                .recv()
                .unwrap_or_else(|e| panic!("expected {t}, got {e:?}"));
            if msg["T"] == t {
                return msg;
            }
            if msg["T"] == "ping" {
                self.pong();
                continue;
            }
            panic!("expected {t}, got {msg}");
        }
    }

    /// Sends ACK.
    pub fn ack(&mut self) {
        self.send(&json!({"T": "ack"}));
    }

    /// Sends PONG.
    pub fn pong(&mut self) {
        self.send(&json!({"T": "pong"}));
    }

    /// Waits until the server closes the connection; whether it did within [`PATIENCE`].
    pub fn closed(&mut self) -> bool {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            match self.recv_within(deadline.saturating_duration_since(Instant::now())) {
                Err(e) if e.is_closed() => return true,
                Err(RecvError::Timeout) => return false,
                Err(RecvError::Eof | RecvError::Io(_)) => return true,
                Ok(msg) if msg["T"] == "ping" => self.pong(),
                Ok(_) => {}
            }
        }
        false
    }

    /// Closes the device's side.
    pub fn close(self) {
        let _ = self.io.tcp().shutdown(std::net::Shutdown::Both);
    }
}

/// Sends one request on a new connection and reads the response (`Connection: close`).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpAnswer {
    let mut s = connect_tcp(addr);
    s.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write head");
    s.write_all(body).expect("write body");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

/// POSTs `body` as JSON with a Content-Length.
pub fn post_json(addr: SocketAddr, path: &str, body: &Value) -> HttpAnswer {
    let bytes = serde_json::to_vec(body).expect("json");
    let len = bytes.len().to_string();
    http(
        addr,
        "POST",
        path,
        &[
            ("Content-Type", "application/json"),
            ("Content-Length", &len),
        ],
        &bytes,
    )
}

fn parse_response(raw: &[u8]) -> HttpAnswer {
    HttpAnswer::parse(raw)
        .unwrap_or_else(|| panic!("not an HTTP answer: {:?}", String::from_utf8_lossy(raw)))
}

/// A CA and a `localhost` certificate it signed, as PEM files in a temporary folder.
pub struct TestCa {
    /// The folder holding `cert.pem` and `key.pem`.
    pub dir: PathBuf,
    ca_der: rustls::pki_types::CertificateDer<'static>,
}

impl TestCa {
    /// Makes the certificates in a new temporary folder.
    pub fn new() -> Self {
        let dir = temp_dir("tls");
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pushbroker test CA");
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
        let leaf_params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("leaf cert");
        std::fs::write(dir.join("cert.pem"), leaf.pem()).expect("write cert");
        std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).expect("write key");
        Self {
            dir,
            ca_der: ca.der().clone(),
        }
    }

    /// A client configuration trusting this CA only.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

/// A fresh, uniquely named folder under the system's temporary folder.
pub fn temp_dir(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "pushbroker-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The real `pushbroker` binary, running a configuration, with its stderr read line by
/// line.
pub struct ServerProcess {
    child: Child,
    lines: flume::Receiver<String>,
    /// Every stderr line so far.
    pub log: Vec<String>,
    /// The HTTP API's address, from the log.
    pub http_addr: SocketAddr,
    /// The device listener's address, from the log.
    pub device_addr: SocketAddr,
}

impl ServerProcess {
    /// Writes `config` to a file in a temporary folder (with any `files`) and starts the
    /// binary on it; returns once both listening lines were logged.
    pub fn start(config: &Value) -> Self {
        let path = write_config(config);
        Self::start_with(&[path.to_string_lossy().as_ref()])
    }

    /// Starts the binary with `args`.
    pub fn start_with(args: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pushbroker"));
        command.args(args);
        Self::spawn(command)
    }

    /// Like [`ServerProcess::start`], with `RUST_LOG` set to `filter`.
    pub fn start_filtered(config: &Value, filter: &str) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pushbroker"));
        command.arg(write_config(config));
        Self::spawn_filtered(command, Some(filter))
    }

    /// Like [`ServerProcess::start`], with the process's open-files limit lowered to
    /// `nofile` (through the shell's `ulimit -n`, then `exec`: the pid stays the server's).
    pub fn start_with_open_files(config: &Value, nofile: u32) -> Self {
        Self::start_after(config, &format!("ulimit -n {nofile}"))
    }

    /// Like [`ServerProcess::start`], with the process's file-size limit lowered to
    /// `blocks` of 512 bytes (`ulimit -f` of a POSIX `sh`, then `exec`: the pid stays the
    /// server's) and SIGXFSZ ignored: a write past the limit fails with `EFBIG` instead of
    /// killing the process, as a full disk fails a write. Only the soft limit is lowered,
    /// so that `prlimit` can raise it again without privileges (room on the disk again).
    pub fn start_with_file_size_limit(config: &Value, blocks: u32) -> Self {
        Self::start_after(config, &format!("trap '' XFSZ; ulimit -S -f {blocks}"))
    }

    /// Starts the binary on `config` from a POSIX `sh` that runs `prelude` first (limits,
    /// signal dispositions), then `exec`s it: the pid stays the server's.
    fn start_after(config: &Value, prelude: &str) -> Self {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!(r#"{prelude} && exec "$0" "$1""#))
            .arg(env!("CARGO_BIN_EXE_pushbroker"))
            .arg(write_config(config));
        Self::spawn(command)
    }

    fn spawn(command: Command) -> Self {
        Self::spawn_filtered(command, None)
    }

    /// Starts `command` with `RUST_LOG` set to `filter`, or unset.
    fn spawn_filtered(mut command: Command, filter: Option<&str>) -> Self {
        match filter {
            Some(filter) => command.env("RUST_LOG", filter),
            // Tests check what the server logs by default: never inherit a filter.
            None => command.env_remove("RUST_LOG"),
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the pushbroker binary starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = flume::unbounded();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Self {
            child,
            lines,
            log: Vec::new(),
            http_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            device_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let http = p
            .wait_log(|l| listening_addr(l, "http").is_some())
            .expect("http listening line");
        let devices = p
            .wait_log(|l| listening_addr(l, "devices").is_some())
            .expect("devices listening line");
        p.http_addr = listening_addr(&http, "http").expect("http address");
        p.device_addr = listening_addr(&devices, "devices").expect("devices address");
        p
    }

    /// Waits up to [`PATIENCE`] for a log line matching `pred` (looking at lines already
    /// seen first).
    pub fn wait_log(&mut self, pred: impl Fn(&str) -> bool) -> Option<String> {
        if let Some(l) = self.log.iter().find(|l| pred(l)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + PATIENCE;
        while let Ok(line) = self.lines.recv_deadline(deadline) {
            self.log.push(line.clone());
            if pred(&line) {
                return Some(line);
            }
        }
        None
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (it has not exited).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGKILL (a crash: nothing of the server runs after it) and waits for the
    /// process to be gone, so that its data folder's lock is released.
    pub fn kill(mut self) {
        // `Child::kill` is SIGKILL, sent at once (no `kill` process to start first).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status, up to [`PATIENCE`].
    pub fn terminate(mut self) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address of an `INFO listening for WHAT on ADDR` log line, written as text or (with
/// `--log-format json`) as a JSON object.
fn listening_addr(line: &str, what: &str) -> Option<SocketAddr> {
    let marker = format!("listening for {what} on ");
    if line.starts_with('{') {
        let line: Value = serde_json::from_str(line).ok()?;
        if line["level"] != "INFO" {
            return None;
        }
        return line["message"]
            .as_str()?
            .strip_prefix(&marker)?
            .parse()
            .ok();
    }
    let (_, addr) = line.split_once(&format!("INFO {marker}"))?;
    Some(
        addr.trim()
            .parse()
            .unwrap_or_else(|_| panic!("no address in {line:?}")),
    )
}

/// Writes `config` to `config.json` in a fresh temporary folder; its path.
fn write_config(config: &Value) -> PathBuf {
    let path = temp_dir("server").join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(config).expect("json")).expect("config");
    path
}

/// A path as a JSON string.
pub fn path_json(p: &Path) -> Value {
    Value::String(p.to_string_lossy().into_owned())
}

/// A `redis-server` on 127.0.0.1, killed when dropped.
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port; `None` (with a message) if the binary is absent.
    pub fn start() -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            skip_notice();
            return None;
        }
        // A port picked free can be taken before redis binds it: try a few.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .expect("redis-server")
                .local_addr()
                .expect("redis-server")
                .port();
            let mut server = Self { port, child: None };
            if server.spawn() {
                return Some(server);
            }
        }
        panic!("redis-server did not start on any of five free ports");
    }

    /// Starts redis on `self.port`; whether it is accepting connections.
    pub fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            if let Some(child) = &mut self.child
                && child.try_wait().expect("redis-server").is_some()
            {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILLs the server and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart on {}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Says the test is skipped; with `PUSHBROKER_REQUIRE_REDIS` set (CI sets it), a
/// missing redis-server fails the test instead, so CI never passes by skipping.
#[allow(clippy::print_stderr)]
pub fn skip_notice() {
    assert!(
        std::env::var_os("PUSHBROKER_REQUIRE_REDIS").is_none(),
        "redis-server is not installed and PUSHBROKER_REQUIRE_REDIS is set"
    );
    eprintln!("redis-server is not installed (apt-get install redis-server): test skipped");
}

/// A connected pair on the calling glommio executor: the glommio side (accepted), and a
/// thread echoing every byte back on the other.
pub async fn echoed() -> pushbroker::glommio::net::TcpStream {
    let listener =
        pushbroker::glommio::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = listener.local_addr().expect("bound");
    let mut peer = TcpStream::connect(addr).expect("connect");
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        while let Ok(1) = peer.read(&mut byte) {
            if peer.write_all(&byte).is_err() {
                break;
            }
        }
    });
    listener.accept().await.expect("accept")
}
