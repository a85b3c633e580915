//! What the benchmarks hand to stores (record keys, the fingerprint and
//! the stored response of the benchmark's payment), and the PostgreSQL
//! store they run on.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use idempotent_core::record::{RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{PostgresStore, StoreError};
use idempotent_core::{Fingerprint, IdempotencyKey};

use crate::app::{API_KEY, BODY, CREATE_PAYMENT};
use crate::handler::NewPayment;

/// The Redis the benchmarks use: database 15, apart from anything else on
/// the server.
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/15";
/// The PostgreSQL database the benchmarks use.
pub const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The record key of the `n`th 36-character key of `run`, scoped by the
/// benchmark's API key. Runs against a durable store use a run of their
/// own, so that records left by an earlier run are never claimed again.
#[must_use]
pub fn record_key(run: u64, n: u64) -> RecordKey {
    let key = format!("{run:016x}{n:020}");
    let key = IdempotencyKey::parse(key.as_bytes()).expect("a 36-character key is valid");
    RecordKey::new(ScopeDigest::api_key(API_KEY.as_bytes()), key)
}

/// The response the benchmark handler answers, as a store keeps it.
#[must_use]
pub fn stored_response() -> StoredResponse {
    StoredResponse::new(StatusCode::CREATED, vec![(
            HeaderName::from_static("content-type"),
            HeaderValue::from_static("application/json"),
        )], Some(Bytes::from_static(
            br#"{"id":1,"amount":1999,"currency":"EUR","reference":"order-2026-11-22-000123","status":"created"}"#,
        )))
}

/// The benchmark's payment, as the handler receives it.
#[must_use]
pub fn payment() -> NewPayment {
    serde_json::from_str(BODY).expect("the benchmark body is a payment")
}

/// The fingerprint `#[idempotent]` computes for the benchmark's payment.
#[must_use]
pub fn fingerprint() -> Fingerprint {
    CREATE_PAYMENT
        .fingerprint(&payment())
        .expect("the payment serializes")
}

/// A PostgreSQL store at `url` on `table`, migrated, on a pool of
/// `connections + 1` with the settings of `PostgresStore::connect`,
/// keeping `connections` of them between statements.
///
/// # Errors
/// The server cannot be reached, or refuses the table.
pub async fn postgres_store(
    url: &str,
    table: &str,
    connections: u32,
) -> Result<PostgresStore, StoreError> {
    let pool = PostgresStore::pool_options()
        .max_connections(connections.saturating_add(1))
        .connect(url)
        .await
        .map_err(StoreError::backend)?;
    let store = PostgresStore::builder(pool)
        .table(table)
        .hold_connections(connections)
        .build()
        .map_err(StoreError::backend)?;
    store.migrate().await?;
    Ok(store)
}
