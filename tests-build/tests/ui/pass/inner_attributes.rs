//! Attributes written at the top of a handler's body mean what they would
//! above it: a lint level there still covers the body, and a `//!` comment
//! documents the handler.
#![deny(warnings)]

use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};

#[idempotent]
async fn allowed(body: String) -> String {
    #![allow(unused_variables)]
    let unused = 1;
    body
}

#[idempotent(scope = "global")]
async fn expected(Json(n): Json<u32>) -> String {
    #![expect(unused_variables, reason = "the lint fires in the body")]
    let unused = 1;
    n.to_string()
}

#[idempotent]
async fn documented(body: String) -> String {
    //! Echoes the body.
    body
}

fn main() {
    let _app: Router = Router::new()
        .route("/allowed", post(allowed))
        .route("/expected", post(expected))
        .route("/documented", post(documented))
        .layer(Idempotency::new(MemoryStore::new()));
}
