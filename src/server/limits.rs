//! What keeps a shard's listeners from taking every descriptor or spinning: a per-shard
//! share of the HTTP connection limit (the device limit is the whole server's, see
//! [`slots`](super::slots)), a warning at most every few seconds, and a growing pause
//! after failed accepts.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How often a repeated warning may be logged.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// The first pause after a failed accept.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause after failed accepts in a row.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// This shard's share of a limit for the whole server: `total / shards`, rounded up, at
/// least 1.
pub(crate) fn share(total: usize, shards: usize) -> usize {
    total.div_ceil(shards.max(1)).max(1)
}

/// Lets a warning through at most once per [`WARN_EVERY`], counting the ones held back.
#[derive(Default)]
pub(crate) struct Throttle {
    last: Cell<Option<Instant>>,
    held_back: Cell<u64>,
}

impl Throttle {
    /// `Some(n)` when a warning may be logged now, `n` being how many were held back
    /// since the last one; `None` when it must be held back.
    pub(crate) fn pass(&self) -> Option<u64> {
        let now = Instant::now();
        match self.last.get() {
            Some(at) if now.duration_since(at) < WARN_EVERY => {
                self.held_back.set(self.held_back.get() + 1);
                None
            }
            _ => {
                self.last.set(Some(now));
                Some(self.held_back.replace(0))
            }
        }
    }
}

/// The pause after a failed accept: doubling from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`]
/// while accepts keep failing (out of descriptors), back to the start after a success.
#[derive(Default)]
pub(crate) struct Backoff {
    next: Cell<Option<Duration>>,
}

impl Backoff {
    /// The pause to take now.
    pub(crate) fn failed(&self) -> Duration {
        let pause = self.next.get().unwrap_or(FIRST_BACKOFF);
        self.next.set(Some((pause * 2).min(MAX_BACKOFF)));
        pause
    }

    /// An accept succeeded.
    pub(crate) fn succeeded(&self) {
        self.next.set(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_round_up_and_are_never_zero() {
        assert_eq!(share(10, 2), 5);
        assert_eq!(share(11, 2), 6);
        assert_eq!(share(1, 4), 1);
        assert_eq!(share(0, 4), 1);
        assert_eq!(share(7, 0), 7);
    }

    #[test]
    fn a_throttle_passes_once_then_counts_what_it_holds_back() {
        let t = Throttle::default();
        assert_eq!(t.pass(), Some(0));
        assert_eq!(t.pass(), None);
        assert_eq!(t.pass(), None);
        t.last.set(Instant::now().checked_sub(WARN_EVERY));
        assert_eq!(t.pass(), Some(2));
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let b = Backoff::default();
        assert_eq!(b.failed(), FIRST_BACKOFF);
        assert_eq!(b.failed(), FIRST_BACKOFF * 2);
        for _ in 0..20 {
            b.failed();
        }
        assert_eq!(b.failed(), MAX_BACKOFF);
        b.succeeded();
        assert_eq!(b.failed(), FIRST_BACKOFF);
    }
}
