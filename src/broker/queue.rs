//! A session's queue of exchanges: bounded, coalescing, never blocking the feeder.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

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
    /// Set while the session waits for the ACK of a message it wrote.
    awaiting_ack: Cell<bool>,
    /// Set once the session ended.
    ended: Cell<bool>,
    /// The older session of the device, when it was waiting for an ACK as this one took
    /// over: no exchange is handed out until it ended, so that an ACK already on its way
    /// on the older connection reaches the store before this session reads it.
    behind: Cell<Option<Rc<ExchangeQueue>>>,
    /// The session task waiting in [`ExchangeQueue::next`], woken by feed and terminate.
    waker: RefCell<Option<Waker>>,
    /// The registration id of the session it serves (0 when made outside a registry):
    /// kept here so the registry's table holds one pointer per device.
    session: u64,
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

/// The least room a session queue has: what feeding a new session queues (a broadcast
/// exchange for the system channel and a unicast exchange for the device's own channel),
/// so a small configured size never drops what is pending.
pub const MIN_SESSION_QUEUE: usize = 2;

impl ExchangeQueue {
    /// An empty queue holding at most `capacity` exchanges, and never fewer than
    /// [`MIN_SESSION_QUEUE`].
    pub fn new(capacity: usize) -> Self {
        Self::for_session(capacity, 0)
    }

    /// A queue for the session with registration id `session`.
    pub(crate) fn for_session(capacity: usize, session: u64) -> Self {
        Self {
            items: RefCell::new(VecDeque::new()),
            capacity: capacity.max(MIN_SESSION_QUEUE),
            terminated: Cell::new(false),
            awaiting_ack: Cell::new(false),
            ended: Cell::new(false),
            behind: Cell::new(None),
            waker: RefCell::new(None),
            session,
        }
    }

