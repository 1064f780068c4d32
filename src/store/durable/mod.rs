//! The durable store: each shard's state in memory, every change also appended to that
//! shard's log under `data_dir`, and the log replayed on start.
//!
//! # Layout
//!
//! ```text
//! data_dir/
//!   LOCK                  held (flock) by the running server
//!   MANIFEST              {"format":1,"shards":N,"generation":G}
//!   gen-G/shard-0.log     shard 0's log of store operations
//!   gen-G/shard-1.log     ...
//! ```
//!
//! A log is a sequence of checksummed records (`record.rs`): broadcast and unicast appends,
//! drops by message id (ACKs), scrubs (clear pending, replace tag), and a broadcast
//! channel's whole state (what snapshots keep of it). Expiry needs no
//! record: a notification's expiry is in its append, and recovery leaves expired ones
//! out. Tokens are derived from the (app, device) pair, so they survive by construction;
//! message ids are in the records.
//!
//! # Recovery and shard count changes
//!
//! [`DataDir::open`] runs before the shards start (a plain thread may block): it reads
//! every log of the current generation in parallel, drops a torn tail (the first record
//! that is cut short or fails its checksum, and everything after it), and gives each
//! shard its devices' unicast channels (by the same owner function the broker uses) and
//! a copy of every broadcast channel (from the log with the highest level: each shard
//! logged its own replica). With the same shard count each shard goes on appending to its
//! own log, once the broadcast channels its replica had not logged yet are appended to
//! it (so that every log holds the replicas the shards go on from). With a different
//! count the state is written out as a new generation, one
//! snapshot per new shard; the manifest is switched to it atomically (rename) and only
//! then is the old generation removed, so a crash at any point leaves one complete
//! generation.
//!
//! # Compaction
//!
//! When a shard's log grows past twice its last snapshot (and at least 64 MiB), its
//! flusher writes a snapshot of the live state beside it, syncs it and renames it over
//! the log. The snapshot is encoded on the shard in one step: a pause proportional to
//! the shard's live state, once per doubling of its log.

mod log;
pub(crate) mod record;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use thiserror::Error;
use tracing::warn;

pub use self::log::DurableWait;
use self::log::{Log, LogFile};
use self::record::{Decoded, decode_next};
use super::inmemory::ChannelState;
use super::{
    InMemoryPendingStore, InternalChannelId, Metadata, PendingStore, ScrubCriteria, StoreError,
    StoreFault,
};
use crate::broker::sharded::{ShardId, owner_of_channel};
use crate::logging::target;
use crate::protocol::{Notification, Payload};

/// When `/notify` and `/broadcast` answer, with a `data_dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Once the operation is on disk (written and `fdatasync`ed): group commit, many
    /// requests per sync. The default.
    Sync,
    /// At once; the log is written and synced every interval, so a crash of the machine
    /// (not only of the process) loses at most that much.
    Relaxed(Duration),
}

/// The log size below which a shard never compacts.
pub const DEFAULT_COMPACT_MIN: u64 = 64 << 20;

const MANIFEST: &str = "MANIFEST";
const LOCK: &str = "LOCK";
const FORMAT: u32 = 1;

/// Why a data folder cannot be used.
#[derive(Debug, Error)]
pub enum DataDirError {
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// Another process holds the folder.
    #[error("{} is in use by another process", path.display())]
    Locked {
        /// The data folder.
        path: PathBuf,
    },
    /// The manifest is not one this build writes.
    #[error("{}: {why}", path.display())]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DataDirError + 'a {
    move |source| DataDirError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What recovery found, for the operator's log and for measurements.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Records replayed, over all logs.
    pub records: u64,
    /// Bytes of log read.
    pub bytes: u64,
    /// Logs whose tail was torn (and dropped).
    pub torn: usize,
    /// Unicast notifications pending after recovery.
    pub pending: u64,
    /// Whether the state was re-partitioned for a new shard count.
    pub repartitioned: bool,
    /// How long recovery took.
    pub took: Duration,
    /// Shards the folder was written by.
    pub shards_before: usize,
    /// Shards it is open for.
    pub shards: usize,
    /// What the operator should know (a torn tail, where it was cut).
    pub warnings: Vec<String>,
}

impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records replayed ({} bytes) in {:.3} s, {} notifications pending",
            self.records,
            self.bytes,
            self.took.as_secs_f64(),
            self.pending
        )?;
        if self.torn > 0 {
            write!(f, ", a torn tail dropped in {} log(s)", self.torn)?;
        }
        if self.repartitioned {
            write!(
                f,
                ", re-partitioned from {} to {} shards",
                self.shards_before, self.shards
            )?;
        }
        Ok(())
    }
}

/// One shard's share of a recovered data folder, until the shard takes it.
struct ShardPart {
    file: File,
    path: PathBuf,
    len: u64,
    channels: Vec<ChannelState>,
}

/// An open data folder: recovered, locked, and ready to give each shard its store.
pub struct DataDir {
    dir: PathBuf,
    parts: Vec<Mutex<Option<ShardPart>>>,
    durability: Durability,
    broadcast_backlog: usize,
    compact_min: u64,
    report: RecoveryReport,
    /// Held for as long as the folder is in use.
    _lock: File,
}

