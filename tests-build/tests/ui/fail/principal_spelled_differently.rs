use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use idempotent_core::{IdempotencyScope, idempotent};

mod auth {
    pub struct User {
        pub id: u64,
    }
}

impl<S: Send + Sync> FromRequestParts<S> for auth::User {
    type Rejection = StatusCode;

    async fn from_request_parts(_: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self { id: 1 })
    }
}

impl IdempotencyScope for auth::User {
    fn scope_id(&self) -> impl AsRef<[u8]> {
        self.id.to_be_bytes()
    }
}

use auth::User;

#[idempotent(scope = auth::User)]
async fn transfer(user: User, body: String) -> String {
    format!("{} {body}", user.id)
}

fn main() {}
