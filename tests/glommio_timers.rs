//! The vendored glommio's timer processing (vendor/README.md): a turn of the executor's
//! loop with timers armed but none due allocates nothing for them. glommio 0.9.0 split its
//! timer map at "now" on every turn, allocating a node per level of the tree.
#![allow(clippy::unwrap_used)]

mod support;
use support::echoed;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::mpsc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use pushbroker::glommio::net::TcpStream;
use pushbroker::glommio::timer::sleep;
use pushbroker::glommio::{LocalExecutorBuilder, Placement, spawn_local};

/// Counts the allocations of each thread.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

#[allow(unsafe_code)]
// SAFETY: every call is passed on to the system allocator unchanged; counting touches only
// a thread-local `Cell` that needs no allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// The allocations `rounds` one-byte round trips through the echo make on the executor's
/// thread; each round waits for the other thread, so each is at least one turn of the
/// loop.
async fn round_trips(stream: &mut TcpStream, rounds: usize) -> u64 {
    let before = allocations();
    for i in 0..rounds {
        let sent = [i as u8];
        stream.write_all(&sent).await.expect("write");
        let mut got = [0u8; 1];
        stream.read_exact(&mut got).await.expect("read");
        assert_eq!(got, sent);
    }
    allocations() - before
}

#[test]
fn turns_with_timers_armed_and_none_due_allocate_nothing_for_them() {
    const ROUNDS: usize = 2_000;
    const TIMERS: usize = 1_000;
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let executor = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(64 << 10)
            .make()
            .expect("an executor (ulimit -l)");
        let _ = done.send(executor.run(async move {
            let mut stream = echoed().await;
            round_trips(&mut stream, 10).await;
            let without = round_trips(&mut stream, ROUNDS).await;
            // Enough timers for a tree of several levels, none due during the test.
            for _ in 0..TIMERS {
                spawn_local(sleep(Duration::from_secs(600))).detach();
            }
            round_trips(&mut stream, 10).await;
            let with = round_trips(&mut stream, ROUNDS).await;
            (without, with)
        }));
    });
    let (without, with) = result
        .recv_timeout(Duration::from_secs(60))
        .expect("the executor finished");
    // Splitting the timer map on every turn costs at least one allocation per turn.
    assert!(
        with < without + (ROUNDS / 4) as u64,
        "{ROUNDS} round trips made {without} allocations without timers armed, {with} with {TIMERS}"
    );
}
