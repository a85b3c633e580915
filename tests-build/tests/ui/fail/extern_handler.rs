use idempotent_core::idempotent;

// An ABI would be dropped from the routed function without a word.
#[idempotent]
async extern "C" fn create(body: String) -> String {
    body
}

fn main() {}
