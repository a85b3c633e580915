//! A response that could not be stored before its caller got it, in a
//! process whose store is a `Tiered` cache in front of PostgreSQL or Redis
//! (`IDEMPOTENT_TEST_POSTGRES_URL`, `IDEMPOTENT_TEST_REDIS_URL`), each
//! reached through a relay the test cuts as an outage would: the engine
//! stores it once the durable store is back, and from then on it must be
//! replayed from memory, as a response stored at once is, and so answered
//! while the durable store is away again. Until then, a retry sent to that
//! process during the outage is told the request is in flight, even under
//! `fail_open`: the process holds its key.

use crate::macro_support;
use crate::store_support;

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Record, RecordKey};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{PostgresStore, RedisStore, Store, Tiered};
use idempotent_core::{IDEMPOTENT_REPLAYED, Idempotency, idempotent};
use macro_support::Turnstile;
use store_support::{Relay, backend_url, postgres_store_on, store_behind_a_relay, unique_name};
use tower::ServiceExt;

/// How long a test waits for something that must happen before it calls
/// it a failure: never a synchronisation, only a bound on a hang.
const HANG: Duration = Duration::from_secs(20);

/// Counts runs; the first signals that it started, then waits at a
/// gate, closed at first.
#[derive(Clone, Default)]
struct Runs {
    count: macro_support::Runs,
    first: Turnstile,
}

#[idempotent(ttl = "1h", scope = "global", lease = "10s")]
async fn charge(State(runs): State<Runs>, Json(amount): Json<u64>) -> (StatusCode, String) {
    let run = runs.count.bump();
    if run == 1 {
        runs.first.pass().await;
    }
    (StatusCode::CREATED, format!("run {run}: {amount}"))
}

/// What a client saw: the status, whether it was a replay, the body.
async fn send(app: Router, key: String) -> (StatusCode, bool, String) {
    let request = Request::post("/charges")
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Body::from("7"))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, String::from_utf8(body.to_vec()).unwrap())
}

/// Waits until `watch`, a client of the durable store that the relay does
/// not carry, holds `key` completed.
async fn until_stored(watch: &impl Store, key: &RecordKey) {
    let stored = async {
        while !matches!(watch.get(key).await, Ok(Some(Record::Completed(_)))) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let stored = tokio::time::timeout(HANG, stored).await;
    stored.expect("the response is stored once the durable store is back");
}

/// The first run's completion meets the relay cut: its caller gets the
/// response, and storing it goes on. The relay comes back, the response
/// is stored, and the relay is cut again: a retry must be replayed from
/// memory, not refused for want of the durable store.
async fn a_response_stored_later_is_replayed_from_memory<D: Store + Clone>(
    tiered: Tiered<D>,
    mut relay: Relay,
    watch: &impl Store,
) {
    let idempotency = Idempotency::builder(tiered.clone())
        .store_timeout(Duration::from_millis(500))
        .build();
    let runs = Runs::default();
    let app = Router::new()
        .route("/charges", post(charge))
        .with_state(runs.clone())
        .layer(idempotency.clone());
    let key = unique_name("order");
    let record_key = RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(key.as_bytes()).unwrap(),
    );

    let first = tokio::spawn(send(app.clone(), key.clone()));
    runs.first.until_started().await;
    relay.stop().await;
    runs.first.let_through(1);
    let first = tokio::time::timeout(HANG, first).await;
    let first = first.expect("the caller is answered").unwrap();
    assert_eq!(first, (StatusCode::CREATED, false, "run 1: 7".to_owned()));
    assert!(
        matches!(watch.get(&record_key).await, Ok(Some(Record::InFlight(_)))),
        "the response is not stored during the outage"
    );

    let mut relay = Relay::start(relay.port, relay.upstream.clone()).await;
    until_stored(watch, &record_key).await;
    // The task that stored it has ended, whatever it had left to do.
    idempotency.drain().await;
    relay.stop().await;

    let retry = send(app, key).await;
    assert_eq!(
        retry,
        (StatusCode::CREATED, true, "run 1: 7".to_owned()),
        "the retry is not answered from memory"
    );
    assert_eq!(tiered.cached_len(), 1);
    assert_eq!(runs.count.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_stored_later_in_postgres_is_replayed_from_memory() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
        return;
    };
    let (durable, relay) = store_behind_a_relay(&url, 1).await;
    let direct = PostgresStore::connect(&url).await.unwrap();
    let watch = PostgresStore::builder(direct.pool().clone())
        .table(durable.table())
        .build()
        .unwrap();
    a_response_stored_later_is_replayed_from_memory(Tiered::new(durable), relay, &watch).await;
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", watch.table()))
        .execute(watch.pool())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_stored_later_in_redis_is_replayed_from_memory() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let (durable, relay) = redis_behind_a_relay(&url).await;
    let watch = RedisStore::connect(&url).await.unwrap();
    a_response_stored_later_is_replayed_from_memory(Tiered::new(durable), relay, &watch).await;
}

