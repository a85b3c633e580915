//! Several instances, each with a `Tiered` memory in front of one durable
//! store (Redis or PostgreSQL, `IDEMPOTENT_TEST_REDIS_URL` and
//! `IDEMPOTENT_TEST_POSTGRES_URL`, or a SQLite file): what an instance
//! answers from memory, exact repeats of a replayed request included, is
//! what the durable store holds. Each test uses a key prefix or table of its own.

use crate::store_support;

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

/// Two instances, each with a memory tier on `clock` in front of its own
/// client of one durable store.
fn instances<D: Store>(durables: [D; 2], clock: &ManualClock, runs: &Runs) -> [Router; 2] {
    durables.map(|durable| instance(Tiered::builder(durable).clock(clock.clone()).build(), runs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered_redis_instances_replay_only_what_redis_holds() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let (clock, runs) = (ManualClock::starting_now(), Runs::default());
    let apps = instances(redis_durables(&url, &clock).await, &clock, &runs);
    exact_repeats_follow_the_durable_record(apps, &clock, &runs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered_postgres_instances_replay_only_what_postgres_holds() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
        return;
    };
    let (clock, runs) = (ManualClock::starting_now(), Runs::default());
    let durables = postgres_durables(&url, &unique_name("idem_test"), &clock).await;
    let apps = instances(durables.clone(), &clock, &runs);
    exact_repeats_follow_the_durable_record(apps, &clock, &runs).await;
    drop_table(&durables[0]).await;
}

/// Two clients of the table `table`, each on a pool of its own.
async fn postgres_durables(url: &str, table: &str, clock: &ManualClock) -> [PostgresStore; 2] {
    let mut stores = Vec::new();
    for _ in 0..2 {
        let connected = PostgresStore::connect(url).await.unwrap();
        let store = PostgresStore::builder(connected.pool().clone())
            .table(table)
            .clock(clock.clone())
            .build()
            .unwrap();
        store.migrate().await.unwrap();
        stores.push(store);
    }
    stores.try_into().unwrap()
}

/// Two clients of one key prefix, each on a connection of its own.
async fn redis_durables(url: &str, clock: &ManualClock) -> [RedisStore; 2] {
    let prefix = unique_name("idem_test") + ":";
    let mut stores = Vec::new();
    for _ in 0..2 {
        let client = redis::Client::open(url).unwrap();
        let connection = redis::aio::ConnectionManager::new(client).await.unwrap();
        stores.push(
            RedisStore::builder(connection)
                .prefix(prefix.clone())
                .clock(clock.clone())
                .build(),
        );
    }
    stores.try_into().unwrap()
}

async fn drop_table(store: &PostgresStore) {
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", store.table()))
        .execute(store.pool())
        .await
        .unwrap();
}

/// The durable tier goes away: a replay this instance has cached is still
/// answered from memory, a key it holds is in flight (409 at the engine:
/// its request runs here), a claim of any other key is refused (503 at
/// the engine, nothing runs), and nothing is replayed from memory that the
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
    let response = StoredResponse::new(
        StatusCode::CREATED,
        Vec::new(),
        Some(axum::body::Bytes::from_static(b"paid")),
    );
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
    let held = store.claim(&running, fingerprint, lease).await;
    assert!(
        matches!(held, Ok(Claim::InFlight { fingerprint: held, .. }) if held == fingerprint),
        "a key this instance holds is not in flight: {held:?}"
    );
    let claimed = store.claim(&fresh, fingerprint, lease).await;
    assert!(claimed.is_err(), "{claimed:?}");
    for key in [&running, &fresh] {
        assert!(store.get(key).await.is_err(), "only the durable tier knows");
    }
}

/// Two `Tiered` instances on a Redis of their own, started with `args`
/// (None without the Redis test environment): the first has completed a
/// record of `body_len` bytes of body under `key`, which Redis may keep
/// without its body.
async fn completed_on_own_redis(
    args: &[&str],
    key: &[u8],
    body_len: usize,
) -> Option<RedisCompleted> {
    use idempotent_core::key::IdempotencyKey;
    use idempotent_core::record::{RecordKey, StoredResponse};
    use idempotent_core::scope::ScopeDigest;
    use store_support::OwnRedis;

    // It starts its own server binary, which the Redis test environment
    // provides.
    backend_url("IDEMPOTENT_TEST_REDIS_URL")?;
    let redis = OwnRedis::start_with(OwnRedis::free_port(), args).await;
    let connect =
        || async { Tiered::new(RedisStore::connect(&redis.url()).await.expect("connect")) };
    let (here, elsewhere) = (connect().await, connect().await);
    let key = RecordKey::new(
        ScopeDigest::from_bytes(rand::random()),
        IdempotencyKey::parse(key).unwrap(),
    );
    let token = store_support::acquire(&here, &key, OWN_REDIS_FINGERPRINT, OWN_REDIS_LEASE).await;
    let body = axum::body::Bytes::from(vec![b'x'; body_len]);
    let response = StoredResponse::new(StatusCode::OK, Vec::new(), Some(body));
    here.complete(&key, token, response, Duration::from_secs(3600))
        .await
        .expect("kept, with or without its body");
    Some(RedisCompleted {
        redis,
        here,
        elsewhere,
        key,
    })
}

const OWN_REDIS_FINGERPRINT: idempotent_core::fingerprint::Fingerprint =
    idempotent_core::fingerprint::Fingerprint::from_bytes([5; 32]);
const OWN_REDIS_LEASE: Duration = Duration::from_secs(60);

/// What [`completed_on_own_redis`] set up.
struct RedisCompleted {
    redis: store_support::OwnRedis,
    /// The instance that completed the record.
    here: Tiered<RedisStore>,
    elsewhere: Tiered<RedisStore>,
    key: idempotent_core::record::RecordKey,
}

impl RedisCompleted {
    /// The length of the body `instance` replays for the key (None: none).
    async fn replayed_body(&self, instance: &Tiered<RedisStore>) -> Option<usize> {
        use idempotent_core::record::Claim;
        match instance
            .claim(&self.key, OWN_REDIS_FINGERPRINT, OWN_REDIS_LEASE)
            .await
        {
            Ok(Claim::Completed(record)) => record.response.body.as_ref().map(|body| body.len()),
            other => panic!("expected a replay, got {other:?}"),
        }
    }
}

/// Redis lowered to take values of at most 1 MiB (`proto-max-bulk-len`
/// at its least) keeps a larger record without its body, which the engine
/// answers 410. The instance that completed it must replay what Redis
/// holds, as every other instance does, not the body it sent: from memory
/// it replayed the whole response while the others answered 410. Learned
/// from Redis, the record is then replayed from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_redis_keeps_without_its_body_is_replayed_without_it_from_memory() {
    let args = ["--proto-max-bulk-len", "1mb"];
    let Some(mut set_up) = completed_on_own_redis(&args, b"large", 3 << 19).await else {
        return;
    };
    assert_eq!(set_up.replayed_body(&set_up.elsewhere).await, None);
    assert_eq!(
        set_up.replayed_body(&set_up.here).await,
        None,
        "the instance that completed it replays a body Redis did not keep"
    );
    set_up.redis.stop().await;
    assert_eq!(
        set_up.replayed_body(&set_up.here).await,
        None,
        "the record learned from Redis is not replayed from memory"
    );
}

