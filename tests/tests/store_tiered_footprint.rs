//! The heap a `Tiered` store's memory holds, as the allocator counts it:
//! its byte budget bounds what its cached records keep alive, however
//! often a record is asked for with another payload.
//!
//! One test in a binary of its own, so that the allocator counts no other
//! test's allocations.

use std::alloc::System;
use std::time::Duration;

use idempotent_core::Fingerprint;
use idempotent_core::clock::ManualClock;
use idempotent_core::record::Claim;
use idempotent_core::store::{MemoryStore, Store, Tiered};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[path = "../../idempotent-core/tests/support/memory.rs"]
mod memory;
use memory::{COMPLETED_PAYLOAD, complete_new, now};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The budget of each tier: the cache's, and the durable memory store's.
const MAX_BYTES: u64 = 1024 * 1024;
const KEYS: usize = 1_000;
/// Requests with another payload per key: a 422 each.
const MISMATCHES: usize = 100;
const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(86_400);
static BODY: [u8; 100] = [7; 100];

/// A caller completes a key, then sends it again and again with another
/// payload (a 422 each, which the cache asks of the durable store). The
/// record the durable store answers with is the one the cache holds:
/// learned again each time, each copy would be carved from the cache's
/// blocks behind the one before, and a block whose last copy lives on
/// would be kept whole for it, a hundred times the record's size,
/// uncounted by the budget.
#[test]
fn a_flood_of_other_payloads_keeps_the_heap_within_the_budget() {
    let clock = ManualClock::new(1_000_000);
    let region = Region::new(GLOBAL);
    let durable = MemoryStore::builder()
        .clock(clock.clone())
        .max_bytes(MAX_BYTES)
        .build();
    let store = Tiered::builder(durable).max_bytes(MAX_BYTES).build();
    let other = Fingerprint::from_bytes([2; 32]);
    for i in 0..KEYS {
        let key = complete_new(&store, &format!("k{i}"), &BODY, TTL);
        for _ in 0..MISMATCHES {
            let claim = now(store.claim(&key, other, LEASE));
            assert!(
                matches!(&claim, Ok(Claim::Completed(record)) if record.fingerprint == COMPLETED_PAYLOAD),
                "{claim:?}"
            );
        }
        clock.advance(Duration::from_millis(1));
    }
    let change = region.change();
    let held = change.bytes_allocated as i64 - change.bytes_deallocated as i64;
    assert_eq!(store.cached_len(), KEYS as u64, "nothing evicted");
    // Twice both budgets leaves room for the tables and the deadline
    // queues, which the budgets count at a fixed overhead per record.
    assert!(
        held <= 4 * MAX_BYTES as i64,
        "the two tiers hold {held} B of heap for {KEYS} records of {} B each (budgets {MAX_BYTES} B each)",
        BODY.len()
    );
}
