use idempotent_core::idempotent;

#[idempotent(final_statuses = "2xx, 6xx")]
async fn no_such_class() {}

#[idempotent(final_statuses = "2xx, 404,")]
async fn empty_entry() {}

#[idempotent(final_statuses = "")]
async fn empty_list() {}

#[idempotent(final_statuses = "4xx-2xx")]
async fn backwards() {}

#[idempotent(final_statuses = 200)]
async fn number() {}

fn main() {}
