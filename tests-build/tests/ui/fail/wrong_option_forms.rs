use idempotent_core::idempotent;

#[idempotent(optional = "yes", skip = body, name = "", crate = 5)]
async fn handler(body: String) -> String {
    body
}

fn main() {}