/// Redis with `client-query-buffer-limit` at its least (1 MiB) keeps a
/// record only if it and the `\r\n` that ends its argument fit the
/// buffer: one of exactly 1 MiB is kept without its body, which the
/// engine answers 410. The instance that completed it must not cache the
/// body it sent: it replayed the whole response while every other
/// instance answered 410.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_one_mib_redis_keeps_without_its_body_is_not_replayed_with_it() {
    let args = ["--client-query-buffer-limit", "1mb"];
    // A record without headers is 50 bytes and its body: 1 MiB in all.
    let Some(mut set_up) = completed_on_own_redis(&args, b"one-mib", (1 << 20) - 50).await else {
        return;
    };
    let elsewhere = set_up.replayed_body(&set_up.elsewhere).await;
    let here = set_up.replayed_body(&set_up.here).await;
    set_up.redis.stop().await;
    assert_eq!(elsewhere, None, "Redis kept the body");
    assert_eq!(
        here, elsewhere,
        "the instance that completed it replays a body Redis did not keep"
    );
}

mod two_instances {
    //! Two `Tiered` instances on one durable store, driven through the
    //! `Store` calls the engine makes, after each event that changes what
    //! the durable store holds for a key: whatever instance `a` answers
    //! from memory must be what the durable store holds.

