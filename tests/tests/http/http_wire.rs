//! What real HTTP/1 clients and proxies send, over a real socket to a real
//! server (`axum::serve`): `Expect: 100-continue`, chunked bodies with
//! trailers, connections dropped while uploading or while the handler
//! runs, pipelining, HTTP/1.0, compression and oversized or repeated key
//! headers. Each holds the contract: one run per key, a replay that is
//! the first answer byte for byte, 409 and 422 problems, and nothing
//! claimed for a body that never arrived.

use crate::macro_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::testing::{MockStore, OpKind};
use idempotent_core::{Endpoint, IdempotentLayer, Scope, idempotent};
use macro_support::{Reply, Runs, Turnstile, gunzip, listen};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tower_http::compression::CompressionLayer;

/// How long a step that should take milliseconds may take before the test
/// gives up instead of hanging; never a condition of the outcome.
const STUCK: Duration = Duration::from_secs(10);

/// What the handlers share: how many times they ran, and the turnstile
/// the held ones wait at, which tells the test when one has arrived.
#[derive(Clone, Default)]
struct Shop {
    runs: Runs,
    gate: Turnstile,
}

#[derive(Serialize, Deserialize)]
struct Charge {
    amount: u64,
}

#[idempotent(scope = "global")]
async fn charge(State(shop): State<Shop>, Json(c): Json<Charge>) -> (StatusCode, Json<Value>) {
    let run = shop.runs.bump();
    (
        StatusCode::CREATED,
        Json(json!({"run": run, "amount": c.amount, "pad": "x".repeat(64)})),
    )
}

/// `charge`, once the test opens the gate.
#[idempotent(scope = "global")]
async fn held_charge(State(shop): State<Shop>, Json(c): Json<Charge>) -> (StatusCode, Json<Value>) {
    shop.gate.pass().await;
    let run = shop.runs.bump();
    (
        StatusCode::CREATED,
        Json(json!({"run": run, "amount": c.amount})),
    )
}

/// A plain handler made idempotent by `IdempotentLayer`, which
/// fingerprints the raw body.
async fn raw_charge(State(shop): State<Shop>, body: Bytes) -> (StatusCode, String) {
    let run = shop.runs.bump();
    let body = String::from_utf8_lossy(&body).into_owned();
    // Padded past the size compression starts at.
    let pad = "x".repeat(64);
    (StatusCode::CREATED, format!("run {run}: {body} {pad}"))
}

/// `raw_charge`, once the test opens the gate.
async fn held_raw_charge(State(shop): State<Shop>, body: Bytes) -> (StatusCode, String) {
    shop.gate.pass().await;
    raw_charge(State(shop), body).await
}

/// Counts requests the server is done with: answered, or dropped with
/// their connection. Lets a test wait until the server has dealt with a
/// client that went away.
#[derive(Clone)]
struct Settled(Arc<watch::Sender<usize>>);

impl Settled {
    fn new() -> Self {
        Self(Arc::new(watch::channel(0).0))
    }
    async fn wait_for(&self, count: usize) {
        let mut settled = self.0.subscribe();
        tokio::time::timeout(STUCK, settled.wait_for(|&n| n >= count))
            .await
            .expect("the server settles the request")
            .unwrap();
    }
}

/// Bumps [`Settled`] when dropped, whether its request was answered or
/// cancelled.
struct SettleOnDrop(Settled);

impl Drop for SettleOnDrop {
    fn drop(&mut self) {
        self.0.0.send_modify(|n| *n += 1);
    }
}

/// The routes under test, behind `store`'s layer: `/charges` and `/held`
/// by attribute, `/raw` and `/held-raw` by `IdempotentLayer`.
fn shop_app(shop: &Shop, store: &MockStore) -> Router {
    let layer = |name| IdempotentLayer::new(Endpoint::new(name).scope(Scope::Global));
    Router::new()
        .route("/charges", post(charge))
        .route("/held", post(held_charge))
        .route("/raw", post(raw_charge).route_layer(layer("wire::raw")))
        .route(
            "/held-raw",
            post(held_raw_charge).route_layer(layer("wire::held_raw")),
        )
        .with_state(shop.clone())
        .layer(store.layer())
}

