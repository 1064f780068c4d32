//! Frame encoding and decoding: the per-message cost of the wire codec.
#![allow(missing_docs)] // criterion_group! generates an undocumented function

use std::borrow::Cow;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use pushbroker::protocol::{
    BroadcastMsg, MAX_FRAME_BODY, Message, Notification, NotificationsMsg, Payload, decode_message,
    encode_frame,
};

fn payloads(n: usize) -> Vec<Payload> {
    (0..n)
        .map(|i| {
            Payload::from_json(&format!(
                r#"{{"daily/mako":{{"build":{i},"note":"{}"}}}}"#,
                "x".repeat(64)
            ))
            .expect("bench payload is JSON")
        })
        .collect()
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for n in [1usize, 10, 100] {
        let ps = payloads(n);
        let msg = Message::Broadcast(BroadcastMsg {
            app_id: Cow::Borrowed(""),
            chan_id: Cow::Borrowed("0"),
            top_level: 42,
            payloads: Some(Cow::Borrowed(&ps)),
        });
        let mut buf = Vec::with_capacity(64 << 10);
        encode_frame(&mut buf, &msg).expect("encodes");
        group.throughput(Throughput::Bytes(buf.len() as u64));
        group.bench_with_input(BenchmarkId::new("encode_broadcast", n), &msg, |b, msg| {
            b.iter(|| {
                buf.clear();
                black_box(encode_frame(&mut buf, black_box(msg)).expect("encodes"));
            })
        });
        // Baseline: the same JSON built and written as a generic serde_json::Value, as a
        // codec without typed messages would.
        let value: serde_json::Value = serde_json::from_slice(&buf[2..]).expect("JSON");
        group.bench_with_input(
            BenchmarkId::new("baseline_value_to_vec", n),
            &value,
            |b, v| b.iter(|| black_box(serde_json::to_vec(black_box(v)).expect("encodes"))),
        );
        let frame = buf.clone();
        group.bench_with_input(
            BenchmarkId::new("baseline_value_from_slice", n),
            &frame,
            |b, f| {
                b.iter(|| {
                    black_box(
                        serde_json::from_slice::<serde_json::Value>(black_box(&f[2..]))
                            .expect("decodes"),
                    )
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("decode_broadcast", n),
            &frame,
            |b, frame| {
                b.iter(|| {
                    black_box(decode_message(black_box(frame), MAX_FRAME_BODY).expect("decodes"))
                })
            },
        );

        let notifs: Vec<Notification> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Notification::unicast("com.example.app_app", &format!("msg-{i}"), p.clone())
            })
            .collect();
        let msg = Message::Notifications(NotificationsMsg {
            notifications: Cow::Borrowed(&notifs),
        });
        group.bench_with_input(
            BenchmarkId::new("encode_notifications", n),
            &msg,
            |b, msg| {
                b.iter(|| {
                    buf.clear();
                    black_box(encode_frame(&mut buf, black_box(msg)).expect("encodes"));
                })
            },
        );
    }
    group.throughput(Throughput::Elements(1));
    let mut buf = Vec::new();
    encode_frame(&mut buf, &Message::Ack).expect("encodes");
    let ack = buf.clone();
    group.bench_function("decode_ack", |b| {
        b.iter(|| black_box(decode_message(black_box(&ack), MAX_FRAME_BODY).expect("decodes")))
    });
    group.bench_function("encode_ping", |b| {
        b.iter(|| {
            buf.clear();
            black_box(encode_frame(&mut buf, &Message::Ping).expect("encodes"));
        })
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
