use std::rc::Rc;

use idempotent_core::idempotent;

async fn audit() {}

#[idempotent]
async fn handler(body: String) -> String {
    let shared = Rc::new(body);
    audit().await;
    shared.to_string()
}

fn main() {}
