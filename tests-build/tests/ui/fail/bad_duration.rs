use idempotent_core::idempotent;

#[idempotent(ttl = "24x")]
async fn handler() {}

fn main() {}
