//! The engine through real axum Routers, driven with `ServiceExt::oneshot`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use idempotent_core::clock::ManualClock;
use idempotent_core::record::{Claim, LeaseToken, Record, RecordKey, StoredResponse};
use idempotent_core::store::{MemoryStore, Store, StoreError};
use idempotent_core::{
    Endpoint, Fingerprint, Idempotency, IdempotentLayer, IdempotentRequest, Scope,
};
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};
use tower::ServiceExt;

use crate::forwarding;
use forwarding::{Forwarding, Hooks};

/// What a test handler does when it runs.
#[derive(Clone, Default)]
struct Handler {
    runs: Arc<AtomicUsize>,
    /// When set, the handler waits for a permit before answering.
    gate: Option<Arc<Semaphore>>,
    started: Arc<Notify>,
    status: Option<StatusCode>,
    panic: bool,
    body_len: usize,
}

impl Handler {
    /// A handler that waits for a permit of the gate it comes with.
    fn gated() -> (Self, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        let handler = Self {
            gate: Some(gate.clone()),
            ..Self::default()
        };
        (handler, gate)
    }

    /// A handler that answers `status`.
    fn answering(status: StatusCode) -> Self {
        Self {
            status: Some(status),
            ..Self::default()
        }
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

async fn respond(handler: Handler, input: Value) -> Response {
    let run = handler.runs.fetch_add(1, Ordering::SeqCst) + 1;
    handler.started.notify_one();
    if let Some(gate) = &handler.gate {
        let _permit = gate.acquire().await.expect("gate open");
    }
    assert!(!handler.panic, "handler panicked on purpose");
    let status = handler.status.unwrap_or(StatusCode::CREATED);
    let body = json!({ "run": run, "input": input, "pad": "x".repeat(handler.body_len) });
    let cookie = [("set-cookie", "session=first-caller"), ("x-run", "yes")];
    (status, cookie, Json(body)).into_response()
}

async fn endpoint_handler(
    State((handler, endpoint)): State<(Handler, Endpoint)>,
    idem: IdempotentRequest,
    Json(input): Json<Value>,
) -> Response {
    let fingerprint = endpoint.fingerprint(&input);
    idem.run(&endpoint, fingerprint, respond(handler, input))
        .await
}

fn app_with(idempotency: Idempotency, handler: &Handler, endpoint: Endpoint) -> Router {
    Router::new()
        .route("/pay", post(endpoint_handler))
        .with_state((handler.clone(), endpoint))
        .layer(idempotency)
}

fn app(store: impl Store, handler: &Handler) -> Router {
    app_with(Idempotency::new(store), handler, Endpoint::new("pay"))
}

fn request(key: Option<&str>, body: &Value) -> Request<Body> {
    let mut builder = Request::post("/pay")
        .header("content-type", "application/json")
        .header("x-api-key", "caller-1");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body.to_string())).unwrap()
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, http::HeaderMap, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status, parts.headers, json)
}

/// Sends a request with `key` and `body` on its own task, as a separate
/// client would.
fn spawn_send(
    app: &Router,
    key: &'static str,
    body: &Value,
) -> tokio::task::JoinHandle<(StatusCode, http::HeaderMap, Value)> {
    let app = app.clone();
    let request = request(Some(key), body);
    tokio::spawn(async move { send(&app, request).await })
}