/// Serves `app` on a free loopback port for the rest of the test,
/// counting settled requests.
async fn serve(app: Router) -> (SocketAddr, Settled) {
    let settled = Settled::new();
    let counter = settled.clone();
    let app = app.layer(axum::middleware::from_fn(
        move |request: Request, next: Next| {
            let guard = SettleOnDrop(counter.clone());
            async move {
                let response = next.run(request).await;
                drop(guard);
                response
            }
        },
    ));
    let (addr, _server) = listen(app, std::future::pending()).await;
    (addr, settled)
}

// ===== a raw HTTP/1 client =====

/// One response as it came off the wire.
#[derive(Debug)]
struct Answer {
    /// Status line and header lines, as sent.
    head: String,
    status: u16,
    headers: Vec<(String, String)>,
    /// The body, de-chunked.
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.iter().filter(|(n, _)| n == name);
        values.next().map(|(_, value)| value.as_str())
    }
    fn count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n == name).count()
    }
    fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }
    fn text(&self) -> String {
        format!("{}{}", self.head, String::from_utf8_lossy(&self.body))
    }
    /// Asserts this is the library's problem of `kind` with `status`; its
    /// detail.
    #[track_caller]
    fn assert_problem(&self, status: u16, kind: &str) -> String {
        let (found, detail) = self.reply().problem(status);
        assert_eq!(found, kind, "{}", self.text());
        detail
    }
    /// This answer as the shared checks read one.
    fn reply(&self) -> Reply {
        let headers = self.headers.iter().map(|(name, value)| {
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            (name, HeaderValue::from_str(value).unwrap())
        });
        Reply {
            status: StatusCode::from_u16(self.status).unwrap(),
            replayed: self.replayed(),
            headers: headers.collect(),
            body: String::from_utf8_lossy(&self.body).into_owned(),
        }
    }
    /// The head without the lines a replay changes by design (`date`, its
    /// marker).
    fn comparable_head(&self) -> String {
        let lines = self.head.split_inclusive("\r\n");
        let kept = lines.filter(|line| {
            let line = line.to_ascii_lowercase();
            !line.starts_with("date: ") && !line.starts_with("idempotent-replayed: ")
        });
        kept.collect()
    }
    /// [`Self::comparable_head`], then the body: what must be equal byte
    /// for byte.
    fn comparable(&self) -> String {
        let body = String::from_utf8_lossy(&self.body);
        format!("{}{body}", self.comparable_head())
    }
}

/// A raw HTTP/1 connection.
struct Wire {
    stream: TcpStream,
    read: Vec<u8>,
}

impl Wire {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        Self {
            stream,
            read: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes; false at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut buffer = [0; 8192];
        let read = tokio::time::timeout(STUCK, self.stream.read(&mut buffer))
            .await
            .expect("the server answers")
            .unwrap_or(0);
        self.read.extend_from_slice(&buffer[..read]);
        read > 0
    }

    /// The next `len` bytes.
    async fn take(&mut self, len: usize) -> Vec<u8> {
        while self.read.len() < len {
            assert!(self.fill().await, "the connection closed mid-body");
        }
        self.read.drain(..len).collect()
    }

    /// The next line, without its CRLF.
    async fn line(&mut self) -> String {
        loop {
            if let Some(end) = self.read.windows(2).position(|w| w == b"\r\n") {
                let line = self.take(end + 2).await;
                return String::from_utf8_lossy(&line[..end]).into_owned();
            }
            assert!(self.fill().await, "the connection closed mid-line");
        }
    }

    /// Whether the server has closed the connection, with nothing more
    /// sent.
    async fn closed(&mut self) -> bool {
        self.read.is_empty() && !self.fill().await
    }

