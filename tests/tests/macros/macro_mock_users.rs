//! A team's unit tests of its `#[idempotent]` and `IdempotentLayer`
//! endpoints, written from the README's "Unit-testing a handler" and the
//! `testing` module's rustdoc alone: the first call, its replay byte for
//! byte, a changed payload, a duplicate in flight (queued and real), a
//! store outage, a lease lost to a retry, the TTL passing under tokio's
//! paused time, a handler that takes the key, scopes from a header and
//! from an extension, a store shared by tests running in parallel and by
//! several routers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::body::{Bytes, to_bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Json, Router};
use idempotent_core::scope::{Scope, ScopeDigest};
use idempotent_core::testing::{ClaimOutcome, Fault, MockStore, OpKind, Operation, TestRequest};
use idempotent_core::{
    Endpoint, IDEMPOTENT_REPLAYED, Idempotency, IdempotencyKey, IdempotencyScope, IdempotentLayer,
    idempotent,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tower::ServiceExt;

// ===== the application under test =====

#[derive(Serialize, Deserialize)]
struct NewCharge {
    amount: u64,
}

/// What the handlers share: how often they ran, and a gate the first run
/// of `/held` waits at until the test opens it.
#[derive(Clone, Default)]
struct AppState {
    runs: Arc<AtomicUsize>,
    arrived: Arc<Notify>,
    open: Arc<Notify>,
}

impl AppState {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// Counts a run; the count with it.
    fn run(&self) -> usize {
        self.runs.fetch_add(1, Ordering::SeqCst) + 1
    }
}

#[idempotent(ttl = "1h", scope = "api_key")]
async fn charge(
    State(state): State<AppState>,
    Json(charge): Json<NewCharge>,
) -> (StatusCode, HeaderMap, Json<Value>) {
    let run = state.run();
    let mut headers = HeaderMap::new();
    headers.insert("location", format!("/charges/ch_{run}").parse().unwrap());
    let body = json!({"id": format!("ch_{run}"), "amount": charge.amount});
    (StatusCode::CREATED, headers, Json(body))
}

/// Its first run waits at the gate; the runs after it do not.
#[idempotent(ttl = "1h", scope = "global", lease = "10s")]
async fn held(State(state): State<AppState>, Json(charge): Json<NewCharge>) -> Json<Value> {
    if state.run() == 1 {
        state.arrived.notify_one();
        state.open.notified().await;
    }
    Json(json!({"amount": charge.amount}))
}

/// Passes the client's key on to a payment provider, as its own key.
#[idempotent(ttl = "1h", scope = "api_key")]
async fn forward(
    State(state): State<AppState>,
    key: IdempotencyKey,
    Json(charge): Json<NewCharge>,
) -> Json<Value> {
    state.run();
    Json(json!({"provider_key": key.derive("psp"), "amount": charge.amount}))
}

#[idempotent(ttl = "1h", scope = "header:x-tenant-id")]
async fn tenant_charge(
    State(state): State<AppState>,
    Json(charge): Json<NewCharge>,
) -> (StatusCode, Json<Value>) {
    state.run();
    (StatusCode::CREATED, Json(json!({"amount": charge.amount})))
}

/// The caller an auth middleware leaves in the request's extensions.
#[derive(Clone)]
struct User {
    id: u64,
}

impl IdempotencyScope for User {
    fn scope_id(&self) -> impl AsRef<[u8]> {
        self.id.to_be_bytes()
    }
}

#[idempotent(ttl = "1h", scope = User)]
async fn user_charge(
    State(state): State<AppState>,
    Extension(user): Extension<User>,
    Json(charge): Json<NewCharge>,
) -> (StatusCode, Json<Value>) {
    state.run();
    (
        StatusCode::CREATED,
        Json(json!({"user": user.id, "amount": charge.amount})),
    )
}

/// A route made idempotent by the tower layer, not the attribute.
async fn refund(State(state): State<AppState>, body: Bytes) -> (StatusCode, Bytes) {
    state.run();
    (StatusCode::CREATED, body)
}

fn app(state: &AppState, idempotency: Idempotency) -> Router {
    let refunds = post(refund).route_layer(IdempotentLayer::new(
        Endpoint::new("refund").scope(Scope::Global),
    ));
    Router::new()
        .route("/charges", post(charge))
        .route("/held", post(held))
        .route("/forward", post(forward))
        .route("/tenant-charges", post(tenant_charge))
        .route("/user-charges", post(user_charge))
        .route("/refunds", refunds)
        .with_state(state.clone())
        .layer(idempotency)
}

// ===== what the tests share =====

fn a_charge(key: &str, amount: u64) -> TestRequest {
    TestRequest::post("/charges")
        .key(key)
        .api_key("sk_test_1")
        .json(&NewCharge { amount })
}

fn held_charge(key: &str) -> TestRequest {
    TestRequest::post("/held")
        .key(key)
        .json(&NewCharge { amount: 5 })
}

/// The response, its body read whole.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn replayed(&self) -> bool {
        self.headers.contains_key(IDEMPOTENT_REPLAYED)
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

async fn read(response: Response) -> Reply {
    let (parts, body) = response.into_parts();
    let body = to_bytes(body, usize::MAX).await.unwrap();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn send(app: &Router, request: &TestRequest) -> Reply {
    read(app.clone().oneshot(request.build()).await.unwrap()).await
}

// ===== first call, replay, changed payload =====

#[tokio::test]
async fn the_first_call_runs_and_its_retry_is_replayed_byte_for_byte() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());

    let first = send(&app, &a_charge("k1", 100)).await;
    let retries = [
        send(&app, &a_charge("k1", 100)).await,
        send(&app, &a_charge("k1", 100)).await,
        send(&app, &a_charge("k1", 100)).await,
    ];

    assert_eq!(
        (first.status, first.replayed()),
        (StatusCode::CREATED, false)
    );
    for retry in &retries {
        assert_eq!(retry.status, first.status);
        assert_eq!(retry.body, first.body, "the body, byte for byte");
        let mut headers = retry.headers.clone();
        assert_eq!(headers.remove(IDEMPOTENT_REPLAYED).unwrap(), "true");
        assert_eq!(headers, first.headers, "the same headers, and only them");
    }
    assert_eq!(state.runs(), 1);
    store.assert_executed_once();
}

