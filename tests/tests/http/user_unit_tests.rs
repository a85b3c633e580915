//! An application's unit tests of its `#[idempotent]` payment handler,
//! written against the public testing API only (`MockStore`,
//! `TestRequest`, `Fault`, `OpKind`), as the README's "Unit-testing a
//! handler" shows: a retry replays, a changed payload is refused, a store
//! that fails at the completion, a duplicate still running, the TTL
//! passing on the mock's clock.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::to_bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::testing::{Fault, MockStore, OpKind, Operation, TestRequest};
use idempotent_core::{IDEMPOTENT_REPLAYED, Idempotency, idempotent};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower::ServiceExt;

// ===== the application under test =====

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct NewPayment {
    amount: u64,
    currency: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Payment {
    id: String,
    amount: u64,
    currency: String,
}

/// The payments made: the side effect that must happen once per key.
#[derive(Clone, Default)]
struct Ledger(Arc<Mutex<Vec<Payment>>>);

impl Ledger {
    fn charge(&self, request: NewPayment) -> Payment {
        let mut payments = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let payment = Payment {
            id: format!("pay_{}", payments.len() + 1),
            amount: request.amount,
            currency: request.currency,
        };
        payments.push(payment.clone());
        payment
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// The application's error: a `4xx` is final, so it is stored and
/// replayed too.
enum ApiError {
    ZeroAmount,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::ZeroAmount => {
                (StatusCode::BAD_REQUEST, "amount must be positive").into_response()
            }
        }
    }
}

#[idempotent(ttl = "24h", scope = "api_key")]
async fn create_payment(
    State(ledger): State<Ledger>,
    Json(request): Json<NewPayment>,
) -> Result<(StatusCode, Json<Payment>), ApiError> {
    if request.amount == 0 {
        return Err(ApiError::ZeroAmount);
    }
    Ok((StatusCode::CREATED, Json(ledger.charge(request))))
}

/// The application's router, built as the server builds it, with the
/// idempotency layer it is given.
fn app(ledger: &Ledger, idempotency: Idempotency) -> Router {
    Router::new()
        .route("/payments", post(create_payment))
        .with_state(ledger.clone())
        .layer(idempotency)
}

// ===== what the tests share =====

const CALLER: &str = "sk_test_1";

fn caller() -> ScopeDigest {
    ScopeDigest::api_key(CALLER.as_bytes())
}

/// A payment of `amount` euros under `key`, from `CALLER`.
fn payment(key: &str, amount: u64) -> TestRequest {
    TestRequest::post("/payments")
        .key(key)
        .api_key(CALLER)
        .json(&json!({"amount": amount, "currency": "EUR"}))
}

/// What the client got: status, whether it is a replay, and the body.
struct Reply {
    status: StatusCode,
    replayed: bool,
    retry_after: bool,
    body: Value,
}

async fn send(app: &Router, request: &TestRequest) -> Reply {
    let response = app.clone().oneshot(request.build()).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    let retry_after = response.headers().contains_key("retry-after");
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        replayed,
        retry_after,
        body,
    }
}

/// The body stored for `key` from `CALLER`, as JSON.
fn stored_body(store: &MockStore, key: &str) -> Value {
    let stored = store
        .stored_response(caller(), key)
        .expect("a stored response");
    serde_json::from_slice(&stored.body.expect("a stored body")).unwrap()
}

// ===== the tests =====

#[tokio::test]
async fn a_retry_replays_the_payment_without_charging_twice() {
    let (store, ledger) = (MockStore::new(), Ledger::default());
    let app = app(&ledger, store.layer());

    let first = send(&app, &payment("k1", 100)).await;
    let retry = send(&app, &payment("k1", 100)).await;

    assert_eq!((first.status, first.replayed), (StatusCode::CREATED, false));
    assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, true));
    assert_eq!(retry.body, first.body);
    assert_eq!(first.body["id"], "pay_1");
    assert_eq!(ledger.count(), 1);
    store.assert_executed_once();
    let stored = store.stored_response(caller(), "k1").unwrap();
    assert_eq!(stored.status, StatusCode::CREATED);
    assert_eq!(stored_body(&store, "k1"), first.body);
}

