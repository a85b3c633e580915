//! Idempotency without the attribute: an inventory API whose handlers
//! cannot all be annotated.
//!
//! ```text
//! cargo run --example without_macro
//! curl -i http://127.0.0.1:3001/restocks \
//!   -H 'x-api-key: sk_test_1' -H 'idempotency-key: s-1' \
//!   -H 'content-type: application/json' -d '{"sku": "book-42", "quantity": 10}'
//! curl -i http://127.0.0.1:3001/reservations \
//!   -H 'x-api-key: sk_test_1' -H 'idempotency-key: r-1' \
//!   -H 'content-type: application/json' -d '{"sku": "book-42", "quantity": 2}'
//! ```
//!
//! Stock starts at zero: a reservation sent before the restock gets the
//! handler's own `409` (`insufficient stock`), which is not final, so the
//! same key runs again once the restock is in.
//!
//! - `POST /reservations` is a plain handler under [`IdempotentLayer`]:
//!   the layer fingerprints the raw request (method, path, path
//!   parameters, query, `Content-Type`, `Content-Encoding` and body bytes,
//!   so a retry with its JSON fields in another order gets 422), the way to
//!   cover a handler from another crate or one built at run time.
//! - `POST /restocks` takes [`IdempotentRequest`] and calls `run` itself,
//!   which is what `#[idempotent]` generates: typed fingerprints (JSON field
//!   order does not matter) without a macro.
//!
//! `IDEMPOTENT_ADDR` sets where to listen (default `127.0.0.1:3001`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Endpoint, Idempotency, IdempotentLayer, IdempotentRequest, Scope};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Stock per SKU, and how many reservations and restocks actually ran.
#[derive(Clone, Default)]
struct Inventory {
    inner: Arc<Mutex<Stock>>,
}

#[derive(Default)]
struct Stock {
    units: HashMap<String, u32>,
    reservations: u32,
    restocks: u32,
}

impl Inventory {
    fn update<T>(&self, change: impl FnOnce(&mut Stock) -> T) -> T {
        change(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[derive(Deserialize, Serialize)]
struct Units {
    sku: String,
    quantity: u32,
}

/// Under `IdempotentLayer`: the handler is plain axum.
async fn reserve(
    State(inventory): State<Inventory>,
    Json(request): Json<Units>,
) -> (StatusCode, Json<serde_json::Value>) {
    inventory.update(|stock| {
        let available = stock.units.entry(request.sku.clone()).or_default();
        if *available < request.quantity {
            // 409 is not final: the key is released, so a retry after a
            // restock runs again.
            let body = json!({ "error": "insufficient stock", "available": *available });
            return (StatusCode::CONFLICT, Json(body));
        }
        *available -= request.quantity;
        stock.reservations += 1;
        let body =
            json!({ "reservation": stock.reservations, "sku": request.sku, "left": *available });
        (StatusCode::CREATED, Json(body))
    })
}

/// The policy `#[idempotent(ttl = "24h", scope = "api_key")]` would give
/// `restock`, under the name the attribute would give it.
const RESTOCK: Endpoint = Endpoint::new(concat!(module_path!(), "::restock"))
    .ttl(Duration::from_secs(24 * 3600))
    .scope(Scope::ApiKey);

/// By hand: the fingerprint covers the typed body, and `run` claims the key
/// before the body of the handler runs.
async fn restock(
    idempotency: IdempotentRequest,
    State(inventory): State<Inventory>,
    Json(request): Json<Units>,
) -> Response {
    let fingerprint = RESTOCK.fingerprint(&request);
    idempotency
        .run(&RESTOCK, fingerprint, async move {
            inventory.update(|stock| {
                let units = stock.units.entry(request.sku.clone()).or_default();
                *units += request.quantity;
                stock.restocks += 1;
                let body =
                    json!({ "restock": stock.restocks, "sku": request.sku, "units": *units });
                (StatusCode::CREATED, Json(body))
            })
        })
        .await
}

/// How many reservations and restocks this process executed.
async fn stats(State(inventory): State<Inventory>) -> Json<serde_json::Value> {
    inventory.update(|stock| {
        Json(json!({ "reservations": stock.reservations, "restocks": stock.restocks }))
    })
}

fn app(inventory: Inventory, idempotency: Idempotency) -> Router {
    let reservations = Endpoint::new("reservations")
        .ttl(Duration::from_secs(24 * 3600))
        .scope(Scope::ApiKey);
    Router::new()
        // `route_layer`: on a method router, `layer` would also wrap the
        // 405 answered to other methods.
        .route(
            "/reservations",
            post(reserve).route_layer(IdempotentLayer::new(reservations)),
        )
        .route("/restocks", post(restock))
        .route("/stats", get(stats))
        .with_state(inventory)
        .layer(idempotency)
}

async fn serve() -> Result<(), String> {
    let addr = match std::env::var("IDEMPOTENT_ADDR") {
        Ok(addr) => addr
            .parse::<SocketAddr>()
            .map_err(|_| format!("IDEMPOTENT_ADDR=`{addr}` is not an address"))?,
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 3001)),
    };
    let idempotency = Idempotency::new(MemoryStore::new());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| format!("cannot listen on {addr}: {error}"))?;
    println!("inventory listening on http://{addr}");
    axum::serve(listener, app(Inventory::default(), idempotency.clone()))
        .with_graceful_shutdown(idempotent_examples::shutdown_signal())
        .await
        .map_err(|error| format!("server error: {error}"))?;
    idempotency.drain().await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    idempotent_examples::init_logging();
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("without_macro: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use idempotent_core::testing::TestRequest;
    use tower::ServiceExt;

    use super::*;

    async fn call(app: &Router, request: Request<Body>) -> (StatusCode, bool, serde_json::Value) {
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, replayed, serde_json::from_slice(&body).unwrap())
    }

