//! A payments API whose writes are safe to retry.
//!
//! ```text
//! cargo run --release --example payments
//! curl -i http://127.0.0.1:3000/payments \
//!   -H 'x-api-key: sk_test_1' -H 'idempotency-key: order-42' \
//!   -H 'content-type: application/json' -d '{"amount": 1999, "currency": "EUR"}'
//! ```
//!
//! Environment:
//! - `IDEMPOTENT_ADDR`: where to listen (default `127.0.0.1:3000`);
//! - `IDEMPOTENT_STORE`: which store keeps the records: `memory` (the
//!   default), `postgres://...`, `redis://...` or `sqlite://<path>`;
//! - `PAYMENTS_DELAY_MS`: how long each charge takes (default 0), to watch
//!   concurrent duplicates get 409;
//! - `RUST_LOG`: which events are printed to stderr (default `info`;
//!   `idempotent_core=debug` adds every request's outcome).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use idempotent_core::store::{MemoryStore, PostgresStore, Reaper, RedisStore, SqliteStore};
use idempotent_core::{Idempotency, idempotent};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Currencies this processor charges in (ISO 4217).
const CURRENCIES: &[&str] = &["AUD", "CAD", "CHF", "EUR", "GBP", "JPY", "SEK", "USD"];

/// The process's ledger: what actually ran, as opposed to what was replayed.
#[derive(Clone, Default)]
struct Ledger {
    inner: Arc<Counters>,
    charge_delay: Duration,
}

#[derive(Default)]
struct Counters {
    payments: AtomicU64,
    refunds: AtomicU64,
}

#[derive(Serialize, Deserialize)]
struct NewPayment {
    amount: i64,
    currency: String,
}

#[derive(Serialize)]
struct Payment {
    id: String,
    amount: i64,
    currency: String,
    status: &'static str,
}

#[derive(Serialize, Deserialize)]
struct NewRefund {
    payment_id: String,
    amount: i64,
}

#[derive(Serialize)]
struct Refund {
    id: String,
    payment_id: String,
    amount: i64,
    status: &'static str,
}

/// A request the processor refuses, as `application/problem+json`.
/// Returned by the handler, so it is stored and replayed like a success.
struct InvalidRequest {
    detail: String,
}

