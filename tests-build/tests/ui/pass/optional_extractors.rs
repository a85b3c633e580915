//! An `Option` or `Result` of an extractor that carries no payload is left
//! out of the fingerprint, as the extractor itself is.
use axum::extract::Extension;
use axum::extract::rejection::ExtensionRejection;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};

/// Left by an authentication middleware for signed-in callers only.
#[derive(Clone)]
struct CurrentUser(u64);

#[idempotent]
async fn maybe_signed_in(user: Option<Extension<CurrentUser>>, Json(n): Json<u32>) -> String {
    format!("{} {n}", user.map_or(0, |Extension(user)| user.0))
}

#[idempotent]
async fn with_rejection(
    user: Result<Extension<CurrentUser>, ExtensionRejection>,
    body: String,
) -> String {
    format!("{} {body}", user.is_ok())
}

fn main() {
    let _app: Router = Router::new()
        .route("/a", post(maybe_signed_in))
        .route("/b", post(with_rejection))
        .layer(Idempotency::new(MemoryStore::new()));
}
