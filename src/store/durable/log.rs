//! A shard's log: records submitted by the store's operations, written and synced by one
//! flusher task on the shard (glommio's io_uring file operations, so nothing blocks the
//! shard), with group commit and compaction.
//!
//! Operations append their record to an in-memory batch and go on. The flusher takes
//! the whole batch and writes it at the end of the file, which is open with `O_DSYNC` (a
//! completed write is on disk), then marks every record of the batch durable: all the
//! requests that arrived while the previous batch was being written share one sync. A
//! write that fails puts the log in a failed state (new operations are refused, waiters
//! answered unavailable) and is retried, from the same offset, until it succeeds.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};
use std::time::Duration;

use glommio::io::{BufferedFile, OpenOptions};
use tracing::{info, warn};

use super::Durability;
use crate::logging::target;
use crate::store::{InMemoryPendingStore, StoreError, StoreFault};

/// How long a failed write waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// A wait for durability: resolves once the operations it covers are on disk.
pub type DurableWait = Pin<Box<dyn Future<Output = Result<(), StoreError>>>>;

/// A shard's log, shared by its store (which submits) and its flusher task.
pub(crate) struct Log {
    /// Records submitted and not yet taken by the flusher.
    batch: RefCell<Vec<u8>>,
    /// Records submitted so far.
    submitted: Cell<u64>,
    /// Records known durable.
    durable: Cell<u64>,
    /// Why the last write or sync failed, until one succeeds.
    failed: RefCell<Option<StoreFault>>,
    /// Tasks waiting for `durable` to move (or for a failure).
    waiters: RefCell<Vec<Waker>>,
    /// The flusher, parked until there is a batch.
    flusher: RefCell<Option<Waker>>,
    mode: Durability,
    /// Bytes of log beyond which the flusher compacts (doubled from the snapshot size).
    compact_at: Cell<u64>,
    compact_min: u64,
    /// Bytes written to the file so far.
    file_len: Cell<u64>,
    /// Snapshots written so far (compactions).
    compactions: Cell<u64>,
    /// Group commits so far.
    commits: Cell<u64>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("submitted", &self.submitted.get())
            .field("durable", &self.durable.get())
            .field("failed", &self.failed.borrow().is_some())
            .finish_non_exhaustive()
    }
}

impl Log {
    pub(crate) fn new(mode: Durability, file_len: u64, compact_min: u64) -> Rc<Self> {
        Rc::new(Self {
            batch: RefCell::new(Vec::with_capacity(64 << 10)),
            submitted: Cell::new(0),
            durable: Cell::new(0),
            failed: RefCell::new(None),
            waiters: RefCell::new(Vec::new()),
            flusher: RefCell::new(None),
            mode,
            compact_at: Cell::new(compact_min.max(file_len.saturating_mul(2))),
            compact_min,
            file_len: Cell::new(file_len),
            compactions: Cell::new(0),
            commits: Cell::new(0),
        })
    }

