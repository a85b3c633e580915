use idempotent_core::idempotent;

// An option written with `:` or without `=` is reported at it, its value
// is still checked, and the options after it are still read.
#[idempotent(ttl: "24h", scope: "apikey")]
async fn colons(body: String) -> String {
    body
}

#[idempotent(ttl "24 h", optional true, tll = "1h")]
async fn spaces(body: String) -> String {
    body
}

#[idempotent(scope: auth::User, wait: 5)]
async fn paths(body: String) -> String {
    body
}

fn main() {}
