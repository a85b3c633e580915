//! A payments service that must never charge twice, where what goes wrong
//! comes at once: a client that hangs up while its response or its release
//! is being tried again, the store's clock jumping past the lease while a
//! response waits to be stored, a second instance of the service on the
//! same store, and a duplicate that waits while the first response is
//! stored late. Each time the charge runs once (or, after a status that
//! is not final, runs again as it may), and every retry gets the stored
//! response of its own payload.

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
use serde::{Deserialize, Serialize};

/// How long a test waits for something that must happen before it calls
/// it a failure: never a synchronisation, only a bound on a hang.
const HANG: Duration = Duration::from_secs(10);
/// Past the endpoints' lease of three seconds.
const PAST_THE_LEASE: Duration = Duration::from_secs(4);

#[derive(Serialize, Deserialize)]
struct Charge {
    amount: u64,
    /// The status the first run answers; the others answer 201.
    first: u16,
}

/// Counts runs; each waits at a gate, closed at first, and signals that it
/// started.
#[derive(Clone, Default)]
struct Runs {
    count: macro_support::Runs,
    gate: Turnstile,
}

impl Runs {
    fn count(&self) -> usize {
        self.count.get()
    }

    async fn until_started(&self) {
        self.gate.until_started().await;
    }

    fn let_through(&self, runs: usize) {
        self.gate.let_through(runs);
    }

    async fn run(&self, charge: Charge) -> (StatusCode, String) {
        let run = self.count.bump();
        self.gate.pass().await;
        let status = match run {
            1 => StatusCode::from_u16(charge.first).unwrap(),
            _ => StatusCode::CREATED,
        };
        (status, format!("run {run} amount {}", charge.amount))
    }
}

#[idempotent(scope = "global", lease = "3s")]
async fn charge(State(runs): State<Runs>, Json(charge): Json<Charge>) -> (StatusCode, String) {
    runs.run(charge).await
}

/// The same charge, on an endpoint whose duplicates wait for the first
/// request's outcome rather than answer 409.
#[idempotent(scope = "global", lease = "3s", wait = "10s")]
async fn charge_waiting(
    State(runs): State<Runs>,
    Json(charge): Json<Charge>,
) -> (StatusCode, String) {
    runs.run(charge).await
}

/// One instance of the service on `store`, with a handle of its own.
fn instance(store: &MockStore, runs: &Runs) -> Router {
    Router::new()
        .route("/charges", post(charge))
        .route("/charges-waiting", post(charge_waiting))
        .with_state(runs.clone())
        .layer(store.layer())
}

fn charging(uri: &str, amount: u64, first: u16) -> Request<Body> {
    let body = serde_json::json!({"amount": amount, "first": first}).to_string();
    Request::post(uri)
        .header("content-type", "application/json")
        .header("idempotency-key", "order-7")
        .body(Body::from(body))
        .unwrap()
}

/// The status, whether it is a replay, and the body.
async fn send(app: Router, request: Request<Body>) -> (StatusCode, bool, String) {
    let reply = macro_support::send(&app, request).await;
    (reply.status, reply.replayed, reply.body)
}

fn run_answer(status: StatusCode, replayed: bool, run: usize) -> (StatusCode, bool, String) {
    (status, replayed, format!("run {run} amount 7"))
}

/// Moves the store's clock and tokio's together by `total`, in steps
/// shorter than a renewal period, as time passes for a real store: a
/// lease then holds only while it is renewed.
async fn pass(store: &MockStore, total: Duration) {
    let step = Duration::from_millis(100);
    let mut passed = Duration::ZERO;
    while passed < total {
        store.advance(step);
        tokio::time::sleep(step).await;
        passed += step;
    }
}

/// Lets the other tasks run, without letting tokio's paused clock move
/// (it moves only once every task waits), until the store has failed
/// `calls` calls.
async fn until_failed(store: &MockStore, calls: usize) {
    for _ in 0..10_000 {
        if store.failures() >= calls {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!(
        "the store failed fewer than {calls} calls: {:?}",
        store.operations()
    );
}

// ===== a client that hangs up while the engine tries a call again =====

/// The first attempts to store the response fail, and the client hangs up
/// during the pause before the next one: the rest of the run goes on
/// without it, the key stays held meanwhile, and the response is stored
/// and replayed, with the charge made once.
#[tokio::test(start_paused = true)]
async fn a_client_gone_while_its_response_is_tried_again_gets_it_stored_once() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = instance(&store, &runs);
    store.fail_next(OpKind::Complete);
    store.fail_next(OpKind::Complete);
    let first = tokio::spawn(send(app.clone(), charging("/charges", 7, 201)));
    runs.until_started().await;
    runs.let_through(1);
    until_failed(&store, 1).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    let during = send(app.clone(), charging("/charges", 7, 201)).await;
    assert_eq!(during.0, StatusCode::CONFLICT, "{}", during.2);

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(store.count(OpKind::Complete), 1, "{:?}", store.operations());
    let retry = send(app, charging("/charges", 7, 201)).await;
    assert_eq!(retry, run_answer(StatusCode::CREATED, true, 1));
    store.assert_executed_once();
}

/// The handler answers 503, which is not final; the first release fails
/// and the client hangs up during the pause before the next: the key is
/// still released, so the retry runs at once rather than getting 409 for
/// the rest of the lease.
#[tokio::test(start_paused = true)]
async fn a_client_gone_while_its_release_is_tried_again_still_frees_the_key() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = instance(&store, &runs);
    store.fail_next(OpKind::Release);
    let first = tokio::spawn(send(app.clone(), charging("/charges", 7, 503)));
    runs.until_started().await;
    runs.let_through(2);
    until_failed(&store, 1).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.count(OpKind::Release), 1, "{:?}", store.operations());
    let retry = send(app, charging("/charges", 7, 503)).await;
    assert_eq!(retry, run_answer(StatusCode::CREATED, false, 2));
    store.assert_executed(2);
}

