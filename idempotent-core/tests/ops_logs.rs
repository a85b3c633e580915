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
use idempotent_core::record::{Claim, Completed, LeaseToken, Record, RecordKey, StoredResponse};
use idempotent_core::store::{MemoryStore, StoreError};
use idempotent_core::testing::{Fault, MockStore, OpKind};
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

/// `body` sent to `/pay` under `key` on a task of its own, given a tenth
/// of a second to get its handler running.
async fn running(
    app: &Router,
    key: &str,
    body: &Value,
) -> tokio::task::JoinHandle<Result<Response, std::convert::Infallible>> {
    let sent = tokio::spawn(app.clone().oneshot(request("/pay", Some(key), body)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    sent
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
    let first = running(&lapsing_service, "k-lapse", &slow_body).await;
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
    let held = running(&down_service, "k-down", &slow_body).await;
    down.fail_all(true);
    tokio::time::sleep(Duration::from_millis(1_400)).await;
    down.fail_all(false);
    assert_eq!(held.await.unwrap().unwrap().status(), StatusCode::CREATED);
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

/// The events at `INFO` or above that `recorder` holds, each with its
/// outcome (`-` for none), as `level outcome` lines: what an operator's
/// log shows, and what a counter of outcomes counts.
fn outcomes_at_info(recorder: &Events) -> Vec<String> {
    let events = recorder.take_at_least(tracing::Level::INFO);
    let outcome = |event: &Logged| event.field("outcome").unwrap_or("-").to_owned();
    events
        .iter()
        .map(|event| format!("{} {}", event.level, outcome(event)))
        .collect()
}

/// A renewal given up because the store is set up wrongly is the
/// `store_error` the README's table lists ("a lease no longer renewed
/// because the store is set up wrongly"), so that a count of outcomes
/// sees it.
#[tokio::test(start_paused = true)]
async fn a_renewal_given_up_on_a_store_set_up_wrongly_is_a_store_error() {
    let (recorder, _guard) = Events::on_this_thread();
    let store = MockStore::new();
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(3));
    let service = app(store.layer(), endpoint);
    store.fail_next_with(OpKind::Renew, Fault::Misconfigured);
    let slow_body = json!({"amount": 8, "sleep_ms": 2_000});
    let status = send(&service, request("/pay", Some("k-renew"), &slow_body)).await;
    assert_eq!(status, StatusCode::CREATED);

    let events = recorder.take_at_least(tracing::Level::INFO);
    assert_eq!(events.len(), 1, "{events:#?}");
    let given_up = &events[0];
    assert_eq!(given_up.level, tracing::Level::ERROR, "{given_up:#?}");
    assert_eq!(
        given_up.field("outcome"),
        Some("store_error"),
        "{given_up:#?}"
    );
    assert_eq!(given_up.field("endpoint"), Some("pay"), "{given_up:#?}");
    assert!(given_up.field("key").is_some(), "{given_up:#?}");
}

/// The README's table of outcomes, as `(outcome, level)` pairs: the level
/// column, and any other level its row names for a case of its own ("info
/// when it was stored only after...", "warn with `fail_open(true)`").
fn documented_outcomes() -> std::collections::BTreeSet<(String, String)> {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("### Observability")
        .nth(1)
        .expect("the README has an Observability section");
    let section = section.split("\n## ").next().unwrap();
    let mut documented = std::collections::BTreeSet::new();
    for row in section.lines().filter(|line| line.starts_with("| `")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let outcome = cells[0].trim_start_matches("| ").trim_matches('`');
        if outcome == "outcome" {
            continue; // the header
        }
        documented.insert((outcome.to_owned(), cells[1].to_owned()));
        for level in ["debug", "info", "warn", "error"] {
            for case in [" when ", " with "] {
                if cells[2].contains(&format!(" {level}{case}")) {
                    documented.insert((outcome.to_owned(), level.to_owned()));
                }
            }
        }
    }
    documented
}

/// Every `tracing` event in the library's source, as its level and the
/// text between its parentheses.
fn logged_in_source() -> Vec<(String, String)> {
    let mut files = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src"
    ))];
    let mut events = Vec::new();
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if path.extension().is_some_and(|ext| ext == "rs") {
            events.extend(events_in(&std::fs::read_to_string(&path).unwrap()));
        }
    }
    events
}

