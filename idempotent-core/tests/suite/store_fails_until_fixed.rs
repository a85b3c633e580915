//! A store that fails after the handler ran in a way only fixing it ends
//! (set up wrongly, or a record that does not decode): the renewal,
//! completion or release is not tried again, since it would fail alike;
//! one error names what to fix; the client gets the handler's answer; and
//! the handler does not run again while the key is held.
#![cfg(feature = "test-util")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::testing::{Fault, MockStore, OpKind, Operation};
use idempotent_core::{Endpoint, IdempotentRequest};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::events;
use events::{Events, Logged};

/// The classes of fault that fail every attempt alike.
const UNTIL_FIXED: [Fault; 2] = [Fault::Misconfigured, Fault::Corrupt];

struct Shared {
    store: MockStore,
    endpoint: Endpoint,
    runs: AtomicUsize,
    /// What the first run does to the store before it answers: breaks it
    /// for every call after, as a privilege revoked meanwhile would.
    breaks_with: Mutex<Option<Fault>>,
}

/// Answers the request's `status` (201 by default) after `sleep_ms`.
async fn pay(
    State(shared): State<Arc<Shared>>,
    idem: IdempotentRequest,
    Json(input): Json<Value>,
) -> Response {
    let fingerprint = shared.endpoint.fingerprint(&input);
    let endpoint = shared.endpoint;
    idem.run(&endpoint, fingerprint, async move {
        let run = shared.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(millis) = input["sleep_ms"].as_u64() {
            tokio::time::sleep(Duration::from_millis(millis)).await;
        }
        if let Some(fault) = shared.breaks_with.lock().unwrap().take() {
            shared.store.fail_all_with(fault);
        }
        let status = input["status"].as_u64().unwrap_or(201);
        let status = StatusCode::from_u16(u16::try_from(status).unwrap()).unwrap();
        (status, Json(json!({ "run": run }))).into_response()
    })
    .await
}

fn app(store: &MockStore, endpoint: Endpoint, breaks_with: Option<Fault>) -> (Router, Arc<Shared>) {
    let shared = Arc::new(Shared {
        store: store.clone(),
        endpoint,
        runs: AtomicUsize::new(0),
        breaks_with: Mutex::new(breaks_with),
    });
    let router = Router::new()
        .route("/pay", post(pay))
        .with_state(Arc::clone(&shared))
        .layer(store.layer());
    (router, shared)
}

/// The status, and the run that answered (none for the engine's own
/// problems).
async fn send(app: &Router, body: &Value) -> (StatusCode, Option<u64>) {
    let request = Request::post("/pay")
        .header("content-type", "application/json")
        .header("x-api-key", "caller-1")
        .header("idempotency-key", "k")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let run = serde_json::from_slice::<Value>(&body).ok();
    (status, run.and_then(|json| json["run"].as_u64()))
}

/// How many calls of `kind` were made, failed or not.
fn attempts(store: &MockStore, kind: OpKind) -> usize {
    let operations = store.operations();
    operations.iter().filter(|op| op.kind() == kind).count()
}

/// The one event at `WARN` or above since the last look: an error naming
/// the injected cause (which, from a real store, says what to change), the
/// endpoint and the key.
#[track_caller]
fn one_error(events: &Events, fault: Fault) -> Logged {
    let logged = events.take_at_least(tracing::Level::WARN);
    assert_eq!(logged.len(), 1, "{fault:?}: one event: {logged:#?}");
    let event = logged.into_iter().next().unwrap();
    assert_eq!(event.level, tracing::Level::ERROR, "{fault:?}: {event:#?}");
    let error = event.field("error").unwrap_or_default();
    assert!(error.contains("injected fault"), "{fault:?}: {event:#?}");
    assert_eq!(
        event.field("endpoint"),
        Some("pay"),
        "{fault:?}: {event:#?}"
    );
    assert!(event.field("key").is_some(), "{fault:?}: {event:#?}");
    event
}

