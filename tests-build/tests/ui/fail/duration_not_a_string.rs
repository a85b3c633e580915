use idempotent_core::idempotent;

#[idempotent(wait = 5)]
async fn handler() {}

fn main() {}
