use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use idempotent_core::idempotent;

struct ClientIp(String);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(String::new()))
    }
}

#[idempotent]
async fn handler(ip: ClientIp, body: String) -> String {
    ip.0 + &body
}

fn main() {}
