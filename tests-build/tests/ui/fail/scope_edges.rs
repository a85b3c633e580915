use idempotent_core::idempotent;

#[idempotent(scope = "")]
async fn empty() {}

#[idempotent(scope = "header")]
async fn header_without_name() {}

fn main() {}
