use axum::Json;
use idempotent_core::idempotent;
use serde::Serialize;

#[idempotent]
async fn handler(body: impl Into<String>) -> String {
    body.into()
}

#[idempotent]
async fn nested(Json(body): Json<impl Serialize>) -> String {
    let _ = body;
    String::new()
}

fn main() {}
