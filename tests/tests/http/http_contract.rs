//! The HTTP contract as a client sees it, checked under `#[idempotent]`
//! and under `IdempotentLayer` side by side: the two must answer alike.
//! A `HEAD` and a `GET` with one key, a handler that sets the replay
//! mark itself, the 400s for keys a client gets wrong (and that they say
//! what to send), and keys on other methods than `POST`.

use crate::macro_support;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::handler::Handler;
use axum::http::{HeaderValue, Method, Request, StatusCode};
use axum::response::{AppendHeaders, IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Endpoint, Idempotency, IdempotentLayer, Scope, idempotent};
use macro_support::{Reply, Runs, both_routes, send};
use serde_json::Value;

/// A request with `method` to `uri`, with the `Idempotency-Key` field
/// `key` (raw bytes, as a client may send anything) if given.
fn request(method: &str, uri: &str, key: Option<&[u8]>, body: &str) -> Request<Body> {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    if let Some(key) = key {
        let value = HeaderValue::from_bytes(key).expect("a value a client can send");
        request.headers_mut().insert("idempotency-key", value);
    }
    request
}

/// Every value of `Idempotent-Replayed` the reply carries.
fn replay_marks(reply: &Reply) -> Vec<&str> {
    reply
        .headers
        .get_all("idempotent-replayed")
        .iter()
        .map(|value| value.to_str().unwrap())
        .collect()
}

fn store() -> Idempotency {
    Idempotency::new(MemoryStore::new())
}

const LAYERED: Endpoint = Endpoint::new("http_contract::layered").scope(Scope::Global);

/// Counts its run; the count is the answer.
async fn plain(State(runs): State<Runs>) -> String {
    format!("run {}", runs.bump())
}

#[idempotent(scope = "global")]
async fn by_attribute(State(runs): State<Runs>) -> String {
    format!("run {}", runs.bump())
}

/// An app of its own for each way of making the route `/r` idempotent, as
/// `(name, router)`: `by_attribute` as it is, and `plain` under an
/// `IdempotentLayer` of `endpoint`. (`macro_support::both_ways` serves
/// both ways from one router instead.)
fn apps_each_way(
    runs: &Runs,
    by_attribute: MethodRouter<Runs>,
    plain: MethodRouter<Runs>,
    endpoint: Endpoint,
) -> [(&'static str, Router); 2] {
    let app = |route| {
        Router::new()
            .route("/r", route)
            .with_state(runs.clone())
            .layer(store())
    };
    let layered = plain.route_layer(IdempotentLayer::new(endpoint));
    [("attribute", app(by_attribute)), ("layer", app(layered))]
}

/// `handler` for `GET` (and so `HEAD`), `POST`, `PUT`, `PATCH` and
/// `DELETE`. Not `any`, whose handler is the method router's fallback,
/// which `route_layer` does not wrap.
fn every_method<H, T>(handler: H) -> MethodRouter<Runs>
where
    H: Handler<T, Runs>,
    T: 'static,
{
    get(handler.clone())
        .post(handler.clone())
        .put(handler.clone())
        .patch(handler.clone())
        .delete(handler)
}

// ===== HEAD and GET with one key =====

/// axum serves a `HEAD` by the `GET` handler and drops the body at the
/// router's edge. So a `HEAD` after a `GET` with one key is that `GET`'s
/// replay, its `Content-Length` the `GET`'s, and a `GET` after a `HEAD`
/// replays the whole response the `HEAD`'s run produced: the handler runs
/// once either way, under the attribute and the layer alike. A key used
/// with `POST` is another request to both.
#[tokio::test]
async fn a_head_and_a_get_with_one_key_are_one_request_under_the_attribute_and_the_layer() {
    let runs = Runs::default();
    let apps = apps_each_way(
        &runs,
        every_method(by_attribute),
        every_method(plain),
        LAYERED,
    );
    for (way, app) in apps {
        let before = runs.get();
        let got = send(&app, request("GET", "/r", Some(b"g"), "")).await;
        assert_eq!((got.status, got.replayed), (StatusCode::OK, false), "{way}");
        let head = send(&app, request("HEAD", "/r", Some(b"g"), "")).await;
        assert_eq!(
            (head.status, head.replayed, head.body.as_str()),
            (StatusCode::OK, true, ""),
            "{way}: {}",
            head.body
        );
        let length = got.body.len().to_string();
        assert_eq!(
            head.header("content-length"),
            Some(length.as_str()),
            "{way}"
        );
        assert_eq!(runs.get(), before + 1, "{way}");

        let head_first = send(&app, request("HEAD", "/r", Some(b"h"), "")).await;
        assert_eq!(
            (head_first.status, head_first.replayed),
            (StatusCode::OK, false),
            "{way}"
        );
        let get_after = send(&app, request("GET", "/r", Some(b"h"), "")).await;
        assert_eq!(
            (get_after.status, get_after.replayed),
            (StatusCode::OK, true),
            "{way}: {}",
            get_after.body
        );
        assert_eq!(get_after.body, format!("run {}", before + 2), "{way}");
        assert_eq!(runs.get(), before + 2, "{way}");

        let posted = send(&app, request("POST", "/r", Some(b"p"), "")).await;
        assert_eq!(posted.status, StatusCode::OK, "{way}");
        // The problem's body goes the way of every `HEAD`'s.
        let head_after_post = send(&app, request("HEAD", "/r", Some(b"p"), "")).await;
        assert_eq!(
            (
                head_after_post.status,
                head_after_post.header("content-type"),
                head_after_post.body.as_str()
            ),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("application/problem+json"),
                ""
            ),
            "{way}"
        );
    }
}

