//! `IdempotentLayer`: the engine as tower middleware over raw requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Extension, Router};
use http_body_util::BodyExt;
use idempotent_core::store::MemoryStore;
use idempotent_core::{Endpoint, Idempotency, IdempotentLayer, Scope};
use serde_json::Value;
use tower::ServiceExt;

async fn create_order(
    Extension(runs): Extension<Arc<AtomicUsize>>,
    body: String,
) -> (StatusCode, String) {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("order {run}: {body}"))
}

fn app(runs: &Arc<AtomicUsize>, layer: IdempotentLayer) -> Router {
    Router::new()
        .route("/orders", post(create_order).route_layer(layer))
        .route("/plain", post(create_order))
        .layer(Extension(runs.clone()))
        .layer(Idempotency::new(MemoryStore::new()))
}

fn order(uri: &str, key: &str, body: &'static str) -> Request<Body> {
    Request::post(uri)
        .header("x-api-key", "caller")
        .header("idempotency-key", key)
        .body(Body::from(body))
        .unwrap()
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, http::HeaderMap, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// An order under the key `k` whose body comes as `chunks`, without a
/// `Content-Length`.
fn streamed_order<const N: usize>(
    chunks: [Result<bytes::Bytes, std::io::Error>; N],
) -> Request<Body> {
    Request::post("/orders")
        .header("x-api-key", "c")
        .header("idempotency-key", "k")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap()
}

/// An order without an `Idempotency-Key`.
fn keyless(body: &'static str) -> Request<Body> {
    Request::post("/orders")
        .header("x-api-key", "c")
        .body(Body::from(body))
        .unwrap()
}

fn layer() -> IdempotentLayer {
    IdempotentLayer::new(Endpoint::new("create_order"))
}

#[tokio::test]
async fn the_layer_runs_once_and_replays() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(&runs, layer());
    let (status, _, first) = send(&app, order("/orders", "k", r#"{"sku":"a"}"#)).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, headers, again) = send(&app, order("/orders", "k", r#"{"sku":"a"}"#)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(again, first);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn raw_fingerprints_see_every_byte_and_the_query() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(&runs, layer());
    send(&app, order("/orders", "k", r#"{"sku":"a"}"#)).await;
    let (status, _, problem) = send(&app, order("/orders", "k", r#"{ "sku":"a"}"#)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = serde_json::from_str(&problem).unwrap();
    assert_eq!(problem["type"], "urn:idempotent:key-reused");
    let (status, _, _) = send(&app, order("/orders?x=1", "k", r#"{"sku":"a"}"#)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn routes_without_the_layer_are_untouched() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(&runs, layer());
    for _ in 0..2 {
        let (status, headers, _) = send(&app, order("/plain", "k", "{}")).await;
        assert_eq!(status, StatusCode::CREATED);
        assert!(headers.get("idempotent-replayed").is_none());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_and_not_run() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(&runs, layer().max_request_bytes(4));
    let (status, headers, problem) = send(&app, order("/orders", "k", "0123456789")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(problem.contains("urn:idempotent:request-too-large"));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// A request body that announces its length and notes whether it was read.
struct Announced {
    len: usize,
    read: Arc<std::sync::atomic::AtomicBool>,
}

impl Announced {
    /// A body of ten bytes, and whether it was read.
    fn ten_bytes() -> (Body, Arc<std::sync::atomic::AtomicBool>) {
        let read = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let body = Body::new(Self {
            len: 10,
            read: read.clone(),
        });
        (body, read)
    }
}

impl http_body::Body for Announced {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.read.store(true, Ordering::SeqCst);
        let len = std::mem::take(&mut self.len);
        std::task::Poll::Ready(
            (len > 0).then(|| Ok(http_body::Frame::data(vec![b'x'; len].into()))),
        )
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len as u64)
    }
}

#[tokio::test]
async fn a_body_announced_over_the_limit_is_413_before_it_is_read() {
    // With `Expect: 100-continue`, reading the body is what asks the
    // client to send it: a `Content-Length` over the limit is refused
    // without inviting the upload.
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(&runs, layer().max_request_bytes(4));
    let (body, read) = Announced::ten_bytes();
    let request = Request::post("/orders")
        .header("x-api-key", "caller")
        .header("idempotency-key", "k")
        .header("expect", "100-continue")
        .header("content-length", "10")
        .body(body)
        .unwrap();
    let (status, _, problem) = send(&app, request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        problem.contains("urn:idempotent:request-too-large"),
        "{problem}"
    );
    assert!(
        !read.load(Ordering::SeqCst),
        "the body was read before the 413"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_layer_reports_a_missing_credential_before_reading_the_body() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(&runs, layer());
    let (body, read) = Announced::ten_bytes();
    let request = Request::post("/orders")
        .header("idempotency-key", "k")
        .header("expect", "100-continue")
        .body(body)
        .unwrap();
    let (status, headers, problem) = send(&app, request).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert!(
        problem.contains("urn:idempotent:missing-credentials"),
        "{problem}"
    );
    assert!(
        !read.load(Ordering::SeqCst),
        "the body was read before the 401"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_layer_reports_a_missing_key_before_reading_the_body() {
    let runs = Arc::new(AtomicUsize::new(0));
    // The body is over the limit: a missing key is what the client must fix.
    let app = app(&runs, layer().max_request_bytes(4));
    let (status, _, problem) = send(&app, keyless("0123456789")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(problem.contains("urn:idempotent:missing-key"), "{problem}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// A `GET` with key `k` to the `POST`-only `/orders` of `app` gets 405;
/// the `POST` that follows with `k` runs.
async fn assert_another_method_leaves_the_key(app: &Router, runs: &AtomicUsize) {
    let wrong_method = Request::get("/orders")
        .header("x-api-key", "caller")
        .header("idempotency-key", "k")
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        send(app, wrong_method).await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    let (status, headers, body) = send(app, order("/orders", "k", r#"{"sku":"a"}"#)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(!headers.contains_key("idempotent-replayed"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_request_with_another_method_does_not_use_up_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(&runs, layer());
    assert_another_method_leaves_the_key(&app, &runs).await;
}

#[tokio::test]
async fn a_router_wide_route_layer_does_not_use_up_the_key_on_another_method() {
    // `Router::route_layer` wraps each method router whole, its 405 for
    // the other methods included.
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/orders", post(create_order))
        .route_layer(layer())
        .layer(Extension(runs.clone()))
        .layer(Idempotency::new(MemoryStore::new()));
    assert_another_method_leaves_the_key(&app, &runs).await;
}

#[tokio::test]
async fn an_optional_route_runs_a_keyless_request_as_it_came() {
    let runs = Arc::new(AtomicUsize::new(0));
    let optional = IdempotentLayer::new(Endpoint::new("create_order").optional(true));
    let app = app(&runs, optional.max_request_bytes(4));
    let request = keyless("0123456789");
    let (status, _, body) = send(&app, request).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::CREATED, "order 1: 0123456789")
    );
}

#[tokio::test]
async fn a_body_cut_short_is_400_and_not_run() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(&runs, layer());
    let chunks = [
        Ok(bytes::Bytes::from_static(b"{\"sku\"")),
        Err(std::io::Error::other("connection reset")),
    ];
    let request = streamed_order(chunks);
    let (status, _, problem) = send(&app, request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        problem.contains("urn:idempotent:unreadable-body"),
        "{problem}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

async fn create_from_json(
    Extension(runs): Extension<Arc<AtomicUsize>>,
    axum::Json(order): axum::Json<Value>,
) -> (StatusCode, String) {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("order {run}: {order}"))
}

#[tokio::test]
async fn a_retry_that_adds_the_missing_content_type_runs_the_handler() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/orders", post(create_from_json).route_layer(layer()))
        .layer(Extension(runs.clone()))
        .layer(Idempotency::new(MemoryStore::new()));
    let (status, _, _) = send(&app, order("/orders", "k", r#"{"sku":"a"}"#)).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let mut fixed = order("/orders", "k", r#"{"sku":"a"}"#);
    fixed
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    let (status, headers, body) = send(&app, fixed).await;
    assert_eq!(
        (status, headers.contains_key("idempotent-replayed")),
        (StatusCode::CREATED, false),
        "{body}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_custom_scope_on_the_layer_is_refused_with_what_to_use_instead() {
    let runs = Arc::new(AtomicUsize::new(0));
    let endpoint = Endpoint::new("create_order").scope(Scope::Custom);
    let app = app(&runs, IdempotentLayer::new(endpoint));
    let (status, _, body) = send(&app, order("/orders", "k", "{}")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        body.contains("`IdempotentLayer` cannot resolve a custom scope"),
        "{body}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// The same handler as `create_order`, made idempotent by the attribute
/// (feature `macros`).
#[cfg(feature = "macros")]
#[idempotent_core::idempotent(scope = "global")]
async fn create_order_by_attribute(
    Extension(runs): Extension<Arc<AtomicUsize>>,
    body: String,
) -> (StatusCode, String) {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("order {run}: {body}"))
}

#[cfg(feature = "macros")]
#[tokio::test]
async fn a_layer_over_an_idempotent_handler_is_refused_without_burning_the_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let idempotency = Idempotency::new(MemoryStore::new());
    let legacy =
        IdempotentLayer::new(Endpoint::new("legacy").scope(idempotent_core::Scope::Global));
    let both = Router::new()
        .route(
            "/orders",
            post(create_order_by_attribute).route_layer(legacy),
        )
        .layer(Extension(runs.clone()))
        .layer(idempotency.clone());
    for _ in 0..2 {
        let (status, _, body) = send(&both, order("/orders", "k1", "{}")).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        let problem: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(problem["type"], "urn:idempotent:not-configured");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains("`legacy`"), "{detail}");
        assert!(detail.contains("create_order_by_attribute`"), "{detail}");
        assert!(
            detail.contains("either the layer or `#[idempotent]`"),
            "{detail}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    // Once the route keeps only the attribute, the key is still free.
    let fixed = Router::new()
        .route("/orders", post(create_order_by_attribute))
        .layer(Extension(runs.clone()))
        .layer(idempotency);
    let (status, headers, _) = send(&fixed, order("/orders", "k1", "{}")).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!headers.contains_key("idempotent-replayed"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_idempotency_layer_inside_the_idempotent_layer_is_refused_saying_where_it_goes() {
    let runs = Arc::new(AtomicUsize::new(0));
    // `route_layer` wraps what is already there: the `Idempotency` layer
    // ends up inside the `IdempotentLayer`, which runs without it.
    let inside = Router::new()
        .route(
            "/orders",
            post(create_order)
                .route_layer(Idempotency::new(MemoryStore::new()))
                .route_layer(layer()),
        )
        .layer(Extension(runs.clone()));
    let (status, _, body) = send(&inside, order("/orders", "k1", "{}")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["type"], "urn:idempotent:not-configured");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains(
            "the `Idempotency` layer outside the `IdempotentLayer`: added to the Router after the route, not with `route_layer` inside it"
        ),
        "{detail}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// Creates an order for the tenant its path names.
async fn create_for_tenant(
    axum::extract::Path(tenant): axum::extract::Path<String>,
    Extension(runs): Extension<Arc<AtomicUsize>>,
    body: String,
) -> (StatusCode, String) {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        format!("order {run} for tenant {tenant}: {body}"),
    )
}

#[tokio::test]
async fn requests_that_differ_in_a_nested_routers_path_parameter_are_different_requests() {
    // One orders router, nested per tenant: axum strips the prefix from
    // the URI the route layer sees, but the handler reads the tenant.
    let runs = Arc::new(AtomicUsize::new(0));
    let orders = Router::new().route("/orders", post(create_for_tenant).route_layer(layer()));
    let app = Router::new()
        .nest("/tenants/{tenant}", orders)
        .layer(Extension(runs.clone()))
        .layer(Idempotency::new(MemoryStore::new()));

    let (status, _, first) = send(&app, order("/tenants/1/orders", "k", "{}")).await;
    assert_eq!(
        (status, first.as_str()),
        (StatusCode::CREATED, "order 1 for tenant 1: {}")
    );

    // The same key and body for another tenant: another request.
    let (status, headers, second) = send(&app, order("/tenants/2/orders", "k", "{}")).await;
    assert!(
        !headers.contains_key("idempotent-replayed"),
        "tenant 2's request was answered with tenant 1's order: {status} {second:?}"
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{second}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A chunked body under a 64-byte limit set in front of the layer, as
/// `tower_http::limit::RequestBodyLimitLayer` sets it on a body without a
/// `Content-Length`.
fn over_an_outer_limit(key: &str) -> Request<Body> {
    let chunks = [Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 200]))];
    let body = Body::from_stream(futures_util::stream::iter(chunks));
    Request::post("/orders")
        .header("x-api-key", "c")
        .header("idempotency-key", key)
        .body(Body::new(http_body_util::Limited::new(body, 64)))
        .unwrap()
}

#[tokio::test]
async fn a_body_over_a_limit_in_front_of_the_layer_is_413_naming_that_limit() {
    let runs = Arc::new(AtomicUsize::new(0));
    let (status, headers, problem) = send(&app(&runs, layer()), over_an_outer_limit("k")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(headers["content-type"], "application/problem+json");
    let problem: Value = serde_json::from_str(&problem).unwrap();
    assert_eq!(problem["type"], "urn:idempotent:request-too-large");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("a body size limit in front of this route") && !detail.contains("1048576"),
        "the detail blames the layer's own 1 MiB for a 200-byte body: {detail}"
    );
    // The layer's own limit is still named as such.
    let limited = app(&runs, layer().max_request_bytes(4));
    let chunks = [Ok::<_, std::io::Error>(bytes::Bytes::from_static(
        b"0123456789",
    ))];
    let request = streamed_order(chunks);
    let (status, _, problem) = send(&limited, request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        problem.contains("larger than the 4 bytes this idempotent route buffers"),
        "{problem}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

async fn list_orders() -> &'static str {
    "orders"
}

#[tokio::test]
async fn safe_methods_without_a_key_pass_a_router_wide_layer() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/orders", post(create_order).get(list_orders))
        .route("/payments", post(create_order))
        .route_layer(layer())
        .layer(Extension(runs.clone()))
        .layer(Idempotency::new(MemoryStore::new()));
    let keyless = |method: &str, uri: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("x-api-key", "c")
            .body(Body::empty())
            .unwrap()
    };
    let (status, _, body) = send(&app, keyless("GET", "/orders")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "orders"));
    let (status, _, _) = send(&app, keyless("HEAD", "/orders")).await;
    assert_eq!(status, StatusCode::OK);
    // axum's own answer to a method the route does not take.
    let (status, _, body) = send(&app, keyless("OPTIONS", "/payments")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    let (status, _, body) = send(&app, keyless("GET", "/payments")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    // Methods with side effects still need a key.
    for method in ["POST", "DELETE"] {
        let (status, _, problem) = send(&app, keyless(method, "/payments")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method}");
        assert!(
            problem.contains("urn:idempotent:missing-key"),
            "{method}: {problem}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_body_json_rejects_is_the_handlers_answer_and_is_stored() {
    // Documented: the layer claims the key before the extractors run.
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/orders", post(create_from_json).route_layer(layer()))
        .layer(Extension(runs.clone()))
        .layer(Idempotency::new(MemoryStore::new()));
    let json = |body: &'static str| {
        let mut request = order("/orders", "k", body);
        request
            .headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        request
    };
    let (status, _, _) = send(&app, json(r#"{"sku":"#)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, headers, _) = send(&app, json(r#"{"sku":"#)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["idempotent-replayed"], "true");
    let (status, _, problem) = send(&app, json(r#"{"sku":"a"}"#)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(problem.contains("urn:idempotent:key-reused"), "{problem}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// Inside a nested router the layer sees the path without the prefix
/// (`/pay`), and binds the prefix's parameters to the fingerprint; one
/// that is not UTF-8 once decoded cannot be, and `/orgs/%FE/pay` would
/// replay `/orgs/%FF/pay`'s response. Refused with 400, as axum's `Path`
/// refuses it; without a key the request passes as it came.
#[tokio::test]
async fn a_prefix_parameter_that_is_not_utf8_is_refused_with_400() {
    let runs = Arc::new(AtomicUsize::new(0));
    let orders = Router::new().route("/pay", post(create_order).route_layer(layer()));
    let app = Router::new()
        .nest("/orgs/{org}", orders)
        .layer(Extension(runs.clone()))
        .layer(Idempotency::new(MemoryStore::new()));
    for path in ["/orgs/%FF/pay", "/orgs/%FE/pay"] {
        let (status, _, problem) = send(&app, order(path, "k", r#"{"sku":"a"}"#)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {problem}");
        let problem: Value = serde_json::from_str(&problem).unwrap();
        assert_eq!(problem["type"], "urn:idempotent:invalid-path-parameter");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let (status, _, _) = send(&app, order("/orgs/acme/pay", "k", r#"{"sku":"a"}"#)).await;
    assert_eq!(status, StatusCode::CREATED);
}

// ===== over HTTP/1.1 =====

/// Serves `app` on a free loopback port.
async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Writes `head`, then, if it asked for `100 Continue`, waits for an
/// answer before sending `body`; returns what the server sent, with
/// `<body>` marking where the body went out, until it closes the
/// connection or goes quiet.
async fn exchange(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = [0; 4096];
    let quiet = std::time::Duration::from_millis(300);
    if head.contains("expect: 100-continue")
        && let Ok(Ok(n)) = tokio::time::timeout(quiet, stream.read(&mut buffer)).await
    {
        received.extend_from_slice(&buffer[..n]);
    }
    received.extend_from_slice(b"<body>");
    // The server may have closed the connection already.
    let _ = stream.write_all(body).await;
    while let Ok(Ok(n @ 1..)) = tokio::time::timeout(quiet, stream.read(&mut buffer)).await {
        received.extend_from_slice(&buffer[..n]);
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// An order to `/orders` whose body announces its length and asks to be
/// invited before it is sent.
fn expecting(key: &str, len: usize) -> String {
    format!(
        "POST /orders HTTP/1.1\r\nhost: t\r\nx-api-key: caller\r\nidempotency-key: {key}\r\nexpect: 100-continue\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
    )
}

/// A chunked order to `/orders`; `extra` adds header lines.
fn chunked(key: &str, extra: &str) -> String {
    format!(
        "POST /orders HTTP/1.1\r\nhost: t\r\nx-api-key: caller\r\nidempotency-key: {key}\r\n{extra}transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
}

/// `body` as chunks of at most 3 bytes, and the last chunk.
fn in_chunks(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in body.chunks(3) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_a_body_at_the_limit_is_invited_and_one_byte_over_is_not() {
    let runs = Arc::new(AtomicUsize::new(0));
    let addr = serve(app(&runs, layer().max_request_bytes(10))).await;
    let at_limit = exchange(addr, &expecting("k1", 10), b"0123456789").await;
    assert!(
        at_limit.starts_with("HTTP/1.1 100 Continue\r\n\r\n<body>HTTP/1.1 201 Created\r\n")
            && at_limit.ends_with("order 1: 0123456789"),
        "{at_limit}"
    );
    let over = exchange(addr, &expecting("k2", 11), b"0123456789a").await;
    // Answered before the client was asked for the body.
    assert!(
        over.starts_with("HTTP/1.1 413 Payload Too Large\r\n")
            && over.contains("urn:idempotent:request-too-large")
            && !over.contains("100 Continue"),
        "{over}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_a_chunked_body_at_the_limit_runs_and_one_byte_over_is_413() {
    let runs = Arc::new(AtomicUsize::new(0));
    let addr = serve(app(&runs, layer().max_request_bytes(10))).await;
    let at_limit = exchange(addr, &chunked("k1", ""), &in_chunks(b"0123456789")).await;
    assert!(
        at_limit.starts_with("<body>HTTP/1.1 201 Created\r\n")
            && at_limit.ends_with("order 1: 0123456789"),
        "{at_limit}"
    );
    let over = exchange(addr, &chunked("k2", ""), &in_chunks(b"0123456789a")).await;
    assert!(
        over.starts_with("<body>HTTP/1.1 413 Payload Too Large\r\n"),
        "{over}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A `Content-Length` beside `Transfer-Encoding: chunked` is ignored, as
/// HTTP/1.1 says: the chunked body is the request, whole, and a retry that
/// sends it with no `Content-Length` is the same request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_a_content_length_beside_chunked_does_not_cut_the_body() {
    let runs = Arc::new(AtomicUsize::new(0));
    let addr = serve(app(&runs, layer())).await;
    let body = in_chunks(br#"{"sku":"a"}"#);
    let both = exchange(addr, &chunked("k", "content-length: 3\r\n"), &body).await;
    assert!(
        both.starts_with("<body>HTTP/1.1 201 Created\r\n")
            && both.ends_with(r#"order 1: {"sku":"a"}"#),
        "{both}"
    );
    let retry = exchange(addr, &chunked("k", ""), &body).await;
    assert!(
        retry.contains("idempotent-replayed: true\r\n")
            && retry.ends_with(r#"order 1: {"sku":"a"}"#),
        "{retry}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A report of 3,000 bytes in three chunks.
async fn report(Extension(runs): Extension<Arc<AtomicUsize>>) -> Body {
    runs.fetch_add(1, Ordering::SeqCst);
    let chunks =
        ["a", "b", "c"].map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from(c.repeat(1000))));
    Body::from_stream(futures_util::stream::iter(chunks))
}

/// A `GET` with a key is claimed, stored and replayed like any request;
/// a `HEAD` with one is answered with the length of the `GET`'s body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_a_keyed_get_and_head_replay_with_the_bodys_length() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/report", axum::routing::get(report).route_layer(layer()))
        .layer(Extension(runs.clone()))
        .layer(Idempotency::new(MemoryStore::new()));
    let addr = serve(app).await;
    let head = |method: &str, key: &str| {
        format!(
            "{method} /report HTTP/1.1\r\nhost: t\r\nx-api-key: caller\r\nidempotency-key: {key}\r\nconnection: close\r\n\r\n"
        )
    };
    for (method, key) in [("GET", "g"), ("GET", "g"), ("HEAD", "h"), ("HEAD", "h")] {
        let reply = exchange(addr, &head(method, key), b"").await;
        assert!(
            reply.starts_with("<body>HTTP/1.1 200 OK\r\n")
                && reply.contains("content-length: 3000\r\n"),
            "{method} {key}: {reply}"
        );
        let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
        let expected = if method == "GET" { 3000 } else { 0 };
        assert_eq!(body.len(), expected, "{method} {key}: {reply}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A `GET` or `HEAD` of `/report` under `key`.
fn report_request(method: &str, key: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri("/report")
        .header("x-api-key", "caller")
        .header("idempotency-key", key)
        .body(Body::empty())
        .unwrap()
}

/// `IdempotentLayer` around a whole `Router`, as a service rather than
/// with `Router::layer`, sees a `HEAD`'s answer after axum took its body
/// off, and must send its own answers to a `HEAD` bodiless too: a replay
/// carrying the `GET`'s body, or a problem its JSON, reaches an HTTP/2
/// client as DATA frames on a `HEAD` stream, which it refuses as a
/// protocol error (hyper drops them over HTTP/1.1 only).
#[tokio::test]
async fn around_a_whole_router_a_head_gets_no_body_replayed_or_refused() {
    use tower::Layer as _;

    let runs = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .route("/report", axum::routing::get(report))
        .layer(Extension(runs.clone()));
    let app = Idempotency::new(MemoryStore::new()).layer(layer().layer(router));
    let send = |method: &str, key: &str| app.clone().oneshot(report_request(method, key));
    let first = send("GET", "k").await.unwrap().into_body();
    assert_eq!(first.collect().await.unwrap().to_bytes().len(), 3000);

    let (replay, body) = send("HEAD", "k").await.unwrap().into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert!(
        body.is_empty(),
        "the replayed HEAD got a body of {} bytes",
        body.len()
    );
    // The length of the GET's body, as axum announces it for a HEAD.
    assert_eq!(replay.headers["content-length"], "3000");

    // A key with an unterminated quote: refused by the layer itself.
    let (refused, body) = send("HEAD", "\"k").await.unwrap().into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(body.is_empty(), "the refused HEAD got a body: {body:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A `HEAD` whose answer streams a body of unknown length (no key, so
/// nothing is stored), through the layer on the route or around the
/// whole `Router`: axum takes the body off and announces no length, and
/// the layer must not announce one either, as `0`, which would tell the
/// client the `GET`'s representation is empty.
#[tokio::test]
async fn a_head_streaming_a_body_of_unknown_length_announces_none() {
    use tower::Layer as _;

    let runs = Arc::new(AtomicUsize::new(0));
    let routes = || {
        Router::new()
            .route("/report", axum::routing::get(report))
            .layer(Extension(runs.clone()))
    };
    let on_the_route = Router::new()
        .route("/report", axum::routing::get(report).route_layer(layer()))
        .layer(Extension(runs.clone()))
        .layer(Idempotency::new(MemoryStore::new()));
    let around = Idempotency::new(MemoryStore::new()).layer(layer().layer(routes()));
    let unkeyed = || {
        Request::builder()
            .method("HEAD")
            .uri("/report")
            .body(Body::empty())
            .unwrap()
    };
    let on_the_route = on_the_route.oneshot(unkeyed()).await.unwrap();
    let around = around.oneshot(unkeyed()).await.unwrap();
    for (placement, response) in [("on the route", on_the_route), ("around", around)] {
        assert_eq!(response.status(), StatusCode::OK, "{placement}");
        let length = response.headers().get("content-length");
        assert_eq!(length, None, "{placement}: a length the GET does not have");
    }
}

/// Headers given to one request, in order (a name may come twice).
type Headers = &'static [(&'static str, &'static str)];

/// The answer to a retry of `{"sku":"a"}` under the first request's key,
/// sent first with `first`'s headers and then with `retry`'s: its status,
/// whether it was a replay, its body, and how often the handler ran.
async fn retried_with(first: Headers, retry: Headers) -> (StatusCode, bool, String, usize) {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = app(&runs, layer());
    let with = |headers: Headers| {
        let mut request = order("/orders", "k", r#"{"sku":"a"}"#);
        for &(name, value) in headers {
            let value = http::HeaderValue::from_static(value);
            request.headers_mut().append(name, value);
        }
        request
    };
    let (status, _, _) = send(&app, with(first)).await;
    assert_eq!(status, StatusCode::CREATED, "{first:?}");
    let (status, headers, body) = send(&app, with(retry)).await;
    let replayed = headers.contains_key("idempotent-replayed");
    (status, replayed, body, runs.load(Ordering::SeqCst))
}

async fn assert_refused(first: Headers, retry: Headers) {
    let (status, replayed, body, runs) = retried_with(first, retry).await;
    assert_eq!(
        (status, replayed, runs),
        (StatusCode::UNPROCESSABLE_ENTITY, false, 1),
        "{first:?} then {retry:?}: {body}"
    );
    assert!(body.contains("urn:idempotent:key-reused"), "{body}");
}

async fn assert_replayed(first: Headers, retry: Headers) {
    let (status, replayed, body, runs) = retried_with(first, retry).await;
    assert_eq!(
        (status, replayed, runs),
        (StatusCode::CREATED, true, 1),
        "{first:?} then {retry:?}: {body}"
    );
}

#[tokio::test]
async fn the_same_bytes_as_another_media_type_are_another_request() {
    let json: Headers = &[("content-type", "application/json")];
    assert_refused(
        json,
        &[("content-type", "application/x-www-form-urlencoded")],
    )
    .await;
    assert_refused(json, &[("content-type", "text/plain")]).await;
    // A handler that reads the body whatever its type still may not.
    assert_refused(&[], json).await;
    assert_refused(json, &[]).await;
}

#[tokio::test]
async fn another_charset_or_parameter_value_is_another_request() {
    let utf8: Headers = &[("content-type", "text/plain; charset=utf-8")];
    assert_refused(utf8, &[("content-type", "text/plain; charset=iso-8859-1")]).await;
    assert_refused(utf8, &[("content-type", "text/plain")]).await;
    assert_refused(
        &[("content-type", "multipart/form-data; boundary=x")],
        &[("content-type", "multipart/form-data; boundary=X")],
    )
    .await;
}

#[tokio::test]
async fn another_content_coding_is_another_request() {
    let gzip: Headers = &[("content-encoding", "gzip")];
    assert_refused(&[], gzip).await;
    assert_refused(gzip, &[("content-encoding", "deflate")]).await;
    assert_refused(
        &[("content-encoding", "gzip, br")],
        &[("content-encoding", "br, gzip")],
    )
    .await;
}

#[tokio::test]
async fn a_retry_with_the_first_attempts_headers_replays() {
    let sent: [Headers; 3] = [
        &[("content-type", "text/plain; charset=utf-8")],
        &[("content-type", "multipart/form-data; boundary=x")],
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
            ("content-encoding", "br"),
        ],
    ];
    for headers in sent {
        assert_replayed(headers, headers).await;
    }
}
