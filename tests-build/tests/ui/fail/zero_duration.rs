use idempotent_core::idempotent;

#[idempotent(lease = "0s")]
async fn handler() {}

fn main() {}
