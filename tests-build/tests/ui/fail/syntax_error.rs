use idempotent_core::idempotent;

// Options are separated by commas.
#[idempotent(ttl = "24h" scope = "global")]
async fn handler() {}

fn main() {}