#[tokio::test]
async fn a_changed_payload_gets_422_and_runs_nothing() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());
    send(&app, &a_charge("k1", 100)).await;

    let changed = send(&app, &a_charge("k1", 250)).await;

    assert_eq!(changed.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(changed.json()["type"], "urn:idempotent:key-reused");
    assert_eq!(state.runs(), 1);
}

// ===== a duplicate in flight =====

#[tokio::test]
async fn a_queued_duplicate_gets_409_with_retry_after() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());
    store.in_flight_next();

    let duplicate = send(&app, &a_charge("k1", 100)).await;

    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    assert!(duplicate.headers.contains_key("retry-after"));
    assert_eq!(state.runs(), 0);
}

#[tokio::test]
async fn a_duplicate_of_a_request_still_running_gets_409_then_the_replay() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());
    let first = tokio::spawn(app.clone().oneshot(held_charge("k1").build()));
    state.arrived.notified().await;

    let duplicate = send(&app, &held_charge("k1")).await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    assert_eq!(store.claims(ClaimOutcome::InFlight), 1);

    state.open.notify_one();
    let first = read(first.await.unwrap().unwrap()).await;
    assert_eq!(first.status, StatusCode::OK);
    let retry = send(&app, &held_charge("k1")).await;
    assert!(retry.replayed());
    assert_eq!(state.runs(), 1);
}

// ===== the store failing =====

#[tokio::test]
async fn a_store_outage_answers_503_and_runs_nothing() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());
    store.fail_all(true);

    let refused = send(&app, &a_charge("k1", 100)).await;

    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.json()["type"], "urn:idempotent:store-unavailable");
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(state.runs(), 0);
    store.fail_all(false);
    assert_eq!(
        send(&app, &a_charge("k1", 100)).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn an_outage_of_one_request_fails_it_whichever_path_it_takes() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());
    for _ in 0..3 {
        send(&app, &a_charge("k1", 100)).await;
    }
    store.fail_next(OpKind::Claim);

    let refused = send(&app, &a_charge("k1", 100)).await;

    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(state.runs(), 1);
}

// ===== the lease =====

#[tokio::test]
async fn a_request_past_its_lease_loses_the_key_to_its_retry() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());
    let first = tokio::spawn(app.clone().oneshot(held_charge("k1").build()));
    state.arrived.notified().await;

    store.advance(Duration::from_secs(11)); // past `lease = "10s"`
    let retry = send(&app, &held_charge("k1")).await;
    assert_eq!((retry.status, retry.replayed()), (StatusCode::OK, false));
    state.open.notify_one();
    let first = read(first.await.unwrap().unwrap()).await;

    assert_eq!(
        first.status,
        StatusCode::OK,
        "the client still gets its answer"
    );
    assert_eq!(state.runs(), 2);
    store.assert_executed(2);
    let lost = Operation::Failed {
        op: OpKind::Complete,
    };
    assert!(
        store.operations().contains(&lost),
        "{:?}",
        store.operations()
    );
    assert!(
        store.faults().is_empty(),
        "a lost lease is no injected fault"
    );
}

