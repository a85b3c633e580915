//! Idempotent routes inside the tower and tower-http layers real services
//! stack around handlers: timeouts that drop the request's future (in
//! front, in the handler's own code, or between `IdempotentLayer` and the
//! handler), concurrency limits and load shedding, authentication, request
//! ids, compression both ways, caught panics, CORS preflights, `HEAD`, and
//! responses that stream, fail midway or end with trailers, over HTTP/1.1
//! where the framing matters.

use crate::macro_support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{BoxError, Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{
    Endpoint, Idempotency, IdempotentLayer, IdempotentRequest, Scope, idempotent,
};
use macro_support::gated::{Charge, Gate, gated_app, gated_by_attribute, gated_plain};
use macro_support::{Reply, Runs, both_ways, gunzip, post_json, send};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

/// How long a test waits for something that should come at once.
const HANG: Duration = Duration::from_secs(10);
/// The timeouts in front of the handlers: short, the handlers wait on a
/// gate the test opens.
const CUT: Duration = Duration::from_millis(50);
const BODY: &str = r#"{"amount":7}"#;
/// The target of the event a gated handler logs when it acts.
const SIDE_EFFECT: &str = "side_effect";

const GATED: Endpoint = Endpoint::new("gated").scope(Scope::Global);

/// Sends `request` again until it is no longer answered 409.
async fn once_settled(app: &Router, request: impl Fn() -> Request<Body>) -> Reply {
    tokio::time::timeout(HANG, async {
        loop {
            let reply = send(app, request()).await;
            if reply.status != StatusCode::CONFLICT {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the key settles")
}

// ===== timeouts that drop the request's future =====

/// What axum's `HandleErrorLayer` answers for `tower::timeout`'s error.
async fn timed_out(error: BoxError) -> StatusCode {
    if error.is::<tower::timeout::error::Elapsed>() {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

/// The timeout in front drops the request's future while the handler
/// waits: its caller gets the timeout's answer, a retry meanwhile 409, and
/// once the handler finishes, the retry gets its outcome replayed; the
/// side effect ran once.
async fn a_timeout_in_front_cuts_the_answer_not_the_run(uri: &str, app: Router, gate: &Gate) {
    let first = send(&app, post_json(uri, "k", BODY)).await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT, "{uri}");
    let during = send(&app, post_json(uri, "k", BODY)).await;
    assert_eq!(
        during.status,
        StatusCode::CONFLICT,
        "{uri}: {}",
        during.body
    );
    gate.let_through(1);
    let retry = once_settled(&app, || post_json(uri, "k", BODY)).await;
    assert_eq!(
        (retry.status, retry.body.as_str(), retry.replayed),
        (StatusCode::CREATED, "run 1 amount 7", true),
        "{uri}"
    );
    assert_eq!(gate.runs(), 1, "{uri}");
}

#[tokio::test]
async fn a_tower_timeout_in_front_answered_by_handle_error_cuts_the_answer_not_the_run() {
    for uri in ["/attribute", "/layer"] {
        let gate = Gate::default();
        let idempotency = Idempotency::new(MemoryStore::new());
        let app = gated_app(&gate, &idempotency, GATED).layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(timed_out))
                .timeout(CUT),
        );
        a_timeout_in_front_cuts_the_answer_not_the_run(uri, app, &gate).await;
    }
}

/// The timeout on the route itself (`route_layer`) is in front of the
/// attribute's claim too: the attribute wraps the handler, inside every
/// layer of its route.
#[tokio::test]
async fn a_tower_http_timeout_on_the_attributes_route_cuts_the_answer_not_the_run() {
    let gate = Gate::default();
    let timeout = TimeoutLayer::with_status_code(StatusCode::GATEWAY_TIMEOUT, CUT);
    let app = Router::new()
        .route("/attribute", post(gated_by_attribute).route_layer(timeout))
        .with_state(gate.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    a_timeout_in_front_cuts_the_answer_not_the_run("/attribute", app, &gate).await;
}

/// A handler that times out its own idempotent run: the caller gets the
/// handler's answer to the timeout, and the run it let go of goes on to
/// store its outcome, which the retry gets.
async fn times_out_its_run(
    idempotency: IdempotentRequest,
    State(gate): State<Gate>,
    Json(c): Json<Charge>,
) -> Response {
    let fingerprint = GATED.fingerprint(&c);
    let run = idempotency.run(
        &GATED,
        fingerprint,
        async move { gate.pass(c.amount).await },
    );
    match tokio::time::timeout(CUT, run).await {
        Ok(response) => response,
        Err(_elapsed) => StatusCode::GATEWAY_TIMEOUT.into_response(),
    }
}

#[tokio::test]
async fn a_timeout_in_the_handlers_own_code_around_run_cuts_the_answer_not_the_run() {
    let gate = Gate::default();
    let app = Router::new()
        .route("/own", post(times_out_its_run))
        .with_state(gate.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    a_timeout_in_front_cuts_the_answer_not_the_run("/own", app, &gate).await;
}

async fn streams_behind_the_gate(State(gate): State<Gate>, Json(c): Json<Charge>) -> Body {
    gate.start();
    let chunks = futures_util::stream::unfold(0, move |sent| {
        let gate = gate.clone();
        async move {
            let chunk = match sent {
                0 => format!("amount {} ", c.amount),
                1 => {
                    gate.wait().await;
                    let run = gate.charge();
                    format!("run {run}")
                }
                _ => return None,
            };
            Some((Ok::<_, Infallible>(chunk), sent + 1))
        }
    });
    Body::from_stream(chunks)
}

#[idempotent(scope = "global")]
async fn streams_by_attribute(State(gate): State<Gate>, Json(c): Json<Charge>) -> Body {
    streams_behind_the_gate(State(gate), Json(c)).await
}

/// The handler returned, and its streamed body is still being read for
/// storing when the timeout in front fires: the body is read to its end
/// all the same, stored whole and replayed whole.
#[tokio::test]
async fn a_timeout_in_front_that_fires_while_the_body_streams_leaves_the_whole_body_stored() {
    for uri in ["/attribute", "/layer"] {
        let gate = Gate::default();
        let app = both_ways(
            streams_by_attribute,
            streams_behind_the_gate,
            GATED,
            gate.clone(),
            Idempotency::new(MemoryStore::new()),
        )
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            CUT,
        ));
        let first = send(&app, post_json(uri, "k", BODY)).await;
        assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT, "{uri}");
        gate.let_through(1);
        let retry = once_settled(&app, || post_json(uri, "k", BODY)).await;
        assert_eq!(
            (retry.status, retry.body.as_str(), retry.replayed),
            (StatusCode::OK, "amount 7 run 1", true),
            "{uri}"
        );
        assert_eq!(gate.runs(), 1, "{uri}");
    }
}

async fn charges_then_waits(
    State(gate): State<Gate>,
    Json(c): Json<Charge>,
) -> (StatusCode, String) {
    gate.charge_then_wait(c.amount).await
}

/// What the documentation warns of, kept true: a timeout between
/// `IdempotentLayer` and the handler answers 408, which is not stored, so
/// the key is released while the handler it cancelled had already acted,
/// and the retry runs it again. The timeout belongs in front of the layer.
#[tokio::test]
async fn a_timeout_between_the_layer_and_the_handler_releases_the_key_so_the_retry_runs_again() {
    let gate = Gate::default();
    let inside = TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, CUT);
    let app = Router::new()
        .route(
            "/layer",
            post(charges_then_waits)
                .route_layer(inside)
                .route_layer(IdempotentLayer::new(GATED)),
        )
        .with_state(gate.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    let first = send(&app, post_json("/layer", "k", BODY)).await;
    assert_eq!(first.status, StatusCode::REQUEST_TIMEOUT);
    gate.let_through(1);
    let retry = send(&app, post_json("/layer", "k", BODY)).await;
    assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, false));
    assert_eq!(gate.runs(), 2, "the cancelled run had charged already");
}

// ===== concurrency limits and load shedding =====

/// A concurrency limit in front counts a request until its future is
/// dropped: a run that a timeout in front (or a client that went away)
/// let go of goes on past its permit, so the limit no longer bounds the
/// handlers running. Put between `IdempotentLayer` and the handler (a
/// `route_layer` defers its readiness into the call), the request claims
/// its key first and then waits for a permit as part of its run: the
/// limit keeps bounding the runs a timeout let go of, and a request that
/// timed out waiting still runs once, when a permit frees.
#[tokio::test]
async fn a_concurrency_limit_bounds_detached_runs_only_between_the_layer_and_the_handler() {
    // In front of everything: the second request gets the permit the
    // first one's dropped future gave back, and both handlers run.
    let gate = Gate::default();
    let app = gated_app(&gate, &Idempotency::new(MemoryStore::new()), GATED).layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(timed_out))
            .timeout(CUT)
            .concurrency_limit(1),
    );
    for key in ["a", "b"] {
        let reply = send(&app, post_json("/layer", key, BODY)).await;
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    }
    gate.until_started(2).await;
    gate.let_through(2);

    // Between the layer and the handler: the first run keeps its permit
    // once detached, and the second waits for it.
    let gate = Gate::default();
    let app = Router::new()
        .route(
            "/layer",
            post(gated_plain)
                .route_layer(tower::limit::ConcurrencyLimitLayer::new(1))
                .route_layer(IdempotentLayer::new(GATED)),
        )
        .with_state(gate.clone())
        .layer(Idempotency::new(MemoryStore::new()))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            CUT,
        ));
    for key in ["a", "b"] {
        let reply = send(&app, post_json("/layer", key, BODY)).await;
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    }
    gate.until_started(1).await;
    tokio::time::sleep(CUT * 2).await;
    assert_eq!(gate.started(), 1, "the limit held the second run back");
    let waiting = send(&app, post_json("/layer", "b", BODY)).await;
    assert_eq!(waiting.status, StatusCode::CONFLICT, "{}", waiting.body);
    gate.let_through(2);
    for (key, run) in [("a", "run 1 amount 7"), ("b", "run 2 amount 7")] {
        let replayed = once_settled(&app, || post_json("/layer", key, BODY)).await;
        assert_eq!(
            (replayed.status, replayed.replayed, replayed.body.as_str()),
            (StatusCode::CREATED, true, run)
        );
    }
    assert_eq!(gate.runs(), 2);
}