    /// The next response (an interim `1xx` included); `bodiless` for the
    /// answer to a `HEAD`.
    async fn answer(&mut self, bodiless: bool) -> Answer {
        let mut head = String::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            head.push_str(&line);
            head.push_str("\r\n");
        }
        let status = head[9..12].parse().expect("a status line");
        let headers: Vec<(String, String)> = head
            .split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(": "))
            .map(|(name, value)| (name.to_ascii_lowercase(), value.to_owned()))
            .collect();
        let mut answer = Answer {
            head,
            status,
            headers,
            body: Vec::new(),
        };
        if bodiless || (100..200).contains(&status) || status == 204 || status == 304 {
            return answer;
        }
        answer.body = if answer.header("transfer-encoding") == Some("chunked") {
            self.chunked_body().await
        } else if let Some(length) = answer.header("content-length") {
            self.take(length.parse().unwrap()).await
        } else {
            while self.fill().await {}
            std::mem::take(&mut self.read)
        };
        answer
    }

    async fn chunked_body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let size = self.line().await;
            let size = usize::from_str_radix(size.split(';').next().unwrap(), 16).unwrap();
            if size == 0 {
                while !self.line().await.is_empty() {}
                return body;
            }
            body.extend(self.take(size).await);
            assert_eq!(self.line().await, "", "a chunk ends with CRLF");
        }
    }

    /// The final answer, skipping interim ones.
    async fn final_answer(&mut self) -> Answer {
        loop {
            let answer = self.answer(false).await;
            if answer.status >= 200 {
                return answer;
            }
        }
    }
}

/// A request head; `extra` holds whole header lines.
fn head(method: &str, path: &str, extra: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n{extra}\r\n"
    )
}

/// A whole request with a `Content-Length` body.
fn sized(path: &str, extra: &str, body: &str) -> String {
    let extra = format!("{extra}content-length: {}\r\n", body.len());
    format!("{}{body}", head("POST", path, &extra))
}

/// One request with a `Content-Length` body on a new connection.
async fn exchange(addr: SocketAddr, path: &str, extra: &str, body: &str) -> Answer {
    let mut wire = Wire::connect(addr).await;
    wire.send(sized(path, extra, body).as_bytes()).await;
    wire.final_answer().await
}

/// `body` split into the given chunk sizes (the rest in one), then the
/// last chunk with `trailers` (whole lines).
fn chunked(body: &str, sizes: &[usize], trailers: &str) -> String {
    let mut rest = body;
    let mut encoded = String::new();
    for &size in sizes {
        let (chunk, after) = rest.split_at(size);
        encoded.push_str(&format!("{size:x}\r\n{chunk}\r\n"));
        rest = after;
    }
    if !rest.is_empty() {
        encoded.push_str(&format!("{:x}\r\n{rest}\r\n", rest.len()));
    }
    encoded.push_str(&format!("0\r\n{trailers}\r\n"));
    encoded
}

// ===== Expect: 100-continue =====

/// Sends the head of a `POST` of `body` to `path` under `key`, asking for
/// `100 Continue`, and the body only once that comes: whether it came,
/// and the final answer (the first answer, if not a `100`).
async fn expecting(wire: &mut Wire, path: &str, key: &str, body: &str) -> (bool, Answer) {
    let extra = format!(
        "idempotency-key: {key}\r\nexpect: 100-continue\r\ncontent-length: {}\r\n",
        body.len()
    );
    wire.send(head("POST", path, &extra).as_bytes()).await;
    let first = wire.answer(false).await;
    if first.status != 100 {
        return (false, first);
    }
    wire.send(body.as_bytes()).await;
    (true, wire.final_answer().await)
}

/// Each keyed upload is let in with `100 Continue`: the key is checked
/// against the store only once the payload, which decides between a
/// replay, 409 and 422, has arrived. A duplicate sent while the first runs
/// gets 409, one after it the replay byte for byte, one with another
/// payload 422, all on one kept-alive connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_uploads_get_409_replay_and_422_after_the_body() {
    let shop = Shop::default();
    let store = MockStore::new();
    let (addr, _) = serve(shop_app(&shop, &store)).await;
    for (round, path) in ["/held", "/held-raw"].into_iter().enumerate() {
        expect_continue_contract(&shop, addr, path).await;
        assert_eq!(shop.runs.get(), round + 1, "{path}");
    }
    store.assert_executed(2);
}

