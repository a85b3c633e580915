//! Exact repeats of a replayed request are answered before the body is
//! parsed, and never differently from the full path.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use idempotent_core::testing::{MockStore, OpKind};
use idempotent_core::{
    FingerprintError, FingerprintInput, Fingerprinter, IDEMPOTENT_REPLAYED, Idempotency,
    IdempotencyBuilder, idempotent,
};
use serde::{Deserialize, Deserializer, Serialize};
use tower::ServiceExt;

/// A payload whose every deserialization is counted. Each test uses its own
/// `tag`, so tests running in parallel count only their own parses.
#[derive(Serialize, Debug)]
struct Charge {
    tag: String,
    amount: u64,
}

impl<'de> Deserialize<'de> for Charge {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Plain {
            tag: String,
            amount: u64,
        }
        let plain = Plain::deserialize(deserializer)?;
        parsed(&plain.tag).fetch_add(1, Ordering::SeqCst);
        Ok(Self {
            tag: plain.tag,
            amount: plain.amount,
        })
    }
}

/// How many times bodies tagged `tag` were deserialized.
fn parsed(tag: &str) -> &'static AtomicUsize {
    static COUNTERS: std::sync::Mutex<Vec<(String, &'static AtomicUsize)>> =
        std::sync::Mutex::new(Vec::new());
    let mut counters = COUNTERS.lock().unwrap();
    if let Some((_, counter)) = counters.iter().find(|(name, _)| name == tag) {
        return counter;
    }
    let counter: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
    counters.push((tag.to_owned(), counter));
    counter
}

#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

#[idempotent(ttl = "1h")]
async fn charge(State(runs): State<Runs>, Json(charge): Json<Charge>) -> (StatusCode, String) {
    let run = runs.0.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        format!("charge {run}: {} {}", charge.tag, charge.amount),
    )
}

fn app(store: &MockStore, runs: &Runs) -> Router {
    Router::new()
        .route("/charges", post(charge))
        .with_state(runs.clone())
        .layer(store.layer())
}

/// A request as an HTTP/1.1 client sends it: with its `Content-Length`.
fn post_json(uri: &str, key: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .header("x-api-key", "caller-1")
        .header("idempotency-key", key)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

struct Answer {
    status: StatusCode,
    replayed: bool,
    body: String,
}

async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        replayed,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

/// Sends `body` under `key` `times` times; returns the answers.
async fn repeat(app: &Router, key: &str, body: &str, times: usize) -> Vec<Answer> {
    let mut answers = Vec::new();
    for _ in 0..times {
        answers.push(send(app, post_json("/charges", key, body)).await);
    }
    answers
}

/// The charges app after `body` was sent four times under `k1`: executed,
/// replayed twice through the full path, then answered as an exact repeat.
async fn after_exact_repeats(body: &str) -> (MockStore, Router) {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    repeat(&app, "k1", body, 4).await;
    (store, app)
}

/// `handler` alone at `/charges`, on a store of its own.
fn on_charges<H, T>(handler: H) -> (MockStore, Router)
where
    H: axum::handler::Handler<T, ()>,
    T: 'static,
{
    let store = MockStore::new();
    let app = Router::new()
        .route("/charges", post(handler))
        .layer(store.layer());
    (store, app)
}

/// Sends `body` to `uri` under `k1` four times, each answered with
/// `expected`; the fourth must have been answered as an exact repeat.
async fn until_an_exact_repeat(
    app: &Router,
    store: &MockStore,
    uri: &str,
    body: &str,
    expected: &str,
) {
    for _ in 0..4 {
        assert_eq!(send(app, post_json(uri, "k1", body)).await.body, expected);
    }
    assert_eq!(
        store.count(OpKind::Get),
        1,
        "the fourth was an exact repeat"
    );
}

#[tokio::test]
async fn exact_repeats_of_a_replay_are_answered_without_parsing_the_body() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    let body = r#"{"tag":"exact","amount":100}"#;

    let answers = repeat(&app, "k1", body, 6).await;

    for answer in &answers {
        assert_eq!(answer.status, StatusCode::CREATED);
        assert_eq!(answer.body, "charge 1: exact 100");
    }
    let replayed: Vec<bool> = answers.iter().map(|answer| answer.replayed).collect();
    assert_eq!(replayed, [false, true, true, true, true, true]);
    store.assert_executed_once();
    // The first execution and the first two replays parse the body (the
    // second one records the request's digest); the last three do not.
    assert_eq!(parsed("exact").load(Ordering::SeqCst), 3);
    // They read the stored record instead of claiming the key.
    assert_eq!(store.count(OpKind::Claim), 3);
    assert_eq!(store.count(OpKind::Get), 3);
}

