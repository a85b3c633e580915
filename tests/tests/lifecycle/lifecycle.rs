//! A keyed request's life cycle, through both `#[idempotent]` and
//! `IdempotentLayer`, over a real connection where it matters: clients
//! that go away mid-request or mid-upload, a server that shuts down, the
//! statuses that let the key be used again, tower-http layers beside the
//! route's layer, and response bodies that panic, never end (event
//! streams) or pass `max_body_bytes`.

use crate::macro_support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::testing::{MockStore, OpKind};
use idempotent_core::{Endpoint, Idempotency, IdempotentLayer, Scope, idempotent};
use macro_support::gated::{Charge, Gate, gated_app, gated_by_attribute, gated_plain};
use macro_support::{both_ways, post_json, serve};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;
use tower_http::compression::CompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

/// How long a test waits for something that must happen before it calls
/// it a failure: never a synchronisation, only a bound on a hang.
const HANG: Duration = Duration::from_secs(10);

const LAYERED: Endpoint = Endpoint::new("layered").scope(Scope::Global);

/// The status, whether it is a replay, and the body.
async fn send(app: &Router, request: Request<Body>) -> (StatusCode, bool, String) {
    let reply = macro_support::send(app, request).await;
    (reply.status, reply.replayed, reply.body)
}

fn head(uri: &str, key: &str, length: usize) -> String {
    format!(
        "POST {uri} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\nidempotency-key: {key}\r\ncontent-length: {length}\r\n\r\n"
    )
}

/// Reads from `stream` until what came in contains `wanted`.
async fn read_until(stream: &mut TcpStream, wanted: &str) -> String {
    let mut received = Vec::new();
    let mut buffer = [0; 4096];
    let reading = async {
        while !String::from_utf8_lossy(&received).contains(wanted) {
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(
                n > 0,
                "closed before {wanted:?}: {:?}",
                String::from_utf8_lossy(&received)
            );
            received.extend_from_slice(&buffer[..n]);
        }
    };
    tokio::time::timeout(HANG, reading)
        .await
        .unwrap_or_else(|_| panic!("{wanted:?} never came"));
    String::from_utf8_lossy(&received).into_owned()
}

// ===== a client that goes away =====

/// A client sends its request and hangs up while the handler runs; the
/// server then shuts down, which it can only do once the connection let
/// the request go (a request still served would hold it). The handler
/// runs on past it; `drain` waits for its outcome to be stored, and the
/// retry replays it.
async fn a_run_whose_client_hung_up_is_stored_by_drain(uri: &str) {
    let gate = Gate::default();
    let idempotency = Idempotency::new(MemoryStore::new());
    let app = gated_app(&gate, &idempotency, LAYERED);
    let (mut client, stop, server) = serve(app.clone()).await;
    let body = r#"{"amount":7}"#;
    let request = format!("{}{body}", head(uri, "k", body.len()));
    client.write_all(request.as_bytes()).await.unwrap();
    gate.until_started(1).await;
    drop(client);
    stop.send(()).unwrap();
    let shutdown = tokio::time::timeout(HANG, server).await;
    shutdown
        .expect("the server stops while the handler waits")
        .unwrap();
    assert_eq!(gate.runs(), 0, "the handler is still at its gate");

    gate.let_through(1);
    drained_then_replayed(idempotency.drain(), &gate, &app, uri, body).await;
}

