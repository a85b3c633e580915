use idempotent_core::idempotent;

#[idempotent]
const fn not_async() {}

// rustc's own error, and none about the attribute.
#[idempotent]
const async fn both(body: String) -> String {
    body
}

fn main() {}
