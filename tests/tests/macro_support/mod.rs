//! What the `macro_*` tests and the HTTP ones share: a count of handler
//! runs, a request sent through a `Router` read back whole, a turnstile
//! handlers wait at, and a server on a port of its own; for the tests that
//! check the attribute and the layer side by side, one router serving a
//! handler made idempotent each way, and (in [`gated`]) a gated handler;
//! an application's own answer to a malformed JSON body.
#![allow(dead_code, unreachable_pub)] // each test file uses a different part

use std::io::Read as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::handler::Handler;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, post};
use http_body_util::BodyExt;
use idempotent_core::{Endpoint, IDEMPOTENT_REPLAYED, Idempotency, IdempotentLayer};
use tokio::sync::Semaphore;
use tower::ServiceExt;

pub mod gated;

/// How many times the handlers ran, shared as their state.
#[derive(Clone, Default)]
pub struct Runs(Arc<AtomicUsize>);

impl Runs {
    /// Counts a run; the count with it.
    pub fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Where handlers wait, one at a time let through, until the test opens
/// the way; closed at first. The test can wait for a handler to get there.
#[derive(Clone)]
pub struct Turnstile {
    arrived: Arc<Semaphore>,
    open: Arc<Semaphore>,
}

impl Default for Turnstile {
    fn default() -> Self {
        Self {
            arrived: Arc::new(Semaphore::new(0)),
            open: Arc::new(Semaphore::new(0)),
        }
    }
}

impl Turnstile {
    /// Says that a handler arrived, then waits until it is let through.
    pub async fn pass(&self) {
        self.arrived.add_permits(1);
        let permit = self.open.acquire().await.expect("never closed");
        permit.forget();
    }

    /// Waits for the next handler to arrive; ten seconds at most, a bound
    /// on a hang, never a synchronisation.
    pub async fn until_started(&self) {
        let arrived = self.arrived.acquire();
        let permit = tokio::time::timeout(Duration::from_secs(10), arrived).await;
        permit.expect("the handler starts").unwrap().forget();
    }

    /// Lets `runs` more handlers through.
    pub fn let_through(&self, runs: usize) {
        self.open.add_permits(runs);
    }
}

/// An application's own answer to a malformed JSON body, as
/// `WithRejection` is used for: a 400 with the rejection's text.
pub struct ApiError(pub JsonRejection);

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self(rejection)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, self.0.body_text()).into_response()
    }
}

/// A response, its body read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    /// Whether it carries `Idempotent-Replayed`.
    pub replayed: bool,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The value of the header `name`, if it has one.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|value| value.to_str().unwrap())
    }

    /// The problem type's name (`key-reused` for
    /// `urn:idempotent:key-reused`), for a problem+json answer.
    pub fn problem_type(&self) -> Option<String> {
        let problem: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        let kind = problem["type"].as_str()?;
        Some(kind.trim_start_matches("urn:idempotent:").to_owned())
    }

    /// The problem this reply carries, as `(type name, detail)` (`key-reused`
    /// for `urn:idempotent:key-reused`), after checking that it is a
    /// problem+json answer of `status`.
    #[track_caller]
    pub fn problem(&self, status: u16) -> (String, String) {
        assert_eq!(self.status.as_u16(), status, "{}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        let problem: serde_json::Value = serde_json::from_str(&self.body).expect("a JSON problem");
        assert_eq!(problem["status"], status, "{problem}");
        let kind = problem["type"].as_str().expect("a type");
        let kind = kind
            .strip_prefix("urn:idempotent:")
            .expect("one of the library's types");
        let detail = problem["detail"].as_str().expect("a detail");
        (kind.to_owned(), detail.to_owned())
    }
}

pub async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        replayed,
        headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

/// A gzip-encoded body, decoded (as behind a `CompressionLayer`).
pub fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut plain)
        .unwrap();
    plain
}

/// A `POST` of the JSON `body` to `uri` under the key `key`.
pub fn post_json(uri: &str, key: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// `/attribute` and `/layer`, one handler made idempotent each way: by the
/// attribute, and as `plain` under an `IdempotentLayer` of `endpoint`; on
/// `state`, behind `idempotency`.
pub fn both_ways<S: Clone + Send + Sync + 'static, A: 'static, P: 'static>(
    by_attribute: impl Handler<A, S>,
    plain: impl Handler<P, S>,
    endpoint: Endpoint,
    state: S,
    idempotency: Idempotency,
) -> Router {
    let routes = (post(by_attribute), post(plain));
    both_routes(routes, endpoint, state, idempotency)
}

/// [`both_ways`] for the methods the two routes (`by_attribute`, `plain`)
/// were made for: `(get(a), get(p))`, say.
pub fn both_routes<S: Clone + Send + Sync + 'static>(
    (by_attribute, plain): (MethodRouter<S>, MethodRouter<S>),
    endpoint: Endpoint,
    state: S,
    idempotency: Idempotency,
) -> Router {
    Router::new()
        .route("/attribute", by_attribute)
        .route("/layer", plain.route_layer(IdempotentLayer::new(endpoint)))
        .with_state(state)
        .layer(idempotency)
}

/// `app` served on a port of its own until `stop` is sent, as
/// `axum::serve(...).with_graceful_shutdown(...)` does, and a client
/// connected to it: `(client, stop, server)`.
pub async fn serve(
    app: Router,
) -> (
    tokio::net::TcpStream,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = listen(app, async move { drop(stopped.await) }).await;
    let client = tokio::net::TcpStream::connect(addr).await.unwrap();
    (client, stop, server)
}

/// `app` served on a free loopback port until `shutdown` completes, then
/// shut down gracefully: its address, and the server's task.
pub async fn listen(
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .unwrap();
    });
    (addr, server)
}
