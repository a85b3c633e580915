//! Each `#[idempotent]` option, observed through a `Router`.

// A crate may depend on idempotent-core under another name; `crate = "..."`
// points the expansion at it.
extern crate idempotent_core as idem;

use crate::macro_support;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{Request, StatusCode};
use axum::middleware::Next;
use axum::routing::post;
use axum::{Extension, Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::testing::{MockStore, OpKind};
use idempotent_core::{Idempotency, IdempotencyScope, idempotent};
use macro_support::{Runs, send};
use serde::Deserialize;
use tokio::sync::Notify;

fn request(uri: &str, key: Option<&str>, headers: &[(&str, &str)], body: &str) -> Request<Body> {
    let mut builder = Request::post(uri).header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::from(body.to_owned())).unwrap()
}

fn router(routes: Router<Runs>, runs: &Runs) -> Router {
    routes
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()))
}

// ===== in flight: 409, or `wait` =====

#[derive(Clone)]
struct Gate {
    runs: Runs,
    entered: Arc<Notify>,
    release: Arc<Notify>,
}

impl Gate {
    fn new() -> Self {
        Self {
            runs: Runs::default(),
            entered: Arc::new(Notify::new()),
            release: Arc::new(Notify::new()),
        }
    }
}

#[idempotent(scope = "global")]
async fn slow(State(gate): State<Gate>, Json(n): Json<u32>) -> (StatusCode, Json<u32>) {
    slow_body(&gate, n).await
}

#[idempotent(scope = "global", wait = "10s")]
async fn slow_waited(State(gate): State<Gate>, Json(n): Json<u32>) -> (StatusCode, Json<u32>) {
    slow_body(&gate, n).await
}

/// Counts the run, says it started, then waits to be let go.
async fn slow_body(gate: &Gate, n: u32) -> (StatusCode, Json<u32>) {
    gate.runs.bump();
    gate.entered.notify_one();
    gate.release.notified().await;
    (StatusCode::CREATED, Json(n))
}

fn gated_app(gate: &Gate) -> Router {
    Router::new()
        .route("/slow", post(slow))
        .route("/waited", post(slow_waited))
        .with_state(gate.clone())
        .layer(Idempotency::new(MemoryStore::new()))
}

#[tokio::test]
async fn a_duplicate_while_the_first_runs_gets_409_with_retry_after() {
    let gate = Gate::new();
    let app = gated_app(&gate);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/slow", Some("k"), &[], "1")).await }
    });
    gate.entered.notified().await;
    let duplicate = send(&app, request("/slow", Some("k"), &[], "1")).await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    assert_eq!(duplicate.header("retry-after"), Some("1"));
    gate.release.notify_one();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(gate.runs.get(), 1);
}

#[tokio::test]
async fn with_wait_a_duplicate_waits_for_the_first_and_replays_it() {
    let gate = Gate::new();
    let app = gated_app(&gate);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/waited", Some("k"), &[], "7")).await }
    });
    gate.entered.notified().await;
    let duplicate = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request("/waited", Some("k"), &[], "7")).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !duplicate.is_finished(),
        "the duplicate waits instead of getting 409"
    );
    gate.release.notify_one();
    let (first, duplicate) = (first.await.unwrap(), duplicate.await.unwrap());
    assert_eq!((first.status, first.replayed), (StatusCode::CREATED, false));
    assert_eq!(
        (duplicate.status, duplicate.replayed),
        (StatusCode::CREATED, true)
    );
    assert_eq!(duplicate.body, "7");
    assert_eq!(gate.runs.get(), 1);
}

// ===== optional =====

#[idempotent(scope = "global", optional)]
async fn optional_key(State(runs): State<Runs>) -> String {
    runs.bump().to_string()
}

#[tokio::test]
async fn optional_runs_keyless_requests_every_time_and_keyed_ones_once() {
    let runs = Runs::default();
    let app = router(Router::new().route("/o", post(optional_key)), &runs);
    assert_eq!(send(&app, request("/o", None, &[], "")).await.body, "1");
    assert_eq!(send(&app, request("/o", None, &[], "")).await.body, "2");
    assert_eq!(
        send(&app, request("/o", Some("k"), &[], "")).await.body,
        "3"
    );
    let retry = send(&app, request("/o", Some("k"), &[], "")).await;
    assert_eq!((retry.body.as_str(), retry.replayed), ("3", true));
}

#[idempotent(optional)]
async fn optional_key_by_api_key(State(runs): State<Runs>) -> String {
    runs.bump().to_string()
}

