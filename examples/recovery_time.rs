//! How long a restart takes to recover a data folder, and how many bytes of log a pending
//! notification costs: fills a fresh data folder with pending unicast notifications
//! through the durable store, then opens it again (recovery) a few times and reports
//! the median.
//!
//! ```sh
//! cargo run --release --example recovery_time -- [PENDING] [SHARDS] [REPS] [DIR]
//! ```
//!
//! Defaults: 1,000,000 pending notifications over 100,000 devices, 2 shards, 3 recoveries,
//! a folder under the system's temporary folder (removed at the end).
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use pushbroker::broker::sharded::{ShardId, owner_of_device};
use pushbroker::store::{DataDir, Durability, DurableStore, Metadata};
use pushbroker::{InternalChannelId, Notification, Payload, PendingStore};

fn arg<T: std::str::FromStr>(n: usize, default: T) -> T {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pending: usize = arg(1, 1_000_000);
    let shards: usize = arg(2, 2);
    let reps: usize = arg(3, 3);
    let dir: PathBuf = arg(
        4,
        std::env::temp_dir().join(format!("pushbroker-recovery-{}", std::process::id())),
    );
    let devices = (pending / 10).max(1);
    let _ = std::fs::remove_dir_all(&dir);

    // Fill: each shard appends its own devices' notifications, as the server would.
    let data = DataDir::open(&dir, shards, Durability::Sync, 1000)?;
    let expiration = SystemTime::now() + Duration::from_secs(86_400);
    let started = Instant::now();
    let handles: Vec<_> = (0..shards)
        .map(|shard| {
            let data = std::sync::Arc::clone(&data);
            pushbroker::glommio::LocalExecutorBuilder::new(pushbroker::glommio::Placement::Unbound)
                .io_memory(64 << 10)
                .spawn(move || async move {
                    let store: Rc<DurableStore> = data.store_for(ShardId(shard));
                    let mut k = 0;
                    for i in 0..pending {
                        let device = format!("device-{:06}", i % devices);
                        if owner_of_device(&device, shards).0 != shard {
                            continue;
                        }
                        let chan = InternalChannelId::unicast(&device, &device);
                        let payload = Payload::from_json(&format!(
                            r#"{{"message":"notification {i} for {device}","n":{i}}}"#
                        ))
                        .map_err(|e| e.to_string())?;
                        let msg_id = format!("18c3f2a9b7e-{shard:x}-{i:x}");
                        let n = Notification::unicast("com.example.app_app", &msg_id, payload);
                        store
                            .append_to_unicast_channel(&chan, n, Metadata::expiring(expiration))
                            .map_err(|e| e.to_string())?;
                        k += 1;
                        // Commit in groups, as concurrent requests would.
                        if k % 4096 == 0
                            && let Some(wait) = store.durable()
                        {
                            wait.await.map_err(|e| e.to_string())?;
                        }
                    }
                    if let Some(wait) = store.flush() {
                        wait.await.map_err(|e| e.to_string())?;
                    }
                    Ok::<usize, String>(k)
                })
        })
        .collect::<Result<_, _>>()?;
    let mut written = 0;
    for h in handles {
        written += h.join().map_err(|e| format!("{e:?}"))??;
    }
    drop(data);
    let fill = started.elapsed();
    let bytes: u64 = std::fs::read_dir(dir.join("gen-0"))?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();

    let mut times = Vec::new();
    for _ in 0..reps {
        let started = Instant::now();
        let data = DataDir::open(&dir, shards, Durability::Sync, 1000)?;
        times.push(started.elapsed());
        assert_eq!(
            data.report().pending,
            written as u64,
            "every pending recovered"
        );
    }
    times.sort();
    let median = times[times.len() / 2];
    println!("pending notifications   {written} over {devices} devices, {shards} shards");
    println!(
        "fill                    {:.2} s ({:.0} appends/s, commits every 4096 per shard)",
        fill.as_secs_f64(),
        written as f64 / fill.as_secs_f64()
    );
    println!(
        "log size                {bytes} bytes, {:.1} bytes per pending notification",
        bytes as f64 / written as f64
    );
    println!(
        "recovery                median {:.3} s of {reps} ({})",
        median.as_secs_f64(),
        times
            .iter()
            .map(|t| format!("{:.3}", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
