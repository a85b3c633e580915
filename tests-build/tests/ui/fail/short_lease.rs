use idempotent_core::idempotent;

#[idempotent(lease = "500ms")]
async fn handler() {}

fn main() {}
