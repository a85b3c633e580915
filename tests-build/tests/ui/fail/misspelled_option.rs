use idempotent_core::idempotent;

#[idempotent(scopes = "global")]
async fn handler() {}

fn main() {}
