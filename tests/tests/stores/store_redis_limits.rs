//! `RedisStore` at the edges of what a team running several instances on
//! one Redis meets: a Redis at its `maxmemory`, instances whose clocks
//! disagree, key prefixes of unusual bytes and length, a script cache
//! flushed while requests run, and a burst of claims from six instances.
//! Each test uses a key prefix of its own, or a `redis-server` of its own
//! when it changes the server's settings.

use crate::store_support;

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;
use idempotent_core::Endpoint;
use idempotent_core::clock::{Clock, ManualClock};
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, LeaseToken, Record, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{RedisStore, Store, StoreError};
use store_support::{OwnRedis, acquire, backend_url, redis_connection, unique_name};

const URL: &str = "IDEMPOTENT_TEST_REDIS_URL";
const FINGERPRINT: Fingerprint = Fingerprint::from_bytes([7; 32]);
const LEASE: Duration = Endpoint::DEFAULT_LEASE;
const TTL: Duration = Duration::from_secs(3600);

fn key(name: &str) -> RecordKey {
    RecordKey::new(
        ScopeDigest::from_bytes(rand::random()),
        IdempotencyKey::parse(name.as_bytes()).unwrap(),
    )
}

fn paid() -> StoredResponse {
    StoredResponse::new(
        StatusCode::CREATED,
        Vec::new(),
        Some(Bytes::from_static(b"paid")),
    )
}

/// Whether `store` replays `key` with the response `paid()` stored.
async fn replays_paid(store: &impl Store, key: &RecordKey) -> bool {
    let claim = store.claim(key, FINGERPRINT, LEASE).await;
    matches!(claim, Ok(Claim::Completed(record)) if record.response == paid())
}

/// Fills the Redis behind `connection` a megabyte past a `maxmemory` of
/// 2 MB under `noeviction`, so that it stays full while the test runs
/// (filling it write by write leaves it hovering at the limit, full or
/// not as client buffers come and go). Whether it refuses a small write.
async fn fill_up(connection: &mut redis::aio::ConnectionManager) -> bool {
    for batch in 0..48 {
        let () = redis::cmd("SET")
            .arg(format!("filler:{batch}"))
            .arg(vec![b'x'; 64 * 1024])
            .query_async(connection)
            .await
            .expect("SET");
    }
    for (name, value) in [("maxmemory-policy", "noeviction"), ("maxmemory", "2mb")] {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(connection)
            .await
            .expect("CONFIG SET");
    }
    let probed: Result<(), _> = redis::cmd("SET")
        .arg("probe")
        .arg(1)
        .query_async(connection)
        .await;
    probed.is_err_and(|error| error.code() == Some("OOM"))
}

/// A Redis of the test's own past its `maxmemory` under `noeviction`,
/// the policy the store asks for, and a store on it that claimed `names`
/// before it filled up.
async fn full_redis<const N: usize>(
    names: [&str; N],
) -> (OwnRedis, RedisStore, [(RecordKey, LeaseToken); N]) {
    let redis = OwnRedis::start(OwnRedis::free_port()).await;
    let store = RedisStore::connect(&redis.url()).await.expect("connect");
    let mut held = Vec::new();
    for name in names {
        let key = key(name);
        let token = acquire(&store, &key, FINGERPRINT, LEASE).await;
        held.push((key, token));
    }
    let full = fill_up(&mut redis_connection(&redis.url()).await).await;
    assert!(full, "the server never filled up");
    (redis, store, held.try_into().unwrap())
}

/// Whether `claimed` is the refusal of a full Redis, an outage (503).
fn refused_as_full(claimed: &Result<Claim, StoreError>) -> bool {
    matches!(claimed, Err(StoreError::Backend(error)) if error.to_string().contains("OOM"))
}

