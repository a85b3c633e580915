//! `SqliteStore` on files in the system temporary directory; no server
//! needed, so these always run.

use crate::store_support;

use std::time::Duration;

use axum::http::StatusCode;
use idempotent_core::store::{SqliteStore, Tiered};
use idempotent_core::testing::contract;
use store_support::{
    EXPIRY_GRACE, Ledger, TempDb, a_lapsed_claim_is_kept_for_the_grace, assert_kept,
    complete_with_a_body_of, duplicates_across_instances, pay, payments_app, pool_reaches_idle,
};

const STORE_TIMEOUT: Duration = Duration::from_secs(5);

impl TempDb {
    async fn open(&self) -> SqliteStore {
        let store = SqliteStore::open(&self.0).await.expect("open the database");
        store.migrate().await.expect("migrate");
        store
    }
}

/// The file's write lock, held by another process's connection (a
/// transaction left open) until released.
struct WriteLock {
    _other_process: SqliteStore,
    writer: sqlx::pool::PoolConnection<sqlx::Sqlite>,
}

impl WriteLock {
    async fn take(db: &TempDb) -> Self {
        let other_process = db.open().await;
        let mut writer = other_process.pool().acquire().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *writer)
            .await
            .unwrap();
        Self {
            _other_process: other_process,
            writer,
        }
    }

    async fn release(mut self) {
        sqlx::query("COMMIT")
            .execute(&mut *self.writer)
            .await
            .unwrap();
    }
}

