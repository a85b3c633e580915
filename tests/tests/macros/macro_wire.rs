//! What an `#[idempotent]` handler puts on the wire: the library's error
//! responses, what a replay carries, requests its extractors reject, and
//! the handler behind common tower-http layers.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use idempotent_core::store::MemoryStore;
use idempotent_core::testing::{MockStore, OpKind};
use idempotent_core::{Endpoint, Idempotency, IdempotentRequest, Scope, idempotent};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower::ServiceExt;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{Any, CorsLayer};
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

impl Runs {
    fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Serialize, Deserialize)]
struct Charge {
    amount: u64,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn replayed(&self) -> bool {
        self.headers.contains_key("idempotent-replayed")
    }
    /// Asserts that this is the library's problem of `kind`, with `status`,
    /// and returns its detail.
    fn problem(&self, status: StatusCode, kind: &str) -> String {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(
            self.headers["content-type"],
            "application/problem+json",
            "{}",
            self.text()
        );
        let problem: Value = serde_json::from_slice(&self.body).expect("a JSON problem");
        assert_eq!(
            problem["type"],
            format!("urn:idempotent:{kind}"),
            "{problem}"
        );
        assert_eq!(problem["status"], status.as_u16(), "{problem}");
        assert!(
            problem["title"]
                .as_str()
                .is_some_and(|title| !title.is_empty())
        );
        problem["detail"].as_str().expect("a detail").to_owned()
    }
}

async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn post_json(uri: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut builder = Request::post(uri).header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body.to_owned())).unwrap()
}

#[idempotent(scope = "global")]
async fn charge(State(runs): State<Runs>, Json(c): Json<Charge>) -> (StatusCode, Json<Value>) {
    let run = runs.bump();
    let pad = "x".repeat(64);
    (
        StatusCode::CREATED,
        Json(json!({"run": run, "amount": c.amount, "pad": pad})),
    )
}

/// `/charges` on `store`; tests add their layers around it.
fn charges(runs: &Runs, store: &MockStore) -> Router {
    Router::new()
        .route("/charges", post(charge))
        .with_state(runs.clone())
        .layer(store.layer())
}

// ===== errors =====