/// A full Redis under `noeviction` refuses a plain script's first write.
/// The requests already running when it filled up could then neither
/// renew their leases nor store their responses: their handlers had run,
/// the engine gave up after a lease of attempts, and a retry once records
/// expired and memory freed ran each of them a second time. They must
/// still be stored, while new claims are refused (503, nothing runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_still_stores_the_responses_of_running_requests() {
    if backend_url(URL).is_none() {
        return;
    }
    let (mut redis, store, [(running, token), (failing, failed)]) =
        full_redis(["running", "failing"]).await;

    let claimed = store.claim(&key("fresh"), FINGERPRINT, LEASE).await;
    let renewed = store.renew(&running, token, LEASE).await;
    let completed = store.complete(&running, token, paid(), TTL).await;
    let released = store.release(&failing, failed).await;
    let stored = store.get(&running).await;
    redis.stop().await;

    assert!(refused_as_full(&claimed), "a new claim: {claimed:?}");
    assert!(renewed.is_ok(), "renewal refused: {renewed:?}");
    assert!(completed.is_ok(), "completion refused: {completed:?}");
    assert!(released.is_ok(), "release refused: {released:?}");
    assert!(
        matches!(&stored, Ok(Some(Record::Completed(record))) if record.response == paid()),
        "{stored:?}"
    );
}

/// Redis refuses a `SET` for want of memory before it looks at the key,
/// so on a full Redis the claim's `SET NX GET` was refused for a key
/// already stored or running as for a new one: a retry got 503 instead
/// of its replay (or 409). Only a key with no live record is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_still_answers_retries_of_stored_and_running_requests() {
    if backend_url(URL).is_none() {
        return;
    }
    let (mut redis, store, [(done, token), (running, _)]) = full_redis(["done", "running"]).await;
    store.complete(&done, token, paid(), TTL).await.unwrap();

    let replayed = replays_paid(&store, &done).await;
    let in_flight = store.claim(&running, FINGERPRINT, LEASE).await;
    let fresh = store.claim(&key("fresh"), FINGERPRINT, LEASE).await;
    redis.stop().await;

    assert!(replayed, "a stored request is not replayed");
    assert!(
        matches!(in_flight, Ok(Claim::InFlight { .. })),
        "{in_flight:?}"
    );
    assert!(refused_as_full(&fresh), "a new claim: {fresh:?}");
}

