use idempotent_core::idempotent;

#[idempotent]
mod handlers {}

trait Handlers {
    #[idempotent]
    async fn create(body: String) -> String;
}

#[idempotent(scope = "global")]
const HANDLER: u8 = 0;

fn main() {}
