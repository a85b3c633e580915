use idempotent_core::{Scope, idempotent};

#[idempotent(scope = "header:")]
async fn no_header() {}

#[idempotent(scope = "header:X Tenant")]
async fn header_with_a_space() {}

#[idempotent(scope = "API_KEY")]
async fn capitals() {}

#[idempotent(scope = "x-tenant-id")]
async fn bare_header() {}

#[idempotent(scope = Scope::Global)]
async fn enum_variant() {}

#[idempotent(scope = 5)]
async fn number() {}

fn main() {
    let _ = Scope::ApiKey;
}