/// Makes the Redis behind `connection`, whose directory is `dir`, unable
/// to save its snapshot: `dir` is removed and a save started, which
/// fails. Under `stop-writes-on-bgsave-error` (the default) Redis then
/// refuses writes (`MISCONF`) until a save succeeds. Whether it refuses
/// a small write.
async fn fail_to_save(
    connection: &mut redis::aio::ConnectionManager,
    dir: &std::path::Path,
) -> bool {
    std::fs::remove_dir(dir).expect("remove the server's directory");
    let () = redis::cmd("BGSAVE")
        .query_async(connection)
        .await
        .expect("BGSAVE");
    // The save runs in a child process, which tells nothing when it
    // fails: its outcome shows in the next write's answer.
    for _ in 0..250 {
        let probed: Result<(), _> = redis::cmd("SET")
            .arg("probe")
            .arg(1)
            .query_async(connection)
            .await;
        if probed.is_err_and(|error| error.code() == Some("MISCONF")) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Redis refuses every write, as a full one does, when it cannot save its
/// snapshot, and before it looks at the key: a retry of a request already
/// stored got 503 rather than its replay, and one still running 503
/// rather than 409, until a save succeeded. Reads go on, and answer
/// those; only a key with no live record is refused (503, nothing runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_unable_to_save_still_answers_retries_of_stored_and_running_requests() {
    if backend_url(URL).is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(unique_name("idempotent-redis"));
    std::fs::create_dir(&dir).expect("a directory for the server");
    // Redis stops writes after a failed save only when it has save points.
    let dir_name = dir.to_str().expect("a UTF-8 path");
    let settings = ["--dir", dir_name, "--save", "3600 1"];
    let mut redis = OwnRedis::start_with(OwnRedis::free_port(), &settings).await;
    let store = RedisStore::connect(&redis.url()).await.expect("connect");
    let (done, running) = (key("done"), key("running"));
    let token = acquire(&store, &done, FINGERPRINT, LEASE).await;
    acquire(&store, &running, FINGERPRINT, LEASE).await;
    store.complete(&done, token, paid(), TTL).await.unwrap();
    let refusing = fail_to_save(&mut redis_connection(&redis.url()).await, &dir).await;

    let replayed = replays_paid(&store, &done).await;
    let in_flight = store.claim(&running, FINGERPRINT, LEASE).await;
    let fresh = store.claim(&key("fresh"), FINGERPRINT, LEASE).await;
    redis.stop().await;

    assert!(refusing, "the server never refused writes");
    assert!(replayed, "a stored request is not replayed");
    assert!(
        matches!(in_flight, Ok(Claim::InFlight { .. })),
        "{in_flight:?}"
    );
    let refused =
        matches!(&fresh, Err(StoreError::Backend(error)) if error.to_string().contains("MISCONF"));
    assert!(refused, "a new claim: {fresh:?}");
}

/// Two instances of one service on one Redis: `a`'s clock on `start`,
/// `b`'s on `start + skew_ms` (behind if negative).
async fn two_hosts(url: &str, skew_ms: i64) -> [(ManualClock, RedisStore); 2] {
    let prefix = unique_name("idem_test") + ":";
    let a_start = ManualClock::starting_now().now_millis();
    let b_start = a_start.checked_add_signed(skew_ms).unwrap();
    let mut hosts = Vec::new();
    for start in [a_start, b_start] {
        let clock = ManualClock::new(start);
        let store = RedisStore::builder(redis_connection(url).await)
            .prefix(prefix.clone())
            .clock(clock.clone())
            .build();
        hosts.push((clock, store));
    }
    hosts.try_into().unwrap()
}

/// `a` claims a key and renews it on the engine's schedule (a third of a
/// lease after each renewal, here as late as a renewal that took the whole
/// store timeout), while `b`, whose clock is `skew_ms` off `a`'s, retries it
/// after each renewal. Whether `b` ever took the running claim over.
async fn taken_over_while_renewed(url: &str, skew_ms: i64) -> bool {
    let [(a_clock, a), (b_clock, b)] = two_hosts(url, skew_ms).await;
    let running = key("running");
    let token = acquire(&a, &running, FINGERPRINT, LEASE).await;
    let mut taken = false;
    for _ in 0..6 {
        let late = LEASE / 3 + Duration::from_secs(5);
        a_clock.advance(late);
        b_clock.advance(late);
        taken |= matches!(
            b.claim(&running, FINGERPRINT, LEASE).await,
            Ok(Claim::Acquired(_))
        );
        if a.renew(&running, token, LEASE).await.is_err() {
            return true;
        }
    }
    taken
}

/// Leases and expiry run on each instance's clock, not on Redis's: hosts
/// whose clocks are seconds apart (NTP not yet synced, a VM restored from
/// a snapshot) keep each other's renewed claims, with or without the
/// skew's sign, up to the margin a renewal leaves: two thirds of a lease,
/// less the renewal's lateness. Farther apart, the host ahead sees a
/// running claim lapsed and runs the request again: the bound the store's
/// documentation gives.
#[tokio::test]
async fn hosts_seconds_apart_keep_each_others_running_claims() {
    let Some(url) = backend_url(URL) else { return };
    for skew_s in [-10, -3, 3, 10, 30] {
        assert!(
            !taken_over_while_renewed(&url, skew_s * 1000).await,
            "taken over with clocks {skew_s} s apart"
        );
    }
    assert!(
        taken_over_while_renewed(&url, 40_000).await,
        "clocks two thirds of a lease apart"
    );
}

/// A completed record's deadline is set by the clock of the instance that
/// stored it, and read by each instance's own: one whose clock is five
/// seconds ahead runs the key again five seconds before the TTL is up.
#[tokio::test]
async fn a_record_expires_by_each_hosts_own_clock() {
    let Some(url) = backend_url(URL) else { return };
    let [(a_clock, a), (b_clock, b)] = two_hosts(&url, 5_000).await;
    let done = key("done");
    let token = acquire(&a, &done, FINGERPRINT, LEASE).await;
    a.complete(&done, token, paid(), TTL).await.unwrap();

    let nearly = TTL - Duration::from_secs(6);
    a_clock.advance(nearly);
    b_clock.advance(nearly);
    assert!(replays_paid(&b, &done).await, "ahead, before the TTL");
    a_clock.advance(Duration::from_secs(2));
    b_clock.advance(Duration::from_secs(2));
    assert!(replays_paid(&a, &done).await, "on time, before the TTL");
    let again = b.claim(&done, FINGERPRINT, LEASE).await;
    assert!(
        matches!(again, Ok(Claim::Acquired(_))),
        "five seconds ahead, a second after the stored TTL: {again:?}"
    );
}

/// The key prefix is the application's: any bytes (spaces, a newline,
/// non-ASCII, the braces of a cluster hash tag) and any length, tens of
/// kilobytes included, hold records through every operation, scripts
/// included. Idempotency keys reach Redis only as a digest.
#[tokio::test]
async fn prefixes_of_any_bytes_and_length_hold_their_records() {
    let Some(url) = backend_url(URL) else { return };
    let long = "p".repeat(64 * 1024);
    for odd in ["pay ments\n:", "支払い:", "{tag}:", "\"';--", long.as_str()] {
        let prefix = format!("{}:{odd}", unique_name("idem_test"));
        let store = RedisStore::builder(redis_connection(&url).await)
            .prefix(prefix.clone())
            .build();
        let (done, failed) = (key("done"), key("failed"));
        let token = acquire(&store, &done, FINGERPRINT, LEASE).await;
        store.renew(&done, token, LEASE).await.unwrap();
        store.complete(&done, token, paid(), TTL).await.unwrap();
        assert!(replays_paid(&store, &done).await, "prefix {prefix:?}");
        assert!(store.redis_key(&done).starts_with(&prefix));
        let token = acquire(&store, &failed, FINGERPRINT, LEASE).await;
        store.release(&failed, token).await.unwrap();
        assert_eq!(store.get(&failed).await.unwrap(), None, "{prefix:?}");
    }
}

/// `SCRIPT FLUSH` empties Redis's script cache whenever an operator or
/// another application sends it. A script cannot be flushed while it
/// runs (Redis runs one command at a time), but it could be between the
/// `SCRIPT LOAD` the `redis` crate sends after a `NOSCRIPT` and its
/// second `EVALSHA`, which then failed with `NOSCRIPT` (503, or a
/// completion tried again): with flushes coming as fast as Redis answers
/// them, 2291 operations of three seconds' failed. Every renewal,
/// completion and release must succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flushes_between_commands_fail_no_operation() {
    if backend_url(URL).is_none() {
        return;
    }
    let mut redis = OwnRedis::start(OwnRedis::free_port()).await;
    let store = RedisStore::connect(&redis.url()).await.expect("connect");
    let mut flusher = redis_connection(&redis.url()).await;
    let until = Instant::now() + Duration::from_secs(3);
    let flushing = tokio::spawn(async move {
        while Instant::now() < until {
            let _: Result<(), _> = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut flusher)
                .await;
        }
    });
    let mut failures = Vec::new();
    while Instant::now() < until {
        let (done, failed) = (key("done"), key("failed"));
        let token = acquire(&store, &done, FINGERPRINT, LEASE).await;
        let other = acquire(&store, &failed, FINGERPRINT, LEASE).await;
        let renewed = store.renew(&done, token, LEASE).await;
        let completed = store.complete(&done, token, paid(), TTL).await;
        let released = store.release(&failed, other).await;
        failures.extend(
            [renewed, completed, released]
                .into_iter()
                .filter_map(Result::err),
        );
    }
    flushing.await.unwrap();
    redis.stop().await;
    let shown: Vec<String> = failures.iter().take(3).map(ToString::to_string).collect();
    assert!(failures.is_empty(), "{} failed: {shown:?}", failures.len());
}

