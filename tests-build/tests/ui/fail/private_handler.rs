//! The routed function keeps the handler's visibility: a private handler
//! cannot be routed from outside its module.

use axum::Router;
use axum::routing::post;
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};

/// Handlers.
pub mod handlers {
    use super::idempotent;

    #[idempotent]
    async fn private(body: String) -> String {
        body
    }
}

/// Routes them.
pub fn main() {
    let _app: Router = Router::new()
        .route("/private", post(handlers::private))
        .layer(Idempotency::new(MemoryStore::new()));
}
