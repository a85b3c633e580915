//! `PostgresStore` against a real server (`IDEMPOTENT_TEST_POSTGRES_URL`).
//! Each test works in its own table, so tests run in parallel and reruns
//! start clean.

use crate::store_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use idempotent_core::Idempotency;
use idempotent_core::clock::ManualClock;
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, Record, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{PostgresStore, Store, Tiered};
use idempotent_core::testing::contract;
use sqlx::{Connection, PgPool};
use store_support::tables::migrated_postgres;
use store_support::{
    EXPIRY_GRACE, Ledger, Relay, a_lapsed_claim_is_kept_for_the_grace, assert_kept, backend_url,
    complete_with_a_body_of, duplicates_across_instances, pay, pay_until_available, payments_app,
    pool_reaches_idle, relay_to_the_database, store_behind_a_relay, unique_name,
};
use tracing_subscriber::layer::SubscriberExt as _;

const URL: &str = "IDEMPOTENT_TEST_POSTGRES_URL";
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// A migrated store on a fresh table.
async fn fresh_store(url: &str) -> PostgresStore {
    migrated_postgres(url, &unique_name("idem_test")).await
}

async fn drop_table(store: &PostgresStore) {
    drop_table_on(store.pool(), store.table()).await;
}

/// Drops `table` through `pool`: for a store whose own connections the
/// test has broken.
async fn drop_table_on(pool: &PgPool, table: &str) {
    sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(pool)
        .await
        .expect("drop the test table");
}

fn with_clock(store: &PostgresStore, clock: ManualClock) -> PostgresStore {
    PostgresStore::builder(store.pool().clone())
        .table(store.table())
        .clock(clock)
        .build()
        .expect("valid table name")
}