#[tokio::test]
async fn an_optional_keyless_request_needs_no_credential_but_a_keyed_one_does() {
    let runs = Runs::default();
    let app = router(
        Router::new().route("/oa", post(optional_key_by_api_key)),
        &runs,
    );
    let keyless = send(&app, request("/oa", None, &[], "")).await;
    assert_eq!(
        (keyless.status, keyless.body.as_str()),
        (StatusCode::OK, "1")
    );
    let keyed = send(&app, request("/oa", Some("k"), &[], "")).await;
    assert_eq!(keyed.status, StatusCode::UNAUTHORIZED);
    assert!(keyed.body.contains("x-api-key"), "{}", keyed.body);
    assert_eq!(runs.get(), 1);
}

#[idempotent(scope = "global")]
async fn required_key(State(runs): State<Runs>) -> String {
    runs.bump().to_string()
}

#[tokio::test]
async fn without_optional_a_keyless_request_gets_400_and_runs_nothing() {
    let runs = Runs::default();
    let app = router(Router::new().route("/r", post(required_key)), &runs);
    let reply = send(&app, request("/r", None, &[], "")).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(runs.get(), 0);
}

// ===== scopes =====

#[idempotent(scope = "api_key")]
async fn by_api_key(State(runs): State<Runs>) -> String {
    runs.bump().to_string()
}

#[idempotent(scope = "header:X-Tenant")]
async fn by_header(State(runs): State<Runs>) -> String {
    runs.bump().to_string()
}

#[tokio::test]
async fn api_key_scope_keeps_callers_apart_and_needs_a_credential() {
    let runs = Runs::default();
    let app = router(Router::new().route("/a", post(by_api_key)), &runs);
    let alice = [("x-api-key", "alice")];
    let bob = [("authorization", "Bearer bob")];
    assert_eq!(
        send(&app, request("/a", Some("k"), &alice, "")).await.body,
        "1"
    );
    assert_eq!(
        send(&app, request("/a", Some("k"), &bob, "")).await.body,
        "2"
    );
    assert_eq!(
        send(&app, request("/a", Some("k"), &alice, "")).await.body,
        "1"
    );
    let anonymous = send(&app, request("/a", Some("k"), &[], "")).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn header_scope_keeps_tenants_apart_and_needs_the_header() {
    let runs = Runs::default();
    let app = router(Router::new().route("/h", post(by_header)), &runs);
    let one = [("x-tenant", "one")];
    let two = [("X-Tenant", "two")];
    assert_eq!(
        send(&app, request("/h", Some("k"), &one, "")).await.body,
        "1"
    );
    assert_eq!(
        send(&app, request("/h", Some("k"), &two, "")).await.body,
        "2"
    );
    assert!(
        send(&app, request("/h", Some("k"), &two, ""))
            .await
            .replayed
    );
    // No scheme to challenge for, so not a 401: the request's own error.
    let missing = send(&app, request("/h", Some("k"), &[], "")).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert!(missing.body.contains("x-tenant"), "{}", missing.body);
    assert!(missing.body.contains("invalid-scope"), "{}", missing.body);
    // A client's value beside the gateway's cannot choose the scope.
    let twice = [("x-tenant", "two"), ("x-tenant", "one")];
    let refused = send(&app, request("/h", Some("k"), &twice, "")).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert_eq!(runs.get(), 2);
}

/// The authenticated caller, from `X-User`.
struct User(String);

impl<S: Send + Sync> FromRequestParts<S> for User {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let user = parts.headers.get("x-user").ok_or(StatusCode::FORBIDDEN)?;
        Ok(Self(
            user.to_str().map_err(|_| StatusCode::FORBIDDEN)?.to_owned(),
        ))
    }
}

impl IdempotencyScope for User {
    fn scope_id(&self) -> impl AsRef<[u8]> {
        self.0.clone()
    }
}

#[idempotent(scope = User)]
async fn by_user_argument(user: User, State(runs): State<Runs>, Json(n): Json<u32>) -> String {
    format!("{}:{}:{n}", user.0, runs.bump())
}

#[idempotent(scope = User)]
async fn by_user_extracted(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
    format!("{}:{n}", runs.bump())
}

