//! Any body to every POST endpoint (the first byte picks the endpoint), answered by the
//! API core on a running sharded broker. Never a panic, never a 500 (`internal` is a
//! bug), and every answer is JSON.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;
use libfuzzer_sys::fuzz_target;
use pushbroker::api::{ApiConfig, ApiContext, BodyReadError, RequestHead, respond};
use pushbroker::broker::sharded::{ShardId, ShardPlacement, ShardedBroker, ShardedBrokerBuilder};

const PATHS: [&str; 4] = ["/broadcast", "/notify", "/register", "/unregister"];

fn broker() -> &'static ShardedBroker {
    static BROKER: OnceLock<ShardedBroker> = OnceLock::new();
    BROKER.get_or_init(|| {
        let b = ShardedBrokerBuilder::new(2)
            .placement(ShardPlacement::Unbound)
            .name("fuzz")
            .build();
        b.start().expect("shards start (ulimit -l?)");
        b
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let path = PATHS[usize::from(pick) % PATHS.len()];
    let body = Bytes::copy_from_slice(body);
    let answer = futures_lite::future::block_on(broker().sending().run_task_on(
        ShardId(0),
        move |shard| async move {
            let ctx = ApiContext::new(shard, ApiConfig::default());
            let head = RequestHead {
                method: &Method::POST,
                path,
                content_type: Some(b"application/json"),
                content_length: Some(body.len() as u64),
                authorization: None,
            };
            let resp = respond(&ctx, &head, async { Ok::<_, BodyReadError>(body) }).await;
            let status = resp.status().as_u16();
            let bytes = match resp.into_body().collect().await {
                Ok(c) => c.to_bytes(),
                Err(never) => match never {},
            };
            (status, bytes)
        },
    ))
    .expect("shard 0 answers");
    let (status, bytes) = answer;
    assert_ne!(status, 500, "{path}: {}", String::from_utf8_lossy(&bytes));
    assert!(
        std::str::from_utf8(&bytes).is_ok_and(|t| t.starts_with('{')),
        "{path}: {status} {:?}",
        String::from_utf8_lossy(&bytes)
    );
});