/// The events of one source file (see [`logged_in_source`]).
fn events_in(source: &str) -> Vec<(String, String)> {
    let mut events = Vec::new();
    for level in ["debug", "info", "warn", "error"] {
        let call = format!("tracing::{level}!(");
        for (at, _) in source.match_indices(&call) {
            let arguments = &source[at + call.len()..];
            events.push((level.to_owned(), up_to_closing_parenthesis(arguments)));
        }
    }
    events
}

/// `text` up to the parenthesis that closes the one before it, string
/// literals (which may hold parentheses) skipped.
fn up_to_closing_parenthesis(text: &str) -> String {
    let (mut depth, mut in_string, mut escaped) = (1, false, false);
    for (at, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            '(' if !in_string => depth += 1,
            ')' if !in_string => {
                depth -= 1;
                if depth == 0 {
                    return text[..at].to_owned();
                }
            }
            _ => {}
        }
    }
    panic!("an unclosed event: {text}");
}

/// Whether an event's `arguments` (see [`logged_in_source`]) set the
/// field `field` (`key = %id`, `%key`, `endpoint`), not merely name it
/// in the message.
fn names_field(arguments: &str, field: &str) -> bool {
    arguments.split(',').map(str::trim).any(|argument| {
        let name = argument.trim_start_matches(['%', '?']);
        name == field || name.starts_with(&format!("{field} ="))
    })
}

/// An event that says "endpoint" and "key" in its message alone carries
/// neither field.
#[test]
fn a_field_named_in_the_message_alone_is_not_set() {
    let arguments = r#"outcome = "conflict", "the endpoint's key is in flight""#;
    assert!(!names_field(arguments, "endpoint"));
    assert!(!names_field(arguments, "key"));
    let arguments = r#"%error, outcome = "store_error", endpoint, key = %key.log_id(), "failed""#;
    assert!(names_field(arguments, "endpoint"));
    assert!(names_field(arguments, "key"));
    assert!(names_field("outcome = \"x\", endpoint = name, %key", "key"));
}

/// The README's table lists exactly the outcomes, and the levels of each,
/// that the library logs; and every event with an outcome at `INFO` or
/// above names its endpoint and key itself, as the README says.
#[test]
fn the_readmes_table_of_outcomes_is_what_the_library_logs() {
    let mut logged = std::collections::BTreeSet::new();
    for (level, arguments) in logged_in_source() {
        let Some((_, rest)) = arguments.split_once("outcome = \"") else {
            continue;
        };
        let outcome = rest.split('"').next().unwrap().to_owned();
        if level != "debug" {
            for field in ["endpoint", "key"] {
                assert!(
                    names_field(&arguments, field),
                    "a `{outcome}` event at {level} without `{field}`: {arguments}"
                );
            }
        }
        logged.insert((outcome, level));
    }
    let documented = documented_outcomes();
    assert!(
        documented.len() >= 9,
        "the table was not read: {documented:?}"
    );
    assert_eq!(logged, documented, "logged (left) and documented (right)");
}

/// A store that lost the claim's record while its handler runs (a Redis
/// restarted without persistence, an eviction, a record deleted by hand):
/// its renewals and completion find no lease, and no record.
#[derive(Clone, Default)]
struct Forgetful(MemoryStore);

impl Hooks for Forgetful {
    type Inner = MemoryStore;

    fn inner(&self) -> &MemoryStore {
        &self.0
    }

    async fn renew(&self, _: &RecordKey, _: LeaseToken, _: Duration) -> Result<(), StoreError> {
        Err(StoreError::LeaseLost)
    }

    async fn complete(
        &self,
        _: &RecordKey,
        _: LeaseToken,
        _: StoredResponse,
        _: Duration,
    ) -> Result<(), StoreError> {
        Err(StoreError::LeaseLost)
    }

    async fn get(&self, _: &RecordKey) -> Result<Option<Record>, StoreError> {
        Ok(None)
    }
}

