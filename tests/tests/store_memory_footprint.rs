//! The heap the in-memory store holds, as the allocator counts it: its
//! byte budget bounds what its records keep alive, whatever their TTLs.
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

const MAX_BYTES: u64 = 1024 * 1024;
const DAY: Duration = Duration::from_secs(86_400);
const MINUTE: Duration = Duration::from_secs(60);
static BODY: [u8; 100] = [7; 100];

/// A long-TTL endpoint's records among a short-TTL one's: once the short
/// ones are gone, the heap left is the long ones', about what the store
/// counts them at, not the blocks they were carved from.
#[test]
fn records_of_mixed_ttls_keep_the_heap_within_the_budget() {
    let clock = ManualClock::new(1_000_000);
    let region = Region::new(GLOBAL);
    let store = MemoryStore::builder()
        .clock(clock.clone())
        .max_bytes(MAX_BYTES)
        .build();
    for group in 0..3_000 {
        complete_new(&store, &format!("day-{group}"), &BODY, DAY);
        for i in 0..30 {
            complete_new(&store, &format!("minute-{group}-{i}"), &BODY, MINUTE);
        }
        clock.advance(Duration::from_millis(10));
    }
    // The minute records expire, and the next completion purges them.
    clock.advance(2 * MINUTE);
    complete_new(&store, "last", &BODY, DAY);
    let change = region.change();
    let held = change.bytes_allocated as i64 - change.bytes_deallocated as i64;
    let counted = store.completed_bytes();
    assert!(
        counted <= MAX_BYTES,
        "the store counts {counted} B, over its budget"
    );
    // Twice the budget leaves room for the table and the deadline queue,
    // which the budget counts at a fixed overhead per record.
    assert!(
        held <= 2 * MAX_BYTES as i64,
        "the store holds {held} B of heap for {} records it counts at {counted} B (budget {MAX_BYTES} B)",
        store.completed_len()
    );
}
