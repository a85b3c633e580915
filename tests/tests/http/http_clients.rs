//! What a careless or hostile client gets from an idempotent service over
//! HTTP, beyond the cases `macro_wire`, `interop_layers` and the core's
//! `layer` tests cover: a method the route does not take, the 413 for a
//! body over the layer's limit, a storm of duplicates while the first
//! request runs, one key sent to two routes, one key sent with several
//! methods to one handler, and a 304 replayed to an HTTP/2 client.

use crate::macro_support;

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::{CONTENT_LENGTH, ETAG};
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use h2::client::SendRequest;
use idempotent_core::store::MemoryStore;
use idempotent_core::{
    Endpoint, IDEMPOTENT_REPLAYED, Idempotency, IdempotentLayer, Scope, idempotent,
};
use macro_support::gated::Gate;
use macro_support::{Reply, Runs, listen, send};

/// How long a test waits for something that should come at once.
const HANG: Duration = Duration::from_secs(10);

/// A request with `method` to `uri`, with `key` if given, and `body`.
fn request(method: &str, uri: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body.to_owned())).unwrap()
}

/// The detail of the problem `reply` carries, after checking its status,
/// content type and `type`.
#[track_caller]
fn problem(reply: &Reply, status: u16, kind: &str) -> String {
    let (got, detail) = reply.problem(status);
    assert_eq!(got, kind, "{detail}");
    detail
}

/// Counts its run and answers with it and what it was sent.
async fn create(State(runs): State<Runs>, body: String) -> (StatusCode, String) {
    (
        StatusCode::CREATED,
        format!("run {} of {body}", runs.bump()),
    )
}

const ORDERS: Endpoint = Endpoint::new("http_clients::orders").scope(Scope::Global);

// ===== a method the route does not take =====

