//! Handlers written as an experienced axum user writes them, through a
//! `Router`: each compiles, and its fingerprint covers exactly its
//! payload (a retry differing only in a fingerprinted input gets 422,
//! one differing only in a skipped or never fingerprinted input is
//! replayed).

use crate::macro_support::{self, Runs};

use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};
use macro_support::{Reply, send};
use serde::{Deserialize, Serialize};

/// A request to `uri` under the key `key`, with `body` as JSON.
fn request(uri: &str, key: &str, body: &str) -> Request<Body> {
    macro_support::post_json(uri, key, body)
}

fn app(routes: Router<Runs>, runs: &Runs) -> Router {
    routes
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()))
}

#[track_caller]
fn assert_reused(reply: &Reply) {
    assert_eq!(reply.problem(422).0, "key-reused", "{}", reply.body);
}

#[track_caller]
fn assert_replayed(reply: &Reply, body: &str) {
    assert_eq!(
        (reply.body.as_str(), reply.replayed),
        (body, true),
        "{reply:?}"
    );
}

// ---- a client address, never fingerprinted ----

#[idempotent(scope = "global")]
async fn from_address(
    State(runs): State<Runs>,
    ConnectInfo(address): ConnectInfo<SocketAddr>,
    Json(n): Json<u32>,
) -> String {
    format!("{}:{n}:{}", runs.bump(), address.port())
}

fn from(port: u16, key: &str, body: &str) -> Request<Body> {
    let mut request = request("/address", key, body);
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    request.extensions_mut().insert(ConnectInfo(address));
    request
}

#[tokio::test]
async fn a_retry_from_another_address_is_replayed() {
    let runs = Runs::default();
    let app = app(Router::new().route("/address", post(from_address)), &runs);
    assert_eq!(send(&app, from(1, "k", "5")).await.body, "1:5:1");
    assert_replayed(&send(&app, from(2, "k", "5")).await, "1:5:1");
    assert_reused(&send(&app, from(2, "k", "6")).await);
}

// ---- an application's own parts extractor, skipped, bound `mut` ----

struct Trace(String);

impl<S: Send + Sync> FromRequestParts<S> for Trace {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let trace = parts
            .headers
            .get("x-trace")
            .map_or("", |v| v.to_str().unwrap_or(""));
        Ok(Self(trace.to_owned()))
    }
}

#[idempotent(scope = "global", skip(trace))]
async fn with_trace(State(runs): State<Runs>, mut trace: Trace, Json(n): Json<u32>) -> String {
    trace.0.push('!');
    format!("{}:{n}:{}", runs.bump(), trace.0)
}

#[tokio::test]
async fn a_skipped_own_extractor_bound_mut_is_left_out() {
    let runs = Runs::default();
    let app = app(Router::new().route("/trace", post(with_trace)), &runs);
    let traced = |trace: &str, body: &str| {
        let mut request = request("/trace", "k", body);
        request
            .headers_mut()
            .insert("x-trace", trace.parse().unwrap());
        request
    };
    assert_eq!(send(&app, traced("a", "5")).await.body, "1:5:a!");
    assert_replayed(&send(&app, traced("b", "5")).await, "1:5:a!");
    assert_reused(&send(&app, traced("b", "6")).await);
}

// ---- renamed fields in path and query ----

#[derive(Serialize, Deserialize)]
struct Ids {
    #[serde(rename = "org_id")]
    org: String,
}

#[derive(Serialize, Deserialize)]
struct Page {
    #[serde(rename = "per_page", default)]
    size: u32,
}

#[idempotent(scope = "global")]
async fn renamed(
    State(runs): State<Runs>,
    Path(Ids { org }): Path<Ids>,
    Query(Page { size }): Query<Page>,
) -> String {
    format!("{}:{org}:{size}", runs.bump())
}

#[tokio::test]
async fn renamed_path_and_query_fields_are_fingerprinted() {
    let runs = Runs::default();
    let app = app(Router::new().route("/orgs/{org_id}", post(renamed)), &runs);
    assert_eq!(
        send(&app, request("/orgs/a?per_page=5", "k", ""))
            .await
            .body,
        "1:a:5"
    );
    assert_replayed(
        &send(&app, request("/orgs/a?per_page=5", "k", "")).await,
        "1:a:5",
    );
    assert_reused(&send(&app, request("/orgs/a?per_page=6", "k", "")).await);
    assert_reused(&send(&app, request("/orgs/a", "k", "")).await);
    assert_reused(&send(&app, request("/orgs/b?per_page=5", "k", "")).await);
}

// ---- Option<Json<T>> ----

