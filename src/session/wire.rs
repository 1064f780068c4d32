//! Reading and writing frames with deadlines, through a per-thread scratch buffer so a
//! session's future holds no read buffer of its own.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{SessionClock, SessionEnd, Waiting};
use crate::protocol::codec::FRAME_HEADER_LEN;
use crate::protocol::{MAX_FRAME_BODY, Message, decode_message};

/// The most bytes a session keeps unconsumed: one frame of the largest size. More while
/// idle is a device flooding the server; during an answer it cannot happen (a frame is
/// decoded as soon as it is whole, and reads never ask for more than this allows).
pub(super) const MAX_PENDING: usize = FRAME_HEADER_LEN + MAX_FRAME_BODY;

/// The per-thread read buffer: as large as the largest frame can need at once, shared by
/// every session of the thread because it is borrowed only inside one `poll`.
const SCRATCH_LEN: usize = 64 << 10;

/// The stack buffer used in the unlikely case the scratch buffer is already borrowed
/// (a stream whose `poll_read` polls another session's read on the same thread).
const FALLBACK_LEN: usize = 512;

/// An emptied buffer keeping more capacity than this gives it back: an idle session
/// should not hold on to the memory of one large answer.
const KEEP_CAPACITY: usize = 64;

thread_local! {
    /// See [`SCRATCH_LEN`]. Borrowed only inside [`poll_read_into`], never across
    /// `.await`.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_LEN]);
}

/// Polls one read from `io`, appending what arrived to `buf`.
///
/// # Returns
/// How many bytes were appended; `0` at the end of the stream. Reads ask for at most
/// what keeps `buf` within one byte over [`MAX_PENDING`].
pub(super) fn poll_read_into<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let room = (MAX_PENDING + 1).saturating_sub(buf.len()).max(1);
    let via_scratch = SCRATCH
        .try_with(|cell| {
            cell.try_borrow_mut().ok().map(|mut scratch| {
                let len = room.min(scratch.len());
                read_via(io, buf, cx, &mut scratch[..len])
            })
        })
        .ok()
        .flatten();
    match via_scratch {
        Some(polled) => polled,
        None => {
            let mut small = [0u8; FALLBACK_LEN];
            read_via(io, buf, cx, &mut small[..room.min(FALLBACK_LEN)])
        }
    }
}

