//! A response that could not be stored before its caller got it, during an
//! outage that failed the lease's renewals too: storing it goes on after
//! the caller's answer, and the lease must go on being renewed without a
//! gap, or it lapses once the store is back and a retry runs the charge a
//! second time.

use crate::macro_support;

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::idempotent;
use idempotent_core::testing::{MockStore, OpKind};
use macro_support::Turnstile;
use tokio::time::Instant;

/// How long a test waits for something that must happen before it calls
/// it a failure: never a synchronisation, only a bound on a hang.
const HANG: Duration = Duration::from_secs(10);
/// Shorter than a renewal's retry after a failure (an eighth of a third
/// of the three-second lease), so that the store's clock keeps pace.
const STEP: Duration = Duration::from_millis(25);

/// Counts runs; the first signals that it started, then waits at a
/// gate, closed at first.
#[derive(Clone, Default)]
struct Runs {
    count: macro_support::Runs,
    first: Turnstile,
}

#[idempotent(scope = "global", lease = "3s")]
async fn charge(State(runs): State<Runs>, Json(amount): Json<u64>) -> (StatusCode, String) {
    let run = runs.count.bump();
    if run == 1 {
        runs.first.pass().await;
    }
    (StatusCode::CREATED, format!("run {run} amount {amount}"))
}

fn charging() -> Request<Body> {
    Request::post("/charges")
        .header("content-type", "application/json")
        .header("idempotency-key", "order-7")
        .body(Body::from("7"))
        .unwrap()
}

/// The status, whether it is a replay, and the body.
async fn send(app: Router) -> (StatusCode, bool, String) {
    let reply = macro_support::send(&app, charging()).await;
    (reply.status, reply.replayed, reply.body)
}

/// Moves the store's clock and tokio's together, a step at a time, until
/// `done` or, without it, until `until`: a lease then holds only while it
/// is renewed, as on a real store.
async fn pass(store: &MockStore, until: Instant, done: impl Fn() -> bool) {
    while Instant::now() < until && !done() {
        store.advance(STEP);
        tokio::time::sleep(STEP).await;
    }
}

/// The lease (three seconds) is renewed only while the store answers: an
/// outage fails every renewal and the first attempts to store the
/// response, the caller gets its 201, and the store comes back while the
/// lease still holds. The renewals must go on at once, as they did while
/// the handler ran; waiting a third of a lease from the hand-over, they
/// came after the lease lapsed, and a retry then took the key over and
/// charged again.
#[tokio::test(start_paused = true)]
async fn a_response_stored_later_keeps_its_lease_renewed_once_the_store_is_back() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = Router::new()
        .route("/charges", post(charge))
        .with_state(runs.clone())
        .layer(store.layer());
    let claimed = Instant::now();
    store.fail_every(OpKind::Renew);
    store.fail_every(OpKind::Complete);
    let first = tokio::spawn(send(app.clone()));
    runs.first.until_started().await;
    // Past half the lease: what renewals the outage failed leave little.
    pass(&store, claimed + Duration::from_millis(1_600), || false).await;
    runs.first.let_through(1);
    pass(&store, claimed + HANG, || first.is_finished()).await;
    let first = first.await.unwrap();
    assert_eq!(first, (StatusCode::CREATED, false, "run 1 amount 7".into()));
    assert_eq!(store.count(OpKind::Complete), 0, "{:?}", store.operations());
    // The store is back before the lease, last renewed by the claim,
    // lapses; the response is still waiting for its next attempt.
    store.fail_all(false);
    pass(&store, claimed + Duration::from_millis(3_100), || false).await;
    let during = send(app.clone()).await;
    assert_eq!(during.0, StatusCode::CONFLICT, "{during:?}");

    pass(&store, claimed + Duration::from_secs(5), || false).await;
    let retry = send(app).await;
    assert_eq!(retry, (StatusCode::CREATED, true, "run 1 amount 7".into()));
    store.assert_executed_once();
}
