use idempotent_core::idempotent;

#[idempotent(final_statuses = "defualt, 409")]
async fn misspelt() {}

#[idempotent(final_statuses = "default, 409, default")]
async fn twice() {}

#[idempotent(final_statuses = "default-409")]
async fn in_a_range() {}

fn main() {}