#[tokio::test]
async fn custom_scope_from_the_handlers_own_argument() {
    let runs = Runs::default();
    let app = router(Router::new().route("/u", post(by_user_argument)), &runs);
    let ann = [("x-user", "ann")];
    let ben = [("x-user", "ben")];
    assert_eq!(
        send(&app, request("/u", Some("k"), &ann, "5")).await.body,
        "ann:1:5"
    );
    assert_eq!(
        send(&app, request("/u", Some("k"), &ben, "5")).await.body,
        "ben:2:5"
    );
    let retry = send(&app, request("/u", Some("k"), &ann, "5")).await;
    assert_eq!((retry.body.as_str(), retry.replayed), ("ann:1:5", true));
    // The principal is the scope, not part of the payload: another payload
    // from the same caller is a conflict.
    let other = send(&app, request("/u", Some("k"), &ann, "6")).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn custom_scope_extracted_by_the_macro() {
    let runs = Runs::default();
    let app = router(Router::new().route("/x", post(by_user_extracted)), &runs);
    let ann = [("x-user", "ann")];
    let ben = [("x-user", "ben")];
    assert_eq!(
        send(&app, request("/x", Some("k"), &ann, "5")).await.body,
        "1:5"
    );
    assert_eq!(
        send(&app, request("/x", Some("k"), &ben, "5")).await.body,
        "2:5"
    );
    assert!(
        send(&app, request("/x", Some("k"), &ben, "5"))
            .await
            .replayed
    );
    // The principal's own rejection answers a request without it.
    let anonymous = send(&app, request("/x", Some("k"), &[], "5")).await;
    assert_eq!(anonymous.status, StatusCode::FORBIDDEN);
    assert_eq!(runs.get(), 2);
}

/// A principal an auth middleware puts in the request's extensions; it is
/// not an extractor of its own.
#[derive(Clone)]
struct Member(String);

impl IdempotencyScope for Member {
    fn scope_id(&self) -> impl AsRef<[u8]> {
        self.0.clone()
    }
}

#[idempotent(scope = Member)]
async fn by_member_extension(
    Extension(member): Extension<Member>,
    State(runs): State<Runs>,
    Json(n): Json<u32>,
) -> String {
    format!("{}:{}:{n}", member.0, runs.bump())
}

#[idempotent(scope = Extension<Member>)]
async fn by_member_extracted(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
    format!("{}:{n}", runs.bump())
}

/// What an auth middleware does: the caller's identity into an extension.
async fn authenticate(mut request: Request<Body>, next: Next) -> axum::response::Response {
    if let Some(member) = request.headers().get("x-user").cloned() {
        let member = Member(member.to_str().unwrap().to_owned());
        request.extensions_mut().insert(member);
    }
    next.run(request).await
}

#[tokio::test]
async fn custom_scope_from_an_extension_the_auth_middleware_left() {
    for (uri, handler) in [
        ("/arg", post(by_member_extension)),
        ("/extracted", post(by_member_extracted)),
    ] {
        let runs = Runs::default();
        let routes = Router::new()
            .route(uri, handler)
            .layer(axum::middleware::from_fn(authenticate));
        let app = router(routes, &runs);
        let ann = [("x-user", "ann")];
        let ben = [("x-user", "ben")];
        let first = send(&app, request(uri, Some("k"), &ann, "5")).await;
        let other_caller = send(&app, request(uri, Some("k"), &ben, "5")).await;
        let retry = send(&app, request(uri, Some("k"), &ann, "5")).await;
        assert_eq!(first.status, StatusCode::OK, "{uri}: {}", first.body);
        assert!(
            !other_caller.replayed,
            "{uri}: another member, another key space"
        );
        assert_eq!((retry.body, retry.replayed), (first.body, true), "{uri}");
        assert_eq!(runs.get(), 2, "{uri}");
    }
}

/// Another type called `User`: an account record a middleware attaches,
/// not the caller.
mod crm {
    #[derive(Clone)]
    pub(super) struct User(pub(super) u64);

    impl idempotent_core::IdempotencyScope for User {
        fn scope_id(&self) -> impl AsRef<[u8]> {
            self.0.to_be_bytes()
        }
    }
}

#[idempotent(scope = User)]
async fn by_user_beside_an_account(
    Extension(account): Extension<crm::User>,
    State(runs): State<Runs>,
    Json(n): Json<u32>,
) -> String {
    format!("{}:{}:{n}", account.0, runs.bump())
}

/// The principal is taken from an argument only when the argument names
/// the scope's type as the scope does: an `Extension` of another type
/// called `User` leaves the caller to be extracted, so two callers never
/// share a key space through it.
#[tokio::test]
async fn an_extension_of_another_type_of_the_same_name_is_not_the_principal() {
    let runs = Runs::default();
    let routes = Router::new()
        .route("/t", post(by_user_beside_an_account))
        .layer(Extension(crm::User(42)));
    let app = router(routes, &runs);
    let ann = send(&app, request("/t", Some("k"), &[("x-user", "ann")], "5")).await;
    let ben = send(&app, request("/t", Some("k"), &[("x-user", "ben")], "5")).await;
    assert_eq!(ann.status, StatusCode::OK, "{}", ann.body);
    assert!(!ben.replayed, "ben got ann's response: {}", ben.body);
    assert_eq!(runs.get(), 2);
}

// ===== generic handlers =====

trait Kind: Send + 'static {
    const NAME: &'static str;
}

struct Widgets;
struct Gadgets;

impl Kind for Widgets {
    const NAME: &'static str = "widget";
}

impl Kind for Gadgets {
    const NAME: &'static str = "gadget";
}

#[idempotent(scope = "global")]
async fn create_kind<K: Kind>(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
    format!("{} {n} run {}", K::NAME, runs.bump())
}