async fn overloaded(_: BoxError) -> StatusCode {
    StatusCode::SERVICE_UNAVAILABLE
}

/// A request shed in front never reaches the claim: its key runs once
/// sent again.
#[tokio::test]
async fn a_request_shed_in_front_claims_nothing() {
    for uri in ["/attribute", "/layer"] {
        let gate = Gate::default();
        let app = gated_app(&gate, &Idempotency::new(MemoryStore::new()), GATED).layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(overloaded))
                .load_shed()
                .concurrency_limit(1),
        );
        let running = tokio::spawn({
            let app = app.clone();
            let uri = uri.to_owned();
            async move { send(&app, post_json(&uri, "a", BODY)).await }
        });
        gate.until_started(1).await;
        let shed = send(&app, post_json(uri, "b", BODY)).await;
        assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
        gate.let_through(2);
        let first = running.await.unwrap();
        assert_eq!(first.status, StatusCode::CREATED, "{uri}");
        let again = send(&app, post_json(uri, "b", BODY)).await;
        assert_eq!(
            (again.status, again.replayed, again.body.as_str()),
            (StatusCode::CREATED, false, "run 2 amount 7"),
            "{uri}"
        );
    }
}

// ===== caught panics =====

async fn panics_first_plain(State(runs): State<Runs>, Json(c): Json<Charge>) -> String {
    let run = runs.bump();
    assert!(run > 1, "the first run panics");
    format!("run {run} amount {}", c.amount)
}

