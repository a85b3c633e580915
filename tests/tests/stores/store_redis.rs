//! `RedisStore` against a real server (`IDEMPOTENT_TEST_REDIS_URL`), and
//! against a Redis this test starts and stops itself. Each test uses its
//! own key prefix, so tests run in parallel and reruns start clean.

use crate::store_support;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use idempotent_core::Endpoint;
use idempotent_core::clock::ManualClock;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Record, RecordKey};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{RedisStore, Store, StoreError, Tiered};
use idempotent_core::testing::contract;
use store_support::{
    Ledger, OwnRedis, ReplyDropper, SentTwice, assert_kept, backend_url, complete_with_a_body_of,
    duplicates_across_instances, pay, pay_until_available, payments_app, redis_connection,
    unique_name,
};

const URL: &str = "IDEMPOTENT_TEST_REDIS_URL";
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// A store on the test Redis under a key prefix of its own.
async fn store_of_its_own(url: &str) -> RedisStore {
    RedisStore::builder(redis_connection(url).await)
        .prefix(unique_name("idem_test") + ":")
        .build()
}

/// A `rediss://` URL, as a managed Redis with TLS gives, on a build whose
/// `redis` crate has no TLS: the error said to give a URL such as
/// `redis://...` "(`rediss://` for TLS)", the very URL refused. It names
/// the feature to enable instead. Needs no server: the URL is refused
/// before anything connects.
#[tokio::test]
async fn a_tls_url_without_tls_in_the_build_names_the_feature_to_enable() {
    for url in ["rediss://127.0.0.1:6379", "valkeys://cache.example:6380/0"] {
        let error = RedisStore::connect(url).await.expect_err(url);
        assert!(matches!(error, StoreError::Misconfigured(_)), "{error:?}");
        let told = error.to_string();
        assert!(told.contains("tokio-native-tls-comp"), "{told}");
        assert!(!told.contains("`rediss://` for TLS"), "{told}");
    }
}

/// A server that does not answer is named in the error, as `host:port`,
/// without the URL's credentials. An IPv6 host is bracketed: it read
/// `::1:6379`, an address no one can tell the port of. Needs no server:
/// nothing listens at the port.
#[tokio::test]
async fn a_failed_connection_names_the_server_without_its_password() {
    let port = OwnRedis::free_port();
    for (url, server) in [
        (
            format!("redis://app:s3cret@127.0.0.1:{port}"),
            format!("127.0.0.1:{port}"),
        ),
        (
            format!("redis://:s3cret@[::1]:{port}/0"),
            format!("[::1]:{port}"),
        ),
    ] {
        let error = RedisStore::connect(&url).await.expect_err(&url);
        let told = error.to_string();
        assert!(told.contains(&format!("at {server}:")), "{told}");
        assert!(!format!("{told} {error:?}").contains("s3cret"), "{error:?}");
    }
}

