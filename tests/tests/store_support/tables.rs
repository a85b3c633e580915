//! The SQL stores' tables as a test writes them by hand, with a change of
//! its own (a column, a constraint, another key type), and a PostgreSQL
//! store on a table of the test's own making.

use idempotent_core::store::PostgresStore;

use super::{backend_url, unique_name};

/// The PostgreSQL store's columns, for a `CREATE TABLE` of `table` with
/// `key` declared `key_type` and `extra` (columns, then constraints)
/// spliced in after them. `extra` follows the last column as it is, so it
/// is empty or begins with its own comma (`", tenant text"`).
pub fn postgres_table(table: &str, key_type: &str, extra: &str) -> String {
    format!(
        "CREATE TABLE {table} (
            scope bytea NOT NULL, key {key_type} NOT NULL, fingerprint bytea NOT NULL,
            lease_token bytea, expires_at bigint NOT NULL, status smallint,
            header_names text[], header_values bytea[], body bytea{extra}
        );
        CREATE INDEX ON {table} (expires_at);"
    )
}

/// The SQLite store's table with `key`'s declaration (its type and
/// constraints, `"TEXT NOT NULL"`) and `extra` (columns, then constraints)
/// spliced in. `extra` follows the last column as it is, so it is empty or
/// begins with its own comma (`", tenant TEXT"`).
pub fn sqlite_table(key: &str, extra: &str) -> String {
    format!(
        "CREATE TABLE idempotency_records (
            scope BLOB NOT NULL, key {key}, fingerprint BLOB NOT NULL,
            lease_token BLOB, expires_at INTEGER NOT NULL, record BLOB{extra}
        );"
    )
}

/// A PostgreSQL store whose `table` is a name no other test run uses, not
/// yet created: the test creates it, and drops it, with [`execute`](Self::execute).
pub struct PostgresTable {
    pub store: PostgresStore,
    pub name: String,
}

impl PostgresTable {
    /// A store on the table `prefix_<random hex>` of the server at
    /// `IDEMPOTENT_TEST_POSTGRES_URL`; `None` when the test is skipped.
    pub async fn new(prefix: &str) -> Option<Self> {
        let url = backend_url("IDEMPOTENT_TEST_POSTGRES_URL")?;
        let name = unique_name(prefix);
        let store = postgres_on(&url, &name).await;
        Some(Self { store, name })
    }

    /// Runs `sql`, with the table's name in place of each `{table}`.
    pub async fn execute(&self, sql: &str) {
        let sql = sql.replace("{table}", &self.name);
        let executed = sqlx::raw_sql(&sql).execute(self.store.pool()).await;
        executed.unwrap_or_else(|error| panic!("{sql}: {error}"));
    }
}

/// A store on `table` of the server at `url`, the table not created.
pub async fn postgres_on(url: &str, table: &str) -> PostgresStore {
    let connected = PostgresStore::connect(url).await.expect("connect");
    PostgresStore::builder(connected.pool().clone())
        .table(table)
        .build()
        .expect("valid table name")
}

/// A store on `table` of the server at `url`, migrated.
pub async fn migrated_postgres(url: &str, table: &str) -> PostgresStore {
    let store = postgres_on(url, table).await;
    store.migrate().await.expect("migrate");
    store
}

/// A store on `pool` and a table `prefix_<random hex>`, keeping `held` of
/// the pool's connections between statements, migrated: for a test that
/// sets up the pool itself (its size, its connect options).
pub async fn migrated_on_pool(pool: sqlx::PgPool, prefix: &str, held: u32) -> PostgresStore {
    let store = PostgresStore::builder(pool)
        .table(unique_name(prefix))
        .hold_connections(held)
        .build()
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    store
}
