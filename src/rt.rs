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
//! `Rc`). [`HyperSleep`] holds only its deadline and a key; its waker lives in a
//! per-thread table under that key, entered at the first poll and removed with the
//! sleep, and one task per thread wakes the sleeps that are due on a single glommio
//! timer. The connection future that owns the sleep is not `Send` (its stream is
//! glommio's), so the sleep is polled and dropped on the thread that armed it.

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
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

    /// This thread's armed [`HyperSleep`]s. Borrowed only inside one poll or drop, never
    /// across an `.await`.
    static SLEEPS: RefCell<Sleeps> = RefCell::new(Sleeps::default());
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
    /// The key of this sleep in [`SLEEPS`], once armed.
    key: Option<u64>,
}

impl HyperSleep {
    fn new(deadline: Option<Instant>) -> Self {
        Self {
            deadline,
            key: None,
        }
    }

    /// Takes this sleep out of the thread's table, if armed.
    fn disarm(&mut self) {
        if let Some(key) = self.key.take() {
            let entry = SLEEPS
                .try_with(|s| {
                    s.try_borrow_mut()
                        .ok()
                        .and_then(|mut s| s.armed.remove(&key))
                })
                .ok()
                .flatten();
            // Its waker is dropped outside the table's borrow.
            drop(entry);
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
        if Instant::now() >= deadline {
            this.disarm();
            return Poll::Ready(());
        }
        let spawn = SLEEPS.with(|s| {
            let mut s = s.borrow_mut();
            let key = *this.key.get_or_insert_with(|| {
                s.last_key += 1;
                s.last_key
            });
            match s.armed.entry(key) {
                Entry::Occupied(mut e) => {
                    if !e.get().1.will_wake(cx.waker()) {
                        e.get_mut().1 = cx.waker().clone();
                    }
                }
                Entry::Vacant(e) => {
                    e.insert((deadline, cx.waker().clone()));
                }
            }
            s.watch(deadline)
        });
        if spawn {
            glommio::spawn_local(drive()).detach();
        }
        Poll::Pending
    }
}

/// A thread's armed [`HyperSleep`]s, and the task that wakes them.
///
/// hyper arms a sleep for every request head it waits for (`header_read_timeout`) and
/// drops it once the head came, almost always long before its deadline. A reactor timer
/// per sleep would cost an insertion into and a removal from glommio's timer tree, and
/// two allocations, per request. Here a sleep is an entry in a table, and one task per
/// thread keeps a single glommio timer set for the earliest deadline it saw: a later
/// sleep leaves the timer where it is, a dropped one leaves it to ring early, find
/// nothing due and move on. Under steady requests the timer moves about once per
/// timeout, whatever the request rate.
#[derive(Default)]
struct Sleeps {
    /// Armed sleeps by key: deadline, and the waker of the task that polled it last.
    armed: AHashMap<u64, (Instant, Waker)>,
    /// The last key handed out.
    last_key: u64,
    /// The task waking the sleeps, if one runs.
    driver: Option<Driver>,
    /// Glommio timers the drivers made (a count for tests).
    timers_made: u64,
}

/// What the table knows of its driver task.
struct Driver {
    /// The executor it runs on (a thread may run executors one after another).
    executor: usize,
    /// The deadline its timer is set for; `None` until it first ran.
    target: Option<Instant>,
    /// Its waker, to make it look again when an earlier sleep is armed.
    waker: Option<Waker>,
}

impl Sleeps {
    /// Makes sure a driver will wake the sleep due at `deadline`: wakes it when its timer
    /// is set for later. Returns whether a driver must be spawned.
    fn watch(&mut self, deadline: Instant) -> bool {
        let executor = glommio::executor().id();
        match &mut self.driver {
            Some(d) if d.executor == executor => {
                if d.target.is_none_or(|t| deadline < t)
                    && let Some(w) = d.waker.take()
                {
                    w.wake();
                }
                false
            }
            _ => {
                self.driver = Some(Driver {
                    executor,
                    target: None,
                    waker: None,
                });
                true
            }
        }
    }