    /// Refuses new operations while the log cannot write.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        match &*self.failed.borrow() {
            Some(fault) => Err(StoreError::Unavailable(fault.clone())),
            None => Ok(()),
        }
    }

    /// Submits one record, encoded by `encode` into the batch.
    pub(crate) fn submit(&self, encode: impl FnOnce(&mut Vec<u8>)) {
        encode(&mut self.batch.borrow_mut());
        self.submitted.set(self.submitted.get() + 1);
        if let Some(w) = self.flusher.borrow_mut().take() {
            w.wake();
        }
    }

    /// A wait until everything submitted so far is durable; `None` when it already is, or
    /// when the mode answers before the sync (relaxed).
    pub(crate) fn wait(self: &Rc<Self>) -> Option<DurableWait> {
        let settled = self.durable.get() >= self.submitted.get();
        (!settled && !matches!(self.mode, Durability::Relaxed(_))).then(|| self.wait_all())
    }

    /// A wait until everything submitted so far is written and synced, in any mode
    /// (a stopping shard's last flush).
    pub(crate) fn wait_all(self: &Rc<Self>) -> DurableWait {
        let upto = self.submitted.get();
        let log = Rc::clone(self);
        Box::pin(poll_fn(move |cx| {
            if log.durable.get() >= upto {
                return Poll::Ready(Ok(()));
            }
            if let Some(fault) = &*log.failed.borrow() {
                return Poll::Ready(Err(StoreError::Unavailable(fault.clone())));
            }
            log.waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        }))
    }

    /// Refuses every operation from now on, for `fault`.
    pub(crate) fn refuse(&self, fault: StoreFault) {
        *self.failed.borrow_mut() = Some(fault);
    }

    /// Snapshots written so far.
    pub(crate) fn stats(&self) -> crate::store::StoreStats {
        crate::store::StoreStats {
            commits: self.commits.get(),
            records: self.durable.get(),
            log_bytes: self.file_len.get(),
            compactions: self.compactions.get(),
            unavailable: self.failed.borrow().is_some(),
        }
    }

    fn wake_waiters(&self) {
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in waiters {
            w.wake();
        }
    }

    fn fail(&self, fault: StoreFault) {
        *self.failed.borrow_mut() = Some(fault);
        self.wake_waiters();
    }

    fn succeed(&self, upto: u64) {
        *self.failed.borrow_mut() = None;
        self.commits.set(self.commits.get() + 1);
        self.durable.set(self.durable.get().max(upto));
        self.wake_waiters();
    }

    /// Waits until there is a batch to write; in the relaxed mode, then the interval
    /// too, so that records arriving meanwhile share the sync (an idle log never wakes).
    async fn next_batch(&self) {
        self.batch_submitted().await;
        if let Durability::Relaxed(every) = self.mode {
            glommio::timer::sleep(every).await;
        }
    }

    async fn batch_submitted(&self) {
        poll_fn(|cx| {
            if self.batch.borrow().is_empty() {
                *self.flusher.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
    }
}

/// Where a shard's log lives and how it is written.
pub(crate) struct LogFile {
    pub(crate) file: BufferedFile,
    pub(crate) path: PathBuf,
}

/// The flusher: writes and syncs the log's batches for as long as the shard runs (a
/// stopping shard awaits [`Log::wait_all`] first, so nothing submitted is left behind).
pub(crate) async fn flusher(log: Rc<Log>, mut file: LogFile, state: Weak<InMemoryPendingStore>) {
    loop {
        log.next_batch().await;
        let upto = log.submitted.get();
        let batch = std::mem::take(&mut *log.batch.borrow_mut());
        if batch.is_empty() {
            continue;
        }
        if log.file_len.get() + batch.len() as u64 > log.compact_at.get()
            && let Some(state) = state.upgrade()
        {
            match compact(&log, &mut file, &state).await {
                Ok(()) => {
                    log.succeed(upto);
                    continue;
                }
                Err(e) => {
                    warn!(
                        target: target::BROKER,
                        "cannot compact {}: {e}; appending instead",
                        file.path.display()
                    );
                    // Not again before the log has doubled: every attempt encodes the
                    // whole state on the shard and writes it out, and what made this one
                    // fail (a full disk, a quota) may last.
                    let len = log.file_len.get() + batch.len() as u64;
                    log.compact_at
                        .set(log.compact_min.max(len.saturating_mul(2)));
                }
            }
        }
        append(&log, &file, batch, upto).await;
    }
}

/// Writes `batch` at the end of the file, retrying from the same offset until it
/// succeeds; then marks everything up to `upto` durable. The file is open with
/// `O_DSYNC`: a completed write is on disk (one io_uring operation per commit, where a
/// write then an `fdatasync` took two).
async fn append(log: &Log, file: &LogFile, batch: Vec<u8>, upto: u64) {
    let at = log.file_len.get();
    until_done(log, &file.path, ("writing the log", "cannot write"), || {
        write_all(&file.file, &batch, at)
    })
    .await;
    log.file_len.set(at + batch.len() as u64);
    log.succeed(upto);
}

/// Runs `op` until it succeeds, every [`RETRY_AFTER`]; meanwhile the log counts as
/// failing (changes refused, waiters answered unavailable: "`doing`: error"), with one
/// WARN ("`cannot` PATH: error; retrying") when it starts failing and one INFO when it
/// works again.
async fn until_done<F, Fut>(
    log: &Log,
    path: &std::path::Path,
    (doing, cannot): (&str, &str),
    mut op: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), std::io::Error>>,
{
    let mut warned = false;
    loop {
        match op().await {
            Ok(()) => break,
            Err(e) => {
                log.fail(StoreFault::new(format!("{doing}: {e}")));
                if !warned {
                    warn!(target: target::BROKER, "{cannot} {}: {e}; retrying", path.display());
                    warned = true;
                }
            }
        }
        glommio::timer::sleep(RETRY_AFTER).await;
    }
    if warned {
        info!(target: target::BROKER, "{} is written again", path.display());
    }
}

async fn write_all(file: &BufferedFile, bytes: &[u8], at: u64) -> Result<(), std::io::Error> {
    let mut done = 0;
    while done < bytes.len() {
        let n = file
            .write_at(bytes[done..].to_vec(), at + done as u64)
            .await
            .map_err(std::io::Error::from)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    Ok(())
}

/// Replaces the log with a snapshot of the live state (which already holds every
/// record submitted so far): written beside it, synced, then renamed over it.
async fn compact(
    log: &Log,
    file: &mut LogFile,
    state: &InMemoryPendingStore,
) -> Result<(), std::io::Error> {
    let mut snapshot = Vec::new();
    state.snapshot_into(&mut snapshot);
    let mut tmp_path = file.path.clone().into_os_string();
    tmp_path.push(".new");
    let tmp_path = PathBuf::from(tmp_path);
    let mut tmp = OpenOptions::new()
        .write(true)
        .read(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DSYNC)
        .buffered_open(&tmp_path)
        .await
        .map_err(std::io::Error::from)?;
    let written = async {
        write_all(&tmp, &snapshot, 0).await?;
        tmp.fdatasync().await.map_err(std::io::Error::from)?;
        tmp.rename(&file.path).await.map_err(std::io::Error::from)
    }
    .await;
    if let Err(e) = written {
        // Not renamed: the log is untouched, and the snapshot goes.
        let _ = tmp.remove().await;
        return Err(e);
    }
    // Renamed: the snapshot is the log now, and holds records no other file has. The
    // rename survives a machine crash only once the folder is synced: until then the
    // log counts as failing (changes refused), and the sync is retried.
    if let Some(dir) = file.path.parent() {
        until_done(
            log,
            &file.path,
            ("syncing the log's folder", "cannot sync the folder of"),
            || async move {
                let dir = glommio::io::Directory::open(dir).await?;
                let synced = dir.sync().await;
                let _ = dir.close().await;
                Ok(synced?)
            },
        )
        .await;
    }
    let old = std::mem::replace(&mut file.file, tmp);
    let _ = old.close().await;
    let len = snapshot.len() as u64;
    log.file_len.set(len);
    log.compact_at
        .set(log.compact_min.max(len.saturating_mul(2)));
    log.compactions.set(log.compactions.get() + 1);
    Ok(())
}