#[idempotent(scope = "global")]
async fn create_sized<const N: usize>(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
    format!("{N} {n} run {}", runs.bump())
}

/// Two instances of one generic handler share its name and its place in
/// the source; the instance is part of the fingerprint, so a key used on
/// one route is refused on the other instead of replaying its response.
#[tokio::test]
async fn instances_of_a_generic_handler_never_replay_each_others_responses() {
    let runs = Runs::default();
    let routes = Router::new()
        .route("/widgets", post(create_kind::<Widgets>))
        .route("/gadgets", post(create_kind::<Gadgets>))
        .route("/one", post(create_sized::<1>))
        .route("/two", post(create_sized::<2>));
    let app = router(routes, &runs);
    for (first, second) in [("/widgets", "/gadgets"), ("/one", "/two")] {
        let key = Some(first);
        let stored = send(&app, request(first, key, &[], "1")).await;
        let other = send(&app, request(second, key, &[], "1")).await;
        let retry = send(&app, request(first, key, &[], "1")).await;
        assert_eq!(stored.status, StatusCode::OK);
        assert_eq!(
            other.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            other.body
        );
        assert_eq!((retry.body, retry.replayed), (stored.body, true));
    }
    assert_eq!(runs.get(), 2);
}

// ===== fallible extractors =====

#[idempotent(scope = "global")]
async fn with_own_rejection(
    State(runs): State<Runs>,
    payload: Result<Json<u32>, JsonRejection>,
) -> (StatusCode, String) {
    match payload {
        Ok(Json(n)) => (StatusCode::CREATED, format!("{n} run {}", runs.bump())),
        Err(rejection) => (StatusCode::BAD_REQUEST, rejection.body_text()),
    }
}

/// axum's way to answer a rejection itself, `Result<Json<T>, _>`, is
/// fingerprinted by the value it extracted.
#[tokio::test]
async fn a_result_extractor_is_fingerprinted_by_its_value() {
    let runs = Runs::default();
    let app = router(Router::new().route("/r", post(with_own_rejection)), &runs);
    let first = send(&app, request("/r", Some("k"), &[], "5")).await;
    let retry = send(&app, request("/r", Some("k"), &[], "5")).await;
    let other = send(&app, request("/r", Some("k"), &[], "6")).await;
    assert_eq!((first.status, retry.replayed), (StatusCode::CREATED, true));
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.get(), 1);
}

/// The handler's own 4xx answer to a rejection is not stored, as axum's
/// rejection of a plain `Json<T>` is not: another malformed body gets its
/// own message, not the first one's, and the retry with the body fixed
/// runs rather than being told the key was used for another request.
#[tokio::test]
async fn a_handlers_own_answer_to_a_rejection_leaves_the_key_to_the_fixed_retry() {
    let runs = Runs::default();
    let app = router(Router::new().route("/r", post(with_own_rejection)), &runs);
    let rejected = send(&app, request("/r", Some("bad"), &[], "not json")).await;
    let other = send(&app, request("/r", Some("bad"), &[], "\"five\"")).await;
    assert_eq!(
        rejected.status,
        StatusCode::BAD_REQUEST,
        "{}",
        rejected.body
    );
    assert_eq!(other.status, StatusCode::BAD_REQUEST, "{}", other.body);
    assert!(
        !other.replayed,
        "another malformed body got the first one's answer"
    );
    assert_ne!(rejected.body, other.body);
    let corrected = send(&app, request("/r", Some("bad"), &[], "5")).await;
    assert_eq!(corrected.status, StatusCode::CREATED, "{}", corrected.body);
    let retry = send(&app, request("/r", Some("bad"), &[], "5")).await;
    assert_eq!((retry.replayed, retry.body), (true, corrected.body));
    assert_eq!(runs.get(), 1);
}

#[idempotent(scope = "global")]
async fn with_default_amount(
    State(runs): State<Runs>,
    payload: Result<Json<u32>, JsonRejection>,
) -> (StatusCode, String) {
    let amount = payload.map_or(0, |Json(n)| n);
    (StatusCode::CREATED, format!("{amount} run {}", runs.bump()))
}

