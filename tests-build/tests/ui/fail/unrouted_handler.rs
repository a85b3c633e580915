//! A handler no router names is dead code, as it is without the
//! attribute: rustc says so at its name, and an `#[expect(dead_code)]`
//! on one is fulfilled rather than reported unfulfilled.
#![deny(dead_code, unfulfilled_lint_expectations)]

use idempotent_core::idempotent;

#[idempotent]
async fn forgotten(body: String) -> String {
    body
}

#[idempotent]
#[expect(dead_code, reason = "routed once the feature ships")]
async fn not_yet(body: String) -> String {
    body
}

fn main() {}