    use std::time::Duration;

    use axum::body::Bytes;
    use axum::http::StatusCode;
    use idempotent_core::clock::{Clock, ManualClock};
    use idempotent_core::fingerprint::Fingerprint;
    use idempotent_core::key::IdempotencyKey;
    use idempotent_core::record::{Claim, LeaseToken, RecordKey, StoredResponse};
    use idempotent_core::scope::ScopeDigest;
    use idempotent_core::store::{SqliteStore, Store, StoreError, Tiered};

    use super::store_support::{delete, redis_connection};
    use super::{backend_url, drop_table, postgres_durables, redis_durables, unique_name};

    const LEASE: Duration = Duration::from_secs(10);
    const TTL: Duration = Duration::from_secs(60);
    const FIRST: Fingerprint = Fingerprint::from_bytes([1; 32]);
    const OTHER: Fingerprint = Fingerprint::from_bytes([2; 32]);

    struct Pair<D> {
        a: Tiered<D>,
        b: Tiered<D>,
        clock: ManualClock,
        scope: ScopeDigest,
    }

    impl<D: Store> Pair<D> {
        fn key(&self, name: &str) -> RecordKey {
            RecordKey::new(self.scope, IdempotencyKey::parse(name.as_bytes()).unwrap())
        }
    }

    fn response(body: &'static str) -> StoredResponse {
        StoredResponse::new(
            StatusCode::CREATED,
            Vec::new(),
            Some(Bytes::from_static(body.as_bytes())),
        )
    }

    async fn acquire(store: &impl Store, key: &RecordKey, fingerprint: Fingerprint) -> LeaseToken {
        super::store_support::acquire(store, key, fingerprint, LEASE).await
    }

    /// Runs `key` on `store` to completion with `body`.
    async fn run(
        store: &impl Store,
        key: &RecordKey,
        fingerprint: Fingerprint,
        body: &'static str,
    ) {
        let token = acquire(store, key, fingerprint).await;
        store
            .complete(key, token, response(body), TTL)
            .await
            .unwrap();
    }

    /// The fingerprint and body that `store`'s claim of `key` replays.
    async fn replayed(store: &impl Store, key: &RecordKey) -> (Fingerprint, Bytes) {
        match store.claim(key, FIRST, LEASE).await {
            Ok(Claim::Completed(record)) => {
                (record.fingerprint, record.response.body.clone().unwrap())
            }
            other => panic!("expected a replay, got {other:?}"),
        }
    }

    /// `a` replays `b`'s run of `key` with `b`'s fingerprint (a 422 for
    /// `a`'s payload), and `b`'s body.
    async fn a_replays_the_run_of_b(pair: &Pair<impl Store>, key: &RecordKey) {
        assert_eq!(
            replayed(&pair.a, key).await,
            (OTHER, Bytes::from_static(b"from b")),
            "`a` replays `{}`",
            key.key.as_str()
        );
    }

