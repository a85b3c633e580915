//! A request's lifecycle around the engine where the store is slow or
//! fails between the claim and the handler, through `MockStore` on
//! tokio's paused clock.
#![cfg(all(feature = "test-util", feature = "macros"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::testing::{MockStore, OpKind};
use idempotent_core::{Idempotency, idempotent};
use tower::ServiceExt;

/// How many charges the handler made.
type Charges = Arc<AtomicUsize>;

/// A one-second lease: a store that answers in 400 ms answers a claim
/// after its first renewal fell due, a third of a second in.
#[idempotent(scope = "global", lease = "1s")]
async fn charge(
    State(charges): State<Charges>,
    Json(amount): Json<u64>,
) -> (StatusCode, Json<u64>) {
    charges.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, Json(amount))
}

fn failing_open(store: &MockStore, charges: &Charges) -> Router {
    let idempotency = Idempotency::builder(store.clone()).fail_open(true).build();
    Router::new()
        .route("/charges", post(charge))
        .with_state(charges.clone())
        .layer(idempotency)
}

async fn send(app: &Router) -> StatusCode {
    let request = Request::post("/charges")
        .header("idempotency-key", "k1")
        .header("content-type", "application/json")
        .body(Body::from("100"))
        .unwrap();
    app.clone().oneshot(request).await.unwrap().status()
}

/// The claim is answered at 0.4 s, after its first renewal fell due, so
/// the engine renews it before the handler runs; that renewal, slower
/// than the third of a second it is given, times out. The store failed
/// while the key was being claimed, and nothing ran: with `fail_open`,
/// the handler runs without idempotency, as after a claim that failed,
/// instead of the 503 that `fail_open` is there to spare.
#[tokio::test(start_paused = true)]
async fn with_fail_open_a_late_claim_whose_renewal_times_out_runs_the_handler() {
    let (store, charges) = (MockStore::new(), Charges::default());
    let app = failing_open(&store, &charges);
    store.set_delay(Duration::from_millis(400));

    let status = send(&app).await;

    assert_eq!(
        status,
        StatusCode::CREATED,
        "a slow store was answered with its error despite fail_open"
    );
    assert_eq!(charges.load(Ordering::SeqCst), 1);
    assert_eq!(
        store.count(OpKind::Complete),
        0,
        "a fail-open run stores nothing"
    );
}

/// The same with a renewal that fails at once: the handler runs.
#[tokio::test(start_paused = true)]
async fn with_fail_open_a_late_claim_whose_renewal_fails_runs_the_handler() {
    let (store, charges) = (MockStore::new(), Charges::default());
    let app = failing_open(&store, &charges);
    store.set_delay(Duration::from_millis(400));
    store.fail_next(OpKind::Renew);

    let status = send(&app).await;

    assert_eq!(
        status,
        StatusCode::CREATED,
        "a failing store was answered with its error despite fail_open"
    );
    assert_eq!(charges.load(Ordering::SeqCst), 1);
}
