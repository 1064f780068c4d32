//! Test implementations of the broker's interfaces, and helpers to drive exchanges and
//! executors in tests and benchmarks (the original's `broker/testing`).

use std::fmt;
use std::future::Future;
use std::io;
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use super::{
    BrokerConfig, BrokerError, BrokerSession, Exchange, ExchangeQueue, ExchangeRef,
    ExchangesScratchArea, LevelsMap, Prepared,
};
use crate::protocol::{Notification, Payload};
use crate::store::{
    InMemoryPendingStore, InternalChannelId, Metadata, PendingStore, ScrubCriteria, StoreError,
};

/// A [`BrokerConfig`] with plain fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestBrokerConfig {
    /// See [`BrokerConfig::session_queue_size`].
    pub session_queue_size: usize,
    /// See [`BrokerConfig::broker_queue_size`].
    pub broker_queue_size: usize,
}

impl Default for TestBrokerConfig {
    /// The original suite's sizes: 10 exchanges per session, 5 requests in the broker.
    fn default() -> Self {
        Self {
            session_queue_size: 10,
            broker_queue_size: 5,
        }
    }
}

impl BrokerConfig for TestBrokerConfig {
    fn session_queue_size(&self) -> usize {
        self.session_queue_size
    }

    fn broker_queue_size(&self) -> usize {
        self.broker_queue_size
    }
}

/// The store access of a [`TestBrokerSession`].
pub type GetHook =
    Box<dyn Fn(&InternalChannelId, bool) -> Result<(i64, Vec<Notification>), BrokerError>>;
/// The drop access of a [`TestBrokerSession`].
pub type DropHook = Box<dyn Fn(&InternalChannelId, &[Notification]) -> Result<(), BrokerError>>;

/// A [`BrokerSession`] with plain fields and hooks for its store access.
pub struct TestBrokerSession {
    /// The device id.
    pub device_id: String,
    /// The device model.
    pub model: String,
    /// The device's image channel.
    pub image_channel: String,
    /// The channel levels.
    pub levels: LevelsMap,
    /// Where fed exchanges go.
    pub exchanges: ExchangeQueue,
    /// The scratch area.
    pub scratch: ExchangesScratchArea,
    /// Answers [`BrokerSession::get`].
    pub do_get: GetHook,
    /// Answers [`BrokerSession::drop_by_msg_id`].
    pub do_drop_by_msg_id: DropHook,
}

impl fmt::Debug for TestBrokerSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestBrokerSession")
            .field("device_id", &self.device_id)
            .field("model", &self.model)
            .field("image_channel", &self.image_channel)
            .field("levels", &self.levels)
            .finish_non_exhaustive()
    }
}

impl TestBrokerSession {
    /// A session of `device_id` with model and image channel `"?"`, no levels, whose
    /// store is `store`.
    pub fn new(device_id: &str, store: Rc<dyn PendingStore>) -> Self {
        let get_store = Rc::clone(&store);
        Self {
            device_id: device_id.to_owned(),
            model: "?".to_owned(),
            image_channel: "?".to_owned(),
            levels: LevelsMap::default(),
            exchanges: ExchangeQueue::new(10),
            scratch: ExchangesScratchArea::default(),
            do_get: Box::new(move |chan, _| Ok(get_store.get_channel_snapshot(chan)?)),
            do_drop_by_msg_id: Box::new(move |chan, targets| {
                Ok(store.drop_by_msg_id(chan, targets)?)
            }),
        }
    }
}

impl BrokerSession for TestBrokerSession {
    fn session_channel(&self) -> &ExchangeQueue {
        &self.exchanges
    }

    fn device_identifier(&self) -> &str {
        &self.device_id
    }

    fn device_image_model(&self) -> &str {
        &self.model
    }

    fn device_image_channel(&self) -> &str {
        &self.image_channel
    }

    fn levels(&self) -> &LevelsMap {
        &self.levels
    }

    fn levels_mut(&mut self) -> &mut LevelsMap {
        &mut self.levels
    }