/// `CatchPanicLayer` in front of `IdempotentLayer` or between it and the
/// handler: the caller gets a 500 either way, and the key is free for the
/// retry, which runs.
#[tokio::test]
async fn with_the_layer_a_caught_panic_is_a_500_and_the_retry_runs() {
    for behind in [false, true] {
        let runs = Runs::default();
        let route = if behind {
            post(panics_first_plain)
                .route_layer(CatchPanicLayer::new())
                .route_layer(IdempotentLayer::new(GATED))
        } else {
            post(panics_first_plain)
                .route_layer(IdempotentLayer::new(GATED))
                .route_layer(CatchPanicLayer::new())
        };
        let app = Router::new()
            .route("/layer", route)
            .with_state(runs.clone())
            .layer(Idempotency::new(MemoryStore::new()));
        let first = send(&app, post_json("/layer", "k", BODY)).await;
        assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR, "{behind}");
        let retry = send(&app, post_json("/layer", "k", BODY)).await;
        assert_eq!(
            (retry.status, retry.body.as_str()),
            (StatusCode::OK, "run 2 amount 7"),
            "{behind}"
        );
        let replay = send(&app, post_json("/layer", "k", BODY)).await;
        assert_eq!(
            (replay.body.as_str(), replay.replayed),
            ("run 2 amount 7", true)
        );
    }
}

// ===== request ids =====

/// Numbers requests 1, 2, 3...
#[derive(Clone, Default)]
struct Numbered(Arc<AtomicUsize>);

impl MakeRequestId for Numbered {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let id = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        Some(RequestId::new(HeaderValue::from(id)))
    }
}

/// Request ids set and propagated in front: each answer carries its own
/// request's id, a replay the retry's, not the first request's (nothing
/// inside the claim set one, so none was stored).
#[tokio::test]
async fn a_replay_carries_the_request_id_of_the_retry_not_of_the_first_request() {
    for uri in ["/attribute", "/layer"] {
        let gate = Gate::default();
        gate.let_through(10);
        let app = gated_app(&gate, &Idempotency::new(MemoryStore::new()), GATED).layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(Numbered::default()))
                .layer(TraceLayer::new_for_http())
                .layer(PropagateRequestIdLayer::x_request_id()),
        );
        let first = send(&app, post_json(uri, "k", BODY)).await;
        assert_eq!(first.headers["x-request-id"], "1", "{uri}");
        let retry = send(&app, post_json(uri, "k", BODY)).await;
        assert!(retry.replayed, "{uri}");
        assert_eq!(retry.headers["x-request-id"], "2", "{uri}");
        let mut sent_with_id = post_json(uri, "k", BODY);
        let id = HeaderValue::from_static("client-chosen");
        sent_with_id.headers_mut().insert("x-request-id", id);
        let retry = send(&app, sent_with_id).await;
        assert!(retry.replayed, "{uri}");
        assert_eq!(retry.headers["x-request-id"], "client-chosen", "{uri}");
    }
}