fn record_key(name: &str) -> RecordKey {
    RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(name.as_bytes()).expect("valid key"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_passes_the_contract() {
    let Some(url) = backend_url(URL) else { return };
    let store = fresh_store(&url).await;
    contract::run_all(|clock| {
        let store = with_clock(&store, clock);
        async move { store }
    })
    .await;
    drop_table(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiered_postgres_store_passes_the_contract() {
    let Some(url) = backend_url(URL) else { return };
    let store = fresh_store(&url).await;
    contract::run_all(|clock| {
        let durable = with_clock(&store, clock.clone());
        async move { Tiered::builder(durable).clock(clock).build() }
    })
    .await;
    drop_table(&store).await;
}

/// A database (or role) whose `default_transaction_isolation` is stricter
/// than `READ COMMITTED`: a claim that meets a concurrent claim's row, or a
/// take-over that meets a concurrent take-over, fails with a serialization
/// failure there instead of doing nothing. The claim must still answer
/// `InFlight`, not an error (which the engine answers 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_passes_the_contract_under_stricter_isolation() {
    use std::str::FromStr;

    let Some(url) = backend_url(URL) else { return };
    for isolation in ["repeatable read", "serializable"] {
        // A space in a startup option is escaped with a backslash.
        let options = sqlx::postgres::PgConnectOptions::from_str(&url)
            .expect("valid URL")
            .options([(
                "default_transaction_isolation",
                isolation.replace(' ', "\\ "),
            )]);
        let connected = PostgresStore::connect_with(options).await.expect("connect");
        let isolated: String = sqlx::query_scalar("SHOW transaction_isolation")
            .fetch_one(connected.pool())
            .await
            .expect("read the isolation level");
        assert_eq!(isolated, isolation);
        let store = PostgresStore::builder(connected.pool().clone())
            .table(unique_name("idem_test"))
            .build()
            .expect("valid table name");
        store.migrate().await.expect("migrate");
        contract::run_all(|clock| {
            let store = with_clock(&store, clock);
            async move { store }
        })
        .await;
        drop_table(&store).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_database() {
    let Some(url) = backend_url(URL) else { return };
    let first = fresh_store(&url).await;
    // The second instance has its own pool, as another process would.
    let second = PostgresStore::connect(&url).await.expect("connect");
    let second = PostgresStore::builder(second.pool().clone())
        .table(first.table())
        .build()
        .expect("valid table name");
    let ledger = Ledger::default();
    let apps = [
        payments_app(first.clone(), &ledger, STORE_TIMEOUT),
        payments_app(second, &ledger, STORE_TIMEOUT),
    ];
    duplicates_across_instances(&apps, &ledger, 100).await;
    drop_table(&first).await;
}

#[tokio::test]
async fn a_completed_record_survives_a_restart() {
    let Some(url) = backend_url(URL) else { return };
    let store = fresh_store(&url).await;
    let table = store.table().to_owned();
    let ledger = Ledger::default();
    let app = payments_app(store.clone(), &ledger, STORE_TIMEOUT);
    let original = pay(&app, "restart-1", 100).await;
    assert_eq!(original.status, StatusCode::CREATED);
    drop(app);
    store.pool().close().await;
    drop(store);

    let restarted = PostgresStore::connect(&url).await.expect("reconnect");
    let restarted = PostgresStore::builder(restarted.pool().clone())
        .table(table)
        .build()
        .expect("valid table name");
    restarted
        .migrate()
        .await
        .expect("migrating again is harmless");
    let app = payments_app(restarted.clone(), &ledger, STORE_TIMEOUT);
    let replay = pay(&app, "restart-1", 100).await;
    assert!(replay.replayed());
    assert_eq!(
        (replay.status, &replay.body),
        (original.status, &original.body)
    );
    assert_eq!(replay.content_type(), original.content_type());
    assert_eq!(ledger.executions(), 1);
    let mismatch = pay(&app, "restart-1", 999).await;
    assert_eq!(mismatch.status, StatusCode::UNPROCESSABLE_ENTITY);
    drop_table(&restarted).await;
}

#[tokio::test]
async fn concurrent_migrations_are_harmless() {
    let Some(url) = backend_url(URL) else { return };
    let connected = PostgresStore::connect(&url).await.expect("connect");
    let table = unique_name("idem_test");
    // Unquoted names fold to lower case: `Idem_Test_..` is the same table,
    // and its migration must wait for the same lock.
    let spellings = [table.clone(), table.to_ascii_uppercase()];
    let store = |name: &str| {
        PostgresStore::builder(connected.pool().clone())
            .table(name)
            .build()
            .expect("valid table name")
    };
    let migrations: Vec<_> = (0..8)
        .map(|index| {
            let store = store(&spellings[index % 2]);
            tokio::spawn(async move { store.migrate().await })
        })
        .collect();
    let store = store(&table);
    for migration in migrations {
        migration.await.expect("task").expect("migrate");
    }
    drop_table(&store).await;
}

/// A table named with its schema (`public.records`) is the table named
/// without it (`records`, found on the search path): instances configured
/// either way migrate it at the same time, and one failed with
/// `duplicate key value violates unique constraint
/// "pg_type_typname_nsp_index"` when their migrations took different locks.
#[tokio::test]
async fn migrations_of_one_table_named_with_and_without_its_schema_wait_for_each_other() {
    let Some(url) = backend_url(URL) else { return };
    let connected = PostgresStore::connect(&url).await.expect("connect");
    let store = |name: &str| {
        PostgresStore::builder(connected.pool().clone())
            .table(name)
            .build()
            .expect("valid table name")
    };
    for _ in 0..5 {
        let table = unique_name("idem_test");
        let spellings = [table.clone(), format!("public.{table}")];
        let migrations: Vec<_> = (0..4)
            .map(|index| {
                let store = store(&spellings[index % 2]);
                tokio::spawn(async move { store.migrate().await })
            })
            .collect();
        let mut failures = Vec::new();
        for migration in migrations {
            if let Err(error) = migration.await.expect("task") {
                failures.push(error.to_string());
            }
        }
        drop_table(&store(&table)).await;
        assert!(failures.is_empty(), "{failures:?}");
    }
}

#[tokio::test]
async fn purging_deletes_only_expired_rows() {
    let Some(url) = backend_url(URL) else { return };
    let base = fresh_store(&url).await;
    let clock = ManualClock::starting_now();
    let store = with_clock(&base, clock.clone());
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lease = Duration::from_secs(10);
    let response = StoredResponse::new(StatusCode::OK, Vec::new(), None);
    for (name, ttl) in [("short", 5), ("long", 500)] {
        let Claim::Acquired(token) = store
            .claim(&record_key(name), fingerprint, lease)
            .await
            .unwrap()
        else {
            panic!("acquire {name}");
        };
        store
            .complete(
                &record_key(name),
                token,
                response.clone(),
                Duration::from_secs(ttl),
            )
            .await
            .unwrap();
    }
    store
        .claim(&record_key("abandoned"), fingerprint, lease)
        .await
        .unwrap();
    store
        .claim(
            &record_key("running"),
            fingerprint,
            Duration::from_secs(100),
        )
        .await
        .unwrap();
    assert_eq!(
        store.purge_expired().await.unwrap(),
        0,
        "nothing has expired yet"
    );
    clock.advance(Duration::from_secs(20) + EXPIRY_GRACE);
    assert_eq!(
        store.purge_expired().await.unwrap(),
        2,
        "the short record and the lease abandoned for longer than the grace"
    );
    assert!(store.get(&record_key("long")).await.unwrap().is_some());
    assert!(store.get(&record_key("running")).await.unwrap().is_some());
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", store.table()))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(rows, 2);
    drop_table(&base).await;
}

/// See `store_support::a_lapsed_claim_is_kept_for_the_grace`.
#[tokio::test]
async fn a_purge_keeps_a_lapsed_claim_for_the_grace() {
    let Some(url) = backend_url(URL) else { return };
    let base = fresh_store(&url).await;
    let clock = ManualClock::starting_now();
    let store = with_clock(&base, clock.clone());
    let purge = async |store: &PostgresStore| store.purge_expired().await.unwrap();
    a_lapsed_claim_is_kept_for_the_grace(&store, &clock, purge).await;
    drop_table(&base).await;
}

/// A reaper purges an expired record left before it started, and goes on
/// purging: a record that expires after its first purge goes too. At most
/// one purge starts each period.
#[tokio::test]
async fn the_reaper_purges_in_the_background() {
    reaper_purges_in_the_background(Duration::from_millis(20)).await;
}

/// A zero period is taken as a millisecond: the reaper purges, as with
/// any period, rather than panicking on its task (where nothing would
/// show it), and starts at most one purge a millisecond. (A reaper that
/// purged one after another, without pause, would break that bound only
/// where a purge takes well under a millisecond: a debug build's round
/// trip to PostgreSQL takes about one.)
#[tokio::test]
async fn a_reaper_with_a_zero_period_still_purges() {
    reaper_purges_in_the_background(Duration::ZERO).await;
}

/// Counts the reaper's purges by the event each one that succeeds logs
/// (with its `purged` field), on this test's thread: a `#[tokio::test]`
/// runs the reaper's task there too.
#[derive(Clone, Default)]
struct Purges(Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Purges {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let metadata = event.metadata();
        if metadata.target() == "idempotent_core::store::sql"
            && metadata.fields().field("purged").is_some()
        {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A claim under `key` whose lease has lapsed, past the grace a purge
/// keeps it for, as `store`'s `clock` reads.
async fn expired_claim(store: &PostgresStore, clock: &ManualClock, key: &str) {
    let key = record_key(key);
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let claim = store.claim(&key, fingerprint, Duration::from_secs(1)).await;
    assert!(matches!(claim, Ok(Claim::Acquired(_))), "{claim:?}");
    clock.advance(Duration::from_secs(2) + EXPIRY_GRACE);
}

/// Waits until `store`'s table is empty, two seconds at most: the rows
/// left, 0 once it is.
async fn rows_until_purged(store: &PostgresStore) -> i64 {
    let count = || async {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {}", store.table()))
            .fetch_one(store.pool())
            .await
            .unwrap()
    };
    let mut remaining = count().await;
    for _ in 0..100 {
        if remaining == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        remaining = count().await;
    }
    remaining
}

async fn reaper_purges_in_the_background(period: Duration) {
    let Some(url) = backend_url(URL) else { return };
    let purges = Purges::default();
    let subscriber = tracing_subscriber::registry().with(purges.clone());
    let _counting = tracing::subscriber::set_default(subscriber);
    let base = fresh_store(&url).await;
    let clock = ManualClock::starting_now();
    let store = with_clock(&base, clock.clone());
    expired_claim(&store, &clock, "reaped").await;
    let started = Instant::now();
    let reaper = store.spawn_reaper(period);
    let remaining = rows_until_purged(&store).await;
    assert_eq!(remaining, 0, "the reaper deleted the expired row");
    // A reaper that purged once, as it started, would stop here.
    expired_claim(&store, &clock, "reaped-later").await;
    let remaining = rows_until_purged(&store).await;
    assert_eq!(remaining, 0, "the reaper purged again, later");
    // Long enough for a reaper that purges more often than its period
    // allows to show it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(reaper);
    let elapsed = started.elapsed();
    // The ticks fall at least a period (a millisecond at least) apart,
    // the first at once.
    let period = period.max(Duration::from_millis(1));
    let most = usize::try_from(elapsed.as_millis() / period.as_millis()).unwrap() + 1;
    let purged = purges.0.load(Ordering::SeqCst);
    assert!(
        (2..=most).contains(&purged),
        "{purged} purges in {elapsed:?} at a period of {period:?}"
    );
    drop_table(&base).await;
}

#[tokio::test]
async fn table_names_that_are_not_identifiers_are_refused() {
    let Some(url) = backend_url(URL) else { return };
    let store = PostgresStore::connect(&url).await.expect("connect");
    let error = PostgresStore::builder(store.pool().clone())
        .table("records; DROP TABLE users")
        .build()
        .expect_err("refused");
    assert!(error.to_string().contains("invalid table name"), "{error}");
}

/// A table in the temporary schema exists only for the connection that
/// created it: `migrate` made it on one pooled connection, every statement
/// on another failed with "does not exist ... run migrate", and the
/// records went with that connection. Refused when the store is built.
#[tokio::test]
async fn tables_in_the_temporary_schema_are_refused() {
    let Some(url) = backend_url(URL) else { return };
    let store = PostgresStore::connect(&url).await.expect("connect");
    for schema in ["pg_temp", "PG_TEMP", "pg_temp_3"] {
        let table = format!("{schema}.{}", unique_name("idem_test"));
        let built = PostgresStore::builder(store.pool().clone())
            .table(table.as_str())
            .build();
        let error = built.expect_err("a temporary table is refused");
        assert!(error.to_string().contains("temporary"), "{table}: {error}");
    }
}

/// A server that refuses the connection is named as the cause, not the
/// pool's timeout waiting for a connection. Needs no server.
#[tokio::test]
async fn a_refused_connection_says_so() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/test");
    let error = PostgresStore::connect(&url)
        .await
        .expect_err("nothing listens there")
        .to_string();
    assert!(!error.contains("pool timed out"), "{error}");
    assert!(error.to_lowercase().contains("refused"), "{error}");
}

/// A URL that reaches PostgreSQL through a Unix socket (`?host=/path`, as
/// `psql` takes it) fails naming that socket: the error named `localhost`
/// and the default port, which sqlx keeps beside the socket and never
/// dials, so the operator checked a TCP port instead of the socket's
/// directory. An IPv6 address is bracketed once, its port told apart.
/// Needs no server.
#[tokio::test]
async fn a_failed_connection_names_the_socket_or_address_it_dialed() {
    let socket = "/nonexistent-idempotent-socket-dir";
    let url = format!("postgres://postgres@localhost/test?host={socket}");
    let error = PostgresStore::connect(&url)
        .await
        .expect_err("no socket there")
        .to_string();
    assert!(error.contains(&format!("at {socket}")), "{error}");
    assert!(!error.contains("localhost"), "{error}");
    // A URL's host comes bracketed, one given by `?host=` bare.
    for url in [
        "postgres://postgres@[::1]:1/test",
        "postgres://postgres@localhost:1/test?host=::1",
    ] {
        let error = PostgresStore::connect(url)
            .await
            .expect_err("nothing listens on port 1")
            .to_string();
        assert!(error.contains("at [::1]:1 "), "{url}: {error}");
    }
}

/// A service that never ran `migrate` answers every request 503: the
/// error it logs says what to run.
#[tokio::test]
async fn a_missing_table_names_migrate() {
    let Some(url) = backend_url(URL) else { return };
    let connected = PostgresStore::connect(&url).await.expect("connect");
    let store = PostgresStore::builder(connected.pool().clone())
        .table(unique_name("idem_never_migrated"))
        .build()
        .expect("valid table name");
    let claim = store
        .claim(
            &record_key("k"),
            Fingerprint::from_bytes([1; 32]),
            Duration::from_secs(60),
        )
        .await;
    let error = claim.expect_err("there is no table").to_string();
    assert!(error.contains("does not exist"), "{error}");
    assert!(error.contains("PostgresStore::migrate()"), "{error}");
}

/// Table names are quoted in SQL, so reserved words are names, alone or
/// after a schema; and folded to lower case, so a mixed-case name is the
/// table that unquoted SQL (and this store before quoting) calls by it.
#[tokio::test]
async fn reserved_words_and_mixed_case_names_are_tables() {
    let Some(url) = backend_url(URL) else { return };
    let connected = PostgresStore::connect(&url).await.expect("connect");
    let pool = connected.pool().clone();
    let schema = unique_name("idem_schema");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&pool)
        .await
        .expect("create the test schema");
    let names = [
        "order".to_owned(),
        format!("{schema}.user"),
        format!("{schema}.select"),
        format!("{}.Mixed_Case", schema.to_uppercase()),
    ];
    let response = StoredResponse::new(StatusCode::OK, Vec::new(), None);
    for name in &names {
        let store = PostgresStore::builder(pool.clone())
            .table(name.as_str())
            .build()
            .expect("valid table name");
        for _ in 0..2 {
            let migrated = store.migrate().await;
            assert!(migrated.is_ok(), "migrate {name}: {migrated:?}");
        }
        let key = record_key(&unique_name("reserved"));
        let claimed = store.claim(&key, Fingerprint::from_bytes([3; 32]), STORE_TIMEOUT);
        let Ok(Claim::Acquired(token)) = claimed.await else {
            panic!("claim on {name}");
        };
        let ttl = Duration::from_secs(60);
        let completed = store.complete(&key, token, response.clone(), ttl).await;
        assert!(completed.is_ok(), "complete on {name}: {completed:?}");
        let read = store.get(&key).await;
        assert!(
            matches!(read, Ok(Some(Record::Completed(_)))),
            "{name}: {read:?}"
        );
        assert_eq!(store.purge_expired().await.unwrap(), 0, "purge on {name}");
    }
    let unquoted: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {schema}.mixed_case"))
        .fetch_one(&pool)
        .await
        .expect("the mixed-case name made the lower-case table");
    sqlx::query("DROP TABLE IF EXISTS \"order\"")
        .execute(&pool)
        .await
        .expect("drop the test table");
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .expect("drop the test schema");
    assert_eq!(unquoted, 1);
}

// ===== an unreachable database: no server needed =====

/// An app whose store points at `url` without connecting first.
fn app_on_lazy_pool(url: &str, ledger: &Ledger) -> axum::Router {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(30))
        .connect_lazy(url)
        .expect("valid URL");
    let store = PostgresStore::builder(pool)
        .build()
        .expect("valid table name");
    payments_app(store, ledger, Duration::from_millis(300))
}

#[tokio::test]
async fn a_refused_connection_gives_503_and_runs_nothing() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ledger = Ledger::default();
    let app = app_on_lazy_pool(
        &format!("postgres://postgres@127.0.0.1:{port}/test"),
        &ledger,
    );
    let reply = pay(&app, "refused", 1).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.content_type(), Some("application/problem+json"));
    assert_eq!(ledger.executions(), 0);
}

#[tokio::test]
async fn a_database_that_never_answers_is_cut_by_the_store_timeout() {
    // Accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let ledger = Ledger::default();
    let app = app_on_lazy_pool(
        &format!("postgres://postgres@127.0.0.1:{port}/test"),
        &ledger,
    );
    let reply = tokio::time::timeout(Duration::from_secs(10), pay(&app, "silent", 1))
        .await
        .expect("the store timeout answers long before the pool's own 30 s");
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ledger.executions(), 0);
    silent.abort();
}

// ===== the database going away and coming back =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_going_away_gives_503_and_the_service_recovers() {
    use std::time::Instant;

    let Some(url) = backend_url(URL) else { return };
    let (options, mut relay) = relay_to_the_database(&url).await;
    let store = PostgresStore::connect_with(options)
        .await
        .expect("connect through the relay");
    let store = PostgresStore::builder(store.pool().clone())
        .table(unique_name("idem_test"))
        .build()
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    let ledger = Ledger::default();
    let app = payments_app(store.clone(), &ledger, Duration::from_millis(500));
    assert_eq!(pay(&app, "before", 1).await.status, StatusCode::CREATED);

    relay.stop().await;
    for attempt in 0..3 {
        let reply = pay(&app, &format!("during-{attempt}"), 1).await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "attempt {attempt}"
        );
        assert_eq!(reply.content_type(), Some("application/problem+json"));
    }
    assert_eq!(
        ledger.executions(),
        1,
        "nothing executes while the database is away"
    );

    let relay = Relay::start(relay.port, relay.upstream.clone()).await;
    let back = Instant::now();
    let reply = pay_until_available(&app, "after", 1)
        .await
        .expect("the pool recovers by itself once the database is back");
    eprintln!(
        "database outage: recovered {:?} after it returned",
        back.elapsed()
    );
    assert_eq!(reply.status, StatusCode::CREATED);
    let replay = pay(&app, "before", 1).await;
    assert!(
        replay.replayed(),
        "records written before the outage are still there"
    );
    assert_eq!(ledger.executions(), 2);
    drop(relay);
    let cleanup = PostgresStore::connect(&url).await.expect("connect");
    drop_table_on(cleanup.pool(), store.table()).await;
}

