//! Attribute macros stacked with `#[idempotent]` as the documentation
//! places them: `#[tracing::instrument]` above or below, and
//! `#[axum::debug_handler]` below, where it checks the handler as written.
#![deny(warnings)]

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};

#[derive(Clone)]
struct AppState;

/// Below: the span records the handler's own arguments.
#[idempotent]
#[tracing::instrument(skip(state))]
async fn traced(State(state): State<AppState>, Json(amount): Json<u64>) -> Json<u64> {
    let AppState = state;
    Json(amount)
}

/// Above: it instruments the function as written too.
#[tracing::instrument(skip_all)]
#[idempotent(scope = "global")]
async fn traced_above(body: String) -> String {
    body
}

/// Below, on a handler whose last argument the attribute wraps.
#[idempotent]
#[axum::debug_handler(state = AppState)]
async fn checked(State(_state): State<AppState>, Json(amount): Json<u64>) -> Json<u64> {
    Json(amount)
}

/// Below, on a handler the attribute gives an argument of its own.
#[idempotent(scope = "header:x-tenant-id")]
#[axum::debug_handler]
async fn checked_scoped(headers: HeaderMap, body: String) -> String {
    format!("{} {body}", headers.len())
}

fn main() {
    let _app: Router = Router::new()
        .route("/traced", post(traced))
        .route("/traced-above", post(traced_above))
        .route("/checked", post(checked))
        .route("/checked-scoped", post(checked_scoped))
        .with_state(AppState)
        .layer(Idempotency::new(MemoryStore::new()));
}
