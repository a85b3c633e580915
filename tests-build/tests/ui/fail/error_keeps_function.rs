// On an error in its options the attribute still emits the handler, so
// the router that names it reports nothing more.
use axum::Router;
use axum::routing::post;
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};

#[idempotent(tll = "1h", lese = "30s")]
async fn handler(body: String) -> String {
    body
}

fn main() {
    let _app: Router = Router::new()
        .route("/", post(handler))
        .layer(Idempotency::new(MemoryStore::new()));
}
