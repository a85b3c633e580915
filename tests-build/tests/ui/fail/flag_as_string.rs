use idempotent_core::idempotent;

#[idempotent(optional = "true", exact_repeats = "false")]
async fn handler(body: String) -> String {
    body
}

fn main() {}
