//! The lease's renewals run on a task of their own, aborted once the
//! record is stored or the key released; a renewal already under way then
//! meets the stored record, or none. A process of its own: the subscriber
//! that records the events is global, since the renewal task logs from
//! whichever worker runs it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::record::{LeaseToken, RecordKey};
use idempotent_core::store::{MemoryStore, Store, StoreError};
use idempotent_core::{Endpoint, Idempotency, IdempotentRequest};
use serde_json::{Value, json};
use tower::ServiceExt;

#[path = "support/events.rs"]
mod events;
use events::Events;
#[path = "support/forwarding.rs"]
mod forwarding;
use forwarding::{Forwarding, Hooks};

/// A memory store whose renewals hold their thread for 400 ms, as a
/// renewal whose reply is on its way while the record is stored.
#[derive(Clone, Default)]
struct SlowRenewals {
    inner: MemoryStore,
    renewals: Arc<AtomicUsize>,
}

impl Hooks for SlowRenewals {
    type Inner = MemoryStore;

    fn inner(&self) -> &MemoryStore {
        &self.inner
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.renewals.fetch_add(1, Ordering::SeqCst);
        tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(400)));
        self.inner.renew(key, token, lease).await
    }
}

/// Answers `status` after 600 ms, while the first renewal (due at 500 ms
/// of a 1.5 s lease) holds its thread until 900 ms.
async fn pay(
    State((endpoint, status)): State<(Endpoint, StatusCode)>,
    idem: IdempotentRequest,
    Json(input): Json<Value>,
) -> Response {
    let fingerprint = endpoint.fingerprint(&input);
    idem.run(&endpoint, fingerprint, async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        (status, Json(json!({"paid": true}))).into_response()
    })
    .await
}

/// One test for both cases: the subscriber is the process's global one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewal_that_meets_its_own_settled_claim_reports_no_lost_lease() {
    let events = events::events();
    // The record is stored while the renewal is under way.
    let logged = overlapping_renewal(&events, StatusCode::CREATED).await;
    assert!(
        !logged.iter().any(|outcome| outcome == "lease_lost"),
        "a stored record was reported as a lost lease: {logged:?}"
    );
    // The key is released (a status that is not final) while it is.
    let logged = overlapping_renewal(&events, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(
        !logged.iter().any(|outcome| outcome == "lease_lost"),
        "a released key was reported as a lost lease: {logged:?}"
    );
}

/// Runs one request answering `status` while its first renewal is under
/// way; the outcomes it logged.
async fn overlapping_renewal(events: &Events, status: StatusCode) -> Vec<String> {
    events.take_at_least(tracing::Level::TRACE);
    let store = SlowRenewals::default();
    let renewals = store.renewals.clone();
    let endpoint = Endpoint::new("pay").lease(Duration::from_millis(1_500));
    let app = Router::new()
        .route("/pay", post(pay))
        .with_state((endpoint, status))
        .layer(Idempotency::new(Forwarding(store)));
    let request = Request::post("/pay")
        .header("content-type", "application/json")
        .header("x-api-key", "caller-1")
        .header("idempotency-key", "k")
        .body(Body::from(json!({"amount": 1}).to_string()))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), status);
    // The renewal under way when the record was settled finishes.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(renewals.load(Ordering::SeqCst), 1, "one renewal overlapped");
    let logged = events.take_at_least(tracing::Level::TRACE);
    let outcomes = logged.iter().filter_map(|event| event.field("outcome"));
    outcomes.map(str::to_owned).collect()
}
