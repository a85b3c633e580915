//! Records written straight into a memory store, whose futures are ready at
//! once, for the tests that fill one without a runtime.
#![allow(dead_code, unreachable_pub)] // each test file uses a different part

use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use idempotent_core::record::{Claim, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::Store;
use idempotent_core::{Fingerprint, IdempotencyKey};

/// The memory store's futures are ready at once.
pub fn now<T>(future: impl Future<Output = T>) -> T {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("the memory store answers at once"),
    }
}

/// The payload every record of [`complete_new`] was completed for.
pub const COMPLETED_PAYLOAD: Fingerprint = Fingerprint::from_bytes([1; 32]);

/// Claims the new key `name` for [`COMPLETED_PAYLOAD`] and completes it
/// with a 200 carrying `body`, kept for `ttl`: the key.
pub fn complete_new(
    store: &impl Store,
    name: &str,
    body: &'static [u8],
    ttl: Duration,
) -> RecordKey {
    let key = RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(name.as_bytes()).unwrap(),
    );
    let lease = Duration::from_secs(10);
    let Ok(Claim::Acquired(token)) = now(store.claim(&key, COMPLETED_PAYLOAD, lease)) else {
        panic!("{name} is new");
    };
    let response = StoredResponse::new(StatusCode::OK, Vec::new(), Some(Bytes::from_static(body)));
    now(store.complete(&key, token, response, ttl)).unwrap();
    key
}
