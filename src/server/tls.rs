//! TLS for device connections: rustls driven directly over a glommio stream.
//!
//! A small adapter of our own rather than futures-rustls: the TLS session ([`TlsSession`],
//! which is `Send`) must be able to leave the stream and travel with its socket to the
//! shard that owns the device (futures-rustls cannot rebuild a stream from a moved
//! session). The session is boxed so an idle connection's task future stays small.
//!
//! rustls is driven through its unbuffered API ([`UnbufferedServerConnection`]), so the
//! buffers around it are ours: received bytes short of a whole record, decrypted data
//! not yet read, encoded bytes not yet written. Each is freed once empty, so an idle
//! session holds none. (The buffered `ServerConnection` keeps a 4 KB receive buffer for
//! the session's whole life, and refills it on every read that would block: most of
//! an idle TLS session's memory.) The socket is read into a buffer on the stack and
//! processed there; only a partial record's bytes are kept.

use std::cell::{Cell, RefCell};
use std::fs;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use thiserror::Error;

/// Why the TLS configuration could not be built.
#[derive(Debug, Error)]
pub enum TlsConfigError {
    /// A PEM file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The certificate file holds no certificate.
    #[error("no certificate in {0}")]
    NoCertificate(String),
    /// The key file holds no private key.
    #[error("no private key in {0}")]
    NoKey(String),
    /// rustls refused the certificate and key.
    #[error("certificate and key refused")]
    Rustls(#[source] rustls::Error),
}

/// Builds the server's TLS configuration from PEM files (ring provider, no client
/// authentication, no session tickets: devices reconnect rarely and tickets cost
/// handshake time).
///
/// # Errors
/// A [`TlsConfigError`] naming the file or the problem.
pub fn server_config(
    cert_pem: &Path,
    key_pem: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let read = |path: &Path| {
        fs::read(path).map_err(|source| TlsConfigError::Read {
            path: path.display().to_string(),
            source,
        })
    };
    let cert_bytes = read(cert_pem)?;
    let key_bytes = read(key_pem)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &cert_bytes[..])
        .collect::<Result<_, _>>()
        .map_err(|source| TlsConfigError::Read {
            path: cert_pem.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate(
            cert_pem.display().to_string(),
        ));
    }
    let key = rustls_pemfile::private_key(&mut &key_bytes[..])
        .map_err(|source| TlsConfigError::Read {
            path: key_pem.display().to_string(),
            source,
        })?
        .ok_or_else(|| TlsConfigError::NoKey(key_pem.display().to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Rustls)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsConfigError::Rustls)?;
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The socket is read this much at a time, into a buffer on the stack (rustls' buffered
/// connection reads 4 KB at a time too). A device sends little; a larger record spans
/// reads and waits in [`TlsSession`]'s `incoming` until whole.
const READ_CHUNK: usize = 4096;

thread_local! {
    /// The socket is read into this (borrowed only inside one poll, never across an
    /// `.await`), not into a fresh zeroed chunk on the stack per read.
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
    /// An `outgoing` buffer a session of this thread wrote out completely, lent to the next
    /// session that encrypts: a write then costs no allocation, and an idle session
    /// still holds none.
    static SPARE_OUTGOING: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// A spent `outgoing` buffer larger than this goes back to the allocator, not to
/// [`SPARE_OUTGOING`].
const SPARE_KEEP: usize = 16 << 10;

/// At most this much received TLS data is kept waiting for the rest of a record or of a
/// handshake message (rustls' buffered connection allows 64 KB of a handshake message).
const MAX_INCOMING: usize = 0x1_0000 + READ_CHUNK;

/// At most this much application data is encrypted per write (the buffered connection's
/// default limit on data waiting to be sent).
const MAX_WRITE: usize = 64 * 1024;

/// What to do once rustls may send application data.
#[derive(Clone, Copy)]
enum Want<'a> {
    /// Nothing: only process what came in and queue what rustls must answer.
    Nothing,
    /// Encrypt this application data.
    Send(&'a [u8]),
    /// Queue a close_notify alert.
    Close,
}

/// A device's TLS session: the rustls connection and the buffers pushbroker keeps around
/// it. Boxed, and moved with its socket to the shard that owns the device.
///
/// Each buffer is given back to the allocator once empty, so an idle session holds
/// nothing but rustls' own state.
///
/// What every read of the session looks at before it knows whether records came (the
/// buffers' ends, the flags) comes first, in one cache line of its own: with thousands of
/// sessions a session's state is out of cache when its next delivery comes. `incoming`
/// and rustls' state follow; a write and a read that got records reach them anyway.
#[repr(C, align(64))]
pub struct TlsSession {
    /// `plain[plain_read..]` is not yet read (`plain` is at most a read's worth of records,
    /// far below 4 GiB).
    plain_read: u32,
    /// `outgoing[out_written..]` is not yet written (`outgoing` is at most one write's
    /// records, far below 4 GiB).
    out_written: u32,
    /// The transport closed.
    eof: bool,
    /// The peer sent close_notify.
    peer_closed: bool,
    /// We queued close_notify.
    close_sent: bool,
    /// rustls failed: it is not driven again.
    failed: bool,
    /// Decrypted application data.
    plain: Vec<u8>,
    /// Encoded TLS bytes.
    outgoing: Vec<u8>,
    /// Received TLS bytes not yet processed: part of a record or of a handshake message.
    incoming: Vec<u8>,
    conn: UnbufferedServerConnection,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshaking", &self.conn.is_handshaking())
            .field("incoming", &self.incoming.len())
            .field("plain", &self.plain[self.plain_read as usize..].len())
            .field(
                "outgoing",
                &self.outgoing[self.out_written as usize..].len(),
            )
            .field("eof", &self.eof)
            .field("peer_closed", &self.peer_closed)
            .finish_non_exhaustive()
    }
}

/// Runs `encode` on room at the end of `out`, growing it to the size the encoder asks for
/// when `guess` is not enough; the bytes encoded stay in `out`.
fn encode_into<E>(
    out: &mut Vec<u8>,
    guess: usize,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needs: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = out.len();
    let mut room = guess;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => {
                out.truncate(start);
                match needs(&e) {
                    Some(required) if required > room => room = required,
                    _ => return Err(e),
                }
            }
        }
    }
}

