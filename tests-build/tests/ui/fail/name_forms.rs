use idempotent_core::idempotent;

#[idempotent(name = " orders.create")]
async fn padded() {}

#[idempotent(name = "orders\ncreate")]
async fn control_character() {}

#[idempotent(name = orders)]
async fn not_a_string() {}

fn main() {}
