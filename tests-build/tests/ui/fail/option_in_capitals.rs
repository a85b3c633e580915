use idempotent_core::idempotent;

#[idempotent(TTL = "24h", Scope = "global")]
async fn handler(body: String) -> String {
    body
}

fn main() {}
