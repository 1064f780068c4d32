//! What rustls alone spends on the handshake pushbroker's devices make: the baseline for
//! the server's CPU per TLS connect (pushload's `connect` scenario with `--tls`).
//!
//! The server side is pushbroker's own configuration (`server::tls::server_config`), on
//! the certificate pushload makes (ECDSA P-256, signed by a CA of its own); the client
//! trusts that CA. Both sides run in memory, with no socket:
//! - `server side`: only the server's calls are timed (reading the client's flights,
//!   processing them, writing its own), which is what a server pays per connect;
//! - `both sides`: the whole exchange, client included, for reference.

#![allow(missing_docs, clippy::unwrap_used)]

use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use pushbroker::server::tls::server_config;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// The server name pushload's certificate is made for.
const NAME: &str = "push-delivery";

fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![NAME.to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("pushbroker-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let server = server_config(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (server, Arc::new(client))
}

/// One handshake in memory; returns the time spent in the server's calls.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> Duration {
    let name = ServerName::try_from(NAME).unwrap();
    let mut c = ClientConnection::new(Arc::clone(client), name).unwrap();
    let started = Instant::now();
    let mut s = ServerConnection::new(Arc::clone(server)).unwrap();
    let mut in_server = started.elapsed();
    let mut wire = Vec::new();
    while c.is_handshaking() || s.is_handshaking() || c.wants_write() || s.wants_write() {
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let t = Instant::now();
        let mut from_client = Cursor::new(&wire[..]);
        while (from_client.position() as usize) < wire.len() {
            s.read_tls(&mut from_client).unwrap();
            s.process_new_packets().unwrap();
        }
        let mut back = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut back).unwrap();
        }
        in_server += t.elapsed();
        let mut from_server = Cursor::new(&back[..]);
        while (from_server.position() as usize) < back.len() {
            c.read_tls(&mut from_server).unwrap();
            c.process_new_packets().unwrap();
        }
        if wire.is_empty() && back.is_empty() {
            break;
        }
    }
    assert!(!s.is_handshaking() && !c.is_handshaking());
    in_server
}

fn bench(c: &mut Criterion) {
    let (server, client) = configs();
    let mut group = c.benchmark_group("tls_handshake");
    group.bench_function("server side", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| handshake(&server, &client)).sum())
    });
    group.bench_function("both sides", |b| b.iter(|| handshake(&server, &client)));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