fn encode_needs(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn encrypt_needs(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn encrypt_error(e: EncryptError) -> rustls::Error {
    match e {
        EncryptError::EncryptExhausted => rustls::Error::EncryptError,
        other => rustls::Error::General(other.to_string()),
    }
}

/// Room for `len` bytes of application data once encrypted: a record header, content
/// type, nonce and tag per 16 KB record are well under 64 bytes.
fn sealed_len(len: usize) -> usize {
    len + (len / 16_384 + 1) * 64
}

impl TlsSession {
    /// A session for a new connection.
    ///
    /// # Errors
    /// rustls refusing the configuration.
    pub fn new(config: Arc<rustls::ServerConfig>) -> Result<Box<Self>, rustls::Error> {
        Ok(Box::new(Self {
            conn: UnbufferedServerConnection::new(config)?,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_read: 0,
            outgoing: Vec::new(),
            out_written: 0,
            eof: false,
            peer_closed: false,
            close_sent: false,
            failed: false,
        }))
    }

    /// Bytes of buffer capacity the session holds outside rustls (0 when idle).
    pub fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.outgoing.capacity()
    }

    /// Whether the handshake is still under way.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Whether encoded bytes wait to be written.
    fn wants_write(&self) -> bool {
        (self.out_written as usize) < self.outgoing.len()
    }

    /// Processes newly received bytes: those already waiting in `incoming` followed by
    /// `fresh`. What is left of them (part of a record) is kept in `incoming`.
    fn receive(&mut self, fresh: &mut [u8]) -> Result<(), rustls::Error> {
        if self.incoming.is_empty() {
            // The usual case: whole records, processed where they were read.
            let (used, _) = self.process(fresh, Want::Nothing)?;
            self.keep(&fresh[used..])
        } else {
            let mut incoming = std::mem::take(&mut self.incoming);
            incoming.extend_from_slice(fresh);
            let result = self.process(&mut incoming, Want::Nothing);
            let used = result.as_ref().map_or(incoming.len(), |(used, _)| *used);
            incoming.drain(..used);
            self.incoming = incoming;
            if self.incoming.is_empty() {
                self.incoming = Vec::new();
            }
            result?;
            if self.incoming.len() > MAX_INCOMING {
                return Err(rustls::Error::General("TLS input too large".into()));
            }
            Ok(())
        }
    }

    /// Keeps `rest` (received, not yet processable) in `incoming`, which is empty.
    fn keep(&mut self, rest: &[u8]) -> Result<(), rustls::Error> {
        if rest.len() > MAX_INCOMING {
            return Err(rustls::Error::General("TLS input too large".into()));
        }
        self.incoming.extend_from_slice(rest);
        Ok(())
    }

    /// Runs what is waiting in `incoming` through rustls with `want` (encrypting data or
    /// a close_notify once rustls allows it); whether it did.
    fn act(&mut self, want: Want<'_>) -> Result<bool, rustls::Error> {
        let mut incoming = std::mem::take(&mut self.incoming);
        let result = self.process(&mut incoming, want);
        let used = result.as_ref().map_or(incoming.len(), |(used, _)| *used);
        incoming.drain(..used);
        if !incoming.is_empty() {
            self.incoming = incoming;
        }
        result.map(|(_, done)| done)
    }

    /// Drives rustls over `input` until it needs more from the peer or has nothing more
    /// to do: decrypted data goes to `plain`, what rustls must send to `outgoing`, and
    /// `want` is done if rustls allows application data. The bytes of `input` consumed,
    /// and whether `want` was done.
    fn process(
        &mut self,
        input: &mut [u8],
        mut want: Want<'_>,
    ) -> Result<(usize, bool), rustls::Error> {
        if self.failed {
            return Err(rustls::Error::General("TLS session failed".into()));
        }
        let mut used = 0;
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut input[used..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    // Encode the alert rustls queued for the peer, so the caller can send
                    // it before failing (best effort).
                    // Asked again on the same buffer, past what it said to discard (its
                    // handshake reassembly keeps offsets into that buffer; an empty one
                    // would make it index out of bounds), and once: a queued alert comes
                    // out before rustls reads input again. After that rustls is never
                    // driven again, as its own unbuffered examples do.
                    used += discard;
                    self.failed = true;
                    let UnbufferedStatus { state, .. } =
                        self.conn.process_tls_records(&mut input[used..]);
                    if let Ok(ConnectionState::EncodeTlsData(mut e)) = state {
                        let _ =
                            encode_into(&mut self.outgoing, 64, |out| e.encode(out), encode_needs);
                    }
                    return Err(e);
                }
            };
            let mut done = None;
            match state {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        let record = record?;
                        self.plain.extend_from_slice(record.payload);
                        used += record.discard;
                    }
                }
                ConnectionState::ReadEarlyData(mut r) => {
                    // Early data is not enabled (`max_early_data_size` 0): none comes.
                    while let Some(record) = r.next_record() {
                        used += record?.discard;
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    encode_into(&mut self.outgoing, 512, |out| e.encode(out), encode_needs)
                        .map_err(|e| rustls::Error::General(e.to_string()))?;
                }
                // What was encoded is in `outgoing`; the caller writes it.
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::PeerClosed => self.peer_closed = true,
                ConnectionState::WriteTraffic(mut w) => {
                    match want {
                        Want::Nothing => {}
                        Want::Send(data) => {
                            encode_into(
                                &mut self.outgoing,
                                sealed_len(data.len()),
                                |out| w.encrypt(data, out),
                                encrypt_needs,
                            )
                            .map_err(encrypt_error)?;
                        }
                        Want::Close => {
                            encode_into(
                                &mut self.outgoing,
                                64,
                                |out| w.queue_close_notify(out),
                                encrypt_needs,
                            )
                            .map_err(encrypt_error)?;
                            self.close_sent = true;
                        }
                    }
                    want = Want::Nothing;
                    done = Some(true);
                }
                // BlockedHandshake (needs more from the peer), Closed, or a state of a
                // later rustls: nothing more to do until more comes.
                _ => done = Some(false),
            }
            used += discard;
            if let Some(done) = done {
                return Ok((used, done));
            }
        }
    }

    /// Copies decrypted data into `buf`; the bytes copied.
    fn read_plain(&mut self, buf: &mut [u8]) -> usize {
        let waiting = &self.plain[self.plain_read as usize..];
        let n = waiting.len().min(buf.len());
        buf[..n].copy_from_slice(&waiting[..n]);
        self.plain_read += n as u32;
        if self.plain_read as usize == self.plain.len() {
            self.plain = Vec::new();
            self.plain_read = 0;
        }
        n
    }
}