async fn expect_continue_contract(shop: &Shop, addr: SocketAddr, path: &'static str) {
    let body = r#"{"amount":1}"#;
    let first = tokio::spawn(async move {
        let mut wire = Wire::connect(addr).await;
        expecting(&mut wire, path, path, body).await
    });
    shop.gate.until_started().await;
    let mut wire = Wire::connect(addr).await;
    let (continued, busy) = expecting(&mut wire, path, path, body).await;
    assert!(continued, "{path}: {}", busy.text());
    busy.assert_problem(409, "request-in-progress");
    assert!(busy.header("retry-after").is_some(), "{}", busy.text());

    shop.gate.let_through(1);
    let (continued, first) = first.await.unwrap();
    assert!(continued && first.status == 201, "{path}: {}", first.text());
    assert!(!first.replayed());
    // The third and later exact repeats are answered before the body is
    // parsed (the `exact` module): they too wait for the 100.
    for _ in 0..3 {
        let (continued, replay) = expecting(&mut wire, path, path, body).await;
        assert!(continued && replay.replayed(), "{path}: {}", replay.text());
        assert_eq!(replay.comparable(), first.comparable());
    }
    let (continued, reused) = expecting(&mut wire, path, path, r#"{"amount":2}"#).await;
    assert!(continued);
    reused.assert_problem(422, "key-reused");
}

/// A keyless upload is refused before the `100 Continue` (as
/// `macro_wire` shows with `Connection: close`). On a kept-alive
/// connection a client may send the body anyway, after the refusal or
/// before it comes: those bytes are never read as the next request, and
/// nothing runs or is claimed. Whether the server closes the connection
/// or reads them as the refused request's body, and keeps it open, depends
/// on whether they have arrived when it is done with the request, so
/// either is let be, and a request sent after them tells which: if the
/// connection stays open, that request's answer is the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_after_an_early_refusal_is_never_taken_for_a_request() {
    let shop = Shop::default();
    let store = MockStore::new();
    let (addr, _) = serve(shop_app(&shop, &store)).await;
    for path in ["/charges", "/raw"] {
        for read_the_refusal_first in [true, false] {
            let mut wire = Wire::connect(addr).await;
            refused_then_body(&mut wire, path, read_the_refusal_first).await;
            let case = format!("{path}, refusal read first: {read_the_refusal_first}");
            if !wire.closed().await {
                let next = wire.final_answer().await;
                assert_eq!(next.status, 404, "{case}: {}", next.text());
            }
        }
    }
    assert_eq!((shop.runs.get(), store.count(OpKind::Claim)), (0, 0));
}

/// Sends a keyless upload asking for `100 Continue` and checks that it is
/// refused, sending the body (itself a whole keyed request) and then a
/// `GET /probe` anyway, after reading the refusal or before.
async fn refused_then_body(wire: &mut Wire, path: &str, read_the_refusal_first: bool) {
    // A body that is also a whole request, should it be read as one.
    let smuggled = sized(path, &format!("idempotency-key: {path}\r\n"), "{}");
    let extra = format!(
        "expect: 100-continue\r\ncontent-length: {}\r\n",
        smuggled.len()
    );
    let probe = head("GET", "/probe", "");
    wire.send(head("POST", path, &extra).as_bytes()).await;
    if read_the_refusal_first {
        wire.answer(false).await.assert_problem(400, "missing-key");
    }
    // The server may have closed the connection already.
    let rest = format!("{smuggled}{probe}");
    let _ = wire.stream.write_all(rest.as_bytes()).await;
    if !read_the_refusal_first {
        wire.answer(false).await.assert_problem(400, "missing-key");
    }
}

/// `IdempotentLayer` refuses a body that announces more than its limit
/// before asking for it: the client gets 413 instead of `100 Continue`,
/// and the key is free for the smaller retry. (Under the attribute, the
/// body extractor decides, as in a plain axum handler: axum's
/// `DefaultBodyLimit` lets the upload in, then refuses it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_body_over_the_layers_limit_is_refused_before_the_upload() {
    let shop = Shop::default();
    let store = MockStore::new();
    let (addr, _) = serve(shop_app(&shop, &store)).await;
    let key = "idempotency-key: big\r\n";
    let extra = format!("{key}expect: 100-continue\r\ncontent-length: 3000000\r\n");
    let mut wire = Wire::connect(addr).await;
    wire.send(head("POST", "/raw", &extra).as_bytes()).await;
    let refused = wire.answer(false).await;
    let detail = refused.assert_problem(413, "request-too-large");
    assert!(detail.contains("the key was not used"), "{detail}");
    assert_eq!(store.count(OpKind::Claim), 0);
    let retry = exchange(addr, "/raw", key, r#"{"amount":1}"#).await;
    assert_eq!(
        (retry.status, retry.replayed()),
        (201, false),
        "{}",
        retry.text()
    );
    assert_eq!(shop.runs.get(), 1);
}