/// A renewal that finds the claim's record gone says so at once, rather
/// than that another request took the lease over, and so does the run's
/// one `lease_lost` when the handler ends: the operator then looks at the
/// store (its persistence, its evictions), not for a second run that may
/// never have happened.
#[tokio::test(start_paused = true)]
async fn a_renewal_that_finds_the_record_gone_says_it_is_gone() {
    let (recorder, _guard) = Events::on_this_thread();
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(3));
    let service = app(Idempotency::new(Forwarding(Forgetful::default())), endpoint);
    let slow_body = json!({"amount": 9, "sleep_ms": 2_000});
    let status = send(&service, request("/pay", Some("k-gone"), &slow_body)).await;
    assert_eq!(status, StatusCode::CREATED);

    let events = recorder.take_at_least(tracing::Level::WARN);
    let renewal = events
        .iter()
        .find(|event| event.target == "idempotent_core::renewal")
        .unwrap_or_else(|| panic!("the renewal told nothing: {events:#?}"));
    assert_eq!(renewal.level, tracing::Level::WARN, "{renewal:#?}");
    assert_eq!(renewal.field("outcome"), None, "{renewal:#?}");
    let lost: Vec<_> = events
        .iter()
        .filter(|event| event.field("outcome") == Some("lease_lost"))
        .collect();
    assert_eq!(lost.len(), 1, "one lost lease, one lease_lost: {events:#?}");
    assert_eq!(lost[0].field("record"), Some("gone"), "{lost:#?}");
    for told in [renewal, lost[0]] {
        assert!(told.message().contains("gone from the store"), "{told:#?}");
        assert!(!told.message().contains("taken over"), "{told:#?}");
    }
}

/// A response stored on a later attempt, after a warning that storing
/// it failed, says so at `INFO`, as a renewal that succeeds again and a
/// response stored once the caller got it do: otherwise a log at `INFO`
/// shows the warning and nothing after it, and the operator cannot tell a
/// stored response from one still at risk of a second run.
#[tokio::test(start_paused = true)]
async fn a_response_stored_after_a_failed_attempt_says_so_at_info() {
    let (recorder, _guard) = Events::on_this_thread();
    let store = MockStore::new();
    let service = app(store.layer(), Endpoint::new("pay"));
    store.fail_next(OpKind::Complete);
    let status = send(&service, request("/pay", Some("k-again"), &body())).await;
    assert_eq!(status, StatusCode::CREATED);

    let logged = outcomes_at_info(&recorder);
    assert_eq!(logged, ["WARN -", "INFO executed"], "{logged:#?}");
}

/// Failing open on a store set up wrongly is an error, not the warning of
/// an outage: the store does not come back by itself, so every request
/// runs without idempotency until someone changes its setup, and an alert
/// that fires on errors must fire.
#[tokio::test(start_paused = true)]
async fn failing_open_on_a_store_set_up_wrongly_is_an_error() {
    let (recorder, _guard) = Events::on_this_thread();
    let store = MockStore::new();
    let idempotency = Idempotency::builder(store.clone()).fail_open(true).build();
    let service = app(idempotency, Endpoint::new("pay"));
    store.fail_next_with(OpKind::Claim, Fault::Misconfigured);
    let status = send(&service, request("/pay", Some("k-open-wrong"), &body())).await;
    assert_eq!(status, StatusCode::CREATED, "failed open: the handler ran");

    let logged = outcomes_at_info(&recorder);
    assert_eq!(logged, ["ERROR store_error"], "{logged:#?}");
}

/// A request body cut short before its end (the client or a proxy dropped
/// the connection) is told at info by `IdempotentLayer` as by the
/// attribute, with the endpoint and the key: a run of them is the trace of
/// a network or proxy problem in front of the service.
#[tokio::test(start_paused = true)]
async fn a_body_cut_short_under_the_layer_is_told_at_info() {
    let (recorder, _guard) = Events::on_this_thread();
    let layered = Router::new()
        .route(
            "/pay",
            post(|| async { StatusCode::CREATED })
                .route_layer(IdempotentLayer::new(Endpoint::new("pay"))),
        )
        .layer(Idempotency::new(MemoryStore::new()));
    let frames: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"{\"amount\":")),
        Err(std::io::Error::other("connection reset")),
    ];
    let mut cut_short = request("/pay", Some("k-cut"), &body());
    *cut_short.body_mut() = Body::from_stream(futures_util::stream::iter(frames));
    let status = send(&layered, cut_short).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let events = recorder.take_at_least(tracing::Level::INFO);
    assert_eq!(events.len(), 1, "{events:#?}");
    let unread = &events[0];
    assert_eq!(unread.level, tracing::Level::INFO, "{unread:#?}");
    assert_eq!(unread.field("endpoint"), Some("pay"), "{unread:#?}");
    assert!(
        unread.field("key").is_some_and(|key| key.len() == 16),
        "{unread:#?}"
    );
    assert!(unread.message().contains("nothing executed"), "{unread:#?}");
}