impl std::fmt::Debug for DataDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataDir")
            .field("dir", &self.dir)
            .field("shards", &self.parts.len())
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    format: u32,
    shards: usize,
    generation: u64,
}

impl DataDir {
    /// Opens (creating it if needed) the data folder `dir` for `nr_shards` shards:
    /// locks it, recovers every shard's state from its logs, and re-partitions it if the
    /// shard count changed. Blocking: call it before the shards start.
    ///
    /// # Errors
    /// When the folder cannot be created, read or written, another process holds it, or
    /// its manifest is not one this build writes.
    pub fn open(
        dir: &Path,
        nr_shards: usize,
        durability: Durability,
        broadcast_backlog: usize,
    ) -> Result<Arc<Self>, DataDirError> {
        Self::open_with(
            dir,
            nr_shards,
            durability,
            broadcast_backlog,
            DEFAULT_COMPACT_MIN,
        )
    }

    /// [`open`](Self::open) with the log size below which shards never compact.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub fn open_with(
        dir: &Path,
        nr_shards: usize,
        durability: Durability,
        broadcast_backlog: usize,
        compact_min: u64,
    ) -> Result<Arc<Self>, DataDirError> {
        let started = Instant::now();
        let nr_shards = nr_shards.max(1);
        fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("cannot open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(DataDirError::Locked {
                    path: dir.to_owned(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io("cannot lock", &lock_path)(e)),
        }

        let manifest_path = dir.join(MANIFEST);
        let manifest = match fs::read(&manifest_path) {
            Ok(bytes) => {
                let m: Manifest =
                    serde_json::from_slice(&bytes).map_err(|e| DataDirError::Manifest {
                        path: manifest_path.clone(),
                        why: e.to_string(),
                    })?;
                if m.format != FORMAT || m.shards == 0 {
                    return Err(DataDirError::Manifest {
                        path: manifest_path,
                        why: format!(
                            "format {} with {} shards is not readable",
                            m.format, m.shards
                        ),
                    });
                }
                m
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let m = Manifest {
                    format: FORMAT,
                    shards: nr_shards,
                    generation: 0,
                };
                let gen_dir = generation_dir(dir, 0);
                fs::create_dir_all(&gen_dir).map_err(io("cannot create", &gen_dir))?;
                write_manifest(dir, &m)?;
                m
            }
            Err(e) => return Err(io("cannot read", &manifest_path)(e)),
        };
        remove_other_generations(dir, manifest.generation);

        // Replay every log of the generation, each on its own thread.
        let gen_dir = generation_dir(dir, manifest.generation);
        let replayed: Vec<Result<Replayed, DataDirError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..manifest.shards)
                .map(|i| {
                    let path = gen_dir.join(shard_file(i));
                    s.spawn(move || replay_log(&path, broadcast_backlog))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(DataDirError::Manifest {
                            path: gen_dir.clone(),
                            why: "replaying a log panicked".into(),
                        })
                    })
                })
                .collect()
        });
        let mut report = RecoveryReport::default();
        let mut logs = Vec::with_capacity(replayed.len());
        for (i, r) in replayed.into_iter().enumerate() {
            let r = r?;
            report.records += r.records;
            report.bytes += r.valid_len;
            if let Some(why) = r.torn {
                report.torn += 1;
                // What is cut is kept beside the data, in case it is damage in the
                // middle of a log rather than the torn tail of a crash.
                let kept = dir.join(format!(
                    "cut-gen{}-shard{i}-{}.bin",
                    manifest.generation,
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                ));
                let kept_note = match fs::write(&kept, &r.cut) {
                    Ok(()) => format!(
                        "the {} bytes cut are kept in {}",
                        r.cut.len(),
                        kept.display()
                    ),
                    Err(e) => format!("the {} bytes cut could not be kept ({e})", r.cut.len()),
                };
                report.warnings.push(format!(
                    "{}: {why} at byte {}; the log is cut there ({kept_note})",
                    gen_dir.join(shard_file(i)).display(),
                    r.valid_len
                ));
            }
            logs.push(r);
        }

        // Partition: unicast channels to their owner, broadcast channels (the most
        // advanced replica) to everyone.
        let mut buckets: Vec<Vec<ChannelState>> = (0..nr_shards).map(|_| Vec::new()).collect();
        let mut broadcast: Vec<ChannelState> = Vec::new();
        // Each log's own replica of each broadcast channel, by its top level.
        let mut replica_tops: Vec<Vec<(InternalChannelId, i64)>> = Vec::with_capacity(logs.len());
        for log in &mut logs {
            let mut tops = Vec::new();
            for c in std::mem::take(&mut log.channels) {
                if c.chan.is_unicast() {
                    report.pending += c.notifications.len() as u64;
                    let ShardId(owner) = owner_of_channel(&c.chan, nr_shards);
                    buckets[owner].push(c);
                    continue;
                }
                tops.push((c.chan.clone(), c.top_level));
                if let Some(have) = broadcast.iter_mut().find(|b| b.chan == c.chan) {
                    if c.top_level > have.top_level {
                        *have = c;
                    }
                } else {
                    broadcast.push(c);
                }
            }
            replica_tops.push(tops);
        }
        for b in &mut buckets {
            b.extend(broadcast.iter().cloned());
        }

        let parts = if manifest.shards == nr_shards {
            let mut parts = Vec::with_capacity(nr_shards);
            for (i, ((log, channels), tops)) in
                logs.into_iter().zip(buckets).zip(replica_tops).enumerate()
            {
                let path = gen_dir.join(shard_file(i));
                let file = open_log(&path)?;
                if log.torn.is_some() {
                    file.set_len(log.valid_len)
                        .map_err(io("cannot truncate", &path))?;
                    file.sync_all().map_err(io("cannot sync", &path))?;
                }
                // This shard goes on appending its replica of each broadcast channel to
                // its own log, from the recovered (most advanced) replica. Its log must
                // hold that replica first: were it left behind, a later recovery could
                // find it at the same top level as the others (the same broadcasts
                // appended since) and pick it, losing what it had missed.
                let catch_up = broadcast_catch_up(&broadcast, &tops, broadcast_backlog);
                let mut len = log.valid_len;
                if !catch_up.is_empty() {
                    file.write_all_at(&catch_up, len)
                        .map_err(io("cannot write", &path))?;
                    file.sync_data().map_err(io("cannot sync", &path))?;
                    len += catch_up.len() as u64;
                }
                parts.push(Mutex::new(Some(ShardPart {
                    file,
                    path,
                    len,
                    channels,
                })));
            }
            // A log created just now must survive in its folder too.
            sync_dir(&gen_dir)?;
            parts
        } else {
            report.repartitioned = true;
            repartition(dir, &manifest, nr_shards, buckets, broadcast_backlog)?
        };
        report.took = started.elapsed();
        report.shards_before = manifest.shards;
        report.shards = nr_shards;
        Ok(Arc::new(Self {
            dir: dir.to_owned(),
            parts,
            durability,
            broadcast_backlog,
            compact_min,
            report,
            _lock: lock,
        }))
    }

    /// What recovery found.
    pub fn report(&self) -> &RecoveryReport {
        &self.report
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Shard `id`'s store, on the shard's own thread (it spawns the shard's flusher).
    /// Each shard's part is handed out once; a second call for the same shard gets a
    /// store that refuses every change.
    pub fn store_for(&self, id: ShardId) -> Rc<DurableStore> {
        let mem =
            Rc::new(InMemoryPendingStore::new().with_broadcast_backlog(self.broadcast_backlog));
        let part = self
            .parts
            .get(id.0)
            .and_then(|p| p.lock().ok().and_then(|mut p| p.take()));
        let Some(part) = part else {
            let log = Log::new(self.durability, 0, self.compact_min);
            log.refuse(StoreFault::new(format!(
                "{id} has no log in {} (the data folder was handed out already)",
                self.dir.display()
            )));
            return Rc::new(DurableStore { mem, log });
        };
        for c in part.channels {
            mem.put_channel(c);
        }
        let log = Log::new(self.durability, part.len, self.compact_min);
        #[allow(unsafe_code)]
        // SAFETY: `into_raw_fd` gives up ownership of an open descriptor of a regular
        // file, and the glommio file takes it over exactly once.
        let file = unsafe { glommio::io::BufferedFile::from_raw_fd(part.file.into_raw_fd()) };
        let file = LogFile {
            file,
            path: part.path,
        };
        glommio::spawn_local(self::log::flusher(
            Rc::clone(&log),
            file,
            Rc::downgrade(&mem),
        ))
        .detach();
        Rc::new(DurableStore { mem, log })
    }
}

/// The records that bring a log whose broadcast replicas are at `tops` up to the
/// recovered `broadcast` channels: each channel it is behind on, as one state record
/// that replay puts in place of the log's older replica.
fn broadcast_catch_up(
    broadcast: &[ChannelState],
    tops: &[(InternalChannelId, i64)],
    broadcast_backlog: usize,
) -> Vec<u8> {
    let behind: Vec<ChannelState> = broadcast
        .iter()
        .filter(|b| {
            let own = tops
                .iter()
                .find(|(chan, _)| *chan == b.chan)
                .map_or(0, |&(_, top)| top);
            b.top_level > own
        })
        .cloned()
        .collect();
    let mut out = Vec::new();
    if behind.is_empty() {
        return out;
    }
    let store = InMemoryPendingStore::new().with_broadcast_backlog(broadcast_backlog);
    for c in behind {
        store.put_channel(c);
    }
    store.snapshot_into(&mut out);
    out
}

/// Opens (creating it if needed) a shard's log for the flusher: `O_DSYNC`, so that a
/// write is durable when it completes, one operation per commit instead of a write and
/// an `fdatasync`.
fn open_log(path: &Path) -> Result<File, DataDirError> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .custom_flags(libc::O_DSYNC)
        .open(path)
        .map_err(io("cannot open", path))
}

