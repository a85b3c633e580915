use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Clone)]
struct Db;

#[derive(Serialize, Deserialize)]
struct NewPayment {
    amount: i64,
}

#[idempotent(ttl = "24h", scope = "api_key")]
async fn create_payment(
    State(_db): State<Db>,
    Json(req): Json<NewPayment>,
) -> Result<(StatusCode, Json<i64>), StatusCode> {
    Ok((StatusCode::CREATED, Json(req.amount)))
}

/// No options: the defaults.
#[idempotent]
async fn defaults() -> &'static str {
    "done"
}

fn main() {
    let _app: Router = Router::new()
        .route("/payments", post(create_payment))
        .route("/defaults", post(defaults))
        .with_state(Db)
        .layer(Idempotency::new(MemoryStore::new()));
}
