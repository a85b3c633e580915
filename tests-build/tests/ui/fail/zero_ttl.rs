use idempotent_core::idempotent;

#[idempotent(ttl = "0s")]
async fn no_ttl(body: String) -> String {
    body
}

#[idempotent(wait = "0s")]
async fn no_wait(body: String) -> String {
    body
}

fn main() {}
