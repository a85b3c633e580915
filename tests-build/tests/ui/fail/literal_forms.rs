use idempotent_core::idempotent;

// A suffix on a string would be dropped without a word.
#[idempotent(ttl = "24h"s, scope = "global"x)]
async fn suffixed(body: String) -> String {
    body
}

// A crate path takes no generic arguments.
#[idempotent(crate = "::idempotent_core<u8>")]
async fn generic_crate(body: String) -> String {
    body
}

#[idempotent(crate = idempotent_core::<u8>)]
async fn generic_crate_path(body: String) -> String {
    body
}

fn main() {}