// ===== request decompression =====

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn gzipped_post(uri: &str, key: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header("idempotency-key", key)
        .body(Body::from(gzip(body.as_bytes())))
        .unwrap()
}

/// `RequestDecompressionLayer` in front of `IdempotentLayer` hands it the
/// payload, not its encoding: a retry sent gzipped is the plain request's
/// retry, and the other way round.
#[tokio::test]
async fn with_the_layer_a_retry_sent_gzipped_or_plain_behind_request_decompression_is_replayed() {
    for gzipped_first in [false, true] {
        let gate = Gate::default();
        gate.let_through(10);
        let app = gated_app(&gate, &Idempotency::new(MemoryStore::new()), GATED)
            .layer(RequestDecompressionLayer::new());
        let (first, retry) = if gzipped_first {
            (
                gzipped_post("/layer", "k", BODY),
                post_json("/layer", "k", BODY),
            )
        } else {
            (
                post_json("/layer", "k", BODY),
                gzipped_post("/layer", "k", BODY),
            )
        };
        let first = send(&app, first).await;
        assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
        let retry = send(&app, retry).await;
        assert_eq!(
            (retry.status, retry.replayed, retry.body.as_str()),
            (StatusCode::CREATED, true, "run 1 amount 7"),
            "gzipped first: {gzipped_first}"
        );
        assert_eq!(gate.runs(), 1);
    }
}

// ===== over HTTP/1.1 =====

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A response as it came over the wire.
#[derive(Debug)]
struct Wire {
    status: u16,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    /// The body, de-chunked.
    body: Vec<u8>,
    /// Whether the body ended as its framing says (its `Content-Length`
    /// reached, or the last chunk sent), rather than by the connection
    /// closing.
    whole: bool,
}