// ===== connections kept between statements =====

/// A store on a pool of its own (16 connections), migrated, keeping up to
/// `hold` of them.
async fn store_on_own_pool(url: &str, hold: u32) -> PostgresStore {
    let connected = PostgresStore::connect(url).await.expect("connect");
    let store = PostgresStore::builder(connected.pool().clone())
        .table(unique_name("idem_test"))
        .hold_connections(hold)
        .build()
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    store
}

/// Claims `name` on `store`, which must succeed.
async fn claim(store: &PostgresStore, name: &str) -> Claim {
    store
        .claim(
            &record_key(name),
            Fingerprint::from_bytes([1; 32]),
            STORE_TIMEOUT,
        )
        .await
        .expect("claim")
}

#[tokio::test]
async fn a_kept_connection_goes_back_to_the_pool_once_idle() {
    let Some(url) = backend_url(URL) else { return };
    let store = store_on_own_pool(&url, 4).await;
    assert!(
        pool_reaches_idle(store.pool(), 1, Duration::from_secs(5)).await,
        "migrate returned its connection"
    );
    claim(&store, "kept").await;
    assert_eq!(
        store.pool().num_idle(),
        0,
        "the store keeps the connection for its next statement"
    );
    assert!(
        pool_reaches_idle(store.pool(), 1, Duration::from_secs(5)).await,
        "an idle kept connection returns to the pool within seconds"
    );
    drop_table(&store).await;
}