fn generation_dir(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("gen-{generation}"))
}

fn shard_file(i: usize) -> String {
    format!("shard-{i}.log")
}

/// Removes generation folders other than `keep` (left by a re-partition a crash
/// interrupted, or by one that finished).
fn remove_other_generations(dir: &Path, keep: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(generation) = name
            .to_str()
            .and_then(|n| n.strip_prefix("gen-"))
            .and_then(|g| g.parse::<u64>().ok())
        else {
            continue;
        };
        if generation != keep
            && let Err(e) = fs::remove_dir_all(entry.path())
        {
            warn!(target: target::BROKER, "cannot remove {}: {e}", entry.path().display());
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), DataDirError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync", dir))
}

fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), DataDirError> {
    let tmp = dir.join("MANIFEST.new");
    let bytes = serde_json::to_vec(m).map_err(|e| DataDirError::Manifest {
        path: tmp.clone(),
        why: e.to_string(),
    })?;
    let mut f = File::create(&tmp).map_err(io("cannot create", &tmp))?;
    f.write_all(&bytes).map_err(io("cannot write", &tmp))?;
    f.sync_all().map_err(io("cannot sync", &tmp))?;
    let path = dir.join(MANIFEST);
    fs::rename(&tmp, &path).map_err(io("cannot rename", &tmp))?;
    sync_dir(dir)
}

