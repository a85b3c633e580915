//! `MockStore` outages of one kind of call: a store that takes claims but
//! cannot store a response, cannot take claims at all, or answers a claim
//! so late that the renewal confirming it fails.
#![cfg(all(feature = "test-util", feature = "macros"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::testing::{Fault, MockStore, OpKind, Operation};
use idempotent_core::{Idempotency, idempotent};
use tower::ServiceExt;

/// How many charges the handler made.
type Charges = Arc<AtomicUsize>;

#[idempotent(scope = "global")]
async fn charge(
    State(charges): State<Charges>,
    Json(amount): Json<u64>,
) -> (StatusCode, Json<u64>) {
    charges.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, Json(amount))
}

fn app(store: &MockStore, charges: &Charges) -> Router {
    Router::new()
        .route("/charges", post(charge))
        .with_state(charges.clone())
        .layer(store.layer())
}

/// The same charge on a one-second lease: a store that answers in 400 ms
/// answers a claim after its first renewal fell due, a third of a second
/// in.
#[idempotent(scope = "global", lease = "1s")]
async fn charge_on_a_short_lease(
    State(charges): State<Charges>,
    Json(amount): Json<u64>,
) -> (StatusCode, Json<u64>) {
    charges.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, Json(amount))
}

fn failing_open(store: &MockStore, charges: &Charges) -> Router {
    let idempotency = Idempotency::builder(store.clone()).fail_open(true).build();
    Router::new()
        .route("/charges", post(charge_on_a_short_lease))
        .with_state(charges.clone())
        .layer(idempotency)
}

/// POSTs a charge of 100 under `Idempotency-Key: k1`, declaring its
/// length, as clients do, so that repeats of a replayed one are exact.
async fn send(app: &Router) -> StatusCode {
    let request = Request::post("/charges")
        .header("idempotency-key", "k1")
        .header("content-type", "application/json")
        .header("content-length", "3")
        .body(Body::from("100"))
        .unwrap();
    app.clone().oneshot(request).await.unwrap().status()
}

#[tokio::test(start_paused = true)]
async fn completions_that_keep_failing_store_nothing_and_hold_the_key() {
    let (store, charges) = (MockStore::new(), Charges::default());
    let app = app(&store, &charges);
    store.fail_every(OpKind::Complete);
    assert_eq!(send(&app).await, StatusCode::CREATED);
    assert_eq!(send(&app).await, StatusCode::CONFLICT);
    assert_eq!(charges.load(Ordering::SeqCst), 1);
    assert_eq!(store.count(OpKind::Complete), 0);
    let failed = store
        .faults()
        .iter()
        .filter(|fault| **fault == (OpKind::Complete, Fault::Unavailable))
        .count();
    assert!(
        failed > 1,
        "the engine tried to store the response {failed} time(s)"
    );
}

#[tokio::test(start_paused = true)]
async fn ending_the_outage_lets_the_response_be_stored() {
    let (store, charges) = (MockStore::new(), Charges::default());
    let app = app(&store, &charges);
    store.fail_every_with(OpKind::Complete, Fault::Timeout);
    assert_eq!(send(&app).await, StatusCode::CREATED);
    store.fail_all(false);
    // The engine goes on storing the response in the background.
    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    assert_eq!(store.count(OpKind::Complete), 1);
    assert_eq!(send(&app).await, StatusCode::CREATED);
    assert_eq!(charges.load(Ordering::SeqCst), 1);
    store.assert_executed_once();
}

#[tokio::test]
async fn an_outage_of_claims_fails_exact_repeats_too() {
    let (store, charges) = (MockStore::new(), Charges::default());
    let app = app(&store, &charges);
    // Replayed twice, so that the engine answers the next exact repeat
    // with a read before it claims.
    for _ in 0..3 {
        assert_eq!(send(&app).await, StatusCode::CREATED);
    }
    store.clear_operations();
    store.fail_every(OpKind::Claim);
    for _ in 0..2 {
        assert_eq!(send(&app).await, StatusCode::SERVICE_UNAVAILABLE);
    }
    let failed = [
        Operation::Failed { op: OpKind::Get },
        Operation::Failed { op: OpKind::Claim },
    ];
    assert_eq!(store.operations(), [failed.clone(), failed].concat());
    assert_eq!(charges.load(Ordering::SeqCst), 1);
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
