// A type in a message reads as written: `dyn Account`, not `dynAccount`.
use axum::Json;
use axum::http::StatusCode;
use axum::http::request::Parts;
use idempotent_core::idempotent;

trait Account: Send + Sync {}

/// An extractor of the application's own, handing out a trait object.
struct Caller<T: ?Sized>(Box<T>);

impl<S: Send + Sync, T: ?Sized + Send + Sync> axum::extract::FromRequestParts<S> for Caller<T> {
    type Rejection = StatusCode;

    async fn from_request_parts(_: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Err(StatusCode::UNAUTHORIZED)
    }
}

#[idempotent(exact_repeats)]
async fn transfer(caller: Caller<dyn Account>, Json(amount): Json<u64>) -> String {
    let Caller(_account) = caller;
    amount.to_string()
}

fn main() {}
