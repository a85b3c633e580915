use std::convert::Infallible;
use std::rc::Rc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use idempotent_core::idempotent;

/// An extractor whose value is not `Send`: the handler's future holds it.
struct Local(Rc<u8>);

impl<S: Send + Sync> FromRequestParts<S> for Local {
    type Rejection = Infallible;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(Rc::new(1)))
    }
}

#[idempotent(skip(local))]
async fn handler(local: Local, body: String) -> String {
    format!("{} {body}", local.0)
}

fn main() {}