fn with_clock(store: &SqliteStore, clock: idempotent_core::clock::ManualClock) -> SqliteStore {
    SqliteStore::builder(store.pool().clone())
        .clock(clock)
        .build()
        .expect("valid table name")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_passes_the_contract() {
    let db = TempDb::new();
    let store = db.open().await;
    contract::run_all(|clock| {
        let store = with_clock(&store, clock);
        async move { store }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiered_sqlite_store_passes_the_contract() {
    let db = TempDb::new();
    let store = db.open().await;
    contract::run_all(|clock| {
        let durable = with_clock(&store, clock.clone());
        async move { Tiered::builder(durable).clock(clock).build() }
    })
    .await;
}

#[tokio::test]
async fn a_completed_record_survives_a_restart() {
    let db = TempDb::new();
    let ledger = Ledger::default();
    let store = db.open().await;
    let app = payments_app(store.clone(), &ledger, STORE_TIMEOUT);
    let original = pay(&app, "restart-1", 100).await;
    assert_eq!(original.status, StatusCode::CREATED);
    drop(app);
    store.pool().close().await;
    drop(store);

    let url = format!("sqlite://{}", db.0.display());
    let restarted = SqliteStore::connect(&url).await.expect("reopen by URL");
    restarted
        .migrate()
        .await
        .expect("migrating again is harmless");
    let app = payments_app(restarted, &ledger, STORE_TIMEOUT);
    let replay = pay(&app, "restart-1", 100).await;
    assert!(replay.replayed());
    assert_eq!(
        (replay.status, &replay.body),
        (original.status, &original.body)
    );
    assert_eq!(ledger.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_file() {
    let db = TempDb::new();
    let ledger = Ledger::default();
    // Two pools on one file, as two processes on one machine would have.
    let apps = [
        payments_app(db.open().await, &ledger, STORE_TIMEOUT),
        payments_app(db.open().await, &ledger, STORE_TIMEOUT),
    ];
    duplicates_across_instances(&apps, &ledger, 100).await;
}

#[tokio::test]
async fn purging_deletes_expired_rows() {
    use idempotent_core::clock::ManualClock;
    use idempotent_core::fingerprint::Fingerprint;
    use idempotent_core::key::IdempotencyKey;
    use idempotent_core::record::RecordKey;
    use idempotent_core::scope::ScopeDigest;
    use idempotent_core::store::Store;

    let db = TempDb::new();
    let clock = ManualClock::starting_now();
    let store = with_clock(&db.open().await, clock.clone());
    let key = |name: &str| {
        RecordKey::new(
            ScopeDigest::global(),
            IdempotencyKey::parse(name.as_bytes()).unwrap(),
        )
    };
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    store
        .claim(&key("short"), fingerprint, Duration::from_secs(1))
        .await
        .unwrap();
    store
        .claim(&key("long"), fingerprint, Duration::from_secs(100))
        .await
        .unwrap();
    assert_eq!(store.purge_expired().await.unwrap(), 0);
    clock.advance(Duration::from_secs(2) + EXPIRY_GRACE);
    assert_eq!(store.purge_expired().await.unwrap(), 1);
    assert!(store.get(&key("long")).await.unwrap().is_some());
}

/// See `store_support::a_lapsed_claim_is_kept_for_the_grace`.
#[tokio::test]
async fn a_purge_keeps_a_lapsed_claim_for_the_grace() {
    let db = TempDb::new();
    let clock = idempotent_core::clock::ManualClock::starting_now();
    let store = with_clock(&db.open().await, clock.clone());
    let purge = async |store: &SqliteStore| store.purge_expired().await.unwrap();
    a_lapsed_claim_is_kept_for_the_grace(&store, &clock, purge).await;
}

/// A backlog of expired rows goes in batches of a thousand, each its own
/// statement, so SQLite's write lock is let go between them: on a pool of
/// one connection, `changes()` then reports the last batch alone.
#[tokio::test]
async fn purging_a_large_backlog_takes_several_statements() {
    let db = TempDb::new();
    // Creates the table.
    drop(db.open().await);
    let single = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&db.0))
        .await
        .expect("open a pool of one connection");
    // The rows are claims, which a purge keeps for the grace past their
    // lease: the clock reads past both for the old rows.
    let now = 1_000 + u64::try_from(EXPIRY_GRACE.as_millis()).unwrap();
    let store = SqliteStore::builder(single.clone())
        .clock(idempotent_core::clock::ManualClock::new(now))
        .build()
        .expect("valid table name");
    // 2,500 expired rows and 3 live ones, written directly.
    let insert = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
                  INSERT INTO idempotency_records (scope, key, fingerprint, lease_token, expires_at)
                  SELECT zeroblob(32), ?2 || i, zeroblob(32), zeroblob(16), ?3 FROM n";
    let live = i64::try_from(now).unwrap() + 4_000;
    for (rows, prefix, expires_at) in [(2_500, "old-", 500), (3, "live-", live)] {
        sqlx::query(insert)
            .bind(rows)
            .bind(prefix)
            .bind(expires_at)
            .execute(&single)
            .await
            .expect("insert rows");
    }
    assert_eq!(store.purge_expired().await.unwrap(), 2_500);
    let last_statement: i64 = sqlx::query_scalar("SELECT changes()")
        .fetch_one(&single)
        .await
        .unwrap();
    assert_eq!(last_statement, 500, "the last batch deleted the rest");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_records")
        .fetch_one(&single)
        .await
        .unwrap();
    assert_eq!(left, 3, "live rows stay");
    drop(store);
    single.close().await;
}

#[tokio::test]
async fn a_schema_qualified_table_is_migrated_and_used() {
    let db = TempDb::new();
    let plain = db.open().await;
    let store = SqliteStore::builder(plain.pool().clone())
        .table("main.payments_records")
        .build()
        .expect("valid table name");
    store
        .migrate()
        .await
        .expect("migrate a schema-qualified table");
    let ledger = Ledger::default();
    let app = payments_app(store, &ledger, STORE_TIMEOUT);
    assert_eq!(pay(&app, "k", 100).await.status, StatusCode::CREATED);
    let retry = pay(&app, "k", 100).await;
    assert_eq!(
        (retry.status, retry.replayed()),
        (StatusCode::CREATED, true)
    );
    assert_eq!(ledger.executions(), 1);
}

/// Table names are quoted in SQL: reserved words are names, alone or after
/// a schema.
#[tokio::test]
async fn reserved_words_are_table_names() {
    let db = TempDb::new();
    let plain = db.open().await;
    for table in ["order", "main.group"] {
        let store = SqliteStore::builder(plain.pool().clone())
            .table(table)
            .build()
            .expect("valid table name");
        let migrated = store.migrate().await;
        assert!(migrated.is_ok(), "migrate {table}: {migrated:?}");
        let ledger = Ledger::default();
        let app = payments_app(store.clone(), &ledger, STORE_TIMEOUT);
        assert_eq!(pay(&app, "k", 100).await.status, StatusCode::CREATED);
        assert!(pay(&app, "k", 100).await.replayed(), "{table}");
        assert_eq!(store.purge_expired().await.unwrap(), 0);
        assert_eq!(ledger.executions(), 1);
    }
}

/// A payment made under `key`, then its row damaged by `damage`, with the
/// payments app on the file and one that fails open when the store is down.
struct Damaged {
    ledger: Ledger,
    app: axum::Router,
    failing_open: axum::Router,
}

impl Damaged {
    async fn paid_then(db: &TempDb, key: &str, damage: &str) -> Self {
        let store = db.open().await;
        let ledger = Ledger::default();
        let app = payments_app(store.clone(), &ledger, STORE_TIMEOUT);
        assert_eq!(pay(&app, key, 1).await.status, StatusCode::CREATED);
        sqlx::query(damage)
            .execute(store.pool())
            .await
            .expect("damage the row");
        let failing_open = idempotent_core::Idempotency::builder(store).fail_open(true);
        let failing_open = store_support::payments_app_on(failing_open.build(), &ledger);
        Self {
            ledger,
            app,
            failing_open,
        }
    }
}

/// A record that no longer decodes is answered 500 `record-corrupt`, with
/// no `Retry-After` (retrying soon finds it the same), and the payment is
/// not made again, even by an app that fails open when the store is down.
#[tokio::test]
async fn a_corrupt_record_is_a_500_and_runs_nothing_again() {
    let db = TempDb::new();
    let damaged = Damaged::paid_then(
        &db,
        "corrupt",
        "UPDATE idempotency_records SET record = x'00'",
    )
    .await;
    let Damaged {
        ledger,
        app,
        failing_open,
    } = damaged;
    for app in [app, failing_open] {
        let retry = pay(&app, "corrupt", 1).await;
        assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(retry.content_type(), Some("application/problem+json"));
        let body = String::from_utf8_lossy(&retry.body);
        assert!(body.contains("urn:idempotent:record-corrupt"), "{body}");
        assert!(!retry.headers.contains_key("retry-after"));
    }
    assert_eq!(ledger.executions(), 1);
}

fn record_key(name: &str) -> idempotent_core::record::RecordKey {
    idempotent_core::record::RecordKey::new(
        idempotent_core::scope::ScopeDigest::from_bytes(rand::random()),
        idempotent_core::key::IdempotencyKey::parse(name.as_bytes()).unwrap(),
    )
}

/// Another process holds the file's write lock (a long write, a backup, a
/// checkpoint) for longer than the engine's store timeout: the claim is
/// cut short, and the engine answers 503 without running anything. But
/// SQLite still commits the claim's insert once the lock frees, so the key
/// is then held by a lease nobody has: retries get 409 (or wait) until it
/// lapses, the default 60 s, though nothing is running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_cut_short_by_the_store_timeout_leaves_no_lease_behind() {
    use idempotent_core::fingerprint::Fingerprint;
    use idempotent_core::store::Store;

    let db = TempDb::new();
    let store = db.open().await;
    let write_lock = WriteLock::take(&db).await;
    let key = record_key("cut-short");
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    let cut = tokio::time::timeout(
        Duration::from_millis(500),
        store.claim(&key, fingerprint, Duration::from_secs(60)),
    )
    .await;
    assert!(cut.is_err(), "the claim waits for the lock: {cut:?}");
    write_lock.release().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = store.get(&key).await.unwrap();
    assert_eq!(
        left, None,
        "a claim that answered nobody must not hold the key"
    );
    let retry = store
        .claim(&key, fingerprint, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        matches!(retry, idempotent_core::record::Claim::Acquired(_)),
        "the client's retry runs the request: {retry:?}"
    );
}

/// Several processes start at once on a new file: each opens it (switching
/// it to WAL) and migrates. None may fail with `database is locked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_starting_together_all_open_the_file() {
    let db = TempDb::new();
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let path = db.0.clone();
        opening.spawn(async move {
            let store = SqliteStore::open(&path).await?;
            store.migrate().await?;
            Ok::<_, idempotent_core::store::StoreError>(store)
        });
    }
    let mut failures = Vec::new();
    while let Some(opened) = opening.join_next().await {
        if let Err(error) = opened.unwrap() {
            failures.push(error.to_string());
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// What a client sees of the claim above: a 503 while the file is locked,
/// then, though nothing ran, 409 "still being processed" for the whole
/// lease (60 s by default) instead of the payment being made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_503_on_a_locked_file_the_retry_runs_rather_than_409() {
    use axum::Json;
    use axum::extract::State;
    use axum::response::{IntoResponse, Response};
    use idempotent_core::{Endpoint, Idempotency, IdempotentRequest, Scope};

    const NO_WAIT: Endpoint = Endpoint::new("no_wait").scope(Scope::Global);
    async fn handler(
        State(ledger): State<Ledger>,
        idempotency: IdempotentRequest,
        Json(request): Json<serde_json::Value>,
    ) -> Response {
        let fingerprint = NO_WAIT.fingerprint(&request);
        idempotency
            .run(&NO_WAIT, fingerprint, async move {
                ledger.count();
                StatusCode::CREATED.into_response()
            })
            .await
    }

    let db = TempDb::new();
    let store = db.open().await;
    let ledger = Ledger::default();
    let app = axum::Router::new()
        .route("/payments", axum::routing::post(handler))
        .with_state(ledger.clone())
        .layer(
            Idempotency::builder(store)
                .store_timeout(Duration::from_millis(500))
                .build(),
        );
    let write_lock = WriteLock::take(&db).await;
    let first = pay(&app, "locked", 1).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    write_lock.release().await;
    // The claim given up at the timeout may still apply once the lock is
    // free, and is then released by the store: a 409 for that moment is
    // what a client sees until its Retry-After, not the lease's 60 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut retry = pay(&app, "locked", 1).await;
    while retry.status == StatusCode::CONFLICT && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        retry = pay(&app, "locked", 1).await;
    }
    assert_eq!(
        retry.status,
        StatusCode::CREATED,
        "nothing ran, yet the retry got: {:?}",
        String::from_utf8_lossy(&retry.body)
    );
    assert_eq!(ledger.executions(), 1);
}

/// `max_body_bytes` is documented to go up to 4 GiB less a byte, "the
/// most a stored record can hold", but SQLite refuses a value over 1e9
/// bytes (SQLITE_MAX_LENGTH): completing fails every time, the engine
/// gives up and the lease lapses, so a retry runs the handler again.
#[tokio::test]
async fn a_body_over_sqlites_blob_limit_is_still_completed() {
    let db = TempDb::new();
    let store = db.open().await;
    assert_kept(&complete_with_a_body_of(&store, 1_000_000_000).await);
}

/// A completed row damaged in another column than the response blob
/// (SQLite keeps whatever type it is given: here a deadline moved by hand
/// with a fractional number of ms) is a decode failure like a damaged blob.
/// It must be answered 500 `record-corrupt` and run nothing again; as a
/// "backend" error it is a 503, and an app that fails open pays again.
#[tokio::test]
async fn a_row_with_a_column_of_the_wrong_type_runs_nothing_again() {
    let db = TempDb::new();
    let damage = "UPDATE idempotency_records SET expires_at = expires_at + 0.5";
    let Damaged {
        ledger,
        failing_open,
        ..
    } = Damaged::paid_then(&db, "damaged", damage).await;
    let retry = pay(&failing_open, "damaged", 1).await;
    assert_eq!(ledger.executions(), 1, "the payment ran again: {retry:?}");
    assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR);
}

/// Two `Tiered` instances on one file, one clock: a completion on one is
/// replayed by the other; a holder whose lease lapsed and was taken over
/// by the other instance neither completes nor keeps replaying its own
/// view; both memory tiers forget a record when the file does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_tiered_instances_agree_with_the_file() {
    use idempotent_core::clock::{Clock, ManualClock};
    use idempotent_core::fingerprint::Fingerprint;
    use idempotent_core::record::{Claim, Record, StoredResponse};
    use idempotent_core::store::{Store, StoreError};

    let db = TempDb::new();
    let clock = ManualClock::starting_now();
    let tiered = |store: SqliteStore| {
        Tiered::builder(with_clock(&store, clock.clone()))
            .clock(clock.clone())
            .build()
    };
    let (a, b) = (tiered(db.open().await), tiered(db.open().await));
    let lease = Duration::from_secs(10);
    let ttl = Duration::from_secs(60);
    let fingerprint = Fingerprint::from_bytes([3; 32]);
    let body = |text: &'static str| {
        StoredResponse::new(
            StatusCode::CREATED,
            Vec::new(),
            Some(axum::body::Bytes::from_static(text.as_bytes())),
        )
    };
    let body_of = |claim: Claim| match claim {
        Claim::Completed(record) => record.response.body.clone(),
        other => panic!("expected a completed record, got {other:?}"),
    };

    // A lease lost to the other instance.
    let key = record_key("lost");
    let Claim::Acquired(stale) = a.claim(&key, fingerprint, lease).await.unwrap() else {
        panic!("new key");
    };
    clock.advance(lease);
    let Claim::Acquired(fresh) = b.claim(&key, fingerprint, lease).await.unwrap() else {
        panic!("lapsed lease is taken over");
    };
    assert!(matches!(
        a.claim(&key, fingerprint, lease).await.unwrap(),
        Claim::InFlight { .. }
    ));
    b.complete(&key, fresh, body("from b"), ttl).await.unwrap();
    assert!(matches!(
        a.complete(&key, stale, body("from a"), ttl).await,
        Err(StoreError::LeaseLost)
    ));
    let b_body = Some(axum::body::Bytes::from_static(b"from b"));
    assert_eq!(
        body_of(a.claim(&key, fingerprint, lease).await.unwrap()),
        b_body
    );
    assert_eq!(
        body_of(b.claim(&key, fingerprint, lease).await.unwrap()),
        b_body
    );

    // Expiry lines up in both memory tiers and the file.
    let done = clock.now_millis();
    clock.set(done + 60_000 - 1);
    assert!(matches!(
        a.get(&key).await.unwrap(),
        Some(Record::Completed(_))
    ));
    assert!(matches!(
        b.get(&key).await.unwrap(),
        Some(Record::Completed(_))
    ));
    clock.set(done + 60_000);
    assert_eq!(a.get(&key).await.unwrap(), None);
    assert!(matches!(
        b.claim(&key, fingerprint, lease).await.unwrap(),
        Claim::Acquired(_)
    ));
    assert!(matches!(
        a.claim(&key, fingerprint, lease).await.unwrap(),
        Claim::InFlight { .. }
    ));
}

