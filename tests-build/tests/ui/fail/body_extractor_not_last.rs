use axum::Json;
use axum::http::{HeaderMap, Method};
use idempotent_core::idempotent;

#[idempotent]
async fn handler(Json(value): Json<u32>, headers: HeaderMap) -> String {
    format!("{value} {}", headers.len())
}

#[idempotent]
async fn optional_body(body: Option<String>, headers: HeaderMap) -> String {
    format!("{body:?} {}", headers.len())
}

// A tuple before the last argument is extracted from the request's parts
// alone.
#[idempotent]
async fn grouped((method, body): (Method, String), headers: HeaderMap) -> String {
    format!("{method} {body} {}", headers.len())
}

fn main() {}
