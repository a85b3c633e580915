use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use idempotent_core::idempotent;

struct Tenant(u64);

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(1))
    }
}

#[idempotent(scope = Tenant)]
async fn handler(tenant: Tenant) -> String {
    tenant.0.to_string()
}

fn main() {}