/// A pool of one connection shared with the application (a small service,
/// a serverless function): by default the store keeps none of it, or the
/// handler's own query after a claim would wait for the kept connection to
/// sit unused for a second, and under steady traffic it never would.
#[tokio::test]
async fn a_pool_of_one_is_not_kept_from_the_application() {
    let Some(url) = backend_url(URL) else { return };
    let pool = PostgresStore::pool_options()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect");
    let store = PostgresStore::builder(pool.clone())
        .table(unique_name("idem_test"))
        .build()
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    claim(&store, "one").await;
    let handler_query = tokio::time::timeout(Duration::from_millis(500), pool.acquire()).await;
    let free = matches!(handler_query, Ok(Ok(_)));
    drop(handler_query);
    drop_table(&store).await;
    assert!(free, "the application waits for its only connection");
}

/// A store used in one runtime and dropped outside it, as when `main`
/// builds a runtime, serves with `block_on` and returns: its kept
/// connections go back without a panic, before or after the runtime
/// itself is dropped. (sqlx returns a connection on a task of the current
/// runtime and panics where there is none.)
#[test]
fn a_store_dropped_outside_its_runtime_gives_its_connections_back() {
    let Some(url) = backend_url(URL) else { return };
    for runtime_first in [false, true] {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let store = runtime.block_on(async {
            let store = store_on_own_pool(&url, 4).await;
            let settled = pool_reaches_idle(store.pool(), 1, Duration::from_secs(5)).await;
            assert!(settled, "migrate returned its connection");
            claim(&store, "outside").await;
            assert_eq!(store.pool().num_idle(), 0, "the store keeps a connection");
            store
        });
        let pool = store.pool().clone();
        let drop_table = format!("DROP TABLE IF EXISTS {}", store.table());
        if runtime_first {
            drop(runtime);
            drop(store);
        } else {
            drop(store);
            let returned = runtime.block_on(pool_reaches_idle(&pool, 1, Duration::from_secs(5)));
            assert!(returned, "the kept connection went back to the pool");
        }
        // On a connection of its own: the pool's may belong to a runtime
        // that is gone.
        let cleanup = tokio::runtime::Runtime::new().expect("a runtime");
        cleanup.block_on(async {
            let connecting = <sqlx::PgConnection as sqlx::Connection>::connect(&url);
            let mut connection = connecting.await.expect("connect");
            let dropped = sqlx::query(&drop_table).execute(&mut connection).await;
            dropped.expect("drop the test table");
        });
    }
}

