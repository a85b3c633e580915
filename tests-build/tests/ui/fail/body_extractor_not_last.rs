use axum::Json;
use axum::http::HeaderMap;
use idempotent_core::idempotent;

#[idempotent]
async fn handler(Json(value): Json<u32>, headers: HeaderMap) -> String {
    format!("{value} {}", headers.len())
}

#[idempotent]
async fn optional_body(body: Option<String>, headers: HeaderMap) -> String {
    format!("{body:?} {}", headers.len())
}

fn main() {}
