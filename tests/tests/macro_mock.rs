//! Unit-testing an `#[idempotent]` handler with `MockStore`: no sleeping,
//! no real backend, and the store's view of what happened.

use std::time::Duration;

#[path = "../../idempotent-core/tests/support/events.rs"]
mod events;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::idempotent;
use idempotent_core::testing::{ClaimOutcome, MockStore, OpKind, Operation};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

#[derive(Serialize, Deserialize)]
struct Charge {
    amount: u64,
}

#[idempotent(ttl = "24h", scope = "api_key")]
async fn charge(Json(charge): Json<Charge>) -> (StatusCode, Json<u64>) {
    (StatusCode::CREATED, Json(charge.amount))
}

#[idempotent(ttl = "24h", scope = "api_key")]
async fn flaky(Json(charge): Json<Charge>) -> StatusCode {
    if charge.amount == 0 {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::CREATED
    }
}

fn app(store: &MockStore) -> Router {
    app_on(store.layer())
}

/// The app behind `idempotency`, a handle a test keeps (for `drain`).
fn app_on(idempotency: idempotent_core::Idempotency) -> Router {
    Router::new()
        .route("/charges", post(charge))
        .route("/flaky", post(flaky))
        .layer(idempotency)
}

async fn post_charge(app: &Router, uri: &str, key: &str, amount: u64) -> StatusCode {
    let request = Request::post(uri)
        .header("idempotency-key", key)
        .header("x-api-key", "test-caller")
        .header("content-type", "application/json")
        .body(Body::from(format!(r#"{{"amount":{amount}}}"#)))
        .unwrap();
    app.clone().oneshot(request).await.unwrap().status()
}

#[tokio::test]
async fn the_documented_lifecycle() {
    let store = MockStore::new();
    let app = app(&store);

    // First call executes.
    assert_eq!(
        post_charge(&app, "/charges", "k1", 100).await,
        StatusCode::CREATED
    );
    store.assert_executed_once();
    // A retry replays without running the handler.
    assert_eq!(
        post_charge(&app, "/charges", "k1", 100).await,
        StatusCode::CREATED
    );
    store.assert_executed_once();
    assert_eq!(store.claims(ClaimOutcome::Completed), 1);
    // A different payload under the same key is refused.
    let conflict = post_charge(&app, "/charges", "k1", 250).await;
    assert_eq!(conflict, StatusCode::UNPROCESSABLE_ENTITY);
    store.assert_executed_once();
    // After the TTL the key is new again: no sleeping, the clock moves.
    store.advance(Duration::from_secs(24 * 3600 + 1));
    assert_eq!(
        post_charge(&app, "/charges", "k1", 250).await,
        StatusCode::CREATED
    );
    store.assert_executed(2);
    // A store failure answers 503 and runs nothing.
    store.fail_next(OpKind::Claim);
    let outage = post_charge(&app, "/charges", "k2", 100).await;
    assert_eq!(outage, StatusCode::SERVICE_UNAVAILABLE);
    store.assert_executed(2);
    // The retry after the outage runs.
    assert_eq!(
        post_charge(&app, "/charges", "k2", 100).await,
        StatusCode::CREATED
    );
    store.assert_executed(3);
}

#[tokio::test]
async fn the_log_shows_each_call_in_order() {
    let store = MockStore::new();
    let app = app(&store);
    post_charge(&app, "/charges", "k", 1).await;
    post_charge(&app, "/charges", "k", 1).await;
    assert_eq!(
        store.operations(),
        [
            Operation::Claim {
                outcome: ClaimOutcome::Acquired
            },
            Operation::Complete {
                status: StatusCode::CREATED
            },
            Operation::Claim {
                outcome: ClaimOutcome::Completed
            },
        ]
    );
    store.clear_operations();
    assert!(store.operations().is_empty());
}

#[tokio::test]
async fn a_server_error_is_released_and_the_retry_runs_again() {
    let store = MockStore::new();
    let app = app(&store);
    assert_eq!(
        post_charge(&app, "/flaky", "k", 0).await,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(store.count(OpKind::Release), 1);
    assert_eq!(store.count(OpKind::Complete), 0);
    post_charge(&app, "/flaky", "k", 0).await;
    store.assert_executed(2);
}

#[tokio::test]
async fn an_outage_refuses_everything_until_it_ends() {
    let store = MockStore::new();
    let app = app(&store);
    store.fail_all(true);
    for key in ["a", "b", "c"] {
        let status = post_charge(&app, "/charges", key, 1).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(store.failures(), 3);
    store.assert_executed(0);
    store.fail_all(false);
    assert_eq!(
        post_charge(&app, "/charges", "a", 1).await,
        StatusCode::CREATED
    );
}

/// Fails the next `attempts` completions.
fn fail_completions(store: &MockStore, attempts: usize) {
    for _ in 0..attempts {
        store.fail_next(OpKind::Complete);
    }
}

/// Storing is tried four times before the caller gets the response (after
/// 50, 200 and 800 ms pauses, paused time here), then on for a lease with
/// longer pauses (at most a dozen attempts in 60 s): a store that fails
/// them all loses the outcome.
fn fail_every_completion_attempt(store: &MockStore) {
    fail_completions(store, 32);
}

#[tokio::test(start_paused = true)]
async fn a_complete_that_fails_once_is_tried_again() {
    let store = MockStore::new();
    let app = app(&store);
    store.fail_next(OpKind::Complete);
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CREATED
    );
    assert_eq!(store.failures(), 1);
    assert_eq!(
        store.operations().last(),
        Some(&Operation::Complete {
            status: StatusCode::CREATED
        })
    );
    store.advance(Duration::from_secs(61));
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CREATED
    );
    store.assert_executed_once();
}

/// A store that fails over or restarts takes longer than the attempts the
/// caller waits for: storing goes on after the caller got its response,
/// and a retry once the store answers again replays it.
#[tokio::test(start_paused = true)]
async fn a_complete_that_fails_past_the_first_attempts_is_stored_later() {
    let store = MockStore::new();
    let app = app(&store);
    fail_completions(&store, 6);
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CREATED
    );
    assert_eq!(store.failures(), 4, "the caller waits for four attempts");
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CONFLICT
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(store.failures(), 6);
    assert_eq!(
        store.operations().last(),
        Some(&Operation::Complete {
            status: StatusCode::CREATED
        })
    );
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CREATED
    );
    store.assert_executed_once();
}

/// A drain does not wait a lease for a response the store will not take:
/// storing it gets one last attempt at once, and is then given up.
#[tokio::test(start_paused = true)]
async fn a_drain_has_a_response_still_being_stored_tried_once_more_at_once() {
    let store = MockStore::new();
    let idempotency = store.layer();
    let app = app_on(idempotency.clone());
    fail_completions(&store, 6);
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CREATED
    );
    assert_eq!(store.failures(), 4);
    let draining = tokio::time::Instant::now();
    idempotency.drain().await;
    assert!(
        draining.elapsed() < Duration::from_millis(100),
        "{:?}",
        draining.elapsed()
    );
    assert_eq!(store.failures(), 5, "one last attempt, then given up");
}