/// A charge of 1 under `key`, sent byte for byte (non-ASCII included).
fn keyed(key: &str) -> Request<Body> {
    let mut request = post_json("/charges", None, r#"{"amount":1}"#);
    let key = axum::http::HeaderValue::from_bytes(key.as_bytes()).unwrap();
    request.headers_mut().insert("idempotency-key", key);
    request
}

/// `key` as an RFC 8941 string: quoted, `"` and `\\` escaped.
fn quoted(key: &str) -> String {
    format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A key with a space, a `"` or a comma is valid, only not in the bare
/// form. The 400 says so and shows the quoted form, instead of calling
/// the key's characters wrong (a space and `"` are printable ASCII, and a
/// single field with a comma is not two keys); the key quoted as it says
/// is accepted, runs once and is replayed.
#[tokio::test]
async fn a_key_only_the_quoted_form_carries_is_refused_with_the_form_to_send_instead() {
    for (bare, byte) in [
        ("order 42", "0x20"),
        (r#"say"hi""#, "0x22"),
        (r"a\b c", "0x20"),
        ("order,42", "comma"),
    ] {
        let runs = Runs::default();
        let app = charges(&runs, &MockStore::new());
        let detail = send(&app, keyed(bare))
            .await
            .problem(StatusCode::BAD_REQUEST, "invalid-key");
        assert!(detail.contains(byte), "{bare:?}: {detail}");
        assert!(
            detail.contains("quoted") && detail.contains("`Idempotency-Key: \""),
            "{bare:?}: {detail}"
        );
        assert!(!detail.contains("keys are printable ASCII"), "{detail}");
        let first = send(&app, keyed(&quoted(bare))).await;
        assert_eq!(first.status, StatusCode::CREATED, "{bare:?}");
        let retry = send(&app, keyed(&quoted(bare))).await;
        assert!(retry.replayed(), "{bare:?}");
        assert_eq!(runs.get(), 1, "{bare:?}");
    }
}

/// A byte no form of the key carries is named as such.
#[tokio::test]
async fn a_key_outside_printable_ascii_is_refused_as_such() {
    let runs = Runs::default();
    let app = charges(&runs, &MockStore::new());
    for key in ["cl\u{e9}", "\"cl\u{e9}\""] {
        let detail = send(&app, keyed(key))
            .await
            .problem(StatusCode::BAD_REQUEST, "invalid-key");
        assert!(
            detail.contains("0xc3") && detail.contains("printable ASCII"),
            "{key:?}: {detail}"
        );
        assert!(!detail.contains("quoted"), "{key:?}: {detail}");
    }
    assert_eq!(runs.get(), 0);
}

#[tokio::test]
async fn a_key_sent_under_another_name_is_named_in_the_missing_key_problem() {
    let runs = Runs::default();
    let app = charges(&runs, &MockStore::new());
    for name in ["X-Idempotency-Key", "idempotency_key", "X-Idempotent-Key"] {
        let mut request = post_json("/charges", None, r#"{"amount":1}"#);
        request.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            "k1".parse().unwrap(),
        );
        let detail = send(&app, request)
            .await
            .problem(StatusCode::BAD_REQUEST, "missing-key");
        let lower = name.to_ascii_lowercase();
        assert!(
            detail.contains(&format!("but has `{lower}`")) && detail.contains("`Idempotency-Key`"),
            "{name}: {detail}"
        );
    }
    assert_eq!(runs.get(), 0);
}

/// A router whose `/units` handler takes `IdempotentRequest` and runs the
/// engine itself on `endpoint`, as `#[idempotent]` does.
fn hand_written(endpoint: &'static Endpoint) -> Router {
    let units = move |idempotency: IdempotentRequest, Json(units): Json<u64>| async move {
        let fingerprint = endpoint.fingerprint(&units);
        let run = async move { units.to_string() };
        idempotency.run(endpoint, fingerprint, run).await
    };
    Router::new()
        .route("/units", post(units))
        .layer(Idempotency::new(MemoryStore::new()))
}

/// The same for a handler that takes `IdempotentRequest` and runs the
/// engine itself: it answered the plain "no Idempotency-Key header".
#[tokio::test]
async fn a_hand_written_handler_names_a_key_sent_under_another_name() {
    const RESTOCK: Endpoint = Endpoint::new("macro_wire::restock");
    let app = hand_written(&RESTOCK);
    let mut request = post_json("/units", None, "1");
    request
        .headers_mut()
        .insert("x-idempotency-key", "k1".parse().unwrap());
    let detail = send(&app, request)
        .await
        .problem(StatusCode::BAD_REQUEST, "missing-key");
    assert!(detail.contains("but has `x-idempotency-key`"), "{detail}");
}

/// `Scope::Header` written by hand with a name no header can have: every
/// keyed request was answered 400 "the request has none", which no client
/// can fix. It is the server's setup, answered 500 with what to change.
#[tokio::test]
async fn a_hand_written_scope_header_no_header_can_match_is_a_setup_error() {
    const TENANTED: Endpoint =
        Endpoint::new("macro_wire::tenanted").scope(Scope::Header("x tenant"));
    let app = hand_written(&TENANTED);
    let mut request = post_json("/units", Some("k1"), "1");
    request
        .headers_mut()
        .insert("x-tenant", "acme".parse().unwrap());
    let detail = send(&app, request)
        .await
        .problem(StatusCode::INTERNAL_SERVER_ERROR, "not-configured");
    assert!(
        detail.contains("`x tenant`") && detail.contains("not a valid header name"),
        "{detail}"
    );
}

#[tokio::test]
async fn every_error_of_the_library_is_a_problem_that_says_what_to_fix() {
    let runs = Runs::default();
    let store = MockStore::new();
    let app = charges(&runs, &store);
    let body = r#"{"amount":1}"#;
    let detail = send(&app, post_json("/charges", None, body))
        .await
        .problem(StatusCode::BAD_REQUEST, "missing-key");
    assert!(detail.contains("send one unique key"), "{detail}");
    let long = "a".repeat(256);
    for (key, says) in [
        ("", "is empty"),
        (long.as_str(), "256 characters; at most 255"),
        ("a b", "0x20, at offset 1"),
        ("\"a", "closing quote is missing"),
        ("a, b", "send exactly one key"),
    ] {
        let detail = send(&app, post_json("/charges", Some(key), body))
            .await
            .problem(StatusCode::BAD_REQUEST, "invalid-key");
        assert!(detail.contains(says), "{key:?}: {detail}");
    }
    assert_eq!(runs.get(), 0);

    assert_eq!(
        send(&app, post_json("/charges", Some("k"), body))
            .await
            .status,
        StatusCode::CREATED
    );
    let reused = send(&app, post_json("/charges", Some("k"), r#"{"amount":2}"#)).await;
    let detail = reused.problem(StatusCode::UNPROCESSABLE_ENTITY, "key-reused");
    assert!(
        detail.contains("send a new key for a new request"),
        "{detail}"
    );

    store.fail_next(OpKind::Claim);
    let down = send(&app, post_json("/charges", Some("k2"), body)).await;
    let detail = down.problem(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable");
    assert!(detail.contains("retry with the same key"), "{detail}");
    assert_eq!(down.headers["retry-after"], "1");
    assert_eq!(runs.get(), 1);
}

// ===== requests the handler's extractors reject =====

#[tokio::test]
async fn a_request_its_extractors_reject_does_not_use_up_the_key() {
    let runs = Runs::default();
    let store = MockStore::new();
    let app = charges(&runs, &store);
    let malformed = send(&app, post_json("/charges", Some("k"), r#"{"amount":"#)).await;
    assert_eq!(
        malformed.status,
        StatusCode::BAD_REQUEST,
        "{}",
        malformed.text()
    );
    let wrong_shape = send(&app, post_json("/charges", Some("k"), r#"{"amount":-1}"#)).await;
    assert_eq!(wrong_shape.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        !wrong_shape.text().contains("urn:idempotent"),
        "{}",
        wrong_shape.text()
    );
    let mut untyped = post_json("/charges", Some("k"), r#"{"amount":1}"#);
    untyped.headers_mut().remove("content-type");
    assert_eq!(
        send(&app, untyped).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    assert_eq!(store.count(OpKind::Claim), 0, "{:?}", store.operations());

    let fixed = send(&app, post_json("/charges", Some("k"), r#"{"amount":1}"#)).await;
    assert_eq!(fixed.status, StatusCode::CREATED, "{}", fixed.text());
    assert!(!fixed.replayed());
    store.assert_executed_once();
}

// ===== what is stored and replayed =====

#[derive(Deserialize, Serialize)]
struct Ask {
    status: u16,
}

/// Answers with the status asked for, a body naming the run, and headers
/// of every kind the replay treats differently.
#[idempotent(scope = "global")]
async fn answer(State(runs): State<Runs>, Json(ask): Json<Ask>) -> Response {
    let run = runs.bump();
    let headers = [
        ("set-cookie", "session=first-callers"),
        ("date", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ("connection", "x-hop"),
        ("x-hop", "1"),
        ("location", "/charges/1"),
        ("cache-control", "no-store"),
        ("x-request-cost", "7"),
    ];
    let status = StatusCode::from_u16(ask.status).unwrap();
    (status, headers, format!("run {run}")).into_response()
}

#[tokio::test]
async fn final_statuses_are_replayed_with_their_own_headers_and_others_run_again() {
    for (status, stored) in [
        (200, true),
        (201, true),
        (302, true),
        (400, true),
        (404, true),
        (422, true),
        (409, false),
        (429, false),
        (500, false),
        (503, false),
    ] {
        let runs = Runs::default();
        let app = Router::new()
            .route("/answer", post(answer))
            .with_state(runs.clone())
            .layer(Idempotency::new(MemoryStore::new()));
        let body = format!(r#"{{"status":{status}}}"#);
        let first = send(&app, post_json("/answer", Some("k"), &body)).await;
        let retry = send(&app, post_json("/answer", Some("k"), &body)).await;
        assert_eq!(
            (first.status.as_u16(), retry.status.as_u16()),
            (status, status)
        );
        if !stored {
            assert!(!retry.replayed(), "{status}");
            assert_eq!(
                (runs.get(), retry.text().as_str()),
                (2, "run 2"),
                "{status}"
            );
            continue;
        }
        assert!(retry.replayed(), "{status}");
        assert_eq!(
            (runs.get(), retry.text().as_str()),
            (1, "run 1"),
            "{status}"
        );
        for kept in ["location", "cache-control", "x-request-cost"] {
            assert_eq!(
                retry.headers.get(kept),
                first.headers.get(kept),
                "{status} {kept}"
            );
        }
        for dropped in ["set-cookie", "date", "connection", "x-hop"] {
            assert!(!retry.headers.contains_key(dropped), "{status} {dropped}");
        }
    }
}

/// A body streamed in three chunks, 3,000 bytes in all.
#[idempotent(scope = "global")]
async fn streamed(State(runs): State<Runs>) -> Body {
    runs.bump();
    let chunks = ["a", "b", "c"].map(|c| Ok::<_, std::io::Error>(Bytes::from(c.repeat(1000))));
    Body::from_stream(futures_util::stream::iter(chunks))
}

#[tokio::test]
async fn a_head_request_runs_a_get_handler_once_and_a_get_replays_the_whole_body() {
    let runs = Runs::default();
    let app = Router::new()
        .route("/report", get(streamed))
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    let request = |method: &str| {
        Request::builder()
            .method(method)
            .uri("/report")
            .header("idempotency-key", "k")
            .body(Body::empty())
            .unwrap()
    };
    let head = send(&app, request("HEAD")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.headers["content-length"], "3000");
    assert!(head.body.is_empty());
    let replay = send(&app, request("GET")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body.len(), 3000);
    assert_eq!(replay.headers["content-length"], "3000");
    assert_eq!(runs.get(), 1);
}

// ===== behind tower-http layers =====

/// A run count and a gate the handler waits at, closed at first.
#[derive(Clone)]
struct Gate {
    runs: Runs,
    open: Arc<tokio::sync::Semaphore>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            runs: Runs::default(),
            open: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

#[idempotent(scope = "global")]
async fn gated_charge(State(gate): State<Gate>, Json(c): Json<Charge>) -> (StatusCode, String) {
    let _permit = gate.open.acquire().await.expect("the gate is never closed");
    let run = gate.runs.bump();
    (
        StatusCode::CREATED,
        format!("run {run} amount {}", c.amount),
    )
}

#[tokio::test]
async fn a_timeout_in_front_cuts_the_answer_not_the_run_which_is_replayed() {
    let gate = Gate::default();
    let store = MockStore::new();
    let app = Router::new()
        .route("/slow", post(gated_charge))
        .with_state(gate.clone())
        .layer(store.layer())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(50),
        ))
        .layer(TraceLayer::new_for_http());
    let body = r#"{"amount":1}"#;
    let first = send(&app, post_json("/slow", Some("k"), body)).await;
    assert_eq!(first.status, StatusCode::REQUEST_TIMEOUT);
    let during = send(&app, post_json("/slow", Some("k"), body)).await;
    during.problem(StatusCode::CONFLICT, "request-in-progress");
    assert_eq!(during.headers["retry-after"], "1");
    gate.open.add_permits(1);
    let mut after = send(&app, post_json("/slow", Some("k"), body)).await;
    for _ in 0..500 {
        if after.status != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        after = send(&app, post_json("/slow", Some("k"), body)).await;
    }
    assert_eq!(
        (after.status, after.text().as_str()),
        (StatusCode::CREATED, "run 1 amount 1")
    );
    assert!(after.replayed());
    store.assert_executed_once();
    assert_eq!(store.count(OpKind::Complete), 1);
}

#[idempotent(scope = "global")]
async fn panics_first(State(runs): State<Runs>, Json(c): Json<Charge>) -> String {
    let run = runs.bump();
    assert!(run > 1, "the first run panics");
    format!("run {run} amount {}", c.amount)
}

#[tokio::test]
async fn behind_catch_panic_a_panic_is_a_500_and_the_retry_runs() {
    let runs = Runs::default();
    let store = MockStore::new();
    let app = Router::new()
        .route("/charges", post(panics_first))
        .with_state(runs.clone())
        .layer(store.layer())
        .layer(CatchPanicLayer::new());
    let body = r#"{"amount":1}"#;
    let first = send(&app, post_json("/charges", Some("k"), body)).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    let retry = send(&app, post_json("/charges", Some("k"), body)).await;
    assert_eq!(
        (retry.status, retry.text().as_str()),
        (StatusCode::OK, "run 2 amount 1")
    );
    assert_eq!(store.count(OpKind::Release), 1);
    assert_eq!(store.count(OpKind::Complete), 1);
}

#[tokio::test]
async fn cors_answers_preflights_and_adds_its_headers_to_replays_once() {
    let runs = Runs::default();
    let store = MockStore::new();
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods(Any)
        .allow_headers(Any);
    let app = charges(&runs, &store).layer(cors);
    let preflight = Request::options("/charges")
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "idempotency-key, content-type",
        )
        .body(Body::empty())
        .unwrap();
    let preflight = send(&app, preflight).await;
    assert_eq!(preflight.status, StatusCode::OK);
    assert_eq!(store.operations(), [], "a preflight claims nothing");
    for replayed in [false, true] {
        let mut request = post_json("/charges", Some("k"), r#"{"amount":1}"#);
        request
            .headers_mut()
            .insert("origin", "https://shop.example".parse().unwrap());
        let reply = send(&app, request).await;
        assert_eq!(
            (reply.status, reply.replayed()),
            (StatusCode::CREATED, replayed)
        );
        let origins = reply.headers.get_all("access-control-allow-origin");
        assert_eq!(origins.iter().count(), 1);
    }
    store.assert_executed_once();
}

/// In front of the `Idempotency` layer or behind it: the attribute stores
/// what its handler answered, before any layer encodes it.
#[tokio::test]
async fn compression_in_front_of_or_behind_the_layer_encodes_each_replay_for_its_own_caller() {
    for behind in [false, true] {
        compression_encodes_each_replay_for_its_own_caller(behind).await;
    }
}

async fn compression_encodes_each_replay_for_its_own_caller(behind: bool) {
    let runs = Runs::default();
    let store = MockStore::new();
    let app = if behind {
        Router::new()
            .route("/charges", post(charge))
            .with_state(runs.clone())
            .layer(CompressionLayer::new())
            .layer(store.layer())
    } else {
        charges(&runs, &store).layer(CompressionLayer::new())
    };
    let body = r#"{"amount":1}"#;
    let mut gzipped = post_json("/charges", Some("k"), body);
    gzipped
        .headers_mut()
        .insert("accept-encoding", "gzip".parse().unwrap());
    let first = send(&app, gzipped).await;
    assert_eq!(first.headers["content-encoding"], "gzip");
    let plain = send(&app, post_json("/charges", Some("k"), body)).await;
    assert!(plain.replayed());
    assert!(!plain.headers.contains_key("content-encoding"));
    let replayed: Value = serde_json::from_slice(&plain.body).unwrap();
    assert_eq!(replayed["run"], 1);
    store.assert_executed_once();
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn a_compressed_request_is_the_same_request_as_its_plain_form() {
    let runs = Runs::default();
    let store = MockStore::new();
    let app = charges(&runs, &store).layer(RequestDecompressionLayer::new());
    let compressed = Request::post("/charges")
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header("idempotency-key", "k")
        .body(Body::from(gzip(br#"{"amount":1}"#)))
        .unwrap();
    assert_eq!(send(&app, compressed).await.status, StatusCode::CREATED);
    let plain = send(&app, post_json("/charges", Some("k"), r#"{"amount":1}"#)).await;
    assert_eq!(
        (plain.status, plain.replayed()),
        (StatusCode::CREATED, true)
    );
    store.assert_executed_once();
}

#[tokio::test]
async fn a_body_over_a_limit_in_front_does_not_use_up_the_key() {
    let runs = Runs::default();
    let store = MockStore::new();
    let app = charges(&runs, &store).layer(RequestBodyLimitLayer::new(64));
    let big = format!(r#"{{"amount":1,"note":"{}"}}"#, "x".repeat(200));
    let announced = send(&app, post_json("/charges", Some("k"), &big)).await;
    assert_eq!(announced.status, StatusCode::PAYLOAD_TOO_LARGE);
    let chunks = [Ok::<_, std::io::Error>(Bytes::from(big))];
    let chunked = Request::post("/charges")
        .header("content-type", "application/json")
        .header("idempotency-key", "k")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    assert_eq!(
        send(&app, chunked).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(store.count(OpKind::Claim), 0, "{:?}", store.operations());
    let small = send(&app, post_json("/charges", Some("k"), r#"{"amount":1}"#)).await;
    assert_eq!(
        (small.status, small.replayed()),
        (StatusCode::CREATED, false)
    );
}

// ===== over HTTP/1.1 =====

/// Writes `head`, then, if it asked for `100 Continue`, waits for an
/// answer before sending `body`; returns what the server sent, with
/// `<body>` marking where the body went out.
async fn exchange(addr: std::net::SocketAddr, head: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = [0; 4096];
    let quiet = Duration::from_millis(300);
    if head.contains("expect: 100-continue")
        && let Ok(Ok(n)) = tokio::time::timeout(quiet, stream.read(&mut buffer)).await
    {
        received.extend_from_slice(&buffer[..n]);
    }
    received.extend_from_slice(b"<body>");
    // The server may have closed the connection already.
    let _ = stream.write_all(body.as_bytes()).await;
    while let Ok(Ok(n @ 1..)) = tokio::time::timeout(quiet, stream.read(&mut buffer)).await {
        received.extend_from_slice(&buffer[..n]);
    }
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_a_keyless_upload_is_refused_before_the_client_sends_it() {
    let runs = Runs::default();
    let app = charges(&runs, &MockStore::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let body = r#"{"amount":1}"#;
    let head = |key: &str| {
        format!(
            "POST /charges HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n{key}expect: 100-continue\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
    };
    let keyless = exchange(addr, &head(""), body).await;
    assert!(
        keyless.starts_with("HTTP/1.1 400 Bad Request\r\n")
            && keyless.contains("urn:idempotent:missing-key"),
        "{keyless}"
    );
    let keyed = exchange(addr, &head("idempotency-key: k\r\n"), body).await;
    assert!(
        keyed.starts_with("HTTP/1.1 100 Continue\r\n\r\n<body>HTTP/1.1 201 Created\r\n"),
        "{keyed}"
    );
    let retry = exchange(addr, &head("idempotency-key: k\r\n"), body).await;
    assert!(retry.contains("idempotent-replayed: true\r\n"), "{retry}");
    assert_eq!(runs.get(), 1);
}

/// What `/shaped` answers: a status and a body, which may be empty.
#[derive(Deserialize, Serialize)]
struct Shape {
    status: u16,
    body: String,
}

/// Answers as asked, with repeated `Vary` and `Link`, a value of
/// obs-text bytes and a content type even on an empty body.
#[idempotent(scope = "global")]
async fn shaped(State(runs): State<Runs>, Json(shape): Json<Shape>) -> Response {
    runs.bump();
    let status = StatusCode::from_u16(shape.status).unwrap();
    let mut response = (status, shape.body).into_response();
    let headers = response.headers_mut();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.append("vary", "accept".parse().unwrap());
    headers.append("link", "</p/1>; rel=self".parse().unwrap());
    headers.append("vary", "origin".parse().unwrap());
    headers.append("link", "</p/2>; rel=next".parse().unwrap());
    let obs_text = axum::http::HeaderValue::from_bytes(b"caf\xe9 \xff").unwrap();
    headers.insert("x-note", obs_text);
    response
}

/// Sends one raw request for `shape` with key `key`, and reads the answer
/// until the server closes the connection; header lines the replay
/// changes by design (`date`, its own marker) are left out.
async fn shaped_exchange(addr: std::net::SocketAddr, key: &str, shape: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /shaped HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\nidempotency-key: {key}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{shape}",
        shape.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let read = stream.read_to_end(&mut received);
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("the server closes the connection")
        .unwrap();
    let lines = received.split_inclusive(|&byte| byte == b'\n');
    lines
        .filter(|line| !line.starts_with(b"date: ") && !line.starts_with(b"idempotent-replayed: "))
        .flatten()
        .copied()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_a_replay_is_the_first_answer_byte_for_byte() {
    let runs = Runs::default();
    let app = Router::new()
        .route("/shaped", post(shaped))
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let shapes = [
        (201, r#"{\"id\":1}"#),
        (200, ""),
        (204, ""),
        (304, ""),
        (404, r#"{\"error\":\"gone\"}"#),
    ];
    for (i, (status, body)) in shapes.into_iter().enumerate() {
        let shape = format!(r#"{{"status":{status},"body":"{body}"}}"#);
        let key = format!("k{i}");
        let first = shaped_exchange(addr, &key, &shape).await;
        let replay = shaped_exchange(addr, &key, &shape).await;
        let status_line = format!("HTTP/1.1 {status} ");
        assert!(first.starts_with(status_line.as_bytes()), "{status}");
        assert_eq!(
            String::from_utf8_lossy(&replay),
            String::from_utf8_lossy(&first),
            "{status}"
        );
        assert_eq!(runs.get(), i + 1, "{status}");
    }
}

/// A body of `len` bytes, streamed in chunks of 100.
#[idempotent(scope = "global")]
async fn sized(State(runs): State<Runs>, Json(len): Json<usize>) -> Body {
    let run = runs.bump();
    let bytes = Bytes::from(format!("{run}").repeat(len));
    let chunks: Vec<_> = bytes
        .chunks(100)
        .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
        .collect();
    Body::from_stream(futures_util::stream::iter(chunks))
}

#[tokio::test]
async fn a_body_at_max_body_bytes_is_replayed_and_one_byte_more_is_not_stored() {
    let runs = Runs::default();
    let idempotency = Idempotency::builder(MemoryStore::new())
        .max_body_bytes(1_000)
        .build();
    let app = Router::new()
        .route("/sized", post(sized))
        .with_state(runs.clone())
        .layer(idempotency);
    let at_limit = || post_json("/sized", Some("at"), "1000");
    let first = send(&app, at_limit()).await;
    let replay = send(&app, at_limit()).await;
    assert_eq!((first.body.len(), replay.body.len()), (1_000, 1_000));
    assert!(replay.replayed() && replay.body == first.body);

    let over = || post_json("/sized", Some("over"), "1001");
    let first = send(&app, over()).await;
    assert_eq!(
        (
            first.status,
            first.body.len(),
            first.text().starts_with('2')
        ),
        (StatusCode::OK, 1_001, true)
    );
    let retry = send(&app, over()).await;
    retry.problem(StatusCode::GONE, "response-not-stored");
    assert_eq!(runs.get(), 2);
}

// ===== the first caller's answer =====

/// One answer, whoever gives it.
fn receipt() -> Response {
    let headers = [
        ("set-cookie", "sid=first-callers"),
        ("location", "/charges/1"),
        ("vary", "accept"),
    ];
    (StatusCode::CREATED, headers, "charged").into_response()
}

#[idempotent(scope = "global")]
async fn receipted(State(runs): State<Runs>, Json(_c): Json<Charge>) -> Response {
    runs.bump();
    receipt()
}

async fn receipted_plain(State(runs): State<Runs>, Json(_c): Json<Charge>) -> Response {
    runs.bump();
    receipt()
}

#[tokio::test]
async fn when_every_attempt_to_store_fails_the_first_caller_gets_the_answer_of_a_plain_handler() {
    let runs = Runs::default();
    let store = MockStore::new();
    let app = Router::new()
        .route("/charges", post(receipted))
        .route("/plain", post(receipted_plain))
        .with_state(runs.clone())
        .layer(store.layer());
    for _ in 0..4 {
        store.fail_next(OpKind::Complete);
    }
    let body = r#"{"amount":1}"#;
    let with = send(&app, post_json("/charges", Some("k"), body)).await;
    let without = send(&app, post_json("/plain", None, body)).await;
    assert_eq!(
        (with.status, &with.headers, with.text()),
        (without.status, &without.headers, without.text())
    );
    // Nothing was stored: the key is still held by the first run.
    let retry = send(&app, post_json("/charges", Some("k"), body)).await;
    retry.problem(StatusCode::CONFLICT, "request-in-progress");
    assert_eq!(runs.get(), 2);
}
