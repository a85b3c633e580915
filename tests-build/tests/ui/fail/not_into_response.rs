use idempotent_core::idempotent;

struct Payment {
    amount: i64,
}

#[idempotent]
async fn handler(body: String) -> Payment {
    Payment { amount: body.len() as i64 }
}

fn main() {}
