//! Any bytes from a device to the server's TLS driver (`server::tls::TlsStream` over
//! pushbroker's own TLS configuration), arriving in chunks the input chooses, either from
//! the first byte or after a real ClientHello (so that what follows meets a handshake
//! under way: its flights, alerts and failures). Never a panic, and the stream always
//! comes to an end (EOF or an error) once the input is spent.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite};
use libfuzzer_sys::fuzz_target;
use pushbroker::server::tls::{TlsSession, TlsStream, server_config};

/// The server name pushload's and the devices' certificates are made for.
const NAME: &str = "push-delivery";

fn config() -> &'static Arc<rustls::ServerConfig> {
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("a key");
        let cert = rcgen::CertificateParams::new(vec![NAME.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("a certificate");
        let dir = std::env::temp_dir().join(format!("pushbroker-fuzz-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        std::fs::write(dir.join("cert.pem"), cert.pem()).expect("cert.pem");
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("key.pem");
        let config = server_config(&dir.join("cert.pem"), &dir.join("key.pem")).expect("config");
        let _ = std::fs::remove_dir_all(&dir);
        config
    })
}

/// A real ClientHello for [`NAME`], made once.
fn client_hello() -> &'static [u8] {
    static HELLO: OnceLock<Vec<u8>> = OnceLock::new();
    HELLO.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = NAME.try_into().expect("a server name");
        let mut conn = rustls::ClientConnection::new(Arc::new(client), name).expect("a client");
        let mut hello = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut hello).expect("in memory");
        }
        hello
    })
}

/// The device's side of the socket: `input` arrives in chunks of the sizes `chunks`
/// cycles through (1 to 256 bytes; whole reads when `chunks` is empty), then EOF; what
/// the server writes is dropped.
struct Wire<'a> {
    input: &'a [u8],
    chunks: &'a [u8],
    reads: usize,
}

impl AsyncRead for Wire<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let chunk = match this.chunks {
            [] => buf.len(),
            c => usize::from(c[this.reads % c.len()]) + 1,
        };
        this.reads += 1;
        let n = chunk.min(buf.len()).min(this.input.len());
        buf[..n].copy_from_slice(&this.input[..n]);
        this.input = &this.input[n..];
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for Wire<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    // First byte: high bit, a ClientHello first; low four bits, how many chunk sizes follow.
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (chunks, bytes) = rest.split_at(rest.len().min(usize::from(mode & 0x0f)));
    let input = if mode & 0x80 != 0 {
        [client_hello(), bytes].concat()
    } else {
        bytes.to_vec()
    };
    let session = TlsSession::new(Arc::clone(config())).expect("a session");
    let wire = Wire {
        input: &input,
        chunks,
        reads: 0,
    };
    let mut stream = TlsStream::new(wire, session);
    futures_lite::future::block_on(async {
        if stream.handshake().await.is_err() {
            return;
        }
        // Only a device with the server's keys gets here; read to the end all the same.
        let mut buf = [0u8; 512];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
});