fn replayed(headers: &http::HeaderMap) -> bool {
    headers
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

#[tokio::test]
async fn first_request_executes_and_retries_replay_it() {
    let handler = Handler::default();
    let app = app(MemoryStore::new(), &handler);
    let body = json!({"amount": 10});

    let (status, headers, first) = send(&app, request(Some("k1"), &body)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!replayed(&headers));

    let (status, headers, again) = send(&app, request(Some("\"k1\""), &body)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed(&headers));
    assert_eq!(again, first);
    assert_eq!(headers["x-run"], "yes");
    assert!(
        headers.get("set-cookie").is_none(),
        "cookies of the first caller are never replayed"
    );
    assert_eq!(handler.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_duplicates_execute_once() {
    let (handler, gate) = Handler::gated();
    let app = app(MemoryStore::new(), &handler);
    let body = json!({"amount": 10});

    let requests: Vec<_> = (0..100).map(|_| spawn_send(&app, "same", &body)).collect();
    handler.started.notified().await;
    // Let the in-flight duplicates come back 409 before the first finishes.
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.add_permits(1);

    let mut created = 0;
    for task in requests {
        let (status, headers, _) = task.await.unwrap();
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => assert_eq!(headers["retry-after"], "1"),
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(handler.runs(), 1);
    assert!(created >= 1);
    let (status, headers, _) = send(&app, request(Some("same"), &body)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed(&headers));
}

#[tokio::test]
async fn in_flight_duplicate_gets_409_problem() {
    let (handler, gate) = Handler::gated();
    let app = app(MemoryStore::new(), &handler);
    let body = json!({"amount": 1});
    let first = spawn_send(&app, "k", &body);
    handler.started.notified().await;

    let (status, headers, problem) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(problem["type"], "urn:idempotent:request-in-progress");
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
}

#[tokio::test]
async fn waiting_duplicate_replays_the_first_response() {
    waiting_duplicate_replays(Endpoint::new("pay").wait(Duration::from_secs(5))).await;
}

#[tokio::test]
async fn durations_too_long_for_the_clock_mean_as_long_as_it_takes() {
    let endpoint = Endpoint::new("pay")
        .wait(Duration::MAX)
        .lease(Duration::MAX)
        .ttl(Duration::MAX);
    // Before they were capped, every request here panicked before its
    // handler started, which the helper would wait for forever.
    let replays = waiting_duplicate_replays(endpoint);
    tokio::time::timeout(Duration::from_secs(10), replays)
        .await
        .expect("the first request reached its handler");
}

async fn waiting_duplicate_replays(endpoint: Endpoint) {
    let (handler, gate) = Handler::gated();
    let app = app_with(Idempotency::new(MemoryStore::new()), &handler, endpoint);
    let body = json!({"amount": 1});
    let first = spawn_send(&app, "k", &body);
    handler.started.notified().await;
    let duplicate = spawn_send(&app, "k", &body);
    tokio::time::sleep(Duration::from_millis(30)).await;
    gate.add_permits(1);

    let (status, headers, replay) = duplicate.await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed(&headers));
    assert_eq!(replay, first.await.unwrap().2);
    assert_eq!(handler.runs(), 1);
}

#[tokio::test]
async fn same_key_with_a_different_payload_is_422() {
    let handler = Handler::default();
    let app = app(MemoryStore::new(), &handler);
    send(&app, request(Some("k"), &json!({"amount": 10}))).await;

    let (status, headers, problem) = send(&app, request(Some("k"), &json!({"amount": 11}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(problem["type"], "urn:idempotent:key-reused");
    assert_eq!(problem["status"], 422);
    assert_eq!(handler.runs(), 1);
}

#[tokio::test]
async fn a_reused_keys_detail_names_no_endpoint() {
    let handler = Handler::default();
    let endpoint = Endpoint::new("payments::create_payment");
    let app = app_with(Idempotency::new(MemoryStore::new()), &handler, endpoint);
    send(&app, request(Some("k"), &json!({"amount": 10}))).await;

    let (_, _, problem) = send(&app, request(Some("k"), &json!({"amount": 11}))).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(!detail.contains("create_payment"), "{detail}");
    assert!(
        detail.contains("at this endpoint or another one"),
        "{detail}"
    );
    assert!(
        detail.ends_with("send a new key for a new request"),
        "{detail}"
    );
}

#[tokio::test]
async fn field_order_and_whitespace_do_not_change_the_fingerprint() {
    let handler = Handler::default();
    let app = app(MemoryStore::new(), &handler);
    let first = Request::post("/pay")
        .header("content-type", "application/json")
        .header("x-api-key", "caller-1")
        .header("idempotency-key", "k")
        .body(Body::from(r#"{"a":1,"b":[1,2]}"#))
        .unwrap();
    let second = Request::post("/pay")
        .header("content-type", "application/json")
        .header("x-api-key", "caller-1")
        .header("idempotency-key", "k")
        .body(Body::from("{ \"b\" : [1, 2],\n \"a\" : 1 }"))
        .unwrap();
    send(&app, first).await;
    let (status, headers, _) = send(&app, second).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed(&headers));
}

#[tokio::test]
async fn keys_of_different_callers_do_not_meet() {
    let handler = Handler::default();
    let app = app(MemoryStore::new(), &handler);
    let body = json!({"amount": 1});
    send(&app, request(Some("k"), &body)).await;
    let mut other = request(Some("k"), &body);
    other
        .headers_mut()
        .insert("x-api-key", "caller-2".parse().unwrap());
    let (status, headers, _) = send(&app, other).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!replayed(&headers));
    assert_eq!(handler.runs(), 2);
}

/// What the retry of a request whose handler answered `status` gets:
/// its status, whether it is a replay, and how many times the handler ran.
async fn retried_after(status: StatusCode) -> (StatusCode, bool, usize) {
    let handler = Handler::answering(status);
    let app = app(MemoryStore::new(), &handler);
    let body = json!({"amount": 1});
    send(&app, request(Some("k"), &body)).await;
    let (status, headers, _) = send(&app, request(Some("k"), &body)).await;
    (status, replayed(&headers), handler.runs())
}

#[tokio::test]
async fn server_errors_are_released_and_the_retry_runs() {
    let retry = retried_after(StatusCode::INTERNAL_SERVER_ERROR).await;
    assert_eq!(retry, (StatusCode::INTERNAL_SERVER_ERROR, false, 2));
}

#[tokio::test]
async fn client_errors_are_stored_and_replayed() {
    let retry = retried_after(StatusCode::BAD_REQUEST).await;
    assert_eq!(retry, (StatusCode::BAD_REQUEST, true, 1));
}

#[tokio::test]
async fn retryable_client_errors_are_released() {
    let retry = retried_after(StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(retry, (StatusCode::TOO_MANY_REQUESTS, false, 2));
}

#[tokio::test]
async fn a_panicking_handler_releases_the_key_and_the_retry_runs() {
    let panicking = Handler {
        panic: true,
        ..Handler::default()
    };
    let store = MemoryStore::new();
    let app = app(store.clone(), &panicking);
    let body = json!({"amount": 1});
    let outcome = spawn_send(&app, "k", &body).await;
    assert!(
        outcome.unwrap_err().is_panic(),
        "the panic reaches the server as before"
    );
    assert_eq!(store.in_flight_len(), 0);

    let healthy = Handler {
        runs: panicking.runs.clone(),
        ..Handler::default()
    };
    let app = app_with(Idempotency::new(store), &healthy, Endpoint::new("pay"));
    let (status, headers, _) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!replayed(&headers));
    assert_eq!(healthy.runs(), 2);
}

/// Waits, half a second at most, for `store` to hold one completed record.
async fn until_stored(store: &MemoryStore) {
    for _ in 0..100 {
        if store.completed_len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends `body` under key `k` from a client that goes away once the
/// handler has started, then lets the handler finish and waits for its
/// record to be stored. Returns the app and its handler.
async fn abandoned_run(body: &Value) -> (Router, Handler) {
    let (handler, gate) = Handler::gated();
    let store = MemoryStore::new();
    let app = app(store.clone(), &handler);
    let client = spawn_send(&app, "k", body);
    handler.started.notified().await;
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());

    gate.add_permits(1);
    until_stored(&store).await;
    (app, handler)
}

#[tokio::test]
async fn a_dropped_client_still_gets_its_outcome_stored() {
    let body = json!({"amount": 5});
    let (app, handler) = abandoned_run(&body).await;
    let (status, headers, replay) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed(&headers), "the abandoned run completed the record");
    assert_eq!(replay["run"], 1);
    assert_eq!(handler.runs(), 1);
}

#[tokio::test]
async fn drain_waits_for_a_run_whose_client_went_away() {
    let (handler, gate) = Handler::gated();
    let store = MemoryStore::new();
    let idempotency = Idempotency::new(store.clone());
    let app = app_with(idempotency.clone(), &handler, Endpoint::new("pay"));
    let client = spawn_send(&app, "k", &json!({"amount": 5}));
    handler.started.notified().await;
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());

    // The server has stopped; the abandoned run is still charging.
    let drained = tokio::spawn(async move { idempotency.drain().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!drained.is_finished(), "drained before the run finished");
    gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(5), drained)
        .await
        .expect("drained once the run finished")
        .unwrap();
    assert_eq!(
        store.completed_len(),
        1,
        "the run's outcome is stored by the time drain returns"
    );
}

#[tokio::test]
async fn drain_returns_at_once_when_nothing_outlived_its_request() {
    let handler = Handler::default();
    let idempotency = Idempotency::new(MemoryStore::new());
    let app = app_with(idempotency.clone(), &handler, Endpoint::new("pay"));
    let (status, _, _) = send(&app, request(Some("k"), &json!({"amount": 5}))).await;
    assert_eq!(status, StatusCode::CREATED);
    tokio::time::timeout(Duration::from_secs(1), idempotency.drain())
        .await
        .expect("nothing to wait for");
}

#[tokio::test]
async fn a_request_dropped_while_its_task_unwinds_from_another_panic_still_finishes() {
    let (handler, gate) = Handler::gated();
    let store = MemoryStore::new();
    let app = app(store.clone(), &handler);
    let body = json!({"amount": 5});
    let first = request(Some("k"), &body);
    let (outer, started) = (app.clone(), handler.started.clone());
    let task = tokio::spawn(async move {
        let mut response = std::pin::pin!(outer.oneshot(first));
        tokio::select! {
            _ = &mut response => unreachable!("the handler waits at the gate"),
            () = started.notified() => {}
        }
        // Something else in this task panics while the request is held.
        panic!("an unrelated failure");
    });
    assert!(task.await.unwrap_err().is_panic());

    gate.add_permits(1);
    until_stored(&store).await;
    let (status, headers, replay) = send(&app, request(Some("k"), &body)).await;
    assert_eq!((status, replayed(&headers)), (StatusCode::CREATED, true));
    assert_eq!(replay["run"], 1);
}

/// Records which spans each event was emitted in (on the current thread,
/// which runs every task of a `#[tokio::test]`).
#[derive(Default)]
struct SpanRecorder {
    spans: std::sync::Mutex<Vec<&'static tracing::Metadata<'static>>>,
    entered: std::sync::Mutex<Vec<u64>>,
    /// Each event's `outcome` field, with the names of the spans it was in.
    outcomes: std::sync::Mutex<Vec<(String, Vec<&'static str>)>>,
    /// Each event's `outcome` and `endpoint` fields, when it has both.
    endpoints: std::sync::Mutex<Vec<(String, String)>>,
    /// The message of each event at the `ERROR` level.
    errors: std::sync::Mutex<Vec<String>>,
}

#[derive(Default)]
struct Outcome {
    outcome: Option<String>,
    endpoint: Option<String>,
    message: Option<String>,
}

impl tracing::field::Visit for Outcome {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "outcome" => self.outcome = Some(value.to_owned()),
            "endpoint" => self.endpoint = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = Some(format!("{value:?}"));
        }
    }
}

impl tracing::Subscriber for SpanRecorder {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut spans = self.spans.lock().unwrap();
        spans.push(span.metadata());
        tracing::span::Id::from_u64(spans.len() as u64)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Outcome::default();
        event.record(&mut fields);
        if *event.metadata().level() == tracing::Level::ERROR {
            let message = fields.message.clone().unwrap_or_default();
            self.errors.lock().unwrap().push(message);
        }
        if let (Some(outcome), Some(endpoint)) = (&fields.outcome, fields.endpoint) {
            let logged = (outcome.clone(), endpoint);
            self.endpoints.lock().unwrap().push(logged);
        }
        if let Some(outcome) = fields.outcome {
            let metadata = self.spans.lock().unwrap();
            let entered = self.entered.lock().unwrap();
            let spans = entered.iter().map(|id| metadata[*id as usize - 1].name());
            let spans = spans.collect();
            self.outcomes.lock().unwrap().push((outcome, spans));
        }
    }

    fn enter(&self, span: &tracing::span::Id) {
        self.entered.lock().unwrap().push(span.into_u64());
    }

    fn exit(&self, span: &tracing::span::Id) {
        let mut entered = self.entered.lock().unwrap();
        let last = entered.iter().rposition(|id| *id == span.into_u64());
        entered.remove(last.expect("exits a span it entered"));
    }

    fn current_span(&self) -> tracing_core::span::Current {
        let Some(&id) = self.entered.lock().unwrap().last() else {
            return tracing_core::span::Current::none();
        };
        let metadata = self.spans.lock().unwrap()[id as usize - 1];
        tracing_core::span::Current::new(tracing::span::Id::from_u64(id), metadata)
    }
}

/// One test for both cases: tracing's callsite cache is shared by the
/// whole process, and two tests installing and dropping their own
/// subscribers on parallel threads can make either miss events.
#[tokio::test]
async fn outcomes_are_logged_once_inside_the_requests_span() {
    // While a single dispatcher is registered, tracing caches the interest
    // of a callsite reached for the first time from that thread's default
    // alone: reached first by another test, whose thread has no
    // subscriber, an event would stay disabled for the recorder too. A
    // second registered dispatcher makes every callsite ask them all.
    let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let recorder = Arc::new(SpanRecorder::default());
    let _default = tracing::subscriber::set_default(recorder.clone());
    request_then_replay_log_in_the_span(&recorder).await;
    recorder.outcomes.lock().unwrap().clear();
    a_dropped_clients_run_logs_in_the_span(&recorder).await;
    recorder.outcomes.lock().unwrap().clear();
    a_completion_applied_but_timed_out_logs_executed(&recorder).await;
    a_mismatch_logs_the_endpoint_the_client_is_not_told(&recorder).await;
    a_router_without_the_layer_logs_an_error(&recorder).await;
}

async fn a_router_without_the_layer_logs_an_error(recorder: &SpanRecorder) {
    recorder.errors.lock().unwrap().clear();
    let handler = Handler::default();
    let app = Router::new()
        .route("/pay", post(endpoint_handler))
        .with_state((handler.clone(), Endpoint::new("pay")));
    let (status, _, _) = send(&app, request(Some("k"), &json!({}))).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let errors = recorder.errors.lock().unwrap().clone();
    assert!(
        errors
            .iter()
            .any(|message| message.contains("without an `Idempotency` layer")),
        "the operator is told, not only the client: {errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|message| message.contains("after the `.route(...)` calls")),
        "the operator is told the fix, as the layer added before the route is the common cause: {errors:?}"
    );
}

async fn a_mismatch_logs_the_endpoint_the_client_is_not_told(recorder: &SpanRecorder) {
    let handler = Handler::default();
    let app = app(MemoryStore::new(), &handler);
    send(&app, request(Some("k"), &json!({"amount": 10}))).await;
    let (status, _, _) = send(&app, request(Some("k"), &json!({"amount": 11}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let endpoints = recorder.endpoints.lock().unwrap().clone();
    // The completion before, applied though its answer was lost, is told
    // at info once found stored: it names its endpoint too.
    assert_eq!(
        endpoints,
        [
            ("executed".to_owned(), "pay".to_owned()),
            ("mismatch".to_owned(), "pay".to_owned())
        ],
        "the event names the endpoint itself: the request's span is at debug level"
    );
}

async fn request_then_replay_log_in_the_span(recorder: &SpanRecorder) {
    let handler = Handler::default();
    let app = app(MemoryStore::new(), &handler);
    let body = json!({"amount": 5});
    for _ in 0..2 {
        let (status, _, _) = send(&app, request(Some("k"), &body)).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let outcomes = recorder.outcomes.lock().unwrap().clone();
    assert_eq!(
        outcomes,
        [
            ("executed".to_owned(), vec!["idempotent"]),
            ("replayed".to_owned(), vec!["idempotent"]),
        ],
        "each outcome is logged in the request's span, entered once"
    );
}

async fn a_dropped_clients_run_logs_in_the_span(recorder: &SpanRecorder) {
    let _run = abandoned_run(&json!({"amount": 5})).await;
    let outcomes = recorder.outcomes.lock().unwrap().clone();
    assert_eq!(
        outcomes,
        [("executed".to_owned(), vec!["idempotent"])],
        "the rest of the run, on its own task, logs in the request's span"
    );
}

async fn a_completion_applied_but_timed_out_logs_executed(recorder: &SpanRecorder) {
    let store = Unreliable::new(Duration::ZERO, 0);
    store.lost_completion_replies.store(1, Ordering::SeqCst);
    let handler = Handler::default();
    let app = app(store, &handler);
    let body = json!({"amount": 5});
    for _ in 0..2 {
        let (status, _, _) = send(&app, request(Some("k"), &body)).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let outcomes: Vec<String> = recorder
        .outcomes
        .lock()
        .unwrap()
        .iter()
        .map(|(outcome, _)| outcome.clone())
        .collect();
    assert_eq!(
        outcomes,
        ["executed", "replayed"],
        "the second attempt's LeaseLost is the record already stored, not a store error"
    );
    assert_eq!(handler.runs(), 1);
}

#[tokio::test]
async fn records_expire_by_the_store_clock() {
    let clock = ManualClock::new(1_000_000);
    let store = MemoryStore::builder().clock(clock.clone()).build();
    let handler = Handler::default();
    let endpoint = Endpoint::new("pay").ttl(Duration::from_secs(60));
    let app = app_with(Idempotency::new(store), &handler, endpoint);
    let body = json!({"amount": 1});

    send(&app, request(Some("k"), &body)).await;
    clock.advance(Duration::from_secs(59));
    let (_, headers, _) = send(&app, request(Some("k"), &body)).await;
    assert!(replayed(&headers));
    clock.advance(Duration::from_secs(2));
    let (status, headers, _) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!replayed(&headers), "after the TTL the key is new again");
    assert_eq!(handler.runs(), 2);
}

#[tokio::test]
async fn a_stale_lease_holder_cannot_overwrite_the_new_holders_result() {
    let clock = ManualClock::new(1_000_000);
    let store = MemoryStore::builder().clock(clock.clone()).build();
    let (slow, gate) = Handler::gated();
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(30));
    let idempotency = Idempotency::new(store.clone());
    let slow_app = app_with(idempotency.clone(), &slow, endpoint);
    let body = json!({"amount": 1});
    let stale = spawn_send(&slow_app, "k", &body);
    slow.started.notified().await;

    // The first holder's lease lapses (as if its process hung); a retry
    // takes the key over and completes.
    clock.advance(Duration::from_secs(31));
    let fast = Handler {
        runs: slow.runs.clone(),
        ..Handler::default()
    };
    let fast_app = app_with(idempotency, &fast, endpoint);
    let (status, _, taken_over) = send(&fast_app, request(Some("k"), &body)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(taken_over["run"], 2);

    gate.add_permits(1);
    let (status, _, stale_body) = stale.await.unwrap();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the stale holder still answers its own client"
    );
    assert_eq!(stale_body["run"], 1);
    let (_, headers, replay) = send(&fast_app, request(Some("k"), &body)).await;
    assert!(replayed(&headers));
    assert_eq!(replay["run"], 2, "the stored result is the new holder's");
}

#[tokio::test]
async fn fencing_at_the_store_level() {
    let clock = ManualClock::new(0);
    let store = MemoryStore::builder().clock(clock.clone()).build();
    let key = record_key("k");
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lease = Duration::from_secs(10);
    let Claim::Acquired(old) = store.claim(&key, fingerprint, lease).await.unwrap() else {
        panic!("first claim acquires");
    };
    clock.advance(Duration::from_secs(11));
    let Claim::Acquired(new) = store.claim(&key, fingerprint, lease).await.unwrap() else {
        panic!("a lapsed lease is taken over");
    };
    assert_ne!(old, new);
    let response = stored(StatusCode::OK);
    let ttl = Duration::from_secs(60);
    assert!(matches!(
        store.renew(&key, old, lease).await,
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(
        store.complete(&key, old, response.clone(), ttl).await,
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(
        store.release(&key, old).await,
        Err(StoreError::LeaseLost)
    ));
    store.complete(&key, new, response, ttl).await.unwrap();
    assert!(matches!(
        store.get(&key).await.unwrap(),
        Some(Record::Completed(_))
    ));
}

#[tokio::test]
async fn capacity_pressure_never_evicts_an_in_flight_claim() {
    let store = MemoryStore::builder().max_bytes(16 * 1024).build();
    let held = record_key("held");
    let fingerprint = Fingerprint::from_bytes([2; 32]);
    let lease = Duration::from_secs(60);
    assert!(matches!(
        store.claim(&held, fingerprint, lease).await.unwrap(),
        Claim::Acquired(_)
    ));

    let mut response = stored(StatusCode::OK);
    response.body = Some(vec![7; 1024].into());
    for i in 0..1_000 {
        let key = record_key(&format!("filler-{i}"));
        let Claim::Acquired(token) = store.claim(&key, fingerprint, lease).await.unwrap() else {
            panic!("new key");
        };
        store
            .complete(&key, token, response.clone(), Duration::from_secs(600))
            .await
            .unwrap();
    }
    assert!(
        store.completed_bytes() <= 16 * 1024,
        "completed records are bounded"
    );
    assert!(
        store.completed_len() < 1_000,
        "older completed records were evicted"
    );
    let again = store.claim(&held, fingerprint, lease).await.unwrap();
    assert!(
        matches!(again, Claim::InFlight { .. }),
        "the in-flight claim survived: {again:?}"
    );
}

#[tokio::test]
async fn missing_key_is_400_unless_optional() {
    let handler = Handler::default();
    let app = app(MemoryStore::new(), &handler);
    let (status, headers, problem) = send(&app, request(None, &json!({}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(problem["type"], "urn:idempotent:missing-key");
    assert_eq!(handler.runs(), 0);

    let optional = Endpoint::new("pay").optional(true);
    let app = app_with(Idempotency::new(MemoryStore::new()), &handler, optional);
    for _ in 0..2 {
        let (status, headers, _) = send(&app, request(None, &json!({}))).await;
        assert_eq!(status, StatusCode::CREATED);
        assert!(!replayed(&headers));
    }
    assert_eq!(handler.runs(), 2);
}

#[tokio::test]
async fn invalid_keys_are_400_with_the_reason() {
    let handler = Handler::default();
    let app = app(MemoryStore::new(), &handler);
    let long = "a".repeat(256);
    for (key, needle) in [
        ("a b", "offset 1 of its value"),
        (long.as_str(), "256 characters"),
        ("\"open", "closing quote"),
    ] {
        let (status, _, problem) = send(&app, request(Some(key), &json!({}))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{key}");
        assert_eq!(problem["type"], "urn:idempotent:invalid-key");
        assert!(
            problem["detail"].as_str().unwrap().contains(needle),
            "{problem}"
        );
    }
    let mut twice = request(Some("a"), &json!({}));
    twice
        .headers_mut()
        .append("idempotency-key", "b".parse().unwrap());
    let (status, _, problem) = send(&app, twice).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("more than once")
    );
    assert_eq!(handler.runs(), 0);
}

#[tokio::test]
async fn a_request_without_its_scope_credential_is_401() {
    let handler = Handler::default();
    let app = app(MemoryStore::new(), &handler);
    let mut anonymous = request(Some("k"), &json!({}));
    anonymous.headers_mut().remove("x-api-key");
    let (status, headers, problem) = send(&app, anonymous).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(problem["type"], "urn:idempotent:missing-credentials");
    assert_eq!(
        headers["www-authenticate"], "Bearer",
        "a 401 carries a challenge"
    );
    assert_eq!(handler.runs(), 0);

    let mut bearer = request(Some("k"), &json!({}));
    bearer.headers_mut().remove("x-api-key");
    bearer
        .headers_mut()
        .insert("authorization", "Bearer caller-1".parse().unwrap());
    let (status, _, _) = send(&app, bearer).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn header_and_global_scopes() {
    let handler = Handler::default();
    let tenant = Endpoint::new("pay").scope(Scope::Header("x-tenant"));
    let app = app_with(Idempotency::new(MemoryStore::new()), &handler, tenant);
    let (status, _, _) = send(&app, request(Some("k"), &json!({}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let mut with_tenant = request(Some("k"), &json!({}));
    with_tenant
        .headers_mut()
        .insert("x-tenant", "t1".parse().unwrap());
    assert_eq!(send(&app, with_tenant).await.0, StatusCode::CREATED);

    let global = Endpoint::new("pay").scope(Scope::Global);
    let app = app_with(Idempotency::new(MemoryStore::new()), &handler, global);
    let mut anonymous = request(Some("g"), &json!({}));
    anonymous.headers_mut().remove("x-api-key");
    send(&app, anonymous).await;
    let (_, headers, _) = send(&app, request(Some("g"), &json!({}))).await;
    assert!(replayed(&headers), "a global key is shared by every caller");
}

#[tokio::test]
async fn a_router_without_the_layer_gets_a_500_that_says_what_to_add() {
    let handler = Handler::default();
    let app = Router::new()
        .route("/pay", post(endpoint_handler))
        .with_state((handler.clone(), Endpoint::new("pay")));
    let (status, _, problem) = send(&app, request(Some("k"), &json!({}))).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(problem["type"], "urn:idempotent:not-configured");
    assert!(problem["detail"].as_str().unwrap().contains(".layer("));
    assert_eq!(handler.runs(), 0);
}

#[tokio::test]
async fn a_layer_added_before_the_route_gets_a_500_that_says_so() {
    let handler = Handler::default();
    let app = Router::new()
        .layer(Idempotency::new(MemoryStore::new()))
        .route("/pay", post(endpoint_handler))
        .with_state((handler.clone(), Endpoint::new("pay")));
    let (status, _, problem) = send(&app, request(Some("k"), &json!({}))).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("`Router::layer` wraps only the routes added before it"),
        "{detail}"
    );
    assert_eq!(handler.runs(), 0);
}

/// Runs the rest of the request on a task of its own, as some middleware
/// does; `carry` is what it puts in the request's extensions first.
async fn spawning(
    carry: Option<Idempotency>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(idempotency) = carry {
        request.extensions_mut().insert(idempotency);
    }
    tokio::spawn(next.run(request)).await.unwrap()
}

#[tokio::test]
async fn a_handler_on_a_spawned_task_finds_the_handle_only_in_the_extensions() {
    let handler = Handler::default();
    let idempotency = Idempotency::new(MemoryStore::new());
    let app_carrying = |carry: Option<Idempotency>| {
        let middleware = move |request, next| spawning(carry.clone(), request, next);
        Router::new()
            .route("/pay", post(endpoint_handler))
            .with_state((handler.clone(), Endpoint::new("pay")))
            .layer(axum::middleware::from_fn(middleware))
            .layer(idempotency.clone())
    };
    let (status, _, problem) = send(&app_carrying(None), request(Some("k"), &json!({}))).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("spawned task"), "{detail}");
    assert!(detail.contains("extensions_mut().insert("), "{detail}");
    assert_eq!(handler.runs(), 0);

    let carrying = app_carrying(Some(idempotency.clone()));
    let (status, _, _) = send(&carrying, request(Some("k"), &json!({}))).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(handler.runs(), 1);
}

#[tokio::test]
async fn a_handle_carried_as_a_request_extension_works_without_the_layer() {
    let handler = Handler::default();
    let app = Router::new()
        .route("/pay", post(endpoint_handler))
        .with_state((handler.clone(), Endpoint::new("pay")));
    let idempotency = Idempotency::new(MemoryStore::new());
    let with_handle = || {
        let mut request = request(Some("k"), &json!({"amount": 1}));
        request.extensions_mut().insert(idempotency.clone());
        request
    };
    let (first, _, _) = send(&app, with_handle()).await;
    let (second, headers, _) = send(&app, with_handle()).await;
    assert_eq!((first, second), (StatusCode::CREATED, StatusCode::CREATED));
    assert!(replayed(&headers), "the retry is answered from the store");
    assert_eq!(handler.runs(), 1);
}

#[tokio::test]
async fn the_innermost_layer_serves_a_route_wrapped_twice() {
    let handler = Handler::default();
    let inner = MemoryStore::new();
    let outer = MemoryStore::new();
    let app = app_with(
        Idempotency::new(inner.clone()),
        &handler,
        Endpoint::new("pay"),
    )
    .layer(Idempotency::new(outer.clone()));
    send(&app, request(Some("k"), &json!({}))).await;
    assert_eq!((inner.completed_len(), outer.completed_len()), (1, 0));
}

#[tokio::test]
async fn an_oversized_response_is_sent_whole_but_never_executed_twice() {
    let handler = Handler {
        body_len: 4096,
        ..Handler::default()
    };
    let idempotency = Idempotency::builder(MemoryStore::new())
        .max_body_bytes(1024)
        .build();
    let app = app_with(idempotency, &handler, Endpoint::new("pay"));
    let body = json!({"amount": 1});
    let (status, _, first) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(first["pad"].as_str().unwrap().len(), 4096);

    let (status, headers, problem) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(status, StatusCode::GONE);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(problem["type"], "urn:idempotent:response-not-stored");
    assert!(problem["detail"].as_str().unwrap().contains("201"));
    assert_eq!(handler.runs(), 1);
}

/// How the first run's response body comes: after `gate` opens, or with
/// a panic.
#[derive(Clone)]
enum FirstBody {
    Gated(Arc<Semaphore>),
    Panics,
    /// One chunk, then an error.
    FailsMidway,
}

/// Answers 201 at once; the first run's body streams as `first` says,
/// later runs' bodies come whole.
async fn streaming_handler(
    State((runs, first, endpoint)): State<(Arc<AtomicUsize>, FirstBody, Endpoint)>,
    idem: IdempotentRequest,
    Json(input): Json<Value>,
) -> Response {
    let fingerprint = endpoint.fingerprint(&input);
    let handler = async move {
        let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
        let fails_midway = matches!(first, FirstBody::FailsMidway);
        let chunk = async move {
            match first {
                _ if run > 1 => {}
                FirstBody::Gated(gate) => drop(gate.acquire().await.expect("gate open")),
                FirstBody::Panics => panic!("the body stream panicked on purpose"),
                FirstBody::FailsMidway => {}
            }
            let json = json!({ "run": run }).to_string();
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(json))
        };
        let body = if run == 1 && fails_midway {
            let failure = std::io::Error::other("the cursor died");
            let chunks = [Ok(bytes::Bytes::from_static(b"{\"run\":")), Err(failure)];
            Body::from_stream(futures_util::stream::iter(chunks))
        } else {
            Body::from_stream(futures_util::stream::once(chunk))
        };
        (StatusCode::CREATED, body).into_response()
    };
    idem.run(&endpoint, fingerprint, handler).await
}

fn streaming_app(store: MemoryStore, runs: &Arc<AtomicUsize>, first: FirstBody) -> Router {
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(30));
    Router::new()
        .route("/pay", post(streaming_handler))
        .with_state((runs.clone(), first, endpoint))
        .layer(Idempotency::new(store))
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_renewed_while_the_response_body_streams() {
    let clock = ManualClock::new(1_000_000);
    let store = MemoryStore::builder().clock(clock.clone()).build();
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let app = streaming_app(store, &runs, FirstBody::Gated(gate.clone()));
    let body = json!({"amount": 1});
    let first = spawn_send(&app, "k", &body);

    // Twice the 30 s lease passes, a renewal period at a time, while the
    // first response's body is still coming.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(10_001)).await;
        clock.advance(Duration::from_secs(10));
    }
    let (status, _, _) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the first run still holds the key"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    gate.add_permits(1);
    let (status, _, streamed) = first.await.unwrap();
    assert_eq!(
        (status, streamed["run"].as_u64()),
        (StatusCode::CREATED, Some(1))
    );
    let (_, headers, replay) = send(&app, request(Some("k"), &body)).await;
    assert!(replayed(&headers));
    assert_eq!(replay["run"], 1);
}

#[tokio::test]
async fn a_response_body_that_fails_midway_is_never_run_again_and_says_why() {
    let store = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = streaming_app(store, &runs, FirstBody::FailsMidway);
    let body = json!({"amount": 1});
    let first = app
        .clone()
        .oneshot(request(Some("k"), &body))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(
        first.into_body().collect().await.is_err(),
        "the caller sees the failure"
    );

    let (status, _, problem) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(status, StatusCode::GONE);
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("failed while being sent"), "{detail}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

async fn many_headers() -> impl IntoResponse {
    let mut headers = http::HeaderMap::new();
    for _ in 0..=u16::MAX {
        headers.append("x-a", http::HeaderValue::from_static("1"));
    }
    (StatusCode::CREATED, headers, "made")
}

#[tokio::test]
async fn a_response_with_more_headers_than_a_record_holds_is_never_replayed_short() {
    let app = Router::new()
        .route("/many", post(many_headers))
        .route_layer(IdempotentLayer::new(Endpoint::new("many")))
        .layer(Idempotency::new(MemoryStore::new()));
    let many = || {
        Request::post("/many")
            .header("x-api-key", "caller")
            .header("idempotency-key", "k")
            .body(Body::empty())
            .unwrap()
    };
    let first = app.clone().oneshot(many()).await.unwrap();
    assert_eq!(first.headers().get_all("x-a").iter().count(), 65_536);
    let (status, _, problem) = send(&app, many()).await;
    assert_eq!(status, StatusCode::GONE, "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("65,535 headers"), "{detail}");
}

#[tokio::test]
async fn a_response_body_that_panics_releases_the_key() {
    let store = MemoryStore::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = streaming_app(store.clone(), &runs, FirstBody::Panics);
    let body = json!({"amount": 1});
    let outcome = spawn_send(&app, "k", &body).await;
    assert!(
        outcome.unwrap_err().is_panic(),
        "the panic reaches the server"
    );
    assert_eq!(store.in_flight_len(), 0);

    let (status, headers, retried) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!replayed(&headers));
    assert_eq!(retried["run"], 2);
}

#[cfg(feature = "test-util")]
#[tokio::test]
async fn a_completion_that_fails_once_is_tried_again_so_a_later_retry_replays() {
    use idempotent_core::testing::{MockStore, OpKind};
    let store = MockStore::new();
    let handler = Handler::default();
    let app = app(store.clone(), &handler);
    let body = json!({"amount": 10});
    store.fail_next(OpKind::Complete);
    let (status, _, first) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(
        (status, first["run"].as_u64()),
        (StatusCode::CREATED, Some(1))
    );
    // Past the lease: had the record stayed in flight, this would run again.
    store.advance(Duration::from_secs(61));
    let (status, headers, again) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(replayed(&headers), "the handler ran again: {again}");
    assert_eq!(handler.runs(), 1);
}

/// A 5xx releases the key so that the client's retry runs again: one
/// failed release (a blip) must not leave it claimed for a whole lease.
#[cfg(feature = "test-util")]
#[tokio::test]
async fn a_release_that_fails_once_is_tried_again_so_the_retry_runs() {
    use idempotent_core::testing::{MockStore, OpKind};
    let store = MockStore::new();
    let handler = Handler::answering(StatusCode::SERVICE_UNAVAILABLE);
    let app = app(store.clone(), &handler);
    let body = json!({"amount": 10});
    store.fail_next(OpKind::Release);
    let (status, _, _) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Well within the lease: a key still claimed would answer 409.
    let (status, _, _) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the retry found the key still claimed"
    );
    assert_eq!(handler.runs(), 2);
    assert_eq!(store.count(OpKind::Release), 2);
}

/// The same for a handler that panics: its key is released although the
/// first attempt failed, and a waiting duplicate then runs.
#[cfg(feature = "test-util")]
#[tokio::test]
async fn a_waiting_duplicate_runs_after_a_panicking_first_whose_release_failed_once() {
    use idempotent_core::testing::{MockStore, OpKind};
    let store = MockStore::new();
    let (panicking, gate) = Handler::gated();
    let panicking = Handler {
        panic: true,
        ..panicking
    };
    let endpoint = Endpoint::new("pay").wait(Duration::from_secs(5));
    let idempotency = Idempotency::new(store.clone());
    let body = json!({"amount": 10});
    let first = spawn_send(
        &app_with(idempotency.clone(), &panicking, endpoint),
        "k",
        &body,
    );
    panicking.started.notified().await;
    let healthy = Handler {
        runs: panicking.runs.clone(),
        ..Handler::default()
    };
    let duplicate = spawn_send(&app_with(idempotency, &healthy, endpoint), "k", &body);
    store.fail_next(OpKind::Release);
    gate.add_permits(1);
    assert!(first.await.unwrap_err().is_panic());
    let (status, headers, _) = duplicate.await.unwrap();
    assert_eq!(
        (status, replayed(&headers)),
        (StatusCode::CREATED, false),
        "the duplicate waited out the key a failed release left claimed"
    );
    assert_eq!(healthy.runs(), 2);
}

/// A clock that follows tokio's paused clock, as the system clock follows
/// real time.
#[derive(Debug, Clone)]
struct TokioClock(tokio::time::Instant);

impl idempotent_core::clock::Clock for TokioClock {
    fn now_millis(&self) -> u64 {
        1_000_000 + u64::try_from(self.0.elapsed().as_millis()).unwrap()
    }
}

/// A memory store on tokio's clock whose `complete` takes
/// `completion_delay` before it applies, as over a slow network, whose
/// next `failing_renewals` renewals fail, and whose next
/// `lost_completion_replies` completions apply but answer a timeout.
struct Unreliable {
    inner: MemoryStore,
    completion_delay: Duration,
    failing_renewals: AtomicUsize,
    lost_completion_replies: AtomicUsize,
}

/// Takes one from `counter` if it is above zero.
fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl Unreliable {
    fn new(completion_delay: Duration, failing_renewals: usize) -> Forwarding<Self> {
        let inner = MemoryStore::builder()
            .clock(TokioClock(tokio::time::Instant::now()))
            .build();
        Forwarding(Self {
            inner,
            completion_delay,
            failing_renewals: AtomicUsize::new(failing_renewals),
            lost_completion_replies: AtomicUsize::new(0),
        })
    }
}

impl Hooks for Unreliable {
    type Inner = MemoryStore;

    fn inner(&self) -> &MemoryStore {
        &self.inner
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        if take_one(&self.failing_renewals) {
            return Err(StoreError::backend("injected renewal failure"));
        }
        self.inner.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        tokio::time::sleep(self.completion_delay).await;
        self.inner.complete(key, token, response, ttl).await?;
        if take_one(&self.lost_completion_replies) {
            return Err(StoreError::Timeout(Duration::from_secs(2)));
        }
        Ok(())
    }
}

/// A first request under `k` to a handler held at a gate, on `store` with
/// a lease of `lease_secs`, once the handler has started.
async fn running_behind_a_gate(
    store: impl Store,
    lease_secs: u64,
    body: &Value,
) -> (
    Router,
    Handler,
    Arc<Semaphore>,
    tokio::task::JoinHandle<(StatusCode, http::HeaderMap, Value)>,
) {
    let (handler, gate) = Handler::gated();
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(lease_secs));
    let app = app_with(Idempotency::new(store), &handler, endpoint);
    let first = spawn_send(&app, "k", body);
    handler.started.notified().await;
    (app, handler, gate, first)
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_renewed_while_the_response_is_being_stored() {
    // Within the 2 s store timeout, but most of a 2 s lease.
    let store = Unreliable::new(Duration::from_millis(1_900), 0);
    let body = json!({"amount": 10});
    let (app, handler, gate, first) = running_behind_a_gate(store, 2, &body).await;
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    gate.add_permits(1);
    // The response is on its way to the store when the duplicate comes.
    tokio::time::sleep(Duration::from_millis(1_750)).await;
    let (status, _, _) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the lease lapsed while storing"
    );
    gate.add_permits(1);
    let (status, _, _) = first.await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(handler.runs(), 1);
}

/// What a duplicate that finds a key free again tells.
const LAPSED: &str = "the lease lapsed and the duplicate ran the handler";

/// Asserts that a duplicate under `key` is answered 409 within a second:
/// the first run still holds the key. One that took a lapsed key over
/// would wait at the first run's gate too, or run; `lapsed` says so.
async fn assert_still_held(app: &Router, key: &str, body: &Value, lapsed: &str) {
    let duplicate = send(app, request(Some(key), body));
    let answer = tokio::time::timeout(Duration::from_secs(1), duplicate).await;
    let status = answer.map(|(status, _, _)| status).ok();
    assert_eq!(status, Some(StatusCode::CONFLICT), "{lapsed}");
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// How many tasks are alive once the others have had up to 100 turns to
/// come back down to `expected`.
async fn tasks_after_yielding(expected: usize) -> usize {
    for _ in 0..100 {
        if alive_tasks() == expected {
            break;
        }
        tokio::task::yield_now().await;
    }
    alive_tasks()
}

#[tokio::test(start_paused = true)]
async fn a_failed_renewal_is_tried_again_before_the_lease_lapses() {
    // A 3 s lease is renewed every second; three renewals in a row fail.
    let store = Unreliable::new(Duration::ZERO, 3);
    let body = json!({"amount": 10});
    let (app, handler, gate, first) = running_behind_a_gate(store, 3, &body).await;
    // Waiting a whole period after each failure, the lease would lapse at
    // 3 s with the third failure.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert_still_held(&app, "k", &body, LAPSED).await;
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(handler.runs(), 1);
}

/// A handler that outlives three leases keeps its claim, on a runtime
/// started after the runtime that ran the service's first claim ended: a
/// runtime's renewals run on that runtime.
#[test]
fn claims_are_renewed_on_a_runtime_that_came_after_another_ended() {
    let (handler, gate) = Handler::gated();
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(3));
    let idempotency = Idempotency::new(Unreliable::new(Duration::ZERO, 0));
    let app = app_with(idempotency.clone(), &handler, endpoint);
    let body = json!({"amount": 10});

    let earlier = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    earlier.block_on(async {
        let ungated = app_with(idempotency, &Handler::default(), endpoint);
        let (status, _, _) = send(&ungated, request(Some("earlier"), &body)).await;
        assert_eq!(status, StatusCode::CREATED);
        // The request's renewals have started watching this runtime.
        tokio::task::yield_now().await;
    });
    drop(earlier);

    let later = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    later.block_on(async {
        let first = spawn_send(&app, "k", &body);
        handler.started.notified().await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_still_held(&app, "k", &body, LAPSED).await;
        gate.add_permits(1);
        assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    });
    assert_eq!(handler.runs(), 1);
}

/// What watches a runtime's claims for renewal ends with the service.
#[tokio::test]
async fn nothing_keeps_running_once_the_service_is_dropped() {
    let before = alive_tasks();
    let app = app(MemoryStore::new(), &Handler::default());
    let (status, _, _) = send(&app, request(Some("k"), &json!({}))).await;
    assert_eq!(status, StatusCode::CREATED);
    // Whatever the request started gets to run and wait.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    drop(app);
    assert_eq!(
        tasks_after_yielding(before).await,
        before,
        "a task outlived the service"
    );
}

/// A claim with a short lease, made while the runtime's watcher waits out
/// the longer look interval of an earlier claim with a long lease, is
/// renewed before its own lease lapses.
#[tokio::test(start_paused = true)]
async fn a_short_lease_claimed_while_a_long_one_is_watched_does_not_lapse() {
    let idempotency = Idempotency::new(Unreliable::new(Duration::ZERO, 0));
    let (long_handler, long_gate) = Handler::gated();
    let long_app = app_with(
        idempotency.clone(),
        &long_handler,
        Endpoint::new("pay").lease(Duration::from_secs(60)),
    );
    let (short_handler, short_gate) = Handler::gated();
    let short_app = app_with(
        idempotency,
        &short_handler,
        Endpoint::new("pay").lease(Duration::from_secs(3)),
    );
    let body = json!({"amount": 10});

    let long = spawn_send(&long_app, "long", &body);
    long_handler.started.notified().await;
    // The watcher has looked once and waits as long as the 60 s lease allows.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let short = spawn_send(&short_app, "short", &body);
    short_handler.started.notified().await;
    tokio::time::sleep(Duration::from_secs(4)).await;

    assert_still_held(
        &short_app,
        "short",
        &body,
        "the 3 s lease lapsed and the duplicate ran the handler",
    )
    .await;
    short_gate.add_permits(2);
    long_gate.add_permits(1);
    assert_eq!(short.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(long.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(short_handler.runs(), 1);
}

/// What watches a runtime's claims ends with the service even while it
/// waits to look at a claim again (a claim that was still running when it
/// last looked).
#[tokio::test]
async fn nothing_keeps_running_once_the_service_is_dropped_after_a_long_request() {
    let before = alive_tasks();
    let (handler, gate) = Handler::gated();
    let app = app(MemoryStore::new(), &handler);
    let first = spawn_send(&app, "k", &json!({}));
    handler.started.notified().await;
    // The watcher looks, finds the claim not yet due, and waits a sixth of
    // the 60 s lease before looking again.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    gate.add_permits(1);
    let (status, _, _) = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("the request finishes")
        .unwrap();
    assert_eq!(status, StatusCode::CREATED);
    drop(app);
    assert_eq!(
        tasks_after_yielding(before).await,
        before,
        "a task outlived the service"
    );
}

/// A handler that holds its worker thread for five seconds from its first
/// poll, as a synchronous SDK called without `block_in_place` does, on an
/// endpoint with the given lease.
async fn thread_holding_handler(
    State((started, lease)): State<(Arc<Notify>, Duration)>,
    idem: IdempotentRequest,
    Json(input): Json<Value>,
) -> Response {
    let endpoint = Endpoint::new("hold").lease(lease);
    let fingerprint = endpoint.fingerprint(&input);
    let handler = async move {
        started.notify_one();
        std::thread::sleep(Duration::from_secs(5));
        StatusCode::CREATED
    };
    idem.run(&endpoint, fingerprint, handler).await
}

/// The first claim on a runtime keeps its lease while its handler holds
/// the thread: the watcher it starts runs before the handler takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_claim_on_a_runtime_keeps_its_lease_while_its_handler_holds_the_thread() {
    let started = Arc::new(Notify::new());
    let holding = Router::new()
        .route("/pay", post(thread_holding_handler))
        .with_state((Arc::clone(&started), Duration::from_secs(3)))
        .layer(Idempotency::new(MemoryStore::new()));
    let body = json!({"amount": 10});
    let held = {
        let (app, request) = (holding.clone(), request(Some("holds"), &body));
        tokio::spawn(async move { send(&app, request).await })
    };
    started.notified().await;
    tokio::time::sleep(Duration::from_millis(4_000)).await;

    assert_still_held(
        &holding,
        "holds",
        &body,
        "the 3 s lease lapsed under the handler holding its thread",
    )
    .await;
    assert_eq!(held.await.unwrap().0, StatusCode::CREATED);
}

/// One handler that holds its thread does not hold back the renewals of
/// the other requests running on the runtime's other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_holding_its_thread_does_not_let_other_claims_lapse() {
    let idempotency = Idempotency::new(MemoryStore::new());
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(3));
    let (handler, gate) = Handler::gated();
    let app = app_with(idempotency.clone(), &handler, endpoint);
    let started = Arc::new(Notify::new());
    let holding = Router::new()
        .route("/pay", post(thread_holding_handler))
        .with_state((Arc::clone(&started), Duration::from_secs(60)))
        .layer(idempotency.clone());
    let body = json!({"amount": 10});

    // A first request starts the runtime's watcher, which then finds
    // nothing left to watch.
    let ungated = app_with(idempotency, &Handler::default(), endpoint);
    let (status, _, _) = send(&ungated, request(Some("first"), &body)).await;
    assert_eq!(status, StatusCode::CREATED);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let held = {
        let request = request(Some("holds"), &body);
        tokio::spawn(async move { send(&holding, request).await })
    };
    started.notified().await;
    let first = spawn_send(&app, "k", &body);
    handler.started.notified().await;
    tokio::time::sleep(Duration::from_millis(4_000)).await;

    assert_still_held(&app, "k", &body, LAPSED).await;
    gate.add_permits(2);
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(held.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(handler.runs(), 1);
}

/// Renewals that had to wait for the connection, and a signal for each.
type WaitedRenewals = Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>;

/// A memory store whose calls take turns on one connection, as a SQL
/// store's calls do when its pool has one free: the call that finishes
/// hands it to the next one waiting, waking that one's task from its own.
/// A claim of the key `gated` keeps the connection until `gate` opens.
#[derive(Clone)]
struct OneConnection {
    inner: MemoryStore,
    connection: Arc<tokio::sync::Mutex<()>>,
    gate: Arc<Semaphore>,
    gated_claim_holds: Arc<Notify>,
    renewal_waits: Arc<Notify>,
    waited_renewals: WaitedRenewals,
}

impl OneConnection {
    fn new() -> Self {
        Self {
            inner: MemoryStore::new(),
            connection: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            gated_claim_holds: Arc::default(),
            renewal_waits: Arc::default(),
            waited_renewals: Arc::default(),
        }
    }
}

impl Store for OneConnection {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let _connection = self.connection.lock().await;
        if key.key.as_str() == "gated" {
            self.gated_claim_holds.notify_one();
            let _opened = self.gate.acquire().await.expect("gate open");
        }
        self.inner.claim(key, fingerprint, lease).await
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let mut lock = std::pin::pin!(self.connection.lock());
        // Told once the renewal is queued for the connection, not before.
        let _connection = match futures_util::poll!(lock.as_mut()) {
            std::task::Poll::Ready(connection) => connection,
            std::task::Poll::Pending => {
                self.renewal_waits.notify_one();
                let connection = lock.await;
                let (waited, signal) = &*self.waited_renewals;
                *waited.lock().unwrap() += 1;
                signal.notify_all();
                connection
            }
        };
        self.inner.renew(key, token, lease).await
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let _connection = self.connection.lock().await;
        self.inner.complete(key, token, response, ttl).await
    }
    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        let _connection = self.connection.lock().await;
        self.inner.release(key, token).await
    }
    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let _connection = self.connection.lock().await;
        self.inner.get(key).await
    }
}

/// Holds its worker thread, as a synchronous SDK called without
/// `block_in_place` does, until a renewal that waited for the connection
/// got it, or five seconds passed; answers whether one did.
async fn holds_until_a_waiting_renewal_runs(
    State(waited_renewals): State<WaitedRenewals>,
    idem: IdempotentRequest,
    Json(input): Json<Value>,
) -> Response {
    let endpoint = Endpoint::new("hold").lease(Duration::from_secs(60));
    let fingerprint = endpoint.fingerprint(&input);
    let handler = async move {
        let (waited, signal) = &*waited_renewals;
        let waited = waited.lock().unwrap();
        let five_seconds = Duration::from_secs(5);
        let (waited, _) = signal
            .wait_timeout_while(waited, five_seconds, |waited| *waited == 0)
            .unwrap();
        Json(json!({ "renewed": *waited > 0 }))
    };
    idem.run(&endpoint, fingerprint, handler).await
}

/// Returns once every worker of the runtime is parked, every task having
/// finished its poll. Blocks the test's own thread, which is none of them.
fn until_every_worker_parks() {
    let metrics = tokio::runtime::Handle::current().metrics();
    // Odd while the worker is parked.
    let parked = |worker| metrics.worker_park_unpark_count(worker) % 2 == 1;
    while !(0..metrics.num_workers()).all(parked) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A claim that frees the connection another claim's renewal waits for,
/// and whose handler then holds its thread, does not hold that renewal
/// back. Woken from the claim's task, the renewal waits in its worker's
/// slot that no other worker takes from; if the handler took the thread
/// first, the renewal would wait for it to let go, and the other request's
/// lease would lapse under it, though that request never blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_woken_by_a_claim_runs_before_that_claims_handler_holds_the_thread() {
    let store = OneConnection::new();
    let idempotency = Idempotency::new(store.clone());
    let (handler, gate) = Handler::gated();
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(1));
    let app = app_with(idempotency.clone(), &handler, endpoint);
    let holding = Router::new()
        .route("/pay", post(holds_until_a_waiting_renewal_runs))
        .with_state(Arc::clone(&store.waited_renewals))
        .layer(idempotency);
    let body = json!({"amount": 10});
    let running = spawn_send(&app, "k", &body);
    handler.started.notified().await;

    let held = {
        let request = request(Some("gated"), &body);
        tokio::spawn(async move { send(&holding, request).await })
    };
    store.gated_claim_holds.notified().await;
    // The running request's first renewal, a third into its lease, waits
    // for the connection the gated claim holds.
    store.renewal_waits.notified().await;
    // Its task done polling, the renewal is woken by the claim's alone.
    until_every_worker_parks();
    store.gate.add_permits(1);
    let (status, _, answer) = held.await.unwrap();
    gate.add_permits(1);
    assert_eq!(running.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        answer["renewed"],
        json!(true),
        "the renewal woken by the claim waited for the claim's handler to let go of its thread"
    );
}

/// A store whose every call fails, or hangs.
struct BrokenStore {
    hang: bool,
}

impl BrokenStore {
    async fn fail<T>(&self) -> Result<T, StoreError> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        Err(StoreError::backend("connection refused"))
    }
}

impl Store for BrokenStore {
    async fn claim(&self, _: &RecordKey, _: Fingerprint, _: Duration) -> Result<Claim, StoreError> {
        self.fail().await
    }
    async fn renew(
        &self,
        _: &RecordKey,
        _: idempotent_core::record::LeaseToken,
        _: Duration,
    ) -> Result<(), StoreError> {
        self.fail().await
    }
    async fn complete(
        &self,
        _: &RecordKey,
        _: idempotent_core::record::LeaseToken,
        _: StoredResponse,
        _: Duration,
    ) -> Result<(), StoreError> {
        self.fail().await
    }
    async fn release(
        &self,
        _: &RecordKey,
        _: idempotent_core::record::LeaseToken,
    ) -> Result<(), StoreError> {
        self.fail().await
    }
    async fn get(&self, _: &RecordKey) -> Result<Option<Record>, StoreError> {
        self.fail().await
    }
}

#[tokio::test]
async fn a_failing_store_gives_503_and_runs_nothing() {
    let handler = Handler::default();
    let app = app(BrokenStore { hang: false }, &handler);
    let (status, headers, problem) = send(&app, request(Some("k"), &json!({}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(problem["type"], "urn:idempotent:store-unavailable");
    assert_eq!(handler.runs(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_store_times_out_into_503() {
    let handler = Handler::default();
    let idempotency = Idempotency::builder(BrokenStore { hang: true })
        .store_timeout(Duration::from_millis(200))
        .build();
    let app = app_with(idempotency, &handler, Endpoint::new("pay"));
    let (status, _, problem) = send(&app, request(Some("k"), &json!({}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(problem["type"], "urn:idempotent:store-unavailable");
    assert_eq!(handler.runs(), 0);
}

#[tokio::test]
async fn fail_open_runs_the_handler_when_the_store_fails() {
    let handler = Handler::default();
    let idempotency = Idempotency::builder(BrokenStore { hang: false })
        .fail_open(true)
        .build();
    let app = app_with(idempotency, &handler, Endpoint::new("pay"));
    let (status, _, _) = send(&app, request(Some("k"), &json!({}))).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(handler.runs(), 1);
}

fn record_key(key: &str) -> RecordKey {
    let key = idempotent_core::IdempotencyKey::parse(key.as_bytes()).unwrap();
    RecordKey::new(idempotent_core::scope::ScopeDigest::global(), key)
}

fn stored(status: StatusCode) -> StoredResponse {
    StoredResponse::new(status, Vec::new(), Some("ok".into()))
}

/// Answers 201 with a streamed body whose first chunk comes and whose
/// second fails, as a database cursor that dies midway would.
fn failing_body() -> Response {
    let failure = std::io::Error::other("the cursor died");
    let chunks = [
        Ok(bytes::Bytes::from_static(b"{\"rows\":[1,")),
        Err(failure),
    ];
    let body = Body::from_stream(futures_util::stream::iter(chunks));
    (StatusCode::CREATED, body).into_response()
}

async fn failing_body_handler(
    State(endpoint): State<Endpoint>,
    idem: IdempotentRequest,
    Json(input): Json<Value>,
) -> Response {
    let fingerprint = endpoint.fingerprint(&input);
    idem.run(&endpoint, fingerprint, async { failing_body() })
        .await
}

/// Answers 201 with a streamed body that fails before its first byte.
async fn failing_at_once_handler(
    State(endpoint): State<Endpoint>,
    idem: IdempotentRequest,
    Json(input): Json<Value>,
) -> Response {
    let fingerprint = endpoint.fingerprint(&input);
    idem.run(&endpoint, fingerprint, async {
        let failure = std::io::Error::other("the cursor died");
        let chunks = [Err::<bytes::Bytes, _>(failure)];
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        (StatusCode::CREATED, body).into_response()
    })
    .await
}

fn failing_body_app() -> Router {
    Router::new()
        .route("/pay", post(failing_body_handler))
        .route("/at-once", post(failing_at_once_handler))
        .route("/plain", post(|| async { failing_body() }))
        .with_state(Endpoint::new("pay"))
        .layer(Idempotency::new(MemoryStore::new()))
}

#[tokio::test]
async fn a_body_that_fails_midway_does_not_announce_the_length_of_what_came_before() {
    let response = failing_body_app()
        .oneshot(request(Some("k"), &json!({"amount": 1})))
        .await
        .unwrap();
    let hint = http_body::Body::size_hint(response.body());
    assert_eq!(
        hint.exact(),
        None,
        "a server frames the response with this length and ends it cleanly before the error"
    );
}

/// Sends one raw HTTP/1.1 request to `path` and reads until the server
/// closes the connection or goes quiet for a second: the bytes received,
/// and whether the connection was closed.
async fn raw_exchange(addr: std::net::SocketAddr, path: &str) -> (String, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = r#"{"amount":1}"#;
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\nx-api-key: caller-1\r\nidempotency-key: key-{path}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = [0; 4096];
    let closed = loop {
        let read = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buffer)).await;
        match read {
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Err(_quiet) => break false,
        }
    };
    (
        String::from_utf8_lossy(&received).to_ascii_lowercase(),
        closed,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_a_body_that_fails_midway_is_cut_off_as_without_the_library() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, failing_body_app()).await });

    // Without idempotency: no length is announced and the connection is
    // cut at the error, so the client knows the response is incomplete.
    let (plain, closed) = raw_exchange(addr, "/plain").await;
    assert!(!plain.contains("content-length") && closed, "{plain}");

    // With it: a body failing after its first chunk, and one failing
    // before any byte.
    let (midway, midway_closed) = raw_exchange(addr, "/pay").await;
    let (at_once, at_once_closed) = raw_exchange(addr, "/at-once").await;
    let cut_off = |response: &str, closed| !response.contains("content-length") && closed;
    assert!(
        cut_off(&midway, midway_closed) && cut_off(&at_once, at_once_closed),
        "the first callers got complete-looking responses (connections kept open: {}, {}):\n{midway}\n---\n{at_once}",
        !midway_closed,
        !at_once_closed
    );
}

/// A record that holds a header never stored (written before the name
/// joined that list, or by something else): a `Content-Length` that is not
/// its body's. Replayed with it, hyper frames the response by the header
/// (a debug build panics on the mismatch and drops the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_a_stored_content_length_does_not_frame_the_replay() {
    let store = MemoryStore::new();
    let key = idempotent_core::IdempotencyKey::parse(b"key-/pay").unwrap();
    let key = RecordKey::new(
        idempotent_core::scope::ScopeDigest::api_key(b"caller-1"),
        key,
    );
    let fingerprint = Endpoint::new("pay")
        .fingerprint(&json!({"amount": 1}))
        .unwrap();
    let lease = Duration::from_secs(60);
    let Claim::Acquired(token) = store.claim(&key, fingerprint, lease).await.unwrap() else {
        panic!("a new key is acquired");
    };
    let mut response = stored(StatusCode::CREATED);
    response.headers = vec![(
        http::HeaderName::from_static("content-length"),
        http::HeaderValue::from_static("99"),
    )];
    let ttl = Duration::from_secs(60);
    store.complete(&key, token, response, ttl).await.unwrap();
    let handler = Handler::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = app(store, &handler);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (replay, _) = raw_exchange(addr, "/pay").await;
    assert!(
        replay.starts_with("http/1.1 201 created\r\n")
            && replay.contains("content-length: 2\r\n")
            && replay.ends_with("\r\n\r\nok"),
        "{replay}"
    );
    assert_eq!(handler.runs(), 0);
}

/// The first run blocks its worker thread (`block_in_place`, as around a
/// synchronous payment SDK) for 3.5 s; later runs answer at once.
async fn blocking_handler(
    State((runs, endpoint)): State<(Arc<AtomicUsize>, Endpoint)>,
    idem: IdempotentRequest,
    Json(input): Json<Value>,
) -> Response {
    let fingerprint = endpoint.fingerprint(&input);
    idem.run(&endpoint, fingerprint, async move {
        let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
        if run == 1 {
            tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(3_500)));
        }
        (StatusCode::CREATED, Json(json!({ "run": run })))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_that_blocks_its_thread_past_the_lease_still_holds_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(2));
    let app = Router::new()
        .route("/pay", post(blocking_handler))
        .with_state((runs.clone(), endpoint))
        .layer(Idempotency::new(MemoryStore::new()));
    let body = json!({"amount": 1});
    let first = spawn_send(&app, "k", &body);

    // The first run is still charging, 2.6 s into a 2 s lease.
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let (status, _, duplicate) = send(&app, request(Some("k"), &body)).await;
    assert_eq!(
        (status, runs.load(Ordering::SeqCst)),
        (StatusCode::CONFLICT, 1),
        "the duplicate took the key over and ran the handler again: {duplicate}"
    );
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
}

#[cfg(feature = "test-util")]
#[tokio::test]
async fn with_fail_open_a_waiting_duplicate_does_not_run_the_handler_beside_the_first() {
    use idempotent_core::testing::{ClaimOutcome, MockStore, OpKind};
    let store = MockStore::new();
    let (handler, gate) = Handler::gated();
    let idempotency = Idempotency::builder(store.clone()).fail_open(true).build();
    let endpoint = Endpoint::new("pay").wait(Duration::from_secs(5));
    let app = app_with(idempotency, &handler, endpoint);
    let body = json!({"amount": 1});
    let first = spawn_send(&app, "k", &body);
    handler.started.notified().await;
    let duplicate = spawn_send(&app, "k", &body);
    // Once the duplicate has seen the key in flight and waits, one of its
    // claims fails (a blip).
    while store.claims(ClaimOutcome::InFlight) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    store.fail_next(OpKind::Claim);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let concurrent_runs = handler.runs();
    gate.add_permits(2);
    let (first, duplicate) = (first.await.unwrap(), duplicate.await.unwrap());
    assert_eq!(
        concurrent_runs, 1,
        "the duplicate, known to be in flight, ran beside the first (answers {} and {})",
        first.0, duplicate.0
    );
}
