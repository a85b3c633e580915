//! What `RedisStore` tells the operator when its background work fails:
//! a claim cut short by the store timeout is released on a task of its
//! own, and a release that fails leaves the key held until its lease
//! lapses (retries get 409 meanwhile), so it is logged. A process of its
//! own: the subscriber that records the events is global, since the
//! release logs from whichever worker runs it. Starts its own
//! `redis-server`, which it stops mid-release; and one that evicts keys
//! when full, which `connect` warns of. A clock that moved off the
//! server's after `connect` is told when it takes a running claim over;
//! and a replica, which `connect` warns of. A background check of the
//! server that Redis never answers is given up, and told.

mod store_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use idempotent_core::Fingerprint;
use idempotent_core::clock::ManualClock;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{RedisStore, Store};
use store_support::logs::events;
use store_support::{OwnRedis, acquire, backend_url, delete, hash_at, redis_connection};
use tracing::Level;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_release_of_a_claim_cut_short_is_logged_with_the_key() {
    // Needs the Redis test environment (it starts its own server binary).
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let events = events();
    let mut redis = OwnRedis::start(OwnRedis::free_port()).await;
    let store = RedisStore::connect(&redis.url()).await.expect("connect");

    // The server stops answering: the claim is cut short, and its release
    // waits behind it on the connection.
    let pid = redis.pid().expect("running").to_string();
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status();
    assert!(stopped.unwrap().success());
    let key = RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(b"order-secret-1").unwrap(),
    );
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let claim = store.claim(&key, fingerprint, Duration::from_secs(60));
    let cut = tokio::time::timeout(Duration::from_millis(200), claim).await;
    assert!(cut.is_err(), "the stopped server did not answer");
    // Then it goes away: the release fails.
    redis.stop().await;
    tokio::time::timeout(Duration::from_secs(10), store.settle())
        .await
        .expect("the release gives up");

    let logged = events.at(Level::WARN, "idempotent_core");
    let log_id = key.log_id().to_string();
    assert!(
        logged.iter().any(|event| {
            event.fields.contains("could not release a claim") && event.fields.contains(&log_id)
        }),
        "{logged:?}"
    );
    assert!(
        !format!("{logged:?}").contains("order-secret"),
        "the raw key is logged: {logged:?}"
    );
}

/// A Redis with a memory limit and an evicting policy drops keys when it
/// is full, an in-flight claim among them (`volatile-ttl` drops the
/// nearest expiry first, and a claim's is the nearest), and a retry of
/// the request still running then runs it a second time. Nothing told
/// the operator until that happened: `connect` warns, naming the server
/// as its other checks do: a service that uses several Redis servers (a
/// cache beside the store) was told "this Redis" and not which one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_redis_that_evicts_keys_is_logged() {
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let events = events();
    let evicting = ["--maxmemory", "64mb", "--maxmemory-policy", "volatile-ttl"];
    let port = OwnRedis::free_port();
    let mut redis = OwnRedis::start_with(port, &evicting).await;
    let _store = RedisStore::connect(&redis.url()).await.expect("connect");
    redis.stop().await;
    let logged = events.at(Level::WARN, "idempotent_core");
    let warning = logged
        .iter()
        .find(|event| event.fields.contains("evicts keys"))
        .unwrap_or_else(|| panic!("{logged:?}"));
    let server = format!("127.0.0.1:{port}");
    assert_eq!(
        warning.field("server"),
        Some(server.as_str()),
        "{warning:?}"
    );
}

/// A claim the server refused with an error reply (here WRONGTYPE: a key
/// of another type under the prefix) was answered: nothing was applied,
/// so no release is sent after it, which would fail the same way and log
/// that a claim nobody read is held until its lease lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_refused_by_the_server_leaves_no_release_behind() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let events = events();
    let mut connection = redis_connection(&url).await;
    let store = RedisStore::builder(connection.clone())
        .prefix(format!("idem_test_{:016x}:", rand::random::<u64>()))
        .build();
    let key = RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(b"foreign-type").unwrap(),
    );
    let redis_key = store.redis_key(&key);
    hash_at(&mut connection, &redis_key).await;
    let claimed = store
        .claim(
            &key,
            Fingerprint::from_bytes([1; 32]),
            Duration::from_secs(60),
        )
        .await;
    store.settle().await;
    delete(&mut connection, &redis_key).await;
    assert!(claimed.is_err(), "a hash is no record");
    let log_id = key.log_id().to_string();
    let logged = events.at(Level::WARN, "idempotent_core");
    assert!(
        !logged.iter().any(|event| event.fields.contains(&log_id)),
        "{logged:?}"
    );
}

/// `connect` compares this host's clock with the server's once. A clock
/// that moved ahead since (stepped, or drifted without NTP) reads the
/// running claims of other instances as lapsed and takes them over, and
/// their requests run twice, with nothing told. The takeover compares the
/// store's clock with the server's again, and warns with the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_by_a_clock_off_the_servers_is_logged_with_the_key() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let events = events();
    let prefix = format!("idem_test_{:016x}:", rand::random::<u64>());
    let lease = Duration::from_secs(60);
    let on_time = RedisStore::builder(redis_connection(&url).await)
        .prefix(prefix.clone())
        .build();
    let ahead_clock = ManualClock::starting_now();
    ahead_clock.advance(2 * lease);
    let ahead = RedisStore::builder(redis_connection(&url).await)
        .prefix(prefix)
        .clock(ahead_clock)
        .build();
    let key = RecordKey::new(
        ScopeDigest::from_bytes(rand::random()),
        IdempotencyKey::parse(b"taken-over").unwrap(),
    );
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let running = on_time.claim(&key, fingerprint, lease).await;
    let taken_over = ahead.claim(&key, fingerprint, lease).await;
    ahead.settle().await;
    assert!(matches!(running, Ok(Claim::Acquired(_))), "{running:?}");
    assert!(
        matches!(taken_over, Ok(Claim::Acquired(_))),
        "{taken_over:?}"
    );
    let log_id = key.log_id().to_string();
    let logged = events.at(Level::WARN, "idempotent_core");
    assert!(
        logged.iter().any(|event| {
            event.fields.contains("clock differs") && event.fields.contains(&log_id)
        }),
        "{logged:?}"
    );
}

