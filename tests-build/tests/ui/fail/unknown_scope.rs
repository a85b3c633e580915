use idempotent_core::idempotent;

#[idempotent(scope = "apikey")]
async fn handler() {}

fn main() {}
