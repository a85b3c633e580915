//! What the client of an `#[idempotent]` handler gets when `MockStore`
//! fails a store call with each class of [`Fault`]. A failed claim refuses
//! the request and runs nothing: a store down or timed out is a 503
//! `store-unavailable` with `Retry-After`, one set up wrongly a 500
//! `store-misconfigured` and a corrupt record a 500 `record-corrupt`,
//! neither with `Retry-After`. A failed renewal, completion or release
//! comes after the handler ran: the client gets the handler's answer, and
//! the call is tried again if its class may pass by itself (a store down
//! or timed out), not if it fails every attempt alike until someone fixes
//! the store or the record. `MockStore::faults` says which class failed
//! which call.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use idempotent_core::record::{LeaseToken, RecordKey};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{Store, StoreError};
use idempotent_core::testing::{Fault, MockStore, OpKind, Operation};
use idempotent_core::{IDEMPOTENT_REPLAYED, Idempotency, IdempotencyKey, idempotent};
use tower::ServiceExt;

/// Each class of fault, and what a request whose claim it fails gets:
/// status, problem type, and `Retry-After`.
const REFUSALS: [(Fault, StatusCode, &str, Option<&str>); 4] = [
    (
        Fault::Unavailable,
        StatusCode::SERVICE_UNAVAILABLE,
        "urn:idempotent:store-unavailable",
        Some("1"),
    ),
    (
        Fault::Timeout,
        StatusCode::SERVICE_UNAVAILABLE,
        "urn:idempotent:store-unavailable",
        Some("1"),
    ),
    (
        Fault::Misconfigured,
        StatusCode::INTERNAL_SERVER_ERROR,
        "urn:idempotent:store-misconfigured",
        None,
    ),
    (
        Fault::Corrupt,
        StatusCode::INTERNAL_SERVER_ERROR,
        "urn:idempotent:record-corrupt",
        None,
    ),
];

/// The classes of fault that may pass by themselves: a call they fail
/// after the handler ran is tried again.
const PASSING: [Fault; 2] = [Fault::Unavailable, Fault::Timeout];

/// The classes that fail every attempt alike until the store's setup or
/// the record is fixed: a call they fail after the handler ran is not
/// tried again.
const UNTIL_FIXED: [Fault; 2] = [Fault::Misconfigured, Fault::Corrupt];

#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

impl Runs {
    fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Charges `amount`; an amount of 0 is a 502, which is not final: its
/// claim is released.
#[idempotent(ttl = "1h", scope = "global")]
async fn charge(State(runs): State<Runs>, Json(amount): Json<u64>) -> (StatusCode, Json<u64>) {
    runs.bump();
    let status = if amount == 0 {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::CREATED
    };
    (status, Json(amount))
}

/// Runs for a whole lease, so the lease is renewed while it runs.
#[idempotent(ttl = "1h", scope = "global", lease = "3s")]
async fn slow(State(runs): State<Runs>, Json(amount): Json<u64>) -> (StatusCode, Json<u64>) {
    runs.bump();
    tokio::time::sleep(Duration::from_secs(3)).await;
    (StatusCode::CREATED, Json(amount))
}

fn app(store: &MockStore, runs: &Runs) -> Router {
    Router::new()
        .route("/charges", post(charge))
        .route("/slow", post(slow))
        .with_state(runs.clone())
        .layer(store.layer())
}

/// What the client got.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    /// The problem's `type`, for an `application/problem+json` answer.
    problem: Option<String>,
    retry_after: Option<String>,
    replayed: bool,
}

/// Posts `amount` under `key` with its `Content-Length`, as clients send
/// it: a key's third replay onwards is then an exact repeat, read with
/// `get` before it is claimed.
async fn send(app: &Router, uri: &str, key: &str, amount: u64) -> Answer {
    let body = amount.to_string();
    let request = Request::post(uri)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Body::from(body))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let header = |name: &str| {
        let value = response.headers().get(name)?;
        Some(value.to_str().unwrap().to_owned())
    };
    let is_problem = header("content-type").as_deref() == Some("application/problem+json");
    let retry_after = header("retry-after");
    let replayed = header(IDEMPOTENT_REPLAYED.as_str()).is_some();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let problem = is_problem.then(|| {
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        json["type"].as_str().unwrap().to_owned()
    });
    Answer {
        status,
        problem,
        retry_after,
        replayed,
    }
}

