use axum::Json;
use idempotent_core::idempotent;
use serde::Deserialize;

#[derive(Deserialize)]
struct NewPayment {
    amount: i64,
}

#[idempotent]
async fn handler(Json(payment): Json<NewPayment>) -> String {
    payment.amount.to_string()
}

fn main() {}