/// Claims of new keys, all at once, on a store opened by `open`: each must
/// be acquired, and each claim must then be seen by a duplicate.
async fn claims_at_once_on(store: &SqliteStore) -> Vec<String> {
    use idempotent_core::fingerprint::Fingerprint;
    use idempotent_core::record::Claim;
    use idempotent_core::store::Store;

    let fingerprint = Fingerprint::from_bytes([5; 32]);
    let lease = Duration::from_secs(60);
    let mut claims = tokio::task::JoinSet::new();
    for n in 0..32 {
        let store = store.clone();
        claims.spawn(async move {
            let key = record_key(&format!("memory-{n}"));
            let first = store.claim(&key, fingerprint, lease).await;
            let duplicate = store.claim(&key, fingerprint, lease).await;
            match (first, duplicate) {
                (Ok(Claim::Acquired(_)), Ok(Claim::InFlight { .. })) => None,
                outcome => Some(format!("{outcome:?}")),
            }
        });
    }
    claims.join_all().await.into_iter().flatten().collect()
}

/// An in-memory database (`:memory:`) is private to the connection that
/// opened it: on a pool of four, the table `migrate` created, and every
/// record, lived on one connection, and a claim that ran on another failed
/// with `no such table` (or, once each had a table, two duplicates on two
/// connections would both acquire).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_memory_database_opened_by_path_is_one_database() {
    let store = SqliteStore::open(":memory:").await.expect("open");
    store.migrate().await.expect("migrate");
    let failures = claims_at_once_on(&store).await;
    assert!(failures.is_empty(), "{failures:?}");
}

