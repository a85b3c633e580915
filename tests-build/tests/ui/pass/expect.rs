//! `#[expect]` on a handler is fulfilled wherever its lint fires: at the
//! routed function (`missing_docs`, `non_snake_case` of its name) or in the
//! body as written (`unused_variables`), with no "unfulfilled lint
//! expectation" at the other.
#![deny(warnings, missing_docs)]

use axum::Router;
use axum::routing::post;
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};

#[idempotent]
#[expect(missing_docs, reason = "documented elsewhere")]
pub async fn undocumented(body: String) -> String {
    body
}

/// Named as the route it answers.
#[idempotent]
#[expect(non_snake_case, reason = "named as the route")]
async fn CreatePayment(body: String) -> String {
    body
}

/// A lint of the body.
#[idempotent]
#[expect(unused_variables, reason = "the lint fires in the body")]
pub async fn unused(body: String) -> String {
    let unused = 1;
    body
}

fn main() {
    let _app: Router = Router::new()
        .route("/undocumented", post(undocumented))
        .route("/payments", post(CreatePayment))
        .route("/unused", post(unused))
        .layer(Idempotency::new(MemoryStore::new()));
}
