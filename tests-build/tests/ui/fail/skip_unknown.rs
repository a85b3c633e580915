use axum::Json;
use axum::http::HeaderMap;
use idempotent_core::idempotent;

#[idempotent(skip(bdy))]
async fn handler(headers: HeaderMap, Json(body): Json<u32>) -> String {
    format!("{body}{}", headers.len())
}

fn main() {}
