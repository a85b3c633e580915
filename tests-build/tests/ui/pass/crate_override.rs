// A crate that depends on idempotent-core under another name.
pub extern crate idempotent_core as idem;

use axum::routing::post;
use axum::{Json, Router};

#[idem::idempotent(crate = "idem", ttl = "1h")]
async fn renamed(Json(n): Json<u32>) -> Json<u32> {
    Json(n)
}

mod facade {
    pub use idem as idempotency;
}

#[idem::idempotent(crate = "crate::facade::idempotency")]
async fn through_a_facade(Json(n): Json<u32>) -> Json<u32> {
    Json(n)
}

fn main() {
    let _app: Router = Router::new()
        .route("/renamed", post(renamed))
        .route("/facade", post(through_a_facade))
        .layer(idem::Idempotency::new(idem::store::MemoryStore::new()));
}
