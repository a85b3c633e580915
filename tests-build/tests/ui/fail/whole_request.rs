use axum::extract::Request;
use idempotent_core::idempotent;

#[idempotent]
async fn handler(request: Request) -> String {
    request.uri().to_string()
}

fn main() {}