#[tokio::test]
async fn the_same_payload_in_other_bytes_still_replays_through_the_full_path() {
    let (store, app) = after_exact_repeats(r#"{"tag":"reordered","amount":100}"#).await;
    let before = parsed("reordered").load(Ordering::SeqCst);

    let answer = send(
        &app,
        post_json("/charges", "k1", r#"{ "amount": 100, "tag": "reordered" }"#),
    )
    .await;

    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(answer.replayed);
    assert_eq!(answer.body, "charge 1: reordered 100");
    assert_eq!(parsed("reordered").load(Ordering::SeqCst), before + 1);
    store.assert_executed_once();
}

#[tokio::test]
async fn a_different_payload_is_refused_with_422_after_exact_replays() {
    let (store, app) = after_exact_repeats(r#"{"tag":"changed","amount":100}"#).await;

    let answer = send(
        &app,
        post_json("/charges", "k1", r#"{"tag":"changed","amount":999}"#),
    )
    .await;

    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(answer.body.contains("urn:idempotent:key-reused"));
    store.assert_executed_once();
}

#[tokio::test]
async fn once_the_record_expires_an_exact_repeat_runs_the_handler_again() {
    let body = r#"{"tag":"expired","amount":100}"#;
    let (store, app) = after_exact_repeats(body).await;

    store.advance(Duration::from_secs(3601));
    let answer = send(&app, post_json("/charges", "k1", body)).await;

    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(!answer.replayed);
    assert_eq!(answer.body, "charge 2: expired 100");
    assert_eq!(store.executions(), 2);
}

#[tokio::test]
async fn a_key_reused_after_expiry_is_never_answered_with_the_old_payloads_replay() {
    let first = r#"{"tag":"reused","amount":100}"#;
    let (store, app) = after_exact_repeats(first).await;
    store.advance(Duration::from_secs(3601));
    let second = send(
        &app,
        post_json("/charges", "k1", r#"{"tag":"reused","amount":7}"#),
    )
    .await;
    assert_eq!(second.body, "charge 2: reused 7");

    // The table still knows the first payload's bytes under this key, but
    // the record there now holds the second payload.
    let answer = send(&app, post_json("/charges", "k1", first)).await;

    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(store.executions(), 2);
}

#[idempotent(ttl = "1h", exact_repeats = false)]
async fn parsed_every_time(Json(charge): Json<Charge>) -> String {
    format!("{}", charge.amount)
}

#[tokio::test]
async fn exact_repeats_off_replays_through_the_full_path_every_time() {
    let (store, app) = on_charges(parsed_every_time);

    let answers = repeat(&app, "k1", r#"{"tag":"off","amount":100}"#, 6).await;

    assert!(answers.iter().skip(1).all(|answer| answer.replayed));
    assert_eq!(parsed("off").load(Ordering::SeqCst), 6);
    assert_eq!(store.count(OpKind::Get), 0);
}

// ===== path parameters, including a nested router's prefix =====

#[idempotent(ttl = "1h")]
async fn tenant_charge(Path(tenant): Path<String>, Json(charge): Json<Charge>) -> String {
    format!("{tenant}: {}", charge.amount)
}

#[tokio::test]
async fn a_nested_prefix_parameter_keeps_tenants_apart() {
    let store = MockStore::new();
    let tenant = Router::new().route("/charges", post(tenant_charge));
    let app = Router::new().nest("/{tenant}", tenant).layer(store.layer());
    let body = r#"{"tag":"nested","amount":100}"#;
    until_an_exact_repeat(&app, &store, "/acme/charges", body, "acme: 100").await;

    // The nested router sees the same `/charges` for both tenants; the
    // fingerprint differs by the `tenant` parameter, and so must the answer.
    let answer = send(&app, post_json("/globex/charges", "k1", body)).await;

    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    store.assert_executed_once();
}

/// The URI extractors grouped into a tuple, as a handler past axum's
/// limit of arguments groups them.
#[idempotent(ttl = "1h")]
async fn grouped_tenant_charge(
    (method, Path(tenant)): (axum::http::Method, Path<String>),
    Json(charge): Json<Charge>,
) -> String {
    format!("{method} {tenant}: {}", charge.amount)
}

/// A tuple of extractors that read only the URI keeps exact repeats, as
/// the same extractors taken one by one do: a retry with the same bytes
/// fingerprints the same either way.
#[tokio::test]
async fn a_tuple_of_uri_extractors_keeps_exact_repeats() {
    let store = MockStore::new();
    let app = Router::new()
        .route("/{tenant}/charges", post(grouped_tenant_charge))
        .layer(store.layer());
    let body = r#"{"tag":"grouped","amount":100}"#;
    until_an_exact_repeat(&app, &store, "/acme/charges", body, "POST acme: 100").await;

    let answer = send(&app, post_json("/globex/charges", "k1", body)).await;

    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    store.assert_executed_once();
}

/// Two versions of one endpoint, each in its own module under its own
/// static prefix: the nested routers see the same `/orders`.
mod v1 {
    use super::{Charge, Json, idempotent};

    #[idempotent(ttl = "1h")]
    pub(super) async fn create(Json(charge): Json<Charge>) -> String {
        format!("v1: {}", charge.amount)
    }
}

mod v2 {
    use super::{Json, idempotent};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub(super) struct Order {
        amount: u64,
        #[serde(default)]
        currency: Option<String>,
    }

    #[idempotent(ttl = "1h")]
    pub(super) async fn create(Json(order): Json<Order>) -> String {
        format!("v2: {} {:?}", order.amount, order.currency)
    }
}

/// `v1` and `v2`, each at `/orders` nested under `/v1` and `/v2`, on a
/// store of their own.
fn versioned<H1, T1, H2, T2>(v1: H1, v2: H2) -> (MockStore, Router)
where
    H1: axum::handler::Handler<T1, ()>,
    H2: axum::handler::Handler<T2, ()>,
    T1: 'static,
    T2: 'static,
{
    let store = MockStore::new();
    let app = Router::new()
        .nest("/v1", Router::new().route("/orders", post(v1)))
        .nest("/v2", Router::new().route("/orders", post(v2)))
        .layer(store.layer());
    (store, app)
}

#[tokio::test]
async fn same_named_handlers_under_static_prefixes_stay_apart() {
    let (store, app) = versioned(v1::create, v2::create);
    let body = r#"{"tag":"versions","amount":5}"#;
    until_an_exact_repeat(&app, &store, "/v1/orders", body, "v1: 5").await;

    // Same key, same bytes, the other version: its fingerprint differs.
    let answer = send(&app, post_json("/v2/orders", "k1", body)).await;

    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    store.assert_executed_once();
}

#[tokio::test]
async fn one_handler_under_two_limits_keeps_each_routes_limit() {
    let store = MockStore::new();
    let notes = || Router::new().route("/notes", post(limited_note));
    let app = Router::new()
        .nest("/big", notes())
        .nest("/small", notes().layer(DefaultBodyLimit::max(10)))
        .layer(store.layer());
    let body = "a".repeat(100);
    until_an_exact_repeat(&app, &store, "/big/notes", &body, "noted 100 bytes").await;

    // Both nested routers see `/notes`; the smaller limit still applies.
    let answer = send(&app, post_json("/small/notes", "k1", &body)).await;

    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn another_caller_with_the_same_key_and_bytes_runs_its_own_request() {
    let (store, app) = after_exact_repeats(r#"{"tag":"callers","amount":100}"#).await;

    let mut request = post_json("/charges", "k1", r#"{"tag":"callers","amount":100}"#);
    request
        .headers_mut()
        .insert("x-api-key", "caller-2".parse().unwrap());
    let answer = send(&app, request).await;

    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(!answer.replayed);
    assert_eq!(store.executions(), 2);
}

#[tokio::test]
async fn basic_credentials_are_another_caller_than_the_same_bearer_token() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    let body = r#"{"tag":"schemes","amount":100}"#;
    let with = |authorization: &str| {
        let mut request = post_json("/charges", "k1", body);
        let headers = request.headers_mut();
        headers.remove("x-api-key");
        headers.insert("authorization", authorization.parse().unwrap());
        request
    };
    for _ in 0..4 {
        let answer = send(&app, with("Bearer c2tfMTo=")).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    }
    assert_eq!(
        store.count(OpKind::Get),
        1,
        "the fourth was an exact repeat"
    );

    // The same credential bytes under the other scheme name another caller.
    let answer = send(&app, with("Basic c2tfMTo=")).await;

    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(!answer.replayed, "{}", answer.body);
    assert_eq!(store.executions(), 2);
}

#[tokio::test]
async fn the_same_bytes_under_another_content_type_are_refused_as_without_exact_repeats() {
    let body = r#"{"tag":"media","amount":100}"#;
    let (store, app) = after_exact_repeats(body).await;

    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let mut request = post_json("/charges", "k1", body);
        request
            .headers_mut()
            .insert("content-type", content_type.parse().unwrap());
        let answer = send(&app, request).await;
        assert_eq!(
            answer.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type}: {}",
            answer.body
        );
    }
    store.assert_executed_once();
}

#[tokio::test]
async fn a_malformed_body_gets_the_same_rejection_as_without_exact_repeats() {
    let body = r#"{"tag":"malformed","amount":100}"#;
    let (store, app) = after_exact_repeats(body).await;
    let (_, without) = on_charges(parsed_every_time);
    // The same length as the replayed body, one byte changed.
    let malformed = body.replace(':', ";");

    let answer = send(&app, post_json("/charges", "k1", &malformed)).await;
    let expected = send(&without, post_json("/charges", "k1", &malformed)).await;

    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        (answer.status, answer.body),
        (expected.status, expected.body)
    );
    store.assert_executed_once();
}

#[idempotent(ttl = "1h")]
async fn limited_note(body: String) -> String {
    format!("noted {} bytes", body.len())
}

#[tokio::test]
async fn a_body_over_the_routes_limit_is_refused_as_without_exact_repeats() {
    let store = MockStore::new();
    let app = Router::new()
        .route("/notes", post(limited_note))
        .layer(DefaultBodyLimit::max(64))
        .layer(store.layer());
    let short = "a".repeat(40);
    // A plain `String` body is answered early too.
    until_an_exact_repeat(&app, &store, "/notes", &short, "noted 40 bytes").await;

    let answer = send(&app, post_json("/notes", "k1", &"a".repeat(100))).await;

    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
}

// ===== extractors before the body still run =====

/// A caller identified by its `authorization` header; refuses without one.
struct Caller;

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, StatusCode> {
        if parts.headers.contains_key("authorization") {
            Ok(Self)
        } else {
            Err(StatusCode::UNAUTHORIZED)
        }
    }
}

#[idempotent(ttl = "1h", skip(caller))]
async fn guarded_charge(caller: Caller, Json(charge): Json<Charge>) -> String {
    let Caller = caller;
    format!("guarded: {}", charge.amount)
}

#[tokio::test]
async fn an_exact_repeat_is_still_refused_by_an_earlier_extractor() {
    let (store, app) = on_charges(guarded_charge);
    let body = r#"{"tag":"guarded","amount":100}"#;
    let authorized = || {
        let mut request = post_json("/charges", "k1", body);
        request
            .headers_mut()
            .insert("authorization", "Bearer t".parse().unwrap());
        request
    };
    for _ in 0..4 {
        assert_eq!(send(&app, authorized()).await.status, StatusCode::OK);
    }
    assert_eq!(
        store.count(OpKind::Get),
        1,
        "the fourth was an exact repeat"
    );

    let answer = send(&app, post_json("/charges", "k1", body)).await;

    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(!answer.replayed);
}

// ===== handlers whose fingerprint reads more than URI and body =====

/// A fingerprinted input taken from a header: equal bytes in the URI and
/// body no longer mean an equal fingerprint.
struct Region(String);

impl<S: Send + Sync> FromRequestParts<S> for Region {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, StatusCode> {
        let region = parts
            .headers
            .get("x-region")
            .ok_or(StatusCode::BAD_REQUEST)?;
        Ok(Self(
            region
                .to_str()
                .map_err(|_| StatusCode::BAD_REQUEST)?
                .to_owned(),
        ))
    }
}

impl FingerprintInput for Region {
    fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError> {
        fingerprinter.input(&self.0).map(|_| ())
    }
}

#[idempotent(ttl = "1h")]
async fn regional_charge(region: Region, Json(charge): Json<Charge>) -> String {
    format!("{}: {}", region.0, charge.amount)
}

#[tokio::test]
async fn a_handler_fingerprinting_a_header_input_never_answers_exact_repeats() {
    let (store, app) = on_charges(regional_charge);
    let body = r#"{"tag":"regional","amount":100}"#;
    let in_region = |region: &str| {
        let mut request = post_json("/charges", "k1", body);
        request
            .headers_mut()
            .insert("x-region", region.parse().unwrap());
        request
    };
    for _ in 0..4 {
        assert_eq!(send(&app, in_region("eu")).await.body, "eu: 100");
    }

    let answer = send(&app, in_region("us")).await;

    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(store.count(OpKind::Get), 0);
}

#[tokio::test]
async fn a_near_repeat_or_one_without_a_declared_length_takes_the_full_path() {
    let body = r#"{"tag":"variants","amount":100}"#;
    let (store, app) = after_exact_repeats(body).await;
    let before = parsed("variants").load(Ordering::SeqCst);

    let mut charset = post_json("/charges", "k1", body);
    charset.headers_mut().insert(
        "content-type",
        "application/json; charset=utf-8".parse().unwrap(),
    );
    let query = post_json("/charges?source=retry", "k1", body);
    let mut chunked = post_json("/charges", "k1", body);
    chunked.headers_mut().remove("content-length");
    for request in [charset, query, chunked] {
        let answer = send(&app, request).await;
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(answer.replayed);
    }

    assert_eq!(parsed("variants").load(Ordering::SeqCst), before + 3);
    store.assert_executed_once();
}

/// Sends an exact repeat of `body` under `k1` whose store read outlasts
/// the store timeout, while the calls after it answer at once; returns
/// the answer and how long it took on tokio's (paused) clock.
async fn exact_repeat_with_a_slow_read(
    store: &MockStore,
    app: &Router,
    body: &str,
) -> (Answer, Duration) {
    store.set_delay(Duration::from_secs(60));
    let started = tokio::time::Instant::now();
    let request = tokio::spawn({
        let app = app.clone();
        let request = post_json("/charges", "k1", body);
        async move { send(&app, request).await }
    });
    // The read has started under the delay; later calls take none.
    tokio::time::sleep(Duration::from_millis(1)).await;
    store.set_delay(Duration::ZERO);
    let answer = request.await.unwrap();
    (answer, started.elapsed())
}

#[tokio::test(start_paused = true)]
async fn an_exact_repeat_whose_read_times_out_is_refused_after_one_store_timeout() {
    let body = r#"{"tag":"slow","amount":5}"#;
    let (store, app) = after_exact_repeats(body).await;
    let claims = store.count(OpKind::Claim);

    let (refused, took) = exact_repeat_with_a_slow_read(&store, &app, body).await;

    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        refused.body.contains("store-unavailable"),
        "{}",
        refused.body
    );
    assert_eq!(
        took,
        IdempotencyBuilder::DEFAULT_STORE_TIMEOUT,
        "one timeout, not two"
    );
    assert_eq!(
        store.count(OpKind::Claim),
        claims,
        "no claim after the read"
    );
    store.assert_executed_once();
}

#[tokio::test(start_paused = true)]
async fn with_fail_open_an_exact_repeat_whose_read_times_out_takes_the_full_path() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let layer = Idempotency::builder(store.clone()).fail_open(true).build();
    let app = Router::new()
        .route("/charges", post(charge))
        .with_state(runs)
        .layer(layer);
    let body = r#"{"tag":"open","amount":6}"#;
    repeat(&app, "k1", body, 4).await;

    let (answer, _) = exact_repeat_with_a_slow_read(&store, &app, body).await;

    assert!(answer.replayed, "the full path's claim finds the record");
    assert_eq!(answer.body, "charge 1: open 6");
    store.assert_executed_once();
}

#[tokio::test]
async fn an_exact_repeat_whose_read_fails_otherwise_takes_the_full_path() {
    let body = r#"{"tag":"reset","amount":7}"#;
    let (store, app) = after_exact_repeats(body).await;
    let claims = store.count(OpKind::Claim);

    store.fail_next(OpKind::Get);
    let answer = send(&app, post_json("/charges", "k1", body)).await;

    assert!(answer.replayed, "the claim decides");
    assert_eq!(answer.body, "charge 1: reset 7");
    assert_eq!(store.count(OpKind::Claim), claims + 1);
    store.assert_executed_once();
}

/// Two handlers named alike in two modules, taking the same body.
mod orders {
    use super::*;

    #[idempotent(ttl = "1h")]
    pub(super) async fn create(Json(amount): Json<u64>) -> (StatusCode, String) {
        (StatusCode::CREATED, format!("order {amount}"))
    }
}

mod refunds {
    use super::*;

    #[idempotent(ttl = "1h")]
    pub(super) async fn create(Json(amount): Json<u64>) -> (StatusCode, String) {
        (StatusCode::CREATED, format!("refund {amount}"))
    }
}

#[tokio::test]
async fn handlers_of_one_name_in_two_modules_are_two_endpoints() {
    let store = MockStore::new();
    let app = Router::new()
        .route("/orders", post(orders::create))
        .route("/refunds", post(refunds::create))
        .layer(store.layer());
    assert_eq!(
        send(&app, post_json("/orders", "k1", "5")).await.body,
        "order 5"
    );
    let refund = send(&app, post_json("/refunds", "k1", "5")).await;
    assert_eq!(
        (refund.status, refund.replayed),
        (StatusCode::UNPROCESSABLE_ENTITY, false),
        "the order's answer reached the refund: {}",
        refund.body
    );
}

/// Two versions of an endpoint whose handlers share a module, a function
/// name and, on purpose, an endpoint name: associated functions of two
/// types, each at `/orders` of its own prefix.
struct V1;
struct V2;

#[derive(Deserialize, Serialize)]
struct OrderV1 {
    amount: u64,
}

/// A field added with a default value other than `None`: a payload of its
/// own, whose fingerprint differs from `OrderV1`'s for the same bytes.
#[derive(Deserialize, Serialize)]
struct OrderV2 {
    amount: u64,
    #[serde(default)]
    currency: String,
}

impl V1 {
    #[idempotent(ttl = "1h", name = "orders.create")]
    async fn create(Json(order): Json<OrderV1>) -> (StatusCode, String) {
        (StatusCode::CREATED, format!("v1: {}", order.amount))
    }
}

impl V2 {
    #[idempotent(ttl = "1h", name = "orders.create")]
    async fn create(Json(order): Json<OrderV2>) -> (StatusCode, String) {
        (StatusCode::CREATED, format!("v2: {}", order.amount))
    }
}

#[tokio::test]
async fn an_exact_repeat_is_answered_only_by_the_handler_it_repeats() {
    let (store, app) = versioned(V1::create, V2::create);
    let body = r#"{"amount":5}"#;
    until_an_exact_repeat(&app, &store, "/v1/orders", body, "v1: 5").await;
    let other = send(&app, post_json("/v2/orders", "k1", body)).await;
    assert_eq!(
        (other.status, other.replayed),
        (StatusCode::UNPROCESSABLE_ENTITY, false),
        "v1's answer reached v2: {}",
        other.body
    );
}

// ===== many callers at once =====

/// Answers 500 (so the record is released) for amounts divisible by 5,
/// and otherwise names the amount it charged.
#[idempotent(ttl = "1s")]
async fn flaky_charge(Json(charge): Json<Charge>) -> (StatusCode, String) {
    let status = if charge.amount.is_multiple_of(5) {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::CREATED
    };
    (status, format!("charged {}", charge.amount))
}

/// More keys than the table holds, so that keys share sets and evict one
/// another while their repeats are in flight.
const CROWD: u64 = 1_200;

/// The requests of one round: each key's payload for the round five times
/// and the previous round's once, the six of a key side by side, so that
/// concurrent tasks send them at once.
fn round(round: u64) -> Vec<(String, u64)> {
    let amount = |round: u64, key: u64| round * 10_000 + key;
    let mut requests = Vec::new();
    for key in 0..CROWD {
        let name = format!("crowd-{key}");
        for _ in 0..5 {
            requests.push((name.clone(), amount(round, key)));
        }
        requests.push((name, amount(round.saturating_sub(1), key)));
    }
    requests
}

/// Whatever the interleaving, an answer that names an amount names the
/// request's own: a table entry left by an earlier record of the key (one
/// that expired, was released after a 500, or was replaced by another
/// payload) never answers for the record there now.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_repeats_through_expiries_releases_and_reuse_answer_only_their_own_payload() {
    const TASKS: usize = 8;
    let (store, app) = on_charges(flaky_charge);
    for number in 0..3 {
        let requests = Arc::new(round(number));
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let (app, store, requests) = (app.clone(), store.clone(), Arc::clone(&requests));
                tokio::spawn(async move {
                    for (index, (key, amount)) in
                        requests.iter().enumerate().skip(task).step_by(TASKS)
                    {
                        // Records expire while others of their keys are in flight.
                        if task == 0 && index % 3_000 == 0 {
                            store.advance(Duration::from_millis(1_001));
                        }
                        let body = format!(r#"{{"tag":"crowd","amount":{amount}}}"#);
                        let answer = send(&app, post_json("/charges", key, &body)).await;
                        match answer.status {
                            StatusCode::CREATED | StatusCode::INTERNAL_SERVER_ERROR => {
                                assert_eq!(answer.body, format!("charged {amount}"), "{key}");
                            }
                            StatusCode::UNPROCESSABLE_ENTITY | StatusCode::CONFLICT => {}
                            other => panic!("{key}: {other} {}", answer.body),
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        store.advance(Duration::from_millis(1_001));
    }
    assert!(
        store.count(OpKind::Get) > 1_000,
        "too few exact repeats to show anything: {}",
        store.count(OpKind::Get)
    );
}