/// `sqlite::memory:` is shared by the pool's connections, but only while
/// one of them is open: a pool that closes idle connections (after ten
/// minutes by default) or ages them out (thirty) would drop the table and
/// every record with its last connection, and answer every request after
/// that 503 `no such table`. The store keeps its connection for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_memory_database_by_url_keeps_its_connection() {
    let store = SqliteStore::connect("sqlite::memory:")
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    let options = store.pool().options();
    assert_eq!(
        (
            options.get_idle_timeout(),
            options.get_max_lifetime(),
            options.get_min_connections() > 0
        ),
        (None, None, true),
        "the pool may close the database's last connection"
    );
    let failures = claims_at_once_on(&store).await;
    assert!(failures.is_empty(), "{failures:?}");
}

/// The same database on a pool of the service's own, as sqlx builds one
/// by default (`SqlitePool::connect("sqlite::memory:")`), closes its
/// connections once idle or old: `migrate` accepted it, and once the pool
/// had let its last connection go, every completed record was gone and
/// each request failed on a missing table, told to run `migrate`, which
/// had run. `migrate` refuses it, saying what to set; a pool that keeps
/// its connection is accepted.
#[tokio::test]
async fn an_in_memory_pool_that_closes_its_connections_is_refused() {
    use sqlx::sqlite::SqlitePoolOptions;
    use std::str::FromStr as _;

    for url in ["sqlite::memory:", "sqlite:records?mode=memory"] {
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).expect("URL");
        for pool in [
            SqlitePoolOptions::new(),
            SqlitePoolOptions::new()
                .min_connections(1)
                .idle_timeout(None),
        ] {
            let pool = pool.connect_with(options.clone()).await.expect("pool");
            let store = SqliteStore::builder(pool).build().expect("valid name");
            let refused = store.migrate().await.expect_err(url).to_string();
            assert!(
                refused.contains("in memory") && refused.contains("max_lifetime(None)"),
                "{refused}"
            );
        }
    }
    // Only `sqlite::memory:` is one database for the pool's connections
    // (see the next test).
    let kept = SqlitePoolOptions::new()
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None);
    let shared = sqlx::sqlite::SqliteConnectOptions::from_str("sqlite::memory:").expect("URL");
    let pool = kept.connect_with(shared).await.expect("pool");
    let store = SqliteStore::builder(pool).build().expect("valid name");
    store
        .migrate()
        .await
        .expect("a pool that keeps its connection");
}

/// An in-memory database named as a file (`:memory:`, which
/// `SqliteConnectOptions::new()` has by default), by a plain name with
/// `mode=memory` (which sqlx opens with a shared cache, but SQLite shares
/// only under a `file:` URI) or with `cache=private` is each connection's
/// own. On a pool of several connections that keeps
/// them open, as `builder` asks of an in-memory pool, `migrate` made the
/// table on one connection and accepted the pool: claims that ran on
/// another failed on a missing table, told to run `migrate`, which had
/// run, and a response stored through another connection than its
/// claim's would be refused, its request run again once the lease
/// lapsed. `migrate` refuses such a pool, saying what to set; one of a
/// single connection, or whose connections share the database, is
/// accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_memory_pool_whose_connections_each_have_a_database_is_refused() {
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    use std::str::FromStr as _;

    let kept = |connections| {
        SqlitePoolOptions::new()
            .max_connections(connections)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
    };
    let named = |url| SqliteConnectOptions::from_str(url).expect("URL");
    for options in [
        named("sqlite:own_records?mode=memory"),
        SqliteConnectOptions::new(),
        named("sqlite:own_records?mode=memory&cache=private"),
    ] {
        let pool = kept(4).connect_with(options.clone()).await.expect("pool");
        let store = SqliteStore::builder(pool).build().expect("valid name");
        let refused = match store.migrate().await {
            Ok(()) => {
                let failures = claims_at_once_on(&store).await;
                panic!(
                    "migrate accepted a pool whose connections each have a database of their own: {} of 32 new keys failed their claim or their duplicate's, as {}",
                    failures.len(),
                    failures.first().map_or("none", String::as_str)
                );
            }
            Err(refused) => refused.to_string(),
        };
        assert!(
            refused.contains("in memory") && refused.contains("max_connections(1)"),
            "{refused}"
        );
        let pool = kept(1).connect_with(options).await.expect("pool");
        let store = SqliteStore::builder(pool).build().expect("valid name");
        store.migrate().await.expect("one connection, one database");
    }
    let shared = SqliteConnectOptions::from_str("sqlite::memory:").expect("URL");
    let pool = kept(4).connect_with(shared).await.expect("pool");
    let store = SqliteStore::builder(pool).build().expect("valid name");
    store
        .migrate()
        .await
        .expect("connections sharing one database");
    let failures = claims_at_once_on(&store).await;
    assert!(failures.is_empty(), "{failures:?}");
}

