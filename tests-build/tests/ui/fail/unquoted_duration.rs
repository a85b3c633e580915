use idempotent_core::idempotent;

// A duration is a string: unquoted, `24h` is an integer with a suffix.
#[idempotent(ttl = 24h)]
async fn ttl(body: String) -> String {
    body
}

#[idempotent(lease = 90s, wait = 500ms)]
async fn lease_and_wait(body: String) -> String {
    body
}

#[idempotent(ttl = 1h 30m)]
async fn two_terms(body: String) -> String {
    body
}

#[idempotent(wait = 1.5s)]
async fn fraction(body: String) -> String {
    body
}

fn main() {}
