//! What a request's idempotency context shows when it is logged, as a
//! handler's traced argument is (`#[tracing::instrument]` records its
//! arguments with `Debug`): never a credential the request carried, nor
//! its key.

use crate::macro_support;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::record::RecordKey;
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{MemoryStore, PostgresStore, Store};
use idempotent_core::{Endpoint, Idempotency, IdempotencyKey, IdempotentRequest};
use macro_support::send;

const CHARGE: Endpoint = Endpoint::new("http_logs::charge");

/// What the handler logged of its request's context.
#[derive(Clone, Default)]
struct Logged(Arc<Mutex<String>>);

async fn charge(
    State(logged): State<Logged>,
    idempotency: IdempotentRequest,
    Json(cents): Json<u64>,
) -> Response {
    *logged.0.lock().unwrap() = format!("{idempotency:?}");
    let fingerprint = CHARGE.fingerprint(&cents);
    idempotency
        .run(&CHARGE, fingerprint, async move { cents.to_string() })
        .await
}

#[tokio::test]
async fn a_logged_request_context_shows_header_names_but_no_credential() {
    let logged = Logged::default();
    let app = Router::new()
        .route("/charges", post(charge))
        .with_state(logged.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    // The key too, which `IdempotencyKey` shows only as a digest.
    let secrets = [
        "sk_live_bearer",
        "sk_live_api_key",
        "session_cookie",
        "order-7",
    ];
    let request = Request::post("/charges")
        .header("content-type", "application/json")
        .header("idempotency-key", secrets[3])
        .header("authorization", format!("Bearer {}", secrets[0]))
        .header("x-api-key", secrets[1])
        .header("cookie", format!("session={}", secrets[2]))
        .body(Body::from("100"))
        .unwrap();

    let reply = send(&app, request).await;

    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let logged = logged.0.lock().unwrap().clone();
    for secret in secrets {
        assert!(!logged.contains(secret), "{secret} logged: {logged}");
    }
    assert!(logged.contains("authorization"), "{logged}");
}

/// The query the README gives to find a PostgreSQL record by the log id
/// that the events carry as `key`, with `table` for the README's table.
fn readmes_query(table: &str, log_id: &str) -> String {
    let readme = include_str!("../../../README.md");
    let observability = readme.split("### Observability").nth(1).unwrap();
    let query = observability.split("```sql\n").nth(1).unwrap();
    let query = query.split("```").next().unwrap();
    query
        .replace("idempotency_records", table)
        .replace("<key>", log_id)
}

/// The log id in an event finds its record in PostgreSQL with the
/// README's query, as it finds it in Redis by the key's prefix: how an
/// operator reaches the record a 500 `record-corrupt` names.
#[tokio::test]
async fn the_readmes_query_finds_a_postgresql_record_by_its_log_id() {
    let url = match std::env::var("IDEMPOTENT_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            assert!(
                std::env::var("IDEMPOTENT_REQUIRE_BACKENDS").as_deref() != Ok("1"),
                "IDEMPOTENT_TEST_POSTGRES_URL is required"
            );
            return;
        }
    };
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let table = format!("http_logs_{}", std::process::id());
    let store = PostgresStore::builder(pool.clone())
        .table(table.clone())
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    // With characters a text-to-bytes cast would read as escapes.
    let key = RecordKey::new(
        ScopeDigest::api_key(b"caller-1"),
        IdempotencyKey::parse(r"order\7:a/b".as_bytes()).unwrap(),
    );
    let lease = std::time::Duration::from_secs(60);
    let fingerprint = CHARGE.fingerprint(&1_u64).unwrap();
    store.claim(&key, fingerprint, lease).await.unwrap();

    let query = readmes_query(&table, &key.log_id().to_string());
    let found: Vec<(Vec<u8>, String, i64, Option<i16>)> =
        sqlx::query_as(&query).fetch_all(&pool).await.unwrap();
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "{query}");
    assert_eq!(found[0].1, r"order\7:a/b");
}
