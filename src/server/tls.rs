//! TLS for device connections: rustls driven directly over a glommio stream.
//!
//! A small adapter of our own rather than futures-rustls: the rustls session
//! ([`rustls::ServerConnection`], which is `Send`) must be able to leave the stream and
//! travel with its socket to the shard that owns the device (futures-rustls cannot
//! rebuild a stream from a moved session). The session is boxed so an idle connection's
//! task future stays small; the socket is read straight into rustls' own buffer, so no
//! extra per-connection buffer is kept.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};
use rustls::ServerConnection;
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

/// `std::io::Read` over an async stream for one poll: `Pending` becomes `WouldBlock`.
struct SyncIo<'a, 'b, S> {
    io: &'a mut S,
    cx: &'a mut Context<'b>,
}

impl<S: AsyncRead + Unpin> Read for SyncIo<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_read(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncWrite + Unpin> Write for SyncIo<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// rustls hands a flight over as several records (the handshake's ServerHello to
    /// Finished are five); the transport writes one buffer per call, so they are joined
    /// here into one write: one segment on the wire instead of one per record.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        match (nonempty.next(), nonempty.next()) {
            (None, _) => Ok(0),
            (Some(only), None) => self.write(only),
            (Some(_), Some(_)) => {
                let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
                self.write(&joined)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.io).poll_flush(self.cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// A TLS server stream: a transport plus a boxed rustls session.
pub struct TlsStream<S> {
    io: S,
    conn: Box<ServerConnection>,
    /// The peer sent close_notify or closed the transport.
    eof: bool,
}

impl<S> std::fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("handshaking", &self.conn.is_handshaking())
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// A stream over `io` continuing `conn` (a fresh session, or one moved from
    /// another shard with its socket).
    pub fn new(io: S, conn: Box<ServerConnection>) -> Self {
        Self {
            io,
            conn,
            eof: false,
        }
    }

    /// Takes the stream apart: the transport and the session, to move them.
    pub fn into_parts(self) -> (S, Box<ServerConnection>) {
        (self.io, self.conn)
    }

    /// Completes the handshake.
    ///
    /// # Errors
    /// A transport error, a TLS error, or EOF before the handshake completed.
    pub async fn handshake(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            while self.conn.is_handshaking() {
                match self.poll_flush_tls(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
                if !self.conn.is_handshaking() {
                    break;
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
            self.poll_flush_tls(cx)
        })
        .await
    }

    /// Writes what rustls has to send until it has nothing more.
    fn poll_flush_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            let mut w = SyncIo {
                io: &mut self.io,
                cx,
            };
            match self.conn.write_tls(&mut w) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads TLS records from the transport into rustls and processes them; the bytes
    /// read (0: the transport closed).
    fn poll_read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut r = SyncIo {
            io: &mut self.io,
            cx,
        };
        let n = match self.conn.read_tls(&mut r) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if let Err(e) = self.conn.process_new_packets() {
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
            match this.conn.reader().read(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    // The peer closed without close_notify: to the session, EOF.
                    return Poll::Ready(Ok(0));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
            if this.eof {
                return Poll::Ready(Ok(0));
            }
            // Key updates and alerts may need answering before more comes.
            if let Poll::Ready(Err(e)) = this.poll_flush_tls(cx) {
                return Poll::Ready(Err(e));
            }
            match this.poll_read_tls(cx) {
                Poll::Ready(Ok(0)) => this.eof = true,
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
        let n = this.conn.writer().write(buf)?;
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
        this.conn.send_close_notify();
        match this.poll_flush_tls(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_close(cx),
            other => other,
        }
    }
}