// ===== time =====

#[tokio::test(start_paused = true)]
async fn the_ttl_passes_on_the_stores_clock_not_tokios() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());
    send(&app, &a_charge("k1", 100)).await;

    tokio::time::advance(Duration::from_secs(2 * 3600)).await;
    assert!(send(&app, &a_charge("k1", 100)).await.replayed());
    store.advance(Duration::from_secs(3600));
    let again = send(&app, &a_charge("k1", 250)).await;

    assert_eq!(
        (again.status, again.replayed()),
        (StatusCode::CREATED, false)
    );
    assert_eq!(state.runs(), 2);
}

// ===== the key, and scopes =====

#[tokio::test]
async fn a_handler_taking_the_key_derives_the_same_provider_key_on_every_retry() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());
    let request = TestRequest::post("/forward")
        .key("order-7")
        .api_key("sk_test_1")
        .json(&NewCharge { amount: 3 });

    let first = send(&app, &request).await;
    let retry = send(&app, &request).await;

    let expected = IdempotencyKey::parse(b"order-7").unwrap().derive("psp");
    assert_eq!(first.json()["provider_key"], expected.as_str());
    assert_eq!(retry.body, first.body);
    assert_eq!(state.runs(), 1);
    let missing = TestRequest::post("/forward")
        .api_key("sk_test_1")
        .json(&NewCharge { amount: 3 });
    assert_eq!(send(&app, &missing).await.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_header_scope_keeps_tenants_apart() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());
    let from = |tenant: &str| {
        TestRequest::post("/tenant-charges")
            .key("k1")
            .header("x-tenant-id", tenant)
            .json(&NewCharge { amount: 1 })
    };

    send(&app, &from("acme")).await;
    let other = send(&app, &from("globex")).await;

    assert!(!other.replayed());
    assert_eq!(state.runs(), 2);
    let acme = ScopeDigest::header("X-Tenant-Id", b"acme");
    assert_eq!(
        store.stored_response(acme, "k1").unwrap().status,
        StatusCode::CREATED
    );
    let anonymous = TestRequest::post("/tenant-charges")
        .key("k1")
        .json(&NewCharge { amount: 1 });
    assert_eq!(send(&app, &anonymous).await.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_principal_from_an_extension_scopes_the_key() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());
    let as_user = |id: u64| {
        TestRequest::post("/user-charges")
            .key("k1")
            .extension(User { id })
            .json(&NewCharge { amount: 1 })
    };

    let first = send(&app, &as_user(7)).await;
    let retry = send(&app, &as_user(7)).await;
    let other = send(&app, &as_user(8)).await;

    assert_eq!(first.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert!(!other.replayed());
    let stored = store.stored_response(ScopeDigest::custom(&User { id: 7 }), "k1");
    assert_eq!(stored.unwrap().body.unwrap(), first.body);
}

// ===== the tower layer =====