/// Panics unless `answer` is what a request refused by `fault` gets.
#[track_caller]
fn assert_refused(answer: &Answer, fault: Fault) {
    let (_, status, problem, retry_after) = REFUSALS
        .into_iter()
        .find(|refusal| refusal.0 == fault)
        .unwrap();
    assert_eq!(answer.status, status, "{fault:?}: {answer:?}");
    assert_eq!(answer.problem.as_deref(), Some(problem), "{fault:?}");
    assert_eq!(answer.retry_after.as_deref(), retry_after, "{fault:?}");
}

/// Panics unless `answer` is the handler's own `201`, run now or replayed.
#[track_caller]
fn assert_created(answer: &Answer, replayed: bool) {
    assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    assert_eq!(answer.replayed, replayed, "{answer:?}");
}

// ===== claim: refused, nothing runs =====

#[tokio::test]
async fn a_failed_claim_refuses_the_request_as_its_class_says_and_runs_nothing() {
    for (fault, ..) in REFUSALS {
        let (store, runs) = (MockStore::new(), Runs::default());
        let app = app(&store, &runs);
        store.fail_next_with(OpKind::Claim, fault);
        assert_refused(&send(&app, "/charges", "k", 5).await, fault);
        assert_eq!(runs.get(), 0, "{fault:?}");
        assert_eq!(
            store.operations(),
            [Operation::Failed { op: OpKind::Claim }]
        );
        assert_eq!(store.faults(), [(OpKind::Claim, fault)]);
        // One-shot, and nothing was left claimed: the retry runs.
        assert_created(&send(&app, "/charges", "k", 5).await, false);
        assert_eq!(runs.get(), 1, "{fault:?}");
    }
}

/// `k1` sent until its exact repeats are read with `get` first.
async fn with_exact_repeats(store: &MockStore, app: &Router) {
    for sent in 0..4 {
        assert_created(&send(app, "/charges", "k1", 100).await, sent > 0);
    }
    assert_eq!(store.count(OpKind::Get), 1, "{:?}", store.operations());
}

#[tokio::test]
async fn an_exact_repeat_is_refused_as_its_claim_would_be_and_spends_the_fault() {
    for (fault, ..) in REFUSALS {
        let (store, runs) = (MockStore::new(), Runs::default());
        let app = app(&store, &runs);
        with_exact_repeats(&store, &app).await;
        store.fail_next_with(OpKind::Claim, fault);
        assert_refused(&send(&app, "/charges", "k1", 100).await, fault);
        // The fault is spent, whatever its class: the next repeat replays.
        assert_created(&send(&app, "/charges", "k1", 100).await, true);
        assert_eq!(runs.get(), 1, "{fault:?}");
    }
}

#[tokio::test]
async fn fail_next_call_with_fails_one_call_of_its_class() {
    for (fault, ..) in REFUSALS {
        let (store, runs) = (MockStore::new(), Runs::default());
        let app = app(&store, &runs);
        store.fail_next_call_with(fault);
        assert_refused(&send(&app, "/charges", "k", 5).await, fault);
        assert_eq!(runs.get(), 0, "{fault:?}");
        assert_created(&send(&app, "/charges", "k", 5).await, false);
    }
}

#[tokio::test]
async fn fail_all_with_refuses_every_request_until_fail_all_false() {
    for (fault, ..) in REFUSALS {
        let (store, runs) = (MockStore::new(), Runs::default());
        let app = app(&store, &runs);
        store.fail_all_with(fault);
        for key in ["a", "b"] {
            assert_refused(&send(&app, "/charges", key, 5).await, fault);
        }
        assert_eq!((runs.get(), store.failures()), (0, 2), "{fault:?}");
        store.fail_all(false);
        assert_created(&send(&app, "/charges", "a", 5).await, false);
    }
}

// ===== after the handler ran: its answer, and the call tried again =====

