use idempotent_core::idempotent;

struct Service;

impl Service {
    #[idempotent]
    async fn handler(&self) {}
}

fn main() {}