impl Wire {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(each, _)| each == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Sends `head` and `body` on a connection of its own (the head asks to
/// close it) and reads the response to the connection's end.
async fn exchange(addr: SocketAddr, head: &str, body: &[u8]) -> Wire {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(HANG, stream.read_to_end(&mut received))
        .await
        .expect("the server closes the connection")
        .ok();
    parse(&received, head.starts_with("HEAD"))
}

/// An empty `Wire` of status 0, not whole, if no response head came.
fn parse(received: &[u8], head_request: bool) -> Wire {
    let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") else {
        return Wire {
            status: 0,
            headers: Vec::new(),
            body: received.to_vec(),
            whole: false,
        };
    };
    let head = String::from_utf8_lossy(&received[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    let rest = &received[end + 4..];
    let mut wire = Wire {
        status,
        headers,
        body: Vec::new(),
        whole: true,
    };
    if head_request {
        wire.whole = rest.is_empty();
    } else if wire.header("transfer-encoding") == Some("chunked") {
        (wire.body, wire.whole) = dechunk(rest);
    } else if let Some(length) = wire.header("content-length") {
        let length: usize = length.parse().unwrap();
        wire.whole = rest.len() == length;
        wire.body = rest.to_vec();
    } else {
        wire.body = rest.to_vec();
    }
    wire
}

/// The chunks' data, and whether the last chunk came.
fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|window| window == b"\r\n") else {
            return (body, false);
        };
        let size = std::str::from_utf8(&rest[..line_end]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            return (body, true);
        }
        if rest.len() < size + 2 {
            body.extend_from_slice(&rest[..size.min(rest.len())]);
            return (body, false);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn post_head(uri: &str, key: &str, length: usize, extra: &str) -> String {
    format!(
        "POST {uri} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\nidempotency-key: {key}\r\ncontent-length: {length}\r\n{extra}\r\n"
    )
}

#[derive(Serialize, Deserialize)]
struct Report {
    run: usize,
    pad: String,
}

async fn report_plain(State(runs): State<Runs>, Json(_c): Json<Charge>) -> Json<Report> {
    let run = runs.bump();
    Json(Report {
        run,
        pad: "x".repeat(2048),
    })
}

#[idempotent(scope = "global")]
async fn report_by_attribute(State(runs): State<Runs>, Json(c): Json<Charge>) -> Json<Report> {
    report_plain(State(runs), Json(c)).await
}

/// Compression in front: each answer is framed for what it is. A replay
/// to a caller that accepts no encoding is the stored body as is, with a
/// `Content-Length` of its length; one to a caller that accepts gzip is
/// gzipped, without a stale `Content-Length`; both say they vary by
/// `Accept-Encoding`, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_replays_behind_compression_are_framed_and_encoded_for_each_caller() {
    let runs = Runs::default();
    let app = both_ways(
        report_by_attribute,
        report_plain,
        GATED,
        runs.clone(),
        Idempotency::new(MemoryStore::new()),
    )
    .layer(CompressionLayer::new());
    let addr = serve(app).await;
    for uri in ["/attribute", "/layer"] {
        let gzip_accepted = "accept-encoding: gzip\r\n";
        let first = exchange(
            addr,
            &post_head(uri, uri, BODY.len(), gzip_accepted),
            BODY.as_bytes(),
        )
        .await;
        assert_eq!(first.status, 200, "{uri}");
        assert_eq!(first.header("content-encoding"), Some("gzip"), "{uri}");
        let stored: Report = serde_json::from_slice(&gunzip(&first.body)).unwrap();

        let plain = exchange(addr, &post_head(uri, uri, BODY.len(), ""), BODY.as_bytes()).await;
        assert_eq!(plain.header("idempotent-replayed"), Some("true"), "{uri}");
        assert_eq!(plain.header("content-encoding"), None, "{uri}");
        assert!(plain.whole, "{uri}");
        assert_eq!(
            plain.header("content-length"),
            Some(plain.body.len().to_string().as_str()),
            "{uri}"
        );
        let replayed: Report = serde_json::from_slice(&plain.body).unwrap();
        assert_eq!(replayed.run, stored.run, "{uri}");

        let gzipped = exchange(
            addr,
            &post_head(uri, uri, BODY.len(), gzip_accepted),
            BODY.as_bytes(),
        )
        .await;
        assert_eq!(gzipped.header("idempotent-replayed"), Some("true"), "{uri}");
        assert_eq!(gzipped.header("content-encoding"), Some("gzip"), "{uri}");
        assert_eq!(gzipped.header("content-length"), None, "{uri}");
        assert!(gzipped.whole, "{uri}");
        assert_eq!(gunzip(&gzipped.body), plain.body, "{uri}");
        for wire in [&first, &plain, &gzipped] {
            let vary: Vec<_> = wire
                .headers
                .iter()
                .filter(|(name, _)| name == "vary")
                .collect();
            assert_eq!(vary.len(), 1, "{uri}: {vary:?}");
            assert!(vary[0].1.eq_ignore_ascii_case("accept-encoding"), "{uri}");
        }
    }
    assert_eq!(runs.get(), 2);
}

/// A body that fails after its first chunk.
fn failing_body(runs: &Runs) -> Body {
    runs.bump();
    let chunks = [
        Ok(Bytes::from_static(b"{\"rows\":[1,")),
        Err(std::io::Error::other("the cursor broke")),
    ];
    Body::from_stream(futures_util::stream::iter(chunks))
}

async fn fails_midway_plain(State(runs): State<Runs>, Json(_c): Json<Charge>) -> Body {
    failing_body(&runs)
}

#[idempotent(scope = "global")]
async fn fails_midway_by_attribute(State(runs): State<Runs>, Json(_c): Json<Charge>) -> Body {
    failing_body(&runs)
}

/// A streamed body that fails midway reaches its caller cut off as
/// without the library (the connection ends before the last chunk, never
/// as a whole but short body), and the retry is told that nothing was
/// stored rather than running the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_a_body_that_fails_midway_is_cut_off_for_its_caller_and_not_run_again() {
    let runs = Runs::default();
    let app = both_ways(
        fails_midway_by_attribute,
        fails_midway_plain,
        GATED,
        runs.clone(),
        Idempotency::new(MemoryStore::new()),
    )
    .layer(TraceLayer::new_for_http());
    let addr = serve(app).await;
    for uri in ["/attribute", "/layer"] {
        let head = post_head(uri, uri, BODY.len(), "");
        // hyper may abort the connection before it sent the head: the
        // body failed before anything of it was flushed.
        let first = exchange(addr, &head, BODY.as_bytes()).await;
        assert!(matches!(first.status, 0 | 200), "{uri}: {first:?}");
        assert!(!first.whole, "{uri}: {first:?}");
        let retry = exchange(addr, &head, BODY.as_bytes()).await;
        assert_eq!(retry.status, 410, "{uri}");
        assert!(retry.whole, "{uri}");
    }
    assert_eq!(runs.get(), 2);
}

async fn read_plain(State(runs): State<Runs>) -> String {
    let run = runs.bump();
    format!("report {run}: {}", "x".repeat(100))
}

/// `HEAD` with a key on a `GET` route: the replay's head is the first
/// answer's, its `Content-Length` that of the body a `GET` gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_a_replayed_head_announces_the_length_the_first_head_did() {
    let runs = Runs::default();
    let app = Router::new()
        .route(
            "/layer",
            get(read_plain).route_layer(IdempotentLayer::new(GATED)),
        )
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    let addr = serve(app).await;
    let head = "HEAD /layer HTTP/1.1\r\nhost: x\r\nconnection: close\r\nidempotency-key: h\r\n\r\n";
    let first = exchange(addr, head, b"").await;
    let replay = exchange(addr, head, b"").await;
    assert_eq!((first.status, replay.status), (200, 200));
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(first.header("content-length"), Some("110"));
    assert_eq!(
        replay.header("content-length"),
        first.header("content-length"),
        "{replay:?}"
    );
    assert_eq!(runs.get(), 1);
}

