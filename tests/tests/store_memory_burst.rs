//! The heap the in-memory store holds after a burst of keys, as the
//! allocator counts it: once the burst's records have expired and been
//! purged, the room their table slots and deadlines took is given back,
//! not held at its peak for as long as the process runs.
//!
//! One test in a binary of its own, so that the allocator counts no other
//! test's allocations.

use std::alloc::System;
use std::time::Duration;

use idempotent_core::clock::ManualClock;
use idempotent_core::store::MemoryStore;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[path = "../../idempotent-core/tests/support/memory.rs"]
mod memory;
use memory::complete_new;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const BURST: usize = 200_000;
const BODY: &[u8] = b"{\"id\":1}";
const TTL: Duration = Duration::from_secs(60);

fn held(region: &Region<'_, System>) -> i64 {
    let change = region.change();
    change.bytes_allocated as i64 - change.bytes_deallocated as i64
}

#[test]
fn the_heap_of_a_burst_is_given_back_once_its_records_expire() {
    let clock = ManualClock::new(1_000_000);
    let region = Region::new(GLOBAL);
    // The default budget and its sixteen shards.
    let store = MemoryStore::builder().clock(clock.clone()).build();
    for i in 0..BURST {
        complete_new(&store, &format!("burst-{i}"), BODY, TTL);
    }
    let peak = held(&region);
    clock.advance(Duration::from_secs(120));
    // Each shard purges its expired records as its next record completes.
    for i in 0..BURST / 100 {
        complete_new(&store, &format!("after-{i}"), BODY, TTL);
    }
    assert_eq!(store.completed_len(), (BURST / 100) as u64);
    let after = held(&region);
    assert!(
        after < peak / 10,
        "{after} B of heap held for {} records, {peak} B at the burst's peak of {BURST}",
        store.completed_len()
    );
}
