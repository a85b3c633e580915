//! What a client gets when the store fails: set up wrongly (a 500
//! `store-misconfigured` without `Retry-After`, since a retry soon after
//! fails the same way until the setup is changed) or down (a 503
//! `store-unavailable` with `Retry-After: 1`). Either way nothing runs,
//! and the same key is served once the store is. PostgreSQL and Redis
//! tests need the test servers (`IDEMPOTENT_TEST_POSTGRES_URL`,
//! `IDEMPOTENT_TEST_REDIS_URL`); SQLite ones use temporary files.

use crate::store_support;

use std::time::Duration;

use axum::http::StatusCode;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::RecordKey;
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{PostgresStore, RedisStore, SqliteStore};
use store_support::{
    Ledger, OwnRedis, Reply, backend_url, delete, hash_at, pay, payments_app, redis_connection,
    unique_name,
};

const TIMEOUT: Duration = Duration::from_secs(5);

/// `reply` is the answer to a store set up wrongly.
fn assert_misconfigured(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{reply:?}");
    assert!(reply.headers.get("retry-after").is_none(), "{reply:?}");
    assert_eq!(reply.content_type(), Some("application/problem+json"));
    let body: serde_json::Value = serde_json::from_slice(&reply.body).expect("JSON");
    assert_eq!(body["type"], "urn:idempotent:store-misconfigured", "{body}");
}

/// A key of another type where the record of `pay-1` belongs: that key
/// gets a 500 and runs nothing; other keys are served; once the key is
/// deleted, `pay-1` runs.
#[tokio::test]
async fn a_redis_key_of_another_type_is_a_500_without_retry_after() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let mut connection = redis_connection(&url).await;
    let store = RedisStore::builder(connection.clone())
        .prefix(unique_name("idem_http") + ":")
        .build();
    let key = IdempotencyKey::parse(b"pay-1").expect("valid key");
    let redis_key = store.redis_key(&RecordKey::new(ScopeDigest::global(), key));
    hash_at(&mut connection, &redis_key).await;
    let ledger = Ledger::default();
    let app = payments_app(store, &ledger, TIMEOUT);
    let (refused, other) = (pay(&app, "pay-1", 100).await, pay(&app, "pay-2", 100).await);
    delete(&mut connection, &redis_key).await;
    let fixed = pay(&app, "pay-1", 100).await;
    assert_misconfigured(&refused);
    assert_eq!(other.status, StatusCode::CREATED);
    assert_eq!(fixed.status, StatusCode::CREATED);
    assert_eq!(
        ledger.executions(),
        2,
        "pay-1 ran only once its key was free"
    );
}

/// A SQLite store whose table was never created (`migrate` not run).
#[tokio::test]
async fn a_sqlite_store_without_its_table_is_a_500() {
    let file = std::env::temp_dir().join(unique_name("idempotent-http") + ".db");
    let store = SqliteStore::open(&file).await.expect("open");
    let ledger = Ledger::default();
    let app = payments_app(store.clone(), &ledger, TIMEOUT);
    let refused = pay(&app, "pay-1", 100).await;
    store.migrate().await.expect("migrate");
    let fixed = pay(&app, "pay-1", 100).await;
    store.pool().close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }
    assert_misconfigured(&refused);
    assert_eq!(fixed.status, StatusCode::CREATED);
    assert_eq!(ledger.executions(), 1);
}

/// A PostgreSQL table of the store's name made by something else.
#[tokio::test]
async fn a_postgres_table_of_another_shape_is_a_500() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
        return;
    };
    let table = unique_name("idem_http_foreign");
    let connected = PostgresStore::connect(&url).await.expect("connect");
    let store = PostgresStore::builder(connected.pool().clone())
        .table(table.as_str())
        .build()
        .expect("valid table name");
    let create = format!("CREATE TABLE {table} (id text PRIMARY KEY, expires_at timestamptz)");
    sqlx::raw_sql(&create)
        .execute(store.pool())
        .await
        .expect("create another table");
    let ledger = Ledger::default();
    let refused = pay(&payments_app(store.clone(), &ledger, TIMEOUT), "pay-1", 100).await;
    sqlx::raw_sql(&format!("DROP TABLE {table}"))
        .execute(store.pool())
        .await
        .expect("drop the table");
    assert_misconfigured(&refused);
    assert_eq!(ledger.executions(), 0);
}

/// A Redis that went away is an outage: 503 with `Retry-After`.
#[tokio::test]
async fn a_redis_that_went_away_is_a_503_with_retry_after() {
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let mut redis = OwnRedis::start(OwnRedis::free_port()).await;
    let store = RedisStore::connect(&redis.url()).await.expect("connect");
    redis.stop().await;
    let ledger = Ledger::default();
    let reply = pay(&payments_app(store, &ledger, TIMEOUT), "pay-1", 100).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    let retry_after = reply.headers.get("retry-after");
    assert_eq!(retry_after.map(|value| value.as_bytes()), Some(&b"1"[..]));
    assert_eq!(ledger.executions(), 0);
}