// ===== CORS =====

/// A preflight needs no key on an `IdempotentLayer` route with CORS on its
/// method router, and claims nothing: the `POST` after it runs.
#[tokio::test]
async fn with_the_layer_a_preflight_passes_without_a_key_and_claims_nothing() {
    let gate = Gate::default();
    gate.let_through(10);
    let cors = tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods(tower_http::cors::Any)
        .allow_headers(tower_http::cors::Any);
    let app = Router::new()
        .route(
            "/layer",
            post(gated_plain)
                .route_layer(IdempotentLayer::new(GATED))
                .layer(cors),
        )
        .with_state(gate.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    let preflight = Request::options("/layer")
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "idempotency-key,content-type",
        )
        .body(Body::empty())
        .unwrap();
    let answer = send(&app, preflight).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert!(answer.headers.contains_key("access-control-allow-origin"));
    let post = send(&app, post_json("/layer", "k", BODY)).await;
    assert_eq!((post.status, post.replayed), (StatusCode::CREATED, false));
    assert_eq!(post.problem_type(), None);
}

// ===== trailers =====

/// A body that ends with a trailer, as a gRPC-style handler's does, which
/// its `Trailer` header announces (hyper sends only the trailers announced).
fn trailed_body(runs: &Runs) -> Response {
    let run = runs.bump();
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from(run));
    let frames = [
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(format!("run {run}")))),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let body = Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames,
    )));
    ([("trailer", "x-checksum")], body).into_response()
}

async fn trailed_plain(State(runs): State<Runs>, Json(_c): Json<Charge>) -> Response {
    trailed_body(&runs)
}

#[idempotent(scope = "global")]
async fn trailed_by_attribute(State(runs): State<Runs>, Json(_c): Json<Charge>) -> Response {
    trailed_body(&runs)
}

/// A response that ends with trailers reaches its first caller whole,
/// trailers included; a replay could not carry them, so it is not stored
/// and the retry is told so (410), without running the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_a_response_with_trailers_reaches_its_caller_whole_and_is_not_run_again() {
    let runs = Runs::default();
    let app = both_ways(
        trailed_by_attribute,
        trailed_plain,
        GATED,
        runs.clone(),
        Idempotency::new(MemoryStore::new()),
    )
    .layer(CompressionLayer::new());
    let addr = serve(app).await;
    for (uri, run) in [("/attribute", 1), ("/layer", 2)] {
        let head = post_head(uri, uri, BODY.len(), "te: trailers\r\n");
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(BODY.as_bytes()).await.unwrap();
        let mut received = Vec::new();
        tokio::time::timeout(HANG, stream.read_to_end(&mut received))
            .await
            .expect("the server closes the connection")
            .unwrap();
        let received = String::from_utf8_lossy(&received);
        assert!(received.starts_with("HTTP/1.1 200"), "{uri}: {received}");
        assert!(
            received.contains(&format!("run {run}")),
            "{uri}: {received}"
        );
        assert!(
            received.contains(&format!("x-checksum: {run}")),
            "{uri}: the trailer reaches the first caller: {received}"
        );
        let retry = exchange(addr, &head, BODY.as_bytes()).await;
        assert_eq!(retry.status, 410, "{uri}");
    }
    assert_eq!(runs.get(), 2);
}

// ===== the request's span =====

/// The spans each side effect's event was recorded in, innermost first.
#[derive(Clone, Default)]
struct SpansSeen(Arc<std::sync::Mutex<Vec<Vec<&'static str>>>>);

impl<S> tracing_subscriber::Layer<S> for SpansSeen
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        context: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if event.metadata().target() != SIDE_EFFECT {
            return;
        }
        let spans = context
            .event_scope(event)
            .map(|scope| scope.map(|span| span.name()).collect())
            .unwrap_or_default();
        self.0.lock().unwrap().push(spans);
    }
}

/// The gated handler, logging its side effect. Used by one test only:
/// `tracing` caches whether a call site is enabled across threads, and a
/// site other tests reach without a subscriber may be cached as off.
async fn gated_logging(State(gate): State<Gate>, Json(c): Json<Charge>) -> (StatusCode, String) {
    let answer = gate.pass(c.amount).await;
    tracing::info!(target: SIDE_EFFECT, "charged");
    answer
}