#[tokio::test(start_paused = true)]
async fn a_lost_complete_holds_the_key_until_the_lease_lapses() {
    let store = MockStore::new();
    let app = app(&store);
    // The handler runs but its response cannot be stored, however often
    // it is tried.
    fail_every_completion_attempt(&store);
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CREATED
    );
    // The claim is still held, so a retry is told to come back later...
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CONFLICT
    );
    store.assert_executed_once();
    // ...storing is given up a lease later...
    tokio::time::sleep(Duration::from_secs(61)).await;
    let attempts = store.failures();
    assert_eq!(
        attempts, 14,
        "4 before the caller got its response, 10 after"
    );
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(store.failures(), attempts, "given up");
    // ...and after the lease lapses it runs again.
    store.advance(Duration::from_secs(61));
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CREATED
    );
    store.assert_executed(2);
}

#[tokio::test]
async fn fail_next_call_fails_whatever_comes_next_once() {
    let store = MockStore::new();
    let app = app(&store);
    store.fail_next_call();
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CREATED
    );
}

#[tokio::test(start_paused = true)]
async fn a_store_slower_than_the_timeout_is_an_outage() {
    let store = MockStore::new();
    let app = Router::new().route("/charges", post(charge)).layer(
        idempotent_core::Idempotency::builder(store.clone())
            .store_timeout(Duration::from_millis(100))
            .build(),
    );
    store.set_delay(Duration::from_secs(1));
    let status = post_charge(&app, "/charges", "k", 5).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    store.assert_executed(0);
    store.set_delay(Duration::ZERO);
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CREATED
    );
}

#[tokio::test]
#[should_panic(
    expected = "expected the handler to run 1 time(s) but the store let it run 2 time(s)"
)]
async fn assert_executed_once_fails_when_the_handler_ran_twice() {
    let store = MockStore::new();
    let app = app(&store);
    post_charge(&app, "/charges", "a", 1).await;
    post_charge(&app, "/charges", "b", 1).await;
    store.assert_executed_once();
}

#[idempotent(scope = "global", lease = "5s")]
async fn short_lease(Json(charge): Json<Charge>) -> (StatusCode, Json<u64>) {
    (StatusCode::CREATED, Json(charge.amount))
}