/// Under `fail_open`, a request runs without the store while the store is
/// away. A retry of a request this process holds must not: the first run
/// is under way here, then its response waits to be stored. Run again, a
/// payment was charged twice by the one process that knew it was charging.
async fn a_retry_of_a_key_held_here_is_in_flight_during_an_outage<D: Store>(
    tiered: Tiered<D>,
    mut relay: Relay,
) {
    let idempotency = Idempotency::builder(tiered)
        .store_timeout(Duration::from_millis(500))
        .fail_open(true)
        .build();
    let runs = Runs::default();
    let app = Router::new()
        .route("/charges", post(charge))
        .with_state(runs.clone())
        .layer(idempotency);
    let key = unique_name("order");

    let first = tokio::spawn(send(app.clone(), key.clone()));
    runs.first.until_started().await;
    relay.stop().await;
    let (status, _, body) = send(app.clone(), key.clone()).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a retry while it runs: {body}"
    );

    runs.first.let_through(1);
    let first = tokio::time::timeout(HANG, first).await;
    let first = first.expect("the caller is answered").unwrap();
    assert_eq!(first, (StatusCode::CREATED, false, "run 1: 7".to_owned()));
    let (status, _, body) = send(app, key).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a retry while its response waits to be stored: {body}"
    );
    assert_eq!(runs.count.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_key_held_here_is_in_flight_during_a_redis_outage() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let (durable, relay) = redis_behind_a_relay(&url).await;
    a_retry_of_a_key_held_here_is_in_flight_during_an_outage(Tiered::new(durable), relay).await;
}

/// A PostgreSQL that hangs rather than refuses (its table locked by a
/// migration or a long transaction) is cut short by the store timeout,
/// which drops the claim before memory is read. A retry of the key this
/// process holds must still be in flight: refused at once, under
/// `fail_open` it ran the handler beside the run under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_key_held_here_is_in_flight_while_postgres_hangs() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
        return;
    };
    let pool = PostgresStore::connect(&url).await.unwrap().pool().clone();
    let durable = postgres_store_on(pool.clone(), 1).await;
    let table = durable.table().to_owned();
    let idempotency = Idempotency::builder(Tiered::new(durable))
        .store_timeout(Duration::from_millis(500))
        .fail_open(true)
        .build();
    let runs = Runs::default();
    let app = Router::new()
        .route("/charges", post(charge))
        .with_state(runs.clone())
        .layer(idempotency);
    let key = unique_name("order");

    let first = tokio::spawn(send(app.clone(), key.clone()));
    runs.first.until_started().await;
    let mut lock = pool.begin().await.unwrap();
    sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *lock)
        .await
        .unwrap();
    let (status, _, body) = send(app.clone(), key).await;
    lock.rollback().await.unwrap();
    runs.first.let_through(1);
    let first = tokio::time::timeout(HANG, first).await;
    first.expect("the caller is answered").unwrap();
    sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        (status, runs.count.get()),
        (StatusCode::CONFLICT, 1),
        "a retry while it runs: {body}"
    );
}

/// A store on the Redis at `url`, reached through a relay the test can cut.
async fn redis_behind_a_relay(url: &str) -> (RedisStore, Relay) {
    let client = redis::Client::open(url).unwrap();
    let redis::ConnectionAddr::Tcp(host, port) = client.get_connection_info().addr().clone() else {
        panic!("the test Redis is reached over TCP");
    };
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_port = free.local_addr().unwrap().port();
    drop(free);
    let relay = Relay::start(relay_port, (host, port)).await;
    let relayed = format!("redis://127.0.0.1:{relay_port}");
    (RedisStore::connect(&relayed).await.unwrap(), relay)
}
