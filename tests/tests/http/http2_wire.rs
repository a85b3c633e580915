//! The attribute and `IdempotentLayer` over HTTP/2 (h2c with prior
//! knowledge, as a load balancer speaks it to a service), frame by frame
//! with the `h2` crate against `axum::serve`: a run and its replays, the
//! connection-specific headers HTTP/2 forbids, streams reset while the
//! handler runs or while the body is uploaded, many streams with one key
//! on one connection, bodies in several DATA frames with trailers, an
//! empty body ended on HEADERS, the key field sent twice, and the
//! extended `CONNECT` a WebSocket opens with under a router-wide layer.

use crate::macro_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::FormRejection;
use axum::extract::{FromRequest, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Form, Json};
use axum_extra::extract::WithRejection;
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, SendStream};
use idempotent_core::record::StoredResponse;
use idempotent_core::scope::ScopeDigest;
use idempotent_core::testing::{ClaimOutcome, MockStore, OpKind, Operation};
use idempotent_core::{
    Endpoint, FingerprintError, FingerprintInput, Fingerprinter, IDEMPOTENT_REPLAYED, Idempotency,
    Scope, idempotent,
};
use macro_support::gated::{Charge, Gate, gated_app, gated_plain};
use macro_support::{ApiError, Reply, Runs, both_ways, listen, send, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};

/// How long a step that should take milliseconds may take before the test
/// gives up instead of hanging; never a condition of the outcome.
const STUCK: Duration = Duration::from_secs(10);

const LAYERED: Endpoint = Endpoint::new("h2::layered").scope(Scope::Global);

/// The two ways a handler is made idempotent, as `both_ways` serves them.
const PATHS: [&str; 2] = ["/attribute", "/layer"];

// ===== an HTTP/2 client =====

/// An HTTP/2 connection over `tcp`, with prior knowledge: the handle that
/// opens streams on it. The connection runs on a task of its own.
async fn h2_over(tcp: TcpStream) -> SendRequest<Bytes> {
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move { drop(connection.await) });
    client
}

async fn connect(addr: SocketAddr) -> SendRequest<Bytes> {
    h2_over(TcpStream::connect(addr).await.unwrap()).await
}

/// `app` served on a free loopback port for the rest of the test.
async fn serve_forever(app: axum::Router) -> SocketAddr {
    listen(app, std::future::pending()).await.0
}

/// The head of a JSON `POST` to `path`, with `keys` as its key fields (one
/// field each, in order) and `length` as its `Content-Length`, if any.
fn head(path: &str, keys: &[&str], length: Option<usize>) -> Request<()> {
    let mut request = Request::post(format!("http://test{path}"))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let headers = request.headers_mut();
    for key in keys {
        headers.append("idempotency-key", HeaderValue::from_str(key).unwrap());
    }
    if let Some(length) = length {
        headers.insert("content-length", HeaderValue::from(length));
    }
    request
}

/// Opens a stream with `request`'s HEADERS, ending the stream there if
/// `end`; the response to come and the stream's sending half.
async fn open(
    client: &SendRequest<Bytes>,
    request: Request<()>,
    end: bool,
) -> (ResponseFuture, SendStream<Bytes>) {
    let mut ready = client.clone().ready().await.unwrap();
    ready.send_request(request, end).unwrap()
}

/// Reads a response whole: status, headers, DATA frames joined.
async fn read(response: ResponseFuture) -> Reply {
    let reading = async {
        let (parts, mut body) = response.await.unwrap().into_parts();
        let mut bytes = Vec::new();
        while let Some(data) = body.data().await {
            let data = data.unwrap();
            body.flow_control().release_capacity(data.len()).unwrap();
            bytes.extend_from_slice(&data);
        }
        reply(parts.status, parts.headers, bytes)
    };
    tokio::time::timeout(STUCK, reading)
        .await
        .expect("the server answers")
}

