use idempotent_core::idempotent;

// An `=` with nothing after it is reported at the option, and the options
// after it are still read.
#[idempotent(ttl =, scope = "tenant")]
async fn duration(body: String) -> String {
    body
}

#[idempotent(optional =)]
async fn flag(body: String) -> String {
    body
}

#[idempotent(scope = , crate =)]
async fn last(body: String) -> String {
    body
}

fn main() {}
