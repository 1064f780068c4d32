//! The vendored glommio's loop and park (vendor/README.md): a preempt timer still armed is
//! kept from one turn of the executor's loop to the next instead of being cancelled and
//! armed again on every turn; a parked executor still wakes for its timers (the wait's own
//! timeout), and for another thread's message (the notifier's fences instead of a
//! process-wide barrier); an idle executor does not keep waking for a preempt timer it
//! kept.
#![allow(clippy::unwrap_used)]

mod support;
use support::echoed;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use pushbroker::glommio::net::TcpStream;
use pushbroker::glommio::timer::{sleep, timeout};
use pushbroker::glommio::{
    LocalExecutorBuilder, Placement, parks, preempt_timer_arms, wait_has_timeout,
};

/// Longer than any wake-up can take: what a wait gives up after, so that a test fails
/// instead of hanging.
const DEADLINE: Duration = Duration::from_secs(10);

/// Runs `test` on a fresh executor (with this preempt timer) in its own thread, failing
/// instead of hanging if it does not finish within a minute.
fn on_executor<T, F>(preempt: Duration, test: impl FnOnce() -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: Future<Output = T>,
{
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let executor = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(64 << 10)
            .preempt_timer(preempt)
            .make()
            .expect("an executor (ulimit -l)");
        let _ = done.send(executor.run(async move { test().await }));
    });
    result
        .recv_timeout(Duration::from_secs(60))
        .expect("the executor finished")
}

/// `rounds` one-byte round trips through the echo: each waits for the other thread, so
/// each is at least one turn of the executor's loop.
async fn round_trips(stream: &mut TcpStream, rounds: usize) {
    for i in 0..rounds {
        let sent = [i as u8];
        stream.write_all(&sent).await.expect("write");
        let mut got = [0u8; 1];
        timeout(DEADLINE, async { Ok(stream.read_exact(&mut got).await) })
            .await
            .expect("the echo came back")
            .expect("read");
        assert_eq!(got, sent);
    }
}

#[test]
#[allow(clippy::print_stderr)] // says why it skips, on kernels before 5.11
fn an_executor_turning_often_keeps_its_preempt_timer() {
    const ROUNDS: usize = 2_000;
    let preempt = Duration::from_millis(100);
    let (keeps, armed_at_all, arms, elapsed) = on_executor(preempt, move || async move {
        let mut stream = echoed().await;
        round_trips(&mut stream, 10).await;
        let before = preempt_timer_arms();
        let started = Instant::now();
        round_trips(&mut stream, ROUNDS).await;
        let arms = preempt_timer_arms() - before;
        (wait_has_timeout(), before > 0, arms, started.elapsed())
    });
    assert!(armed_at_all, "the executor armed a preempt timer at all");
    if !keeps {
        // Before Linux 5.11 a park cancels the preempt timer, as glommio 0.9.0 did.
        eprintln!("skipped: this kernel's parks do not keep the preempt timer");
        return;
    }
    // A timer is armed again only once the last one rang (once per period), or once after
    // a park that followed nothing run. Arming one per turn would be at least ROUNDS.
    let periods = (elapsed.as_millis() / preempt.as_millis()) as u64 + 1;
    assert!(
        arms <= 2 * periods + 10,
        "{arms} preempt timers armed over {ROUNDS} turns in {elapsed:?}"
    );
}

#[test]
fn a_parked_executor_wakes_for_its_timer() {
    let (slept, parked) = on_executor(Duration::from_millis(5), || async {
        let before = parks();
        let started = Instant::now();
        sleep(Duration::from_millis(50)).await;
        (started.elapsed(), parks() - before)
    });
    assert!(slept >= Duration::from_millis(50), "woke early: {slept:?}");
    assert!(slept < Duration::from_secs(2), "woke late: {slept:?}");
    assert!(
        parked >= 1,
        "the executor slept through the timer, not spun"
    );
}

#[test]
fn an_idle_executor_does_not_keep_waking_for_its_preempt_timer() {
    // A 5 ms preempt timer kept armed through every park would wake the executor about 60
    // times in 300 ms of nothing to do.
    let parked = on_executor(Duration::from_millis(5), || async {
        let mut stream = echoed().await;
        round_trips(&mut stream, 200).await;
        let before = parks();
        sleep(Duration::from_millis(300)).await;
        parks() - before
    });
    assert!(parked <= 10, "{parked} parks in 300 ms of nothing to do");
}

#[test]
fn a_parked_executor_is_woken_by_another_threads_message() {
    const MESSAGES: u32 = 300;
    // Nothing else may wake the executor in time: its preempt timer (kept while it
    // parks) is far longer than the bound on each message's wait.
    const PREEMPT: Duration = Duration::from_secs(30);
    const BOUND: Duration = Duration::from_secs(2);
    let (tx, rx) = flume::bounded::<u32>(1);
    let sender = std::thread::spawn(move || {
        for i in 0..MESSAGES {
            // Mostly while the executor sleeps; every few, right as it goes to sleep.
            if i % 4 != 0 {
                std::thread::sleep(Duration::from_micros(500));
            }
            tx.send(i).expect("the executor receives");
        }
    });
    let (received, slowest, parked) = on_executor(PREEMPT, move || async move {
        let before = parks();
        let mut received = Vec::new();
        let mut slowest = Duration::ZERO;
        for _ in 0..MESSAGES {
            let started = Instant::now();
            let got = timeout(DEADLINE, async { Ok(rx.recv_async().await) })
                .await
                .expect("woken for the message")
                .expect("sent");
            slowest = slowest.max(started.elapsed());
            received.push(got);
        }
        (received, slowest, parks() - before)
    });
    sender.join().expect("sender");
    assert_eq!(received, (0..MESSAGES).collect::<Vec<_>>());
    assert!(
        slowest < BOUND,
        "a message waited {slowest:?} for its wake-up"
    );
    assert!(
        parked >= 1,
        "the executor never slept waiting for a message"
    );
}
