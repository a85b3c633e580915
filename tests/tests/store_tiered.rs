//! Several instances, each with a `Tiered` memory in front of one durable
//! store (Redis or PostgreSQL, `IDEMPOTENT_TEST_REDIS_URL` and
//! `IDEMPOTENT_TEST_POSTGRES_URL`): what an instance answers from memory,
//! exact repeats of a replayed request included, is what the durable store
//! holds. Each test uses a key prefix or table of its own.

mod store_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use idempotent_core::clock::ManualClock;
use idempotent_core::store::{PostgresStore, RedisStore, Store, Tiered};
use idempotent_core::{IDEMPOTENT_REPLAYED, Idempotency, idempotent};
use serde::{Deserialize, Serialize};
use store_support::{backend_url, unique_name};
use tower::ServiceExt;

#[derive(Serialize, Deserialize)]
struct Charge {
    amount: u64,
}

/// Executions, shared by every instance (the bank they all charge).
#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

#[idempotent(ttl = "1h", scope = "global")]
async fn charge(State(runs): State<Runs>, Json(charge): Json<Charge>) -> (StatusCode, String) {
    let run = runs.0.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("run {run}: {}", charge.amount))
}

fn instance(store: impl Store, runs: &Runs) -> Router {
    Router::new()
        .route("/charges", post(charge))
        .with_state(runs.clone())
        .layer(Idempotency::new(store))
}

/// What a client saw: the status, whether it was a replay, the body.
async fn send(app: &Router, body: &str) -> (StatusCode, bool, String) {
    let request = Request::post("/charges")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .header("idempotency-key", "k1")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, String::from_utf8(body.to_vec()).unwrap())
}

/// Instance `a` answers one request until it answers its exact repeats
/// from memory; the record expires, and instance `b` runs the key again
/// with another payload. `a` must then refuse the old request (422), not
/// replay the old record it has cached and whose bytes it remembers.
async fn exact_repeats_follow_the_durable_record(
    apps: [Router; 2],
    clock: &ManualClock,
    runs: &Runs,
) {
    let [a, b] = apps;
    let first = r#"{"amount":100}"#;
    for _ in 0..4 {
        assert_eq!(send(&a, first).await.2, "run 1: 100");
    }
    clock.advance(Duration::from_secs(3601));

    assert_eq!(
        send(&b, r#"{"amount":7}"#).await,
        (StatusCode::CREATED, false, "run 2: 7".to_owned())
    );
    let old = send(&a, first).await;
    let new = send(&a, r#"{"amount":7}"#).await;

    assert_eq!(old.0, StatusCode::UNPROCESSABLE_ENTITY, "{}", old.2);
    assert_eq!(new, (StatusCode::CREATED, true, "run 2: 7".to_owned()));
    assert_eq!(runs.0.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered_redis_instances_replay_only_what_redis_holds() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let (clock, prefix, runs) = (
        ManualClock::starting_now(),
        unique_name("idem_test") + ":",
        Runs::default(),
    );
    let mut apps = Vec::new();
    for _ in 0..2 {
        let client = redis::Client::open(url.as_str()).unwrap();
        let connection = redis::aio::ConnectionManager::new(client).await.unwrap();
        let durable = RedisStore::builder(connection)
            .prefix(prefix.clone())
            .clock(clock.clone())
            .build();
        apps.push(instance(
            Tiered::builder(durable).clock(clock.clone()).build(),
            &runs,
        ));
    }
    let apps: [Router; 2] = apps.try_into().unwrap();
    exact_repeats_follow_the_durable_record(apps, &clock, &runs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered_postgres_instances_replay_only_what_postgres_holds() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
        return;
    };
    let (clock, table, runs) = (
        ManualClock::starting_now(),
        unique_name("idem_test"),
        Runs::default(),
    );
    let mut apps = Vec::new();
    let mut pools = Vec::new();
    for _ in 0..2 {
        let connected = PostgresStore::connect(&url).await.unwrap();
        let durable = PostgresStore::builder(connected.pool().clone())
            .table(&table)
            .clock(clock.clone())
            .build()
            .unwrap();
        durable.migrate().await.unwrap();
        pools.push(connected.pool().clone());
        apps.push(instance(
            Tiered::builder(durable).clock(clock.clone()).build(),
            &runs,
        ));
    }
    let apps: [Router; 2] = apps.try_into().unwrap();
    exact_repeats_follow_the_durable_record(apps, &clock, &runs).await;
    sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(&pools[0])
        .await
        .unwrap();
}

/// The durable tier goes away: a replay this instance has cached is still
/// answered from memory, a claim of any other key is refused (503 at the
/// engine, nothing runs), and nothing is answered from memory that the
/// durable tier did not complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_durable_tier_down_only_cached_replays_are_answered() {
    use idempotent_core::fingerprint::Fingerprint;
    use idempotent_core::key::IdempotencyKey;
    use idempotent_core::record::{Claim, Record, RecordKey, StoredResponse};
    use idempotent_core::scope::ScopeDigest;
    use store_support::OwnRedis;

    // Needs the Redis test environment (it starts its own server binary).
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let mut redis = OwnRedis::start(OwnRedis::free_port()).await;
    let durable = RedisStore::connect(&redis.url()).await.expect("connect");
    let store = Tiered::new(durable);
    let scope = ScopeDigest::from_bytes(rand::random());
    let key = |name: &[u8]| RecordKey::new(scope, IdempotencyKey::parse(name).unwrap());
    let (done, running, fresh) = (key(b"done"), key(b"running"), key(b"fresh"));
    let fingerprint = Fingerprint::from_bytes([4; 32]);
    let lease = Duration::from_secs(60);
    let Ok(Claim::Acquired(token)) = store.claim(&done, fingerprint, lease).await else {
        panic!("a new key is acquired");
    };
    let response = StoredResponse {
        status: StatusCode::CREATED,
        headers: Vec::new(),
        body: Some(axum::body::Bytes::from_static(b"paid")),
    };
    store
        .complete(&done, token, response.clone(), Duration::from_secs(3600))
        .await
        .expect("complete");
    let Ok(Claim::Acquired(_)) = store.claim(&running, fingerprint, lease).await else {
        panic!("a new key is acquired");
    };
    redis.stop().await;

    let replay = store.claim(&done, fingerprint, lease).await;
    assert!(
        matches!(&replay, Ok(Claim::Completed(record)) if record.response == response),
        "{replay:?}"
    );
    assert!(matches!(
        store.get(&done).await,
        Ok(Some(Record::Completed(_)))
    ));
    for key in [&running, &fresh] {
        let claimed = store.claim(key, fingerprint, lease).await;
        assert!(claimed.is_err(), "{claimed:?}");
        assert!(store.get(key).await.is_err(), "only the durable tier knows");
    }
}
