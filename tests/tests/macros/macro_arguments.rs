//! Handlers that take many arguments: up to axum's limit of 16, the
//! handler as written is routed whatever the attribute adds, and behaves
//! as one with few.

use crate::macro_support;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, Request, StatusCode, Uri, Version};
use axum::routing::post;
use axum::{Extension, Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, IdempotencyScope, idempotent};
use macro_support::{Runs, send};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Page {
    n: u32,
}

/// Sixteen arguments, the first of which can reject the request.
#[idempotent(scope = "header:x-tenant")]
#[expect(clippy::too_many_arguments, reason = "axum's limit, on purpose")]
async fn sixteen(
    Query(page): Query<Page>,
    State(runs): State<Runs>,
    _headers: HeaderMap,
    _method: Method,
    _uri: Uri,
    _version: Version,
    Extension(a): Extension<u8>,
    Extension(b): Extension<u16>,
    Extension(c): Extension<u32>,
    Extension(d): Extension<u64>,
    Extension(e): Extension<i8>,
    Extension(f): Extension<i16>,
    Extension(g): Extension<i32>,
    Extension(h): Extension<i64>,
    Extension(i): Extension<i128>,
    Json(body): Json<u64>,
) -> (StatusCode, String) {
    let extensions = i128::from(a) + i128::from(b) + i128::from(c) + i128::from(d);
    let extensions = extensions + i128::from(e) + i128::from(f) + i128::from(g);
    let extensions = extensions + i128::from(h) + i;
    let run = runs.bump();
    (
        StatusCode::CREATED,
        format!("run {run}: page {} {extensions} {body}", page.n),
    )
}

/// The caller, from `x-user`, which the attribute extracts itself.
struct User(u64);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for User {
    type Rejection = StatusCode;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let user = parts
            .headers
            .get("x-user")
            .ok_or(StatusCode::UNAUTHORIZED)?;
        let user = user.to_str().ok().and_then(|user| user.parse().ok());
        user.map(Self).ok_or(StatusCode::UNAUTHORIZED)
    }
}

impl IdempotencyScope for User {
    fn scope_id(&self) -> impl AsRef<[u8]> {
        self.0.to_be_bytes()
    }
}

/// Six arguments, and the two the attribute adds: the principal among them.
#[idempotent(scope = User)]
async fn six_scoped(
    Query(page): Query<Page>,
    State(runs): State<Runs>,
    _headers: HeaderMap,
    _method: Method,
    _uri: Uri,
    Json(body): Json<u64>,
) -> String {
    format!("run {}: page {} {body}", runs.bump(), page.n)
}

fn app(runs: &Runs) -> Router {
    Router::new()
        .route("/sixteen", post(sixteen))
        .route("/six", post(six_scoped))
        .layer(Extension(1_u8))
        .layer(Extension(2_u16))
        .layer(Extension(3_u32))
        .layer(Extension(4_u64))
        .layer(Extension(5_i8))
        .layer(Extension(6_i16))
        .layer(Extension(7_i32))
        .layer(Extension(8_i64))
        .layer(Extension(9_i128))
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()))
}

/// A keyed `POST` of the JSON `body` to `uri` with `headers`.
fn request(uri: &str, key: Option<&str>, headers: &[(&str, &str)], body: &str) -> Request<Body> {
    let mut request = Request::post(uri).header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::from(body.to_owned())).unwrap()
}

#[tokio::test]
async fn a_handler_of_sixteen_arguments_runs_once_and_is_replayed() {
    let runs = Runs::default();
    let app = app(&runs);
    let tenant = [("x-tenant", "t1")];
    let first = send(&app, request("/sixteen?n=3", Some("k"), &tenant, "10")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert_eq!(first.body, "run 1: page 3 45 10");
    let retry = send(&app, request("/sixteen?n=3", Some("k"), &tenant, "10")).await;
    assert!(retry.replayed);
    assert_eq!(retry.body, first.body);
    let other = send(&app, request("/sixteen?n=4", Some("k"), &tenant, "10")).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.get(), 1);
}

/// The attribute's arguments still come first: a request without a key is
/// refused for it before the handler's first argument reads the query.
#[tokio::test]
async fn a_handler_of_sixteen_arguments_refuses_a_missing_key_first() {
    let runs = Runs::default();
    let app = app(&runs);
    let tenant = [("x-tenant", "t1")];
    let keyless = send(&app, request("/sixteen?n=x", None, &tenant, "10")).await;
    assert_eq!(keyless.problem(400).0, "missing-key");
    let bad_query = send(&app, request("/sixteen?n=x", Some("k"), &tenant, "10")).await;
    assert_eq!(bad_query.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_query.problem_type(), None, "{}", bad_query.body);
    assert_eq!(runs.get(), 0);
}

#[tokio::test]
async fn a_principal_the_attribute_extracts_among_many_arguments_scopes_the_key() {
    let runs = Runs::default();
    let app = app(&runs);
    let first = send(
        &app,
        request("/six?n=1", Some("k"), &[("x-user", "1")], "5"),
    )
    .await;
    let retry = send(
        &app,
        request("/six?n=1", Some("k"), &[("x-user", "1")], "5"),
    )
    .await;
    let other = send(
        &app,
        request("/six?n=1", Some("k"), &[("x-user", "2")], "5"),
    )
    .await;
    let anonymous = send(&app, request("/six?n=1", Some("k"), &[], "5")).await;
    assert_eq!(first.body, "run 1: page 1 5");
    assert!(retry.replayed);
    assert_eq!(other.body, "run 2: page 1 5");
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(runs.get(), 2);
}

/// A module that forbids `clippy::too_many_arguments`: a handler within
/// clippy's limit compiles, whatever the attribute adds (`cargo clippy
/// --all-targets` checks it).
#[forbid(clippy::too_many_arguments)]
mod forbidding {
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, Method, Uri, Version};
    use idempotent_core::idempotent;

    use super::Runs;

    /// Seven arguments, clippy's limit.
    #[idempotent(scope = "header:x-tenant")]
    pub(super) async fn seven(
        State(runs): State<Runs>,
        _headers: HeaderMap,
        _method: Method,
        _uri: Uri,
        _version: Version,
        Path(id): Path<u64>,
        body: String,
    ) -> String {
        format!("run {}: {id} {body}", runs.bump())
    }
}

#[tokio::test]
async fn a_handler_at_clippys_limit_compiles_where_the_lint_is_forbidden() {
    let runs = Runs::default();
    let app = Router::new()
        .route("/seven/{id}", post(forbidding::seven))
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    let tenant = [("x-tenant", "t1")];
    let first = send(&app, request("/seven/4", Some("k"), &tenant, "hi")).await;
    let retry = send(&app, request("/seven/4", Some("k"), &tenant, "hi")).await;
    assert_eq!(first.body, "run 1: 4 hi");
    assert!(retry.replayed);
    assert_eq!(runs.get(), 1);
}
