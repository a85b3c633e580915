//! Several instances behind a load balancer: a [`Tiered`] store, process
//! memory in front of Redis, so that a retry reaching another instance is
//! still replayed, and a replay reaching the instance that has the record
//! is answered without a round trip.
//!
//! ```text
//! IDEMPOTENT_ADDR=127.0.0.1:3002 cargo run --example tiered &
//! IDEMPOTENT_ADDR=127.0.0.1:3003 cargo run --example tiered &
//! curl -i http://127.0.0.1:3002/transfers -H 'x-api-key: sk_test_1' \
//!   -H 'idempotency-key: t-1' -H 'content-type: application/json' \
//!   -d '{"from": "acct_1", "to": "acct_2", "cents": 500}'
//! # the retry lands on the other instance: replayed, not run again
//! curl -i http://127.0.0.1:3003/transfers -H 'x-api-key: sk_test_1' \
//!   -H 'idempotency-key: t-1' -H 'content-type: application/json' \
//!   -d '{"from": "acct_1", "to": "acct_2", "cents": 500}'
//! ```
//!
//! Environment: `IDEMPOTENT_ADDR` (default `127.0.0.1:3002`),
//! `IDEMPOTENT_REDIS_URL` (default `redis://127.0.0.1:6379`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::{RedisStore, Tiered};
use idempotent_core::{Idempotency, idempotent};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Transfers this instance executed (a real service would write them to
/// its database).
#[derive(Clone, Default)]
struct Executed(Arc<AtomicU64>);

#[derive(Deserialize, Serialize)]
struct Transfer {
    from: String,
    to: String,
    cents: u64,
}

#[idempotent(ttl = "24h", scope = "api_key")]
async fn create_transfer(
    State(executed): State<Executed>,
    Json(transfer): Json<Transfer>,
) -> (StatusCode, Json<serde_json::Value>) {
    let number = executed.0.fetch_add(1, Ordering::SeqCst) + 1;
    let body = json!({
        "id": format!("tr_{number:06}_{}", std::process::id()),
        "from": transfer.from,
        "to": transfer.to,
        "cents": transfer.cents,
    });
    (StatusCode::CREATED, Json(body))
}

/// One instance: its own memory tier (the `Tiered` store `idempotency`
/// names), Redis shared with the others.
fn app(executed: Executed, idempotency: Idempotency) -> Router {
    Router::new()
        .route("/transfers", post(create_transfer))
        .with_state(executed)
        .layer(idempotency)
}

async fn serve() -> Result<(), String> {
    let addr = match std::env::var("IDEMPOTENT_ADDR") {
        Ok(addr) => addr
            .parse::<SocketAddr>()
            .map_err(|_| format!("IDEMPOTENT_ADDR=`{addr}` is not an address"))?,
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 3002)),
    };
    let url = std::env::var("IDEMPOTENT_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let redis = RedisStore::connect(&url)
        .await
        .map_err(|error| format!("cannot reach Redis at {url}: {error}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| format!("cannot listen on {addr}: {error}"))?;
    println!("transfers listening on http://{addr}, records in {url}");
    let idempotency = Idempotency::new(Tiered::new(redis));
    axum::serve(listener, app(Executed::default(), idempotency.clone()))
        .with_graceful_shutdown(idempotent_examples::shutdown_signal())
        .await
        .map_err(|error| format!("server error: {error}"))?;
    // Transfers whose client went away run on past the server: let them
    // finish and store their outcome in Redis before the process exits.
    idempotency.drain().await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    idempotent_examples::init_logging();
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tiered: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use idempotent_core::testing::TestRequest;
    use tower::ServiceExt;

    use super::*;

    /// The test server's URL, or `None` to skip; with
    /// `IDEMPOTENT_REQUIRE_BACKENDS=1` a missing URL fails instead.
    fn redis_url() -> Option<String> {
        let url = std::env::var("IDEMPOTENT_TEST_REDIS_URL").ok();
        if url.is_none() {
            let required = std::env::var("IDEMPOTENT_REQUIRE_BACKENDS").is_ok_and(|v| v == "1");
            assert!(!required, "IDEMPOTENT_TEST_REDIS_URL is not set");
            eprintln!("skipped: set IDEMPOTENT_TEST_REDIS_URL");
        }
        url
    }

    /// An instance on its own connection and memory tier, its records
    /// under `prefix` in the shared Redis.
    async fn instance(url: &str, prefix: &str) -> (Router, Executed) {
        let connection = redis::Client::open(url)
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap();
        let redis = RedisStore::builder(connection).prefix(prefix).build();
        let executed = Executed::default();
        let idempotency = Idempotency::new(Tiered::new(redis));
        (app(executed.clone(), idempotency), executed)
    }

    async fn transfer(app: &Router, key: &str, cents: u64) -> (StatusCode, bool, String) {
        let request = TestRequest::post("/transfers")
            .key(key)
            .api_key("sk_test")
            .json(&json!({ "from": "acct_1", "to": "acct_2", "cents": cents }));
        let response = app.clone().oneshot(request.build()).await.unwrap();
        let status = response.status();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, replayed, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn a_retry_on_another_instance_is_replayed_not_run_again() {
        let Some(url) = redis_url() else { return };
        let prefix = format!("example-tiered-{:016x}:", rand::random::<u64>());
        let (first, ran_first) = instance(&url, &prefix).await;
        let (second, ran_second) = instance(&url, &prefix).await;

        let (status, replayed, original) = transfer(&first, "t-1", 500).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, false));
        let (status, replayed, retried) = transfer(&second, "t-1", 500).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, true));
        assert_eq!(original, retried);
        let (status, ..) = transfer(&second, "t-1", 501).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(ran_first.0.load(Ordering::SeqCst), 1);
        assert_eq!(ran_second.0.load(Ordering::SeqCst), 0);
    }
}
