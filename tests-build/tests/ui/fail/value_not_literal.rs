use idempotent_core::idempotent;

const TTL: &str = "24h";

// The attribute reads its options as written: neither a constant nor a
// macro has a value yet.
#[idempotent(ttl = TTL, name = concat!("orders", ".create"))]
async fn handler(body: String) -> String {
    body
}

#[idempotent(wait = std::time::Duration::from_secs(5), lease = -5)]
async fn expression(body: String) -> String {
    body
}

fn main() {
    let _ = TTL;
}
