//! The durable store's log against the alternatives considered for it (docs/durability.md,
//! "Why a per-shard log"): what one record costs to commit, in wall time and in CPU time,
//! with 1, 16 and 256 records per group commit (one `fdatasync` or one transaction).
//!
//! - `fdatasync_floor`: the disk's own latency, a 1-byte write and `sync_data` in a loop
//!   (appended, so the file grows as a log does; and overwritten in place).
//! - `ours`: the durable store through its public API on a glommio shard: N unicast
//!   appends (~170 bytes of log each), then the wait for `durable()`.
//! - `blocking_thread`: N 170-byte records written with `std::fs::File::write_all` and
//!   `sync_data` on a dedicated thread, the shard handing each batch over a flume
//!   channel and awaiting the answer, as a blocking pool would.
//! - `redb`: the same hand-over, the thread running one redb write transaction per batch
//!   (`Durability::Immediate`, the default), key device/message id, value the record.
//! - `fjall`: the same, one fjall batch per commit persisted with `PersistMode::SyncData`
//!   (memtables large enough that none is flushed during the run).
//! - `in_memory_only`: the in-memory store alone, nothing written: the share of `ours`
//!   that encoding nothing and syncing nothing still costs (the alternatives' shards only
//!   copy 170-byte buffers).
//!
//! An iteration is one group commit of N records. Wall time is taken on the shard, from
//! the first append to the last answer. CPU time is the whole process's (every thread,
//! io_uring's kernel workers included: `getrusage(RUSAGE_SELF)`) over the same span, and
//! the shard thread's own (`RUSAGE_THREAD`). Criterion runs one benchmark after the
//! other; since the disk's latency drifts with whatever else the machine does, the table
//! printed at the end comes from a second, interleaved pass (every alternative for
//! ~150 ms per round, 30 rounds, `DURABLE_LOG_ROUNDS` to change, 0 to skip) and gives
//! each one's medians per record.
//!
//! ```sh
//! cargo bench --bench durable_log -- --warm-up-time 1 --measurement-time 5
//! ```
//!
//! The files are written under the system's temporary folder (`TMPDIR`), on the disk
//! being measured, and removed at the end.
#![allow(missing_docs, clippy::print_stdout)]

use std::cell::Cell;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use pushbroker::broker::sharded::ShardId;
use pushbroker::glommio::{LocalExecutorBuilder, Placement};
use pushbroker::store::{DataDir, Durability, Metadata};
use pushbroker::{InMemoryPendingStore, InternalChannelId, Notification, Payload, PendingStore};

/// Group-commit sizes measured: records per `fdatasync` (or per transaction).
const GROUPS: [usize; 3] = [1, 16, 256];
/// The bytes of one record for the alternatives: what a unicast append costs in our log.
const RECORD: usize = 170;
/// Devices the records are spread over.
const DEVICES: u64 = 100_000;

/// The process's CPU time so far, user and system, over all its threads.
fn process_cpu() -> Duration {
    cpu(libc::RUSAGE_SELF)
}

/// The calling thread's CPU time so far, user and system.
fn thread_cpu() -> Duration {
    cpu(libc::RUSAGE_THREAD)
}

