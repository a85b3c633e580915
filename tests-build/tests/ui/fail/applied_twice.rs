use idempotent_core::idempotent;

#[idempotent]
#[idempotent(scope = "global")]
async fn handler(body: String) -> String {
    body
}

fn main() {}
