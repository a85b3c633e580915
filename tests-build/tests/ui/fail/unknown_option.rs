use idempotent_core::idempotent;

#[idempotent(timeout = "1h")]
async fn handler() {}

fn main() {}