/// A store that outlives the runtime it was first used in, is used in
/// another, and is dropped outside both (a `main` that runs a second
/// runtime after the first, then returns): the connection it keeps from
/// the second runtime goes back to the pool on that runtime, rather than
/// being handed to the first one, which is gone and drops it.
#[test]
fn a_store_used_in_a_second_runtime_gives_its_connections_back_there() {
    let Some(url) = backend_url(URL) else { return };
    let name = unique_name("idem_runtimes");
    let first = tokio::runtime::Runtime::new().expect("a runtime");
    let store = first.block_on(async {
        let store = store_named(&url, &name).await;
        claim(&store, "first-runtime").await;
        store
    });
    drop(first);
    let second = tokio::runtime::Runtime::new().expect("a runtime");
    let kept = second.block_on(async {
        // A connection of the first runtime may still serve a statement
        // here (about one run in ten), be kept, and fail only its ping on
        // the way back ("a Tokio 1.x context was found, but it is being
        // shutdown"), which closes it. Ended by the server, each fails its
        // statement, and the claim goes on to a new connection, opened and
        // kept in this runtime.
        end_connections_and_wait(&url, &name).await;
        claim(&store, "second-runtime").await;
        // The broken ones close on tasks of their own.
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.pool().size() > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (store.pool().size(), store.pool().num_idle())
    });
    let pool = store.pool().clone();
    let table = store.table().to_owned();
    drop(store);
    second.block_on(async {
        let returned = pool_reaches_idle(&pool, 1, Duration::from_secs(5)).await;
        let (size, idle) = (pool.size(), pool.num_idle());
        drop_table_on(&pool, &table).await;
        assert_eq!(kept, (1, 0), "the store kept one connection, and no other");
        assert!(
            returned,
            "the kept connection did not go back to the pool: {size} open, {idle} idle"
        );
    });
}

/// Ends every connection named `name`, on a connection of its own, and
/// waits until each has ended (up to 5 s each).
async fn end_connections_and_wait(url: &str, name: &str) {
    let mut admin = sqlx::PgConnection::connect(url).await.expect("connect");
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(name)
    .fetch_all(&mut admin)
    .await
    .expect("end the connections");
    assert!(ended.iter().all(|&ended| ended), "ended {ended:?}");
}

