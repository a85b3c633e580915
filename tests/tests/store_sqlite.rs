//! `SqliteStore` on files in the system temporary directory; no server
//! needed, so these always run.

mod store_support;

use std::path::PathBuf;
use std::time::Duration;

use axum::http::StatusCode;
use idempotent_core::store::{SqliteStore, Tiered};
use idempotent_core::testing::contract;
use store_support::{Ledger, duplicates_across_instances, pay, payments_app, unique_name};

const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// A database file that is deleted (with its WAL files) when dropped.
struct TempDb(PathBuf);

impl TempDb {
    fn new() -> Self {
        Self(std::env::temp_dir().join(unique_name("idempotent-test") + ".db"))
    }

    async fn open(&self) -> SqliteStore {
        let store = SqliteStore::open(&self.0).await.expect("open the database");
        store.migrate().await.expect("migrate");
        store
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
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
    clock.advance(Duration::from_secs(2));
    assert_eq!(store.purge_expired().await.unwrap(), 1);
    assert!(store.get(&key("long")).await.unwrap().is_some());
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

/// A record that no longer decodes is answered 500 `record-corrupt`, with
/// no `Retry-After` (retrying soon finds it the same), and the payment is
/// not made again, even by an app that fails open when the store is down.
#[tokio::test]
async fn a_corrupt_record_is_a_500_and_runs_nothing_again() {
    let db = TempDb::new();
    let store = db.open().await;
    let ledger = Ledger::default();
    let app = payments_app(store.clone(), &ledger, STORE_TIMEOUT);
    assert_eq!(pay(&app, "corrupt", 1).await.status, StatusCode::CREATED);
    sqlx::query("UPDATE idempotency_records SET record = x'00'")
        .execute(store.pool())
        .await
        .expect("damage the record");
    let failing_open = store_support::payments_app_on(
        idempotent_core::Idempotency::builder(store.clone())
            .fail_open(true)
            .build(),
        &ledger,
    );
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
