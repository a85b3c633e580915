use idempotent_core::idempotent;

#[idempotent(ttl = "1h", scope = "global", ttl = "2h")]
async fn handler() {}

fn main() {}