#[tokio::test]
async fn without_holding_each_connection_goes_back_after_its_statement() {
    let Some(url) = backend_url(URL) else { return };
    let store = store_on_own_pool(&url, 0).await;
    claim(&store, "not-kept").await;
    // sqlx pings it on the way back, so it is idle again a moment later;
    // well before the second after which a kept connection would go back
    // (200 ms were too few on a machine busy with builds).
    assert!(pool_reaches_idle(store.pool(), 1, Duration::from_millis(700)).await);
    drop_table(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_keeps_no_more_connections_than_it_was_given() {
    let Some(url) = backend_url(URL) else { return };
    let store = store_on_own_pool(&url, 2).await;
    let mut claims = tokio::task::JoinSet::new();
    for index in 0..24 {
        let store = store.clone();
        claims.spawn(async move { claim(&store, &format!("busy-{index}")).await });
    }
    while let Some(claimed) = claims.join_next().await {
        assert!(matches!(claimed.unwrap(), Claim::Acquired(_)));
    }
    let pool = store.pool();
    let checked_out = pool.size() - u32::try_from(pool.num_idle()).unwrap();
    assert!(
        checked_out <= 2,
        "24 concurrent claims kept {checked_out} connections"
    );
    drop_table(&store).await;
}

/// Asked to keep as many connections as the pool has, or more, the store
/// still leaves one to the rest: under steady traffic, kept connections
/// are never unused for a second, and the application's own queries, the
/// reaper's purges and migrations would each wait out the pool's acquire
/// timeout and fail, until a kept connection turned a minute old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeping_as_many_connections_as_the_pool_has_still_leaves_one_free() {
    let Some(url) = backend_url(URL) else { return };
    for hold in [4, 100] {
        let pool = PostgresStore::pool_options()
            .max_connections(4)
            .connect(&url)
            .await
            .expect("connect");
        let store = store_support::postgres_store_on(pool, hold).await;
        let outcome = store_support::a_purge_and_a_query_under_steady_reads(
            &store,
            store.pool(),
            store.purge_expired(),
        )
        .await;
        drop_table(&store).await;
        store_support::assert_purge_and_query_passed(hold, outcome);
    }
}

#[tokio::test]
async fn closing_the_pool_is_not_held_up_by_kept_connections() {
    let Some(url) = backend_url(URL) else { return };
    let store = store_on_own_pool(&url, 4).await;
    claim(&store, "closing").await;
    drop_table(&store).await;
    tokio::time::timeout(Duration::from_secs(5), store.pool().close())
        .await
        .expect("the pool closes although the store is still alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_cut_off_midway_leave_no_answer_behind_for_the_next() {
    let Some(url) = backend_url(URL) else { return };
    let store = store_on_own_pool(&url, 4).await;
    // Cut claims off at every stage, from before the query is sent to
    // after its answer arrived: none of these connections may be reused
    // with an answer still unread.
    for micros in 0..60 {
        let key = record_key(&format!("cut-{micros}"));
        let claim = store.claim(&key, Fingerprint::from_bytes([1; 32]), STORE_TIMEOUT);
        let _ = tokio::time::timeout(Duration::from_micros(micros * 20), claim).await;
    }
    // Every statement now reads its own answer: each fresh key is acquired,
    // and its duplicate sees that key's fingerprint.
    for round in 0..40 {
        let key = record_key(&format!("after-{round}"));
        let fingerprint = Fingerprint::from_bytes([u8::try_from(round).unwrap(); 32]);
        let first = store.claim(&key, fingerprint, STORE_TIMEOUT).await.unwrap();
        assert!(
            matches!(first, Claim::Acquired(_)),
            "round {round}: {first:?}"
        );
        let duplicate = store
            .claim(&key, Fingerprint::from_bytes([255; 32]), STORE_TIMEOUT)
            .await
            .unwrap();
        match duplicate {
            Claim::InFlight {
                fingerprint: seen, ..
            } => {
                assert_eq!(seen, fingerprint, "round {round}");
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
    drop_table(&store).await;
}

// ===== connections that broke while a handler ran =====

/// A payment handler held at a gate until the test opens it, on a 2 s
/// lease, counting its executions.
mod gated {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use axum::Router;
    use axum::extract::{Json, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use idempotent_core::store::Store;
    use idempotent_core::{Endpoint, Idempotency, IdempotentRequest, Scope};
    use serde_json::Value;
    use tokio::sync::Notify;

    pub(super) const LEASE: Duration = Duration::from_secs(2);
    const ENDPOINT: Endpoint = Endpoint::new("gated_payment")
        .scope(Scope::Global)
        .lease(LEASE);

    #[derive(Clone, Default)]
    pub(super) struct Gate {
        pub(super) executions: Arc<AtomicUsize>,
        pub(super) entered: Arc<Notify>,
        pub(super) open: Arc<Notify>,
    }

    async fn handler(
        State(gate): State<Gate>,
        idempotency: IdempotentRequest,
        Json(request): Json<Value>,
    ) -> Response {
        let fingerprint = ENDPOINT.fingerprint(&request);
        idempotency
            .run(&ENDPOINT, fingerprint, async move {
                gate.executions.fetch_add(1, Ordering::SeqCst);
                gate.entered.notify_one();
                gate.open.notified().await;
                (StatusCode::CREATED, Json(request)).into_response()
            })
            .await
    }

    pub(super) fn app(store: impl Store, gate: &Gate) -> Router {
        Router::new()
            .route("/payments", post(handler))
            .with_state(gate.clone())
            .layer(
                Idempotency::builder(store)
                    .store_timeout(Duration::from_secs(5))
                    .build(),
            )
    }
}

/// Leaves several connections idle in the store's pool (or kept), as any
/// busy service has. Three are held at once first: the burst of reads
/// alone can run on one connection, each read done before the next task
/// starts on a fast machine.
async fn warm_up(store: &PostgresStore) {
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(store.pool().acquire().await.expect("a connection"));
    }
    drop(held);
    let mut burst = tokio::task::JoinSet::new();
    for index in 0..12 {
        let store = store.clone();
        burst.spawn(async move { store.get(&record_key(&format!("warm-{index}"))).await });
    }
    while let Some(done) = burst.join_next().await {
        done.expect("task").expect("get");
    }
}

/// Runs one payment whose handler is held while `break_connections` runs,
/// then retries it after its lease would have lapsed: the response must
/// have been stored on the connections that were left, and replayed,
/// although every connection the store had used is broken.
async fn a_payment_survives(
    store: &PostgresStore,
    break_connections: impl std::future::Future<Output = ()>,
) {
    use std::sync::atomic::Ordering;

    warm_up(store).await;
    let gate = gated::Gate::default();
    let app = gated::app(store.clone(), &gate);
    let first = tokio::spawn({
        let app = app.clone();
        async move { pay(&app, "broken-connections", 7).await }
    });
    gate.entered.notified().await;
    break_connections.await;
    gate.open.notify_one();
    assert_eq!(first.await.expect("task").status, StatusCode::CREATED);
    tokio::time::sleep(gated::LEASE + Duration::from_millis(200)).await;
    gate.open.notify_one(); // in case the retry runs again
    let retry = pay_until_available(&app, "broken-connections", 7)
        .await
        .expect("the store answers");
    assert!(
        retry.replayed(),
        "the retry was not a replay: {} {:?}",
        retry.status,
        retry.body
    );
    assert_eq!(
        gate.executions.load(Ordering::SeqCst),
        1,
        "the payment ran twice"
    );
}

/// The database restarts (every connection is cut, and it is back at once)
/// while a handler runs, with connections kept between statements and
/// without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_finished_after_a_database_restart_is_stored() {
    let Some(url) = backend_url(URL) else { return };
    for hold in [0, 15] {
        let (store, mut relay) = store_behind_a_relay(&url, hold).await;
        let mut restarted = None;
        a_payment_survives(&store, async {
            relay.stop().await;
            restarted = Some(Relay::start(relay.port, relay.upstream.clone()).await);
        })
        .await;
        drop(restarted);
        let cleanup = PostgresStore::connect(&url).await.expect("connect");
        drop_table_on(cleanup.pool(), store.table()).await;
    }
}

/// The database goes away for longer than the engine's pauses between
/// attempts at storing a response (about a second), and a claim meets the
/// outage and fails at once: the response of the handler that was running
/// is still stored once the database is back, since the statements after
/// a claim wait for the server instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_finished_while_claims_fail_at_once_is_stored() {
    use std::time::Instant;

    let Some(url) = backend_url(URL) else { return };
    for hold in [0, 15] {
        let (store, mut relay) = store_behind_a_relay(&url, hold).await;
        let others = gated::app(store.clone(), &gated::Gate::default());
        let mut restarted = None;
        a_payment_survives(&store, async {
            relay.stop().await;
            let started = Instant::now();
            let refused = pay(&others, "refused-at-once", 1).await;
            assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
            // Without failing fast, the claim waits out the store timeout
            // (5 s); half of it leaves room for a loaded machine.
            let waited = started.elapsed();
            assert!(
                waited < Duration::from_millis(2500),
                "hold {hold}: refused after {waited:?}"
            );
            let (port, upstream) = (relay.port, relay.upstream.clone());
            restarted = Some(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                Relay::start(port, upstream).await
            }));
        })
        .await;
        let restarted = restarted.expect("restarting").await;
        drop(restarted.expect("the relay restarts"));
        let cleanup = PostgresStore::connect(&url).await.expect("connect");
        drop_table_on(cleanup.pool(), store.table()).await;
    }
}

/// A store on connections named `name` (their `application_name`), so
/// that a test can end them all, keeping what `connect` keeps: 15 of its
/// 16 connections.
async fn store_named(url: &str, name: &str) -> PostgresStore {
    use std::str::FromStr;

    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .expect("valid URL")
        .application_name(name);
    let connected = PostgresStore::connect_with(options).await.expect("connect");
    let store = PostgresStore::builder(connected.pool().clone())
        .table(unique_name("idem_test"))
        .hold_connections(15)
        .build()
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    store
}

/// Ends every connection named `name` as an administrator, a pooler or
/// `idle_session_timeout` would (`pg_terminate_backend`): how many.
async fn end_connections(admin: &PostgresStore, name: &str) -> usize {
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(name)
    .fetch_all(admin.pool())
    .await
    .expect("end the connections");
    ended.len()
}

/// The same with no outage at all: the database ends the store's sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_finished_after_the_sessions_were_ended_is_stored() {
    let Some(url) = backend_url(URL) else { return };
    let name = unique_name("idem_sessions");
    let store = store_named(&url, &name).await;
    let admin = PostgresStore::connect(&url).await.expect("connect");
    a_payment_survives(&store, async {
        let ended = end_connections(&admin, &name).await;
        assert!(ended > 1, "ended {ended} sessions");
    })
    .await;
    drop_table_on(admin.pool(), store.table()).await;
}

/// A claim, the statement that comes before anything runs, meets a kept
/// connection that the server ended ("terminating connection due
/// to administrator command", SQLSTATE 57P01, as a failover or a restart
/// ends them): it runs again on the next connection, and acquires the key
/// instead of answering 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_after_the_server_ended_its_connections_is_acquired() {
    let Some(url) = backend_url(URL) else { return };
    let name = unique_name("idem_ended");
    let store = store_named(&url, &name).await;
    warm_up(&store).await;
    let admin = PostgresStore::connect(&url).await.expect("connect");
    let (ended, claimed) = claim_after_ending(&store, &admin, &name, "after-ended").await;
    assert!(ended > 1, "ended {ended} connections");
    assert!(matches!(claimed, Ok(Claim::Acquired(_))), "{claimed:?}");
}

