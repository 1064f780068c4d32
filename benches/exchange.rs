//! Preparing exchanges: what a session pays per BROADCAST (first session of a group and
#![allow(missing_docs)] // criterion_group! generates an undocumented function
//! every later one, which reuses the encoded frames) and splitting a large channel.

use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pushbroker::broker::testing::{TestBrokerSession, perform_acking};
use pushbroker::broker::{BroadcastExchange, Exchange, UnicastExchange};
use pushbroker::protocol::{Notification, Payload, split_payloads};
use pushbroker::store::{InMemoryPendingStore, InternalChannelId, Metadata, PendingStore};

fn notifications(n: usize, size: usize) -> Vec<Notification> {
    (0..n)
        .map(|i| {
            let p = format!(
                r#"{{"daily/mako":{{"build":{i},"note":"{}"}}}}"#,
                "x".repeat(size)
            );
            Notification::broadcast(Payload::from_json(&p).expect("bench payload is JSON"))
        })
        .collect()
}

fn session() -> TestBrokerSession {
    let mut sess = TestBrokerSession::new("dev-1", Rc::new(InMemoryPendingStore::new()));
    sess.model = "mako".into();
    sess.image_channel = "daily".into();
    sess
}

fn broadcast(c: &mut Criterion) {
    let mut group = c.benchmark_group("broadcast_exchange");
    group.throughput(Throughput::Elements(1));
    for n in [1usize, 10] {
        let notifs = notifications(n, 100);
        // A new exchange each time: decoding payloads, filtering, encoding.
        group.bench_with_input(
            BenchmarkId::new("new_and_first_prepare", n),
            &notifs,
            |b, notifs| {
                let mut sess = session();
                b.iter(|| {
                    let ex =
                        BroadcastExchange::new(InternalChannelId::System, n as i64, notifs.clone());
                    black_box(ex.prepare(&mut sess).expect("prepares"));
                })
            },
        );
        // One exchange, many sessions: every prepare after the first reuses the frames.
        let ex = BroadcastExchange::new(InternalChannelId::System, n as i64, notifs.clone());
        group.bench_with_input(BenchmarkId::new("cached_prepare", n), &ex, |b, ex| {
            let mut sess = session();
            b.iter(|| black_box(ex.prepare(&mut sess).expect("prepares")))
        });
        group.bench_with_input(
            BenchmarkId::new("cached_prepare_and_ack", n),
            &ex,
            |b, ex| {
                b.iter(|| {
                    let mut sess = session();
                    black_box(perform_acking(ex, &mut sess).expect("performs"));
                })
            },
        );
    }
    group.finish();
}

fn split(c: &mut Criterion) {
    let mut group = c.benchmark_group("split_large_channel");
    for n in [100usize, 1000] {
        let notifs = notifications(n, 400);
        let payloads: Vec<Payload> = notifs.iter().map(|n| n.payload.clone()).collect();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("split_payloads", n), &payloads, |b, ps| {
            b.iter(|| black_box(split_payloads(black_box(ps))))
        });
        group.bench_with_input(
            BenchmarkId::new("prepare_split_broadcast", n),
            &notifs,
            |b, notifs| {
                let mut sess = session();
                b.iter(|| {
                    let ex =
                        BroadcastExchange::new(InternalChannelId::System, n as i64, notifs.clone());
                    black_box(ex.prepare(&mut sess).expect("prepares"));
                })
            },
        );
    }
    group.finish();
}

fn unicast(c: &mut Criterion) {
    let mut group = c.benchmark_group("unicast_exchange");
    group.throughput(Throughput::Elements(1));
    let chan = InternalChannelId::unicast("dev-1", "dev-1");
    let later = SystemTime::now() + Duration::from_secs(3600);
    group.bench_function("append_prepare_ack_1", |b| {
        let store = Rc::new(InMemoryPendingStore::new());
        let mut sess = TestBrokerSession::new("dev-1", store.clone());
        let ex = UnicastExchange {
            chan_id: chan.clone(),
            cached_ok: false,
        };
        let payload = Payload::from_json(r#"{"message":"hello","badge":1}"#).expect("JSON");
        b.iter(|| {
            store
                .append_to_unicast_channel(
                    &chan,
                    Notification::unicast("com.example.app_app", "m1", payload.clone()),
                    Metadata::expiring(later),
                )
                .expect("appends");
            black_box(perform_acking(&ex, &mut sess).expect("performs"));
        })
    });
    group.finish();
}

criterion_group!(benches, broadcast, split, unicast);
criterion_main!(benches);