    /// `b` takes over a lease `a` let lapse, runs the key with another
    /// payload, and `a`'s late completion is refused: `a` then replays
    /// `b`'s record with `b`'s fingerprint (a 422 for `a`'s payload).
    async fn a_lease_taken_over_replays_the_new_record(pair: &Pair<impl Store>) {
        let key = pair.key("taken-over");
        let stale = acquire(&pair.a, &key, FIRST).await;
        pair.clock.advance(LEASE);
        run(&pair.b, &key, OTHER, "from b").await;
        let late = pair.a.complete(&key, stale, response("from a"), TTL).await;
        assert!(matches!(late, Err(StoreError::LeaseLost)), "{late:?}");
        a_replays_the_run_of_b(pair, &key).await;
    }

    /// `a` releases its claim (a 5xx); `b` runs the key with another
    /// payload; `a` must not answer 409 from a claim it let go of.
    async fn a_released_claim_leaves_nothing_in_memory(pair: &Pair<impl Store>) {
        let key = pair.key("released");
        let token = acquire(&pair.a, &key, FIRST).await;
        pair.a.release(&key, token).await.unwrap();
        run(&pair.b, &key, OTHER, "from b").await;
        a_replays_the_run_of_b(pair, &key).await;
    }

    /// `a` completed and cached a record; it replays it up to the last
    /// millisecond of its TTL and not one millisecond more, when `b` may
    /// run the key again with another payload.
    async fn a_cached_record_expires_with_the_durable_one(pair: &Pair<impl Store>) {
        let key = pair.key("expiring");
        let done = pair.clock.now_millis();
        run(&pair.a, &key, FIRST, "from a").await;
        pair.clock.set(done + TTL.as_millis() as u64 - 1);
        assert_eq!(
            replayed(&pair.a, &key).await.1,
            Bytes::from_static(b"from a")
        );
        pair.clock.set(done + TTL.as_millis() as u64);
        run(&pair.b, &key, OTHER, "from b").await;
        a_replays_the_run_of_b(pair, &key).await;
    }

    /// A record `a` learned from the durable store (a replay of `b`'s
    /// run) expires from `a`'s memory when it expires there.
    async fn a_remembered_record_expires_with_the_durable_one(pair: &Pair<impl Store>) {
        let key = pair.key("remembered");
        let done = pair.clock.now_millis();
        run(&pair.b, &key, FIRST, "from b").await;
        assert_eq!(
            replayed(&pair.a, &key).await.1,
            Bytes::from_static(b"from b")
        );
        pair.clock.set(done + TTL.as_millis() as u64);
        let again = pair.a.claim(&key, FIRST, LEASE).await;
        assert!(matches!(again, Ok(Claim::Acquired(_))), "{again:?}");
    }

    /// While `b` runs the key, `a` sees it in flight (409), and once `b`
    /// completes, `a` replays `b`'s record: nothing of the in-flight
    /// answer stays in `a`'s memory.
    async fn an_in_flight_claim_is_not_cached(pair: &Pair<impl Store>) {
        let key = pair.key("in-flight");
        let token = acquire(&pair.b, &key, OTHER).await;
        let seen = pair.a.claim(&key, FIRST, LEASE).await;
        assert!(matches!(seen, Ok(Claim::InFlight { .. })), "{seen:?}");
        pair.b
            .complete(&key, token, response("from b"), TTL)
            .await
            .unwrap();
        a_replays_the_run_of_b(pair, &key).await;
    }

    async fn every_scenario(pair: &Pair<impl Store>) {
        a_lease_taken_over_replays_the_new_record(pair).await;
        a_released_claim_leaves_nothing_in_memory(pair).await;
        an_in_flight_claim_is_not_cached(pair).await;
        a_remembered_record_expires_with_the_durable_one(pair).await;
        a_cached_record_expires_with_the_durable_one(pair).await;
    }

