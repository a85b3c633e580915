use idempotent_core::idempotent;

#[idempotent(scope = "header:x tenant")]
async fn handler() {}

fn main() {}