    /// Wakes and removes the sleeps due by `now`; returns the earliest deadline left.
    fn fire(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        self.armed.retain(|_, (deadline, waker)| {
            if *deadline <= now {
                waker.wake_by_ref();
                false
            } else {
                next = Some(next.map_or(*deadline, |n| n.min(*deadline)));
                true
            }
        });
        next
    }
}

/// The driver task of a thread's sleeps: wakes each sleep when its deadline passes, and
/// ends when none is armed.
async fn drive() {
    let mut timer: Option<(Instant, glommio::timer::Timer)> = None;
    std::future::poll_fn(|cx| {
        loop {
            let now = Instant::now();
            let next = SLEEPS.with(|s| {
                let mut s = s.borrow_mut();
                let next = s.fire(now);
                let made = match (&mut s.driver, next) {
                    (Some(d), Some(next)) => {
                        d.target = Some(next);
                        d.waker = Some(cx.waker().clone());
                        timer.as_ref().is_none_or(|(at, _)| *at != next)
                    }
                    (driver, _) => {
                        *driver = None;
                        false
                    }
                };
                if made {
                    s.timers_made += 1;
                }
                next.map(|n| (n, made))
            });
            let Some((next, made)) = next else {
                return Poll::Ready(());
            };
            if made {
                let wait = next.saturating_duration_since(now);
                timer = Some((next, glommio::timer::Timer::new(wait)));
            }
            let rung = match &mut timer {
                Some((_, t)) => Pin::new(t).poll(cx).is_ready(),
                None => true,
            };
            if !rung {
                return Poll::Pending;
            }
            // Rung: fire what is due and set the timer for what is left.
            timer = None;
        }
    })
    .await;
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
        SLEEPS.with(|s| s.borrow().armed.len())
    }

    fn timers_made() -> u64 {
        SLEEPS.with(|s| s.borrow().timers_made)
    }

    /// Lets the driver task run.
    async fn settle() {
        for _ in 0..8 {
            futures_lite::future::yield_now().await;
        }
    }

    #[test]
    fn sleeps_armed_and_dropped_one_after_another_share_one_timer() {
        run_local(|| async {
            let made = timers_made();
            for _ in 0..100 {
                // What hyper does per request: a sleep for the next head, polled while
                // the head is awaited, dropped once it came.
                let mut sleep = HyperTimer.sleep(Duration::from_secs(5));
                assert!(futures_lite::future::poll_once(&mut sleep).await.is_none());
                settle().await;
                drop(sleep);
            }
            assert_eq!(armed(), 0);
            assert_eq!(timers_made() - made, 1, "one timer, not one per sleep");
        });
    }

    #[test]
    fn an_earlier_sleep_armed_after_a_later_one_fires_on_time() {
        run_local(|| async {
            let mut later = HyperTimer.sleep(Duration::from_secs(60));
            assert!(futures_lite::future::poll_once(&mut later).await.is_none());
            settle().await;
            let start = Instant::now();
            HyperTimer.sleep(Duration::from_millis(20)).await;
            let took = start.elapsed();
            assert!(took >= Duration::from_millis(20), "{took:?}");
            assert!(took < Duration::from_secs(10), "{took:?}");
            assert_eq!(armed(), 1, "the later one is still armed");
            drop(later);
            assert_eq!(armed(), 0);
        });
    }

    #[test]
    fn sleeps_due_together_all_fire() {
        run_local(|| async {
            let at = Instant::now() + Duration::from_millis(20);
            let sleeps: Vec<_> = (0..10)
                .map(|_| glommio::spawn_local(HyperTimer.sleep_until(at)))
                .collect();
            for s in sleeps {
                s.await;
            }
            assert!(Instant::now() >= at);
            assert_eq!(armed(), 0);
        });
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