/// One log replayed.
struct Replayed {
    channels: Vec<ChannelState>,
    records: u64,
    valid_len: u64,
    torn: Option<&'static str>,
    /// The bytes from the first bad record on (empty when the log reads to its end).
    cut: Vec<u8>,
}

fn replay_log(path: &Path, broadcast_backlog: usize) -> Result<Replayed, DataDirError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes).map_err(io("cannot read", path))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot open", path)(e)),
    }
    let store = InMemoryPendingStore::new().with_broadcast_backlog(broadcast_backlog);
    let mut at = 0;
    let mut records = 0;
    let torn = loop {
        match decode_next(&bytes[at..]) {
            Decoded::Record(record, used) => {
                store.replay(record);
                records += 1;
                at += used;
            }
            Decoded::End => break None,
            Decoded::Torn(why) => break Some(why),
        }
    };
    bytes.drain(..at);
    Ok(Replayed {
        channels: store.take_channels(),
        records,
        valid_len: at as u64,
        torn,
        cut: bytes,
    })
}

/// Writes `buckets` as a new generation of `nr_shards` logs, switches the manifest to
/// it, and removes the old one.
fn repartition(
    dir: &Path,
    old: &Manifest,
    nr_shards: usize,
    buckets: Vec<Vec<ChannelState>>,
    broadcast_backlog: usize,
) -> Result<Vec<Mutex<Option<ShardPart>>>, DataDirError> {
    let generation = old.generation + 1;
    let gen_dir = generation_dir(dir, generation);
    if gen_dir.exists() {
        fs::remove_dir_all(&gen_dir).map_err(io("cannot remove", &gen_dir))?;
    }
    fs::create_dir_all(&gen_dir).map_err(io("cannot create", &gen_dir))?;
    let mut parts = Vec::with_capacity(nr_shards);
    for (i, channels) in buckets.into_iter().enumerate() {
        let path = gen_dir.join(shard_file(i));
        let store = InMemoryPendingStore::new().with_broadcast_backlog(broadcast_backlog);
        for c in channels {
            store.put_channel(c);
        }
        let mut snapshot = Vec::new();
        store.snapshot_into(&mut snapshot);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .read(true)
            .open(&path)
            .map_err(io("cannot create", &path))?;
        file.write_all(&snapshot)
            .map_err(io("cannot write", &path))?;
        file.sync_all().map_err(io("cannot sync", &path))?;
        parts.push(Mutex::new(Some(ShardPart {
            file: open_log(&path)?,
            path,
            len: snapshot.len() as u64,
            channels: store.take_channels(),
        })));
    }
    sync_dir(&gen_dir)?;
    write_manifest(
        dir,
        &Manifest {
            format: FORMAT,
            shards: nr_shards,
            generation,
        },
    )?;
    remove_other_generations(dir, generation);
    Ok(parts)
}

/// A shard's store with a `data_dir`: the in-memory store's state and rules, every change
/// also submitted to the shard's log. See the [module](self).
pub struct DurableStore {
    mem: Rc<InMemoryPendingStore>,
    log: Rc<Log>,
}

impl std::fmt::Debug for DurableStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableStore")
            .field("mem", &self.mem)
            .field("log", &self.log)
            .finish()
    }
}

impl DurableStore {
    /// Snapshots this shard's log has been compacted into so far.
    pub fn compactions(&self) -> u64 {
        self.log.stats().compactions
    }
}

impl PendingStore for DurableStore {
    crate::store::forward_reads_to!(mem);

    fn append_to_channel(
        &self,
        chan: &InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
    ) -> Result<i64, StoreError> {
        self.log.check()?;
        let level = self
            .mem
            .append_to_channel(chan, payload.clone(), expiration)?;
        self.log.submit(|out| {
            record::encode(
                &record::Record::Broadcast {
                    chan: chan.clone(),
                    level,
                    payload,
                    expiration,
                },
                out,
            );
        });
        Ok(level)
    }

    fn append_to_unicast_channel(
        &self,
        chan: &InternalChannelId,
        notification: Notification,
        meta: Metadata,
    ) -> Result<(), StoreError> {
        self.log.check()?;
        self.log.submit(|out| {
            record::encode(
                &record::Record::Unicast {
                    chan: chan.clone(),
                    notification: notification.clone(),
                    meta: meta.clone(),
                },
                out,
            );
        });
        self.mem.append_to_unicast_channel(chan, notification, meta)
    }