    fn exchange_scratch_area(&mut self) -> &mut ExchangesScratchArea {
        &mut self.scratch
    }

    fn get(
        &self,
        chan: &InternalChannelId,
        cached_ok: bool,
    ) -> Result<(i64, Vec<Notification>), BrokerError> {
        (self.do_get)(chan, cached_ok)
    }

    fn drop_by_msg_id(
        &self,
        chan: &InternalChannelId,
        targets: &[Notification],
    ) -> Result<(), BrokerError> {
        (self.do_drop_by_msg_id)(chan, targets)
    }

    fn feed(&self, exchange: ExchangeRef) {
        // A test that overfills the queue sees the exchange missing from it.
        let _ = self.exchanges.feed(exchange);
    }

    fn internal_channel_id(&self) -> InternalChannelId {
        InternalChannelId::unicast(&self.device_id, &self.device_id)
    }
}

/// How an exchange went for a device that ACKs every part at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Performed {
    /// Nothing was sent.
    Nop,
    /// These frames were sent, each ACKed.
    Acked(Vec<Vec<u8>>),
    /// These frames were sent one way; `close_after` as prepared.
    OneWay {
        /// The frames.
        frames: Vec<Vec<u8>>,
        /// Whether the session would end.
        close_after: bool,
    },
}

/// Performs `exchange` on `sess` as a device that answers every part with ACK at once,
/// collecting the frames written.
///
/// # Errors
/// What `prepare` or `acked` returned.
pub fn perform_acking(
    exchange: &dyn Exchange,
    sess: &mut dyn BrokerSession,
) -> Result<Performed, BrokerError> {
    perform_with(exchange, sess, |_| true)
}

/// Performs `exchange` on `sess`, ACKing a part only while `ack(part_index)` says so; a
/// refused ACK ends the exchange as a session would end on a missing ACK.
///
/// # Errors
/// What `prepare` or `acked` returned, or an abort for the missing ACK.
pub fn perform_with(
    exchange: &dyn Exchange,
    sess: &mut dyn BrokerSession,
    mut ack: impl FnMut(usize) -> bool,
) -> Result<Performed, BrokerError> {
    let mut frames = Vec::new();
    let prepared = super::perform(exchange, sess, |frame| {
        frames.push(frame.to_vec());
        ack(frames.len() - 1)
    })?;
    if prepared == Prepared::Nop {
        return Ok(Performed::Nop);
    }
    Ok(match prepared {
        Prepared::OneWay { close_after } => Performed::OneWay {
            frames,
            close_after,
        },
        _ => Performed::Acked(frames),
    })
}

/// A store operation, as [`FaultyStore`] fails it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    /// [`PendingStore::register`].
    Register,
    /// [`PendingStore::unregister`].
    Unregister,
    /// [`PendingStore::get_internal_channel_id_from_token`].
    TokenLookup,
    /// [`PendingStore::get_internal_channel_id`].
    ChannelLookup,
    /// [`PendingStore::append_to_channel`].
    Append,
    /// [`PendingStore::append_to_unicast_channel`].
    AppendUnicast,
    /// [`PendingStore::get_channel_snapshot`].
    Snapshot,
    /// [`PendingStore::get_channel_unfiltered`].
    Unfiltered,
    /// [`PendingStore::scrub`].
    Scrub,
    /// [`PendingStore::drop_by_msg_id`].
    Drop,
}

impl StoreOp {
    /// Every operation.
    pub const ALL: [StoreOp; 10] = [
        StoreOp::Register,
        StoreOp::Unregister,
        StoreOp::TokenLookup,
        StoreOp::ChannelLookup,
        StoreOp::Append,
        StoreOp::AppendUnicast,
        StoreOp::Snapshot,
        StoreOp::Unfiltered,
        StoreOp::Scrub,
        StoreOp::Drop,
    ];
}

/// One fault of a [`FaultyStore`]: `op` succeeds `successes` more times, then fails
/// with `message` as [`StoreError::Unavailable`].
#[derive(Debug, Clone)]
struct Fault {
    op: StoreOp,
    successes: usize,
    message: String,
}