#[allow(unsafe_code)]
fn cpu(who: libc::c_int) -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `getrusage` fills the `rusage` it is given (already zeroed, so initialised
    // whatever it does) and keeps no pointer to it.
    let usage = unsafe {
        libc::getrusage(who, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// What one criterion sample cost.
#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: Duration,
    /// The whole process's CPU time.
    cpu: Duration,
    /// The shard thread's own CPU time (`None` for the floor, which has no shard).
    shard_cpu: Option<Duration>,
    records: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn device(i: u64) -> String {
    format!("device-{:06}", i % DEVICES)
}

fn msg_id(i: u64) -> String {
    format!("18c3f2a9b7e-0-{i:x}")
}

/// A unicast notification as `/notify` would append it (as examples/recovery_time.rs).
fn notification(i: u64) -> (InternalChannelId, Notification) {
    let device = device(i);
    let chan = InternalChannelId::unicast(&device, &device);
    let payload = Payload::from_json(&format!(
        r#"{{"message":"notification {i} for {device}","n":{i}}}"#
    ))
    .expect("bench payload is JSON");
    (
        chan,
        Notification::unicast("com.example.app_app", &msg_id(i), payload),
    )
}

/// A batch handed to a writer thread: `records` records of `RECORD` bytes, back to back,
/// and (for the engines) each one's key.
struct Batch {
    bytes: Vec<u8>,
    keys: Vec<String>,
}

impl Batch {
    fn records(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.keys
            .iter()
            .map(String::as_str)
            .zip(self.bytes.chunks(RECORD))
    }
}

type Reply = flume::Sender<Result<(), String>>;

/// Which store the shard commits to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alt {
    /// The in-memory store alone, nothing written: the part of `Ours` that any design
    /// keeping the pending notifications in memory pays too.
    Memory,
    Ours,
    BlockingThread,
    Redb,
    Fjall,
}

impl Alt {
    fn name(self) -> &'static str {
        match self {
            Alt::Memory => "in_memory_only",
            Alt::Ours => "ours",
            Alt::BlockingThread => "blocking_thread",
            Alt::Redb => "redb",
            Alt::Fjall => "fjall",
        }
    }
}

/// A writer thread's blocking commit of one batch.
type Commit = Box<dyn FnMut(&Batch) -> Result<(), String> + Send>;

fn file_writer(dir: &Path) -> Commit {
    let mut file = File::options()
        .create(true)
        .append(true)
        .open(dir.join("blocking.log"))
        .expect("log file opens");
    Box::new(move |b| {
        file.write_all(&b.bytes).map_err(|e| e.to_string())?;
        file.sync_data().map_err(|e| e.to_string())
    })
}

fn redb_writer(dir: &Path) -> Commit {
    const PENDING: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("pending");
    let db = redb::Database::create(dir.join("pending.redb")).expect("redb opens");
    Box::new(move |b| {
        // Durability::Immediate is the default: the commit returns once it is synced.
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = txn.open_table(PENDING).map_err(|e| e.to_string())?;
            for (key, value) in b.records() {
                table.insert(key, value).map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())
    })
}

fn fjall_writer(dir: &Path) -> Commit {
    // Memtables large enough never to be flushed during the run: what is measured is
    // journaling and committing, as for our log (which never compacts here either), and
    // no background flush or compaction lands in another alternative's CPU time.
    let keyspace = fjall::Config::new(dir.join("fjall"))
        .max_write_buffer_size(4 << 30)
        .max_journaling_size(4 << 30)
        .open()
        .expect("fjall opens");
    let pending = keyspace
        .open_partition(
            "pending",
            fjall::PartitionCreateOptions::default().max_memtable_size(1 << 30),
        )
        .expect("fjall partition opens");
    Box::new(move |b| {
        let mut batch = keyspace
            .batch()
            .durability(Some(fjall::PersistMode::SyncData));
        for (key, value) in b.records() {
            batch.insert(&pending, key, value);
        }
        batch.commit().map_err(|e| e.to_string())
    })
}

/// A job for the shard: `commits` group commits of `group` records each.
struct Job {
    commits: u64,
    group: usize,
    reply: flume::Sender<Sample>,
}

/// A glommio shard committing to one store, and (for the alternatives) the thread it
/// hands its batches to.
struct Shard {
    jobs: Option<flume::Sender<Job>>,
    executor: Option<pushbroker::glommio::ExecutorJoinHandle<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Records committed so far.
    records: Cell<u64>,
}

impl Shard {
    fn start(alt: Alt, dir: PathBuf) -> Self {
        let (jobs, job_rx) = flume::unbounded::<Job>();
        let mut writer = None;
        let mut to_writer = None;
        if !matches!(alt, Alt::Ours | Alt::Memory) {
            let mut commit = match alt {
                Alt::BlockingThread => file_writer(&dir),
                Alt::Redb => redb_writer(&dir),
                Alt::Fjall => fjall_writer(&dir),
                Alt::Ours | Alt::Memory => unreachable!(),
            };
            let (tx, rx) = flume::unbounded::<(Batch, Reply)>();
            to_writer = Some(tx);
            writer = Some(
                std::thread::Builder::new()
                    .name(format!("{}-writer", alt.name()))
                    .spawn(move || {
                        for (batch, reply) in rx {
                            let _ = reply.send(commit(&batch));
                        }
                    })
                    .expect("writer thread starts"),
            );
        }
        let executor = LocalExecutorBuilder::new(Placement::Unbound)
            .name("shard")
            .io_memory(64 << 10)
            .spawn(move || async move {
                let store: Option<Rc<dyn PendingStore>> = match alt {
                    Alt::Ours => {
                        // Never compact: what is measured is appending and committing.
                        let data = DataDir::open_with(&dir, 1, Durability::Sync, 1000, u64::MAX)
                            .expect("data folder opens");
                        Some(data.store_for(ShardId(0)))
                    }
                    Alt::Memory => Some(Rc::new(InMemoryPendingStore::new())),
                    _ => None,
                };
                let mut next = 0u64;
                while let Ok(job) = job_rx.recv_async().await {
                    let sample = match (&store, &to_writer) {
                        (Some(store), _) => run_ours(store, &job, &mut next).await,
                        (None, Some(to_writer)) => {
                            run_handed_over(to_writer, alt, &job, &mut next).await
                        }
                        (None, None) => unreachable!(),
                    };
                    let _ = job.reply.send(sample);
                }
                if let Some(store) = store
                    && let Some(wait) = store.flush()
                {
                    wait.await.expect("last flush");
                }
            })
            .expect("shard starts");
        Self {
            jobs: Some(jobs),
            executor: Some(executor),
            writer,
            records: Cell::new(0),
        }
    }

    fn run(&self, commits: u64, group: usize) -> Sample {
        let (reply, rx) = flume::bounded(1);
        self.jobs
            .as_ref()
            .expect("shard running")
            .send(Job {
                commits,
                group,
                reply,
            })
            .expect("shard takes jobs");
        let sample = rx.recv().expect("shard answers");
        self.records.set(self.records.get() + sample.records);
        sample
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(e) = self.executor.take() {
            let _ = e.join();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

async fn run_ours(store: &Rc<dyn PendingStore>, job: &Job, next: &mut u64) -> Sample {
    // The notifications are built first: parsing a request's payload is not the store's
    // cost. Appending (encoding the record, the in-memory insert) and committing are.
    let expiration = SystemTime::now() + Duration::from_secs(86_400);
    let records = job.commits * job.group as u64;
    let built: Vec<_> = (*next..*next + records).map(notification).collect();
    *next += records;
    let mut built = built.into_iter();
    let cpu = process_cpu();
    let shard_cpu = thread_cpu();
    let started = Instant::now();
    for _ in 0..job.commits {
        for (chan, n) in built.by_ref().take(job.group) {
            store
                .append_to_unicast_channel(&chan, n, Metadata::expiring(expiration))
                .expect("append");
        }
        if let Some(wait) = store.durable() {
            wait.await.expect("durable");
        }
    }
    Sample {
        wall: started.elapsed(),
        cpu: process_cpu() - cpu,
        shard_cpu: Some(thread_cpu() - shard_cpu),
        records,
    }
}

async fn run_handed_over(
    to_writer: &flume::Sender<(Batch, Reply)>,
    alt: Alt,
    job: &Job,
    next: &mut u64,
) -> Sample {
    let mut record = [b'x'; RECORD];
    let records = job.commits * job.group as u64;
    let cpu = process_cpu();
    let shard_cpu = thread_cpu();
    let started = Instant::now();
    for _ in 0..job.commits {
        let mut batch = Batch {
            bytes: Vec::with_capacity(job.group * RECORD),
            keys: Vec::new(),
        };
        for _ in 0..job.group {
            let i = *next;
            *next += 1;
            record[..8].copy_from_slice(&i.to_le_bytes());
            batch.bytes.extend_from_slice(&record);
            if alt != Alt::BlockingThread {
                batch.keys.push(format!("{}/{}", device(i), msg_id(i)));
            }
        }
        let (reply, answer) = flume::bounded(1);
        to_writer
            .send((batch, reply))
            .expect("writer takes batches");
        answer
            .recv_async()
            .await
            .expect("writer answers")
            .expect("commit");
    }
    Sample {
        wall: started.elapsed(),
        cpu: process_cpu() - cpu,
        shard_cpu: Some(thread_cpu() - shard_cpu),
        records,
    }
}

/// The disk's floor: a 1-byte write and `sync_data`, `iters` times, appended (the file
/// grows, as a log does, so the sync carries its size too) or written in place.
fn fdatasync_loop(path: &Path, append: bool, iters: u64) -> Sample {
    let mut file = File::options()
        .create(true)
        .write(true)
        .append(append)
        .open(path)
        .expect("floor file opens");
    let cpu = process_cpu();
    let started = Instant::now();
    for _ in 0..iters {
        if append {
            file.write_all(b"x").expect("write");
        } else {
            std::os::unix::fs::FileExt::write_all_at(&file, b"x", 0).expect("write");
        }
        file.sync_data().expect("sync");
    }
    Sample {
        wall: started.elapsed(),
        cpu: process_cpu() - cpu,
        shard_cpu: None,
        records: iters,
    }
}

/// One thing measured: the disk's floor, or a store at one group-commit size.
enum Subject {
    Floor {
        name: &'static str,
        path: PathBuf,
        append: bool,
    },
    Store {
        alt: Alt,
        group: usize,
        shard: Shard,
    },
}

impl Subject {
    fn all(root: &Path) -> Vec<Self> {
        let mut all = vec![
            Subject::Floor {
                name: "append_1byte",
                path: root.join("floor-append"),
                append: true,
            },
            Subject::Floor {
                name: "overwrite_1byte",
                path: root.join("floor-overwrite"),
                append: false,
            },
        ];
        for alt in [
            Alt::Memory,
            Alt::Ours,
            Alt::BlockingThread,
            Alt::Redb,
            Alt::Fjall,
        ] {
            // Without commits the group size makes no difference to the memory store.
            let groups: &[usize] = if alt == Alt::Memory { &[256] } else { &GROUPS };
            for &group in groups {
                let dir = root.join(format!("{}-{group}", alt.name()));
                std::fs::create_dir_all(&dir).expect("bench folder");
                all.push(Subject::Store {
                    alt,
                    group,
                    shard: Shard::start(alt, dir),
                });
            }
        }
        all
    }

    fn function(&self) -> &'static str {
        match self {
            Subject::Floor { .. } => "fdatasync_floor",
            Subject::Store { alt, .. } => alt.name(),
        }
    }

    fn parameter(&self) -> String {
        match self {
            Subject::Floor { name, .. } => (*name).to_owned(),
            Subject::Store { group, .. } => group.to_string(),
        }
    }

    /// Records per commit.
    fn group(&self) -> usize {
        match self {
            Subject::Floor { .. } => 1,
            Subject::Store { group, .. } => *group,
        }
    }

    fn run(&self, commits: u64) -> Sample {
        match self {
            Subject::Floor { path, append, .. } => fdatasync_loop(path, *append, commits),
            Subject::Store { group, shard, .. } => shard.run(commits, *group),
        }
    }
}

/// Criterion's pass: one benchmark after the other, an iteration being one commit.
fn durable_log(c: &mut Criterion, subjects: &[Subject]) {
    let mut group = c.benchmark_group("durable_log");
    // Each iteration waits for the disk: flat sampling, as criterion advises for long ones.
    group.sampling_mode(SamplingMode::Flat);
    for s in subjects {
        group.throughput(Throughput::Elements(s.group() as u64));
        group.bench_function(BenchmarkId::new(s.function(), s.parameter()), |b| {
            b.iter_custom(|iters| s.run(iters).wall)
        });
    }
    group.finish();
}

/// The interleaved pass behind the table: the disk's latency drifts with whatever else
/// the machine is doing, so one benchmark after the other would compare moments, not
/// alternatives. Here every round runs every subject for about `slice` (in a rotating
/// order) and the table takes each one's median over the rounds.
fn interleaved(subjects: &[Subject], rounds: usize, slice: Duration) -> Vec<Vec<Sample>> {
    // How many commits make a slice, from a short first run (which also warms up).
    let commits: Vec<u64> = subjects
        .iter()
        .map(|s| {
            let probe = 8;
            let took = s.run(probe).wall.as_secs_f64() / probe as f64;
            ((slice.as_secs_f64() / took.max(1e-6)).ceil() as u64).clamp(1, 100_000)
        })
        .collect();
    let mut samples = vec![Vec::with_capacity(rounds); subjects.len()];
    for round in 0..rounds {
        for k in 0..subjects.len() {
            let i = (round + k) % subjects.len();
            samples[i].push(subjects[i].run(commits[i]));
        }
    }
    samples
}

/// The medians per record over the rounds.
fn print_table(subjects: &[Subject], samples: &[Vec<Sample>], slice: Duration) {
    println!();
    println!(
        "durable_log: medians over {} interleaved rounds of ~{} ms per alternative",
        samples.first().map_or(0, Vec::len),
        slice.as_millis()
    );
    println!(
        "{:<24} {:>8} {:>10} {:>14} {:>14} {:>14} {:>14}",
        "alternative", "records", "records", "wall", "wall", "CPU", "shard CPU"
    );
    println!(
        "{:<24} {:>8} {:>10} {:>14} {:>14} {:>14} {:>14}",
        "", "/commit", "measured", "/commit", "/record", "/record", "/record"
    );
    for (s, samples) in subjects.iter().zip(samples) {
        let per_record = |f: fn(&Sample) -> Option<Duration>| {
            median(
                samples
                    .iter()
                    .filter_map(|s| Some(f(s)?.as_secs_f64() * 1e6 / s.records as f64))
                    .collect(),
            )
        };
        let wall = per_record(|s| Some(s.wall));
        let cpu = per_record(|s| Some(s.cpu));
        let shard_cpu = match per_record(|s| s.shard_cpu) {
            us if us.is_nan() => "-".to_owned(),
            us => format!("{us:.2} us"),
        };
        let name = match s {
            Subject::Floor { name, .. } => format!("fdatasync {name}"),
            Subject::Store { alt, .. } => alt.name().to_owned(),
        };
        println!(
            "{:<24} {:>8} {:>10} {:>11.1} us {:>11.2} us {:>11.2} us {:>14}",
            name,
            s.group(),
            samples.iter().map(|s| s.records).sum::<u64>(),
            wall * s.group() as f64,
            wall,
            cpu,
            shard_cpu,
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(20)
        .configure_from_args();
    let root = std::env::temp_dir().join(format!("pushbroker-durable-log-{}", std::process::id()));
    std::fs::create_dir_all(&root).expect("bench folder");
    let subjects = Subject::all(&root);
    durable_log(&mut c, &subjects);
    c.final_summary();
    // The interleaved pass, only when benchmarking (not under `--test` or `--list`).
    // DURABLE_LOG_ROUNDS=0 leaves it out.
    let args: Vec<String> = std::env::args().collect();
    let rounds = std::env::var("DURABLE_LOG_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(30);
    if rounds > 0
        && args.iter().any(|a| a == "--bench")
        && !args.iter().any(|a| a == "--test" || a == "--list")
    {
        let slice = Duration::from_millis(150);
        let samples = interleaved(&subjects, rounds, slice);
        print_table(&subjects, &samples, slice);
    }
    // Our log's bytes per record, to check the records are the size announced: read
    // once the shards are stopped (their last flush done).
    let appended = subjects
        .iter()
        .find_map(|s| match s {
            Subject::Store {
                alt: Alt::Ours,
                group: 256,
                shard,
            } => Some(shard.records.get()),
            _ => None,
        })
        .unwrap_or(0);
    drop(subjects);
    let log = root.join("ours-256").join("gen-0").join("shard-0.log");
    if let Ok(meta) = std::fs::metadata(&log)
        && appended > 0
    {
        println!(
            "ours: {:.1} bytes of log per record ({} bytes, {appended} records)",
            meta.len() as f64 / appended as f64,
            meta.len()
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}
