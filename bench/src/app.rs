//! The benchmark router, shared by `bench-server`, the in-process criterion
//! benchmarks and the memory measurement.

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use idempotent_core::{Endpoint, Idempotency, IdempotencyService, idempotent};
use tower::Layer;

use crate::handler::{self, NewPayment, Payment};

/// The endpoint policy `#[idempotent]` gives `idempotent_payment` (the
/// defaults: 24 h TTL, 60 s lease, scoped by API key), for the
/// micro-benchmarks that fingerprint the same input.
pub const CREATE_PAYMENT: Endpoint = Endpoint::new("create_payment");

/// The bare handler, made idempotent by the attribute.
#[idempotent(name = "create_payment")]
pub async fn idempotent_payment(Json(request): Json<NewPayment>) -> (StatusCode, Json<Payment>) {
    handler::create_payment(request)
}

/// Routes (all `POST`):
/// - `/bare`: the handler alone, outside the idempotency layer;
/// - `/idem`: the same handler through the engine;
/// - `/plain`: the bare handler on the router that carries the layer.
pub fn router(idempotency: Idempotency) -> Router {
    Router::new()
        .route("/bare", post(handler::bare))
        .merge(layered_routes().layer(idempotency))
}

/// The same routes with the layer around the whole router instead of on
/// each route (`/bare` then passes through it too, so the bare baseline is
/// measured on [`router`]).
pub fn wrapped_router(idempotency: &Idempotency) -> IdempotencyService<Router> {
    idempotency.layer(layered_routes().route("/bare", post(handler::bare)))
}

fn layered_routes() -> Router {
    Router::new()
        .route("/idem", post(idempotent_payment))
        .route("/plain", post(handler::bare))
}

/// The request body every benchmark sends (70 bytes).
pub const BODY: &str = r#"{"amount":1999,"currency":"EUR","reference":"order-2026-11-22-000123"}"#;

/// The API key every benchmark sends.
pub const API_KEY: &str = "bench-api-key";
