//! The authenticated caller that fixtures scope their keys by. trybuild
//! builds each fixture as a crate of its own, so they share this file as a
//! module, `#[path = "../shared/auth.rs"] mod auth;`; it stands outside
//! `pass/` and `fail/`, whose globs would take it for a case.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use idempotent_core::IdempotencyScope;

/// The authenticated caller, from an `X-User` header of its numeric id.
#[derive(Clone)]
pub struct User {
    pub id: u64,
}

impl<S: Send + Sync> FromRequestParts<S> for User {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let id = parts
            .headers
            .get("x-user")
            .ok_or(StatusCode::UNAUTHORIZED)?;
        let id = id.to_str().ok().and_then(|id| id.parse().ok());
        id.map(|id| Self { id }).ok_or(StatusCode::UNAUTHORIZED)
    }
}

impl IdempotencyScope for User {
    fn scope_id(&self) -> impl AsRef<[u8]> {
        self.id.to_be_bytes()
    }
}
