//! The expansion stays clean in crates with strict lints: this file denies
//! warnings, `unused_qualifications` and `clippy::pedantic`, and
//! `cargo clippy --all-targets` checks it.
#![deny(
    warnings,
    missing_docs,
    rust_2018_idioms,
    unused_qualifications,
    unreachable_pub,
    clippy::all,
    clippy::pedantic
)]

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri, Version};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, IdempotencyKey, IdempotencyScope, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Clone)]
struct Db;

#[derive(Serialize, Deserialize)]
struct Payment {
    amount: i64,
}

struct Tenant(u64);

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let tenant = parts
            .headers
            .get("x-tenant")
            .ok_or(StatusCode::UNAUTHORIZED)?;
        let tenant = tenant.to_str().map_err(|_| StatusCode::BAD_REQUEST)?;
        tenant
            .parse()
            .map(Self)
            .map_err(|_| StatusCode::BAD_REQUEST)
    }
}

impl IdempotencyScope for Tenant {
    fn scope_id(&self) -> impl AsRef<[u8]> {
        self.0.to_be_bytes()
    }
}

/// Every option at once.
#[idempotent(
    ttl = "7d",
    lease = "30s",
    wait = "2s",
    scope = "header:x-tenant",
    optional,
    skip(id),
    name = "payments.create",
    final_statuses = "2xx, 404",
    crate = "::idempotent_core"
)]
async fn create(
    State(_db): State<Db>,
    key: Option<IdempotencyKey>,
    Path(id): Path<u64>,
    Json(payment): Json<Payment>,
) -> Result<(StatusCode, Json<Payment>), StatusCode> {
    let _ = (key, id);
    if payment.amount <= 0 {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok((StatusCode::CREATED, Json(payment)))
}

/// A custom scope taken from the handler's own argument.
#[idempotent(scope = Tenant)]
async fn scoped(tenant: Tenant, body: String) -> impl IntoResponse {
    format!("{}:{body}", tenant.0)
}

/// A custom scope the macro extracts itself.
#[idempotent(scope = Tenant)]
async fn scoped_extra(Json(payment): Json<Payment>) -> Json<i64> {
    Json(payment.amount)
}

/// Seven arguments, clippy's limit: the routed function takes one more
/// (the request's idempotency context), which must not make it warn.
#[idempotent(scope = "header:x-tenant")]
async fn seven(
    _headers: HeaderMap,
    _method: Method,
    _uri: Uri,
    _version: Version,
    State(_db): State<Db>,
    Path(id): Path<u64>,
    body: String,
) -> String {
    format!("{id} {body}")
}

/// Eight arguments, over clippy's limit: the lint fires at the handler as
/// written, where an `#[expect]` fulfils it, and not again at the routed
/// function.
#[idempotent(scope = "header:x-tenant")]
#[expect(clippy::too_many_arguments, reason = "the handler takes eight")]
async fn eight(
    _headers: HeaderMap,
    _method: Method,
    _uri: Uri,
    _version: Version,
    State(_db): State<Db>,
    key: Option<IdempotencyKey>,
    Path(id): Path<u64>,
    body: String,
) -> String {
    format!("{id} {body} {}", key.is_some())
}

/// The same with exact repeats, where the attribute adds no argument of
/// its own (the routed function still groups the first ones in a tuple).
#[idempotent(scope = "global")]
#[expect(clippy::too_many_arguments, reason = "the handler takes eight")]
async fn eight_exact(
    _headers: HeaderMap,
    _method: Method,
    _uri: Uri,
    _version: Version,
    State(_db): State<Db>,
    key: Option<IdempotencyKey>,
    Path(id): Path<u64>,
    body: String,
) -> String {
    format!("{id} {body} {}", key.is_some())
}

/// A generic handler bounded in its parameter list: the routed function's
/// own bounds must not read as a second place.
#[idempotent(scope = "global")]
async fn generic<T: Serialize + serde::de::DeserializeOwned>(Json(value): Json<T>) -> Json<T> {
    Json(value)
}

/// A guard bound to `_` is not fingerprinted.
#[idempotent]
async fn guarded(_: Tenant, body: String) -> String {
    body
}

/// No arguments at all.
#[idempotent]
async fn no_arguments() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// A public API module: the routed function keeps its documentation.
pub mod api {
    use idempotent_core::idempotent;

    /// Echoes the body (`missing_docs` fails if the expansion drops this).
    #[idempotent(scope = "global")]
    pub async fn public_handler(body: String) -> String {
        body
    }
}

/// A module that forbids lints the expansion could otherwise `allow`, an
/// error under `forbid` (E0453), and denies one on the `?` that the
/// expansion writes: seven routed arguments are within clippy's limit.
#[forbid(clippy::unused_async, clippy::too_many_arguments)]
#[deny(clippy::question_mark_used)]
mod forbidding {
    use axum::extract::Path;
    use axum::http::{HeaderMap, Method, Uri, Version};
    use idempotent_core::idempotent;

    /// Six arguments, and no `.await`.
    #[idempotent(scope = "header:x-tenant")]
    pub(super) async fn six(
        _headers: HeaderMap,
        _method: Method,
        _uri: Uri,
        _version: Version,
        Path(id): Path<u64>,
        body: String,
    ) -> String {
        format!("{id} {body}")
    }
}

fn app() -> Router {
    Router::new()
        .route("/payments/{id}", post(create))
        .route("/scoped", post(scoped))
        .route("/scoped-extra", post(scoped_extra))
        .route("/none", post(no_arguments))
        .route("/seven/{id}", post(seven))
        .route("/eight/{id}", post(eight))
        .route("/eight-exact/{id}", post(eight_exact))
        .route("/generic", post(generic::<Payment>))
        .route("/guarded", post(guarded))
        .route("/public", post(api::public_handler))
        .route("/forbidding/{id}", post(forbidding::six))
        .with_state(Db)
        .layer(Idempotency::new(MemoryStore::new()))
}

#[test]
fn strictly_linted_handlers_build_a_router() {
    let _app = app();
}