fn reply(status: StatusCode, headers: HeaderMap, body: Vec<u8>) -> Reply {
    Reply {
        status,
        replayed: headers.contains_key(IDEMPOTENT_REPLAYED),
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

/// `body` under `key` to `path` on one stream: HEADERS with its length,
/// one DATA frame that ends the stream.
async fn exchange(client: &SendRequest<Bytes>, path: &str, key: &str, body: &str) -> Reply {
    let request = head(path, &[key], Some(body.len()));
    let (response, mut upload) = open(client, request, false).await;
    upload
        .send_data(Bytes::from(body.to_owned()), true)
        .unwrap();
    read(response).await
}

/// `body` under `key` to `path`, split into DATA frames at `cuts` (byte
/// offsets), without a `Content-Length`, the stream ended by trailers.
async fn framed_with_trailers(
    client: &SendRequest<Bytes>,
    path: &str,
    key: &str,
    body: &str,
    cuts: &[usize],
) -> Reply {
    let (response, mut upload) = open(client, head(path, &[key], None), false).await;
    let mut from = 0;
    for &cut in cuts.iter().chain([&body.len()]) {
        let frame = Bytes::from(body[from..cut].to_owned());
        upload.send_data(frame, false).unwrap();
        from = cut;
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("1234"));
    upload.send_trailers(trailers).unwrap();
    read(response).await
}

/// Asserts a first run: 201, not marked, `body`.
#[track_caller]
fn assert_ran(reply: &Reply, body: &str, case: &str) {
    assert_eq!(
        (reply.status, reply.replayed, reply.body.as_str()),
        (StatusCode::CREATED, false, body),
        "{case}: {reply:?}"
    );
}

/// Asserts a replay of `first`: its status, body and content type,
/// marked `Idempotent-Replayed: true`.
#[track_caller]
fn assert_replays(reply: &Reply, first: &Reply, case: &str) {
    assert_eq!(reply.header("idempotent-replayed"), Some("true"), "{case}");
    assert_eq!(
        (
            reply.status,
            reply.body.as_str(),
            reply.header("content-type")
        ),
        (
            first.status,
            first.body.as_str(),
            first.header("content-type")
        ),
        "{case}: {reply:?}"
    );
}

// ===== a run and its replays =====

/// Over HTTP/2 a first run answers as the handler did, and its retries on
/// the same connection are its replay, marked; another payload under the
/// key is 422. Under the attribute the third and later retries go by way
/// of the `exact` module (which the `Content-Length` makes possible): each
/// reads the stored record instead of claiming the key. The first two
/// retries there, every retry under the layer, and the other payload on
/// either, claim the key as the full path does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_and_its_replays_over_h2() {
    let gate = Gate::default();
    gate.let_through(10);
    let store = MockStore::new();
    let addr = serve_forever(gated_app(&gate, &store.layer(), LAYERED)).await;
    let client = connect(addr).await;
    let full_path = [Operation::Claim {
        outcome: ClaimOutcome::Completed,
    }];
    let exact_repeat = [Operation::Get { found: true }];
    for (round, path) in PATHS.into_iter().enumerate() {
        let key = format!("once{path}");
        let first = exchange(&client, path, &key, r#"{"amount":7}"#).await;
        assert_ran(&first, &format!("run {} amount 7", round + 1), path);
        for retry in 1..=4 {
            let before = store.operations().len();
            let reply = exchange(&client, path, &key, r#"{"amount":7}"#).await;
            assert_replays(&reply, &first, path);
            let exact = path == "/attribute" && retry >= 3;
            let expected: &[Operation] = if exact { &exact_repeat } else { &full_path };
            let calls = &store.operations()[before..];
            assert_eq!(calls, expected, "{path}: the store calls of retry {retry}");
        }
        let before = store.operations().len();
        let other = exchange(&client, path, &key, r#"{"amount":8}"#).await;
        assert_eq!(other.problem(422).0, "key-reused", "{path}");
        let calls = &store.operations()[before..];
        assert_eq!(
            calls, full_path,
            "{path}: the store calls of another payload"
        );
    }
    assert_eq!(gate.runs(), 2);
    store.assert_executed(2);
}

// ===== connection-specific headers =====

/// The headers RFC 9113 8.2.2 forbids in an HTTP/2 message, and one that
/// the response's `Connection` names as describing its connection alone.
const CONNECTION_SPECIFIC: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "x-hop",
];

#[idempotent(scope = "global")]
async fn hop_by_hop_by_attribute(State(runs): State<Runs>, Json(c): Json<Charge>) -> Response {
    with_hop_by_hop_headers(&runs, c.amount)
}

async fn hop_by_hop_plain(State(runs): State<Runs>, Json(c): Json<Charge>) -> Response {
    with_hop_by_hop_headers(&runs, c.amount)
}

/// A 201 carrying connection-specific headers, as a handler written for
/// HTTP/1.1 (or one copying a backend's response) might: all of them for
/// an even `amount`; for an odd one all but `Transfer-Encoding`, which
/// hyper's HTTP/1.1 server answers by closing the connection unanswered
/// (with or without this library), so that only HTTP/2 carries that run.
fn with_hop_by_hop_headers(runs: &Runs, amount: u64) -> Response {
    let body = format!("run {} amount {amount}", runs.bump());
    let mut response = (StatusCode::CREATED, body).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        ("connection", "x-hop"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("upgrade", "h2c"),
        ("te", "trailers"),
        ("x-hop", "1"),
        ("x-kept", "2"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if amount.is_multiple_of(2) {
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
    }
    response
}

/// Asserts that `reply` carries none of [`CONNECTION_SPECIFIC`], and does
/// carry the end-to-end `x-kept`.
#[track_caller]
fn assert_no_connection_headers(reply: &Reply, case: &str) {
    assert_none_of(reply, &CONNECTION_SPECIFIC, case);
}

#[track_caller]
fn assert_none_of(reply: &Reply, names: &[&str], case: &str) {
    for name in names {
        assert_eq!(reply.header(name), None, "{case}: {name} in {reply:?}");
    }
    assert_eq!(reply.header("x-kept"), Some("2"), "{case}: {reply:?}");
}

/// Asserts that the response stored under `key` holds none of the
/// connection-specific headers, whatever protocol it came over.
#[track_caller]
fn assert_stored_without_connection_headers(store: &MockStore, key: &str) {
    let stored: StoredResponse = store
        .stored_response(ScopeDigest::global(), key)
        .expect("stored");
    let names: Vec<&str> = stored.headers.iter().map(|(n, _)| n.as_str()).collect();
    for name in CONNECTION_SPECIFIC {
        assert!(!names.contains(&name), "{key}: {name} stored: {names:?}");
    }
}

/// A handler whose response carries every connection-specific header:
/// hyper's HTTP/2 server takes them off the first answer (and the header
/// `Connection` names) rather than refusing it, all but `TE: trailers`,
/// which that first answer carries as the handler set it. The record
/// holds none of them, `TE` included, whether its first request came over
/// HTTP/1.1 or HTTP/2, so its replays, to clients of either version,
/// carry none either and the `h2` client takes them as well-formed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_specific_headers_never_reach_an_h2_client_first_or_replayed() {
    let runs = Runs::default();
    let store = MockStore::new();
    let endpoint = Endpoint::new("h2::hop_by_hop").scope(Scope::Global);
    let app = both_ways(
        hop_by_hop_by_attribute,
        hop_by_hop_plain,
        endpoint,
        runs.clone(),
        store.layer(),
    );
    let addr = serve_forever(app).await;
    let client = connect(addr).await;
    for path in PATHS {
        // Stored from HTTP/1.1, replayed to HTTP/2 and back.
        let body = r#"{"amount":3}"#;
        let key = format!("from-h1{path}");
        let first = http1(addr, path, &key, body).await;
        assert_eq!(first.status, StatusCode::CREATED, "{path}: {first:?}");
        assert_eq!(first.header("x-hop"), Some("1"), "HTTP/1.1 passes it on");
        assert_stored_without_connection_headers(&store, &key);
        let over_h2 = exchange(&client, path, &key, body).await;
        assert_replays(&over_h2, &first, &format!("{path} h1 then h2"));
        assert_no_connection_headers(&over_h2, path);
        let over_h1 = http1(addr, path, &key, body).await;
        assert_replays(&over_h1, &first, &format!("{path} h1 then h1"));
        assert_no_connection_headers(&over_h1, path);

        // Stored from HTTP/2, `Transfer-Encoding` included, replayed to
        // HTTP/1.1 (which that header, replayed, would break) and back.
        let body = r#"{"amount":4}"#;
        let key = format!("from-h2{path}");
        let first = exchange(&client, path, &key, body).await;
        assert_eq!(first.status, StatusCode::CREATED, "{path}: {first:?}");
        // hyper takes `TE` off a response only when built with its
        // `client` feature (which this build leaves out), and h2 lets
        // `TE: trailers` through: the first answer carries the handler's
        // own, and only the record (checked next) and the replays drop it.
        let case = format!("{path}: the first answer");
        assert_eq!(first.header("te"), Some("trailers"), "{case}: {first:?}");
        let stripped: Vec<&str> = CONNECTION_SPECIFIC
            .into_iter()
            .filter(|name| *name != "te")
            .collect();
        assert_none_of(&first, &stripped, &case);
        assert_stored_without_connection_headers(&store, &key);
        let over_h1 = http1(addr, path, &key, body).await;
        assert_replays(&over_h1, &first, &format!("{path} h2 then h1"));
        assert_no_connection_headers(&over_h1, path);
        let over_h2 = exchange(&client, path, &key, body).await;
        assert_replays(&over_h2, &first, &format!("{path} h2 then h2"));
        assert_no_connection_headers(&over_h2, path);
    }
    assert_eq!(runs.get(), 4);
    store.assert_executed(4);
}

/// `body` under `key` to `path` over HTTP/1.1, on a connection of its own:
/// the answer, its body de-chunked.
async fn http1(addr: SocketAddr, path: &str, key: &str, body: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\nidempotency-key: {key}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(STUCK, read_http1(&mut stream))
        .await
        .expect("the server answers")
}

/// Reads one HTTP/1.1 response, framed by its `Content-Length`, by chunks
/// (trailers aside), or by the end of the connection.
async fn read_http1(stream: &mut TcpStream) -> Reply {
    let mut received = Vec::new();
    let head_end = loop {
        if let Some(at) = find(&received, b"\r\n\r\n") {
            break at + 4;
        }
        assert!(fill(stream, &mut received).await, "closed before the head");
    };
    let head = String::from_utf8(received[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap();
    let mut headers = HeaderMap::new();
    for line in lines.filter(|line| !line.is_empty()) {
        let (name, value) = line.split_once(':').unwrap();
        let name = HeaderName::from_bytes(name.trim().as_bytes()).unwrap();
        headers.append(name, HeaderValue::from_str(value.trim()).unwrap());
    }
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|te| te == "chunked");
    let length: Option<usize> = headers
        .get("content-length")
        .map(|length| length.to_str().unwrap().parse().unwrap());
    let body = loop {
        let rest = &received[head_end..];
        let done = match (chunked, length) {
            (true, _) => dechunk(rest),
            (false, Some(length)) => (rest.len() >= length).then(|| rest[..length].to_vec()),
            (false, None) => None,
        };
        if let Some(body) = done {
            break body;
        }
        if !fill(stream, &mut received).await {
            assert!(!chunked && length.is_none(), "closed mid-body: {head}");
            break received[head_end..].to_vec();
        }
    };
    reply(
        StatusCode::from_bytes(status.as_bytes()).unwrap(),
        headers,
        body,
    )
}

/// Reads more bytes into `received`; false at the end of the stream.
async fn fill(stream: &mut TcpStream, received: &mut Vec<u8>) -> bool {
    let mut buffer = [0; 4096];
    let read = stream.read(&mut buffer).await.unwrap_or(0);
    received.extend_from_slice(&buffer[..read]);
    read > 0
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A chunked body's data, once its last chunk (and the blank line after
/// it) has come.
fn dechunk(mut chunks: &[u8]) -> Option<Vec<u8>> {
    let mut data = Vec::new();
    loop {
        let line_end = find(chunks, b"\r\n")?;
        let size = std::str::from_utf8(&chunks[..line_end]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        chunks = &chunks[line_end + 2..];
        if size == 0 {
            return chunks.starts_with(b"\r\n").then_some(data);
        }
        if chunks.len() < size + 2 {
            return None;
        }
        data.extend_from_slice(&chunks[..size]);
        chunks = &chunks[size + 2..];
    }
}

// ===== streams reset =====

/// A stream reset (`RST_STREAM`, as a client sends when it drops the
/// request) while the handler runs: hyper drops the request, which must
/// let the server shut down gracefully while the handler is still held;
/// the handler then completes, `drain` sees its response stored, and the
/// retry, on a new connection, replays it.
async fn a_stream_reset_while_the_handler_runs(path: &str) {
    let gate = Gate::default();
    let store = MockStore::new();
    let idempotency = store.layer();
    let app = gated_app(&gate, &idempotency, LAYERED);
    let (tcp, stop, server) = serve(app.clone()).await;
    let client = h2_over(tcp).await;
    let body = r#"{"amount":7}"#;
    let (response, mut upload) = open(&client, head(path, &["k"], Some(body.len())), false).await;
    upload
        .send_data(Bytes::from_static(body.as_bytes()), true)
        .unwrap();
    gate.until_started(1).await;
    // Dropping the response and the stream is what resets it (`CANCEL`).
    drop((response, upload));
    stop.send(()).unwrap();
    let shutdown = tokio::time::timeout(STUCK, server).await;
    shutdown
        .expect("the server lets the reset stream go")
        .unwrap();
    assert_eq!(gate.runs(), 0, "{path}: the handler is still at its gate");

    gate.let_through(1);
    tokio::time::timeout(STUCK, idempotency.drain())
        .await
        .expect("drain returns once the run is stored");
    let client = connect(serve_forever(app).await).await;
    let retry = exchange(&client, path, "k", body).await;
    assert_eq!(
        (retry.status, retry.replayed, retry.body.as_str()),
        (StatusCode::CREATED, true, "run 1 amount 7"),
        "{path}"
    );
    assert_eq!(gate.runs(), 1);
    store.assert_executed(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_attribute_a_stream_reset_while_the_handler_runs_is_stored_for_the_retry() {
    a_stream_reset_while_the_handler_runs("/attribute").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_layer_a_stream_reset_while_the_handler_runs_is_stored_for_the_retry() {
    a_stream_reset_while_the_handler_runs("/layer").await;
}

/// What a reset upload is sent to: the routes, the layer they are served
/// behind and its store, and how many side effects were done.
struct Target<'a> {
    app: axum::Router,
    idempotency: Idempotency,
    store: MockStore,
    runs: Box<dyn Fn() -> usize + 'a>,
}

impl Target<'_> {
    /// The gated handler each way, let through at once (should a cut-short
    /// body reach it).
    fn gated(gate: &Gate) -> Target<'_> {
        gate.let_through(10);
        let store = MockStore::new();
        let idempotency = store.layer();
        let app = gated_app(gate, &idempotency, LAYERED);
        Target {
            app,
            idempotency,
            store,
            runs: Box::new(|| gate.runs()),
        }
    }
}

/// A body a reset upload announces whole and sends in part.
struct Upload {
    /// The request's headers beside its key and `Content-Length`.
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
    /// How many of its bytes are sent before the reset.
    sent: usize,
}

impl Upload {
    /// This upload's HTTP/2 request to `path` as the router gets it, its
    /// body ending after `sent` bytes without an error: reporting the
    /// whole body's length as its size if `as_hyper_does`, as hyper's body
    /// of a stream reset with `NO_ERROR` does, else its own.
    fn ending_short(&self, path: &str, as_hyper_does: bool) -> Request<axum::body::Body> {
        let (mut parts, ()) = self.head(path, "k").into_parts();
        parts.version = axum::http::Version::HTTP_2;
        let part = Bytes::copy_from_slice(&self.body.as_bytes()[..self.sent]);
        let announced = if as_hyper_does {
            self.body.len()
        } else {
            self.sent
        };
        let body = EndingShort {
            part: Some(part),
            announced: u64::try_from(announced).unwrap(),
        };
        Request::from_parts(parts, axum::body::Body::new(body))
    }

    /// The head of this upload to `path` under `key`, announcing the
    /// whole body.
    fn head(&self, path: &str, key: &str) -> Request<()> {
        let mut request = head(path, &[key], Some(self.body.len()));
        for &(name, value) in self.headers {
            let name = HeaderName::from_static(name);
            request
                .headers_mut()
                .insert(name, HeaderValue::from_static(value));
        }
        request
    }

    /// The whole body under `key` to `path` on one stream, answered. A
    /// server that answers without reading the body (a replay to a handler
    /// that reads it itself) may have closed the stream before it is sent:
    /// the answer is read either way.
    async fn send_whole(&self, client: &SendRequest<Bytes>, path: &str, key: &str) -> Reply {
        let (response, mut upload) = open(client, self.head(path, key), false).await;
        drop(upload.send_data(Bytes::from_static(self.body.as_bytes()), true));
        read(response).await
    }
}

/// `{"amount":7}`, of which `{"amo` comes.
const JSON_CHARGE: Upload = Upload {
    headers: &[("content-type", "application/json")],
    body: r#"{"amount":7}"#,
    sent: 5,
};

/// A stream that announces a 12-byte body, sends 5 of them and is reset
/// with `reason`: see [`an_upload_cut_short`].
async fn an_upload_reset_midway(target: &Target<'_>, path: &str, reason: Reason) -> Reply {
    an_upload_cut_short(target, path, &JSON_CHARGE, reason).await
}

/// A stream that announces `upload`'s body, sends part of it and is reset
/// with `reason`: once the server is done with it, nothing ran and
/// nothing was claimed; the retry of the whole body, on a new connection,
/// is answered.
async fn an_upload_cut_short(
    target: &Target<'_>,
    path: &str,
    upload: &Upload,
    reason: Reason,
) -> Reply {
    let addr = reset_midway(target, path, upload, reason).await;
    let store = &target.store;
    assert_eq!(
        (store.count(OpKind::Claim), (target.runs)()),
        (0, 0),
        "{path}, reset with {reason:?}: {:?}",
        store.operations()
    );
    upload.send_whole(&connect(addr).await, path, "k").await
}

/// Serves `target`, opens a stream under the key `k` that announces
/// `upload`'s body, sends part of it and resets the stream with `reason`;
/// returns once the server is done with it and nothing is left running,
/// with the address it is served at.
async fn reset_midway(
    target: &Target<'_>,
    path: &str,
    upload: &Upload,
    reason: Reason,
) -> SocketAddr {
    let settled = Arc::new(Semaphore::new(0));
    let addr = serve_forever(settling(target.app.clone(), &settled)).await;
    let client = connect(addr).await;
    let (response, mut stream) = open(&client, upload.head(path, "k"), false).await;
    let part = &upload.body.as_bytes()[..upload.sent];
    stream.send_data(Bytes::from_static(part), false).unwrap();
    stream.send_reset(reason);
    drop(response);
    let done = tokio::time::timeout(STUCK, settled.acquire()).await;
    done.expect("the server is done with the reset stream")
        .unwrap()
        .forget();
    tokio::time::timeout(STUCK, target.idempotency.drain())
        .await
        .expect("nothing left running");
    addr
}

/// `app`, adding a permit to `settled` for each request the server is
/// done with: answered, or dropped with its stream.
fn settling(app: axum::Router, settled: &Arc<Semaphore>) -> axum::Router {
    let settled = settled.clone();
    app.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let guard = SettleOnDrop(settled.clone());
            async move {
                let response = next.run(request).await;
                drop(guard);
                response
            }
        },
    ))
}

/// Adds a permit when dropped, whether its request was answered or not.
struct SettleOnDrop(Arc<Semaphore>);

impl Drop for SettleOnDrop {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

/// `CANCEL` is what a client sends when it drops a request still
/// uploading; hyper reports it to the body's reader as an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cancelled_midway_claims_nothing_and_the_retry_runs() {
    for path in PATHS {
        let gate = Gate::default();
        let retry = an_upload_reset_midway(&Target::gated(&gate), path, Reason::CANCEL).await;
        assert_ran(&retry, "run 1 amount 7", path);
    }
}

/// `NO_ERROR` is the reset RFC 9113 8.1 has a server send after an early
/// answer; a client (or a proxy) may send it too. hyper's server ends the
/// request body there as if it were whole, without an error, so only the
/// `Content-Length` tells that it was cut short. (Under the attribute,
/// `Json` refuses the 5 bytes as JSON cut short, before any claim.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_reset_without_error_midway_claims_nothing_and_the_retry_runs() {
    for path in PATHS {
        let gate = Gate::default();
        let retry = an_upload_reset_midway(&Target::gated(&gate), path, Reason::NO_ERROR).await;
        assert_ran(&retry, "run 1 amount 7", path);
    }
}

#[idempotent(scope = "global")]
async fn text_by_attribute(State(runs): State<Runs>, body: String) -> (StatusCode, String) {
    text(&runs, &body)
}

async fn text_plain(State(runs): State<Runs>, body: String) -> (StatusCode, String) {
    text(&runs, &body)
}

/// A handler that takes any prefix of its body as a whole one, as a form
/// (`currency=usd&amount=12345` cut to `currency=usd&amount=123`) or a
/// raw body does.
fn text(runs: &Runs, body: &str) -> (StatusCode, String) {
    (
        StatusCode::CREATED,
        format!("run {} of {body}", runs.bump()),
    )
}

fn text_target(runs: &Runs) -> Target<'_> {
    let store = MockStore::new();
    let idempotency = store.layer();
    let endpoint = Endpoint::new("h2::text").scope(Scope::Global);
    let app = both_ways(
        text_by_attribute,
        text_plain,
        endpoint,
        runs.clone(),
        idempotency.clone(),
    );
    Target {
        app,
        idempotency,
        store,
        runs: Box::new(|| runs.get()),
    }
}

/// Under `IdempotentLayer`, a text body whose upload is reset with
/// `NO_ERROR` midway is not run as the part that came (which the handler
/// would take as a whole body): nothing runs or is claimed, and the retry
/// runs on the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_layer_a_text_body_reset_without_error_midway_does_not_run() {
    let runs = Runs::default();
    let target = text_target(&runs);
    let retry = an_upload_reset_midway(&target, "/layer", Reason::NO_ERROR).await;
    assert_ran(&retry, r#"run 1 of {"amount":7}"#, "/layer");
}

/// The same under the attribute: the handler's own extractor (`String`
/// here, through `ExactBody`) would take the 5 bytes that came as the
/// whole body, run on them and have its answer stored, so that the retry
/// of the whole body would be 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_attribute_a_text_body_reset_without_error_midway_does_not_run() {
    let runs = Runs::default();
    let target = text_target(&runs);
    let retry = an_upload_reset_midway(&target, "/attribute", Reason::NO_ERROR).await;
    assert_ran(&retry, r#"run 1 of {"amount":7}"#, "/attribute");
}

/// A charge sent as a form.
#[derive(serde::Serialize, serde::Deserialize)]
struct FormCharge {
    currency: String,
    amount: u64,
}

/// Through `ExactBody` (a body extractor last, the scope `"global"`): a
/// JSON number, any prefix of which is a smaller one.
#[idempotent(scope = "global")]
async fn charge_json_number(
    State(runs): State<Runs>,
    Json(amount): Json<u64>,
) -> (StatusCode, String) {
    charged(&runs, amount, "usd")
}

/// Through `ExactBody`: a form, whose last field cut short still parses.
#[idempotent(scope = "global")]
async fn charge_form(
    State(runs): State<Runs>,
    Form(charge): Form<FormCharge>,
) -> (StatusCode, String) {
    charged(&runs, charge.amount, &charge.currency)
}

/// Without `ExactBody` (a scope read from a named header): the attribute
/// puts `WholeBody` around the body extractor.
#[idempotent(scope = "header:x-tenant")]
async fn charge_form_per_tenant(
    State(runs): State<Runs>,
    Form(charge): Form<FormCharge>,
) -> (StatusCode, String) {
    charged(&runs, charge.amount, &charge.currency)
}

/// Without `ExactBody` (the extractor taken as a `Result`): the body's
/// failure comes as a rejection the handler would answer itself.
#[idempotent(scope = "global")]
async fn charge_form_or_rejection(
    State(runs): State<Runs>,
    charge: Result<Form<FormCharge>, FormRejection>,
) -> (StatusCode, String) {
    match charge {
        Ok(Form(charge)) => charged(&runs, charge.amount, &charge.currency),
        Err(rejection) => (StatusCode::BAD_REQUEST, rejection.body_text()),
    }
}

/// Without `ExactBody` (axum-extra's `WithRejection`, which the attribute
/// reads through): the attribute puts `WholeBody` around it.
#[idempotent(scope = "global")]
async fn charge_json_with_rejection(
    State(runs): State<Runs>,
    WithRejection(Json(amount), _): WithRejection<Json<u64>, ApiError>,
) -> (StatusCode, String) {
    charged(&runs, amount, "usd")
}

/// A body extractor of the application's own, as the `FingerprintInput`
/// documentation has one written around another crate's: a charge read
/// through axum's `Form`, fingerprinted by its value.
struct OwnForm(FormCharge);

impl<S: Send + Sync> FromRequest<S> for OwnForm {
    type Rejection = FormRejection;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let Form(charge) = Form::<FormCharge>::from_request(request, state).await?;
        Ok(Self(charge))
    }
}

impl FingerprintInput for OwnForm {
    fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError> {
        fingerprinter.input(&self.0).map(drop)
    }
}

/// Without `ExactBody` (an extractor of the application's own, which
/// `ExactBody` does not wrap): the attribute puts `WholeBody` around it,
/// as around any last argument.
#[idempotent(scope = "global")]
async fn charge_own_form(
    State(runs): State<Runs>,
    OwnForm(charge): OwnForm,
) -> (StatusCode, String) {
    charged(&runs, charge.amount, &charge.currency)
}

fn charged(runs: &Runs, amount: u64, currency: &str) -> (StatusCode, String) {
    (
        StatusCode::CREATED,
        format!("run {} charged {amount} {currency}", runs.bump()),
    )
}

/// The charging handlers above, each at its own path, with nothing run
/// or claimed yet.
fn charges_target(runs: &Runs) -> Target<'_> {
    let store = MockStore::new();
    let idempotency = store.layer();
    let app = axum::Router::new()
        .route("/exact/json", post(charge_json_number))
        .route("/exact/form", post(charge_form))
        .route("/whole/form", post(charge_form_per_tenant))
        .route("/whole/result", post(charge_form_or_rejection))
        .route("/whole/with-rejection", post(charge_json_with_rejection))
        .route("/whole/own", post(charge_own_form))
        .with_state(runs.clone())
        .layer(idempotency.clone());
    Target {
        app,
        idempotency,
        store,
        runs: Box::new(|| runs.get()),
    }
}