impl IntoResponse for InvalidRequest {
    fn into_response(self) -> Response {
        let body = json!({
            "type": "https://example.com/problems/invalid-request",
            "title": "Invalid request",
            "status": 400,
            "detail": self.detail,
        });
        let mut response = (StatusCode::BAD_REQUEST, Json(body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

/// Charges the caller once per `Idempotency-Key`; retries get the same
/// payment back.
#[idempotent(ttl = "24h", scope = "api_key")]
async fn create_payment(
    State(ledger): State<Ledger>,
    Json(request): Json<NewPayment>,
) -> Result<impl IntoResponse, InvalidRequest> {
    validate_amount(request.amount)?;
    if !CURRENCIES.contains(&request.currency.as_str()) {
        return Err(InvalidRequest {
            detail: format!(
                "`{}` is not a supported currency; use one of {}",
                request.currency,
                CURRENCIES.join(", ")
            ),
        });
    }
    tokio::time::sleep(ledger.charge_delay).await;
    let number = ledger.inner.payments.fetch_add(1, Ordering::SeqCst) + 1;
    let payment = Payment {
        id: format!("pay_{number:06}"),
        amount: request.amount,
        currency: request.currency,
        status: "succeeded",
    };
    let location = format!("/payments/{}", payment.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(payment),
    ))
}

/// Refunds part of a payment. Results are kept for two seconds only, to show
/// a per-endpoint TTL: after that, the same key refunds again.
#[idempotent(ttl = "2s", scope = "api_key")]
async fn create_refund(
    State(ledger): State<Ledger>,
    Json(request): Json<NewRefund>,
) -> Result<(StatusCode, Json<Refund>), InvalidRequest> {
    validate_amount(request.amount)?;
    let number = ledger.inner.refunds.fetch_add(1, Ordering::SeqCst) + 1;
    let refund = Refund {
        id: format!("re_{number:06}"),
        payment_id: request.payment_id,
        amount: request.amount,
        status: "succeeded",
    };
    Ok((StatusCode::CREATED, Json(refund)))
}

fn validate_amount(amount: i64) -> Result<(), InvalidRequest> {
    if amount <= 0 {
        return Err(InvalidRequest {
            detail: format!("`amount` must be a positive number of minor units, got {amount}"),
        });
    }
    Ok(())
}

/// How many charges and refunds this process executed.
async fn stats(State(ledger): State<Ledger>) -> Json<serde_json::Value> {
    Json(json!({
        "payments": ledger.inner.payments.load(Ordering::SeqCst),
        "refunds": ledger.inner.refunds.load(Ordering::SeqCst),
    }))
}

/// The idempotency store named by `IDEMPOTENT_STORE`, and the reaper of
/// expired rows for a SQL store (it runs until dropped or shut down).
async fn idempotency_from_env() -> Result<(Idempotency, Option<Reaper>), String> {
    idempotency_for(std::env::var("IDEMPOTENT_STORE").ok().as_deref()).await
}

/// The idempotency store called `name` (`None`: the default).
async fn idempotency_for(name: Option<&str>) -> Result<(Idempotency, Option<Reaper>), String> {
    let unreachable = |error| format!("IDEMPOTENT_STORE: cannot open the store: {error}");
    match name {
        None | Some("" | "memory") => Ok((Idempotency::new(MemoryStore::new()), None)),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let store = PostgresStore::connect(url).await.map_err(unreachable)?;
            store.migrate().await.map_err(unreachable)?;
            let reaper = store.spawn_reaper(Duration::from_secs(60));
            Ok((Idempotency::new(store), Some(reaper)))
        }
        Some(url) if url.starts_with("redis://") => {
            let store = RedisStore::connect(url).await.map_err(unreachable)?;
            Ok((Idempotency::new(store), None))
        }
        Some(url) if url.starts_with("sqlite://") => {
            let store = SqliteStore::connect(url).await.map_err(unreachable)?;
            store.migrate().await.map_err(unreachable)?;
            let reaper = store.spawn_reaper(Duration::from_secs(60));
            Ok((Idempotency::new(store), Some(reaper)))
        }
        Some(other) => Err(format!(
            "IDEMPOTENT_STORE=`{other}` is not a store this example knows; valid values: `memory` (the default), `postgres://...`, `redis://...`, `sqlite://<path>`"
        )),
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .map_err(|_| format!("{name}=`{value}` is not valid")),
        Err(_) => Ok(default),
    }
}

fn app(ledger: Ledger, idempotency: Idempotency) -> Router {
    Router::new()
        .route("/payments", post(create_payment))
        .route("/refunds", post(create_refund))
        .route("/stats", get(stats))
        .with_state(ledger)
        .layer(idempotency)
}

async fn serve() -> Result<(), String> {
    let addr: SocketAddr = env_or("IDEMPOTENT_ADDR", SocketAddr::from(([127, 0, 0, 1], 3000)))?;
    let delay_ms: u64 = env_or("PAYMENTS_DELAY_MS", 0)?;
    let (idempotency, reaper) = idempotency_from_env().await?;
    let ledger = Ledger {
        charge_delay: Duration::from_millis(delay_ms),
        ..Ledger::default()
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| format!("cannot listen on {addr}: {error}"))?;
    println!("payments listening on http://{addr} (charge delay {delay_ms} ms)");
    axum::serve(listener, app(ledger, idempotency.clone()))
        .with_graceful_shutdown(idempotent_examples::shutdown_signal())
        .await
        .map_err(|error| format!("server error: {error}"))?;
    // Charges whose client went away run on past the server: let them
    // finish and store their outcome before the process exits.
    idempotency.drain().await;
    // Last, so that it purges for as long as anything else runs.
    if let Some(reaper) = reaper {
        reaper.shutdown().await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    idempotent_examples::init_logging();
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("payments: {message}");
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

    fn test_app() -> Router {
        app(Ledger::default(), Idempotency::new(MemoryStore::new()))
    }

    async fn call(app: &Router, request: Request<Body>) -> (StatusCode, bool, serde_json::Value) {
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, replayed, serde_json::from_slice(&body).unwrap())
    }

    /// A payment of `amount` in `currency` under `key`, from `sk_test`.
    fn pay(key: &str, amount: i64, currency: &str) -> Request<Body> {
        let payment = json!({"amount": amount, "currency": currency});
        TestRequest::post("/payments")
            .key(key)
            .api_key("sk_test")
            .json(&payment)
            .build()
    }

    async fn stats_of(app: &Router) -> serde_json::Value {
        call(app, Request::get("/stats").body(Body::empty()).unwrap())
            .await
            .2
    }

    #[tokio::test]
    async fn a_retried_payment_is_charged_once() {
        let app = test_app();
        let (status, replayed, first) = call(&app, pay("k", 1999, "EUR")).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false));
        assert_eq!(first["id"], "pay_000001");
        let (status, replayed, retry) = call(&app, pay("k", 1999, "EUR")).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, true));
        assert_eq!(first, retry);
        assert_eq!(stats_of(&app).await, json!({"payments": 1, "refunds": 0}));
    }

    #[tokio::test]
    async fn an_invalid_payment_is_a_stored_problem() {
        let app = test_app();
        let (status, replayed, problem) = call(&app, pay("k", -5, "EUR")).await;
        assert_eq!((status, replayed), (StatusCode::BAD_REQUEST, false));
        assert!(problem["detail"].as_str().unwrap().contains("-5"));
        let (status, replayed, _) = call(&app, pay("k", -5, "EUR")).await;
        assert_eq!((status, replayed), (StatusCode::BAD_REQUEST, true));
        let (status, ..) = call(&app, pay("k2", 5, "eur")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(stats_of(&app).await["payments"], 0);
    }

    #[tokio::test]
    async fn another_payload_under_the_same_key_is_refused() {
        let app = test_app();
        call(&app, pay("k", 1, "USD")).await;
        let (status, ..) = call(&app, pay("k", 2, "USD")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[tokio::test]
    async fn an_unknown_store_is_an_error_naming_the_valid_ones() {
        let message = idempotency_for(Some("redis-cluster")).await.unwrap_err();
        assert!(message.contains("`redis-cluster`"), "{message}");
        for valid in [
            "`memory`",
            "`postgres://...`",
            "`redis://...`",
            "`sqlite://<path>`",
        ] {
            assert!(message.contains(valid), "{message}");
        }
        assert!(idempotency_for(None).await.is_ok());
        assert!(idempotency_for(Some("memory")).await.is_ok());
    }

    #[tokio::test]
    async fn an_unreachable_store_is_an_error_not_a_panic() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("redis://127.0.0.1:{port}");
        let message = idempotency_for(Some(&url)).await.unwrap_err();
        assert!(message.contains("cannot open the store"), "{message}");
    }

    #[tokio::test]
    async fn a_sqlite_store_keeps_payments_across_restarts() {
        let path = std::env::temp_dir().join(format!("payments-{}.db", std::process::id()));
        let url = format!("sqlite://{}", path.display());
        let (idempotency, _) = idempotency_for(Some(&url)).await.unwrap();
        let (status, _, first) =
            call(&app(Ledger::default(), idempotency), pay("k", 700, "SEK")).await;
        assert_eq!(status, StatusCode::CREATED);
        // A new process: fresh ledger, same file.
        let (idempotency, _) = idempotency_for(Some(&url)).await.unwrap();
        let restarted = app(Ledger::default(), idempotency);
        let (_, replayed, again) = call(&restarted, pay("k", 700, "SEK")).await;
        assert!(replayed);
        assert_eq!(first, again);
        assert_eq!(stats_of(&restarted).await["payments"], 0);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