// ===== chunked bodies =====

/// A payload sent chunked, split anywhere and with trailers, is the same
/// request as the same payload with a `Content-Length`, under the
/// attribute and under `IdempotentLayer`, in either order; another
/// payload chunked is 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_with_trailers_is_the_same_request_as_its_sized_form() {
    let shop = Shop::default();
    let store = MockStore::new();
    let (addr, _) = serve(shop_app(&shop, &store)).await;
    let body = r#"{"amount":1}"#;
    let chunked_head = "transfer-encoding: chunked\r\ntrailer: x-checksum\r\n";
    for (round, path) in ["/charges", "/raw"].into_iter().enumerate() {
        for chunked_first in [true, false] {
            let key = format!("idempotency-key: {path}-{chunked_first}\r\n");
            let as_chunks = format!(
                "{}{}",
                head("POST", path, &format!("{key}{chunked_head}")),
                chunked(body, &[1, 5], "x-checksum: 1234\r\n")
            );
            let as_sized = sized(path, &key, body);
            let (first, retry) = if chunked_first {
                (as_chunks, as_sized)
            } else {
                (as_sized, as_chunks)
            };
            let mut wire = Wire::connect(addr).await;
            wire.send(first.as_bytes()).await;
            let first = wire.final_answer().await;
            assert_eq!(first.status, 201, "{path}: {}", first.text());
            wire.send(retry.as_bytes()).await;
            let retry = wire.final_answer().await;
            assert!(retry.replayed(), "{path} {chunked_first}: {}", retry.text());
            assert_eq!(retry.comparable(), first.comparable());
            let other = format!(
                "{}{}",
                head("POST", path, &format!("{key}{chunked_head}")),
                chunked(r#"{"amount":2}"#, &[3], "x-checksum: 99\r\n")
            );
            wire.send(other.as_bytes()).await;
            wire.final_answer().await.assert_problem(422, "key-reused");
        }
        assert_eq!(shop.runs.get(), 2 * (round + 1), "{path}");
    }
}

// ===== connections that go away =====

/// An upload cut short: the head and part of the body, then the client
/// goes away; the server settles the request before the test goes on.
async fn cut_short(addr: SocketAddr, settled: &Settled, count: usize, request: &str) {
    let mut wire = Wire::connect(addr).await;
    wire.send(request.as_bytes()).await;
    drop(wire);
    settled.wait_for(count).await;
}

/// A client that disconnects halfway through uploading the body claims
/// nothing: the retry runs the handler (not 409 for a lease the cut
/// request would hold, nor 422), with a `Content-Length` or chunked,
/// under the attribute and under `IdempotentLayer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_short_claims_nothing_and_the_retry_runs() {
    let shop = Shop::default();
    let store = MockStore::new();
    let (addr, settled) = serve(shop_app(&shop, &store)).await;
    let body = r#"{"amount":1}"#;
    let (mut count, mut retries) = (0, 0);
    for path in ["/charges", "/raw"] {
        for framing in ["sized", "chunked", "expect"] {
            let key = format!("idempotency-key: {path}-{framing}\r\n");
            let partial = if framing == "sized" {
                let extra = format!("{key}content-length: {}\r\n", body.len());
                format!("{}{}", head("POST", path, &extra), &body[..5])
            } else if framing == "chunked" {
                let extra = format!("{key}transfer-encoding: chunked\r\n");
                format!("{}5\r\n{}\r\n", head("POST", path, &extra), &body[..5])
            } else {
                // Gone before sending any of the body it announced.
                let extra = format!(
                    "{key}expect: 100-continue\r\ncontent-length: {}\r\n",
                    body.len()
                );
                head("POST", path, &extra)
            };
            count += 1;
            cut_short(addr, &settled, count, &partial).await;
            assert_eq!(store.count(OpKind::Claim), retries, "{path} {framing}");
            let retry = exchange(addr, path, &key, body).await;
            (count, retries) = (count + 1, retries + 1);
            assert_eq!(
                (retry.status, retry.replayed()),
                (201, false),
                "{path} {framing}: {}",
                retry.text()
            );
        }
    }
    assert_eq!(shop.runs.get(), 6);
    store.assert_executed(6);
}

