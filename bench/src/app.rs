//! The benchmark router, shared by `bench-server`, the in-process criterion
//! benchmarks and the memory measurement.

use axum::Json;
use axum::Router;
use axum::response::Response;
use axum::routing::post;
use idempotent_core::{Endpoint, Idempotency, IdempotentRequest};

use crate::handler::{self, NewPayment};

/// The benchmarked endpoint: default policy (24 h TTL, 60 s lease, scoped by
/// API key).
pub const CREATE_PAYMENT: Endpoint = Endpoint::new("create_payment");

/// The bare handler run through the engine exactly as `#[idempotent]`
/// expands it.
pub async fn idempotent_payment(
    idem: IdempotentRequest,
    Json(request): Json<NewPayment>,
) -> Response {
    let fingerprint = CREATE_PAYMENT.fingerprint(&request);
    idem.run(&CREATE_PAYMENT, fingerprint, async move {
        handler::create_payment(request)
    })
    .await
}

/// Routes (all `POST`):
/// - `/bare`: the handler alone, outside the idempotency layer;
/// - `/idem`: the same handler through the engine;
/// - `/plain`: the bare handler on the router that carries the layer.
pub fn router(idempotency: Idempotency) -> Router {
    let layered = Router::new()
        .route("/idem", post(idempotent_payment))
        .route("/plain", post(handler::bare))
        .layer(idempotency);
    Router::new()
        .route("/bare", post(handler::bare))
        .merge(layered)
}

/// The request body every benchmark sends (70 bytes).
pub const BODY: &str = r#"{"amount":1999,"currency":"EUR","reference":"order-2026-11-22-000123"}"#;

/// The API key every benchmark sends.
pub const API_KEY: &str = "bench-api-key";
