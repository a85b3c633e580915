//! `#[idempotent]` handlers end to end, through a `Router`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use idempotent_core::store::MemoryStore;
use idempotent_core::{IDEMPOTENT_REPLAYED, Idempotency, IdempotencyKey, idempotent};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

#[derive(Clone, Default)]
struct Counter(Arc<AtomicUsize>);

impl Counter {
    fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Serialize, Deserialize)]
struct Order {
    item: String,
    quantity: u32,
}

/// Creates an order.
#[idempotent(ttl = "1h", scope = "api_key")]
async fn create_order(
    State(counter): State<Counter>,
    Json(order): Json<Order>,
) -> (StatusCode, Json<serde_json::Value>) {
    placed(&counter, &order)
}

/// What every variant of `create_order` does: counts the order and
/// answers with it.
fn placed(counter: &Counter, order: &Order) -> (StatusCode, Json<serde_json::Value>) {
    let n = counter.bump();
    (
        StatusCode::CREATED,
        Json(serde_json::json!({"order": n, "item": order.item, "quantity": order.quantity})),
    )
}

fn routes(counter: &Counter) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .with_state(counter.clone())
}

fn app(counter: &Counter) -> Router {
    routes(counter).layer(Idempotency::new(MemoryStore::new()))
}

fn post_json(uri: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut request = Request::post(uri)
        .header("content-type", "application/json")
        .header("x-api-key", "caller-1");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.body(Body::from(body.to_owned())).unwrap()
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, bool, String) {
    let response: Response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn a_retry_replays_the_first_response_without_running_the_handler() {
    let counter = Counter::default();
    let app = app(&counter);
    let body = r#"{"item":"book","quantity":2}"#;
    let first = send(&app, post_json("/orders", Some("k1"), body)).await;
    let retry = send(&app, post_json("/orders", Some("k1"), body)).await;
    assert_eq!(first.0, StatusCode::CREATED);
    assert!(!first.1);
    assert_eq!(retry.0, StatusCode::CREATED);
    assert!(retry.1, "the retry is marked as replayed");
    assert_eq!(first.2, retry.2);
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn the_same_payload_in_another_field_order_is_the_same_request() {
    let counter = Counter::default();
    let app = app(&counter);
    send(
        &app,
        post_json("/orders", Some("k1"), r#"{"item":"book","quantity":2}"#),
    )
    .await;
    let retry = send(
        &app,
        post_json(
            "/orders",
            Some("k1"),
            r#"{ "quantity": 2, "item": "book" }"#,
        ),
    )
    .await;
    assert!(retry.1);
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn a_different_payload_with_the_same_key_is_refused_with_422() {
    let counter = Counter::default();
    let app = app(&counter);
    send(
        &app,
        post_json("/orders", Some("k1"), r#"{"item":"book","quantity":2}"#),
    )
    .await;
    let other = send(
        &app,
        post_json("/orders", Some("k1"), r#"{"item":"book","quantity":3}"#),
    )
    .await;
    assert_eq!(other.0, StatusCode::UNPROCESSABLE_ENTITY);
    // The client is told what to do, not the handler's module path.
    assert!(other.2.contains("send a new key"), "{}", other.2);
    assert!(!other.2.contains("create_order"), "{}", other.2);
    assert_eq!(counter.get(), 1);
}

#[tokio::test]
async fn a_missing_key_is_refused_with_400_and_runs_nothing() {
    let counter = Counter::default();
    let app = app(&counter);
    let response = send(
        &app,
        post_json("/orders", None, r#"{"item":"book","quantity":2}"#),
    )
    .await;
    assert_eq!(response.0, StatusCode::BAD_REQUEST);
    assert_eq!(counter.get(), 0);
}

/// `create_order` without `exact_repeats`: its context is the first
/// argument rather than part of the body's extractor.
#[idempotent(ttl = "1h", scope = "api_key", exact_repeats = false)]
async fn create_order_plain(
    State(counter): State<Counter>,
    Json(order): Json<Order>,
) -> (StatusCode, Json<serde_json::Value>) {
    placed(&counter, &order)
}

#[idempotent(ttl = "1h", scope = "api_key", optional)]
async fn create_order_optional(
    State(counter): State<Counter>,
    Json(order): Json<Order>,
) -> (StatusCode, Json<serde_json::Value>) {
    placed(&counter, &order)
}

/// Scoped by a named header, whose scope resolves when the request runs;
/// its key is still checked while extracting.
#[idempotent(ttl = "1h", scope = "header:x-tenant")]
async fn create_order_by_tenant(
    State(counter): State<Counter>,
    Json(order): Json<Order>,
) -> (StatusCode, Json<serde_json::Value>) {
    placed(&counter, &order)
}

#[tokio::test]
async fn a_missing_key_is_reported_before_the_body_is_read() {
    // As with `IdempotentLayer`: a keyless request is told to send a key,
    // not about its body, which is never read (with `Expect:
    // 100-continue`, reading it is what asks the client to upload it).
    let counter = Counter::default();
    let app = Router::new()
        .route("/orders", post(create_order))
        .route("/plain", post(create_order_plain))
        .route("/optional", post(create_order_optional))
        .route("/tenant", post(create_order_by_tenant))
        .with_state(counter.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    for uri in ["/orders", "/plain", "/tenant"] {
        for body in ["{", r#"{"item":"book","quantity":2}"#] {
            let response = send(&app, post_json(uri, None, body)).await;
            assert_eq!(response.0, StatusCode::BAD_REQUEST, "{uri} {body}");
            assert!(
                response.2.contains("urn:idempotent:missing-key"),
                "{uri} {body}: {}",
                response.2
            );
        }
        let read = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let noted = read.clone();
        let body = http_body_util::Full::new(axum::body::Bytes::from_static(b"{}")).map_frame(
            move |frame| {
                noted.store(true, Ordering::SeqCst);
                frame
            },
        );
        let request = Request::post(uri)
            .header("content-type", "application/json")
            .header("x-api-key", "caller-1")
            .body(Body::new(body))
            .unwrap();
        let response = send(&app, request).await;
        assert!(
            response.2.contains("urn:idempotent:missing-key"),
            "{uri}: {}",
            response.2
        );
        assert!(!read.load(Ordering::SeqCst), "{uri}: the body was read");
    }
    // A keyed request without the API key its scope needs: told so (401),
    // not about its body.
    for uri in ["/orders", "/plain", "/optional"] {
        let request = Request::post(uri)
            .header("content-type", "application/json")
            .header("idempotency-key", "k-no-credential")
            .body(Body::from("{"))
            .unwrap();
        let response = send(&app, request).await;
        assert_eq!(
            response.0,
            StatusCode::UNAUTHORIZED,
            "{uri}: {}",
            response.2
        );
        assert!(
            response.2.contains("urn:idempotent:missing-credentials"),
            "{uri}: {}",
            response.2
        );
    }
    // An optional endpoint still runs a keyless request as it came.
    let response = send(&app, post_json("/optional", None, "{")).await;
    assert_eq!(response.0, StatusCode::BAD_REQUEST);
    assert!(!response.2.contains("urn:idempotent"), "{}", response.2);
    let response = send(
        &app,
        post_json("/optional", None, r#"{"item":"book","quantity":2}"#),
    )
    .await;
    assert_eq!(response.0, StatusCode::CREATED);
    assert_eq!(counter.get(), 1);
}

#[idempotent]
async fn echo_key(key: IdempotencyKey) -> String {
    key.derive("ledger")
}

#[tokio::test]
async fn the_handler_can_take_the_key_and_derive_downstream_keys() {
    let app = Router::new()
        .route("/echo", post(echo_key))
        .layer(Idempotency::new(MemoryStore::new()));
    let response = send(&app, post_json("/echo", Some("abc"), "")).await;
    assert_eq!(response.0, StatusCode::OK);
    let key = IdempotencyKey::parse(b"abc").unwrap();
    assert_eq!(response.2, key.derive("ledger"));
    assert_ne!(response.2, key.derive("email"));
}

#[idempotent(scope = "global")]
async fn fallible(Json(order): Json<Order>) -> Result<impl IntoResponse, StatusCode> {
    let quantity = u8::try_from(order.quantity).map_err(|_| StatusCode::BAD_REQUEST)?;
    Ok(Json(quantity))
}

#[tokio::test]
async fn question_mark_and_impl_into_response_work_in_the_body() {
    let app = Router::new()
        .route("/fallible", post(fallible))
        .layer(Idempotency::new(MemoryStore::new()));
    let ok = send(
        &app,
        post_json("/fallible", Some("a"), r#"{"item":"x","quantity":7}"#),
    )
    .await;
    assert_eq!((ok.0, ok.2.as_str()), (StatusCode::OK, "7"));
    let bad = send(
        &app,
        post_json("/fallible", Some("b"), r#"{"item":"x","quantity":700}"#),
    )
    .await;
    assert_eq!(bad.0, StatusCode::BAD_REQUEST);
}

/// Holds a 32 KiB buffer across an `.await`: its future is over the
/// 16 KiB `clippy::large_futures` allows. Without the attribute axum
/// awaits that future, where the lint does not look; the attribute's own
/// await must not raise it at the return type either, where its advice
/// (`Box::pin`) cannot be taken. `cargo clippy --all-targets` checks this.
#[idempotent(scope = "global")]
#[deny(clippy::large_futures)]
async fn large_future(State(counter): State<Counter>, body: String) -> String {
    let lengths = [body.len(); 4096];
    tokio::task::yield_now().await;
    format!("{} {}", counter.bump(), lengths[4095])
}

#[tokio::test]
async fn a_handler_with_a_large_future_runs_once_and_is_replayed() {
    let counter = Counter::default();
    let app = Router::new()
        .route("/large", post(large_future))
        .with_state(counter.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    let first = send(&app, post_json("/large", Some("big"), "abc")).await;
    assert_eq!(
        (first.0, first.1, first.2.as_str()),
        (StatusCode::OK, false, "1 3")
    );
    let retry = send(&app, post_json("/large", Some("big"), "abc")).await;
    assert_eq!(
        (retry.0, retry.1, retry.2.as_str()),
        (StatusCode::OK, true, "1 3")
    );
    assert_eq!(counter.get(), 1);
}

#[idempotent(optional)]
async fn maybe_key(key: Option<IdempotencyKey>) -> String {
    key.map_or_else(|| "no key".to_owned(), |key| key.as_str().to_owned())
}

#[tokio::test]
async fn an_optional_endpoint_can_take_the_key_as_an_option() {
    let app = Router::new()
        .route("/maybe", post(maybe_key))
        .layer(Idempotency::new(MemoryStore::new()));
    assert_eq!(send(&app, post_json("/maybe", None, "")).await.2, "no key");
    let keyed = send(&app, post_json("/maybe", Some("k-7"), "")).await;
    assert_eq!((keyed.0, keyed.2.as_str()), (StatusCode::OK, "k-7"));
    assert!(send(&app, post_json("/maybe", Some("k-7"), "")).await.1);
}

#[idempotent]
async fn update_item(
    axum::extract::Path(id): axum::extract::Path<u32>,
    Json(order): Json<Order>,
) -> String {
    format!("{id}:{}", order.quantity)
}

#[tokio::test]
async fn path_parameters_are_part_of_the_fingerprint() {
    let app = Router::new()
        .route("/items/{id}", post(update_item))
        .layer(Idempotency::new(MemoryStore::new()));
    let body = r#"{"item":"book","quantity":1}"#;
    assert_eq!(
        send(&app, post_json("/items/1", Some("k"), body)).await.2,
        "1:1"
    );
    let other_item = send(&app, post_json("/items/2", Some("k"), body)).await;
    assert_eq!(other_item.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(send(&app, post_json("/items/1", Some("k"), body)).await.1);
}

/// The organization a middleware resolved from the path.
#[derive(Clone)]
struct Org(u32);

async fn resolve_org(
    axum::extract::Path(org): axum::extract::Path<u32>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    request.extensions_mut().insert(Org(org));
    next.run(request).await
}

/// Learns its organization from the middleware, not from its arguments.
#[idempotent]
async fn create_invoice(
    axum::Extension(org): axum::Extension<Org>,
    Json(order): Json<Order>,
) -> (StatusCode, String) {
    (
        StatusCode::CREATED,
        format!("invoice of org {} for {}", org.0, order.quantity),
    )
}

#[tokio::test]
async fn the_same_inputs_on_another_resource_are_another_request() {
    let invoices = Router::new()
        .route("/invoices", post(create_invoice))
        .route_layer(axum::middleware::from_fn(resolve_org));
    let app = Router::new()
        .nest("/orgs/{org}", invoices)
        .layer(Idempotency::new(MemoryStore::new()));
    let body = r#"{"item":"book","quantity":1}"#;
    let first = send(&app, post_json("/orgs/1/invoices", Some("k"), body)).await;
    assert_eq!(first.2, "invoice of org 1 for 1");
    let other_org = send(&app, post_json("/orgs/2/invoices", Some("k"), body)).await;
    assert_eq!(
        (other_org.0, other_org.1),
        (StatusCode::UNPROCESSABLE_ENTITY, false),
        "org 2's request was answered with: {}",
        other_org.2
    );
    let retry = send(&app, post_json("/orgs/1/invoices", Some("k"), body)).await;
    assert_eq!(
        (retry.1, retry.2.as_str()),
        (true, "invoice of org 1 for 1")
    );
}

/// The layer can also wrap the whole router once, instead of each route
/// (`Router::layer`): handlers find it all the same.
#[tokio::test]
async fn a_layer_around_the_whole_router_serves_the_handlers() {
    let counter = Counter::default();
    let app = tower::Layer::layer(&Idempotency::new(MemoryStore::new()), routes(&counter));
    let body = r#"{"item":"pen","quantity":1}"#;
    let mut replayed = Vec::new();
    for _ in 0..2 {
        let request = post_json("/orders", Some("k-outer"), body);
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        replayed.push(response.headers().contains_key(IDEMPOTENT_REPLAYED));
    }
    assert_eq!(replayed, [false, true]);
    assert_eq!(counter.get(), 1);
}

/// Pays for an organization named in the path, which it does not read.
#[idempotent]
async fn pay_for_org(Json(order): Json<Order>) -> (StatusCode, String) {
    (StatusCode::CREATED, format!("paid {}", order.quantity))
}

/// The same, its context extracted as an argument of its own.
#[idempotent(exact_repeats = false)]
async fn pay_for_org_plain(Json(order): Json<Order>) -> (StatusCode, String) {
    (StatusCode::CREATED, format!("paid {}", order.quantity))
}

/// The same, keys optional.
#[idempotent(optional)]
async fn pay_for_org_optional(Json(order): Json<Order>) -> (StatusCode, String) {
    (StatusCode::CREATED, format!("paid {}", order.quantity))
}

/// A path parameter that is not UTF-8 once decoded cannot be bound to the
/// fingerprint: `/orgs/%FF/pay` and `/orgs/%FE/pay` would be one request,
/// and the second would replay the first one's payment. Refused with 400,
/// as axum's `Path` refuses it, before anything runs; without a key the
/// request has no fingerprint and runs as it came.
#[tokio::test]
async fn a_path_parameter_that_is_not_utf8_is_refused_with_400() {
    let app = Router::new()
        .route("/orgs/{org}/pay", post(pay_for_org))
        .route("/plain/{org}/pay", post(pay_for_org_plain))
        .route("/optional/{org}/pay", post(pay_for_org_optional))
        .layer(Idempotency::new(MemoryStore::new()));
    let body = r#"{"item":"book","quantity":1}"#;
    for route in ["orgs", "plain", "optional"] {
        for org in ["%FF", "%FE"] {
            let path = format!("/{route}/{org}/pay");
            let (status, replayed, problem) = send(&app, post_json(&path, Some(route), body)).await;
            assert_eq!(
                (status, replayed),
                (StatusCode::BAD_REQUEST, false),
                "{path}: {problem}"
            );
            assert!(problem.contains("invalid-path-parameter"), "{problem}");
        }
        let path = format!("/{route}/acme/pay");
        let (status, replayed, _) = send(&app, post_json(&path, Some(route), body)).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false), "{path}");
    }
    let keyless = send(&app, post_json("/optional/%FF/pay", None, body)).await;
    assert_eq!(keyless.0, StatusCode::CREATED);
}