/// SQLite's `temp` schema is each connection's own, as PostgreSQL's
/// `pg_temp` is: a table there is refused when the store is built.
#[tokio::test]
async fn tables_in_the_temporary_schema_are_refused() {
    let db = TempDb::new();
    let store = db.open().await;
    for table in ["temp.records", "TEMP.records"] {
        let built = SqliteStore::builder(store.pool().clone())
            .table(table)
            .build();
        let error = built.expect_err("a temporary table is refused");
        assert!(error.to_string().contains("temporary"), "{table}: {error}");
    }
}

/// What `PRAGMA synchronous` (2 is `FULL`) and `PRAGMA journal_mode` say on
/// every connection the pool has at once, and again on the connections
/// it opens after those were closed.
async fn sync_settings_of_every_connection(store: &SqliteStore) -> Vec<(i64, String)> {
    let pool = store.pool();
    let mut settings = Vec::new();
    for _ in 0..2 {
        let mut held = Vec::new();
        for _ in 0..pool.options().get_max_connections() {
            held.push(pool.acquire().await.expect("a connection"));
        }
        for connection in &mut held {
            let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&mut **connection)
                .await
                .expect("read synchronous");
            let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(&mut **connection)
                .await
                .expect("read journal_mode");
            settings.push((synchronous, journal));
        }
        for connection in held {
            connection.close().await.expect("close a connection");
        }
    }
    settings
}

/// In WAL mode `synchronous = NORMAL` does not sync the log on commit: a
/// power loss or an OS crash could roll back a claim, or a response the
/// client already has, and the retry after the reboot would run the
/// handler again. Every connection the store opens, by path or by URL,
/// syncs each commit (`FULL`).
#[tokio::test]
async fn every_connection_syncs_each_commit() {
    let db = TempDb::new();
    let url = format!("sqlite://{}", db.0.display());
    let stores = [
        db.open().await,
        SqliteStore::connect(&url).await.expect("connect"),
    ];
    for store in &stores {
        let settings = sync_settings_of_every_connection(store).await;
        let max = store.pool().options().get_max_connections() as usize;
        assert_eq!(settings.len(), 2 * max);
        let not_durable: Vec<_> = settings
            .iter()
            .filter(|(synchronous, journal)| (*synchronous, journal.as_str()) != (2, "wal"))
            .collect();
        assert!(not_durable.is_empty(), "{not_durable:?}");
    }
}

/// Another program holds the file in `locking_mode = EXCLUSIVE`: opening
/// fails after the busy timeout, and the error said only "database is
/// locked: opening the SQLite database", not that someone else holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_locked_by_another_program_is_named_as_such() {
    use sqlx::Connection;

    let db = TempDb::new();
    db.open().await.pool().close().await;
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&db.0);
    let mut holder = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    sqlx::raw_sql("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE; COMMIT;")
        .execute(&mut holder)
        .await
        .unwrap();
    let error = SqliteStore::open(&db.0).await.unwrap_err().to_string();
    assert!(
        error.contains("another process has kept") && error.contains("locking_mode"),
        "{error}"
    );
}

/// Another connection keeps the file's write lock past the busy timeout
/// (a transaction left open): the claim fails as an outage, and its error
/// said only "database is locked", not which file, nor why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_on_a_file_kept_locked_names_the_file() {
    use idempotent_core::fingerprint::Fingerprint;
    use idempotent_core::store::{Store, StoreError};

    let db = TempDb::new();
    let store = db.open().await;
    let write_lock = WriteLock::take(&db).await;
    let key = record_key("kept-locked");
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    let claimed = store
        .claim(&key, fingerprint, Duration::from_secs(60))
        .await;
    write_lock.release().await;
    let error = claimed.expect_err("the file is locked");
    assert!(matches!(error, StoreError::Backend(_)), "{error:?}");
    let told = error.to_string();
    let file = db.0.display().to_string();
    assert!(
        told.contains(&file) && told.contains("a transaction left open"),
        "{told}"
    );
}

/// A database file damaged on disk (a failing disk, a copy taken while it
/// was written, a file overwritten in place): every claim that reads the
/// damaged page fails alike until the file is restored. SQLite says only
/// "database disk image is malformed", without the file, and that was
/// told as an outage that may pass by itself, answered 503 and retried
/// for good. It is a setup to change, naming the file and what to do.
#[tokio::test]
async fn a_damaged_database_file_names_the_file_and_the_fix() {
    use idempotent_core::fingerprint::Fingerprint;
    use idempotent_core::store::{Store, StoreError};
    use sqlx::Connection as _;
    use std::io::{Seek as _, SeekFrom, Write as _};

    let db = TempDb::new();
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db.0)
        .create_if_missing(true);
    let mut connection = sqlx::SqliteConnection::connect_with(&options)
        .await
        .expect("create the file");
    let schema = SqliteStore::migration_sql("idempotency_records").expect("valid name");
    sqlx::raw_sql(&schema)
        .execute(&mut connection)
        .await
        .expect("migrate");
    let (root, page_size): (i64, i64) = sqlx::query_as(
        "SELECT rootpage, (SELECT page_size FROM pragma_page_size)
         FROM sqlite_master WHERE name = 'idempotency_records'",
    )
    .fetch_one(&mut connection)
    .await
    .expect("the table's first page");
    connection.close().await.expect("close");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&db.0)
        .expect("open the file");
    let offset = u64::try_from((root - 1) * page_size).expect("an offset");
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.write_all(&[0xa5; 64])
        .expect("damage the table's page");
    drop(file);

    let store = db.open().await;
    let key = record_key("damaged");
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    let claimed = store
        .claim(&key, fingerprint, Duration::from_secs(60))
        .await;
    let error = claimed.expect_err("the table's page is damaged");
    assert!(matches!(error, StoreError::Misconfigured(_)), "{error:?}");
    let told = error.to_string();
    let file = db.0.display().to_string();
    assert!(told.contains(&file) && told.contains("restore"), "{told}");
}