/// Has `admin` end the connections of the application `name` (as a
/// failover or a restart does), then claims `key` on `store` and drops its
/// table: how many connections were ended, and the claim's outcome.
async fn claim_after_ending(
    store: &PostgresStore,
    admin: &PostgresStore,
    name: &str,
    key: &str,
) -> (usize, Result<Claim, idempotent_core::store::StoreError>) {
    let ended = end_connections(admin, name).await;
    let claimed = store
        .claim(
            &record_key(key),
            Fingerprint::from_bytes([1; 32]),
            STORE_TIMEOUT,
        )
        .await;
    drop_table_on(admin.pool(), store.table()).await;
    (ended, claimed)
}

/// A store on a pool of `size` connections named `name`, keeping up to
/// `hold` of them.
async fn store_named_sized(url: &str, name: &str, size: u32, hold: u32) -> PostgresStore {
    use std::str::FromStr;

    let options = sqlx::postgres::PgConnectOptions::from_str(url)
        .expect("valid URL")
        .application_name(name);
    let pool = PostgresStore::pool_options()
        .max_connections(size)
        .connect_with(options)
        .await
        .expect("connect");
    store_support::postgres_store_on(pool, hold).await
}

/// Has `count` claims on `store` run at once, each on a connection of its
/// own: they wait behind a lock on the table that `admin` holds until
/// all of them are under way. The store then keeps `count` connections.
async fn claims_on_connections_of_their_own(store: &PostgresStore, admin: &PgPool, count: usize) {
    let mut lock = admin.begin().await.expect("begin");
    let table = store.table();
    sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *lock)
        .await
        .expect("lock the table");
    let mut claims = tokio::task::JoinSet::new();
    for index in 0..count {
        let store = store.clone();
        claims.spawn(async move { claim(&store, &format!("held-{index}")).await });
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let opened = u32::try_from(count).expect("a pool's size");
    while store.pool().size() < opened && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lock.commit().await.expect("unlock the table");
    while let Some(claimed) = claims.join_next().await {
        assert!(matches!(claimed.expect("task"), Claim::Acquired(_)));
    }
}

/// A pool larger than 40 connections (here 44, keeping 43): a restart, or
/// the server ending the store's connections, breaks every one of them,
/// and a statement runs again on the next broken one until it meets a new
/// one, as many times as the pool has connections. Tried only 40 more
/// times, the first claim after the break met 41 broken connections and
/// failed with the server's "terminating connection" (a 503), although a
/// new connection was one or two tries away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_after_the_server_ended_more_than_forty_connections_is_acquired() {
    let Some(url) = backend_url(URL) else { return };
    let name = unique_name("idem_ended_many");
    let store = store_named_sized(&url, &name, 44, 43).await;
    let admin = PostgresStore::connect(&url).await.expect("connect");
    claims_on_connections_of_their_own(&store, admin.pool(), 43).await;
    let opened = store.pool().size();
    let (ended, claimed) = claim_after_ending(&store, &admin, &name, "after-ended-many").await;
    assert!(opened > 41, "the pool opened only {opened} connections");
    assert!(ended > 41, "ended {ended} connections");
    assert!(matches!(claimed, Ok(Claim::Acquired(_))), "{claimed:?}");
}

/// A row that does not hold a valid record is a codec error ("a stored
/// record could not be decoded"), as an undecodable value is in the other
/// stores, not a failure of the database.
#[tokio::test]
async fn a_corrupt_row_is_a_codec_error() {
    use idempotent_core::store::StoreError;

    let Some(url) = backend_url(URL) else { return };
    let store = fresh_store(&url).await;
    let key = record_key("corrupt");
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let Claim::Acquired(token) = store.claim(&key, fingerprint, STORE_TIMEOUT).await.unwrap()
    else {
        panic!("a new key is acquired")
    };
    let response = StoredResponse::new(
        StatusCode::OK,
        Vec::new(),
        Some(axum::body::Bytes::from_static(b"{}")),
    );
    store
        .complete(&key, token, response, STORE_TIMEOUT)
        .await
        .unwrap();
    sqlx::query(&format!("UPDATE {} SET status = 1000", store.table()))
        .execute(store.pool())
        .await
        .unwrap();
    let read = store.get(&key).await;
    let claimed = store.claim(&key, fingerprint, STORE_TIMEOUT).await;
    drop_table(&store).await;
    assert!(matches!(read, Err(StoreError::Codec(_))), "get: {read:?}");
    assert!(
        matches!(claimed, Err(StoreError::Codec(_))),
        "claim: {claimed:?}"
    );
}

/// The fingerprint of the claims `cut_a_claim_short` cuts.
const CUT_FINGERPRINT: Fingerprint = Fingerprint::from_bytes([7; 32]);

/// Claims `key` while another session holds a write lock on the store's
/// table, gives up on the claim after 500 ms, as the engine's store timeout
/// does, then lets the lock go and gives the server a second to run the
/// statement it was sent. `label` names the case in failures.
async fn cut_a_claim_short(url: &str, store: &PostgresStore, key: &RecordKey, label: &str) {
    let mut locker = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query(&format!("LOCK TABLE {} IN EXCLUSIVE MODE", store.table()))
        .execute(&mut locker)
        .await
        .unwrap();
    let cut = tokio::time::timeout(
        Duration::from_millis(500),
        store.claim(key, CUT_FINGERPRINT, Duration::from_secs(60)),
    )
    .await;
    assert!(
        cut.is_err(),
        "{label}: the claim waits for the lock: {cut:?}"
    );
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
}

/// Another session holds a write lock on the table (a migration, a bulk
/// purge, a `VACUUM FULL`) for longer than the engine's store timeout: the
/// claim is cut short and the engine answers 503 without running anything.
/// But PostgreSQL runs the statement it was sent once the lock frees, and
/// the key is then held by a lease nobody has, until it lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_cut_short_by_the_store_timeout_leaves_no_lease_behind() {
    let Some(url) = backend_url(URL) else { return };
    let store = fresh_store(&url).await;
    let key = record_key(&unique_name("cut-short"));
    cut_a_claim_short(&url, &store, &key, "cold").await;
    let left = store.get(&key).await.unwrap();
    drop_table(&store).await;
    assert_eq!(
        left, None,
        "a claim that answered nobody must not hold the key"
    );
}

