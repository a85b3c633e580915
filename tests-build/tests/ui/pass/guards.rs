//! A guard extractor bound to `_` is never read, so it is not fingerprinted
//! (and has no name for `skip`).
use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};

struct RequireAdmin;

impl<S: Send + Sync> FromRequestParts<S> for RequireAdmin {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        if parts.headers.contains_key("x-admin") {
            Ok(Self)
        } else {
            Err(StatusCode::FORBIDDEN)
        }
    }
}

#[idempotent]
async fn admin_only(_: RequireAdmin, Json(n): Json<u32>) -> Json<u32> {
    Json(n)
}

#[idempotent(scope = "header:x-tenant")]
async fn admin_only_by_tenant(_: RequireAdmin, body: String) -> String {
    body
}

#[path = "../shared/auth.rs"]
mod auth;

mod admin {
    /// A guard named like the principal: rejects non-admins, carries nothing.
    pub struct User;
}

impl<S: Send + Sync> FromRequestParts<S> for admin::User {
    type Rejection = StatusCode;

    async fn from_request_parts(_: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self)
    }
}

// The principal is taken; a guard of another type of the same name is not
// a misspelled principal.
#[idempotent(scope = auth::User)]
async fn transfer(user: auth::User, _: admin::User, body: String) -> String {
    format!("{} {body}", user.id)
}

fn main() {
    let _app: Router = Router::new()
        .route("/a", post(admin_only))
        .route("/b", post(admin_only_by_tenant))
        .route("/c", post(transfer))
        .layer(Idempotency::new(MemoryStore::new()));
}
