use idempotent_core::idempotent;

#[idempotent(ttl = "500ms")]
async fn handler() {}

fn main() {}
