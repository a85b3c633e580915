//! What an operator reads when every outcome of a keyed request is logged
//! through a subscriber at the `INFO` level, as services run: the request's
//! `idempotent` span is at debug level, so each event at `INFO` or above
//! must name its endpoint and key itself; nothing secret is logged; a
//! client's own mistake is never an error. A process of its own: the
//! subscriber is global, since runs and renewals log from whichever worker
//! runs them.
#![cfg(feature = "test-util")]

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use idempotent_core::record::{Claim, Completed, RecordKey};
use idempotent_core::store::{MemoryStore, StoreError};
use idempotent_core::testing::{MockStore, OpKind};
use idempotent_core::{
    Endpoint, Fingerprint, FingerprintError, Idempotency, IdempotentLayer, IdempotentRequest, Scope,
};
use serde_json::{Value, json};
use tower::ServiceExt;

#[path = "support/events.rs"]
mod events;
use events::{Events, Logged};
#[path = "support/forwarding.rs"]
mod forwarding;
use forwarding::{Forwarding, Hooks};

const API_KEY: &str = "sk_live_SECRETAPIKEY";
const IDEMPOTENCY_KEY: &str = "order-SECRETKEY";
const REQUEST_SECRET: &str = "SECRETBODY";
const RESPONSE_SECRET: &str = "SECRETRESPONSE";

/// Answers 201 with a secret in its body, or `status` if the request asks.
async fn pay(
    State(endpoint): State<Endpoint>,
    idem: IdempotentRequest,
    Json(input): Json<Value>,
) -> Response {
    let fingerprint = endpoint.fingerprint(&input);
    idem.run(&endpoint, fingerprint, respond(input)).await
}

async fn respond(input: Value) -> Response {
    if input["panic"] == true {
        panic!("the handler failed");
    }
    if let Some(millis) = input["sleep_ms"].as_u64() {
        tokio::time::sleep(Duration::from_millis(millis)).await;
    }
    let status = input["status"].as_u64().unwrap_or(201);
    let status = StatusCode::from_u16(u16::try_from(status).unwrap()).unwrap();
    (status, Json(json!({"paid": RESPONSE_SECRET}))).into_response()
}

/// A handler whose inputs cannot be fingerprinted.
async fn unfingerprintable(State(endpoint): State<Endpoint>, idem: IdempotentRequest) -> Response {
    let failed = Err(FingerprintError::Serialize("no".into()));
    idem.run(&endpoint, failed, async { StatusCode::CREATED })
        .await
}

fn app(idempotency: Idempotency, endpoint: Endpoint) -> Router {
    Router::new()
        .route("/pay", post(pay))
        .route("/unfingerprintable", post(unfingerprintable))
        .with_state(endpoint)
        .layer(idempotency)
}

fn request(path: &str, key: Option<&str>, body: &Value) -> Request<Body> {
    let mut builder = Request::post(path)
        .header("content-type", "application/json")
        .header("x-api-key", API_KEY)
        .header("authorization", format!("Bearer {API_KEY}"));
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body.to_string())).unwrap()
}

async fn send(app: &Router, request: Request<Body>) -> StatusCode {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    drop(axum::body::to_bytes(response.into_body(), usize::MAX).await);
    status
}

fn body() -> Value {
    json!({"amount": 1, "note": REQUEST_SECRET})
}

/// The one event at `INFO` or above logged since the last look: at
/// `level`, with `outcome`, naming the endpoint and the key.
#[track_caller]
fn one_event(recorder: &Events, level: tracing::Level, outcome: &str) -> Logged {
    let events = recorder.take_at_least(tracing::Level::INFO);
    assert_eq!(events.len(), 1, "one event for `{outcome}`: {events:#?}");
    let event = events.into_iter().next().unwrap();
    assert_eq!(event.level, level, "{event:#?}");
    assert_eq!(event.field("outcome"), Some(outcome), "{event:#?}");
    assert_eq!(event.field("endpoint"), Some("pay"), "{event:#?}");
    assert!(
        event.field("key").is_some_and(|key| key.len() == 16),
        "the key's log id is on the event itself: {event:#?}"
    );
    event
}

/// A store whose records do not decode: every claim finds one.
#[derive(Clone, Default)]
struct Corrupt(MemoryStore);

impl Hooks for Corrupt {
    type Inner = MemoryStore;

    fn inner(&self) -> &MemoryStore {
        &self.0
    }

    async fn claim(&self, _: &RecordKey, _: Fingerprint, _: Duration) -> Result<Claim, StoreError> {
        let error = Completed::decode(Bytes::from_static(b"garbage")).unwrap_err();
        Err(StoreError::Codec(error))
    }
}