#[idempotent(scope = "global")]
async fn maybe(State(runs): State<Runs>, body: Option<Json<u32>>) -> String {
    format!("{}:{:?}", runs.bump(), body.map(|Json(n)| n))
}

#[tokio::test]
async fn an_optional_body_present_or_absent_is_fingerprinted() {
    let runs = Runs::default();
    let app = app(Router::new().route("/maybe", post(maybe)), &runs);
    let bare = || {
        Request::post("/maybe")
            .header("idempotency-key", "k")
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(send(&app, bare()).await.body, "1:None");
    assert_replayed(&send(&app, bare()).await, "1:None");
    assert_reused(&send(&app, request("/maybe", "k", "5")).await);
}

// ---- -> () ----

#[idempotent(scope = "global")]
async fn unit(State(runs): State<Runs>, Json(_n): Json<u32>) -> () {
    runs.bump();
}

#[idempotent(scope = "global")]
async fn nothing(State(runs): State<Runs>) {
    runs.bump();
}

#[tokio::test]
async fn a_handler_returning_unit_runs_once() {
    let runs = Runs::default();
    let app = app(
        Router::new()
            .route("/unit", post(unit))
            .route("/nothing", post(nothing)),
        &runs,
    );
    assert_eq!(
        send(&app, request("/unit", "k", "5")).await.status,
        StatusCode::OK
    );
    assert_replayed(&send(&app, request("/unit", "k", "5")).await, "");
    assert_reused(&send(&app, request("/unit", "k", "6")).await);
    assert_eq!(
        send(&app, request("/nothing", "k2", "")).await.status,
        StatusCode::OK
    );
    assert_replayed(&send(&app, request("/nothing", "k2", "")).await, "");
    assert_eq!(runs.get(), 2);
}

// ---- generic, where clause, impl IntoResponse ----

pub(crate) trait Counter: Clone + Send + Sync + 'static {
    fn count(&self) -> usize;
}

impl Counter for Runs {
    fn count(&self) -> usize {
        self.bump()
    }
}

#[idempotent(scope = "global")]
pub(crate) async fn generic<S, T>(State(state): State<S>, Json(value): Json<T>) -> impl IntoResponse
where
    S: Counter,
    T: Serialize + for<'de> Deserialize<'de> + std::fmt::Debug + Send + 'static,
{
    (StatusCode::CREATED, format!("{}:{value:?}", state.count()))
}

#[tokio::test]
async fn a_generic_handler_fingerprints_its_payload() {
    let runs = Runs::default();
    let app = app(
        Router::new().route("/g", post(generic::<Runs, Vec<u8>>)),
        &runs,
    );
    assert_eq!(send(&app, request("/g", "k", "[1]")).await.body, "1:[1]");
    assert_replayed(&send(&app, request("/g", "k", "[1]")).await, "1:[1]");
    assert_reused(&send(&app, request("/g", "k", "[2]")).await);
}

// ---- inside impl, in macro_rules!, stacked with instrument ----

struct Handlers;

impl Handlers {
    /// Documented.
    #[idempotent(scope = "global", name = "handlers.create")]
    #[tracing::instrument(skip(runs))]
    pub(crate) async fn create(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
        format!("{}:{n}", runs.bump())
    }
}

macro_rules! guarded {
    ($name:ident, $guard:pat, $guard_ty:ty, $skipped:ident, $skipped_ty:ty) => {
        #[tracing::instrument(skip_all)]
        #[idempotent(scope = "global", skip($skipped))]
        async fn $name(
            State(runs): State<Runs>,
            $guard: $guard_ty,
            $skipped: $skipped_ty,
            Json(n): Json<u32>,
        ) -> String {
            format!("{}:{n}", runs.bump())
        }
    };
}

guarded!(from_macro, _, Trace, _page, Query<Page>);

#[tokio::test]
async fn handlers_in_impls_and_macros_fingerprint_their_payload() {
    let runs = Runs::default();
    let app = app(
        Router::new()
            .route("/impl", post(Handlers::create))
            .route("/macro", post(from_macro)),
        &runs,
    );
    assert_eq!(send(&app, request("/impl", "k", "5")).await.body, "1:5");
    assert_replayed(&send(&app, request("/impl", "k", "5")).await, "1:5");
    assert_reused(&send(&app, request("/impl", "k", "6")).await);
    assert_eq!(
        send(&app, request("/macro?per_page=1", "m", "5"))
            .await
            .body,
        "2:5"
    );
    assert_replayed(
        &send(&app, request("/macro?per_page=2", "m", "5")).await,
        "2:5",
    );
    assert_reused(&send(&app, request("/macro", "m", "6")).await);
}
