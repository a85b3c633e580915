use idempotent_core::idempotent;

#[idempotent(ttl "24h")]
async fn handler() {}

fn main() {}