/// `route_layer` on the method router wraps its handlers only: a method
/// the route does not take gets axum's 405 with or without a key. On the
/// `Router`, axum wraps each route's whole method router, its 405 included,
/// and the layer cannot tell that answer from a handler's before calling
/// it: a keyless `DELETE` is refused for its missing key (the layer must
/// not run an unsafe request without one), and a keyed one gets the 405,
/// which is not stored, so the key stays free for the request meant.
#[tokio::test]
async fn a_method_the_route_does_not_take_is_405_but_keyless_behind_a_router_wide_layer() {
    let runs = Runs::default();
    let per_route = Router::new()
        .route(
            "/orders",
            post(create).route_layer(IdempotentLayer::new(ORDERS)),
        )
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    let router_wide = Router::new()
        .route("/orders", post(create))
        .route_layer(IdempotentLayer::new(ORDERS))
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    for method in ["DELETE", "PUT", "PATCH"] {
        let key = format!("k-{method}");
        for key in [None, Some(key.as_str())] {
            let reply = send(&per_route, request(method, "/orders", key, "")).await;
            assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        }
        let keyless = send(&router_wide, request(method, "/orders", None, "")).await;
        problem(&keyless, 400, "missing-key");
        let keyed = send(&router_wide, request(method, "/orders", Some(&key), "")).await;
        assert_eq!(keyed.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(keyed.header("allow"), Some("POST"), "{method}");
        let meant = send(&router_wide, request("POST", "/orders", Some(&key), "1")).await;
        assert_eq!(
            (meant.status, meant.replayed),
            (StatusCode::CREATED, false),
            "{method}: {}",
            meant.body
        );
    }
    assert_eq!(runs.get(), 3);
}

// ===== a body over the layer's limit =====

/// The 413 for a body over the layer's own limit, announced or chunked,
/// says what to send instead and that the key was not used, so that the
/// client resends with it rather than wondering whether it needs a new
/// one; the retry with a body that fits runs, once.
#[tokio::test]
async fn a_body_over_the_layers_limit_is_413_saying_what_to_send_and_the_key_is_free() {
    const LIMITED: Endpoint = Endpoint::new("http_clients::limited").scope(Scope::Global);
    let runs = Runs::default();
    let app = Router::new()
        .route(
            "/orders",
            post(create).route_layer(IdempotentLayer::new(LIMITED).max_request_bytes(64)),
        )
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    let large = "x".repeat(65);
    let chunks = [Ok::<_, std::io::Error>(large.clone())];
    let mut chunked = request("POST", "/orders", Some("k"), "");
    *chunked.body_mut() = Body::from_stream(futures_util::stream::iter(chunks));
    for over in [request("POST", "/orders", Some("k"), &large), chunked] {
        let detail = problem(&send(&app, over).await, 413, "request-too-large");
        assert!(
            detail.contains("64 bytes")
                && detail.contains("nothing was executed")
                && detail.contains("send a body of at most 64 bytes"),
            "{detail}"
        );
    }
    let fits = send(&app, request("POST", "/orders", Some("k"), "ok")).await;
    assert_eq!((fits.status, fits.replayed), (StatusCode::CREATED, false));
    let retry = send(&app, request("POST", "/orders", Some("k"), "ok")).await;
    assert_eq!((retry.replayed, retry.body), (true, fits.body));
    assert_eq!(runs.get(), 1);
}

// ===== a storm of duplicates =====

#[idempotent(scope = "global")]
async fn gated(State(gate): State<Gate>, Json(amount): Json<u64>) -> (StatusCode, String) {
    gate.start();
    gate.wait().await;
    (
        StatusCode::CREATED,
        format!("run {} of {amount}", gate.charge()),
    )
}

/// Many duplicates while the first request runs: each gets 409 with
/// `Retry-After: 1` and a detail that says to send it again, one with
/// another payload gets 422; none runs the handler. Once the first
/// finishes, every duplicate is its replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_duplicates_gets_409s_that_say_when_to_retry_then_the_replay() {
    const STORM: usize = 32;
    let gate = Gate::default();
    let app = Router::new()
        .route("/pay", post(gated))
        .with_state(gate.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    let pay = |amount: &str| {
        let mut request = request("POST", "/pay", Some("storm"), amount);
        request
            .headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        request
    };
    let first = tokio::spawn({
        let app = app.clone();
        let request = pay("5");
        async move { send(&app, request).await }
    });
    gate.until_started(1).await;
    let storm = (0..STORM).map(|_| send(&app, pay("5")));
    for reply in futures_util::future::join_all(storm).await {
        let detail = problem(&reply, 409, "request-in-progress");
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert!(detail.contains("after the Retry-After delay"), "{detail}");
    }
    problem(&send(&app, pay("6")).await, 422, "key-reused");
    gate.let_through(1);
    let first = tokio::time::timeout(HANG, first)
        .await
        .expect("the first request ends")
        .unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let retries = (0..STORM).map(|_| send(&app, pay("5")));
    for reply in futures_util::future::join_all(retries).await {
        assert_eq!((reply.status, reply.replayed), (StatusCode::CREATED, true));
        assert_eq!(reply.body, first.body);
    }
    assert_eq!((gate.runs(), gate.started()), (1, 1));
}

// ===== one key, two routes =====

#[idempotent(scope = "global")]
async fn refund(State(runs): State<Runs>, body: String) -> (StatusCode, String) {
    (
        StatusCode::CREATED,
        format!("refund {} of {body}", runs.bump()),
    )
}

#[idempotent(scope = "global")]
async fn charge(State(runs): State<Runs>, body: String) -> (StatusCode, String) {
    (
        StatusCode::CREATED,
        format!("charge {} of {body}", runs.bump()),
    )
}

/// A key used at one route and sent, with the same body, to another is
/// refused there as reused, never answered with the first route's
/// response: each attribute is an endpoint of its own, and one layer over
/// a whole router fingerprints the path.
#[tokio::test]
async fn a_key_sent_to_a_second_route_is_refused_as_reused_not_replayed() {
    let runs = Runs::default();
    let by_attribute = Router::new()
        .route("/charges", post(charge))
        .route("/refunds", post(refund))
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    let by_layer = Router::new()
        .route("/charges", post(create))
        .route("/refunds", post(create))
        .route_layer(IdempotentLayer::new(ORDERS))
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    for app in [by_attribute, by_layer] {
        let first = send(&app, request("POST", "/charges", Some("k"), "10")).await;
        assert_eq!(first.status, StatusCode::CREATED);
        let other = send(&app, request("POST", "/refunds", Some("k"), "10")).await;
        let detail = problem(&other, 422, "key-reused");
        assert!(
            detail.contains("at this endpoint or another one") && detail.contains("send a new key"),
            "{detail}"
        );
        let retry = send(&app, request("POST", "/charges", Some("k"), "10")).await;
        assert_eq!((retry.replayed, retry.body), (true, first.body));
    }
    assert_eq!(runs.get(), 2);
}

// ===== one key, several methods of one handler =====

/// Answers by its method: one handler routed for several methods.
#[idempotent(scope = "global")]
async fn by_method(State(runs): State<Runs>, method: Method, body: String) -> String {
    format!("{method} {body}, run {}", runs.bump())
}

/// A key used with `POST` and sent again, with the same body, as a
/// `DELETE`, `PUT` or `PATCH` to the same handler is another request (the
/// handler answers by its method): 422, never the `POST`'s response
/// marked as a replay. A retry with the method it was first sent with is
/// replayed, `PUT` as `POST`; and a `GET` after a `HEAD` with one key is
/// replayed too, as axum serves both by the same handler.
#[tokio::test]
async fn a_key_sent_with_another_method_to_one_handler_is_refused_as_reused_not_replayed() {
    let runs = Runs::default();
    let app = Router::new()
        .route("/items", any(by_method))
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    let first = send(&app, request("POST", "/items", Some("k"), "x")).await;
    assert_eq!(first.body, "POST x, run 1");
    for method in ["DELETE", "PUT", "PATCH", "GET"] {
        let other = send(&app, request(method, "/items", Some("k"), "x")).await;
        let detail = problem(&other, 422, "key-reused");
        assert!(detail.contains("method"), "{detail}");
    }
    let retry = send(&app, request("POST", "/items", Some("k"), "x")).await;
    assert_eq!((retry.replayed, retry.body), (true, first.body));

    let put = send(&app, request("PUT", "/items", Some("p"), "y")).await;
    assert_eq!(put.body, "PUT y, run 2");
    let put_again = send(&app, request("PUT", "/items", Some("p"), "y")).await;
    assert_eq!((put_again.replayed, put_again.body), (true, put.body));
    let post = send(&app, request("POST", "/items", Some("p"), "y")).await;
    problem(&post, 422, "key-reused");

    let head = send(&app, request("HEAD", "/items", Some("h"), "")).await;
    assert_eq!(head.status, StatusCode::OK);
    let get = send(&app, request("GET", "/items", Some("h"), "")).await;
    assert!(get.replayed, "{}", get.body);
    assert_eq!(get.body, "HEAD , run 3");
    assert_eq!(runs.get(), 3);
}

// ===== a 304 =====

/// What a 304 announces as `Content-Length`: the length of the
/// representation it stands for (RFC 9110 8.6), here not that of its body.
const REPRESENTATION_LENGTH: &str = "1234";

/// Answers a conditional `GET` with 304, its representation's `ETag` and
/// length, as a handler that knows them without building the body does.
async fn not_modified_plain(State(runs): State<Runs>) -> Response {
    runs.bump();
    let headers = [(ETAG, "\"v1\""), (CONTENT_LENGTH, REPRESENTATION_LENGTH)];
    (StatusCode::NOT_MODIFIED, headers).into_response()
}

#[idempotent(scope = "global")]
async fn not_modified_by_attribute(State(runs): State<Runs>) -> Response {
    not_modified_plain(State(runs)).await
}

/// A keyed conditional `GET` of `path` (its key) over `client`; a 304
/// has no body to read.
async fn conditional_get(
    client: &SendRequest<Bytes>,
    path: &str,
) -> axum::http::Response<h2::RecvStream> {
    let request = Request::get(format!("http://test{path}"))
        .header("idempotency-key", path)
        .header("if-none-match", "\"v1\"")
        .body(())
        .unwrap();
    let mut ready = client.clone().ready().await.unwrap();
    let (response, _) = ready.send_request(request, true).unwrap();
    tokio::time::timeout(HANG, response)
        .await
        .expect("the server answers")
        .unwrap()
}

/// Over HTTP/2, where hyper sends a 304's `Content-Length` as the handler
/// set it, a replayed 304 announces the same length as the first answer,
/// not the `0` of the empty body it replays, which RFC 9110 8.6 forbids
/// for a 304 whose 200 is not empty.
#[tokio::test]
async fn over_h2_a_replayed_304_announces_the_length_its_first_answer_did() {
    let runs = Runs::default();
    let layer = IdempotentLayer::new(ORDERS);
    let app = Router::new()
        .route("/attribute", get(not_modified_by_attribute))
        .route("/layer", get(not_modified_plain).route_layer(layer))
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    let (addr, _server) = listen(app, std::future::pending()).await;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move { drop(connection.await) });
    for path in ["/attribute", "/layer"] {
        let first = conditional_get(&client, path).await;
        let replay = conditional_get(&client, path).await;
        assert_eq!(first.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(first.headers()[CONTENT_LENGTH], REPRESENTATION_LENGTH);
        assert!(replay.headers().contains_key(IDEMPOTENT_REPLAYED), "{path}");
        for name in [CONTENT_LENGTH, ETAG] {
            let (first, replayed) = (first.headers().get(&name), replay.headers().get(&name));
            assert_eq!(replayed, first, "{path}: {name}");
        }
    }
    assert_eq!(runs.get(), 2);
}
