use idempotent_core::{IdempotencyKey, idempotent};

#[idempotent(optional)]
async fn handler(key: IdempotencyKey, body: String) -> String {
    format!("{}: {body}", key.as_str())
}

fn main() {}
