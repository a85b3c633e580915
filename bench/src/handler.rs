//! The handler every benchmark server runs: deserialize a small JSON
//! payment, "create" it, answer 201 with JSON.
//!
//! The peer servers in `bench/peers` include this file by path, so the peers
//! and our own routes measure the same work.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

/// The request body.
#[derive(Debug, Serialize, Deserialize)]
pub struct NewPayment {
    /// Minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// The caller's reference.
    pub reference: String,
}

/// The response body.
#[derive(Debug, Serialize)]
pub struct Payment {
    /// Assigned by the server.
    pub id: u64,
    /// Minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// The caller's reference.
    pub reference: String,
    /// Always `"created"`.
    pub status: &'static str,
}

/// The side effect, as cheap as it can be so the numbers show the cost of
/// what wraps it: one atomic increment.
pub fn create_payment(request: NewPayment) -> (StatusCode, Json<Payment>) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let payment = Payment {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        amount: request.amount,
        currency: request.currency,
        reference: request.reference,
        status: "created",
    };
    (StatusCode::CREATED, Json(payment))
}

/// The bare axum handler.
pub async fn bare(Json(request): Json<NewPayment>) -> (StatusCode, Json<Payment>) {
    create_payment(request)
}