/// Waits until `store` has stored `count` responses. A run whose request
/// was dropped finishes in a task of its own, which nothing else signals
/// (the handler returns before the engine stores its answer); the store's
/// log is polled instead, and only how long that takes varies, never the
/// outcome.
async fn stored(store: &MockStore, count: usize) {
    let completed = async {
        while store.count(OpKind::Complete) < count {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(STUCK, completed)
        .await
        .expect("the response is stored");
}

/// A client that disconnects while the handler runs: the server drops its
/// request, but the handler finishes and its response is stored, and the
/// retry gets that response replayed, not a second run; under the
/// attribute and under `IdempotentLayer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_while_the_handler_runs_gets_its_answer_on_the_retry() {
    let shop = Shop::default();
    let store = MockStore::new();
    let (addr, settled) = serve(shop_app(&shop, &store)).await;
    let body = r#"{"amount":7}"#;
    // What each handler's one run answered begins with.
    let runs = [
        ("/held", r#"{"amount":7,"run":1}"#),
        ("/held-raw", "run 2: "),
    ];
    for (round, (path, answered)) in runs.into_iter().enumerate() {
        let key = format!("idempotency-key: gone{path}\r\n");
        let mut wire = Wire::connect(addr).await;
        wire.send(sized(path, &key, body).as_bytes()).await;
        shop.gate.until_started().await;
        drop(wire);
        // The server notices the closed connection and drops the request.
        settled.wait_for(2 * round + 1).await;
        shop.gate.let_through(1);
        stored(&store, round + 1).await;
        let retry = exchange(addr, path, &key, body).await;
        assert_eq!(
            (retry.status, retry.replayed()),
            (201, true),
            "{path}: {}",
            retry.text()
        );
        assert!(
            retry.body.starts_with(answered.as_bytes()),
            "{}",
            retry.text()
        );
        assert_eq!(shop.runs.get(), round + 1, "{path}");
    }
    store.assert_executed(2);
}

// ===== pipelining, HTTP/1.0, Connection: close, HEAD =====

/// Requests with one key sent back to back on one connection, before any
/// answer: the first runs, the others are its replay byte for byte (the
/// third and fourth by way of the `exact` module under the attribute);
/// one with another payload in the same burst is 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_duplicates_run_once_and_the_second_is_the_replay() {
    let shop = Shop::default();
    let store = MockStore::new();
    let (addr, _) = serve(shop_app(&shop, &store)).await;
    for path in ["/charges", "/raw"] {
        let key = format!("idempotency-key: pipe{path}\r\n");
        let request = sized(path, &key, r#"{"amount":1}"#);
        let other = sized(path, &key, r#"{"amount":2}"#);
        let mut wire = Wire::connect(addr).await;
        let burst = format!("{request}{request}{request}{request}{other}");
        wire.send(burst.as_bytes()).await;
        let first = wire.final_answer().await;
        assert_eq!((first.status, first.replayed()), (201, false), "{path}");
        for _ in 0..3 {
            let replay = wire.final_answer().await;
            assert!(replay.replayed(), "{path}: {}", replay.text());
            assert_eq!(replay.comparable(), first.comparable());
        }
        let reused = wire.final_answer().await;
        reused.assert_problem(422, "key-reused");
    }
    assert_eq!(shop.runs.get(), 2);
    store.assert_executed(2);
}

/// An HTTP/1.0 request (closed after its answer) and an HTTP/1.1 one with
/// `Connection: close` share a key like any two requests: the second is
/// the first's replay, with the same body; a `HEAD` with the key to the
/// `POST` route is 405, bodiless (the next answer on its connection reads
/// from the first byte after its head), and uses nothing up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_connection_close_and_head_keep_one_run_per_key() {
    let shop = Shop::default();
    let store = MockStore::new();
    let (addr, _) = serve(shop_app(&shop, &store)).await;
    let body = r#"{"amount":3}"#;
    for path in ["/charges", "/raw"] {
        let key = format!("idempotency-key: old{path}\r\n");
        let old = sized(path, &key, body).replacen("HTTP/1.1", "HTTP/1.0", 1);
        let mut wire = Wire::connect(addr).await;
        wire.send(old.as_bytes()).await;
        let first = wire.final_answer().await;
        assert_eq!(first.status, 201, "{path}: {}", first.text());
        assert!(wire.closed().await, "{path}: HTTP/1.0 without keep-alive");

        let close = format!("{key}connection: close\r\n");
        let mut wire = Wire::connect(addr).await;
        wire.send(sized(path, &close, body).as_bytes()).await;
        let retry = wire.final_answer().await;
        assert!(retry.replayed(), "{path}: {}", retry.text());
        assert_eq!((retry.status, &retry.body), (201, &first.body), "{path}");
        assert!(wire.closed().await, "{path}: Connection: close");

        let mut wire = Wire::connect(addr).await;
        wire.send(head("HEAD", path, &key).as_bytes()).await;
        let probe = wire.answer(true).await;
        assert_eq!(probe.status, 405, "{path}: {}", probe.text());
        assert!(!probe.replayed());
        wire.send(sized(path, &key, body).as_bytes()).await;
        let again = wire.final_answer().await;
        assert!(again.replayed(), "{path}: {}", again.text());
        assert_eq!(again.body, first.body, "{path}");
    }
    assert_eq!(shop.runs.get(), 2);
    store.assert_executed(2);
}

// ===== compression =====

/// Behind tower-http's compression, a replay to a client that accepts
/// gzip is framed and labelled as the first answer was (gzip, chunked,
/// one `Vary`, no stale `Content-Length`) and decodes to the same bytes;
/// one to a client that does not is the plain body with its own length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_behind_compression_is_encoded_and_framed_for_its_caller() {
    let shop = Shop::default();
    let store = MockStore::new();
    let (addr, _) = serve(shop_app(&shop, &store).layer(CompressionLayer::new())).await;
    let body = r#"{"amount":1}"#;
    for path in ["/charges", "/raw"] {
        let gzip = format!("idempotency-key: z{path}\r\naccept-encoding: gzip\r\n");
        let first = exchange(addr, path, &gzip, body).await;
        let replay = exchange(addr, path, &gzip, body).await;
        assert!(replay.replayed(), "{path}: {}", replay.text());
        for answer in [&first, &replay] {
            assert_eq!(answer.header("content-encoding"), Some("gzip"), "{path}");
            assert_eq!(answer.count("vary"), 1, "{path}: {}", answer.head);
            assert_eq!(answer.header("content-length"), None, "{path}");
        }
        assert_eq!(replay.comparable_head(), first.comparable_head(), "{path}");
        let plain = gunzip(&first.body);
        assert_eq!(gunzip(&replay.body), plain, "{path}");

        let identity = exchange(addr, path, &format!("idempotency-key: z{path}\r\n"), body).await;
        assert!(identity.replayed(), "{path}");
        assert_eq!(identity.header("content-encoding"), None, "{path}");
        assert_eq!(identity.body, plain, "{path}");
        let length = identity.header("content-length").map(str::parse::<usize>);
        assert_eq!(length, Some(Ok(plain.len())), "{path}");
    }
    assert_eq!(shop.runs.get(), 2);
}

// ===== responses that end short =====

/// A report whose `Content-Length` announces 40 bytes and whose stream
/// ends, without an error, after 11: a file that shrank while it was
/// streamed, or an upstream's answer that a body of the handler's own
/// ended cleanly where it was cut off.
fn report_cut_short(shop: &Shop) -> Response {
    shop.runs.bump();
    let first_half = Ok::<_, std::io::Error>(Bytes::from_static(b"first half "));
    let body = Body::from_stream(futures_util::stream::iter([first_half]));
    ([(CONTENT_LENGTH, "40")], body).into_response()
}

#[idempotent(scope = "global")]
async fn cut_report(State(shop): State<Shop>, _body: String) -> Response {
    report_cut_short(&shop)
}

async fn raw_cut_report(State(shop): State<Shop>) -> Response {
    report_cut_short(&shop)
}

/// Reads everything the server sends until it closes the connection.
async fn until_closed(wire: &mut Wire) -> String {
    while wire.fill().await {}
    String::from_utf8_lossy(&std::mem::take(&mut wire.read)).into_owned()
}

/// A 200 whose body ends short of its `Content-Length` is a failed
/// response: its connection closes before the length it announced, as
/// the handler's stream alone would have it, and the retry gets 410
/// `response-not-stored`, never those bytes replayed as a whole response
/// framed by their own length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cut_short_of_its_content_length_is_never_replayed_as_whole() {
    let shop = Shop::default();
    let store = MockStore::new();
    let layer = IdempotentLayer::new(Endpoint::new("wire::raw_report").scope(Scope::Global));
    let app = Router::new()
        .route("/report", post(cut_report))
        .route("/raw-report", post(raw_cut_report).route_layer(layer))
        .with_state(shop.clone())
        .layer(store.layer());
    let (addr, _) = serve(app).await;
    for path in ["/report", "/raw-report"] {
        let key = format!("idempotency-key: cut{path}\r\n");
        let mut wire = Wire::connect(addr).await;
        wire.send(sized(path, &key, "{}").as_bytes()).await;
        let first = until_closed(&mut wire).await;

        let retry = exchange(addr, path, &key, "{}").await;
        let detail = retry.assert_problem(410, "response-not-stored");
        assert!(detail.contains("Content-Length"), "{path}: {detail}");

        // hyper may close before it flushes what it buffered; whatever
        // came is the head as announced and no more than the bytes made.
        if let Some((head, body)) = first.split_once("\r\n\r\n") {
            assert!(head.starts_with("HTTP/1.1 200"), "{path}: {first}");
            assert!(head.contains("content-length: 40"), "{path}: {first}");
            assert!("first half ".starts_with(body), "{path}: {first}");
        }
    }
    assert_eq!(shop.runs.get(), 2);
}