/// The file's header overwritten in place under a running store (a copy
/// of something else written over it, a failing disk): SQLite says "file
/// is not a database", without the file, and that was told as an outage
/// that may pass by itself, answered 503 and retried for good, where
/// `open` names the same file as a setup to change. A running store says
/// the same, naming the file and what to do.
#[tokio::test]
async fn a_file_overwritten_under_the_store_names_the_file_and_the_fix() {
    use idempotent_core::fingerprint::Fingerprint;
    use idempotent_core::store::{Store, StoreError};

    let db = TempDb::new();
    let store = db.open().await;
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    let lease = Duration::from_secs(60);
    let claimed = store.claim(&record_key("before"), fingerprint, lease).await;
    assert!(claimed.is_ok(), "{claimed:?}");
    // Into the file itself, so that SQLite reads its first page from there.
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(store.pool())
        .await
        .unwrap();
    let mut file = std::fs::OpenOptions::new().write(true).open(&db.0).unwrap();
    std::io::Write::write_all(&mut file, &[0xa5; 100]).expect("overwrite the header");
    drop(file);

    let claimed = store.claim(&record_key("after"), fingerprint, lease).await;
    let error = claimed.expect_err("the file is no database");
    assert!(matches!(error, StoreError::Misconfigured(_)), "{error:?}");
    let told = error.to_string();
    let file = db.0.display().to_string();
    assert!(told.contains(&file) && told.contains("restore"), "{told}");
}

/// The WAL file's size on disk.
fn wal_len(db: &TempDb) -> u64 {
    let mut path = db.0.clone().into_os_string();
    path.push("-wal");
    std::fs::metadata(path).map_or(0, |metadata| metadata.len())
}

/// A reader that holds an old snapshot (another instance replaying a large
/// record, a backup) while writes go on makes the WAL grow past its
/// checkpoints; once it is done the log is checkpointed and reused, but
/// SQLite kept the file at its largest size for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_wal_file_shrinks_back_after_a_long_reader() {
    let db = TempDb::new();
    let (store, other_instance) = (db.open().await, db.open().await);
    let mut reader = other_instance.pool().acquire().await.unwrap();
    sqlx::query("BEGIN").execute(&mut *reader).await.unwrap();
    sqlx::query("SELECT count(*) FROM idempotency_records")
        .execute(&mut *reader)
        .await
        .unwrap();
    for _ in 0..40 {
        assert_kept(&complete_with_a_body_of(&store, 1 << 20).await);
    }
    assert!(
        wal_len(&db) > 40 << 20,
        "the reader kept the log from resetting"
    );
    sqlx::query("COMMIT").execute(&mut *reader).await.unwrap();
    drop(reader);
    // A full checkpoint, then a commit that starts the log over.
    sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
        .execute(store.pool())
        .await
        .unwrap();
    assert_kept(&complete_with_a_body_of(&store, 10).await);
    let left = wal_len(&db);
    assert!(left <= 16 << 20, "the WAL file stayed at {left} bytes");
}