/// The same on a connection that has run the claim before, as every
/// connection of a running service has: the statement is prepared there
/// already, so it is sent whole and runs once the lock frees, rather than
/// stopping at its preparation. With connections kept and without.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_cut_short_on_a_warm_connection_leaves_no_lease_behind() {
    let Some(url) = backend_url(URL) else { return };
    for hold in [0, 1] {
        let store = store_on_own_pool(&url, hold).await;
        for warm in 0..3 {
            claim(&store, &format!("warm-{warm}")).await;
        }
        let key = record_key(&unique_name("cut-short-warm"));
        cut_a_claim_short(&url, &store, &key, &format!("hold {hold}")).await;
        let left = store.get(&key).await.unwrap();
        // The key is free again for the retry of the request told nothing ran.
        let retried = store
            .claim(&key, CUT_FINGERPRINT, Duration::from_secs(60))
            .await;
        drop_table(&store).await;
        assert_eq!(
            left, None,
            "hold {hold}: a claim that answered nobody must not hold the key"
        );
        assert!(
            matches!(retried, Ok(Claim::Acquired(_))),
            "hold {hold}: {retried:?}"
        );
    }
}

/// A claim cut short by the store timeout is released by a task of the
/// store's own once the server answers. At shutdown, `drain` waits for that
/// task: with the runtime stopped before it ran, the claim the server then
/// applied would hold the key, with nothing running, until its lease
/// lapsed. Here the lock holding the claim up goes only while `drain` runs.
#[test]
fn drain_waits_for_the_release_of_a_claim_cut_short() {
    let Some(url) = backend_url(URL) else { return };
    let key = record_key(&unique_name("drained"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    // Warm connections, as `cut_a_claim_short` explains; one, kept.
    let store = runtime.block_on(async {
        let store = store_on_own_pool(&url, 1).await;
        for warm in 0..3 {
            claim(&store, &format!("warm-{warm}")).await;
        }
        store
    });
    let table = store.table().to_owned();
    let (locked, cut) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
    let locker = std::thread::spawn({
        let (url, table) = (url.clone(), table.clone());
        move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let mut locker = sqlx::PgConnection::connect(&url).await.unwrap();
                sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
                let lock = format!("LOCK TABLE {table} IN EXCLUSIVE MODE");
                sqlx::query(&lock).execute(&mut locker).await.unwrap();
                locked.0.send(()).unwrap();
                cut.1.recv().unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
                sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
            });
        }
    });
    locked.1.recv().expect("the table is locked");
    runtime.block_on(async {
        let claiming = store.claim(&key, CUT_FINGERPRINT, Duration::from_secs(60));
        let claimed = tokio::time::timeout(Duration::from_millis(500), claiming).await;
        assert!(
            claimed.is_err(),
            "the claim waits for the lock: {claimed:?}"
        );
        cut.0.send(()).unwrap();
        Idempotency::new(store).drain().await;
    });
    drop(runtime);
    locker.join().expect("the locking thread");
    let check = tokio::runtime::Runtime::new().expect("a runtime");
    let left: i64 = check.block_on(async {
        let mut connection = sqlx::PgConnection::connect(&url).await.expect("connect");
        // Time for the server to apply the claim it was sent.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let count = format!("SELECT count(*) FROM {table} WHERE key = $1");
        let left = sqlx::query_scalar(&count)
            .bind(key.key.as_str())
            .fetch_one(&mut connection)
            .await
            .expect("count the rows");
        let drop_table = format!("DROP TABLE IF EXISTS {table}");
        sqlx::query(&drop_table)
            .execute(&mut connection)
            .await
            .unwrap();
        left
    });
    assert_eq!(left, 0, "the claim cut short still holds the key");
}

/// `max_body_bytes` goes up to 4 GiB less a byte ("the most a stored
/// record can hold"), but PostgreSQL keeps at most 1 GB in a `bytea` and
/// in one protocol message: completing fails every time, the engine gives
/// up and the lease lapses, so a retry runs the handler again.
#[tokio::test]
async fn a_body_over_postgres_value_limit_is_still_completed() {
    let Some(url) = backend_url(URL) else { return };
    let store = fresh_store(&url).await;
    let completion = complete_with_a_body_of(&store, 1_100_000_000).await;
    drop_table(&store).await;
    assert_kept(&completion);
}

/// A payment endpoint with the shortest lease there is, a second, which
/// the engine's default store timeout of 2 s outlasts; its handler books
/// the payment and takes a second to answer.
fn one_second_lease_app(store: PostgresStore, ledger: &Ledger) -> axum::Router {
    use axum::Json;
    use axum::extract::State;
    use axum::response::{IntoResponse, Response};
    use idempotent_core::{Endpoint, IdempotentRequest, Scope};

    const PAY: Endpoint = Endpoint::new("pay")
        .scope(Scope::Global)
        .lease(Duration::from_secs(1));
    async fn pay(
        State(ledger): State<Ledger>,
        idempotency: IdempotentRequest,
        Json(request): Json<serde_json::Value>,
    ) -> Response {
        let fingerprint = PAY.fingerprint(&request);
        idempotency
            .run(&PAY, fingerprint, async move {
                ledger.count();
                tokio::time::sleep(Duration::from_secs(1)).await;
                StatusCode::CREATED.into_response()
            })
            .await
    }
    axum::Router::new()
        .route("/payments", axum::routing::post(pay))
        .with_state(ledger.clone())
        .layer(Idempotency::new(store))
}

/// Two instances share a table; the network between the first and the
/// database stalls for 1.5 s just after its claim went out. The database
/// applied the claim at once, with a lease of a second; a retry sent to
/// the second instance at 1.2 s finds it lapsed, takes the key over and
/// pays. The first instance's answer, that it acquired the key, comes at
/// 1.5 s, within its store timeout: it must not pay as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_answered_after_its_lease_ran_out_does_not_pay_beside_a_takeover() {
    let Some(url) = backend_url(URL) else { return };
    let direct = fresh_store(&url).await;
    let (options, relay) = relay_to_the_database(&url).await;
    let pool = PostgresStore::pool_options()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("connect through the relay");
    let relayed = PostgresStore::builder(pool)
        .table(direct.table())
        .build()
        .expect("valid table name");
    // Every connection has the claim prepared: preparing it is a round
    // trip of its own, which the stall would hold before the claim went out.
    let mut burst = tokio::task::JoinSet::new();
    for index in 0..12 {
        let relayed = relayed.clone();
        burst.spawn(async move { claim(&relayed, &format!("warm-{index}")).await });
    }
    burst.join_all().await;
    let ledger = Ledger::default();
    let first_instance = one_second_lease_app(relayed, &ledger);
    let second_instance = one_second_lease_app(direct.clone(), &ledger);

    relay.stall(true);
    let first = tokio::spawn(async move { pay(&first_instance, "stalled", 1).await });
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let retry = tokio::spawn(async move { pay(&second_instance, "stalled", 1).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.stall(false);
    let (first, retry) = (first.await.unwrap(), retry.await.unwrap());
    drop_table(&direct).await;

    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(
        ledger.executions(),
        1,
        "paid twice: the first instance answered {}",
        first.status
    );
    assert_eq!(first.status, StatusCode::CONFLICT);
}
