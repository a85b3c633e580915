// A last argument that is no extractor at all: axum's error at
// `.route(...)` says so, as it does for the handler as written.
use axum::Router;
use axum::routing::post;
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};

struct Plain;

#[idempotent(skip(plain))]
async fn handler(plain: Plain) -> &'static str {
    let Plain = plain;
    "ok"
}

fn main() {
    let _app: Router = Router::new()
        .route("/", post(handler))
        .layer(Idempotency::new(MemoryStore::new()));
}
