//! A device's bytes from the first on: the version byte and CONNECT, registration with a
//! broker, then whatever follows, until the bytes end. Never a panic; the session always
//! ends (the device closes its side after the input), and ends unregistered.
#![no_main]

use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use pushbroker::broker::SessionId;
use pushbroker::broker::simple::SimpleBroker;
use pushbroker::broker::testing::TestBrokerConfig;
use pushbroker::session::testing::{VirtualClock, pipe};
use pushbroker::session::{SessionConfig, read_hello, run};
use pushbroker::store::{InMemoryPendingStore, PendingStore};

thread_local! {
    /// One executor for the whole run: making one per input would cost an io_uring setup.
    static EXECUTOR: glommio::LocalExecutor = glommio::LocalExecutorBuilder::default()
        .io_memory(64 << 10)
        .make()
        .expect("an executor (ulimit -l?)");
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    EXECUTOR.with(|ex| {
        ex.run(async move {
            let store = Rc::new(InMemoryPendingStore::new());
            let broker = SimpleBroker::new(
                Rc::clone(&store) as Rc<dyn PendingStore>,
                &TestBrokerConfig::default(),
            );
            broker.start();
            let (mut io, device) = pipe();
            device.write(&data);
            device.close();
            let config = SessionConfig {
                ping_interval: std::time::Duration::from_secs(10),
                exchange_timeout: std::time::Duration::from_secs(5),
            };
            let clock = VirtualClock::new();
            let mut buf = Vec::new();
            if let Ok(connect) = read_hello(&mut io, &mut buf, &config, &clock).await {
                let device_id = connect.device_id.clone();
                let sid = SessionId("fuzz".to_owned());
                let _end = run(
                    &mut io,
                    Box::new(connect),
                    buf,
                    &broker,
                    &config,
                    &clock,
                    &sid,
                    std::future::pending::<()>(),
                )
                .await;
                assert!(
                    broker.session_of(&device_id).is_none(),
                    "an ended session stays registered"
                );
            }
            broker.stop().await;
        })
    });
});
