use idempotent_core::idempotent;

#[idempotent]
struct Handler;

fn main() {}