    /// Two instances whose memory tiers are built by `tier`.
    fn pair<D: Store>(
        [a, b]: [D; 2],
        clock: ManualClock,
        tier: impl Fn(D) -> Tiered<D>,
    ) -> Pair<D> {
        Pair {
            a: tier(a),
            b: tier(b),
            clock,
            scope: ScopeDigest::from_bytes(rand::random()),
        }
    }

    /// Two instances whose memory tiers expire records by `clock`.
    fn pair_on<D: Store>(clock: &ManualClock, durables: [D; 2]) -> Pair<D> {
        pair(durables, clock.clone(), |durable| {
            Tiered::builder(durable).clock(clock.clone()).build()
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_instances_answer_from_memory_only_what_postgres_holds() {
        let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
            return;
        };
        let clock = ManualClock::starting_now();
        let durables = postgres_durables(&url, &unique_name("idem_test"), &clock).await;
        let pair = pair_on(&clock, durables);
        every_scenario(&pair).await;
        drop_table(pair.a.durable()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_instances_answer_from_memory_only_what_redis_holds() {
        let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
            return;
        };
        let clock = ManualClock::starting_now();
        let durables = redis_durables(&url, &clock).await;
        every_scenario(&pair_on(&clock, durables)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_instances_answer_from_memory_only_what_the_file_holds() {
        let path = std::env::temp_dir().join(unique_name("idempotent-test") + ".db");
        let clock = ManualClock::starting_now();
        let mut durables = Vec::new();
        for _ in 0..2 {
            let opened = SqliteStore::open(&path).await.unwrap();
            opened.migrate().await.unwrap();
            let store = SqliteStore::builder(opened.pool().clone())
                .clock(clock.clone())
                .build()
                .unwrap();
            durables.push(store);
        }
        let durables: [SqliteStore; 2] = durables.try_into().unwrap();
        every_scenario(&pair_on(&clock, durables)).await;
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            let _ = std::fs::remove_file(file);
        }
    }

    /// Built with no clock of its own, each memory tier must expire
    /// records by the durable store's clock: by the system clock, `a`
    /// would replay its record for another hour after `b` ran the key
    /// again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_tiers_built_without_a_clock_expire_by_the_durable_clock() {
        let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
            return;
        };
        let clock = ManualClock::starting_now();
        let durables = postgres_durables(&url, &unique_name("idem_test"), &clock).await;
        let pair = pair(durables, clock.clone(), Tiered::new);
        a_cached_record_expires_with_the_durable_one(&pair).await;
        drop_table(pair.a.durable()).await;
    }

    /// How far `b`'s clock runs ahead of `a`'s in the clock tests.
    const AHEAD: Duration = Duration::from_secs(5);

    /// `b`'s clock runs [`AHEAD`] of `a`'s, and each memory tier expires
    /// records by its own durable client's clock. Once `b` takes a
    /// record's key over by its clock, with another payload, `a` may
    /// replay the record it cached to that record's own payload until its
    /// own clock reaches the deadline, and no longer: the bound the
    /// `Tiered` docs give. Another payload is asked of PostgreSQL
    /// meanwhile, and gets `b`'s run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clock_ahead_elsewhere_makes_a_cached_replay_stale_by_at_most_the_difference() {
        let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
            return;
        };
        let clock = ManualClock::starting_now();
        let ahead = ManualClock::new(clock.now_millis() + AHEAD.as_millis() as u64);
        let table = unique_name("idem_test");
        let [a, _] = postgres_durables(&url, &table, &clock).await;
        let [b, _] = postgres_durables(&url, &table, &ahead).await;
        let pair = pair([a, b], clock.clone(), Tiered::new);
        let (stale, asked) = (pair.key("stale"), pair.key("asked"));
        for key in [&stale, &asked] {
            run(&pair.a, key, FIRST, "from a").await;
        }
        for moved in [&clock, &ahead] {
            moved.advance(TTL - AHEAD);
        }
        for key in [&stale, &asked] {
            run(&pair.b, key, OTHER, "from b").await;
        }

        clock.advance(AHEAD - Duration::from_millis(1));
        assert_eq!(
            replayed(&pair.a, &stale).await,
            (FIRST, Bytes::from_static(b"from a")),
            "within the clocks' difference, `a` replays what it cached"
        );
        let other = pair.a.claim(&asked, OTHER, LEASE).await;
        assert!(
            matches!(&other, Ok(Claim::Completed(record)) if record.fingerprint == OTHER),
            "another payload is asked of PostgreSQL: {other:?}"
        );
        clock.advance(Duration::from_millis(1));
        a_replays_the_run_of_b(&pair, &stale).await;
        drop_table(pair.a.durable()).await;
    }