/// Six instances, each on one multiplexed connection, as `connect` gives
/// (there is no pool to run dry: concurrent calls are pipelined on it),
/// send a burst of claims of the same keys at once: every call is
/// answered, and each key is acquired by exactly one of them, whose
/// completion every instance replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_instances_bursting_on_one_connection_each_run_each_key_once() {
    let Some(url) = backend_url(URL) else { return };
    let prefix = unique_name("idem_test") + ":";
    let mut instances = Vec::new();
    for _ in 0..6 {
        let connection = redis_connection(&url).await;
        instances.push(
            RedisStore::builder(connection)
                .prefix(prefix.clone())
                .build(),
        );
    }
    let scope = ScopeDigest::from_bytes(rand::random());
    let keys: Vec<RecordKey> = (0..50)
        .map(|i| {
            RecordKey::new(
                scope,
                IdempotencyKey::parse(format!("k{i}").as_bytes()).unwrap(),
            )
        })
        .collect();
    let mut calls = tokio::task::JoinSet::new();
    for store in &instances {
        for key in &keys {
            for _ in 0..3 {
                let (store, key) = (store.clone(), key.clone());
                calls.spawn(async move {
                    match store.claim(&key, FINGERPRINT, LEASE).await? {
                        Claim::Acquired(token) => {
                            store.complete(&key, token, paid(), TTL).await?;
                            Ok(true)
                        }
                        _ => Ok::<_, StoreError>(false),
                    }
                });
            }
        }
    }
    let mut acquired = 0;
    while let Some(call) = calls.join_next().await {
        acquired += usize::from(call.unwrap().expect("every call is answered"));
    }
    assert_eq!(acquired, keys.len(), "one run per key");
    for store in &instances {
        for key in &keys {
            assert!(replays_paid(store, key).await);
        }
    }
}

