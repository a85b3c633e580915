// A required key within a tuple argument refuses a keyless request as it
// does as an argument of its own.
use axum::http::Method;
use idempotent_core::{IdempotencyKey, idempotent};

#[idempotent(optional)]
async fn handler((key, method): (IdempotencyKey, Method), body: String) -> String {
    format!("{} {method}: {body}", key.as_str())
}

fn main() {}
