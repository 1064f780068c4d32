//! A session's queue of exchanges: bounded, coalescing, never blocking the feeder.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::task::{Poll, Waker};

use super::ExchangeRef;

/// What a session gets from its queue.
#[derive(Debug, Clone)]
pub enum Next {
    /// An exchange to perform.
    Exchange(ExchangeRef),
    /// A newer registration of the same device took over (the original's `nil`
    /// exchange): the session ends without unregistering the newer one.
    Terminated,
}

impl Next {
    /// The exchange, if this is one.
    pub fn exchange(&self) -> Option<&ExchangeRef> {
        match self {
            Next::Exchange(e) => Some(e),
            Next::Terminated => None,
        }
    }
}

/// The exchanges fed to one session, waiting to be performed in order.
///
/// Feeding never blocks: exchanges are idempotent with respect to the store, so a new
/// exchange with the same [coalescing key](super::Exchange::coalesce_key) as a queued one
/// replaces it in place (the newer broadcast snapshot covers the older; a unicast exchange
/// reads the store when it is prepared). Only when the queue holds `capacity` exchanges
/// with other keys is the new one refused and handed back.
///
/// Shared by the registry (which feeds and terminates) and the session (which takes), both
/// on the session's shard.
pub struct ExchangeQueue {
    /// Exchanges in feeding order. Borrowed only inside a method, never across `.await`.
    items: RefCell<VecDeque<ExchangeRef>>,
    /// The most exchanges with distinct keys that may wait.
    capacity: usize,
    /// Set once a newer session of the same device registered.
    terminated: Cell<bool>,
    /// The session task waiting in [`ExchangeQueue::next`], woken by feed and terminate.
    waker: RefCell<Option<Waker>>,
}

impl fmt::Debug for ExchangeQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExchangeQueue")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .field("terminated", &self.terminated.get())
            .finish()
    }
}

impl ExchangeQueue {
    /// An empty queue holding at most `capacity` (at least 1) exchanges.
    pub fn new(capacity: usize) -> Self {
        Self {
            items: RefCell::new(VecDeque::new()),
            capacity: capacity.max(1),
            terminated: Cell::new(false),
            waker: RefCell::new(None),
        }
    }

    /// Queues `exchange`, replacing a queued one with the same coalescing key.
    ///
    /// # Errors
    /// Hands `exchange` back when the queue is full of exchanges with other keys.
    pub fn feed(&self, exchange: ExchangeRef) -> Result<(), ExchangeRef> {
        {
            let mut items = self.items.borrow_mut();
            let same = exchange.coalesce_key().and_then(|key| {
                items
                    .iter()
                    .position(|queued| queued.coalesce_key() == Some(key))
            });
            match same {
                Some(i) => items[i] = exchange,
                None if items.len() >= self.capacity => return Err(exchange),
                None => items.push_back(exchange),
            }
        }
        self.wake();
        Ok(())
    }

    /// Tells the session that a newer registration took over.
    pub fn terminate(&self) {
        self.terminated.set(true);
        self.wake();
    }

    /// Whether [`ExchangeQueue::terminate`] was called.
    pub fn is_terminated(&self) -> bool {
        self.terminated.get()
    }

    /// How many exchanges wait.
    pub fn len(&self) -> usize {
        self.items.borrow().len()
    }

    /// Whether no exchange waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the session should do next, without waiting: termination first, then the
    /// oldest exchange.
    pub fn try_next(&self) -> Option<Next> {
        if self.terminated.get() {
            return Some(Next::Terminated);
        }
        self.items.borrow_mut().pop_front().map(Next::Exchange)
    }

    /// Waits for what the session should do next.
    pub async fn next(&self) -> Next {
        poll_fn(|cx| match self.try_next() {
            Some(next) => Poll::Ready(next),
            None => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    fn wake(&self) {
        let waker = self.waker.borrow_mut().take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}