/// `12345`, of which `123` comes.
const JSON_NUMBER: Upload = Upload {
    headers: &[("content-type", "application/json")],
    body: "12345",
    sent: 3,
};

/// `amount=12345`, of which `amount=123` comes.
const FORM: Upload = Upload {
    headers: &[("content-type", "application/x-www-form-urlencoded")],
    body: "currency=usd&amount=12345",
    sent: 23,
};

/// The same form, for a tenant.
const TENANT_FORM: Upload = Upload {
    headers: &[
        ("content-type", "application/x-www-form-urlencoded"),
        ("x-tenant", "acme"),
    ],
    body: "currency=usd&amount=12345",
    sent: 23,
};

/// `upload` to `path` reset with `NO_ERROR` after its part: nothing runs
/// or is claimed, and the retry runs on the whole body.
async fn a_charge_cut_short_does_not_run(path: &str, upload: &Upload) {
    let runs = Runs::default();
    let target = charges_target(&runs);
    let retry = an_upload_cut_short(&target, path, upload, Reason::NO_ERROR).await;
    assert_ran(&retry, "run 1 charged 12345 usd", path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_attribute_a_json_number_reset_without_error_midway_does_not_run() {
    a_charge_cut_short_does_not_run("/exact/json", &JSON_NUMBER).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_attribute_a_form_reset_without_error_midway_does_not_run() {
    a_charge_cut_short_does_not_run("/exact/form", &FORM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_exact_repeats_a_form_reset_without_error_midway_does_not_run() {
    a_charge_cut_short_does_not_run("/whole/form", &TENANT_FORM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_taken_as_a_result_reset_without_error_midway_does_not_run() {
    a_charge_cut_short_does_not_run("/whole/result", &FORM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_number_with_rejection_reset_without_error_midway_does_not_run() {
    a_charge_cut_short_does_not_run("/whole/with-rejection", &JSON_NUMBER).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extractor_of_the_applications_own_reset_without_error_midway_does_not_run() {
    a_charge_cut_short_does_not_run("/whole/own", &FORM).await;
}

/// What a handler that reads the body itself saw of it.
#[derive(Clone, Default)]
struct Seen(Arc<std::sync::Mutex<Vec<String>>>);

impl Seen {
    fn note(&self, seen: String) {
        self.0.lock().unwrap().push(seen);
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// The whole request, left out of the payload check: the handler reads
/// its body once the key is claimed.
#[idempotent(scope = "global", skip(request))]
async fn text_of_request(
    State(runs): State<Runs>,
    Extension(seen): Extension<Seen>,
    request: axum::extract::Request,
) -> (StatusCode, String) {
    read_text(&runs, &seen, request.into_body()).await
}

/// The body alone, likewise.
#[idempotent(scope = "global", skip(body))]
async fn text_of_body(
    State(runs): State<Runs>,
    Extension(seen): Extension<Seen>,
    body: axum::body::Body,
) -> (StatusCode, String) {
    read_text(&runs, &seen, body).await
}

/// Reads `body` to its end, as a handler that takes it does: a body that
/// fails is answered 400, as axum's own extractors answer one, and what
/// was answered is noted in `seen`; a whole one is run as [`text`].
async fn read_text(runs: &Runs, seen: &Seen, body: axum::body::Body) -> (StatusCode, String) {
    match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => text(runs, &String::from_utf8_lossy(&bytes)),
        Err(error) => {
            let answer = (StatusCode::BAD_REQUEST, format!("unreadable: {error}"));
            seen.note(format!("{} {}", answer.0, answer.1));
            answer
        }
    }
}

/// The handlers that read the body themselves, each at its own path,
/// with nothing run or claimed yet, and what they see.
fn readers_target<'a>(runs: &'a Runs, seen: &Seen) -> Target<'a> {
    let store = MockStore::new();
    let idempotency = store.layer();
    let app = axum::Router::new()
        .route("/read/request", post(text_of_request))
        .route("/read/body", post(text_of_body))
        .with_state(runs.clone())
        .layer(Extension(seen.clone()))
        .layer(idempotency.clone());
    Target {
        app,
        idempotency,
        store,
        runs: Box::new(|| runs.get()),
    }
}

/// `FORM` to `path` reset with `NO_ERROR` after its part, to a handler
/// that reads the body itself: it meets an error where the body ends
/// short, never the part that came as a whole body; its 400 answer to it
/// releases the key rather than being stored, so the retry with the whole
/// body runs, once, and its answer is what is replayed.
async fn a_body_the_handler_reads_cut_short(path: &str) {
    // The part that came, or none of it when the reset overtook it
    // before the handler read it.
    let failed = [23, 0].map(|received| {
        format!("400 Bad Request unreadable: it ended after {received} of the 25 bytes its Content-Length announced")
    });
    a_body_the_handler_reads_reset(path, Reason::NO_ERROR, &failed).await;
}

/// `FORM` to `path` reset with `reason` after its part, to a handler that
/// reads the body itself: its answer, one of `failed`, releases the key,
/// and the retry with the whole body runs once and is replayed.
async fn a_body_the_handler_reads_reset(path: &str, reason: Reason, failed: &[String]) {
    let runs = Runs::default();
    let seen = Seen::default();
    let target = readers_target(&runs, &seen);
    let addr = reset_midway(&target, path, &FORM, reason).await;
    assert_failed_and_released(&target, &seen, failed, path);
    let client = connect(addr).await;
    let retry = FORM.send_whole(&client, path, "k").await;
    assert_ran(&retry, "run 1 of currency=usd&amount=12345", path);
    let again = FORM.send_whole(&client, path, "k").await;
    assert_replays(&again, &retry, path);
    assert_eq!((seen.take().len(), runs.get()), (0, 1), "{path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_handler_reads_reset_without_error_midway_fails_and_the_retry_runs() {
    a_body_the_handler_reads_cut_short("/read/request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_the_handler_reads_reset_without_error_midway_fails_and_the_retry_runs() {
    a_body_the_handler_reads_cut_short("/read/body").await;
}

/// What a handler that reads the body itself answered once its read
/// failed, one of `failed`: answered once, under a claim that was then
/// released rather than completed, and nothing ran.
fn assert_failed_and_released(target: &Target<'_>, seen: &Seen, failed: &[String], path: &str) {
    let seen = seen.take();
    assert!(
        seen.len() == 1 && failed.contains(&seen[0]),
        "{path}: {seen:?}"
    );
    let store = &target.store;
    let operations = [OpKind::Claim, OpKind::Release, OpKind::Complete].map(|op| store.count(op));
    assert_eq!(
        (operations, (target.runs)()),
        ([1, 1, 0], 0),
        "{path}: {:?}",
        store.operations()
    );
}

/// `FORM` to `path` reset with `CANCEL` after its part (what a client
/// sends when it drops a request still uploading), to a handler that
/// reads the body itself: its read fails, and its 400 answer to that
/// releases the key rather than being stored, as a body extractor's
/// refusal of such a body is not stored, so that the retry with the
/// whole body runs, once, and its answer is what is replayed.
async fn a_body_the_handler_reads_cancelled(path: &str) {
    let failed = ["400 Bad Request unreadable: error reading a body from connection".to_owned()];
    a_body_the_handler_reads_reset(path, Reason::CANCEL, &failed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_handler_reads_cancelled_midway_fails_and_the_retry_runs() {
    a_body_the_handler_reads_cancelled("/read/request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_the_handler_reads_cancelled_midway_fails_and_the_retry_runs() {
    a_body_the_handler_reads_cancelled("/read/body").await;
}

/// The same over HTTP/1.1, whose body is not held to its length by the
/// attribute (hyper fails it): the client sends part of the body and
/// closes its connection. The handler's read fails, its 400 is not
/// stored, and the retry with the whole body runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_a_body_the_handler_reads_broken_off_midway_fails_and_the_retry_runs() {
    for path in ["/read/request", "/read/body"] {
        let runs = Runs::default();
        let seen = Seen::default();
        let target = readers_target(&runs, &seen);
        let (arrived, settled) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
        let app = settling(target.app.clone(), &settled).layer(axum::middleware::from_fn({
            let arrived = arrived.clone();
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                arrived.add_permits(1);
                next.run(request)
            }
        }));
        let addr = serve_forever(app).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let (whole, sent) = (FORM.body, &FORM.body[..FORM.sent]);
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: test\r\nidempotency-key: k\r\ncontent-length: {}\r\n\r\n{sent}",
            whole.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let came = tokio::time::timeout(STUCK, arrived.acquire()).await;
        came.expect("the request reaches the router")
            .unwrap()
            .forget();
        drop(stream);
        let done = tokio::time::timeout(STUCK, settled.acquire()).await;
        done.expect("the server is done with the request")
            .unwrap()
            .forget();
        tokio::time::timeout(STUCK, target.idempotency.drain())
            .await
            .expect("nothing left running");
        let failed =
            ["400 Bad Request unreadable: error reading a body from connection".to_owned()];
        assert_failed_and_released(&target, &seen, &failed, path);
        let retry = http1(addr, path, "k", whole).await;
        assert_ran(&retry, "run 1 of currency=usd&amount=12345", path);
        let again = http1(addr, path, "k", whole).await;
        assert_replays(&again, &retry, path);
    }
}

/// What a client whose stream was not reset would be answered (over the
/// wire the reset stream takes no answer): an HTTP/2 request whose body
/// ends short of its `Content-Length`, as hyper hands it on, is refused
/// with the problem `IdempotentLayer` answers, through either expansion,
/// before any claim.
#[tokio::test]
async fn an_http2_body_short_of_its_length_is_answered_400_unreadable_body() {
    for (path, upload) in [
        ("/exact/json", &JSON_NUMBER),
        ("/exact/form", &FORM),
        ("/whole/form", &TENANT_FORM),
        ("/whole/result", &FORM),
        ("/whole/with-rejection", &JSON_NUMBER),
        ("/whole/own", &FORM),
    ] {
        let runs = Runs::default();
        let target = charges_target(&runs);
        let reply = send(&target.app, upload.ending_short(path, true)).await;
        let (kind, detail) = reply.problem(400);
        assert_eq!(kind, "unreadable-body", "{path}");
        let announced = format!(
            "it ended after {} of the {} bytes its Content-Length announced",
            upload.sent,
            upload.body.len()
        );
        assert!(detail.contains(&announced), "{path}: {detail}");
        assert_eq!(
            (target.store.count(OpKind::Claim), runs.get()),
            (0, 0),
            "{path}"
        );
    }
}

/// A body that a layer in front replaced with a shorter one, leaving the
/// `Content-Length` header, reports its own size: it is taken as it comes
/// (the layer's business), not refused as one hyper ended short.
#[tokio::test]
async fn an_http2_body_a_layer_replaced_is_taken_as_it_comes() {
    for path in ["/exact/form", "/whole/form"] {
        let runs = Runs::default();
        let target = charges_target(&runs);
        let upload = if path == "/whole/form" {
            &TENANT_FORM
        } else {
            &FORM
        };
        let reply = send(&target.app, upload.ending_short(path, false)).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{path}: {}", reply.body);
        assert_eq!(reply.body, "run 1 charged 123 usd", "{path}");
    }
}

/// A body that reports `announced` bytes as its exact size and ends,
/// without an error, after `part`.
struct EndingShort {
    part: Option<Bytes>,
    announced: u64,
}

impl http_body::Body for EndingShort {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(
            self.part
                .take()
                .map(|part| Ok(http_body::Frame::data(part))),
        )
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.announced)
    }
}

// ===== many streams, one key, one connection =====

/// `count` requests of `body` under `key` to `path`, all on `client`'s
/// one connection at once, each answer sent to the receiver as it comes.
fn burst(
    client: &SendRequest<Bytes>,
    path: &str,
    key: &str,
    count: usize,
) -> mpsc::UnboundedReceiver<Reply> {
    let (answers, received) = mpsc::unbounded_channel();
    for _ in 0..count {
        let (client, answers) = (client.clone(), answers.clone());
        let (path, key) = (path.to_owned(), key.to_owned());
        tokio::spawn(async move {
            let reply = exchange(&client, &path, &key, r#"{"amount":5}"#).await;
            drop(answers.send(reply));
        });
    }
    received
}

async fn next(answers: &mut mpsc::UnboundedReceiver<Reply>) -> Reply {
    let next = tokio::time::timeout(STUCK, answers.recv()).await;
    next.expect("an answer").expect("a sender left")
}

/// Seventeen streams with one key opened at once on one connection: one
/// runs (and is held), the sixteen others are answered 409 while it is;
/// once it answers, sixteen more on the same connection are its replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_with_one_key_run_once_and_the_others_are_409() {
    const OTHERS: usize = 16;
    let gate = Gate::default();
    let store = MockStore::new();
    let addr = serve_forever(gated_app(&gate, &store.layer(), LAYERED)).await;
    let client = connect(addr).await;
    for (round, path) in PATHS.into_iter().enumerate() {
        let key = format!("burst{path}");
        let mut answers = burst(&client, path, &key, OTHERS + 1);
        for _ in 0..OTHERS {
            let refused = next(&mut answers).await;
            assert_eq!(refused.problem(409).0, "request-in-progress", "{path}");
            assert!(refused.header("retry-after").is_some(), "{path}");
        }
        // The one that claimed the key may reach the gate after the others
        // were answered; none of them can, being answered.
        gate.until_started(round + 1).await;
        assert_eq!(gate.started(), round + 1, "{path}: one run at a time");
        gate.let_through(1);
        let first = next(&mut answers).await;
        assert_ran(&first, &format!("run {} amount 5", round + 1), path);
        let mut replays = burst(&client, path, &key, OTHERS);
        for _ in 0..OTHERS {
            assert_replays(&next(&mut replays).await, &first, path);
        }
    }
    assert_eq!(gate.runs(), 2);
    store.assert_executed(2);
}

#[idempotent(scope = "global", wait = "10s")]
async fn waiting_by_attribute(
    State(gate): State<Gate>,
    Json(c): Json<Charge>,
) -> (StatusCode, String) {
    gate.pass(c.amount).await
}

/// With `wait`, the streams that find the key in flight wait for the one
/// that runs, on the same connection, and all replay its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_with_one_key_wait_and_replay_with_wait() {
    const OTHERS: usize = 16;
    let gate = Gate::default();
    let store = MockStore::new();
    let endpoint = LAYERED.wait(Duration::from_secs(10));
    let app = both_ways(
        waiting_by_attribute,
        gated_plain,
        endpoint,
        gate.clone(),
        store.layer(),
    );
    let client = connect(serve_forever(app).await).await;
    for (round, path) in PATHS.into_iter().enumerate() {
        let key = format!("wait{path}");
        let mut first = burst(&client, path, &key, 1);
        gate.until_started(round + 1).await;
        let in_flight = store.claims(ClaimOutcome::InFlight);
        let mut waiters = burst(&client, path, &key, OTHERS);
        until_claims_in_flight(&store, in_flight + OTHERS).await;
        assert!(waiters.try_recv().is_err(), "{path}: one answered early");
        gate.let_through(1);
        let first = next(&mut first).await;
        assert_ran(&first, &format!("run {} amount 5", round + 1), path);
        for _ in 0..OTHERS {
            assert_replays(&next(&mut waiters).await, &first, path);
        }
    }
    assert_eq!(gate.runs(), 2);
    store.assert_executed(2);
}

/// Waits until `store` has answered `count` claims with the key in
/// flight. Nothing else tells that a duplicate reached the engine (it
/// waits inside it), so the store's log is polled; only how long that
/// takes varies, never the outcome.
async fn until_claims_in_flight(store: &MockStore, count: usize) {
    let waiting = async {
        while store.claims(ClaimOutcome::InFlight) < count {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(STUCK, waiting)
        .await
        .expect("the duplicates reach the engine");
}

// ===== framing =====

/// A body in several DATA frames ended by trailers, without a
/// `Content-Length`, is the same request as the body in one frame with
/// one, in either order; another payload so framed is 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_in_several_data_frames_with_trailers_is_the_same_request() {
    let gate = Gate::default();
    gate.let_through(10);
    let store = MockStore::new();
    let addr = serve_forever(gated_app(&gate, &store.layer(), LAYERED)).await;
    let client = connect(addr).await;
    let body = r#"{"amount":1}"#;
    for path in PATHS {
        for framed_first in [true, false] {
            let key = format!("frames{path}-{framed_first}");
            let framed = || framed_with_trailers(&client, path, &key, body, &[1, 5]);
            let whole = || exchange(&client, path, &key, body);
            let (first, retry) = if framed_first {
                (framed().await, whole().await)
            } else {
                (whole().await, framed().await)
            };
            let case = format!("{path}, framed first: {framed_first}");
            assert_eq!((first.status, first.replayed), (StatusCode::CREATED, false));
            assert_replays(&retry, &first, &case);
            let other = framed_with_trailers(&client, path, &key, r#"{"amount":2}"#, &[3]);
            assert_eq!(other.await.problem(422).0, "key-reused", "{case}");
        }
    }
    assert_eq!(gate.runs(), 4);
    store.assert_executed(4);
}

#[idempotent(scope = "global")]
async fn bodiless_by_attribute(State(runs): State<Runs>) -> (StatusCode, String) {
    bodiless(&runs)
}

async fn bodiless_plain(State(runs): State<Runs>) -> (StatusCode, String) {
    bodiless(&runs)
}

fn bodiless(runs: &Runs) -> (StatusCode, String) {
    (StatusCode::CREATED, format!("run {}", runs.bump()))
}

/// The ways an HTTP/2 client sends an empty body.
#[derive(Debug, Clone, Copy)]
enum Empty {
    /// END_STREAM on HEADERS, no `Content-Length`.
    EndedOnHeaders,
    /// END_STREAM on HEADERS with `Content-Length: 0`.
    ZeroLength,
    /// HEADERS, then an empty DATA frame that ends the stream.
    InADataFrame,
}

async fn empty_post(client: &SendRequest<Bytes>, path: &str, key: &str, how: Empty) -> Reply {
    let length = matches!(how, Empty::ZeroLength).then_some(0);
    let ended = !matches!(how, Empty::InADataFrame);
    let (response, mut upload) = open(client, head(path, &[key], length), ended).await;
    if !ended {
        upload.send_data(Bytes::new(), true).unwrap();
    }
    read(response).await
}

/// An empty-bodied `POST` whose HEADERS frame ends the stream runs once,
/// and its retries, so sent or with `Content-Length: 0` or an empty DATA
/// frame, are its replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_post_ended_on_its_headers_runs_once_and_replays() {
    let runs = Runs::default();
    let store = MockStore::new();
    let endpoint = Endpoint::new("h2::bodiless").scope(Scope::Global);
    let app = both_ways(
        bodiless_by_attribute,
        bodiless_plain,
        endpoint,
        runs.clone(),
        store.layer(),
    );
    let client = connect(serve_forever(app).await).await;
    for (round, path) in PATHS.into_iter().enumerate() {
        let key = format!("empty{path}");
        let first = empty_post(&client, path, &key, Empty::EndedOnHeaders).await;
        assert_ran(&first, &format!("run {}", round + 1), path);
        for how in [
            Empty::EndedOnHeaders,
            Empty::ZeroLength,
            Empty::InADataFrame,
        ] {
            let retry = empty_post(&client, path, &key, how).await;
            assert_replays(&retry, &first, &format!("{path} {how:?}"));
        }
    }
    assert_eq!(runs.get(), 2);
    store.assert_executed(2);
}

// ===== the key field twice =====

/// The key field twice in one HEADERS block (the same value or two), or
/// one field holding two values, is a 400 problem that runs and claims
/// nothing, as over HTTP/1.1; the stream and the connection stay usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_field_sent_twice_in_one_headers_block_is_a_400_problem() {
    let gate = Gate::default();
    gate.let_through(10);
    let store = MockStore::new();
    let addr = serve_forever(gated_app(&gate, &store.layer(), LAYERED)).await;
    let client = connect(addr).await;
    let body = r#"{"amount":1}"#;
    for path in PATHS {
        for keys in [&["a", "a"][..], &["a", "b"], &["a, b"]] {
            let request = head(path, keys, Some(body.len()));
            let (response, mut upload) = open(&client, request, false).await;
            upload
                .send_data(Bytes::from_static(body.as_bytes()), true)
                .unwrap();
            let refused = read(response).await;
            let (kind, _) = refused.problem(400);
            assert_eq!(kind, "invalid-key", "{path} {keys:?}");
        }
        let single = exchange(&client, path, &format!("single{path}"), body).await;
        assert_eq!(single.status, StatusCode::CREATED, "{path}: {single:?}");
    }
    assert_eq!(store.count(OpKind::Claim), 2);
    assert_eq!(gate.runs(), 2);
}

// ===== bodies that reach their length =====

#[idempotent(scope = "global")]
async fn sized_by_attribute(State(runs): State<Runs>, body: Bytes) -> (StatusCode, String) {
    sized(&runs, &body)
}

async fn sized_plain(State(runs): State<Runs>, body: Bytes) -> (StatusCode, String) {
    sized(&runs, &body)
}

fn sized(runs: &Runs, body: &[u8]) -> (StatusCode, String) {
    let run = runs.bump();
    (
        StatusCode::CREATED,
        format!("run {run} of {} bytes", body.len()),
    )
}

/// A handler that answers with its body's size, each way, with `front`
/// around the whole router.
fn sized_app(
    runs: &Runs,
    store: &MockStore,
    front: impl FnOnce(axum::Router) -> axum::Router,
) -> axum::Router {
    let endpoint = Endpoint::new("h2::sized").scope(Scope::Global);
    front(both_ways(
        sized_by_attribute,
        sized_plain,
        endpoint,
        runs.clone(),
        store.layer(),
    ))
}

/// `body` under `key` to `path` with `headers`, its `Content-Length` the
/// body's: in as many DATA frames as flow control makes of it, then
/// trailers if `trailers`, else the last frame ends the stream.
async fn sized_exchange(
    client: &SendRequest<Bytes>,
    path: &str,
    key: &str,
    headers: &[(&'static str, &'static str)],
    body: Vec<u8>,
    trailers: bool,
) -> Reply {
    let mut request = head(path, &[key], Some(body.len()));
    for &(name, value) in headers {
        let name = HeaderName::from_static(name);
        request
            .headers_mut()
            .insert(name, HeaderValue::from_static(value));
    }
    let (response, mut upload) = open(client, request, false).await;
    upload.send_data(Bytes::from(body), !trailers).unwrap();
    if trailers {
        let mut fields = HeaderMap::new();
        fields.insert("x-checksum", HeaderValue::from_static("1234"));
        upload.send_trailers(fields).unwrap();
    }
    read(response).await
}

/// An HTTP/2 body that reaches its `Content-Length` runs as it came,
/// however it got there: past the connection's flow-control window (many
/// DATA frames, released as read), followed by trailers, after `Expect:
/// 100-continue`, or empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_body_that_reaches_its_length_runs_whatever_its_framing() {
    const PAST_THE_WINDOW: usize = 300_000;
    let octets = ("content-type", "application/octet-stream");
    let expect = ("expect", "100-continue");
    let cases = [
        ("window", &[octets][..], PAST_THE_WINDOW, false),
        ("trailers", &[octets], 12, true),
        ("expect", &[octets, expect], 5, false),
        ("empty", &[octets], 0, false),
    ];
    for path in PATHS {
        let runs = Runs::default();
        let store = MockStore::new();
        let client = connect(serve_forever(sized_app(&runs, &store, |app| app)).await).await;
        for (run, (key, headers, size, trailers)) in cases.into_iter().enumerate() {
            let body = vec![b'a'; size];
            let reply = sized_exchange(&client, path, key, headers, body, trailers).await;
            let expected = format!("run {} of {size} bytes", run + 1);
            assert_eq!(reply.status, StatusCode::CREATED, "{path} {key}: {reply:?}");
            assert_eq!(reply.body, expected, "{path} {key}");
        }
    }
}

/// Behind tower-http's request decompression, which drops the
/// `Content-Length` of the gzip body it decodes, the decoded body runs;
/// behind its body limit, which keeps the size hyper's body reports, a
/// whole body runs and one that ended short is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_body_through_tower_http_layers_in_front_is_checked_as_hyper_sent_it() {
    use tower_http::decompression::RequestDecompressionLayer;
    use tower_http::limit::RequestBodyLimitLayer;
    let front = |app: axum::Router| {
        app.layer(RequestBodyLimitLayer::new(1 << 20))
            .layer(RequestDecompressionLayer::new())
    };
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gzip, &[b'x'; 5000]).unwrap();
    let gzip = gzip.finish().unwrap();
    let gzipped = [
        ("content-type", "application/octet-stream"),
        ("content-encoding", "gzip"),
    ];
    for path in PATHS {
        let runs = Runs::default();
        let store = MockStore::new();
        let app = sized_app(&runs, &store, front);
        let client = connect(serve_forever(app.clone()).await).await;
        let reply = sized_exchange(&client, path, "gzip", &gzipped, gzip.clone(), false).await;
        assert_eq!(reply.body, "run 1 of 5000 bytes", "{path}: {reply:?}");
        let reply = sized_exchange(&client, path, "whole", &[], b"12345".to_vec(), false).await;
        assert_eq!(reply.body, "run 2 of 5 bytes", "{path}: {reply:?}");
        let reply = send(&app, FORM.ending_short(path, true)).await;
        assert_eq!(reply.problem(400).0, "unreadable-body", "{path}");
        assert_eq!(runs.get(), 2, "{path}");
    }
}

// ===== tunnels =====

/// One `IdempotentLayer` over every route of a router, as a `route_layer`
/// on the `Router`.
const ROUTER_WIDE: Endpoint = Endpoint::new("h2::router_wide").scope(Scope::Global);

/// What a WebSocket route answers once it accepts the tunnel (axum's
/// `WebSocketUpgrade` answers 200 to an HTTP/2 `CONNECT`), the tunnel
/// itself left unread.
async fn accepts_the_tunnel(State(runs): State<Runs>) -> &'static str {
    runs.bump();
    "tunnel open"
}

/// A router whose routes are all under one `IdempotentLayer`, with a
/// WebSocket route routed by `any`, as axum routes one to take the
/// `CONNECT` a WebSocket over HTTP/2 opens with.
fn router_wide_with_a_websocket_route(runs: &Runs) -> axum::Router {
    axum::Router::new()
        .route("/orders", post(sized_plain))
        .route("/ws", axum::routing::any(accepts_the_tunnel))
        .route_layer(idempotent_core::IdempotentLayer::new(ROUTER_WIDE))
        .with_state(runs.clone())
        .layer(Idempotency::new(idempotent_core::store::MemoryStore::new()))
}

/// Waits until the server said it takes extended `CONNECT` (RFC 8441),
/// as `axum::serve` does, in the SETTINGS that follow the handshake.
async fn until_extended_connect(client: &mut SendRequest<Bytes>) {
    let said = async {
        while !client.is_extended_connect_protocol_enabled() {
            *client = client.clone().ready().await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(STUCK, said)
        .await
        .expect("the server takes extended CONNECT");
}

/// Opens a WebSocket over HTTP/2 to `/ws` as a browser does, an extended
/// `CONNECT` whose stream stays open for the tunnel, with `key` as its
/// key if any: the status it is answered, and whether it is marked as a
/// replay; `None` if no answer came.
async fn open_websocket(
    client: &SendRequest<Bytes>,
    key: Option<&str>,
) -> Option<(StatusCode, bool)> {
    let mut request = Request::connect("http://test/ws")
        .header("sec-websocket-version", "13")
        .extension(h2::ext::Protocol::from_static("websocket"))
        .body(())
        .unwrap();
    if let Some(key) = key {
        let key = HeaderValue::from_str(key).unwrap();
        request.headers_mut().insert("idempotency-key", key);
    }
    let (response, _tunnel) = open(client, request, false).await;
    let answered = tokio::time::timeout(STUCK, response).await.ok()?;
    let response = answered.unwrap();
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    Some((response.status(), replayed))
}

/// A WebSocket over HTTP/2 opens with a `CONNECT` (over HTTP/1.1, with a
/// `GET`), its tunnel the stream that follows the answer. Under a
/// router-wide `IdempotentLayer` each one reaches its route: without a
/// key, not refused for the key it has no use for; with one, not answered
/// with a stored `200`, which would open no tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_http2_passes_a_router_wide_layer_as_over_http1() {
    let runs = Runs::default();
    let app = router_wide_with_a_websocket_route(&runs);
    let mut client = connect(serve_forever(app).await).await;
    until_extended_connect(&mut client).await;
    for (attempt, key) in [None, Some("ws"), Some("ws")].into_iter().enumerate() {
        let answer = open_websocket(&client, key).await;
        assert_eq!(
            answer,
            Some((StatusCode::OK, false)),
            "attempt {attempt}, key {key:?}"
        );
    }
    assert_eq!(runs.get(), 3);
}