/// A handler that goes on without the rejected input has acted: its 2xx
/// is stored and replayed like any other.
#[tokio::test]
async fn a_success_despite_a_rejected_input_is_stored() {
    let runs = Runs::default();
    let app = router(Router::new().route("/r", post(with_default_amount)), &runs);
    let first = send(&app, request("/r", Some("k"), &[], "not json")).await;
    let retry = send(&app, request("/r", Some("k"), &[], "not json")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert_eq!((retry.replayed, retry.body), (true, first.body));
    assert_eq!(runs.get(), 1);
}

#[derive(Deserialize, serde::Serialize)]
struct Note {
    note: u32,
}

/// Charges whatever the optional `?note=` says (a malformed one is left
/// out, as `Option<Query<T>>` would), and the charge is declined: 402.
#[idempotent(scope = "global")]
async fn charge_declined(
    State(runs): State<Runs>,
    _note: Result<Query<Note>, axum::extract::rejection::QueryRejection>,
) -> (StatusCode, String) {
    (
        StatusCode::PAYMENT_REQUIRED,
        format!("declined, attempt {}", runs.bump()),
    )
}

/// A 4xx other than the 400 and 422 that answer a malformed request (here
/// a 402 after acting), whatever became of an input the handler takes as
/// a `Result`, is its outcome: stored and replayed, never run twice for
/// one key.
#[tokio::test]
async fn a_4xx_after_acting_beside_a_rejected_optional_input_runs_once() {
    let runs = Runs::default();
    let app = router(Router::new().route("/c", post(charge_declined)), &runs);
    let first = send(&app, request("/c?note=x", Some("k"), &[], "")).await;
    let retry = send(&app, request("/c?note=x", Some("k"), &[], "")).await;
    assert_eq!(first.status, StatusCode::PAYMENT_REQUIRED, "{}", first.body);
    assert_eq!((retry.replayed, retry.body), (true, first.body));
    assert_eq!(runs.get(), 1, "the declined charge was attempted twice");
}

#[idempotent(scope = "global", final_statuses = "2xx, 400")]
async fn with_own_rejection_stored(
    State(runs): State<Runs>,
    payload: Result<Json<u32>, JsonRejection>,
) -> (StatusCode, String) {
    runs.bump();
    match payload {
        Ok(Json(n)) => (StatusCode::CREATED, n.to_string()),
        Err(rejection) => (StatusCode::BAD_REQUEST, rejection.body_text()),
    }
}

/// An endpoint that lists its final statuses itself has them all stored,
/// its answers to rejected inputs included.
#[tokio::test]
async fn final_statuses_of_ones_own_store_the_answer_to_a_rejection() {
    let runs = Runs::default();
    let app = router(
        Router::new().route("/s", post(with_own_rejection_stored)),
        &runs,
    );
    let first = send(&app, request("/s", Some("k"), &[], "not json")).await;
    let retry = send(&app, request("/s", Some("k"), &[], "not json")).await;
    assert_eq!(first.status, StatusCode::BAD_REQUEST, "{}", first.body);
    assert_eq!((retry.replayed, retry.body), (true, first.body));
    assert_eq!(runs.get(), 1);
}

/// A body that fails while it is read (the connection broke, a body
/// timeout in front of the route gave up on a slow upload) is not a
/// payload the client sent: with a plain `Json<T>` nothing is claimed and
/// the retry runs. Taken as `Result<Json<T>, _>`, the handler answers the
/// rejection; the key must stay usable for the retry that sends the whole
/// body, rather than hold the 400 of a body the client never finished
/// sending and answer every retry 422 until the TTL ends.
#[tokio::test]
async fn a_body_that_fails_while_read_leaves_the_key_to_the_retry() {
    let runs = Runs::default();
    let app = router(Router::new().route("/r", post(with_own_rejection)), &runs);
    let broken = futures_util::stream::iter([
        Ok(axum::body::Bytes::from_static(b"5")),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "the connection broke",
        )),
    ]);
    let cut_short = Request::post("/r")
        .header("content-type", "application/json")
        .header("idempotency-key", "cut")
        .body(Body::from_stream(broken))
        .unwrap();
    let first = send(&app, cut_short).await;
    assert_eq!(first.status, StatusCode::BAD_REQUEST, "{}", first.body);
    let retry = send(&app, request("/r", Some("cut"), &[], "5")).await;
    assert_eq!(
        (retry.status, retry.replayed),
        (StatusCode::CREATED, false),
        "the retry with the whole body: {}",
        retry.body
    );
    assert_eq!(runs.get(), 1);
}

// ===== skip =====

#[derive(Deserialize, serde::Serialize)]
struct Trace {
    trace: String,
}

#[idempotent(scope = "global", skip(trace))]
async fn refuses_a_skipped_malformed_query(
    State(runs): State<Runs>,
    trace: Result<Query<Trace>, axum::extract::rejection::QueryRejection>,
    Json(n): Json<u32>,
) -> (StatusCode, String) {
    match trace {
        Ok(Query(trace)) => (
            StatusCode::CREATED,
            format!("{n} {} run {}", trace.trace, runs.bump()),
        ),
        Err(rejection) => (StatusCode::BAD_REQUEST, rejection.body_text()),
    }
}