    fn scrub(
        &self,
        chan: &InternalChannelId,
        criteria: ScrubCriteria<'_>,
    ) -> Result<(), StoreError> {
        // Removing only expired notifications needs no record: recovery leaves them out.
        if let Some(app_id) = criteria.app_id {
            self.log.check()?;
            self.log.submit(|out| {
                record::encode(
                    &record::Record::Scrub {
                        chan: chan.clone(),
                        app_id: Arc::from(app_id),
                        replace_tag: criteria.replace_tag.map(Arc::from),
                    },
                    out,
                );
            });
        }
        self.mem.scrub(chan, criteria)
    }

    fn drop_by_msg_id(
        &self,
        chan: &InternalChannelId,
        targets: &[Notification],
    ) -> Result<(), StoreError> {
        self.log.check()?;
        self.log.submit(|out| {
            record::encode(
                &record::Record::Drop {
                    chan: chan.clone(),
                    msg_ids: targets.iter().map(|n| Arc::clone(&n.msg_id)).collect(),
                },
                out,
            );
        });
        self.mem.drop_by_msg_id(chan, targets)
    }

    fn durable(&self) -> Option<DurableWait> {
        self.log.wait()
    }

    fn flush(&self) -> Option<DurableWait> {
        Some(self.log.wait_all())
    }