/// A connection that, for the first command it carries, does what the
/// Redis Cluster client does after a reply lost on a dropped connection:
/// sends it again, here once the server has filled up in between.
#[derive(Clone)]
struct FullBeforeTheResend {
    connection: redis::aio::ConnectionManager,
    filler: redis::aio::ConnectionManager,
    resent: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl redis::aio::ConnectionLike for FullBeforeTheResend {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let first = self.connection.req_packed_command(cmd).await;
            if self.resent.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return first;
            }
            assert!(
                fill_up(&mut self.filler).await,
                "the server never filled up"
            );
            self.connection.req_packed_command(cmd).await
        })
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

/// A claim whose `SET` Redis applied, sent again once Redis is full, is
/// refused for want of memory and finds its own lease: the key is this
/// claim's, which runs and stores its response, not another request in
/// flight answered 409 while nobody holds the key until the lease lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_resent_to_a_full_redis_holds_the_key() {
    if backend_url(URL).is_none() {
        return;
    }
    let mut redis = OwnRedis::start(OwnRedis::free_port()).await;
    let resending = FullBeforeTheResend {
        connection: redis_connection(&redis.url()).await,
        filler: redis_connection(&redis.url()).await,
        resent: std::sync::Arc::default(),
    };
    let store = RedisStore::builder(resending).build();
    let key = key("resent");
    let claimed = store.claim(&key, FINGERPRINT, LEASE).await;
    let completed = match &claimed {
        Ok(Claim::Acquired(token)) => Some(store.complete(&key, *token, paid(), TTL).await),
        _ => None,
    };
    let replayed = replays_paid(&store, &key).await;
    redis.stop().await;

    assert!(matches!(claimed, Ok(Claim::Acquired(_))), "{claimed:?}");
    assert!(matches!(completed, Some(Ok(()))), "{completed:?}");
    assert!(replayed, "the stored response is not replayed");
}

/// The longest lease and TTL an endpoint takes, a century (`"36500d"`):
/// Redis keeps the key a minute past its deadline, as it does for any
/// other, so that a host whose clock is behind Redis's does not see the
/// record vanish before its deadline. The expiry was capped at a
/// century, grace included, so at the longest TTL the grace was gone:
/// `PTTL` equal to the TTL itself.
#[tokio::test]
async fn a_century_long_lease_and_ttl_keep_the_minute_of_grace() {
    let Some(url) = backend_url(URL) else { return };
    let century = Duration::from_secs(100 * 365 * 24 * 60 * 60);
    let century_ms = i64::try_from(century.as_millis()).unwrap();
    let store = RedisStore::builder(redis_connection(&url).await)
        .prefix(unique_name("idem_test") + ":")
        .build();
    let mut connection = redis_connection(&url).await;
    let century_key = key("century");
    let redis_key = store.redis_key(&century_key);
    let pttl = |mut connection: redis::aio::ConnectionManager| {
        let redis_key = redis_key.clone();
        async move {
            let pttl: i64 = redis::cmd("PTTL")
                .arg(&redis_key)
                .query_async(&mut connection)
                .await
                .unwrap();
            pttl
        }
    };
    let token = acquire(&store, &century_key, FINGERPRINT, century).await;
    let claimed = pttl(connection.clone()).await;
    store.renew(&century_key, token, century).await.unwrap();
    let renewed = pttl(connection.clone()).await;
    store
        .complete(&century_key, token, paid(), century)
        .await
        .unwrap();
    let completed = pttl(connection.clone()).await;
    let () = redis::cmd("DEL")
        .arg(store.redis_key(&century_key))
        .query_async(&mut connection)
        .await
        .unwrap();
    // A minute past the deadline, less the few milliseconds the test took.
    for (what, pttl) in [
        ("claimed", claimed),
        ("renewed", renewed),
        ("completed", completed),
    ] {
        assert!(
            pttl > century_ms + 50_000 && pttl <= century_ms + 60_000,
            "{what}: PTTL {pttl} ms, the deadline {century_ms} ms away"
        );
    }
}