// ===== key headers =====

/// Keys at, over and far over the limit, and the key header twice (same
/// value, other values, or as a folded list), straight off the wire: each
/// bad one is a 400 problem that runs and claims nothing, never a server
/// error or a dropped connection; the header name's case does not matter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_repeated_key_headers_are_400_problems_that_claim_nothing() {
    let shop = Shop::default();
    let store = MockStore::new();
    let (addr, _) = serve(shop_app(&shop, &store)).await;
    let body = r#"{"amount":1}"#;
    for path in ["/charges", "/raw"] {
        // One key space for both routes: each route gets keys of its own.
        let longest = path[1..2].repeat(255);
        let at_limit = format!("idempotency-key: {longest}\r\n");
        assert_eq!(exchange(addr, path, &at_limit, body).await.status, 201);
        // Header names are case-insensitive, and the whitespace around a
        // value is not part of it.
        for spelled in [
            format!("IDEMPOTENCY-KEY: {longest}\r\n"),
            format!("idempotency-key:{longest}\r\n"),
            format!("idempotency-key: \t{longest} \t\r\n"),
        ] {
            let retry = exchange(addr, path, &spelled, body).await;
            assert!(retry.replayed(), "{path} {spelled:?}: {}", retry.text());
        }

        let refused = [
            format!("idempotency-key: {}\r\n", "k".repeat(256)),
            format!("idempotency-key: {}\r\n", "k".repeat(60_000)),
            "idempotency-key: a\r\nidempotency-key: a\r\n".to_owned(),
            "idempotency-key: a\r\nIdempotency-Key: b\r\n".to_owned(),
            "idempotency-key: a, b\r\n".to_owned(),
        ];
        let claims = store.count(OpKind::Claim);
        for extra in refused {
            let answer = exchange(addr, path, &extra, body).await;
            let detail = answer.assert_problem(400, "invalid-key");
            assert!(
                detail.len() < 1_000,
                "{path}: the key is not echoed: {detail}"
            );
        }
        assert_eq!(store.count(OpKind::Claim), claims, "{path}: a claim");
    }
    assert_eq!(shop.runs.get(), 2);
    store.assert_executed(2);
}