/// An [`InMemoryPendingStore`] with faults injected: the one fake store of the tests.
/// Each fault makes one operation fail as a backend fault after some successes; what
/// does not fail is the inner store's.
#[derive(Debug, Default)]
pub struct FaultyStore {
    inner: Rc<InMemoryPendingStore>,
    /// Borrowed only inside a method.
    faults: std::cell::RefCell<Vec<Fault>>,
    /// Successful snapshots are empty at level 0 (the original's `testFailingStore`).
    empty_snapshots: bool,
    /// Every change waits for a commit that never comes (a disk that hangs).
    hanging_commits: bool,
}

impl FaultyStore {
    /// A store with no fault yet, over a new in-memory store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store with no fault yet, over `inner`.
    pub fn over(inner: InMemoryPendingStore) -> Self {
        Self::sharing(Rc::new(inner))
    }

    /// A store with no fault yet, over `inner`, which the test keeps to look at.
    pub fn sharing(inner: Rc<InMemoryPendingStore>) -> Self {
        Self {
            inner,
            ..Self::default()
        }
    }

    /// Makes [`PendingStore::durable`] a wait that never ends, as with a disk that hangs
    /// rather than fails.
    pub fn with_hanging_commits(mut self) -> Self {
        self.hanging_commits = true;
        self
    }

    /// The original suite's `testFailingStore`: channel snapshots succeed, empty,
    /// `countdown_to_fail` times and then fail (`get channel snapshot fail`); drops
    /// always fail (`drop fail`).
    pub fn original(countdown_to_fail: usize) -> Self {
        let mut store = Self::new()
            .failing(
                StoreOp::Snapshot,
                countdown_to_fail,
                "get channel snapshot fail",
            )
            .failing(StoreOp::Drop, 0, "drop fail");
        store.empty_snapshots = true;
        store
    }

    /// Makes `op` fail with `message` once it has succeeded `successes` more times.
    pub fn failing(self, op: StoreOp, successes: usize, message: &str) -> Self {
        self.faults.borrow_mut().push(Fault {
            op,
            successes,
            message: message.to_owned(),
        });
        self
    }

    /// Makes each of `ops` fail with `message`, every time.
    pub fn failing_all(self, ops: &[StoreOp], message: &str) -> Self {
        ops.iter()
            .fold(self, |store, &op| store.failing(op, 0, message))
    }

    /// The store behind the faults.
    pub fn inner(&self) -> &InMemoryPendingStore {
        &self.inner
    }

