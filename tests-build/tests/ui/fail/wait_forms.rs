use idempotent_core::idempotent;

#[idempotent(wait = true)]
async fn flag(body: String) -> String {
    body
}

#[idempotent(wait)]
async fn bare(body: String) -> String {
    body
}

#[idempotent(wait("5s"))]
async fn call(body: String) -> String {
    body
}

#[idempotent(wait = "5")]
async fn no_unit(body: String) -> String {
    body
}

fn main() {}
