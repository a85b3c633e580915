use axum::Json;
use idempotent_core::idempotent;

#[idempotent(skip(bdy))]
async fn handler(Json(body): Json<u32>, query: String) -> String {
    format!("{body}{query}")
}

fn main() {}