/// The one error logged for the one call of `kind`, which met `fault`
/// and was not tried again: the request's outcome is a store error.
#[track_caller]
fn failed_once(store: &MockStore, events: &Events, kind: OpKind, fault: Fault) -> Logged {
    let operations = store.operations();
    assert_eq!(attempts(store, kind), 1, "{fault:?}: {operations:?}");
    assert_eq!(store.faults(), [(kind, fault)]);
    let event = one_error(events, fault);
    assert_eq!(event.field("outcome"), Some("store_error"), "{fault:?}");
    event
}

#[tokio::test(start_paused = true)]
async fn a_completion_that_would_fail_alike_is_not_tried_again() {
    for fault in UNTIL_FIXED {
        let (events, _guard) = Events::on_this_thread();
        let store = MockStore::new();
        let (app, shared) = app(&store, Endpoint::new("pay"), Some(fault));
        let body = json!({"amount": 1});
        assert_eq!(send(&app, &body).await, (StatusCode::CREATED, Some(1)));
        let event = failed_once(&store, &events, OpKind::Complete, fault);
        assert!(event.message().contains("not tried again"), "{event:#?}");
        // Fixed: the key stays held until its lease lapses, and the
        // handler does not run again before.
        store.fail_all(false);
        assert_eq!(send(&app, &body).await.0, StatusCode::CONFLICT, "{fault:?}");
        assert_eq!(shared.runs.load(Ordering::SeqCst), 1, "{fault:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_release_that_would_fail_alike_is_not_tried_again() {
    for fault in UNTIL_FIXED {
        let (events, _guard) = Events::on_this_thread();
        let store = MockStore::new();
        let (app, shared) = app(&store, Endpoint::new("pay"), Some(fault));
        let body = json!({"amount": 1, "status": 503});
        let answer = send(&app, &body).await;
        assert_eq!(
            answer,
            (StatusCode::SERVICE_UNAVAILABLE, Some(1)),
            "{fault:?}"
        );
        let event = failed_once(&store, &events, OpKind::Release, fault);
        assert!(event.message().contains("did not try again"), "{event:#?}");
        // Fixed: the key frees when its lease lapses, not before.
        store.fail_all(false);
        assert_eq!(send(&app, &body).await.0, StatusCode::CONFLICT, "{fault:?}");
        store.advance(Duration::from_secs(61));
        let retried = send(&app, &body).await;
        assert_eq!(
            retried,
            (StatusCode::SERVICE_UNAVAILABLE, Some(2)),
            "{fault:?}"
        );
        assert_eq!(shared.runs.load(Ordering::SeqCst), 2, "{fault:?}");
    }
}

/// A 3 s lease is renewed every second: the handler outlives the first
/// renewal, which fails, and ends before the lease lapses.
#[tokio::test(start_paused = true)]
async fn a_renewal_that_would_fail_alike_is_not_tried_again() {
    for fault in UNTIL_FIXED {
        let (events, _guard) = Events::on_this_thread();
        let store = MockStore::new();
        let endpoint = Endpoint::new("pay").lease(Duration::from_secs(3));
        let (app, shared) = app(&store, endpoint, None);
        store.fail_next_with(OpKind::Renew, fault);
        let body = json!({"amount": 1, "sleep_ms": 2_000});
        assert_eq!(send(&app, &body).await, (StatusCode::CREATED, Some(1)));
        let operations = store.operations();
        let failed = Operation::Failed { op: OpKind::Renew };
        assert_eq!(
            attempts(&store, OpKind::Renew),
            1,
            "{fault:?}: renewed again: {operations:?}"
        );
        assert!(operations.contains(&failed), "{fault:?}: {operations:?}");
        let event = one_error(&events, fault);
        assert!(event.message().contains("will not try again"), "{event:#?}");
        assert!(event.field("lapses_in").is_some(), "{event:#?}");
        // Stored before the lease lapsed: the retry replays it.
        assert_eq!(send(&app, &body).await, (StatusCode::CREATED, Some(1)));
        assert_eq!(shared.runs.load(Ordering::SeqCst), 1, "{fault:?}");
    }
}