#[idempotent(scope = "global")]
async fn gated_logging_by_attribute(
    State(gate): State<Gate>,
    Json(c): Json<Charge>,
) -> (StatusCode, String) {
    gated_logging(State(gate), Json(c)).await
}

/// A run that a timeout in front let go of still logs inside the span
/// `TraceLayer` opened for its request: what it logs after its caller got
/// the timeout's answer is found under that request.
#[tokio::test]
async fn a_run_a_timeout_let_go_of_still_logs_in_its_requests_span() {
    use tracing_subscriber::layer::SubscriberExt as _;
    for uri in ["/attribute", "/layer"] {
        let seen = SpansSeen::default();
        let subscriber = tracing_subscriber::registry().with(seen.clone());
        let _default = tracing::subscriber::set_default(subscriber);
        let gate = Gate::default();
        let idempotency = Idempotency::new(MemoryStore::new());
        let trace = TraceLayer::new_for_http()
            .make_span_with(tower_http::trace::DefaultMakeSpan::new().level(tracing::Level::INFO));
        let app = both_ways(
            gated_logging_by_attribute,
            gated_logging,
            GATED,
            gate.clone(),
            idempotency.clone(),
        )
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            CUT,
        ))
        .layer(trace);
        let first = send(&app, post_json(uri, "k", BODY)).await;
        assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT, "{uri}");
        gate.let_through(1);
        tokio::time::timeout(HANG, idempotency.drain())
            .await
            .expect("the run finishes");
        let seen = seen.0.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{uri}: {seen:?}");
        assert!(seen[0].contains(&"request"), "{uri}: {seen:?}");
    }
}

#[idempotent(scope = "global")]
async fn charge_once(State(runs): State<Runs>, Json(c): Json<Charge>) -> (StatusCode, String) {
    let run = runs.bump();
    (
        StatusCode::CREATED,
        format!("run {run} amount {}", c.amount),
    )
}

/// Behind `RequestDecompressionLayer`, repeats of one gzipped request and
/// the plain form all get the one run's answer. None is answered from the
/// table of exact repeats: that takes a `Content-Length`, which these
/// requests do not carry and the layer drops from a gzipped one.
#[tokio::test]
async fn with_the_attribute_gzipped_repeats_and_the_plain_form_get_the_same_replay() {
    let runs = Runs::default();
    let app = Router::new()
        .route("/attribute", post(charge_once))
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()))
        .layer(RequestDecompressionLayer::new());
    for attempt in 0..5 {
        let request = if attempt == 4 {
            post_json("/attribute", "k", BODY)
        } else {
            gzipped_post("/attribute", "k", BODY)
        };
        let reply = send(&app, request).await;
        assert_eq!(
            (reply.status, reply.body.as_str(), reply.replayed),
            (StatusCode::CREATED, "run 1 amount 7", attempt > 0),
            "attempt {attempt}"
        );
    }
    let other = send(&app, gzipped_post("/attribute", "k", r#"{"amount":8}"#)).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.problem_type().as_deref(), Some("key-reused"));
    assert_eq!(runs.get(), 1);
}

// ===== request body timeouts =====

/// A keyed request whose body stops coming after its first bytes.
fn stalled_upload(uri: &str, key: &str) -> Request<Body> {
    let first =
        futures_util::stream::once(async { Ok::<_, Infallible>(Bytes::from_static(b"{\"amo")) });
    let stalled = futures_util::StreamExt::chain(first, futures_util::stream::pending());
    Request::post(uri)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Body::from_stream(stalled))
        .unwrap()
}

/// `RequestBodyTimeoutLayer` in front gives up on an upload that stalls:
/// the request is refused before anything is claimed, and the retry that
/// sends the whole body runs.
#[tokio::test]
async fn a_request_body_timeout_in_front_claims_nothing_and_the_whole_retry_runs() {
    for uri in ["/attribute", "/layer"] {
        let gate = Gate::default();
        gate.let_through(10);
        let app = gated_app(&gate, &Idempotency::new(MemoryStore::new()), GATED)
            .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(CUT));
        let stalled = tokio::time::timeout(HANG, send(&app, stalled_upload(uri, "k")))
            .await
            .expect("the body timeout gives up");
        assert!(stalled.status.is_client_error(), "{uri}: {stalled:?}");
        assert_eq!(gate.started(), 0, "{uri}");
        if uri == "/layer" {
            assert_eq!(stalled.problem_type().as_deref(), Some("unreadable-body"));
        }
        let retry = send(&app, post_json(uri, "k", BODY)).await;
        assert_eq!(
            (retry.status, retry.replayed, retry.body.as_str()),
            (StatusCode::CREATED, false, "run 1 amount 7"),
            "{uri}"
        );
    }
}