// ===== the store's clock =====

/// The response could not be stored before its caller got it, and the
/// store's clock then jumps past the lease (a store that was suspended,
/// or whose clock was set forward) before the store takes completions
/// again. No other request claimed the key meanwhile, and the mock (a
/// memory store) keeps a lapsed lease for its holder until another
/// request claims the key: the run goes on renewing and storing under
/// it, and the retry replays its response.
#[tokio::test(start_paused = true)]
async fn a_clock_jump_past_the_lease_while_a_response_waits_to_be_stored_loses_nothing() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = instance(&store, &runs);
    runs.let_through(2);
    store.fail_every(OpKind::Complete);
    let first = send(app.clone(), charging("/charges", 7, 201)).await;
    assert_eq!(first, run_answer(StatusCode::CREATED, false, 1));
    store.advance(PAST_THE_LEASE);
    store.fail_all(false);

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(store.count(OpKind::Complete), 1, "{:?}", store.operations());
    let retry = send(app, charging("/charges", 7, 201)).await;
    assert_eq!(retry, run_answer(StatusCode::CREATED, true, 1));
    store.assert_executed_once();
}

// ===== two instances of the service =====

/// Two instances on one store, each with its own handle and renewals: the
/// first runs the charge for several leases, renewed all along; the
/// other's duplicates get 409 meanwhile, a duplicate with another amount
/// 422, and once the first answers, the other replays its response.
#[tokio::test(start_paused = true)]
async fn a_second_instance_never_runs_a_charge_the_first_is_still_running() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let (first_instance, second_instance) = (instance(&store, &runs), instance(&store, &runs));
    let first = tokio::spawn(send(first_instance, charging("/charges", 7, 201)));
    runs.until_started().await;
    for _ in 0..3 {
        pass(&store, PAST_THE_LEASE).await;
        let duplicate = send(second_instance.clone(), charging("/charges", 7, 201)).await;
        assert_eq!(duplicate.0, StatusCode::CONFLICT, "{}", duplicate.2);
    }
    let other = send(second_instance.clone(), charging("/charges", 8, 201)).await;
    assert_eq!(other.0, StatusCode::UNPROCESSABLE_ENTITY, "{}", other.2);
    runs.let_through(1);
    let first = tokio::time::timeout(HANG, first).await.unwrap().unwrap();
    assert_eq!(first, run_answer(StatusCode::CREATED, false, 1));

    let retry = send(second_instance, charging("/charges", 7, 201)).await;
    assert_eq!(retry, run_answer(StatusCode::CREATED, true, 1));
    assert_eq!(runs.count(), 1);
    store.assert_executed_once();
}

// ===== a duplicate that waits =====

/// The first response cannot be stored at first and goes on being stored
/// after its caller got it; a duplicate on a `wait` endpoint, sent then,
/// waits through it (the key is held, not free) and gets the response
/// once stored, instead of running the charge again.
#[tokio::test(start_paused = true)]
async fn a_waiting_duplicate_gets_the_response_stored_after_its_caller_got_it() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = instance(&store, &runs);
    runs.let_through(2);
    store.fail_every(OpKind::Complete);
    let first = send(app.clone(), charging("/charges-waiting", 7, 201)).await;
    assert_eq!(first, run_answer(StatusCode::CREATED, false, 1));
    let waiting = tokio::spawn(send(app.clone(), charging("/charges-waiting", 7, 201)));
    pass(&store, Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the duplicate did not wait");
    store.fail_all(false);

    pass(&store, Duration::from_secs(3)).await;
    let waited = tokio::time::timeout(HANG, waiting).await.unwrap().unwrap();
    assert_eq!(waited, run_answer(StatusCode::CREATED, true, 1));
    store.assert_executed_once();
}