    /// The registration id of the session this queue serves.
    pub(crate) fn session(&self) -> u64 {
        self.session
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
                None => {
                    // Most sessions never hold more than one exchange at a time, and
                    // keep the queue's buffer while idle: room for one to begin with,
                    // not the four a first push reserves.
                    if items.capacity() == 0 {
                        items.reserve_exact(1);
                    }
                    items.push_back(exchange);
                }
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

    /// Marks the session as waiting (or no longer) for the ACK of a message it wrote.
    pub fn set_awaiting_ack(&self, awaiting: bool) {
        self.awaiting_ack.set(awaiting);
    }

    /// Whether the session waits for an ACK.
    pub fn is_awaiting_ack(&self) -> bool {
        self.awaiting_ack.get()
    }

    /// Holds back this (newer) session's exchanges until the `older` session of the
    /// same device has [ended](Self::end): the older one was waiting for an ACK, which
    /// it may still take in.
    pub(crate) fn wait_behind(&self, older: Rc<ExchangeQueue>) {
        self.behind.set(Some(older));
    }

    /// The older session this queue waits behind, taken out of it.
    pub(crate) fn take_behind(&self) -> Option<Rc<ExchangeQueue>> {
        self.behind.take()
    }

    /// Tells the queue its session ended; a newer session waiting
    /// [behind](Self::wait_behind) it must then be [woken](Self::wake).
    pub(crate) fn end(&self) {
        self.ended.set(true);
    }

    /// Whether an older session still holds this one's exchanges back.
    fn is_behind(&self) -> bool {
        match self.behind.take() {
            Some(older) if !older.ended.get() => {
                self.behind.set(Some(older));
                true
            }
            _ => false,
        }
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
    /// oldest exchange (none while an older session holds them back).
    pub fn try_next(&self) -> Option<Next> {
        if self.terminated.get() {
            return Some(Next::Terminated);
        }
        if self.is_behind() {
            return None;
        }
        self.items.borrow_mut().pop_front().map(Next::Exchange)
    }

    /// Ready once [`ExchangeQueue::terminate`] was called; until then the task is woken
    /// when it is (or when an exchange is fed: poll again). For a session in the middle
    /// of an exchange, so that a newer registration ends it at once.
    pub fn poll_terminated(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.terminated.get() {
            return Poll::Ready(());
        }
        let mut waker = self.waker.borrow_mut();
        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Waits for what the session should do next.
    pub async fn next(&self) -> Next {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// What the session should do next, or `Pending` with the task woken when there is
    /// something: [`ExchangeQueue::next`] as a poll, for a wait that keeps no future.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Next> {
        match self.try_next() {
            Some(next) => Poll::Ready(next),
            None => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Wakes the session's task waiting in [`ExchangeQueue::next`].
    pub(crate) fn wake(&self) {
        let waker = self.waker.borrow_mut().take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Duration;

    use futures_lite::future;

    use super::*;
    use crate::broker::testing::run_local;
    use crate::broker::{BroadcastExchange, ConnMeta, ConnMetaExchange, UnicastExchange};
    use crate::store::InternalChannelId;

    fn unicast(device: &str) -> ExchangeRef {
        Rc::new(UnicastExchange {
            chan_id: InternalChannelId::unicast(device, device),
            cached_ok: false,
        })
    }

    fn broadcast(top_level: i64) -> ExchangeRef {
        Rc::new(BroadcastExchange::new(
            InternalChannelId::System,
            top_level,
            Vec::new(),
        ))
    }

    fn warn(reason: &str) -> ExchangeRef {
        Rc::new(ConnMetaExchange {
            msg: ConnMeta::Warn(reason.to_owned()),
        })
    }

    /// Takes the next exchange, which must be there.
    fn take(q: &ExchangeQueue) -> ExchangeRef {
        match q.try_next() {
            Some(Next::Exchange(e)) => e,
            other => panic!("expected an exchange, got {other:?}"),
        }
    }

    fn same(a: &ExchangeRef, b: &ExchangeRef) -> bool {
        Rc::ptr_eq(a, b)
    }

    fn top_level(e: &ExchangeRef) -> i64 {
        e.as_any()
            .downcast_ref::<BroadcastExchange>()
            .map(|b| b.top_level)
            .unwrap_or_else(|| panic!("expected a broadcast exchange, got {e:?}"))
    }

    #[test]
    fn a_queue_behind_an_older_session_hands_out_nothing_until_it_ended() {
        let older = Rc::new(ExchangeQueue::new(10));
        let newer = ExchangeQueue::new(10);
        newer.wait_behind(Rc::clone(&older));
        let fed = unicast("d1");
        newer.feed(Rc::clone(&fed)).expect("room");
        assert!(newer.try_next().is_none(), "held back");
        assert_eq!(newer.len(), 1);
        // Termination is not held back.
        let terminated = ExchangeQueue::new(10);
        terminated.wait_behind(Rc::clone(&older));
        terminated.terminate();
        assert!(matches!(terminated.try_next(), Some(Next::Terminated)));
        older.end();
        assert!(same(&take(&newer), &fed));
    }

    #[test]
    fn exchanges_come_out_in_feeding_order() {
        let q = ExchangeQueue::new(10);
        assert!(q.is_empty());
        assert!(q.try_next().is_none());
        let fed = [unicast("d1"), broadcast(1), warn("w"), unicast("d2")];
        for e in &fed {
            q.feed(Rc::clone(e)).expect("room");
        }
        assert_eq!(q.len(), 4);
        assert!(!q.is_empty());
        for e in &fed {
            assert!(same(&take(&q), e));
        }
        assert!(q.is_empty());
        assert!(q.try_next().is_none());
        // Feeding after draining works again.
        let later = unicast("d3");
        q.feed(Rc::clone(&later)).expect("room");
        assert!(same(&take(&q), &later));
    }

    #[test]
    fn terminate_wins_over_queued_exchanges() {
        let q = ExchangeQueue::new(10);
        q.feed(unicast("d1")).expect("room");
        q.feed(broadcast(1)).expect("room");
        assert!(!q.is_terminated());
        q.terminate();
        assert!(q.is_terminated());
        for _ in 0..3 {
            assert!(matches!(q.try_next(), Some(Next::Terminated)));
        }
        assert!(q.try_next().and_then(|n| n.exchange().cloned()).is_none());
        // Nothing was taken out of the queue by asking.
        assert_eq!(q.len(), 2);
        // An empty terminated queue says the same.
        let empty = ExchangeQueue::new(1);
        empty.terminate();
        assert!(matches!(empty.try_next(), Some(Next::Terminated)));
    }

    #[test]
    fn a_newer_exchange_of_the_same_channel_replaces_the_queued_one_in_place() {
        let q = ExchangeQueue::new(10);
        let first = unicast("d1");
        let old = broadcast(1);
        let last = unicast("d2");
        q.feed(Rc::clone(&first)).expect("room");
        q.feed(Rc::clone(&old)).expect("room");
        q.feed(Rc::clone(&last)).expect("room");
        assert_eq!(q.len(), 3);

        let new = broadcast(2);
        q.feed(Rc::clone(&new)).expect("coalesced");
        assert_eq!(q.len(), 3, "replaced, not added");
        assert!(same(&take(&q), &first));
        let middle = take(&q);
        assert!(
            same(&middle, &new),
            "the newer one keeps the older one's place"
        );
        assert_eq!(top_level(&middle), 2);
        assert!(same(&take(&q), &last));
        assert!(q.is_empty());

        // Unicast exchanges of one channel coalesce too; other channels do not.
        let a1 = unicast("d1");
        let b = unicast("d2");
        let a2 = unicast("d1");
        q.feed(Rc::clone(&a1)).expect("room");
        q.feed(Rc::clone(&b)).expect("room");
        q.feed(Rc::clone(&a2)).expect("coalesced");
        assert_eq!(q.len(), 2);
        assert!(same(&take(&q), &a2));
        assert!(same(&take(&q), &b));
    }

    #[test]
    fn broadcasts_of_different_channels_do_not_coalesce() {
        let q = ExchangeQueue::new(10);
        let other =
            InternalChannelId::from_hex("0123456789abcdef0123456789abcdef").expect("hex id");
        let sys = broadcast(1);
        let b: ExchangeRef = Rc::new(BroadcastExchange::new(other, 1, Vec::new()));
        q.feed(Rc::clone(&sys)).expect("room");
        q.feed(Rc::clone(&b)).expect("room");
        assert_eq!(q.len(), 2);
        assert!(same(&take(&q), &sys));
        assert!(same(&take(&q), &b));
    }

    #[test]
    fn a_full_queue_hands_a_new_key_back_but_still_coalesces() {
        let q = ExchangeQueue::new(2);
        let d1 = unicast("d1");
        let d2 = unicast("d2");
        q.feed(Rc::clone(&d1)).expect("room");
        q.feed(Rc::clone(&d2)).expect("room");
        let d3 = unicast("d3");
        let refused = q.feed(Rc::clone(&d3)).expect_err("full");
        assert!(same(&refused, &d3), "the refused exchange is handed back");
        let refused = q.feed(warn("w")).expect_err("full, even without a key");
        assert!(refused.coalesce_key().is_none());
        assert_eq!(q.len(), 2);

        // An exchange with a queued key still gets in: it takes the older one's place.
        let d2_new = unicast("d2");
        q.feed(Rc::clone(&d2_new))
            .expect("coalesced into a full queue");
        assert_eq!(q.len(), 2);
        assert!(same(&take(&q), &d1));
        assert!(same(&take(&q), &d2_new));

        // Room again once taken.
        q.feed(Rc::clone(&d3)).expect("room");
        assert!(same(&take(&q), &d3));
    }

    #[test]
    fn capacity_holds_at_least_what_feeding_pending_queues() {
        for configured in [0, 1] {
            let q = ExchangeQueue::new(configured);
            let e = unicast("d1");
            let b = broadcast(1);
            q.feed(Rc::clone(&b))
                .expect("room for the pending broadcast");
            q.feed(Rc::clone(&e)).expect("room for the pending unicast");
            assert!(q.feed(unicast("d2")).is_err());
            assert!(same(&take(&q), &b));
            assert!(same(&take(&q), &e));
        }
    }

    #[test]
    fn conn_meta_exchanges_are_never_coalesced() {
        let q = ExchangeQueue::new(10);
        let w1 = warn("one");
        let w2 = warn("one");
        let broken: ExchangeRef = Rc::new(ConnMetaExchange {
            msg: ConnMeta::Broken("host-mismatch".to_owned()),
        });
        q.feed(Rc::clone(&w1)).expect("room");
        q.feed(Rc::clone(&w2)).expect("room");
        q.feed(Rc::clone(&broken)).expect("room");
        assert_eq!(q.len(), 3);
        assert!(same(&take(&q), &w1));
        assert!(same(&take(&q), &w2));
        assert!(same(&take(&q), &broken));
    }

    #[test]
    fn debug_shows_length_capacity_and_termination() {
        let q = ExchangeQueue::new(3);
        q.feed(unicast("d1")).expect("room");
        q.terminate();
        assert_eq!(
            format!("{q:?}"),
            "ExchangeQueue { len: 1, capacity: 3, terminated: true }"
        );
    }

    const PATIENCE: Duration = Duration::from_secs(5);

    /// Yields until `cond` holds, at most a bounded number of times.
    async fn yield_until(cond: impl Fn() -> bool) -> bool {
        for _ in 0..1_000 {
            if cond() {
                return true;
            }
            future::yield_now().await;
        }
        cond()
    }

    /// Awaits `task`, up to [`PATIENCE`].
    async fn within_patience<T>(task: impl Future<Output = T>) -> Option<T> {
        future::or(async { Some(task.await) }, async {
            glommio::timer::sleep(PATIENCE).await;
            None
        })
        .await
    }

    #[test]
    fn a_first_exchange_takes_room_for_one() {
        run_local(|| async {
            let q = ExchangeQueue::new(10);
            assert_eq!(q.items.borrow().capacity(), 0);
            q.feed(unicast("d1")).expect("room");
            assert_eq!(q.items.borrow().capacity(), 1, "room for the one exchange");
            q.feed(unicast("d2")).expect("room");
            assert_eq!(q.items.borrow().len(), 2, "and it grows past one");
        });
    }

    #[test]
    fn next_returns_at_once_when_something_waits() {
        run_local(|| async {
            let q = ExchangeQueue::new(10);
            let e = unicast("d1");
            q.feed(Rc::clone(&e)).expect("room");
            let next = within_patience(q.next()).await.expect("no wait");
            assert!(next.exchange().is_some_and(|got| same(got, &e)));
            assert!(
                q.waker.borrow().is_none(),
                "no waker kept when nothing waited"
            );
        });
    }

    #[test]
    fn next_wakes_when_fed_from_another_task() {
        run_local(|| async {
            let q = Rc::new(ExchangeQueue::new(10));
            let started = Rc::new(Cell::new(false));
            let waiter = {
                let q = Rc::clone(&q);
                let started = Rc::clone(&started);
                glommio::spawn_local(async move {
                    started.set(true);
                    q.next().await
                })
            };
            // Let the waiter block on the empty queue.
            assert!(yield_until(|| started.get() && q.waker.borrow().is_some()).await);
            let e = unicast("d1");
            let feeder = {
                let q = Rc::clone(&q);
                let e = Rc::clone(&e);
                glommio::spawn_local(async move { q.feed(e).is_ok() })
            };
            assert!(feeder.await);
            let next = within_patience(waiter).await.expect("the waiter was woken");
            assert!(next.exchange().is_some_and(|got| same(got, &e)));
            assert!(q.is_empty());
        });
    }

    #[test]
    fn next_wakes_on_terminate_from_another_task() {
        run_local(|| async {
            let q = Rc::new(ExchangeQueue::new(10));
            let waiter = {
                let q = Rc::clone(&q);
                glommio::spawn_local(async move { q.next().await })
            };
            assert!(yield_until(|| q.waker.borrow().is_some()).await);
            let terminator = {
                let q = Rc::clone(&q);
                glommio::spawn_local(async move { q.terminate() })
            };
            terminator.await;
            let next = within_patience(waiter).await.expect("the waiter was woken");
            assert!(matches!(next, Next::Terminated));
        });
    }

    #[test]
    fn next_waits_again_after_each_exchange() {
        run_local(|| async {
            let q = Rc::new(ExchangeQueue::new(10));
            let taken = Rc::new(Cell::new(0usize));
            let consumer = {
                let q = Rc::clone(&q);
                let taken = Rc::clone(&taken);
                glommio::spawn_local(async move {
                    let mut got = Vec::new();
                    loop {
                        match q.next().await {
                            Next::Exchange(e) => {
                                got.push(e);
                                taken.set(got.len());
                            }
                            Next::Terminated => return got,
                        }
                    }
                })
            };
            let fed: Vec<ExchangeRef> = (0..3).map(|i| unicast(&format!("d{i}"))).collect();
            for (i, e) in fed.iter().enumerate() {
                assert!(
                    yield_until(|| q.waker.borrow().is_some()).await,
                    "waiting before {i}"
                );
                q.feed(Rc::clone(e)).expect("room");
                assert!(yield_until(|| taken.get() == i + 1).await, "took {i}");
            }
            assert!(yield_until(|| q.waker.borrow().is_some()).await);
            q.terminate();
            let got = within_patience(consumer).await.expect("the consumer ended");
            assert_eq!(got.len(), 3);
            for (g, e) in got.iter().zip(&fed) {
                assert!(same(g, e));
            }
        });
    }
}