/// One test: the subscriber is the process's global one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_tells_the_operator_what_and_where_and_nothing_secret() {
    let recorder = events::events();
    let endpoint = Endpoint::new("pay");

    // First execution and replay: debug only, nothing at INFO.
    let store = MockStore::new();
    let service = app(store.layer(), endpoint);
    for _ in 0..2 {
        let status = send(&service, request("/pay", Some(IDEMPOTENCY_KEY), &body())).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    assert_eq!(
        recorder.take_at_least(tracing::Level::INFO).len(),
        0,
        "executed and replayed are debug"
    );

    // A client's own mistakes: info at most.
    let mismatch = json!({"amount": 2, "note": REQUEST_SECRET});
    let status = send(&service, request("/pay", Some(IDEMPOTENCY_KEY), &mismatch)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    one_event(&recorder, tracing::Level::INFO, "mismatch");
    store.in_flight_next();
    let status = send(&service, request("/pay", Some("k-409"), &body())).await;
    assert_eq!(status, StatusCode::CONFLICT);
    one_event(&recorder, tracing::Level::INFO, "conflict");
    let status = send(&service, request("/pay", None, &body())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let status = send(&service, request("/pay", Some(" "), &body())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let events = recorder.take_at_least(tracing::Level::INFO);
    assert!(
        events.iter().all(|e| e.level > tracing::Level::WARN),
        "{events:#?}"
    );

    // The store is down, or slow: one error each, with the cause.
    store.fail_next(OpKind::Claim);
    let status = send(&service, request("/pay", Some("k-503"), &body())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let event = one_event(&recorder, tracing::Level::ERROR, "store_error");
    assert!(event.field("error").unwrap().contains("injected fault"));
    let slow = MockStore::new();
    let idempotency = Idempotency::builder(slow.clone())
        .store_timeout(Duration::from_millis(50))
        .build();
    let slow_service = app(idempotency, endpoint);
    slow.set_delay(Duration::from_millis(200));
    let status = send(&slow_service, request("/pay", Some("k-slow"), &body())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let event = one_event(&recorder, tracing::Level::ERROR, "store_error");
    assert!(event.field("error").unwrap().contains("did not answer"));

    // Failing open is a warning: the request ran.
    let open = MockStore::new();
    let idempotency = Idempotency::builder(open.clone()).fail_open(true).build();
    let open_service = app(idempotency, endpoint);
    open.fail_next(OpKind::Claim);
    let status = send(&open_service, request("/pay", Some("k-open"), &body())).await;
    assert_eq!(status, StatusCode::CREATED);
    one_event(&recorder, tracing::Level::WARN, "store_error");

    // A corrupt record: one error, with the cause.
    let corrupt_service = app(Idempotency::new(Forwarding(Corrupt::default())), endpoint);
    let status = send(&corrupt_service, request("/pay", Some("k-bad"), &body())).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let event = one_event(&recorder, tracing::Level::ERROR, "store_error");
    assert!(event.field("error").unwrap().contains("corrupt"));

    // A 5xx and a panic release the key; a failed release is an error.
    let failing = json!({"amount": 3, "status": 502});
    let status = send(&service, request("/pay", Some("k-502"), &failing)).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let released = one_event(&recorder, tracing::Level::INFO, "released");
    assert_eq!(released.field("status"), Some("502"), "{released:?}");
    let panicking = json!({"amount": 4, "panic": true});
    let response = tokio::spawn(service.clone().oneshot(request(
        "/pay",
        Some("k-panic"),
        &panicking,
    )));
    assert!(response.await.unwrap_err().is_panic());
    let released = one_event(&recorder, tracing::Level::INFO, "released");
    assert_eq!(released.field("status"), None, "a panic has no status");
    for _ in 0..4 {
        store.fail_next(OpKind::Release);
    }
    let status = send(&service, request("/pay", Some("k-502b"), &failing)).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let events = recorder.take_at_least(tracing::Level::INFO);
    let warnings = events.iter().filter(|e| e.level == tracing::Level::WARN);
    assert!(
        warnings.clone().all(|e| e.field("key").is_some()),
        "{events:#?}"
    );
    assert_eq!(warnings.count(), 3, "one warning per retry: {events:#?}");
    let errors: Vec<_> = events
        .iter()
        .filter(|e| e.level == tracing::Level::ERROR)
        .collect();
    assert_eq!(errors.len(), 1, "{events:#?}");
    assert_eq!(errors[0].field("outcome"), Some("store_error"));
    assert_eq!(errors[0].field("endpoint"), Some("pay"));

    // A response not stored: a warning when it is not, then 410s.
    let small = MockStore::new();
    let idempotency = Idempotency::builder(small.clone())
        .max_body_bytes(4)
        .build();
    let small_service = app(idempotency, endpoint);
    let status = send(&small_service, request("/pay", Some("k-big"), &body())).await;
    assert_eq!(status, StatusCode::CREATED);
    let events = recorder.take_at_least(tracing::Level::INFO);
    let warning = events.iter().find(|e| e.level == tracing::Level::WARN);
    let warning = warning.unwrap_or_else(|| panic!("{events:#?}"));
    assert_eq!(warning.field("endpoint"), Some("pay"), "{events:#?}");
    assert!(warning.field("key").is_some(), "{events:#?}");
    let status = send(&small_service, request("/pay", Some("k-big"), &body())).await;
    assert_eq!(status, StatusCode::GONE);
    one_event(&recorder, tracing::Level::INFO, "not_stored");

    // The lease lapsed and another request took the key over: the first
    // one's response is not stored.
    let lapsing = MockStore::new();
    let short = Endpoint::new("pay").lease(Duration::from_secs(30));
    let lapsing_service = app(lapsing.layer(), short);
    let slow_body = json!({"amount": 5, "sleep_ms": 1_000});
    let first = tokio::spawn(lapsing_service.clone().oneshot(request(
        "/pay",
        Some("k-lapse"),
        &slow_body,
    )));
    tokio::time::sleep(Duration::from_millis(100)).await;
    lapsing.advance(Duration::from_secs(31));
    let fast_body = json!({"amount": 5});
    let second = send(
        &lapsing_service,
        request("/pay", Some("k-lapse"), &fast_body),
    )
    .await;
    assert_eq!(second, StatusCode::CREATED);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::CREATED);
    one_event(&recorder, tracing::Level::ERROR, "lease_lost");

    // The store is down while a handler runs: one warning when renewals
    // start failing, one error when the lease lapses, not one per retry.
    let down = MockStore::new();
    let second = Endpoint::new("pay").lease(Duration::from_secs(1));
    let down_service = app(down.layer(), second);
    let slow_body = json!({"amount": 6, "sleep_ms": 1_800});
    let running = tokio::spawn(down_service.clone().oneshot(request(
        "/pay",
        Some("k-down"),
        &slow_body,
    )));
    tokio::time::sleep(Duration::from_millis(100)).await;
    down.fail_all(true);
    tokio::time::sleep(Duration::from_millis(1_400)).await;
    down.fail_all(false);
    assert_eq!(
        running.await.unwrap().unwrap().status(),
        StatusCode::CREATED
    );
    let events = recorder.take_at_least(tracing::Level::INFO);
    let levels: Vec<_> = events.iter().map(|e| e.level).collect();
    let expected = [
        tracing::Level::WARN,
        tracing::Level::ERROR,
        tracing::Level::INFO,
    ];
    assert_eq!(levels, expected, "{events:#?}");
    assert_eq!(events[1].field("outcome"), Some("lease_lapsed"));
    assert!(events.iter().all(|e| e.field("endpoint") == Some("pay")));

    // Misconfigurations: errors that say where.
    let status = send(
        &service,
        request("/unfingerprintable", Some("k-fp"), &body()),
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let events = recorder.take_at_least(tracing::Level::INFO);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].level, tracing::Level::ERROR);
    assert_eq!(events[0].field("endpoint"), Some("pay"), "{events:#?}");

    let custom = Endpoint::new("pay").scope(Scope::Custom);
    let layered = Router::new()
        .route(
            "/pay",
            post(|| async { StatusCode::CREATED }).route_layer(IdempotentLayer::new(custom)),
        )
        .layer(Idempotency::new(MemoryStore::new()));
    let status = send(&layered, request("/pay", Some("k-custom"), &body())).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let events = recorder.take_at_least(tracing::Level::INFO);
    assert_eq!(
        events.len(),
        1,
        "a 500 the log says nothing of: {events:#?}"
    );
    assert_eq!(events[0].level, tracing::Level::ERROR);
    assert_eq!(events[0].field("endpoint"), Some("pay"), "{events:#?}");

    let unlayered = Router::new().route("/pay", post(pay)).with_state(endpoint);
    let status = send(&unlayered, request("/pay", Some("k-nolayer"), &body())).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let events = recorder.take_at_least(tracing::Level::INFO);
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].level, tracing::Level::ERROR);
    assert_eq!(events[0].field("path"), Some("/pay"), "{events:#?}");

    // Nothing secret, at any level, in any event or span.
    let everything = recorder.everything();
    for secret in ["SECRETAPIKEY", "SECRETKEY", REQUEST_SECRET, RESPONSE_SECRET] {
        assert!(
            !everything.contains(secret),
            "{secret} logged: {everything}"
        );
    }
}
