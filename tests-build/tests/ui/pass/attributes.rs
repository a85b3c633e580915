//! Attributes around `#[idempotent]`: doc comments, `cfg`, `deprecated` and
//! lint levels go on the routed function; the rest (here `#[expect]`) on the
//! user's function as written.
#![deny(warnings)]

use axum::Router;
use axum::routing::post;
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};

/// Documented.
#[idempotent]
#[expect(unused_variables, reason = "the lint fires in the user's body")]
async fn expected(body: String) -> String {
    let unused = 1;
    body
}

/// Compiled out entirely.
#[idempotent]
#[cfg(any())]
async fn compiled_out(body: String) -> String {
    body
}

/// Deprecated: using it warns, defining it does not.
#[idempotent]
#[deprecated = "use `expected`"]
async fn old(body: String) -> String {
    body
}

/// A lint level on an argument, through `cfg_attr` (a `cfg` through it is
/// refused: see `fail/cfg_on_argument.rs`).
#[idempotent]
async fn lint_on_argument(#[cfg_attr(all(), allow(unused_variables))] body: String) -> String {
    String::new()
}

#[allow(deprecated)]
fn main() {
    let _app: Router = Router::new()
        .route("/expected", post(expected))
        .route("/lint", post(lint_on_argument))
        .route("/old", post(old))
        .layer(Idempotency::new(MemoryStore::new()));
}
