//! A shard-local count that can be awaited down to zero: how shutdown waits for open HTTP
//! connections and running sessions without polling.

use std::cell::{Cell, RefCell};
use std::task::{Poll, Waker};

/// A count of live things on one shard, with waiters for it to reach zero. Borrowed only
/// inside a method, never across `.await`.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    n: Cell<usize>,
    /// Tasks waiting for zero.
    zero: RefCell<Vec<Waker>>,
}

impl Tally {
    /// One more.
    pub(crate) fn up(&self) {
        self.n.set(self.n.get() + 1);
    }

    /// One fewer; wakes the waiters at zero.
    pub(crate) fn down(&self) {
        let n = self.n.get().saturating_sub(1);
        self.n.set(n);
        if n == 0 {
            let waiting = std::mem::take(&mut *self.zero.borrow_mut());
            for waker in waiting {
                waker.wake();
            }
        }
    }

    /// How many now.
    pub(crate) fn get(&self) -> usize {
        self.n.get()
    }

    /// Resolves once the count is zero (at once if it is).
    pub(crate) async fn zero(&self) {
        std::future::poll_fn(|cx| {
            if self.n.get() == 0 {
                return Poll::Ready(());
            }
            let mut zero = self.zero.borrow_mut();
            if !zero.iter().any(|w| w.will_wake(cx.waker())) {
                zero.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;

    #[test]
    fn zero_resolves_when_the_last_one_goes() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let tally = Rc::new(Tally::default());
                tally.zero().await; // nothing live: at once
                tally.up();
                tally.up();
                let done = Rc::new(Cell::new(false));
                let waiter = glommio::spawn_local({
                    let (tally, done) = (Rc::clone(&tally), Rc::clone(&done));
                    async move {
                        tally.zero().await;
                        done.set(true);
                    }
                });
                glommio::executor().yield_task_queue_now().await;
                tally.down();
                glommio::executor().yield_task_queue_now().await;
                assert!(!done.get(), "one is still live");
                tally.down();
                waiter.await;
                assert!(done.get());
                assert_eq!(tally.get(), 0);
            })
            .expect("an executor")
            .join()
            .expect("the test ran");
    }
}