/// An explicit `head` handler, answering without a body.
async fn head_plain(State(runs): State<Runs>) -> [(&'static str, String); 1] {
    [("x-head-run", runs.bump().to_string())]
}

/// One layer over a method router with a `GET` and an explicit `HEAD`
/// handler: a `HEAD` after a `GET` is the `GET`'s replay, but a `GET`
/// after a `HEAD` must get the `GET` handler's body, never the `HEAD`
/// handler's bodiless answer replayed. (Under the attribute, two handlers
/// are two endpoints; one handler answering both is tested below.)
#[tokio::test]
async fn a_get_after_a_head_under_the_layer_is_never_the_heads_bodiless_answer() {
    a_get_after_a_bodiless_head(head_plain).await;
}

/// An explicit `head` handler whose body is a stream that ends without a
/// byte: bodiless too, though it does not say so before it is read.
async fn head_streamed(State(runs): State<Runs>) -> ([(&'static str, String); 1], Body) {
    let frames = futures_util::stream::iter([
        Ok::<_, std::convert::Infallible>(Bytes::new()),
        Ok(Bytes::new()),
    ]);
    let run = runs.bump().to_string();
    ([("x-head-run", run)], Body::from_stream(frames))
}

/// As above, with a `head` handler that streams its empty body: judged by
/// the length it announces (none), it was stored, and the `GET` after it
/// got the `HEAD` handler's headers and an empty body as its replay,
/// without its handler running.
#[tokio::test]
async fn a_get_after_a_head_that_streamed_no_body_runs_its_handler_under_the_layer() {
    a_get_after_a_bodiless_head(head_streamed).await;
}

/// Answers a `HEAD` with its headers alone, as axum's own
/// `handle-head-request` example does, and a `GET` with its body.
async fn head_aware_plain(State(runs): State<Runs>, method: Method) -> Response {
    let run = runs.bump();
    if method == Method::HEAD {
        return [("x-head-run", run.to_string())].into_response();
    }
    format!("run {run}").into_response()
}

#[idempotent(scope = "global")]
async fn head_aware_by_attribute(state: State<Runs>, method: Method) -> Response {
    head_aware_plain(state, method).await
}

/// `/attribute` and `/layer`, `GET` routes to one handler made idempotent
/// each way, on `runs`.
fn get_both_ways<A: 'static, P: 'static>(
    by_attribute: impl Handler<A, Runs>,
    plain: impl Handler<P, Runs>,
    runs: &Runs,
) -> Router {
    let routes = (get(by_attribute), get(plain));
    both_routes(routes, LAYERED, runs.clone(), store())
}

/// A `GET` after a `HEAD` its own handler answered without a body, under
/// the attribute and the layer alike: the `GET` runs (the `HEAD`'s empty
/// answer was not stored for it), and the `HEAD` after it is its replay.
/// Under the attribute, the `HEAD`'s answer used to be stored, and the
/// `GET` got an empty body as a replay, its handler never running.
#[tokio::test]
async fn a_get_after_a_head_its_handler_answered_without_a_body_runs_it() {
    let runs = Runs::default();
    let app = get_both_ways(head_aware_by_attribute, head_aware_plain, &runs);
    // A key for each route: records are the caller's and the key's, whatever the route.
    for (path, key, first_run) in [("/attribute", b"a", 1), ("/layer", b"l", 3)] {
        let head = send(&app, request("HEAD", path, Some(key), "")).await;
        let got = send(&app, request("GET", path, Some(key), "")).await;
        let head_after = send(&app, request("HEAD", path, Some(key), "")).await;
        assert_eq!(
            head.header("x-head-run"),
            Some(&*first_run.to_string()),
            "{path}"
        );
        let expected_body = format!("run {}", first_run + 1);
        assert_eq!(
            (got.status, got.replayed, got.body.as_str()),
            (StatusCode::OK, false, expected_body.as_str()),
            "{path}: the GET after a HEAD got the HEAD's bodiless answer"
        );
        assert_eq!(
            (head_after.replayed, head_after.header("x-head-run")),
            (true, None),
            "{path}"
        );
    }
    assert_eq!(runs.get(), 4);
}

/// An event stream of one event.
fn one_event(runs: &Runs) -> Response {
    let event = format!("data: {}\n\n", runs.bump());
    let frames =
        futures_util::stream::iter([Ok::<_, std::convert::Infallible>(Bytes::from(event))]);
    let content_type = [("content-type", "text/event-stream")];
    (content_type, Body::from_stream(frames)).into_response()
}

async fn events_plain(State(runs): State<Runs>) -> Response {
    one_event(&runs)
}

#[idempotent(scope = "global")]
async fn events_by_attribute(State(runs): State<Runs>) -> Response {
    one_event(&runs)
}

/// A `GET` after a `HEAD` to an event stream gets its stream. No event
/// stream is kept, so the `HEAD`'s run used to leave a record without a
/// body, and every `GET` with that key got 410 for the whole TTL though
/// no caller ever had the stream.
#[tokio::test]
async fn a_get_after_a_head_to_an_event_stream_gets_the_stream() {
    let runs = Runs::default();
    let app = get_both_ways(events_by_attribute, events_plain, &runs);
    for (path, key, get_run) in [("/attribute", b"a", 2), ("/layer", b"l", 4)] {
        let head = send(&app, request("HEAD", path, Some(key), "")).await;
        let got = send(&app, request("GET", path, Some(key), "")).await;
        assert_eq!(head.status, StatusCode::OK, "{path}");
        let expected = format!("data: {get_run}\n\n");
        assert_eq!(
            (got.status, got.replayed, got.body.as_str()),
            (StatusCode::OK, false, expected.as_str()),
            "{path}: the GET after a HEAD never got its stream"
        );
    }
}

/// `run N` padded past the 16 bytes the router below keeps of a body.
fn past_the_limit(runs: &Runs) -> String {
    format!("run {} {}", runs.bump(), "x".repeat(64))
}

async fn large_plain(State(runs): State<Runs>) -> String {
    past_the_limit(&runs)
}

#[idempotent(scope = "global")]
async fn large_by_attribute(State(runs): State<Runs>) -> String {
    past_the_limit(&runs)
}

/// A `GET` after a `HEAD` whose answer's body is larger than
/// `max_body_bytes` gets the body. A `HEAD`'s caller gets no body, so
/// the `HEAD`'s run used to leave a record without one, and every `GET`
/// with that key got 410 for the whole TTL though no caller ever had the
/// body, as for an event stream above.
#[tokio::test]
async fn a_get_after_a_head_to_a_body_too_large_to_keep_gets_the_body() {
    let runs = Runs::default();
    let idempotency = Idempotency::builder(MemoryStore::new())
        .max_body_bytes(16)
        .build();
    let routes = (get(large_by_attribute), get(large_plain));
    let app = both_routes(routes, LAYERED, runs.clone(), idempotency);
    for (path, key, get_run) in [("/attribute", b"a", 2), ("/layer", b"l", 4)] {
        let head = send(&app, request("HEAD", path, Some(key), "")).await;
        let got = send(&app, request("GET", path, Some(key), "")).await;
        assert_eq!(head.status, StatusCode::OK, "{path}");
        let expected = format!("run {get_run} {}", "x".repeat(64));
        assert_eq!(
            (got.status, got.replayed, got.body.as_str()),
            (StatusCode::OK, false, expected.as_str()),
            "{path}: the GET after a HEAD never got the body"
        );
    }
}

/// `HEAD`, `GET` and `HEAD` again under one key, through one layer over
/// `plain` and `head`, a `head` handler answering without a body: the
/// `HEAD` runs its handler, the `GET` runs its own (not the `HEAD`'s
/// answer replayed), and the last `HEAD` is the `GET`'s replay.
async fn a_get_after_a_bodiless_head<T: 'static>(head: impl Handler<T, Runs>) {
    let runs = Runs::default();
    let app = Router::new()
        .route(
            "/r",
            get(plain)
                .head(head)
                .route_layer(IdempotentLayer::new(LAYERED)),
        )
        .with_state(runs.clone())
        .layer(store());
    let head = send(&app, request("HEAD", "/r", Some(b"h"), "")).await;
    assert_eq!(
        (head.status, head.header("x-head-run")),
        (StatusCode::OK, Some("1"))
    );
    let got = send(&app, request("GET", "/r", Some(b"h"), "")).await;
    assert_eq!(
        (
            got.status,
            got.replayed,
            got.header("x-head-run"),
            got.body.as_str()
        ),
        (StatusCode::OK, false, None, "run 2")
    );
    let head_after = send(&app, request("HEAD", "/r", Some(b"h"), "")).await;
    assert_eq!(
        (head_after.replayed, head_after.header("x-head-run")),
        (true, None)
    );
    assert_eq!(runs.get(), 2);
}

// ===== a handler that sets the replay mark itself =====

/// Sets `Idempotent-Replayed` itself, twice, as a handler forwarding an
/// upstream's answer might.
async fn marking_plain(
    State(runs): State<Runs>,
) -> (AppendHeaders<[(&'static str, &'static str); 2]>, String) {
    let marks = [
        ("idempotent-replayed", "true"),
        ("idempotent-replayed", "false"),
    ];
    (AppendHeaders(marks), format!("run {}", runs.bump()))
}

#[idempotent(scope = "global", optional)]
async fn marking_by_attribute(
    State(runs): State<Runs>,
    Json(_): Json<Value>,
) -> (AppendHeaders<[(&'static str, &'static str); 2]>, String) {
    marking_plain(State(runs)).await
}

/// The mark is the library's: a first response never carries it, even
/// when the handler sets it, nor does an unkeyed one that ran without
/// idempotency, so a client can tell a replay from a first answer; a
/// replay carries it once, `true`. Alike under the attribute and the
/// layer.
#[tokio::test]
async fn a_handlers_own_replay_mark_never_reaches_a_first_response_and_a_replay_says_true_once() {
    const OPTIONAL: Endpoint = LAYERED.optional(true);
    let runs = Runs::default();
    let apps = apps_each_way(
        &runs,
        post(marking_by_attribute),
        post(marking_plain),
        OPTIONAL,
    );
    for (way, app) in apps {
        let first = send(&app, request("POST", "/r", Some(b"k"), "{}")).await;
        assert_eq!(first.status, StatusCode::OK, "{way}: {}", first.body);
        assert_eq!(replay_marks(&first), Vec::<&str>::new(), "{way}: first");
        let retry = send(&app, request("POST", "/r", Some(b"k"), "{}")).await;
        assert_eq!(retry.body, first.body, "{way}");
        assert_eq!(replay_marks(&retry), ["true"], "{way}: replay");
        let unkeyed = send(&app, request("POST", "/r", None, "{}")).await;
        assert_eq!(unkeyed.status, StatusCode::OK, "{way}: {}", unkeyed.body);
        assert_eq!(replay_marks(&unkeyed), Vec::<&str>::new(), "{way}: unkeyed");
    }
    assert_eq!(runs.get(), 4);
}

// ===== keys a client gets wrong =====

#[idempotent(scope = "global")]
async fn create_by_attribute(State(runs): State<Runs>, Json(_): Json<Value>) -> String {
    format!("run {}", runs.bump())
}

fn creating(runs: &Runs) -> [(&'static str, Router); 2] {
    apps_each_way(runs, post(create_by_attribute), post(plain), LAYERED)
}

/// Each malformed key, and a request without one, gets the same 400 from
/// the attribute and the layer, before anything runs; a detail that says
/// what was wrong, and for a missing key or a broken quoted one, the
/// header to send.
#[tokio::test]
async fn a_missing_or_malformed_key_is_the_same_400_each_way_and_says_what_to_send() {
    let runs = Runs::default();
    let long = "a".repeat(256);
    let cases: [(Option<&[u8]>, &str, &str); 11] = [
        (None, "missing-key", "`Idempotency-Key: \""),
        (Some(b""), "invalid-key", "is empty"),
        (Some(b"  \t "), "invalid-key", "is empty"),
        (Some(b"\"\""), "invalid-key", "is empty"),
        (Some(long.as_bytes()), "invalid-key", "at most 255"),
        (Some(b"a b"), "invalid-key", "send such a key quoted"),
        (Some("cl\u{e9}".as_bytes()), "invalid-key", "hex or base64"),
        (Some(b"\"a"), "invalid-key", "`Idempotency-Key: \"a b\"`"),
        (
            Some(b"\"a\";v=1"),
            "invalid-key",
            "`Idempotency-Key: \"a b\"`",
        ),
        (Some(b"a, b"), "invalid-key", "send exactly one key"),
        (
            Some(b"\"a\\n\""),
            "invalid-key",
            "`Idempotency-Key: \"a b\"`",
        ),
    ];
    let mut details = Vec::new();
    for (way, app) in creating(&runs) {
        for (key, kind, says) in cases {
            let reply = send(&app, request("POST", "/r", key, "{}")).await;
            let (got, detail) = reply.problem(400);
            assert_eq!(got, kind, "{way} {key:?}");
            assert!(detail.contains(says), "{way} {key:?}: {detail}");
            details.push(detail);
        }
        let mut twice = request("POST", "/r", Some(b"a"), "{}");
        twice
            .headers_mut()
            .append("idempotency-key", HeaderValue::from_static("a"));
        let (got, detail) = send(&app, twice).await.problem(400);
        assert_eq!(got, "invalid-key", "{way}");
        assert!(detail.contains("more than once"), "{way}: {detail}");
    }
    let (by_attribute, by_layer) = details.split_at(cases.len());
    assert_eq!(by_attribute, by_layer);
    assert_eq!(runs.get(), 0);
}

/// The bare and the quoted form name one key, padding aside, and a key
/// may be any printable ASCII once quoted: a retry in the other form is
/// the replay, each way.
#[tokio::test]
async fn a_bare_key_and_its_quoted_form_are_one_key_each_way() {
    let runs = Runs::default();
    let pairs: [(&[u8], &[u8]); 3] = [
        (
            b"8e03978e-40d5-43e8-bc93-6894a57f9324",
            b"\"8e03978e-40d5-43e8-bc93-6894a57f9324\"",
        ),
        (b" order-7\t", b"\"order-7\""),
        (b"a\\b", b" \"a\\\\b\" "),
    ];
    for (way, app) in creating(&runs) {
        for (bare, quoted) in pairs {
            let first = send(&app, request("POST", "/r", Some(bare), "{}")).await;
            assert_eq!(
                (first.status, first.replayed),
                (StatusCode::OK, false),
                "{way}"
            );
            let again = send(&app, request("POST", "/r", Some(quoted), "{}")).await;
            assert_eq!((again.replayed, &again.body), (true, &first.body), "{way}");
        }
        let spaced = send(
            &app,
            request("POST", "/r", Some(b"\"a \\\"b\\\" c\""), "{}"),
        )
        .await;
        assert_eq!(spaced.status, StatusCode::OK, "{way}: {}", spaced.body);
    }
    assert_eq!(runs.get(), 8);
}

// ===== keys on other methods than POST =====

#[idempotent(scope = "global")]
async fn echo_by_attribute(State(runs): State<Runs>, body: String) -> String {
    format!("run {} of {body}", runs.bump())
}

async fn echo_plain(State(runs): State<Runs>, body: String) -> String {
    format!("run {} of {body}", runs.bump())
}

/// A keyed `GET`, `DELETE`, `PUT` or `PATCH` runs once and its retry is
/// the replay; the key sent again with `POST` is another request, 422.
/// Alike each way.
#[tokio::test]
async fn a_key_on_another_method_than_post_runs_once_each_way() {
    let runs = Runs::default();
    let apps = apps_each_way(
        &runs,
        every_method(echo_by_attribute),
        every_method(echo_plain),
        LAYERED,
    );
    for (way, app) in apps {
        for method in ["GET", "DELETE", "PUT", "PATCH"] {
            let key = method.as_bytes();
            let first = send(&app, request(method, "/r", Some(key), "x")).await;
            assert_eq!(
                (first.status, first.replayed),
                (StatusCode::OK, false),
                "{way} {method}"
            );
            let retry = send(&app, request(method, "/r", Some(key), "x")).await;
            assert_eq!(
                (retry.replayed, &retry.body),
                (true, &first.body),
                "{way} {method}"
            );
            let posted = send(&app, request("POST", "/r", Some(key), "x")).await;
            assert_eq!(posted.problem(422).0, "key-reused", "{way} {method}");
        }
    }
    assert_eq!(runs.get(), 8);
}