/// A rejection in a skipped argument is noted as in a fingerprinted one:
/// the handler's 400 to it is not stored, and the retry with the query
/// fixed runs rather than being replayed the 400 for the whole TTL.
#[tokio::test]
async fn a_handlers_answer_to_a_rejected_skipped_input_leaves_the_key_to_the_fixed_retry() {
    let runs = Runs::default();
    let app = router(
        Router::new().route("/t", post(refuses_a_skipped_malformed_query)),
        &runs,
    );
    let rejected = send(&app, request("/t", Some("k"), &[], "5")).await;
    assert_eq!(
        rejected.status,
        StatusCode::BAD_REQUEST,
        "{}",
        rejected.body
    );
    let fixed = send(&app, request("/t?trace=abc", Some("k"), &[], "5")).await;
    assert_eq!(
        (fixed.status, fixed.replayed),
        (StatusCode::CREATED, false),
        "{}",
        fixed.body
    );
    assert_eq!(runs.get(), 1);
}

#[idempotent(scope = "global", skip(trace))]
async fn skips_query(State(runs): State<Runs>, trace: Query<Trace>, Json(n): Json<u32>) -> String {
    format!("{}:{n}:{}", runs.bump(), trace.trace)
}

#[idempotent(scope = "global")]
async fn fingerprints_query(
    State(runs): State<Runs>,
    trace: Query<Trace>,
    Json(n): Json<u32>,
) -> String {
    format!("{}:{n}:{}", runs.bump(), trace.trace)
}

#[tokio::test]
async fn a_skipped_argument_does_not_change_the_fingerprint() {
    let runs = Runs::default();
    let app = router(
        Router::new()
            .route("/skip", post(skips_query))
            .route("/keep", post(fingerprints_query)),
        &runs,
    );
    send(&app, request("/skip?trace=a", Some("k1"), &[], "1")).await;
    let skipped = send(&app, request("/skip?trace=b", Some("k1"), &[], "1")).await;
    assert_eq!((skipped.status, skipped.replayed), (StatusCode::OK, true));
    assert_eq!(skipped.body, "1:1:a");
    // The body is still fingerprinted.
    let other_body = send(&app, request("/skip?trace=a", Some("k1"), &[], "2")).await;
    assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY);

    send(&app, request("/keep?trace=a", Some("k2"), &[], "1")).await;
    let kept = send(&app, request("/keep?trace=b", Some("k2"), &[], "1")).await;
    assert_eq!(kept.status, StatusCode::UNPROCESSABLE_ENTITY);
}

// ===== name =====

#[idempotent(scope = "global", name = "orders.create")]
async fn create_order_v1(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
    format!("v1:{}:{n}", runs.bump())
}

#[idempotent(scope = "global", name = "orders.create")]
async fn create_order_v2(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
    format!("v2:{}:{n}", runs.bump())
}

#[idempotent(scope = "global")]
async fn create_order_unnamed(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
    format!("unnamed:{}:{n}", runs.bump())
}

#[tokio::test]
async fn the_name_not_the_function_identifies_the_endpoint() {
    let runs = Runs::default();
    // The same store behind both routes, as before and after a rename.
    let app = router(
        Router::new()
            .route("/v1", post(create_order_v1))
            .route("/v2", post(create_order_v2))
            .route("/unnamed", post(create_order_unnamed)),
        &runs,
    );
    assert_eq!(
        send(&app, request("/v1", Some("k"), &[], "3")).await.body,
        "v1:1:3"
    );
    let renamed = send(&app, request("/v2", Some("k"), &[], "3")).await;
    assert_eq!((renamed.body.as_str(), renamed.replayed), ("v1:1:3", true));
    // Without `name`, the function's path is the identity.
    let unnamed = send(&app, request("/unnamed", Some("k"), &[], "3")).await;
    assert_eq!(unnamed.status, StatusCode::UNPROCESSABLE_ENTITY);
}

/// Handlers the default name cannot tell apart: associated functions of
/// one name on two types of one module.
struct Orders;
struct Refunds;

impl Orders {
    #[idempotent(scope = "global")]
    async fn create(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
        format!("order:{}:{n}", runs.bump())
    }
}

impl Refunds {
    #[idempotent(scope = "global")]
    async fn create(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
        format!("refund:{}:{n}", runs.bump())
    }
}