/// A TLS server stream: a transport plus a boxed TLS session.
pub struct TlsStream<S> {
    tls: Box<TlsSession>,
    io: S,
}

impl<S> std::fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// A stream over `io` continuing `tls` (a fresh session, or one moved from another
    /// shard with its socket).
    pub fn new(io: S, tls: Box<TlsSession>) -> Self {
        Self { tls, io }
    }

    /// Takes the stream apart: the transport and the session, to move them.
    pub fn into_parts(self) -> (S, Box<TlsSession>) {
        (self.io, self.tls)
    }

    /// The session (to look at its state).
    pub fn session(&self) -> &TlsSession {
        &self.tls
    }

    /// Completes the handshake.
    ///
    /// # Errors
    /// A transport error, a TLS error, or EOF before the handshake completed.
    pub async fn handshake(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            loop {
                match self.poll_flush_tls(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
                if !self.tls.is_handshaking() {
                    return Poll::Ready(Ok(()));
                }
                match self.poll_read_tls(cx) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    }

    /// Writes what rustls has to send until nothing is left; the buffer is then freed.
    fn poll_flush_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let tls = &mut *self.tls;
        while tls.wants_write() {
            let unwritten = &tls.outgoing[tls.out_written as usize..];
            match Pin::new(&mut self.io).poll_write(cx, unwritten) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => tls.out_written += n.min(unwritten.len()) as u32,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if tls.outgoing.capacity() > 0 {
            let mut spent = std::mem::take(&mut tls.outgoing);
            tls.out_written = 0;
            if spent.capacity() <= SPARE_KEEP {
                spent.clear();
                let _ = SPARE_OUTGOING.try_with(|spare| spare.set(spent));
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Gives `outgoing`, if it holds nothing, this thread's spare buffer to encode into.
    fn lend_outgoing(&mut self) {
        let tls = &mut *self.tls;
        if tls.outgoing.capacity() == 0 {
            tls.outgoing = SPARE_OUTGOING.try_with(Cell::take).unwrap_or_default();
            tls.out_written = 0;
        }
    }

    /// Reads TLS records from the transport and processes them; the bytes read (0: the
    /// transport closed).
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let shared = READ_BUF
            .try_with(|cell| {
                cell.try_borrow_mut()
                    .ok()
                    .map(|mut chunk| self.poll_read_tls_into(cx, &mut chunk))
            })
            .ok()
            .flatten();
        match shared {
            Some(polled) => polled,
            // Only if a stream's read polled another's on this thread (or at thread exit).
            None => self.poll_read_tls_into(cx, &mut [0u8; READ_CHUNK]),
        }
    }

    /// [`Self::poll_read_tls`] through `chunk`.
    fn poll_read_tls_into(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let n = match Pin::new(&mut self.io).poll_read(cx, chunk) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        let n = n.min(chunk.len());
        if let Err(e) = self.tls.receive(&mut chunk[..n]) {
            // Tell the peer why before failing (best effort).
            let _ = self.poll_flush_tls(cx);
            return Poll::Ready(Err(tls_error(e)));
        }
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if (this.tls.plain_read as usize) < this.tls.plain.len() {
                return Poll::Ready(Ok(this.tls.read_plain(buf)));
            }
            if this.tls.eof || this.tls.peer_closed {
                // close_notify, or the peer closed without it: to the session, EOF.
                return Poll::Ready(Ok(0));
            }
            // Key updates and alerts may need answering before more comes.
            if let Poll::Ready(Err(e)) = this.poll_flush_tls(cx) {
                return Poll::Ready(Err(e));
            }
            match this.poll_read_tls(cx) {
                Poll::Ready(Ok(0)) => this.tls.eof = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Push out what is already encrypted first, so buffering stays bounded.
        match this.poll_flush_tls(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other.map(|r| r.map(|()| 0)),
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_WRITE);
        this.lend_outgoing();
        match this.tls.act(Want::Send(&buf[..n])) {
            Ok(true) => {}
            Ok(false) => return Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            Err(e) => {
                let _ = this.poll_flush_tls(cx);
                return Poll::Ready(Err(tls_error(e)));
            }
        }
        // Try to send it now; if the socket is full it goes on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_flush_tls(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_flush_tls(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_flush(cx),
            other => other,
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.tls.close_sent {
            // Best effort, as rustls' own send_close_notify: a session that failed or never
            // finished its handshake closes without it.
            this.tls.close_sent = true;
            let _ = this.tls.act(Want::Close);
        }
        match this.poll_flush_tls(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_close(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::sync::mpsc;
    use std::time::Duration;

    use futures_lite::future::poll_once;
    use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _};
    use glommio::net::TcpListener;

    use super::*;

    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        configs_for(rustls::DEFAULT_VERSIONS)
    }

    /// [`configs`], made once for the whole test binary (for property tests' many cases).
    fn configs_once() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        static CONFIGS: std::sync::OnceLock<(
            Arc<rustls::ServerConfig>,
            Arc<rustls::ClientConfig>,
        )> = std::sync::OnceLock::new();
        CONFIGS.get_or_init(configs).clone()
    }

    /// The server's configuration, and a client's speaking only `versions`.
    fn configs_for(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let dir = std::env::temp_dir().join(format!(
            "pushbroker-tls-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        fs::create_dir_all(&dir).expect("dir");
        fs::write(dir.join("cert.pem"), cert.pem()).expect("cert file");
        fs::write(dir.join("key.pem"), key.serialize_pem()).expect("key file");
        let server = server_config(&dir.join("cert.pem"), &dir.join("key.pem")).expect("config");
        let _ = fs::remove_dir_all(&dir);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, Arc::new(client))
    }

    /// Runs `test` on an executor of its own.
    /// Listens on a free port, tells `addr_tx` where, and wraps the first connection in
    /// a server-side TLS stream (its handshake not yet done).
    async fn accept_one(
        addr_tx: &mpsc::Sender<std::net::SocketAddr>,
        server: Arc<rustls::ServerConfig>,
    ) -> TlsStream<glommio::net::TcpStream> {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        addr_tx
            .send(listener.local_addr().expect("addr"))
            .expect("send");
        let stream = listener.accept().await.expect("accept");
        TlsStream::new(stream, TlsSession::new(server).expect("session"))
    }

    fn on_executor<F: Future<Output = ()> + 'static>(test: impl FnOnce() -> F + Send + 'static) {
        glommio::LocalExecutorBuilder::default()
            .spawn(test)
            .expect("an executor")
            .join()
            .expect("the test ran");
    }

    /// An idle session (handshake done, a read waiting) holds no buffer of its own; data
    /// still crosses both ways, a record split across segments included, and the peer's
    /// close_notify reads as EOF.
    #[test]
    fn an_idle_session_holds_no_buffers() {
        idle_session_holds_no_buffers(configs(), rustls::ProtocolVersion::TLSv1_3);
    }

    /// The same over TLS 1.2, which devices may still speak.
    #[test]
    fn an_idle_tls12_session_holds_no_buffers() {
        idle_session_holds_no_buffers(
            configs_for(&[&rustls::version::TLS12]),
            rustls::ProtocolVersion::TLSv1_2,
        );
    }

    fn idle_session_holds_no_buffers(
        (server, client): (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>),
        expected: rustls::ProtocolVersion,
    ) {
        let (addr_tx, addr_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let peer = std::thread::spawn(move || {
            let addr = addr_rx.recv().expect("address");
            let mut sock = std::net::TcpStream::connect(addr).expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let mut conn = rustls::ClientConnection::new(client, name).expect("client");
            while conn.is_handshaking() {
                conn.complete_io(&mut sock).expect("handshake");
            }
            let version = conn.protocol_version();
            go_rx.recv().expect("go");
            conn.writer().write_all(b"hello world").expect("plaintext");
            let mut raw = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut raw).expect("encrypt");
            }
            let (first, second) = raw.split_at(raw.len() / 2);
            sock.write_all(first).expect("first half");
            std::thread::sleep(Duration::from_millis(50));
            sock.write_all(second).expect("second half");
            let mut pong = [0u8; 4];
            rustls::Stream::new(&mut conn, &mut sock)
                .read_exact(&mut pong)
                .expect("pong");
            assert_eq!(&pong, b"pong");
            conn.send_close_notify();
            while conn.wants_write() {
                conn.write_tls(&mut sock).expect("close_notify");
            }
            let mut rest = Vec::new();
            let _ = rustls::Stream::new(&mut conn, &mut sock).read_to_end(&mut rest);
            assert!(rest.is_empty());
            version
        });
        on_executor(move || async move {
            let mut tls = accept_one(&addr_tx, server).await;
            tls.handshake().await.expect("handshake");
            assert!(!tls.session().is_handshaking());
            assert_eq!(tls.session().buffered_capacity(), 0, "after the handshake");

            let mut buf = [0u8; 64];
            assert!(
                poll_once(tls.read(&mut buf)).await.is_none(),
                "nothing sent yet"
            );
            assert_eq!(tls.session().buffered_capacity(), 0, "waiting to read");

            go_tx.send(()).expect("go");
            let mut got = Vec::new();
            while got.len() < 11 {
                let n = tls.read(&mut buf).await.expect("read");
                assert!(n > 0, "EOF too soon");
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, b"hello world");
            assert_eq!(tls.session().buffered_capacity(), 0, "after reading");

            tls.write_all(b"pong").await.expect("write");
            tls.flush().await.expect("flush");
            assert_eq!(tls.session().buffered_capacity(), 0, "after writing");
            let spare = SPARE_OUTGOING.with(|spare| {
                let buffer = spare.take();
                let capacity = buffer.capacity();
                spare.set(buffer);
                capacity
            });
            assert!(
                spare > 0,
                "the written buffer is kept for the thread's next write"
            );

            assert_eq!(tls.read(&mut buf).await.expect("close_notify"), 0);
            tls.close().await.expect("close");
        });
        let version = peer.join().expect("the peer ran");
        assert_eq!(version, Some(expected));
    }

    /// A client sending tiny records, a few bytes per segment: handshake messages span
    /// records and reads, so the server keeps and joins partial input; the handshake
    /// completes and data crosses.
    #[test]
    fn handshake_messages_spanning_reads_are_joined() {
        let (server, client) = configs();
        let mut client = Arc::unwrap_or_clone(client);
        client.max_fragment_size = Some(64);
        let client = Arc::new(client);
        let (addr_tx, addr_rx) = mpsc::channel();
        let peer = std::thread::spawn(move || {
            let addr = addr_rx.recv().expect("address");
            let mut sock = std::net::TcpStream::connect(addr).expect("connect");
            sock.set_nodelay(true).expect("nodelay");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let mut conn = rustls::ClientConnection::new(client, name).expect("client");
            let trickle = |conn: &mut rustls::ClientConnection, sock: &mut std::net::TcpStream| {
                let mut raw = Vec::new();
                while conn.wants_write() {
                    conn.write_tls(&mut raw).expect("encode");
                }
                for piece in raw.chunks(37) {
                    sock.write_all(piece).expect("send");
                    std::thread::sleep(Duration::from_millis(1));
                }
            };
            while conn.is_handshaking() {
                trickle(&mut conn, &mut sock);
                if conn.is_handshaking() {
                    conn.read_tls(&mut sock).expect("read");
                    conn.process_new_packets().expect("process");
                }
            }
            trickle(&mut conn, &mut sock);
            conn.writer().write_all(&[7u8; 300]).expect("plaintext");
            trickle(&mut conn, &mut sock);
        });
        on_executor(move || async move {
            let mut tls = accept_one(&addr_tx, server).await;
            tls.handshake().await.expect("handshake");
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while got.len() < 300 {
                let n = tls.read(&mut buf).await.expect("read");
                assert!(n > 0, "EOF too soon");
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, vec![7u8; 300]);
            assert_eq!(tls.session().buffered_capacity(), 0);
        });
        peer.join().expect("the peer ran");
    }

    /// What a peer sends: a handshake record holding only the 4-byte header of a
    /// ClientHello that announces 256 bytes, then a record of `content_type`.
    fn fragment_then(content_type: u8) -> [u8; 15] {
        [22, 3, 1, 0, 4, 1, 0, 1, 0, content_type, 3, 3, 0, 1, 1]
    }

    /// A handshake that fails while rustls holds part of a handshake message fails with
    /// an error, and closing the stream afterwards (as every session end does) does not
    /// panic: rustls is not driven again.
    fn a_failure_in_a_partial_handshake_message_is_an_error(content_type: u8) {
        let (server, _) = configs();
        let (addr_tx, addr_rx) = mpsc::channel();
        let peer = std::thread::spawn(move || {
            let addr = addr_rx.recv().expect("address");
            let mut sock = std::net::TcpStream::connect(addr).expect("connect");
            sock.write_all(&fragment_then(content_type)).expect("send");
            let mut answer = Vec::new();
            let _ = sock.read_to_end(&mut answer);
        });
        on_executor(move || async move {
            let mut tls = accept_one(&addr_tx, server).await;
            let e = tls.handshake().await.expect_err("refused");
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            let _ = tls.close().await;
        });
        peer.join().expect("the peer ran");
    }

    #[test]
    fn a_record_interleaved_with_a_partial_handshake_message_is_an_error() {
        // change_cipher_spec in the middle of the ClientHello.
        a_failure_in_a_partial_handshake_message_is_an_error(20);
    }

    #[test]
    fn an_unknown_record_type_after_a_partial_handshake_message_is_an_error() {
        a_failure_in_a_partial_handshake_message_is_an_error(99);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Whatever a peer sends before or instead of a handshake, in whatever pieces,
        /// the session answers with an error or waits for more; it never panics, and
        /// closing it afterwards does not either.
        #[test]
        fn any_bytes_from_a_peer_never_panic(
            pieces in proptest::collection::vec(
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 1..8),
            prefix in 0usize..4,
        ) {
            let (server, _) = configs_once();
            let mut session = TlsSession::new(server).expect("session");
            // Most random bytes are refused at the record header: start some runs with
            // a plausible handshake record header, so the reassembly is reached too.
            let headers: [&[u8]; 4] = [&[], &[22, 3, 1, 0, 4], &[22, 3, 1, 0, 40, 1], &[22, 3, 3]];
            let mut first = headers[prefix].to_vec();
            first.extend_from_slice(&pieces[0]);
            for piece in std::iter::once(first).chain(pieces.into_iter().skip(1)) {
                let mut piece = piece;
                if session.receive(&mut piece).is_err() {
                    break;
                }
            }
            let _ = session.act(Want::Close);
        }
    }

    /// A peer that does not speak TLS fails the handshake and is told why with an alert.
    #[test]
    fn a_failed_handshake_sends_an_alert() {
        let (server, _) = configs();
        let (addr_tx, addr_rx) = mpsc::channel();
        let peer = std::thread::spawn(move || {
            let addr = addr_rx.recv().expect("address");
            let mut sock = std::net::TcpStream::connect(addr).expect("connect");
            sock.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("garbage");
            let mut answer = Vec::new();
            let _ = sock.read_to_end(&mut answer);
            answer
        });
        on_executor(move || async move {
            let mut tls = accept_one(&addr_tx, server).await;
            let e = tls.handshake().await.expect_err("not TLS");
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        });
        let answer = peer.join().expect("the peer ran");
        assert_eq!(answer.first(), Some(&21), "an alert record: {answer:?}");
    }
}
