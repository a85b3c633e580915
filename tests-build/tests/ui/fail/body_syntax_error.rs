// A body that does not parse yet, as while it is being typed: rustc's
// error in the body, and none about the attribute.
use idempotent_core::idempotent;

#[idempotent]
async fn handler(body: String) -> String {
    let length = ;
    body
}

fn main() {}