    /// The reaper deletes an expired record `a` had cached; `a` must not
    /// answer from memory for a row that is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_the_reaper_purged_is_not_replayed_from_memory() {
        let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
            return;
        };
        let clock = ManualClock::starting_now();
        let durables = postgres_durables(&url, &unique_name("idem_test"), &clock).await;
        let pair = pair_on(&clock, durables);
        let key = pair.key("purged");
        run(&pair.a, &key, FIRST, "from a").await;
        clock.advance(TTL);
        assert_eq!(pair.b.durable().purge_expired().await.unwrap(), 1);
        let again = pair.a.claim(&key, FIRST, LEASE).await;
        assert!(matches!(again, Ok(Claim::Acquired(_))), "{again:?}");
        drop_table(pair.a.durable()).await;
    }

    /// An operator deletes records from Redis so that their clients may
    /// send the requests again, corrected. `a`, which had cached them,
    /// answered the new payload 422 from memory, while `b` ran it: now `a`
    /// asks Redis of a payload its cached record does not match, so it
    /// runs the new payload itself, or replays `b`'s run of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_payload_after_a_record_deleted_from_redis_runs_on_every_instance() {
        let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
            return;
        };
        let clock = ManualClock::starting_now();
        let pair = pair_on(&clock, redis_durables(&url, &clock).await);
        let (deleted, replaced) = (pair.key("deleted"), pair.key("replaced"));
        let mut connection = redis_connection(&url).await;
        for key in [&deleted, &replaced] {
            run(&pair.a, key, FIRST, "from a").await;
            delete(&mut connection, &pair.a.durable().redis_key(key)).await;
        }

        let rerun = pair.a.claim(&deleted, OTHER, LEASE).await;
        assert!(matches!(rerun, Ok(Claim::Acquired(_))), "{rerun:?}");
        run(&pair.b, &replaced, OTHER, "from b").await;
        let replay = pair.a.claim(&replaced, OTHER, LEASE).await;
        assert!(
            matches!(&replay, Ok(Claim::Completed(record)) if record.fingerprint == OTHER),
            "{replay:?}"
        );
    }

    /// A memory tier too small for the records `a` completes evicts all
    /// but a few; a replay of an evicted one is then answered by Redis,
    /// with the record Redis holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_evicted_from_a_full_memory_tier_are_replayed_from_redis() {
        const BODIES: [&str; 8] = ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7"];
        let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
            return;
        };
        let clock = ManualClock::starting_now();
        let durables = redis_durables(&url, &clock).await;
        let tier = |durable| {
            Tiered::builder(durable)
                .clock(clock.clone())
                .max_bytes(1)
                .build()
        };
        let pair = pair(durables, clock.clone(), tier);
        for body in BODIES {
            run(&pair.a, &pair.key(body), FIRST, body).await;
            clock.advance(Duration::from_millis(1));
        }
        assert!(pair.a.cached_len() < 8, "some records are evicted");
        for body in BODIES {
            let (fingerprint, replayed) = replayed(&pair.a, &pair.key(body)).await;
            assert_eq!(
                (fingerprint, replayed),
                (FIRST, Bytes::from_static(body.as_bytes()))
            );
        }
    }
}