fn read_via<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
    cx: &mut Context<'_>,
    scratch: &mut [u8],
) -> Poll<io::Result<usize>> {
    loop {
        match Pin::new(&mut *io).poll_read(cx, scratch) {
            Poll::Ready(Ok(n)) => {
                // A stream claiming more than it was given is not trusted past the slice.
                let n = n.min(scratch.len());
                buf.extend_from_slice(&scratch[..n]);
                return Poll::Ready(Ok(n));
            }
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// The instant `after` from now; an absurdly long duration (which `Instant` cannot
/// represent) is clamped to about a century, never a panic.
pub(super) fn deadline_after<C: SessionClock>(clock: &C, after: Duration) -> Instant {
    let now = clock.now();
    now.checked_add(after)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// What [`deadline_after`] clamps to.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A session's timer, moved lazily.
///
/// A session waits on a new deadline for every exchange (the ACK's, then the next
/// PING's), and a timer per deadline costs an insertion into and a removal from the
/// reactor's timer tree per delivery. The alarm keeps one sleep: a later deadline leaves
/// it where it is (it rings early, finds the deadline not reached and moves on), only an
/// earlier one re-arms it. Under steady traffic a session re-arms about once per
/// `exchange_timeout` instead of twice per delivery. A sleep is made only when a wait
/// does not complete at once.
///
/// The sleep is polled (which registers the task's waker with the reactor) once after it
/// is armed; glommio re-files a timer in its tree at every poll, so later polls only read
/// the clock, and poll the sleep again once its time has come. This relies on the alarm
/// being polled from one task, whose waker stays the same: a session's alarm lives in
/// its task.
pub(super) struct Alarm<S> {
    sleep: Option<S>,
    /// When `sleep` rings.
    at: Instant,
    /// Whether `sleep` has been polled since it was armed: the task is woken when it rings.
    registered: bool,
}

impl<S: Future<Output = ()> + Unpin> Alarm<S> {
    /// An alarm with nothing armed.
    pub(super) fn new() -> Self {
        Alarm {
            sleep: None,
            at: Instant::now(),
            registered: false,
        }
    }

    /// Ready once `clock` reads `deadline`; until then the caller is woken no later than
    /// at `deadline`.
    pub(super) fn poll_until<C: SessionClock<Sleep = S>>(
        &mut self,
        clock: &C,
        deadline: Instant,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        loop {
            match &mut self.sleep {
                // Armed no later than the deadline: nothing to do until it rings.
                Some(sleep) if self.at <= deadline => {
                    // Registered, and its time not come: it will wake the task.
                    if self.registered && clock.now() < self.at {
                        return Poll::Pending;
                    }
                    if Pin::new(sleep).poll(cx).is_pending() {
                        self.registered = true;
                        return Poll::Pending;
                    }
                    self.sleep = None;
                }
                _ => {}
            }
            if clock.now() >= deadline {
                return Poll::Ready(());
            }
            self.sleep = Some(clock.sleep_until(deadline));
            self.at = deadline;
            self.registered = false;
        }
    }
}

/// Reads more bytes into `buf` before `deadline`.
///
/// # Errors
/// [`SessionEnd::Eof`] at the end of the stream, a timeout waiting for `waiting`, or an
/// I/O error.
pub(super) async fn read_more<S: AsyncRead + Unpin, C: SessionClock>(
    io: &mut S,
    buf: &mut Vec<u8>,
    alarm: &mut Alarm<C::Sleep>,
    clock: &C,
    deadline: Instant,
    waiting: Waiting,
) -> Result<(), SessionEnd> {
    poll_fn(|cx| match poll_read_into(io, buf, cx) {
        Poll::Ready(Ok(0)) => Poll::Ready(Err(SessionEnd::Eof)),
        Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
        Poll::Pending => alarm
            .poll_until(clock, deadline, cx)
            .map(|()| Err(SessionEnd::Timeout(waiting))),
    })
    .await
}

/// Reads the next message before `deadline`: from what `buf` already holds, else from
/// `io`. The message's frame is consumed from `buf`; bytes past it stay.
///
/// # Errors
/// As [`read_more`], plus a malformed frame.
pub(super) async fn read_message<S: AsyncRead + Unpin, C: SessionClock>(
    io: &mut S,
    buf: &mut Vec<u8>,
    alarm: &mut Alarm<C::Sleep>,
    clock: &C,
    deadline: Instant,
    waiting: Waiting,
) -> Result<Message<'static>, SessionEnd> {
    loop {
        // The decoding result is gone before the read awaits: a match scrutinee held
        // across `.await` would sit in every session's future.
        match decode_message(buf, MAX_FRAME_BODY) {
            Ok((msg, used)) => {
                consume(buf, used);
                return Ok(msg);
            }
            Err(e) if e.is_incomplete() => {}
            Err(e) => return Err(e.into()),
        }
        read_more(io, buf, alarm, clock, deadline, waiting).await?;
    }
}

/// Drops the first `used` bytes of `buf`, giving back a large allocation once empty.
pub(super) fn consume(buf: &mut Vec<u8>, used: usize) {
    buf.drain(..used.min(buf.len()));
    if buf.is_empty() && buf.capacity() > KEEP_CAPACITY {
        *buf = Vec::new();
    }
}

/// Writes `frame` and flushes, within `timeout`.
///
/// # Errors
/// `"write timeout"` when the device does not take the bytes in time, or an I/O error.
pub(super) async fn write_frame<S: AsyncWrite + Unpin, C: SessionClock>(
    io: &mut S,
    frame: &[u8],
    alarm: &mut Alarm<C::Sleep>,
    clock: &C,
    timeout: Duration,
) -> Result<(), SessionEnd> {
    let mut write = pin!(async {
        io.write_all(frame).await?;
        io.flush().await
    });
    // Most writes complete at once: the deadline (a clock read) only when one does not.
    let mut deadline = None;
    poll_fn(|cx| {
        if let Poll::Ready(written) = write.as_mut().poll(cx) {
            return Poll::Ready(written.map_err(SessionEnd::from));
        }
        let deadline = *deadline.get_or_insert_with(|| deadline_after(clock, timeout));
        alarm
            .poll_until(clock, deadline, cx)
            .map(|()| Err(SessionEnd::Timeout(Waiting::Write)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::task::Waker;

    use super::*;

    /// A clock read from a cell, whose sleeps count how often they are polled.
    struct CountingClock {
        now: Rc<Cell<Instant>>,
        polls: Rc<Cell<u32>>,
    }

    struct CountingSleep {
        now: Rc<Cell<Instant>>,
        at: Instant,
        polls: Rc<Cell<u32>>,
    }

    impl Future for CountingSleep {
        type Output = ();

        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.polls.set(self.polls.get() + 1);
            if self.now.get() >= self.at {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    impl SessionClock for CountingClock {
        type Sleep = CountingSleep;

        fn now(&self) -> Instant {
            self.now.get()
        }

        fn sleep_until(&self, deadline: Instant) -> CountingSleep {
            CountingSleep {
                now: Rc::clone(&self.now),
                at: deadline,
                polls: Rc::clone(&self.polls),
            }
        }
    }

    #[test]
    fn an_armed_alarm_polls_its_sleep_once_until_its_time_comes() {
        let start = Instant::now();
        let clock = CountingClock {
            now: Rc::new(Cell::new(start)),
            polls: Rc::new(Cell::new(0)),
        };
        let mut cx = Context::from_waker(Waker::noop());
        let mut alarm = Alarm::new();
        let deadline = start + Duration::from_secs(5);
        for _ in 0..10 {
            assert!(alarm.poll_until(&clock, deadline, &mut cx).is_pending());
        }
        assert_eq!(
            clock.polls.get(),
            1,
            "the sleep is polled to register, then left"
        );
        // A later deadline leaves the sleep where it is.
        assert!(
            alarm
                .poll_until(&clock, deadline + Duration::from_secs(1), &mut cx)
                .is_pending()
        );
        assert_eq!(clock.polls.get(), 1);
        // Its time come, it is polled and rings.
        clock.now.set(deadline);
        assert!(alarm.poll_until(&clock, deadline, &mut cx).is_ready());
        assert_eq!(clock.polls.get(), 2);
    }
}
