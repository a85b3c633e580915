use axum::Json;
use idempotent_core::idempotent;

struct Payments;

impl Payments {
    fn validate(amount: u64) -> bool {
        amount > 0
    }

    #[idempotent]
    async fn create(Json(amount): Json<u64>) -> String {
        // A type of the body's own has its own `Self`.
        struct Receipt(u64);
        impl Receipt {
            fn new(amount: u64) -> Self {
                Self(amount)
            }
        }
        let receipt = Receipt::new(amount);
        format!("{} {}", receipt.0, Self::validate(amount))
    }
}

fn main() {}