// ===== authentication =====

/// What an authentication middleware does: 401 without the bearer token.
async fn require_token(request: Request<Body>, next: axum::middleware::Next) -> Response {
    let authorized = request
        .headers()
        .get("authorization")
        .is_some_and(|value| value == "Bearer secret");
    if !authorized {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    next.run(request).await
}

const PER_TENANT: Endpoint = Endpoint::new("per_tenant").scope(Scope::Header("x-tenant-id"));

fn tenant_post(key: &str, token: Option<&str>) -> Request<Body> {
    let mut request = post_json("/layer", key, BODY);
    request
        .headers_mut()
        .insert("x-tenant-id", HeaderValue::from_static("acme"));
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
        request.headers_mut().insert("authorization", value);
    }
    request
}

/// `IdempotentLayer` on a route whose authentication runs in a middleware,
/// the middleware in front (`route_layer` after the layer) or behind it.
fn authenticated(gate: &Gate, auth_in_front: bool) -> Router {
    let auth = axum::middleware::from_fn(require_token);
    let route = if auth_in_front {
        post(gated_plain)
            .route_layer(IdempotentLayer::new(PER_TENANT))
            .route_layer(auth)
    } else {
        post(gated_plain)
            .route_layer(auth)
            .route_layer(IdempotentLayer::new(PER_TENANT))
    };
    Router::new()
        .route("/layer", route)
        .with_state(gate.clone())
        .layer(Idempotency::new(MemoryStore::new()))
}

/// Authentication in front of `IdempotentLayer` answers every request,
/// replays included: a caller without the token gets 401, not the stored
/// answer, and a first attempt refused for its token does not use up the
/// key for the retry that sends the right one.
#[tokio::test]
async fn with_the_layer_authentication_in_front_answers_before_the_key_is_claimed_or_replayed() {
    let gate = Gate::default();
    gate.let_through(10);
    let app = authenticated(&gate, true);
    let refused = send(&app, tenant_post("k", Some("expired"))).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let first = send(&app, tenant_post("k", Some("secret"))).await;
    assert_eq!((first.status, first.replayed), (StatusCode::CREATED, false));
    let anonymous = send(&app, tenant_post("k", None)).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let retry = send(&app, tenant_post("k", Some("secret"))).await;
    assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, true));
    assert_eq!(gate.runs(), 1);
}

/// Behind the layer, authentication runs only for the request that runs
/// the handler: a stored answer is replayed to a caller without a token.
/// Authentication belongs in front of the layer. Its 401 is not stored
/// (a refusal before anything ran), so the retry that sends the right
/// token runs.
#[tokio::test]
async fn with_the_layer_authentication_behind_it_is_skipped_by_replays() {
    let gate = Gate::default();
    gate.let_through(10);
    let app = authenticated(&gate, false);
    let refused = send(&app, tenant_post("a", Some("expired"))).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let retry = send(&app, tenant_post("a", Some("secret"))).await;
    assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, false));

    let first = send(&app, tenant_post("b", Some("secret"))).await;
    assert_eq!((first.status, first.replayed), (StatusCode::CREATED, false));
    let anonymous = send(&app, tenant_post("b", None)).await;
    assert_eq!(
        (
            anonymous.status,
            anonymous.replayed,
            anonymous.body.as_str()
        ),
        (StatusCode::CREATED, true, "run 2 amount 7")
    );
    assert_eq!(gate.runs(), 2);
}

// ===== response decompression =====

/// `DecompressionLayer` in front of a route that compresses behind
/// `IdempotentLayer` (which stores the gzip bytes): the first answer and
/// its replays reach the caller decoded alike, without a stale
/// `Content-Encoding` or `Content-Length`.
#[tokio::test]
async fn with_the_layer_decompression_in_front_decodes_the_first_answer_and_replays_alike() {
    let runs = Runs::default();
    let app = Router::new()
        .route(
            "/layer",
            post(report_plain)
                .route_layer(CompressionLayer::new())
                .route_layer(IdempotentLayer::new(GATED)),
        )
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()))
        .layer(tower_http::decompression::DecompressionLayer::new());
    let first = send(&app, post_json("/layer", "k", BODY)).await;
    let replay = send(&app, post_json("/layer", "k", BODY)).await;
    assert!(replay.replayed);
    for reply in [&first, &replay] {
        assert_eq!(reply.status, StatusCode::OK);
        assert!(!reply.headers.contains_key("content-encoding"), "{reply:?}");
        assert!(!reply.headers.contains_key("content-length"), "{reply:?}");
        let report: Report = serde_json::from_str(&reply.body).expect("decoded JSON");
        assert_eq!(report.run, 1);
    }
    assert_eq!(first.body, replay.body);
}