/// Once the gate opens, `drain` returns with the one run stored, and the
/// retry of `body` under key `k` replays it.
async fn drained_then_replayed(
    drain: impl Future<Output = ()>,
    gate: &Gate,
    app: &Router,
    uri: &str,
    body: &str,
) {
    tokio::time::timeout(HANG, drain)
        .await
        .expect("drain returns once the run is stored");
    assert_eq!(gate.runs(), 1);
    let retry = send(app, post_json(uri, "k", body)).await;
    let amount: Value = serde_json::from_str(body).unwrap();
    let stored = format!("run 1 amount {}", amount["amount"]);
    assert_eq!(retry, (StatusCode::CREATED, true, stored), "{uri}");
    assert_eq!(gate.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_attribute_a_run_whose_client_hung_up_is_stored_by_drain() {
    a_run_whose_client_hung_up_is_stored_by_drain("/attribute").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_layer_a_run_whose_client_hung_up_is_stored_by_drain() {
    a_run_whose_client_hung_up_is_stored_by_drain("/layer").await;
}

/// A server's graceful shutdown can end before a connection's task has
/// dropped the request it was serving (axum lets the shutdown finish as
/// the task lets go of its connection, and drops the connection, with the
/// request, after that). `drain` called in between must still wait for
/// that request's run, which is detached only when the request is dropped.
async fn drain_waits_for_a_request_not_yet_dropped(uri: &str) {
    let gate = Gate::default();
    let idempotency = Idempotency::new(MemoryStore::new());
    let app = gated_app(&gate, &idempotency, LAYERED);
    let body = r#"{"amount":9}"#;
    let request = tokio::spawn(send_owned(app.clone(), post_json(uri, "k", body)));
    gate.until_started(1).await;

    // Nothing a drain waits for can end while the gate is closed, so a
    // drain that is ready at once did not wait for this request.
    let mut drain = Box::pin(idempotency.drain());
    assert!(
        futures_util::FutureExt::now_or_never(&mut drain).is_none(),
        "drain returned while a request it must wait for was still held"
    );

    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    gate.let_through(1);
    drained_then_replayed(drain, &gate, &app, uri, body).await;
}

async fn send_owned(app: Router, request: Request<Body>) -> (StatusCode, bool, String) {
    send(&app, request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_attribute_drain_waits_for_a_request_not_yet_dropped() {
    drain_waits_for_a_request_not_yet_dropped("/attribute").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_layer_drain_waits_for_a_request_not_yet_dropped() {
    drain_waits_for_a_request_not_yet_dropped("/layer").await;
}

/// A client that sends half its body and hangs up: nothing runs and
/// nothing is claimed, and the retry with the whole body runs once.
async fn a_body_cut_short_claims_nothing(uri: &str) {
    let gate = Gate::default();
    gate.let_through(10);
    let store = MockStore::new();
    let app = gated_app(&gate, &store.layer(), LAYERED);
    let (mut client, _stop, _server) = serve(app.clone()).await;
    let body = r#"{"amount":7}"#;
    let request = format!("{}{}", head(uri, "k", body.len()), &body[..5]);
    client.write_all(request.as_bytes()).await.unwrap();
    client.shutdown().await.unwrap();
    // The server answers, or closes, once it read what there was.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(HANG, client.read_to_end(&mut answer)).await;
    drop(read.expect("the server is done with the connection"));
    assert_eq!(
        store.count(OpKind::Claim),
        0,
        "{uri}: {:?}",
        store.operations()
    );

    let retry = send(&app, post_json(uri, "k", body)).await;
    assert_eq!(
        retry,
        (StatusCode::CREATED, false, "run 1 amount 7".to_owned()),
        "{uri}"
    );
    assert_eq!(gate.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_attribute_a_body_cut_short_claims_nothing() {
    a_body_cut_short_claims_nothing("/attribute").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_layer_a_body_cut_short_claims_nothing() {
    a_body_cut_short_claims_nothing("/layer").await;
}

// ===== statuses that let the key be used again =====

#[idempotent(scope = "global")]
async fn answering_by_attribute(
    State(runs): State<Arc<AtomicUsize>>,
    Json(status): Json<u16>,
) -> StatusCode {
    answering(&runs, status)
}

async fn answering_plain(
    State(runs): State<Arc<AtomicUsize>>,
    Json(status): Json<u16>,
) -> StatusCode {
    answering(&runs, status)
}

fn answering(runs: &AtomicUsize, status: u16) -> StatusCode {
    runs.fetch_add(1, Ordering::SeqCst);
    StatusCode::from_u16(status).unwrap()
}

#[tokio::test]
async fn statuses_that_are_not_final_release_the_key_for_both_ways() {
    let runs = Arc::new(AtomicUsize::new(0));
    let store = MockStore::new();
    let app = both_ways(
        answering_by_attribute,
        answering_plain,
        LAYERED,
        runs.clone(),
        store.layer(),
    );
    let released = [
        401, 405, 407, 408, 409, 413, 415, 423, 425, 429, 500, 502, 503, 504,
    ];
    for (i, status) in released.into_iter().enumerate() {
        for uri in ["/attribute", "/layer"] {
            let key = format!("{uri}-{status}");
            let before = runs.load(Ordering::SeqCst);
            for _ in 0..2 {
                let (answered, replayed, _) =
                    send(&app, post_json(uri, &key, &status.to_string())).await;
                assert_eq!((answered.as_u16(), replayed), (status, false), "{uri}");
            }
            assert_eq!(runs.load(Ordering::SeqCst), before + 2, "{uri} {status}");
        }
        assert_eq!(store.count(OpKind::Complete), 0, "{i}");
    }
    for status in [200, 201, 204, 304, 400, 404, 410, 422] {
        for uri in ["/attribute", "/layer"] {
            let key = format!("{uri}-{status}");
            let before = runs.load(Ordering::SeqCst);
            let first = send(&app, post_json(uri, &key, &status.to_string())).await;
            let retry = send(&app, post_json(uri, &key, &status.to_string())).await;
            assert_eq!((first.0.as_u16(), first.1), (status, false), "{uri}");
            assert_eq!((retry.0.as_u16(), retry.1), (status, true), "{uri}");
            assert_eq!(runs.load(Ordering::SeqCst), before + 1, "{uri} {status}");
        }
    }
}

// ===== event streams =====

/// One event, then only keep-alive comments, for as long as the client
/// stays: an event stream does not end by itself.
fn endless_events(runs: &AtomicUsize) -> Response {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    let first = Event::default().data(format!("run {run}"));
    let events = futures_util::stream::once(async move { Ok::<_, Infallible>(first) });
    let events = futures_util::StreamExt::chain(events, futures_util::stream::pending());
    let keep_alive = KeepAlive::new().interval(Duration::from_millis(100));
    Sse::new(events).keep_alive(keep_alive).into_response()
}

#[idempotent(scope = "global")]
async fn events_by_attribute(
    State(runs): State<Arc<AtomicUsize>>,
    Json(_c): Json<Charge>,
) -> Response {
    endless_events(&runs)
}

async fn events_plain(State(runs): State<Arc<AtomicUsize>>, Json(_c): Json<Charge>) -> Response {
    endless_events(&runs)
}

/// An event stream reaches its caller as it is produced, not when it
/// ends (it may never end), and its key does not stay claimed for as long
/// as the stream runs: the handler ran, so the record is stored without
/// the stream, and a retry is told the response was not stored.
async fn an_event_stream_is_sent_as_it_comes_and_not_run_again(uri: &str) {
    let runs = Arc::new(AtomicUsize::new(0));
    let idempotency = Idempotency::new(MemoryStore::new());
    let app = both_ways(
        events_by_attribute,
        events_plain,
        LAYERED,
        runs.clone(),
        idempotency.clone(),
    );
    let (mut client, _stop, _server) = serve(app.clone()).await;
    let body = r#"{"amount":7}"#;
    let request = format!("{}{body}", head(uri, "k", body.len()));
    client.write_all(request.as_bytes()).await.unwrap();
    let received = read_until(&mut client, "data: run 1").await;
    assert!(received.starts_with("HTTP/1.1 200 OK\r\n"), "{received}");
    assert!(
        received.contains("content-type: text/event-stream"),
        "{received}"
    );
    drop(client);

    let (status, replayed, problem) = send(&app, post_json(uri, "k", body)).await;
    assert_eq!(
        (status, replayed),
        (StatusCode::GONE, false),
        "{uri}: {problem}"
    );
    let problem: Value = serde_json::from_str(&problem).unwrap();
    assert_eq!(problem["type"], "urn:idempotent:response-not-stored");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("event stream"), "{detail}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    tokio::time::timeout(HANG, idempotency.drain())
        .await
        .expect("nothing is left running for the stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_attribute_an_event_stream_is_sent_as_it_comes_and_not_run_again() {
    an_event_stream_is_sent_as_it_comes_and_not_run_again("/attribute").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_layer_an_event_stream_is_sent_as_it_comes_and_not_run_again() {
    an_event_stream_is_sent_as_it_comes_and_not_run_again("/layer").await;
}

// ===== the layer beside tower-http layers =====

#[tokio::test]
async fn with_the_layer_a_timeout_in_front_cuts_the_answer_not_the_run_which_is_replayed() {
    let gate = Gate::default();
    let idempotency = Idempotency::new(MemoryStore::new());
    let app = gated_app(&gate, &idempotency, LAYERED)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(50),
        ))
        .layer(TraceLayer::new_for_http());
    let body = r#"{"amount":7}"#;
    let first = send(&app, post_json("/layer", "k", body)).await;
    assert_eq!(first.0, StatusCode::REQUEST_TIMEOUT);
    let during = send(&app, post_json("/layer", "k", body)).await;
    assert_eq!(during.0, StatusCode::CONFLICT, "{}", during.2);
    gate.let_through(1);
    tokio::time::timeout(HANG, idempotency.drain())
        .await
        .expect("the run the timeout left finishes");
    let retry = send(&app, post_json("/layer", "k", body)).await;
    assert_eq!(
        retry,
        (StatusCode::CREATED, true, "run 1 amount 7".to_owned())
    );
    assert_eq!(gate.runs(), 1);
}

/// A body long enough for `CompressionLayer` to encode.
async fn report(State(runs): State<Arc<AtomicUsize>>, Json(c): Json<Charge>) -> String {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    format!("run {run} amount {} {}", c.amount, "x".repeat(200))
}

/// In front of the `Idempotency` layer or behind it, but outside the
/// route's `IdempotentLayer`: what the handler answered is stored, and
/// each replay is encoded for the caller that asked for it.
#[tokio::test]
async fn with_the_layer_compression_outside_it_encodes_each_replay_for_its_own_caller() {
    for behind in [false, true] {
        let runs = Arc::new(AtomicUsize::new(0));
        let store = MockStore::new();
        let routes = Router::new()
            .route(
                "/layer",
                post(report).route_layer(IdempotentLayer::new(LAYERED)),
            )
            .with_state(runs.clone());
        let app = if behind {
            routes.layer(CompressionLayer::new()).layer(store.layer())
        } else {
            routes.layer(store.layer()).layer(CompressionLayer::new())
        };
        let body = r#"{"amount":7}"#;
        let mut gzipped = post_json("/layer", "k", body);
        let accept = axum::http::HeaderValue::from_static("gzip");
        gzipped.headers_mut().insert("accept-encoding", accept);
        // Not through `send`, which reads a body of text: only the
        // encoding is looked at.
        let first = app.clone().oneshot(gzipped).await.unwrap();
        assert_eq!(first.headers()["content-encoding"], "gzip", "{behind}");
        let (status, replayed, plain) = send(&app, post_json("/layer", "k", body)).await;
        assert_eq!((status, replayed), (StatusCode::OK, true), "{behind}");
        assert!(plain.starts_with("run 1 amount 7 xxx"), "{behind}: {plain}");
        store.assert_executed_once();
    }
}

/// A body limit outside the route's `IdempotentLayer` or inside it: a
/// body over it is 413 and the key stays usable either way.
#[tokio::test]
async fn with_the_layer_a_body_over_a_limit_on_either_side_leaves_the_key_usable() {
    for inside in [false, true] {
        let gate = Gate::default();
        gate.let_through(10);
        let store = MockStore::new();
        let limit = RequestBodyLimitLayer::new(64);
        let layer = IdempotentLayer::new(LAYERED);
        let app = if inside {
            let route = post(gated_plain).layer(limit).route_layer(layer);
            Router::new()
                .route("/layer", route)
                .with_state(gate.clone())
        } else {
            let route = post(gated_plain).route_layer(layer);
            let routes = Router::new()
                .route("/layer", route)
                .with_state(gate.clone());
            routes.layer(limit)
        };
        let app = app.layer(store.layer());
        let big = format!(r#"{{"amount":7,"note":"{}"}}"#, "x".repeat(200));
        let announced = send(&app, post_json("/layer", "k", &big)).await;
        assert_eq!(announced.0, StatusCode::PAYLOAD_TOO_LARGE, "{inside}");
        let chunks = [Ok::<_, Infallible>(axum::body::Bytes::from(big))];
        let chunked = Request::post("/layer")
            .header("content-type", "application/json")
            .header("idempotency-key", "k")
            .body(Body::from_stream(futures_util::stream::iter(chunks)))
            .unwrap();
        let (status, _, detail) = send(&app, chunked).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{inside}: {detail}");
        assert_eq!(store.count(OpKind::Complete), 0, "{inside}");
        let small = send(&app, post_json("/layer", "k", r#"{"amount":7}"#)).await;
        let first_run = (StatusCode::CREATED, false, "run 1 amount 7".to_owned());
        assert_eq!(small, first_run, "{inside}");
    }
}

/// A body over axum's default limit (2 MB): the attribute's `Json` refuses
/// it before anything is claimed; behind a layer that buffers more than
/// that, the handler's `Json` still refuses it, and its 413 releases the
/// key the layer claimed. Either way the retry with a body that fits runs once.
#[tokio::test]
async fn a_body_over_axums_default_limit_leaves_the_key_usable() {
    let gate = Gate::default();
    gate.let_through(10);
    let store = MockStore::new();
    let layer = IdempotentLayer::new(LAYERED).max_request_bytes(4 << 20);
    let app = Router::new()
        .route("/attribute", post(gated_by_attribute))
        .route("/layer", post(gated_plain).route_layer(layer))
        .with_state(gate.clone())
        .layer(store.layer());
    let big = format!(r#"{{"amount":7,"note":"{}"}}"#, "x".repeat(3 << 20));
    for (i, uri) in ["/attribute", "/layer"].into_iter().enumerate() {
        let (status, _, _) = send(&app, post_json(uri, uri, &big)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{uri}");
        assert_eq!(store.count(OpKind::Complete), i, "{uri}");
        let (status, replayed, text) = send(&app, post_json(uri, uri, r#"{"amount":7}"#)).await;
        let run = format!("run {} amount 7", i + 1);
        assert_eq!((status, replayed, text), (StatusCode::CREATED, false, run));
    }
    // The attribute claimed nothing for its 413; the layer claimed and
    // released.
    let operations = format!("{:?}", store.operations());
    assert_eq!(store.count(OpKind::Claim), 3, "{operations}");
    assert_eq!(store.count(OpKind::Release), 1, "{operations}");
}

// ===== response bodies =====

/// The first run's body panics once it is read; later runs' bodies come
/// whole.
fn panicking_body(runs: &AtomicUsize) -> Body {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    let chunk = async move {
        assert!(run > 1, "the first run's body panics while it is read");
        Ok::<_, Infallible>(format!("run {run}"))
    };
    Body::from_stream(futures_util::stream::once(chunk))
}

#[idempotent(scope = "global")]
async fn panicking_by_attribute(
    State(runs): State<Arc<AtomicUsize>>,
    Json(_c): Json<Charge>,
) -> Body {
    panicking_body(&runs)
}

async fn panicking_plain(State(runs): State<Arc<AtomicUsize>>, Json(_c): Json<Charge>) -> Body {
    panicking_body(&runs)
}

/// Over a real connection, a body that panics while it is read cuts the
/// connection as it would without the library, and releases the key: the
/// retry runs, and the one after it replays that run.
async fn a_body_that_panics_releases_the_key(uri: &str) {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = both_ways(
        panicking_by_attribute,
        panicking_plain,
        LAYERED,
        runs.clone(),
        Idempotency::new(MemoryStore::new()),
    );
    let (mut client, _stop, _server) = serve(app.clone()).await;
    let body = r#"{"amount":7}"#;
    let request = format!("{}{body}", head(uri, "k", body.len()));
    client.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(HANG, client.read_to_end(&mut answer)).await;
    drop(read.expect("the server closes the connection"));
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

    let retry = send(&app, post_json(uri, "k", body)).await;
    assert_eq!(retry, (StatusCode::OK, false, "run 2".to_owned()), "{uri}");
    let replay = send(&app, post_json(uri, "k", body)).await;
    assert_eq!(replay, (StatusCode::OK, true, "run 2".to_owned()), "{uri}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_attribute_a_body_that_panics_releases_the_key() {
    a_body_that_panics_releases_the_key("/attribute").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_layer_a_body_that_panics_releases_the_key() {
    a_body_that_panics_releases_the_key("/layer").await;
}

/// 3 MiB in chunks of 64 KiB, three times the default `max_body_bytes`.
async fn large_plain(State(runs): State<Arc<AtomicUsize>>, Json(_c): Json<Charge>) -> Body {
    runs.fetch_add(1, Ordering::SeqCst);
    let chunk = axum::body::Bytes::from(vec![b'x'; 64 << 10]);
    let chunks = std::iter::repeat_n(Ok::<_, Infallible>(chunk), 48);
    Body::from_stream(futures_util::stream::iter(chunks))
}

#[idempotent(scope = "global")]
async fn large_by_attribute(State(runs): State<Arc<AtomicUsize>>, Json(c): Json<Charge>) -> Body {
    large_plain(State(runs), Json(c)).await
}

/// A body over `max_body_bytes` reaches the first caller whole; the
/// record is stored without it, so a retry is told so (410) and nothing
/// runs twice.
#[tokio::test]
async fn a_body_over_max_body_bytes_is_sent_whole_once_and_never_run_again() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = both_ways(
        large_by_attribute,
        large_plain,
        LAYERED,
        runs.clone(),
        Idempotency::new(MemoryStore::new()),
    );
    let body = r#"{"amount":7}"#;
    for (i, uri) in ["/attribute", "/layer"].into_iter().enumerate() {
        let (status, replayed, first) = send(&app, post_json(uri, uri, body)).await;
        assert_eq!((status, replayed), (StatusCode::OK, false), "{uri}");
        assert_eq!(first.len(), 3 << 20, "{uri}");
        let (status, _, problem) = send(&app, post_json(uri, uri, body)).await;
        assert_eq!(status, StatusCode::GONE, "{uri}: {problem}");
        assert!(
            problem.contains("urn:idempotent:response-not-stored"),
            "{problem}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), i + 1, "{uri}");
    }
}