#[tokio::test(start_paused = true)]
async fn the_lease_option_sets_how_long_an_orphaned_claim_holds() {
    let store = MockStore::new();
    let app = Router::new()
        .route("/charges", post(short_lease))
        .layer(store.layer());
    // The outcome is lost, as if the process died before storing it.
    fail_every_completion_attempt(&store);
    post_charge(&app, "/charges", "k", 5).await;
    store.advance(Duration::from_secs(4));
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CONFLICT
    );
    store.advance(Duration::from_secs(2));
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CREATED
    );
    store.assert_executed(2);
}

/// Posts a charge of 100 under `key` with its `Content-Length`, as clients
/// send it: a key's third replay onwards is then an exact repeat, read
/// with `get` instead of claimed.
async fn post_sized(app: &Router, key: &str) -> StatusCode {
    let body = r#"{"amount":100}"#;
    let request = Request::post("/charges")
        .header("idempotency-key", key)
        .header("x-api-key", "test-caller")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Body::from(body))
        .unwrap();
    app.clone().oneshot(request).await.unwrap().status()
}

/// The mock's app after `k1` was sent until its exact repeats are read
/// with `get`.
async fn with_exact_repeats(store: &MockStore) -> Router {
    let app = app(store);
    for _ in 0..4 {
        assert_eq!(post_sized(&app, "k1").await, StatusCode::CREATED);
    }
    assert_eq!(store.count(OpKind::Get), 1, "{:?}", store.operations());
    app
}

#[tokio::test]
async fn an_injected_claim_failure_also_fails_an_exact_repeat() {
    let store = MockStore::new();
    let app = with_exact_repeats(&store).await;
    store.fail_next(OpKind::Claim);
    assert_eq!(
        post_sized(&app, "k1").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // The fault is spent: the next new key runs.
    assert_eq!(post_sized(&app, "k2").await, StatusCode::CREATED);
    assert_eq!(store.executions(), 2);
}

#[tokio::test]
async fn in_flight_next_also_holds_the_key_of_an_exact_repeat() {
    let store = MockStore::new();
    let app = with_exact_repeats(&store).await;
    store.in_flight_next();
    assert_eq!(post_sized(&app, "k1").await, StatusCode::CONFLICT);
    assert_eq!(store.claims(ClaimOutcome::InFlight), 1);
    // The held claim is spent: the next new key runs.
    assert_eq!(post_sized(&app, "k2").await, StatusCode::CREATED);
    assert_eq!(store.executions(), 2);
}

#[tokio::test]
async fn in_flight_next_answers_a_claim_as_held_by_a_duplicate() {
    let store = MockStore::new();
    let app = app(&store);
    store.in_flight_next();
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CONFLICT
    );
    assert_eq!(store.claims(ClaimOutcome::InFlight), 1);
    store.assert_executed(0);
    // Only that claim: a retry runs.
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CREATED
    );
    store.assert_executed_once();
}

#[idempotent(scope = "global", wait = "5s")]
async fn waiting(Json(charge): Json<Charge>) -> (StatusCode, Json<u64>) {
    (StatusCode::CREATED, Json(charge.amount))
}

#[tokio::test(start_paused = true)]
async fn a_waiting_endpoint_asks_again_after_in_flight_next() {
    let store = MockStore::new();
    let app = Router::new()
        .route("/charges", post(waiting))
        .layer(store.layer());
    store.in_flight_next();
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CREATED
    );
    assert_eq!(store.claims(ClaimOutcome::InFlight), 1);
    store.assert_executed_once();
}

/// A retry that takes the key once the lease lapsed, while the first
/// run's response is still being stored, runs the handler again: the log
/// must say the request may have run twice, not that the first response
/// was stored.
#[tokio::test(start_paused = true)]
async fn a_retry_that_took_the_lapsed_key_while_storing_went_on_is_logged_as_lost() {
    let (events, _guard) = events::Events::on_this_thread();
    let store = MockStore::new();
    let app = app(&store);
    fail_completions(&store, 4);
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CREATED
    );
    store.advance(Duration::from_secs(61));
    assert_eq!(
        post_charge(&app, "/charges", "k", 5).await,
        StatusCode::CREATED
    );
    store.assert_executed(2);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let outcomes: Vec<String> = events
        .take_at_least(tracing::Level::TRACE)
        .iter()
        .filter_map(|event| {
            Some(format!(
                "{}:{}:{}",
                event.level,
                event.field("outcome")?,
                event.message()
            ))
        })
        .collect();
    let lost = outcomes.iter().find(|o| o.starts_with("ERROR:lease_lost:"));
    let lost = lost.unwrap_or_else(|| panic!("{outcomes:#?}"));
    assert!(
        lost.contains("which is harmless") && lost.contains("the request ran twice"),
        "{lost}"
    );
    assert!(
        !outcomes.iter().any(|o| o.starts_with("INFO:executed")),
        "{outcomes:#?}"
    );
}
