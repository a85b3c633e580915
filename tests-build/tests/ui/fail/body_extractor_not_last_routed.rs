// A handler the attribute refuses is still routed without a second error:
// the function as written (a body extractor before another argument) is
// no axum handler, and axum's error at `.route(...)` would point at the
// wrong fix.
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct NewPayment {
    amount: i64,
}

#[idempotent]
async fn create_payment(Json(req): Json<NewPayment>, State(_state): State<()>) -> Json<i64> {
    Json(req.amount)
}

fn main() {
    let _app: Router = Router::new()
        .route("/payments", post(create_payment))
        .with_state(())
        .layer(Idempotency::new(MemoryStore::new()));
}
