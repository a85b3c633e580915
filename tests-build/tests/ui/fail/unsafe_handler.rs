use idempotent_core::idempotent;

#[idempotent]
async unsafe fn create(body: String) -> String {
    body
}

fn main() {}
