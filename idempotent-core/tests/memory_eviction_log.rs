//! A memory store too small for its traffic drops completed records before
//! their deadline, and a retry of one runs its handler again: the operator
//! is warned, once, rather than left to find out from a duplicate side
//! effect. A process of its own: the subscriber that records the warning
//! is the process's global one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use idempotent_core::clock::ManualClock;
use idempotent_core::record::{Claim, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{MemoryStore, Store};
use idempotent_core::{Fingerprint, IdempotencyKey};

/// The messages of the events logged at `WARN` or above.
#[derive(Default)]
struct Warnings(Mutex<Vec<String>>);

struct Message(Option<String>);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl tracing::Subscriber for Warnings {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() > tracing::Level::WARN {
            return;
        }
        let mut message = Message(None);
        event.record(&mut message);
        self.0.lock().unwrap().push(message.0.unwrap_or_default());
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The memory store's futures are ready at once.
fn now<T>(future: impl Future<Output = T>) -> T {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("the memory store answers at once"),
    }
}

fn complete_new(store: &MemoryStore, name: &str, ttl: Duration) {
    let key = RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(name.as_bytes()).unwrap(),
    );
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lease = Duration::from_secs(60);
    let Ok(Claim::Acquired(token)) = now(store.claim(&key, fingerprint, lease)) else {
        panic!("{name} is new");
    };
    let response = StoredResponse {
        status: StatusCode::OK,
        headers: Vec::new(),
        body: Some(vec![7; 600].into()),
    };
    now(store.complete(&key, token, response, ttl)).unwrap();
}

#[test]
fn a_store_that_drops_live_records_for_space_warns_once() {
    let warnings = Arc::new(Warnings::default());
    tracing::subscriber::set_global_default(warnings.clone()).expect("the only subscriber");
    let clock = ManualClock::new(1_000_000);
    // Room for five of these records.
    let store = MemoryStore::builder()
        .clock(clock.clone())
        .max_bytes(4 * 1024)
        .build();
    for i in 0..5 {
        complete_new(&store, &format!("short-{i}"), Duration::from_secs(1));
    }
    clock.advance(Duration::from_secs(2));
    for i in 0..5 {
        complete_new(&store, &format!("long-{i}"), Duration::from_secs(600));
    }
    let logged = warnings.0.lock().unwrap().clone();
    assert_eq!(logged, Vec::<String>::new(), "expired records are no loss");
    for i in 0..20 {
        complete_new(&store, &format!("more-{i}"), Duration::from_secs(600));
    }
    let logged = warnings.0.lock().unwrap().clone();
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