#[tokio::test]
async fn handlers_that_share_a_default_name_are_refused_and_say_why() {
    let runs = Runs::default();
    let app = router(
        Router::new()
            .route("/orders", post(Orders::create))
            .route("/refunds", post(Refunds::create)),
        &runs,
    );
    let order = send(&app, request("/orders", Some("k"), &[], "5")).await;
    assert_eq!(order.body, "order:1:5");
    // Without the check: the order's answer, replayed to the refund.
    let refund = send(&app, request("/refunds", Some("k"), &[], "5")).await;
    assert_eq!(
        (refund.status, refund.replayed),
        (StatusCode::INTERNAL_SERVER_ERROR, false),
        "{}",
        refund.body
    );
    assert!(
        refund.body.contains("shares its name with another handler"),
        "{}",
        refund.body
    );
    // Both places are refused from then on, the first one included.
    let order = send(&app, request("/orders", Some("k2"), &[], "6")).await;
    assert_eq!(order.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(runs.get(), 1);
}

/// A second pair of handlers the default name cannot tell apart, whose
/// first one serves exact repeats before the second one's first request.
struct Invoices;
struct Credits;

impl Invoices {
    #[idempotent(scope = "global")]
    async fn issue(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
        format!("invoice:{}:{n}", runs.bump())
    }
}

impl Credits {
    #[idempotent(scope = "global")]
    async fn issue(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
        format!("credit:{}:{n}", runs.bump())
    }
}

#[tokio::test]
async fn an_exact_repeat_is_refused_once_its_handler_shares_a_default_name() {
    let runs = Runs::default();
    let store = MockStore::new();
    let app = Router::new()
        .route("/invoices", post(Invoices::issue))
        .route("/credits", post(Credits::issue))
        .with_state(runs.clone())
        .layer(store.layer());
    let invoice = || request("/invoices", Some("k"), &[("content-length", "1")], "5");
    for _ in 0..4 {
        assert_eq!(send(&app, invoice()).await.body, "invoice:1:5");
    }
    assert_eq!(
        store.count(OpKind::Get),
        1,
        "the fourth was an exact repeat"
    );

    let credit = send(&app, request("/credits", Some("k2"), &[], "6")).await;
    assert_eq!(credit.status, StatusCode::INTERNAL_SERVER_ERROR);

    // The first place is refused from then on, exact repeats included.
    let repeat = send(&app, invoice()).await;
    assert_eq!(
        (repeat.status, repeat.replayed),
        (StatusCode::INTERNAL_SERVER_ERROR, false),
        "{}",
        repeat.body
    );
    assert_eq!(runs.get(), 1);
}

/// A third pair the default name cannot tell apart, both written by one
/// `macro_rules!` invocation: `line!()` and `column!()` in the expansion
/// are the invocation's, the same for both attributes.
struct Payouts;
struct Transfers;

macro_rules! send_handlers {
    ($($kind:ident => $label:literal),*) => {$(
        impl $kind {
            #[idempotent(scope = "global")]
            async fn send(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
                format!("{}:{}:{n}", $label, runs.bump())
            }
        }
    )*};
}

send_handlers!(Payouts => "payout", Transfers => "transfer");

#[tokio::test]
async fn handlers_of_one_macro_invocation_that_share_a_default_name_are_refused() {
    let runs = Runs::default();
    let app = router(
        Router::new()
            .route("/payouts", post(Payouts::send))
            .route("/transfers", post(Transfers::send)),
        &runs,
    );
    let payout = send(&app, request("/payouts", Some("k"), &[], "5")).await;
    assert_eq!(payout.body, "payout:1:5");

    let transfer = send(&app, request("/transfers", Some("k"), &[], "5")).await;

    assert_eq!(
        (transfer.status, transfer.replayed),
        (StatusCode::INTERNAL_SERVER_ERROR, false),
        "the payout's answer reached the transfer: {}",
        transfer.body
    );
    assert_eq!(runs.get(), 1);
}

// ===== final_statuses =====

#[idempotent(scope = "global")]
async fn not_found_default(State(runs): State<Runs>) -> (StatusCode, String) {
    (StatusCode::NOT_FOUND, runs.bump().to_string())
}

#[idempotent(scope = "global", final_statuses = "2xx")]
async fn not_found_not_final(State(runs): State<Runs>) -> (StatusCode, String) {
    (StatusCode::NOT_FOUND, runs.bump().to_string())
}

#[idempotent(scope = "global", final_statuses = "200-299, 503")]
async fn unavailable_final(State(runs): State<Runs>) -> (StatusCode, String) {
    (StatusCode::SERVICE_UNAVAILABLE, runs.bump().to_string())
}

#[tokio::test]
async fn final_statuses_decide_what_is_stored() {
    let runs = Runs::default();
    let app = router(
        Router::new()
            .route("/default", post(not_found_default))
            .route("/2xx", post(not_found_not_final))
            .route("/503", post(unavailable_final)),
        &runs,
    );
    // By default a 404 is final: the retry replays it.
    send(&app, request("/default", Some("a"), &[], "")).await;
    assert!(
        send(&app, request("/default", Some("a"), &[], ""))
            .await
            .replayed
    );
    // With "2xx" it is not: the retry runs again.
    assert_eq!(
        send(&app, request("/2xx", Some("b"), &[], "")).await.body,
        "2"
    );
    let rerun = send(&app, request("/2xx", Some("b"), &[], "")).await;
    assert_eq!((rerun.body.as_str(), rerun.replayed), ("3", false));
    // A listed 503 is stored.
    send(&app, request("/503", Some("c"), &[], "")).await;
    let replayed = send(&app, request("/503", Some("c"), &[], "")).await;
    assert_eq!(
        (replayed.status, replayed.replayed),
        (StatusCode::SERVICE_UNAVAILABLE, true)
    );
}

#[idempotent(scope = "global", final_statuses = "100-599")]
async fn switching_protocols(State(runs): State<Runs>) -> (StatusCode, String) {
    (StatusCode::SWITCHING_PROTOCOLS, runs.bump().to_string())
}

/// A list that takes in every status still leaves a 1xx unstored: it is
/// no final answer and cannot be replayed, so storing it would answer
/// every retry with its key 500 `record-corrupt` for the whole TTL.
#[tokio::test]
async fn a_1xx_is_not_stored_even_when_the_list_covers_it() {
    let runs = Runs::default();
    let app = router(
        Router::new().route("/101", post(switching_protocols)),
        &runs,
    );
    send(&app, request("/101", Some("a"), &[], "")).await;
    let retry = send(&app, request("/101", Some("a"), &[], "")).await;
    assert_eq!(
        (retry.status, retry.body.as_str(), retry.replayed),
        (StatusCode::SWITCHING_PROTOCOLS, "2", false)
    );
}

/// What the handler answers: its own 409 (the order is out of stock), or
/// a 429 asking the client to come back later.
#[derive(Deserialize, serde::Serialize)]
struct Answer {
    status: u16,
}

#[idempotent(scope = "global", final_statuses = "default, 409")]
async fn own_conflict_final(
    State(runs): State<Runs>,
    Query(answer): Query<Answer>,
) -> (StatusCode, String) {
    let status = StatusCode::from_u16(answer.status).unwrap();
    (status, format!("run {}", runs.bump()))
}

/// `"default, 409"` stores the handler's own 409 on top of the default
/// statuses, and leaves the rest of the default as it was: a 429 still
/// lets the retry run.
#[tokio::test]
async fn default_and_a_listed_409_stores_the_409_and_still_releases_a_429() {
    let runs = Runs::default();
    let app = router(Router::new().route("/o", post(own_conflict_final)), &runs);
    let first = send(&app, request("/o?status=409", Some("conflict"), &[], "")).await;
    let retry = send(&app, request("/o?status=409", Some("conflict"), &[], "")).await;
    assert_eq!(first.status, StatusCode::CONFLICT, "{}", first.body);
    assert_eq!(
        (retry.status, retry.replayed, retry.body),
        (StatusCode::CONFLICT, true, first.body)
    );
    assert_eq!(runs.get(), 1, "the out-of-stock order ran twice");

    let limited = send(&app, request("/o?status=429", Some("busy"), &[], "")).await;
    let rerun = send(&app, request("/o?status=429", Some("busy"), &[], "")).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!((rerun.body.as_str(), rerun.replayed), ("run 3", false));
    // A default status is still stored.
    send(&app, request("/o?status=404", Some("gone"), &[], "")).await;
    assert!(
        send(&app, request("/o?status=404", Some("gone"), &[], ""))
            .await
            .replayed
    );
}

#[idempotent(scope = "global", final_statuses = "default, 409")]
async fn own_conflict_beside_a_rejection(
    State(runs): State<Runs>,
    payload: Result<Json<u32>, JsonRejection>,
) -> (StatusCode, String) {
    let run = runs.bump();
    match payload {
        Ok(Json(n)) => (StatusCode::CREATED, format!("{n} run {run}")),
        Err(rejection) => (StatusCode::BAD_REQUEST, rejection.body_text()),
    }
}

/// The default part of `"default, 409"` is the default's in full: its 400
/// answering a rejected input is released, as with no `final_statuses`,
/// so the retry that sends a valid body runs.
#[tokio::test]
async fn default_and_a_listed_409_releases_the_answer_to_a_rejection_as_the_default_does() {
    let runs = Runs::default();
    let app = router(
        Router::new().route("/r", post(own_conflict_beside_a_rejection)),
        &runs,
    );
    let first = send(&app, request("/r", Some("k"), &[], "not json")).await;
    assert_eq!(first.status, StatusCode::BAD_REQUEST, "{}", first.body);
    let retry = send(&app, request("/r", Some("k"), &[], "5")).await;
    assert_eq!(
        (retry.status, retry.replayed, retry.body.as_str()),
        (StatusCode::CREATED, false, "5 run 2")
    );
}

// ===== crate =====

#[idem::idempotent(crate = "idem", scope = "global")]
async fn through_renamed_crate(State(runs): State<Runs>) -> String {
    runs.bump().to_string()
}

#[tokio::test]
async fn crate_override_expands_to_the_renamed_crate() {
    let runs = Runs::default();
    let app = router(
        Router::new().route("/c", post(through_renamed_crate)),
        &runs,
    );
    send(&app, request("/c", Some("k"), &[], "")).await;
    let retry = send(&app, request("/c", Some("k"), &[], "")).await;
    assert!(retry.replayed);
    assert_eq!(runs.get(), 1);
}
