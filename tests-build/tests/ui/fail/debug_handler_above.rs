//! `#[axum::debug_handler]` above `#[idempotent]` calls the routed function
//! with the arguments as written; its place is below (see
//! `pass/stacked_macros.rs`).
use idempotent_core::idempotent;

#[axum::debug_handler]
#[idempotent(scope = "header:x-tenant-id")]
async fn checked_above(body: String) -> String {
    body
}

fn main() {}
