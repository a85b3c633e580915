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

// A tuple as the last argument is extracted from the request's parts but
// for its last element.
#[idempotent]
async fn grouped_last((body, method): (String, Method)) -> String {
    format!("{method} {body}")
}

fn main() {}