impl TempDb {
    /// Removes the file and its WAL files, as a cleanup script, or a
    /// deploy that lays the directory out anew, would under a running
    /// service.
    fn remove_files(&self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A key of a store that `running` and `started_after` share: the one
/// started after takes it first, and the running one must not take it
/// again. The running one's refusal.
async fn taken_by_both(running: &SqliteStore, started_after: &SqliteStore) -> String {
    use idempotent_core::fingerprint::Fingerprint;
    use idempotent_core::record::Claim;
    use idempotent_core::store::{Store, StoreError};

    let key = record_key("one-run");
    let fingerprint = Fingerprint::from_bytes([4; 32]);
    let lease = Duration::from_secs(60);
    let first = started_after.claim(&key, fingerprint, lease).await;
    assert!(matches!(first, Ok(Claim::Acquired(_))), "{first:?}");
    let second = running.claim(&key, fingerprint, lease).await;
    match second {
        Err(error @ StoreError::Misconfigured(_)) => error.to_string(),
        other => panic!("the key was taken in both files: {other:?}"),
    }
}

/// A running store that has used its file: its connections are open.
async fn running_store(db: &TempDb) -> SqliteStore {
    running_store_on(db.open().await).await
}

/// `store`, once it has used its file.
async fn running_store_on(store: SqliteStore) -> SqliteStore {
    use idempotent_core::fingerprint::Fingerprint;
    use idempotent_core::store::Store;

    let key = record_key("before");
    let fingerprint = Fingerprint::from_bytes([4; 32]);
    store
        .claim(&key, fingerprint, Duration::from_secs(60))
        .await
        .expect("claim");
    store
}

/// The database file deleted under a running service: SQLite in WAL mode
/// goes on reading and writing the deleted file, which no process that
/// opens the path sees, while the next one to start (or a new connection
/// of the pool) creates a new file there. A key would be taken in each
/// file, and run twice. The running store stops instead, and says why.
#[tokio::test]
async fn a_database_file_deleted_under_the_store_is_not_used_on() {
    let db = TempDb::new();
    let running = running_store(&db).await;
    db.remove_files();
    let started_after = db.open().await;
    let refused = taken_by_both(&running, &started_after).await;
    assert!(
        refused.contains(&db.0.display().to_string()) && refused.contains("deleted or replaced"),
        "{refused}"
    );
}

/// The database file replaced under a running service (a backup restored
/// by moving it into place): the running store would go on with the old
/// file and a process started after it with the new one.
#[tokio::test]
async fn a_database_file_replaced_under_the_store_is_not_used_on() {
    let db = TempDb::new();
    let opened = db.open().await;
    // Built on a pool of the service's own, the store learns its file at
    // its first claim.
    let running = SqliteStore::builder(opened.pool().clone())
        .build()
        .expect("valid table name");
    let running = running_store_on(running).await;
    let backup = TempDb::new();
    let source = backup.open().await;
    sqlx::query("VACUUM INTO ?1")
        .bind(format!("{}.restored", backup.0.display()))
        .execute(source.pool())
        .await
        .expect("back up");
    db.remove_files();
    std::fs::rename(format!("{}.restored", backup.0.display()), &db.0).expect("restore");
    let started_after = db.open().await;
    let refused = taken_by_both(&running, &started_after).await;
    assert!(refused.contains("deleted or replaced"), "{refused}");
}

/// The service is given a path through a symbolic link (a release
/// directory, a backup linked into place), and the link is then pointed
/// at another database: SQLite names the file by the link's target, which
/// stays where it was, so the running store went on with the old file
/// while a process started after it used the new one, and a key ran in
/// each. The running store, opened on the link by `open` or on a pool of
/// the service's own (`on_a_pool`), stops instead, and names the link.
#[cfg(unix)]
async fn a_file_swapped_through_a_link_is_not_used_on(on_a_pool: bool) {
    let (old, new, link) = (TempDb::new(), TempDb::new(), TempDb::new());
    let _files = (old.open().await, new.open().await);
    std::os::unix::fs::symlink(&old.0, &link.0).expect("link the old file");
    let running = if on_a_pool {
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&link.0);
        let pool = sqlx::SqlitePool::connect_with(options).await.expect("pool");
        let store = SqliteStore::builder(pool).build().expect("valid name");
        running_store_on(store).await
    } else {
        running_store(&link).await
    };
    // Pointed elsewhere at once, as `mv -T` of a new link over it does.
    let swapped = link.0.with_extension("swapped");
    std::os::unix::fs::symlink(&new.0, &swapped).expect("link the new file");
    std::fs::rename(&swapped, &link.0).expect("swap the link");
    let started_after = link.open().await;
    let refused = taken_by_both(&running, &started_after).await;
    assert!(
        refused.contains(&link.0.display().to_string()) && refused.contains("replaced"),
        "{refused}"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn a_database_file_swapped_through_a_symbolic_link_is_not_used_on() {
    a_file_swapped_through_a_link_is_not_used_on(false).await;
}

#[cfg(unix)]
#[tokio::test]
async fn a_pools_file_swapped_through_a_symbolic_link_is_not_used_on() {
    a_file_swapped_through_a_link_is_not_used_on(true).await;
}

/// How many rows `store`'s table holds.
async fn rows_in(store: &SqliteStore) -> i64 {
    let count = format!("SELECT count(*) FROM \"{}\"", store.table());
    sqlx::query_scalar(&count)
        .fetch_one(store.pool())
        .await
        .expect("count rows")
}

/// Claims `name` for a second on `clock`, then lets the lease lapse, and
/// the grace a purge keeps a lapsed claim for pass.
async fn an_expired_row(
    store: &SqliteStore,
    clock: &idempotent_core::clock::ManualClock,
    name: &str,
) {
    use idempotent_core::store::Store;
    let fingerprint = idempotent_core::fingerprint::Fingerprint::from_bytes([1; 32]);
    let key = record_key(name);
    let lease = Duration::from_secs(1);
    store.claim(&key, fingerprint, lease).await.expect("claim");
    clock.advance(Duration::from_secs(2) + EXPIRY_GRACE);
}

/// Polls `store` until its table is empty, or gives up after two seconds.
async fn until_empty(store: &SqliteStore) -> i64 {
    let mut remaining = rows_in(store).await;
    for _ in 0..200 {
        if remaining == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        remaining = rows_in(store).await;
    }
    remaining
}

/// The reaper purges on every tick, not once, as PostgreSQL's does; and
/// once it is dropped, rows that expire stay until something else purges
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_purges_expired_rows_until_dropped() {
    let db = TempDb::new();
    let clock = idempotent_core::clock::ManualClock::starting_now();
    let store = with_clock(&db.open().await, clock.clone());
    an_expired_row(&store, &clock, "first").await;
    let period = Duration::from_millis(10);
    let reaper = store.spawn_reaper(period);
    assert_eq!(until_empty(&store).await, 0, "the first tick purged it");
    an_expired_row(&store, &clock, "second").await;
    assert_eq!(until_empty(&store).await, 0, "a later tick purged it");
    drop(reaper);
    an_expired_row(&store, &clock, "third").await;
    tokio::time::sleep(period * 20).await;
    assert_eq!(rows_in(&store).await, 1, "a dropped reaper purges nothing");
}

#[tokio::test]
async fn a_reaper_with_a_zero_period_still_purges() {
    let db = TempDb::new();
    let clock = idempotent_core::clock::ManualClock::starting_now();
    let store = with_clock(&db.open().await, clock.clone());
    an_expired_row(&store, &clock, "expired").await;
    let _reaper = store.spawn_reaper(Duration::ZERO);
    assert_eq!(until_empty(&store).await, 0);
}

/// A table created by the user's own migration tool, from
/// `migration_sql`, is one `migrate` accepts and the store runs on; the
/// name is quoted there as in the statements (`order` is reserved).
#[tokio::test]
async fn a_table_made_from_migration_sql_is_accepted_and_used() {
    let db = TempDb::new();
    let opened = SqliteStore::open(&db.0).await.expect("open");
    let table = "main.order";
    let script = SqliteStore::migration_sql(table).expect("a valid table name");
    sqlx::raw_sql(&script)
        .execute(opened.pool())
        .await
        .expect("run the migration script");
    let store = SqliteStore::builder(opened.pool().clone())
        .table(table)
        .build()
        .expect("valid table name");
    assert_eq!(store.table(), table);
    store.migrate().await.expect("migrate accepts the table");
    let ledger = Ledger::default();
    let app = payments_app(store, &ledger, STORE_TIMEOUT);
    assert_eq!(pay(&app, "k", 100).await.status, StatusCode::CREATED);
    assert!(pay(&app, "k", 100).await.replayed());
    assert_eq!(ledger.executions(), 1);
    let indexed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pragma_index_list('order') WHERE name = 'order_expires_at_idx'",
    )
    .fetch_one(opened.pool())
    .await
    .unwrap();
    assert_eq!(indexed, 1, "the script creates the purge's index");
}

#[tokio::test]
async fn migration_sql_refuses_what_the_builder_refuses() {
    for table in ["temp.records", "records; DROP TABLE users", "a.b.c"] {
        let error = SqliteStore::migration_sql(table).expect_err("refused");
        assert!(error.to_string().contains("invalid table name"), "{error}");
    }
}

/// What each of `pragmas` reads on every connection the pool has at once.
async fn pragmas_of_every_connection(store: &SqliteStore, pragmas: &[&str]) -> Vec<Vec<String>> {
    use sqlx::Row;
    let pool = store.pool();
    let mut held = Vec::new();
    for _ in 0..pool.options().get_max_connections() {
        held.push(pool.acquire().await.expect("a connection"));
    }
    let mut settings = Vec::new();
    for connection in &mut held {
        let mut values = Vec::new();
        for pragma in pragmas {
            let row = sqlx::query(&format!("PRAGMA {pragma}"))
                .fetch_one(&mut **connection)
                .await
                .expect("read a pragma");
            let value = row.try_get::<i64, _>(0).map(|value| value.to_string());
            values.push(value.or_else(|_| row.try_get::<String, _>(0)).unwrap());
        }
        settings.push(values);
    }
    settings
}

/// `connect_with` keeps what the options set and applies what `open`
/// applies over it: WAL, `synchronous = FULL` (even over `NORMAL`, as its
/// docs say), the 5 s busy timeout and the 16 MiB `journal_size_limit`.
#[tokio::test]
async fn a_store_from_connect_with_keeps_its_settings() {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteSynchronous};
    let db = TempDb::new();
    let options = SqliteConnectOptions::new()
        .filename(&db.0)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_millis(1))
        .pragma("cache_size", "-4321");
    let store = SqliteStore::connect_with(options)
        .await
        .expect("connect with options");
    store.migrate().await.expect("migrate");
    let pragmas = [
        "journal_mode",
        "synchronous",
        "busy_timeout",
        "journal_size_limit",
        "cache_size",
    ];
    let expected = ["wal", "2", "5000", "16777216", "-4321"].map(str::to_owned);
    for settings in pragmas_of_every_connection(&store, &pragmas).await {
        assert_eq!(settings, expected);
    }
    let ledger = Ledger::default();
    let app = payments_app(store, &ledger, STORE_TIMEOUT);
    assert_eq!(pay(&app, "k", 100).await.status, StatusCode::CREATED);
    assert!(pay(&app, "k", 100).await.replayed());
    assert_eq!(ledger.executions(), 1);
}

