//! hyper's runtime traits on glommio, without `unsafe`: runtime glue under the HTTP API,
//! not service state (which lives in each shard's service slot). [`HyperIo`] adapts a futures-io
//! stream (a glommio `TcpStream`) to `hyper::rt::Read`/`Write`, and [`HyperTimer`] gives
//! hyper the timer its `header_read_timeout` needs.
//!
//! # Reading without `unsafe`
//!
//! hyper hands reads a cursor over possibly uninitialised memory; filling it directly
//! needs `unsafe`. Instead each read goes into a per-thread scratch buffer, borrowed only
//! for the duration of one `poll_read`, and is copied with the safe
//! `ReadBufCursor::put_slice`. glommio's reads are readiness-based (poll, then `recv`), so
//! the kernel never holds on to the buffer and one buffer serves every connection of the
//! shard: no per-connection memory, one small copy per read (request heads and bodies of
//! at most a few KiB).
//!
//! # A `Send` sleep without `unsafe`
//!
//! `hyper::rt::Sleep` must be `Send + Sync`; glommio's `Timer` is neither (it holds an
//! `Rc`). [`HyperSleep`] holds only its deadline and a key; the glommio `Timer` it waits
//! on lives in a per-thread table under that key, created at the first poll and dropped
//! with the sleep. The connection future that owns the sleep is not `Send` (its stream is
//! glommio's), so the sleep is polled and dropped on the thread that armed it.

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use futures_lite::{AsyncRead, AsyncWrite};

/// Bytes read from the socket at most per `poll_read`: what hyper's read buffer starts
/// with, and more than any request this API accepts.
const SCRATCH_LEN: usize = 8 << 10;

/// Bytes read at most per `poll_read` should the scratch buffer be busy (it cannot be:
/// nothing inside a read polls another read on the same thread).
const FALLBACK_LEN: usize = 512;

thread_local! {
    /// The shard's read buffer, borrowed only inside one `poll_read`.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_LEN]);

    /// The glommio timers of this thread's armed [`HyperSleep`]s, by key. Borrowed only
    /// inside one poll or drop, never across an `.await`.
    static TIMERS: RefCell<AHashMap<u64, glommio::timer::Timer>> =
        RefCell::new(AHashMap::new());

    /// The last [`HyperSleep`] key handed out on this thread.
    static LAST_KEY: Cell<u64> = const { Cell::new(0) };
}

/// A futures-io stream as hyper's I/O (`hyper::rt::Read` + `hyper::rt::Write`).
///
/// Read errors are passed on (not swallowed, unlike glommio's upstream example).
#[derive(Debug)]
pub struct HyperIo<T>(pub T);

impl<T: AsyncRead + Unpin> HyperIo<T> {
    /// Reads at most `want` bytes into `scratch`, then copies them into `buf`.
    fn read_via(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut [u8],
        buf: &mut hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let want = buf.remaining().min(scratch.len());
        match Pin::new(&mut self.0).poll_read(cx, &mut scratch[..want]) {
            Poll::Ready(Ok(n)) => {
                // `n <= want <= buf.remaining()`: `put_slice` cannot panic.
                buf.put_slice(&scratch[..n.min(want)]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> hyper::rt::Read for HyperIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let shared = SCRATCH.try_with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => Some(this.read_via(cx, &mut scratch, &mut buf)),
            Err(_) => None,
        });
        match shared {
            Ok(Some(done)) => done,
            // Thread teardown or a busy scratch buffer: read through the stack.
            _ => this.read_via(cx, &mut [0; FALLBACK_LEN], &mut buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> hyper::rt::Write for HyperIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_close(cx)
    }
}

/// hyper's timer on glommio's timers. Its sleeps must be polled on a glommio executor
/// thread, which is where hyper polls them when it serves a glommio stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct HyperTimer;

impl hyper::rt::Timer for HyperTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HyperSleep::new(Instant::now().checked_add(duration)))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HyperSleep::new(Some(deadline)))
    }
}

/// A sleep until a deadline, `Send + Sync` because it holds no glommio state itself.
#[derive(Debug)]
pub struct HyperSleep {
    /// `None`: too far to represent; never fires.
    deadline: Option<Instant>,
    /// The key of this sleep's timer in [`TIMERS`], once armed.
    key: Option<u64>,
}

