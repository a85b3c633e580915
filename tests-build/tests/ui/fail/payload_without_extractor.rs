// A payload type taken bare, its `Json` forgotten: the first note says to
// take it through an extractor, not to implement `FingerprintInput` for a
// type that would still be no extractor.
use idempotent_core::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct NewOrder {
    sku: String,
}

#[idempotent]
async fn create_order(order: NewOrder) -> String {
    order.sku
}

fn main() {}