/// sqlx pings a connection before lending it unless told not to: for
/// SQLite a command to the connection's own thread, two thread wake-ups,
/// as many as the statement itself. The pool the store opens does not.
#[tokio::test]
async fn the_stores_own_pool_lends_connections_without_a_ping() {
    let db = TempDb::new();
    let url = format!("sqlite://{}", db.0.display());
    let opened = [
        db.open().await,
        SqliteStore::connect(&url).await.expect("connect"),
        SqliteStore::open(":memory:").await.expect("open"),
    ];
    for store in &opened {
        let options = store.pool().options();
        assert!(!options.get_test_before_acquire(), "{store:?}");
    }
}

/// sqlx pings every connection given back to its pool, one more command
/// to the connection's thread per statement: the store keeps its
/// connections between statements instead, and gives them back to the
/// pool only when they sit unused. On a pool of two keeping one, each
/// statement otherwise gives its connection back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_in_a_row_keep_their_connection() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use idempotent_core::store::Store;

    let db = TempDb::new();
    drop(db.open().await);
    let given_back = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&given_back);
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(2)
        .after_release(move |_, _| {
            counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(true) })
        })
        .connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&db.0))
        .await
        .expect("open a pool of two connections");
    let store = SqliteStore::builder(pool.clone())
        .hold_connections(1)
        .build()
        .expect("valid table name");
    // The first statement learns the database's file on a connection of
    // its own.
    assert!(store.get(&record_key("kept-0")).await.unwrap().is_none());
    let before = given_back.load(Ordering::SeqCst);
    for n in 1..=10 {
        assert!(
            store
                .get(&record_key(&format!("kept-{n}")))
                .await
                .unwrap()
                .is_none()
        );
    }
    let returned = given_back.load(Ordering::SeqCst) - before;
    // One, should the sweep of idle connections meet it between two.
    assert!(
        returned <= 1,
        "given back {returned} times in 10 statements"
    );
    // Closing the pool takes it back from the store.
    tokio::time::timeout(Duration::from_secs(10), pool.close())
        .await
        .expect("the pool closes while the store is alive");
    drop(store);
}

/// Reads `name` on `store`, which must succeed. A read runs on the
/// caller's task; a claim runs on a task of the store's own, which may
/// hold the store's last clone and so drop it inside the runtime.
async fn read(store: &SqliteStore, name: &str) {
    use idempotent_core::store::Store;

    store.get(&record_key(name)).await.expect("read");
}

/// A store that outlives the runtime it was first used in, is used in
/// another, and is dropped outside both (a `main` that runs a second
/// runtime after the first, then returns): the connection it kept goes
/// back to the pool on the second runtime. A SQLite connection runs on a
/// thread of its own and serves on in the second runtime; handed to the
/// first, which is gone, it would be closed. So too when the first runtime
/// still runs while the second uses the store (no sweeper starts in the
/// second then), and is dropped only after.
#[test]
fn a_store_used_in_a_second_runtime_gives_its_connections_back_there() {
    for first_dropped_before_second in [true, false] {
        let db = TempDb::new();
        let first = tokio::runtime::Runtime::new().expect("a runtime");
        let store = first.block_on(async {
            let store = db.open().await;
            read(&store, "first-runtime").await;
            store
        });
        let first = if first_dropped_before_second {
            drop(first);
            None
        } else {
            Some(first)
        };
        let second = tokio::runtime::Runtime::new().expect("a runtime");
        second.block_on(read(&store, "second-runtime"));
        // Counted only now: a connection the first runtime was still
        // giving back to the pool is closed with it.
        drop(first);
        let (open, idle) = (store.pool().size(), store.pool().num_idle());
        let pool = store.pool().clone();
        drop(store);
        second.block_on(async {
            let every = usize::try_from(open).expect("a pool's size");
            let returned = pool_reaches_idle(&pool, every, Duration::from_secs(5)).await;
            let (size, now_idle) = (pool.size(), pool.num_idle());
            let case = if first_dropped_before_second {
                "first runtime dropped before the second ran"
            } else {
                "first runtime dropped after the second ran"
            };
            assert!(idle < every, "{case}: the store kept none of {open} connections");
            assert!(
                returned,
                "{case}: a kept connection did not go back to the pool: {size} open, {now_idle} idle, of {open}"
            );
        });
    }
}

/// Asked to keep as many connections as the pool has, or more, the store
/// still leaves one to the rest: under steady traffic, kept connections
/// are never unused for a second, and the application's own queries and
/// the reaper's purges would each wait out the pool's acquire timeout and
/// fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeping_as_many_connections_as_the_pool_has_still_leaves_one_free() {
    let db = TempDb::new();
    drop(db.open().await);
    for hold in [4, 100] {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(4))
            .connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&db.0))
            .await
            .expect("open a pool of four connections");
        let store = SqliteStore::builder(pool)
            .hold_connections(hold)
            .build()
            .expect("valid table name");
        let outcome = store_support::a_purge_and_a_query_under_steady_reads(
            &store,
            store.pool(),
            store.purge_expired(),
        )
        .await;
        store_support::assert_purge_and_query_passed(hold, outcome);
    }
}
