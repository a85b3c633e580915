// A store kept as a `SharedStore` (an application state that holds it, so
// that its tests can put a `MockStore` there) is not a `Store` itself: the
// error says where it goes instead.
use std::sync::Arc;

use idempotent_core::Idempotency;
use idempotent_core::store::{MemoryStore, SharedStore};

#[derive(Clone)]
struct AppState {
    store: SharedStore,
}

fn main() {
    let state = AppState {
        store: Arc::new(MemoryStore::new()),
    };
    let _idempotency = Idempotency::new(state.store.clone());
}
