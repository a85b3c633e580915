//! A table of the SQL stores' columns whose primary key is not `(scope,
//! key)`, as a migration tool that gives every table a surrogate `id`
//! makes it: `migrate` took it, and then every claim failed on its `ON
//! CONFLICT (scope, key)` as an outage, a 503 to retry, for good. It is
//! refused by `migrate`, and claims name it as a setup to change, until a
//! unique index on `(scope, key)` is added. PostgreSQL tests need
//! `IDEMPOTENT_TEST_POSTGRES_URL`; SQLite ones use a temporary file.

use crate::store_support;

use std::time::Duration;

use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, RecordKey};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{SqliteStore, Store, StoreError};
use store_support::TempDb;
use store_support::tables::{PostgresTable, postgres_table, sqlite_table};

/// One claim of a new key.
async fn claim(store: &impl Store) -> Result<Claim, StoreError> {
    let key = RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(b"k").expect("valid key"),
    );
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    store
        .claim(&key, fingerprint, Duration::from_secs(60))
        .await
}

/// `error` is a setup to change that names the missing key and `words`.
#[track_caller]
fn assert_refused_for_its_key(error: &StoreError, words: &[&str]) {
    assert!(
        matches!(error, StoreError::Misconfigured(_)),
        "not told as a setup to change: {error:?}"
    );
    let told = error.to_string();
    for word in words.iter().chain(&["primary key"]) {
        assert!(told.contains(word), "`{word}` missing from: {told}");
    }
}

/// What `migrate` and a claim answered on a table without the key, and
/// then once a unique index on `(scope, key)` was added.
struct Outcomes {
    migrated: Result<(), StoreError>,
    claimed: Result<Claim, StoreError>,
    migrated_keyed: Result<(), StoreError>,
    claimed_keyed: Result<Claim, StoreError>,
}

impl Outcomes {
    /// Both refused the table, naming the key and the `builder`'s
    /// `table` setting (`migrate` the `table` too); both worked once it
    /// had the key.
    #[track_caller]
    fn assert_refused_until_keyed(self, table: &str, builder: &str) {
        let setting = format!("{builder}::table");
        let migrated = self.migrated.expect_err("a table without the key");
        assert_refused_for_its_key(&migrated, &[table, &setting]);
        let claimed = self.claimed.expect_err("the claim fails");
        assert_refused_for_its_key(&claimed, &[&setting]);
        self.migrated_keyed
            .expect("a unique index on (scope, key) will do");
        let claimed = self.claimed_keyed;
        assert!(matches!(claimed, Ok(Claim::Acquired(_))), "{claimed:?}");
    }
}

#[tokio::test]
async fn a_postgres_table_keyed_by_a_surrogate_id_is_refused() {
    let Some(table) = PostgresTable::new("idem_keyless").await else {
        return;
    };
    let surrogate_id = ", id bigserial PRIMARY KEY";
    table
        .execute(&postgres_table("{table}", "text", surrogate_id))
        .await;
    let migrated = table.store.migrate().await;
    let claimed = claim(&table.store).await;
    table
        .execute("CREATE UNIQUE INDEX ON {table} (scope, key)")
        .await;
    let outcomes = Outcomes {
        migrated,
        claimed,
        migrated_keyed: table.store.migrate().await,
        claimed_keyed: claim(&table.store).await,
    };
    table.execute("DROP TABLE {table}").await;
    outcomes.assert_refused_until_keyed(&table.name, "PostgresStoreBuilder");
}

#[tokio::test]
async fn a_sqlite_table_keyed_by_a_surrogate_id_is_refused() {
    let db = TempDb::new();
    let store = SqliteStore::open(&db.0).await.expect("open");
    let pool = store.pool();
    let create = sqlite_table("TEXT NOT NULL", ", id INTEGER PRIMARY KEY");
    sqlx::raw_sql(&create).execute(pool).await.expect("create");
    let migrated = store.migrate().await;
    let claimed = claim(&store).await;
    let index = "CREATE UNIQUE INDEX records_key ON idempotency_records (scope, key)";
    sqlx::raw_sql(index).execute(pool).await.expect("index");
    let outcomes = Outcomes {
        migrated,
        claimed,
        migrated_keyed: store.migrate().await,
        claimed_keyed: claim(&store).await,
    };
    outcomes.assert_refused_until_keyed("idempotency_records", "SqliteStoreBuilder");
}