    fn check(&self, op: StoreOp) -> Result<(), StoreError> {
        let mut faults = self.faults.borrow_mut();
        match faults.iter_mut().find(|f| f.op == op) {
            Some(f) if f.successes == 0 => Err(StoreError::Unavailable(f.message.clone().into())),
            Some(f) => {
                f.successes -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl PendingStore for FaultyStore {
    fn register(&self, device_id: &str, app_id: &str) -> Result<String, StoreError> {
        self.check(StoreOp::Register)?;
        self.inner.register(device_id, app_id)
    }

    fn unregister(&self, device_id: &str, app_id: &str) -> Result<(), StoreError> {
        self.check(StoreOp::Unregister)?;
        self.inner.unregister(device_id, app_id)
    }

    fn get_internal_channel_id_from_token(
        &self,
        token: &str,
        app_id: &str,
        user_id: &str,
        device_id: &str,
    ) -> Result<InternalChannelId, StoreError> {
        self.check(StoreOp::TokenLookup)?;
        self.inner
            .get_internal_channel_id_from_token(token, app_id, user_id, device_id)
    }

    fn get_internal_channel_id(&self, name: &str) -> Result<InternalChannelId, StoreError> {
        self.check(StoreOp::ChannelLookup)?;
        self.inner.get_internal_channel_id(name)
    }

    fn append_to_channel(
        &self,
        chan: &InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
    ) -> Result<i64, StoreError> {
        self.check(StoreOp::Append)?;
        self.inner.append_to_channel(chan, payload, expiration)
    }

    fn append_to_unicast_channel(
        &self,
        chan: &InternalChannelId,
        notification: Notification,
        meta: Metadata,
    ) -> Result<(), StoreError> {
        self.check(StoreOp::AppendUnicast)?;
        self.inner
            .append_to_unicast_channel(chan, notification, meta)
    }

    fn get_channel_snapshot(
        &self,
        chan: &InternalChannelId,
    ) -> Result<(i64, Vec<Notification>), StoreError> {
        self.check(StoreOp::Snapshot)?;
        if self.empty_snapshots {
            return Ok((0, Vec::new()));
        }
        self.inner.get_channel_snapshot(chan)
    }

    fn get_channel_unfiltered(
        &self,
        chan: &InternalChannelId,
    ) -> Result<(i64, Vec<Notification>, Vec<Metadata>), StoreError> {
        self.check(StoreOp::Unfiltered)?;
        self.inner.get_channel_unfiltered(chan)
    }

    fn scrub(
        &self,
        chan: &InternalChannelId,
        criteria: ScrubCriteria<'_>,
    ) -> Result<(), StoreError> {
        self.check(StoreOp::Scrub)?;
        self.inner.scrub(chan, criteria)
    }

    fn drop_by_msg_id(
        &self,
        chan: &InternalChannelId,
        targets: &[Notification],
    ) -> Result<(), StoreError> {
        self.check(StoreOp::Drop)?;
        self.inner.drop_by_msg_id(chan, targets)
    }

    fn durable(&self) -> Option<crate::store::DurableWait> {
        self.hanging_commits
            .then(|| Box::pin(std::future::pending()) as crate::store::DurableWait)
    }
}

/// Captures the log lines written while it is the thread's default subscriber, as
/// `LEVEL message` lines, so tests can assert what was logged.
#[derive(Clone, Debug, Default)]
pub struct LogCapture {
    /// The captured text. A mutex only because the subscriber's writer must be `Sync`;
    /// this never sits on a delivery path.
    buf: Arc<Mutex<Vec<u8>>>,
}

/// A writer into a [`LogCapture`].
#[derive(Debug)]
pub struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl io::Write for CaptureWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = CaptureWriter;

    fn make_writer(&'a self) -> CaptureWriter {
        CaptureWriter(Arc::clone(&self.buf))
    }
}

impl LogCapture {
    /// An empty capture.
    pub fn new() -> Self {
        Self::default()
    }

    /// A subscriber writing `LEVEL message` lines (debug and above) into this capture.
    pub fn dispatch(&self) -> tracing::Dispatch {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .with_level(true)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::Dispatch::new(subscriber)
    }

    /// Makes this capture the current thread's subscriber until the guard drops.
    pub fn set_default(&self) -> tracing::dispatcher::DefaultGuard {
        let guard = tracing::dispatcher::set_default(&self.dispatch());
        // Call sites first hit on threads without a subscriber may have cached "never";
        // make them ask again now that one listens.
        tracing::callsite::rebuild_interest_cache();
        guard
    }

    /// What was captured so far.
    pub fn captured(&self) -> String {
        let buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Forgets what was captured.
    pub fn reset(&self) {
        self.buf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Whether some captured line is `ERROR <message>` (or another level).
    pub fn has_line(&self, level: &str, message: &str) -> bool {
        let want = format!("{level} {message}");
        self.captured().lines().any(|l| l.trim_start() == want)
    }
}

/// Runs `make()`'s future to completion on a fresh glommio executor on this thread, with
/// a small I/O memory area (the default 10 MiB is resident per executor).
///
/// # Panics
/// When the executor cannot start (e.g. the locked-memory limit is below what io_uring
/// needs): raise `ulimit -l`.
pub fn run_local<F, Fut>(make: F) -> Fut::Output
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 << 10)
        .make();
    match executor {
        Ok(ex) => ex.run(async move { make().await }),
        Err(e) => panic!(
            "cannot start a glommio executor ({e}); raise the locked-memory limit (ulimit -l)"
        ),
    }
}
