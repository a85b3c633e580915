use idempotent_core::idempotent;

#[idempotent(ttl: "24h")]
async fn handler(body: String) -> String {
    body
}

fn main() {}
