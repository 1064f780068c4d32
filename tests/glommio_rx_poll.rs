//! The read readiness of the vendored glommio's streams (vendor/README.md): one multishot
//! poll armed for a stream's life instead of a one-shot poll per read that would block.
//! A reader blocked on a stream must still be woken by data, by end of stream (also when
//! it comes with the last data) and by a reset, many reads in a row must not arm a poll
//! each, and dropping a stream must cancel its poll (else the socket is never closed).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream as StdStream};
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use pushbroker::broker::testing::run_local;
use pushbroker::glommio::net::{TcpListener, TcpStream, rx_poll_arms};
use pushbroker::glommio::timer::{sleep, timeout};

/// Longer than any wake-up can take; a lost wake-up fails the test instead of hanging it.
const DEADLINE: Duration = Duration::from_secs(5);

/// A connected pair: the glommio side (accepted) and a plain blocking socket as the peer.
async fn pair() -> (TcpStream, StdStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = listener.local_addr().expect("bound");
    let peer = StdStream::connect(addr).expect("connect");
    let stream = listener.accept().await.expect("accept");
    (stream, peer)
}

/// Reads once into a 64-byte buffer, failing the test after [`DEADLINE`].
async fn read_once(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = [0u8; 64];
    let n = timeout(DEADLINE, async { Ok(stream.read(&mut buf).await) })
        .await
        .expect("the blocked reader was not woken")?;
    Ok(buf[..n].to_vec())
}

/// Lets the executor run until `stream`'s reader is surely blocked on its poll.
async fn settle() {
    sleep(Duration::from_millis(20)).await;
}

#[test]
fn a_blocked_reader_is_woken_by_data_then_by_end_of_stream() {
    run_local(|| async {
        let (mut stream, mut peer) = pair().await;
        let reader = pushbroker::glommio::spawn_local(async move {
            let first = read_once(&mut stream).await.expect("data");
            let second = read_once(&mut stream).await.expect("data");
            let end = read_once(&mut stream).await.expect("end of stream");
            (first, second, end)
        });
        settle().await;
        peer.write_all(b"one").expect("write");
        settle().await;
        peer.write_all(b"two").expect("write");
        settle().await;
        peer.shutdown(Shutdown::Write).expect("shutdown");
        let (first, second, end) = reader.await;
        assert_eq!(first, b"one");
        assert_eq!(second, b"two");
        assert!(end.is_empty(), "{end:?}");
    });
}

#[test]
fn the_end_of_stream_behind_the_last_data_is_not_lost() {
    // The data and the FIN arrive before the reader runs: its short read takes the data
    // (the socket looks drained), and the next read must still see the end of stream,
    // which the poll reported together with the data, not wait for another report.
    run_local(|| async {
        let (mut stream, mut peer) = pair().await;
        let reader = pushbroker::glommio::spawn_local(async move {
            let data = read_once(&mut stream).await.expect("data");
            let end = read_once(&mut stream).await.expect("end of stream");
            (data, end)
        });
        settle().await;
        peer.write_all(b"last words").expect("write");
        peer.shutdown(Shutdown::Write).expect("shutdown");
        let (data, end) = reader.await;
        assert_eq!(data, b"last words");
        assert!(end.is_empty(), "{end:?}");
    });
}

#[test]
fn a_blocked_reader_is_woken_by_a_reset() {
    run_local(|| async {
        let (mut stream, peer) = pair().await;
        let reader = pushbroker::glommio::spawn_local(async move { read_once(&mut stream).await });
        settle().await;
        // A zero linger time makes the close a reset.
        socket2::SockRef::from(&peer)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(peer);
        let error = reader.await.expect_err("a reset reads as an error");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
    });
}

#[test]
fn many_blocked_reads_on_one_stream_arm_one_poll() {
    // An echo over two glommio streams: each side's read finds nothing and waits on every
    // round. glommio 0.9.0 armed a new poll (a source, an SQE, a completion) per such
    // read; the streams now arm one poll each for their whole life.
    const ROUNDS: u64 = 200;
    run_local(|| async {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let mut server = listener.accept().await.expect("accept");
        let before = rx_poll_arms();
        let echo = pushbroker::glommio::spawn_local(async move {
            let mut buf = [0u8; 16];
            for _ in 0..ROUNDS {
                let n = server.read(&mut buf).await.expect("read");
                assert_eq!(n, 4);
                server.write_all(&buf[..n]).await.expect("write");
            }
        });
        let mut buf = [0u8; 16];
        for round in 0..ROUNDS {
            let msg = u32::try_from(round).expect("small").to_be_bytes();
            client.write_all(&msg).await.expect("write");
            let n = timeout(DEADLINE, async { Ok(client.read(&mut buf).await) })
                .await
                .expect("the echo came back")
                .expect("read");
            assert_eq!(&buf[..n], &msg);
        }
        echo.await;
        let arms = rx_poll_arms() - before;
        assert!(
            arms <= 2,
            "{arms} read polls armed for {ROUNDS} blocked reads on each of 2 streams"
        );
    });
}

#[test]
fn dropping_a_stream_cancels_its_poll_and_closes_the_socket() {
    // The armed poll holds a reference to the socket: were it left armed, dropping the
    // stream would close the descriptor but never the connection.
    run_local(|| async {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound");
        let (tx, rx) = flume::bounded(1);
        let peer = std::thread::spawn(move || {
            let mut peer = StdStream::connect(addr).expect("connect");
            peer.set_read_timeout(Some(DEADLINE)).expect("timeout");
            peer.write_all(b"hello").expect("write");
            let mut buf = [0u8; 8];
            let _ = tx.send(peer.read(&mut buf).map_err(|e| e.kind()));
        });
        let mut stream = listener.accept().await.expect("accept");
        assert_eq!(read_once(&mut stream).await.expect("data"), b"hello");
        settle().await;
        drop(stream);
        let seen = timeout(DEADLINE, async { Ok(rx.recv_async().await) })
            .await
            .expect("the peer saw the close")
            .expect("the peer thread answers");
        assert_eq!(seen, Ok(0), "the peer reads the end of stream");
        peer.join().expect("peer thread");
    });
}