    /// `body` as written (the fields in the order the test gives them),
    /// under `key`, from `sk_test`.
    fn post_units(uri: &str, key: &str, body: &str) -> Request<Body> {
        TestRequest::post(uri)
            .key(key)
            .api_key("sk_test")
            .header("content-type", "application/json")
            .body(body.to_owned())
            .build()
    }

    async fn stats_of(app: &Router) -> serde_json::Value {
        let request = Request::get("/stats").body(Body::empty()).unwrap();
        call(app, request).await.2
    }

    #[tokio::test]
    async fn each_route_runs_once_per_key_and_replays_retries() {
        let app = app(Inventory::default(), Idempotency::new(MemoryStore::new()));
        let restock = r#"{"sku": "book-42", "quantity": 10}"#;
        let (status, replayed, first) = call(&app, post_units("/restocks", "s-1", restock)).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false));
        // Typed fingerprint: the same fields in another order replay.
        let reordered = r#"{"quantity": 10, "sku": "book-42"}"#;
        let (status, replayed, again) = call(&app, post_units("/restocks", "s-1", reordered)).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, true));
        assert_eq!(first, again);

        let reserve = r#"{"sku": "book-42", "quantity": 3}"#;
        let (status, replayed, first) =
            call(&app, post_units("/reservations", "r-1", reserve)).await;
        assert_eq!(
            (status, replayed, &first["left"]),
            (StatusCode::CREATED, false, &json!(7))
        );
        let (status, replayed, again) =
            call(&app, post_units("/reservations", "r-1", reserve)).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, true));
        assert_eq!(first, again);
        assert_eq!(
            stats_of(&app).await,
            json!({"reservations": 1, "restocks": 1})
        );
    }

    #[tokio::test]
    async fn another_payload_under_a_used_key_is_refused_on_both_routes() {
        let app = app(Inventory::default(), Idempotency::new(MemoryStore::new()));
        for uri in ["/restocks", "/reservations"] {
            call(&app, post_units(uri, "k", r#"{"sku": "a", "quantity": 0}"#)).await;
            let (status, ..) =
                call(&app, post_units(uri, "k", r#"{"sku": "b", "quantity": 0}"#)).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{uri}");
        }
    }

    #[tokio::test]
    async fn a_reservation_refused_with_409_runs_again_when_retried() {
        let app = app(Inventory::default(), Idempotency::new(MemoryStore::new()));
        let reserve = r#"{"sku": "new", "quantity": 1}"#;
        let (status, replayed, _) = call(&app, post_units("/reservations", "r", reserve)).await;
        assert_eq!((status, replayed), (StatusCode::CONFLICT, false));
        call(
            &app,
            post_units("/restocks", "s", r#"{"sku": "new", "quantity": 5}"#),
        )
        .await;
        let (status, replayed, body) = call(&app, post_units("/reservations", "r", reserve)).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false));
        assert_eq!(body["left"], 4);
        let (status, replayed, _) = call(&app, post_units("/reservations", "r", reserve)).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, true));
        assert_eq!(stats_of(&app).await["reservations"], 1);
    }
}