/// The URL of a Redis Sentinel (port 26379 next to the 6379 of the Redis
/// it watches): it answers `PING`, so `connect` succeeded, and then every
/// claim failed with "unknown command" and 503. It is refused at connect,
/// saying to give the primary's address. The Sentinel is the test's own.
#[tokio::test]
async fn a_sentinel_is_refused_at_connect_with_what_to_give_instead() {
    if backend_url(URL).is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(unique_name("idempotent-sentinel"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = OwnRedis::free_port();
    let config = dir.join("sentinel.conf");
    std::fs::write(&config, format!("port {port}\nbind 127.0.0.1\n")).unwrap();
    let mut sentinel = tokio::process::Command::new("redis-server")
        .arg(&config)
        .arg("--sentinel")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start redis-server --sentinel");
    let url = format!("redis://127.0.0.1:{port}");
    let mut connected = None;
    for _ in 0..100 {
        match RedisStore::connect(&url).await {
            Err(error) if error.to_string().contains("runs and listens") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answered => {
                connected = Some(answered);
                break;
            }
        }
    }
    sentinel.kill().await.expect("stop the sentinel");
    let _ = std::fs::remove_dir_all(&dir);
    let error = connected
        .expect("the sentinel started")
        .expect_err("a sentinel keeps no records");
    assert!(matches!(error, StoreError::Misconfigured(_)), "{error:?}");
    let told = error.to_string();
    assert!(
        told.contains("Sentinel") && told.contains("address of the primary"),
        "{told}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_passes_the_contract() {
    let Some(url) = backend_url(URL) else { return };
    let connection = redis_connection(&url).await;
    let prefix = unique_name("idem_test") + ":";
    contract::run_all(|clock| {
        let store = RedisStore::builder(connection.clone())
            .prefix(prefix.clone())
            .clock(clock)
            .build();
        async move { store }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiered_redis_store_passes_the_contract() {
    let Some(url) = backend_url(URL) else { return };
    let connection = redis_connection(&url).await;
    let prefix = unique_name("idem_test") + ":";
    contract::run_all(|clock| {
        let durable = RedisStore::builder(connection.clone())
            .prefix(prefix.clone())
            .clock(clock.clone())
            .build();
        async move { Tiered::builder(durable).clock(clock).build() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_redis() {
    let Some(url) = backend_url(URL) else { return };
    let prefix = unique_name("idem_test") + ":";
    let ledger = Ledger::default();
    let mut apps = Vec::new();
    for _ in 0..2 {
        // Each instance connects on its own, as another process would.
        let store = RedisStore::builder(redis_connection(&url).await)
            .prefix(prefix.clone())
            .build();
        apps.push(payments_app(store, &ledger, STORE_TIMEOUT));
    }
    duplicates_across_instances(&apps, &ledger, 100).await;
}

#[tokio::test]
async fn completed_records_carry_a_redis_expiry_past_their_ttl() {
    let Some(url) = backend_url(URL) else { return };
    let store = store_of_its_own(&url).await;
    let ledger = Ledger::default();
    let app = payments_app(store.clone(), &ledger, STORE_TIMEOUT);
    assert_eq!(pay(&app, "expiring", 1).await.status, StatusCode::CREATED);
    let key = RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(b"expiring").unwrap(),
    );
    let redis_key = store.redis_key(&key);
    assert!(redis_key.starts_with(store.prefix()));
    let mut connection = redis_connection(&url).await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&redis_key)
        .query_async(&mut connection)
        .await
        .unwrap();
    let ttl = i64::try_from(Endpoint::DEFAULT_TTL.as_millis()).unwrap();
    // Redis keeps the key a minute past the record's own deadline.
    assert!(pttl > ttl && pttl <= ttl + 60_000, "PTTL {pttl} ms");
}

#[tokio::test]
async fn an_expired_value_this_build_cannot_decode_is_taken_over() {
    let Some(url) = backend_url(URL) else { return };
    // A record of a codec version this build does not know, a second past
    // its deadline: what another release leaves for the clock-skew grace.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let deadline = u64::try_from(now.as_millis()).unwrap() - 1_000;
    let mut later_version = vec![0x7f];
    later_version.extend([0; 32]);
    later_version.extend(deadline.to_be_bytes());
    later_version.extend(b"a later version's response");
    // And values too short to hold a deadline at all (corrupt).
    for (name, value) in [
        ("later-version", later_version),
        ("empty", Vec::new()),
        ("one-byte", vec![1]),
        ("forty-bytes", vec![2; 40]),
    ] {
        let store = store_of_its_own(&url).await;
        let key = RecordKey::new(
            ScopeDigest::global(),
            IdempotencyKey::parse(name.as_bytes()).unwrap(),
        );
        let mut connection = redis_connection(&url).await;
        let () = redis::cmd("SET")
            .arg(store.redis_key(&key))
            .arg(value)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut connection)
            .await
            .unwrap();
        let read = Store::get(&store, &key).await;
        assert!(matches!(read, Ok(None)), "{name}: get read {read:?}");
        let app = payments_app(store, &Ledger::default(), STORE_TIMEOUT);
        assert_eq!(
            pay(&app, name, 1).await.status,
            StatusCode::CREATED,
            "{name}"
        );
    }
}

/// Two stores on one prefix and one manual clock: one sends each command
/// once, the other twice.
async fn sent_once_and_twice() -> Option<(ManualClock, RedisStore, RedisStore<SentTwice>)> {
    let url = backend_url(URL)?;
    let prefix = unique_name("idem_test") + ":";
    let clock = ManualClock::starting_now();
    let once = RedisStore::builder(redis_connection(&url).await)
        .prefix(prefix.clone())
        .clock(clock.clone())
        .build();
    let twice = RedisStore::builder(SentTwice(redis_connection(&url).await))
        .prefix(prefix)
        .clock(clock.clone())
        .build();
    Some((clock, once, twice))
}

/// A claim whose command reaches Redis twice finds, the second time, the
/// lease its first attempt took under its own token: it holds the key.
/// Answered as another request in flight, the key would stay blocked, with
/// nothing running, until the lease lapsed.
#[tokio::test]
async fn a_claim_applied_twice_holds_the_key() {
    use idempotent_core::clock::Clock;
    use idempotent_core::fingerprint::Fingerprint;
    use idempotent_core::record::{Claim, Record};

    let Some((clock, once, twice)) = sent_once_and_twice().await else {
        return;
    };
    let lease = Duration::from_secs(10);
    let fingerprint = Fingerprint::from_bytes([5; 32]);
    let key = |name: &str| {
        RecordKey::new(
            ScopeDigest::from_bytes(rand::random()),
            IdempotencyKey::parse(name.as_bytes()).unwrap(),
        )
    };

    // A new key, claimed by `SET NX GET`.
    let new = key("new");
    let claim = twice.claim(&new, fingerprint, lease).await.unwrap();
    let Claim::Acquired(token) = claim else {
        panic!("a new key: {claim:?}");
    };
    let held = once.get(&new).await.unwrap();
    assert!(
        matches!(&held, Some(Record::InFlight(held)) if held.lease_token == token),
        "{held:?}"
    );
    once.release(&new, token).await.unwrap();

    // A lapsed lease, taken over by the claim script.
    let lapsed = key("lapsed");
    let first = once.claim(&lapsed, fingerprint, lease).await.unwrap();
    assert!(matches!(first, Claim::Acquired(_)), "{first:?}");
    clock.advance(lease);
    let claim = twice.claim(&lapsed, fingerprint, lease).await.unwrap();
    let Claim::Acquired(token) = claim else {
        panic!("a lapsed lease: {claim:?}");
    };
    let held = once.get(&lapsed).await.unwrap();
    assert!(
        matches!(&held, Some(Record::InFlight(held))
            if held.lease_token == token && held.lease_expires_at == clock.now_millis() + 10_000),
        "{held:?}"
    );
    once.release(&lapsed, token).await.unwrap();
}

/// A completion whose command reaches Redis twice stores its record
/// once: the second application finds the lease gone (the engine then
/// finds its own record stored) and leaves the record as the first
/// stored it, fingerprint included; a later completion cannot overwrite
/// it either.
#[tokio::test]
async fn a_completion_applied_twice_stores_the_record_once() {
    use idempotent_core::fingerprint::Fingerprint;
    use idempotent_core::record::{Claim, Record, StoredResponse};

    let Some((_, once, twice)) = sent_once_and_twice().await else {
        return;
    };
    let fingerprint = Fingerprint::from_bytes([6; 32]);
    let key = RecordKey::new(
        ScopeDigest::from_bytes(rand::random()),
        IdempotencyKey::parse(b"completed-twice").unwrap(),
    );
    let response = |body: &'static [u8]| {
        StoredResponse::new(StatusCode::CREATED, Vec::new(), Some(body.into()))
    };
    let ttl = Duration::from_secs(60);
    let Claim::Acquired(token) = once
        .claim(&key, fingerprint, Duration::from_secs(10))
        .await
        .unwrap()
    else {
        panic!("a new key is acquired");
    };
    let completed = twice.complete(&key, token, response(b"paid"), ttl).await;
    assert!(
        matches!(completed, Err(StoreError::LeaseLost)),
        "{completed:?}"
    );
    let stored = once.get(&key).await.unwrap();
    assert!(
        matches!(&stored, Some(Record::Completed(record))
            if record.fingerprint == fingerprint && record.response == response(b"paid")),
        "{stored:?}"
    );
    let other = once.complete(&key, token, response(b"other"), ttl).await;
    assert!(matches!(other, Err(StoreError::LeaseLost)), "{other:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_gives_503_and_the_service_recovers() {
    // Needs the Redis test environment (it starts its own server binary).
    if backend_url(URL).is_none() {
        return;
    }
    let port = OwnRedis::free_port();
    let mut redis = OwnRedis::start(port).await;
    let store = RedisStore::connect(&redis.url()).await.expect("connect");
    let ledger = Ledger::default();
    let app = payments_app(store, &ledger, Duration::from_millis(500));
    assert_eq!(pay(&app, "before", 1).await.status, StatusCode::CREATED);
    assert_eq!(ledger.executions(), 1);

    redis.stop().await;
    for attempt in 0..5 {
        let started = Instant::now();
        let reply = pay(&app, &format!("during-{attempt}"), 1).await;
        eprintln!(
            "outage: attempt {attempt} answered {} in {:?}",
            reply.status,
            started.elapsed()
        );
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "attempt {attempt}"
        );
        assert_eq!(reply.content_type(), Some("application/problem+json"));
        assert!(reply.headers.contains_key("retry-after"));
    }
    assert_eq!(
        ledger.executions(),
        1,
        "nothing executes while the store is down"
    );
    // Outlast the connection manager's own reconnect attempts: recovery
    // must not depend on the server coming back quickly.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let _redis = OwnRedis::start(port).await;
    let back = Instant::now();
    let reply = pay_until_available(&app, "after", 1)
        .await
        .expect("the store recovers by itself once Redis is back");
    eprintln!(
        "outage: recovered {:?} after the server returned",
        back.elapsed()
    );
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(ledger.executions(), 2);
    let replay = pay(&app, "after", 1).await;
    assert!(replay.replayed());
    assert_eq!(ledger.executions(), 2);
}

/// `max_body_bytes` goes up to 4 GiB less a byte ("the most a stored
/// record can hold"), but Redis refuses an argument over
/// `proto-max-bulk-len` (512 MiB by default): completing fails every time,
/// the engine gives up and the lease lapses, so a retry runs the handler
/// again.
#[tokio::test]
async fn a_body_over_redis_bulk_limit_is_still_completed() {
    let Some(url) = backend_url(URL) else { return };
    let store = store_of_its_own(&url).await;
    assert_kept(&complete_with_a_body_of(&store, 600 * 1024 * 1024).await);
}

/// Redis stalls (a slow script, a fork for a snapshot, `DEBUG SLEEP`)
/// for longer than the engine's store timeout: the claim is cut short and
/// the engine answers 503 without running anything. But the `SET NX` was
/// sent and runs once Redis answers again, so the key is held by a lease
/// nobody has: retries get 409 until it lapses, though nothing runs.
/// The stall runs on a server of the test's own, so that it holds up no
/// other test.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_cut_short_by_the_store_timeout_leaves_no_lease_behind() {
    use idempotent_core::fingerprint::Fingerprint;

    // Needs the Redis test environment (it starts its own server binary).
    if backend_url(URL).is_none() {
        return;
    }
    let redis = OwnRedis::start(OwnRedis::free_port()).await;
    let url = redis.url();
    let store = store_of_its_own(&url).await;
    let key = RecordKey::new(
        ScopeDigest::from_bytes(rand::random()),
        IdempotencyKey::parse(b"cut-short").unwrap(),
    );
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    let mut stalling = redis_connection(&url).await;
    let stall = tokio::spawn(async move {
        // A script that runs for 1.5 s blocks every other client.
        let script = "local t = redis.call('TIME') local stop = t[1] * 1000000 + t[2] + 1500000 \
                      repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= stop return 0";
        let stalled: Result<i64, _> = redis::cmd("EVAL")
            .arg(script)
            .arg(0)
            .query_async(&mut stalling)
            .await;
        let _ = stalled;
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cut = tokio::time::timeout(
        Duration::from_millis(500),
        store.claim(&key, fingerprint, Duration::from_secs(60)),
    )
    .await;
    // Cut by the engine's timeout or by the connection's own: no answer.
    assert!(
        !matches!(cut, Ok(Ok(_))),
        "the claim waits for Redis: {cut:?}"
    );
    stall.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The stall may have made the connection manager reconnect: a read
    // that meets that is read again.
    let mut left = store.get(&key).await;
    for _ in 0..20 {
        if left.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = store.get(&key).await;
    }
    let left = left.unwrap();
    assert_eq!(
        left, None,
        "a claim that answered nobody must not hold the key"
    );
}

/// The connection drops after Redis applied a claim and before its reply
/// came back: the request gets 503 and ran nothing, so the claim must not
/// stay behind, holding the key for its whole lease (retries 409).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_whose_reply_is_lost_with_its_connection_leaves_no_lease_behind() {
    use idempotent_core::fingerprint::Fingerprint;

    if backend_url(URL).is_none() {
        return;
    }
    let redis = OwnRedis::start(OwnRedis::free_port()).await;
    let relay = ReplyDropper::start(format!(
        "127.0.0.1:{}",
        redis.url().rsplit(':').next().unwrap()
    ))
    .await;
    let store = RedisStore::connect(&relay.url()).await.expect("connect");
    let direct = RedisStore::connect(&redis.url()).await.expect("connect");
    let key = RecordKey::new(
        ScopeDigest::from_bytes(rand::random()),
        IdempotencyKey::parse(b"reply-lost").unwrap(),
    );
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    relay
        .drop_next
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let claimed = store
        .claim(&key, fingerprint, Duration::from_secs(60))
        .await;
    assert!(claimed.is_err(), "the reply was lost: {claimed:?}");
    tokio::time::timeout(Duration::from_secs(10), store.settle())
        .await
        .expect("the release ends");
    let left = direct.get(&key).await.expect("read");
    assert_eq!(left, None, "a claim nobody heard of holds the key");
}

/// A renewal that answers "held" keeps the key in Redis for at least
/// another lease: the holder counts on it until its next renewal, a third
/// of a lease later. After the application's clock stepped back (NTP
/// correcting a clock that ran fast, a restored VM), every renewal computes
/// a deadline earlier than the one the record holds, and the script keeps
/// the record's: it must still push Redis's own expiry, which would
/// otherwise run out a minute past the last renewal that moved the
/// deadline. The key would then vanish under a handler whose renewals all
/// succeed, and the next claim would run it a second time. (PostgreSQL and
/// SQLite keep the later deadline and have no expiry of their own.)
#[tokio::test]
async fn a_renewal_after_the_clock_stepped_back_keeps_the_key_in_redis() {
    use idempotent_core::clock::Clock;
    use idempotent_core::fingerprint::Fingerprint;
    use idempotent_core::record::Claim;

    let Some(url) = backend_url(URL) else { return };
    let clock = ManualClock::starting_now();
    let store = RedisStore::builder(redis_connection(&url).await)
        .prefix(unique_name("idem_test") + ":")
        .clock(clock.clone())
        .build();
    let lease = Duration::from_secs(3);
    let fingerprint = Fingerprint::from_bytes([9; 32]);
    let key = RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(b"stepped-back").unwrap(),
    );
    let claim = store.claim(&key, fingerprint, lease).await.unwrap();
    let Claim::Acquired(token) = claim else {
        panic!("a new key: {claim:?}");
    };
    let redis_key = store.redis_key(&key);
    let mut connection = redis_connection(&url).await;

    // The clock steps ten minutes back, and the handler runs on: what
    // Redis holds a little over a minute after the claim, each renewal
    // since having kept the record's later deadline, is a key with a
    // second left before Redis drops it.
    clock.set(clock.now_millis() - 600_000);
    let () = redis::cmd("PEXPIRE")
        .arg(&redis_key)
        .arg(1_000)
        .query_async(&mut connection)
        .await
        .unwrap();
    store.renew(&key, token, lease).await.unwrap();

    let pttl: i64 = redis::cmd("PTTL")
        .arg(&redis_key)
        .query_async(&mut connection)
        .await
        .unwrap();
    let lease_ms = i64::try_from(lease.as_millis()).unwrap();
    assert!(
        pttl >= lease_ms,
        "a renewal answered held, yet Redis drops the claim in {pttl} ms, before the holder's next renewal"
    );
    store.release(&key, token).await.unwrap();
}

/// `SCRIPT LOAD` only spares each script's first `EVALSHA` a `NOSCRIPT`
/// round trip: the store sends a script's text with `EVAL` whenever Redis
/// lacks it. Yet `connect` refused a user whose ACL allows `EVAL` and
/// `EVALSHA` but not `SCRIPT LOAD`, and a server whose `SCRIPT` command is
/// renamed away (as some managed services and proxies refuse it). Both
/// connect, and run and replay a request on servers that never loaded the
/// store's scripts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_script_load_still_serves() {
    if backend_url(URL).is_none() {
        return;
    }
    let renamed = ["--rename-command", "SCRIPT", ""];
    let mut without_script = OwnRedis::start_with(OwnRedis::free_port(), &renamed).await;
    let mut with_acl = OwnRedis::start(OwnRedis::free_port()).await;
    let rules = "SETUSER noload on >pw ~* +@all -script|load";
    let _: () = redis::cmd("ACL")
        .arg(rules.split(' ').collect::<Vec<_>>())
        .query_async(&mut redis_connection(&with_acl.url()).await)
        .await
        .expect("ACL SETUSER");
    let without_load = with_acl.url().replace("redis://", "redis://noload:pw@");
    let mut served = Vec::new();
    for url in [without_script.url(), without_load] {
        let replies = match RedisStore::connect(&url).await {
            Ok(store) => {
                let app = payments_app(store, &Ledger::default(), STORE_TIMEOUT);
                Ok((pay(&app, "paid", 1).await, pay(&app, "paid", 1).await))
            }
            Err(error) => Err(error.to_string()),
        };
        served.push((url, replies));
    }
    without_script.stop().await;
    with_acl.stop().await;
    for (url, replies) in served {
        let (first, again) = replies.unwrap_or_else(|error| panic!("{url}: {error}"));
        assert_eq!(first.status, StatusCode::CREATED, "{url}: {:?}", first.body);
        assert!(again.replayed(), "{url}: {again:?}");
        assert_eq!(again.body, first.body, "{url}");
    }
}

/// An operator lowered `proto-max-bulk-len` (to 1 MiB, its least), under
/// the 512 MiB the store kept records within: Redis refused a larger
/// record, closing the connection, at every attempt, so the response was
/// never stored and a retry after the lease lapsed ran the handler again.
/// `connect` reads the limit, and the record is kept without its body.
#[tokio::test]
async fn a_body_over_a_lowered_bulk_limit_is_still_completed() {
    if backend_url(URL).is_none() {
        return;
    }
    let lowered = ["--proto-max-bulk-len", "1mb"];
    let mut redis = OwnRedis::start_with(OwnRedis::free_port(), &lowered).await;
    let store = RedisStore::connect(&redis.url()).await.expect("connect");
    let completion = complete_with_a_body_of(&store, 2 * 1024 * 1024).await;
    redis.stop().await;
    assert_kept(&completion);
}

/// An operator lowered `client-query-buffer-limit` (to 1 MiB, its least)
/// under `proto-max-bulk-len`: Redis closes, without a reply, a
/// connection whose one argument outgrows the query buffer, so a record
/// longer than the buffer, though within the bulk limit the store kept
/// records within, was refused at every attempt (and cut every other
/// request's commands on the connection), never stored, and a retry after
/// the lease lapsed ran the handler again. `connect` reads that limit
/// too, and the record is kept without its body; one that just fits the
/// buffer (with the `\r\n` that ends the argument) keeps its body.
#[tokio::test]
async fn a_body_over_a_lowered_query_buffer_limit_is_still_completed() {
    if backend_url(URL).is_none() {
        return;
    }
    let lowered = ["--client-query-buffer-limit", "1mb"];
    let mut redis = OwnRedis::start_with(OwnRedis::free_port(), &lowered).await;
    let store = RedisStore::connect(&redis.url()).await.expect("connect");
    // A record is 50 bytes and its body. The first, and the `\r\n` that
    // ends its argument, fill the buffer; the second is as long as the
    // buffer, which those two bytes overflow.
    let fitting = complete_with_a_body_of(&store, 1024 * 1024 - 2 - 50).await;
    let at_the_limit = complete_with_a_body_of(&store, 1024 * 1024 - 50).await;
    let over = complete_with_a_body_of(&store, 2 * 1024 * 1024).await;
    redis.stop().await;
    assert_kept(&at_the_limit);
    assert_kept(&over);
    assert_kept(&fitting);
    let (_, record) = &fitting;
    let body_kept =
        matches!(record, Ok(Some(Record::Completed(record))) if record.response.body.is_some());
    assert!(body_kept, "the body that fits was dropped");
}

/// Another application's string under the store's prefix, with no expiry:
/// every claim of its key fails alike (500 `record-corrupt`, nothing
/// runs) for as long as it is there, as a hash there does. The hash's
/// error says another application uses the prefix and what to change;
/// the string's said "unknown record version", neither where the value
/// is nor what to do. Both must say it, in the error the engine logs.
#[tokio::test]
async fn a_string_of_another_application_under_the_prefix_is_told_with_the_fix() {
    let Some(url) = backend_url(URL) else { return };
    let store = store_of_its_own(&url).await;
    let key = RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(b"foreign-string").unwrap(),
    );
    let redis_key = store.redis_key(&key);
    let mut connection = redis_connection(&url).await;
    let foreign = r#"{"cart_id":"4f1c","user":42,"roles":["admin","billing"],"ttl":null}"#;
    let () = redis::cmd("SET")
        .arg(&redis_key)
        .arg(foreign)
        .query_async(&mut connection)
        .await
        .unwrap();
    let fingerprint = idempotent_core::fingerprint::Fingerprint::from_bytes([1; 32]);
    let claimed = store
        .claim(&key, fingerprint, Duration::from_secs(60))
        .await;
    let read = Store::get(&store, &key).await;
    store_support::delete(&mut connection, &redis_key).await;
    for (what, error) in [("claim", claimed.err()), ("get", read.err())] {
        let error = error.unwrap_or_else(|| panic!("{what}: a foreign value is no record"));
        assert!(matches!(error, StoreError::Codec(_)), "{what}: {error:?}");
        let told = error.to_string();
        for words in [
            "another application",
            "RedisStoreBuilder::prefix",
            "deleting it",
        ] {
            assert!(
                told.contains(words),
                "{what}: `{words}` missing from: {told}"
            );
        }
    }
}
