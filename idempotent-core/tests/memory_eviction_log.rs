//! A memory store too small for its traffic drops completed records before
//! their deadline, and a retry of one runs its handler again: the operator
//! is warned, once, rather than left to find out from a duplicate side
//! effect. A process of its own: the subscriber that records the warning
//! is the process's global one.

use std::time::Duration;

use idempotent_core::clock::ManualClock;
use idempotent_core::store::MemoryStore;
use tracing::Level;

#[path = "support/events.rs"]
mod events;
#[path = "support/memory.rs"]
mod memory;
use memory::complete_new;

static BODY: [u8; 600] = [7; 600];
const LONG_TTL: Duration = Duration::from_secs(600);

#[test]
fn a_store_that_drops_live_records_for_space_warns_once() {
    let events = events::events();
    let clock = ManualClock::new(1_000_000);
    // Room for five of these records.
    let store = MemoryStore::builder()
        .clock(clock.clone())
        .max_bytes(4 * 1024)
        .build();
    for i in 0..5 {
        complete_new(&store, &format!("short-{i}"), &BODY, Duration::from_secs(1));
    }
    clock.advance(Duration::from_secs(2));
    for i in 0..5 {
        complete_new(&store, &format!("long-{i}"), &BODY, LONG_TTL);
    }
    let logged = events.messages_at_least(Level::WARN);
    assert_eq!(logged, Vec::<String>::new(), "expired records are no loss");
    for i in 0..20 {
        complete_new(&store, &format!("more-{i}"), &BODY, LONG_TTL);
    }
    let logged = events.messages_at_least(Level::WARN);
    assert_eq!(
        logged.len(),
        1,
        "one warning, not one per record: {logged:?}"
    );
    assert!(
        logged[0].contains("max_bytes") && logged[0].contains("run the handler again"),
        "{logged:?}"
    );
    assert_eq!(store.evicted_total(), 20);
}
