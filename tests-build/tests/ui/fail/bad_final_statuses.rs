use idempotent_core::idempotent;

#[idempotent(final_statuses = "200-299, 700")]
async fn handler() {}

fn main() {}