/// A store connected to a replica is refused every write (503), and one
/// made writable takes the writes and drops them when it syncs again;
/// nothing told the operator but each request's error. `connect` still
/// connects, since during a failover the address it was given follows
/// the new primary soon, and warns, naming the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_replica_is_logged_with_its_primary() {
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let events = events();
    let primary_port = OwnRedis::free_port();
    let mut primary = OwnRedis::start(primary_port).await;
    let port = primary_port.to_string();
    let replica_of = ["--replicaof", "127.0.0.1", port.as_str()];
    let mut replica = OwnRedis::start_with(OwnRedis::free_port(), &replica_of).await;
    let connected = RedisStore::connect(&replica.url()).await.map(drop);
    replica.stop().await;
    primary.stop().await;
    assert!(connected.is_ok(), "{connected:?}");
    let primary_address = format!("127.0.0.1:{primary_port}");
    let logged = events.at(Level::WARN, "idempotent_core");
    assert!(
        logged.iter().any(|event| {
            event.fields.contains("is a replica") && event.fields.contains(&primary_address)
        }),
        "{logged:?}"
    );
}

/// A connection to Redis on which the first `INFO` is never answered, as
/// by a server that stalled once the request went out, on a connection
/// with no response timeout (a cluster connection's default); every other
/// command reaches Redis. Of the store's commands, only its background
/// check of the eviction policy sends `INFO`.
#[derive(Clone)]
struct FirstInfoUnanswered {
    connection: redis::aio::ConnectionManager,
    stalled_one: Arc<AtomicBool>,
}

impl redis::aio::ConnectionLike for FirstInfoUnanswered {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        let info = matches!(cmd.args_iter().next(), Some(redis::Arg::Simple(b"INFO")));
        if info && !self.stalled_one.swap(true, Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        self.connection.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        self.connection.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.connection.get_db()
    }
}

/// Claims `key` on `store`, deletes its record behind the store's back
/// (as an eviction does) through `connection`, and completes it: the
/// completion finds its claim gone, which has the store check the
/// server's eviction policy in the background.
async fn complete_a_claim_found_gone(
    store: &RedisStore<FirstInfoUnanswered>,
    connection: &mut redis::aio::ConnectionManager,
    key: &RecordKey,
) -> Result<(), idempotent_core::store::StoreError> {
    let lease = Duration::from_secs(60);
    let token = acquire(store, key, Fingerprint::from_bytes([1; 32]), lease).await;
    delete(connection, &store.redis_key(key)).await;
    let response = StoredResponse::new(StatusCode::OK, Vec::new(), None);
    store.complete(key, token, response, lease).await
}

/// A background check of the server whose command Redis never answered
/// held its turn for good: no later claim found gone checked the eviction
/// policy again, and `settle` (so `Idempotency::drain`) waited for it
/// until it gave up. It is given up after a bound, with a warning naming
/// the check, and the next claim found gone checks again: on a Redis that
/// evicts, it warns so with that claim's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_check_redis_never_answers_is_given_up_and_the_next_one_runs() {
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let events = events();
    let evicting = ["--maxmemory", "64mb", "--maxmemory-policy", "volatile-ttl"];
    let mut redis = OwnRedis::start_with(OwnRedis::free_port(), &evicting).await;
    let mut connection = redis_connection(&redis.url()).await;
    let store = RedisStore::builder(FirstInfoUnanswered {
        connection: connection.clone(),
        stalled_one: Arc::new(AtomicBool::new(false)),
    })
    .build();
    let key = |name: &[u8]| {
        RecordKey::new(
            ScopeDigest::from_bytes(rand::random()),
            IdempotencyKey::parse(name).unwrap(),
        )
    };
    let (first, next) = (key(b"found-gone-first"), key(b"found-gone-next"));

    let first_completed = complete_a_claim_found_gone(&store, &mut connection, &first).await;
    let given_up = tokio::time::timeout(Duration::from_secs(10), store.settle()).await;
    let next_completed = complete_a_claim_found_gone(&store, &mut connection, &next).await;
    let next_checked = tokio::time::timeout(Duration::from_secs(10), store.settle()).await;
    redis.stop().await;

    assert!(first_completed.is_err(), "the first claim was gone");
    assert!(next_completed.is_err(), "the next claim was gone");
    assert!(given_up.is_ok(), "the unanswered check was never given up");
    assert!(next_checked.is_ok(), "the next check did not finish");
    let logged = events.at(Level::WARN, "idempotent_core");
    assert!(
        logged.iter().any(|event| {
            event.fields.contains("could not finish") && event.fields.contains("eviction policy")
        }),
        "{logged:?}"
    );
    let next_id = next.log_id().to_string();
    assert!(
        logged.iter().any(|event| {
            event.fields.contains("evicts keys") && event.fields.contains(&next_id)
        }),
        "the next claim found gone did not check the policy: {logged:?}"
    );
}
