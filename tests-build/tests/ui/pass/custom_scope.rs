use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::post;
use axum::{Extension, Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, IdempotencyScope, idempotent};

#[path = "../shared/auth.rs"]
mod auth;

// The handler does not take the principal: the macro extracts it.
#[idempotent(scope = auth::User)]
async fn scoped_by_extra_extractor(Json(amount): Json<u64>) -> Json<u64> {
    Json(amount)
}

// The handler takes the principal: the macro scopes by that argument and
// does not fingerprint it.
#[idempotent(scope = auth::User)]
async fn scoped_by_argument(user: auth::User, Json(amount): Json<u64>) -> Json<u64> {
    Json(user.id + amount)
}

// An auth middleware left the principal in the request's extensions: the
// handler's `Extension` of it is the principal, or the macro extracts one.
#[idempotent(scope = auth::User)]
async fn scoped_by_extension(Extension(user): Extension<auth::User>, Json(n): Json<u64>) -> Json<u64> {
    Json(user.id + n)
}

#[idempotent(scope = Extension<auth::User>)]
async fn scoped_by_extracted_extension(Json(amount): Json<u64>) -> Json<u64> {
    Json(amount)
}

/// A principal generic over a role; `scope = Claims` takes a
/// `Claims<Admin>` argument.
struct Claims<R> {
    id: u64,
    role: std::marker::PhantomData<fn() -> R>,
}

struct Admin;

impl<S: Send + Sync, R> FromRequestParts<S> for Claims<R> {
    type Rejection = StatusCode;

    async fn from_request_parts(_: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self { id: 1, role: std::marker::PhantomData })
    }
}

impl<R> IdempotencyScope for Claims<R> {
    fn scope_id(&self) -> impl AsRef<[u8]> {
        self.id.to_be_bytes()
    }
}

#[idempotent(scope = Claims)]
async fn scoped_by_generic_principal(claims: Claims<Admin>, Json(n): Json<u64>) -> Json<u64> {
    Json(claims.id + n)
}

#[idempotent(scope = Claims::<Admin>)]
async fn scoped_by_turbofish(claims: Claims<Admin>, Json(n): Json<u64>) -> Json<u64> {
    Json(claims.id + n)
}

fn main() {
    let _app: Router = Router::new()
        .route("/a", post(scoped_by_extra_extractor))
        .route("/b", post(scoped_by_argument))
        .route("/c", post(scoped_by_extension))
        .route("/d", post(scoped_by_extracted_extension))
        .route("/e", post(scoped_by_generic_principal))
        .route("/f", post(scoped_by_turbofish))
        .layer(Idempotency::new(MemoryStore::new()));
}