#[tokio::test(start_paused = true)]
async fn a_failed_renewal_is_tried_again_and_the_handler_answers() {
    for fault in PASSING {
        let (store, runs) = (MockStore::new(), Runs::default());
        let app = app(&store, &runs);
        store.fail_next_with(OpKind::Renew, fault);
        assert_created(&send(&app, "/slow", "k", 5).await, false);
        // The lease was renewed after the failure, before the handler
        // answered.
        let operations = store.operations();
        let failed = Operation::Failed { op: OpKind::Renew };
        let failed = operations.iter().position(|op| *op == failed);
        let renewed = operations.iter().rposition(|op| *op == Operation::Renew);
        assert!(
            matches!((failed, renewed), (Some(failed), Some(renewed)) if failed < renewed),
            "{fault:?}: {operations:?}"
        );
        assert_created(&send(&app, "/slow", "k", 5).await, true);
        assert_eq!(runs.get(), 1, "{fault:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_completion_is_tried_again_and_the_handler_answers() {
    for fault in PASSING {
        let (store, runs) = (MockStore::new(), Runs::default());
        let app = app(&store, &runs);
        store.fail_next_with(OpKind::Complete, fault);
        assert_created(&send(&app, "/charges", "k", 5).await, false);
        assert_eq!(store.failures(), 1, "{fault:?}");
        assert_eq!(store.count(OpKind::Complete), 1, "{fault:?}");
        assert_created(&send(&app, "/charges", "k", 5).await, true);
        assert_eq!(runs.get(), 1, "{fault:?}");
    }
}

/// Storing is tried four times: a store that fails them all loses the
/// outcome, and the key stays held until its lease lapses.
#[tokio::test(start_paused = true)]
async fn a_completion_that_always_fails_answers_retries_409_until_the_lease_lapses() {
    for fault in PASSING {
        let (store, runs) = (MockStore::new(), Runs::default());
        let app = app(&store, &runs);
        for _ in 0..4 {
            store.fail_next_with(OpKind::Complete, fault);
        }
        assert_created(&send(&app, "/charges", "k", 5).await, false);
        let retry = send(&app, "/charges", "k", 5).await;
        assert_eq!(retry.status, StatusCode::CONFLICT, "{fault:?}");
        assert_eq!(
            retry.problem.as_deref(),
            Some("urn:idempotent:request-in-progress")
        );
        assert_eq!(retry.retry_after.as_deref(), Some("1"), "{fault:?}");
        store.advance(Duration::from_secs(61));
        assert_created(&send(&app, "/charges", "k", 5).await, false);
        assert_eq!(runs.get(), 2, "{fault:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_release_is_tried_again_and_the_handler_answers() {
    for fault in PASSING {
        let (store, runs) = (MockStore::new(), Runs::default());
        let app = app(&store, &runs);
        store.fail_next_with(OpKind::Release, fault);
        let answer = send(&app, "/charges", "k", 0).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{fault:?}");
        assert_eq!(answer.problem, None, "{fault:?}");
        assert_eq!(store.failures(), 1, "{fault:?}");
        assert_eq!(store.count(OpKind::Release), 1, "{fault:?}");
        // Released on the second try: the retry runs again.
        let retry = send(&app, "/charges", "k", 0).await;
        assert_eq!(retry.status, StatusCode::BAD_GATEWAY, "{fault:?}");
        assert_eq!(runs.get(), 2, "{fault:?}");
    }
}

// ===== after the handler ran: its answer, and the call not tried again =====

#[tokio::test(start_paused = true)]
async fn a_renewal_failed_until_fixed_is_not_tried_again_and_the_handler_answers() {
    for fault in UNTIL_FIXED {
        let (store, runs) = (MockStore::new(), Runs::default());
        let app = app(&store, &runs);
        store.fail_next_with(OpKind::Renew, fault);
        assert_created(&send(&app, "/slow", "k", 5).await, false);
        assert_eq!(store.faults(), [(OpKind::Renew, fault)]);
        assert_eq!(store.count(OpKind::Renew), 0, "{:?}", store.operations());
        // Stored all the same, the lease being still held.
        assert_created(&send(&app, "/slow", "k", 5).await, true);
        assert_eq!(runs.get(), 1, "{fault:?}");
    }
}

/// Not stored, the key stays held until its lease lapses: retries get 409
/// and do not run the handler again.
#[tokio::test(start_paused = true)]
async fn a_completion_failed_until_fixed_is_not_tried_again_and_the_handler_answers() {
    for fault in UNTIL_FIXED {
        let (store, runs) = (MockStore::new(), Runs::default());
        let app = app(&store, &runs);
        store.fail_next_with(OpKind::Complete, fault);
        assert_created(&send(&app, "/charges", "k", 5).await, false);
        assert_eq!(store.faults(), [(OpKind::Complete, fault)]);
        assert_eq!(store.count(OpKind::Complete), 0, "{:?}", store.operations());
        let retry = send(&app, "/charges", "k", 5).await;
        assert_eq!(retry.status, StatusCode::CONFLICT, "{fault:?}");
        assert_eq!(runs.get(), 1, "{fault:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_release_failed_until_fixed_is_not_tried_again_and_the_handler_answers() {
    for fault in UNTIL_FIXED {
        let (store, runs) = (MockStore::new(), Runs::default());
        let app = app(&store, &runs);
        store.fail_next_with(OpKind::Release, fault);
        let answer = send(&app, "/charges", "k", 0).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{fault:?}");
        assert_eq!(store.faults(), [(OpKind::Release, fault)]);
        assert_eq!(store.count(OpKind::Release), 0, "{:?}", store.operations());
        // Not released, the key frees when its lease lapses.
        let retry = send(&app, "/charges", "k", 0).await;
        assert_eq!(retry.status, StatusCode::CONFLICT, "{fault:?}");
        store.advance(Duration::from_secs(61));
        let retry = send(&app, "/charges", "k", 0).await;
        assert_eq!(retry.status, StatusCode::BAD_GATEWAY, "{fault:?}");
        assert_eq!(runs.get(), 2, "{fault:?}");
    }
}

// ===== faults =====

/// `faults` names the class of each injected fault, in order; a lost
/// lease, which the store answers itself, fails a call but is not one.
#[tokio::test]
async fn faults_say_which_class_failed_which_call() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    store.fail_next_with(OpKind::Claim, Fault::Timeout);
    store.fail_next_with(OpKind::Complete, Fault::Unavailable);
    assert_refused(&send(&app, "/charges", "k", 5).await, Fault::Timeout);
    assert_created(&send(&app, "/charges", "k", 5).await, false);
    let expected = [
        (OpKind::Claim, Fault::Timeout),
        (OpKind::Complete, Fault::Unavailable),
    ];
    assert_eq!(store.faults(), expected);
    let key = RecordKey::new(ScopeDigest::global(), IdempotencyKey::parse(b"k").unwrap());
    let lost = store.renew(&key, LeaseToken::random(), Duration::from_secs(60));
    assert!(matches!(lost.await, Err(StoreError::LeaseLost)));
    assert_eq!(store.failures(), 3, "{:?}", store.operations());
    assert_eq!(store.faults(), expected);
    store.clear_operations();
    assert_eq!(store.faults(), []);
}

// ===== fail_open =====

/// With `fail_open`, a store that fails a claim is run past, whether down
/// or set up wrongly, but never a corrupt record: it says the request
/// ran.
#[tokio::test]
async fn fail_open_runs_past_every_failed_claim_but_a_corrupt_record() {
    for (fault, ..) in REFUSALS {
        let (store, runs) = (MockStore::new(), Runs::default());
        let app = Router::new()
            .route("/charges", post(charge))
            .with_state(runs.clone())
            .layer(Idempotency::builder(store.clone()).fail_open(true).build());
        store.fail_next_with(OpKind::Claim, fault);
        let answer = send(&app, "/charges", "k", 5).await;
        if fault == Fault::Corrupt {
            assert_refused(&answer, fault);
            assert_eq!(runs.get(), 0);
        } else {
            assert_created(&answer, false);
            assert_eq!(runs.get(), 1, "{fault:?}");
        }
    }
}
