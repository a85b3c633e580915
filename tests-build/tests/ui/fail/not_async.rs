use idempotent_core::idempotent;

#[idempotent]
fn handler() {}

fn main() {}