#[tokio::test]
async fn the_tower_layer_replays_and_refuses_a_changed_body() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());
    let refund = |body: &str| {
        TestRequest::new(Method::POST, "/refunds")
            .key("r1")
            .body(body.to_owned())
    };

    let first = send(&app, &refund("ch_1")).await;
    let retry = send(&app, &refund("ch_1")).await;
    let changed = send(&app, &refund("ch_2")).await;

    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        (retry.replayed(), retry.body.as_ref()),
        (true, b"ch_1".as_slice())
    );
    assert_eq!(changed.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(state.runs(), 1);
    store.fail_next(OpKind::Claim);
    assert_eq!(
        send(&app, &refund("ch_3")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

// ===== one store, several routers =====

#[tokio::test]
async fn clones_of_one_store_in_two_routers_are_two_instances_of_one_service() {
    let (store, state) = (MockStore::new(), AppState::default());
    let instance_a = app(&state, store.layer());
    let instance_b = app(
        &state,
        Idempotency::builder(store.clone())
            .store_timeout(Duration::from_secs(1))
            .build(),
    );

    send(&instance_a, &a_charge("k1", 100)).await;
    let retry = send(&instance_b, &a_charge("k1", 100)).await;

    assert!(retry.replayed());
    assert_eq!(state.runs(), 1);
    store.assert_executed_once();
}

// ===== one store shared by tests running in parallel =====

static SHARED: LazyLock<MockStore> = LazyLock::new(MockStore::new);

fn caller() -> ScopeDigest {
    ScopeDigest::api_key(b"sk_test_1")
}

/// What each of the parallel tests checks, with keys of its own: a store
/// outage aimed at its key, which no other test's request takes, then
/// the run and its replay, counted for its key alone.
async fn charges_once_on_the_shared_store(test: &str) {
    let state = AppState::default();
    let app = app(&state, SHARED.layer());
    let key = format!("{test}-k1");
    let mine = SHARED.for_key(caller(), &key);
    mine.fail_next(OpKind::Claim);

    let refused = send(&app, &a_charge(&key, 100)).await;
    send(&app, &a_charge(&key, 100)).await;
    let retry = send(&app, &a_charge(&key, 100)).await;

    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{test}");
    assert!(retry.replayed(), "{test}");
    assert_eq!(state.runs(), 1, "{test}");
    mine.assert_executed_once();
    assert_eq!(
        mine.operations()[0],
        Operation::Failed { op: OpKind::Claim }
    );
    assert!(mine.stored_response().is_some(), "{test}");
}

#[tokio::test]
async fn parallel_one() {
    charges_once_on_the_shared_store("one").await;
}

#[tokio::test]
async fn parallel_two() {
    charges_once_on_the_shared_store("two").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_three() {
    charges_once_on_the_shared_store("three").await;
}

/// The deterministic form of what the parallel tests run into: another
/// key's request, sent first, must not take the faults and the duplicate
/// a test queued for its own key.
#[tokio::test]
async fn faults_aimed_at_one_key_are_not_taken_by_another_keys_request() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());
    let mine = store.for_key(caller(), "mine");
    mine.fail_next_with(OpKind::Claim, Fault::Misconfigured);
    mine.in_flight_next();

    let theirs = send(&app, &a_charge("theirs", 1)).await;
    let refused = send(&app, &a_charge("mine", 1)).await;
    let held = send(&app, &a_charge("mine", 1)).await;
    let ran = send(&app, &a_charge("mine", 1)).await;

    assert_eq!(theirs.status, StatusCode::CREATED);
    assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(held.status, StatusCode::CONFLICT);
    assert_eq!(ran.status, StatusCode::CREATED);
    assert_eq!(store.faults(), [(OpKind::Claim, Fault::Misconfigured)]);
    assert_eq!(
        mine.operations(),
        [
            Operation::Failed { op: OpKind::Claim },
            Operation::Claim {
                outcome: ClaimOutcome::InFlight
            },
            Operation::Claim {
                outcome: ClaimOutcome::Acquired
            },
            Operation::Complete {
                status: StatusCode::CREATED
            },
        ]
    );
    mine.assert_executed_once();
    store.assert_executed(2);
}

/// An exact repeat reads the record before it claims: a fault or a
/// duplicate aimed at another key neither fails nor holds that read.
#[tokio::test]
async fn an_exact_repeat_of_another_key_passes_a_keyed_fault_by() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());
    for _ in 0..3 {
        send(&app, &a_charge("theirs", 1)).await;
        send(&app, &a_charge("mine", 1)).await;
    }
    let mine = store.for_key(caller(), "mine");
    mine.fail_next(OpKind::Claim);

    let theirs = send(&app, &a_charge("theirs", 1)).await;
    let refused = send(&app, &a_charge("mine", 1)).await;
    mine.in_flight_next();
    let theirs_again = send(&app, &a_charge("theirs", 1)).await;
    let held = send(&app, &a_charge("mine", 1)).await;

    assert!(theirs.replayed() && theirs_again.replayed());
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(held.status, StatusCode::CONFLICT);
    assert_eq!(store.for_key(caller(), "theirs").operations().len(), 6);
    assert_eq!(state.runs(), 2);
}

#[test]
#[should_panic(expected = "MockStore::for_key: \"\" is not an idempotency key")]
fn a_key_no_request_could_send_is_a_mistake_in_the_test() {
    let _ = MockStore::new().for_key(caller(), "");
}

// ===== faults of each class at a completion =====

#[tokio::test(start_paused = true)]
async fn a_corrupt_record_at_the_claim_is_a_500_and_runs_nothing() {
    let (store, state) = (MockStore::new(), AppState::default());
    let app = app(&state, store.layer());
    store.fail_next_with(OpKind::Claim, Fault::Corrupt);

    let refused = send(&app, &a_charge("k1", 100)).await;

    assert_eq!(refused.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(refused.json()["type"], "urn:idempotent:record-corrupt");
    assert_eq!(state.runs(), 0);
}