impl HyperSleep {
    fn new(deadline: Option<Instant>) -> Self {
        Self {
            deadline,
            key: None,
        }
    }

    /// Drops this sleep's timer, if armed.
    fn disarm(&mut self) {
        if let Some(key) = self.key.take() {
            let timer = TIMERS
                .try_with(|t| t.try_borrow_mut().ok().and_then(|mut t| t.remove(&key)))
                .ok()
                .flatten();
            // Dropped outside the table's borrow.
            drop(timer);
        }
    }
}

impl std::future::Future for HyperSleep {
    type Output = ();

    /// # Panics
    /// When first polled before its deadline outside a glommio executor thread.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(deadline) = this.deadline else {
            return Poll::Pending;
        };
        let now = Instant::now();
        if now >= deadline {
            this.disarm();
            return Poll::Ready(());
        }
        let key = *this.key.get_or_insert_with(|| {
            LAST_KEY.with(|k| {
                k.set(k.get() + 1);
                k.get()
            })
        });
        let fired = TIMERS.with(|timers| {
            let mut timers = timers.borrow_mut();
            let timer = timers
                .entry(key)
                .or_insert_with(|| glommio::timer::Timer::new(deadline - now));
            Pin::new(timer).poll(cx).is_ready()
        });
        if fired {
            this.disarm();
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl hyper::rt::Sleep for HyperSleep {}

impl Drop for HyperSleep {
    fn drop(&mut self) {
        self.disarm();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::testing::run_local;
    use hyper::rt::Timer as _;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn sleeps_are_send_and_sync() {
        assert_send_sync::<HyperSleep>();
    }

    fn armed() -> usize {
        TIMERS.with(|t| t.borrow().len())
    }

    #[test]
    fn a_sleep_fires_after_its_duration_and_leaves_no_timer_behind() {
        run_local(|| async {
            let start = Instant::now();
            HyperTimer.sleep(Duration::from_millis(30)).await;
            assert!(start.elapsed() >= Duration::from_millis(30));
            assert_eq!(armed(), 0);
            // A deadline already passed is ready at once.
            HyperTimer
                .sleep_until(Instant::now() - Duration::from_millis(1))
                .await;
            assert_eq!(armed(), 0);
        });
    }

    #[test]
    fn a_dropped_sleep_releases_its_timer() {
        run_local(|| async {
            let mut sleep = HyperTimer.sleep(Duration::from_secs(60));
            let polled = futures_lite::future::poll_once(&mut sleep).await;
            assert!(polled.is_none());
            assert_eq!(armed(), 1);
            drop(sleep);
            assert_eq!(armed(), 0);
        });
    }

    #[test]
    fn reset_moves_the_deadline() {
        run_local(|| async {
            let mut sleep = HyperTimer.sleep(Duration::from_secs(60));
            assert!(futures_lite::future::poll_once(&mut sleep).await.is_none());
            let start = Instant::now();
            HyperTimer.reset(&mut sleep, Instant::now() + Duration::from_millis(20));
            sleep.await;
            assert!(start.elapsed() < Duration::from_secs(10));
            assert_eq!(armed(), 0);
        });
    }

    #[test]
    fn reads_pass_bytes_and_errors_through() {
        use hyper::rt::Read as _;
        run_local(|| async {
            let mut io = HyperIo(futures_lite::io::Cursor::new(b"hello".to_vec()));
            let mut storage = [std::mem::MaybeUninit::<u8>::uninit(); 3];
            let mut buf = hyper::rt::ReadBuf::uninit(&mut storage);
            std::future::poll_fn(|cx| Pin::new(&mut io).poll_read(cx, buf.unfilled()))
                .await
                .expect("read");
            assert_eq!(buf.filled(), b"hel");

            struct Failing;
            impl AsyncRead for Failing {
                fn poll_read(
                    self: Pin<&mut Self>,
                    _: &mut Context<'_>,
                    _: &mut [u8],
                ) -> Poll<io::Result<usize>> {
                    Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionReset)))
                }
            }
            let mut io = HyperIo(Failing);
            let mut storage = [std::mem::MaybeUninit::<u8>::uninit(); 8];
            let mut buf = hyper::rt::ReadBuf::uninit(&mut storage);
            let err = std::future::poll_fn(|cx| Pin::new(&mut io).poll_read(cx, buf.unfilled()))
                .await
                .expect_err("passed on");
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        });
    }
}