#[tokio::test]
async fn a_refused_payment_is_replayed_too() {
    let (store, ledger) = (MockStore::new(), Ledger::default());
    let app = app(&ledger, store.layer());
    send(&app, &payment("k1", 0)).await;
    let retry = send(&app, &payment("k1", 0)).await;
    assert_eq!(
        (retry.status, retry.replayed),
        (StatusCode::BAD_REQUEST, true)
    );
    let stored = store.stored_response(caller(), "k1").unwrap();
    assert_eq!(stored.status, StatusCode::BAD_REQUEST);
    assert_eq!(stored.body.unwrap(), "amount must be positive");
    store.assert_executed_once();
}

#[tokio::test]
async fn a_changed_payload_under_the_same_key_is_refused_with_422() {
    let (store, ledger) = (MockStore::new(), Ledger::default());
    let app = app(&ledger, store.layer());
    send(&app, &payment("k1", 100)).await;

    let changed = send(&app, &payment("k1", 250)).await;

    assert_eq!(changed.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(changed.body["type"], "urn:idempotent:key-reused");
    assert_eq!(ledger.count(), 1);
    assert_eq!(stored_body(&store, "k1")["amount"], 100, "the first stays");
}

#[tokio::test]
async fn two_callers_may_use_one_key() {
    let (store, ledger) = (MockStore::new(), Ledger::default());
    let app = app(&ledger, store.layer());
    send(&app, &payment("k1", 100)).await;
    let other = payment("k1", 100).api_key("sk_test_2");
    assert_eq!(send(&app, &other).await.status, StatusCode::CREATED);
    assert_eq!(ledger.count(), 2);
    let theirs = store.stored_response(ScopeDigest::api_key(b"sk_test_2"), "k1");
    assert_eq!(theirs.unwrap().status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_caller_sending_basic_credentials_has_its_stored_response_found_by_its_request() {
    let (store, ledger) = (MockStore::new(), Ledger::default());
    let app = app(&ledger, store.layer());
    // `curl -u sk_test_1:`: the key as the Basic user name.
    let basic = TestRequest::post("/payments")
        .key("k1")
        .header("authorization", "Basic c2tfdGVzdF8xOg==")
        .json(&json!({"amount": 100, "currency": "EUR"}));
    assert_eq!(send(&app, &basic).await.status, StatusCode::CREATED);

    let stored = store.stored_response(basic.api_key_scope(), "k1");
    assert_eq!(stored.unwrap().status, StatusCode::CREATED);
    assert!(
        store.stored_response(caller(), "k1").is_none(),
        "a caller apart from the same key sent as `X-Api-Key`"
    );
    assert_eq!(payment("k1", 100).api_key_scope(), caller());
    let bearer = TestRequest::post("/payments").header("authorization", "Bearer sk_test_1");
    assert_eq!(bearer.api_key_scope(), caller());
}

#[test]
#[should_panic(expected = "names no caller")]
fn the_scope_of_a_request_without_an_api_key_is_a_mistake_in_the_test() {
    let _ = TestRequest::post("/payments").key("k1").api_key_scope();
}

#[tokio::test]
async fn a_payment_without_an_api_key_is_refused_and_not_charged() {
    let (store, ledger) = (MockStore::new(), Ledger::default());
    let app = app(&ledger, store.layer());
    let anonymous = TestRequest::post("/payments")
        .key("k1")
        .json(&json!({"amount": 100, "currency": "EUR"}));
    let refused = send(&app, &anonymous).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(ledger.count(), 0);
}

#[tokio::test]
async fn a_completion_that_fails_once_is_tried_again_and_the_retry_replays() {
    let (store, ledger) = (MockStore::new(), Ledger::default());
    let app = app(&ledger, store.layer());
    store.fail_next_with(OpKind::Complete, Fault::Timeout);

    let first = send(&app, &payment("k1", 100)).await;
    let retry = send(&app, &payment("k1", 100)).await;

    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, true));
    assert_eq!(store.faults(), [(OpKind::Complete, Fault::Timeout)]);
    assert_eq!(store.count(OpKind::Complete), 1);
    assert_eq!(ledger.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_never_completes_answers_the_client_and_holds_the_key() {
    let (store, ledger) = (MockStore::new(), Ledger::default());
    let app = app(&ledger, store.layer());
    store.fail_every(OpKind::Complete);

    let first = send(&app, &payment("k1", 100)).await;
    let retry = send(&app, &payment("k1", 100)).await;

    assert_eq!(first.status, StatusCode::CREATED, "the handler's answer");
    assert_eq!(retry.status, StatusCode::CONFLICT, "never a second charge");
    assert!(retry.retry_after);
    assert!(store.stored_response(caller(), "k1").is_none());
    assert_eq!(store.memory().in_flight_len(), 1);
    assert_eq!(ledger.count(), 1);
}

#[tokio::test]
async fn a_duplicate_while_the_first_still_runs_gets_409() {
    let (store, ledger) = (MockStore::new(), Ledger::default());
    let app = app(&ledger, store.layer());
    store.in_flight_next();

    let duplicate = send(&app, &payment("k1", 100)).await;

    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    assert_eq!(duplicate.body["type"], "urn:idempotent:request-in-progress");
    assert!(duplicate.retry_after);
    assert_eq!(ledger.count(), 0);
    // Once the first is done, the client's next retry runs.
    assert_eq!(
        send(&app, &payment("k1", 100)).await.status,
        StatusCode::CREATED
    );
    store.assert_executed_once();
}

#[tokio::test]
async fn the_key_is_new_again_once_its_ttl_has_passed() {
    let (store, ledger) = (MockStore::new(), Ledger::default());
    let app = app(&ledger, store.layer());
    send(&app, &payment("k1", 100)).await;

    store.advance(Duration::from_secs(24 * 3600 - 1));
    assert!(
        send(&app, &payment("k1", 100)).await.replayed,
        "within the TTL"
    );
    store.advance(Duration::from_secs(2));
    assert!(store.stored_response(caller(), "k1").is_none());
    let again = send(&app, &payment("k1", 250)).await;

    assert_eq!((again.status, again.replayed), (StatusCode::CREATED, false));
    assert_eq!(ledger.count(), 2);
    assert_eq!(stored_body(&store, "k1")["amount"], 250);
}

#[tokio::test(start_paused = true)]
async fn a_store_slower_than_the_configured_timeout_is_cut_at_it() {
    let (store, ledger) = (MockStore::new(), Ledger::default());
    let layer = Idempotency::builder(store.clone())
        .store_timeout(Duration::from_millis(300))
        .build();
    let app = app(&ledger, layer);
    store.set_delay(Duration::from_secs(5));

    let started = tokio::time::Instant::now();
    let refused = send(&app, &payment("k1", 100)).await;

    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_eq!(ledger.count(), 0);
}

// ===== reading what was stored is not a store call =====

#[tokio::test]
async fn reading_what_was_stored_leaves_the_log_alone() {
    let (store, ledger) = (MockStore::new(), Ledger::default());
    let app = app(&ledger, store.layer());
    send(&app, &payment("k1", 100)).await;
    let before = store.operations();

    let _ = store.stored_response(caller(), "k1");
    let _ = store.stored_response(caller(), "never-sent");

    assert_eq!(store.operations(), before);
    assert_eq!(store.count(OpKind::Get), 0);
}

#[tokio::test]
async fn reading_what_was_stored_ignores_faults_and_keeps_a_queued_duplicate() {
    let (store, ledger) = (MockStore::new(), Ledger::default());
    let app = app(&ledger, store.layer());
    send(&app, &payment("k1", 100)).await;
    store.in_flight_next();
    store.fail_next_call();

    let stored = store.stored_response(caller(), "k1");

    assert_eq!(
        stored.map(|response| response.status),
        Some(StatusCode::CREATED)
    );
    assert!(store.faults().is_empty(), "the fault is still queued");
    let outage = send(&app, &payment("k2", 100)).await;
    assert_eq!(outage.status, StatusCode::SERVICE_UNAVAILABLE);
    let held = send(&app, &payment("k2", 100)).await;
    assert_eq!(
        held.status,
        StatusCode::CONFLICT,
        "the duplicate is still queued"
    );
    assert!(
        store
            .operations()
            .contains(&Operation::Failed { op: OpKind::Claim }),
        "{:?}",
        store.operations()
    );
}

#[test]
#[should_panic(expected = "is not an idempotency key")]
fn reading_a_key_no_request_could_send_says_so() {
    let _ = MockStore::new().stored_response(caller(), "");
}