    fn stats(&self) -> super::StoreStats {
        self.log.stats()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::broker::sharded::owner_of_device;
    use crate::broker::testing::run_local;

    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    fn payload(i: usize) -> Payload {
        Payload::from_json(&format!(r#"{{"n":{i}}}"#)).unwrap()
    }

    fn dev(i: usize) -> InternalChannelId {
        InternalChannelId::unicast(&format!("dev-{i}"), &format!("dev-{i}"))
    }

    fn temp(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pushbroker-durable-{what}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    /// Opens `dir` for `shards` shards and runs `f` with each shard's store in turn (all
    /// on one executor), flushing each before it returns.
    fn with_stores<T>(
        dir: &Path,
        shards: usize,
        compact_min: u64,
        f: impl FnOnce(&[Rc<DurableStore>]) -> T,
    ) -> (T, RecoveryReport) {
        let data = DataDir::open_with(dir, shards, Durability::Sync, 1000, compact_min).unwrap();
        let report = data.report().clone();
        let out = run_local(|| async move {
            let stores: Vec<_> = (0..shards).map(|i| data.store_for(ShardId(i))).collect();
            let out = f(&stores);
            for s in &stores {
                s.flush().unwrap().await.unwrap();
            }
            out
        });
        (out, report)
    }

    /// What a store holds: per channel, its level and message ids (payloads for
    /// broadcasts).
    fn contents(s: &dyn PendingStore, chans: &[InternalChannelId]) -> Vec<(i64, Vec<String>)> {
        chans
            .iter()
            .map(|c| {
                let (level, ns) = s.get_channel_snapshot(c).unwrap();
                let ids = ns
                    .iter()
                    .map(|n| {
                        if c.is_unicast() {
                            n.msg_id.to_string()
                        } else {
                            n.payload.get().to_owned()
                        }
                    })
                    .collect();
                (level, ids)
            })
            .collect()
    }

    #[test]
    fn pending_levels_and_message_ids_survive_a_restart_and_acked_ones_do_not_come_back() {
        let dir = temp("restart");
        let chans: Vec<_> = (0..5).map(dev).chain([InternalChannelId::System]).collect();
        let (before, _) = with_stores(&dir, 1, DEFAULT_COMPACT_MIN, |stores| {
            let s = &*stores[0];
            for i in 0..20 {
                let n = Notification::unicast("app", &format!("m-{i}"), payload(i));
                s.append_to_unicast_channel(&dev(i % 5), n, Metadata::expiring(later()))
                    .unwrap();
            }
            for i in 0..3 {
                s.append_to_channel(&InternalChannelId::System, payload(100 + i), later())
                    .unwrap();
            }
            // An ACK of dev-0's first two, a clear-pending of dev-1's app.
            let (_, ns) = s.get_channel_snapshot(&dev(0)).unwrap();
            s.drop_by_msg_id(&dev(0), &ns[..2]).unwrap();
            s.scrub(
                &dev(1),
                ScrubCriteria {
                    app_id: Some("app"),
                    replace_tag: None,
                },
            )
            .unwrap();
            contents(s, &chans)
        });
        assert_eq!(before[0].1, ["m-10", "m-15"], "dev-0 after its ACK");
        assert!(before[1].1.is_empty(), "dev-1 after clear pending");
        assert_eq!(before[5].0, 3);

        let (after, report) = with_stores(&dir, 1, DEFAULT_COMPACT_MIN, |stores| {
            contents(&*stores[0], &chans)
        });
        assert_eq!(after, before);
        assert_eq!(report.torn, 0);
        assert_eq!(report.pending, 2 + 4 + 4 + 4);
        // The level goes on counting from where it was.
        let (level, _) = with_stores(&dir, 1, DEFAULT_COMPACT_MIN, |stores| {
            stores[0]
                .append_to_channel(&InternalChannelId::System, payload(7), later())
                .unwrap()
        });
        assert_eq!(level, 4);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_tail_is_cut_and_everything_before_it_is_kept() {
        let dir = temp("torn");
        with_stores(&dir, 1, DEFAULT_COMPACT_MIN, |stores| {
            for i in 0..10 {
                let n = Notification::unicast("app", &format!("m-{i}"), payload(i));
                stores[0]
                    .append_to_unicast_channel(&dev(0), n, Metadata::expiring(later()))
                    .unwrap();
            }
        });
        let log = dir.join("gen-0").join("shard-0.log");
        let len = fs::metadata(&log).unwrap().len();
        // The last record cut in half, then garbage after it.
        let f = OpenOptions::new().write(true).open(&log).unwrap();
        f.set_len(len - 10).unwrap();
        drop(f);
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"\x05\0\0\0garbage").unwrap();
        drop(f);

        let (ids, report) = with_stores(&dir, 1, DEFAULT_COMPACT_MIN, |stores| {
            let n = Notification::unicast("app", "m-after", payload(99));
            stores[0]
                .append_to_unicast_channel(&dev(0), n, Metadata::expiring(later()))
                .unwrap();
            contents(&*stores[0], &[dev(0)])
        });
        assert_eq!(report.torn, 1);
        // What was cut (the half record and the garbage) is kept beside the data.
        let kept: Vec<u64> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("cut-gen0-shard0-")
            })
            .map(|e| e.metadata().unwrap().len())
            .collect();
        assert_eq!(kept.len(), 1, "one file of cut bytes");
        assert!(kept[0] > "garbage".len() as u64, "{kept:?}");
        assert!(
            report.warnings[0].contains("kept in"),
            "{:?}",
            report.warnings
        );
        let mut expected: Vec<String> = (0..9).map(|i| format!("m-{i}")).collect();
        expected.push("m-after".into());
        assert_eq!(ids[0].1, expected);
        // The cut log plus the new record reads back whole.
        let (again, report) = with_stores(&dir, 1, DEFAULT_COMPACT_MIN, |stores| {
            contents(&*stores[0], &[dev(0)])
        });
        assert_eq!(report.torn, 0);
        assert_eq!(again, ids);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_new_shard_count_gives_every_device_its_data_on_its_new_owner() {
        let dir = temp("reshard");
        let devices = 40;
        with_stores(&dir, 1, DEFAULT_COMPACT_MIN, |stores| {
            for i in 0..devices {
                let n = Notification::unicast("app", &format!("m-{i}"), payload(i));
                stores[0]
                    .append_to_unicast_channel(&dev(i), n, Metadata::expiring(later()))
                    .unwrap();
            }
            stores[0]
                .append_to_channel(&InternalChannelId::System, payload(1), later())
                .unwrap();
        });
        for shards in [2, 3, 1] {
            let (held, report) = with_stores(&dir, shards, DEFAULT_COMPACT_MIN, |stores| {
                (0..devices)
                    .map(|i| {
                        let owner = owner_of_device(&format!("dev-{i}"), shards).0;
                        let mine = contents(&*stores[owner], &[dev(i)]);
                        let elsewhere = (0..shards)
                            .filter(|&s| s != owner)
                            .any(|s| !contents(&*stores[s], &[dev(i)])[0].1.is_empty());
                        let levels: Vec<i64> = stores
                            .iter()
                            .map(|s| contents(&**s, &[InternalChannelId::System])[0].0)
                            .collect();
                        (mine[0].1.clone(), elsewhere, levels)
                    })
                    .collect::<Vec<_>>()
            });
            assert!(report.repartitioned, "{shards} shards");
            for (i, (mine, elsewhere, levels)) in held.into_iter().enumerate() {
                assert_eq!(mine, [format!("m-{i}")], "dev-{i} on {shards} shards");
                assert!(!elsewhere, "dev-{i} on a shard that does not own it");
                assert!(levels.iter().all(|&l| l == 1), "{levels:?}");
            }
            let gens: Vec<_> = fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("gen-"))
                .collect();
            assert_eq!(gens.len(), 1, "the old generation is removed");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_log_past_its_threshold_is_compacted_to_what_is_live() {
        let dir = temp("compact");
        with_stores(&dir, 1, 4096, |stores| {
            let s = &*stores[0];
            // Append and ACK over and over: the log grows, the live state does not.
            for i in 0..2000 {
                let n = Notification::unicast("app", &format!("m-{i}"), payload(i));
                s.append_to_unicast_channel(&dev(0), n.clone(), Metadata::expiring(later()))
                    .unwrap();
                if i % 10 != 0 {
                    s.drop_by_msg_id(&dev(0), &[n]).unwrap();
                }
            }
        });
        let len = fs::metadata(dir.join("gen-0").join("shard-0.log"))
            .unwrap()
            .len();
        let (ids, _) = with_stores(&dir, 1, 4096, |stores| contents(&*stores[0], &[dev(0)]));
        let expected: Vec<String> = (0..2000).step_by(10).map(|i| format!("m-{i}")).collect();
        assert_eq!(ids[0].1, expected);
        assert!(
            len < 200 * 80,
            "the log holds only the live state: {len} bytes"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_second_server_on_the_same_folder_is_refused() {
        let dir = temp("lock");
        let first = DataDir::open(&dir, 1, Durability::Sync, 1000).unwrap();
        let second = DataDir::open(&dir, 1, Durability::Sync, 1000);
        assert!(
            matches!(second, Err(DataDirError::Locked { .. })),
            "{second:?}"
        );
        drop(first);
        assert!(DataDir::open(&dir, 1, Durability::Sync, 1000).is_ok());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_sync_store_answers_after_the_commit_and_a_relaxed_one_at_once() {
        let dir = temp("modes");
        let data = DataDir::open(&dir, 1, Durability::Sync, 1000).unwrap();
        let sync = Arc::clone(&data);
        run_local(|| async move {
            let s = sync.store_for(ShardId(0));
            assert!(
                s.durable().is_none(),
                "nothing submitted, nothing to wait for"
            );
            s.append_to_channel(&InternalChannelId::System, payload(1), later())
                .unwrap();
            let wait = s
                .durable()
                .expect("a submitted change waits for its commit");
            wait.await.unwrap();
            assert!(s.durable().is_none(), "committed");
            let stats = s.stats();
            assert_eq!((stats.records, stats.commits), (1, 1), "{stats:?}");
            assert!(stats.log_bytes > 0 && !stats.unavailable, "{stats:?}");
        });
        drop(data);
        let relaxed =
            DataDir::open(&dir, 1, Durability::Relaxed(Duration::from_millis(5)), 1000).unwrap();
        run_local(|| async move {
            let s = relaxed.store_for(ShardId(0));
            s.append_to_channel(&InternalChannelId::System, payload(2), later())
                .unwrap();
            assert!(s.durable().is_none(), "relaxed answers at once");
            s.flush().unwrap().await.unwrap();
        });
        let data = DataDir::open(&dir, 1, Durability::Sync, 1000).unwrap();
        assert_eq!(data.report().records, 2);
        let _ = fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod replica_tests {
    use super::*;
    use crate::store::Metadata;

    /// Broadcast records of the system channel at `levels`, payload `[level]` each.
    fn system_records(levels: std::ops::RangeInclusive<i64>) -> Vec<u8> {
        let mut out = Vec::new();
        for level in levels {
            record::encode(
                &record::Record::Broadcast {
                    chan: InternalChannelId::System,
                    level,
                    payload: Payload::from_json(&format!("[{level}]")).unwrap(),
                    expiration: SystemTime::now() + Duration::from_secs(3600),
                },
                &mut out,
            );
        }
        out
    }

    /// A fresh data folder whose manifest says 2 shards, generation 0: the folder and
    /// the generation's.
    fn two_shard_folder(name: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "pushbroker-durable-unit-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        let gen_dir = generation_dir(&dir, 0);
        fs::create_dir_all(&gen_dir).unwrap();
        write_manifest(
            &dir,
            &Manifest {
                format: FORMAT,
                shards: 2,
                generation: 0,
            },
        )
        .unwrap();
        (dir, gen_dir)
    }

    /// The system channel as `path` replays: its top level and payloads.
    fn system_replica(path: &Path) -> (i64, Vec<String>) {
        let replayed = replay_log(path, 100).unwrap();
        assert!(replayed.torn.is_none());
        let c = replayed
            .channels
            .into_iter()
            .find(|c| c.chan == InternalChannelId::System)
            .unwrap();
        let payloads = c
            .notifications
            .iter()
            .map(|n| n.payload.get().to_owned())
            .collect();
        (c.top_level, payloads)
    }

    #[test]
    fn catching_up_a_replica_with_expired_gaps_repeats_no_broadcast() {
        let (dir, gen_dir) = two_shard_folder("catch-up-gaps");
        // Levels 2 and 3 expired: the recovered replica holds levels 1, 4 and 5, whose
        // own levels are not consecutive.
        let records = |levels: std::ops::RangeInclusive<i64>| {
            let mut out = Vec::new();
            for level in levels {
                let expiration = if (2..=3).contains(&level) {
                    SystemTime::now() - Duration::from_secs(60)
                } else {
                    SystemTime::now() + Duration::from_secs(3600)
                };
                record::encode(
                    &record::Record::Broadcast {
                        chan: InternalChannelId::System,
                        level,
                        payload: Payload::from_json(&format!("[{level}]")).unwrap(),
                        expiration,
                    },
                    &mut out,
                );
            }
            out
        };
        fs::write(gen_dir.join(shard_file(0)), records(1..=2)).unwrap();
        fs::write(gen_dir.join(shard_file(1)), records(1..=5)).unwrap();
        drop(DataDir::open(&dir, 2, Durability::Sync, 100).unwrap());
        let want: Vec<String> = ["[1]", "[4]", "[5]"].map(String::from).to_vec();
        for i in 0..2 {
            assert_eq!(
                system_replica(&gen_dir.join(shard_file(i))),
                (5, want.clone()),
                "shard {i}'s log after recovery"
            );
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn recovery_catches_a_lagging_broadcast_replica_up_in_its_own_log() {
        let (dir, gen_dir) = two_shard_folder("catch-up");
        // The sequencer logged levels 1 to 5; the other shard's replica had logged only
        // up to 3 when the process was killed. A unicast record keeps its place.
        let mut lagging = system_records(1..=3);
        record::encode(
            &record::Record::Unicast {
                chan: InternalChannelId::unicast("d", "d"),
                notification: Notification::unicast("app", "m-1", Payload::from_json("1").unwrap()),
                meta: Metadata::expiring(SystemTime::now() + Duration::from_secs(3600)),
            },
            &mut lagging,
        );
        fs::write(gen_dir.join(shard_file(0)), &lagging).unwrap();
        fs::write(gen_dir.join(shard_file(1)), system_records(1..=5)).unwrap();

        let opened = DataDir::open(&dir, 2, Durability::Sync, 100).unwrap();
        assert_eq!(opened.report().pending, 1);
        drop(opened);

        let want: Vec<String> = (1..=5).map(|l| format!("[{l}]")).collect();
        for i in 0..2 {
            assert_eq!(
                system_replica(&gen_dir.join(shard_file(i))),
                (5, want.clone()),
                "shard {i}'s log after recovery"
            );
        }
        // Caught up once: a second recovery has nothing to add.
        let len = fs::metadata(gen_dir.join(shard_file(0))).unwrap().len();
        drop(DataDir::open(&dir, 2, Durability::Sync, 100).unwrap());
        assert_eq!(
            fs::metadata(gen_dir.join(shard_file(0))).unwrap().len(),
            len
        );
        let _ = fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod review_tests {
    use super::*;
    use crate::broker::testing::run_local;

    fn temp(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pushbroker-durable-review-{what}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn system_payloads(s: &dyn PendingStore) -> (i64, Vec<String>) {
        let (level, ns) = s.get_channel_snapshot(&InternalChannelId::System).unwrap();
        (
            level,
            ns.iter().map(|n| n.payload.get().to_owned()).collect(),
        )
    }

    #[test]
    fn a_broadcast_backlog_reads_back_as_it_was_when_a_newer_notification_expired_first() {
        let dir = temp("backlog-expiry");
        let long = SystemTime::now() + Duration::from_secs(3600);
        // A short-lived broadcast whose expiry has passed by the time the next one comes.
        let gone = SystemTime::now() - Duration::from_secs(1);
        let data = DataDir::open(&dir, 1, Durability::Sync, 2).unwrap();
        let before = run_local(move || async move {
            let s = data.store_for(ShardId(0));
            for (i, expiration) in [long, gone, long].into_iter().enumerate() {
                s.append_to_channel(
                    &InternalChannelId::System,
                    Payload::from_json(&format!("[{i}]")).unwrap(),
                    expiration,
                )
                .unwrap();
            }
            s.flush().unwrap().await.unwrap();
            system_payloads(&*s)
        });
        // The live store dropped the expired one on the third append, and kept the first.
        assert_eq!(before, (3, vec!["[0]".to_owned(), "[2]".to_owned()]));
        let data = DataDir::open(&dir, 1, Durability::Sync, 2).unwrap();
        let after = run_local(move || async move { system_payloads(&*data.store_for(ShardId(0))) });
        assert_eq!(after, before, "the broadcast channel after a restart");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_broadcast_state_bigger_than_16_mib_reads_back() {
        // A backlog the configuration allows, of payloads /broadcast accepts (its body
        // is at most 4096 bytes): the channel's state record is ~17.6 MB.
        let dir = temp("big-state");
        let backlog = 5000;
        let filler = "x".repeat(3500);
        let data = DataDir::open(&dir, 1, Durability::Sync, backlog).unwrap();
        run_local(move || async move {
            let s = data.store_for(ShardId(0));
            for i in 0..backlog {
                s.append_to_channel(
                    &InternalChannelId::System,
                    Payload::from_json(&format!(r#"["{filler}",{i}]"#)).unwrap(),
                    SystemTime::now() + Duration::from_secs(3600),
                )
                .unwrap();
            }
            s.flush().unwrap().await.unwrap();
        });
        // Two shards: the state is written out as one snapshot per shard.
        drop(DataDir::open(&dir, 2, Durability::Sync, backlog).unwrap());
        let data = DataDir::open(&dir, 2, Durability::Sync, backlog).unwrap();
        assert_eq!(data.report().torn, 0, "{:?}", data.report().warnings);
        let got = run_local(move || async move {
            let (level, ns) = data
                .store_for(ShardId(1))
                .get_channel_snapshot(&InternalChannelId::System)
                .unwrap();
            (level, ns.len())
        });
        assert_eq!(got, (5000, 5000));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_compaction_is_not_tried_again_at_every_commit() {
        let dir = temp("compact-fails");
        let data = DataDir::open_with(&dir, 1, Durability::Sync, 100, 4096).unwrap();
        // The snapshot cannot be created: a folder is in its way.
        let blocker = dir.join("gen-0").join("shard-0.log.new");
        fs::create_dir_all(&blocker).unwrap();
        let unblock = blocker.clone();
        let compactions = run_local(move || async move {
            let s = data.store_for(ShardId(0));
            let append = |i: usize| {
                let n = Notification::unicast(
                    "app",
                    &format!("m-{i}"),
                    Payload::from_json(&format!("[{i}]")).unwrap(),
                );
                let meta = Metadata::expiring(SystemTime::now() + Duration::from_secs(3600));
                s.append_to_unicast_channel(&InternalChannelId::unicast("d", "d"), n, meta)
                    .unwrap();
            };
            // One commit past the threshold: the compaction fails, the batch is appended.
            for i in 0..100 {
                append(i);
            }
            s.flush().unwrap().await.unwrap();
            assert_eq!(s.compactions(), 0);
            // Each commit of a few records from now on would encode the whole state
            // and write it out again, for as long as the cause lasts.
            fs::remove_dir(&unblock).unwrap();
            append(100);
            s.flush().unwrap().await.unwrap();
            s.compactions()
        });
        assert_eq!(compactions, 0, "compacted again at the very next commit");
        let _ = fs::remove_dir_all(&dir);
    }
}
