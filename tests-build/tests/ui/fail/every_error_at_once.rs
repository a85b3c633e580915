use idempotent_core::idempotent;

#[idempotent(ttl = "1y", scope = "tenant", skip(nothing), retries = 3)]
fn handler(body: String) -> String {
    body
}

fn main() {}
