//! A Redis that restarts without persistence forgets every record, the
//! claims of requests still running among them. Their completions find
//! the key empty: the response is not stored, and a retry runs the
//! handler again. The engine reports that as a lost lease, which reads as
//! another request's takeover; the store says what happened instead. A
//! process of its own: the subscriber that records the events is global.
//! Starts its own `redis-server`, which it restarts.

mod store_support;

use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use idempotent_core::Fingerprint;
use idempotent_core::clock::ManualClock;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{LeaseToken, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{RedisStore, Store, StoreError};
use store_support::logs::{Events, events};
use store_support::{OwnRedis, backend_url, redis_connection, unique_name};
use tracing::Level;

const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(3600);
/// What the store's warning says of a record Redis no longer has.
const GONE: &str = "gone from Redis";
/// What it says of a takeover that was released, which also empties the key.
const RELEASED_TAKEOVER: &str = "another request took the lapsed lease over and released it";

fn key(name: &[u8]) -> RecordKey {
    RecordKey::new(
        ScopeDigest::from_bytes(rand::random()),
        IdempotencyKey::parse(name).unwrap(),
    )
}

fn paid() -> StoredResponse {
    StoredResponse::new(
        StatusCode::CREATED,
        Vec::new(),
        Some(Bytes::from_static(b"paid")),
    )
}

async fn acquire(store: &impl Store, key: &RecordKey) -> LeaseToken {
    store_support::acquire(store, key, Fingerprint::from_bytes([1; 32]), LEASE).await
}

/// Completes, again while the connection is being made anew after the
/// restart (the first commands fail with the old connection).
async fn complete_once_reconnected(
    store: &impl Store,
    key: &RecordKey,
    token: LeaseToken,
) -> Result<(), StoreError> {
    for _ in 0..100 {
        match store.complete(key, token, paid(), TTL).await {
            Err(StoreError::Backend(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            completed => return completed,
        }
    }
    panic!("the store never reached the restarted Redis");
}

fn warned_gone(events: &Events, key: &RecordKey) -> bool {
    let log_id = key.log_id().to_string();
    let logged = events.at(Level::WARN, "idempotent_core");
    logged
        .iter()
        .any(|event| event.fields.contains(GONE) && event.fields.contains(&log_id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_after_redis_forgot_the_claim_is_logged_as_such() {
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let events = events();
    let port = OwnRedis::free_port();
    let mut redis = OwnRedis::start(port).await;
    let store = RedisStore::connect(&redis.url()).await.expect("connect");
    let key = key(b"charge-during-restart");
    let token = acquire(&store, &key).await;

    // No persistence: the restarted server holds nothing.
    redis.stop().await;
    let mut redis = OwnRedis::start(port).await;
    let completed = complete_once_reconnected(&store, &key, token).await;
    redis.stop().await;

    assert!(
        matches!(completed, Err(StoreError::LeaseLost)),
        "{completed:?}"
    );
    assert!(warned_gone(&events, &key), "{:?}", events.everything());
}

/// The first holder's completion of `name`, after another request took its
/// lapsed lease over (and then, if `released`, released the key, its
/// handler having failed), on a store of its own.
async fn completed_after_a_takeover(
    url: &str,
    name: &[u8],
    released: bool,
) -> (Result<(), StoreError>, RecordKey) {
    let clock = ManualClock::starting_now();
    let store = RedisStore::builder(redis_connection(url).await)
        .prefix(unique_name("idem_test") + ":")
        .clock(clock.clone())
        .build();
    let key = key(name);
    let first = acquire(&store, &key).await;
    clock.advance(LEASE * 2);
    let second = acquire(&store, &key).await;
    if released {
        store.release(&key, second).await.expect("release");
    }
    (store.complete(&key, first, paid(), TTL).await, key)
}

/// A lease taken over by another request is not "gone": that is the
/// engine's lost lease, and the store adds nothing to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_after_a_takeover_is_not_logged_as_gone() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let events = events();
    let (completed, key) = completed_after_a_takeover(&url, b"charge-taken-over", false).await;
    assert!(
        matches!(completed, Err(StoreError::LeaseLost)),
        "{completed:?}"
    );
    assert!(!warned_gone(&events, &key), "{:?}", events.everything());
}

/// A lease taken over by another request that then released it (its
/// handler failed) leaves the key empty, as Redis losing the claim does:
/// the warning names the takeover too, not only Redis losing the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_after_a_takeover_was_released_names_the_takeover() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let events = events();
    let name = b"charge-taken-over-and-released";
    let (completed, key) = completed_after_a_takeover(&url, name, true).await;
    assert!(
        matches!(completed, Err(StoreError::LeaseLost)),
        "{completed:?}"
    );
    let log_id = key.log_id().to_string();
    let warned = events.at(Level::WARN, "idempotent_core");
    assert!(
        warned.iter().any(|event| event.fields.contains(&log_id)
            && event.fields.contains(RELEASED_TAKEOVER)),
        "{:?}",
        events.everything()
    );
}

/// Redis keeps its scripts in a cache a restart or `SCRIPT FLUSH` empties:
/// a claim held across either is still renewed and completed (the client
/// loads a script Redis answers `NOSCRIPT` to), and a restart with
/// persistence keeps the claim and its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_outlive_a_restart_with_persistence_and_a_script_flush() {
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(unique_name("idem_test_aof"));
    std::fs::create_dir_all(&dir).unwrap();
    let dir_setting = dir.to_str().unwrap().to_owned();
    let persistent = ["--appendonly", "yes", "--appendfsync", "always"];
    let settings = [&persistent[..], &["--dir", &dir_setting]].concat();
    let port = OwnRedis::free_port();
    let mut redis = OwnRedis::start_with(port, &settings).await;
    let store = RedisStore::connect(&redis.url()).await.expect("connect");
    let flushed = key(b"charge-across-a-script-flush");
    let restarted = key(b"charge-across-a-restart");
    let flushed_token = acquire(&store, &flushed).await;
    let restarted_token = acquire(&store, &restarted).await;
    store.renew(&flushed, flushed_token, LEASE).await.unwrap();

    let mut connection = redis_connection(&redis.url()).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut connection)
        .await
        .unwrap();
    let renewed = store.renew(&flushed, flushed_token, LEASE).await;
    let completed = store.complete(&flushed, flushed_token, paid(), TTL).await;

    redis.stop().await;
    let mut redis = OwnRedis::start_with(port, &settings).await;
    let completed_after_restart =
        complete_once_reconnected(&store, &restarted, restarted_token).await;
    let replayed = store.get(&restarted).await;
    redis.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();

    assert!(renewed.is_ok(), "{renewed:?}");
    assert!(completed.is_ok(), "{completed:?}");
    assert!(
        completed_after_restart.is_ok(),
        "{completed_after_restart:?}"
    );
    assert!(
        matches!(&replayed, Ok(Some(idempotent_core::record::Record::Completed(record)))
            if record.response == paid()),
        "{replayed:?}"
    );
}

/// Whether `connect` warned that the Redis on `port` keeps nothing on disk.
fn warned_not_persisted(events: &Events, port: u16) -> bool {
    let server = format!("127.0.0.1:{port}");
    let logged = events.at(Level::WARN, "idempotent_core");
    logged.iter().any(|event| {
        event.fields.contains("keeps nothing on disk") && event.fields.contains(&server)
    })
}

/// A Redis that keeps nothing on disk forgets every record when it
/// restarts, and nothing showed it until then: `connect` warns. One with
/// an append-only file is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_redis_that_keeps_nothing_on_disk_is_logged() {
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let events = events();
    let volatile = OwnRedis::free_port();
    let mut redis = OwnRedis::start(volatile).await;
    let _store = RedisStore::connect(&redis.url()).await.expect("connect");
    redis.stop().await;

    let dir = std::env::temp_dir().join(unique_name("idem_test_aof"));
    std::fs::create_dir_all(&dir).unwrap();
    let persisted = OwnRedis::free_port();
    let appending = ["--appendonly", "yes", "--dir", dir.to_str().unwrap()];
    let mut redis = OwnRedis::start_with(persisted, &appending).await;
    let _store = RedisStore::connect(&redis.url()).await.expect("connect");
    redis.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();

    assert!(
        warned_not_persisted(&events, volatile),
        "{:?}",
        events.everything()
    );
    assert!(
        !warned_not_persisted(&events, persisted),
        "{:?}",
        events.everything()
    );
}

/// `connect` checks the eviction policy once: one set later (`CONFIG SET
/// maxmemory-policy allkeys-random`, with a `maxmemory` Redis is past)
/// evicted a running request's claim, and only the completion's warning
/// that the record was gone told of it, among other causes. The
/// completion asks Redis again, and warns that it evicts, with the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_policy_set_after_connect_is_logged_when_a_claim_is_gone() {
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let events = events();
    let mut redis = OwnRedis::start(OwnRedis::free_port()).await;
    let store = RedisStore::connect(&redis.url()).await.expect("connect");
    let evicted = key(b"charge-evicted-while-running");
    let token = acquire(&store, &evicted).await;
    let mut admin = redis_connection(&redis.url()).await;
    for (setting, value) in [("maxmemory-policy", "allkeys-random"), ("maxmemory", "1")] {
        let _: () = redis::cmd("CONFIG")
            .arg(&["SET", setting, value])
            .query_async(&mut admin)
            .await
            .expect("CONFIG SET");
    }
    let completed = store.complete(&evicted, token, paid(), TTL).await;
    store.settle().await;
    redis.stop().await;

    assert!(
        matches!(completed, Err(StoreError::LeaseLost)),
        "{completed:?}"
    );
    assert!(warned_gone(&events, &evicted), "{:?}", events.everything());
    let log_id = evicted.log_id().to_string();
    let logged = events.at(Level::WARN, "idempotent_core");
    assert!(
        logged
            .iter()
            .any(|event| event.fields.contains("evicts keys")
                && event.fields.contains("allkeys-random")
                && event.fields.contains(&log_id)),
        "{logged:?}"
    );
}
